"""Start and stop the Ollama simulator (tests/sim/ollama) as a real subprocess, for tests.

    with start_sim(tmp_path, {"OLLAMA_SIM_GPU": str(gpu_file)}) as sim:
        ollama.Client(host=sim.url).list()

Used by the simulator's own tests and by llmd's end-to-end tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

SIM_DIR = Path(__file__).resolve().parent / "sim"
OLLAMA = SIM_DIR / "ollama"
NVIDIA_SMI = SIM_DIR / "nvidia-smi"
CATALOG = SIM_DIR / "catalog.toml"

_LISTENING = re.compile(r"Listening on (\S+):(\d+) \(version ")


def sim_path_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default os.environ) whose PATH starts with tests/sim and the directory
    of sys.executable, so `ollama`/`nvidia-smi` resolve to the simulator and its
    `#!/usr/bin/env python3` finds this interpreter (and its aiohttp)."""
    env = dict(os.environ if base is None else base)
    head = [str(SIM_DIR), str(Path(sys.executable).parent)]
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p not in head]
    env["PATH"] = os.pathsep.join(head + rest)
    return env


class SimStartError(RuntimeError):
    """The simulator exited or did not log `Listening on` in time."""


class SimProcess:
    """A running `ollama serve` simulator."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, host: str, port: int) -> None:
        self.proc = proc
        self.log_path = log_path
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:41234."""
        host = "127.0.0.1" if self.host in ("", "[::]", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int:
        """The simulator's process id."""
        return self.proc.pid

    def log(self) -> str:
        """Everything the simulator wrote to stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit; returns its exit code."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> int:
        """SIGKILL (like `kill -9`) and reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        return self.proc.wait()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def spawn_sim(
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    speed: float | None = 100.0,
    name: str = "sim",
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start `ollama serve` without waiting; returns (process, stderr log path).

    Defaults: OLLAMA_MODELS=tmp_path/models, OLLAMA_SIM_SPEED=speed; `env` overrides both."""
    full = sim_path_env()
    full["OLLAMA_HOST"] = f"{host}:{port}"
    full["OLLAMA_MODELS"] = str(tmp_path / "models")
    if speed is not None:
        full["OLLAMA_SIM_SPEED"] = str(speed)
    full.update(env or {})
    log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(OLLAMA), "serve"],
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, log_path


def start_sim(
    tmp_path: Path,
    env: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    speed: float | None = 100.0,
    timeout: float = 15.0,
    name: str = "sim",
) -> SimProcess:
    """Start the simulator and wait for its `Listening on` line; use as a context manager."""
    proc, log_path = spawn_sim(tmp_path, env, host=host, port=port, speed=speed, name=name)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(encoding="utf-8", errors="replace")
        m = _LISTENING.search(text)
        if m:
            return SimProcess(proc, log_path, m.group(1), int(m.group(2)))
        if proc.poll() is not None:
            raise SimStartError(f"simulator exited with {proc.returncode}:\n{text}")
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise SimStartError(f"simulator not listening after {timeout}s:\n{log_path.read_text()}")


# -- catalog and GPU state file helpers ---------------------------------------------------------


def catalog_model(name: str, size_mib: float = 4, **overrides: Any) -> dict[str, Any]:
    """A small llama-shaped catalog entry (4 layers, KV 1 MiB at num_ctx 4096), pulled at start."""
    entry: dict[str, Any] = {
        "name": name,
        "size": int(size_mib * 1024 * 1024),
        "family": "llama",
        "parameter_size": "1M",
        "quantization": "Q4_K_M",
        "layers": 4,
        "heads": 4,
        "kv_heads": 2,
        "head_dim": 16,
        "embedding_length": 64,
        "context_length": 8192,
        "load_seconds": 0.2,
        "tokens_per_second": 200,
        "pulled": True,
        "test_model": True,
    }
    entry.update(overrides)
    return entry


def write_catalog(path: Path, models: list[dict[str, Any]]) -> Path:
    """Write an OLLAMA_SIM_CATALOG file from dicts (keys as in tests/sim/README.md)."""
    path.write_text(tomli_w.dumps({"model": models} if models else {}), encoding="utf-8")
    return path


def write_gpu_file(path: Path, devices: list[dict[str, Any]]) -> Path:
    """Create a GPU state file, e.g. devices=[{"index": 0, "name": "...", "total_mib": 2048}]."""
    path.write_text(json.dumps({"devices": devices}), encoding="utf-8")
    return path


@contextlib.contextmanager
def _gpu_lock(path: Path) -> Iterator[None]:
    import fcntl

    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_gpu_file(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    """Edit the state file in place under the simulators' lock (fn mutates the document)."""
    with _gpu_lock(path):
        data = json.loads(path.read_text(encoding="utf-8"))
        fn(data)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        tmp.replace(path)


def set_external_mib(path: Path, index: int, mib: int) -> None:
    """Pretend another program holds `mib` MiB on device `index`."""

    def edit(data: dict[str, Any]) -> None:
        for d in data["devices"]:
            if int(d.get("index", -1)) == index:
                d["external_mib"] = mib

    update_gpu_file(path, edit)


def read_gpu_file(path: Path) -> dict[str, Any]:
    """The raw state document (allocations of dead processes may still be listed)."""
    with _gpu_lock(path):
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def nvidia_smi(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the nvidia-smi stand-in with `env` (e.g. {"OLLAMA_SIM_GPU": ...}) on top of ours."""
    full = sim_path_env()
    full.update(env or {})
    return subprocess.run(
        [str(NVIDIA_SMI), *args], env=full, capture_output=True, text=True, timeout=30
    )
