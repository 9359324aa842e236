"""The daemon's configuration: frozen dataclasses read from TOML and validated whole."""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

DEFAULT_PATH = Path("/etc/llmd/llmd.toml")
FIRST_BACKEND_PORT = 11435
# Environment llmd sets for every child; a backend's env may not override it.
OWNED_ENV = frozenset(
    {
        "OLLAMA_HOST",
        "OLLAMA_KEEP_ALIVE",
        "OLLAMA_MAX_LOADED_MODELS",
        "CUDA_VISIBLE_DEVICES",
        "LLMD_BACKEND",
    }
)

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration problem, naming the file and the dotted key."""

    def __init__(self, file: str | Path, key: str, why: str) -> None:
        self.file = str(file)
        self.key = key
        self.why = why
        super().__init__(f"{self.file}: {key}: {why}" if key else f"{self.file}: {why}")


# -- value parsers shared with the proxy (Ollama's keep_alive) ------------------------------------

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("10m", "1h30m", "-1m", "0"), as time.ParseDuration."""
    s = text.strip()
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    total, pos = 0.0, 0
    while pos < len(s):
        m = _GO_PART.match(s, pos)
        if m is None:
            if re.fullmatch(r"\d+(\.\d*)?", s[pos:]):
                raise ValueError(f'time: missing unit in duration "{text}"')
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _GO_UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def parse_duration(value: object) -> float:
    """Seconds from a config duration: a number of seconds or a Go duration string."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 10m or 1h, or a number of seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return parse_go_duration(value)
        except ValueError:
            pass
    raise ValueError(
        f"expected a duration such as 30s, 10m or 1h, or a number of seconds, got {value!r}"
    )


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_UNIT_NAMES = "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"


def parse_size(value: object) -> int:
    """Bytes from an int or a string such as "24GiB", "512MiB", "24GB" or "1000" (bytes)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}: expected bytes or a string like '24GiB'")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid size {value!r}: must be a non-negative number of bytes")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"invalid size {value!r}: expected bytes or a string like '24GiB'")
    m = _SIZE_RE.match(value)
    unit = m.group(2).lower() if m else ""
    if m is None or (unit and unit not in _UNITS):
        raise ValueError(
            f"invalid size {value!r}: expected a number and a unit, one of {_UNIT_NAMES}"
        )
    return round(float(m.group(1)) * _UNITS[unit or "b"])


def normalize_model(name: str) -> str:
    """Ollama's canonical model name: a missing tag becomes ":latest" (server/routes.go)."""
    name = name.strip()
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


# -- the config tree ------------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """[daemon]: where state and the admin socket live, logging, shutdown."""

    state_dir: Path = Path("/var/lib/llmd")
    admin_socket: Path = Path("/run/llmd/admin.sock")
    log_level: str = "info"
    # "text" (the journal adds the time) or "json" (one object per line).
    log_format: str = "text"
    shutdown_timeout: float = 30.0
    retention_days: int = 14
    # "auto": uvloop where it is installed (python3-uvloop), else asyncio's own loop.
    event_loop: str = "auto"


@dataclass(frozen=True)
class ProxyConfig:
    """[proxy]: the Ollama-compatible port applications talk to."""

    listen: str = "127.0.0.1:11434"
    max_body_size: int = 32 * 1024**2
    # Request bodies held in memory at once, over all requests; a body waits up to body_wait.
    body_memory: int = 128 * 1024**2
    body_wait: float = 30.0
    # Full access: inference, listing and model management (pull, push, create, copy, delete).
    api_keys: tuple[str, ...] = ()
    # Inference and read-only listing only.
    inference_keys: tuple[str, ...] = ()
    allow_unauthenticated: bool = False
    # GET /metrics without a key, for scrapers that cannot send one (the endpoint picker).
    open_metrics: bool = False
    # None ("auto"): derived from the open-file limit at start (connlimit.connection_cap).
    max_connections: int | None = None
    idle_timeout: float = 60.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def loopback(self) -> bool:
        """Whether the proxy listens on a loopback address only (no other machine reaches it)."""
        if self.host.lower() == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name may resolve to anything: assume it is reachable

    @property
    def keyed(self) -> bool:
        """Whether requests need a key (api_keys or inference_keys are set)."""
        return bool(self.api_keys or self.inference_keys)

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class KeepAliveConfig:
    """[keep_alive]: how long an idle model stays loaded."""

    policy: str = "adaptive"
    default: float = 600.0
    min: float = 60.0
    max: float = 4 * 3600.0
    beta: float = 0.001
    prewarm: bool = False


