"""Tests for bench/proxy_overhead.py: a tiny run with every front, and its argument checks."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "bench/proxy_overhead.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_tiny_run_with_every_front(tmp_path: Path) -> None:
    """Two rounds of two cases through direct, bare, nginx (or its skip reason), llmd, a
    baseline tree (a git archive of HEAD) and an --also variant: every front has its medians,
    every front but direct and bare its per-round ratios to bare, and the targets are judged."""
    base, tar = tmp_path / "base", tmp_path / "head.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(tar), "HEAD"], check=True)
    with tarfile.open(tar) as t:
        t.extractall(base, filter="data")
    out = tmp_path / "out.json"
    proc = bench(
        "--rounds", "2", "--scale", "0.2", "--cases", "c1,s8", "--baseline", str(base),
        "--also", "asyncio:daemon.event_loop=asyncio", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    have_nginx = shutil.which("nginx") or Path("/usr/sbin/nginx").exists()
    fronts = {"direct", "bare", "llmd", "baseline", "asyncio"}
    fronts |= {"nginx"} if have_nginx else set()
    if not have_nginx:
        assert "nginx is not installed" in data["skipped"]["nginx"]
    assert set(data["summary"]) == {"c1", "s8"}
    c1, s8 = data["summary"]["c1"], data["summary"]["s8"]
    assert set(c1["fronts"]) == fronts
    assert set(c1["vs_bare"]) == fronts - {"direct", "bare"}
    for front in fronts:
        assert len(data["rounds"]["c1"][front]) == 2
        assert c1["fronts"][front]["p50_ms"] > 0
        assert s8["fronts"][front]["chunks_per_s"] > 0
    ratio = c1["vs_bare"]["llmd"]["rps"]
    assert ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "cpu_per_1k_requests_s" in c1["vs_bare"]["llmd"]
    assert "cpu_per_100k_chunks_s" in s8["vs_bare"]["llmd"]
    # Only the targets of the cases run (c64 and s256 were not).
    assert [t["case"] for t in data["targets"]] == ["c1"]
    assert "target c1 added_p50_ms: llmd/bare" in proc.stdout


def test_arguments_are_checked_before_anything_starts(tmp_path: Path) -> None:
    proc = bench("--baseline", str(tmp_path))
    assert proc.returncode == 2 and "no llmd/daemon.py there" in proc.stderr
    proc = bench("--also", "nocolon")
    assert proc.returncode == 2 and "expected NAME:SECTION.KEY=VALUE" in proc.stderr
    proc = bench("--also", "llmd:daemon.event_loop=asyncio")
    assert proc.returncode == 2 and "the name 'llmd' is taken" in proc.stderr
    proc = bench("--cases", "c1,x9")
    assert proc.returncode == 2 and "known cases are c1, c64, s8, s64, s256" in proc.stderr
