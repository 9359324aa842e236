"""Fakes at the middle layer's seams (a child's Ollama API, the GPU probe, the store, the clock)
and a rig that wires them into a real Backends, Memory and Lifecycle without starting children."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from llmd import config
from llmd.backends import Backends
from llmd.childapi import Pulled, Runner
from llmd.config import Config
from llmd.gpu import Device, GpuSnapshot
from llmd.lifecycle import KeepAliveFn, Lifecycle
from llmd.memory import Memory
from llmd.policy import IdleHistogram
from llmd.process import Child, State

GiB = 1024**3
GPU_TOTAL = 16 * GiB
# A rig's test fails after this long rather than hang (a load waiting for room that never
# comes polls every second forever, since the fake clock does not move by itself).
DEADLINE_S = 10.0


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class FakeChildAPI:
    """A child's Ollama API in memory: what is loaded, at what size, and every call made."""

    def __init__(self) -> None:
        self.sizes: dict[str, tuple[int, int]] = {}  # name -> (size, size_vram) once loaded
        self.digests: dict[str, str] = {}
        self.loaded: dict[str, tuple[int, int]] = {}
        self.gates: dict[str, asyncio.Event] = {}  # a load waits for its gate, if it has one
        self.failures: dict[str, Exception] = {}  # a load raises this, if set
        self.unload_gates: dict[str, asyncio.Event] = {}  # an unload waits for its gate
        self.pulled: list[Pulled] = []
        self.calls: list[tuple[str, str]] = []
        self.load_options: list[tuple[str, dict[str, Any]]] = []  # (name, options) per load

    def model(self, name: str, size: int, vram: int | None = None, digest: str = "") -> None:
        """Say what a model takes once loaded (all of it on the GPU unless `vram` says less)."""
        self.sizes[name] = (size, size if vram is None else vram)
        if digest:
            self.digests[name] = digest

    async def alive(self, timeout: float) -> bool:
        return True

    async def ps(self) -> list[Runner]:
        return [
            Runner(name, self.digests.get(name), size, vram)
            for name, (size, vram) in self.loaded.items()
        ]

    async def tags(self) -> list[Pulled]:
        return list(self.pulled)

    async def show(self, name: str) -> dict[str, Any]:
        return {}

    async def load(self, name: str, options: dict[str, Any], *, embedding: bool) -> bool:
        self.calls.append(("load", name))
        self.load_options.append((name, dict(options)))
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if name in self.failures:
            raise self.failures[name]
        self.loaded[name] = self.sizes.get(name, (GiB, GiB))
        return embedding

    async def unload(self, name: str) -> None:
        self.calls.append(("unload", name))
        gate = self.unload_gates.get(name)
        if gate is not None:
            await gate.wait()
        self.loaded.pop(name, None)


class FakeProbe:
    """One GPU whose used memory is the fake children's loaded models plus other programs."""

    name = "fake"

    def __init__(self, apis: list[FakeChildAPI], total: int = GPU_TOTAL) -> None:
        self.apis = apis
        self.total = total
        self.other = 0  # bytes held by programs other than the children

    async def read(self) -> GpuSnapshot:
        used = self.other + sum(v for api in self.apis for _, v in api.loaded.values())
        return GpuSnapshot("fake", [Device(0, "Fake GPU", self.total, used)], [], None, 0.0)

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class Facts:
    """What the store has measured of a model."""

    size: int | None = None
    size_vram: int | None = None
    load_s: float | None = None


@dataclass
class FakeHistory:
    """The store's seam: run-time pins and measured facts, no idle-gap history."""

    pinned: set[str] = field(default_factory=set)
    facts: dict[str, Facts] = field(default_factory=dict)

    def pins(self) -> set[str]:
        return set(self.pinned)

    def idle_histogram(self, model: str, days: int = 14) -> IdleHistogram:
        return IdleHistogram()

    def model_facts(self, model: str) -> Facts | None:
        return self.facts.get(model)


class Events:
    """Collects lifecycle events as (kind, model, reason)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, str]] = []

    def record_event(
        self, kind: str, *, model: str | None = None, backend: str | None = None, reason: str = ""
    ) -> None:
        self.seen.append((kind, model, reason))

    def of(self, kind: str) -> list[tuple[str | None, str]]:
        """The (model, reason) of every event of one kind, in order."""
        return [(model, reason) for k, model, reason in self.seen if k == kind]


def make_config(
    models: list[dict[str, Any]] | None = None,
    *,
    backends: tuple[str, ...] = ("b0",),
    gpu: dict[str, Any] | None = None,
) -> Config:
    """A config for the rig: no reserve, 30 s admission timeout, a fixed 10 min keep-alive."""
    return config.from_dict(
        {
            "keep_alive": {"policy": "fixed", "default": "10m"},
            "gpu": {
                "high_watermark": 0.95,
                "low_watermark": 0.85,
                "reserve": 0,
                "admission_timeout": "30s",
                **(gpu or {}),
            },
            "backend": [{"name": n, "port": 20001 + i} for i, n in enumerate(backends)],
            "model": models or [],
        }
    )


@dataclass
class Rig:
    """A real Backends, Memory and Lifecycle over the fakes; `child` is the first backend."""

    cfg: Config
    clock: Clock
    apis: dict[str, FakeChildAPI]
    probe: FakeProbe
    history: FakeHistory
    events: Events
    backends: Backends
    memory: Memory
    lc: Lifecycle
    tasks: list[asyncio.Task[Any]]

    @property
    def child(self) -> Child:
        return self.backends.children[self.cfg.backends[0].name]

    @property
    def api(self) -> FakeChildAPI:
        return self.apis[self.cfg.backends[0].name]

    def add(self, name: str, gib: float, vram_gib: float | None = None, backend: str = "") -> None:
        """A pulled model of this size, measured by the store (so memory knows its footprint)
        with a 2 s load."""
        size = int(gib * GiB)
        vram = None if vram_gib is None else int(vram_gib * GiB)
        self.apis[backend or self.child.name].model(name, size, vram)
        self.history.facts[name] = Facts(size=size, load_s=2.0)

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A task the rig cancels at teardown (the daemon's TaskGroup seam)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.append(task)
        return task


@contextlib.asynccontextmanager
async def rig(cfg: Config, *, keep_alive: KeepAliveFn | None = None) -> AsyncIterator[Rig]:
    """The rig for one test (which fails after DEADLINE_S); its tasks are cancelled and awaited
    at the end."""
    tasks: list[asyncio.Task[Any]] = []

    def start_task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.append(task)
        return task

    async def never_spawned(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        raise AssertionError("the rig starts no child process")

    clock = Clock()
    history = FakeHistory()
    events = Events()
    async with aiohttp.ClientSession() as session:
        backends = Backends(cfg, session=session, start_task=start_task, spawn=never_spawned)
        apis = {name: FakeChildAPI() for name in backends.children}
        for name, child in backends.children.items():
            child.state = State.RUNNING
            child.api = apis[name]  # type: ignore[assignment]
        probe = FakeProbe(list(apis.values()))
        memory = Memory(cfg, probe, backends=backends, history=history, clock=clock)
        lc = Lifecycle(
            cfg,
            backends,
            memory,
            history=history,
            events=events,
            start_task=start_task,
            clock=clock,
            keep_alive=keep_alive,
        )
        r = Rig(cfg, clock, apis, probe, history, events, backends, memory, lc, tasks)
        try:
            async with asyncio.timeout(DEADLINE_S):
                yield r
        finally:
            await lc.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
