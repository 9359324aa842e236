"""GPU memory: model footprints, and the decisions of admission and pressure relief.

Memory decides and the lifecycle acts: admission answers "admitted", "evict these first" or
"wait and ask again" (or raises NoRoom), and pressure relief names the models to evict; the
lifecycle does the evicting. Memory never changes a model's state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llmd import gpu, planner, policy
from llmd.backends import Backends
from llmd.config import Config
from llmd.models import History, Model, MState, NoRoom, policy_inputs
from llmd.process import Child

log = logging.getLogger("llmd.memory")

GiB = 1024**3
# How long freed memory may take to show in the probe after an unload (Ollama polls 5 s for it,
# server/sched.go waitForVRAMRecovery).
RECOVERY_WAIT_S = 5.0
RECHECK_S = 1.0
OLLAMA_PREFLIGHT = 0.8
# The context Ollama gives a model when nothing says otherwise, by the GPU memory it sees
# (envconfig, v0.15.5+): below 23 GiB 4096, below 47 GiB 32768, else 262144.
CONTEXT_TIERS = ((23 * GiB, 4096), (47 * GiB, 32768))
BIG_CONTEXT = 262144
# The priority a model making way for another counts with: below every configured one.
YIELDING_PRIORITY = 1_000_000


@dataclass(frozen=True)
class Footprint:
    """Predicted GPU bytes of a model and where the number comes from."""

    bytes: int
    basis: str  # measured | estimated | table | unknown


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Admission:
    """Memory's answer to one look at a cold load.

    admitted: go ahead (its memory is reserved until `release`). Otherwise, with victims:
    evict them (then look again); without: wait up to wait_s for a model to go idle or
    leave, or for other programs to free memory, then look again."""

    admitted: bool
    victims: tuple[str, ...] = ()
    why: str = ""  # the eviction's reason, for the log and the events
    preempt: bool = False  # evict busy victims too
    wait_s: float = 0.0


@dataclass
class ColdLoad:
    """A cold load asking for room: what it needs and where; `devices` as last read."""

    model: Model
    child: Child
    footprint: Footprint
    devices: list[gpu.Device]
    priority: int
    preempt: bool
    spill_ok: bool
    may_evict: bool
    may_wait: bool = True


@dataclass(frozen=True)
class Relief:
    """Models to evict to bring one GPU back under the high watermark."""

    victims: tuple[str, ...]
    why: str


class Memory:
    """Decides whether a cold model fits, and who leaves when it does not."""

    def __init__(
        self,
        cfg: Config,
        probe: gpu.Probe,
        *,
        backends: Backends,
        history: History,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.probe = probe
        self.snapshot: gpu.GpuSnapshot | None = None
        self._backends = backends
        self._history = history
        self._clock = clock
        self._estimates: dict[str, Footprint] = {}
        # Loads admitted but not yet seen by the probe: record key -> (bytes, GPU indexes).
        # Without this, two cold models requested at once would both be admitted into the same
        # memory.
        self._reserved: dict[str, tuple[int, frozenset[int]]] = {}

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config (watermarks, reserve, models' priorities and pins)."""
        self.cfg = cfg

    async def read(self) -> gpu.GpuSnapshot:
        """A fresh probe reading (also kept for status)."""
        self.snapshot = await self.probe.read()
        return self.snapshot

    # -- footprints -------------------------------------------------------------------------------

    def devices_of(self, child: Child, snap: gpu.GpuSnapshot) -> list[gpu.Device]:
        """The GPUs a backend's child may use."""
        if child.cfg.gpus is None:
            return list(snap.devices)
        return [d for d in snap.devices if d.index in child.cfg.gpus]

    def num_ctx(self, child: Child, devices: list[gpu.Device], options: dict[str, Any]) -> int:
        """The context Ollama will give the model: the request's, the backend's, else its tier."""
        for raw in (options.get("num_ctx"), child.cfg.env.get("OLLAMA_CONTEXT_LENGTH")):
            with contextlib.suppress(TypeError, ValueError):
                if raw is not None and int(raw) > 0:
                    return int(raw)
        total = sum(d.total_bytes for d in devices)
        for limit, ctx in CONTEXT_TIERS:
            if total < limit:
                return ctx
        return BIG_CONTEXT

    def known_footprint(self, name: str, m: Model | None, backend: str | None) -> Footprint | None:
        """What is known without asking a child: measured, an earlier estimate, else the size
        table from the model's /api/tags details."""
        # Ollama's /api/ps `size` is the whole model, whatever part of it sat on the GPU.
        if m is not None and m.size:
            return Footprint(m.size, "measured")
        facts = self._history.model_facts(name)
        if facts is not None and (facts.size or facts.size_vram):
            return Footprint(facts.size or facts.size_vram or 0, "measured")
        if name in self._estimates:
            return self._estimates[name]
        pulled = self._backends.pulled(backend or "", name)
        if pulled is not None and pulled.parameter_size and pulled.quantization_level:
            table = planner.table_footprint(pulled.parameter_size, pulled.quantization_level)
            if table is not None:
                return Footprint(table, "table")
        return None

    async def footprint(
        self, m: Model, child: Child, devices: list[gpu.Device], options: dict[str, Any]
    ) -> Footprint:
        """Measured size from the model's last full load, else an estimate, else the table."""
        known = self.known_footprint(m.name, m, child.name)
        if known is not None and known.basis != "table":
            return known
        est = await self._estimate(m.name, child, devices, options)
        if est.basis != "unknown":  # not pulled yet, perhaps: ask again next time
            self._estimates[m.name] = est
        return est

    async def _estimate(
        self, name: str, child: Child, devices: list[gpu.Device], options: dict[str, Any]
    ) -> Footprint:
        pulled = self._backends.pulled(child.name, name)
        file_size = pulled.size if pulled is not None else None
        show = await child.api.show(name)
        ctx = self.num_ctx(child, devices, options)
        est = gpu.estimate_footprint(
            show, num_ctx=ctx, num_parallel=child.cfg.num_parallel, file_size=file_size
        )
        if est is not None:
            return Footprint(est, "estimated")
        table = self.known_footprint(name, None, child.name)
        if table is not None:
            return table
        return Footprint(file_size or 0, "unknown")

    # -- admission --------------------------------------------------------------------------------

    def _room(
        self,
        devices: Iterable[gpu.Device],
        child: Child | None = None,
        models: Iterable[Model] = (),
        exclude: str = "",
    ) -> int:
        """Bytes a new model may take on these GPUs: up to the high watermark, less the reserve
        and less what loads admitted but not yet visible to the probe will take.

        With another model already in the same child, Ollama itself evicts unless the newcomer
        needs at most 80% of the free memory (server/sched.go pre-flight check), so llmd keeps
        within that too and Ollama never evicts on its own.
        """
        g = self.cfg.gpu
        devices = list(devices)
        indexes = {d.index for d in devices}
        reserved = sum(
            size for name, (size, on) in self._reserved.items() if name != exclude and on & indexes
        )
        room = (
            sum(
                max(0, int(d.total_bytes * g.high_watermark) - g.reserve - d.used_bytes)
                for d in devices
            )
            - reserved
        )
        if child is not None and any(
            m.backend == child.name and m.key != exclude and m.resident for m in models
        ):
            free = sum(d.free_bytes for d in devices) - reserved
            room = min(room, int(OLLAMA_PREFLIGHT * free))
        return max(room, 0)

    def fits_another(
        self, models: Collection[Model], candidates: Iterable[tuple[str, str]]
    ) -> bool:
        """Whether one of the candidate (name, backend) models, not resident, would fit now
        without an eviction, by what is known of its footprint. True without a GPU reading:
        llmd cannot tell that the node is full."""
        snap = self.snapshot
        if snap is None or not snap.devices:
            return True
        for name, backend in candidates:
            child = self._backends.children.get(backend)
            known = self.known_footprint(name, None, backend)
            if child is None or known is None or not known.bytes:
                continue
            if known.bytes <= self._room(self.devices_of(child, snap), child, models):
                return True
        return False

    def release(self, key: str) -> None:
        """A load admitted earlier (of the model record with this key) has finished or failed:
        the probe now sees what it took."""
        self._reserved.pop(key, None)

    def _candidates(
        self, devices: list[gpu.Device], models: Iterable[Model], exclude: str
    ) -> list[policy.Candidate]:
        """Loaded models that share any of these GPUs, but for the one named `exclude` (all its
        copies: one replica never makes room for another); named by their records' keys."""
        indexes = {d.index for d in devices}
        now = self._clock()
        out = []
        for m in models:
            if m.name == exclude or m.state is not MState.LOADED:
                continue
            child = self._backends.children.get(m.backend)
            if child is None:
                continue
            if child.cfg.gpus is not None and not indexes & set(child.cfg.gpus):
                continue
            inputs = policy_inputs(self.cfg, self._history, m.name, m)
            if m.yielding:  # making way for a waiting model: the first to leave, for anyone
                inputs = dataclasses.replace(inputs, priority=YIELDING_PRIORITY)
            out.append(
                policy.candidate(
                    m.key,
                    inputs,
                    in_flight=m.holding,
                    size_bytes=m.size_vram or m.size,
                    idle_s=0.0 if m.idle_since is None else now - m.idle_since,
                    hist=self._history.idle_histogram(m.name),
                    beta=self.cfg.keep_alive.beta,
                )
            )
        return out

    async def cold_load(
        self,
        m: Model,
        child: Child,
        options: dict[str, Any],
        *,
        may_evict: bool = True,
        may_wait: bool = True,
    ) -> ColdLoad | None:
        """A cold load's request for room, or None when admission is off (no probe, or it
        sees no GPU of this backend). A pre-warm passes may_evict=False: free memory only; an
        extra copy of a model may_wait=False: free memory, or idle less important models."""
        snap = await self.read()
        devices = self.devices_of(child, snap)
        if not devices:
            return None
        mc = self.cfg.model(m.name)
        inputs = policy_inputs(self.cfg, self._history, m.name, m)
        return ColdLoad(
            model=m,
            child=child,
            footprint=await self.footprint(m, child, devices, options),
            devices=devices,
            priority=inputs.priority,
            preempt=bool(mc and mc.preempt),
            spill_ok=bool(mc and mc.allow_cpu_spill),
            may_evict=may_evict,
            may_wait=may_wait,
        )

    def admit(self, load: ColdLoad, models: Collection[Model], *, waited_s: float) -> Admission:
        """One look at a cold load against the GPUs as last read; raises NoRoom once it has
        waited gpu.admission_timeout (or at once, for a load that may not evict or wait)."""
        name, key, fp, devices = load.model.name, load.model.key, load.footprint, load.devices
        room = self._room(devices, load.child, models, exclude=key)
        if fp.bytes <= room:
            self._reserved[key] = (fp.bytes, frozenset(d.index for d in devices))
            return Admission(admitted=True)
        if not load.may_evict:
            raise NoRoom(f"{name} does not fit in free GPU memory", 1)
        need = fp.bytes - room
        cands = self._candidates(devices, models, name)
        claimed = {m.key for m in models if m.scheduled and not m.yielding}
        victims = policy.choose_victims(
            cands, need, requester_priority=load.priority, preempt=load.preempt
        )
        if victims is None and load.spill_ok:
            return Admission(admitted=True)  # allowed to run partly on the CPU: no waiting
        if victims is None and not load.may_wait:
            raise NoRoom(
                f"no room for another copy of {name} on {_where(devices)}: it needs "
                f"{_gib(fp.bytes)} and {_gib(room)} is free; only idle, less important models "
                "are evicted for it, and none would do",
                1,
            )
        if victims is None:
            # Only more important idle models could make room. Waiting costs this request;
            # evicting costs their likely next request: wait until the two are equal
            # (ski rental), then evict them, unless admission_timeout comes first.
            # Models with a queue in llmd's scheduler are not guessed about: it says when
            # they make way (Model.yielding, then the first to leave).
            free = [c for c in cands if c.name not in claimed]
            wait = policy.admission_wait_s(free, need, requester_priority=load.priority)
            if wait is not None and waited_s >= wait:
                victims = policy.choose_victims(free, need)
        if victims:
            why = (
                f"to make room for {name} (needs {_gib(fp.bytes)}, {fp.basis}; "
                f"{_gib(room)} free on {_where(devices)})"
            )
            return Admission(False, tuple(victims), why, load.preempt)
        left = self.cfg.gpu.admission_timeout - waited_s
        if left <= 0:
            raise NoRoom(
                self._no_room(name, fp, room, devices, cands),
                max(1, int(self.cfg.gpu.admission_timeout)),
            )
        return Admission(False, wait_s=min(RECHECK_S, left))

    def blockers(self, load: ColdLoad, models: Collection[Model]) -> tuple[str, ...]:
        """The models (record keys) whose leaving would make room for a waiting load but which
        admission may not evict now: busy ones (requests in flight or queued) and more
        important idle ones. llmd's scheduler decides when they make way. () when free memory
        or evictable models would do, or when nothing but pinned models could."""
        key = load.model.key
        need = load.footprint.bytes - self._room(load.devices, load.child, models, exclude=key)
        if need <= 0:
            return ()
        cands = self._candidates(load.devices, models, load.model.name)
        held = {c.name for c in cands if c.in_flight > 0 or c.priority < load.priority}
        if not held:
            return ()
        as_idle = [dataclasses.replace(c, in_flight=0) for c in cands]
        return tuple(v for v in policy.choose_victims(as_idle, need) or () if v in held)

    async def look_again(self, load: ColdLoad) -> None:
        """Re-read the GPUs for a waiting cold load."""
        load.devices = self.devices_of(load.child, await self.read())

    async def await_recovery(self, load: ColdLoad) -> None:
        """After an eviction the driver frees memory a little later: poll until it shows.

        A wait on the hardware, in real time whatever clock the policy runs on."""
        deadline = time.monotonic() + RECOVERY_WAIT_S
        indexes = {d.index for d in load.devices}
        while True:
            snap = await self.read()
            mine = [d for d in snap.devices if d.index in indexes]
            if self._room(mine) >= load.footprint.bytes or time.monotonic() >= deadline:
                load.devices = self.devices_of(load.child, snap)
                return
            await asyncio.sleep(0.1)

    def _no_room(
        self,
        name: str,
        fp: Footprint,
        room: int,
        devices: list[gpu.Device],
        cands: list[policy.Candidate],
    ) -> str:
        holders = []
        for c in sorted(cands, key=lambda c: c.priority):
            why = (
                "pinned"
                if c.pinned
                else (f"{c.in_flight} request(s) in flight" if c.in_flight else "more important")
            )
            holders.append(f"{c.name} ({_gib(c.size_bytes)}, priority {c.priority}, {why})")
        ours = sum(c.size_bytes for c in cands)
        used = sum(d.used_bytes for d in devices)
        other = max(0, used - ours)
        if other > 256 * 1024**2:
            holders.append(f"other programs ({_gib(other)})")
        held = "; held by " + ", ".join(holders) if holders else ""
        return (
            f"not enough GPU memory for {name}: it needs {_gib(fp.bytes)} ({fp.basis}) and "
            f"{_gib(room)} is free on {_where(devices)} under gpu.high_watermark "
            f"{self.cfg.gpu.high_watermark:g} and gpu.reserve{held}; waited "
            f"{self.cfg.gpu.admission_timeout:g}s"
        )

    # -- pressure ---------------------------------------------------------------------------------

    async def over_watermark(self) -> list[gpu.Device]:
        """A fresh reading's GPUs above gpu.high_watermark."""
        snap = await self.read()
        hw = self.cfg.gpu.high_watermark
        return [d for d in snap.devices if d.total_bytes > 0 and d.used_bytes > hw * d.total_bytes]

    def relief(self, d: gpu.Device, models: Collection[Model]) -> Relief | None:
        """The idle models to evict to bring a GPU down to gpu.low_watermark, or as near as
        evicting can; None when nothing may go."""
        g = self.cfg.gpu
        need = d.used_bytes - int(g.low_watermark * d.total_bytes)
        all_cands = self._candidates([d], models, exclude="")
        cands = [c for c in all_cands if c.in_flight == 0]
        names = policy.choose_victims(cands, need)
        if names is None:
            # Free what can be freed even if it is not enough.
            names = (
                policy.choose_victims(cands, sum(c.size_bytes for c in cands if not c.pinned)) or []
            )
        if not names:
            return None
        ours = sum(c.size_bytes for c in all_cands)
        why = (
            f"GPU {d.index} at {d.used_bytes / d.total_bytes:.0%} of "
            f"{_gib(d.total_bytes)}, above gpu.high_watermark {g.high_watermark:g} "
            f"(other programs hold {_gib(max(0, d.used_bytes - ours))})"
        )
        return Relief(tuple(names), why)

    async def pinned_fit_error(
        self, cfg: Config, models: Mapping[str, Model], extra: str | None = None
    ) -> str | None:
        """Why the pinned models (config and run-time pins, plus `extra`) cannot all stay in
        GPU memory together, or None; models of unknown size are left out."""
        snap = await self.read()
        if not snap.devices:
            return None
        names = {m.name for m in cfg.models if m.pin} | self._history.pins()
        if extra is not None:
            names.add(extra)
        sizes: dict[str, int] = {}
        for name in sorted(names):
            child = await self._backends.locate(name)
            if child is None or not child.running:
                continue
            m = models.get(name) or Model(name, child.name)  # a read: record nothing
            mc = cfg.model(name)
            options = dict(mc.options) if mc is not None else {}  # as it will be loaded
            fp = await self.footprint(m, child, self.devices_of(child, snap), options)
            if fp.bytes:
                sizes[name] = fp.bytes
        g = cfg.gpu
        capacity = sum(int(d.total_bytes * g.high_watermark) - g.reserve for d in snap.devices)
        total = sum(sizes.values())
        if total <= capacity:
            return None
        listed = ", ".join(f"{n} ({_gib(s)})" for n, s in sizes.items())
        return (
            f"pinned models need {_gib(total)} together but the GPUs hold {_gib(capacity)} "
            f"under gpu.high_watermark and gpu.reserve: {listed}; unpin one or add GPU memory"
        )


def _where(devices: list[gpu.Device]) -> str:
    return ", ".join(f"GPU {d.index}" for d in devices)
