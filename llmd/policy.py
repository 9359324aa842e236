"""Pure keep-alive and eviction policy: plain data in, plain data out.

The cost being minimised (research/keepalive-science.md, section 4) is, per model,

    J = sum over cold starts of w * L  +  beta * idle GB-s

with w the priority weight of a cold start (`priority_weight`), L the load time in seconds, s the
model's size in GB and beta the exchange rate between idle memory and latency (latency-seconds
per GB-s). Each idle gap g (end of one busy period to the next request) is a rent-or-buy choice:
keeping the model costs beta*s*g, unloading costs w*L at the next request. Keeping it longer than
the break-even time T* = w*L/(beta*s) can never pay off for that gap (`break_even_s`).

`decide_keep_alive` starts from the hybrid histogram policy of Shahrad et al. ("Serverless in the
Wild", ATC 2020: a per-model idle-gap histogram, a tail percentile plus a margin, a pre-warm
window from the head, a fallback when the histogram is not representative) but chooses the
percentile by cost instead of fixing it at the 99th: it evaluates the expected cost of every
candidate timeout over the model's own gap distribution and keeps the cheapest one, i.e. the
optimal fixed timeout for that model given its history. Three bounds keep that choice honest:

- it never exceeds T*, which keeps the ski-rental guarantee (at most twice the offline optimum on
  any single gap) when the history stops predicting the future;
- it goes beyond what the evidence supports only by Shahrad et al.'s +10% tail margin: with no
  observed gap beyond a bin, covering it buys nothing, so the smallest timeout of equal cost wins
  and then gets the margin (`MARGIN`);
- it is clamped to the operator's [min_s, max_s].

The history is weighed against a prior, the configured default D (within the cap C = min(T*,
max_s)). Gaps shorter than D say nothing about whether the minutes after a request up to D
bring another one; only gaps that outlasted D do (they went through all of them without a
request). So the keep-alive is not set below D until `PRIOR_SILENCES` recorded gaps have
outlasted it: until then the least-cost timeout is taken among timeouts >= D. A short burst
(three gaps of seconds) keeps D, where the histogram alone had every timeout past the burst tie
and took the shortest, i.e. the minimum; gaps between D and C still raise the keep-alive from
the first one. This is a Dirichlet-process prior centred on D (pseudo-gaps of length D) whose
weight is counted in silences rather than gaps: pseudo-gaps make a cheap-to-keep model wait
for many more silences than an expensive one (k (C - D + t) / (D - t) of them to go down to
t), while the information a silence brings is the same for both. Before the default gives way,
a model spends at most the idle memory of PRIOR_SILENCES waits of D on silences. With no
history the decision is the default itself; when the decisive gaps are out of the histogram's
range (T* beyond 4 h and most gaps OOB), T*, the distribution-free (2-competitive) choice.

The ongoing idle period is a right-censored gap: it has lasted idle_s and will last at least
that long. Over timeouts T >= idle_s the cost-optimal choice is the one made as the model went
idle (the gaps shorter than idle_s cost the same under all of them), so that decision stands
while it runs. Once a model has outlived it (a reload re-arms a model idle past its keep-alive),
the decision is made again over the recorded gaps longer than idle_s, with C as the floor until
PRIOR_SILENCES of them outlasted C: without evidence about gaps that long, the ski-rental rule
(keep until T*) decides, not older, shorter gaps; with it, the evidence.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# -- the idle-gap histogram -------------------------------------------------------------------

RANGE_S = 4 * 3600.0
"""Gaps at or beyond this many seconds are counted out of bounds (OOB), as in Shahrad et al."""


def _make_edges() -> tuple[float, ...]:
    # Shahrad et al. use 1-minute bins over 4 h (240 bins). Short gaps decide most keep-alives
    # and all pre-warm heads, so they get finer bins: 5 s up to 1 min, 15 s up to 5 min, then
    # bins 6% wide (log-spaced) up to 4 h. 95 bins: finer where it matters and a dense JSON
    # form that stays far under 1 KB per model per day.
    edges = [0.0]
    e = 0.0
    while e < 60:
        e += 5
        edges.append(e)
    while e < 300:
        e += 15
        edges.append(e)
    while e < RANGE_S:
        e = min(float(round(e * 1.06)), RANGE_S)
        edges.append(e)
    return tuple(edges)


EDGES: tuple[float, ...] = _make_edges()
"""Bin edges in seconds: bin i holds gaps in [EDGES[i], EDGES[i+1])."""
NBINS = len(EDGES) - 1
_REPS: tuple[float, ...] = tuple((EDGES[i] + EDGES[i + 1]) / 2 for i in range(NBINS))
_LEGACY_BIN_S = 60.0  # format 1: 240 one-minute bins, {"bins": {"index": count}, "oob": n}


def bin_index(gap_s: float) -> int:
    """The histogram bin of a gap; NBINS means out of bounds."""
    if gap_s >= RANGE_S:
        return NBINS
    return max(bisect.bisect_right(EDGES, gap_s) - 1, 0)


@dataclass
class IdleHistogram:
    """Counts of a model's idle gaps (seconds between busy periods), in `EDGES` bins."""

    counts: list[int] = field(default_factory=lambda: [0] * NBINS)
    oob: int = 0

    def add(self, gap_s: float) -> None:
        """Count one idle gap."""
        b = bin_index(gap_s)
        if b >= NBINS:
            self.oob += 1
        else:
            self.counts[b] += 1

    def merge(self, other: IdleHistogram) -> None:
        """Add another histogram's counts into this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.oob += other.oob

    @property
    def samples(self) -> int:
        """Number of gaps counted, out-of-bounds ones included."""
        return sum(self.counts) + self.oob

    def to_dict(self) -> dict[str, Any]:
        """A compact, JSON-able form for the store: dense counts, trailing zeros trimmed."""
        n = NBINS
        while n and not self.counts[n - 1]:
            n -= 1
        return {"v": 2, "counts": self.counts[:n], "oob": self.oob}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdleHistogram:
        """Inverse of to_dict; also reads format 1 (sparse one-minute bins) by re-binning."""
        h = cls()
        if "counts" in d:
            counts = d["counts"]
            if not isinstance(counts, list) or len(counts) > NBINS:
                raise ValueError(f"idle histogram: expected at most {NBINS} counts")
            for i, c in enumerate(counts):
                h.counts[i] = int(c)
        else:
            # Format 1: each one-minute bin is re-counted at its middle.
            for k, c in d.get("bins", {}).items():
                gap = (int(k) + 0.5) * _LEGACY_BIN_S
                b = bin_index(gap)
                if b >= NBINS:
                    h.oob += int(c)
                else:
                    h.counts[b] += int(c)
        h.oob += int(d.get("oob", 0))
        return h


# -- cost model --------------------------------------------------------------------------------


def priority_weight(priority: int) -> float:
    """Cost weight of one cold-start second: 4/priority (1 -> 4, 2 -> 2, 3 -> 1.33, 4 -> 1).

    Priority follows llmd's convention, lower number = more important; values below 1 count
    as 1. A priority-1 model's cold start is worth four times a priority-4 model's.
    """
    return 4.0 / max(priority, 1)


def break_even_s(load_s: float, size_gb: float, priority: int, beta: float) -> float:
    """T* = w*L/(beta*s): idle seconds after which keeping a model costs more than a reload.

    Infinite when keeping is free (beta or size not positive).
    """
    rent = beta * size_gb
    if rent <= 0:
        return math.inf
    return priority_weight(priority) * max(load_s, 0.0) / rent


# -- keep-alive decisions ----------------------------------------------------------------------

PRIOR_SILENCES = 2
"""The default keep-alive D is a floor until this many recorded idle gaps have outlasted it:
until then the history has not seen what the minutes after a request bring (module docstring)."""
MIN_SAMPLES = 3
"""Eviction (`p_request_soon`, `eviction_cost_s`) uses a model's histogram only from this many
gaps on; without it, it falls back to distribution-free estimates."""
PREWARM_MIN_SAMPLES = 20
"""Pre-warm relies on the head of the distribution, which needs more evidence than the tail."""
MARGIN = 0.10
"""Shahrad et al.'s 10% margins: -10% on the pre-warm head, +10% on the keep-alive tail (within
T*). The cost-optimal timeout ends at the upper edge of the last bin it covers, i.e. just past
the longest gap it was fitted to; a gap a little longer than any seen so far is the likeliest
next surprise, and covering it costs only the margin on the gaps that outlast it."""
PREWARM_GAIN = 0.10
"""A pre-warm window must beat the best plain keep-alive by 10% of expected cost: it risks a
reload that finds no free memory and it is fitted to the head of the distribution, which moves
more than its tail."""
PREWARM_MIN_UNLOADED_S = 300.0
"""A pre-warm window unloads the model for at least 5 minutes: shorter gaps are cheaper to
bridge by keeping it than by churning the disk and the GPU with a reload."""
OOB_UNREPRESENTATIVE = 0.5
"""With T* beyond the histogram's range, this share of OOB gaps makes the history unusable."""


