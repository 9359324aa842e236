"""What llmd has learned, held in memory: idle-gap histograms per day, model facts, pins and
latency baselines."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmd.policy import IdleHistogram

DAY_S = 86400.0
HISTORY_DAYS = 14
"""UTC days of idle gaps the policy learns from, today included: what idle_histogram merges,
and all of them that memory keeps (the database keeps daemon.retention_days of them)."""
LOAD_S_WEIGHT = 0.3  # weight of the newest load in the load time's moving average


# Field order is the model_facts table's column order: the store writes and reads it positionally.
@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What llmd has learned about a model's size and load time."""

    model: str
    size_vram: int | None
    size: int | None
    load_s: float | None
    loads: int  # load times averaged into load_s
    updated: float


@dataclass(frozen=True, slots=True)
class Changes:
    """The keys of what changed since the last successful write: (model, day)s and models."""

    hists: set[tuple[str, str]]
    busy: set[str]
    facts: set[str]
    pins: set[str]
    baselines: set[str]


# Per model: the quiet latency samples behind its baselines, by kind (see llmd.contention).
Baselines = dict[str, list[float]]
_FactUpdate = tuple[str, int | None, int | None, float | None]


def utc_day(t: float) -> str:
    """The UTC day of a unix time, as YYYY-MM-DD."""
    return time.strftime("%Y-%m-%d", time.gmtime(t))


