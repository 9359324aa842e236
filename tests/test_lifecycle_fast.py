"""The lifecycle acting on memory's decisions, in-process: fake children and probe (one 16 GiB
GPU), the real keep-alive policy (fixed, 10 min) and a fake clock driving the timers."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from fakes import GiB, Rig, make_config, rig

from llmd.childapi import ChildAPIError, Pulled
from llmd.models import TRANSITIONS, LoadError, Model, MState
from llmd.transitions import IllegalTransition

KEEP_ALIVE_S = 600.0


async def wait_until(cond: Callable[[], bool], timeout: float = 2.0) -> None:
    """Let the loop run until `cond` holds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


async def settle() -> None:
    """Let every ready task run a few steps."""
    for _ in range(20):
        await asyncio.sleep(0)


async def hold(r: Rig, name: str, gate: asyncio.Event) -> asyncio.Task[None]:
    """A request holding `name` (loaded first, if cold) until `gate` is set."""
    entered = asyncio.Event()

    async def request() -> None:
        async with r.lc.lease(name, r.child):
            entered.set()
            await gate.wait()

    task = r.start(request(), f"hold-{name}")
    await wait_until(lambda: entered.is_set() or task.done())
    if task.done():
        task.result()  # the lease failed: say why
    return task


async def request(r: Rig, name: str) -> bool:
    """One request for `name`; whether it waited for a load."""
    async with r.lc.lease(name, r.child) as lease:
        return lease.waited_for_load


async def test_concurrent_requests_for_a_cold_model_share_one_load() -> None:
    """Concurrent leases of a cold model share one load call and all wait for it."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        gate = r.api.gates["a:1b"] = asyncio.Event()
        tasks = [r.start(request(r, "a:1b"), f"request-{i}") for i in range(3)]
        await wait_until(lambda: bool(r.api.calls))
        await settle()
        m = r.lc.models["a:1b"]
        assert (m.state, m.in_flight, r.api.calls) == (MState.LOADING, 3, [("load", "a:1b")])
        gate.set()
        assert await asyncio.gather(*tasks) == [True, True, True]
        assert r.api.calls == [("load", "a:1b")]
        assert m.state is MState.LOADED
        assert [model for model, _ in r.events.of("load")] == ["a:1b"]


async def test_a_second_name_of_a_loaded_model_is_served_by_its_runner() -> None:
    """A name with the digest of a loaded model is served by that model's record, no load."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        r.api.digests["a:1b"] = "sha256:aa"
        r.backends.set_tags(
            "b0",
            [
                Pulled.from_json({"name": "a:1b", "digest": "sha256:aa"}),
                Pulled.from_json({"name": "copy:1b", "digest": "sha256:aa"}),
            ],
        )
        await r.lc.load("a:1b", r.child, "test")
        async with r.lc.lease("copy:1b", r.child) as lease:
            assert (lease.model.name, lease.waited_for_load) == ("a:1b", False)
        assert r.api.calls == [("load", "a:1b")]


async def test_a_cold_load_evicts_the_victim_memory_names_first() -> None:
    """A cold load evicts the idle model memory names (the child sees its unload) before loading."""
    async with rig(make_config()) as r:
        r.add("old:1b", 8)
        r.add("new:1b", 8)
        await r.lc.load("old:1b", r.child, "test")
        r.clock.advance(60)
        assert await request(r, "new:1b")
        assert r.api.calls == [("load", "old:1b"), ("unload", "old:1b"), ("load", "new:1b")]
        assert r.lc.models["old:1b"].state is MState.UNLOADED
        assert r.lc.models["new:1b"].state is MState.LOADED
        [(model, why)] = r.events.of("evict")
        assert model == "old:1b"
        assert why.startswith("to make room for new:1b (needs 8.0 GiB, measured; ")


