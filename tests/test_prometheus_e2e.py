"""A real Prometheus scraping a running llmd: the per-model series arrive with their labels and
values, the shipped alerting rules evaluate, and every query of the shipped Grafana dashboard
returns data.

Needs Debian's `prometheus` (`apt-get install prometheus`; `.ci/run` installs it); skipped where
the binary is missing. Prometheus runs on a free port with a temporary config and storage
directory and a 1 s scrape interval, and is stopped at the end.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from llmdproc import ROOT, Factory, free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None, reason="needs prometheus on PATH (apt-get install prometheus)"
)

RULES = ROOT / "etc/prometheus/llmd-rules.yml"
DASHBOARD = ROOT / "etc/grafana/llmd-dashboard.json"
TINY, TINY2 = "tiny:1m", "tiny:2m"
# Every streamed response stalls after two chunks until the client goes (tests/sim/README.md).
STALL = {"OLLAMA_SIM_FAULTS": "stall_stream=2"}
# What a dashboard's template variables stand for when its queries are run here.
VARIABLES = {"instance": ".*", "model": ".*", "__rate_interval": "1m"}


class Prometheus:
    """A Prometheus server and the parts of its HTTP API the test reads."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def api(self, path: str, **params: str | list[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
                doc = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{path} {params}: {e.code} {e.read().decode()}") from None
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def values(self, expr: str) -> dict[frozenset[tuple[str, str]], float]:
        """{labels: value} of an instant query, without the metric name."""
        return {
            frozenset((k, v) for k, v in r["metric"].items() if k != "__name__"): float(
                r["value"][1]
            )
            for r in self.query(expr)
        }

    def value(self, expr: str) -> float | None:
        """The one value of an instant query, or None while it has none."""
        found = list(self.values(expr).values())
        assert len(found) <= 1, (expr, found)
        return found[0] if found else None


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """Start Prometheus scraping the given HOST:PORT every second, with llmd's rules loaded."""
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        port = free_port()
        config = tmp_path / "prometheus.yml"
        config.write_text(
            json.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(RULES)],
                    "scrape_configs": [
                        {"job_name": "llmd", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        log = tmp_path / "prometheus.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        p = Prometheus(proc, f"http://127.0.0.1:{port}", log)
        started.append(p)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(p.url + "/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return p
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus not ready in 60 s:\n{log.read_text()}")
            time.sleep(0.2)

    yield start
    for p in started:
        p.proc.terminate()
        try:
            p.proc.wait(20)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait()


async def until(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll a blocking check (a Prometheus query, an llmctl call) off the loop until it holds."""
    deadline = time.monotonic() + timeout
    while True:
        v = await asyncio.to_thread(check)
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.2)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' panels included."""

    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    doc = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in panels(doc["panels"]) for t in p.get("targets", [])]


def substitute(expr: str) -> str:
    """Grafana's template variables ($name, ${name}) replaced by what they stand for here."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in VARIABLES, f"unknown dashboard variable {name} in {expr}"
        return VARIABLES[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


async def test_prometheus_sees_llmds_series_rules_and_dashboard(
    daemon: Factory, prometheus: Callable[[str], Prometheus]
) -> None:
    """Prometheus scrapes llmd (OpenMetrics, 1 s): after traffic it has each model's requests,
    queue gauges (waiting and running while a stream holds the model's one slot, max_queue, the
    429 of a full queue), cold starts, loaded state per backend and every backend up, labelled
    with the scrape's job and instance; every alerting rule evaluates without error and none
    fires; and every query of the Grafana dashboard returns data."""
    d = daemon(
        backends=2,
        models=[
            {"name": TINY, "backend": "b0", "max_queue": 2},
            {"name": TINY2, "backend": "b1"},
        ],
        backend_extra=[{"env": STALL}],
    ).start()
    target = f"127.0.0.1:{d.proxy_port}"
    prom = await asyncio.to_thread(prometheus, target)
    job = {("job", "llmd"), ("instance", target)}
    await until(lambda: prom.value('up{job="llmd"}') == 1, "the first scrape")

    generate = {"model": TINY, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
    chat = {"model": TINY2, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    async with aiohttp.ClientSession() as s:

        async def post(path: str, body: dict[str, Any]) -> int:
            async with s.post(d.url + path, json=body) as r:
                await r.read()
                return r.status

        # Round one creates the series; round two makes them move between scrapes (for rate()).
        assert await post("/api/generate", generate) == 200
        assert await post("/api/chat", chat) == 200
        await until(lambda: prom.value(f'llmd_requests_total{{model="{TINY2}"}}') == 1, "round one")
        hold = {"model": TINY, "prompt": "hold", "stream": True}
        async with s.post(d.url + "/api/generate", json=hold) as held:
            assert held.status == 200
            await held.content.readline()  # running: it holds TINY's one slot
            waiting = [asyncio.create_task(post("/api/generate", generate)) for _ in range(2)]
            await until(lambda: d.model(TINY)["queue"]["waiting"] == 2, "two waiting")
            assert await post("/api/generate", generate) == 429  # max_queue = 2
            for _ in range(2):
                assert await post("/api/chat", chat) == 200
            await until(
                lambda: prom.value(f'llmd_queue_waiting{{model="{TINY}"}}') == 2,
                "Prometheus to see the queue",
            )
            assert prom.values(f'llmd_queue_waiting{{model="{TINY}"}}') == {
                frozenset(job | {("model", TINY)}): 2
            }
            assert prom.value(f'llmd_queue_running{{model="{TINY}"}}') == 1
        # The held stream is gone: the queued requests run.
        assert await asyncio.gather(*waiting) == [200, 200]

    def settled() -> bool:
        return (
            prom.value(f'llmd_queue_waiting{{model="{TINY}"}}') == 0
            and prom.value(f'llmd_request_duration_seconds_count{{model="{TINY}"}}') == 5
        )

    await until(settled, "Prometheus to see the queue drained")
    requests = prom.values("llmd_requests_total")
    assert (
        requests[
            frozenset(job | {("model", TINY), ("endpoint", "/api/generate"), ("status", "200")})
        ]
        == 3
    )
    assert (
        requests[
            frozenset(job | {("model", TINY), ("endpoint", "/api/generate"), ("status", "429")})
        ]
        == 1
    )
    assert (
        requests[frozenset(job | {("model", TINY2), ("endpoint", "/api/chat"), ("status", "200")})]
        == 3
    )
    assert prom.values("llmd_queue_max") == {
        frozenset(job | {("model", TINY)}): 2,
        frozenset(job | {("model", TINY2)}): 64,
    }
    assert prom.value(f'llmd_queue_rejected_total{{model="{TINY}",reason="queue_full"}}') == 1
    assert prom.value(f'llmd_queue_running{{model="{TINY}"}}') == 0
    assert prom.value(f'llmd_queue_limit{{model="{TINY}"}}') == 1
    assert prom.values("llmd_cold_starts_total") == {
        frozenset(job | {("model", TINY)}): 1,
        frozenset(job | {("model", TINY2)}): 1,
    }
    assert prom.values("llmd_model_loaded") == {
        frozenset(job | {("model", TINY), ("backend", "b0")}): 1,
        frozenset(job | {("model", TINY2), ("backend", "b1")}): 1,
    }
    assert prom.values("llmd_backend_up") == {
        frozenset(job | {("backend", "b0")}): 1,
        frozenset(job | {("backend", "b1")}): 1,
    }
    assert prom.value("llmd_store_degraded") == 0
    assert prom.value(f'llmd_model_events_total{{event="load",model="{TINY2}"}}') == 1

    # Every scrape parsed (OpenMetrics, as Prometheus asks for it).
    (scraped,) = prom.api("targets")["activeTargets"]
    assert (scraped["health"], scraped["lastError"]) == ("up", ""), scraped

    # The rules load and evaluate against the real series; nothing is wrong, so nothing fires.
    rules = [r for g in prom.api("rules")["groups"] for r in g["rules"]]
    assert len(rules) == 6
    for r in rules:
        assert (r["name"], r["health"], r.get("lastError", "")) == (r["name"], "ok", ""), r
    firing = [a for a in prom.api("alerts")["alerts"] if a["state"] == "firing"]
    assert firing == []

    # The dashboard's variables have values, and each of its queries returns data.
    assert prom.api("label/instance/values", **{"match[]": "llmd_backend_up"}) == [target]
    models = prom.api("label/model/values", **{"match[]": 'llmd_model_loaded{instance=~".*"}'})
    assert set(models) == {TINY, TINY2}
    queries = dashboard_queries()
    assert len(queries) >= 20
    # Data: at least one series with a number (a quantile of no traffic would be NaN).
    empty = [
        (title, expr)
        for title, expr in queries
        if all(math.isnan(v) for v in prom.values(substitute(expr)).values())
    ]
    assert empty == [], empty
