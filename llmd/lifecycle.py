"""Every model's lifecycle: in-flight counts, shared loads, admission and eviction, keep-alive
timers, pressure relief and reconciliation with the children.

The one writer of model state: every change goes through `_set_state`, checked against
`models.TRANSITIONS`. Memory decides (admit, evict these, wait); the lifecycle acts on it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from llmd import models as modelinfo
from llmd import runneropts
from llmd.backends import Backends, StartTask
from llmd.childapi import ChildAPIError, Runner
from llmd.config import Config, normalize_model
from llmd.derived import Derived
from llmd.memory import Memory
from llmd.models import TRANSITIONS, History, KeepAlive, LoadError, Model, MState, NoRoom
from llmd.process import Child
from llmd.transitions import guard

log = logging.getLogger("llmd.lifecycle")

UNLOAD_CONFIRM_S = 15.0
RECONCILE_INTERVAL_S = 5.0


class EventSink(Protocol):
    """Where lifecycle events go: the daemon counts them for /metrics and keeps them in the
    store for `llmctl events`."""

    def record_event(
        self, kind: str, *, model: str | None = None, backend: str | None = None, reason: str = ""
    ) -> None: ...


class KeepAliveFn(Protocol):
    """A model's keep-alive, given how long it has been idle already (0 as it goes idle)."""

    def __call__(self, m: Model, idle_s: float = 0.0, /) -> KeepAlive: ...


@dataclass
class Lease:
    """One request's hold on a model; `waited_for_load` says whether it had to wait for a load."""

    model: Model
    child: Child
    waited_for_load: bool
    load_s: float | None


