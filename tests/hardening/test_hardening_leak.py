"""Memory of a long-running llmd stays flat under mixed traffic with client aborts (issue 9).

Also a script: `python tests/hardening/test_hardening_leak.py [--warmup N] [--measured N]` runs
the same load against a fresh llmd and prints the RSS growth per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # llmdproc, when run as a script

from llmdproc import Llmd, cleanup, make_llmd

from llmd.daemon import STATUS_EVERY_S

TINY = "tiny:1m"
EMBED = "tiny-embed:1m"
CONCURRENCY = 16
WARMUP = 5_000
MEASURED = 10_000
# Bytes of RSS growth per request allowed over the measured phase. Before the fix llmd grew by
# about 140 B per request; after it 10-35 B, what the allocators still round up and keep.
BOUND_B_PER_REQUEST = 60


async def _one(s: aiohttp.ClientSession, base: str, i: int) -> str:
    """One request of the mix, chosen by i; returns what kind it was."""
    kind = i % 12
    gen = {"model": TINY, "prompt": f"p{i}", "options": {"num_predict": 4}}
    if kind == 0:  # streamed, the client goes away after the first line
        async with s.post(base + "/api/generate", json=gen) as r:
            await r.content.readline()
            r.close()
        return "abort-stream"
    if kind == 1:
        chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}], "stream": False}
        async with s.post(base + "/api/chat", json=chat) as r:
            await r.read()
        return "chat"
    if kind == 2:
        async with s.post(base + "/api/embed", json={"model": EMBED, "input": f"x{i}"}) as r:
            await r.read()
        return "embed"
    if kind == 3:
        async with s.get(base + "/api/tags") as r:
            await r.read()
        return "tags"
    if kind == 4:
        async with s.get(base + "/api/ps") as r:
            await r.read()
        return "ps"
    if kind == 5:  # a different unknown name every time, as a scanner would send
        async with s.post(base + "/api/generate", json={"model": f"nope-{i}", "prompt": "x"}) as r:
            await r.read()
        return "unknown-model"
    if kind == 6:
        async with s.post(base + "/api/generate", data=b'{"model": ') as r:
            await r.read()
        return "bad-json"
    if kind == 7:  # an OpenAI stream, aborted after the first event
        body = {"model": TINY, "messages": [{"role": "user", "content": "x"}], "stream": True}
        async with s.post(base + "/v1/chat/completions", json=body) as r:
            await r.content.readline()
            r.close()
        return "abort-sse"
    if kind == 8:
        async with s.head(base + "/") as r:
            await r.read()
        return "head"
    if kind == 9:
        async with s.post(base + "/api/generate", json=gen) as r:
            await r.read()
        return "stream"
    if kind == 10:  # the client gives up before any answer
        try:
            async with s.post(
                base + "/api/generate",
                json={**gen, "options": {"num_predict": 64}},
                timeout=aiohttp.ClientTimeout(total=0.005),
            ) as r:
                await r.read()
        except TimeoutError:
            pass
        return "abort-early"
    async with s.post(base + "/api/show", json={"model": TINY}) as r:
        await r.read()
    return "show"


async def drive(base: str, start: int, n: int) -> dict[str, int]:
    """Send n requests of the mix, CONCURRENCY at a time; count them by kind."""
    counts: dict[str, int] = {}
    nxt = start

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal nxt
        while nxt < start + n:
            i = nxt
            nxt += 1
            try:
                kind = await _one(s, base, i)
            except (aiohttp.ClientError, TimeoutError) as e:
                kind = f"client-error {type(e).__name__}"
            counts[kind] = counts.get(kind, 0) + 1

    conn = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=conn) as s:
        await asyncio.gather(*(worker(s) for _ in range(CONCURRENCY)))
    return counts


def rss(d: Llmd) -> int:
    assert d.proc is not None
    return int(psutil.Process(d.proc.pid).memory_info().rss)


def settle(d: Llmd) -> int:
    """RSS once in-flight work has finished and llmd has handed freed heap back (it does at
    every status tick), so that both readings are taken in the same state."""
    time.sleep(STATUS_EVERY_S + 1.5)
    return rss(d)


def measure(d: Llmd, warmup: int, measured: int) -> dict[str, Any]:
    """Warm up, then measure RSS growth over `measured` more requests."""
    asyncio.run(drive(d.url, 0, warmup))
    before = settle(d)
    t0 = time.monotonic()
    counts = asyncio.run(drive(d.url, warmup, measured))
    took = time.monotonic() - t0
    after = settle(d)
    return {
        "rss_before": before,
        "rss_after": after,
        "bytes_per_request": (after - before) / measured,
        "requests_per_s": measured / took,
        "kinds": counts,
    }


def leak_llmd(tmp_path: Path) -> Llmd:
    # Not debug (a line per request). Not info either: the repeat filter (llmd/logfilter.py)
    # tracks every distinct line of the last minute, up to logfilter.MAX_KEYS, and the
    # children's per-request lines fill that bounded table for a minute, which is not a leak
    # but would swamp a measurement of a few seconds.
    d = make_llmd(tmp_path, sections={"daemon": {"log_level": "warning"}})
    return d.start()


def test_rss_stays_flat_under_mixed_traffic_with_aborts(tmp_path: Path, figures: Any) -> None:
    """After a warm-up, 10,000 more mixed requests (streams aborted, unknown names, bad JSON)
    grow llmd's RSS by less than 60 bytes per request."""
    d = leak_llmd(tmp_path)
    try:
        res = measure(d, WARMUP, MEASURED)
    finally:
        cleanup(d)
    per = res["bytes_per_request"]
    figures.add(
        "leak (RSS per request)",
        tried=MEASURED,
        handled=MEASURED if per < BOUND_B_PER_REQUEST else 0,
        failures=0 if per < BOUND_B_PER_REQUEST else 1,
        note=f"{per:+.1f} B/request over {MEASURED} after {WARMUP} warm-up",
    )
    assert per < BOUND_B_PER_REQUEST, json.dumps(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--measured", type=int, default=MEASURED)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = leak_llmd(Path(tmp))
        try:
            res = measure(d, args.warmup, args.measured)
        finally:
            cleanup(d)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
