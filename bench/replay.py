"""Deterministic discrete-event replay of a trace under one keep-alive/eviction policy.

The model of a host (same for every policy):
- a request arriving at an unloaded model starts a load of load_s seconds and waits for it;
  requests arriving during a load wait for its remainder. Each waiting request counts as a cold
  start costing w * (seconds waited), w = llmd.policy.priority_weight(priority);
- a request occupies the model for its service time (busy); when the model's in-flight count
  drops to 0 the model is idle and the policy decides its timers (unload, pre-warm, expiry);
- idle GB-s: size x seconds a model holds memory without serving, including pre-warm loads
  (memory held ahead of a request); loads for a waiting request count as busy;
- with a memory budget, a load that does not fit evicts idle models by the policy's victim
  choice; if none can be evicted the load waits until memory frees. Pre-warm loads only take
  free memory. The oracles ignore the budget (a relaxation, so they stay lower bounds);
- metrics skip the warm-up: requests arriving before it are not counted and idle time is
  clipped to [warmup, end].
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

from bench.traces import DAY, ModelSpec, Trace
from llmd.policy import (
    Candidate,
    IdleHistogram,
    admission_wait_s,
    break_even_s,
    candidate,
    choose_victims,
    decide_keep_alive,
    priority_weight,
)

HISTORY_DAYS = 14  # the store keeps and merges this many daily histograms
_GB = 1_000_000_000


@dataclass(frozen=True)
class Params:
    """Cost and policy parameters shared by every policy in a run."""

    beta: float
    min_s: float
    max_s: float
    default_s: float


@dataclass
class ModelState:
    spec: ModelSpec
    w: float
    loaded: bool = False
    loading: bool = False
    prewarm_load: bool = False
    in_flight: int = 0
    waiting: list[tuple[float, float]] = field(default_factory=list)  # (arrival, duration)
    busy_end: float | None = None
    idle_mark: float | None = None
    last_use: float = 0.0
    gen: int = 0
    expire_rel: float | None = None
    pending: bool = False  # waiting for memory
    admit_at: float | None = None  # from then on it may evict regardless of priority
    seen: int = 0  # arrivals processed (the oracles' index into the future)
    # metrics (after warm-up)
    requests: int = 0
    cold: int = 0
    cold_cost: float = 0.0
    idle_gb_s: float = 0.0
    loads: int = 0
    evictions: int = 0


@dataclass
class Result:
    """Per-run metrics of one policy on one trace."""

    policy: str
    models: list[ModelState]
    decision_us: list[float]
    victim_us: list[float]

    def summary(self, beta: float) -> dict[str, float]:
        reqs = sum(m.requests for m in self.models)
        cold = sum(m.cold for m in self.models)
        rates = sorted(m.cold / m.requests for m in self.models if m.requests)
        idle = sum(m.idle_gb_s for m in self.models)
        cold_cost = sum(m.cold_cost for m in self.models)
        top = [m for m in self.models if m.requests and m.spec.priority == 1]
        top_reqs = sum(m.requests for m in top)
        return {
            "requests": reqs,
            "cold_starts": cold,
            "cold_start_rate": cold / reqs if reqs else 0.0,
            "p75_model_cold_start_rate": percentile(rates, 75),
            "idle_gb_s": idle,
            "cold_cost_s": cold_cost,
            "cost": cold_cost + beta * idle,
            "evictions": sum(m.evictions for m in self.models),
            "prio1_cold_start_rate": (sum(m.cold for m in top) / top_reqs) if top_reqs else 0.0,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list; 0 when empty."""
    if not sorted_values:
        return 0.0
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# -- policies ----------------------------------------------------------------------------------

Timers = tuple[float | None, float | None, float | None]  # keep_alive, prewarm_after, expire


class Policy:
    """Keep-alive timeouts plus victim choice; the base class evicts least recently used."""

    ignores_budget = False

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, sim: Simulator) -> None:
        """Called once before the first event."""

    def on_gap(self, sim: Simulator, m: int, t: float, gap: float) -> None:
        """A new busy period of model m started after an idle gap."""

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        raise NotImplementedError

    def admission_wait(self, sim: Simulator, m: int, need_gb: float, t: float) -> float | None:
        """Seconds after which a blocked load may evict regardless of priority; None: never."""
        return None

    def victims(
        self, sim: Simulator, m: int, need_gb: float, t: float, force: bool = False
    ) -> list[int] | None:
        idle = [
            i
            for i, s in enumerate(sim.models)
            if i != m and s.loaded and not s.loading and s.in_flight == 0
        ]
        idle.sort(key=lambda i: sim.models[i].last_use)
        chosen: list[int] = []
        freed = 0.0
        for i in idle:
            if freed >= need_gb - 1e-9:
                break
            chosen.append(i)
            freed += sim.models[i].spec.size_gb
        return chosen if freed >= need_gb - 1e-9 else None


