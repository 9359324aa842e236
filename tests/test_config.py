"""Config parsing and validation."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from llmd import config
from llmd.config import ConfigError, diff_backends, parse_go_duration, parse_size

REFERENCE = Path(__file__).resolve().parent.parent / "etc" / "llmd.toml"


def load_text(tmp_path: Path, text: str) -> config.Config:
    p = tmp_path / "llmd.toml"
    p.write_text(text)
    return config.load(p)


def test_reference_config_is_valid_and_matches_defaults() -> None:
    """The shipped reference config loads, and its values are the code's defaults."""
    cfg = config.load(REFERENCE)
    assert cfg.daemon == config.DaemonConfig()
    assert cfg.proxy == config.ProxyConfig()
    assert cfg.keep_alive == config.KeepAliveConfig()
    assert cfg.gpu == config.GpuConfig()
    assert [b.name for b in cfg.backends] == ["default"]
    assert cfg.backends[0].port == config.FIRST_BACKEND_PORT


def test_reference_config_documents_every_field() -> None:
    """Every Config field appears in etc/llmd.toml (set or commented) with a help line above."""
    lines = REFERENCE.read_text().splitlines()
    sections = {
        "daemon": config.DaemonConfig,
        "proxy": config.ProxyConfig,
        "keep_alive": config.KeepAliveConfig,
        "gpu": config.GpuConfig,
        "scheduler": config.SchedulerConfig,
        "contention": config.ContentionConfig,
        "backend": config.BackendConfig,
        "model": config.ModelConfig,
    }
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            pat = re.compile(rf"^#?\s*{f.name}\s*=")
            hits = [i for i, line in enumerate(lines) if pat.match(line)]
            assert hits, f"{section}.{f.name} is not in {REFERENCE}"
            above = lines[hits[0] - 1]
            is_help = above.startswith("#") and not re.match(r"^#\s*[a-z_]+\s*=", above)
            assert is_help and above.strip("# "), f"{section}.{f.name} has no help line above it"


