"""What the middle layer shares about models: the per-model record and its states, the errors
of loading, and one derivation of a model's policy inputs (priority, pin, load time, size)."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from llmd import policy
from llmd.config import Config, ModelConfig

DEFAULT_PRIORITY = ModelConfig.priority
# Before a model's first measured load: what a 7B-class model costs, roughly.
GUESS_LOAD_S = 10.0
GUESS_SIZE_GB = 5.0


class MState(enum.Enum):
    """Where a model is in its lifecycle."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    UNLOADING = "unloading"


# Every change a model's state may make; anything else raises IllegalTransition.
TRANSITIONS: dict[MState, frozenset[MState]] = {
    MState.UNLOADED: frozenset(
        {
            MState.LOADING,  # a request, `llmctl load`, a preload or a pre-warm
            MState.LOADED,  # found loaded in a child (loaded outside llmd)
        }
    ),
    MState.LOADING: frozenset(
        {
            MState.LOADED,  # the load finished
            MState.UNLOADED,  # the load failed or was cancelled
        }
    ),
    MState.LOADED: frozenset(
        {
            MState.UNLOADING,  # keep-alive expired, eviction, `llmctl unload`
            MState.UNLOADED,  # the child died or unloaded it outside llmd
        }
    ),
    MState.UNLOADING: frozenset({MState.UNLOADED}),  # unloaded, or the child died meanwhile
}


