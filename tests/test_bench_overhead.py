"""Tests for bench/proxy_overhead.py: a tiny run against a baseline source tree, and its output."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ["non-streamed, concurrency 1", "non-streamed, concurrency 64", "streamed"]


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/proxy_overhead.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_tiny_run_against_a_baseline_tree(tmp_path: Path) -> None:
    """With --baseline (here a git archive of HEAD) every case reports both daemons' added
    latency over direct, current minus baseline (whole and round by round) and throughput ratios,
    in the JSON and as one table row per case."""
    base, tar = tmp_path / "base", tmp_path / "head.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), "HEAD"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(base, filter="data")
    out = tmp_path / "out.json"
    argv = ["--requests", "20", "--rounds", "2", "--baseline", str(base), "--json", str(out)]
    proc = bench(*argv)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["baseline"] == str(base) and data["rounds"] == 2
    rows = data["results"]
    assert [r["case"][: len(c)] for r, c in zip(rows, CASES, strict=True)] == CASES
    for r in rows:
        for key in ("p50", "p99"):
            diff = r[f"current_added_{key}_ms"] - r[f"baseline_added_{key}_ms"]
            assert abs(r[f"current_minus_baseline_{key}_ms"] - diff) < 1e-6
        assert len(r["current_minus_baseline_p50_ms_per_round"]) == 2
        assert r["direct_p50_ms"] > 0
        for k in ("baseline_throughput_ratio", "current_throughput_ratio"):
            assert r[k] > 0
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"baseline: {base};")
    table = [ln for ln in lines if ln.startswith(("non-streamed", "streamed"))]
    assert len(table) == 3 and all(ln.count("ms") == 7 for ln in table)


def test_baseline_must_be_an_llmd_tree(tmp_path: Path) -> None:
    """A --baseline folder without llmd/daemon.py is refused before anything starts."""
    proc = bench("--baseline", str(tmp_path))
    assert proc.returncode == 2 and "no llmd/daemon.py there" in proc.stderr
