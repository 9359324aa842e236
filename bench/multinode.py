#!/usr/bin/env python3
"""A rehearsal of Kubernetes' inference extension on one machine: three llmd "nodes" and a
driver that picks a node per request by the endpoint picker's documented scoring of llmd's
/metrics. It is a rehearsal of the protocol, not the picker itself (deploy/README.md).

Each node is a real llmd with its own simulator child and its own simulated 16 GiB GPU, on its
own loopback port, configured as deploy/kubernetes configures a pod: the same four models on
every node, two of which fit on a GPU at once. Scrapers read every node's /metrics every
`--scrape-ms` (the picker's refresh interval) as llm-d-router's core-metrics-extractor reads it
with the `llmd` engineConfigs entry; the driver then scores each node per request as the
picker's plugins do (llm-d-router, pkg/epp/framework/plugins/scheduling/scorer):

- queue-scorer: (max queue - queue) / (max - min) over the nodes, 1 when all are equal;
- kv-cache-utilization-scorer: 1 - llmd_node_cache_usage_ratio;
- lora-affinity-scorer: 1 if the model is running there, 0.8 if the node can load another
  model, 0.6 if the model is waiting there, else 0;
- max-score-picker: the highest weighted sum, ties broken at random;

with the weights of the EndpointPickerConfig shipped in deploy/kubernetes (WEIGHTS below; a
test keeps them equal). One seeded open-loop trace (Poisson arrivals, skewed popularity) is
sent, after a warm-up through the same picker that is not counted, to fresh nodes per arm:

1. picker: the scoring above;
2. round-robin: what a plain Kubernetes Service does (no metrics).

Reported per arm: the share of requests for a model resident on some node (by the last scrape)
that went to a node holding it; each node's mean queue (waiting + running requests, sampled at
every scrape) against the mean over nodes; requests per node; model loads; p50/p99 latency.

    .venv/bin/python bench/multinode.py [--seed 1] [--duration 30] [--rate 24] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from contention import TaskModel, pct  # noqa: E402
from llmdproc import Llmd, cleanup, make_llmd, scrape  # noqa: E402
from simproc import write_catalog  # noqa: E402

NODES = 3
GPU = {"index": 0, "name": "NVIDIA GeForce RTX 4080", "total_mib": 16384}
NUM_PARALLEL = 2
# Four ~7B Q4 models (about 5.4 GiB loaded with two slots): two fit on a 16 GiB GPU, not three.
# Popularity: the share of requests each gets.
MODELS = (
    (TaskModel("code:7b", 5, 4680, 28, 4, 128, 3584, 3.0, 50, 32, rate=0), 0.40),
    (TaskModel("chat:8b", 5, 4920, 32, 8, 128, 4096, 3.0, 45, 32, rate=0), 0.30),
    (TaskModel("summarise:7b", 5, 4680, 28, 4, 128, 3584, 3.0, 50, 32, rate=0), 0.20),
    (TaskModel("classify:3b", 5, 2020, 28, 8, 128, 3072, 1.5, 90, 32, rate=0), 0.10),
)
# The scheduling profile of deploy/kubernetes/base/endpoint-picker-config.yaml.
WEIGHTS = {"queue-scorer": 1.0, "kv-cache-utilization-scorer": 1.0, "lora-affinity-scorer": 2.0}
# The `llmd` engineConfigs entry (the same file).
ENGINE = {
    "queuedRequestsSpec": "llmd_node_requests_waiting",
    "runningRequestsSpec": "llmd_node_requests_running",
    "kvUsageSpec": "llmd_node_cache_usage_ratio",
    "loraSpec": "llmd_node_models_info",
}
# The labels the picker's extractor reads from the LoRA-info sample, by these fixed names.
LORA_LABELS = ("max_lora", "running_lora_adapters", "waiting_lora_adapters")
SAMPLE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class ProtocolError(ValueError):
    """A page the endpoint picker could not read as a model server's."""


