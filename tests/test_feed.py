"""The live event feed: filters, a slow follower's gap, closing."""

from __future__ import annotations

import asyncio

import pytest

from llmd import feed
from llmd.feed import Feed, Filter


@pytest.mark.parametrize(
    ("wanted", "event", "shown"),
    [
        (Filter(), {"kind": "load", "model": "a"}, True),
        (Filter(model="a"), {"kind": "load", "model": "a"}, True),
        (Filter(model="a"), {"kind": "load", "model": "b"}, False),
        (Filter(model="a"), {"kind": "reload", "model": None}, False),
        (Filter(kinds=frozenset({"load", "evict"})), {"kind": "evict", "model": "a"}, True),
        (Filter(kinds=frozenset({"load"})), {"kind": "unload", "model": "a"}, False),
        (Filter("a", frozenset({"load"})), {"kind": "load", "model": "b"}, False),
    ],
)
def test_filter(wanted: Filter, event: dict[str, object], shown: bool) -> None:
    assert wanted(event) is shown


async def test_a_follower_gets_what_it_wants_in_order_and_the_end() -> None:
    f = Feed()
    with f.follow(Filter(model="a")) as a:
        f.publish({"kind": "load", "model": "a"})
        f.publish({"kind": "load", "model": "b"})
        f.publish({"kind": "unload", "model": "a"})
        assert await a.next(1) == {"kind": "load", "model": "a"}
        assert await a.next(1) == {"kind": "unload", "model": "a"}
        with pytest.raises(TimeoutError):
            await a.next(0.01)
        waiting = asyncio.create_task(a.next(None))
        await asyncio.sleep(0)
        f.close()
        assert await waiting is None
    assert f.followers == 0


async def test_a_follower_that_falls_behind_is_told_how_many_it_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed, "FOLLOWER_BACKLOG", 3)
    f = Feed()
    with f.follow(Filter()) as slow:
        for i in range(5):
            f.publish({"kind": "load", "n": i})
        got = [await slow.next(1) for _ in range(4)]
    assert got == [
        {"kind": "gap", "dropped": 2},
        {"kind": "load", "n": 2},
        {"kind": "load", "n": 3},
        {"kind": "load", "n": 4},
    ]
