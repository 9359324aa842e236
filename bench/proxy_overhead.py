#!/usr/bin/env python3
"""What llmd's proxy adds: the same requests straight to a child and through llmd, side by side.

Starts llmd (with the Ollama simulator as its only child) on free ports, loads a tiny model, then
alternates rounds of identical requests sent to the child's own port and to llmd's proxy port, so
both see the same machine noise. Prints added p50/p99 latency, time to first byte and the
throughput ratio for: non-streamed at concurrency 1, non-streamed at concurrency 64, streamed.

With `--baseline DIR` (another llmd source tree, e.g. `git archive b748d7d | tar -x -C DIR`) a
second llmd runs from DIR beside this one, with its own simulator child at the same speed, and
rounds rotate over direct / baseline / current: the current-minus-baseline columns are what the
code between the two trees (the scheduler's queue, issue 11) adds per request.

    .venv/bin/python bench/proxy_overhead.py [--requests 400] [--rounds 4] [--json OUT]
    .venv/bin/python bench/proxy_overhead.py --requests 400 --baseline /tmp/base [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmdproc import Llmd, cleanup, make_llmd, pull  # noqa: E402

MODEL = "tiny:1m"
CASES = [
    ("non-streamed, concurrency 1", 1, False, 4),
    ("non-streamed, concurrency 64", 64, False, 4),
    ("streamed (32 tokens), concurrency 8", 8, True, 32),
]


async def one(
    session: aiohttp.ClientSession, url: str, stream: bool, tokens: int
) -> tuple[float, float]:
    """Latency and time to first byte of one generate request, in seconds."""
    body = {
        "model": MODEL,
        "prompt": "benchmark",
        "stream": stream,
        "options": {"num_predict": tokens},
    }
    t0 = time.perf_counter()
    ttfb = None
    async with session.post(url + "/api/generate", json=body) as r:
        async for _ in r.content.iter_any():
            if ttfb is None:
                ttfb = time.perf_counter() - t0
        assert r.status == 200, r.status
    total = time.perf_counter() - t0
    return total, ttfb if ttfb is not None else total


async def run_case(
    session: aiohttp.ClientSession, url: str, n: int, concurrency: int, stream: bool, tokens: int
) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)
    lat: list[float] = []
    ttfb: list[float] = []

    async def task() -> None:
        async with sem:
            t, f = await one(session, url, stream, tokens)
            lat.append(t)
            ttfb.append(f)

    t0 = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(n)))
    wall = time.perf_counter() - t0
    return {"lat": lat, "ttfb": ttfb, "rps": n / wall}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def measure(
    targets: dict[str, str], n: int, rounds: int
) -> list[tuple[str, int, dict[str, dict[str, list[float]]]]]:
    """Each case's latencies, TTFBs, per-round throughputs and per-round p50s, per target."""
    # Round r sends to the targets in the r-th order of all their orders (ABBA for two), so
    # drift in machine load hits every side alike.
    orders = list(itertools.permutations(targets))
    out = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        for url in targets.values():  # warm every path
            await run_case(s, url, 20, 4, False, 4)
        for name, conc, stream, tokens in CASES:
            acc: dict[str, dict[str, list[float]]] = {
                t: {"lat": [], "ttfb": [], "rps": [], "p50": []} for t in targets
            }
            per_round = max(n // rounds, conc)
            for r in range(rounds):
                for label in orders[r % len(orders)]:
                    res = await run_case(s, targets[label], per_round, conc, stream, tokens)
                    acc[label]["lat"] += res["lat"]
                    acc[label]["ttfb"] += res["ttfb"]
                    acc[label]["rps"].append(res["rps"])
                    acc[label]["p50"].append(pct(res["lat"], 50))
            out.append((name, per_round * rounds, acc))
    return out


def added(a: dict[str, list[float]], d: dict[str, list[float]], key: str, p: float) -> float:
    """How much later a's p-th percentile of `key` is than d's, in ms."""
    return (pct(a[key], p) - pct(d[key], p)) * 1e3


def ratio(a: dict[str, list[float]], d: dict[str, list[float]]) -> float:
    return statistics.mean(a["rps"]) / statistics.mean(d["rps"])


def summarise(
    measured: list[tuple[str, int, dict[str, dict[str, list[float]]]]],
) -> list[dict[str, Any]]:
    """llmd against direct, per case."""
    out = []
    for name, each, acc in measured:
        d, p = acc["direct"], acc["llmd"]
        out.append(
            {
                "case": name,
                "requests_each": each,
                "direct_p50_ms": pct(d["lat"], 50) * 1e3,
                "llmd_p50_ms": pct(p["lat"], 50) * 1e3,
                "added_p50_ms": added(p, d, "lat", 50),
                "added_p99_ms": added(p, d, "lat", 99),
                "added_ttfb_p50_ms": added(p, d, "ttfb", 50),
                "throughput_ratio": ratio(p, d),
            }
        )
    return out


def summarise_baseline(
    measured: list[tuple[str, int, dict[str, dict[str, list[float]]]]],
) -> list[dict[str, Any]]:
    """Baseline and current llmd against direct, and current minus baseline, per case."""
    out = []
    for name, each, acc in measured:
        d, b, c = acc["direct"], acc["baseline"], acc["llmd"]
        rounds = [(x - y) * 1e3 for x, y in zip(c["p50"], b["p50"], strict=True)]
        row: dict[str, Any] = {
            "case": name,
            "requests_each": each,
            "direct_p50_ms": pct(d["lat"], 50) * 1e3,
            "baseline_p50_ms": pct(b["lat"], 50) * 1e3,
            "current_p50_ms": pct(c["lat"], 50) * 1e3,
        }
        for p in (50, 99):
            row[f"baseline_added_p{p}_ms"] = added(b, d, "lat", p)
            row[f"current_added_p{p}_ms"] = added(c, d, "lat", p)
            row[f"current_minus_baseline_p{p}_ms"] = added(c, b, "lat", p)
        row["baseline_added_ttfb_p50_ms"] = added(b, d, "ttfb", 50)
        row["current_added_ttfb_p50_ms"] = added(c, d, "ttfb", 50)
        row["current_minus_baseline_ttfb_p50_ms"] = added(c, b, "ttfb", 50)
        # The same difference round by round: its spread is the run's noise.
        row["current_minus_baseline_p50_ms_per_round"] = rounds
        row["baseline_throughput_ratio"] = ratio(b, d)
        row["current_throughput_ratio"] = ratio(c, d)
        row["current_over_baseline_throughput"] = ratio(c, b)
        out.append(row)
    return out


def start_from(d: Llmd, src: Path, timeout: float = 30) -> None:
    """Start d's daemon from the source tree src (`python -m llmd.daemon` in src, src first on
    PYTHONPATH); its llmctl calls then use src's client too."""
    d.env["PYTHONPATH"] = str(src)
    probe = [sys.executable, "-c", "import llmd; print(llmd.__file__)"]
    where = subprocess.run(probe, env=d.env, cwd=src, capture_output=True, text=True, check=True)
    loaded = Path(where.stdout.strip()).resolve()
    if not loaded.is_relative_to(src.resolve()):
        raise SystemExit(f"--baseline {src}: python imports llmd from {loaded}, not from there")
    d.write_config()
    d.log_path = d.workdir / "llmd-baseline.log"
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "llmd.daemon", "--config", str(d.config_path)],
            env=d.env,
            cwd=src,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    d.wait_ready(timeout)


