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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from llmd.config import Config
from llmd.lifecycle import Lifecycle
from llmd.metrics import Histogram
from llmd.models import DEFAULT_PRIORITY, Model, MState
from llmd.process import Child

log = logging.getLogger("llmd.scheduler")

# Before a model has finished a request: what one is assumed to take, for Retry-After.
GUESS_SERVICE_S = 5.0
# Weight of the newest request in the moving average of service times.
SERVICE_EWMA = 0.2
# While anything waits, ranks change with age: look again this often even if nothing happens.
TICK_S = 0.5
# A copy of a model whose load for a backlog failed is not tried again for this long.
REPLICA_RETRY_S = 30.0
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
class Replica:
    """One copy of a model, on one backend: its slots and its turn at the GPU it shares.

    A model has one; a model with `backends = [...]` has one per backend, each its own
    lifecycle record (keyed name@backend)."""

    key: str  # the key of its lifecycle record
    child: Child
    running: int = 0
    # Granted a slot but not yet resumed: still protect the model from eviction.
    granted: int = 0
    # Arrival times of requests holding a slot, oldest first (for the rank of a waiting load).
    holders: list[float] = field(default_factory=list)
    service_s: float | None = None  # moving average of how long a request holds its slot here
    # Models (record keys) waiting for this copy's memory: their model's name, and since when.
    owed: dict[str, tuple[str, float]] = field(default_factory=dict)
    yielding: bool = False
    batch: int = 0  # requests started since it last made way
    turn: int = 0  # requests started since it last got its memory (a cold start)
    last_done: float = 0.0  # when its last request ended
    swaps: int = 0  # times it made way for another model with work waiting
    tried: float | None = None  # when llmd last started loading it for a backlog


@dataclass(eq=False)
class _Waiter:
    arrived: float
    granted: asyncio.Future[Replica]


@dataclass
class Queue:
    """One model's queue, its copies, and what has been measured of it."""

    name: str
    replicas: dict[str, Replica] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # replica keys, as the model's backends
    waiting: deque[_Waiter] = field(default_factory=deque)
    service_s: float | None = None  # moving average over every copy
    # Counters for /metrics and status.
    started: int = 0
    rejected: Counter[str] = field(default_factory=Counter)

    def copies(self) -> list[Replica]:
        """Its copies, in the order of the model's backends."""
        return [self.replicas[k] for k in self.order]

    def oldest(self, key: str) -> float | None:
        """Arrival of its oldest request not served yet, waiting or holding copy `key`."""
        times = [self.waiting[0].arrived] if self.waiting else []
        r = self.replicas.get(key)
        return min(times + (r.holders[:1] if r is not None else []), default=None)


@dataclass(frozen=True)
class ReplicaStats:
    """One copy of a model, as status shows it."""

    backend: str
    running: int
    limit: int
    yielding: bool