async def test_a_busy_model_is_evicted_only_once_idle() -> None:
    """A cold load does not evict a busy model of its own priority: it waits, and evicts it once
    its request ends."""
    async with rig(make_config()) as r:
        r.add("old:1b", 8)
        r.add("new:1b", 8)
        gate = asyncio.Event()
        holder = await hold(r, "old:1b", gate)
        task = r.start(request(r, "new:1b"), "request-new")
        await wait_until(lambda: "new:1b" in r.lc.models)
        await settle()
        assert r.lc.models["new:1b"].state is MState.LOADING
        assert r.lc.models["old:1b"].state is MState.LOADED
        assert r.api.calls == [("load", "old:1b")]
        gate.set()
        await holder
        assert await task
        assert r.api.calls == [("load", "old:1b"), ("unload", "old:1b"), ("load", "new:1b")]


async def test_a_preempting_load_evicts_a_busy_model_and_cancels_its_requests() -> None:
    """A model with preempt evicts a busy, less important model and cancels its requests."""
    cfg = make_config([{"name": "new:1b", "priority": 1, "preempt": True}])
    async with rig(cfg) as r:
        r.add("old:1b", 8)
        r.add("new:1b", 10)
        holder = await hold(r, "old:1b", asyncio.Event())
        assert await request(r, "new:1b")
        with pytest.raises(asyncio.CancelledError):
            await holder
        assert r.api.calls == [("load", "old:1b"), ("unload", "old:1b"), ("load", "new:1b")]
        old = r.lc.models["old:1b"]
        assert (old.state, old.in_flight) == (MState.UNLOADED, 0)
        [(model, why)] = r.events.of("evict")
        assert model == "old:1b" and why.endswith("; preempted while busy")


@pytest.mark.parametrize("spill", [False, True])
async def test_a_spilled_load_is_undone_unless_allowed(spill: bool) -> None:
    """A load that lands partly on the CPU is unloaded and retried once, then fails with 503,
    unless the model has allow_cpu_spill."""
    async with rig(make_config([{"name": "big:1b", "allow_cpu_spill": spill}])) as r:
        r.add("big:1b", 10, vram_gib=6)
        if spill:
            assert await request(r, "big:1b")
            m = r.lc.models["big:1b"]
            assert (m.state, m.size, m.size_vram) == (MState.LOADED, 10 * GiB, 6 * GiB)
            assert r.api.calls == [("load", "big:1b")]
            assert r.events.of("spill") == []
            return
        with pytest.raises(LoadError) as e:
            await request(r, "big:1b")
        assert e.value.status == 503
        assert "set allow_cpu_spill = true" in e.value.message
        assert r.api.calls == [("load", "big:1b"), ("unload", "big:1b")] * 2
        assert r.lc.models["big:1b"].state is MState.UNLOADED
        assert [model for model, _ in r.events.of("spill")] == ["big:1b", "big:1b"]
        assert r.events.of("load-failed") == [("big:1b", e.value.message)]


@pytest.mark.parametrize(
    ("error", "status", "message", "event"),
    [
        pytest.param(
            ChildAPIError("model requires more system memory", 500),
            500,
            "model requires more system memory",
            True,
            id="refused",
        ),
        pytest.param(
            ChildAPIError("Server disconnected (POST /api/generate)"),
            503,
            "backend b0 failed while loading a:1b: Server disconnected (POST /api/generate)",
            False,
            id="child-died",
        ),
    ],
)
async def test_a_failed_load_reports_the_childs_answer(
    error: ChildAPIError, status: int, message: str, event: bool
) -> None:
    """A child's refusal fails the load with its status and words (a load-failed event); a
    child that fails mid-load is a 503 naming the backend."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        r.api.failures["a:1b"] = error
        with pytest.raises(LoadError) as e:
            await request(r, "a:1b")
        assert (e.value.status, e.value.message) == (status, message)
        assert r.lc.models["a:1b"].state is MState.UNLOADED
        assert r.events.of("load-failed") == ([("a:1b", message)] if event else [])


async def test_an_idle_model_unloads_when_its_keep_alive_expires() -> None:
    """An idle model is unloaded by the first tick past its keep-alive, with the reason."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        await r.lc.load("a:1b", r.child, "test")
        m = r.lc.models["a:1b"]
        deadline = r.clock.now + KEEP_ALIVE_S
        assert m.deadline == deadline
        r.clock.advance(KEEP_ALIVE_S - 1)
        assert (await r.lc.tick(), m.state) == (deadline, MState.LOADED)
        r.clock.advance(2)
        assert (await r.lc.tick(), m.state) == (None, MState.UNLOADED)
        assert r.api.calls[-1] == ("unload", "a:1b")
        assert r.events.of("unload") == [("a:1b", "idle past its keep-alive of 10m (default)")]


