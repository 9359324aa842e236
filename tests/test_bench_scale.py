"""Tests for bench/scale.py: its synthetic history as the store reads it, and a tiny run."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402

from llmd.learned import DAY_S  # noqa: E402


def test_history_is_what_the_store_would_have_written(tmp_path: Path) -> None:
    """The generated file has llmd's schema, rows in time order, Zipf-ranked rates, and idle
    histograms that the store loads and the policy learns from."""
    now = time.time()
    models = scale.specs(6, 2)
    out = scale.generate(tmp_path / "h.db", models, 3, now, seed=1)
    with sqlite3.connect(tmp_path / "h.db") as db:
        times = [t for (t,) in db.execute("SELECT time FROM requests ORDER BY id")]
        per_model = dict(db.execute("SELECT model, count(*) FROM requests GROUP BY model"))
    db.close()
    assert len(times) == out["requests"] > 0
    assert all(now - 3 * DAY_S <= t for t in times)
    assert sum(a > b for a, b in itertools.pairwise(times)) < len(times) / 100
    assert per_model[models[0].name] > 5 * per_model[models[-1].name]  # 3000 and 294 a day

    async def learned() -> set[str]:
        store = await scale.Store.open(tmp_path / "h.db", clock=lambda: now)
        try:
            return {m.name for m in models if store.idle_histogram(m.name).samples > 0}
        finally:
            await store.close()

    assert asyncio.run(learned()) == {m.name for m in models}


def test_tiny_run_reports_every_measure(tmp_path: Path) -> None:
    """5 models, 2 backends, 20 days (some to prune), 3 s idle: exit 0 and every measure."""
    out = tmp_path / "out.json"
    argv = [
        "bench/scale.py",
        "--models", "5", "--backends", "2", "--days", "20", "--idle-seconds", "3",
        "--repeats", "3", "--scrapes", "5", "--growth-requests", "2000", "--bounded-days", "2",
        "--restarts", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["measures"]) == list(scale.ROWS)
    for key, m in doc["measures"].items():
        assert isinstance(m["value"], int | float) and m["value"] >= 0, key
        if m["target"] is None:
            assert m["verdict"] == "-" and m["ratio"] is None
        else:
            assert m["verdict"] in ("PASS", "MISS") and m["ratio"] == m["value"] / m["target"]
    raw = doc["raw"]
    assert raw["main"]["rows_after_prune"] < raw["year_kept"]["rows"]  # the prune happened
    assert raw["main"]["sources"].get("adaptive")
    # Nothing happened while idle: the loaded models are pinned, no timer unloads them.
    assert raw["main"]["idle"]["events"] == raw["one_backend"]["idle"]["events"] == []
    lines = proc.stdout.splitlines()
    assert lines[0] == "`python " + " ".join([*argv, "--json", str(out)]) + "`"
    assert sum(ln.startswith(("PASS ", "MISS ")) for ln in lines) == sum(
        t is not None for _, _, t in scale.ROWS.values()
    )
