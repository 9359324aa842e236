"""Tests for llmd.policy: the idle-gap histogram, keep-alive decisions and victim choice."""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

import pytest

from llmd import policy
from llmd.policy import (
    EDGES,
    NBINS,
    PRIOR_SILENCES,
    RANGE_S,
    Candidate,
    IdleHistogram,
    KeepAliveDecision,
    admission_wait_s,
    bin_index,
    break_even_s,
    choose_victims,
    decide_keep_alive,
    default_decision,
    eviction_cost_s,
    fixed_decision,
    pinned_decision,
    priority_weight,
)

GB = 10**9
# An 8B model at priority 2: T* = 2 * 6.5 / (0.001 * 4.9) = 2653 s (44 min).
MODEL: dict[str, Any] = {"load_s": 6.5, "size_gb": 4.9, "priority": 2, "beta": 0.001}
BOUNDS = {"min_s": 0.0, "max_s": 4 * 3600.0, "default_s": 600.0}
T_STAR = break_even_s(**MODEL)


def hist_of(*gaps: float) -> IdleHistogram:
    h = IdleHistogram()
    for g in gaps:
        h.add(g)
    return h


def decide(h: IdleHistogram, **overrides: float | bool) -> KeepAliveDecision:
    args: dict[str, object] = {**MODEL, **BOUNDS, **overrides}
    return decide_keep_alive(h, **args)  # type: ignore[arg-type]


# -- cost model --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("priority", "weight"),
    [(1, 4.0), (2, 2.0), (3, 4 / 3), (4, 1.0), (8, 0.5), (0, 4.0), (-3, 4.0)],
)
def test_priority_weight(priority: int, weight: float) -> None:
    """A cold start weighs 4/priority; priorities below 1 count as 1."""
    assert priority_weight(priority) == pytest.approx(weight)


@pytest.mark.parametrize(
    ("load_s", "size_gb", "priority", "beta", "expected"),
    [
        (6.5, 4.9, 2, 0.001, 2 * 6.5 / (0.001 * 4.9)),
        (45.0, 43.0, 4, 0.001, 45.0 / 0.043),
        (1.5, 0.3, 1, 0.001, 4 * 1.5 / 0.0003),
        (6.5, 4.9, 2, 0.0, math.inf),
        (6.5, 0.0, 2, 0.001, math.inf),
        (0.0, 4.9, 2, 0.001, 0.0),
    ],
)
def test_break_even(
    load_s: float, size_gb: float, priority: int, beta: float, expected: float
) -> None:
    """T* = w*L/(beta*s), infinite when idle memory costs nothing."""
    assert break_even_s(load_s, size_gb, priority, beta) == pytest.approx(expected)


# -- histogram ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gap_s", "index"),
    [
        (-1.0, 0),
        (0.0, 0),
        (4.9, 0),
        (5.0, 1),
        (59.9, 11),
        (60.0, 12),
        (299.0, 27),
        (300.0, 28),
        (14399.0, NBINS - 1),
        (RANGE_S, NBINS),
        (1e9, NBINS),
    ],
)
def test_bin_index(gap_s: float, index: int) -> None:
    """Gaps land in [EDGES[i], EDGES[i+1]); negative gaps in the first bin, 4 h and up OOB."""
    assert bin_index(gap_s) == index


def test_edges_are_fine_for_short_gaps_and_log_spaced_after() -> None:
    """Bins are 5 s wide to 1 min, 15 s to 5 min, then at most ~6% wide, up to 4 h."""
    widths = [b - a for a, b in itertools.pairwise(EDGES)]
    assert EDGES[0] == 0 and EDGES[-1] == RANGE_S
    assert all(w == 5 for w in widths[:12]) and all(w == 15 for w in widths[12:28])
    assert all(0 < w <= 0.065 * a for a, w in zip(EDGES[28:], widths[28:], strict=False))


def test_add_merge_samples() -> None:
    """add counts a gap, OOB included in samples; merge adds counts bin by bin."""
    a = hist_of(10, 10, 100, 5 * 3600)
    b = hist_of(10, 9 * 3600)
    assert (a.samples, a.oob) == (4, 1)
    a.merge(b)
    assert a.samples == 6 and a.oob == 2 and a.counts[bin_index(10)] == 3


