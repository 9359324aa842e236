"""Tests for bench/contention.py: a tiny run end to end, its JSON and its Markdown report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import contention  # noqa: E402

MODELS = [m.name for m in contention.MODELS]
STATUS = {"200", "429", "503", "other"}


def test_trace_is_seeded_and_open_loop() -> None:
    """The same seed gives the same trace; another seed another; arrivals are in time order
    and every model gets requests, summarise mostly in its bursts."""
    a = contention.make_trace(1, 20, 10)
    assert a == contention.make_trace(1, 20, 10)
    assert a != contention.make_trace(2, 20, 10)
    assert [r.at for r in a] == sorted(r.at for r in a)
    assert {r.model for r in a} == set(MODELS)
    summ = [r.at * 10 for r in a if r.model == "summarise:13b"]
    in_burst = [t for t in summ if (t - 20) % 60 < 12 and t >= 20]
    assert len(in_burst) > 0.8 * len(summ)


def test_the_two_large_models_cannot_share_the_gpu() -> None:
    """code and summarise together exceed the simulated GPU; each fits with chat."""
    fp = {m.name: m.footprint_mib for m in contention.MODELS}
    assert fp["code:14b"] + fp["summarise:13b"] > contention.GPU_MIB
    assert fp["code:14b"] + fp["chat:3b"] <= 0.8 * contention.GPU_MIB
    assert fp["summarise:13b"] + fp["chat:3b"] <= 0.8 * contention.GPU_MIB


def test_tiny_run_reports_every_arm_and_target(tmp_path: Path) -> None:
    """A 2-second trace through the uncontended, llmd and ollama arms gives a complete JSON
    document, the Markdown tables with the command line on top, and one PASS/MISS per target."""
    out = tmp_path / "out.json"
    argv = ["bench/contention.py", "--duration", "2", "--speed", "20", "--timeout", "20"]
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    n = data["trace_requests"]
    assert n > 0
    assert set(data["uncontended"]) == set(MODELS)
    for m in MODELS:
        base = data["uncontended"][m]
        assert base["load_s"] > 0 and base["unload_s"] >= 0 and base["footprint_mib"] > 0
    assert set(data["arms"]) == {"llmd", "ollama"}
    for arm in data["arms"].values():
        assert arm["requests"] == n
        assert sum(r["requests"] for r in arm["models"].values()) == n
        for r in arm["models"].values():
            assert set(r["status"]) == STATUS and sum(r["status"].values()) == r["requests"]
            assert {"p50_s", "p99_s", "p99_ratio", "worst_wait_s", "lost"} <= set(r)
        assert arm["loads_total"] == sum(arm["loads"].values()) >= 1
        assert arm["all_answered"] == (arm["lost"] == 0)
        assert arm["throughput_rps"] is not None
    assert [t["target"][:2] for t in data["targets"]] == ["1.", "2.", "3."]

    lines = proc.stdout.splitlines()
    assert lines[0] == "`python " + " ".join([*argv, "--json", str(out)]) + "`"
    rows = [ln for ln in lines if ln.startswith("| ")]
    assert sum(ln.startswith(("| alone", "| llmd", "| ollama")) for ln in rows) == 3 * 3 + 2
    verdicts = [ln.split()[0] for ln in lines if ln.startswith(("PASS ", "MISS "))]
    assert len(verdicts) == 3
