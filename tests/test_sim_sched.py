"""Scheduling like server/sched.go: loads, keep-alive, eviction order, partial loads, queueing.

Two shared simulators keep the suite fast: `plain` (a private 24 GiB GPU; each test uses its own
model names) and `small` (one 1100 MiB GPU; emptied after each test).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
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
UTC = dt.UTC

PLAIN_MODELS = [
    catalog_model("e:1"),
    catalog_model("p:1", 100, load_seconds=30),
    catalog_model("k1:1"),
    catalog_model("k2:1"),
    catalog_model("d:1"),
    catalog_model("timer:1", tokens_per_second=0.1),  # 8 tokens: 0.8 s at speed 100
    catalog_model("unload:1", tokens_per_second=0.1),  # 8 tokens: 0.8 s
    catalog_model("r:1"),
    catalog_model("m:1", 400, layers=8, tokens_per_second=2),  # 5 ms a token on the GPU
    catalog_model("par:1", tokens_per_second=0.5),
    *(catalog_model(f"q{i}:1", load_seconds=40) for i in (1, 2, 3)),
    catalog_model("share:1", load_seconds=30),
    catalog_model("der:1"),
    catalog_model("param:1", parameters="num_ctx 2048\nstop <x>"),
]
SMALL_MODELS = [
    *(catalog_model(n, 100) for n in ("a:1", "b:1", "c:1", "d:1", "idle:1", "new:1")),
    catalog_model("busy:1", 100, tokens_per_second=0.1),  # 0.8 s streams
    catalog_model("short:1", 100, tokens_per_second=0.1),  # 0.8 s
    catalog_model("long:1", 100, tokens_per_second=0.0625),  # 1.28 s
    catalog_model("big:1", 400, layers=8),
]


def _sim(tmp: Path, models: list[dict[str, Any]], gpu_mib: int | None, **env: str) -> SimProcess:
    full = {"OLLAMA_SIM_CATALOG": str(write_catalog(tmp / "catalog.toml", models))}
    full["OLLAMA_SIM_GPU"] = ""
    if gpu_mib is not None:
        gpu = [{"index": 0, "name": "Sim GPU", "total_mib": gpu_mib}]
        full["OLLAMA_SIM_GPU"] = str(write_gpu_file(tmp / "gpu.json", gpu))
    return start_sim(tmp, {**full, **env})


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    tmp = tmp_path_factory.mktemp("plain")
    env = {"OLLAMA_KEEP_ALIVE": "1h30m", "OLLAMA_MAX_QUEUE": "1", "OLLAMA_MAX_LOADED_MODELS": "30"}
    with _sim(tmp, PLAIN_MODELS, None, **env) as sim:
        yield sim


@pytest.fixture(scope="module")
def small_sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    with _sim(tmp_path_factory.mktemp("small"), SMALL_MODELS, 1100) as sim:
        yield sim


@pytest.fixture(scope="module")
def pc(plain: SimProcess) -> Iterator[ollama.Client]:
    c = ollama.Client(host=plain.url)
    yield c
    c.close()


@pytest.fixture
def small(small_sim: SimProcess) -> Iterator[tuple[SimProcess, ollama.Client, Path]]:
    """The 1100 MiB simulator, emptied (and without external memory) after the test."""
    c = ollama.Client(host=small_sim.url)
    gpu = small_sim.log_path.parent / "gpu.json"
    yield small_sim, c, gpu
    set_external_mib(gpu, 0, 0)
    for m in c.ps().models:
        c.generate(model=m.model or "", prompt="", keep_alive=0)
    wait_for(lambda: not c.ps().models)
    c.close()


def loaded(c: ollama.Client, *names: str) -> dict[str, ollama.ProcessResponse.Model]:
    """Loaded models (only `names` when given), in /api/ps order."""
    return {m.model or "": m for m in c.ps().models if not names or m.model in names}


def load(c: ollama.Client, model: str, keep_alive: float | str | None = None) -> None:
    r = c.generate(model=model, prompt="", keep_alive=keep_alive)
    assert r.done_reason == "load"


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def runner_starts(sim: SimProcess, model: str) -> int:
    """Loads the simulator logged for `model` (under the name that loaded it)."""
    return sum(
        "llama runner started" in line and f"model={model}" in line
        for line in sim.log().splitlines()
    )


def seconds_left(m: ollama.ProcessResponse.Model) -> float:
    assert m.expires_at is not None
    return (m.expires_at - dt.datetime.now(UTC)).total_seconds()


def slow_stream(url: str, model: str, started: threading.Event, **body: Any) -> threading.Thread:
    """Stream an 8-token generate in a thread; `started` is set at the first chunk.

    At OLLAMA_SIM_SPEED 100 a model with tokens_per_second T streams for 8 / (100 T) seconds."""

    def run() -> None:
        payload = {"model": model, "prompt": "slow", "options": {"num_predict": 8}, **body}
        with httpx.stream("POST", url + "/api/generate", json=payload, timeout=30) as r:
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=run)
    t.start()
    return t


# -- loading, unloading and keep-alive ---------------------------------------------------------


def test_empty_prompt_loads_and_keep_alive_zero_unloads(pc: ollama.Client) -> None:
    """An empty prompt loads the model (done_reason load); keep_alive 0 unloads it."""
    assert loaded(pc, "e:1") == {}
    load(pc, "e:1")
    assert set(loaded(pc, "e:1")) == {"e:1"}
    r = pc.chat(model="e:1", messages=[], keep_alive=0)
    assert r.done_reason == "unload" and r.message.content == ""
    assert loaded(pc, "e:1") == {}
    # Unloading a model that is not loaded is still a 200.
    assert pc.generate(model="e:1", prompt="", keep_alive=0).done_reason == "unload"
    assert pc.chat(model="e:1", messages=[]).done_reason == "load"
    pc.generate(model="e:1", prompt="", keep_alive=0)


def test_two_names_of_one_model_share_one_runner(pc: ollama.Client) -> None:
    """A copy (same digest) uses the runner its source loaded, without a load of its own, and
    /api/ps lists that runner once, under the first name that loaded it (server/sched.go keys
    runners by the model's file)."""
    pc.copy("share:1", "share-copy:1")
    load(pc, "share:1")
    r = pc.generate(model="share-copy:1", prompt="hi", options={"num_predict": 2})
    assert r.model == "share-copy:1"
    assert (r.load_duration or 0) < 0.1e9  # share:1 takes 0.3 s to load at speed 100
    ps = [m for m in pc.ps().models if m.model in ("share:1", "share-copy:1")]
    assert [m.model for m in ps] == ["share:1"]
    tags = {m.model: m.digest for m in pc.list().models}
    assert ps[0].digest == tags["share:1"] == tags["share-copy:1"]
    # Either name unloads the one runner.
    pc.generate(model="share-copy:1", prompt="", keep_alive=0)
    wait_for(lambda: not loaded(pc, "share:1"))


def test_model_parameters_apply_to_requests(plain: SimProcess, pc: ollama.Client) -> None:
    """A model's own PARAMETERs come between Ollama's defaults and a request's options
    (server/routes.go modelOptions): num_ctx 2048 from the Modelfile loads a 2048 runner, which
    /v1 requests (no options) share, and a request's own num_ctx overrides it (a reload)."""
    load(pc, "param:1")
    assert loaded(pc, "param:1")["param:1"].context_length == 2048
    body = {"model": "param:1", "messages": [{"role": "user", "content": "x"}]}
    assert httpx.post(plain.url + "/v1/chat/completions", json=body).status_code == 200
    assert runner_starts(plain, "param:1") == 1
    pc.generate(model="param:1", prompt="x", options={"num_ctx": 4096})
    assert loaded(pc, "param:1")["param:1"].context_length == 4096
    assert runner_starts(plain, "param:1") == 2
    pc.generate(model="param:1", prompt="", keep_alive=0)
    wait_for(lambda: not loaded(pc, "param:1"))


def test_created_model_shares_its_sources_runner(plain: SimProcess, pc: ollama.Client) -> None:
    """A model created FROM another with runner options as parameters has the same model file,
    so its requests (native or /v1, which carry no options) are served by the runner the source
    was loaded into with those options, without a reload (server/sched.go keys runners by the
    model's file, needsReload compares runner options); a /v1 request for the source itself
    gets Ollama's default num_ctx and reloads it."""
    derived = "llmd-derived/der:1-test"
    pc.create(derived, from_="der:1", parameters={"num_ctx": 2048})
    pc.generate(model="der:1", prompt="x", options={"num_ctx": 2048})
    chat = {"messages": [{"role": "user", "content": "x"}]}
    r = pc.generate(model=derived, prompt="x")
    assert r.model == derived and (r.load_duration or 0) < 0.1e9
    v1 = httpx.post(plain.url + "/v1/chat/completions", json={"model": derived, **chat})
    assert v1.status_code == 200 and v1.json()["model"] == derived
    emb = httpx.post(plain.url + "/api/embed", json={"model": derived, "input": "x"})
    assert emb.status_code == 200
    assert runner_starts(plain, "der:1") == 1
    ps = loaded(pc, "der:1", derived)
    assert list(ps) == ["der:1"] and ps["der:1"].context_length == 2048
    # The source over /v1: Ollama's defaults (num_ctx 4096 here) reload it.
    assert httpx.post(
        plain.url + "/v1/chat/completions", json={"model": "der:1", **chat}
    ).is_success
    assert loaded(pc, "der:1")["der:1"].context_length == 4096
    assert runner_starts(plain, "der:1") == 2
    # A runner loaded under the created name is listed under it, with its parameters.
    pc.generate(model="der:1", prompt="", keep_alive=0)
    wait_for(lambda: not loaded(pc, "der:1"))
    load(pc, derived)
    ps = loaded(pc, "der:1", derived)
    assert list(ps) == [derived] and ps[derived].context_length == 2048
    assert ps[derived].digest != {m.model: m.digest for m in pc.list().models}["der:1"]
    pc.generate(model="der:1", prompt="", keep_alive=0)  # either name unloads the one runner
    wait_for(lambda: not loaded(pc, derived))
    pc.delete(derived)


def test_ps_shape_and_load_duration(pc: ollama.Client) -> None:
    """/api/ps reports size, size_vram, context_length, expiry; load_duration covers the load."""
    cold = pc.generate(model="p:1", prompt="hi", keep_alive="10m")
    warm = pc.generate(model="p:1", prompt="hi")
    assert (cold.load_duration or 0) >= 0.3e9  # 30 s / speed 100
    assert (warm.load_duration or 0) < 0.1e9
    m = loaded(pc, "p:1")["p:1"]
    assert m.size == m.size_vram == FOOTPRINT_100
    assert m.context_length == 4096
    assert m.details is not None and m.details.parameter_size == "1M"
    assert 590 < seconds_left(m) <= 600
    pc.generate(model="p:1", prompt="", keep_alive=0)


def test_keep_alive_expiry_and_forever(pc: ollama.Client) -> None:
    """An idle model past its keep-alive is unloaded; a negative keep-alive never expires."""
    load(pc, "k1:1", keep_alive=1.0)
    load(pc, "k2:1", keep_alive=-1)
    models = loaded(pc, "k1:1", "k2:1")
    assert list(models) == ["k2:1", "k1:1"]  # latest expiry first
    exp = models["k2:1"].expires_at
    assert exp is not None and exp.year >= dt.datetime.now().year + 290
    wait_for(lambda: set(loaded(pc, "k1:1", "k2:1")) == {"k2:1"}, timeout=3)
    pc.generate(model="k2:1", prompt="", keep_alive=0)


def test_default_keep_alive_and_last_writer_wins(pc: ollama.Client) -> None:
    """A fresh load takes OLLAMA_KEEP_ALIVE (here 1h30m); an omitted keep_alive keeps the
    current value; the last explicit one wins."""
    pc.generate(model="d:1", prompt="x")
    assert 5390 < seconds_left(loaded(pc, "d:1")["d:1"]) <= 5400
    pc.generate(model="d:1", prompt="x", keep_alive="2m")
    assert 110 < seconds_left(loaded(pc, "d:1")["d:1"]) <= 120
    pc.generate(model="d:1", prompt="x")
    assert 110 < seconds_left(loaded(pc, "d:1")["d:1"]) <= 120
    pc.generate(model="d:1", prompt="", keep_alive=0)


def test_keep_alive_timer_starts_when_idle(plain: SimProcess, pc: ollama.Client) -> None:
    """The keep-alive timer starts when the last in-flight request finishes, not before."""
    started = threading.Event()
    t = slow_stream(plain.url, "timer:1", started, keep_alive=0.4)
    assert started.wait(5)
    time.sleep(0.5)
    assert t.is_alive() and "timer:1" in loaded(pc)  # past the keep-alive, still in use
    t.join()
    assert "timer:1" in loaded(pc)
    wait_for(lambda: "timer:1" not in loaded(pc), timeout=2)


def test_unload_waits_for_in_flight_requests(plain: SimProcess, pc: ollama.Client) -> None:
    """An unload request answers at once but the model leaves only after in-flight requests."""
    started = threading.Event()
    t = slow_stream(plain.url, "unload:1", started)
    assert started.wait(5)
    assert pc.generate(model="unload:1", prompt="", keep_alive=0).done_reason == "unload"
    assert t.is_alive() and "unload:1" in loaded(pc)
    t.join()
    wait_for(lambda: "unload:1" not in loaded(pc), timeout=2)


def test_changed_num_ctx_reloads(plain: SimProcess, pc: ollama.Client) -> None:
    """A different num_ctx reloads the model; sampling options do not."""

    def loads() -> int:
        return sum(
            "llama runner started" in line and "model=r:1" in line
            for line in plain.log().splitlines()
        )

    pc.generate(model="r:1", prompt="x", options={"num_ctx": 2048})
    small = loaded(pc, "r:1")["r:1"]
    assert small.context_length == 2048
    pc.generate(model="r:1", prompt="x", options={"num_ctx": 2048, "temperature": 0.1})
    assert loads() == 1
    pc.generate(model="r:1", prompt="x", options={"num_ctx": 8192})
    big = loaded(pc, "r:1")["r:1"]
    assert big.context_length == 8192 and (big.size or 0) > (small.size or 0)
    assert loads() == 2
    pc.generate(model="r:1", prompt="x", options={"num_ctx": 100000})
    assert loaded(pc, "r:1")["r:1"].context_length == 8192  # clamped to the training context
    pc.generate(model="r:1", prompt="", keep_alive=0)


def test_cpu_and_partial_loads_generate_slower(pc: ollama.Client) -> None:
    """Tokens come about 10x slower fully on the CPU (num_gpu 0) and slower when split."""

    def per_token(**opts: Any) -> float:
        r = pc.generate(model="m:1", prompt="go", options={"num_predict": 8, **opts})
        assert r.eval_count == 8 and r.eval_duration
        return r.eval_duration / 8

    gpu = per_token()
    m = loaded(pc, "m:1")["m:1"]
    assert m.size_vram == m.size
    cpu = per_token(num_gpu=0)
    assert loaded(pc, "m:1")["m:1"].size_vram == 0
    split = per_token(num_gpu=4)
    half = loaded(pc, "m:1")["m:1"]
    assert half.size and half.size_vram and 0 < half.size_vram < half.size
    assert cpu > 6 * gpu
    assert 3 * gpu < split < cpu
    pc.generate(model="m:1", prompt="", keep_alive=0)


async def test_full_load_queue_answers_503(plain: SimProcess) -> None:
    """Loads queue one at a time; past OLLAMA_MAX_QUEUE (1) pending loads the answer is 503."""
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as h:

        async def go(model: str, delay: float) -> httpx.Response:
            await asyncio.sleep(delay)
            return await h.post("/api/generate", json={"model": model, "stream": False})

        r1, r2, r3 = await asyncio.gather(go("q1:1", 0), go("q2:1", 0.1), go("q3:1", 0.2))
        assert r1.status_code == r2.status_code == 200
        assert r3.status_code == 503
        assert r3.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }
        for m in ("q1:1", "q2:1"):
            await h.post("/api/generate", json={"model": m, "keep_alive": 0})