@pytest.mark.parametrize(
    ("toml", "key", "why"),
    [
        ('[proxy]\nlisten = "11434"', "proxy.listen", "expected HOST:PORT"),
        ('[proxy]\nlisten = "127.0.0.1:99999"', "proxy.listen", "expected HOST:PORT"),
        ('[proxy]\nmax_body = "1MiB"', "proxy.max_body", "unknown key"),
        ('[proxy]\nmax_body_size = "lots"', "proxy.max_body_size", "invalid size"),
        ('[daemon]\nlog_level = "loud"', "daemon.log_level", "expected one of"),
        ('[daemon]\nshutdown_timeout = "-5s"', "daemon.shutdown_timeout", "positive"),
        ('[deamon]\nlog_level = "info"', "deamon", "unknown key"),
        ('[keep_alive]\ndefault = "300"', "keep_alive.default", "duration"),
        ('[keep_alive]\nmin = "2h"\nmax = "1h"', "keep_alive.min", "above keep_alive.max"),
        ("[gpu]\nhigh_watermark = 1.5", "gpu.high_watermark", "fraction"),
        ("[gpu]\nlow_watermark = 0.9\nhigh_watermark = 0.8", "gpu.low_watermark", "below"),
        ('[gpu]\nprobe = "cuda"', "gpu.probe", "expected one of"),
        ("[[backend]]\nport = 1", "backend[0].name", "is required"),
        ("[scheduler]\nmax_queue = 0", "scheduler.max_queue", "at least 1"),
        ('[scheduler]\nqueue_timeout = "0s"', "scheduler.queue_timeout", "positive"),
        ("[scheduler]\nswap_batch = -1", "scheduler.swap_batch", "at least 1"),
        ("[contention]\nfactor = 0", "contention.factor", "positive"),
        ("[contention]\nclear_factor = 3.0", "contention.clear_factor", "at most"),
        ('[[backend]]\nname = "a"\nnum_parallel = 0', "backend[0].num_parallel", "at least 1"),
        (
            '[[backend]]\nname = "a"\nnum_parallel = 2\nenv = { OLLAMA_NUM_PARALLEL = "4" }',
            "backend[0].num_parallel",
            "set only num_parallel",
        ),
        (
            '[[backend]]\nname = "a"\nenv = { OLLAMA_NUM_PARALLEL = "many" }',
            "backend[0].env",
            "OLLAMA_NUM_PARALLEL: expected an integer",
        ),
        (
            '[[model]]\nname = "a"\noptions = { temperature = 0.5 }',
            "model[0].options",
            "not a runner option",
        ),
        (
            '[[model]]\nname = "a"\noptions = { num_ctx = "8k" }',
            "model[0].options",
            "expected an integer",
        ),
        ('[[model]]\nname = "a"\noptions = 8192', "model[0].options", "expected a table"),
        (
            '[[model]]\nname = "a"\noptions = { num_ctx = 8192 }\nreload_on_options = true',
            "model[0].reload_on_options",
            "cannot be true",
        ),
        ('[[model]]\nname = "a"\nmax_queue = 0', "model[0].max_queue", "at least 1"),
        ('[[backend]]\nname = "a b"', "backend[0].name", "letters, digits"),
        ('[[backend]]\nname = "a"\nport = 11434', "backend[0].port", "proxy.listen"),
        ('[[backend]]\nname = "a"\n[[backend]]\nname = "a"', "backend[1].name", "duplicate"),
        ('[[backend]]\nname = "a"\ncommand = []', "backend[0].command", "non-empty"),
        ('[[backend]]\nname = "a"\ngpus = ["0"]', "backend[0].gpus", "GPU indexes"),
        ('[[backend]]\nname = "a"\nenv = {X = 1}', "backend[0].env", "table of strings"),
        ('[[model]]\nname = "m"\nbackend = "gpu9"', "model[0].backend", "no backend named"),
        (
            '[[backend]]\nname = "a"\n[[model]]\nname = "m"\nbackends = ["a", "gpu9"]',
            "model[0].backends[1]",
            "no backend named 'gpu9'",
        ),
        ('[[model]]\nname = "m"\nbackends = []', "model[0].backends", "at least one"),
        ('[[model]]\nname = "m"\nbackends = ["a", "a"]', "model[0].backends", "listed twice"),
        (
            '[[model]]\nname = "m"\nbackend = "a"\nbackends = ["a"]',
            "model[0].backends",
            "either backend or backends",
        ),
        ('[[model]]\nname = "m"\npriority = -1', "model[0].priority", ">= 0"),
        ('[[model]]\nname = "m"\nkeep_alive = "soon"', "model[0].keep_alive", "duration"),
        ('[[model]]\nname = "m"\npinned = true', "model[0].pinned", "unknown key"),
        ('[[model]]\nname = "m"\n[[model]]\nname = "m:latest"', "model[1].name", "duplicate"),
        (
            '[[model]]\nname = "a"\n[[model]]\nname = "b"\naliases = ["a"]',
            "model[1].aliases[0]",
            "already a model",
        ),
        ("model = 3", "model", "array of tables"),
        # Settings llmd owns cannot be overridden; settings a choice needs are required.
        ('[gpu]\nprobe = "ollama"', "gpu.total", "is required"),
        ("[daemon]\nretention_days = 0", "daemon.retention_days", "at least 1"),
        (
            '[[backend]]\nname = "a"\nenv = {OLLAMA_HOST = "0.0.0.0:11434"}',
            "backend[0].env",
            "OLLAMA_HOST is set by llmd itself",
        ),
        (
            '[[backend]]\nname = "a"\nenv = {OLLAMA_KEEP_ALIVE = "5m"}',
            "backend[0].env",
            "OLLAMA_KEEP_ALIVE is set by llmd itself",
        ),
        ('[proxy]\napi_keys = ["short"]', "proxy.api_keys", "at least 8"),
        ('[proxy]\ninference_keys = ["short"]', "proxy.inference_keys", "at least 8"),
        (
            '[proxy]\napi_keys = ["k-12345678"]\ninference_keys = ["k-12345678"]',
            "proxy.inference_keys[0]",
            "also in proxy.api_keys",
        ),
        ('[proxy]\nlisten = "0.0.0.0:11434"', "proxy.listen", "proxy.api_keys is empty"),
        ('[proxy]\nlisten = "box.lan:11434"', "proxy.listen", "allow_unauthenticated"),
        ('[proxy]\nallow_unauthenticated = "yes"', "proxy.allow_unauthenticated", "true or"),
        ("[proxy]\nmax_connections = 0", "proxy.max_connections", '"auto" or an integer'),
        ('[proxy]\nmax_connections = "many"', "proxy.max_connections", '"auto" or'),
        ('[proxy]\nidle_timeout = "0s"', "proxy.idle_timeout", "positive"),
        ('[proxy]\nheader_timeout = "soon"', "proxy.header_timeout", "duration"),
        ("[proxy]\nbody_timeout = -1", "proxy.body_timeout", "positive"),
        ('[proxy]\nopen_metrics = "yes"', "proxy.open_metrics", "true or"),
        # A task names one model: the second claim names both models.
        (
            '[[model]]\nname = "a:7b"\ntasks = ["code"]\n'
            '[[model]]\nname = "b:7b"\ntasks = ["chat", "code"]',
            "model[1].tasks[1]",
            "task 'code' is also model[0]'s ('a:7b'): a task names one model, and this is 'b:7b'",
        ),
        ('[[model]]\nname = "a"\ntasks = ["code", "code"]', "model[0].tasks", "listed twice"),
        ('[[model]]\nname = "a"\ntasks = ["my task"]', "model[0].tasks", "not a task name"),
        ('[[model]]\nname = "a"\ntasks = [""]', "model[0].tasks", "not a task name"),
        ('[[model]]\nname = "a"\ntasks = "code"', "model[0].tasks", "list"),
        # "task:..." in a request names a task: no model or alias may be spelled so.
        ('[[model]]\nname = "task:code"', "model[0].name", "names a task in requests"),
        (
            '[[model]]\nname = "a"\naliases = ["task:x"]',
            "model[0].aliases[0]",
            "names a task in requests",
        ),
    ],
)
def test_invalid_config_names_key(tmp_path: Path, toml: str, key: str, why: str) -> None:
    """A bad value is rejected with the file, the dotted key and what was expected."""
    with pytest.raises(ConfigError) as e:
        load_text(tmp_path, toml)
    assert e.value.key == key
    assert why in e.value.why
    assert str(tmp_path / "llmd.toml") in str(e.value)


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    """Unparseable TOML and a missing file are ConfigErrors, not tracebacks."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_text(tmp_path, "[proxy\n")
    with pytest.raises(ConfigError, match="file not found"):
        config.load(tmp_path / "nope.toml")


def test_models_and_backends(tmp_path: Path) -> None:
    """Model names get Ollama's :latest tag; backends get ports in order; aliases map."""
    cfg = load_text(
        tmp_path,
        """
[[backend]]
name = "a"
[[backend]]
name = "b"
gpus = [1]
[[model]]
name = "phi3"
backend = "b"
aliases = ["chat"]
keep_alive = "30m"
[[model]]
name = "nomic-embed-text:v1.5"
keep_alive = "adaptive"
""",
    )
    assert [(b.name, b.port, b.gpus) for b in cfg.backends] == [
        ("a", 11435, None),
        ("b", 11436, (1,)),
    ]
    assert cfg.models[0].name == "phi3:latest"
    assert cfg.models[0].keep_alive == 1800.0
    assert cfg.models[1].keep_alive == "adaptive"
    assert cfg.aliases() == {"chat": "phi3:latest"}