class Lifecycle:
    """Owns per-model state; the proxy and admin API go through lease/load/unload."""

    def __init__(
        self,
        cfg: Config,
        backends: Backends,
        memory: Memory,
        *,
        history: History,
        events: EventSink,
        start_task: StartTask,
        clock: Callable[[], float] = time.monotonic,
        keep_alive: KeepAliveFn | None = None,
        on_loaded: Callable[[Model, float], Awaitable[None]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.memory = memory
        self.models: dict[str, Model] = {}
        self._history = history
        self._events = events
        self._start_task = start_task
        self._clock = clock
        # The policy's decision, unless a test puts its own in at this seam.
        self._decide: KeepAliveFn = keep_alive or (
            lambda m, idle_s=0.0: modelinfo.keep_alive(self.cfg, self._history, m, idle_s)
        )
        self._on_loaded = on_loaded
        self._timers_changed = asyncio.Event()
        # When the timers loop wakes next by itself (None: only when told): a timer set later
        # than that needs no wake-up (it is looked at then), nor does one cleared.
        self._timers_due: float | None = None
        # Set when a model goes idle or leaves: admissions waiting for room look again.
        self._room_changed = asyncio.Event()
        self._generations: dict[str, int] = {}
        self._loads: set[asyncio.Task[None]] = set()
        self._watchers: list[Callable[[], None]] = []
        self._told: set[tuple[str, str]] = set()  # (model, what): said once in the log
        # The models /v1 requests are sent to so as not to reload theirs (llmd/derived.py).
        self.derived = Derived(start_task, backends.digest_of, clock)

    def watch(self, fn: Callable[[], None]) -> None:
        """Call fn (synchronously, without arguments) after any model's state, in-flight count
        or wait for memory changes: how the scheduler above hears of them."""
        self._watchers.append(fn)

    def _changed(self) -> None:
        for fn in self._watchers:
            fn()

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config; idle timers keep their deadlines until `rearm`. A model that
        became (or stopped being) replicated has its records keyed anew; of two records that
        want one key, the other keeps its old one until it unloads."""
        self.cfg = cfg
        for m in list(self.models.values()):
            key = self.key(m.name, m.backend)
            if key == m.key:
                continue
            other = self.models.get(key)
            if other is not None and (other.resident or not m.resident):
                if not m.resident:
                    del self.models[m.key]  # an unloaded record: the other is the model's
                continue
            del self.models[m.key]
            m.key = key
            self.models[key] = m  # in place of an unloaded record, if there was one

    def rearm(self) -> None:
        """Re-decide every idle model's keep-alive (after a reload or a pin) and re-arm its
        timer from when it went idle."""
        for m in self.models.values():
            if m.state is MState.LOADED and m.in_flight == 0 and m.idle_since is not None:
                self._arm(m, m.idle_since)

    def keep_alive_of(self, m: Model) -> KeepAlive:
        """The keep-alive the model's idle timer uses (or would use, were it idle now)."""
        if m.keep_alive is not None and m.deadline is not None:
            return m.keep_alive
        return self._decide(m)

    # -- records ----------------------------------------------------------------------------------

    def key(self, name: str, backend: str) -> str:
        """The key of a model's record on a backend: its name, or name@backend for a replica
        of a model served from several backends (one record per backend)."""
        mc = self.cfg.model(name)
        return f"{name}@{backend}" if mc is not None and mc.replicated else name

    def _record(self, name: str, child: Child) -> Model:
        """The state record of a model on a child, created on first sight; an unloaded model's
        record follows it to the child now serving its name (a replica's stays on its own)."""
        key = self.key(name, child.name)
        m = self.models.get(key)
        if m is None:
            m = self.models[key] = Model(name, child.name, key=key)
        elif m.backend != child.name and m.state is MState.UNLOADED:
            m.backend = child.name
        if m.state is MState.UNLOADED:
            m.digest = self.backends.digest_of(name, child.name) or m.digest
        return m

    def record_on(self, name: str, backend: str) -> Model | None:
        """A model's own record on a backend, if it has one there."""
        m = self.models.get(self.key(name, backend))
        return m if m is not None and m.backend == backend else None

    def runner_of(self, name: str, backend: str | None = None) -> Model | None:
        """The loaded (or loading, or unloading) model record that serves this name (on that
        backend, for a replicated model): its own, else another name's with the same digest on
        the same backend, as Ollama shares it."""
        return next(iter(self._runners(name, backend)), None)

    def runners_of(self, name: str) -> list[Model]:
        """Every resident record serving this name: one, or one per replica."""
        return list(self._runners(name, None))

    def _runners(self, name: str, backend: str | None) -> list[Model]:
        mc = self.cfg.model(name)
        if mc is not None and mc.replicated:
            on = mc.backends if backend is None else (backend,)
            keys = [f"{name}@{b}" for b in on]
        else:
            keys = [name]  # its one record is its runner wherever it is (the lease moves there)
        own = [
            m
            for k in keys
            if (m := self.models.get(k)) is not None and m.state is not MState.UNLOADED
        ]
        if own:
            return own
        shared = []
        for m in self.models.values():
            if m.state is MState.UNLOADED or m.name == name or m.digest is None:
                continue
            if backend is not None and m.backend != backend:
                continue
            if self.backends.digest_of(name, m.backend) == m.digest:
                shared.append(m)
        return shared

    def _for_request(self, name: str, child: Child) -> Model:
        """The record a request for `name` on `child` holds: the runner already serving the
        name there (under whichever name loaded it), else the name's own record."""
        shared = self.runner_of(name, child.name)
        if shared is not None and shared.name != name:
            log.debug("%s is served by the runner of %s (same digest)", name, shared.name)
            return shared
        return self._record(name, child)

    def _set_state(
        self, m: Model, new: MState, *, event: str | None = None, reason: str = ""
    ) -> None:
        """The one place a model's state changes: checked against the transition table,
        stamped, waiters woken, the event (if any) recorded."""
        guard(TRANSITIONS, f"model {m.name}", m.state, new)
        log.debug("model %s: %s -> %s", m.name, m.state.value, new.value)
        m.state = new
        m.changed_at = self._clock()
        m.changed.set()
        m.changed = asyncio.Event()
        if new is MState.UNLOADED:
            m.deadline = None
            m.size_vram = 0
            self._room_changed.set()
        if event is not None:
            self._events.record_event(event, model=m.name, backend=m.backend, reason=reason)
        self._changed()

    # -- requests ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, child: Child, options: dict[str, Any] | None = None
    ) -> AsyncIterator[Lease]:
        """Hold a model for one request: load it if cold (one shared load), release at the end.

        A model already loaded (or loading) on one child is served there, even if placement
        would now pick another (pulled there since, or moved by a reload): otherwise a second
        copy would load behind llmd's back. Use the lease's child.
        """
        async with self._hold(name, child, options, "request") as lease:
            yield lease

    @contextlib.asynccontextmanager
    async def _hold(
        self, name: str, child: Child, options: dict[str, Any] | None, reason: str
    ) -> AsyncIterator[Lease]:
        m = self._for_request(name, child)
        if m.state is not MState.UNLOADED:
            current = self.backends.children.get(m.backend)
            if current is not None and current.running:
                child = current
        m.in_flight += 1
        m.deadline = None
        m.idle_since = None
        m.prewarm_at = None
        m.prewarmed = False
        m.extra = False
        # Timers only cleared: the timers loop need not look now (see _timers_due).
        task = asyncio.current_task()
        if task is not None:
            m.holders.add(task)
        try:
            waited, load_s = await self._ensure_loaded(m, child, options, reason)
            yield Lease(m, child, waited, load_s)
        finally:
            if task is not None:
                m.holders.discard(task)
            self._release(m)

    def fit_options(
        self, name: str, child: Child, body: dict[str, Any], *, native: bool
    ) -> dict[str, Any] | None:
        """Rewrite a request's runner options to those its model is (or will be) loaded with,
        so that the child serves it without reloading the model; return the options a load for
        it uses. Call it just before `lease`, with no wait between (the model's state decides).

        The configured `options` always win; else, while the model is resident, the runner
        options of its load do; `reload_on_options = true` leaves requests as Ollama takes them.
        A /v1 request carries no options: it is sent to the derived model made for those
        runner options by prepare_v1 (llmd/derived.py), or else, as Ollama serves it with its
        defaults (and reloads a model loaded with others), left alone and the loaded runner
        noted as default.
        """
        m = self._for_request(name, child)
        mc = self.cfg.model(m.name)
        options = body.get("options")
        asked = options if isinstance(options, dict) else None
        if not native:
            at, loaded = self._v1_target(m, child)
            derived = self.derived.ready(at.name, name, loaded) if loaded else None
            if derived is not None:
                # A model with the loaded runner options as parameters: served by the runner
                # loaded (or about to be) for this one, where Ollama would reload it.
                body["model"] = derived
                return None
            # Without one (its creation failed, or reload_on_options), Ollama reloads it.
            runner = m.runner_options if m.resident else (mc.options if mc else None)
            if runner and dict(runner) != runneropts.ollama_defaults(at.cfg.env):
                self._tell_once(
                    m.name,
                    "v1",
                    "%s: /v1 requests cannot carry runner options, so Ollama reloads it with its "
                    "defaults instead of %s (a backend whose env has OLLAMA_CONTEXT_LENGTH set to "
                    "the model's num_ctx serves them without a reload, if num_ctx is its only "
                    "runner option)",
                    m.name,
                    dict(runner),
                )
                if m.resident:
                    m.runner_options = {}
            return None
        fixed: runneropts.RunnerOptions | None = mc.options if mc and mc.options else None
        if fixed is None and m.resident and not (mc and mc.reload_on_options):
            fixed = m.runner_options
        if fixed is None:  # the request decides the load, or the child reloads as Ollama does
            if m.resident:
                m.runner_options = runneropts.runner_subset(asked)
            return dict(asked) if asked is not None else None
        fitted = runneropts.fit(asked, fixed)
        if fitted.options is not None:
            body["options"] = fitted.options
        if m.resident:
            m.runner_options = dict(fixed)
        if fitted.overridden:
            m.options_overridden += 1
            log.debug("%s: runner options %s of a request replaced", m.name, fitted.overridden)
        loaded_ctx = fixed.get("num_ctx", m.context_length if m.resident else None)
        if fitted.asked_ctx is not None and loaded_ctx and fitted.asked_ctx > loaded_ctx:
            self._tell_once(
                m.name,
                "num_ctx",
                "%s: a client asked for num_ctx %d; it is served with %d, as %s (only this "
                "first time is logged)",
                m.name,
                fitted.asked_ctx,
                loaded_ctx,
                "configured" if mc and mc.options else "loaded",
            )
        return fitted.options

    async def prepare_v1(self, name: str, child: Child) -> None:
        """Make the derived model that fit_options would send a /v1 request to (once per
        backend, base digest and runner options): the one wait between the request's turn
        and fit_options, looked at again after it, since the model's state may change."""
        while True:
            at, fixed = self._v1_target(self._for_request(name, child), child)
            if not fixed or self.derived.ready(at.name, name, fixed) is not None:
                return
            if not await self.derived.ensure(at, name, fixed):
                return  # fit_options sends it as it came, as before

    def _v1_target(self, m: Model, child: Child) -> tuple[Child, dict[str, int | bool] | None]:
        """The child a /v1 request for the model goes to (the one it is loaded on, as in
        _hold) and the runner options it must be served with so that it is not reloaded, as
        for native requests: configured, else those it is resident with (None: send it as it
        comes, also when reload_on_options leaves requests as Ollama takes them)."""
        if m.state is not MState.UNLOADED:
            current = self.backends.children.get(m.backend)
            if current is not None and current.running:
                child = current
        mc = self.cfg.model(m.name)
        if mc is not None and mc.options:
            return child, dict(mc.options)
        if not m.resident or (mc is not None and mc.reload_on_options):
            return child, None
        return child, dict(m.runner_options) if m.runner_options else None

    def _tell_once(self, model: str, what: str, msg: str, *args: object) -> None:
        if (model, what) not in self._told:
            self._told.add((model, what))
            log.info(msg, *args)

    def _release(self, m: Model) -> None:
        m.in_flight -= 1
        if m.in_flight == 0:
            now = self._clock()
            m.idle_since = now
            if m.state is MState.LOADED:
                self._arm(m, now)
            self._room_changed.set()  # an idle model may now be evicted
        self._changed()

    def note_queue(
        self, name: str, backend: str, queued: int, granted: int, yielding: bool
    ) -> None:
        """The scheduler's word on a model's record on a backend: requests waiting that may
        use it, and those granted it that are on their way (both keep it from being evicted,
        as in-flight ones do; waiting ones not while it makes way), and whether it is making
        way for another model."""
        name = normalize_model(name)
        m = self.runner_of(name, backend) or self.record_on(name, backend)  # unloaded: its own
        if m is None:
            return
        m.scheduled = True
        if (m.queued, m.granted, m.yielding) == (queued, granted, yielding):
            return
        m.queued, m.granted, m.yielding = queued, granted, yielding
        self._room_changed.set()  # a load waiting for memory looks again
        if not m.busy and m.state is MState.LOADED:
            self._timers_changed.set()

    def _arm(self, m: Model, idle_since: float) -> None:
        """Start (or re-start) an idle model's keep-alive timer."""
        if m.unload_when_idle:
            m.deadline = idle_since
        elif m.prewarmed:
            m.deadline = m.prewarm_expire_at  # pre-warmed for a request that has not come
        else:
            # Re-armed after a reload, the model may have been idle a while: the policy judges
            # the ongoing idle period by how long it has lasted.
            ka = m.keep_alive = self._decide(m, max(self._clock() - idle_since, 0.0))
            m.deadline = None if ka.keep_alive_s is None else idle_since + ka.keep_alive_s
            m.prewarm_at = m.prewarm_expire_at = None
            if ka.prewarm_after_s is not None and ka.prewarm_expire_s is not None:
                m.prewarm_at = idle_since + ka.prewarm_after_s
                m.prewarm_expire_at = idle_since + ka.prewarm_expire_s
        first = min((t for t in (m.deadline, m.prewarm_at) if t is not None), default=None)
        if first is not None and (self._timers_due is None or first < self._timers_due):
            self._timers_changed.set()

    async def _ensure_loaded(
        self, m: Model, child: Child, options: dict[str, Any] | None, reason: str
    ) -> tuple[bool, float | None]:
        waited = False
        while True:
            if m.state is MState.LOADED:
                return waited, m.last_load_s if waited else None
            waited = True
            if m.state is MState.UNLOADING:
                await m.changed.wait()
            elif m.state is MState.LOADING and m.load_task is not None:
                # Shielded: one waiter going away must not cancel everyone's load.
                await asyncio.shield(m.load_task)
            else:
                self._start_load(m, child, options, reason)

    def _start_load(
        self, m: Model, child: Child, options: dict[str, Any] | None, reason: str
    ) -> asyncio.Future[float]:
        self._set_state(m, MState.LOADING)
        m.backend = child.name
        m.unload_when_idle = False
        # The configured runner options, else the request's: admission sizes the same load.
        mc = self.cfg.model(m.name)
        runner = dict(mc.options) if mc and mc.options else runneropts.runner_subset(options)
        m.runner_options = runner
        done: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        m.load_task = done
        task = self._start_task(self._run_load(done, m, child, runner, reason), f"load-{m.name}")
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        return done

    async def _run_load(
        self,
        done: asyncio.Future[float],
        m: Model,
        child: Child,
        runner: dict[str, Any],
        reason: str,
    ) -> None:
        """One shared load, a task of the daemon's TaskGroup: its outcome goes to the waiters
        through `done` and never up into the TaskGroup."""
        try:
            done.set_result(await self._load(m, child, runner, reason))
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as e:
            done.set_exception(e)
            done.exception()  # retrieved: a load nobody waits for any more is logged here
            log.info("load of %s failed: %s", m.name, e)

    async def _load(self, m: Model, child: Child, runner: dict[str, Any], reason: str) -> float:
        try:
            return await self._admit_and_load(m, child, runner, reason)
        finally:
            self.memory.release(m.key)  # loaded (the probe sees it) or failed

    async def _admit_and_load(
        self, m: Model, child: Child, runner: dict[str, Any], reason: str
    ) -> float:
        t0 = time.monotonic()
        try:
            for attempt in (1, 2):
                await self._admit(m, child, runner)  # the retry knows the measured size
                t0 = time.monotonic()
                await self._post_load(m, child, runner)
                if not await self._undo_spill(m, child):
                    break
                if attempt == 2:
                    raise LoadError(
                        503,
                        f"{m.name} does not fit in GPU memory and would run partly on the "
                        "CPU (3-10x slower); set allow_cpu_spill = true for it to allow that",
                        int(self.cfg.gpu.admission_timeout),
                    )
        except BaseException as e:
            if isinstance(e, ChildAPIError) and e.status is not None:
                e = LoadError(e.status, e.message)  # the child refused: Ollama's own words
            # A refusal is a load-failed event; a child that died mid-load says so itself.
            failed = e.message if isinstance(e, LoadError) else None
            self._set_state(
                m, MState.UNLOADED, event="load-failed" if failed else None, reason=failed or ""
            )
            if isinstance(e, ChildAPIError):
                why = f"backend {child.name} failed while loading {m.name}: {e}"
                raise LoadError(503, why) from e
            raise e from None
        load_s = time.monotonic() - t0
        m.last_load_s = load_s
        m.loads += 1
        self._set_state(m, MState.LOADED, event="load", reason=f"{reason}; took {load_s:.2f}s")
        log.info("loaded %s on %s in %.2fs (%s)", m.name, child.name, load_s, reason)
        if self._on_loaded is not None:
            await self._on_loaded(m, load_s)
        if m.in_flight == 0:
            self._arm(m, self._clock())
        return load_s

    async def _admit(self, m: Model, child: Child, runner: dict[str, Any]) -> None:
        """Make room on the backend's GPUs first, so that Ollama never evicts or spills:
        ask memory, evict whom it names, wait when it says wait."""
        # A pre-warm only uses free memory: it never evicts or waits.
        load = await self.memory.cold_load(
            m, child, runner, may_evict=not m.prewarmed, may_wait=not m.extra
        )
        if load is None:
            return  # admission is off
        started = self._clock()
        try:
            while True:
                try:
                    waited_s = self._clock() - started
                    a = self.memory.admit(load, self.models.values(), waited_s=waited_s)
                except NoRoom as e:
                    raise LoadError(503, e.message, e.retry_after_s) from None
                if a.admitted:
                    return
                if a.victims:
                    await self._evict_all(a.victims, a.why, preempt=a.preempt)
                    await self.memory.await_recovery(load)
                    continue
                blockers = self.memory.blockers(load, self.models.values())
                self._set_blocked(m, blockers)
                if any(self._claimed(b) for b in blockers):
                    # The scheduler makes them way in bounded time (by rank and swap_batch):
                    # gpu.admission_timeout counts from when they have, and meanwhile no
                    # more important idle model is evicted on a guess (ski rental).
                    started = self._clock()
                self._room_changed.clear()
                await _wait_event(self._room_changed, a.wait_s)
                await self.memory.look_again(load)
        finally:
            self._set_blocked(m, ())

    def _set_blocked(self, m: Model, blockers: tuple[str, ...]) -> None:
        if blockers == m.blocked_by:
            return
        if not m.blocked_by:
            m.blocked_since = self._clock()
        elif not blockers:
            m.blocked_since = None
        m.blocked_by = blockers
        self._changed()

    def _claimed(self, key: str) -> bool:
        """Whether a model blocking a load keeps its memory until the scheduler says."""
        b = self.models.get(key)
        return b is not None and b.scheduled and not b.yielding

    async def _post_load(self, m: Model, child: Child, runner: dict[str, Any]) -> None:
        """Ask the child to load the model and wait until it has."""
        m.embedding = await child.api.load(m.name, runner, embedding=m.embedding)
        await self._refresh_sizes(child, m)

    async def _undo_spill(self, m: Model, child: Child) -> bool:
        """Unload a partial load (layers on the CPU) unless the model allows it; whether it did."""
        if not m.size or m.size_vram >= m.size:
            return False
        mc = self.cfg.model(m.name)
        if mc is not None and mc.allow_cpu_spill:
            log.warning(
                "%s loaded partly on the CPU (%d of %d bytes on the GPU), as allowed",
                m.name,
                m.size_vram,
                m.size,
            )
            return False
        why = (
            f"loaded only {m.size_vram / 2**30:.1f} of {m.size / 2**30:.1f} GiB on the GPU "
            "(CPU spill is off for this model); unloaded to make room properly"
        )
        log.warning("%s %s", m.name, why)
        self._events.record_event("spill", model=m.name, backend=child.name, reason=why)
        await child.api.unload(m.name)
        await self._wait_gone(child, m)
        m.size_vram = 0
        return True

    async def _refresh_sizes(self, child: Child, m: Model) -> None:
        try:
            runners = await self.derived.runners(child)
        except ChildAPIError:
            return
        for r in runners:
            if _is_runner_of(r, m):
                m.size = r.size
                m.size_vram = r.size_vram
                m.digest = r.digest or m.digest
                m.context_length = _context_length(r)

    # -- operator and client requests -------------------------------------------------------------

    async def load(self, name: str, child: Child, reason: str) -> Model:
        """Load a model now (shared with any load already under way); it then idles as usual."""
        async with self._hold(name, child, None, reason) as lease:
            pass
        return lease.model

    async def unload(self, name: str, reason: str) -> str:
        """Unload a model now (every replica of it), or as soon as its in-flight requests
        finish; say which."""
        name = normalize_model(name)
        # Ollama unloads a shared runner by any of its names.
        runners = self.runners_of(name)
        outcomes = [await self._unload_one(m, reason) for m in runners]
        if not outcomes:
            return "not loaded"
        if len(set(outcomes)) == 1:
            return outcomes[0]
        return "; ".join(f"{m.backend}: {o}" for m, o in zip(runners, outcomes, strict=True))

    async def _unload_one(self, m: Model, reason: str) -> str:
        if m.in_flight > 0 or m.state is MState.LOADING:
            m.unload_when_idle = True
            return "will unload when its in-flight requests finish"
        if m.state is MState.UNLOADING:  # already on its way out
            await m.changed.wait()
            return "unloaded"
        await self._unload(m, reason)
        return "unloaded"

    async def evict(self, m: Model, reason: str) -> None:
        """Unload a model to free memory; a busy one (preemption) loses its requests."""
        for task in list(m.holders):
            task.cancel()
        await self._unload(m, reason, kind="evict")

    async def _evict_all(self, keys: tuple[str, ...], why: str, *, preempt: bool) -> None:
        """Evict the model records memory chose; one that became busy meanwhile is kept unless
        preempting (the caller then looks again)."""
        for key in keys:
            m = self.models.get(key)
            if m is None or m.state is not MState.LOADED:
                continue
            if not m.busy:
                await self.evict(m, why)
            elif preempt:
                await self.evict(m, why + "; preempted while busy")

    async def _unload(self, m: Model, reason: str, kind: str = "unload") -> None:
        child = self.backends.children.get(m.backend)
        self._set_state(m, MState.UNLOADING)
        m.deadline = None
        try:
            if child is not None and child.running:
                await child.api.unload(m.name)
                await self._wait_gone(child, m)
        except ChildAPIError as e:
            log.warning("unloading %s on %s failed: %s", m.name, m.backend, e)
        finally:
            m.unload_when_idle = False
            if m.state is MState.UNLOADING:  # else the child died meanwhile and said so
                self._set_state(m, MState.UNLOADED, event=kind, reason=reason)
        log.info(
            "%s %s on %s: %s",
            "evicted" if kind == "evict" else "unloaded",
            m.name,
            m.backend,
            reason,
        )

    async def _wait_gone(self, child: Child, m: Model) -> None:
        """Ollama unloads asynchronously: wait until /api/ps no longer lists the model."""
        deadline = time.monotonic() + UNLOAD_CONFIRM_S
        delay = 0.02
        while time.monotonic() < deadline:
            if not any(_is_runner_of(r, m) for r in await self.derived.runners(child)):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        log.warning(
            "%s still listed by %s %.0fs after unload", m.name, child.name, UNLOAD_CONFIRM_S
        )

    # -- background loops -------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """Unload idle models whose keep-alive has expired; pre-warm those predicted to be
        needed soon."""
        while True:
            due = self._timers_due = await self.tick()
            wait = None if due is None else max(0.0, due - self._clock())
            self._timers_changed.clear()
            await _wait_event(self._timers_changed, wait)

    async def tick(self) -> float | None:
        """Act on every timer due by the clock now; return when the next one is due."""
        now = self._clock()
        due = [
            m
            for m in self.models.values()
            if m.deadline is not None
            and m.deadline <= now
            and not m.busy
            and m.state is MState.LOADED
        ]
        for m in self.models.values():
            if (
                m.prewarm_at is not None
                and m.prewarm_at <= now
                and m.in_flight == 0
                and m.state is MState.UNLOADED
            ):
                self._prewarm(m)
        for m in due:
            if not m.busy and m.state is MState.LOADED:  # may have changed meanwhile
                ka = m.keep_alive
                why = (
                    "unload requested"
                    if m.unload_when_idle
                    else (
                        f"idle past its keep-alive of {_fmt_s(ka.keep_alive_s)} ({ka.source})"
                        if ka is not None and ka.keep_alive_s is not None
                        else "idle"
                    )
                )
                try:
                    await self._unload(m, why)
                except Exception:  # one bad answer from a child must not stop the timers
                    log.exception("unloading %s failed", m.name)
        deadlines = [
            t for m in self.models.values() for t in (m.deadline, m.prewarm_at) if t is not None
        ]
        return min(deadlines) if deadlines else None

    def load_time(self, name: str) -> float:
        """How long the model takes to load: measured (by the store, else on any copy of it),
        else a guess."""
        m = next((r for r in self.models.values() if r.name == name and r.last_load_s), None)
        return modelinfo.policy_inputs(self.cfg, self._history, name, m).load_s

    def add_replica(self, name: str, child: Child, reason: str) -> bool:
        """Start loading one more copy of a replicated model on `child` for the requests
        waiting for it, through admission like any load but without waiting for memory: free
        memory or idle less important models, else it fails at once (logged, an event);
        whether it started. Once loaded it idles out on the model's keep-alive like any other
        record."""
        if not child.running:
            return False
        m = self._record(name, child)
        if m.state is not MState.UNLOADED or not m.replica:
            return False
        # As the model's other copies were loaded: requests are fitted to those options.
        sibling = next((r for r in self.runners_of(name) if r.runner_options), None)
        m.extra = True  # the backlog may be gone by the time memory would free up
        self._start_load(m, child, sibling.runner_options if sibling else None, reason)
        return True

    def _prewarm(self, m: Model) -> None:
        """Reload a model just before its predicted next request, into free memory only (not
        an extra copy: one loaded copy serves a predicted request)."""
        m.prewarm_at = None
        child = self.backends.children.get(m.backend)
        if child is None or not child.running or any(r is not m for r in self.runners_of(m.name)):
            return
        m.prewarmed = True
        # As its last load was: a pre-warm with other runner options would be reloaded.
        self._start_load(
            m, child, m.runner_options, reason="pre-warm for its predicted next request"
        )

    async def run_pressure(self) -> None:
        """Every [gpu] interval: above the high watermark, evict idle models to the low one."""
        while True:
            try:
                await self.relieve()
            except ChildAPIError as e:
                log.warning("pressure check failed: %s", e)
            except Exception:  # never let one bad reading stop the pressure loop
                log.exception("pressure check failed")
            await asyncio.sleep(self.cfg.gpu.interval)

    async def relieve(self) -> list[str]:
        """One pressure check; returns the models it evicted."""
        evicted: list[str] = []
        for d in await self.memory.over_watermark():
            relief = self.memory.relief(d, self.models.values())
            if relief is not None:
                await self._evict_all(relief.victims, relief.why, preempt=False)
                evicted += relief.victims
        return evicted

    async def pinned_fit_error(self, cfg: Config, extra: str | None = None) -> str | None:
        """Why the pinned models of `cfg` (plus `extra`) cannot all stay in GPU memory."""
        return await self.memory.pinned_fit_error(cfg, self.models, extra)

    async def run_reconcile(self) -> None:
        """Keep model state true to each child's /api/ps, after restarts or outside unloads."""
        while True:
            try:
                await self.reconcile()
            except Exception:  # a confusing answer from a child must not stop reconciliation
                log.exception("reconciliation failed")
            await asyncio.sleep(RECONCILE_INTERVAL_S)

    async def reconcile(self) -> None:
        """One pass of reconciliation against every child (and a fresh look at what is pulled)."""
        await self.backends.refresh_tags()
        for child in list(self.backends.children.values()):
            gen = self._generations.get(child.name)
            if gen is not None and gen != child.generation:
                self.child_restarted(child, "backend restarted")
            self._generations[child.name] = child.generation
            if not child.running:
                continue
            started = self._clock()
            try:
                runners = await self.derived.runners(child)
            except ChildAPIError:
                continue
            listed = {r.name: r for r in runners if r.name}
            for name, r in listed.items():
                # A runner llmd knows under another name of the same digest is that record.
                m = next(
                    (
                        k
                        for k in self.models.values()
                        if k.backend == child.name
                        and k.state is not MState.UNLOADED
                        and k.digest is not None
                        and k.digest == r.digest
                    ),
                    None,
                ) or self._record(name, child)
                if m.changed_at > started or m.backend != child.name:
                    continue
                m.size = r.size
                m.size_vram = r.size_vram
                m.digest = r.digest or m.digest
                m.context_length = _context_length(r)
                if m.state is MState.UNLOADED:
                    m.runner_options = None  # loaded outside llmd, with options unknown
                    self._set_state(
                        m, MState.LOADED, event="load", reason="found loaded in backend"
                    )
                    if m.in_flight == 0:
                        self._arm(m, self._clock())
            for m in self.models.values():
                if (
                    m.backend == child.name
                    and m.state is MState.LOADED
                    and not any(_is_runner_of(r, m) for r in listed.values())
                    and m.changed_at <= started
                ):
                    self._set_state(
                        m,
                        MState.UNLOADED,
                        event="unload",
                        reason="no longer loaded in the backend (unloaded outside llmd)",
                    )

    def child_restarted(self, child: Child, reason: str) -> None:
        """A child died or restarted: whatever it had loaded is gone."""
        for m in self.models.values():
            if m.backend == child.name and m.state in (MState.LOADED, MState.UNLOADING):
                self._set_state(m, MState.UNLOADED)
        # Handled: reconcile records the new child's generation without resetting it again.
        self._generations.pop(child.name, None)

    def in_flight_on(self, backend: str) -> int:
        """Requests in flight on a backend, counted per model."""
        return sum(m.in_flight for m in self.models.values() if m.backend == backend)

    async def preload(self) -> None:
        """Load `preload = true` models at startup, most important first."""
        for mc in sorted(self.cfg.models, key=lambda mc: mc.priority):
            if not mc.preload:
                continue
            child = await self.backends.locate(mc.name)
            if child is None or not child.running:
                log.warning("preload of %s skipped: its backend is not running", mc.name)
                continue
            try:
                await self.load(mc.name, child, reason="preload")
            except LoadError as e:
                log.error("preload of %s failed: %s", mc.name, e.message)
            except Exception:  # the next model's preload and the daemon go on regardless
                log.exception("preload of %s failed", mc.name)

    async def close(self) -> None:
        """Cancel loads still under way."""
        for task in list(self._loads):
            task.cancel()
        for task in list(self._loads):
            with contextlib.suppress(BaseException):
                await task


async def _wait_event(event: asyncio.Event, timeout: float | None) -> None:
    """Wait until the event is set or `timeout` seconds (None: no limit) have passed.

    Not asyncio.wait_for: on Python 3.11 it loses a cancellation that comes as the event is
    set, and a load or the timers loop would then outlive llmd's shutdown."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def _is_runner_of(r: Runner, m: Model) -> bool:
    """Whether an /api/ps entry is the model's runner: its name, or the same digest."""
    if r.name == m.name:
        return True
    return m.digest is not None and r.digest == m.digest


def _context_length(r: Runner) -> int | None:
    """The context a runner was loaded with, from /api/ps (Ollama 0.10 and later)."""
    n = r.raw.get("context_length")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def _fmt_s(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}m"
    return f"{s:g}s"