@dataclass(frozen=True)
class KeepAliveDecision:
    """How long a model stays loaded after its last in-flight request ends, and why.

    keep_alive_s: unload this many seconds after going idle; None keeps it loaded forever.
    source: "adaptive" (from the histogram), "fallback" (too few samples or not representative:
        T* clamped to [min, max]), "fixed" (config override), "default" (no history yet) or
        "pinned".
    samples: idle gaps the decision is based on.
    percentile: share (in %) of the recorded gaps this decision would have served warm; for a
        plain keep-alive that is the idle-gap percentile at keep_alive_s. None when not from
        the histogram.
    prewarm_after_s: if set, reload the model this many seconds after it went idle (if it was
        unloaded and memory allows); the load time is already subtracted, so the load finishes
        before the predicted next request.
    prewarm_expire_s: with pre-warm, unload again this many seconds after going idle if no
        request came.
    """

    keep_alive_s: float | None
    source: str
    samples: int
    percentile: float | None
    prewarm_after_s: float | None = None
    prewarm_expire_s: float | None = None


def fixed_decision(keep_alive_s: float, samples: int = 0) -> KeepAliveDecision:
    """The decision for a model with a fixed keep_alive in the config."""
    return KeepAliveDecision(max(keep_alive_s, 0.0), "fixed", samples, None)