@pytest.mark.parametrize(
    "gaps",
    [[], [0.5], [10, 10, 100, 5 * 3600], [g * 37.0 for g in range(400)]],
)
def test_dict_round_trip(gaps: list[float]) -> None:
    """from_dict(to_dict(h)) == h, through JSON."""
    h = hist_of(*gaps)
    assert IdleHistogram.from_dict(json.loads(json.dumps(h.to_dict()))) == h


def test_state_stays_under_1kb() -> None:
    """Even with a 6-digit count in every bin, a day's JSON stays under 1 KB."""
    h = IdleHistogram(counts=[999_999] * NBINS, oob=999_999)
    assert len(json.dumps(h.to_dict())) < 1024


@pytest.mark.parametrize(
    ("legacy", "gap_bins", "oob"),
    [
        ({"bins": {"0": 3}, "oob": 0}, {bin_index(30): 3}, 0),
        ({"bins": {"1": 2, "10": 1}, "oob": 4}, {bin_index(90): 2, bin_index(630): 1}, 4),
        ({"bins": {"239": 5}}, {bin_index(239.5 * 60): 5}, 0),
        ({}, {}, 0),
    ],
)
def test_from_dict_reads_format_1(
    legacy: dict[str, object], gap_bins: dict[int, int], oob: int
) -> None:
    """The old sparse one-minute format is re-binned at each minute's middle."""
    h = IdleHistogram.from_dict(legacy)
    assert {i: c for i, c in enumerate(h.counts) if c} == gap_bins
    assert h.oob == oob


def test_from_dict_rejects_too_many_counts() -> None:
    """A counts list longer than the bins is an error, not silently truncated."""
    with pytest.raises(ValueError, match="at most"):
        IdleHistogram.from_dict({"v": 2, "counts": [1] * (NBINS + 1), "oob": 0})


# -- keep-alive decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("decision", "expected"),
    [
        (fixed_decision(1800), KeepAliveDecision(1800, "fixed", 0, None)),
        (fixed_decision(-5, samples=3), KeepAliveDecision(0, "fixed", 3, None)),
        (default_decision(600), KeepAliveDecision(600, "default", 0, None)),
        (pinned_decision(), KeepAliveDecision(None, "pinned", 0, None)),
    ],
)
def test_helpers(decision: KeepAliveDecision, expected: KeepAliveDecision) -> None:
    """The daemon gets fixed, default and pinned decisions without building them itself."""
    assert decision == expected


@pytest.mark.parametrize(
    ("gaps", "overrides", "keep_s", "source"),
    [
        # No history: [keep_alive] default, clamped to [min, max].
        ([], {}, 600.0, "default"),
        ([], {"max_s": 300.0}, 300.0, "default"),
        # Too few gaps to outweigh the default, within T* and max.
        ([100, 100], {}, 600.0, "default"),
        ([100, 100], {"max_s": 300.0}, 300.0, "default"),
        # Gaps of ~100 s and nothing longer: no evidence against the default either.
        ([100] * 50, {}, 600.0, "default"),
        # T* beyond the histogram's range and mostly OOB gaps: the history cannot tell.
        ([5 * 3600] * 8 + [60], {"beta": 1e-5}, 4 * 3600.0, "fallback"),
        # Gaps of ~100 s between long silences: keep to the upper edge of their bin plus the
        # 10% tail margin.
        ([100] * 50 + [3 * 3600] * 10, {}, 105.0 * 1.1, "adaptive"),
        # All gaps beyond T*: keeping never pays, unload at once.
        ([3 * 3600] * 20, {}, 0.0, "adaptive"),
        ([T_STAR * 1.2] * 20, {}, 0.0, "adaptive"),
        # 90% follow-ups within a minute, 10% long silences: cover the follow-ups only.
        ([40] * 90 + [3 * 3600] * 10, {}, 45.0 * 1.1, "adaptive"),
        # 40-minute gaps are worth covering for this model (T* 44 min; the margin stops at T*) ...
        ([2400] * 20, {}, T_STAR, "adaptive"),
        ([1200] * 20, {}, 1212.0 * 1.1, "adaptive"),
        # ... but not for a low-priority one (T* 22 min).
        ([2400] * 20, {"priority": 4}, 0.0, "adaptive"),
        # min/max bound the learned value.
        ([100] * 50 + [3 * 3600] * 10, {"min_s": 300.0}, 300.0, "adaptive"),
        ([2400] * 20, {"max_s": 1200.0}, 0.0, "adaptive"),
    ],
)
def test_decide_keep_alive(
    gaps: list[float], overrides: dict[str, float], keep_s: float, source: str
) -> None:
    """The keep-alive follows the history's cost-optimal timeout within T* and [min, max]."""
    d = decide(hist_of(*gaps), **overrides)
    assert d.keep_alive_s == pytest.approx(keep_s)
    assert d.source == source
    assert d.samples == len(gaps)
    assert d.prewarm_after_s is None


