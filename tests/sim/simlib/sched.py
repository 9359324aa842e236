"""The scheduler: loads, shares, keeps alive and evicts runners like Ollama's server/sched.go."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from . import logs
from .config import Settings
from .durations import FOREVER_S, epoch_to_go_time
from .gpu import Allocation, Device, GpuState, free_bytes, select_visible, to_mib
from .memory import (
    PREFLIGHT_FRACTION,
    Estimate,
    OutOfMemory,
    Placement,
    estimate,
    place,
    predicted_vram,
)
from .store import Installed

# server/sched.go ErrMaxQueue (note the two spaces).
# How long a computing runner counts as busy after it last said so (see note_busy).
BUSY_HOLD_S = 1.5
ERR_MAX_QUEUE = "server busy, please try again.  maximum pending requests exceeded"


class SchedError(Exception):
    """A request cannot get a runner; carries the HTTP status and Ollama's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class RunnerOpts:
    """The api.Runner options: any difference from the loaded runner forces a reload."""

    num_ctx: int
    num_batch: int
    num_gpu: int
    main_gpu: int
    use_mmap: bool | None
    num_thread: int


_INT_OPTS = {"num_ctx": None, "num_batch": 512, "num_gpu": -1, "main_gpu": 0, "num_thread": 0}


def runner_opts(options: dict[str, Any], spec_ctx: int, default_ctx: int) -> RunnerOpts:
    """Runner options from a request's `options`, num_ctx clamped to the training context."""
    vals: dict[str, Any] = {}
    for key, default in _INT_OPTS.items():
        v = options.get(key, default)
        if v is None:
            v = default_ctx if key == "num_ctx" else default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise SchedError(400, f'option "{key}" must be of type integer')
        vals[key] = int(v)
    mmap = options.get("use_mmap")
    if mmap is not None and not isinstance(mmap, bool):
        raise SchedError(400, 'option "use_mmap" must be of type boolean')
    # server/sched.go GetRunner: at least 4; clamped to the model's training context.
    vals["num_ctx"] = max(4, min(vals["num_ctx"], spec_ctx))
    return RunnerOpts(use_mmap=mmap, **vals)


@dataclass(eq=False)
class Runner:
    """One loaded (or loading) model."""

    id: str
    key: str
    installed: Installed
    opts: RunnerOpts
    num_parallel: int
    size: int
    placement: Placement
    session_s: float
    slots: asyncio.Semaphore
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)
    ref: int = 0
    loading: bool = True
    expires_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    busy_until: float = 0.0  # wall clock: as last written to the GPU state file

    @property
    def name(self) -> str:
        """Short name of the model as it was loaded."""
        return self.installed.display

    @property
    def slowdown(self) -> float:
        """Time-per-token factor from layers spilled to the CPU."""
        return self.placement.slowdown


@dataclass(eq=False)
class _Pending:
    installed: Installed
    opts: RunnerOpts
    keep_alive: float | None
    fut: asyncio.Future[Runner]

    @property
    def key(self) -> str:
        return self.installed.spec.blob_digest


class _PendingQueue:
    """server/sched.go pendingReqCh: a non-blocking send into a channel of capacity MAX_QUEUE."""

    def __init__(self, capacity: int) -> None:
        self.items: collections.deque[_Pending] = collections.deque()
        self.capacity = capacity
        self.waiter: asyncio.Future[_Pending] | None = None

    def put_nowait(self, item: _Pending) -> bool:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(item)
            return True
        if len(self.items) >= self.capacity:
            return False
        self.items.append(item)
        return True

    async def get(self) -> _Pending:
        if self.items:
            return self.items.popleft()
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            return await self.waiter
        finally:
            self.waiter = None