@dataclass(frozen=True)
class GpuConfig:
    """[gpu]: how GPU memory is measured and how much of it llmd may fill."""

    probe: str = "auto"
    interval: float = 2.0
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    reserve: int = 512 * 1024**2
    total: int | None = None
    admission_timeout: float = 30.0


@dataclass(frozen=True)
class BackendConfig:
    """One [[backend]]: an `ollama serve` child."""

    name: str
    port: int
    command: tuple[str, ...] = ("ollama", "serve")
    gpus: tuple[int, ...] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    start_timeout: float = 60.0
    stop_timeout: float = 10.0
    # Liveness: GET / every probe_interval; a probe that takes longer than probe_timeout fails.
    # One failure stops routing to the child; probe_failures in a row replace it.
    probe_interval: float = 2.0
    probe_timeout: float = 2.0
    probe_failures: int = 3
    # Requests a model serves at once (OLLAMA_NUM_PARALLEL; embedding models always 1).
    num_parallel: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """One [[model]]: placement, priority and keep-alive of a model."""

    name: str
    backend: str | None = None
    # Replicas: the backends that may each serve a copy of it (more than one: see
    # `replicated`); `backend` is then the first of them.
    backends: tuple[str, ...] = ()
    priority: int = 5
    pin: bool = False
    preload: bool = False
    # None: follow [keep_alive] policy; "adaptive": learned; a number: fixed seconds.
    keep_alive: float | str | None = None
    aliases: tuple[str, ...] = ()
    # Tasks this model serves: a request may name "task:code" (or send X-LLMD-Task: code)
    # instead of the model, and POST /infer takes {"task": "code"}.
    tasks: tuple[str, ...] = ()
    preempt: bool = False
    allow_cpu_spill: bool = False
    # Runner options the model is loaded with; requests asking for others are served as is.
    options: Mapping[str, int | bool] = field(default_factory=dict)
    # true: a request with other runner options reloads the model, as Ollama does.
    reload_on_options: bool = False
    # None: the [scheduler] value.
    max_queue: int | None = None
    queue_timeout: float | None = None

    @property
    def replicated(self) -> bool:
        """Whether several backends may each hold a copy of it (one record per backend)."""
        return len(self.backends) > 1


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler]: llmd's queue of requests in front of each model."""

    # Requests that may wait for one model; one more is answered 429.
    max_queue: int = 64
    # The longest a request waits in the queue before it is answered 503.
    queue_timeout: float = 120.0
    # Waiting this long makes a request as important as one priority level better.
    aging: float = 10.0
    # Requests a model serves after a load before it may make way for another model.
    swap_batch: int = 8


@dataclass(frozen=True)
class ContentionConfig:
    """[contention]: when a model counts as slowed down by something else (llmd.contention)."""

    # A model is contended when its window's p99 (TTFT or time per token) is above this many
    # times its baseline while every other model stays within this many times its own.
    factor: float = 2.0
    # It clears once both are below this many times their baselines.
    clear_factor: float = 1.5
    # The window: a model's last this many requests...
    window: int = 50
    # ...none older than this.
    window_time: float = 300.0
    # Requests the window must hold to judge the model.
    min_samples: int = 10
    # Requests in the window above factor x baseline needed to set the flag.
    min_slow: int = 3
    # Quiet requests a model's baseline needs before it is judged at all.
    baseline_samples: int = 20