async def test_parallel_slots(plain: SimProcess) -> None:
    """Beyond OLLAMA_NUM_PARALLEL (1), requests wait for a slot; they are not queued loads."""
    async with httpx.AsyncClient(base_url=plain.url, timeout=10) as h:
        body = {"model": "par:1", "prompt": "p", "stream": False, "options": {"num_predict": 10}}
        await h.post("/api/generate", json={"model": "par:1"})
        t0 = time.monotonic()
        one = await h.post("/api/generate", json=body)
        single = time.monotonic() - t0
        t0 = time.monotonic()
        rs = await asyncio.gather(*(h.post("/api/generate", json=body) for _ in range(3)))
        together = time.monotonic() - t0
        assert [r.status_code for r in rs] == [200, 200, 200]  # MAX_QUEUE is 1
        assert one.json()["eval_count"] == 10
        # 10 tokens take at least 0.2 s; run one at a time, three take at least 0.6 s.
        assert single >= 0.2 and together >= 0.6
        await h.post("/api/generate", json={"model": "par:1", "keep_alive": 0})


# -- eviction on a small GPU -------------------------------------------------------------------

Small = tuple[SimProcess, ollama.Client, Path]


def test_eviction_prefers_shortest_keep_alive(small: Small) -> None:
    """When a model does not fit, the idle model with the shortest keep-alive leaves first,
    ties broken by name (findRunnerToUnload), not by recency."""
    sim, c, _ = small
    # 1100 MiB holds three 358 MiB models by size, but the 80% pre-flight rule allows two.
    load(c, "b:1", keep_alive="5m")
    load(c, "a:1", keep_alive="10m")
    load(c, "c:1", keep_alive="10m")
    assert set(loaded(c)) == {"a:1", "c:1"}  # b had the shortest keep-alive
    load(c, "d:1", keep_alive="10m")
    assert set(loaded(c)) == {"c:1", "d:1"}  # a and c tie: a goes by name
    assert "resetting model to expire immediately to make room" in sim.log()