@dataclass(frozen=True)
class QueueStats:
    """One model's queue, as status and /metrics show it."""

    name: str
    waiting: int
    running: int
    limit: int  # over the copies requests may go to now
    yielding: bool  # any copy
    started: int
    rejected: dict[str, int]
    swaps: int
    service_s: float | None
    oldest_wait_s: float
    replicas: tuple[ReplicaStats, ...] = ()


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
    async def turn(self, name: str, children: Sequence[Child]) -> AsyncIterator[Child]:
        """Wait for the request's turn at the model, then hold one slot of one of its copies
        on `children` (its backends); yields that copy's child. Raises Rejected when the queue
        is full or the wait is over."""
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = Queue(name)
        self._place(q, children)
        arrived = self._clock()
        r = None if q.waiting else self._pick(q, arrived, arrived)
        if r is not None:
            self._start(q, r, arrived, arrived)
        else:
            r = await self._wait(q, arrived)
        t0 = self._clock()
        try:
            yield r.child
        finally:
            self._finish(q, r, arrived, self._clock() - t0)

    def _place(self, q: Queue, children: Sequence[Child]) -> None:
        """The model's copies: one per child (a model's one record follows it between
        children, so its one copy does too)."""
        order = []
        for child in children:
            key = self.lifecycle.key(q.name, child.name)
            r = q.replicas.get(key)
            if r is None:
                r = q.replicas[key] = Replica(key, child)
            r.child = child
            order.append(key)
        q.order = order

    async def _wait(self, q: Queue, arrived: float) -> Replica:
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
        self._grow(q, arrived)
        self._note(q)
        self._wake.set()
        timeout = self._queue_timeout(q.name)
        try:
            async with asyncio.timeout(timeout):
                r = await asyncio.shield(w.granted)
        except TimeoutError:
            if not _granted(w):
                self._leave(q, w)
                q.rejected["queue_timeout"] += 1
                retry = self._retry_after(q, len(q.waiting) + 1)
                running = sum(r.running for r in q.copies())
                raise Rejected(
                    503,
                    "queue_timeout",
                    f"llmd: the request for {q.name} waited {timeout:g}s in its queue, its "
                    f"limit (queue_timeout), behind {running} running and {len(q.waiting)} "
                    f"waiting; try again in about {retry}s",
                    retry,
                ) from None
            r = w.granted.result()  # granted as the time ran out: it goes ahead
        except BaseException:  # the client went away, or llmd is stopping
            if _granted(w):  # as the wait ended: give the slot back
                r = w.granted.result()
                r.granted -= 1
                self._finish(q, r, arrived, None)
            else:
                self._leave(q, w)
            raise
        r.granted -= 1
        self._note(q)
        return r

    def _leave(self, q: Queue, w: _Waiter) -> None:
        w.granted.cancel()
        with contextlib.suppress(ValueError):
            q.waiting.remove(w)
        self._note(q)
        self._wake.set()

    def _start(self, q: Queue, r: Replica, arrived: float, now: float) -> None:
        m = self._runner(q, r)
        if m is None or not m.resident:
            r.turn = 0  # this request starts its load: a new turn
        r.turn += 1
        r.running += 1
        r.batch += 1
        r.holders.append(arrived)
        q.started += 1
        self.waits.observe((q.name,), max(0.0, now - arrived))

    def _finish(self, q: Queue, r: Replica, arrived: float, held_s: float | None) -> None:
        r.running -= 1
        r.last_done = self._clock()
        with contextlib.suppress(ValueError):
            r.holders.remove(arrived)
        if held_s is not None:
            r.service_s = _ewma(r.service_s, held_s)
            q.service_s = _ewma(q.service_s, held_s)
        self._hand_over(q, self._clock())  # at once: the child must not wait for a pass
        self._note(q)  # (also marks the model as scheduled once its record exists)
        self._wake.set()

    def _hand_over(self, q: Queue, now: float) -> None:
        """Start the waiting requests of this queue that may start now, oldest first, each on
        the copy where it is expected to finish first."""
        while q.waiting:
            r = self._pick(q, now, q.waiting[0].arrived)
            if r is None:
                break
            w = q.waiting.popleft()
            if w.granted.done():  # cancelled as it was about to start
                continue
            r.granted += 1
            self._start(q, r, w.arrived, now)
            w.granted.set_result(r)

    # -- decisions --------------------------------------------------------------------------------

    def _pick(self, q: Queue, now: float, arrived: float) -> Replica | None:
        """The copy a request (arrived then) may start on now, if any: of those with a free
        slot and not making way, the one with the least expected time to finish it, (requests
        running there + 1) x its service time / its slots."""
        best: tuple[float, Replica] | None = None
        for r in self._serving(q):
            limit = self._limit(q, r)
            if r.running >= limit or self._yield_reason(q, r, now, arrived) is not None:
                continue
            cost = (r.running + 1) * self._service(q, r) / limit
            if best is None or cost < best[0]:
                best = (cost, r)
        return None if best is None else best[1]

    def _serving(self, q: Queue) -> list[Replica]:
        """The copies requests may go to now. A model's one copy, whatever its state (a request
        loads it). Of several: those loaded; else the one loading; else the first whose backend
        is running, which a request then loads. More copies load only for a backlog (_grow)."""
        copies = q.copies()
        if len(copies) < 2:
            return copies
        up = [r for r in copies if r.child.running]
        for state in (MState.LOADED, MState.LOADING):
            found = [r for r in up if self._state(q, r) is state]
            if found:
                return found
        return up[:1]

    def _grow(self, q: Queue, now: float) -> None:
        """Load one more copy of a replicated model when a request arriving now would wait
        longer on the loaded copies than the model takes to load (one load at a time; a copy
        whose load failed is tried again after REPLICA_RETRY_S)."""
        copies = q.copies()
        if len(copies) < 2 or not q.waiting:
            return
        states = [self._state(q, r) for r in copies]
        if MState.LOADING in states or MState.UNLOADING in states:
            return
        loaded = [r for r, st in zip(copies, states, strict=True) if st is MState.LOADED]
        cold = [
            r
            for r, st in zip(copies, states, strict=True)
            if st is MState.UNLOADED
            and r.child.running
            and (r.tried is None or now - r.tried >= REPLICA_RETRY_S)
        ]
        if not loaded or not cold:
            return
        slots = sum(self._limit(q, r) for r in loaded)
        backlog = len(q.waiting) + sum(r.running for r in loaded)
        wait = backlog * self._service(q, None) / max(1, slots)
        load_s = self.lifecycle.load_time(q.name)
        if wait <= load_s:
            return
        r = cold[0]
        r.tried = now
        why = (
            f"{len(q.waiting)} requests waiting, about {wait:.1f}s on {len(loaded)} loaded "
            f"{'copy' if len(loaded) == 1 else 'copies'}, longer than its load time of "
            f"{load_s:.1f}s"
        )
        if self.lifecycle.add_replica(q.name, r.child, reason=f"another copy: {why}"):
            log.info("%s: loading another copy on %s (%s)", q.name, r.child.name, why)

    def _yield_reason(self, q: Queue, r: Replica, now: float, arrived: float | None) -> str | None:
        """Why this copy of the model must make way for a model waiting for its memory, if it
        must.

        With a request to start (that arrived then): the waiting model's oldest request
        outranks it, and this copy has had its batch since its load (a model that has just
        paid for a swap serves swap_batch first). With none (arrived None): an idle copy's
        claim on its memory is its priority plus one level per aging it has been idle."""
        if not r.owed:
            return None
        if arrived is not None or r.running:
            if r.turn < self.cfg.scheduler.swap_batch:
                return None
            when = now if arrived is None else arrived
            mine = (self._rank(q.name, when, now), when)
        else:
            idle_s = max(0.0, now - r.last_done)
            mine = (self._priority(q.name) + idle_s / self.cfg.scheduler.aging, now)
        for key, (other, since) in r.owed.items():
            if self._waiting_rank(other, key, since, now) < mine:
                return f"{key} waits for its memory and outranks it"
        return None

    def _rank(self, name: str, arrived: float, now: float) -> float:
        return self._priority(name) - max(0.0, now - arrived) / self.cfg.scheduler.aging

    def _waiting_rank(self, name: str, key: str, since: float, now: float) -> tuple[float, float]:
        """The rank of a model (record `key`) whose load waits for memory: its oldest
        request's (and, between equal ranks, the older goes first)."""
        q = self.queues.get(name)
        oldest = q.oldest(key) if q is not None else None
        first = since if oldest is None else min(oldest, since)
        return self._rank(name, first, now), first

    def _priority(self, name: str) -> int:
        mc = self.cfg.model(name)
        return mc.priority if mc is not None else DEFAULT_PRIORITY

    def _runner(self, q: Queue, r: Replica) -> Model | None:
        return self.lifecycle.runner_of(q.name, r.child.name)

    def _state(self, q: Queue, r: Replica) -> MState:
        m = self._runner(q, r)
        return MState.UNLOADED if m is None else m.state

    def _limit(self, q: Queue, r: Replica) -> int:
        """Requests a copy may run at once: its backend's num_parallel, 1 if it embeds."""
        m = self._runner(q, r)
        if m is not None and m.embedding:
            return 1
        return r.child.cfg.num_parallel

    def _service(self, q: Queue, r: Replica | None) -> float:
        """How long a request holds its slot: measured on the copy, else the model, else
        assumed."""
        for s in (r.service_s if r is not None else None, q.service_s):
            if s is not None:
                return s
        return GUESS_SERVICE_S

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
        slots = sum(self._limit(q, r) for r in self._serving(q))
        return max(1, math.ceil(ahead * self._service(q, None) / max(1, slots)))

    def _note(self, q: Queue) -> None:
        """Tell the lifecycle how many requests are about to use each copy of the model: every
        waiting one (it may go to any copy) and the ones granted it."""
        for r in q.replicas.values():
            self.lifecycle.note_queue(q.name, r.child.name, len(q.waiting), r.granted, r.yielding)

    # -- the dispatcher ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Start waiting requests as slots free up and turns change (a daemon task)."""
        while True:
            self._wake.clear()
            self.dispatch()
            busy = any(
                q.waiting or any(r.owed for r in q.replicas.values()) for q in self.queues.values()
            )
            # Not wait_for: on Python 3.11 it loses a cancellation that comes as the event is set.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S if busy else None):
                    await self._wake.wait()

    def dispatch(self) -> None:
        """One pass: who owes whom, who makes way, which waiting requests start, and whether a
        backlog calls for another copy of its model."""
        now = self._clock()
        self._settle_debts(now)
        for q in sorted(
            (q for q in self.queues.values() if q.waiting),
            key=lambda q: self._rank(q.name, q.waiting[0].arrived, now),
        ):
            self._hand_over(q, now)
            self._grow(q, now)
            self._note(q)

    def _settle_debts(self, now: float) -> None:
        """Record which models wait for whose memory (as the lifecycle reports it), forget
        debts to models no longer waiting, and set which copies are making way."""
        debts: dict[str, dict[str, tuple[str, float]]] = {}
        for m in self.lifecycle.models.values():
            if not m.blocked_by or m.state is not MState.LOADING:
                continue
            for holder in m.blocked_by:
                r = self._replica_of(holder)
                if r is not None:
                    since = m.blocked_since if m.blocked_since is not None else now
                    debts.setdefault(r.key, {})[m.key] = (m.name, since)
        for q in self.queues.values():
            head = q.waiting[0].arrived if q.waiting else None
            for r in q.replicas.values():
                owed = debts.get(r.key, {})
                for other in [o for o in r.owed if o not in owed]:
                    del r.owed[other]
                for other, debt in owed.items():
                    r.owed.setdefault(other, debt)
                reason = self._yield_reason(q, r, now, head)
                if (reason is not None) != r.yielding:
                    r.yielding = reason is not None
                    if r.yielding:
                        r.swaps += 1
                        self.batches.observe((q.name,), r.batch)
                        log.info("%s makes way (%s) after a batch of %d", r.key, reason, r.batch)
                        r.batch = 0
                    self._note(q)

    def _replica_of(self, key: str) -> Replica | None:
        """The copy whose requests use this model record (its own, or a name sharing its
        runner)."""
        for q in self.queues.values():
            for r in q.replicas.values():
                if r.key == key:
                    return r
        for q in self.queues.values():
            for r in q.replicas.values():
                m = self._runner(q, r)
                if m is not None and m.key == key:
                    return r
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
        copies = q.copies()
        return QueueStats(
            name=q.name,
            waiting=len(q.waiting),
            running=sum(r.running for r in q.replicas.values()),
            limit=sum(self._limit(q, r) for r in self._serving(q)),
            yielding=any(r.yielding for r in copies),
            started=q.started,
            rejected=dict(q.rejected),
            swaps=sum(r.swaps for r in q.replicas.values()),
            service_s=q.service_s,
            oldest_wait_s=now - q.waiting[0].arrived if q.waiting else 0.0,
            replicas=tuple(
                ReplicaStats(r.child.name, r.running, self._limit(q, r), r.yielding) for r in copies
            ),
        )


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - SERVICE_EWMA) * old + SERVICE_EWMA * new


def _granted(w: _Waiter) -> bool:
    return w.granted.done() and not w.granted.cancelled()
