"""Scheduling like server/sched.go: loads, keep-alive, eviction order, partial loads, queueing."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest
from simproc import (
    SimProcess,
    catalog_model,
    nvidia_smi,
    set_external_mib,
    start_sim,
    write_catalog,
    write_gpu_file,
)

MIB = 1024 * 1024
# catalog_model(size_mib=100): 100 MiB file + 2 MiB KV (num_ctx 4096) + 256 MiB graph.
FOOTPRINT_100 = 358 * MIB


def sim_with(
    tmp_path: Path,
    models: list[dict[str, Any]],
    *,
    total_mib: int | None = None,
    external_mib: int = 0,
    speed: float = 100,
    **env: str,
) -> SimProcess:
    """A simulator with its own catalog and (optionally) a small GPU."""
    full = {"OLLAMA_SIM_CATALOG": str(write_catalog(tmp_path / "catalog.toml", models))}
    if total_mib is not None:
        gpu = write_gpu_file(
            tmp_path / "gpu.json",
            [{"index": 0, "name": "Sim GPU", "total_mib": total_mib, "external_mib": external_mib}],
        )
        full["OLLAMA_SIM_GPU"] = str(gpu)
    else:
        full["OLLAMA_SIM_GPU"] = ""
    full.update(env)
    return start_sim(tmp_path, full, speed=speed)


@pytest.fixture
def clients() -> Iterator[list[ollama.Client]]:
    made: list[ollama.Client] = []
    yield made
    for c in made:
        c.close()


def client_for(sim: SimProcess, made: list[ollama.Client]) -> ollama.Client:
    c = ollama.Client(host=sim.url)
    made.append(c)
    return c


def loaded(c: ollama.Client) -> dict[str, ollama.ProcessResponse.Model]:
    return {m.model or "": m for m in c.ps().models}


def load(c: ollama.Client, model: str, keep_alive: float | str | None = None) -> None:
    r = c.generate(model=model, prompt="", keep_alive=keep_alive)
    assert r.done_reason == "load"


def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_empty_prompt_loads_and_keep_alive_zero_unloads(
    tmp_path: Path, clients: list[ollama.Client]
) -> None:
    """An empty prompt loads the model (done_reason load); keep_alive 0 unloads it."""
    with sim_with(tmp_path, [catalog_model("a:1")]) as sim:
        c = client_for(sim, clients)
        assert loaded(c) == {}
        load(c, "a:1")
        assert set(loaded(c)) == {"a:1"}
        r = c.chat(model="a:1", messages=[], keep_alive=0)
        assert r.done_reason == "unload" and r.message.content == ""
        assert loaded(c) == {}
        # Unloading a model that is not loaded is still a 200.
        assert c.generate(model="a:1", prompt="", keep_alive=0).done_reason == "unload"
        assert c.chat(model="a:1", messages=[]).done_reason == "load"


def test_ps_shape_and_load_duration(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """/api/ps reports size, size_vram, context_length, expiry; load_duration covers the load."""
    with sim_with(tmp_path, [catalog_model("a:1", 100, load_seconds=30)], total_mib=4096) as sim:
        c = client_for(sim, clients)
        cold = c.generate(model="a:1", prompt="hi", keep_alive="10m")
        warm = c.generate(model="a:1", prompt="hi")
        assert (cold.load_duration or 0) >= 0.3e9  # 30 s / speed 100
        assert (warm.load_duration or 0) < 0.1e9
        m = loaded(c)["a:1"]
        assert m.size == m.size_vram == FOOTPRINT_100
        assert m.context_length == 4096
        assert m.details is not None and m.details.parameter_size == "1M"
        assert m.expires_at is not None
        left = (m.expires_at - dt.datetime.now(dt.timezone.utc)).total_seconds()
        assert 590 < left <= 600


def test_keep_alive_expiry_and_forever(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """An idle model past its keep-alive is unloaded; a negative keep-alive never expires."""
    with sim_with(tmp_path, [catalog_model("a:1"), catalog_model("b:1")]) as sim:
        c = client_for(sim, clients)
        load(c, "a:1", keep_alive=0.4)
        load(c, "b:1", keep_alive=-1)
        models = loaded(c)
        assert set(models) == {"a:1", "b:1"}
        exp = models["b:1"].expires_at
        assert exp is not None and exp.year >= dt.datetime.now().year + 290
        assert list(models) == ["b:1", "a:1"]  # latest expiry first
        wait_for(lambda: set(loaded(c)) == {"b:1"}, timeout=3)


def test_default_keep_alive_and_last_writer_wins(
    tmp_path: Path, clients: list[ollama.Client]
) -> None:
    """A fresh load takes OLLAMA_KEEP_ALIVE; omitted keep_alive keeps the current value."""
    with sim_with(tmp_path, [catalog_model("a:1")], OLLAMA_KEEP_ALIVE="1h30m") as sim:
        c = client_for(sim, clients)

        def left() -> float:
            exp = loaded(c)["a:1"].expires_at
            assert exp is not None
            return (exp - dt.datetime.now(dt.timezone.utc)).total_seconds()

        c.generate(model="a:1", prompt="x")
        assert 5390 < left() <= 5400
        c.generate(model="a:1", prompt="x", keep_alive="2m")
        assert 110 < left() <= 120
        c.generate(model="a:1", prompt="x")  # omitted: stays 2m
        assert 110 < left() <= 120


def slow_stream(url: str, model: str, started: threading.Event, **body: Any) -> threading.Thread:
    """Stream an 8-token generate in a thread; `started` is set at the first chunk.

    At OLLAMA_SIM_SPEED 100 a model with tokens_per_second T streams for 8 / (100 T) seconds."""

    def run() -> None:
        with httpx.stream(
            "POST",
            url + "/api/generate",
            json={"model": model, "prompt": "slow", "options": {"num_predict": 8}, **body},
            timeout=30,
        ) as r:
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_keep_alive_timer_starts_when_idle(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """The keep-alive timer starts when the last in-flight request finishes, not before."""
    slow = catalog_model("slow:1", tokens_per_second=0.1)  # 8 tokens: 0.8 s
    with sim_with(tmp_path, [slow]) as sim:
        c = client_for(sim, clients)
        started = threading.Event()
        t = slow_stream(sim.url, "slow:1", started, keep_alive=0.2)
        assert started.wait(5)
        time.sleep(0.4)
        assert t.is_alive() and "slow:1" in loaded(c)  # past the keep-alive, still in use
        t.join()
        assert "slow:1" in loaded(c)
        wait_for(lambda: loaded(c) == {}, timeout=2)


def test_unload_waits_for_in_flight_requests(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """An unload request answers at once but the model leaves only after in-flight requests."""
    slow = catalog_model("slow:1", tokens_per_second=0.2)  # 8 tokens: 0.4 s
    with sim_with(tmp_path, [slow]) as sim:
        c = client_for(sim, clients)
        started = threading.Event()
        t = slow_stream(sim.url, "slow:1", started)
        assert started.wait(5)
        r = c.generate(model="slow:1", prompt="", keep_alive=0)
        assert r.done_reason == "unload"
        assert t.is_alive() and "slow:1" in loaded(c)
        t.join()
        wait_for(lambda: loaded(c) == {}, timeout=2)


def test_eviction_prefers_shortest_keep_alive(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """When a model does not fit, the idle model with the shortest keep-alive leaves first,
    ties broken by name (findRunnerToUnload), not by recency."""
    models = [catalog_model(n, 100) for n in ("a:1", "b:1", "c:1", "d:1")]
    # 1100 MiB holds three 357 MiB models by size, but the 80% pre-flight rule allows two.
    with sim_with(tmp_path, models, total_mib=1100) as sim:
        c = client_for(sim, clients)
        load(c, "b:1", keep_alive="5m")
        load(c, "a:1", keep_alive="10m")
        load(c, "c:1", keep_alive="10m")
        assert set(loaded(c)) == {"a:1", "c:1"}  # b had the shortest keep-alive
        load(c, "d:1", keep_alive="10m")
        assert set(loaded(c)) == {"c:1", "d:1"}  # a and c tie: a goes by name
        assert "resetting model to expire immediately to make room" in sim.log()


def test_eviction_skips_busy_models(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """A busy model is passed over for an idle one, even one with a longer keep-alive."""
    models = [catalog_model("busy:1", 100, tokens_per_second=0.2)] + [
        catalog_model(n, 100) for n in ("idle:1", "new:1")
    ]
    with sim_with(tmp_path, models, total_mib=1100) as sim:
        c = client_for(sim, clients)
        load(c, "idle:1", keep_alive="1h")
        started = threading.Event()
        t = slow_stream(sim.url, "busy:1", started, keep_alive="1m")
        assert started.wait(5)
        load(c, "new:1")
        assert set(loaded(c)) == {"busy:1", "new:1"}
        t.join()


def test_eviction_waits_when_all_busy(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """With every model busy, the load waits for the shortest keep-alive one to finish."""
    models = [
        catalog_model("short:1", 100, tokens_per_second=0.2),  # 0.4 s
        catalog_model("long:1", 100, tokens_per_second=0.08),  # 1 s
        catalog_model("new:1", 100),
    ]
    with sim_with(tmp_path, models, total_mib=1100) as sim:
        c = client_for(sim, clients)
        s1, s2 = threading.Event(), threading.Event()
        t1 = slow_stream(sim.url, "short:1", s1, keep_alive="1m")
        t2 = slow_stream(sim.url, "long:1", s2, keep_alive="1h")
        assert s1.wait(5) and s2.wait(5)
        load(c, "new:1")
        assert not t1.is_alive()  # the load had to wait for short:1 to finish
        assert t2.is_alive()
        assert set(loaded(c)) == {"long:1", "new:1"}
        t2.join()


def test_max_loaded_models_evicts_even_with_free_memory(
    tmp_path: Path, clients: list[ollama.Client]
) -> None:
    """OLLAMA_MAX_LOADED_MODELS caps the count regardless of memory."""
    models = [catalog_model("a:1"), catalog_model("b:1")]
    with sim_with(tmp_path, models, OLLAMA_MAX_LOADED_MODELS="1") as sim:
        c = client_for(sim, clients)
        load(c, "a:1")
        load(c, "b:1")
        assert set(loaded(c)) == {"b:1"}


def test_partial_load_when_memory_is_held_elsewhere(
    tmp_path: Path, clients: list[ollama.Client]
) -> None:
    """A model that cannot fit even after evicting loads partly on the CPU (size_vram < size),
    or fully on the CPU (size_vram 0) when not even the graph fits."""
    models = [catalog_model("big:1", 400, layers=8), catalog_model("a:1", 100)]
    with sim_with(tmp_path, models, total_mib=1000) as sim:
        c = client_for(sim, clients)
        gpu = {"OLLAMA_SIM_GPU": str(tmp_path / "gpu.json")}
        load(c, "a:1")
        set_external_mib(tmp_path / "gpu.json", 0, 500)
        load(c, "big:1")
        m = loaded(c)
        assert set(m) == {"big:1"}  # a:1 was evicted first, big still did not fit
        big = m["big:1"]
        assert big.size and big.size_vram and 0 < big.size_vram < big.size
        assert big.size_vram <= 500 * MIB
        used = nvidia_smi(
            "--query-gpu=memory.used", "--format=csv,noheader,nounits", env=gpu
        ).stdout
        assert int(used) == 500 + -(-big.size_vram // MIB)
        c.generate(model="big:1", prompt="", keep_alive=0)
        set_external_mib(tmp_path / "gpu.json", 0, 900)
        load(c, "big:1")
        assert loaded(c)["big:1"].size_vram == 0


def test_cpu_and_partial_loads_generate_slower(
    tmp_path: Path, clients: list[ollama.Client]
) -> None:
    """Tokens come about 10x slower fully on the CPU (num_gpu 0) and slower when split."""
    models = [catalog_model("m:1", 400, layers=8, tokens_per_second=10)]
    with sim_with(tmp_path, models, total_mib=2000) as sim:
        c = client_for(sim, clients)

        def rate(**opts: Any) -> float:
            r = c.generate(model="m:1", prompt="go", options={"num_predict": 8, **opts})
            assert r.eval_count == 8 and r.eval_duration
            return r.eval_duration / 8

        gpu = rate()
        assert loaded(c)["m:1"].size_vram == loaded(c)["m:1"].size
        cpu = rate(num_gpu=0)
        assert loaded(c)["m:1"].size_vram == 0
        split = rate(num_gpu=4)
        half = loaded(c)["m:1"]
        assert half.size and half.size_vram and 0 < half.size_vram < half.size
        assert cpu > 6 * gpu
        assert 3 * gpu < split < cpu


def test_changed_num_ctx_reloads(tmp_path: Path, clients: list[ollama.Client]) -> None:
    """A different num_ctx reloads the model; sampling options do not."""
    with sim_with(tmp_path, [catalog_model("a:1")]) as sim:
        c = client_for(sim, clients)
        c.generate(model="a:1", prompt="x", options={"num_ctx": 2048})
        small = loaded(c)["a:1"]
        assert small.context_length == 2048
        c.generate(model="a:1", prompt="x", options={"num_ctx": 2048, "temperature": 0.1})
        assert sim.log().count("llama runner started") == 1
        c.generate(model="a:1", prompt="x", options={"num_ctx": 8192})
        big = loaded(c)["a:1"]
        assert big.context_length == 8192 and (big.size or 0) > (small.size or 0)
        assert sim.log().count("llama runner started") == 2
        c.generate(model="a:1", prompt="x", options={"num_ctx": 100000})
        assert loaded(c)["a:1"].context_length == 8192  # clamped to the training context


async def test_full_load_queue_answers_503(tmp_path: Path) -> None:
    """Loads queue one at a time; past OLLAMA_MAX_QUEUE pending loads the answer is 503."""
    models = [catalog_model(n, load_seconds=0.4) for n in ("a:1", "b:1", "c:1")]
    with sim_with(tmp_path, models, speed=1, OLLAMA_MAX_QUEUE="1") as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as h:

            async def go(model: str, delay: float) -> httpx.Response:
                await asyncio.sleep(delay)
                return await h.post("/api/generate", json={"model": model, "stream": False})

            r1, r2, r3 = await asyncio.gather(go("a:1", 0), go("b:1", 0.1), go("c:1", 0.2))
            assert r1.status_code == r2.status_code == 200
            assert r3.status_code == 503
            assert r3.json() == {
                "error": "server busy, please try again.  maximum pending requests exceeded"
            }
            v1 = await h.post(
                "/v1/chat/completions",
                json={"model": "c:1", "messages": [{"role": "user", "content": "x"}]},
            )
            assert v1.status_code == 200


async def test_parallel_slots(tmp_path: Path) -> None:
    """Beyond OLLAMA_NUM_PARALLEL, requests wait for a slot (and do not count as queued)."""
    slow = catalog_model("slow:1", tokens_per_second=0.5)  # 10 tokens: 0.2 s
    with sim_with(tmp_path, [slow], OLLAMA_MAX_QUEUE="1", OLLAMA_NUM_PARALLEL="1") as sim:
        async with httpx.AsyncClient(base_url=sim.url, timeout=10) as h:
            body = {
                "model": "slow:1",
                "prompt": "p",
                "stream": False,
                "options": {"num_predict": 10},
            }
            await h.post("/api/generate", json={"model": "slow:1"})
            t0 = time.monotonic()
            one = await h.post("/api/generate", json=body)
            single = time.monotonic() - t0
            t0 = time.monotonic()
            rs = await asyncio.gather(*(h.post("/api/generate", json=body) for _ in range(3)))
            together = time.monotonic() - t0
            assert [r.status_code for r in rs] == [200, 200, 200]
            assert one.json()["eval_count"] == 10
            assert together > 2.5 * single