@dataclass
class Endpoint:
    """What the picker keeps of one node's last scrape (its endpoint metrics)."""

    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    active: frozenset[str] = frozenset()
    waiting_models: frozenset[str] = frozenset()
    max_models: int = 0
    updated: float = 0.0  # the LoRA-info sample's value: when the model sets changed


def read_endpoint(text: str) -> Endpoint:
    """A /metrics page as the picker's extractor reads it: each mapped family must be a gauge
    with one sample (the extractor takes one sample per name); the LoRA-info labels, read by
    their fixed names (extractor.go), are comma-separated names, trimmed."""
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(LABEL.findall(m.group(2) or ""))
            samples.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    for name in ENGINE.values():
        if types.get(name) != "gauge":
            raise ProtocolError(f"{name}: expected a gauge, got {types.get(name)}")
        if len(samples.get(name, ())) != 1:
            raise ProtocolError(f"{name}: expected one sample, got {samples.get(name)}")

    def one(spec: str) -> float:
        return samples[ENGINE[spec]][0][1]

    def names(csv: str) -> frozenset[str]:
        return frozenset(n.strip() for n in csv.split(",") if n.strip())

    labels, updated = samples[ENGINE["loraSpec"]][0]
    missing = sorted(set(LORA_LABELS) - set(labels))
    if missing:
        raise ProtocolError(f"{ENGINE['loraSpec']}: no label {', '.join(missing)}")
    return Endpoint(
        waiting=int(one("queuedRequestsSpec")),
        running=int(one("runningRequestsSpec")),
        kv_usage=one("kvUsageSpec"),
        active=names(labels["running_lora_adapters"]),
        waiting_models=names(labels["waiting_lora_adapters"]),
        max_models=int(labels["max_lora"]),
        updated=updated,
    )


def affinity(ep: Endpoint, model: str) -> float:
    """lora-affinity-scorer's score of one node for a model."""
    if model in ep.active:
        return 1.0
    if len(ep.active) + len(ep.waiting_models) < ep.max_models:
        return 0.8
    if model in ep.waiting_models:
        return 0.6
    return 0.0


def spread(values: list[float]) -> list[float]:
    """queue-scorer's normalisation: the lowest 1, the highest 0; all 1 when equal."""
    lo, hi = min(values), max(values)
    if hi == lo:
        return [1.0] * len(values)
    return [(hi - v) / (hi - lo) for v in values]


def scores(eps: list[Endpoint], model: str, weights: dict[str, float]) -> list[float]:
    queue = spread([float(e.waiting) for e in eps])
    return [
        weights["queue-scorer"] * q
        + weights["kv-cache-utilization-scorer"] * (1.0 - e.kv_usage)
        + weights["lora-affinity-scorer"] * affinity(e, model)
        for e, q in zip(eps, queue, strict=True)
    ]


def pick(eps: list[Endpoint], model: str, weights: dict[str, float], rng: random.Random) -> int:
    """max-score-picker: the best score, a tie broken at random."""
    s = scores(eps, model, weights)
    best = max(s)
    return rng.choice([i for i, v in enumerate(s) if v == best])


@dataclass(frozen=True)
class Req:
    at: float  # seconds after the start
    model: str


def make_trace(seed: int, duration_s: float, rate: float) -> list[Req]:
    """Poisson arrivals at `rate` a second, each for a model drawn by popularity."""
    rng = random.Random(f"{seed}:multinode")
    names = [m.name for m, _ in MODELS]
    shares = [share for _, share in MODELS]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(Req(t, rng.choices(names, shares)[0]))


@dataclass
class Result:
    model: str
    node: int
    resident_somewhere: bool
    sent_to_holder: bool
    status: int
    latency: float


