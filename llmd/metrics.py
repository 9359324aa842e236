"""Prometheus exposition of per-model counters and histograms, on the proxy port's /metrics."""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmd.store import RequestRecord

# Seconds: from a warm token to a cold load of a big model.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class ModelGauges:
    """One model's gauges."""

    name: str
    backend: str
    loaded: bool
    in_flight: int
    vram_bytes: int
    keep_alive_s: float | None  # None: forever
    keep_alive_source: str
    options_overridden: int = 0  # requests whose runner options llmd replaced


@dataclass(frozen=True)
class BackendGauges:
    """One backend's gauges."""

    name: str
    up: bool
    restarts: int


@dataclass(frozen=True)
class GpuGauges:
    """One GPU's memory."""

    index: int
    used_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class QueueGauges:
    """One model's queue in llmd."""

    name: str
    waiting: int
    running: int
    limit: int
    making_way: bool
    rejected: dict[str, int]  # reason -> requests turned away
    swaps: int


@dataclass(frozen=True)
class Snapshot:
    """The state /metrics shows besides the counters, as plain data (built by the admin layer)."""

    models: list[ModelGauges]
    backends: list[BackendGauges]
    gpus: list[GpuGauges]
    queues: list[QueueGauges] = field(default_factory=list)
    queue_waits: Histogram | None = None  # seconds from arrival to start, per model
    batches: Histogram | None = None  # requests started per turn, per model


class Histogram:
    """Cumulative buckets, a sum and a count, per label set."""

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.buckets: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        counts = self.buckets.setdefault(labels, [0] * (len(self.bounds) + 1))
        counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sums[labels] = self.sums.get(labels, 0.0) + value