class Learned:
    """The policy's learned state, kept whole in memory; llmd.store saves it and reads it back."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        # Until the database has been read once (loaded), these hold only what was learned
        # since start, to be merged into what the database holds; after that they hold
        # everything and are written over whatever database there is.
        self.loaded = False
        self.hists: dict[str, dict[str, IdleHistogram]] = {}
        self.busy_until: dict[str, float] = {}  # roll-up marks: see the idle_rollup table
        self.facts: dict[str, ModelFacts] = {}
        self.pinned: set[str] = set()
        self.baselines: dict[str, Baselines] = {}
        # Pins read from a database that could not be opened for writing, in force until it can.
        self.peeked_pins: set[str] = set()
        self._fact_updates: deque[_FactUpdate] = deque(maxlen=1000)
        self._first_start: dict[str, float] = {}  # per model, its first request before loaded
        self._merged: dict[str, dict[int, tuple[str, IdleHistogram]]] = {}

        # What changed since the last successful write.
        self._dirty_hists: set[tuple[str, str]] = set()
        self._dirty_busy: set[str] = set()
        self._dirty_facts: set[str] = set()
        self._dirty_pins: set[str] = set()
        self._dirty_baselines: set[str] = set()

    # -- reading -----------------------------------------------------------------------------

    def idle_histogram(self, model: str, days: int = HISTORY_DAYS) -> IdleHistogram:
        """The model's idle gaps over the last `days` UTC days, today included."""
        now = self._clock()
        today = utc_day(now)
        cached = self._merged.get(model, {}).get(days)
        if cached is None or cached[0] != today:
            first = utc_day(now - (days - 1) * DAY_S)
            merged = IdleHistogram()
            for day, hist in self.hists.get(model, {}).items():
                if day >= first:
                    merged.merge(hist)
            cached = (today, merged)
            self._merged.setdefault(model, {})[days] = cached
        # A copy, so that a caller merging into it cannot change the store's.
        out = IdleHistogram()
        out.merge(cached[1])
        return out

    def model_facts(self, model: str) -> ModelFacts | None:
        """What has been learned about the model, if anything."""
        return self.facts.get(model)

    def pins(self) -> set[str]:
        """The models pinned at runtime."""
        if self.loaded:
            return set(self.pinned)
        unpinned = self._dirty_pins - self.pinned
        return (self.peeked_pins - unpinned) | self.pinned

    def unsaved_pins(self) -> list[tuple[str, bool]]:
        """The pin changes not yet written, as (model, pinned), by model."""
        return [(m, m in self.pinned) for m in sorted(self._dirty_pins)]

    # -- learning ----------------------------------------------------------------------------

    def set_model_facts(
        self, model: str, size_vram: int | None, size: int | None, load_s: float | None
    ) -> ModelFacts:
        """Remember what a load of the model showed; None leaves a fact as it was."""
        if not self.loaded:
            self._fact_updates.append((model, size_vram, size, load_s))
        facts = self._update_facts(model, size_vram, size, load_s)
        self._dirty_facts.add(model)
        return facts

    def set_pin(self, model: str, pinned: bool) -> None:
        """Pin or unpin the model at runtime."""
        if pinned:
            self.pinned.add(model)
        else:
            self.pinned.discard(model)
        self._dirty_pins.add(model)

    def set_baselines(self, model: str, samples: Baselines) -> None:
        """Remember the quiet latency samples behind the model's baselines."""
        self.baselines[model] = {k: list(v) for k, v in samples.items()}
        self._dirty_baselines.add(model)

    def count_gap(self, model: str, start: float, duration_s: float) -> None:
        """Count the idle gap that a request closes, and move the model's roll-up mark."""
        busy_until = self.busy_until.get(model)
        if busy_until is None and not self.loaded:
            # The database may know where this model's last busy period ended: see load.
            self._first_start.setdefault(model, start)
        if busy_until is not None and start > busy_until:
            self._add_gap(model, start, start - busy_until)
        end = start + duration_s
        if busy_until is None or end > busy_until:
            self.busy_until[model] = end
            self._dirty_busy.add(model)

    def prune(self, cutoff: float, first_day: str) -> None:
        """Forget histograms of days before first_day and roll-up marks before cutoff."""
        for model in list(self.hists):
            days = self.hists[model]
            for day in [d for d in days if d < first_day]:
                del days[day]
            if not days:
                del self.hists[model]
        for model in [m for m, t in self.busy_until.items() if t < cutoff]:
            del self.busy_until[model]
        self._merged.clear()

    def _add_gap(self, model: str, start: float, gap_s: float) -> None:
        day = utc_day(start)
        self.hists.setdefault(model, {}).setdefault(day, IdleHistogram()).add(gap_s)
        self._dirty_hists.add((model, day))
        self._merged.pop(model, None)

    def _update_facts(
        self, model: str, size_vram: int | None, size: int | None, load_s: float | None
    ) -> ModelFacts:
        old = self.facts.get(model) or ModelFacts(model, None, None, None, 0, 0.0)
        avg, loads = old.load_s, old.loads
        if load_s is not None:
            # A moving average: recent loads matter most, one slow outlier does not dominate.
            avg = load_s if avg is None else avg + LOAD_S_WEIGHT * (load_s - avg)
            loads += 1
        facts = ModelFacts(
            model,
            size_vram if size_vram is not None else old.size_vram,
            size if size is not None else old.size,
            avg,
            loads,
            self._clock(),
        )
        self.facts[model] = facts
        return facts

    # -- saving and loading (the store's side) ---------------------------------------------

    def load(
        self,
        hists: Iterable[tuple[str, str, IdleHistogram]],
        busy_until: Iterable[tuple[str, float]],
        facts: Iterable[ModelFacts],
        pins: Iterable[str],
        baselines: Iterable[tuple[str, Baselines]] = (),
    ) -> None:
        """Merge what a database holds with what was learned since start (see loaded)."""
        # Baselines learned since start are newer than the database's.
        self.baselines = {**dict(baselines), **self.baselines}
        for model, day, hist in hists:
            days = self.hists.setdefault(model, {})
            if day in days:
                hist.merge(days[day])
            days[day] = hist
        for model, until in busy_until:
            first = self._first_start.get(model)
            if first is not None and first > until:
                self._add_gap(model, first, first - until)  # the gap spanning the outage
            self.busy_until[model] = max(until, self.busy_until.get(model, until))
        self._first_start.clear()
        self.facts = {f.model: f for f in facts}
        for update in self._fact_updates:
            self._update_facts(*update)
        self._fact_updates.clear()
        pinned = set(pins)
        for model in self._dirty_pins:
            if model in self.pinned:
                pinned.add(model)
            else:
                pinned.discard(model)
        self.pinned = pinned
        self.peeked_pins.clear()
        self._merged.clear()
        self.loaded = True

    def mark_all_changed(self) -> None:
        """Count everything as changed, to be written whole to a (perhaps new) database."""
        self._dirty_hists |= {(m, d) for m, days in self.hists.items() for d in days}
        self._dirty_busy |= set(self.busy_until)
        self._dirty_facts |= set(self.facts)
        self._dirty_pins |= self.pinned
        self._dirty_baselines |= set(self.baselines)

    @property
    def changed(self) -> bool:
        """Whether anything changed since the last take_changes()."""
        return bool(
            self._dirty_hists
            or self._dirty_busy
            or self._dirty_facts
            or self._dirty_pins
            or self._dirty_baselines
        )

    def take_changes(self) -> Changes:
        """What changed since the last take, now counted as written; put_back() if it was not."""
        changes = Changes(
            self._dirty_hists,
            self._dirty_busy,
            self._dirty_facts,
            self._dirty_pins,
            self._dirty_baselines,
        )
        self._dirty_hists, self._dirty_busy = set(), set()
        self._dirty_facts, self._dirty_pins, self._dirty_baselines = set(), set(), set()
        return changes

    def put_back(self, changes: Changes) -> None:
        """Count a failed write's changes as changed again, for the next try."""
        self._dirty_hists |= changes.hists
        self._dirty_busy |= changes.busy
        self._dirty_facts |= changes.facts
        self._dirty_pins |= changes.pins
        self._dirty_baselines |= changes.baselines
