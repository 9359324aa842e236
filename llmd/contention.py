"""Contention: a model serving much slower than its own quiet baseline while the others do not.

Pure: plain samples in, plain changes out; the daemon feeds it the proxied requests and says
what it can see when a model turns contended (see `causes`).

Per model and per kind, TTFT (time to the first byte of a streamed answer) and TPOT (time per
output token after it), llmd keeps:
- a baseline: the median of the model's last `baseline_keep` quiet samples (warm, not queued,
  alone on its GPU, fully in GPU memory, not contended), judged only once it has
  `baseline_samples` of them;
- a window: its last `window` samples of any kind of request, none older than `window_s`.

A model is contended when, for TTFT or TPOT, its window's p99 is above `factor` times its
baseline (with at least `min_samples` in the window, `min_slow` of them above it), while every
other model that can be judged stays within `factor` of its own. It clears once both kinds are
below `clear_factor` times their baselines, or when its window has too few recent samples to say.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

KINDS = ("ttft", "tpot")
# Fewer output tokens than this say nothing reliable about the time per token.
MIN_TOKENS = 4


@dataclass(frozen=True)
class Rule:
    """The thresholds and windows (the [contention] config section)."""

    factor: float = 2.0
    clear_factor: float = 1.5
    window: int = 50
    window_s: float = 300.0
    min_samples: int = 10
    # Requests in the window above factor x baseline needed to set the flag: with fewer than
    # 100 samples the p99 is the slowest one, and one stray pause is not contention.
    min_slow: int = 3
    baseline_samples: int = 20
    baseline_keep: int = 100


@dataclass(frozen=True)
class Sample:
    """One finished request of a model, as the rule sees it."""

    time: float
    ttft_s: float | None  # None: not measured (not streamed, or it waited for a load)
    tpot_s: float | None  # None: not measured (too few tokens, not streamed)
    quiet: bool  # may teach the baseline
    queued_s: float = 0.0  # time it waited in llmd's queue
    loaded: bool = False  # it waited for its model to load


@dataclass(frozen=True)
class Change:
    """A model turning contended (or clearing), with the numbers behind it."""

    model: str
    contended: bool
    kind: str  # the kind furthest above its baseline ("" when cleared for want of samples)
    p99_s: float
    baseline_s: float
    ratio: float
    samples: int  # in the window
    queued_s: float  # the longest queue wait in the window
    loads: int  # requests in the window that waited for a load

    def summary(self) -> str:
        """What the numbers say, in one phrase."""
        if not self.kind:
            return f"fewer than the samples needed in its window ({self.samples})"
        return (
            f"p99 {self.kind.upper()} {_ms(self.p99_s)} is {self.ratio:.1f}x its baseline of "
            f"{_ms(self.baseline_s)} over its last {self.samples} requests"
        )


@dataclass
class _Model:
    baseline: dict[str, deque[float]]
    window: deque[Sample] = field(default_factory=deque)
    contended: bool = False
    since: float | None = None


def _size(part: int, whole: int) -> str:
    """ "2.1 of 4.0 GiB", or in MiB below a GiB."""
    unit, name = (1024**3, "GiB") if whole >= 1024**3 else (1024**2, "MiB")
    return f"{part / unit:.1f} of {whole / unit:.1f} {name}"


def _ms(s: float) -> str:
    if s < 0.01:
        return f"{s * 1000:.2f} ms"
    return f"{s * 1000:.0f} ms"


def p99(values: Iterable[float]) -> float:
    """The 99th percentile by the nearest-rank method (the largest of fewer than 100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


class Tracker:
    """Baselines, windows and the contended flag of every model seen."""

    def __init__(
        self, rule: Rule, baselines: Mapping[str, Mapping[str, Iterable[float]]] | None = None
    ) -> None:
        self.rule = rule
        self._models: dict[str, _Model] = {}
        self._dirty: set[str] = set()
        for model, kinds in (baselines or {}).items():
            m = self._model(model)
            for kind in KINDS:
                m.baseline[kind].extend(float(v) for v in kinds.get(kind, ()))

    def configure(self, rule: Rule) -> None:
        """Take reloaded thresholds; what was learned stays (trimmed to the new sizes)."""
        self.rule = rule
        for m in self._models.values():
            for kind in KINDS:
                m.baseline[kind] = deque(m.baseline[kind], maxlen=rule.baseline_keep)

    def _model(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is None:
            keep = self.rule.baseline_keep
            m = self._models[name] = _Model({k: deque(maxlen=keep) for k in KINDS})
        return m

    # -- reading ----------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Every model seen, by name."""
        return sorted(self._models)

    def contended(self, model: str) -> bool:
        m = self._models.get(model)
        return bool(m and m.contended)

    def since(self, model: str) -> float | None:
        """When the model turned contended (the sample's time), if it is."""
        m = self._models.get(model)
        return m.since if m is not None and m.contended else None

    def baseline(self, model: str, kind: str) -> float | None:
        """The model's baseline of this kind in seconds, once it has enough quiet samples."""
        m = self._models.get(model)
        if m is None or len(m.baseline[kind]) < self.rule.baseline_samples:
            return None
        return statistics.median(m.baseline[kind])

    def baseline_samples(self, model: str) -> dict[str, list[float]]:
        """The quiet samples behind the model's baselines (what the store keeps)."""
        m = self._models.get(model)
        return {k: list(m.baseline[k]) if m else [] for k in KINDS}

    def take_dirty(self) -> set[str]:
        """The models whose baselines changed since the last take."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def ratio(self, model: str) -> tuple[str, float, float, float] | None:
        """The kind furthest above its baseline: (kind, window p99, baseline, p99/baseline),
        or None when neither kind can be judged yet."""
        worst: tuple[str, float, float, float] | None = None
        for kind in KINDS:
            r = self._kind_ratio(model, kind)
            if r is not None and (worst is None or r[3] > worst[3]):
                worst = r
        return worst

    def _kind_ratio(self, model: str, kind: str) -> tuple[str, float, float, float] | None:
        m = self._models.get(model)
        base = self.baseline(model, kind)
        if m is None or base is None or base <= 0:
            return None
        values = [v for s in m.window if (v := _value(s, kind)) is not None]
        if len(values) < self.rule.min_samples:
            return None
        high = p99(values)
        return (kind, high, base, high / base)

    # -- learning and judging ---------------------------------------------------------------

    def observe(self, model: str, s: Sample) -> list[Change]:
        """Take one finished request; the changes it makes (this model's only)."""
        m = self._model(model)
        rule = self.rule
        m.window.append(s)
        while len(m.window) > rule.window:
            m.window.popleft()
        self._expire(m, s.time)
        if s.quiet and not m.contended:
            for kind in KINDS:
                v = _value(s, kind)
                if v is not None:
                    m.baseline[kind].append(v)
                    self._dirty.add(model)
        return [c for c in [self._judge(model, m, s.time)] if c is not None]

    def tick(self, now: float) -> list[Change]:
        """Age the windows out; contended models without recent samples clear."""
        out = []
        for name, m in self._models.items():
            self._expire(m, now)
            if m.contended:
                c = self._judge(name, m, now)
                if c is not None:
                    out.append(c)
        return out

    def _expire(self, m: _Model, now: float) -> None:
        while m.window and m.window[0].time < now - self.rule.window_s:
            m.window.popleft()

    def _judge(self, name: str, m: _Model, now: float) -> Change | None:
        rule = self.rule
        r = self.ratio(name)
        if m.contended:
            if r is None:
                m.contended, m.since = False, None
                return self._change(name, m, False, None)
            if all(
                (x := self._kind_ratio(name, k)) is None or x[3] < rule.clear_factor for k in KINDS
            ):
                m.contended, m.since = False, None
                return self._change(name, m, False, r)
            return None
        if r is None or r[3] <= rule.factor or self._slow(m, r) < rule.min_slow:
            return None
        for other, om in self._models.items():
            if other != name:
                o = self.ratio(other)
                if o is not None and o[3] > rule.factor and self._slow(om, o) >= rule.min_slow:
                    return None  # slow everywhere: not this model's contention
        m.contended, m.since = True, now
        return self._change(name, m, True, r)

    def _slow(self, m: _Model, r: tuple[str, float, float, float]) -> int:
        """Samples in the window above the factor, in the kind of r."""
        limit = self.rule.factor * r[2]
        return sum(1 for s in m.window if (v := _value(s, r[0])) is not None and v > limit)

    def _change(
        self, name: str, m: _Model, contended: bool, r: tuple[str, float, float, float] | None
    ) -> Change:
        kind, high, base, ratio = r if r is not None else ("", 0.0, 0.0, 0.0)
        return Change(
            model=name,
            contended=contended,
            kind=kind,
            p99_s=high,
            baseline_s=base,
            ratio=ratio,
            samples=len(m.window),
            queued_s=max((s.queued_s for s in m.window), default=0.0),
            loads=sum(1 for s in m.window if s.loaded),
        )


def _value(s: Sample, kind: str) -> float | None:
    return s.ttft_s if kind == "ttft" else s.tpot_s


def sample_of(
    *,
    time: float,
    ttfb_s: float | None,
    duration_s: float,
    eval_tokens: int | None,
    streamed: bool,
    queued_s: float,
    waited_for_load: bool,
    quiet: bool,
) -> Sample | None:
    """The sample a finished, successful request gives, or None when it measures nothing.

    TTFT is the client's wait for the first byte, queue wait included (queueing behind other
    models is contention too) but not a load's wait; TPOT is the time after the first byte per
    output token. A non-streamed answer arrives in one piece: it measures neither."""
    if not streamed or ttfb_s is None:
        return None
    ttft = None if waited_for_load else ttfb_s
    tpot = None
    if eval_tokens is not None and eval_tokens >= MIN_TOKENS:
        tpot = max(0.0, duration_s - ttfb_s) / eval_tokens
    if ttft is None and tpot is None:
        return None
    return Sample(time, ttft, tpot, quiet and not waited_for_load, queued_s, waited_for_load)


@dataclass(frozen=True)
class Scene:
    """What llmd can see around a contended model when it turns contended."""

    size: int = 0  # bytes of its runner
    size_vram: int = 0  # of them in GPU memory
    queued_s: float = 0.0  # longest queue wait in its window
    loads: int = 0  # its requests in the window that waited for a load
    swaps: tuple[str, ...] = ()  # loads and evictions of models on its GPU in the window
    gpu_used: float | None = None  # fraction of its GPU's memory in use
    high_watermark: float = 0.95
    others_bytes: int = 0  # other programs' memory on its GPU
    others_floor: int = 256 * 1024**2  # less than this is noise, not a cause


def causes(scene: Scene) -> list[str]:
    """The likely causes llmd can see, most telling first; [] when it sees none."""
    gib = 1024**3
    out = []
    if scene.size and scene.size_vram < scene.size:
        out.append(f"partly on the CPU ({_size(scene.size_vram, scene.size)} on the GPU)")
    if scene.queued_s >= 0.1:
        out.append(f"queueing behind other requests (up to {scene.queued_s:.1f}s in its queue)")
    if scene.loads or scene.swaps:
        what = list(scene.swaps)
        if scene.loads:
            what.insert(0, f"{scene.loads} of its requests waited for a load")
        out.append("a swap (" + "; ".join(what) + ")")
    if scene.gpu_used is not None and scene.gpu_used > scene.high_watermark:
        out.append(
            f"GPU memory at {scene.gpu_used:.0%}, above gpu.high_watermark {scene.high_watermark:g}"
        )
    if scene.others_bytes > scene.others_floor:
        out.append(f"other programs hold {scene.others_bytes / gib:.1f} GiB on its GPU")
    return out


def reason(change: Change, found: list[str]) -> str:
    """The event's reason: the numbers, then the likely causes."""
    if not change.contended:
        return f"cleared: {change.summary()}"
    likely = "; ".join(found) if found else "no cause llmd can see"
    return f"{change.summary()}; likely: {likely}"
