"""llmd's request queues: one per model, in front of the lifecycle.

At most `num_parallel` requests of a model run at its child at once (1 for an embedding model);
the rest wait here, oldest first, up to `max_queue` (then 429) and for at most `queue_timeout`
(then 503), both with a Retry-After estimated from how fast the model has been serving.

A request's rank is its model's priority less one level for every `aging` it has waited (lower
is more important), so an old request of an unimportant model outranks fresh requests of an
important one in the end. Ranks decide between models that cannot share the GPU: when a model's
load waits for memory held by busy models (the lifecycle reports them as `blocked_by`), each of
those keeps starting requests while its next one outranks the waiting model's oldest, and makes
way (starts nothing more; its memory goes to the waiting model once its in-flight requests end)
as soon as it does not. A model that has just been loaded first serves `swap_batch` requests
(if it has them), so that models alternate in batches rather than swapping per request.

The bound this gives: a model waiting for the memory of busy model X gets it at the latest
after max((its priority - X's priority) x aging, X's batch of swap_batch since its load), plus
X's num_parallel requests in flight, X's unload and its own load (behind several models, after
each of them in turn). Its k-th waiting request then also waits for the k-1 ahead of it, and
for at most ceil(k / swap_batch) - 1 more turns of X, each at most X's batch plus two swaps,
since by then its requests outrank X's. Equal priorities take turns in arrival order, in batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from llmd.config import Config
from llmd.lifecycle import Lifecycle
from llmd.metrics import Histogram
from llmd.models import DEFAULT_PRIORITY, MState
from llmd.process import Child

log = logging.getLogger("llmd.scheduler")

# Before a model has finished a request: what one is assumed to take, for Retry-After.
GUESS_SERVICE_S = 5.0
# Weight of the newest request in the moving average of service times.
SERVICE_EWMA = 0.2
# While anything waits, ranks change with age: look again this often even if nothing happens.
TICK_S = 0.5
# Requests a model started before making way (histogram buckets).
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


class Rejected(Exception):
    """A request the queue turned away: 429 (queue full) or 503 (waited too long)."""

    def __init__(self, status: int, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason  # queue_full | queue_timeout
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(eq=False)
class _Waiter:
    arrived: float
    granted: asyncio.Future[None]


@dataclass
class Queue:
    """One model's queue and what has been measured of it."""

    name: str
    child: Child | None = None
    waiting: deque[_Waiter] = field(default_factory=deque)
    running: int = 0
    # Granted a slot but not yet resumed: still protect the model from eviction.
    granted: int = 0
    # Arrival times of requests holding a slot, oldest first (for the rank of a waiting load).
    holders: list[float] = field(default_factory=list)
    service_s: float | None = None  # moving average of how long a request holds its slot
    # Models waiting for this one's memory, and since when.
    owed: dict[str, float] = field(default_factory=dict)
    yielding: bool = False
    batch: int = 0  # requests started since it last made way
    turn: int = 0  # requests started since it last got its memory (a cold start)
    last_done: float = 0.0  # when its last request ended
    # Counters for /metrics and status.
    started: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    swaps: int = 0  # times it made way for another model with work waiting

    def oldest(self) -> float | None:
        """Arrival of its oldest request that has not been served yet."""
        times = [self.waiting[0].arrived] if self.waiting else []
        return min(times + self.holders[:1], default=None)


@dataclass(frozen=True)
class QueueStats:
    """One model's queue, as status and /metrics show it."""

    name: str
    waiting: int
    running: int
    limit: int
    yielding: bool
    started: int
    rejected: dict[str, int]
    swaps: int
    service_s: float | None
    oldest_wait_s: float


