"""Prometheus exposition of llmd's counters and state, on the proxy port's /metrics.

llmd keeps its own counters and histograms as plain data (`Metrics`, `Histogram`) and the admin
layer builds a plain `Snapshot` of its state. At scrape time `families()` turns both into plain
metric families, written in the format prometheus_client's `choose_encoder` picks for the
scraper's Accept header (text 0.0.4 or OpenMetrics) by `Encoder`: byte for byte what the
library's own encoders write for the same families (`LlmdCollector` hands them to the library,
and the tests compare the two pages), at a fraction of their cost. The library spends about 3 us
a sample, sorting and escaping every label set on every scrape; with 50 models and 4 backends a
page has some 4,700 samples, so its encoders took 15 to 40 ms a scrape on the event loop. The
encoder here renders each series' name and labels once and keeps it while the series exists.
"""

from __future__ import annotations

import bisect
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from prometheus_client import utils
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from llmd.store import RequestRecord

# Seconds: from a warm token to a cold load of a big model.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# The library's rendering of a number as Prometheus writes it (le="1.0", "+Inf"); untyped there.
_go_float: Callable[[float], str] = utils.floatToGoString


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
    contended: bool = False  # llmd.contention's flag
    baseline_ttft_s: float | None = None  # None: not learned yet
    baseline_tpot_s: float | None = None


@dataclass(frozen=True)
class BackendGauges:
    """One backend's gauges."""

    name: str
    up: bool
    restarts: int


@dataclass(frozen=True)
class GpuGauges:
    """One GPU's memory, and its telemetry where the probe reads it (None: not known)."""

    index: int
    used_bytes: int
    total_bytes: int
    util_pct: float | None = None
    temp_c: float | None = None
    power_w: float | None = None
    power_limit_w: float | None = None


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
    max_queue: int  # requests that may wait; one more gets 429


@dataclass(frozen=True)
class NodeGauges:
    """The whole node as a model server, the way Kubernetes' inference extension reads one (its
    model-server protocol; deploy/README.md): one series each, no model label, since the
    endpoint picker reads a single sample per metric name."""

    waiting: int  # requests waiting in llmd's queues, every model
    running: int  # requests holding a slot: running at a child, or waiting for their load
    # The protocol's KV-cache utilisation, approximated as busy slots / slots of the models
    # loaded or loading (each slot of an Ollama runner holds a preallocated context).
    cache_usage: float
    running_models: tuple[str, ...]  # names a request may use for a resident model
    waiting_models: tuple[str, ...]  # models loading, or with requests waiting for a load
    max_models: int  # running + waiting, plus 1 if another model fits without an eviction
    changed_at: float  # unix time the three above last changed


@dataclass(frozen=True)
class Snapshot:
    """The state /metrics shows besides the counters, as plain data (built by the admin layer)."""

    models: list[ModelGauges]
    backends: list[BackendGauges]
    gpus: list[GpuGauges]
    queues: list[QueueGauges] = field(default_factory=list)
    queue_waits: Histogram | None = None  # seconds from arrival to start, per model
    batches: Histogram | None = None  # requests started per turn, per model
    store_degraded: bool = False  # the store cannot save (serving from memory)
    node: NodeGauges | None = None


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


class Metrics:
    """Counts what the proxy and the lifecycle report, as plain data (the collector reads it)."""

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


@dataclass(frozen=True, slots=True)
class Family:
    """One metric family as plain rows, before either encoder. `name` is the series name as the
    text format writes it (a counter's ends in _total); a histogram's rows are in `hist`."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...]
    rows: Iterable[tuple[Sequence[str], float]] = ()
    hist: Histogram | None = None


def _counter(
    name: str, help: str, labels: Iterable[str], rows: Iterable[tuple[Sequence[str], float]]
) -> Family:
    return Family(name, "counter", help, tuple(labels), rows)


def _gauge(
    name: str, help: str, labels: Iterable[str], rows: Iterable[tuple[Sequence[str], float]]
) -> Family:
    return Family(name, "gauge", help, tuple(labels), rows)


def _histogram(name: str, help: str, h: Histogram) -> Family:
    """Per-model cumulative buckets (le inclusive, as observe() counts) with +Inf, sum and count."""
    return Family(name, "histogram", help, ("model",), hist=h)


def _known(gpus: Iterable[GpuGauges], attr: str) -> list[tuple[tuple[str], float]]:
    """One telemetry reading per GPU that has it (rows for _gauge)."""
    rows = []
    for g in gpus:
        v = getattr(g, attr)
        if v is not None:
            rows.append(((str(g.index),), float(v)))
    return rows


def _metric(f: Family) -> Metric:
    """The library's metric family for `f` (what LlmdCollector hands to its encoders)."""
    if f.hist is not None:
        h = f.hist
        family = HistogramMetricFamily(f.name, f.help, labels=list(f.labels))
        bounds = [*map(_go_float, h.bounds), "+Inf"]
        for labels, counts in sorted(h.buckets.items()):
            cumulative = itertools.accumulate(counts)
            family.add_metric(
                list(labels), list(zip(bounds, cumulative, strict=True)), h.sums[labels]
            )
        return family
    # A counter's name keeps its _total: the library strips it for the family and adds it back
    # to the sample, so the series is exactly `name`. No `created` is given: no _created samples.
    cls = CounterMetricFamily if f.kind == "counter" else GaugeMetricFamily
    metric = cls(f.name, f.help, labels=list(f.labels))
    for values, value in f.rows:
        metric.add_metric(list(values), value)
    return metric