def test_diff_backends(tmp_path: Path) -> None:
    """Reload diffs backends by name into added, changed and removed."""
    old = load_text(tmp_path, '[[backend]]\nname = "a"\n[[backend]]\nname = "b"\n')
    new = load_text(
        tmp_path,
        '[[backend]]\nname = "a"\n[[backend]]\nname = "b"\ngpus = [0]\nport = 11436\n'
        '[[backend]]\nname = "c"\nport = 11437\n',
    )
    added, changed, removed = diff_backends(old, new)
    assert [b.name for b in added] == ["c"]
    assert [b.name for b in changed] == ["b"]
    assert removed == []
    added, changed, removed = diff_backends(new, old)
    assert [b.name for b in removed] == ["c"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("1h30m", 5400), ("-1m", -60), ("0", 0), ("1.5s", 1.5), ("300ms", 0.3)],
)
def test_go_durations(text: str, seconds: float) -> None:
    """Go duration strings parse as time.ParseDuration does."""
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [("-1", "missing unit"), ("300", "missing unit"), ("5x", "invalid duration"), ("", "invalid")],
)
def test_go_duration_errors(text: str, message: str) -> None:
    """A number without a unit is Go's 'missing unit' error, as Ollama answers it."""
    with pytest.raises(ValueError, match=message):
        parse_go_duration(text)