def default_decision(default_s: float, samples: int = 0) -> KeepAliveDecision:
    """The decision for a model with no idle-gap history yet ([keep_alive] default)."""
    return KeepAliveDecision(max(default_s, 0.0), "default", samples, None)


def pinned_decision(samples: int = 0) -> KeepAliveDecision:
    """The decision for a pinned model: never unloaded on a timer."""
    return KeepAliveDecision(None, "pinned", samples, None)


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


def decide_keep_alive(
    hist: IdleHistogram,
    *,
    load_s: float,
    size_gb: float,
    priority: int,
    beta: float,
    min_s: float,
    max_s: float,
    default_s: float,
    prewarm: bool = False,
    idle_s: float = 0.0,
) -> KeepAliveDecision:
    """Choose a model's keep-alive from its idle-gap history and the default (module docstring).

    idle_s is how long the model has been idle already (0 as it goes idle; more when a reload
    re-arms its timer). keep_alive_s always counts from the start of the idle period: a value at
    or below idle_s means unload now. With prewarm=True it may instead return a pre-warm window
    (unload early, reload shortly before the predicted next request, unload again at
    prewarm_expire_s) when that is cheaper in expectation than the best plain keep-alive.
    """
    idle = max(idle_s, 0.0)
    plan = _plan(hist, load_s, size_gb, priority, beta, min_s, max_s, default_s, prewarm)
    running = plan.keep_alive_s is None or idle < plan.keep_alive_s
    if running or (plan.prewarm_expire_s is not None and idle < plan.prewarm_expire_s):
        # Everything learned since the idle period began is that it has not ended yet, and the
        # plan already priced that in: the cost-optimal timeout over T >= idle is the same one.
        return plan
    # The period has outlived its plan: judge it by the gaps that lasted at least this long,
    # and without enough of them by the distribution-free choice, keeping up to T*.
    n = hist.samples
    t_star = break_even_s(load_s, size_gb, priority, beta)
    cap = min(t_star, max_s)
    rent = beta * size_gb
    buy = priority_weight(priority) * max(load_s, 0.0)
    t, kind, covered = _least_cost_timeout(hist, rent, buy, cap, cap, idle)
    if kind == _EDGE:
        t = min(t * (1 + MARGIN), cap)
    source = "fallback" if kind == _FLOOR or n == 0 else "adaptive"
    return KeepAliveDecision(_clamp(t, min_s, max_s), source, n, 100.0 * covered / n if n else None)