async def test_a_pinned_model_has_no_keep_alive_deadline() -> None:
    """A pinned model gets no idle deadline and no tick unloads it."""
    async with rig(make_config([{"name": "a:1b", "pin": True}])) as r:
        r.add("a:1b", 4)
        await r.lc.load("a:1b", r.child, "test")
        m = r.lc.models["a:1b"]
        assert m.deadline is None and m.keep_alive is not None
        assert m.keep_alive.source == "pinned"
        r.clock.advance(365 * 86400)
        assert await r.lc.tick() is None
        assert m.state is MState.LOADED


async def test_an_unload_while_in_flight_waits_for_the_last_request() -> None:
    """An unload of a busy model waits until its last lease ends, then the timer unloads it."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        first, last = asyncio.Event(), asyncio.Event()
        holders = [await hold(r, "a:1b", first), await hold(r, "a:1b", last)]
        answer = await r.lc.unload("a:1b", "llmctl unload")
        assert answer == "will unload when its in-flight requests finish"
        m = r.lc.models["a:1b"]
        first.set()
        await holders[0]
        await r.lc.tick()
        assert (m.state, m.in_flight) == (MState.LOADED, 1)
        assert ("unload", "a:1b") not in r.api.calls
        last.set()
        await holders[1]
        await r.lc.tick()
        assert m.state is MState.UNLOADED
        assert r.events.of("unload") == [("a:1b", "unload requested")]


async def test_a_second_unload_of_an_unloading_model_waits_for_the_first() -> None:
    """Unloading a model that is already on its way out waits for it: one unload, one event."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        await request(r, "a:1b")
        m = r.lc.models["a:1b"]
        gate = r.api.unload_gates["a:1b"] = asyncio.Event()
        first = r.start(r.lc.unload("a:1b", reason="first"), "unload-1")
        await wait_until(lambda: m.state is MState.UNLOADING)
        second = r.start(r.lc.unload("a:1b", reason="second"), "unload-2")
        await settle()
        assert not second.done()
        gate.set()
        assert (await first, await second) == ("unloaded", "unloaded")
        assert r.api.calls.count(("unload", "a:1b")) == 1
        assert r.events.of("unload") == [("a:1b", "first")]


