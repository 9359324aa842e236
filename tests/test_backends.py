"""Placement answers of Backends that need no child process: why a model was not found."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from llmdproc import free_port

from llmd import config
from llmd.backends import Backends
from llmd.childapi import Pulled
from llmd.process import State


def never_started(coro: Any, name: str) -> Any:
    coro.close()
    raise AssertionError(f"{name} must not start in these tests")


def run_now(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """The daemon's TaskGroup seam, for a scan of the children's models."""
    return asyncio.get_running_loop().create_task(coro, name=name)


# b0 and b1: their states, which of them have listed models (with what), then the answer.
CASES = [
    pytest.param(
        ("running", "running"),
        {"b0": [], "b1": []},
        None,
        "model 'm:1b' not found",
        id="all-listed",
    ),
    pytest.param(
        ("running", "starting"),
        {"b0": []},
        "b1",
        "model 'm:1b' is not on any backend listed so far; backend 'b1' may have it but its "
        "models are not known yet (starting)",
        id="one-still-starting",
    ),
    pytest.param(
        ("stopped", "stopped"),
        {},
        "b0",
        "model 'm:1b' is not on any backend listed so far; backend 'b0' may have it but its "
        "models are not known yet (stopped)",
        id="before-start",
    ),
    pytest.param(
        ("running", "running"),
        {"b1": []},
        "b0",
        "model 'm:1b' is not on any backend listed so far; backend 'b0' may have it but its "
        "models are not known yet (its /api/tags failed)",
        id="tags-failed",
    ),
    pytest.param(
        ("running", "fatal"),
        {"b0": []},
        None,
        "model 'm:1b' not found (backend 'b1' is fatal, so its models are unknown)",
        id="fatal-unlisted",
    ),
    pytest.param(
        ("running", "backoff"),
        {"b0": [], "b1": [{"name": "other:1b"}]},
        None,
        "model 'm:1b' not found",
        id="crashed-but-listed-before",
    ),
]


@pytest.mark.parametrize(("states", "listed", "child", "message"), CASES)
async def test_missing_says_whether_to_retry(
    states: tuple[str, str],
    listed: dict[str, list[dict[str, Any]]],
    child: str | None,
    message: str,
) -> None:
    cfg = config.from_dict(
        {"backend": [{"name": "b0", "port": 20001}, {"name": "b1", "port": 20002}]}
    )
    async with aiohttp.ClientSession() as session:
        backends = Backends(cfg, session=session, start_task=never_started)
        for name, state in zip(("b0", "b1"), states, strict=True):
            backends.children[name].state = State(state)
        for name, models in listed.items():
            backends.set_tags(name, [Pulled.from_json(m) for m in models])
        found, why = backends.missing("m:1b")
    assert (found.name if found else None, why) == (child, message)


async def test_a_failing_model_list_is_logged_once_per_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A child whose /api/tags fails is warned about once, not on every scan, and the recovery
    is logged; meanwhile its models stay unknown (so missing() says to retry)."""
    failing = True

    async def tags(request: web.Request) -> web.Response:
        if failing:
            return web.Response(status=500, text="boom")
        return web.json_response({"models": [{"name": "m:1b"}]})

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cfg = config.from_dict({"backend": [{"name": "b0", "port": port}]})
    try:
        async with aiohttp.ClientSession() as session:
            backends = Backends(cfg, session=session, start_task=run_now)
            backends.children["b0"].state = State.RUNNING
            with caplog.at_level(logging.INFO, logger="llmd.backends"):
                for _ in range(3):
                    await backends.refresh_tags()
                assert backends.missing("m:1b")[0] is backends.children["b0"]
                failing = False
                await backends.refresh_tags()
                assert await backends.locate("m:1b") is backends.children["b0"]
    finally:
        await runner.cleanup()
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2, logged
    assert logged[0].startswith("backend b0: could not list its models: 500")
    assert logged[1] == "backend b0: its models can be listed again"


@pytest.mark.parametrize(
    ("new_backends", "leaving"),
    [
        pytest.param([{"name": "b0", "port": 20001}, {"name": "b1", "port": 20002}], [], id="same"),
        pytest.param([{"name": "b0", "port": 20001}], ["b1"], id="removed"),
        pytest.param(
            [{"name": "b0", "port": 20001}, {"name": "b1", "port": 20003}], ["b1"], id="changed"
        ),
        pytest.param(
            [{"name": "b0", "port": 20001, "probe_timeout": "5s"}, {"name": "b2", "port": 20004}],
            ["b1", "b0"],
            id="removed-and-changed",
        ),
    ],
)
async def test_leaving_names_the_children_a_reload_stops(
    new_backends: list[dict[str, Any]], leaving: list[str]
) -> None:
    """A reload drains exactly the children it will stop: removed, then changed backends."""
    old = config.from_dict(
        {"backend": [{"name": "b0", "port": 20001}, {"name": "b1", "port": 20002}]}
    )
    async with aiohttp.ClientSession() as session:
        backends = Backends(old, session=session, start_task=never_started)
        found = backends.leaving(config.from_dict({"backend": new_backends}))
    assert [c.name for c in found] == leaving


