"""Request traces for the keep-alive benchmark: synthetic families F1-F8 and file loaders.

The families follow research/keepalive-science.md section 6. Every generator is seeded and
deterministic; times are seconds from the start of the trace, which starts on a Monday 00:00.
"""

from __future__ import annotations

import csv
import math
import random
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmd.policy import ModelInputs

DAY = 86400.0
HOUR = 3600.0
MINUTE = 60.0


@dataclass(frozen=True)
class ModelSpec:
    """A model as the benchmark sees it."""

    name: str
    size_gb: float
    load_s: float
    priority: int

    @property
    def inputs(self) -> ModelInputs:
        """What llmd's policy weighs about it (llmd.models.policy_inputs in the daemon)."""
        return ModelInputs(
            priority=self.priority, pinned=False, load_s=self.load_s, size_gb=self.size_gb
        )

    @property
    def service_s(self) -> float:
        """Default request service time: a few seconds, longer for bigger models."""
        return min(0.3 + 0.25 * self.size_gb, 12.0)


@dataclass(frozen=True)
class Request:
    t: float
    model: int  # index into Trace.models
    duration_s: float


@dataclass(frozen=True)
class Trace:
    """A family's models, its requests sorted by time, its length and its memory budget."""

    family: str
    title: str
    models: tuple[ModelSpec, ...]
    requests: tuple[Request, ...]
    end_s: float
    vram_gb: float | None


class TraceError(Exception):
    """A trace or models file is malformed; the message names the file and the line or key."""


# Realistic Ollama models: q4 weights plus KV cache in GB, cold-load seconds from NVMe
# (about 1 GB/s plus runner start-up).
CATALOGUE = {
    m.name: m
    for m in (
        ModelSpec("nomic-embed-text", 0.3, 1.5, 3),
        ModelSpec("mxbai-embed-large", 0.7, 2.0, 3),
        ModelSpec("qwen2.5-coder:1.5b", 1.0, 2.0, 3),
        ModelSpec("llama3.2:3b", 2.0, 3.0, 3),
        ModelSpec("mistral:7b", 4.1, 5.5, 3),
        ModelSpec("qwen2.5-coder:7b", 4.7, 6.0, 3),
        ModelSpec("llama3.1:8b", 4.9, 6.5, 3),
        ModelSpec("gemma2:9b", 5.4, 7.0, 3),
        ModelSpec("qwen2.5:14b", 9.0, 10.5, 3),
        ModelSpec("qwen2.5-coder:14b", 9.0, 10.5, 3),
        ModelSpec("gemma2:27b", 16.0, 17.5, 3),
        ModelSpec("qwen2.5:32b", 20.0, 21.5, 3),
        ModelSpec("llama3.3:70b", 43.0, 45.0, 3),
    )
}


def _model(name: str, priority: int) -> ModelSpec:
    m = CATALOGUE[name]
    return ModelSpec(m.name, m.size_gb, m.load_s, priority)


def gamma_gap(rng: random.Random, mean: float, cv: float) -> float:
    """A gamma-distributed gap with the given mean and coefficient of variation (0: constant)."""
    if cv <= 0:
        return mean
    shape = 1.0 / (cv * cv)
    return rng.gammavariate(shape, mean / shape)


def _duration(rng: random.Random, m: ModelSpec) -> float:
    return m.service_s * rng.uniform(0.5, 1.5)


class _Builder:
    def __init__(self, rng: random.Random, days: float) -> None:
        self.rng = rng
        self.end = days * DAY
        self.models: list[ModelSpec] = []
        self.reqs: list[Request] = []

    def add_model(self, m: ModelSpec) -> int:
        self.models.append(m)
        return len(self.models) - 1

    def hit(self, m: int, t: float) -> None:
        if 0 <= t < self.end:
            self.reqs.append(Request(t, m, _duration(self.rng, self.models[m])))

    def periodic(self, m: int, period: float, cv: float, start: float, stop: float) -> None:
        t = start + self.rng.uniform(0, period)
        while t < stop:
            self.hit(m, t)
            t += gamma_gap(self.rng, period, cv)

    def poisson(self, m: int, mean_gap: float, start: float, stop: float) -> None:
        t = start + self.rng.expovariate(1 / mean_gap)
        while t < stop:
            self.hit(m, t)
            t += self.rng.expovariate(1 / mean_gap)

    def session(self, ms: Sequence[int], t: float, mean_requests: float) -> float:
        """One human session on models ms, gaps 10 s + gamma(mean 30 s, CV 1.5); returns its end."""
        n = 1 + int(self.rng.expovariate(1 / max(mean_requests - 1, 0.01)))
        for _ in range(n):
            for i, m in enumerate(ms):
                self.hit(m, t + 0.5 * i)  # a group's members are hit back to back
            t += min(10 + gamma_gap(self.rng, 30, 1.5), 600)
        return t

    def trace(self, family: str, title: str, vram_gb: float | None) -> Trace:
        reqs = tuple(sorted(self.reqs, key=lambda r: (r.t, r.model)))
        return Trace(family, title, tuple(self.models), reqs, self.end, vram_gb)