async def test_an_unload_cut_short_by_the_childs_death_leaves_a_new_load_alone() -> None:
    """An unload under way when the child dies does not mark unloaded a model that a request
    has meanwhile started loading on the restarted child."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        await request(r, "a:1b")
        m = r.lc.models["a:1b"]
        unload_gate = r.api.unload_gates["a:1b"] = asyncio.Event()
        unload = r.start(r.lc.unload("a:1b", reason="llmctl"), "unload")
        await wait_until(lambda: m.state is MState.UNLOADING)
        r.lc.child_restarted(r.child, "crashed")
        load_gate = r.api.gates["a:1b"] = asyncio.Event()
        again = r.start(request(r, "a:1b"), "request")
        await wait_until(lambda: m.state is MState.LOADING)
        unload_gate.set()
        await unload
        assert m.state is MState.LOADING
        load_gate.set()
        assert await again is True
        assert m.state is MState.LOADED


async def test_relieve_evicts_idle_models_above_the_high_watermark() -> None:
    """Above the high watermark, relieve() evicts the longest-idle idle model down to the low
    watermark and keeps the busy one."""
    async with rig(make_config()) as r:
        for name, gib in (("a:1b", 2), ("b:1b", 2), ("c:1b", 4)):
            r.add(name, gib)
        await r.lc.load("a:1b", r.child, "test")
        r.clock.advance(500)
        await r.lc.load("b:1b", r.child, "test")
        holder = await hold(r, "c:1b", asyncio.Event())
        assert await r.lc.relieve() == []  # 8 of 16 GiB used
        r.probe.other = int(7.5 * GiB)  # 15.5 GiB used: above 15.2, 1.9 over 13.6
        assert await r.lc.relieve() == ["a:1b"]
        assert [r.lc.models[n].state for n in ("a:1b", "b:1b", "c:1b")] == [
            MState.UNLOADED,
            MState.LOADED,
            MState.LOADED,
        ]
        assert r.events.of("evict") == [
            (
                "a:1b",
                "GPU 0 at 97% of 16.0 GiB, above gpu.high_watermark 0.95 "
                "(other programs hold 7.5 GiB)",
            )
        ]
        assert await r.lc.relieve() == []
        holder.cancel()


async def test_reconcile_marks_a_model_unloaded_outside_llmd_unloaded() -> None:
    """A loaded model that the child's /api/ps no longer lists is marked unloaded."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        await r.lc.load("a:1b", r.child, "test")
        del r.api.loaded["a:1b"]
        await r.lc.reconcile()
        assert r.lc.models["a:1b"].state is MState.UNLOADED
        assert r.events.of("unload") == [
            ("a:1b", "no longer loaded in the backend (unloaded outside llmd)")
        ]


async def test_reconcile_adopts_a_model_loaded_outside_llmd() -> None:
    """A model the child lists but llmd did not load is recorded as loaded, with its keep-alive."""
    async with rig(make_config()) as r:
        r.api.loaded["x:1b"] = (3 * GiB, 3 * GiB)
        await r.lc.reconcile()
        m = r.lc.models["x:1b"]
        assert (m.state, m.size, m.size_vram) == (MState.LOADED, 3 * GiB, 3 * GiB)
        assert m.deadline == r.clock.now + KEEP_ALIVE_S
        assert r.events.of("load") == [("x:1b", "found loaded in backend")]


async def test_a_restarted_child_loses_its_loaded_models() -> None:
    """child_restarted marks the child's loaded models unloaded, without asking it to unload."""
    async with rig(make_config()) as r:
        for name in ("a:1b", "b:1b"):
            r.add(name, 2)
            await r.lc.load(name, r.child, "test")
        r.lc.child_restarted(r.child, "backend restarted")
        for name in ("a:1b", "b:1b"):
            m = r.lc.models[name]
            assert (m.state, m.deadline, m.size_vram) == (MState.UNLOADED, None, 0)
        assert [call for call, _ in r.api.calls] == ["load", "load"]


async def test_an_illegal_transition_raises() -> None:
    """Unloading a model that is not loaded is an illegal state change."""
    async with rig(make_config()) as r:
        m = Model("a:1b", "b0")
        with pytest.raises(IllegalTransition, match="model a:1b: illegal state change"):
            r.lc._set_state(m, MState.UNLOADING)
        assert m.state is MState.UNLOADED


@pytest.mark.parametrize(
    ("old", "new"),
    list(itertools.product(MState, MState)),
    ids=lambda s: s.value,
)
async def test_every_listed_transition_is_accepted_and_no_other(old: MState, new: MState) -> None:
    """_set_state accepts exactly the changes models.TRANSITIONS lists."""
    async with rig(make_config()) as r:
        m = Model("a:1b", "b0", state=old)
        if new in TRANSITIONS[old]:
            r.lc._set_state(m, new)
            assert m.state is new
        else:
            with pytest.raises(IllegalTransition) as e:
                r.lc._set_state(m, new)
            assert (e.value.old, e.value.new, m.state) == (old, new, old)


