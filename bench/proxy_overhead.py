#!/usr/bin/env python3
"""What llmd's proxy adds: the same requests straight to a child and through llmd, side by side.

Starts llmd (with the Ollama simulator as its only child) on free ports, loads a tiny model, then
alternates rounds of identical requests sent to the child's own port and to llmd's proxy port, so
both see the same machine noise. Prints added p50/p99 latency, time to first byte and the
throughput ratio for: non-streamed at concurrency 1, non-streamed at concurrency 64, streamed.

    .venv/bin/python bench/proxy_overhead.py [--requests 400] [--rounds 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmdproc import cleanup, make_llmd, pull  # noqa: E402

MODEL = "tiny:1m"


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


async def bench(direct: str, proxy: str, n: int, rounds: int) -> list[dict[str, Any]]:
    cases = [
        ("non-streamed, concurrency 1", 1, False, 4),
        ("non-streamed, concurrency 64", 64, False, 4),
        ("streamed (32 tokens), concurrency 8", 8, True, 32),
    ]
    out = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as s:
        for url in (direct, proxy):  # warm both paths
            await run_case(s, url, 20, 4, False, 4)
        for name, conc, stream, tokens in cases:
            acc: dict[str, dict[str, list[float]]] = {
                "direct": {"lat": [], "ttfb": [], "rps": []},
                "llmd": {"lat": [], "ttfb": [], "rps": []},
            }
            per_round = max(n // rounds, conc)
            for r in range(rounds):
                # ABBA order so drift in machine load hits both sides alike.
                order = [("direct", direct), ("llmd", proxy)]
                for label, url in order if r % 2 == 0 else order[::-1]:
                    res = await run_case(s, url, per_round, conc, stream, tokens)
                    acc[label]["lat"] += res["lat"]
                    acc[label]["ttfb"] += res["ttfb"]
                    acc[label]["rps"].append(res["rps"])
            d, p = acc["direct"], acc["llmd"]
            out.append(
                {
                    "case": name,
                    "requests_each": per_round * rounds,
                    "direct_p50_ms": pct(d["lat"], 50) * 1e3,
                    "llmd_p50_ms": pct(p["lat"], 50) * 1e3,
                    "added_p50_ms": (pct(p["lat"], 50) - pct(d["lat"], 50)) * 1e3,
                    "added_p99_ms": (pct(p["lat"], 99) - pct(d["lat"], 99)) * 1e3,
                    "added_ttfb_p50_ms": (pct(p["ttfb"], 50) - pct(d["ttfb"], 50)) * 1e3,
                    "throughput_ratio": statistics.mean(p["rps"]) / statistics.mean(d["rps"]),
                }
            )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests per side per case")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds per case")
    ap.add_argument("--speed", default="1000", help="OLLAMA_SIM_SPEED of the child")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmd-bench-") as tmp:
        d = make_llmd(
            Path(tmp),
            sim_env={"OLLAMA_SIM_SPEED": args.speed},
            sections={"daemon": {"log_level": "warning"}},
        )
        try:
            d.start()
            pull(d, MODEL)
            r = d.llmctl("load", MODEL)
            assert r.returncode == 0, r.stderr
            results = asyncio.run(bench(d.backend_url(0), d.url, args.requests, args.rounds))
        finally:
            cleanup(d)
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
    if args.json:
        args.json.write_text(json.dumps({"results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