class Fixed(Policy):
    """A fixed timeout for every model (None: never unload on a timer, i.e. plain LRU)."""

    def __init__(self, name: str, keep_s: float | None) -> None:
        super().__init__(name)
        self.keep_s = keep_s

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        return self.keep_s, None, None


class BreakEven(Policy):
    """Timeout T* per model: the deterministic 2-competitive ski-rental policy."""

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        s = sim.models[m].spec
        return break_even_s(s.load_s, s.size_gb, s.priority, sim.params.beta), None, None


class OracleReactive(Policy):
    """Knows each gap: keeps the model iff keeping is cheaper than the next cold start."""

    ignores_budget = True

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        nxt = sim.next_arrival(m)
        st = sim.models[m]
        if nxt is None or sim.params.beta * st.spec.size_gb * (nxt - t) > st.w * st.spec.load_s:
            return 0.0, None, None
        return None, None, None


class OracleFixed(Policy):
    """The best single timeout per model in hindsight: what no per-model fixed timeout, learned
    or configured, can beat on this trace (gaps taken from the trace with warm busy periods)."""

    def start(self, sim: Simulator) -> None:
        self.keep: list[float] = []
        beta = sim.params.beta
        for m, st in enumerate(sim.models):
            gaps = sorted(_warm_gaps(sim.trace, m))
            rent = beta * st.spec.size_gb
            buy = st.w * st.spec.load_s
            best_cost, best_t = buy * len(gaps), 0.0  # T = 0: every gap is a cold start
            covered = 0.0
            for i, g in enumerate(gaps):
                covered += rent * g
                rest = len(gaps) - i - 1
                cost = covered + rest * (rent * g + buy)
                if cost < best_cost:
                    best_cost, best_t = cost, g
            self.keep.append(best_t * (1 + 1e-9) + 1e-6)

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        return self.keep[m], None, None


def _warm_gaps(trace: Trace, m: int) -> list[float]:
    """Model m's idle gaps if every request found it loaded."""
    gaps = []
    busy_end: float | None = None
    for r in trace.requests:
        if r.model != m:
            continue
        if busy_end is not None and r.t > busy_end:
            gaps.append(r.t - busy_end)
        busy_end = max(busy_end or 0.0, r.t + r.duration_s)
    return gaps


class OraclePreload(Policy):
    """Knows each gap: unloads at once and reloads to finish exactly at the next request,
    unless the gap is shorter than a load."""

    ignores_budget = True

    def start(self, sim: Simulator) -> None:
        for m, st in enumerate(sim.models):
            first = sim.next_arrival(m)
            if first is not None:
                st.expire_rel = None
                sim.push(max(first - st.spec.load_s, 0.0), _PREWARM, m, st.gen)

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        nxt = sim.next_arrival(m)
        st = sim.models[m]
        if nxt is None:
            return 0.0, None, None
        gap = nxt - t
        if gap <= st.spec.load_s:
            return None, None, None
        return 0.0, gap - st.spec.load_s, None