def families(c: Metrics, snap: Snapshot) -> Iterator[Family]:
    """llmd's counters and a snapshot of its state as metric families, in page order."""
    yield _counter(
        "llmd_requests_total",
        "Proxied requests by model, endpoint, status.",
        ("model", "endpoint", "status"),
        sorted(c.requests.items()),
    )
    yield _counter(
        "llmd_cold_starts_total",
        "Requests that waited for a model load.",
        ("model",),
        (((k,), v) for k, v in sorted(c.cold.items())),
    )
    yield _counter(
        "llmd_tokens_total",
        "Prompt and generated tokens by model.",
        ("model", "kind"),
        sorted(c.tokens.items()),
    )
    yield _counter(
        "llmd_model_events_total",
        "Lifecycle events (load, unload, evict, crash, restart...) by model.",
        ("event", "model"),
        sorted(c.events.items()),
    )
    yield _histogram("llmd_request_duration_seconds", "Proxied request duration.", c.duration)
    yield _histogram("llmd_time_to_first_byte_seconds", "Time to the first response byte.", c.ttfb)
    yield _gauge(
        "llmd_model_loaded",
        "1 if the model is loaded.",
        ("model", "backend"),
        (((m.name, m.backend), float(m.loaded)) for m in snap.models),
    )
    # A replicated model has a record per backend: summed per model below, so that the
    # model-only label sets stay unique (llmd_model_loaded has the backend).
    per_model: dict[str, list[ModelGauges]] = {}
    for m in snap.models:
        per_model.setdefault(m.name, []).append(m)
    yield _gauge(
        "llmd_model_in_flight",
        "Requests in flight per model.",
        ("model",),
        (((n,), sum(m.in_flight for m in ms)) for n, ms in per_model.items()),
    )
    yield _gauge(
        "llmd_model_vram_bytes",
        "GPU memory held by the model (every copy of it).",
        ("model",),
        (((n,), sum(m.vram_bytes for m in ms)) for n, ms in per_model.items()),
    )
    yield _gauge(
        "llmd_model_keep_alive_seconds",
        "The keep-alive the model's idle timer uses (-1: forever).",
        ("model", "source"),
        (
            (
                (n, ms[0].keep_alive_source),
                -1 if ms[0].keep_alive_s is None else ms[0].keep_alive_s,
            )
            for n, ms in per_model.items()
        ),
    )
    yield _gauge(
        "llmd_model_contended",
        "1 while the model is contended: its p99 latency above contention.factor x its "
        "baseline while the other models stay within theirs.",
        ("model",),
        (((n,), float(any(m.contended for m in ms))) for n, ms in per_model.items()),
    )
    yield _gauge(
        "llmd_model_baseline_seconds",
        "The model's latency baseline learned from quiet requests: time to first token "
        "(ttft) and time per output token (tpot).",
        ("model", "kind"),
        (
            ((n, kind), v)
            for n, ms in per_model.items()
            for kind, v in (
                ("ttft", ms[0].baseline_ttft_s),
                ("tpot", ms[0].baseline_tpot_s),
            )
            if v is not None
        ),
    )
    yield _counter(
        "llmd_runner_options_overridden_total",
        "Requests whose runner options (num_ctx...) llmd replaced by the loaded ones.",
        ("model",),
        (((n,), sum(m.options_overridden for m in ms)) for n, ms in per_model.items()),
    )
    yield _gauge(
        "llmd_backend_up",
        "1 if the backend's ollama child is running.",
        ("backend",),
        (((b.name,), float(b.up)) for b in snap.backends),
    )
    yield _counter(
        "llmd_backend_restarts_total",
        "Restarts of the backend's child.",
        ("backend",),
        (((b.name,), b.restarts) for b in snap.backends),
    )
    yield from _queues(snap)
    if snap.node is not None:
        yield from _node(snap.node)
    yield _gauge(
        "llmd_gpu_memory_used_bytes",
        "GPU memory in use, all programs.",
        ("gpu",),
        (((str(g.index),), g.used_bytes) for g in snap.gpus),
    )
    yield _gauge(
        "llmd_gpu_memory_total_bytes",
        "GPU memory in all.",
        ("gpu",),
        (((str(g.index),), g.total_bytes) for g in snap.gpus),
    )
    for name, help, attr in (
        (
            "llmd_gpu_utilization_percent",
            "GPU busy time over the driver's last sample.",
            "util_pct",
        ),
        ("llmd_gpu_temperature_celsius", "GPU die temperature.", "temp_c"),
        ("llmd_gpu_power_watts", "GPU power draw.", "power_w"),
        ("llmd_gpu_power_limit_watts", "GPU enforced power limit.", "power_limit_w"),
    ):
        # Only GPUs whose probe reads it (nvml or nvidia-smi): no series rather than a guess,
        # and no family when no GPU has it.
        rows = _known(snap.gpus, attr)
        if rows:
            yield _gauge(name, help, ("gpu",), rows)
    yield _gauge(
        "llmd_store_degraded",
        "1 while llmd's state store cannot save to disk (llmd serves from memory).",
        (),
        [((), float(snap.store_degraded))],
    )