def _awake(t: float) -> bool:
    return 7 * HOUR <= t % DAY < 24 * HOUR


def f1_periodic(rng: random.Random, days: float) -> Trace:
    """Timers and pollers: periods 2/7/12/20/60 min, CV 0-0.2 (straddling 5, 10, 15 min)."""
    b = _Builder(rng, days)
    cvs = [0.0, 0.05, 0.1, 0.15, 0.2]
    rng.shuffle(cvs)
    for (name, prio), period in zip(
        [
            ("llama3.2:3b", 3),
            ("llama3.1:8b", 2),
            ("qwen2.5:14b", 3),
            ("gemma2:27b", 2),
            ("nomic-embed-text", 4),
        ],
        [2, 7, 12, 20, 60],
        strict=True,
    ):
        m = b.add_model(_model(name, prio))
        b.periodic(m, period * MINUTE, cvs.pop(), 0, b.end)
    return b.trace("F1", "periodic", None)


def f2_poisson(rng: random.Random, days: float) -> Trace:
    """Poisson arrivals (CV 1), rates log-uniform from 1/min to 1/day (one per stratum)."""
    b = _Builder(rng, days)
    names = [
        ("llama3.2:3b", 3),
        ("mistral:7b", 3),
        ("llama3.1:8b", 2),
        ("qwen2.5:14b", 3),
        ("gemma2:27b", 4),
        ("qwen2.5-coder:7b", 2),
    ]
    lo, hi = math.log(1.0), math.log(1440.0)  # mean gap in minutes
    strata = [lo + (hi - lo) * (i + rng.random()) / len(names) for i in range(len(names))]
    rng.shuffle(strata)
    for (name, prio), s in zip(names, strata, strict=True):
        m = b.add_model(_model(name, prio))
        b.poisson(m, math.exp(s) * MINUTE, 0, b.end)
    return b.trace("F2", "Poisson", None)


def f3_sessions(rng: random.Random, days: float) -> Trace:
    """Human sessions: bursts of 10-120 s gaps separated by 20 min - 8 h lognormal silences."""
    b = _Builder(rng, days)
    for name, prio in [
        ("llama3.1:8b", 1),
        ("qwen2.5-coder:7b", 2),
        ("qwen2.5:14b", 3),
        ("gemma2:27b", 3),
        ("llama3.2:3b", 4),
    ]:
        m = b.add_model(_model(name, prio))
        median = rng.uniform(40, 180) * MINUTE
        t = rng.uniform(7 * HOUR, 10 * HOUR)
        while t < b.end:
            if _awake(t):
                t = b.session([m], t, rng.uniform(4, 15))
            silence = min(max(rng.lognormvariate(math.log(median), 1.0), 20 * MINUTE), 8 * HOUR)
            t += silence
    return b.trace("F3", "human sessions", None)