@dataclass(frozen=True)
class Config:
    """The whole configuration, validated."""

    path: Path
    daemon: DaemonConfig
    proxy: ProxyConfig
    keep_alive: KeepAliveConfig
    gpu: GpuConfig
    backends: tuple[BackendConfig, ...]
    models: tuple[ModelConfig, ...]
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    contention: ContentionConfig = field(default_factory=ContentionConfig)

    def model(self, name: str) -> ModelConfig | None:
        """The [[model]] entry for a canonical model name, if configured."""
        return self._by_name.get(name)

    def aliases(self) -> dict[str, str]:
        """Alias -> canonical model name (one dict per config: do not change it)."""
        return self._aliases

    # Looked up on every request: built once per config (a reload makes a new Config).
    @functools.cached_property
    def _by_name(self) -> dict[str, ModelConfig]:
        return {m.name: m for m in reversed(self.models)}  # the first entry of a name wins

    @functools.cached_property
    def _aliases(self) -> dict[str, str]:
        return {a: m.name for m in self.models for a in m.aliases}

    def tasks(self) -> dict[str, str]:
        """Task -> canonical model name (one dict per config: do not change it)."""
        return self._tasks

    @functools.cached_property
    def _tasks(self) -> dict[str, str]:
        return {t: m.name for m in self.models for t in m.tasks}


# -- reading --------------------------------------------------------------------------------------


class _Section:
    """Typed reads from one TOML table that report errors with the dotted key."""

    def __init__(self, file: Path, prefix: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(file, prefix, f"expected a table, got {type(table).__name__}")
        self.file, self.prefix, self.table = file, prefix, dict(table)
        self.seen: set[str] = set()

    def key(self, k: str) -> str:
        return f"{self.prefix}.{k}" if self.prefix else k

    def fail(self, k: str, why: str) -> ConfigError:
        return ConfigError(self.file, self.key(k), why)

    def get(self, k: str, default: T, conv: Callable[[object], T]) -> T:
        self.seen.add(k)
        if k not in self.table:
            return default
        try:
            return conv(self.table[k])
        except (ValueError, TypeError) as e:
            raise self.fail(k, str(e)) from None

    def require(self, k: str, conv: Callable[[object], T]) -> T:
        self.seen.add(k)
        if k not in self.table:
            raise self.fail(k, "is required")
        try:
            return conv(self.table[k])
        except (ValueError, TypeError) as e:
            raise self.fail(k, str(e)) from None

    def raw(self, k: str, default: object) -> object:
        """The value as TOML gave it, for a sub-table read on its own."""
        self.seen.add(k)
        return self.table.get(k, default)

    def done(self) -> None:
        unknown = sorted(set(self.table) - self.seen)
        if unknown:
            known = ", ".join(sorted(self.seen))
            raise self.fail(unknown[0], f"unknown key (known keys here: {known})")


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {v!r}")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {v!r}")
    return v


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {v!r}")
    return v


def _positive_int(v: object) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError(f"expected an integer of at least 1, got {n}")
    return n


def _fraction(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 1:
        raise ValueError(f"expected a fraction between 0 and 1, got {v!r}")
    return float(v)


def _positive_duration(v: object) -> float:
    s = parse_duration(v)
    if s <= 0:
        raise ValueError(f"expected a positive duration, got {v!r}")
    return s


def _str_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError(f"expected a list of strings, got {v!r}")
    return tuple(v)


def _listen(v: object) -> str:
    s = _str(v)
    host, sep, port = s.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:11434, got {s!r}")
    return s


def _api_keys(v: object) -> tuple[str, ...]:
    keys = _str_list(v)
    if any(len(k) < 8 or k != k.strip() for k in keys):
        raise ValueError("expected keys of at least 8 characters, without surrounding spaces")
    return keys


def _max_connections(v: object) -> int | None:
    if v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f'expected "auto" or an integer of at least 1, got {v!r}')
    return v


def _port(v: object) -> int:
    p = _int(v)
    if not 0 < p < 65536:
        raise ValueError(f"expected a TCP port 1-65535, got {p}")
    return p


def _gpus(v: object) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and x >= 0 for x in v):
        raise TypeError(f"expected a list of GPU indexes such as [0, 1], got {v!r}")
    return tuple(v)


