"""The lifecycle against a real simulator child, with the keep-alive decision as the seam."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from fakes import Events, FakeHistory
from llmdproc import free_port
from simproc import sim_path_env

from llmd import config, gpu
from llmd.backends import Backends
from llmd.lifecycle import Lifecycle
from llmd.memory import Memory
from llmd.models import KeepAlive, Model, MState
from llmd.policy import KeepAliveDecision

MODEL = "tiny:1m"


@pytest.fixture
async def parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Lifecycle, Events]]:
    for k, v in sim_path_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OLLAMA_SIM_SPEED", "100")
    monkeypatch.setenv("OLLAMA_SIM_GPU", str(tmp_path / "gpu.json"))
    (tmp_path / "gpu.json").write_text(
        '{"devices": [{"index": 0, "name": "X", "total_mib": 8192}]}'
    )
    cfg = config.from_dict(
        {
            "daemon": {"admin_socket": str(tmp_path / "a.sock")},
            "proxy": {"listen": f"127.0.0.1:{free_port()}"},
            "backend": [
                {"name": "b0", "port": free_port(), "env": {"OLLAMA_MODELS": str(tmp_path)}}
            ],
        }
    )
    tasks: list[asyncio.Task[None]] = []

    def start_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    events = Events()
    decision[:] = [decide]
    async with aiohttp.ClientSession() as session:
        backends = Backends(cfg, session=session, start_task=start_task)
        backends.start()
        await backends.wait_settled()
        memory = Memory(cfg, gpu.NoneProbe(time.time), backends=backends, history=FakeHistory())
        lc = Lifecycle(
            cfg,
            backends,
            memory,
            history=FakeHistory(),
            events=events,
            start_task=start_task,
            keep_alive=lambda m, idle_s=0.0: decision[0](m, idle_s),
        )
        timers = asyncio.create_task(lc.run_timers())
        try:
            yield lc, events
        finally:
            timers.cancel()
            await lc.close()
            await backends.stop_all()
            await asyncio.gather(*tasks, return_exceptions=True)


# The keep-alive decision in force: a test may swap it.
decision: list[Any] = []


def decide(m: Model, idle_s: float = 0.0) -> KeepAlive:
    """Unload 0.3 s after going idle, reload at 1 s, unload again at 2 s if still unused."""
    return KeepAliveDecision(0.3, "adaptive", 5, 99.0, prewarm_after_s=1.0, prewarm_expire_s=2.0)


async def wait_state(m: Model, state: MState, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while m.state is not state:
            await asyncio.sleep(0.02)


async def test_prewarm_reloads_before_the_predicted_request(
    parts: tuple[Lifecycle, Events],
) -> None:
    """With a pre-warm decision the model unloads soon after use, reloads before the predicted
    next request, which then finds it warm, and an unused pre-warm unloads again."""
    lc, events = parts
    child = lc.backends.children["b0"]
    async with lc.lease(MODEL, child) as lease:
        assert lease.waited_for_load
    m = lc.models[MODEL]
    await wait_state(m, MState.UNLOADED)  # 0.3 s keep-alive
    await wait_state(m, MState.LOADED)  # pre-warmed at 1 s
    assert any(k == "load" and "pre-warm" in r for k, _, r in events.seen)
    async with lc.lease(MODEL, child) as lease:
        assert not lease.waited_for_load  # the predicted request is warm
    # Used: the cycle starts again; unused this time, the pre-warmed copy unloads at 2 s.
    await wait_state(m, MState.UNLOADED)
    await wait_state(m, MState.LOADED)
    await wait_state(m, MState.UNLOADED)
    loads = [r for k, _, r in events.seen if k == "load"]
    assert len(loads) == 3 and loads[0].startswith("request")


async def test_a_second_name_of_a_loaded_model_shares_its_runner(
    parts: tuple[Lifecycle, Events],
) -> None:
    """A name with the digest of a loaded model (a copy) is served by that model's record: no
    second load, reconciliation keeps one loaded record (the child lists the runner once, under
    the first name), and unloading by the second name unloads the runner."""
    lc, events = parts
    decision[0] = lambda m, *_: KeepAliveDecision(None, "pinned", 0, None)
    child = lc.backends.children["b0"]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            child.url + "/api/copy", json={"source": MODEL, "destination": "copy:1m"}
        ) as r,
    ):
        assert r.status == 200
    await lc.backends.refresh_tags()
    async with lc.lease(MODEL, child) as first:
        assert first.waited_for_load
    async with lc.lease("copy:1m", child) as second:
        assert second.model is first.model and not second.waited_for_load
    await lc.reconcile()
    assert lc.models[MODEL].state is MState.LOADED
    assert "copy:1m" not in lc.models or lc.models["copy:1m"].state is MState.UNLOADED
    assert lc.runner_of("copy:1m") is lc.models[MODEL]
    assert [m for k, m, _ in events.seen if k == "load"] == [MODEL]
    assert await lc.unload("copy:1m", reason="test") == "unloaded"
    assert lc.models[MODEL].state is MState.UNLOADED