class Scheduler:
    """Owns every runner of this process and the pending-load queue."""

    def __init__(self, settings: Settings, gpu: GpuState) -> None:
        self.settings = settings
        self.gpu = gpu
        self.loaded: dict[str, Runner] = {}
        self.queue = _PendingQueue(settings.max_queue)
        self.loads = 0

    # -- devices -------------------------------------------------------------------------------

    def visible(self, devices: list[Device]) -> list[Device]:
        """The devices CUDA_VISIBLE_DEVICES lets this process use."""
        return select_visible(devices, self.settings.visible_devices)

    def visible_free(self) -> dict[int, int]:
        """Free bytes of each visible device, counting every process's allocations."""
        devices, allocs = self.gpu.snapshot()
        vis = self.visible(devices)
        return free_bytes(vis, allocs)

    def max_runners(self) -> int:
        """OLLAMA_MAX_LOADED_MODELS, or 3 per visible GPU (3 on CPU only)."""
        if self.settings.max_loaded_models > 0:
            return self.settings.max_loaded_models
        devices, _ = self.gpu.snapshot()
        return 3 * max(1, len(self.visible(devices)))

    # -- request side --------------------------------------------------------------------------

    def options_for(self, installed: Installed, options: dict[str, Any]) -> RunnerOpts:
        """A request's runner options, validated: the defaults, then the model's own parameters
        (its Modelfile's PARAMETERs), then the request's (server/routes.go modelOptions)."""
        spec = installed.spec
        merged = {**installed.parameters, **options}
        return runner_opts(merged, spec.context_length, self.settings.context_length)

    async def acquire(
        self, installed: Installed, options: dict[str, Any], keep_alive: float | None
    ) -> Runner:
        """Attach to a runner for this model, loading it (via the pending queue) if needed."""
        opts = self.options_for(installed, options)
        key = installed.spec.blob_digest
        r = self.loaded.get(key)
        if r is not None and not r.loading and r.opts == opts:
            # Fast path: a loaded runner that needs no reload skips the queue.
            self._attach(r, keep_alive)
            return r
        fut: asyncio.Future[Runner] = asyncio.get_running_loop().create_future()
        if not self.queue.put_nowait(_Pending(installed, opts, keep_alive, fut)):
            raise SchedError(503, ERR_MAX_QUEUE)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())
            raise

    def _attach(self, r: Runner, keep_alive: float | None) -> None:
        # server/sched.go useLoadedRunner: ref++, stop the timer, last keep_alive wins.
        r.ref += 1
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if keep_alive is not None:
            r.session_s = keep_alive

    def release(self, r: Runner) -> None:
        """A request finished with r; at zero in-flight the keep-alive timer starts."""
        r.ref -= 1
        if r.ref > 0 or self.loaded.get(r.key) is not r:
            return
        # server/sched.go processCompleted: expire now for duration 0, else (re)arm the timer.
        if r.session_s <= 0:
            self._unload(r, "expired")
            return
        if math.isinf(r.session_s):
            r.expires_at = time.time() + FOREVER_S
            return
        r.expires_at = time.time() + r.session_s
        r.timer = asyncio.get_running_loop().call_later(r.session_s, self._timer_fired, r)

    def _timer_fired(self, r: Runner) -> None:
        r.timer = None
        if r.ref <= 0 and self.loaded.get(r.key) is r:
            self._unload(r, "keep-alive expired")

    def expire(self, installed: Installed) -> None:
        """An unload request (empty prompt, keep_alive 0): unload now or when idle."""
        r = self.loaded.get(installed.spec.blob_digest)
        if r is None:
            return
        r.expires_at = time.time()
        self._expire_now(r, "unload requested")

    def _expire_now(self, r: Runner, reason: str) -> None:
        r.session_s = 0
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if r.ref <= 0:
            self._unload(r, reason)

    # -- scheduler loop ------------------------------------------------------------------------

    async def run(self) -> None:
        """server/sched.go processPending: one pending request at a time, FIFO."""
        while True:
            p = await self.queue.get()
            if p.fut.done():
                continue  # cancelled requests are skipped
            try:
                await self._schedule(p)
            except Exception as e:
                logs.error("sched.go:1", "scheduling failed", error=repr(e))
                if not p.fut.done():
                    p.fut.set_exception(SchedError(500, str(e)))

    async def _schedule(self, p: _Pending) -> None:
        while not p.fut.done():
            r = self.loaded.get(p.key)
            if r is not None:
                if r.opts == p.opts:
                    self._attach(r, p.keep_alive)
                    p.fut.set_result(r)
                    return
                victim, why = r, "reload: runner options changed"
            elif len(self.loaded) >= self.max_runners():
                victim, why = self.find_runner_to_unload(), "max runners reached"
            else:
                est = self._estimate(p)
                if not self.loaded:
                    await self._load(p, est)
                    return
                free = self.visible_free()
                # CPU only (no visible GPU): system memory is assumed to be plentiful.
                need = predicted_vram(est, p.opts.num_gpu) if free else 0
                if need <= PREFLIGHT_FRACTION * sum(free.values()):
                    await self._load(p, est)
                    return
                victim, why = self.find_runner_to_unload(), "not enough free memory"
            logs.info(
                "sched.go:1",
                "resetting model to expire immediately to make room",
                model=victim.name,
                refCount=victim.ref,
                reason=why,
            )
            self._expire_now(victim, why)
            await victim.unloaded.wait()

    def find_runner_to_unload(self) -> Runner:
        """server/sched.go findRunnerToUnload: shortest keep-alive first (ties by name), first idle
        one wins; if none is idle, the shortest one (the caller waits for it to finish)."""
        ordered = sorted(self.loaded.values(), key=lambda r: (r.session_s, r.name))
        for r in ordered:
            if r.ref <= 0:
                return r
        return ordered[0]

    def _num_parallel(self, p: _Pending) -> int:
        # Forced to 1 for embedding models (server/sched.go load).
        return 1 if p.installed.spec.embedding else self.settings.num_parallel

    def _estimate(self, p: _Pending) -> Estimate:
        return estimate(p.installed.spec, p.opts.num_ctx, self._num_parallel(p))

    async def _load(self, p: _Pending, est: Estimate) -> None:
        self.loads += 1
        n = self.loads
        faults = self.settings.faults
        spec = p.installed.spec
        runner_id = f"r{n}"
        chosen: list[Placement] = []

        def plan(devices: list[Device], live: list[Allocation]) -> list[Allocation]:
            vis = self.visible(devices)
            placement = place(est, p.opts.num_gpu, free_bytes(vis, live))
            chosen.append(placement)
            mine = [a for a in live if a.pid == self.gpu.pid]
            for idx, nbytes in placement.per_device.items():
                mine.append(
                    Allocation(
                        self.gpu.pid,
                        self.gpu.token,
                        idx,
                        to_mib(nbytes),
                        nbytes,
                        p.installed.display,
                        runner_id,
                    )
                )
            return mine

        try:
            self.gpu.update_own(plan)
        except OutOfMemory as e:
            p.fut.set_exception(SchedError(500, f"llama runner process has terminated: {e}"))
            return
        placement = chosen[-1]
        runner = Runner(
            id=runner_id,
            key=p.key,
            installed=p.installed,
            opts=p.opts,
            num_parallel=self._num_parallel(p),
            size=est.total,
            placement=placement,
            session_s=self.settings.keep_alive_s if p.keep_alive is None else p.keep_alive,
            slots=asyncio.Semaphore(self._num_parallel(p)),
            ref=1,
        )
        self.loaded[p.key] = runner
        logs.info(
            "server.go:1",
            "offload",
            model=runner.name,
            library="cuda" if placement.vram else "cpu",
            **{"layers.model": est.layers, "layers.offload": placement.gpu_layers},
            parallel=runner.num_parallel,
            **{"memory.required.full": f"{est.total / 2**30:.1f} GiB"},
            **{"memory.required.allocations": f"{placement.vram / 2**30:.1f} GiB"},
        )
        started = time.monotonic()
        delay = spec.load_seconds / self.settings.speed
        if faults.exit_during_load == n:
            await asyncio.sleep(delay / 2)
            logs.error("sched.go:1", "simulated crash during model load (OLLAMA_SIM_FAULTS)")
            sys.stderr.flush()
            os._exit(1)
        await asyncio.sleep(delay)
        if faults.fail_load == n:
            runner.ref = 0
            self._unload(runner, "load failed")
            p.fut.set_exception(
                SchedError(
                    500,
                    "llama runner process has terminated: error loading model: "
                    "simulated load failure (OLLAMA_SIM_FAULTS fail_load)",
                )
            )
            return
        runner.loading = False
        logs.info(
            "server.go:1",
            f"llama runner started in {time.monotonic() - started:.2f} seconds",
            model=runner.name,
        )
        if p.fut.done():
            self.release(runner)  # the client went away during the load
        else:
            p.fut.set_result(runner)

    def note_busy(self, r: Runner) -> None:
        """The runner is computing: mark its memory busy for BUSY_HOLD_S in the GPU state file
        (nvidia-smi's utilisation, temperature and power follow it), rewriting the file at most
        every BUSY_HOLD_S / 2 per runner."""
        now = time.time()
        if r.busy_until - now > BUSY_HOLD_S / 2:
            return
        until = r.busy_until = now + BUSY_HOLD_S
        pid, rid = self.gpu.pid, r.id
        self.gpu.update_own(
            lambda _d, live: [
                dataclasses.replace(a, busy_until=until) if a.runner == rid else a
                for a in live
                if a.pid == pid
            ]
        )

    def _unload(self, r: Runner, reason: str) -> None:
        if self.loaded.get(r.key) is r:
            del self.loaded[r.key]
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        rid = r.id
        self.gpu.update_own(
            lambda _d, live: [a for a in live if a.pid == self.gpu.pid and a.runner != rid]
        )
        r.unloaded.set()
        logs.info("sched.go:1", "runner unloaded", model=r.name, reason=reason)

    # -- views ---------------------------------------------------------------------------------

    def ps(self) -> list[dict[str, Any]]:
        """The /api/ps entries, latest expiry first."""
        now = time.time()
        rows: list[tuple[float, dict[str, Any]]] = []
        for r in self.loaded.values():
            exp = r.expires_at
            if exp is None:
                exp = now + (FOREVER_S if math.isinf(r.session_s) else r.session_s)
            rows.append(
                (
                    exp,
                    {
                        "name": r.name,
                        "model": r.name,
                        "size": r.size,
                        "digest": r.installed.digest,
                        "details": r.installed.spec.details(),
                        "expires_at": epoch_to_go_time(exp),
                        "size_vram": r.placement.vram,
                        "context_length": r.opts.num_ctx,
                    },
                )
            )
        rows.sort(key=lambda row: int(row[0]), reverse=True)
        return [row for _, row in rows]

    def shutdown(self) -> None:
        """Forget every runner and free this process's GPU memory."""
        for r in list(self.loaded.values()):
            if r.timer is not None:
                r.timer.cancel()
        self.loaded.clear()
        self.gpu.release_all()