def _env(v: object) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise TypeError(f'expected a table of strings such as {{OLLAMA_MODELS = "/x"}}, got {v!r}')
    return dict(v)


def _command(v: object) -> tuple[str, ...]:
    cmd = _str_list(v)
    if not cmd:
        raise ValueError('expected a non-empty command such as ["ollama", "serve"]')
    return cmd


def _model_keep_alive(v: object) -> float | str:
    if v == "adaptive":
        return "adaptive"
    s = parse_duration(v)
    if s < 0:
        raise ValueError('expected "adaptive" or a duration >= 0 (use pin = true to never unload)')
    return s


def _choice(*choices: str) -> Callable[[object], str]:
    def conv(v: object) -> str:
        if v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {v!r}")
        return str(v)

    return conv


def _read_dataclass(file: Path, prefix: str, table: object, cls: type[T], **convs: Any) -> T:
    sec = _Section(file, prefix, table)
    kwargs = {}
    defaults = cls()
    for f in fields(cls):  # type: ignore[arg-type]
        kwargs[f.name] = sec.get(f.name, getattr(defaults, f.name), convs[f.name])
    sec.done()
    return cls(**kwargs)


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate the config file, with the keys the environment adds (KEY_VARIABLES);
    raise ConfigError naming the first problem."""
    file = Path(path)
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(file, "", "file not found") from None
    except OSError as e:
        raise ConfigError(file, "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(file, "", "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(file, "", f"invalid TOML: {e}") from None
    _keys_from_environment(raw, file, os.environ if environ is None else environ)
    return from_dict(raw, file)


# Keys that may come from the environment (a container's or a Kubernetes Secret's), added to
# the file's: a config file in a ConfigMap or an image need not hold secrets.
KEY_VARIABLES = {"LLMD_API_KEYS": "api_keys", "LLMD_INFERENCE_KEYS": "inference_keys"}


def _keys_from_environment(raw: dict[str, Any], file: Path, environ: Mapping[str, str]) -> None:
    """Add LLMD_API_KEYS and LLMD_INFERENCE_KEYS (comma-separated) to [proxy]'s key lists."""
    for var, key in KEY_VARIABLES.items():
        text = environ.get(var, "")
        if not text.strip():
            continue
        keys = [k.strip() for k in text.split(",") if k.strip()]
        if any(len(k) < 8 for k in keys):
            raise ConfigError(
                file, "", f"${var}: expected comma-separated keys of at least 8 characters"
            )
        proxy = raw.setdefault("proxy", {})
        if not isinstance(proxy, dict):
            return  # from_dict names the malformed [proxy]
        given = proxy.get(key, [])
        if isinstance(given, list):  # else from_dict names the malformed list
            proxy[key] = [*given, *(k for k in keys if k not in given)]


