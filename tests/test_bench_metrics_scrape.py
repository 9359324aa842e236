"""Tests for bench/metrics_scrape.py: its series check against the old renderer, and a tiny run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import metrics_scrape  # noqa: E402

from llmd import metrics  # noqa: E402


def pages(models: int = 12, backends: int = 3) -> tuple[str, str, str]:
    counters, snap = metrics_scrape.build(models, backends)
    expo = metrics.Exposition(counters, lambda: snap)
    return (
        metrics_scrape.legacy_render(counters, snap),
        expo.page("")[0].decode(),
        expo.page("application/openmetrics-text")[0].decode(),
    )


def test_prometheus_client_keeps_every_series_of_the_hand_written_renderer() -> None:
    """On a snapshot with replicas, odd label values and every family filled, the collector's
    text and OpenMetrics pages have every series the old renderer wrote, same type, labels and
    value, and no other series but those of the families added since (NEW_FAMILIES)."""
    old, new, om = pages()
    assert metrics_scrape.differences(old, new, om) == []
    added = set(metrics_scrape.series(metrics_scrape.parse_text(new))) - set(
        metrics_scrape.series(metrics_scrape.parse_text(old))
    )
    families = {family for family, *_ in added}
    assert families <= metrics_scrape.NEW_FAMILIES
    # The snapshot fills these (a baseline needs a model's quiet requests, which it has not).
    assert metrics_scrape.NEW_FAMILIES - families == {"llmd_model_baseline_seconds"}


def test_the_check_catches_a_changed_value_a_lost_series_and_created_samples() -> None:
    old, new, om = pages()
    changed = new.replace('llmd_backend_restarts_total{backend="b1"} 1.0', "X", 1)
    assert changed != new
    assert metrics_scrape.differences(
        old, changed.replace("X", 'llmd_backend_restarts_total{backend="b1"} 2.0'), om
    )
    assert metrics_scrape.differences(old, changed.replace("X\n", ""), om)
    assert metrics_scrape.differences(old + "llmd_extra 1\n", new, om)
    created = new + "# TYPE llmd_x_created gauge\nllmd_x_created 1.0\n"
    assert metrics_scrape.differences(old, created, om)


def test_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    argv = ["bench/metrics_scrape.py", "--models", "5", "--backends", "2", "--iterations", "3"]
    proc = subprocess.run(
        [sys.executable, *argv, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "same series as the old renderer and same bytes as the library: yes" in proc.stdout
    ms = json.loads(out.read_text())["ms"]
    assert len(ms) == 6 and all(row["p50"] > 0 for row in ms.values())
