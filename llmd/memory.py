"""GPU memory: model footprints, admission of cold loads, eviction under pressure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from llmd import gpu, planner, policy
from llmd.config import Config
from llmd.lifecycle import DEFAULT_PRIORITY, Model, MState
from llmd.process import Child

if TYPE_CHECKING:
    from llmd.lifecycle import Lifecycle
    from llmd.store import Store

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


class NoRoom(Exception):
    """A cold model cannot be given GPU memory; the message names who holds it."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Footprint:
    """Predicted GPU bytes of a model and where the number comes from."""

    bytes: int
    basis: str  # measured | estimated | table | unknown


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


class Memory:
    """Decides whether a cold model fits, and who leaves when it does not."""

    def __init__(
        self,
        cfg: Config,
        probe: gpu.Probe,
        *,
        store: Store,
        session: aiohttp.ClientSession,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.probe = probe
        self.store = store
        self.snapshot: gpu.GpuSnapshot | None = None
        self._session = session
        self._clock = clock
        self._estimates: dict[str, Footprint] = {}
        # Loads admitted but not yet seen by the probe: name -> (bytes, GPU indexes). Without
        # this, two cold models requested at once would both be admitted into the same memory.
        self._reserved: dict[str, tuple[int, frozenset[int]]] = {}
        self._changed = asyncio.Event()
        self.lifecycle: Lifecycle

    @property
    def enabled(self) -> bool:
        """Admission works only with a probe that sees devices."""
        return self.snapshot is not None and bool(self.snapshot.devices)

    def changed(self) -> None:
        """A model was released or unloaded: waiting admissions look again."""
        self._changed.set()

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
        facts = self.store.model_facts(name)
        if facts is not None and (facts.size or facts.size_vram):
            return Footprint(facts.size or facts.size_vram or 0, "measured")
        if name in self._estimates:
            return self._estimates[name]
        tags = self.lifecycle.backends.tags(backend or "")
        details = next((t.get("details") or {} for t in tags if t.get("name") == name), {})
        size, quant = details.get("parameter_size"), details.get("quantization_level")
        if isinstance(size, str) and isinstance(quant, str):
            table = planner.table_footprint(size, quant)
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
        file_size = next(
            (
                int(t.get("size") or 0)
                for t in self.lifecycle.backends.tags(child.name)
                if t.get("name") == name
            ),
            None,
        )
        try:
            async with self._session.post(
                child.url + "/api/show",
                json={"model": name},
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                show = await r.json(content_type=None) if r.status == 200 else {}
        except (aiohttp.ClientError, TimeoutError, ValueError):
            show = {}
        try:
            parallel = max(1, int(child.cfg.env.get("OLLAMA_NUM_PARALLEL", "1") or 1))
        except ValueError:
            parallel = 1  # Ollama falls back to its default on a bad value too
        ctx = self.num_ctx(child, devices, options)
        est = gpu.estimate_footprint(
            show if isinstance(show, dict) else {},
            num_ctx=ctx,
            num_parallel=parallel,
            file_size=file_size,
        )
        if est is not None:
            return Footprint(est, "estimated")
        table = self.known_footprint(name, None, child.name)
        if table is not None:
            return table
        return Footprint(file_size or 0, "unknown")

    # -- admission --------------------------------------------------------------------------------

    def _room(
        self, devices: Iterable[gpu.Device], child: Child | None = None, exclude: str = ""
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
            m.backend == child.name
            and m.name != exclude
            and m.state in (MState.LOADED, MState.LOADING)
            for m in self.lifecycle.models.values()
        ):
            free = sum(d.free_bytes for d in devices) - reserved
            room = min(room, int(OLLAMA_PREFLIGHT * free))
        return max(room, 0)

    def release(self, name: str) -> None:
        """A load admitted earlier has finished or failed: the probe now sees what it took."""
        self._reserved.pop(name, None)

    def _candidates(self, devices: list[gpu.Device], exclude: str) -> list[policy.Candidate]:
        """Loaded models that share any of these GPUs."""
        indexes = {d.index for d in devices}
        pins = self.store.pins()
        now = self._clock()
        out = []
        for m in self.lifecycle.models.values():
            if m.name == exclude or m.state is not MState.LOADED:
                continue
            child = self.lifecycle.backends.children.get(m.backend)
            if child is None:
                continue
            if child.cfg.gpus is not None and not indexes & set(child.cfg.gpus):
                continue
            mc = self.cfg.model(m.name)
            hist = self.store.idle_histogram(m.name)
            facts = self.store.model_facts(m.name)
            load_s = (facts.load_s if facts and facts.load_s else m.last_load_s) or 10.0
            priority = mc.priority if mc else DEFAULT_PRIORITY
            size_gb = max((m.size_vram or m.size) / 1e9, 0.01)
            out.append(
                policy.Candidate(
                    name=m.name,
                    priority=priority,
                    pinned=bool((mc and mc.pin) or m.name in pins),
                    in_flight=m.in_flight,
                    size_bytes=m.size_vram or m.size,
                    idle_s=0.0 if m.idle_since is None else now - m.idle_since,
                    hist=hist,
                    break_even_s=policy.break_even_s(
                        load_s, size_gb, priority, self.cfg.keep_alive.beta
                    ),
                    load_s=load_s,
                )
            )
        return out

    async def admit(
        self, m: Model, child: Child, options: dict[str, Any], *, may_evict: bool = True
    ) -> Footprint | None:
        """Make room for a cold model on its backend's GPUs, or raise NoRoom after waiting."""
        snap = await self.read()
        devices = self.devices_of(child, snap)
        if not devices:
            return None  # no probe, or it sees no GPU: admission is off
        mc = self.cfg.model(m.name)
        fp = await self.footprint(m, child, devices, options)
        spill_ok = mc is not None and mc.allow_cpu_spill
        priority = mc.priority if mc else DEFAULT_PRIORITY
        preempt = bool(mc and mc.preempt)
        started = self._clock()
        deadline = started + self.cfg.gpu.admission_timeout
        while True:
            room = self._room(devices, child, exclude=m.name)
            if fp.bytes <= room:
                self._reserved[m.name] = (fp.bytes, frozenset(d.index for d in devices))
                return fp
            if not may_evict:
                raise NoRoom(f"{m.name} does not fit in free GPU memory", 1)
            cands = self._candidates(devices, m.name)
            victims = policy.choose_victims(
                cands, fp.bytes - room, requester_priority=priority, preempt=preempt
            )
            if victims is None and spill_ok:
                return fp  # allowed to run partly on the CPU: no waiting for room
            if victims is None:
                # Only more important idle models could make room. Waiting costs this request;
                # evicting costs their likely next request: wait until the two are equal
                # (ski rental), then evict them, unless admission_timeout comes first.
                wait = policy.admission_wait_s(cands, fp.bytes - room, requester_priority=priority)
                if wait is not None and self._clock() - started >= wait:
                    victims = policy.choose_victims(cands, fp.bytes - room)
            if victims:
                why = (
                    f"to make room for {m.name} (needs {_gib(fp.bytes)}, {fp.basis}; "
                    f"{_gib(room)} free on {self._where(devices)})"
                )
                await self._evict(victims, why, preempt=preempt)
                snap = await self._await_recovery(devices, fp.bytes)
                devices = self.devices_of(child, snap)
                continue
            left = deadline - self._clock()
            if left <= 0:
                raise NoRoom(
                    self._no_room(m.name, fp, room, devices, cands),
                    max(1, int(self.cfg.gpu.admission_timeout)),
                )
            # Wait for a model to go idle or leave, or for other programs to free memory.
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(RECHECK_S, left))
            snap = await self.read()
            devices = self.devices_of(child, snap)

    def _where(self, devices: list[gpu.Device]) -> str:
        return ", ".join(f"GPU {d.index}" for d in devices)

    async def _evict(self, names: list[str], why: str, *, preempt: bool = False) -> None:
        """Evict the chosen models; one that became busy meanwhile is kept unless preempting
        (the caller then looks again)."""
        for name in names:
            m = self.lifecycle.models.get(name)
            if m is None or m.state is not MState.LOADED:
                continue
            if m.in_flight == 0:
                await self.lifecycle.evict(m, why)
            elif preempt:
                await self.lifecycle.evict(m, why + "; preempted while busy")

    async def _await_recovery(self, devices: list[gpu.Device], need: int) -> gpu.GpuSnapshot:
        """After an unload the driver frees memory a little later: poll until it shows."""
        deadline = self._clock() + RECOVERY_WAIT_S
        indexes = {d.index for d in devices}
        while True:
            snap = await self.read()
            mine = [d for d in snap.devices if d.index in indexes]
            if self._room(mine) >= need or self._clock() >= deadline:
                return snap
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
            f"{_gib(room)} is free on {self._where(devices)} under gpu.high_watermark "
            f"{self.cfg.gpu.high_watermark:g} and gpu.reserve{held}; waited "
            f"{self.cfg.gpu.admission_timeout:g}s"
        )

    # -- pressure ---------------------------------------------------------------------------------

    async def run_pressure(self) -> None:
        """Every [gpu] interval: above the high watermark, evict idle models to the low one."""
        while True:
            try:
                await self.relieve()
            except (aiohttp.ClientError, TimeoutError) as e:
                log.warning("pressure check failed: %s", e)
            except Exception:  # never let one bad reading stop the pressure loop
                log.exception("pressure check failed")
            await asyncio.sleep(self.cfg.gpu.interval)

    async def relieve(self) -> list[str]:
        """One pressure check; returns the models it evicted."""
        snap = await self.read()
        g = self.cfg.gpu
        evicted: list[str] = []
        for d in snap.devices:
            if d.total_bytes <= 0 or d.used_bytes <= g.high_watermark * d.total_bytes:
                continue
            need = d.used_bytes - int(g.low_watermark * d.total_bytes)
            cands = [c for c in self._candidates([d], exclude="") if c.in_flight == 0]
            names = policy.choose_victims(cands, need)
            if names is None:
                # Free what can be freed even if it is not enough.
                names = (
                    policy.choose_victims(cands, sum(c.size_bytes for c in cands if not c.pinned))
                    or []
                )
            if not names:
                continue
            ours = sum(c.size_bytes for c in self._candidates([d], exclude=""))
            why = (
                f"GPU {d.index} at {d.used_bytes / d.total_bytes:.0%} of "
                f"{_gib(d.total_bytes)}, above gpu.high_watermark {g.high_watermark:g} "
                f"(other programs hold {_gib(max(0, d.used_bytes - ours))})"
            )
            await self._evict(names, why)
            evicted += names
        return evicted

    async def pinned_fit_error(self, cfg: Config, extra: str | None = None) -> str | None:
        """Why the pinned models (config and run-time pins, plus `extra`) cannot all stay in
        GPU memory together, or None; models of unknown size are left out."""
        snap = await self.read()
        if not snap.devices:
            return None
        names = {m.name for m in cfg.models if m.pin} | self.store.pins()
        if extra is not None:
            names.add(extra)
        sizes: dict[str, int] = {}
        for name in sorted(names):
            child = await self.lifecycle.backends.locate(name)
            if child is None or not child.running:
                continue
            m = self.lifecycle.models.get(name) or Model(name, child.name)  # a read: record nothing
            fp = await self.footprint(m, child, self.devices_of(child, snap), {})
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
