"""The set of `ollama serve` children, and which child owns which model."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import psutil

from llmd.childapi import Pulled
from llmd.config import BackendConfig, Config, diff_backends, normalize_model
from llmd.derived import is_derived
from llmd.process import CHILD_MARKER, Child, SpawnFn, State, default_spawn

log = logging.getLogger("llmd.backends")

StartTask = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


class Backends:
    """Owns every Child, starts and stops them, and places models on them."""

    def __init__(
        self,
        cfg: Config,
        *,
        session: aiohttp.ClientSession,
        start_task: StartTask,
        spawn: SpawnFn = default_spawn,
        on_exit: Callable[[Child, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.instance = str(cfg.daemon.admin_socket)
        self._session = session
        self._start_task = start_task
        self._spawn = spawn
        self._on_exit = on_exit
        self.children: dict[str, Child] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._tags: dict[str, list[Pulled]] = {}
        # The same, by name (looked up on every request for a model without a backend).
        self._by_name: dict[str, dict[str, Pulled]] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._tags_failing: set[str] = set()
        self._listing: set[str] = set()  # children whose models are being listed as they start
        # Replaced and set at every child state change or model list: wakes the waiters.
        self._changed = asyncio.Event()
        self._closing = False
        self.waiting = 0  # requests waiting for a child to come up
        for b in cfg.backends:  # shown as stopped (and their models as not known) until start()
            self._add_child(b)

    # -- lifecycle of the children ----------------------------------------------------------------

    def stop_stale(self) -> None:
        """Stop children an earlier llmd left behind (blocking: run it in a thread)."""
        for b in self.cfg.backends:
            stop_stale_children(b, self.instance)

    def start(self) -> None:
        """Start a supervisor per backend."""
        for b in self.cfg.backends:
            self._start_one(self.children[b.name])

    def _add_child(self, b: BackendConfig) -> Child:
        child = Child(
            b,
            instance=self.instance,
            session=self._session,
            spawn=self._spawn,
            on_exit=self._on_exit,
            on_change=self._child_changed,
        )
        self.children[b.name] = child
        return child

    def _start_one(self, child: Child) -> None:
        self._tasks[child.name] = self._start_task(child.supervise(), f"supervise-{child.name}")

    async def wait_settled(self) -> None:
        """Wait until every child is ready or has failed its first start."""
        await asyncio.gather(*(c.wait_settled() for c in self.children.values()))

    async def stop_all(self) -> None:
        """Stop every child in parallel."""
        await asyncio.gather(*(c.stop() for c in self.children.values()))

    def leaving(self, new: Config) -> list[Child]:
        """The children a reload to `new` would stop: removed or changed backends."""
        _, changed, removed = diff_backends(self.cfg, new)
        return [self.children[b.name] for b in removed + changed if b.name in self.children]

    async def configure(self, new: Config) -> list[str]:
        """Apply a reloaded config as a diff; an unchanged backend keeps its process."""
        added, changed, removed = diff_backends(self.cfg, new)
        self.cfg = new
        notes = []
        for b in removed + changed:
            # The daemon drained it first (see leaving()); stopped before it leaves the set,
            # so that meanwhile its requests get 503 + Retry-After.
            child = self.children[b.name]
            await child.stop()
            del self.children[b.name]
            if self._on_exit is not None:  # whatever it had loaded is gone
                self._on_exit(child, "stopped by a reload")
            self._tasks.pop(b.name, None)
            self._tags.pop(b.name, None)
            self._by_name.pop(b.name, None)
        for b in changed + added:
            self._start_one(self._add_child(b))
        for b in added:
            notes.append(f"backend {b.name} added")
        for b in changed:
            notes.append(f"backend {b.name} restarted with its new settings")
        for b in removed:
            notes.append(f"backend {b.name} removed")
        # Children keep their Config objects, but unchanged ones compare equal: refresh them.
        for b in new.backends:
            if b.name in self.children:
                self.children[b.name].configure(b)
        self._poke()  # waiters on a child that left look again
        return notes

    # -- waiting for children to come up ----------------------------------------------------------

    def coming_up(self) -> list[Child]:
        """The children not running now that will be without anyone's action (Child.coming_up)."""
        return [c for c in self.children.values() if c.coming_up]

    def listed(self, backend: str) -> bool:
        """Whether a backend's models are known (its /api/tags answered at least once)."""
        return backend in self._tags

    async def wait_running(self, child: Child, deadline: float) -> bool:
        """Wait while `child` is coming up, until `deadline` (time.monotonic()); whether it is
        running at the end."""
        await self.wait_for(lambda: not child.coming_up, deadline)
        return child.running

    async def wait_any_running(self, deadline: float) -> bool:
        """Wait until some child is running, while any is coming up, until `deadline`; whether
        one is running at the end."""
        await self.wait_for(
            lambda: self.first_running() is not None or not self.coming_up(), deadline
        )
        return self.first_running() is not None

    async def wait_for(self, ready: Callable[[], bool], deadline: float) -> bool:
        """Wait until ready() holds, looking again at every child state change and model list,
        until `deadline` (time.monotonic()) or stop_waiting(); whether it holds.

        A waiter that is cancelled (its client went away) simply leaves: it holds nothing."""
        self.waiting += 1
        try:
            while not ready():
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    return False
                # Not wait_for: on Python 3.11 it loses a cancellation (the client going away)
                # that comes as the event is set.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self._changed.wait()
            return True
        finally:
            self.waiting -= 1

    def stop_waiting(self) -> None:
        """End every wait for a child now and refuse new ones (llmd is shutting down)."""
        self._closing = True
        self._poke()

    def _poke(self) -> None:
        woken, self._changed = self._changed, asyncio.Event()
        woken.set()

    def _child_changed(self, child: Child, old: State, new: State) -> None:
        """A child changed state: list the models of one that came up unlisted, and wake the
        waiters."""
        name = child.name
        unlisted = name not in self._tags and name not in self._listing
        if new is State.RUNNING and unlisted and self.children.get(name) is child:
            coro = self._list_models(child)
            try:
                self._start_task(coro, f"tags-{name}")
                self._listing.add(name)
            except RuntimeError:  # the TaskGroup is shutting down: nobody needs the list
                coro.close()
        self._poke()

    async def _list_models(self, child: Child) -> None:
        """Read one child's /api/tags as it comes up (a task of the daemon's TaskGroup: never
        raises), so that its models are known without waiting for a request to ask."""
        try:
            res: list[Pulled] | BaseException = await child.api.tags()
        except Exception as e:
            res = e
        finally:
            self._listing.discard(child.name)
        if self.children.get(child.name) is child:
            self._record_tags(child, res)

    # -- placement --------------------------------------------------------------------------------

    def first_running(self) -> Child | None:
        """The first running child in config order."""
        for b in self.cfg.backends:
            c = self.children.get(b.name)
            if c is not None and c.running:
                return c
        return None

    def first(self) -> Child | None:
        """The first child in config order, running or not."""
        return next(
            (self.children[b.name] for b in self.cfg.backends if b.name in self.children), None
        )

    def configured_owner(self, model: str) -> Child | None:
        """The child a [[model]] entry names, if any."""
        m = self.cfg.model(model)
        if m is not None and m.backend is not None:
            return self.children.get(m.backend)
        return None

    def copies(self, model: str) -> list[Child]:
        """The children of a replicated model's backends, in config order ([] for any other
        model: see locate)."""
        m = self.cfg.model(model)
        if m is None or not m.replicated:
            return []
        return [self.children[b] for b in m.backends if b in self.children]

    async def locate(self, model: str) -> Child | None:
        """The child owning a model: its configured backend (for a replicated model, the first
        running one of its backends), else the first that has it pulled."""
        model = normalize_model(model)
        running = [c for c in self.copies(model) if c.running]
        if running:
            return running[0]
        owner = self.configured_owner(model)
        if owner is not None:
            return owner
        found = self._from_tags(model)
        if found is None:
            # Pulled since the last look, perhaps: look again (concurrent misses share one scan).
            await self.refresh_tags()
            found = self._from_tags(model)
        if found is None and self.cfg.model(model) is not None:
            return self.first()  # configured without a backend: the first one serves it
        return found

    def _from_tags(self, model: str) -> Child | None:
        for b in self.cfg.backends:
            child = self.children.get(b.name)
            if child is not None and model in self._by_name.get(b.name, ()):
                return child
        return None

    def missing(self, model: str, not_found: str | None = None) -> tuple[Child | None, str]:
        """Why locate() found no child for a model: the child that may yet have it, and a message.

        A child whose models have never been listed (it is still starting, or its /api/tags
        failed) may have the model: it is returned, so the client is told to retry rather than
        that the model does not exist. None means the model is not there, as far as anyone can
        know: a FATAL child's models stay unknown, but waiting will not help. `not_found` is
        the message for that case (the proxy words it as Ollama would for the endpoint)."""
        not_found = not_found or f"model '{model}' not found"
        unlisted = [c for name, c in self.children.items() if name not in self._tags]
        # One coming up first: a request may wait for it (see Proxy._located).
        waiting = sorted((c for c in unlisted if not c.fatal), key=lambda c: not c.coming_up)
        if waiting:
            c = waiting[0]
            why = c.error or ("its /api/tags failed" if c.running else c.state.value)
            return c, (
                f"model '{model}' is not on any backend listed so far; backend {c.name!r} "
                f"may have it but its models are not known yet ({why})"
            )
        if unlisted:
            return None, (
                f"{not_found} (backend {unlisted[0].name!r} is fatal, so its models are unknown)"
            )
        return None, not_found

    async def refresh_tags(self) -> None:
        """Re-read /api/tags from every running child; concurrent callers share one scan."""
        task = self._refreshing
        if task is None or task.done():  # a finished scan may predate the caller's question
            task = self._refreshing = self._start_task(self._scan_tags(), "scan-tags")
        await asyncio.shield(task)

    async def _scan_tags(self) -> None:
        """One scan (a task of the daemon's TaskGroup, shared by its callers: never raises)."""
        running = [c for c in self.children.values() if c.running]
        results = await asyncio.gather(*(c.api.tags() for c in running), return_exceptions=True)
        for child, res in zip(running, results, strict=True):
            self._record_tags(child, res)

    def _record_tags(self, child: Child, res: list[Pulled] | BaseException) -> None:
        """One child's /api/tags answer, or why there was none."""
        if isinstance(res, list):
            self.set_tags(child.name, res)
            if child.name in self._tags_failing:
                self._tags_failing.discard(child.name)
                log.info("backend %s: its models can be listed again", child.name)
        elif child.name not in self._tags_failing:  # once per failure, not every scan
            self._tags_failing.add(child.name)
            log.warning("backend %s: could not list its models: %s", child.name, _why(res))

    def set_tags(self, backend: str, models: list[Pulled]) -> None:
        """Record what a backend's /api/tags just said (but llmd's own derived models, which
        are not the backend's to route to, list or load: see llmd/derived.py)."""
        self._tags[backend] = [t for t in models if not is_derived(t.name)]
        # The first of a name wins, as the scans of the list did.
        self._by_name[backend] = {t.name: t for t in reversed(self._tags[backend])}
        self._poke()

    def tags(self, backend: str) -> list[Pulled]:
        """The last /api/tags models seen on a backend."""
        return self._tags.get(backend, [])

    def pulled(self, backend: str, name: str) -> Pulled | None:
        """A model as a backend's last /api/tags listed it, if it did."""
        return self._by_name.get(backend, {}).get(name)

    def digest_of(self, name: str, backend: str) -> str | None:
        """The digest a backend's /api/tags gives the name, if it was listed."""
        pulled = self.pulled(backend, name)
        return pulled.digest if pulled is not None else None