def explain(
    hist: IdleHistogram,
    *,
    load_s: float,
    size_gb: float,
    priority: int,
    beta: float,
    min_s: float,
    max_s: float,
    default_s: float,
    prewarm: bool = False,
    idle_s: float = 0.0,
) -> dict[str, Any]:
    """decide_keep_alive's decision for these inputs with the numbers behind it, as plain data
    (for `llmctl explain`): the cost model (rent per idle second, the cost of a reload, the
    break-even time T* and the cap min(T*, max)), the idle-gap histogram, and the expected
    cost per gap of each candidate timeout over that history (the cost curve), from unloading
    at once to the cap: one point at every bin edge where a recorded gap ends (between those
    the cost only grows) and at the cap."""
    decision = decide_keep_alive(
        hist,
        load_s=load_s,
        size_gb=size_gb,
        priority=priority,
        beta=beta,
        min_s=min_s,
        max_s=max_s,
        default_s=default_s,
        prewarm=prewarm,
        idle_s=idle_s,
    )
    n = hist.samples
    rent = beta * size_gb
    buy = priority_weight(priority) * max(load_s, 0.0)
    t_star = break_even_s(load_s, size_gb, priority, beta)
    cap = min(t_star, max_s)
    curve: list[dict[str, float]] = []
    if n:
        keep, cum_n, _ = _timeout_costs(hist.counts, n, rent, buy)
        kmax = bisect.bisect_right(EDGES, cap) - 1
        for k in range(kmax + 1):
            if k == 0 or hist.counts[k - 1] or k == kmax:
                curve.append(
                    {
                        "timeout_s": EDGES[k],
                        "cost_per_gap": keep[k] / n,
                        "warm_pct": 100.0 * cum_n[k] / n,
                    }
                )
    return {
        "inputs": {
            "load_s": load_s,
            "size_gb": size_gb,
            "priority": priority,
            "beta": beta,
            "min_s": min_s,
            "max_s": max_s,
            "default_s": default_s,
            "prewarm": prewarm,
            "idle_s": idle_s,
        },
        "priority_weight": priority_weight(priority),
        "rent_per_idle_s": rent,
        "reload_cost": buy,
        "break_even_s": None if math.isinf(t_star) else t_star,
        "cap_s": None if math.isinf(cap) else cap,
        "samples": n,
        "oob": hist.oob,
        "prior_silences": PRIOR_SILENCES,
        "margin": MARGIN,
        "histogram": [
            {"lo_s": EDGES[b], "hi_s": EDGES[b + 1], "count": c}
            for b, c in enumerate(hist.counts)
            if c
        ],
        "curve": curve,
        "decision": {
            "keep_alive_s": decision.keep_alive_s,
            "source": decision.source,
            "samples": decision.samples,
            "percentile": decision.percentile,
            "prewarm_after_s": decision.prewarm_after_s,
            "prewarm_expire_s": decision.prewarm_expire_s,
        },
    }


def _plan(
    hist: IdleHistogram,
    load_s: float,
    size_gb: float,
    priority: int,
    beta: float,
    min_s: float,
    max_s: float,
    default_s: float,
    prewarm: bool,
) -> KeepAliveDecision:
    """decide_keep_alive's decision as the model goes idle (idle_s = 0)."""
    n = hist.samples
    if n == 0:
        return default_decision(_clamp(default_s, min_s, max_s))
    t_star = break_even_s(load_s, size_gb, priority, beta)
    cap = min(t_star, max_s)
    if t_star > RANGE_S and hist.oob >= OOB_UNREPRESENTATIVE * n:
        return KeepAliveDecision(_clamp(t_star, min_s, max_s), "fallback", n, None)

    rent = beta * size_gb  # latency-seconds per idle second
    buy = priority_weight(priority) * load_s  # latency-seconds per cold start
    floor_s = min(max(default_s, 0.0), cap)
    t, kind, covered = _least_cost_timeout(hist, rent, buy, cap, floor_s, 0.0)
    if kind == _EDGE:
        t = min(t * (1 + MARGIN), cap)
    plain = KeepAliveDecision(
        _clamp(t, min_s, max_s), "default" if kind == _FLOOR else "adaptive", n, 100.0 * covered / n
    )
    if not prewarm or n < PREWARM_MIN_SAMPLES:
        return plain
    # A window reloads ahead of the next request; what it relies on is the head of the
    # distribution (PREWARM_MIN_SAMPLES), so it is searched over the history alone.

    keep, cum_n, cum_g = _timeout_costs(hist.counts, n, rent, buy)
    kmax = bisect.bisect_right(EDGES, cap) - 1  # last k whose edge is within the cap
    best_k = _best_timeout(keep, kmax)
    window = _best_prewarm(hist.counts, n, keep, cum_n, cum_g, kmax, cap, load_s, rent, buy)
    if window is None:
        return plain
    cost, served, k1, j, k2 = window
    unload_s = _clamp(EDGES[k1], min_s, max_s)
    start = EDGES[j] * (1 - MARGIN) - load_s
    if cost >= (1 - PREWARM_GAIN) * keep[best_k] or unload_s >= start:
        return plain
    return KeepAliveDecision(unload_s, "adaptive", n, 100.0 * served / n, start, EDGES[k2])


