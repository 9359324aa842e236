"""Replicas end to end: one model served from two simulated GPUs, each its own `ollama serve`
child (backend b0 on GPU 0, b1 on GPU 1), through the real daemon and real clients.

A streamed request holds one slot of a copy (num_parallel 1) for as long as the test wants: the
simulator's `stall_stream` fault stops every stream after two chunks until the client
disconnects. Non-streamed requests are not affected by it.
"""

from __future__ import annotations

import asyncio
import json
import re
from contextlib import closing
from typing import Any

import aiohttp
import ollama
from llmdproc import Llmd, held, pull, until
from test_scheduler_e2e import STALL, Factory, generate_body, post

TINY = "tiny:1m"
TWO_GPUS = [
    {"index": 0, "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564},
    {"index": 1, "name": "NVIDIA GeForce RTX 4090", "total_mib": 24564},
]


def start(daemon: Factory, **model: Any) -> Llmd:
    d = daemon(
        backends=2,
        backend_extra=[{"gpus": [0], "env": STALL}, {"gpus": [1], "env": STALL}],
        gpu_devices=TWO_GPUS,
        models=[{"name": TINY, "backends": ["b0", "b1"], **model}],
        sections={"gpu": {"probe": "nvidia-smi", "interval": "0.5s"}},
    ).start()
    pull(d, TINY, backend=1)  # b0's store has it (pulled = true); b1 gets it too
    return d


def copies(d: Llmd) -> dict[str, dict[str, Any]]:
    """The model's rows in `llmctl models --json`, by backend."""
    out = json.loads(d.llmctl("models", "--json").stdout)["models"]
    return {m["backend"]: m for m in out if m["name"] == TINY}


def state(d: Llmd) -> dict[str, str]:
    return {b: m["state"] for b, m in copies(d).items()}


def ollama_ps(url: str) -> ollama.ProcessResponse:
    with closing(ollama.Client(host=url)) as c:
        return c.ps()


def ps_names(d: Llmd, backend: int | None = None) -> list[str]:
    return [m["name"] for m in d.get("/api/ps", backend=backend)["models"]]


async def test_a_backlog_loads_a_second_copy_which_serves_it_and_every_copy_is_shown(
    daemon: Factory,
) -> None:
    d = start(daemon)
    rows = await asyncio.to_thread(copies, d)
    assert set(rows) == {"b0", "b1"} and all(r["replica"] for r in rows.values())
    assert {r["state"] for r in rows.values()} == {"unloaded"}
    async with aiohttp.ClientSession() as s:
        # The first request loads the first copy only.
        status, body, _ = await post(s, d.url, "/api/generate", generate_body(TINY))
        assert status == 200, body
        assert await asyncio.to_thread(state, d) == {"b0": "loaded", "b1": "unloaded"}
        async with held(s, d.url, TINY):  # b0's one slot is taken
            # Two more wait: about 2 service times (each longer than a load, since the first
            # request's included one) on one copy, more than a load: the second copy loads.
            waiting = [
                asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
                for _ in range(2)
            ]
            done, _ = await asyncio.wait(waiting, timeout=20)
            # Served while b0 is still held: by the copy on b1.
            assert len(done) == 2, await asyncio.to_thread(d.logs)
            assert all(t.result()[0] == 200 for t in done)
            rows = await asyncio.to_thread(copies, d)
            assert {b: r["state"] for b, r in rows.items()} == {"b0": "loaded", "b1": "loaded"}
            assert rows["b0"]["in_flight"] == 1 and rows["b1"]["in_flight"] == 0
            assert rows["b0"]["queue"]["running"] == 1 and rows["b0"]["queue"]["limit"] == 1
            # Every copy shows: in /api/ps (merged, and each child's own) and llmctl models.
            assert sorted(ps_names(d)) == [TINY, TINY]
            assert ps_names(d, backend=0) == [TINY] and ps_names(d, backend=1) == [TINY]
            out = (await asyncio.to_thread(d.llmctl, "models")).stdout
            assert re.search(rf"^{re.escape(TINY)} +b0 +loaded .* 1/1 ", out, re.M), out
            assert re.search(rf"^{re.escape(TINY)} +b1 +loaded .* 0/1 ", out, re.M), out
            events = json.loads(d.llmctl("events", "--json").stdout)["events"]
            extra = [e for e in events if e["kind"] == "load" and e["backend"] == "b1"]
            assert len(extra) == 1 and "another copy" in extra[0]["reason"], events
            # The ollama client sees one model name, as from Ollama.
            ps = await asyncio.to_thread(ollama_ps, d.url)
            assert [m.model for m in ps.models] == [TINY, TINY]


async def test_requests_go_to_the_copy_with_the_shortest_wait(daemon: Factory) -> None:
    d = start(daemon)
    assert d.llmctl("load", TINY).returncode == 0  # the first copy
    async with aiohttp.ClientSession() as s:
        async with held(s, d.url, TINY):
            # A backlog of one on b0 loads b1, then both copies serve.
            t = asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
            assert (await asyncio.wait_for(t, 20))[0] == 200
            await until(lambda: state(d) == {"b0": "loaded", "b1": "loaded"}, what="two copies")
        # Both idle now: a held request goes to either; the next one to the other, at once.
        async with held(s, d.url, TINY):
            first = await asyncio.to_thread(copies, d)
            busy = [b for b, r in first.items() if r["in_flight"] == 1]
            assert len(busy) == 1, first
            async with held(s, d.url, TINY):  # not queued behind the first: the free copy
                rows = await asyncio.to_thread(copies, d)
                assert {b: r["in_flight"] for b, r in rows.items()} == {"b0": 1, "b1": 1}
                assert rows["b0"]["queue"]["waiting"] == 0
                # Both held: the next one waits, and goes to whichever frees first.
                t = asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
                await until(lambda: copies(d)["b0"]["queue"]["waiting"] == 1, what="a wait")
            # The inner hold ended: its copy serves the waiting request.
            status, body, _ = await asyncio.wait_for(t, 20)
            assert status == 200, body
    # llmctl unload takes every copy.
    assert await asyncio.to_thread(state, d) == {"b0": "loaded", "b1": "loaded"}
    out = await asyncio.to_thread(d.llmctl, "unload", TINY)
    assert out.returncode == 0, out.stderr
    assert await asyncio.to_thread(state, d) == {"b0": "unloaded", "b1": "unloaded"}
    assert ps_names(d) == []


async def test_an_idle_extra_copy_leaves_on_the_keep_alive_while_the_busy_one_stays(
    daemon: Factory,
) -> None:
    d = start(daemon, keep_alive="3s")
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, d.url, "/api/generate", generate_body(TINY))
        assert status == 200, body
        async with held(s, d.url, TINY):
            t = asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
            t2 = asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
            assert all(r[0] == 200 for r in await asyncio.wait_for(asyncio.gather(t, t2), 20))
            assert await asyncio.to_thread(state, d) == {"b0": "loaded", "b1": "loaded"}
            # b1 idles out after its 3 s keep-alive; b0 is held all along and stays.
            await until(lambda: state(d)["b1"] == "unloaded", timeout=15, what="b1 to leave")
            assert await asyncio.to_thread(state, d) == {"b0": "loaded", "b1": "unloaded"}
            assert ps_names(d, backend=1) == []
            events = json.loads(d.llmctl("events", "--json").stdout)["events"]
            gone = [e for e in events if e["kind"] == "unload" and e["backend"] == "b1"]
            assert gone and "keep-alive" in gone[0]["reason"], events