def f4_working_hours(rng: random.Random, days: float) -> Trace:
    """Working hours: sessions 9-18 h on weekdays, little in the evening, nothing at night,
    a quiet weekend; mid-trace the team switches regime (models swap their rates)."""
    b = _Builder(rng, days)
    specs = [
        ("llama3.1:8b", 2),
        ("qwen2.5-coder:14b", 1),
        ("mistral:7b", 3),
        ("gemma2:27b", 3),
        ("nomic-embed-text", 3),
    ]
    ms = [b.add_model(_model(name, prio)) for name, prio in specs]
    work_gap = [rng.uniform(3, 40) * MINUTE for _ in ms]  # mean gap between sessions at work
    switch = math.floor(days / 2) * DAY
    for i, m in enumerate(ms):
        t = 0.0
        while t < b.end:
            gap = work_gap[i] if t < switch else work_gap[(i + 2) % len(ms)]
            hour = (t % DAY) / HOUR
            weekday = int(t // DAY) % 7 < 5
            if weekday and 9 <= hour < 18:
                rate = 1 / gap
            elif weekday and 18 <= hour < 23:
                rate = 0.1 / gap
            elif not weekday and 10 <= hour < 22:
                rate = 0.05 / gap
            else:
                rate = 0.0
            if rate == 0.0:
                t = (math.floor(t / HOUR) + 1) * HOUR  # sleep to the next hour
                continue
            nxt = t + rng.expovariate(rate)
            if nxt >= (math.floor(t / HOUR) + 1) * HOUR:
                t = (math.floor(t / HOUR) + 1) * HOUR  # rate changes on the hour
                continue
            t = b.session([m], nxt, 3)
    return b.trace("F4", "working hours", None)


def f5_rare(rng: random.Random, days: float) -> Trace:
    """Rarely used models: most gaps over 4 h, some with a quick follow-up or two."""
    b = _Builder(rng, days)
    for name, prio in [
        ("llama3.3:70b", 3),
        ("qwen2.5:32b", 2),
        ("gemma2:9b", 4),
        ("mxbai-embed-large", 3),
        ("qwen2.5:14b", 5),
    ]:
        m = b.add_model(_model(name, prio))
        median = rng.uniform(5, 12) * HOUR
        t = rng.uniform(0, median)
        while t < b.end:
            b.hit(m, t)
            follow = t
            while rng.random() < 0.3:
                follow += rng.uniform(1, 5) * MINUTE
                b.hit(m, follow)
            t = max(follow, t + rng.lognormvariate(math.log(median), 0.6))
    return b.trace("F5", "rare", None)


def f6_skewed(rng: random.Random, days: float) -> Trace:
    """Zipf popularity over 8 models totalling 2.1x a 24 GB card's memory."""
    b = _Builder(rng, days)
    specs = [
        ("llama3.1:8b", 1),
        ("qwen2.5-coder:7b", 2),
        ("qwen2.5:14b", 2),
        ("qwen2.5-coder:14b", 3),
        ("gemma2:27b", 3),
        ("gemma2:9b", 4),
        ("llama3.2:3b", 4),
        ("nomic-embed-text", 5),
    ]
    ms = [b.add_model(_model(name, prio)) for name, prio in specs]
    ranks = list(range(1, len(ms) + 1))
    rng.shuffle(ranks)
    weights = [1 / r**1.1 for r in ranks]
    t = 0.0
    while t < b.end:
        hour = (t % DAY) / HOUR
        busy = 1.0 if 8 <= hour < 20 else 0.2
        t += rng.expovariate(busy / (6 * MINUTE))
        (m,) = rng.choices(ms, weights)
        b.session([m], t, 4)
    return b.trace("F6", "skewed under pressure", 24.0)


def f7_grouped(rng: random.Random, days: float) -> Trace:
    """Groups active together (embedding + chat), 36 GB of models on a 24 GB card."""
    b = _Builder(rng, days)
    groups = [
        [("nomic-embed-text", 2), ("llama3.1:8b", 1)],
        [("qwen2.5-coder:1.5b", 3), ("qwen2.5-coder:14b", 2)],
        [("mxbai-embed-large", 4), ("qwen2.5:32b", 3)],
    ]
    for group in groups:
        ms = [b.add_model(_model(name, prio)) for name, prio in group]
        median = rng.uniform(30, 120) * MINUTE
        t = rng.uniform(7 * HOUR, 9 * HOUR)
        while t < b.end:
            if _awake(t):
                t = b.session(ms, t, rng.uniform(3, 12))
            t += min(max(rng.lognormvariate(math.log(median), 1.0), 10 * MINUTE), 6 * HOUR)
    return b.trace("F7", "grouped activity", 24.0)


def f8_drift(rng: random.Random, days: float) -> Trace:
    """Adversarial drift: each model's pattern flips to a very different one mid-trace."""
    b = _Builder(rng, days)
    flip = b.end / 2
    a = b.add_model(_model("llama3.1:8b", 2))
    b.periodic(a, 3 * MINUTE, 0.1, 0, flip)
    b.periodic(a, 45 * MINUTE, 0.1, flip, b.end)
    c = b.add_model(_model("qwen2.5:14b", 3))
    b.periodic(c, 45 * MINUTE, 0.1, 0, flip)
    b.periodic(c, 3 * MINUTE, 0.1, flip, b.end)
    d = b.add_model(_model("mistral:7b", 3))
    b.poisson(d, 5 * MINUTE, 0, flip)
    b.poisson(d, 6 * HOUR, flip, b.end)
    e = b.add_model(_model("gemma2:27b", 2))
    t = 8 * HOUR
    while t < flip:
        if _awake(t):
            t = b.session([e], t, 8)
        t += max(rng.lognormvariate(math.log(60 * MINUTE), 1.0), 20 * MINUTE)
    b.poisson(e, 60 * MINUTE, flip, b.end)
    f = b.add_model(_model("llama3.2:3b", 4))
    b.poisson(f, 6 * HOUR, 0, flip)
    t = flip
    while t < b.end:
        if _awake(t):
            t = b.session([f], t, 8)
        t += max(rng.lognormvariate(math.log(30 * MINUTE), 1.0), 20 * MINUTE)
    return b.trace("F8", "adversarial drift", None)


FAMILIES: dict[str, Callable[[random.Random, float], Trace]] = {
    "F1": f1_periodic,
    "F2": f2_poisson,
    "F3": f3_sessions,
    "F4": f4_working_hours,
    "F5": f5_rare,
    "F6": f6_skewed,
    "F7": f7_grouped,
    "F8": f8_drift,
}


def make_family(family: str, seed: int, days: float) -> Trace:
    """Generate one family's trace; the same (family, seed, days) always gives the same trace."""
    return FAMILIES[family](random.Random(f"{family}:{seed}"), days)


# -- files -------------------------------------------------------------------------------------


def load_models(path: Path) -> tuple[ModelSpec, ...]:
    """Read a TOML file of [[model]] tables (name, size_gb, load_s, priority)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise TraceError(f"{path}: not valid TOML: {e}") from e
    tables = data.get("model")
    if not isinstance(tables, list) or not tables:
        raise TraceError(f"{path}: model: expected one or more [[model]] tables")
    models: list[ModelSpec] = []
    seen: set[str] = set()
    for i, t in enumerate(tables):
        where = f"{path}: model[{i}]"
        unknown = sorted(set(t) - {"name", "size_gb", "load_s", "priority"})
        if unknown:
            raise TraceError(f"{where}.{unknown[0]}: unknown key")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise TraceError(f"{where}.name: expected a non-empty string, got {name!r}")
        if name in seen:
            raise TraceError(f"{where}.name: duplicate model {name!r}")
        seen.add(name)
        nums: dict[str, float] = {}
        for key in ("size_gb", "load_s"):
            v = t.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise TraceError(f"{where}.{key}: expected a positive number, got {v!r}")
            nums[key] = float(v)
        prio = t.get("priority", 3)
        if isinstance(prio, bool) or not isinstance(prio, int) or prio < 1:
            raise TraceError(f"{where}.priority: expected an integer >= 1, got {prio!r}")
        models.append(ModelSpec(name, nums["size_gb"], nums["load_s"], prio))
    return tuple(models)


def load_trace(path: Path, models: Sequence[ModelSpec], vram_gb: float | None) -> Trace:
    """Read a CSV trace with header `t,model` (optional `duration_s`); rows may be unsorted."""
    index = {m.name: i for i, m in enumerate(models)}
    reqs: list[Request] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            if header[:2] != ["t", "model"] or header[2:] not in ([], ["duration_s"]):
                raise TraceError(
                    f"{path}:1: expected the header 't,model' or 't,model,duration_s', "
                    f"got {','.join(header)!r}"
                )
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise TraceError(
                        f"{path}:{line}: expected {len(header)} fields, got {len(row)}"
                    )
                try:
                    t = float(row[0])
                except ValueError:
                    raise TraceError(
                        f"{path}:{line}: t: expected seconds, got {row[0]!r}"
                    ) from None
                if not math.isfinite(t) or t < 0:
                    raise TraceError(f"{path}:{line}: t: expected seconds >= 0, got {row[0]!r}")
                name = row[1].strip()
                if name not in index:
                    raise TraceError(f"{path}:{line}: model: {name!r} is not in the models file")
                m = index[name]
                dur = models[m].service_s
                if len(row) == 3:
                    try:
                        dur = float(row[2])
                    except ValueError:
                        dur = -1.0
                    if not math.isfinite(dur) or dur < 0:
                        raise TraceError(
                            f"{path}:{line}: duration_s: expected seconds >= 0, got {row[2]!r}"
                        )
                reqs.append(Request(t, m, dur))
    except OSError as e:
        raise TraceError(f"{path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise TraceError(f"{path}: not UTF-8 text: {e.reason}") from e
    if not reqs:
        raise TraceError(f"{path}: no requests")
    reqs.sort(key=lambda r: (r.t, r.model))
    end = max(r.t + r.duration_s for r in reqs)
    return Trace(path.stem, "from file", tuple(models), tuple(reqs), end, vram_gb)