_STOP, _EDGE, _FLOOR = range(3)  # what _least_cost_timeout's timeout is


def _outlasting(hist: IdleHistogram, floor_s: float, after_s: float) -> float:
    """How many recorded gaps longer than after_s also outlasted floor_s (OOB included; in a bin
    that floor_s splits, the share above it)."""
    lo_s = max(floor_s, after_s)
    total = float(hist.oob)
    for b in range(max(bisect.bisect_right(EDGES, lo_s) - 1, 0), NBINS):
        c = hist.counts[b]
        if c:
            lo, hi = EDGES[b], EDGES[b + 1]
            total += c * (hi - lo_s) / (hi - lo) if lo < lo_s else c
    return total


def _least_cost_timeout(
    hist: IdleHistogram, rent: float, buy: float, cap: float, floor_s: float, after_s: float
) -> tuple[float, int, int]:
    """The least-cost timeout T in [after_s, cap] for a gap known to last at least after_s, as
    (T, what T is, how many recorded gaps T covers).

    The cost is taken over the recorded gaps longer than after_s (in a bin that after_s splits,
    the share above it, taken as uniform): a covered gap g costs rent * g, any other
    rent * T + buy. Candidates: after_s itself (_STOP: unload now) and the bin edges (_EDGE: the
    caller adds the margin); on ties the shortest. While fewer than PRIOR_SILENCES of those gaps
    outlasted floor_s, T is at least floor_s (_FLOOR when it is floor_s itself).
    """
    counts = hist.counts
    if _outlasting(hist, floor_s, after_s) >= PRIOR_SILENCES:
        floor_s = after_s
    first = bisect.bisect_right(EDGES, after_s)  # the first edge beyond after_s
    last = bisect.bisect_right(EDGES, cap)  # edges [first, last) are candidates
    mass: list[tuple[float, float]] = [(0.0, 0.0)] * NBINS  # (count, gap) beyond after_s
    total = float(hist.oob)
    for b in range(max(first - 1, 0), NBINS):
        c = counts[b]
        if c:
            lo, hi = EDGES[b], EDGES[b + 1]
            if lo < after_s:
                mass[b] = (c * (hi - after_s) / (hi - lo), (after_s + hi) / 2)
            else:
                mass[b] = (float(c), _REPS[b])
            total += mass[b][0]

    best_t, best_kind, best = after_s, _STOP, math.inf
    cn = 0.0  # covered count and gap sum so far
    cg = 0.0

    def consider(t: float, kind: int) -> None:
        nonlocal best_t, best_kind, best
        cost = rent * (cg + (total - cn) * t) + buy * (total - cn)
        if cost < best * (1 - 1e-12):
            best_t, best_kind, best = t, kind, cost

    pending = floor_s > after_s  # the floor is still to be considered
    if not pending:
        consider(after_s, _STOP)
    for k in range(first, last):
        edge = EDGES[k]
        if pending and floor_s < edge:
            consider(floor_s, _FLOOR)
            pending = False
        m, g = mass[k - 1]
        cn += m
        cg += m * g
        if pending and floor_s == edge:
            consider(edge, _FLOOR)
            pending = False
        elif edge > floor_s:
            consider(edge, _EDGE)
    if pending:  # beyond the last edge within the cap
        consider(floor_s, _FLOOR)
    covered = sum(counts[: max(bisect.bisect_right(EDGES, best_t) - 1, 0)])
    return best_t, best_kind, covered