class LoadError(Exception):
    """A model could not be loaded; carries the HTTP status and Ollama's message."""

    def __init__(self, status: int, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s


class NoRoom(Exception):
    """A cold model cannot be given GPU memory; the message names who holds it."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


# A model's current keep-alive and where it comes from (pinned, fixed, default, adaptive...).
KeepAlive = policy.KeepAliveDecision


@dataclass
class Model:
    """Live state of one model (changed only by the lifecycle)."""

    name: str
    backend: str
    state: MState = MState.UNLOADED
    # How the lifecycle, memory and the scheduler name this record: the model's name, or for a
    # replica of a model served from several backends, name@backend (see Lifecycle.key).
    key: str = ""
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
    load_task: asyncio.Future[float] | None = None  # the shared load under way, if any
    # The request handlers holding the model, so that a preempting eviction can cancel them.
    holders: set[asyncio.Task[Any]] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    keep_alive: KeepAlive | None = None
    prewarm_at: float | None = None  # monotonic time to reload an idle, unloaded model
    prewarm_expire_at: float | None = None
    prewarmed: bool = False  # loaded by pre-warm and not used since
    extra: bool = False  # an extra copy loading for a backlog: it never waits for memory
    # Told by the scheduler (Lifecycle.note_queue): requests waiting in llmd's queue for this
    # model, those granted a slot that have not reached the lifecycle yet, and whether it is
    # making way for another model that needs its memory.
    queued: int = 0
    granted: int = 0
    yielding: bool = False
    scheduled: bool = False  # has a queue: the scheduler decides when it makes way
    # While its load waits for memory: the models whose leaving would make room but which
    # may not be evicted now (busy, or more important and idle): the scheduler decides.
    blocked_by: tuple[str, ...] = ()
    blocked_since: float | None = None
    # The runner options of its last load (None: not known, as for one loaded outside llmd);
    # while it is resident, requests are sent with these (see runneropts).
    runner_options: dict[str, int | bool] | None = None
    context_length: int | None = None  # as the child's /api/ps last listed it
    options_overridden: int = 0  # requests whose runner options llmd replaced

    def __post_init__(self) -> None:
        self.key = self.key or self.name

    @property
    def replica(self) -> bool:
        """Whether it is one of several copies of its model, each on its own backend."""
        return self.key != self.name

    @property
    def resident(self) -> bool:
        """Whether it holds (or is about to hold) memory in its child."""
        return self.state in (MState.LOADED, MState.LOADING)

    @property
    def holding(self) -> int:
        """What keeps it from being evicted: in-flight requests, those granted a slot, and
        unless it is making way, queued ones about to start."""
        return self.in_flight + self.granted + (0 if self.yielding else self.queued)

    @property
    def busy(self) -> bool:
        """Whether anything holds it (see `holding`)."""
        return self.holding > 0


class Facts(Protocol):
    """What has been measured of a model (the store's ModelFacts)."""

    @property
    def size(self) -> int | None: ...

    @property
    def size_vram(self) -> int | None: ...

    @property
    def load_s(self) -> float | None: ...


class History(Protocol):
    """What the policy learns from (the store)."""

    def pins(self) -> set[str]: ...

    def idle_histogram(self, model: str, days: int = 14) -> policy.IdleHistogram: ...

    def model_facts(self, model: str) -> Facts | None: ...


def policy_inputs(
    cfg: Config, history: History, name: str, m: Model | None = None
) -> policy.ModelInputs:
    """A model's policy inputs, the one place they are derived: its configured priority, its
    pin (config or `llmctl pin`), its measured load time and size, else the live record's,
    else a 7B-class guess."""
    mc = cfg.model(name)
    facts = history.model_facts(name)
    load_s = (facts.load_s if facts is not None else None) or (m.last_load_s if m else None)
    size = ((facts.size or facts.size_vram) if facts is not None else None) or (m.size if m else 0)
    return policy.ModelInputs(
        priority=mc.priority if mc is not None else DEFAULT_PRIORITY,
        pinned=(mc is not None and mc.pin) or name in history.pins(),
        load_s=load_s or GUESS_LOAD_S,
        size_gb=size / 1e9 if size else GUESS_SIZE_GB,
    )


def keep_alive(cfg: Config, history: History, m: Model, idle_s: float = 0.0) -> KeepAlive:
    """A model's keep-alive: pinned, a fixed override, or learned from its idle gaps; idle_s is
    how long it has been idle already (0 as it goes idle)."""
    fixed, args = _keep_alive_args(cfg, history, m, idle_s)
    if fixed is not None:
        return fixed
    return policy.decide_keep_alive(history.idle_histogram(m.name), **args)


def explain_keep_alive(
    cfg: Config, history: History, m: Model, idle_s: float = 0.0, beta: float | None = None
) -> dict[str, Any]:
    """`keep_alive`'s decision with the policy's numbers behind it (policy.explain), for the
    same inputs; `beta` previews another [keep_alive] beta. A pinned or fixed keep-alive is
    the "decision", and "learned" what the policy would choose without the pin or override."""
    fixed, args = _keep_alive_args(cfg, history, m, idle_s)
    if beta is not None:
        args["beta"] = beta
    doc = policy.explain(history.idle_histogram(m.name), **args)
    doc["learned"] = doc["decision"]
    if fixed is not None:
        doc["decision"] = {
            "keep_alive_s": fixed.keep_alive_s,
            "source": fixed.source,
            "samples": fixed.samples,
            "percentile": fixed.percentile,
            "prewarm_after_s": None,
            "prewarm_expire_s": None,
        }
    return doc


def _keep_alive_args(
    cfg: Config, history: History, m: Model, idle_s: float
) -> tuple[KeepAlive | None, dict[str, Any]]:
    """The decision when it does not depend on the history (pinned, fixed, the fixed policy's
    default), else None; and decide_keep_alive's inputs besides the histogram."""
    k = cfg.keep_alive
    mc = cfg.model(m.name)
    inputs = policy_inputs(cfg, history, m.name, m)
    args: dict[str, Any] = {
        "load_s": inputs.load_s,
        "size_gb": inputs.size_gb,
        "priority": inputs.priority,
        "beta": k.beta,
        "min_s": k.min,
        "max_s": k.max,
        "default_s": k.default,
        "prewarm": k.prewarm,
        "idle_s": idle_s,
    }
    mode = mc.keep_alive if mc is not None else None
    if inputs.pinned:
        return policy.pinned_decision(), args
    if isinstance(mode, float):
        return policy.fixed_decision(mode), args
    if mode is None and k.policy == "fixed":
        return policy.default_decision(k.default), args
    return None, args