@pytest.mark.parametrize("seed", range(12))
def test_keep_alive_minimises_cost_over_history(seed: int) -> None:
    """The chosen timeout is the least-cost edge <= T* over the history, plus 10% within T*;
    while fewer than PRIOR_SILENCES gaps outlasted the default, among timeouts >= the default."""
    rng = random.Random(seed)
    top = rng.choice([NBINS, 40, 20])  # some histograms with short gaps only
    counts = [rng.choice([0, 0, 0, 0, 1, 5, 20]) if i < top else 0 for i in range(NBINS)]
    h = IdleHistogram(counts=counts, oob=rng.choice([0, 0, 1, 5]))
    d = decide(h)
    rent: float = MODEL["beta"] * MODEL["size_gb"]
    buy: float = priority_weight(2) * MODEL["load_s"]
    default = BOUNDS["default_s"]

    def cost(t: float) -> float:
        total = h.oob * (rent * t + buy)
        for i, c in enumerate(h.counts):
            g = (EDGES[i] + EDGES[i + 1]) / 2
            total += c * (rent * g if EDGES[i + 1] <= t else rent * t + buy)
        return total

    outlasting = h.oob + sum(c for i, c in enumerate(h.counts) if EDGES[i] >= default)
    floor = default if outlasting < PRIOR_SILENCES else 0.0
    candidates = sorted({t for t in EDGES if floor <= t <= T_STAR} | {floor})
    best = min(cost(t) for t in candidates)
    best_t = next(t for t in candidates if cost(t) <= best * (1 + 1e-9))  # shortest on ties
    assert d.keep_alive_s is not None and d.keep_alive_s <= T_STAR
    if best_t == floor and floor:
        assert (d.keep_alive_s, d.source) == (floor, "default")
    else:
        assert d.keep_alive_s == pytest.approx(min(best_t * 1.1, T_STAR))  # plus the margin


def test_percentile_is_the_share_kept_warm() -> None:
    """percentile is the share of recorded gaps the keep-alive covers."""
    d = decide(hist_of(*([40] * 90 + [3 * 3600] * 10)))
    assert d.percentile == pytest.approx(90.0)


@pytest.mark.parametrize("priority", [1, 2, 3, 4, 5])
def test_more_important_models_are_kept_at_least_as_long(priority: int) -> None:
    """For the same history, a more important model never gets a shorter keep-alive."""
    h = hist_of(*[60.0 * m for m in range(1, 120)])
    more = decide(h, priority=priority).keep_alive_s
    less = decide(h, priority=priority + 1).keep_alive_s
    assert more is not None and less is not None and more >= less


@pytest.mark.parametrize(
    ("period_s", "jitter", "load_s"),
    [(3600.0, 0.02, 6.5), (1800.0, 0.05, 6.5), (3600.0, 0.05, 45.0)],
)
def test_prewarm_for_predictable_gaps(period_s: float, jitter: float, load_s: float) -> None:
    """Regular gaps beyond T*: unload at once, reload before the earliest gap, expire after."""
    rng = random.Random(1)
    gaps = [period_s * (1 + rng.uniform(-jitter, jitter)) for _ in range(50)]
    d = decide(hist_of(*gaps), prewarm=True, load_s=load_s, priority=4)
    assert d.prewarm_after_s is not None and d.prewarm_expire_s is not None
    assert d.keep_alive_s == 0.0 and d.source == "adaptive"
    assert d.prewarm_after_s + load_s <= min(gaps)
    assert d.prewarm_expire_s >= max(gaps)
    assert d.percentile is not None and d.percentile > 95
    assert decide(hist_of(*gaps), load_s=load_s, priority=4).prewarm_after_s is None