def print_plain(results: list[dict[str, Any]]) -> None:
    print(
        f"{'case':38} {'direct p50':>10} {'llmd p50':>9} {'+p50':>8} {'+p99':>8} "
        f"{'+ttfb p50':>9} {'thru ratio':>10}"
    )
    for r in results:
        print(
            f"{r['case']:38} {r['direct_p50_ms']:8.2f}ms {r['llmd_p50_ms']:7.2f}ms "
            f"{r['added_p50_ms']:6.2f}ms {r['added_p99_ms']:6.2f}ms "
            f"{r['added_ttfb_p50_ms']:7.2f}ms {r['throughput_ratio']:10.2f}"
        )


def print_baseline(results: list[dict[str, Any]], baseline: Path) -> None:
    print(f"baseline: {baseline}; ms added over direct to the child; cur-base = current - baseline")
    print(
        f"{'case':38} {'direct p50':>10} {'base +p50':>9} {'cur +p50':>9} {'cur-base':>9} "
        f"{'base +p99':>9} {'cur +p99':>9} {'cur-base':>9} {'base thru':>9} {'cur thru':>9}"
    )
    for r in results:
        print(
            f"{r['case']:38} {r['direct_p50_ms']:8.2f}ms "
            f"{r['baseline_added_p50_ms']:7.2f}ms {r['current_added_p50_ms']:7.2f}ms "
            f"{r['current_minus_baseline_p50_ms']:7.2f}ms "
            f"{r['baseline_added_p99_ms']:7.2f}ms {r['current_added_p99_ms']:7.2f}ms "
            f"{r['current_minus_baseline_p99_ms']:7.2f}ms "
            f"{r['baseline_throughput_ratio']:9.2f} {r['current_throughput_ratio']:9.2f}"
        )
    print("cur-base p50 round by round (ms):")
    for r in results:
        each = " ".join(f"{x:+.2f}" for x in r["current_minus_baseline_p50_ms_per_round"])
        print(f"  {r['case']:36} {each}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per side per case")
    ap.add_argument(
        "--rounds",
        type=int,
        help="alternating rounds per case (default 4; 6 with --baseline, each order once)",
    )
    ap.add_argument("--speed", default="1000", help="OLLAMA_SIM_SPEED of the child(ren)")
    ap.add_argument(
        "--num-parallel", type=int, help="backend.num_parallel of llmd's child(ren) (default 1)"
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another llmd source tree to run beside this one and compare against",
    )
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if args.baseline is not None and not (args.baseline / "llmd" / "daemon.py").is_file():
        ap.error(f"--baseline {args.baseline}: no llmd/daemon.py there")
    rounds = args.rounds or (6 if args.baseline else 4)
    with tempfile.TemporaryDirectory(prefix="llmd-bench-") as tmp:
        daemons: dict[str, Llmd] = {}
        try:
            for label in ("baseline", "llmd") if args.baseline else ("llmd",):
                d = daemons[label] = make_llmd(
                    Path(tmp) / label,
                    sim_env={"OLLAMA_SIM_SPEED": args.speed},
                    sections={"daemon": {"log_level": "warning"}},
                    backend_extra=[{"num_parallel": args.num_parallel}]
                    if args.num_parallel
                    else None,
                )
                if label == "baseline":
                    start_from(d, args.baseline)
                else:
                    d.start()
                pull(d, MODEL)
                r = d.llmctl("load", MODEL)
                assert r.returncode == 0, r.stderr
            targets = {"direct": daemons["llmd"].backend_url(0)}
            targets.update({label: d.url for label, d in daemons.items()})
            measured = asyncio.run(measure(targets, args.requests, rounds))
        finally:
            for d in daemons.values():
                cleanup(d)
    if args.baseline:
        results = summarise_baseline(measured)
        print_baseline(results, args.baseline)
        doc: dict[str, Any] = {"baseline": str(args.baseline), "rounds": rounds}
    else:
        results = summarise(measured)
        print_plain(results)
        doc = {}
    if args.json:
        args.json.write_text(json.dumps({**doc, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