def _queues(snap: Snapshot) -> Iterator[Family]:
    queues = snap.queues
    yield _gauge(
        "llmd_queue_waiting",
        "Requests waiting in llmd's queue for the model (an autoscaler's signal).",
        ("model",),
        (((q.name,), q.waiting) for q in queues),
    )
    yield _gauge(
        "llmd_queue_running",
        "Requests of the model running at its backend (they hold a queue slot).",
        ("model",),
        (((q.name,), q.running) for q in queues),
    )
    yield _gauge(
        "llmd_queue_limit",
        "Requests the model may run at once (num_parallel; 1 for embedding models).",
        ("model",),
        (((q.name,), q.limit) for q in queues),
    )
    yield _gauge(
        "llmd_queue_max",
        "Requests that may wait in llmd's queue for the model (max_queue); more get 429.",
        ("model",),
        (((q.name,), q.max_queue) for q in queues),
    )
    yield _gauge(
        "llmd_queue_making_way",
        "1 while the model starts no requests so that a waiting model gets its memory.",
        ("model",),
        (((q.name,), float(q.making_way)) for q in queues),
    )
    yield _counter(
        "llmd_queue_rejected_total",
        "Requests the queue turned away, by reason (queue_full: 429, queue_timeout: 503).",
        ("model", "reason"),
        (
            ((q.name, reason), q.rejected.get(reason, 0))
            for q in queues
            for reason in ("queue_full", "queue_timeout")
        ),
    )
    yield _counter(
        "llmd_queue_swaps_total",
        "Times the model made way for another model with work waiting for its memory.",
        ("model",),
        (((q.name,), q.swaps) for q in queues),
    )
    if snap.queue_waits is not None:
        yield _histogram(
            "llmd_queue_wait_seconds",
            "Time a request waited in llmd's queue before it started.",
            snap.queue_waits,
        )
    if snap.batches is not None:
        yield _histogram(
            "llmd_swap_batch_requests",
            "Requests a model started in one turn before it made way for another.",
            snap.batches,
        )


def _node(n: NodeGauges) -> Iterator[Family]:
    """The model-server protocol's gauges (engineConfigs in deploy/kubernetes maps them)."""
    yield _gauge(
        "llmd_node_requests_waiting",
        "Requests waiting in llmd's queues, all models (the protocol's TotalQueuedRequests).",
        (),
        [((), n.waiting)],
    )
    yield _gauge(
        "llmd_node_requests_running",
        "Requests holding a slot, all models (the protocol's TotalRunningRequests).",
        (),
        [((), n.running)],
    )
    yield _gauge(
        "llmd_node_cache_usage_ratio",
        "Busy slots / slots of the models loaded or loading, 0 to 1 (the protocol's "
        "KVCacheUtilization: each slot holds a preallocated context).",
        (),
        [((), n.cache_usage)],
    )
    yield _gauge(
        "llmd_node_models_info",
        "Models resident (running_lora_adapters) and loading or awaited "
        "(waiting_lora_adapters), and how many the node can hold without an eviction "
        "(max_lora): the protocol's LoRA info gauge, whose label names the endpoint picker "
        "reads as they are; the value is the unix time they last changed.",
        ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
        [
            (
                (str(n.max_models), ",".join(n.running_models), ",".join(n.waiting_models)),
                n.changed_at,
            )
        ],
    )


class LlmdCollector(Collector):
    """The same families as prometheus_client metric families: the library's encoders write the
    reference pages `Encoder` must equal (tests and bench/metrics_scrape.py compare them)."""

    def __init__(self, metrics: Metrics, snapshot: Callable[[], Snapshot]) -> None:
        self.metrics = metrics
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        for f in families(self.metrics, self.snapshot()):
            yield _metric(f)


