"""llmd's request queues end to end: the real daemon, simulator children, real clients.

A streamed request holds its model's one slot (num_parallel 1) for as long as the test wants:
the simulator's `stall_stream` fault stops every stream after two chunks until the client
disconnects. Non-streamed requests are not affected by it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import ollama
import openai
import pytest
from llmdproc import Llmd, held, pull, until, wait_for

TINY = "tiny:1m"
STALL = {"OLLAMA_SIM_FAULTS": "stall_stream=2"}

Factory = Callable[..., Llmd]


def generate_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 4}, **extra}


async def post(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]
) -> tuple[int, Any, dict[str, str]]:
    async with session.post(url + path, json=body) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


def queue_of(d: Llmd, model: str) -> dict[str, Any]:
    return dict(d.model(model)["queue"])


def metric(d: Llmd, name: str, **labels: str) -> float:
    """One sample of /metrics (0 if absent)."""
    with_labels = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pat = re.compile(rf"^{re.escape(name)}\{{{re.escape(with_labels)}\}} (\S+)$", re.M)
    import urllib.request

    with urllib.request.urlopen(d.url + "/metrics", timeout=10) as r:
        m = pat.search(r.read().decode())
    return float(m.group(1)) if m else 0.0


async def test_one_request_runs_the_rest_wait_in_order_and_a_gone_client_leaves(
    daemon: Factory,
) -> None:
    d = daemon(backend_extra=[{"env": STALL}]).start()
    async with aiohttp.ClientSession() as s:
        async with held(s, d.url, TINY):
            done: list[int] = []

            async def one(i: int) -> None:
                status, body, _ = await post(s, d.url, "/api/generate", generate_body(TINY))
                assert status == 200, body
                done.append(i)

            tasks = []
            for i in range(4):
                tasks.append(asyncio.create_task(one(i)))
                await until(lambda n=i + 1: queue_of(d, TINY)["waiting"] == n, what=f"{i + 1}")
            q = queue_of(d, TINY)
            assert (q["running"], q["limit"], q["max_queue"]) == (1, 1, 64)
            assert metric(d, "llmd_queue_waiting", model=TINY) == 4
            assert metric(d, "llmd_queue_running", model=TINY) == 1
            out = (await asyncio.to_thread(d.llmctl, "models")).stdout
            assert re.search(rf"^{re.escape(TINY)} .* 1/1 +4 ", out, re.M), out
            # A client that disconnects while queued leaves the queue at once.
            tasks[1].cancel()
            await until(lambda: queue_of(d, TINY)["waiting"] == 3, what="the queue to shrink")
            assert not done  # nothing overtook the held request
        await asyncio.gather(*tasks[:1], *tasks[2:])
        assert done == [0, 2, 3]
        assert queue_of(d, TINY)["waiting"] == 0
        # The wait is in the histogram: four starts besides the held one.
        assert metric(d, "llmd_queue_wait_seconds_count", model=TINY) == 4


async def test_a_full_queue_answers_429_with_retry_after_in_each_apis_shape(
    daemon: Factory,
) -> None:
    d = daemon(backend_extra=[{"env": STALL}], models=[{"name": TINY, "max_queue": 1}]).start()
    async with aiohttp.ClientSession() as s, held(s, d.url, TINY):
        waiting = asyncio.create_task(post(s, d.url, "/api/generate", generate_body(TINY)))
        await until(lambda: queue_of(d, TINY)["waiting"] == 1, what="one waiting")
        status, body, headers = await post(s, d.url, "/api/generate", generate_body(TINY))
        assert status == 429, body
        assert "max_queue = 1" in body["error"] and TINY in body["error"]
        assert int(headers["Retry-After"]) >= 1
        chat = {"model": TINY, "messages": [{"role": "user", "content": "hi"}]}
        status, body, headers = await post(s, d.url, "/v1/chat/completions", chat)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["type"] == "rate_limit_error"
        assert "max_queue = 1" in body["error"]["message"]
        # The official clients see their own rate-limit errors.
        async with openai.AsyncOpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0) as oai:
            with pytest.raises(openai.RateLimitError):
                await oai.chat.completions.create(
                    model=TINY, messages=[{"role": "user", "content": "hi"}]
                )
        async with ollama.AsyncClient(host=d.url) as client:
            with pytest.raises(ollama.ResponseError) as e:
                await client.generate(model=TINY, prompt="hi")
        assert e.value.status_code == 429
        assert metric(d, "llmd_queue_rejected_total", model=TINY, reason="queue_full") == 4
        waiting.cancel()


async def test_a_request_waiting_past_queue_timeout_gets_503_with_retry_after(
    daemon: Factory,
) -> None:
    d = daemon(
        backend_extra=[{"env": STALL}], models=[{"name": TINY, "queue_timeout": "1s"}]
    ).start()
    async with aiohttp.ClientSession() as s, held(s, d.url, TINY):
        t0 = time.monotonic()
        status, body, headers = await post(s, d.url, "/api/generate", generate_body(TINY))
        waited = time.monotonic() - t0
        assert status == 503, body
        assert "queue_timeout" in body["error"] and TINY in body["error"]
        assert int(headers["Retry-After"]) >= 1
        assert 0.9 <= waited < 5
        assert metric(d, "llmd_queue_rejected_total", model=TINY, reason="queue_timeout") == 1
        assert queue_of(d, TINY)["waiting"] == 0


# Two models that cannot share a 9 GiB GPU (llmd estimates codellama:7b at ~7 GiB and
# mistral:7b at ~5.8 GiB at context 4096); each fits alone.
CODE = "codellama:7b-code-q4_K_M"
CHAT = "mistral:7b-instruct-q4_K_M"
SMALL_GPU = [{"index": 0, "name": "NVIDIA GeForce RTX 3080", "total_mib": 9 * 1024}]


def swap_daemon(daemon: Factory, models: list[dict[str, Any]], swap_batch: int) -> Llmd:
    d = daemon(
        models=models,
        sections={
            "gpu": {"probe": "nvidia-smi", "interval": "0.5s", "admission_timeout": "30s"},
            "scheduler": {"swap_batch": swap_batch},
        },
        backend_extra=[{"env": {**STALL, "OLLAMA_CONTEXT_LENGTH": "4096"}}],
        sim_env={"OLLAMA_SIM_SPEED": "50"},
        gpu_devices=SMALL_GPU,
    ).start()
    for m in (CODE, CHAT):
        pull(d, m)
    return d


@pytest.mark.parametrize(
    ("priorities", "swap_batch", "order"),
    [
        # Equal priorities: arrival order, but the holder serves its batch (3 since its load)
        # before it makes way.
        ((5, 5), 3, ["a1", "a2", "b1", "a3", "a4"]),
        # The waiting model is more important and the holder has had its batch (1): the
        # waiting one goes as soon as the held request ends.
        ((5, 1), 1, ["b1", "a1", "a2", "a3", "a4"]),
    ],
    ids=["batch", "priority"],
)
async def test_models_that_cannot_share_the_gpu_take_turns_in_batches(
    daemon: Factory, priorities: tuple[int, int], swap_batch: int, order: list[str]
) -> None:
    models = [{"name": CODE, "priority": priorities[0]}, {"name": CHAT, "priority": priorities[1]}]
    d = swap_daemon(daemon, models, swap_batch)
    done: list[str] = []
    async with aiohttp.ClientSession() as s:

        async def one(model: str, rid: str) -> None:
            status, body, _ = await post(s, d.url, "/api/generate", generate_body(model))
            assert status == 200, body
            done.append(rid)

        tasks = []
        async with held(s, d.url, CODE):
            for i in range(1, 3):
                tasks.append(asyncio.create_task(one(CODE, f"a{i}")))
                await until(lambda n=i: queue_of(d, CODE)["waiting"] == n, what=f"a{i} queued")
            tasks.append(asyncio.create_task(one(CHAT, "b1")))
            await until(lambda: d.model(CHAT)["state"] == "loading", what="the chat model to wait")
            for i in range(3, 5):  # these arrive after b1
                tasks.append(asyncio.create_task(one(CODE, f"a{i}")))
                await until(lambda n=i: queue_of(d, CODE)["waiting"] == n, what=f"a{i} queued")
            await asyncio.sleep(0.5)
            assert not done
        await asyncio.gather(*tasks)
    assert done == order
    # Two turns for the code model, one for the chat model: not a load per request.
    assert d.model(CODE)["loads"] == 2 and d.model(CHAT)["loads"] == 1
    assert metric(d, "llmd_queue_swaps_total", model=CODE) == 1
    events = json.loads(d.llmctl("events", "--json").stdout)["events"]  # newest first
    assert [e["model"] for e in reversed(events) if e["kind"] == "evict"] == [CODE, CHAT]
    wait_for(lambda: queue_of(d, CODE)["waiting"] == 0, what="an empty queue")