async def test_a_reload_that_replicates_a_model_keys_its_records_by_backend_and_back() -> None:
    single = make_config([{"name": "a:1b", "backend": "b0"}], backends=("b0", "b1"))
    replicated = make_config([{"name": "a:1b", "backends": ["b0", "b1"]}], backends=("b0", "b1"))
    async with rig(single) as r:
        r.add("a:1b", 1)
        r.add("a:1b", 1, backend="b1")
        await r.lc.load("a:1b", r.child, reason="test")
        assert list(r.lc.models) == ["a:1b"]
        r.lc.configure(replicated)
        m = r.lc.models["a:1b@b0"]
        assert list(r.lc.models) == ["a:1b@b0"] and m.key == "a:1b@b0" and m.replica
        assert m.state is MState.LOADED and r.lc.runner_of("a:1b", "b0") is m
        assert r.lc.runner_of("a:1b", "b1") is None  # no copy there yet
        b1 = r.backends.children["b1"]
        assert r.lc.add_replica("a:1b", b1, reason="test")
        await wait_until(lambda: r.lc.models["a:1b@b1"].state is MState.LOADED)
        assert [x.backend for x in r.lc.runners_of("a:1b")] == ["b0", "b1"]
        # Back to one backend: the copy on b0 is the model's record again; the one on b1 keeps
        # its key until it leaves.
        r.lc.configure(single)
        assert sorted(r.lc.models) == ["a:1b", "a:1b@b1"]
        assert r.lc.models["a:1b"] is m and m.key == "a:1b" and not m.replica
        assert await r.lc.unload("a:1b", reason="test") == "unloaded"
        assert r.lc.models["a:1b@b1"].state is MState.LOADED  # no longer one of its copies


async def test_the_timers_loop_stops_when_cancelled_as_its_wake_up_comes() -> None:
    """Cancelled (llmd stopping) in the same step as something wakes it, the timers loop
    ends; asyncio.wait_for on Python 3.11 lost that cancellation and the loop ran on."""
    async with rig(make_config()) as r:
        r.add("a:1b", 1)
        await r.lc.load("a:1b", r.child, reason="test")  # idle: its keep-alive timer is due
        task = r.start(r.lc.run_timers(), "timers")
        await settle()  # waiting for a timer change
        r.lc._timers_changed.set()
        task.cancel()
        await settle()
        assert task.cancelled()


async def test_the_timers_loop_wakes_only_for_a_timer_earlier_than_its_own() -> None:
    """Each request ends by setting its model's keep-alive timer anew, later than the one the
    timers loop sleeps for: the loop is not woken for it (it was, twice a request, and walked
    every model each time). A timer earlier than the loop's, here an unload asked for while a
    request runs, does wake it, and the model unloads as that request ends."""
    async with rig(make_config()) as r:
        r.add("a:1b", 4)
        await request(r, "a:1b")
        ticks = 0
        tick = r.lc.tick

        async def counted() -> float | None:
            nonlocal ticks
            ticks += 1
            return await tick()

        r.lc.tick = counted  # type: ignore[method-assign]
        r.start(r.lc.run_timers(), "timers")
        await settle()
        assert ticks == 1
        for _ in range(50):
            r.clock.advance(1)
            await request(r, "a:1b")
            await settle()
        assert ticks == 1
        m = r.lc.models["a:1b"]
        assert m.deadline == r.clock.now + KEEP_ALIVE_S

        gate = asyncio.Event()
        holder = await hold(r, "a:1b", gate)
        assert await r.lc.unload("a:1b", "llmctl unload") == (
            "will unload when its in-flight requests finish"
        )
        gate.set()
        await holder
        await wait_until(lambda: m.state is MState.UNLOADED)
        assert ticks == 2
        assert r.events.of("unload") == [("a:1b", "unload requested")]
