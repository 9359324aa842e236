"""Every model's lifecycle: in-flight counts, shared loads, keep-alive timers, reconciliation."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from llmd import policy
from llmd.backends import Backends
from llmd.config import Config, ModelConfig, normalize_model
from llmd.process import Child

if TYPE_CHECKING:
    from llmd.memory import Memory

log = logging.getLogger("llmd.lifecycle")

LOAD_TIMEOUT_S = 600.0
DEFAULT_PRIORITY = ModelConfig.priority
UNLOAD_CONFIRM_S = 15.0
UNLOAD_TIMEOUT_S = 30.0  # Ollama answers an unload at once; a hung child must not stall timers
RECONCILE_INTERVAL_S = 5.0
# Runner options that make Ollama reload a model (api/types.go api.Runner): a shared load
# passes them along so the request that follows does not reload it again.
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")


class MState(enum.Enum):
    """Where a model is in its lifecycle."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


class LoadError(Exception):
    """A model could not be loaded; carries the HTTP status and Ollama's message."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class EventSink(Protocol):
    """Where lifecycle events go (the store)."""

    def record_event(
        self, kind: str, *, model: str | None = None, backend: str | None = None, reason: str = ""
    ) -> None: ...


# A model's current keep-alive and where it comes from (pinned, fixed, default, adaptive...).
KeepAlive = policy.KeepAliveDecision


class KeepAliveFn(Protocol):
    """A model's keep-alive, given how long it has been idle already (0 as it goes idle)."""

    def __call__(self, m: Model, idle_s: float = 0.0, /) -> KeepAlive: ...


@dataclass
class Model:
    """Live state of one model."""

    name: str
    backend: str
    state: MState = MState.UNLOADED
    # What the backend's runner is keyed by (Ollama's scheduler keys runners by the model's
    # file, not its name): two names with one digest share one runner, listed under the first.
    digest: str | None = None
    in_flight: int = 0
    deadline: float | None = None  # monotonic time at which an idle model unloads
    idle_since: float | None = None
    size: int = 0
    size_vram: int = 0
    last_load_s: float | None = None
    loads: int = 0
    unload_when_idle: bool = False
    embedding: bool = False
    changed_at: float = 0.0
    load_task: asyncio.Task[float] | None = None
    # The request handlers holding the model, so that a preempting eviction can cancel them.
    holders: set[asyncio.Task[Any]] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    keep_alive: KeepAlive | None = None
    prewarm_at: float | None = None  # monotonic time to reload an idle, unloaded model
    prewarm_expire_at: float | None = None
    prewarmed: bool = False  # loaded by pre-warm and not used since


@dataclass
class Lease:
    """One request's hold on a model; `waited_for_load` says whether it had to wait for a load."""

    model: Model
    child: Child
    waited_for_load: bool
    load_s: float | None


class History(Protocol):
    """What the policy learns from (the store)."""

    def pins(self) -> set[str]: ...

    def idle_histogram(self, model: str, days: int = 14) -> policy.IdleHistogram: ...

    def model_facts(self, model: str) -> Any: ...


# Before a model's first measured load: what a 7B-class model costs, roughly.
GUESS_LOAD_S = 10.0
GUESS_SIZE_GB = 5.0


def policy_keep_alive(cfg: Config, history: History) -> KeepAliveFn:
    """Keep-alive per model: pinned, a fixed override, or learned from its idle gaps."""
    k = cfg.keep_alive

    def decide(m: Model, idle_s: float = 0.0, /) -> KeepAlive:
        mc = cfg.model(m.name)
        if (mc is not None and mc.pin) or m.name in history.pins():
            return policy.pinned_decision()
        mode = mc.keep_alive if mc is not None else None
        if isinstance(mode, float):
            return policy.fixed_decision(mode)
        if mode is None and k.policy == "fixed":
            return policy.default_decision(k.default)
        facts = history.model_facts(m.name)
        load_s = (facts.load_s if facts is not None and facts.load_s else None) or (
            m.last_load_s or GUESS_LOAD_S
        )
        size = (facts.size or facts.size_vram if facts is not None else None) or m.size
        return policy.decide_keep_alive(
            history.idle_histogram(m.name),
            load_s=load_s,
            size_gb=size / 1e9 if size else GUESS_SIZE_GB,
            priority=mc.priority if mc is not None else DEFAULT_PRIORITY,
            beta=k.beta,
            min_s=k.min,
            max_s=k.max,
            default_s=k.default,
            prewarm=k.prewarm,
            idle_s=idle_s,
        )

    return decide