@pytest.mark.parametrize(
    ("value", "size"),
    [(100, 100), ("32MiB", 32 * 1024**2), ("24GB", 24 * 10**9), ("1.5GiB", int(1.5 * 1024**3))],
)
def test_sizes(value: object, size: int) -> None:
    """Sizes accept bytes or unit strings."""
    assert parse_size(value) == size


def test_check_config_cli(tmp_path: Path) -> None:
    """`llmd --check-config` exits 0 on a valid file and 1 naming the key on an invalid one."""
    ok = subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--check-config", str(REFERENCE)],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nlisten = "nope"\n')
    r = subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--check-config", str(bad)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1
    assert "proxy.listen" in r.stderr and "HOST:PORT" in r.stderr


@pytest.mark.parametrize(
    ("text", "environ", "api", "inference"),
    [
        # Added to the file's keys, trimmed, empties dropped, a key already there not doubled.
        (
            '[proxy]\napi_keys = ["file-key-1"]',
            {"LLMD_API_KEYS": " env-key-1 ,file-key-1,, "},
            ("file-key-1", "env-key-1"),
            (),
        ),
        ("", {"LLMD_INFERENCE_KEYS": "app-key-1,app-key-2"}, (), ("app-key-1", "app-key-2")),
        ("", {"LLMD_API_KEYS": "  "}, (), ()),  # set but empty: nothing
    ],
)
def test_keys_from_the_environment(
    tmp_path: Path, text: str, environ: dict[str, str], api: tuple[str, ...], inference: Any
) -> None:
    p = tmp_path / "llmd.toml"
    p.write_text(text)
    cfg = config.load(p, environ)
    assert (cfg.proxy.api_keys, cfg.proxy.inference_keys) == (api, inference)


def test_keys_from_the_environment_are_checked_like_the_files(tmp_path: Path) -> None:
    """A short key names its variable; a key in both lists is refused; and keys from the
    environment are what lets a pod's config listen on 0.0.0.0 without holding secrets."""
    p = tmp_path / "llmd.toml"
    p.write_text('[proxy]\nlisten = "0.0.0.0:11434"\n')
    with pytest.raises(ConfigError, match=r"\$LLMD_INFERENCE_KEYS: .*at least 8"):
        config.load(p, {"LLMD_INFERENCE_KEYS": "good-key-1,short"})
    with pytest.raises(ConfigError, match=r"proxy\.inference_keys.*also in proxy\.api_keys"):
        config.load(p, {"LLMD_API_KEYS": "same-key-1", "LLMD_INFERENCE_KEYS": "same-key-1"})
    with pytest.raises(ConfigError, match="reachable from other machines"):
        config.load(p, {})
    assert config.load(p, {"LLMD_API_KEYS": "admin-key-1"}).proxy.keyed
    # `llmd --check-config` and the daemon read the same environment, and LLMD_CONFIG names
    # the file `llmd` reads without --config.
    env = {"PATH": "/usr/bin:/bin", "LLMD_API_KEYS": "admin-key-1", "LLMD_CONFIG": str(p)}
    ok = subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--check-config", str(p)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    shown = subprocess.run(
        [sys.executable, "-m", "llmd.daemon", "--print-config"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert shown.returncode == 0, shown.stderr
    assert '"0.0.0.0:11434"' in shown.stdout and "admin-key-1" in shown.stdout


GiB, MiB = 1024**3, 1024**2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("24GiB", 24 * GiB),
        ("512MiB", 512 * MiB),
        ("24GB", 24 * 10**9),
        ("24 gib", 24 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("1000", 1000),
        ("64KB", 64000),
        ("2TiB", 2 << 40),
        ("7B", 7),
        (4096, 4096),
        (2.0e9, 2 * 10**9),
    ],
)
def test_parse_size(value: str | int, expected: int) -> None:
    """Sizes are bytes from ints or number+unit strings, decimal and binary units."""
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["24G", "GiB", "-1GiB", "24 GiBs", "", -5, True, float("nan")])
def test_parse_size_errors(value: Any) -> None:
    """Invalid sizes raise ValueError quoting the value and naming the valid units."""
    with pytest.raises(ValueError, match="invalid size") as e:
        parse_size(value)
    if isinstance(value, str):
        assert "KiB, MiB, GiB, TiB" in str(e.value)


