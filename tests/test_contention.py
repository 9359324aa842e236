"""The contention rule: baselines from quiet samples, a window's p99 against them, hysteresis,
and the causes named."""

from __future__ import annotations

import pytest

from llmd.contention import (
    Change,
    Rule,
    Sample,
    Scene,
    Tracker,
    causes,
    p99,
    reason,
    sample_of,
)

RULE = Rule(window=10, window_s=60.0, min_samples=5, baseline_samples=5, baseline_keep=20)
GiB = 1024**3


def fast(t: float, quiet: bool = True) -> Sample:
    return Sample(t, ttft_s=0.1, tpot_s=0.01, quiet=quiet)


def slow(t: float, ttft: float = 0.1, tpot: float = 0.01, queued: float = 0.0) -> Sample:
    return Sample(t, ttft_s=ttft, tpot_s=tpot, quiet=False, queued_s=queued)


def warmed(models: tuple[str, ...] = ("a", "b"), n: int = 5) -> Tracker:
    tr = Tracker(RULE)
    for i in range(n):
        for m in models:
            assert tr.observe(m, fast(float(i))) == []
    return tr


def feed(tr: Tracker, model: str, samples: list[Sample]) -> list[Change]:
    out = []
    for s in samples:
        out += tr.observe(model, s)
    return out


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1.0], 1.0), ([3.0, 1.0, 2.0], 3.0), ([float(i) for i in range(1, 201)], 198.0)],
)
def test_p99_is_nearest_rank(values: list[float], expected: float) -> None:
    """p99 is the nearest-rank 99th percentile: the largest value of fewer than 100."""
    assert p99(values) == expected


@pytest.mark.parametrize(
    ("a_sample", "b_tpot", "expected"),
    [
        # TPOT 4x its baseline, the other model fine: contended.
        (slow(0, tpot=0.04), 0.01, ["a"]),
        # TTFT 3x: contended.
        (slow(0, ttft=0.3), 0.01, ["a"]),
        # 1.9x: within the factor.
        (slow(0, tpot=0.019), 0.01, []),
        # The other model was slow first: a is not singled out.
        (slow(0, tpot=0.04), 0.04, ["b"]),
    ],
)
def test_rule(a_sample: Sample, b_tpot: float, expected: list[str]) -> None:
    """A model is contended when its window p99 is above 2x its baseline while every other
    model stays within 2x of its own."""
    tr = warmed()
    changes: list[Change] = []
    for i in range(10, 15):
        changes += tr.observe("b", slow(float(i), tpot=b_tpot))
    for i in range(10, 15):
        changes += tr.observe("a", Sample(float(i), a_sample.ttft_s, a_sample.tpot_s, False))
    assert [c.model for c in changes if c.contended] == expected
    assert [m for m in ("a", "b") if tr.contended(m)] == expected


def test_one_stray_pause_is_not_contention() -> None:
    """Fewer than min_slow slow requests in the window set nothing, whatever the p99 says."""
    tr = warmed()
    assert feed(tr, "a", [slow(10, tpot=1.0), slow(11, tpot=1.0), fast(12), fast(13)]) == []
    assert [c.contended for c in feed(tr, "a", [slow(14, tpot=1.0)])] == [True]


def test_not_judged_before_enough_baseline_or_window_samples() -> None:
    """Without baseline_samples quiet samples, or with fewer than min_samples in the window,
    nothing is judged."""
    tr = warmed(n=4)  # one quiet sample short of a baseline
    assert feed(tr, "a", [slow(10 + i, tpot=1.0) for i in range(8)]) == []
    assert tr.baseline("a", "tpot") is None
    tr = Tracker(Rule(window=10, min_samples=5, baseline_samples=3, min_slow=1))
    feed(tr, "a", [fast(float(i)) for i in range(3)])  # baseline ready, window has 3
    assert feed(tr, "a", [slow(3, tpot=1.0)]) == []  # 4 in the window
    assert [c.contended for c in feed(tr, "a", [slow(4, tpot=1.0)])] == [True]


def test_hysteresis_clears_only_below_clear_factor() -> None:
    """Once contended a model stays so while above 1.5x, and clears below it, one change each
    way."""
    tr = warmed()
    assert [c.contended for c in feed(tr, "a", [slow(10 + i, tpot=0.05) for i in range(5)])] == [
        True
    ]
    # 1.8x: below the factor, above clear_factor: still contended once the slow ones are gone.
    assert feed(tr, "a", [slow(20 + i, tpot=0.018) for i in range(10)]) == []
    assert tr.contended("a")
    changes = feed(tr, "a", [fast(30 + i) for i in range(10)])
    assert [c.contended for c in changes] == [False]
    assert not tr.contended("a")