def from_dict(raw: dict[str, Any], file: Path = Path("<config>")) -> Config:
    """Validate a parsed TOML document into a Config."""
    top = _Section(file, "", raw)
    daemon = _read_dataclass(
        file,
        "daemon",
        top.raw("daemon", {}),
        DaemonConfig,
        state_dir=lambda v: Path(_str(v)),
        admin_socket=lambda v: Path(_str(v)),
        log_level=_choice("debug", "info", "warning", "error"),
        log_format=_choice("text", "json"),
        event_loop=_choice("auto", "asyncio", "uvloop"),
        shutdown_timeout=_positive_duration,
        retention_days=_positive_int,
    )
    proxy = _read_dataclass(
        file,
        "proxy",
        top.raw("proxy", {}),
        ProxyConfig,
        listen=_listen,
        max_body_size=parse_size,
        body_memory=parse_size,
        body_wait=_positive_duration,
        api_keys=_api_keys,
        inference_keys=_api_keys,
        allow_unauthenticated=_bool,
        open_metrics=_bool,
        max_connections=_max_connections,
        idle_timeout=_positive_duration,
        header_timeout=_positive_duration,
        body_timeout=_positive_duration,
    )
    keep_alive = _read_dataclass(
        file,
        "keep_alive",
        top.raw("keep_alive", {}),
        KeepAliveConfig,
        policy=_choice("adaptive", "fixed"),
        default=_positive_duration,
        min=_positive_duration,
        max=_positive_duration,
        beta=lambda v: float(_positive_number(v)),
        prewarm=_bool,
    )
    gpu = _read_dataclass(
        file,
        "gpu",
        top.raw("gpu", {}),
        GpuConfig,
        probe=_choice("auto", "nvml", "nvidia-smi", "ollama", "none"),
        interval=_positive_duration,
        high_watermark=_fraction,
        low_watermark=_fraction,
        reserve=parse_size,
        total=parse_size,
        admission_timeout=_positive_duration,
    )
    scheduler = _read_dataclass(
        file,
        "scheduler",
        top.raw("scheduler", {}),
        SchedulerConfig,
        max_queue=_positive_int,
        queue_timeout=_positive_duration,
        aging=_positive_duration,
        swap_batch=_positive_int,
    )
    contention = _read_dataclass(
        file,
        "contention",
        top.raw("contention", {}),
        ContentionConfig,
        factor=_positive_number,
        clear_factor=_positive_number,
        window=_positive_int,
        window_time=_positive_duration,
        min_samples=_positive_int,
        min_slow=_positive_int,
        baseline_samples=_positive_int,
    )
    no_tables: list[object] = []
    backend_tables = top.get("backend", no_tables, _table_list)
    model_tables = top.get("model", no_tables, _table_list)
    top.done()

    backends = tuple(_read_backend(file, i, t) for i, t in enumerate(backend_tables))
    if not backends:
        backends = (BackendConfig(name="default", port=FIRST_BACKEND_PORT),)
    models = tuple(_read_model(file, i, t) for i, t in enumerate(model_tables))
    cfg = Config(file, daemon, proxy, keep_alive, gpu, backends, models, scheduler, contention)
    _check_whole(cfg)
    return cfg


