"""The scheduler's queues over the real lifecycle and memory, in-process: fake children and probe
(one 16 GiB GPU) and a fake clock for ranks and aging (see fakes.rig)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fakes import Rig, make_config, rig

from llmd.config import Config, from_dict, to_dict
from llmd.scheduler import Rejected, Scheduler


async def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.001)


def config(
    models: list[dict[str, Any]],
    parallel: int = 1,
    admission: str = "30s",
    backends: tuple[str, ...] = ("b0",),
    **scheduler: Any,
) -> Config:
    """The rig's config (see fakes.make_config) with num_parallel and [scheduler] keys."""
    base = to_dict(make_config(models, backends=backends, gpu={"admission_timeout": admission}))
    for b in base["backend"]:
        b["num_parallel"] = parallel
    base["scheduler"] = scheduler
    return from_dict(base)


class Traffic:
    """Requests through the scheduler and the lifecycle, each held until released."""

    def __init__(self, r: Rig, s: Scheduler) -> None:
        self.r, self.s = r, s
        self.started: list[str] = []  # request ids in the order they reached the model
        self.gates: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.on: dict[str, str] = {}  # request id -> the backend it ran on

    def send(self, model: str, rid: str) -> asyncio.Task[None]:
        """A request that arrives 1 ms (fake clock) after the one before; a model with several
        backends may run on any of them."""
        self.r.clock.advance(0.001)
        gate = self.gates[rid] = asyncio.Event()
        mc = self.r.cfg.model(model)
        children = [self.r.backends.children[b] for b in mc.backends] if mc else []
        children = children if mc and mc.replicated else [self.r.child]

        async def request() -> None:
            async with self.s.turn(model, children) as child, self.r.lc.lease(model, child):
                self.on[rid] = child.name
                self.started.append(rid)
                await gate.wait()

        task = self.tasks[rid] = self.r.start(request(), rid)
        return task

    async def finish(self, rid: str) -> None:
        self.gates[rid].set()
        await self.tasks[rid]


@asynccontextmanager
async def sched(models: list[dict[str, Any]], **kw: Any) -> AsyncIterator[tuple[Rig, Traffic]]:
    async with rig(config(models, **kw)) as r:
        s = Scheduler(r.cfg, r.lc, clock=r.clock)
        r.start(s.run(), "scheduler")
        yield r, Traffic(r, s)


async def test_at_most_num_parallel_run_and_the_rest_start_in_arrival_order() -> None:
    async with sched([], parallel=2) as (r, t):
        r.add("a:1b", 2)
        for i in range(5):
            t.send("a:1b", f"a{i}")
            await asyncio.sleep(0)
        await wait_until(lambda: len(t.started) == 2)
        await asyncio.sleep(0.05)
        assert sorted(t.started) == ["a0", "a1"]  # they shared one load
        q = t.s.of("a:1b")
        assert q is not None and (q.running, q.waiting) == (2, 3)
        await t.finish("a1")
        await wait_until(lambda: len(t.started) == 3)
        await t.finish("a0")
        await wait_until(lambda: len(t.started) == 4)
        assert t.started[2:] == ["a2", "a3"]
        # The queued requests counted as keeping the model busy while they waited.
        m = r.lc.models["a:1b"]
        assert m.queued == 1 and m.busy


async def test_a_full_queue_answers_429_with_a_retry_after_from_the_service_time() -> None:
    async with sched([{"name": "a:1b", "max_queue": 2}]) as (r, t):
        r.add("a:1b", 2)
        t.send("a:1b", "first")
        await wait_until(lambda: t.started == ["first"])
        r.clock.advance(4.0)  # the first request holds its slot 4 s (fake clock)
        await t.finish("first")
        t.send("a:1b", "a0")
        await wait_until(lambda: len(t.started) == 2)
        t.send("a:1b", "w1")
        t.send("a:1b", "w2")
        await wait_until(lambda: t.s.of("a:1b").waiting == 2)  # type: ignore[union-attr]
        with pytest.raises(Rejected) as e:
            async with t.s.turn("a:1b", [r.child]):
                pass
        assert e.value.status == 429 and e.value.reason == "queue_full"
        assert "max_queue = 2" in e.value.message and "a:1b" in e.value.message
        # Three requests ahead (two waiting, this one) at 4 s each, one at a time.
        assert e.value.retry_after_s == 12
        assert t.s.of("a:1b").rejected == {"queue_full": 1}  # type: ignore[union-attr]