def _num(v: float) -> str:
    """Exact integers (counters, bytes), full-precision floats: never 1.23457e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{n}="{_esc(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


class Metrics:
    """Counts what the proxy and the lifecycle report; renders the text format on demand."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, str]] = Counter()
        self.cold: Counter[str] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.events: Counter[tuple[str, str]] = Counter()
        self.duration = Histogram()
        self.ttfb = Histogram()

    def record_request(self, rec: RequestRecord) -> None:
        """One finished proxied request."""
        self.requests[(rec.model, rec.endpoint, str(rec.status))] += 1
        if rec.waited_for_load:
            self.cold[rec.model] += 1
        self.duration.observe((rec.model,), rec.duration_s)
        if rec.ttfb_s is not None:
            self.ttfb.observe((rec.model,), rec.ttfb_s)
        if rec.prompt_tokens:
            self.tokens[(rec.model, "prompt")] += rec.prompt_tokens
        if rec.eval_tokens:
            self.tokens[(rec.model, "eval")] += rec.eval_tokens

    def record_event(self, kind: str, model: str | None) -> None:
        """One lifecycle event (load, unload, evict, crash...)."""
        self.events[(kind, model or "")] += 1

    def render(self, snap: Snapshot) -> str:
        """The Prometheus text exposition format."""
        out: list[str] = []

        def family(name: str, kind: str, help: str, rows: Iterable[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {_num(value)}" for labels, value in rows)

        def hist(name: str, help: str, h: Histogram) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} histogram")
            for labels, counts in sorted(h.buckets.items()):
                acc = 0
                for bound, c in zip((*map(str, h.bounds), "+Inf"), counts, strict=True):
                    acc += c
                    out.append(f"{name}_bucket{_labels(('model', 'le'), (*labels, bound))} {acc}")
                out.append(f"{name}_sum{_labels(('model',), labels)} {_num(h.sums[labels])}")
                out.append(f"{name}_count{_labels(('model',), labels)} {acc}")

        lab: Callable[..., str] = lambda names, *values: _labels(names, values)  # noqa: E731
        family(
            "llmd_requests_total",
            "counter",
            "Proxied requests by model, endpoint, status.",
            (
                (lab(("model", "endpoint", "status"), *k), v)
                for k, v in sorted(self.requests.items())
            ),
        )
        family(
            "llmd_cold_starts_total",
            "counter",
            "Requests that waited for a model load.",
            ((lab(("model",), k), v) for k, v in sorted(self.cold.items())),
        )
        family(
            "llmd_tokens_total",
            "counter",
            "Prompt and generated tokens by model.",
            ((lab(("model", "kind"), *k), v) for k, v in sorted(self.tokens.items())),
        )
        family(
            "llmd_model_events_total",
            "counter",
            "Lifecycle events (load, unload, evict, crash, restart...) by model.",
            ((lab(("event", "model"), *k), v) for k, v in sorted(self.events.items())),
        )
        hist("llmd_request_duration_seconds", "Proxied request duration.", self.duration)
        hist("llmd_time_to_first_byte_seconds", "Time to the first response byte.", self.ttfb)
        models = snap.models
        family(
            "llmd_model_loaded",
            "gauge",
            "1 if the model is loaded.",
            ((lab(("model", "backend"), m.name, m.backend), float(m.loaded)) for m in models),
        )
        # A replicated model has a record per backend: summed per model below, so that the
        # model-only label sets stay unique (llmd_model_loaded has the backend).
        per_model: dict[str, list[ModelGauges]] = {}
        for m in models:
            per_model.setdefault(m.name, []).append(m)
        family(
            "llmd_model_in_flight",
            "gauge",
            "Requests in flight per model.",
            ((lab(("model",), n), sum(m.in_flight for m in ms)) for n, ms in per_model.items()),
        )
        family(
            "llmd_model_vram_bytes",
            "gauge",
            "GPU memory held by the model (every copy of it).",
            ((lab(("model",), n), sum(m.vram_bytes for m in ms)) for n, ms in per_model.items()),
        )
        family(
            "llmd_model_keep_alive_seconds",
            "gauge",
            "The keep-alive the model's idle timer uses (-1: forever).",
            (
                (
                    lab(("model", "source"), n, ms[0].keep_alive_source),
                    -1 if ms[0].keep_alive_s is None else ms[0].keep_alive_s,
                )
                for n, ms in per_model.items()
            ),
        )
        family(
            "llmd_runner_options_overridden_total",
            "counter",
            "Requests whose runner options (num_ctx...) llmd replaced by the loaded ones.",
            (
                (lab(("model",), n), sum(m.options_overridden for m in ms))
                for n, ms in per_model.items()
            ),
        )
        children = snap.backends
        family(
            "llmd_backend_up",
            "gauge",
            "1 if the backend's ollama child is running.",
            ((lab(("backend",), c.name), float(c.up)) for c in children),
        )
        family(
            "llmd_backend_restarts_total",
            "counter",
            "Restarts of the backend's child.",
            ((lab(("backend",), c.name), c.restarts) for c in children),
        )
        queues = snap.queues
        family(
            "llmd_queue_waiting",
            "gauge",
            "Requests waiting in llmd's queue for the model (an autoscaler's signal).",
            ((lab(("model",), q.name), q.waiting) for q in queues),
        )
        family(
            "llmd_queue_running",
            "gauge",
            "Requests of the model running at its backend (they hold a queue slot).",
            ((lab(("model",), q.name), q.running) for q in queues),
        )
        family(
            "llmd_queue_limit",
            "gauge",
            "Requests the model may run at once (num_parallel; 1 for embedding models).",
            ((lab(("model",), q.name), q.limit) for q in queues),
        )
        family(
            "llmd_queue_making_way",
            "gauge",
            "1 while the model starts no requests so that a waiting model gets its memory.",
            ((lab(("model",), q.name), float(q.making_way)) for q in queues),
        )
        family(
            "llmd_queue_rejected_total",
            "counter",
            "Requests the queue turned away, by reason (queue_full: 429, queue_timeout: 503).",
            (
                (lab(("model", "reason"), q.name, reason), q.rejected.get(reason, 0))
                for q in queues
                for reason in ("queue_full", "queue_timeout")
            ),
        )
        family(
            "llmd_queue_swaps_total",
            "counter",
            "Times the model made way for another model with work waiting for its memory.",
            ((lab(("model",), q.name), q.swaps) for q in queues),
        )
        if snap.queue_waits is not None:
            hist(
                "llmd_queue_wait_seconds",
                "Time a request waited in llmd's queue before it started.",
                snap.queue_waits,
            )
        if snap.batches is not None:
            hist(
                "llmd_swap_batch_requests",
                "Requests a model started in one turn before it made way for another.",
                snap.batches,
            )
        devices = snap.gpus
        family(
            "llmd_gpu_memory_used_bytes",
            "gauge",
            "GPU memory in use, all programs.",
            ((lab(("gpu",), str(g.index)), g.used_bytes) for g in devices),
        )
        family(
            "llmd_gpu_memory_total_bytes",
            "gauge",
            "GPU memory in all.",
            ((lab(("gpu",), str(g.index)), g.total_bytes) for g in devices),
        )
        return "\n".join(out) + "\n"
