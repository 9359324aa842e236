"""Live lifecycle events for whoever follows them (`llmctl events --follow`).

Each follower has a bounded queue of its own: one that reads too slowly loses its oldest events
and is told how many (a `gap` entry), and never slows llmd down. Closing the feed (llmd is
stopping) ends every follower's stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

# Events a follower may fall behind by before the oldest are dropped.
FOLLOWER_BACKLOG = 1000

Event = dict[str, Any]


@dataclass(eq=False)
class Follower:
    """One follower's queue: events, then None once the feed has closed."""

    wanted: Filter
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=FOLLOWER_BACKLOG))
    dropped: int = 0
    closed: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    def put(self, event: Event) -> None:
        if len(self.events) == self.events.maxlen:
            self.dropped += 1
        self.events.append(event)
        self.ready.set()

    async def next(self, timeout: float | None) -> Event | None:
        """The next event (a `gap` entry first if some were dropped); None when the feed has
        closed; raises TimeoutError after `timeout` seconds without one."""
        while not self.events and not self.closed:
            self.ready.clear()
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        if self.dropped:
            n, self.dropped = self.dropped, 0
            return {"kind": "gap", "dropped": n}
        if self.events:
            return self.events.popleft()
        return None


@dataclass(frozen=True)
class Filter:
    """Which events a follower wants: one model's (None: all), of these kinds (empty: all)."""

    model: str | None = None
    kinds: frozenset[str] = frozenset()

    def __call__(self, event: Event) -> bool:
        if self.model is not None and event.get("model") != self.model:
            return False
        return not self.kinds or event.get("kind") in self.kinds


class Feed:
    """Publishes each event to every follower that wants it."""

    def __init__(self) -> None:
        self._followers: set[Follower] = set()
        self.closed = False

    def publish(self, event: Event) -> None:
        for f in self._followers:
            if f.wanted(event):
                f.put(event)

    @contextlib.contextmanager
    def follow(self, wanted: Filter) -> Iterator[Follower]:
        """A follower for the duration of the block."""
        f = Follower(wanted, closed=self.closed)
        self._followers.add(f)
        try:
            yield f
        finally:
            self._followers.discard(f)

    def close(self) -> None:
        """End every follower's stream (llmd is stopping)."""
        self.closed = True
        for f in self._followers:
            f.closed = True
            f.ready.set()

    @property
    def followers(self) -> int:
        return len(self._followers)


async def aiter_events(f: Follower, heartbeat_s: float) -> AsyncIterator[Event | None]:
    """A follower's events as they come, None every heartbeat_s without one (so that a stream
    to a client that went away notices); ends when the feed closes."""
    while True:
        try:
            event = await f.next(heartbeat_s)
        except TimeoutError:
            yield None
            continue
        if event is None:
            return
        yield event