def _timeout_costs(
    counts: Sequence[float], n: float, rent: float, buy: float
) -> tuple[list[float], list[float], list[float]]:
    """(keep, cum_n, cum_g) over the candidate timeouts EDGES[k], k = 0..NBINS.

    Timeout EDGES[k] serves bins < k warm (EDGES[0] = 0: unload at once). keep[k] is its total
    cost over the history: a covered gap costs rent * g (g at its bin's middle), any other
    rent * EDGES[k] + buy. cum_n[k], cum_g[k]: count and gap sum of bins < k.
    """
    keep = [buy * n]
    cum_n = [0.0]
    cum_g = [0.0]
    cn = 0.0
    cg = 0.0
    for k in range(1, NBINS + 1):
        c = counts[k - 1]
        cn += c
        cg += c * _REPS[k - 1]
        cum_n.append(cn)
        cum_g.append(cg)
        rest = n - cn
        keep.append(rent * (cg + rest * EDGES[k]) + buy * rest)
    return keep, cum_n, cum_g


def _best_timeout(keep: list[float], kmax: int) -> int:
    """The k <= kmax minimising keep[k], the smallest on ties (no evidence beyond a bin, no
    reason to keep longer)."""
    best_k = 0
    for k in range(1, kmax + 1):
        if keep[k] < keep[best_k] * (1 - 1e-12):
            best_k = k
    return best_k


def _with_margin(k: int, cap: float) -> float:
    """Timeout EDGES[k] plus the tail margin, within the cap; 0 stays 0."""
    return min(EDGES[k] * (1 + MARGIN), cap) if k else 0.0


def _history_timeout(hist: IdleHistogram, n: int, rent: float, buy: float, cap: float) -> float:
    """The plain keep-alive decide_keep_alive takes from a usable history, before [min, max]:
    _best_timeout over _timeout_costs, in one pass that stops at the cap."""
    counts = hist.counts
    best_k = 0
    best = buy * n
    cn = 0
    cg = 0.0
    for k in range(1, bisect.bisect_right(EDGES, cap)):
        c = counts[k - 1]
        if c:
            cn += c
            cg += c * _REPS[k - 1]
        rest = n - cn
        cost = rent * (cg + rest * EDGES[k]) + buy * rest
        if cost < best * (1 - 1e-12):
            best_k, best = k, cost
    return _with_margin(best_k, cap)


def _best_prewarm(
    counts: Sequence[float],
    n: float,
    keep: list[float],
    cum_n: list[float],
    cum_g: list[float],
    kmax: int,
    cap: float,
    load_s: float,
    rent: float,
    buy: float,
) -> tuple[float, float, int, int, int] | None:
    """The cheapest pre-warm window over the history as (cost, served, k1, j, k2), or None.

    The window: keep for EDGES[k1] after going idle, then unload; start reloading at
    P = EDGES[j]*(1-MARGIN) - load_s so bins >= j find it warm; unload again at EDGES[k2]
    (k2 > j, at most `cap` after the reload finished). Over the history its cost separates into
    keep[k1] + keep[k2] + terms of j alone (derivation in bench/README.md), so the best k1 is a
    running prefix minimum and the best k2 a sliding-window minimum: linear time in bins.
    `served` is how many recorded gaps the window serves warm.
    """
    w = buy / load_s if load_s > 0 else 0.0
    best: tuple[float, float, int, int, int] | None = None
    k1 = 0  # argmin of keep[0..k1_hi]
    k1_hi = 0
    window: deque[int] = deque()  # k2 candidates, keep[] increasing
    k2_hi = 0
    for j in range(1, NBINS):
        ready = EDGES[j] * (1 - MARGIN)
        start = ready - load_s
        if start < PREWARM_MIN_UNLOADED_S:
            continue
        # k1: timeouts that leave the model unloaded long enough before the reload.
        while k1_hi + 1 <= kmax and EDGES[k1_hi + 1] <= start - PREWARM_MIN_UNLOADED_S:
            k1_hi += 1
            if keep[k1_hi] < keep[k1]:
                k1 = k1_hi
        # k2: expiries after bin j, at most `cap` after the model is ready again.
        while k2_hi + 1 <= NBINS and EDGES[k2_hi + 1] - ready <= cap:
            k2_hi += 1
            if k2_hi > j:
                while window and keep[window[-1]] >= keep[k2_hi]:
                    window.pop()
                window.append(k2_hi)
        while window and window[0] <= j:
            window.popleft()
        if not window:
            continue
        k2 = window[0]
        # Bins below j that reach past the reload's start: their gaps (taken as uniform over
        # the bin) wait only for what is left of the load, or find the model ready; the terms
        # above counted them as full cold starts.
        partial = 0.0
        served = 0.0
        b = j - 1
        while b >= 0 and EDGES[b + 1] > start:
            if counts[b]:
                cost_b, warm_b = _window_gap(EDGES[b], EDGES[b + 1], start, ready, rent, w, buy)
                partial += counts[b] * (cost_b - buy)
                served += counts[b] * warm_b
            b -= 1
        later = n - cum_n[j]
        cost = keep[k1] + keep[k2] + partial - buy * later - rent * cum_g[j] - rent * start * later
        if best is None or cost < best[0]:
            best = (cost, served + cum_n[k1] + cum_n[k2] - cum_n[j], k1, j, k2)
    return best