def test_slow_samples_do_not_teach_the_baseline() -> None:
    """Only quiet samples of a model that is not contended move its baseline."""
    tr = warmed()
    feed(tr, "a", [slow(10 + i, tpot=0.05) for i in range(5)])
    feed(tr, "a", [Sample(20 + i, 0.5, 0.05, quiet=True) for i in range(20)])
    assert tr.baseline("a", "tpot") == pytest.approx(0.01)
    assert tr.baseline("a", "ttft") == pytest.approx(0.1)


def test_window_ages_out_and_clears() -> None:
    """A contended model with no recent samples clears when its window empties."""
    tr = warmed()
    feed(tr, "a", [slow(10 + i, tpot=0.05) for i in range(5)])
    assert tr.tick(30.0) == []
    (c,) = tr.tick(100.0)
    assert not c.contended and c.kind == "" and "fewer than" in reason(c, [])


def test_baselines_survive_a_restart() -> None:
    """A tracker built from saved quiet samples judges at once."""
    tr = warmed()
    assert tr.take_dirty() == {"a", "b"}
    saved = {m: tr.baseline_samples(m) for m in tr.models()}
    again = Tracker(RULE, saved)
    assert again.baseline("a", "tpot") == pytest.approx(0.01)
    assert [c.contended for c in feed(again, "a", [slow(i, tpot=0.05) for i in range(5)])] == [True]


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        (dict(streamed=False), None),
        (dict(ttfb_s=None), None),
        (dict(), Sample(1.0, 0.2, 0.1, True, 0.0, False)),
        (dict(eval_tokens=3), Sample(1.0, 0.2, None, True, 0.0, False)),
        (dict(waited_for_load=True), Sample(1.0, None, 0.1, False, 0.0, True)),
        (dict(queued_s=0.5, quiet=False), Sample(1.0, 0.2, 0.1, False, 0.5, False)),
    ],
)
def test_sample_of(kw: dict[str, object], expected: Sample | None) -> None:
    """TTFT is the first byte's wait (not a load's); TPOT the rest per output token; an answer
    not streamed measures nothing."""
    args: dict[str, object] = dict(
        time=1.0,
        ttfb_s=0.2,
        duration_s=1.2,
        eval_tokens=10,
        streamed=True,
        queued_s=0.0,
        waited_for_load=False,
        quiet=True,
    )
    args.update(kw)
    assert sample_of(**args) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scene", "expected"),
    [
        (Scene(), []),
        (Scene(size=4 * GiB, size_vram=int(2.1 * GiB)), ["partly on the CPU (2.1 of 4.0 GiB"]),
        (Scene(size=266 * 2**20, size_vram=261 * 2**20), ["partly on the CPU (261.0 of 266.0 MiB"]),
        (Scene(queued_s=1.5), ["queueing behind other requests (up to 1.5s"]),
        (Scene(loads=2), ["a swap (2 of its requests waited for a load)"]),
        (Scene(swaps=("b loaded 3s ago",)), ["a swap (b loaded 3s ago)"]),
        (Scene(gpu_used=0.97), ["GPU memory at 97%, above gpu.high_watermark 0.95"]),
        (Scene(others_bytes=3 * GiB), ["other programs hold 3.0 GiB"]),
        (Scene(others_bytes=100 * 1024**2), []),
    ],
)
def test_causes(scene: Scene, expected: list[str]) -> None:
    """Each cause llmd can see is named with its numbers."""
    found = causes(scene)
    assert len(found) == len(expected)
    for f, e in zip(found, expected, strict=True):
        assert f.startswith(e)


def test_reason_names_numbers_and_causes() -> None:
    """The event's reason gives the p99, its ratio to the baseline and the likely causes."""
    tr = warmed()
    (c,) = feed(tr, "a", [slow(10 + i, ttft=0.41) for i in range(5)])
    text = reason(c, ["partly on the CPU (2.1 of 4.0 GiB on the GPU)"])
    assert text == (
        "p99 TTFT 410 ms is 4.1x its baseline of 100 ms over its last 8 requests; "
        "likely: partly on the CPU (2.1 of 4.0 GiB on the GPU)"
    )
