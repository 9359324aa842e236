"""llmd as a model server of Kubernetes' inference extension, end to end: /metrics scraped under
load and read the way the endpoint picker reads it (llm-d-router's core-metrics-extractor with
the `llmd` engineConfigs entry of deploy/kubernetes), and the OpenAI routes the protocol needs.

The picker takes one sample per metric name (the first, without timestamps), so each node gauge
must be a single series; the LoRA-info gauge's labels are comma-separated model names, trimmed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import aiohttp
from llmdproc import Llmd, held, parse_metrics, until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from multinode import Endpoint, read_endpoint

TINY, TINY2 = "tiny:1m", "tiny:2m"
STALL = {"OLLAMA_SIM_FAULTS": "stall_stream=2"}
Factory = Callable[..., Llmd]


def page(d: Llmd) -> str:
    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        return str(r.read().decode())


def scrape(d: Llmd) -> tuple[Endpoint, dict[str, float]]:
    """The page as the picker reads it (bench/multinode.py's reader: one gauge sample per
    mapped name, the model lists split on commas), and every series."""
    text = page(d)
    return read_endpoint(text), parse_metrics(text)


def per_model_sum(s: dict[str, float], family: str) -> float:
    return sum(v for k, v in s.items() if k.startswith(family + "{"))


async def test_the_node_gauges_under_load_read_as_the_endpoint_picker_reads_them(
    daemon: Factory,
) -> None:
    d = daemon(
        backend_extra=[{"env": STALL, "num_parallel": 2}],
        models=[{"name": TINY, "aliases": ["code"]}, {"name": TINY2}],
    ).start()
    idle, _ = scrape(d)
    assert (idle.waiting, idle.running, idle.kv_usage) == (0, 0, 0.0)
    assert idle.active == idle.waiting_models == set()
    # Nothing resident, and the configured models fit: the node can take one more.
    assert idle.max_models == 1
    async with aiohttp.ClientSession() as s:
        async with held(s, d.url, TINY), held(s, d.url, TINY):
            body = {"model": TINY, "prompt": "x", "stream": False, "options": {"num_predict": 2}}
            queued = [
                asyncio.create_task(s.post(d.url + "/api/generate", json=body)) for _ in range(3)
            ]
            busy = await until(lambda: scrape(d)[0].waiting == 3 and scrape(d), what="3 queued")
            ep, series = busy
            # Both slots of the one resident model are busy: the cache approximation is full.
            assert (ep.waiting, ep.running, ep.kv_usage) == (3, 2, 1.0)
            # The node totals are the per-model queues summed.
            assert ep.waiting == per_model_sum(series, "llmd_queue_waiting")
            assert ep.running == per_model_sum(series, "llmd_queue_running")
            # The model is advertised under every name a request may use for it.
            assert ep.active == {TINY, "code"}
            assert ep.waiting_models == set()
            # Two names resident, and tiny:2m would still fit: room for one more.
            assert ep.max_models == 3
            assert idle.updated < ep.updated <= time.time()
        for t in queued:
            r = await t
            assert r.status == 200, await r.text()
            r.release()
    calm = await until(lambda: (e := scrape(d)[0]).running == 0 and e, what="idle again")
    assert (calm.waiting, calm.kv_usage) == (0, 0.0)
    assert calm.updated == ep.updated  # the model sets did not change since


async def test_every_served_model_answers_both_openai_routes_and_joins_the_advertised_set(
    daemon: Factory,
) -> None:
    """The protocol needs OpenAI Completions and Chat for every model a node advertises; a
    model being loaded is advertised as waiting, then as running."""
    slow_load = {"OLLAMA_SIM_SPEED": "0.1"}  # tiny's 0.2 s load takes 2 s
    d = daemon(backend_extra=[{"env": slow_load}], models=[{"name": TINY}, {"name": TINY2}])
    d.start()
    async with aiohttp.ClientSession() as s:
        for model in (TINY, TINY2):
            chat = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            first = asyncio.create_task(s.post(d.url + "/v1/chat/completions", json=chat))

            def awaited(m: str = model) -> Endpoint | None:
                ep = scrape(d)[0]
                return ep if m in ep.waiting_models else None

            loading = await until(awaited, what=f"{model} advertised as waiting")
            assert model not in loading.active
            async with await first as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["choices"][0]["message"]["role"] == "assistant"
            done = {"model": model, "prompt": "once upon", "max_tokens": 3}
            async with s.post(d.url + "/v1/completions", json=done) as r:
                assert r.status == 200, await r.text()
                doc = await r.json()
                assert doc["object"] == "text_completion" and doc["choices"][0]["text"]
            ep, _ = scrape(d)
            assert model in ep.active and model not in ep.waiting_models
    ep, _ = scrape(d)
    assert ep.active == {TINY, TINY2}
    # Every configured model resident: nothing else for the node to load.
    assert ep.max_models == 2


async def test_metrics_may_be_open_while_everything_else_needs_a_key(daemon: Factory) -> None:
    """proxy.open_metrics lets a scraper without a key (the endpoint picker) read /metrics;
    inference still needs one. Keys may come from the environment (LLMD_INFERENCE_KEYS)."""
    key = "app-key-0123456789"
    d = daemon(models=[{"name": TINY}], sections={"proxy": {"open_metrics": True}})
    d.env["LLMD_INFERENCE_KEYS"] = f" {key} , "
    d.start()
    assert read_endpoint(page(d)).active == set()
    async with aiohttp.ClientSession() as s:
        body = {"model": TINY, "prompt": "x", "stream": False}
        async with s.post(d.url + "/api/generate", json=body) as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {key}"}
        async with s.post(d.url + "/api/generate", json=body, headers=auth) as r:
            assert r.status == 200, await r.text()
        async with s.post(d.url + "/metrics", headers={}) as r:
            assert r.status == 401  # only GET and HEAD are open