def _window_gap(
    lo: float, hi: float, start: float, ready: float, rent: float, w: float, buy: float
) -> tuple[float, float]:
    """Expected cost of a gap uniform on [lo, hi) under a reload over [start, ready), and the
    probability that it finds the model ready."""
    width = hi - lo
    a = min(max(start, lo), hi)  # [lo, a): cold; [a, b): waits for the load; [b, hi): warm
    b = min(max(ready, lo), hi)
    p_wait = (b - a) / width
    p_warm = (hi - b) / width
    g_wait = (a + b) / 2
    cost = (
        (a - lo) / width * buy
        + p_wait * (rent * (g_wait - start) + w * (ready - g_wait))
        + p_warm * rent * ((b + hi) / 2 - start)
    )
    return cost, p_warm


# -- eviction ----------------------------------------------------------------------------------

DEFAULT_SOON_S = 600.0
"""Horizon for "needed soon" when a candidate's break-even time is unknown."""


@dataclass(frozen=True)
class Candidate:
    """A loaded model that could be evicted.

    break_even_s: its T*, the horizon for "needed soon"; None uses DEFAULT_SOON_S.
    load_s: its load time, for the expected cost of evicting it (`eviction_cost_s`).
    """

    name: str
    priority: int
    pinned: bool
    in_flight: int
    size_bytes: int
    idle_s: float
    hist: IdleHistogram | None
    break_even_s: float | None = None
    load_s: float = 0.0


@dataclass(frozen=True)
class ModelInputs:
    """What the policy weighs about one model, whoever asks (keep-alive, eviction, the admin
    view, the replay benchmark): derived in one place, llmd.models.policy_inputs."""

    priority: int
    pinned: bool
    load_s: float  # seconds a cold load takes
    size_gb: float  # GB of GPU memory it holds when loaded


def candidate(
    name: str,
    inputs: ModelInputs,
    *,
    in_flight: int,
    size_bytes: int,
    idle_s: float,
    hist: IdleHistogram | None,
    beta: float,
) -> Candidate:
    """A loaded model as a candidate for eviction; size_bytes is what evicting it frees."""
    return Candidate(
        name=name,
        priority=inputs.priority,
        pinned=inputs.pinned,
        in_flight=in_flight,
        size_bytes=size_bytes,
        idle_s=idle_s,
        hist=hist,
        break_even_s=break_even_s(inputs.load_s, inputs.size_gb, inputs.priority, beta),
        load_s=inputs.load_s,
    )


def _own_keep_s(c: Candidate) -> float | None:
    """The keep-alive the candidate's own history implies (decide_keep_alive's cost-optimal
    timeout, without the operator's bounds), or None when the history cannot tell."""
    t_star = c.break_even_s
    h = c.hist
    if t_star is None or h is None or not math.isfinite(t_star) or t_star <= 0:
        return None
    n = h.samples
    if n < MIN_SAMPLES or (t_star > RANGE_S and h.oob >= OOB_UNREPRESENTATIVE * n):
        return None
    buy = priority_weight(c.priority) * max(c.load_s, 0.0)
    if buy <= 0:
        return None
    return _history_timeout(h, n, buy / t_star, buy, t_star)  # rent = beta * s = buy / T*