class Scheduler:
    """The queues of every model; `turn()` is one request's place in its model's queue."""

    def __init__(
        self, cfg: Config, lifecycle: Lifecycle, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cfg = cfg
        self.lifecycle = lifecycle
        self._clock = clock
        self.queues: dict[str, Queue] = {}
        self.waits = Histogram()  # seconds from arrival to start, per model
        self.batches = Histogram(BATCH_BUCKETS)  # requests started per turn, per model
        self._wake = asyncio.Event()
        lifecycle.watch(self._wake.set)

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config (limits, priorities)."""
        self.cfg = cfg
        self._wake.set()

    # -- one request ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def turn(self, name: str, child: Child) -> AsyncIterator[None]:
        """Wait for the request's turn at the model, then hold one of its slots; raises
        Rejected when the queue is full or the wait is over."""
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = Queue(name)
        q.child = child
        arrived = self._clock()
        if not q.waiting and self._may_start(q, arrived, arrived):
            self._start(q, arrived, arrived)
        else:
            await self._wait(q, arrived)
        t0 = self._clock()
        try:
            yield
        finally:
            self._finish(q, arrived, self._clock() - t0)

    async def _wait(self, q: Queue, arrived: float) -> None:
        limit = self.max_queue(q.name)
        if len(q.waiting) >= limit:
            q.rejected["queue_full"] += 1
            retry = self._retry_after(q, len(q.waiting) + 1)
            raise Rejected(
                429,
                "queue_full",
                f"llmd: {len(q.waiting)} requests for {q.name} are already waiting, its limit "
                f"(max_queue = {limit}); try again in about {retry}s",
                retry,
            )
        w = _Waiter(arrived, asyncio.get_running_loop().create_future())
        q.waiting.append(w)
        self._note(q)
        self._wake.set()
        timeout = self._queue_timeout(q.name)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(w.granted)
        except TimeoutError:
            if not _granted(w):
                self._leave(q, w)
                q.rejected["queue_timeout"] += 1
                retry = self._retry_after(q, len(q.waiting) + 1)
                raise Rejected(
                    503,
                    "queue_timeout",
                    f"llmd: the request for {q.name} waited {timeout:g}s in its queue, its "
                    f"limit (queue_timeout), behind {q.running} running and {len(q.waiting)} "
                    f"waiting; try again in about {retry}s",
                    retry,
                ) from None
        except BaseException:  # the client went away, or llmd is stopping
            if _granted(w):  # as the wait ended: give the slot back
                q.granted -= 1
                self._finish(q, arrived, None)
            else:
                self._leave(q, w)
            raise
        q.granted -= 1
        self._note(q)

    def _leave(self, q: Queue, w: _Waiter) -> None:
        w.granted.cancel()
        with contextlib.suppress(ValueError):
            q.waiting.remove(w)
        self._note(q)
        self._wake.set()

    def _start(self, q: Queue, arrived: float, now: float) -> None:
        m = self.lifecycle.runner_of(q.name)
        if m is None or not m.resident:
            q.turn = 0  # this request starts its load: a new turn
        q.turn += 1
        q.running += 1
        q.started += 1
        q.batch += 1
        q.holders.append(arrived)
        self.waits.observe((q.name,), max(0.0, now - arrived))

    def _finish(self, q: Queue, arrived: float, held_s: float | None) -> None:
        q.running -= 1
        q.last_done = self._clock()
        with contextlib.suppress(ValueError):
            q.holders.remove(arrived)
        if held_s is not None:
            q.service_s = (
                held_s
                if q.service_s is None
                else (1 - SERVICE_EWMA) * q.service_s + SERVICE_EWMA * held_s
            )
        self._hand_over(q, self._clock())  # at once: the child must not wait for a pass
        self._note(q)  # (also marks the model as scheduled once its record exists)
        self._wake.set()

    def _hand_over(self, q: Queue, now: float) -> None:
        """Start the waiting requests of this queue that may start now, oldest first."""
        while q.waiting and self._may_start(q, now, q.waiting[0].arrived):
            w = q.waiting.popleft()
            if w.granted.done():  # cancelled as it was about to start
                continue
            q.granted += 1
            self._start(q, w.arrived, now)
            w.granted.set_result(None)

    # -- decisions --------------------------------------------------------------------------------

    def _may_start(self, q: Queue, now: float, arrived: float) -> bool:
        """Whether a request of this queue (arrived then) may start now."""
        return q.running < self._limit(q) and self._yield_reason(q, now, arrived) is None

    def _yield_reason(self, q: Queue, now: float, arrived: float | None) -> str | None:
        """Why this model must make way for a model waiting for its memory, if it must.

        With a request to start (that arrived then): the waiting model's oldest request
        outranks it, and this model has had its batch since its load (a model that has just
        paid for a swap serves swap_batch first). With none (arrived None): an idle model's
        claim on its memory is its priority plus one level per aging it has been idle."""
        if not q.owed:
            return None
        if arrived is not None or q.running:
            if q.turn < self.cfg.scheduler.swap_batch:
                return None
            when = now if arrived is None else arrived
            mine = (self._rank(q.name, when, now), when)
        else:
            idle_s = max(0.0, now - q.last_done)
            mine = (self._priority(q.name) + idle_s / self.cfg.scheduler.aging, now)
        for other, since in q.owed.items():
            if self._waiting_rank(other, since, now) < mine:
                return f"{other} waits for its memory and outranks it"
        return None

    def _rank(self, name: str, arrived: float, now: float) -> float:
        return self._priority(name) - max(0.0, now - arrived) / self.cfg.scheduler.aging

    def _waiting_rank(self, name: str, since: float, now: float) -> tuple[float, float]:
        """The rank of a model whose load waits for memory: its oldest request's (and, between
        equal ranks, the older goes first)."""
        q = self.queues.get(name)
        oldest = q.oldest() if q is not None else None
        first = since if oldest is None else min(oldest, since)
        return self._rank(name, first, now), first

    def _priority(self, name: str) -> int:
        mc = self.cfg.model(name)
        return mc.priority if mc is not None else DEFAULT_PRIORITY

    def _limit(self, q: Queue) -> int:
        """Requests the model may run at once: its backend's num_parallel, 1 if it embeds."""
        m = self.lifecycle.runner_of(q.name)
        if m is not None and m.embedding:
            return 1
        return q.child.cfg.num_parallel if q.child is not None else 1

    def max_queue(self, name: str) -> int:
        """Requests that may wait for the model."""
        mc = self.cfg.model(name)
        return mc.max_queue if mc is not None and mc.max_queue else self.cfg.scheduler.max_queue

    def _queue_timeout(self, name: str) -> float:
        mc = self.cfg.model(name)
        if mc is not None and mc.queue_timeout:
            return mc.queue_timeout
        return self.cfg.scheduler.queue_timeout

    def _retry_after(self, q: Queue, ahead: int) -> int:
        """Seconds until `ahead` requests have gone through, at the measured service rate."""
        service = q.service_s if q.service_s is not None else GUESS_SERVICE_S
        return max(1, math.ceil(ahead * service / max(1, self._limit(q))))

    def _note(self, q: Queue) -> None:
        """Tell the lifecycle how many requests are about to use the model."""
        self.lifecycle.note_queue(q.name, len(q.waiting) + q.granted, q.yielding)

    # -- the dispatcher ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start waiting requests as slots free up and turns change (a daemon task)."""
        while True:
            self._wake.clear()
            self.dispatch()
            busy = any(q.waiting or q.owed for q in self.queues.values())
            # Not wait_for: on Python 3.11 it loses a cancellation that comes as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S if busy else None):
                    await self._wake.wait()

    def dispatch(self) -> None:
        """One pass: who owes whom, who makes way, and which waiting requests start."""
        now = self._clock()
        self._settle_debts(now)
        for q in sorted(
            (q for q in self.queues.values() if q.waiting),
            key=lambda q: self._rank(q.name, q.waiting[0].arrived, now),
        ):
            self._hand_over(q, now)
            self._note(q)

    def _settle_debts(self, now: float) -> None:
        """Record which models wait for whose memory (as the lifecycle reports it), forget
        debts to models no longer waiting, and set who is making way."""
        debts: dict[str, dict[str, float]] = {}
        for m in self.lifecycle.models.values():
            if not m.blocked_by or m.state is not MState.LOADING:
                continue
            for holder in m.blocked_by:
                q = self._queue_of(holder)
                if q is not None:
                    since = m.blocked_since if m.blocked_since is not None else now
                    debts.setdefault(q.name, {})[m.name] = since
        for q in self.queues.values():
            owed = debts.get(q.name, {})
            for other in [o for o in q.owed if o not in owed]:
                del q.owed[other]
            for other, since in owed.items():
                q.owed.setdefault(other, since)
            head = q.waiting[0].arrived if q.waiting else None
            reason = self._yield_reason(q, now, head)
            if (reason is not None) != q.yielding:
                q.yielding = reason is not None
                if q.yielding:
                    q.swaps += 1
                    self.batches.observe((q.name,), q.batch)
                    log.info("%s makes way (%s) after a batch of %d", q.name, reason, q.batch)
                    q.batch = 0
                self._note(q)

    def _queue_of(self, model: str) -> Queue | None:
        """The queue whose requests use this model record (its own name, or a name sharing
        its runner)."""
        q = self.queues.get(model)
        if q is not None:
            return q
        for q in self.queues.values():
            m = self.lifecycle.runner_of(q.name)
            if m is not None and m.name == model:
                return q
        return None

    # -- views ------------------------------------------------------------------------------------

    def stats(self) -> list[QueueStats]:
        """Every queue, by model name."""
        now = self._clock()
        return [self._stats(self.queues[name], now) for name in sorted(self.queues)]

    def of(self, name: str) -> QueueStats | None:
        """One model's queue, if it has had requests."""
        q = self.queues.get(name)
        return None if q is None else self._stats(q, self._clock())

    def _stats(self, q: Queue, now: float) -> QueueStats:
        return QueueStats(
            name=q.name,
            waiting=len(q.waiting),
            running=q.running,
            limit=self._limit(q),
            yielding=q.yielding,
            started=q.started,
            rejected=dict(q.rejected),
            swaps=q.swaps,
            service_s=q.service_s,
            oldest_wait_s=now - q.waiting[0].arrived if q.waiting else 0.0,
        )


def _granted(w: _Waiter) -> bool:
    return w.granted.done() and not w.granted.cancelled()
