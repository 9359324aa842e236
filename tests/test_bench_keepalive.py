"""Tests for bench/keepalive.py: a short replay of every family, file replays and file errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
METRICS = {
    "cold_start_rate",
    "p75_model_cold_start_rate",
    "idle_gb_s",
    "idle_gb_s_norm",
    "cost",
    "cost_ratio_oracle",
}
# Policies that may beat the reactive oracle: they load ahead of requests.
PRELOADING = {"adaptive-prewarm", "oracle-preload"}


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.keepalive", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def one_day(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "out.json"
    proc = bench("--days", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def test_every_family_runs_with_every_policy(one_day: dict[str, Any]) -> None:
    """One run per family F1-F8, each with all the metrics for every policy."""
    runs = one_day["runs"]
    assert [r["family"] for r in runs] == [f"F{i}" for i in range(1, 9)]
    for run in runs:
        assert "fixed-10m" in run["policies"] and "adaptive" in run["policies"]
        for metrics in run["policies"].values():
            assert set(metrics) >= METRICS
        assert run["policies"]["fixed-10m"]["idle_gb_s_norm"] == pytest.approx(100.0)
        assert set(run["dominated_by"]) <= {p for p in run["policies"] if p.startswith("fixed-")}


def test_oracle_is_a_lower_bound_for_reactive_policies(one_day: dict[str, Any]) -> None:
    """J/J(oracle-reactive) is 1 for the oracle and at least ~1 for every reactive policy."""
    for run in one_day["runs"]:
        pol = run["policies"]
        assert pol["oracle-reactive"]["cost_ratio_oracle"] == pytest.approx(1.0)
        for name, metrics in pol.items():
            if name not in PRELOADING:
                assert metrics["cost_ratio_oracle"] >= 0.98, (run["family"], name)
        assert pol["oracle-preload"]["cold_start_rate"] == 0.0


def test_pressure_families_run_under_a_budget(one_day: dict[str, Any]) -> None:
    """F6 and F7 replay under a 24 GB budget, the others without one."""
    budgets = {r["family"]: r["vram_gb"] for r in one_day["runs"]}
    assert budgets.pop("F6") == budgets.pop("F7") == 24.0
    assert set(budgets.values()) == {None}


def test_replay_is_deterministic(tmp_path: Path) -> None:
    """The same seed gives the same numbers."""
    outs = []
    for name in ("a.json", "b.json"):
        out = tmp_path / name
        args = ("--days", "0.5", "--families", "F3", "--seed", "7", "--json", str(out))
        assert bench(*args).returncode == 0
        outs.append(json.loads(out.read_text())["runs"])
    assert outs[0] == outs[1]


def test_trace_file_replay(tmp_path: Path) -> None:
    """A CSV trace (unsorted) with a TOML models file replays under the file's name."""
    trace = tmp_path / "mine.csv"
    rows = [f"{t * 97.0},llama3.1:8b" for t in range(300)]
    rows += [f"{t * 1800.0 + 3},qwen2.5:14b" for t in range(40)]
    trace.write_text("t,model\n" + "\n".join(reversed(rows)) + "\n")
    out = tmp_path / "out.json"
    proc = bench(
        "--trace",
        str(trace),
        "--models",
        str(ROOT / "bench" / "models.example.toml"),
        "--policies",
        "adaptive,fixed-10m",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["family"] == "mine" and set(run["policies"]) == {"adaptive", "fixed-10m"}
    assert "mine from file" in proc.stdout


MODELS_OK = '[[model]]\nname = "m"\nsize_gb = 4.9\nload_s = 6.5\npriority = 2\n'


@pytest.mark.parametrize(
    ("csv", "models", "message"),
    [
        ("time,model\n1,m\n", MODELS_OK, "mine.csv:1: expected the header 't,model'"),
        ("t,model\n1,m\nabc,m\n", MODELS_OK, "mine.csv:3: t: expected seconds, got 'abc'"),
        ("t,model\n-5,m\n", MODELS_OK, "mine.csv:2: t: expected seconds >= 0"),
        ("t,model\n1,m\n2,other\n", MODELS_OK, "mine.csv:3: model: 'other' is not in"),
        ("t,model\n1,m,3\n", MODELS_OK, "mine.csv:2: expected 2 fields, got 3"),
        ("t,model,duration_s\n1,m,x\n", MODELS_OK, "mine.csv:2: duration_s: expected seconds"),
        ("t,model\n", MODELS_OK, "mine.csv: no requests"),
        ("t,model\n1,m\n", "[[model]]\nname = 'm'\n", "model[0].size_gb: expected a positive"),
        ("t,model\n1,m\n", MODELS_OK.replace("4.9", "-1"), "model[0].size_gb: expected"),
        ("t,model\n1,m\n", MODELS_OK.replace("= 2", '= "high"'), "model[0].priority: expected"),
        ("t,model\n1,m\n", MODELS_OK + "colour = 1\n", "model[0].colour: unknown key"),
        ("t,model\n1,m\n", MODELS_OK + MODELS_OK, "model[1].name: duplicate model 'm'"),
        ("t,model\n1,m\n", "title = 'x'\n", "model: expected one or more [[model]] tables"),
        ("t,model\n1,m\n", "[[model]\n", "not valid TOML"),
    ],
)
def test_file_errors_name_the_line_or_key(
    tmp_path: Path, csv: str, models: str, message: str
) -> None:
    """A bad trace or models file exits 2 with a message naming the file and line or key."""
    (tmp_path / "mine.csv").write_text(csv)
    (tmp_path / "models.toml").write_text(models)
    proc = bench("--trace", str(tmp_path / "mine.csv"), "--models", str(tmp_path / "models.toml"))
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policies", "nope"], "unknown policy 'nope'"),
        (["--families", "F9"], "unknown family 'F9'"),
        (["--trace", "x.csv"], "--trace and --models go together"),
        (["--vram-gb", "10", "--families", "F5", "--days", "0.2"], "does not fit"),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    """Bad options are refused with a message saying what is wrong."""
    proc = bench(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_plot_writes_one_png_per_family(tmp_path: Path) -> None:
    """--plot draws a Pareto PNG per family."""
    pytest.importorskip("matplotlib")
    proc = bench("--days", "0.5", "--families", "F1,F5", "--plot", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["F1.png", "F5.png"]
