"""Tests for bench/replicas.py: its trace, and a tiny run end to end (JSON and Markdown)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import replicas  # noqa: E402

STATUS = {"200", "429", "503", "other"}


def test_trace_is_seeded_open_loop_and_bursts_above_one_copy() -> None:
    a = replicas.make_trace(1, 12, 10)
    assert a == replicas.make_trace(1, 12, 10) and a != replicas.make_trace(2, 12, 10)
    assert [r.at for r in a] == sorted(r.at for r in a)
    sim = [r.at * 10 for r in a]
    burst = [t for t in sim if 10 <= t < 25]
    quiet = [t for t in sim if t < 10]
    assert len(burst) / 15 > 3 * max(1, len(quiet)) / 10  # about 5/s against 1/s


def test_tiny_run_reports_every_arm(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["bench/replicas.py", "--duration", "2", "--speed", "20", "--timeout", "30"]
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    n = data["trace_requests"]
    assert n > 0 and list(data["arms"]) == list(replicas.ARMS)
    for arm in data["arms"].values():
        assert arm["requests"] == n
        assert set(arm["status"]) == STATUS and sum(arm["status"].values()) == n
        assert arm["throughput_rps"] is not None and arm["p99_s"] is not None
    # One copy never gets a second; the burst calls for one where llmd may load it.
    assert data["arms"]["llmd, one copy"]["copies_loaded"] == 0
    assert data["arms"]["llmd, replicas"]["copies_loaded"] == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == "`python " + " ".join([*argv, "--json", str(out)]) + "`"
    rows = [ln for ln in lines if ln.startswith(("| llmd", "| ollama"))]
    assert len(rows) == 3
