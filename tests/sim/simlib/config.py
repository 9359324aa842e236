"""Environment configuration: Ollama's env vars (envconfig/config.go) plus OLLAMA_SIM_*."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

from .durations import parse_keep_alive_env


class ConfigError(Exception):
    """A simulator-only setting is malformed; the simulator refuses to start."""


@dataclass(frozen=True)
class Faults:
    """Injected faults, from OLLAMA_SIM_FAULTS (see tests/sim/README.md)."""

    exit_after_requests: int = 0
    exit_during_load: int = 0
    never_ready: int = 0
    slow_start: float = 0.0
    fail_request: int = 0
    fail_load: int = 0
    fail_create: int = 0
    stall_stream: int = -1
    fail_stream: int = -1

    def active(self) -> dict[str, object]:
        """The faults that are switched on, for the startup log."""
        off = Faults()
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(off, f.name)
        }


_INT_FAULTS = {
    "exit_after_requests",
    "exit_during_load",
    "never_ready",
    "fail_request",
    "fail_load",
    "fail_create",
    "stall_stream",
    "fail_stream",
}
_FLOAT_FAULTS = {"slow_start"}


def parse_faults(spec: str) -> Faults:
    """Parse `key=value,key=value`; raise ConfigError naming the bad item."""
    values: dict[str, object] = {}
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        key, sep, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if not sep or not val:
            raise ConfigError(f"OLLAMA_SIM_FAULTS: expected key=value, got {item!r}")
        if key in _INT_FAULTS:
            try:
                num: object = int(val)
            except ValueError:
                raise ConfigError(
                    f"OLLAMA_SIM_FAULTS: {key} expects a non-negative integer, got {val!r}"
                ) from None
            if int(val) < 0:
                raise ConfigError(f"OLLAMA_SIM_FAULTS: {key} must not be negative, got {val!r}")
        elif key in _FLOAT_FAULTS:
            try:
                num = float(val)
            except ValueError:
                raise ConfigError(
                    f"OLLAMA_SIM_FAULTS: {key} expects seconds, got {val!r}"
                ) from None
            if not math.isfinite(float(val)) or float(val) < 0:
                raise ConfigError(f"OLLAMA_SIM_FAULTS: {key} must be >= 0, got {val!r}")
        else:
            known = ", ".join(sorted(_INT_FAULTS | _FLOAT_FAULTS))
            raise ConfigError(f"OLLAMA_SIM_FAULTS: unknown fault {key!r} (known: {known})")
        values[key] = num
    return Faults(**values)  # type: ignore[arg-type]


def parse_host(raw: str | None) -> tuple[str, str, int]:
    """OLLAMA_HOST -> (scheme, host, port) as envconfig.Host() does; host "" = all interfaces."""
    s = (raw or "").strip()
    default_port = 11434
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport = hostport.split("/", 1)[0]
    host, port_s = _split_host_port(hostport)
    if port_s is None:
        host, port_s = "127.0.0.1", str(default_port)
        bare = hostport.strip("[]")
        if bare:
            host = bare
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        port = default_port
    return scheme, host, port


def _split_host_port(hp: str) -> tuple[str, str | None]:
    """Like Go's net.SplitHostPort: returns port None when there is no port."""
    if hp.startswith("["):
        end = hp.find("]")
        if end < 0 or not hp[end + 1 :].startswith(":"):
            return hp, None
        return hp[1:end], hp[end + 2 :]
    if hp.count(":") != 1:
        return hp, None
    host, port = hp.split(":")
    return host, port


def _env_uint(env: dict[str, str], name: str, default: int) -> int:
    """Ollama's Uint(): invalid values fall back to the default."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        return default
    return value if value >= 0 else default


@dataclass(frozen=True)
class Settings:
    """Everything the simulator reads from its environment."""

    scheme: str
    host: str
    port: int
    keep_alive_s: float
    max_loaded_models: int
    num_parallel: int
    max_queue: int
    context_length: int
    models_dir: Path
    visible_devices: tuple[str, ...] | None
    catalog_path: Path
    gpu_file: Path | None
    speed: float
    faults: Faults
    # OLLAMA_SIM_HEADER_LOG: a JSON line per request with the headers as received (tests check
    # what a proxy in front passes on).
    header_log: Path | None = None


def default_catalog() -> Path:
    """tests/sim/catalog.toml, next to the executable."""
    return Path(__file__).resolve().parent.parent / "catalog.toml"


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the environment; raise ConfigError for malformed simulator-only settings."""
    env = dict(os.environ if env is None else env)
    scheme, host, port = parse_host(env.get("OLLAMA_HOST"))
    speed_raw = env.get("OLLAMA_SIM_SPEED", "").strip() or "1"
    try:
        speed = float(speed_raw)
    except ValueError:
        raise ConfigError(f"OLLAMA_SIM_SPEED: expected a number > 0, got {speed_raw!r}") from None
    if not (speed > 0 and math.isfinite(speed)):
        raise ConfigError(f"OLLAMA_SIM_SPEED: expected a number > 0, got {speed_raw!r}")
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    visible = None if cvd is None else tuple(p.strip() for p in cvd.split(",") if p.strip())
    models = env.get("OLLAMA_MODELS", "").strip()
    models_dir = Path(models) if models else Path.home() / ".ollama" / "models"
    catalog = env.get("OLLAMA_SIM_CATALOG", "").strip()
    gpu = env.get("OLLAMA_SIM_GPU", "").strip()
    num_parallel = _env_uint(env, "OLLAMA_NUM_PARALLEL", 1) or 1
    ctx = _env_uint(env, "OLLAMA_CONTEXT_LENGTH", 0) or 4096
    return Settings(
        scheme=scheme,
        host=host,
        port=port,
        keep_alive_s=parse_keep_alive_env(env.get("OLLAMA_KEEP_ALIVE")),
        max_loaded_models=_env_uint(env, "OLLAMA_MAX_LOADED_MODELS", 0),
        num_parallel=num_parallel,
        max_queue=_env_uint(env, "OLLAMA_MAX_QUEUE", 512),
        context_length=ctx,
        models_dir=models_dir,
        visible_devices=visible,
        catalog_path=Path(catalog) if catalog else default_catalog(),
        gpu_file=Path(gpu) if gpu else None,
        speed=speed,
        faults=parse_faults(env.get("OLLAMA_SIM_FAULTS", "")),
        header_log=Path(hl) if (hl := env.get("OLLAMA_SIM_HEADER_LOG", "").strip()) else None,
    )