@dataclass
class Cluster:
    """The nodes and the picker's view of them, kept fresh by one scraper per node."""

    nodes: list[Llmd]
    eps: list[Endpoint] = field(default_factory=list)
    samples: list[list[int]] = field(default_factory=list)  # per node: queue at each scrape
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.eps = [Endpoint() for _ in self.nodes]
        self.samples = [[] for _ in self.nodes]

    async def scrape(self, s: aiohttp.ClientSession, i: int, every_s: float) -> None:
        while True:
            try:
                async with s.get(self.nodes[i].url + "/metrics") as r:
                    self.eps[i] = read_endpoint(await r.text())
                self.samples[i].append(self.eps[i].waiting + self.eps[i].running)
            except (aiohttp.ClientError, ProtocolError) as e:
                self.errors.append(f"node {i}: {e}")
            await asyncio.sleep(every_s)


async def send(
    s: aiohttp.ClientSession, c: Cluster, req: Req, choose: Any, t0: float, timeout: float
) -> Result:
    await asyncio.sleep(max(0.0, t0 + req.at - time.monotonic()))
    eps = list(c.eps)
    node = choose(eps, req.model)
    holders = [i for i, e in enumerate(eps) if req.model in e.active]
    body = {"model": req.model, "prompt": "hello", "stream": False, "options": {"num_predict": 32}}
    start = time.monotonic()
    try:
        async with s.post(
            c.nodes[node].url + "/api/generate",
            json=body,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as r:
            await r.read()
            status = r.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0
    return Result(req.model, node, bool(holders), node in holders, status, time.monotonic() - start)


def loads(d: Llmd) -> int:
    """Model loads the node has done (llmd_model_events_total{event="load"})."""
    load = 'llmd_model_events_total{event="load",'
    return int(sum(v for k, v in scrape(d).items() if k.startswith(load)))


async def drive(
    c: Cluster,
    arm: str,
    warm: list[Req],
    trace: list[Req],
    weights: dict[str, float],
    seed: int,
    scrape_s: float,
    timeout: float,
) -> tuple[list[Result], list[float]]:
    rng = random.Random(f"{seed}:{arm}")
    turn = iter(range(10**9))
    if arm == "picker":

        def choose(eps: list[Endpoint], model: str) -> int:
            return pick(eps, model, weights, rng)
    else:

        def choose(eps: list[Endpoint], model: str) -> int:
            return next(turn) % len(eps)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        scrapers = [asyncio.create_task(c.scrape(s, i, scrape_s)) for i in range(len(c.nodes))]
        await asyncio.sleep(3 * scrape_s)
        t0 = time.monotonic()
        await asyncio.gather(*(send(s, c, r, choose, t0, timeout) for r in warm))
        await asyncio.sleep(3 * scrape_s)
        for samples in c.samples:
            samples.clear()
        t0 = time.monotonic()
        results = await asyncio.gather(*(send(s, c, r, choose, t0, timeout) for r in trace))
        for t in scrapers:
            t.cancel()
        await asyncio.gather(*scrapers, return_exceptions=True)
    means = [sum(x) / len(x) if x else 0.0 for x in c.samples]
    return list(results), means


def start_nodes(tmp: Path, speed: float) -> list[Llmd]:
    tmp.mkdir(parents=True, exist_ok=True)
    catalog = write_catalog(tmp / "catalog.toml", [m.catalog() for m, _ in MODELS])
    nodes = []
    for i in range(NODES):
        d = make_llmd(
            tmp / f"node{i}",
            backend_extra=[{"num_parallel": NUM_PARALLEL}],
            models=[{"name": m.name} for m, _ in MODELS],
            sections={
                "gpu": {"probe": "nvidia-smi"},
                "daemon": {"log_level": "info"},
                "proxy": {"open_metrics": True},
            },
            sim_env={"OLLAMA_SIM_CATALOG": str(catalog), "OLLAMA_SIM_SPEED": f"{speed:g}"},
            gpu_devices=[GPU],
        )
        nodes.append(d)
    try:
        for d in nodes:
            d.start()
    except BaseException:
        for d in nodes:
            cleanup(d)
        raise
    return nodes


def run_arm(args: argparse.Namespace, tmp: Path, arm: str) -> dict[str, Any]:
    warm = make_trace(args.seed + 1000, args.warmup, args.rate)
    trace = make_trace(args.seed, args.duration, args.rate)
    nodes = start_nodes(tmp / arm, args.speed)
    try:
        before = [loads(d) for d in nodes]
        c = Cluster(nodes)
        results, means = asyncio.run(
            drive(c, arm, warm, trace, WEIGHTS, args.seed, args.scrape_ms / 1000, args.timeout)
        )
        after = [loads(d) for d in nodes]
    finally:
        for d in nodes:
            cleanup(d)
    resident = [r for r in results if r.resident_somewhere]
    ok = [r.latency for r in results if r.status == 200]
    mean = sum(means) / len(means)
    return {
        "requests": len(results),
        "ok": len(ok),
        "resident_requests": len(resident),
        "to_holder": sum(r.sent_to_holder for r in resident),
        "to_holder_share": (
            sum(r.sent_to_holder for r in resident) / len(resident) if resident else None
        ),
        "node_mean_queue": means,
        "max_over_mean": max(means) / mean if mean else None,
        "per_node": [sum(r.node == i for r in results) for i in range(NODES)],
        "loads_during_trace": sum(after) - sum(before),
        "p50_s": pct(ok, 50),
        "p99_s": pct(ok, 99),
        "scrape_errors": c.errors[:5],
    }


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"{out['requests']} requests in {out['duration_s']:g} s at {out['rate']:g}/s "
        f"(seed {out['seed']}), {NODES} nodes, scrape every {out['scrape_ms']:g} ms",
        "",
        "| arm | to a node holding the model | max node queue / mean | requests per node "
        "| loads | p50 | p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, a in out["arms"].items():
        share = "-" if a["to_holder_share"] is None else f"{100 * a['to_holder_share']:.1f}%"
        ratio = "-" if a["max_over_mean"] is None else f"{a['max_over_mean']:.2f}"
        lines.append(
            f"| {arm} | {share} ({a['to_holder']}/{a['resident_requests']}) | {ratio} "
            f"| {'/'.join(map(str, a['per_node']))} | {a['loads_during_trace']} "
            f"| {1000 * (a['p50_s'] or 0):.0f} ms | {1000 * (a['p99_s'] or 0):.0f} ms |"
        )
    t = out["targets"]
    lines += [
        "",
        f"picker: {'met' if t['affinity'] else 'MISSED'} > 90% to a holder; "
        f"{'met' if t['balance'] else 'MISSED'} no node's queue above twice the mean",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=30.0, help="trace seconds (default 30)")
    ap.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds (default 5)")
    ap.add_argument("--rate", type=float, default=24.0, help="requests a second (default 24)")
    ap.add_argument("--speed", type=float, default=10.0, help="simulator speed (default 10)")
    ap.add_argument("--scrape-ms", type=float, default=50.0, help="scrape period (default 50)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--arms", default="picker,round-robin")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    if unknown := set(arms) - {"picker", "round-robin"}:
        ap.error(f"unknown arm(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {
        "seed": args.seed,
        "duration_s": args.duration,
        "rate": args.rate,
        "scrape_ms": args.scrape_ms,
        "weights": WEIGHTS,
        "arms": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmd-multinode-") as tmp:
        for arm in arms:
            print(f"arm {arm}", file=sys.stderr)
            out["arms"][arm] = run_arm(args, Path(tmp), arm)
    out["requests"] = next(iter(out["arms"].values()))["requests"]
    p = out["arms"].get("picker")
    out["targets"] = {
        "affinity": bool(p and p["to_holder_share"] is not None and p["to_holder_share"] > 0.9),
        "balance": bool(p and p["max_over_mean"] is not None and p["max_over_mean"] <= 2.0),
    }
    print(markdown(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