# -- writing: to_toml and `llmd --print-config` ---------------------------------------------------

RICH = """
[daemon]
state_dir = "/srv/llmd"
log_level = "debug"
shutdown_timeout = 2.5
[proxy]
listen = "0.0.0.0:8080"
open_metrics = true
api_keys = ["admin-key-1"]
inference_keys = ["app-key-1", "app-key-2"]
max_body_size = 1000
body_memory = "1.5GiB"
max_connections = 64
[keep_alive]
policy = "fixed"
default = "1h30m"
min = "90s"
beta = 0.25
prewarm = true
[gpu]
probe = "ollama"
total = "24GB"
reserve = 0
[[backend]]
name = "a"
gpus = [0, 1]
env = { OLLAMA_MODELS = "/srv/models", "ODD KEY" = "x=y" }
[[backend]]
name = "b"
port = 12000
command = ["/opt/ollama/bin/ollama", "serve"]
gpus = []
probe_timeout = "500ms"
probe_failures = 5
[[model]]
name = "phi3"
backend = "b"
aliases = ["chat", "small"]
tasks = ["chat", "summarize"]
keep_alive = "30m"
priority = 0
pin = true
[[model]]
name = "nomic-embed-text:v1.5"
keep_alive = "adaptive"
preload = true
options = { num_ctx = 2048, use_mmap = false }
max_queue = 4
queue_timeout = "45s"
[[model]]
name = "library/llama3:8b"
keep_alive = 0
preempt = true
allow_cpu_spill = true
[[model]]
name = "codellama:7b"
backends = ["a", "b"]
"""


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(None, id="reference"),
        pytest.param("", id="empty"),
        pytest.param(RICH, id="rich"),
        pytest.param('[[backend]]\nname = "x"\nenv = {}\n', id="empty-env"),
        pytest.param('[keep_alive]\nmin = 0.001\ndefault = "1.25s"\n', id="fractions"),
    ],
)
def test_to_toml_round_trips(tmp_path: Path, text: str | None) -> None:
    """to_toml writes a document that from_dict reads back to the same Config."""
    cfg = config.load(REFERENCE) if text is None else load_text(tmp_path, text)
    doc = tomllib.loads(config.to_toml(cfg))
    assert config.from_dict(doc, cfg.path) == cfg


def test_to_dict_mirrors_the_files_sections_and_keys(tmp_path: Path) -> None:
    """to_dict has the file's sections and every key of each, less unset ones and path."""
    cfg = load_text(tmp_path, RICH)
    doc = config.to_dict(cfg)
    assert list(doc) == [
        "daemon",
        "proxy",
        "keep_alive",
        "gpu",
        "scheduler",
        "contention",
        "backend",
        "model",
    ]
    names = {
        "daemon": config.DaemonConfig,
        "proxy": config.ProxyConfig,
        "keep_alive": config.KeepAliveConfig,
        "gpu": config.GpuConfig,
        "scheduler": config.SchedulerConfig,
        "contention": config.ContentionConfig,
    }
    for section, cls in names.items():
        assert list(doc[section]) == [f.name for f in dataclasses.fields(cls)], section
    backend_keys = [f.name for f in dataclasses.fields(config.BackendConfig)]
    assert [list(b) for b in doc["backend"]] == [backend_keys, backend_keys]
    model_keys = [f.name for f in dataclasses.fields(config.ModelConfig)]
    assert list(doc["model"][1]) == [k for k in model_keys if k not in ("backend", "backends")]
    # One backend is written as `backend`, several as `backends`.
    assert doc["model"][0]["backend"] == "b" and "backends" not in doc["model"][0]
    assert doc["model"][3]["backends"] == ["a", "b"] and "backend" not in doc["model"][3]
    assert doc["proxy"]["max_connections"] == 64
    assert doc["gpu"]["total"] == "24GB"