@pytest.mark.parametrize(
    "gaps",
    [
        (lambda rng: [rng.expovariate(1 / 3600) for _ in range(200)])(random.Random(2)),
        [3600.0] * 10,  # too few samples to trust the head
        [100.0] * 50,  # short gaps: keeping is cheaper than any reload
    ],
)
def test_no_prewarm_without_a_predictable_head(gaps: list[float]) -> None:
    """Pre-warm is only proposed where it beats a plain keep-alive on enough evidence."""
    assert decide(hist_of(*gaps), prewarm=True).prewarm_after_s is None


# -- eviction ----------------------------------------------------------------------------------


def cand(
    name: str,
    priority: int = 3,
    size_gb: float = 5,
    idle_s: float = 600,
    *,
    pinned: bool = False,
    in_flight: int = 0,
    hist: IdleHistogram | None = None,
) -> Candidate:
    return Candidate(
        name, priority, pinned, in_flight, int(size_gb * GB), idle_s, hist, 1800.0, 6.5
    )


SOON = hist_of(*[700.0] * 30)  # after 600 s idle, the next request is due in ~100 s
LATER = hist_of(*[3 * 3600.0] * 30)  # not needed for hours


@pytest.mark.parametrize(
    ("cands", "need_gb", "kwargs", "victims"),
    [
        # Lowest priority (highest number) first.
        ([cand("a", 1), cand("b", 4), cand("c", 2)], 5, {}, ["b"]),
        ([cand("a", 1), cand("b", 4), cand("c", 2)], 10, {}, ["b", "c"]),
        # Pinned and busy models stay.
        ([cand("a", 5, pinned=True), cand("b", 2)], 5, {}, ["b"]),
        ([cand("a", 5, in_flight=1), cand("b", 2)], 5, {}, ["b"]),
        # Busy ones only with preempt, and only below the requester's priority.
        ([cand("a", 5, in_flight=1)], 5, {"requester_priority": 3, "preempt": True}, ["a"]),
        ([cand("a", 3, in_flight=1)], 5, {"requester_priority": 3, "preempt": True}, None),
        ([cand("a", 5, in_flight=1)], 5, {"preempt": True}, None),
        # Idle before busy within a priority when preempting.
        (
            [cand("busy", 5, in_flight=2), cand("idle", 5)],
            5,
            {"requester_priority": 1, "preempt": True},
            ["idle"],
        ),
        # Never more important than the requester; equal is fine.
        ([cand("a", 1), cand("b", 2)], 5, {"requester_priority": 2}, ["b"]),
        ([cand("a", 1), cand("b", 2)], 10, {"requester_priority": 2}, None),
        # Equal priority: the one least likely needed soon, by history ...
        ([cand("soon", hist=SOON), cand("later", hist=LATER)], 5, {}, ["later"]),
        # ... or, without history, the longest idle.
        ([cand("new", idle_s=60), cand("old", idle_s=6000)], 5, {}, ["old"]),
        # Victims not needed once enough is freed are spared.
        ([cand("small", size_gb=1), cand("big", size_gb=10, idle_s=1)], 5, {}, ["big"]),
        # Nothing to free, or not enough.
        ([cand("a")], 0, {}, []),
        ([cand("a")], 6, {}, None),
        ([], 1, {}, None),
    ],
)
def test_choose_victims(
    cands: list[Candidate],
    need_gb: float,
    kwargs: dict[str, object],
    victims: list[str] | None,
) -> None:
    """Victims: lowest priority first, never pinned, busy or more important than the requester."""
    assert choose_victims(cands, int(need_gb * GB), **kwargs) == victims  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cands", "requester", "expected"),
    [
        # No history: wait as long as evicting is expected to cost (ski rental), with P(soon)
        # the memoryless 1 - exp(-T*/idle).
        ([cand("top", 1)], 3, (4 * 6.5) * (1 - math.exp(-1800 / 600)) / (4 / 3)),
        # Its history says when it unloads by itself (~789 s: 700 s gaps, plus the margin);
        # 189 s from now is dearer than evicting it (19.5 s of waiting): evict at once.
        ([cand("top", 1, hist=SOON)], 3, 0.0),
        # ... but with a 45 s load, evicting costs 135 s of waiting: wait the 109 s instead.
        (
            [Candidate("top", 1, False, 0, 5 * GB, 680.0, SOON, 1800.0, 45.0)],
            3,
            EDGES[bin_index(700) + 1] * 1.1 - 680,
        ),
        # A model unlikely to be needed soon is evicted with little wait.
        ([cand("top", 1, hist=LATER)], 3, None),
        # Nothing could ever be freed: wait for memory.
        ([cand("busy", 1, in_flight=1)], 3, None),
    ],
)
def test_admission_wait(cands: list[Candidate], requester: int, expected: float | None) -> None:
    """A load blocked by more important idle models waits for them to unload by themselves if
    that is cheaper than evicting them, else their expected eviction cost (unknown unload time)
    or not at all."""
    wait = admission_wait_s(cands, 5 * GB, requester_priority=requester)
    if expected is None and cands[0].in_flight:
        assert wait is None
    elif expected is None:
        assert wait is not None and wait < 1.0
    else:
        assert wait == pytest.approx(expected, rel=0.05, abs=1e-9)


