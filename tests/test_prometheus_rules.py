"""The shipped alerting rules (`promtool test rules`) and Grafana dashboard, checked offline.

tests/test_prometheus_e2e.py runs both against a real Prometheus scraping llmd.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from llmdproc import ROOT

from llmd import metrics as M
from llmd.store import RequestRecord

RULES = ROOT / "etc/prometheus/llmd-rules.yml"
RULES_TEST = ROOT / "etc/prometheus/llmd-rules.test.yml"
DASHBOARD = ROOT / "etc/grafana/llmd-dashboard.json"
PROMTOOL = shutil.which("promtool")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False
    )


@pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (apt-get install prometheus)")
def test_rules_are_valid_and_pass_their_unit_tests() -> None:
    """`promtool check rules` accepts the rules and `promtool test rules` runs
    etc/prometheus/llmd-rules.test.yml: each alert fires when it should, with its labels and
    annotations, and not before."""
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("test", "rules", str(RULES_TEST))
    assert r.returncode == 0, r.stdout + r.stderr
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    tested = set(re.findall(r"^\s+alertname: (\w+)$", RULES_TEST.read_text(), re.M))
    assert tested == alerts


def exported_families() -> set[str]:
    """The families /metrics has once every kind of thing has happened."""
    counters = M.Metrics()
    counters.record_request(
        RequestRecord(
            time=0.0,
            model="m",
            endpoint="/api/chat",
            status=200,
            duration_s=1.0,
            ttfb_s=0.1,
            waited_for_load=True,
            prompt_tokens=1,
            eval_tokens=1,
        )
    )
    counters.record_event("spill", "m")
    waits, batches = M.Histogram(), M.Histogram()
    waits.observe(("m",), 0.1)
    batches.observe(("m",), 3)
    snap = M.Snapshot(
        models=[
            M.ModelGauges(
                "m", "b0", True, 0, 1, 300.0, "default", baseline_ttft_s=0.1, baseline_tpot_s=0.01
            )
        ],
        backends=[M.BackendGauges("b0", True, 0)],
        gpus=[M.GpuGauges(0, 1, 2)],
        queues=[M.QueueGauges("m", 0, 0, 1, False, {}, 0, 64)],
        queue_waits=waits,
        batches=batches,
    )
    text = M.Exposition(counters, lambda: snap).page()[0].decode()
    return set(re.findall(r"^# TYPE (\S+) ", text, re.M))


def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in ps:
        yield p
        yield from panels(p.get("panels", []))


def test_rules_and_dashboard_name_only_metrics_llmd_exports() -> None:
    names = set(re.findall(r"\bllmd_\w+", RULES.read_text() + DASHBOARD.read_text()))
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}
    assert families - exported_families() == set()


def test_dashboard_is_a_grafana_model_on_a_prometheus_datasource_variable() -> None:
    """Every panel and query uses the dashboard's Prometheus datasource variable; the
    instance and model variables query llmd's series; panel ids are unique."""
    doc = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert set(variables) == {"datasource", "instance", "model"}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    ds = {"type": "prometheus", "uid": "${datasource}"}
    for name in ("instance", "model"):
        assert variables[name]["type"] == "query" and variables[name]["datasource"] == ds
        assert variables[name]["allValue"] == ".*"
    every = list(panels(doc["panels"]))
    assert len({p["id"] for p in every}) == len(every)
    shown = [p for p in every if p["type"] != "row"]
    assert len(shown) >= 20
    for p in shown:
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["expr"].strip(), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