def _positive_number(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError(f"expected a positive number, got {v!r}")
    return float(v)


def _table_list(v: object) -> list[object]:
    if not isinstance(v, list):
        raise TypeError("expected an array of tables ([[...]])")
    return v


def _read_backend(file: Path, i: int, table: object) -> BackendConfig:
    sec = _Section(file, f"backend[{i}]", table)
    name = sec.require("name", _str)
    port = sec.get("port", FIRST_BACKEND_PORT + i, _port)
    no_env: dict[str, str] = {}
    env = sec.get("env", no_env, _env)
    owned = sorted(set(env) & OWNED_ENV)
    if owned:
        raise sec.fail(
            "env",
            f"{owned[0]} is set by llmd itself (use backend.port, backend.gpus; llmd owns "
            "keep-alive and eviction), remove it",
        )
    b = BackendConfig(
        name=name,
        port=port,
        command=sec.get("command", BackendConfig.command, _command),
        gpus=sec.get("gpus", None, _gpus),
        env=env,
        start_timeout=sec.get("start_timeout", BackendConfig.start_timeout, _positive_duration),
        stop_timeout=sec.get("stop_timeout", BackendConfig.stop_timeout, _positive_duration),
        probe_interval=sec.get("probe_interval", BackendConfig.probe_interval, _positive_duration),
        probe_timeout=sec.get("probe_timeout", BackendConfig.probe_timeout, _positive_duration),
        probe_failures=sec.get("probe_failures", BackendConfig.probe_failures, _positive_int),
        num_parallel=_num_parallel(sec, env),
    )
    sec.done()
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise sec.fail("name", f"expected letters, digits, '.', '_' or '-', got {name!r}")
    return b


def _num_parallel(sec: _Section, env: Mapping[str, str]) -> int:
    """backend.num_parallel, or the OLLAMA_NUM_PARALLEL of its env (older configs set it there);
    both may be set only to the same value."""
    n = sec.get("num_parallel", None, _positive_int)
    in_env = env.get("OLLAMA_NUM_PARALLEL")
    if in_env is None:
        return n or BackendConfig.num_parallel
    if not in_env.strip().isdigit() or int(in_env) < 1:
        raise sec.fail(
            "env", f"OLLAMA_NUM_PARALLEL: expected an integer of at least 1, got {in_env!r}"
        )
    if n is not None and n != int(in_env):
        raise sec.fail(
            "num_parallel",
            f"is {n} but env.OLLAMA_NUM_PARALLEL is {in_env}: set only num_parallel",
        )
    return int(in_env)


def _read_model(file: Path, i: int, table: object) -> ModelConfig:
    sec = _Section(file, f"model[{i}]", table)
    name = sec.require("name", _str)
    if not name.strip():
        raise sec.fail("name", "must not be empty")
    backend = sec.get("backend", None, _str)
    no_backends: tuple[str, ...] = ()
    backends = sec.get("backends", no_backends, _backend_list)
    if backend is not None and backends:
        raise sec.fail("backends", "set either backend or backends, not both")
    m = ModelConfig(
        name=normalize_model(name),
        backend=backends[0] if backends else backend,
        backends=backends or ((backend,) if backend is not None else ()),
        priority=sec.get("priority", ModelConfig.priority, _priority),
        pin=sec.get("pin", False, _bool),
        preload=sec.get("preload", False, _bool),
        keep_alive=sec.get("keep_alive", None, _model_keep_alive),
        aliases=sec.get("aliases", (), _str_list),
        tasks=sec.get("tasks", (), _tasks),
        preempt=sec.get("preempt", False, _bool),
        allow_cpu_spill=sec.get("allow_cpu_spill", False, _bool),
        options=sec.get("options", {}, _runner_options),
        reload_on_options=sec.get("reload_on_options", False, _bool),
        max_queue=sec.get("max_queue", None, _positive_int),
        queue_timeout=sec.get("queue_timeout", None, _positive_duration),
    )
    sec.done()
    if m.options and m.reload_on_options:
        raise sec.fail("reload_on_options", "cannot be true when options fixes the runner options")
    return m


# Ollama's api.Runner options: the ones whose change reloads a model.
RUNNER_INT_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread")
RUNNER_BOOL_OPTIONS = ("use_mmap",)
RUNNER_OPTIONS = RUNNER_INT_OPTIONS + RUNNER_BOOL_OPTIONS


def _runner_options(v: object) -> dict[str, int | bool]:
    if not isinstance(v, dict):
        raise TypeError(f"expected a table such as {{ num_ctx = 8192 }}, got {v!r}")
    out: dict[str, int | bool] = {}
    for k, x in v.items():
        if k in RUNNER_BOOL_OPTIONS:
            out[k] = _bool(x)
        elif k in RUNNER_INT_OPTIONS:
            n = _int(x)
            if k == "num_ctx" and n < 1:
                raise ValueError(f"num_ctx: expected a positive integer, got {n}")
            out[k] = n
        else:
            known = ", ".join(RUNNER_OPTIONS)
            raise ValueError(
                f"{k!r} is not a runner option (only these fix how a model is loaded: {known}; "
                "sampling options belong in the requests)"
            )
    return out


def _backend_list(v: object) -> tuple[str, ...]:
    names = _str_list(v)
    if not names:
        raise ValueError('expected at least one backend name, such as ["gpu0", "gpu1"]')
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        raise ValueError(f"{dup!r} is listed twice")
    return names


# How a request names a task where it would name a model ("task:code").
TASK_PREFIX = "task:"
_TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _tasks(v: object) -> tuple[str, ...]:
    names = _str_list(v)
    for t in names:
        if not _TASK_NAME.fullmatch(t):
            raise ValueError(
                f"{t!r} is not a task name: letters, digits, '_', '.' and '-', starting with a "
                'letter or digit, at most 64 characters (such as "code" or "summarize")'
            )
    dup = next((t for i, t in enumerate(names) if t in names[:i]), None)
    if dup is not None:
        raise ValueError(f"{dup!r} is listed twice")
    return names


def _priority(v: object) -> int:
    p = _int(v)
    if p < 0:
        raise ValueError(f"expected an integer >= 0 (0 is the most important), got {p}")
    return p


def _check_whole(cfg: Config) -> None:
    """Cross-field checks that no single key can make."""
    file = cfg.path
    k, g = cfg.keep_alive, cfg.gpu
    if k.min > k.max:
        raise ConfigError(file, "keep_alive.min", f"{k.min:g}s is above keep_alive.max {k.max:g}s")
    if not k.min <= k.default <= k.max:
        raise ConfigError(
            file,
            "keep_alive.default",
            f"{k.default:g}s is outside [min, max] = [{k.min:g}s, {k.max:g}s]",
        )
    if g.low_watermark >= g.high_watermark:
        raise ConfigError(file, "gpu.low_watermark", "must be below gpu.high_watermark")
    c = cfg.contention
    if not 1.0 <= c.clear_factor <= c.factor:
        raise ConfigError(
            file, "contention.clear_factor", "must be at least 1 and at most contention.factor"
        )
    if g.probe == "ollama" and g.total is None:
        raise ConfigError(
            file,
            "gpu.total",
            'is required with gpu.probe = "ollama" (the GPU memory, e.g. "24GiB")',
        )
    _check_exposure(cfg)
    seen_names: dict[str, int] = {}
    seen_ports: dict[int, int] = {cfg.proxy.port: -1}
    for i, b in enumerate(cfg.backends):
        if b.name in seen_names:
            raise ConfigError(file, f"backend[{i}].name", f"duplicate backend name {b.name!r}")
        seen_names[b.name] = i
        if b.port in seen_ports:
            other = "proxy.listen" if seen_ports[b.port] < 0 else f"backend[{seen_ports[b.port]}]"
            raise ConfigError(file, f"backend[{i}].port", f"port {b.port} is also used by {other}")
        seen_ports[b.port] = i
    names: dict[str, str] = {}
    for i, m in enumerate(cfg.models):
        if m.name in names:
            raise ConfigError(file, f"model[{i}].name", f"duplicate model {m.name!r}")
        names[m.name] = f"model[{i}].name"
        for j, placed in enumerate(m.backends):
            if placed not in seen_names:
                known = ", ".join(seen_names)
                key = f"model[{i}].backends[{j}]" if m.replicated else f"model[{i}].backend"
                raise ConfigError(file, key, f"no backend named {placed!r} (backends: {known})")
    for i, m in enumerate(cfg.models):
        for j, a in enumerate(m.aliases):
            if a in names or normalize_model(a) in names:
                raise ConfigError(
                    file, f"model[{i}].aliases[{j}]", f"{a!r} is already a model or alias name"
                )
            names[a] = f"model[{i}].aliases[{j}]"
    for i, m in enumerate(cfg.models):
        # "task:..." names a task in a request: no model or alias may look like one.
        for key, n in (
            (f"model[{i}].name", m.name),
            *((f"model[{i}].aliases[{j}]", a) for j, a in enumerate(m.aliases)),
        ):
            if n.startswith(TASK_PREFIX):
                raise ConfigError(
                    file, key, f"{n!r} starts with {TASK_PREFIX!r}, which names a task in requests"
                )
    owner: dict[str, int] = {}
    for i, m in enumerate(cfg.models):
        for j, t in enumerate(m.tasks):
            if t in owner:
                first = owner[t]
                raise ConfigError(
                    file,
                    f"model[{i}].tasks[{j}]",
                    f"task {t!r} is also model[{first}]'s ({cfg.models[first].name!r}): a "
                    f"task names one model, and this is {m.name!r}",
                )
            owner[t] = i


def _check_exposure(cfg: Config) -> None:
    """A proxy other machines can reach needs keys, or an explicit opt-in to run without."""
    p = cfg.proxy
    both = sorted(set(p.api_keys) & set(p.inference_keys))
    if both:
        i = p.inference_keys.index(both[0])
        raise ConfigError(
            cfg.path,
            f"proxy.inference_keys[{i}]",
            "is also in proxy.api_keys: a key belongs to one of them",
        )
    if p.loopback or p.keyed or p.allow_unauthenticated:
        return
    raise ConfigError(
        cfg.path,
        "proxy.listen",
        f"{p.listen!r} is reachable from other machines, but proxy.api_keys is empty: anyone "
        "there could run, pull, copy and delete models. Set proxy.api_keys (and "
        "proxy.inference_keys for applications), listen on 127.0.0.1, or set "
        "proxy.allow_unauthenticated = true to serve without keys anyway",
    )


def diff_backends(
    old: Config, new: Config
) -> tuple[list[BackendConfig], list[BackendConfig], list[BackendConfig]]:
    """Backends (added, changed, removed) from old to new, matched by name."""
    before = {b.name: b for b in old.backends}
    after = {b.name: b for b in new.backends}
    added = [b for n, b in after.items() if n not in before]
    changed = [b for n, b in after.items() if n in before and before[n] != b]
    removed = [b for n, b in before.items() if n not in after]
    return added, changed, removed


# -- writing --------------------------------------------------------------------------------------


def to_toml(cfg: Config) -> str:
    """The config as a TOML document that reads back to it, with every default filled in."""
    return tomli_w.dumps(to_dict(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as the file's own sections and keys (the inverse of from_dict, less path)."""

    def optional(conv: Callable[[Any], object]) -> Callable[[Any], object]:
        return lambda v: None if v is None else conv(v)

    doc: dict[str, Any] = {
        "daemon": _table(
            cfg.daemon,
            state_dir=str,
            admin_socket=str,
            shutdown_timeout=_duration_text,
        ),
        "proxy": _table(
            cfg.proxy,
            max_body_size=_size_text,
            body_memory=_size_text,
            body_wait=_duration_text,
            max_connections=lambda v: "auto" if v is None else v,
            idle_timeout=_duration_text,
            header_timeout=_duration_text,
            body_timeout=_duration_text,
        ),
        "keep_alive": _table(
            cfg.keep_alive, default=_duration_text, min=_duration_text, max=_duration_text
        ),
        "gpu": _table(
            cfg.gpu,
            interval=_duration_text,
            reserve=_size_text,
            total=optional(_size_text),
            admission_timeout=_duration_text,
        ),
        "scheduler": _table(cfg.scheduler, queue_timeout=_duration_text, aging=_duration_text),
        "contention": _table(cfg.contention, window_time=_duration_text),
        "backend": [
            _table(
                b,
                env=dict,
                start_timeout=_duration_text,
                stop_timeout=_duration_text,
                probe_interval=_duration_text,
                probe_timeout=_duration_text,
            )
            for b in cfg.backends
        ],
    }
    if cfg.models:
        doc["model"] = [
            _table(
                m,
                # One backend is written as `backend`, several as `backends`.
                backend=_if(not m.replicated),
                backends=_if(m.replicated),
                keep_alive=optional(lambda v: v if v == "adaptive" else _duration_text(v)),
                options=dict,
                queue_timeout=optional(_duration_text),
            )
            for m in cfg.models
        ]
    return doc


def _if(keep: bool) -> Callable[[Any], object]:
    """A conversion that keeps a value, or leaves its key out."""
    return lambda v: v if keep else None


def _table(obj: Any, **convs: Callable[[Any], object]) -> dict[str, object]:
    """A dataclass's fields as TOML values, converted by name; None (unset) is left out."""
    out: dict[str, object] = {}
    for f in fields(obj):
        v = getattr(obj, f.name)
        v = convs[f.name](v) if f.name in convs else v
        if v is not None:
            out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def _duration_text(seconds: float) -> str | float:
    """A duration as the file would spell it ("10m", "30s"), or seconds if not whole."""
    if not float(seconds).is_integer():
        return seconds
    n = int(seconds)
    for unit, size in (("h", 3600), ("m", 60)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}s"


_WRITE_UNITS = ("KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB")


def _size_text(n: int) -> str | int:
    """A size as the file would spell it ("512MiB", "24GB"), or bytes if no unit divides it."""
    exact = [(n // _UNITS[u.lower()], u) for u in _WRITE_UNITS if n % _UNITS[u.lower()] == 0]
    if not n or not exact:
        return n
    count, unit = min(exact)
    return f"{count}{unit}"