class Adaptive(Policy):
    """llmd.policy: learns each model's idle-gap histogram online, rolled per day like the
    store (the last 14 daily histograms merged), and picks victims with choose_victims."""

    def __init__(self, name: str, prewarm: bool) -> None:
        super().__init__(name)
        self.prewarm = prewarm
        self.days: list[dict[int, IdleHistogram]] = []
        self.merged: list[IdleHistogram] = []
        self.today: list[int] = []

    def start(self, sim: Simulator) -> None:
        n = len(sim.models)
        self.days = [{} for _ in range(n)]
        self.merged = [IdleHistogram() for _ in range(n)]
        self.today = [-1] * n

    def on_gap(self, sim: Simulator, m: int, t: float, gap: float) -> None:
        day = int(t // DAY)
        days = self.days[m]
        if day != self.today[m]:
            # Day roll-over: the finished day goes through the store's serialisation, days
            # older than the window are dropped, and the merge is rebuilt as the store does.
            if self.today[m] in days:
                days[self.today[m]] = IdleHistogram.from_dict(days[self.today[m]].to_dict())
            for d in [d for d in days if d <= day - HISTORY_DAYS]:
                del days[d]
            days[day] = IdleHistogram()
            merged = IdleHistogram()
            for h in days.values():
                merged.merge(h)
            self.merged[m] = merged
            self.today[m] = day
        days[day].add(gap)
        self.merged[m].add(gap)

    def on_idle(self, sim: Simulator, m: int, t: float) -> Timers:
        s = sim.models[m].spec.inputs
        p = sim.params
        t0 = time.perf_counter()
        d = decide_keep_alive(
            self.merged[m],
            load_s=s.load_s,
            size_gb=s.size_gb,
            priority=s.priority,
            beta=p.beta,
            min_s=p.min_s,
            max_s=p.max_s,
            default_s=p.default_s,
            prewarm=self.prewarm,
        )
        sim.decision_us.append((time.perf_counter() - t0) * 1e6)
        return d.keep_alive_s, d.prewarm_after_s, d.prewarm_expire_s

    def _candidates(self, sim: Simulator, m: int, t: float) -> list[Candidate]:
        cands = []
        for i, st in enumerate(sim.models):
            if i == m or not st.loaded or st.loading:
                continue
            s = st.spec
            cands.append(
                candidate(
                    s.name,
                    s.inputs,
                    in_flight=st.in_flight,
                    size_bytes=int(s.size_gb * _GB),
                    idle_s=t - st.busy_end if st.busy_end is not None else 0.0,
                    hist=self.merged[i],
                    beta=sim.params.beta,
                )
            )
        return cands

    def admission_wait(self, sim: Simulator, m: int, need_gb: float, t: float) -> float | None:
        return admission_wait_s(
            self._candidates(sim, m, t),
            int(need_gb * _GB) + 1,
            requester_priority=sim.models[m].spec.priority,
        )

    def victims(
        self, sim: Simulator, m: int, need_gb: float, t: float, force: bool = False
    ) -> list[int] | None:
        cands = self._candidates(sim, m, t)
        t0 = time.perf_counter()
        names = choose_victims(
            cands,
            int(need_gb * _GB) + 1,
            requester_priority=None if force else sim.models[m].spec.priority,
        )
        sim.victim_us.append((time.perf_counter() - t0) * 1e6)
        if names is None:
            return None
        return [sim.index[n] for n in names]


FIXED_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120)


def make_policy(name: str) -> Policy:
    """A policy by its benchmark name."""
    if name.startswith("fixed-") and name.endswith("m"):
        return Fixed(name, float(name[6:-1]) * 60)
    if name == "lru":
        return Fixed(name, None)
    if name == "break-even":
        return BreakEven(name)
    if name == "adaptive":
        return Adaptive(name, prewarm=False)
    if name == "adaptive-prewarm":
        return Adaptive(name, prewarm=True)
    if name == "oracle-reactive":
        return OracleReactive(name)
    if name == "oracle-preload":
        return OraclePreload(name)
    if name == "oracle-fixed":
        return OracleFixed(name)
    raise ValueError(f"unknown policy {name!r}")


POLICIES = (
    "adaptive",
    "adaptive-prewarm",
    *(f"fixed-{m}m" for m in FIXED_MINUTES),
    "lru",
    "break-even",
    "oracle-fixed",
    "oracle-reactive",
    "oracle-preload",
)


# -- the simulator -----------------------------------------------------------------------------

_LOAD_DONE, _FINISH, _UNLOAD, _PREWARM, _EXPIRE, _ADMIT = range(6)