def two_backends() -> config.Config:
    return config.from_dict(
        {"backend": [{"name": "b0", "port": 20001}, {"name": "b1", "port": 20002}]}
    )


@pytest.mark.parametrize(
    ("state", "coming_up"),
    [
        ("stopped", True),  # not started yet
        ("starting", True),
        ("backoff", True),
        ("draining", True),  # ahead of a restart
        ("stopping", True),
        ("running", False),
        ("unresponsive", False),  # hung: not waited for
        ("fatal", False),
    ],
)
async def test_coming_up_is_a_state_a_request_may_wait_through(state: str, coming_up: bool) -> None:
    """A child not running is waited for while it is on its way (back) to RUNNING."""
    async with aiohttp.ClientSession() as session:
        child = Backends(two_backends(), session=session, start_task=never_started).children["b0"]
        child.state = State(state)
        assert child.coming_up is coming_up
        await child.stop()  # stopped for good: never waited for
        assert not child.coming_up


async def test_wait_running_wakes_at_the_change_not_at_the_deadline() -> None:
    """A waiter for a starting child returns as soon as the child runs, and is not counted
    after; one whose child does not come up returns False at its deadline."""
    async with aiohttp.ClientSession() as session:
        backends = Backends(two_backends(), session=session, start_task=never_started)
        b0, b1 = backends.children["b0"], backends.children["b1"]
        backends.set_tags("b0", [])  # listed: running it starts no model list
        b0._change_state(State.STARTING)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiter = asyncio.create_task(backends.wait_running(b0, time.monotonic() + 30))
        await asyncio.sleep(0.05)
        assert backends.waiting == 1 and not waiter.done()
        b0._change_state(State.RUNNING)
        assert await waiter is True
        assert loop.time() - t0 < 1 and backends.waiting == 0
        assert await backends.wait_running(b1, time.monotonic() + 0.1) is False
        assert backends.waiting == 0


async def test_a_cancelled_or_ended_wait_leaves_nothing() -> None:
    """A waiter cancelled (its client left) is no longer counted; stop_waiting ends every wait
    at once with False."""
    async with aiohttp.ClientSession() as session:
        backends = Backends(two_backends(), session=session, start_task=never_started)
        b0 = backends.children["b0"]
        waiters = [
            asyncio.create_task(backends.wait_any_running(time.monotonic() + 30)) for _ in range(3)
        ]
        await asyncio.sleep(0.05)
        assert backends.waiting == 3
        waiters[0].cancel()
        await asyncio.gather(waiters[0], return_exceptions=True)
        assert backends.waiting == 2
        backends.stop_waiting()
        assert await asyncio.gather(*waiters[1:]) == [False, False]
        assert backends.waiting == 0
        assert await backends.wait_running(b0, time.monotonic() + 30) is False


async def test_a_waiter_cancelled_as_the_children_change_still_leaves() -> None:
    """A client going away in the same step as a child's state change is not lost: the wait
    ends cancelled, not waiting on to its deadline (asyncio.wait_for on Python 3.11 would
    swallow the cancellation)."""
    async with aiohttp.ClientSession() as session:
        backends = Backends(two_backends(), session=session, start_task=never_started)
        b0 = backends.children["b0"]
        b0._change_state(State.STARTING)
        waiter = asyncio.create_task(backends.wait_running(b0, time.monotonic() + 30))
        await asyncio.sleep(0.05)
        b0._change_state(State.BACKOFF)  # wakes the waiter; it is still coming up
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(waiter, 2)
        assert backends.waiting == 0


class ListingAPI:
    """A child API whose /api/tags lists one model."""

    async def tags(self) -> list[Pulled]:
        return [Pulled.from_json({"name": "m:1b"})]


async def test_a_child_that_comes_up_unlisted_has_its_models_listed() -> None:
    """When a child whose models are not known starts running, they are listed at once, without
    waiting for a request to ask."""
    async with aiohttp.ClientSession() as session:
        backends = Backends(two_backends(), session=session, start_task=run_now)
        b0 = backends.children["b0"]
        b0.api = ListingAPI()  # type: ignore[assignment]
        assert not backends.listed("b0")
        b0._change_state(State.STARTING)
        b0._change_state(State.RUNNING)
        await backends.wait_for(lambda: backends.listed("b0"), time.monotonic() + 5)
        assert [t.name for t in backends.tags("b0")] == ["m:1b"]
        assert backends._from_tags("m:1b") is b0