def stop_stale_children(b: BackendConfig, instance: str) -> None:
    """Stop children an earlier llmd left behind on this backend's port or under its name."""
    marker = f"{instance}:{b.name}"
    for proc in _stale_candidates(b.port):
        try:
            env_marker = proc.environ().get(CHILD_MARKER)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if env_marker is None:
            try:
                who = " ".join(proc.cmdline()) or proc.name()
            except psutil.Error:
                who = "?"
            log.error(
                "backend %s: port %d is held by pid %d (%s), which llmd did not start; "
                "stop it or change backend.port",
                b.name,
                b.port,
                proc.pid,
                who,
            )
            continue
        if env_marker != marker and not env_marker.startswith(f"{instance}:"):
            continue
        log.warning(
            "backend %s: stopping stale child pid %d left by an earlier llmd", b.name, proc.pid
        )
        _kill_group(proc)


def _stale_candidates(port: int) -> list[psutil.Process]:
    """Processes listening on the port."""
    pids: set[int] = set()
    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                pids.add(c.pid)
    except psutil.AccessDenied:
        return []
    procs = []
    for pid in pids:
        if pid == os.getpid():
            continue
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return procs


def _kill_group(proc: psutil.Process) -> None:
    """SIGTERM a stale child's process group, SIGKILL what is left after a few seconds."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    targets = [proc]
    try:
        targets += proc.children(recursive=True)
    except psutil.Error:
        pass
    try:
        os.killpg(pgid, signal.SIGTERM) if pgid != os.getpgid(0) else proc.terminate()
    except (ProcessLookupError, PermissionError):
        pass
    _, alive = psutil.wait_procs(targets, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2)


def _why(e: BaseException) -> str:
    """An exception as a log reason: aiohttp's TimeoutError has an empty message."""
    return str(e) or type(e).__name__