async def test_a_request_waiting_past_queue_timeout_gets_503_and_leaves_the_queue() -> None:
    async with sched([{"name": "a:1b", "queue_timeout": "0.2s"}]) as (r, t):
        r.add("a:1b", 2)
        t.send("a:1b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        with pytest.raises(Rejected) as e:
            async with t.s.turn("a:1b", [r.child]):
                pass
        assert e.value.status == 503 and e.value.reason == "queue_timeout"
        assert "queue_timeout" in e.value.message and e.value.retry_after_s >= 1
        q = t.s.of("a:1b")
        assert q is not None and q.waiting == 0 and q.running == 1


async def test_a_cancelled_waiter_leaves_at_once_and_the_next_one_starts() -> None:
    async with sched([]) as (r, t):
        r.add("a:1b", 2)
        t.send("a:1b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        gone = t.send("a:1b", "gone")
        t.send("a:1b", "a2")
        await wait_until(lambda: t.s.of("a:1b").waiting == 2)  # type: ignore[union-attr]
        gone.cancel()
        await wait_until(lambda: t.s.of("a:1b").waiting == 1)  # type: ignore[union-attr]
        await t.finish("a0")
        await wait_until(lambda: len(t.started) == 2)
        assert t.started == ["a0", "a2"]
        assert r.lc.models["a:1b"].queued == 0


SWAP = [{"name": "a:10b"}, {"name": "b:10b"}]  # 10 GiB each: not both in 16 GiB


async def test_models_that_cannot_share_the_gpu_take_turns_in_batches() -> None:
    """Equal priorities go in arrival order, but a model just loaded serves its batch first:
    A serves a0 and a1 (its batch of two), then B's older request goes before a2."""
    async with sched(SWAP, swap_batch=2) as (r, t):
        r.add("a:10b", 10)
        r.add("b:10b", 10)
        t.send("a:10b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        t.send("b:10b", "b0")
        await wait_until(lambda: r.lc.models.get("b:10b") is not None)
        await wait_until(lambda: r.lc.models["b:10b"].blocked_by == ("a:10b",))
        for i in range(1, 5):
            t.send("a:10b", f"a{i}")
        await asyncio.sleep(0.01)
        for rid in ("a0", "a1"):
            await wait_until(lambda rid=rid: rid in t.started)  # type: ignore[misc]
            await t.finish(rid)
        # A made way after its batch of two; B was loaded in its place.
        await wait_until(lambda: "b0" in t.started)
        assert t.started == ["a0", "a1", "b0"]
        assert ("unload", "a:10b") in r.api.calls
        qa = t.s.of("a:10b")
        assert qa is not None and qa.swaps == 1
        # A's next request now waits for B's memory in turn.
        await wait_until(lambda: r.lc.models["a:10b"].blocked_by == ("b:10b",))
        await t.finish("b0")
        await wait_until(lambda: "a2" in t.started)
        assert r.api.calls.count(("load", "a:10b")) == 2
        assert r.api.calls.count(("load", "b:10b")) == 1


async def test_a_more_important_waiting_model_goes_first_once_the_holder_had_its_batch() -> None:
    """A model that has just paid for a load may start swap_batch requests in all; after that
    a more important waiting model gets the memory as soon as what is in flight ends."""
    models = [{"name": "a:10b", "priority": 5}, {"name": "b:10b", "priority": 1}]
    async with sched(models, swap_batch=2) as (r, t):
        r.add("a:10b", 10)
        r.add("b:10b", 10)
        t.send("a:10b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        for rid in ("a1", "a2", "a3"):
            t.send("a:10b", rid)
        await asyncio.sleep(0.01)
        t.send("b:10b", "b0")
        await wait_until(lambda: r.lc.models.get("b:10b") is not None)
        await wait_until(lambda: r.lc.models["b:10b"].blocked_by == ("a:10b",))
        assert not t.s.of("a:10b").yielding  # type: ignore[union-attr]  # its first of two
        await t.finish("a0")
        await wait_until(lambda: "a1" in t.started)
        await wait_until(lambda: t.s.of("a:10b").yielding)  # type: ignore[union-attr]
        await t.finish("a1")
        await wait_until(lambda: "b0" in t.started)
        assert t.started == ["a0", "a1", "b0"]


async def test_aging_lets_a_waiting_unimportant_model_outrank_fresh_important_requests() -> None:
    models = [{"name": "a:10b", "priority": 1}, {"name": "b:10b", "priority": 5}]
    # The fake clock jumps 2 minutes: admission must not give up on b0 meanwhile.
    async with sched(models, swap_batch=2, aging="30s", admission="10m") as (r, t):
        r.add("a:10b", 10)
        r.add("b:10b", 10)
        t.send("a:10b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        await t.finish("a0")
        t.send("a:10b", "a1")  # A has had its batch of two since its load
        await wait_until(lambda: "a1" in t.started)
        t.send("b:10b", "b0")
        await wait_until(lambda: r.lc.models.get("b:10b") is not None)
        await wait_until(lambda: r.lc.models["b:10b"].blocked_by == ("a:10b",))
        t.send("a:10b", "a2")  # fresh and more important: goes first
        await asyncio.sleep(0.05)
        await t.finish("a1")
        await wait_until(lambda: "a2" in t.started)
        assert not t.s.of("a:10b").yielding  # type: ignore[union-attr]
        # Four priority levels apart: after 4 x 30 s of waiting, b0 outranks a fresh a3
        # (A has started one request since b0 began waiting: not yet its batch of two).
        r.clock.advance(121.0)
        t.send("a:10b", "a3")
        await wait_until(lambda: t.s.of("a:10b").yielding)  # type: ignore[union-attr]
        await t.finish("a2")
        await wait_until(lambda: "b0" in t.started)
        assert t.started == ["a0", "a1", "a2", "b0"]


async def test_the_schedulers_word_reaches_a_model_that_has_unloaded() -> None:
    """A queue that empties while its model is unloaded clears the model's record, so the
    model is not kept busy (nor making way) by a stale count when it loads again."""
    async with rig(config([])) as r:
        r.add("a:1b", 2)
        await r.lc.load("a:1b", r.child, "test")
        r.lc.note_queue("a:1b", r.child.name, 2, 0, True)
        await r.lc.unload("a:1b", "test")
        r.lc.note_queue("a:1b", r.child.name, 0, 0, False)
        m = r.lc.models["a:1b"]
        assert (m.queued, m.yielding, m.busy) == (0, False, False)


REPLICATED = [{"name": "a:1b", "backends": ["b0", "b1"]}]


async def test_a_backlog_longer_than_a_load_loads_another_copy_which_takes_the_next() -> None:
    async with sched(REPLICATED, backends=("b0", "b1")) as (r, t):
        r.add("a:1b", 2)  # loads in 2 s, as the store measured
        r.add("a:1b", 2, backend="b1")
        t.send("a:1b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        assert t.on == {"a0": "b0"} and r.apis["b1"].calls == []  # the first copy only
        # No service time measured yet (5 s assumed): one waiting behind one running is about
        # 10 s on one copy, longer than the 2 s load.
        t.send("a:1b", "a1")
        await wait_until(lambda: t.started == ["a0", "a1"])
        assert t.on["a1"] == "b1" and r.apis["b1"].calls == [("load", "a:1b")]
        assert sorted(r.lc.models) == ["a:1b@b0", "a:1b@b1"]
        q = t.s.of("a:1b")
        assert q is not None and (q.running, q.limit) == (2, 2)
        assert [(c.backend, c.running) for c in q.replicas] == [("b0", 1), ("b1", 1)]
        await t.finish("a0")
        await t.finish("a1")


async def test_a_backlog_shorter_than_a_load_waits_for_the_loaded_copy() -> None:
    async with sched(REPLICATED, backends=("b0", "b1")) as (r, t):
        r.add("a:1b", 2)
        r.add("a:1b", 2, backend="b1")
        t.send("a:1b", "a0")
        await wait_until(lambda: t.started == ["a0"])
        r.clock.advance(0.5)  # a request holds its copy 0.5 s
        await t.finish("a0")
        t.send("a:1b", "a1")
        await wait_until(lambda: t.started == ["a0", "a1"])
        # Two waiting behind one running: 1.5 s on one copy, less than the 2 s load.
        t.send("a:1b", "a2")
        t.send("a:1b", "a3")
        await wait_until(lambda: t.s.of("a:1b").waiting == 2)  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        assert r.apis["b1"].calls == [] and "a:1b@b1" not in r.lc.models
        await t.finish("a1")
        await wait_until(lambda: len(t.started) == 3)
        assert t.on["a2"] == "b0"
        # A third waiting would make it 2 s: still not more than the load.
        t.send("a:1b", "a4")
        t.send("a:1b", "a5")
        await asyncio.sleep(0.05)
        assert r.apis["b1"].calls == []
        # One more: 2.5 s, and the second copy loads.
        t.send("a:1b", "a6")
        await wait_until(lambda: r.apis["b1"].calls == [("load", "a:1b")])