class Lifecycle:
    """Owns per-model state; the proxy and admin API go through acquire/release/load/unload."""

    def __init__(
        self,
        cfg: Config,
        backends: Backends,
        *,
        session: aiohttp.ClientSession,
        events: EventSink,
        keep_alive: KeepAliveFn,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.models: dict[str, Model] = {}
        self._session = session
        self._events = events
        self._keep_alive = keep_alive
        self._clock = clock
        self._timers_changed = asyncio.Event()
        self._generations: dict[str, int] = {}
        self.memory: Memory | None = None
        self.on_loaded: Callable[[Model, float], Awaitable[None]] | None = None

    def set_keep_alive_fn(self, fn: KeepAliveFn) -> None:
        """Swap the keep-alive decision (on reload) and re-arm idle timers with it."""
        self._keep_alive = fn
        for m in self.models.values():
            if m.state is MState.LOADED and m.in_flight == 0 and m.idle_since is not None:
                self._arm(m, m.idle_since)

    def keep_alive_of(self, m: Model) -> KeepAlive:
        """The keep-alive the model's idle timer uses (or would use, were it idle now)."""
        if m.keep_alive is not None and m.deadline is not None:
            return m.keep_alive
        return self._keep_alive(m)

    def model(self, name: str, child: Child) -> Model:
        """The state record of a model, created on first sight."""
        m = self.models.get(name)
        if m is None:
            m = self.models[name] = Model(name, child.name)
        elif m.backend != child.name and m.state is MState.UNLOADED:
            m.backend = child.name
        if m.state is MState.UNLOADED:
            m.digest = self.digest_of(name, child.name) or m.digest
        return m

    def digest_of(self, name: str, backend: str) -> str | None:
        """The digest a backend's /api/tags gives the name, if it was listed."""
        for t in self.backends.tags(backend):
            if t.get("name") == name and isinstance(t.get("digest"), str):
                return str(t["digest"])
        return None

    def runner_of(self, name: str, backend: str | None = None) -> Model | None:
        """The loaded (or loading, or unloading) model record that serves this name: its own,
        else another name's with the same digest on the same backend, as Ollama shares it."""
        own = self.models.get(name)
        if own is not None and own.state is not MState.UNLOADED:
            return own
        for m in self.models.values():
            if m.state is MState.UNLOADED or m.name == name or m.digest is None:
                continue
            if backend is not None and m.backend != backend:
                continue
            if self.digest_of(name, m.backend) == m.digest:
                return m
        return None

    def _for_request(self, name: str, child: Child) -> Model:
        """The record a request for `name` on `child` holds: the runner already serving the
        name there (under whichever name loaded it), else the name's own record."""
        shared = self.runner_of(name, child.name)
        if shared is not None and shared.name != name:
            log.debug("%s is served by the runner of %s (same digest)", name, shared.name)
            return shared
        return self.model(name, child)

    def _set_state(self, m: Model, state: MState) -> None:
        m.state = state
        m.changed_at = self._clock()
        m.changed.set()
        m.changed = asyncio.Event()

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
        self._timers_changed.set()
        task = asyncio.current_task()
        if task is not None:
            m.holders.add(task)
        try:
            waited, load_s = await self._ensure_loaded(m, child, options)
            yield Lease(m, child, waited, load_s)
        finally:
            if task is not None:
                m.holders.discard(task)
            self._release(m)

    def _release(self, m: Model) -> None:
        m.in_flight -= 1
        if m.in_flight == 0:
            now = self._clock()
            m.idle_since = now
            if m.state is MState.LOADED:
                self._arm(m, now)
            if self.memory is not None:
                self.memory.changed()

    def _arm(self, m: Model, idle_since: float) -> None:
        """Start (or re-start) an idle model's keep-alive timer."""
        if m.unload_when_idle:
            m.deadline = idle_since
        elif m.prewarmed:
            m.deadline = m.prewarm_expire_at  # pre-warmed for a request that has not come
        else:
            # Re-armed after a reload, the model may have been idle a while: the policy judges
            # the ongoing idle period by how long it has lasted.
            ka = m.keep_alive = self._keep_alive(m, max(self._clock() - idle_since, 0.0))
            m.deadline = None if ka.keep_alive_s is None else idle_since + ka.keep_alive_s
            m.prewarm_at = m.prewarm_expire_at = None
            if ka.prewarm_after_s is not None and ka.prewarm_expire_s is not None:
                m.prewarm_at = idle_since + ka.prewarm_after_s
                m.prewarm_expire_at = idle_since + ka.prewarm_expire_s
        self._timers_changed.set()

    async def _ensure_loaded(
        self, m: Model, child: Child, options: dict[str, Any] | None
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
                self._start_load(m, child, options, reason="request")

    def _start_load(
        self, m: Model, child: Child, options: dict[str, Any] | None, reason: str
    ) -> asyncio.Task[float]:
        self._set_state(m, MState.LOADING)  # UNLOADED -> LOADING
        m.backend = child.name
        m.unload_when_idle = False
        runner = {k: v for k, v in (options or {}).items() if k in RUNNER_OPTIONS}
        # Owned by the model record and awaited by every waiter, so never fire-and-forget.
        task = asyncio.get_running_loop().create_task(
            self._load(m, child, runner, reason), name=f"load-{m.name}"
        )
        m.load_task = task
        task.add_done_callback(_consume)  # a load nobody waits for any more still gets logged
        return task

    async def _load(self, m: Model, child: Child, runner: dict[str, Any], reason: str) -> float:
        try:
            return await self._admit_and_load(m, child, runner, reason)
        finally:
            if self.memory is not None:
                self.memory.release(m.name)  # loaded (the probe sees it) or failed

    async def _admit_and_load(
        self, m: Model, child: Child, runner: dict[str, Any], reason: str
    ) -> float:
        t0 = time.monotonic()
        try:
            for attempt in (1, 2):
                await self._admit(m, child, runner)  # the retry knows the measured size
                t0 = time.monotonic()
                await self._post_load(m, child, runner)
                if not await self._spilled(m, child, reason):
                    break
                if attempt == 2:
                    raise LoadError(
                        503,
                        f"{m.name} does not fit in GPU memory and would run partly on the "
                        "CPU (3-10x slower); set allow_cpu_spill = true for it to allow that",
                        int(self.cfg.gpu.admission_timeout),
                    )
        except BaseException as e:
            self._set_state(m, MState.UNLOADED)  # LOADING -> UNLOADED
            if isinstance(e, LoadError):
                self._events.record_event(
                    "load-failed", model=m.name, backend=child.name, reason=e.message
                )
            if isinstance(e, aiohttp.ClientError | TimeoutError):
                why = f"backend {child.name} failed while loading {m.name}: {e}"
                raise LoadError(503, why) from e
            raise
        load_s = time.monotonic() - t0
        m.last_load_s = load_s
        m.loads += 1
        self._set_state(m, MState.LOADED)  # LOADING -> LOADED
        self._events.record_event(
            "load", model=m.name, backend=child.name, reason=f"{reason}; took {load_s:.2f}s"
        )
        log.info("loaded %s on %s in %.2fs (%s)", m.name, child.name, load_s, reason)
        if self.on_loaded is not None:
            await self.on_loaded(m, load_s)
        if m.in_flight == 0:
            self._arm(m, self._clock())
        return load_s

    async def _admit(self, m: Model, child: Child, runner: dict[str, Any]) -> None:
        """Make room on the backend's GPUs first, so that Ollama never evicts or spills."""
        if self.memory is None:
            return
        from llmd.memory import NoRoom

        try:
            # A pre-warm only uses free memory: it never evicts or waits.
            await self.memory.admit(m, child, runner, may_evict=not m.prewarmed)
        except NoRoom as e:
            raise LoadError(503, e.message, e.retry_after_s) from None

    async def _post_load(self, m: Model, child: Child, runner: dict[str, Any]) -> None:
        """Ask the child to load the model and wait until it has."""
        body: dict[str, Any] = {"model": m.name, "keep_alive": -1}
        if runner:
            body["options"] = runner
        if m.embedding:
            status, data = await self._post(child, "/api/embed", {**body, "input": []})
        else:
            status, data = await self._post(child, "/api/generate", body)
            if status == 400 and "does not support generate" in str(data.get("error", "")):
                m.embedding = True  # Ollama loads an embedding model with an empty embed
                status, data = await self._post(child, "/api/embed", {**body, "input": []})
        if status != 200:
            raise LoadError(status, str(data.get("error") or f"load failed with {status}"))
        await self._refresh_sizes(child, m)

    async def _spilled(self, m: Model, child: Child, reason: str) -> bool:
        """A partial load (layers on the CPU) is undone unless the model allows it."""
        if not m.size or m.size_vram >= m.size or self.memory is None:
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
        await self._post(child, "/api/generate", {"model": m.name, "keep_alive": 0})
        await self._wait_gone(child, m)
        m.size_vram = 0
        return True

    async def _post(
        self, child: Child, path: str, body: dict[str, Any], timeout: float = LOAD_TIMEOUT_S
    ) -> tuple[int, Any]:
        async with self._session.post(
            child.url + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            try:
                data = await r.json(content_type=None)
            except ValueError:
                data = {"error": (await r.text())[:200]}
            return r.status, data if isinstance(data, dict) else {}

    async def _refresh_sizes(self, child: Child, m: Model) -> None:
        try:
            ps = await self.backends.fetch_json(child, "/api/ps")
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return
        for entry in ps.get("models") or []:
            if _is_runner_of(entry, m):
                m.size = int(entry.get("size") or 0)
                m.size_vram = int(entry.get("size_vram") or 0)
                if isinstance(entry.get("digest"), str):
                    m.digest = entry["digest"]

    # -- operator and client requests -------------------------------------------------------------

    async def load(self, name: str, child: Child, reason: str) -> Model:
        """Load a model now (shared with any load already under way); it then idles as usual."""
        async with self.lease(name, child) as lease:
            pass
        return lease.model

    async def unload(self, name: str, reason: str) -> str:
        """Unload a model now, or as soon as its in-flight requests finish; say which."""
        name = normalize_model(name)
        m = self.runner_of(name)  # Ollama unloads a shared runner by any of its names
        if m is None:
            return "not loaded"
        if m.in_flight > 0 or m.state is MState.LOADING:
            m.unload_when_idle = True
            return "will unload when its in-flight requests finish"
        await self._unload(m, reason)
        return "unloaded"

    async def evict(self, m: Model, reason: str) -> None:
        """Unload a model to free memory; a busy one (preemption) loses its requests."""
        for task in list(m.holders):
            task.cancel()
        await self._unload(m, reason, kind="evict")

    async def _unload(self, m: Model, reason: str, kind: str = "unload") -> None:
        child = self.backends.children.get(m.backend)
        self._set_state(m, MState.UNLOADING)  # LOADED -> UNLOADING
        m.deadline = None
        try:
            if child is not None and child.running:
                await self._post(
                    child, "/api/generate", {"model": m.name, "keep_alive": 0}, UNLOAD_TIMEOUT_S
                )
                await self._wait_gone(child, m)
        except (aiohttp.ClientError, TimeoutError) as e:
            log.warning("unloading %s on %s failed: %s", m.name, m.backend, e)
        finally:
            m.unload_when_idle = False
            m.size_vram = 0
            self._set_state(m, MState.UNLOADED)  # UNLOADING -> UNLOADED
            if self.memory is not None:
                self.memory.changed()
        self._events.record_event(kind, model=m.name, backend=m.backend, reason=reason)
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
            ps = await self.backends.fetch_json(child, "/api/ps")
            if not any(_is_runner_of(e, m) for e in (ps or {}).get("models") or []):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.25)
        log.warning(
            "%s still listed by %s %.0fs after unload", m.name, child.name, UNLOAD_CONFIRM_S
        )

    # -- background loops -------------------------------------------------------------------------

    async def run_timers(self) -> None:
        """Unload idle models whose keep-alive has expired."""
        while True:
            now = self._clock()
            due = [
                m
                for m in self.models.values()
                if m.deadline is not None
                and m.deadline <= now
                and m.in_flight == 0
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
                if m.in_flight == 0 and m.state is MState.LOADED:  # may have changed meanwhile
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
            wait = None if not deadlines else max(0.0, min(deadlines) - self._clock())
            self._timers_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._timers_changed.wait(), wait)

    def _prewarm(self, m: Model) -> None:
        """Reload a model just before its predicted next request, into free memory only."""
        m.prewarm_at = None
        child = self.backends.children.get(m.backend)
        if child is None or not child.running:
            return
        m.prewarmed = True
        self._start_load(m, child, None, reason="pre-warm for its predicted next request")

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
                ps = await self.backends.fetch_json(child, "/api/ps")
            except (aiohttp.ClientError, TimeoutError, ValueError):
                continue
            listed = {e.get("name"): e for e in ps.get("models") or [] if e.get("name")}
            for name, entry in listed.items():
                # A runner llmd knows under another name of the same digest is that record.
                digest = entry.get("digest")
                m = next(
                    (
                        k
                        for k in self.models.values()
                        if k.backend == child.name
                        and k.state is not MState.UNLOADED
                        and k.digest is not None
                        and k.digest == digest
                    ),
                    None,
                ) or self.model(name, child)
                if m.changed_at > started or m.backend != child.name:
                    continue
                m.size = int(entry.get("size") or 0)
                m.size_vram = int(entry.get("size_vram") or 0)
                if isinstance(digest, str):
                    m.digest = digest
                if m.state is MState.UNLOADED:
                    self._set_state(m, MState.LOADED)  # UNLOADED -> LOADED (loaded outside llmd)
                    self._events.record_event(
                        "load", model=name, backend=child.name, reason="found loaded in backend"
                    )
                    if m.in_flight == 0:
                        self._arm(m, self._clock())
            for m in self.models.values():
                if (
                    m.backend == child.name
                    and m.state is MState.LOADED
                    and not any(_is_runner_of(e, m) for e in listed.values())
                    and m.changed_at <= started
                ):
                    self._set_state(m, MState.UNLOADED)  # LOADED -> UNLOADED (outside llmd)
                    m.deadline = None
                    m.size_vram = 0
                    self._events.record_event(
                        "unload",
                        model=m.name,
                        backend=child.name,
                        reason="no longer loaded in the backend (unloaded outside llmd)",
                    )

    def child_restarted(self, child: Child, reason: str) -> None:
        """A child died or restarted: whatever it had loaded is gone."""
        for m in self.models.values():
            if m.backend == child.name and m.state in (MState.LOADED, MState.UNLOADING):
                self._set_state(m, MState.UNLOADED)  # LOADED -> UNLOADED (child gone)
                m.deadline = None
                m.size_vram = 0
        # Handled: reconcile records the new child's generation without resetting it again.
        self._generations.pop(child.name, None)

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
        for m in list(self.models.values()):
            if m.load_task is not None and not m.load_task.done():
                m.load_task.cancel()
                with contextlib.suppress(BaseException):
                    await m.load_task


def _is_runner_of(entry: dict[str, Any], m: Model) -> bool:
    """Whether an /api/ps entry is the model's runner: its name, or the same digest."""
    if entry.get("name") == m.name:
        return True
    return m.digest is not None and entry.get("digest") == m.digest


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a background load's outcome, so a failure is logged, not 'never retrieved'."""
    if not task.cancelled() and task.exception() is not None:
        log.info("background load failed: %s", task.exception())


def _fmt_s(s: float) -> str:
    if s >= 3600 and s % 3600 == 0:
        return f"{s / 3600:g}h"
    if s >= 60 and s % 60 == 0:
        return f"{s / 60:g}m"
    return f"{s:g}s"