class Simulator:
    """Replays one trace under one policy."""

    def __init__(
        self, trace: Trace, policy: Policy, params: Params, warmup_s: float, vram_gb: float | None
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.params = params
        self.warmup = warmup_s
        self.end = trace.end_s
        self.budget = None if policy.ignores_budget else vram_gb
        self.models = [ModelState(s, priority_weight(s.priority)) for s in trace.models]
        self.index = {s.name: i for i, s in enumerate(trace.models)}
        self.arrivals: list[list[float]] = [[] for _ in trace.models]
        for r in trace.requests:
            self.arrivals[r.model].append(r.t)
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.seq = 0
        self.used_gb = 0.0
        self.pending: list[int] = []
        self.decision_us: list[float] = []
        self.victim_us: list[float] = []

    def push(self, t: float, kind: int, m: int, gen: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, m, gen))

    def next_arrival(self, m: int) -> float | None:
        st = self.models[m]
        arr = self.arrivals[m]
        return arr[st.seen] if st.seen < len(arr) else None

    def run(self) -> Result:
        self.policy.start(self)
        reqs = self.trace.requests
        heap = self.heap
        i = 0
        while i < len(reqs) or heap:
            if heap and (i >= len(reqs) or heap[0][0] <= reqs[i].t):
                t, _, kind, m, gen = heapq.heappop(heap)
                if t > self.end:
                    break
                self._event(t, kind, m, gen)
            else:
                r = reqs[i]
                i += 1
                self._arrive(r.t, r.model, r.duration_s)
        for st in self.models:
            self._close_idle(st, self.end)
        return Result(self.policy.name, self.models, self.decision_us, self.victim_us)

    # -- transitions --

    def _close_idle(self, st: ModelState, t: float) -> None:
        if st.idle_mark is not None:
            a = max(st.idle_mark, self.warmup)
            b = min(t, self.end)
            if b > a:
                st.idle_gb_s += st.spec.size_gb * (b - a)
            st.idle_mark = None

    def _arrive(self, t: float, m: int, dur: float) -> None:
        st = self.models[m]
        st.seen += 1
        if t >= self.warmup:
            st.requests += 1
        st.last_use = t
        if st.in_flight == 0:
            if st.busy_end is not None:
                self.policy.on_gap(self, m, t, t - st.busy_end)
            st.gen += 1  # a new busy period cancels every timer
            self._close_idle(st, t)
        st.in_flight += 1
        if st.loaded:
            self.push(t + dur, _FINISH, m)
            return
        st.waiting.append((t, dur))
        if st.loading:
            st.prewarm_load = False  # a pre-warm load now serves a request
        elif not st.pending:
            self._request_load(m, t)

    def _fits(self, st: ModelState) -> bool:
        return self.budget is None or self.used_gb + st.spec.size_gb <= self.budget + 1e-9

    def _request_load(self, m: int, t: float) -> None:
        st = self.models[m]
        if not self._fits(st):
            assert self.budget is not None
            need = self.used_gb + st.spec.size_gb - self.budget
            force = st.admit_at is not None and t >= st.admit_at
            victims = self.policy.victims(self, m, need, t, force)
            if victims is None:
                if not st.pending:
                    st.pending = True
                    self.pending.append(m)
                if st.admit_at is None:
                    wait = self.policy.admission_wait(self, m, need, t)
                    if wait is not None:
                        st.admit_at = t + wait
                        self.push(st.admit_at, _ADMIT, m)
                return
            for v in victims:
                self.models[v].evictions += t >= self.warmup
                self._unload(v, t, retry=False)
        st.pending = False
        st.admit_at = None
        self._start_load(m, t, prewarm=False)

    def _start_load(self, m: int, t: float, prewarm: bool) -> None:
        st = self.models[m]
        st.loading = True
        st.prewarm_load = prewarm
        st.loads += 1
        self.used_gb += st.spec.size_gb
        if prewarm:
            st.idle_mark = t  # memory held ahead of a request
        self.push(t + st.spec.load_s, _LOAD_DONE, m)

    def _unload(self, m: int, t: float, retry: bool = True) -> None:
        st = self.models[m]
        self._close_idle(st, t)
        st.loaded = False
        self.used_gb -= st.spec.size_gb
        if retry:
            self._retry_pending(t)

    def _retry_pending(self, t: float) -> None:
        for m in list(self.pending):
            if self.models[m].pending:
                self._request_load(m, t)
        self.pending = [m for m in self.pending if self.models[m].pending]

    def _event(self, t: float, kind: int, m: int, gen: int) -> None:
        st = self.models[m]
        if kind == _FINISH:
            st.in_flight -= 1
            if st.in_flight:
                return
            st.busy_end = t
            st.last_use = t
            st.idle_mark = t
            keep, pre, exp = self.policy.on_idle(self, m, t)
            st.expire_rel = exp
            if keep is not None:
                if keep <= 0:
                    self._unload(m, t, retry=False)
                else:
                    self.push(t + keep, _UNLOAD, m, st.gen)
            if pre is not None:
                self.push(t + pre, _PREWARM, m, st.gen)
            if self.pending:
                self._retry_pending(t)
        elif kind == _LOAD_DONE:
            st.loading = False
            st.loaded = True
            if st.waiting:
                for arrival, dur in st.waiting:
                    wait = t - arrival
                    if arrival >= self.warmup and wait > 1e-6:
                        st.cold += 1
                        st.cold_cost += st.w * wait
                    self.push(t + dur, _FINISH, m)
                st.waiting.clear()
            elif st.expire_rel is not None and st.busy_end is not None:
                self.push(max(t, st.busy_end + st.expire_rel), _EXPIRE, m, st.gen)
            st.prewarm_load = False
        elif kind == _ADMIT:
            if st.pending and st.admit_at == t:
                self._request_load(m, t)
                if not st.pending:
                    self.pending.remove(m)
        elif gen != st.gen:
            return  # a timer of an earlier idle period
        elif kind in (_UNLOAD, _EXPIRE):
            if st.loaded and not st.loading and st.in_flight == 0:
                self._unload(m, t)
        elif kind == _PREWARM:
            idle_unloaded = not (st.loaded or st.loading or st.in_flight)
            if idle_unloaded and self._fits(st):  # pre-warm only into free memory
                self._start_load(m, t, prewarm=True)


def replay(
    trace: Trace, policy: str, params: Params, warmup_s: float, vram_gb: float | None
) -> Result:
    """Run one policy over one trace."""
    return Simulator(trace, make_policy(policy), params, warmup_s, vram_gb).run()
