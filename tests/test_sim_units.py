"""Unit tests of the simulator's pure parts: durations, env parsing, names, memory placement."""

from __future__ import annotations

import math
import sys

import pytest
from simproc import SIM_DIR

sys.path.insert(0, str(SIM_DIR))

from simlib.catalog import ModelSpec, parse_parameters, show_parameters
from simlib.config import ConfigError, parse_faults, parse_host
from simlib.durations import (
    parse_go_duration,
    parse_keep_alive_env,
    parse_keep_alive_json,
)
from simlib.memory import GRAPH_BYTES, estimate, kv_bytes, place
from simlib.store import parse_name

MIB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600), ("1h30m", 5400), ("-1m", -60), ("1.5s", 1.5), ("300ms", 0.3), ("0", 0)],
)
def test_go_durations_parse(text: str, seconds: float) -> None:
    """Go duration strings parse to seconds."""
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", 'time: missing unit in duration "-1"'),
        ("300", 'time: missing unit in duration "300"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("abc", 'time: invalid duration "abc"'),
    ],
)
def test_go_duration_errors(text: str, message: str) -> None:
    """Bad durations fail with Go's messages."""
    with pytest.raises(ValueError, match="^" + message.replace(".", r"\.") + "$"):
        parse_go_duration(text)


def test_keep_alive_json_follows_api_duration() -> None:
    """Numbers are seconds, negatives are forever, strings need units, bools and objects fail."""
    assert parse_keep_alive_json(None) is None
    assert parse_keep_alive_json(30) == 30
    assert parse_keep_alive_json(-1) == math.inf
    assert parse_keep_alive_json("-1m") == math.inf
    assert parse_keep_alive_json("10m") == 600
    for bad in (True, {"a": 1}, "-1"):
        with pytest.raises(ValueError):
            parse_keep_alive_json(bad)


@pytest.mark.parametrize(
    ("env", "seconds"),
    [
        (None, 300),
        ("10m", 600),
        ("1h30m", 5400),
        ("-1", math.inf),
        ("-1m", math.inf),
        ("300", 300),
        ("bogus", 300),
    ],
)
def test_keep_alive_env(env: str | None, seconds: float) -> None:
    """OLLAMA_KEEP_ALIVE takes a duration or integer seconds; invalid falls back to 5m."""
    assert parse_keep_alive_env(env) == seconds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ("http", "127.0.0.1", 11434)),
        ("127.0.0.1:0", ("http", "127.0.0.1", 0)),
        (":0", ("http", "", 0)),
        ("http://1.2.3.4", ("http", "1.2.3.4", 80)),
        ("https://example.com", ("https", "example.com", 443)),
        ("0.0.0.0:8080", ("http", "0.0.0.0", 8080)),
        ("[::1]:9000", ("http", "::1", 9000)),
    ],
)
def test_ollama_host(raw: str | None, expected: tuple[str, str, int]) -> None:
    """OLLAMA_HOST parses like envconfig.Host()."""
    assert parse_host(raw) == expected


def test_faults_parse_and_reject() -> None:
    """OLLAMA_SIM_FAULTS is key=value pairs; unknown keys and bad values are errors."""
    f = parse_faults("exit_after_requests=3, slow_start=0.5,stall_stream=0")
    assert (f.exit_after_requests, f.slow_start, f.stall_stream) == (3, 0.5, 0)
    for bad in ("bogus=1", "fail_request", "fail_request=x", "slow_start=-1"):
        with pytest.raises(ConfigError):
            parse_faults(bad)


def test_names_normalise() -> None:
    """Short names gain the default tag; invalid names are rejected."""
    name = parse_name("phi3")
    assert name is not None and name.display == "phi3:latest"
    ns = parse_name("me/model:v1")
    assert ns is not None and ns.display == "me/model:v1"
    assert parse_name("") is None
    assert parse_name("bad name!") is None


def _spec(size_mib: int, layers: int = 10) -> ModelSpec:
    return ModelSpec(
        name="m:1",
        size=size_mib * MIB,
        layers=layers,
        heads=4,
        kv_heads=2,
        head_dim=16,
        embedding_length=64,
        context_length=8192,
        load_seconds=0,
        tokens_per_second=10,
        family="llama",
        architecture="llama",
        parameter_size="1M",
        parameter_count=1,
        quantization="Q4_K_M",
    )


def test_footprint_formula() -> None:
    """Footprint = file + 2*layers*kv_heads*head_dim*ctx*parallel*2 + 256 MiB."""
    spec = _spec(100)
    assert kv_bytes(spec, 4096, 2) == 2 * 10 * 2 * 16 * 4096 * 2 * 2
    assert estimate(spec, 4096, 2).total == 100 * MIB + kv_bytes(spec, 4096, 2) + GRAPH_BYTES


def test_placement_full_split_partial_cpu() -> None:
    """A model goes on the roomiest GPU, else across GPUs, else partly or fully on the CPU."""
    est = estimate(_spec(1000), 4096, 1)
    one = place(est, -1, {0: 2000 * MIB, 1: 3000 * MIB})
    assert one.per_device == {1: est.total} and one.gpu_layers == 10
    split = place(est, -1, {0: 700 * MIB, 1: 700 * MIB})
    assert split.vram == est.total and set(split.per_device) == {0, 1}
    partial = place(est, -1, {0: 700 * MIB})
    assert 0 < partial.gpu_layers < 10 and partial.vram <= 700 * MIB
    assert partial.slowdown > 1
    assert place(est, -1, {0: 100 * MIB}).vram == 0
    cpu = place(est, 0, {0: 5000 * MIB})
    assert cpu.vram == 0 and cpu.slowdown == pytest.approx(10)


@pytest.mark.parametrize(
    ("text", "params", "shown"),
    [
        ("num_ctx 8192", {"num_ctx": 8192}, f"{'num_ctx':<30} 8192"),
        (
            'stop "<EOT>"\nstop <x>',
            {"stop": ["<EOT>", "<x>"]},
            f'{"stop":<30} "<EOT>"\n{"stop":<30} "<x>"',
        ),
        ("temperature 0.5\nuse_mmap false", {"temperature": 0.5, "use_mmap": False}, None),
        ("", {}, ""),
    ],
)
def test_catalog_parameters(text: str, params: dict[str, object], shown: str | None) -> None:
    """Catalog `parameters` (Modelfile PARAMETER lines) become typed JSON values, shown by
    /api/show as Go's `%-30s %#v` lines."""
    assert parse_parameters(text) == params
    if shown is not None:
        assert show_parameters(params) == shown
