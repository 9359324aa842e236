"""Contention watch: feeds finished requests to the rule (llmd.contention) with what llmd knows
of each, and on a change records the event, logs one line and says what it sees as the cause."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from llmd import contention
from llmd.backends import Backends
from llmd.config import Config
from llmd.lifecycle import EventSink, Lifecycle
from llmd.models import Model
from llmd.store import RequestRecord, Store

log = logging.getLogger("llmd.contention")

# A request that waited longer than this in llmd's queue is not quiet.
QUIET_QUEUE_S = 0.05
# Event kinds that move a model in or out of GPU memory: a swap, seen from its neighbours.
SWAP_KINDS = frozenset({"load", "evict", "unload", "spill"})


def rule_of(cfg: Config) -> contention.Rule:
    """The rule's thresholds from the [contention] section."""
    c = cfg.contention
    return contention.Rule(
        factor=c.factor,
        clear_factor=c.clear_factor,
        window=c.window,
        window_s=c.window_time,
        min_samples=c.min_samples,
        min_slow=c.min_slow,
        baseline_samples=c.baseline_samples,
    )


class LatencyWatch:
    """Per-model latency baselines and the contended flag, fed by the daemon."""

    def __init__(
        self,
        cfg: Config,
        *,
        lifecycle: Lifecycle,
        backends: Backends,
        store: Store,
        events: EventSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self._lifecycle = lifecycle
        self._backends = backends
        self._store = store
        self._events = events
        self._clock = clock
        self.tracker = contention.Tracker(rule_of(cfg), store.baselines())
        self._swaps: deque[tuple[float, str, str]] = deque(maxlen=100)  # (time, kind, model)
        self._reasons: dict[str, str] = {}  # contended models: the event's reason

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config (the [contention] thresholds)."""
        self.cfg = cfg
        self.tracker.configure(rule_of(cfg))

    def note_event(self, kind: str, model: str | None) -> None:
        """A lifecycle event: loads and evictions are remembered as swaps."""
        if kind in SWAP_KINDS and model:
            self._swaps.append((self._clock(), kind, model))

    def record(self, rec: RequestRecord) -> None:
        """A finished proxied request."""
        if not rec.model or rec.status != 200:
            return
        # Its runner (a name sharing another's, or the first copy of a replicated model).
        m = self._lifecycle.runner_of(rec.model) or self._lifecycle.models.get(rec.model)
        s = contention.sample_of(
            time=rec.time,
            ttfb_s=rec.ttfb_s,
            duration_s=rec.duration_s,
            eval_tokens=rec.eval_tokens,
            streamed=rec.streamed,
            queued_s=rec.queued_s,
            waited_for_load=rec.waited_for_load,
            quiet=self._quiet(rec, m),
        )
        if s is None:
            return
        for change in self.tracker.observe(rec.model, s):
            self._announce(change)
        for model in self.tracker.take_dirty():
            self._store.set_baselines(model, self.tracker.baseline_samples(model))

    def tick(self) -> None:
        """Age the windows: a contended model without recent requests clears."""
        for change in self.tracker.tick(self._clock()):
            self._announce(change)

    def _quiet(self, rec: RequestRecord, m: Model | None) -> bool:
        """Warm, not queued, fully in GPU memory, and no other model busy on its GPUs (for a
        replicated model: every copy, since the record does not say which one served it)."""
        if rec.waited_for_load or rec.queued_s > QUIET_QUEUE_S or m is None:
            return False
        copies = self._lifecycle.runners_of(m.name) or [m]
        for c in copies:
            if not c.size or c.size_vram < c.size:
                return False
            if any(
                o.in_flight > 0 and o.name != c.name and self._share_gpu(o.backend, c.backend)
                for o in self._lifecycle.models.values()
            ):
                return False
        return True

    def _share_gpu(self, a: str, b: str) -> bool:
        ca, cb = self._backends.children.get(a), self._backends.children.get(b)
        if ca is None or cb is None:
            return False
        ga, gb = ca.cfg.gpus, cb.cfg.gpus
        return ga is None or gb is None or bool(set(ga) & set(gb))

    def _announce(self, change: contention.Change) -> None:
        found = contention.causes(self._scene(change)) if change.contended else []
        why = contention.reason(change, found)
        if change.contended:
            self._reasons[change.model] = why
            log.warning("model %s is contended: %s", change.model, why)
            self._events.record_event("contention", model=change.model, reason=why)
        else:
            self._reasons.pop(change.model, None)
            log.info("model %s is no longer contended: %s", change.model, why)
            self._events.record_event("contention-cleared", model=change.model, reason=why)

    def _scene(self, change: contention.Change) -> contention.Scene:
        """What llmd can see around the model now."""
        m = self._lifecycle.runner_of(change.model) or self._lifecycle.models.get(change.model)
        now = self._clock()
        since = now - self.cfg.contention.window_time
        backend = m.backend if m is not None else ""
        swaps = tuple(
            f"{name} {kind} {now - t:.0f}s ago"
            for t, kind, name in self._swaps
            if t >= since and (m is None or self._owner_shares(name, backend))
        )[-3:]
        gpu_used = None
        others = 0
        snap = self._lifecycle.memory.snapshot
        child = self._backends.children.get(backend)
        if snap is not None and child is not None:
            devices = self._lifecycle.memory.devices_of(child, snap)
            total = sum(d.total_bytes for d in devices)
            used = sum(d.used_bytes for d in devices)
            if total:
                gpu_used = used / total
            ours = sum(
                o.size_vram
                for o in self._lifecycle.models.values()
                if self._share_gpu(o.backend, backend)
            )
            others = max(0, used - ours)
        return contention.Scene(
            size=m.size if m is not None else 0,
            size_vram=m.size_vram if m is not None else 0,
            queued_s=change.queued_s,
            loads=change.loads,
            swaps=swaps,
            gpu_used=gpu_used,
            high_watermark=self.cfg.gpu.high_watermark,
            others_bytes=others,
        )

    def _owner_shares(self, name: str, backend: str) -> bool:
        o = self._lifecycle.models.get(name)
        return o is not None and self._share_gpu(o.backend, backend)

    def contended(self) -> list[dict[str, Any]]:
        """The contended models, with when it started and why, for `llmctl status`."""
        return [
            {"model": m, "since": self.tracker.since(m), "reason": self._reasons.get(m, "")}
            for m in self.tracker.models()
            if self.tracker.contended(m)
        ]

    def doc(self, model: str) -> dict[str, Any]:
        """A model's baselines and contention state, for `llmctl models --json`."""
        t = self.tracker
        r = t.ratio(model)
        return {
            "contended": t.contended(model),
            "baseline_ttft_s": _round(t.baseline(model, "ttft")),
            "baseline_tpot_s": _round(t.baseline(model, "tpot")),
            "latency_ratio": None if r is None else round(r[3], 2),
            "latency_ratio_kind": None if r is None else r[0],
        }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)