@pytest.mark.parametrize(
    ("text", "section", "key", "value"),
    [
        ("", "proxy", "max_connections", "auto"),
        ("", "proxy", "max_body_size", "32MiB"),
        ("", "keep_alive", "max", "4h"),
        ("", "daemon", "state_dir", "/var/lib/llmd"),
        ('[daemon]\nshutdown_timeout = "1h1s"', "daemon", "shutdown_timeout", "3601s"),
        ("[daemon]\nshutdown_timeout = 0.5", "daemon", "shutdown_timeout", 0.5),
        ("[proxy]\nbody_memory = 1000", "proxy", "body_memory", "1KB"),
        ("[proxy]\nbody_memory = 1001", "proxy", "body_memory", 1001),
        ("[proxy]\nbody_memory = 3072000", "proxy", "body_memory", "3000KiB"),
        ('[gpu]\nreserve = "2GiB"', "gpu", "reserve", "2GiB"),
        ('[gpu]\nreserve = "1.5KiB"', "gpu", "reserve", 1536),
        ("", "gpu", "total", None),
    ],
)
def test_to_dict_values_are_as_the_file_spells_them(
    tmp_path: Path, text: str, section: str, key: str, value: object
) -> None:
    """Durations and sizes are written in the largest exact unit; unset keys are left out."""
    doc = config.to_dict(load_text(tmp_path, text))
    assert doc[section].get(key) == value


def test_to_dict_leaves_out_unset_model_and_backend_keys(tmp_path: Path) -> None:
    """A backend without gpus and a model without backend or keep_alive omit those keys."""
    doc = config.to_dict(load_text(tmp_path, '[[model]]\nname = "m"\n'))
    assert "gpus" not in doc["backend"][0]
    assert doc["model"] == [
        {
            "name": "m:latest",
            "priority": 5,
            "pin": False,
            "preload": False,
            "aliases": [],
            "tasks": [],
            "preempt": False,
            "allow_cpu_spill": False,
            "options": {},
            "reload_on_options": False,
        }
    ]
    assert "model" not in config.to_dict(load_text(tmp_path, ""))


def print_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmd.daemon", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("how", ["argument", "--config"])
def test_print_config_cli(tmp_path: Path, how: str) -> None:
    """`llmd --print-config` prints the file's effective config as TOML, defaults filled in."""
    f = tmp_path / "llmd.toml"
    f.write_text('[proxy]\nlisten = "127.0.0.1:9000"\n[[model]]\nname = "phi3"\n')
    args = (
        ["--print-config", str(f)] if how == "argument" else ["--config", str(f), "--print-config"]
    )
    r = print_config(*args)
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)
    assert doc["proxy"]["listen"] == "127.0.0.1:9000"
    assert doc["daemon"]["log_level"] == "info"
    assert doc["keep_alive"]["default"] == "10m"
    assert doc["gpu"]["reserve"] == "512MiB"
    assert doc["backend"][0]["name"] == "default"
    assert doc["backend"][0]["port"] == config.FIRST_BACKEND_PORT
    assert doc["model"][0]["name"] == "phi3:latest"
    assert doc["model"][0]["priority"] == 5
    assert config.from_dict(doc, f) == config.load(f)


def test_print_config_cli_reference() -> None:
    """The reference config prints as TOML that reads back to the same Config."""
    r = print_config("--print-config", str(REFERENCE))
    assert r.returncode == 0, r.stderr
    assert config.from_dict(tomllib.loads(r.stdout), REFERENCE) == config.load(REFERENCE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[proxy]\nlisten = "nope"\n', "proxy.listen"),
        ('[[model]]\nname = "m"\npinned = true\n', "model[0].pinned"),
        ("[proxy\n", "invalid TOML"),
    ],
)
def test_print_config_cli_bad_file(tmp_path: Path, text: str, message: str) -> None:
    """An invalid file makes `llmd --print-config` exit 1 naming the key, printing no TOML."""
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = print_config("--print-config", str(bad))
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr.startswith("llmd: ") and message in r.stderr
