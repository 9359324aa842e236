"""The `ollama` command line: `serve`, `--version`; everything else is refused."""

from __future__ import annotations

import json
import os
import sys
import time

from . import VERSION, logs
from .catalog import load_catalog
from .config import ConfigError, load_settings, parse_host
from .gpu import GpuFileError, GpuState
from .store import Store

USAGE = """Large language model runner (simulator for llmd's tests)

Usage:
  ollama [flags]
  ollama [command]

Available Commands:
  serve       Start ollama

Flags:
  -h, --help      help for ollama
  -v, --version   Show version information

Only `serve` and `--version` are simulated; see tests/sim/README.md.
"""

REAL_COMMANDS = {"create", "show", "run", "stop", "pull", "push", "list", "ls", "ps", "cp", "rm"}


def _server_version() -> str:
    import urllib.request

    scheme, host, port = parse_host(os.environ.get("OLLAMA_HOST"))
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"{scheme}://{host}:{port}/api/version"
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return str(json.loads(resp.read()).get("version", ""))
    except (OSError, ValueError):
        return ""


def version() -> int:
    """cmd/cmd.go versionHandler: ask the server, warn when it is unreachable or differs."""
    server = _server_version()
    if not server:
        print("Warning: could not connect to a running Ollama instance")
    else:
        print(f"ollama version is {server}")
    if server != VERSION:
        print(f"Warning: client version is {VERSION}")
    return 0


def serve() -> int:
    """`ollama serve`: validate everything before the (slow) aiohttp import, then run."""
    try:
        settings = load_settings()
        catalog = load_catalog(settings.catalog_path)
        gpu = GpuState(settings.gpu_file)
        gpu.snapshot()
        gpu.check_writable()
        store = Store(settings.models_dir, catalog)
        store.materialize_presets()
    except (ConfigError, GpuFileError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1
    faults = settings.faults
    if faults.slow_start > 0:
        logs.info(
            "sim.go:1", "slow_start fault: waiting before listening", seconds=faults.slow_start
        )
        time.sleep(faults.slow_start)
    if faults.never_ready:
        logs.info("sim.go:1", "never_ready fault: not listening, sleeping forever")
        while True:
            time.sleep(3600)
    from . import server

    server.log_config(settings)
    return server.serve(settings, gpu, store)


def main(argv: list[str]) -> int:
    """Entry point of tests/sim/ollama."""
    args = argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] in ("-v", "--version"):
        return version()
    if args[0] == "serve":
        if any(a in ("-h", "--help") for a in args[1:]):
            print("Start ollama\n\nUsage:\n  ollama serve [flags]\n\nSee tests/sim/README.md.")
            return 0
        return serve()
    if args[0] in REAL_COMMANDS:
        print(f"Error: 'ollama {args[0]}' is not supported by the simulator", file=sys.stderr)
        return 1
    print(f'Error: unknown command "{args[0]}" for "ollama"', file=sys.stderr)
    return 1