@pytest.mark.parametrize(
    ("hist", "idle_s", "cheap"),
    [
        (LATER, 600.0, True),  # its own keep-alive is 0 (gaps beyond T*): no loss in evicting
        (SOON, 600.0, False),  # next request due in ~100 s, before its keep-alive ends
        (SOON, 800.0, True),  # past its own keep-alive: it would be unloaded by now anyway
    ],
)
def test_eviction_cost_counts_requests_before_its_own_unload(
    hist: IdleHistogram, idle_s: float, cheap: bool
) -> None:
    """Evicting costs only the requests that would have found the model still loaded."""
    cost = eviction_cost_s(cand("m", 1, idle_s=idle_s, hist=hist))
    full = priority_weight(1) * 6.5
    assert (cost < 0.05 * full) if cheap else (cost > 0.9 * full)


@pytest.mark.parametrize(
    ("gaps", "prewarm"),
    [
        ([], False),  # no history: the default
        ([30.0, 40.0], False),  # a short history: the default is the floor
        ([100.0] * 12 + [20.0] * 3 + [1000.0] * 2, False),
        ([5.0] * 50 + [2000.0] * 30, True),  # a pre-warm window may win
        ([20000.0] * 5, False),  # out of range
    ],
)
def test_explain_gives_the_decision_and_the_cost_curve_it_comes_from(
    gaps: list[float], prewarm: bool
) -> None:
    hist = IdleHistogram()
    for g in gaps:
        hist.add(g)
    args: dict[str, Any] = dict(
        load_s=10.0, size_gb=5.0, priority=3, beta=0.001, min_s=60.0, max_s=14400.0
    )
    args.update(default_s=600.0, prewarm=prewarm)
    doc = policy.explain(hist, **args)
    d = policy.decide_keep_alive(hist, **args)
    assert doc["decision"] == {
        "keep_alive_s": d.keep_alive_s,
        "source": d.source,
        "samples": d.samples,
        "percentile": d.percentile,
        "prewarm_after_s": d.prewarm_after_s,
        "prewarm_expire_s": d.prewarm_expire_s,
    }
    assert doc["samples"] == len(gaps) and doc["oob"] == hist.oob
    assert doc["break_even_s"] == policy.break_even_s(10.0, 5.0, 3, 0.001)
    assert sum(b["count"] for b in doc["histogram"]) == len(gaps) - hist.oob
    if not gaps:
        assert doc["curve"] == []
        return
    curve = doc["curve"]
    assert curve[0]["timeout_s"] == 0 and curve[0]["warm_pct"] == 0
    assert curve[0]["cost_per_gap"] == doc["reload_cost"]  # unload at once: every gap is cold
    assert all(c["timeout_s"] <= doc["cap_s"] for c in curve)
    assert [c["timeout_s"] for c in curve] == sorted(c["timeout_s"] for c in curve)