def _value(v: float) -> str:
    """A sample value as the library writes it (floatToGoString), with the common case, a
    counter or bucket count below a million (written as 12.0), done without it."""
    if type(v) is int and -(10**15) < v < 1_000_000:
        return f"{v}.0"
    return _go_float(v)


def _escape_value(v: str) -> str:
    """A label value in either format: backslash, newline and double quote escaped."""
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    """`{a="x",b="y"}` sorted by label name, as the library writes a sample's labels."""
    if not names:
        return ""
    pairs = sorted(zip(names, values, strict=True))
    return "{" + ",".join(f'{n}="{_escape_value(v)}"' for n, v in pairs) + "}"


class Encoder:
    """Writes families in the Prometheus text format (0.0.4) or OpenMetrics 1.0, byte for byte as
    prometheus_client's encoders write them. Each series' `name{labels} ` prefix is built once and
    kept for as long as the series is on the page (a series missing from one scrape is forgotten),
    so a scrape costs a dictionary lookup and a number per sample."""

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, tuple[str, ...]], str] = {}
        self._buckets: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        self._headers: dict[tuple[str, bool], str] = {}

    def page(self, fams: Iterable[Family], openmetrics: bool) -> bytes:
        old_prefixes, old_buckets = self._prefixes, self._buckets
        prefixes: dict[tuple[str, tuple[str, ...]], str] = {}
        buckets: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        out: list[str] = []
        add = out.append
        for f in fams:
            add(self._header(f, openmetrics))
            name = f.name
            if f.hist is not None:
                h = f.hist
                for labels, counts in sorted(h.buckets.items()):
                    key = (name, labels)
                    lines = old_buckets.get(key) or self._bucket_prefixes(f, labels)
                    buckets[key] = lines
                    acc = 0
                    for prefix, n in zip(lines, counts, strict=False):  # then _count, _sum
                        acc += n
                        add(f"{prefix}{_value(acc)}\n")
                    # The library's order: the buckets, then _count, then _sum.
                    add(f"{lines[-2]}{_value(acc)}\n{lines[-1]}{_value(h.sums[labels])}\n")
                continue
            for values, value in f.rows:
                key = (name, tuple(values))
                prefix = old_prefixes.get(key) or f"{name}{_labels(f.labels, key[1])} "
                prefixes[key] = prefix
                add(f"{prefix}{_value(value)}\n")
        if openmetrics:
            add("# EOF\n")
        self._prefixes, self._buckets = prefixes, buckets
        return "".join(out).encode()

    def _header(self, f: Family, openmetrics: bool) -> str:
        header = self._headers.get((f.name, openmetrics))
        if header is None:
            help = f.help.replace("\\", "\\\\").replace("\n", "\\n")
            name = f.name
            if openmetrics:
                help = help.replace('"', '\\"')
                if f.kind == "counter":
                    name = name.removesuffix("_total")  # OpenMetrics' family name
            header = f"# HELP {name} {help}\n# TYPE {name} {f.kind}\n"
            self._headers[(f.name, openmetrics)] = header
        return header

    @staticmethod
    def _bucket_prefixes(f: Family, labels: tuple[str, ...]) -> tuple[str, ...]:
        """A histogram series' bucket prefixes (one per bound and +Inf), then _count's and
        _sum's."""
        assert f.hist is not None
        names = (*f.labels, "le")
        bounds = [*map(_go_float, f.hist.bounds), "+Inf"]
        return (
            *(f"{f.name}_bucket{_labels(names, (*labels, b))} " for b in bounds),
            f"{f.name}_count{_labels(f.labels, labels)} ",
            f"{f.name}_sum{_labels(f.labels, labels)} ",
        )


class Exposition:
    """llmd's /metrics page: the format the library negotiates, written by `Encoder`."""

    def __init__(self, metrics: Metrics, snapshot: Callable[[], Snapshot]) -> None:
        self.metrics = metrics
        self.snapshot = snapshot
        self.encoder = Encoder()
        # The library's own rendering of the same families, for comparison (library_page).
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(LlmdCollector(metrics, snapshot))

    def page(self, accept: str = "") -> tuple[bytes, str]:
        """The body and its content type: OpenMetrics if `accept` asks for it, else the
        Prometheus text format (0.0.4), as prometheus_client's choose_encoder decides."""
        _, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        return self.encoder.page(families(self.metrics, self.snapshot()), openmetrics), content_type

    def library_page(self, accept: str = "") -> tuple[bytes, str]:
        """The same page written by prometheus_client's own encoders (slow: the reference)."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