def p_request_soon(c: Candidate, horizon_s: float | None = None) -> float:
    """Probability that the candidate gets a request within horizon_s from now (default: its
    break-even window).

    From its histogram, conditioned on having been idle idle_s already: among past gaps longer
    than idle_s, the share that ended within the window (smoothed towards the memoryless
    estimate below). Without enough history: 1 - exp(-window/idle_s), i.e. the longer a model
    has been idle, the less likely it is needed soon (LRU order).
    """
    if horizon_s is not None:
        horizon = max(horizon_s, 0.0)
    else:
        horizon = DEFAULT_SOON_S if c.break_even_s is None else c.break_even_s
    idle = max(c.idle_s, 0.0)
    prior = 1.0 - math.exp(-horizon / max(idle, 60.0))
    h = c.hist
    if h is None or h.samples < MIN_SAMPLES:
        return prior
    survivors = h.oob
    soon = 0
    end = idle + horizon
    for rep, cnt in zip(_REPS, h.counts, strict=True):
        if cnt and rep > idle:
            survivors += cnt
            if rep <= end:
                soon += cnt
    return (soon + prior) / (survivors + 1)


def choose_victims(
    candidates: Sequence[Candidate],
    need_bytes: int,
    *,
    requester_priority: int | None = None,
    preempt: bool = False,
) -> list[str] | None:
    """Names of the models to evict, in order, to free need_bytes; None if it cannot be freed.

    Never a pinned model; never a busy one (in_flight > 0) unless preempt and it is less
    important than the requester; never one more important than the requester. Lowest priority
    (highest number) goes first; within a priority, idle before busy, then the one least likely
    to be needed soon (`p_request_soon`), then the longest idle. Victims that turn out not to be
    needed once enough is freed are spared, most valuable first.
    """
    if need_bytes <= 0:
        return []
    eligible: list[tuple[tuple[int, bool, float, float, str], Candidate]] = []
    for c in candidates:
        if c.pinned:
            continue
        if requester_priority is not None and c.priority < requester_priority:
            continue
        if c.in_flight > 0 and not (
            preempt and requester_priority is not None and c.priority > requester_priority
        ):
            continue
        key = (-c.priority, c.in_flight > 0, p_request_soon(c), -c.idle_s, c.name)
        eligible.append((key, c))
    eligible.sort(key=lambda kc: kc[0])
    chosen: list[Candidate] = []
    freed = 0
    for _, c in eligible:
        if freed >= need_bytes:
            break
        chosen.append(c)
        freed += c.size_bytes
    if freed < need_bytes:
        return None
    for c in reversed(chosen[:]):
        if freed - c.size_bytes >= need_bytes:
            chosen.remove(c)
            freed -= c.size_bytes
    return [c.name for c in chosen]


def eviction_cost_s(c: Candidate) -> float:
    """Expected priority-weighted latency-seconds that evicting c now costs: w * L * P(soon).

    "Soon" is before c's own keep-alive (what its history implies, as decide_keep_alive takes
    it) would have unloaded it anyway: a request after that is a cold start either way. Without
    a usable history, within its break-even time.
    """
    return _eviction_cost(c, _own_keep_s(c))


def _eviction_cost(c: Candidate, own: float | None) -> float:
    horizon = None if own is None else own - max(c.idle_s, 0.0)
    return priority_weight(c.priority) * c.load_s * p_request_soon(c, horizon)


def admission_wait_s(
    candidates: Sequence[Candidate], need_bytes: int, *, requester_priority: int
) -> float | None:
    """How long a load blocked by more important idle models should wait before evicting anyway.

    When choose_victims(..., requester_priority=p) returns None, waiting is the rent and
    evicting the models choose_victims(...) (no requester) picks is the purchase: wait until
    the requester's weighted wait equals the expected cold-start cost the eviction causes, then
    evict them (ski rental again). When the victims' own keep-alives are known, so is when
    the memory frees by itself: wait exactly that long if it is within that bound, else 0
    (waiting would only add to the eviction's cost). None when even that cannot free the memory
    (all busy or pinned): wait for memory to free.
    """
    names = choose_victims(candidates, need_bytes)
    if names is None:
        return None
    by_name = {c.name: c for c in candidates}
    owns = {n: _own_keep_s(by_name[n]) for n in names}
    cost = sum(_eviction_cost(by_name[n], owns[n]) for n in names)
    wait = cost / priority_weight(requester_priority)
    # When every victim's own keep-alive is known, so is when the memory frees by itself: wait
    # for that if it is cheaper than evicting, else waiting only adds to the eviction's cost.
    free_in = 0.0
    for n in names:
        own = owns[n]
        if own is None:
            return wait
        free_in = max(free_in, own - max(by_name[n].idle_s, 0.0))
    return free_in if free_in <= wait else 0.0