def test_eviction_skips_busy_models(small: Small) -> None:
    """A busy model is passed over for an idle one, even one with a longer keep-alive."""
    sim, c, _ = small
    load(c, "idle:1", keep_alive="1h")
    started = threading.Event()
    t = slow_stream(sim.url, "busy:1", started, keep_alive="1m")
    assert started.wait(5)
    load(c, "new:1")
    assert set(loaded(c)) == {"busy:1", "new:1"}
    t.join()


def test_eviction_waits_when_all_busy(small: Small) -> None:
    """With every model busy, the load waits for the shortest keep-alive one to finish."""
    sim, c, _ = small
    s1, s2 = threading.Event(), threading.Event()
    t1 = slow_stream(sim.url, "short:1", s1, keep_alive="1m")
    t2 = slow_stream(sim.url, "long:1", s2, keep_alive="1h")
    assert s1.wait(5) and s2.wait(5)
    load(c, "new:1")
    t1.join(0.1)
    assert not t1.is_alive()  # the load had to wait for short:1 to finish
    assert t2.is_alive()
    assert set(loaded(c)) == {"long:1", "new:1"}
    t2.join()


def test_partial_load_when_memory_is_held_elsewhere(small: Small) -> None:
    """A model that cannot fit even after evicting loads partly on the CPU (size_vram < size),
    or fully on the CPU (size_vram 0) when not even the graph fits."""
    _, c, gpu = small
    env = {"OLLAMA_SIM_GPU": str(gpu)}
    load(c, "a:1")
    set_external_mib(gpu, 0, 600)
    load(c, "big:1")
    models = loaded(c)
    assert set(models) == {"big:1"}  # a:1 was evicted first, big still did not fit
    big = models["big:1"]
    assert big.size and big.size_vram and 0 < big.size_vram < big.size
    assert big.size_vram <= 500 * MIB
    used = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader,nounits", env=env)
    assert int(used.stdout) == 600 + -(-big.size_vram // MIB)
    c.generate(model="big:1", prompt="", keep_alive=0)
    set_external_mib(gpu, 0, 1000)
    load(c, "big:1")
    assert loaded(c)["big:1"].size_vram == 0


def test_max_loaded_models_evicts_even_with_free_memory(tmp_path: Path) -> None:
    """OLLAMA_MAX_LOADED_MODELS caps the count regardless of memory."""
    models = [catalog_model("a:1"), catalog_model("b:1")]
    with _sim(tmp_path, models, None, OLLAMA_MAX_LOADED_MODELS="1") as sim:
        c = ollama.Client(host=sim.url)
        load(c, "a:1")
        load(c, "b:1")
        assert set(loaded(c)) == {"b:1"}
        c.close()
