"""Tests for bench/multinode.py: the endpoint picker's scoring as the rehearsal applies it,
its reader of /metrics, and a short run end to end."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import multinode as mn  # noqa: E402

MODEL = "code:7b"


def ep(**kw: object) -> mn.Endpoint:
    for k in ("active", "waiting_models"):
        if k in kw:
            kw[k] = frozenset(kw[k])  # type: ignore[arg-type]
    return mn.Endpoint(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("endpoint", "score"),
    [
        (ep(active={MODEL}, max_models=1), 1.0),  # resident
        (ep(active={"chat:8b"}, max_models=2), 0.8),  # room for another model
        (ep(active={"chat:8b"}, waiting_models={MODEL}, max_models=2), 0.6),  # loading there
        (ep(active={"chat:8b", "x"}, max_models=2), 0.0),  # full, and not there
        (ep(), 0.0),  # nothing known (max 0): the scorer's last case
    ],
)
def test_affinity_scores_as_the_lora_affinity_scorer(endpoint: mn.Endpoint, score: float) -> None:
    assert mn.affinity(endpoint, MODEL) == score


@pytest.mark.parametrize(
    ("queues", "expected"),
    [([0, 0, 0], [1, 1, 1]), ([0, 2, 4], [1, 0.5, 0]), ([3, 1, 3], [0, 1, 0])],
)
def test_queue_scores_are_min_max_normalised(queues: list[float], expected: list[float]) -> None:
    assert mn.spread(queues) == expected


def test_the_picker_prefers_a_warm_node_until_it_is_the_busiest() -> None:
    """With the shipped weights, a resident model wins against idle nodes that are full; once
    its node has the longest queue and full slots, it ties with them (ties are random)."""
    rng = random.Random(0)
    warm = ep(active={MODEL}, max_models=1, waiting=1, kv_usage=0.5)
    full = ep(active={"a", "b"}, max_models=2)
    assert mn.pick([full, warm, full], MODEL, mn.WEIGHTS, rng) == 1
    swamped = ep(active={MODEL}, max_models=1, waiting=5, kv_usage=1.0)
    s = mn.scores([full, swamped, full], MODEL, mn.WEIGHTS)
    assert s[0] == s[1] == s[2]


def test_the_reader_refuses_what_the_picker_could_not_read() -> None:
    good = (
        "# TYPE llmd_node_requests_waiting gauge\nllmd_node_requests_waiting 2.0\n"
        "# TYPE llmd_node_requests_running gauge\nllmd_node_requests_running 1.0\n"
        "# TYPE llmd_node_cache_usage_ratio gauge\nllmd_node_cache_usage_ratio 0.5\n"
        "# TYPE llmd_node_models_info gauge\n"
        'llmd_node_models_info{max_lora="3",running_lora_adapters="a, b",'
        'waiting_lora_adapters=""} 7.0\n'
    )
    got = mn.read_endpoint(good)
    assert (got.waiting, got.running, got.kv_usage, got.max_models) == (2, 1, 0.5, 3)
    assert got.active == {"a", "b"} and not got.waiting_models and got.updated == 7
    with pytest.raises(mn.ProtocolError, match="expected a gauge"):
        mn.read_endpoint(good.replace("requests_waiting gauge", "requests_waiting counter"))
    with pytest.raises(mn.ProtocolError, match="one sample"):
        mn.read_endpoint(good + 'llmd_node_requests_running{model="a"} 1.0\n')
    with pytest.raises(mn.ProtocolError, match="expected a gauge"):
        mn.read_endpoint("")
    # The picker reads the LoRA-info labels by their fixed names: others are models it never
    # sees.
    with pytest.raises(mn.ProtocolError, match="running_lora_adapters"):
        mn.read_endpoint(good.replace("running_lora_adapters", "running_models"))


def test_trace_is_seeded_and_follows_the_popularity() -> None:
    a = mn.make_trace(1, 200, 10)
    assert a == mn.make_trace(1, 200, 10) and a != mn.make_trace(2, 200, 10)
    assert [r.at for r in a] == sorted(r.at for r in a)
    assert 1700 < len(a) < 2300
    code = sum(r.model == "code:7b" for r in a) / len(a)
    assert 0.35 < code < 0.45  # its 40%


def test_short_run_reports_both_arms(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["bench/multinode.py", "--duration", "4", "--warmup", "2", "--rate", "12"]
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert set(data["arms"]) == {"picker", "round-robin"}
    for arm in data["arms"].values():
        assert arm["requests"] == data["requests"] > 20
        assert arm["ok"] == arm["requests"], arm  # every request answered 200
        assert sum(arm["per_node"]) == arm["requests"]
        assert len(arm["node_mean_queue"]) == mn.NODES
        assert not arm["scrape_errors"], arm["scrape_errors"]
    rr = data["arms"]["round-robin"]["per_node"]
    assert max(rr) - min(rr) <= 1  # round-robin is what it says
    assert "| picker |" in proc.stdout and "| round-robin |" in proc.stdout


def test_the_rehearsal_scores_with_the_shipped_picker_config() -> None:
    """The weights and metric names the rehearsal uses are those of the EndpointPickerConfig
    in deploy/kubernetes, so its numbers are about what ships."""
    import yaml

    path = ROOT / "deploy/kubernetes/base/endpoint-picker-config.yaml"
    config = yaml.safe_load(yaml.safe_load(path.read_text())["data"]["epp-config.yaml"])
    (profile,) = config["schedulingProfiles"]
    weights = {p["pluginRef"]: p["weight"] for p in profile["plugins"] if "weight" in p}
    assert weights == mn.WEIGHTS
    picker = [p["pluginRef"] for p in profile["plugins"] if "weight" not in p]
    assert picker == ["max-score-picker"]
    (extractor,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    (engine,) = extractor["parameters"]["engineConfigs"]
    assert engine == {"name": "llmd", **mn.ENGINE}
