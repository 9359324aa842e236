#!/usr/bin/env python3
"""How long a /metrics scrape takes to render: llmd's encoder against prometheus_client's own
encoders (writing the same families) and the old hand-written renderer, on one in-process
snapshot (no daemon).

The snapshot has --models models on --backends backends (every fifth model replicated on two of
them, as `[[model]] backends` makes it), one GPU per backend, a queue per model, and counters and
histograms as traffic leaves them (three endpoints, three statuses, tokens, events, waits and
swap batches for every model). First both renderers' pages are parsed with prometheus_client's
own parsers and compared: every series the old renderer wrote must come out of the new one with
the same type, labels and value (the new exposition adds only NEW_FAMILIES); a difference exits 1.
llmd's pages (text and OpenMetrics) must also be byte for byte the pages prometheus_client's
encoders write from the same families (LlmdCollector); a difference exits 1. Then every arm is
timed in alternation over --iterations rounds (the machine is noisy; each round sees all of them
under the same load): the old `render()` and its encode; llmd's page in the text format (what
curl gets) and in OpenMetrics (what Prometheus 2.x asks for); the library's encoders on the same
families, both formats; and the library's collect step alone (families into its metric objects).
The time to build the snapshot itself (llmd/admin.py) is left out: it is the same for all.

    .venv/bin/python bench/metrics_scrape.py [--models 50] [--backends 4] [--iterations 500]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.metrics_core import Metric  # noqa: E402
from prometheus_client.openmetrics.parser import (  # noqa: E402
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text  # noqa: E402

from llmd import metrics as M  # noqa: E402
from llmd.store import RequestRecord  # noqa: E402

# Families the library-based exposition has that the old renderer did not.
NEW_FAMILIES = {
    "llmd_queue_max",
    "llmd_store_degraded",
    # Added after the hand-written renderer: contention detection and GPU telemetry.
    "llmd_model_contended",
    "llmd_model_baseline_seconds",
    "llmd_gpu_utilization_percent",
    "llmd_gpu_temperature_celsius",
    "llmd_gpu_power_watts",
    "llmd_gpu_power_limit_watts",
}
BUDGET_MS = 10.0

# -- the old renderer, as llmd/metrics.py had it before prometheus_client (for comparison) ------


def _num(v: float) -> str:
    """Exact integers (counters, bytes), full-precision floats: never 1.23457e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = [f'{n}="{_esc(v)}"' for n, v in zip(names, values, strict=True)]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def legacy_render(self: M.Metrics, snap: M.Snapshot) -> str:
    """The Prometheus text exposition format, written by hand (llmd before prometheus_client)."""
    out: list[str] = []

    def family(name: str, kind: str, help: str, rows: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(value)}" for labels, value in rows)

    def hist(name: str, help: str, h: M.Histogram) -> None:
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
        ((lab(("model", "endpoint", "status"), *k), v) for k, v in sorted(self.requests.items())),
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
    per_model: dict[str, list[M.ModelGauges]] = {}
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


# -- a snapshot of the asked size ----------------------------------------------------------------


def build(models: int, backends: int, seed: int = 1) -> tuple[M.Metrics, M.Snapshot]:
    """Counters after traffic to every model, and a snapshot of that many models and backends."""
    rng = random.Random(seed)
    counters = M.Metrics()
    names = [f"model-{i:02d}:{rng.choice(['1b', '7b', '14b'])}-q4_K_M" for i in range(models)]
    names[-1] = 'odd "quoted" \\ name\nline'  # label escaping on both sides
    for name in names:
        for endpoint in ("/api/generate", "/api/chat", "/v1/chat/completions"):
            for status in (200, 429, 499):
                for _ in range(rng.randint(1, 4)):
                    counters.record_request(
                        RequestRecord(
                            time=0.0,
                            model=name,
                            endpoint=endpoint,
                            status=status,
                            duration_s=rng.lognormvariate(0, 1.5),
                            ttfb_s=rng.lognormvariate(-2, 1.5),
                            waited_for_load=rng.random() < 0.1,
                            prompt_tokens=rng.randint(1, 4000),
                            eval_tokens=rng.randint(0, 1000),
                        )
                    )
        for event in ("load", "unload", "evict", "spill"):
            counters.record_event(event, name)
    counters.record_event("restart", None)
    waits, batches = M.Histogram(), M.Histogram((1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0))
    records, queues = [], []
    for i, name in enumerate(names):
        for _ in range(20):
            waits.observe((name,), rng.expovariate(2.0))
        for _ in range(3):
            batches.observe((name,), rng.randint(1, 20))
        copies = [i % backends, (i + 1) % backends] if i % 5 == 0 else [i % backends]
        for b in copies:
            records.append(
                M.ModelGauges(
                    name=name,
                    backend=f"b{b}",
                    loaded=rng.random() < 0.5,
                    in_flight=rng.randint(0, 4),
                    vram_bytes=rng.randint(1, 20) * 2**30 + rng.randint(0, 2**20),
                    keep_alive_s=None if i % 7 == 0 else rng.choice([300.0, 1234.5]),
                    keep_alive_source=rng.choice(["adaptive", "config", "default", "pinned"]),
                    options_overridden=rng.randint(0, 3),
                )
            )
        queues.append(
            M.QueueGauges(
                name=name,
                waiting=rng.randint(0, 64),
                running=rng.randint(0, 4),
                limit=4 * len(copies),
                making_way=rng.random() < 0.1,
                rejected={"queue_full": rng.randint(0, 9)} if i % 3 else {},
                swaps=rng.randint(0, 9),
                max_queue=64,
            )
        )
    snap = M.Snapshot(
        models=sorted(records, key=lambda m: m.name),
        backends=[M.BackendGauges(f"b{b}", b != 3, b) for b in range(backends)],
        gpus=[
            M.GpuGauges(b, rng.randint(0, 24 * 2**30), 24564 * 2**20, 87.0, 61.0, 312.5, 450.0)
            for b in range(backends)
        ],
        queues=queues,
        queue_waits=waits,
        batches=batches,
    )
    return counters, snap


# -- the comparison ------------------------------------------------------------------------------

Series = dict[tuple[str, str, str, frozenset[tuple[str, str]]], float]


def series(families: Iterable[Metric]) -> Series:
    """(family, type, sample name, labels) -> value, for every sample of parsed families."""
    out: Series = {}
    for f in families:
        for s in f.samples:
            key = (f.name, f.type, s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def differences(old_text: str, new_text: str, om_text: str) -> list[str]:
    """What the new pages (text, OpenMetrics) lose or change of the old one's series."""
    old = series(parse_text(old_text))
    new = series(parse_text(new_text))
    extra = {k for k in new if k[0] in NEW_FAMILIES}
    problems = [f"missing or changed: {k} = {v}" for k, v in old.items() if new.get(k) != v]
    problems += [f"unexpected: {k}" for k in set(new) - set(old) - extra]
    om = series(parse_openmetrics(om_text))
    if om != new:
        problems.append(
            f"OpenMetrics differs from the text format: {sorted(set(om) ^ set(new))[:5]}"
        )
    if "_created" in new_text or "_created" in om_text:
        problems.append("_created samples")
    return problems


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t0) / 1e6


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()

    counters, snap = build(args.models, args.backends)
    expo = M.Exposition(counters, lambda: snap)
    old_text = legacy_render(counters, snap)
    new_text = expo.page("")[0].decode()
    om_text = expo.page("application/openmetrics-text")[0].decode()
    problems = differences(old_text, new_text, om_text)
    for accept in ("", "application/openmetrics-text"):
        if expo.page(accept) != expo.library_page(accept):
            problems.append(f"not the library's page for Accept: {accept!r}")
    samples = len(series(parse_text(new_text)))
    print(
        f"{args.models} models ({len(snap.models)} records), {args.backends} backends: "
        f"{samples} samples, {len(new_text) / 1024:.0f} KiB text; "
        f"same series as the old renderer and same bytes as the library: "
        f"{'no' if problems else 'yes'}"
    )
    for p in problems[:20]:
        print("  " + p)

    arms: dict[str, Callable[[], object]] = {
        "old hand-written render": lambda: legacy_render(counters, snap).encode(),
        "llmd, text 0.0.4": lambda: expo.page(""),
        "llmd, OpenMetrics": lambda: expo.page("application/openmetrics-text"),
        "prometheus_client, text 0.0.4": lambda: expo.library_page(""),
        "prometheus_client, OpenMetrics": lambda: expo.library_page("application/openmetrics-text"),
        "  of which collect (families)": lambda: list(
            M.LlmdCollector(counters, lambda: snap).collect()
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in arms}
    for fn in arms.values():  # warm-up
        fn()
    for _ in range(args.iterations):
        for name, fn in arms.items():
            times[name].append(timed(fn))
    print(f"\n{'ms per scrape':34} {'p50':>7} {'mean':>7} {'p99':>7}   (budget {BUDGET_MS} ms)")
    results = {}
    for name, xs in times.items():
        row = {"p50": statistics.median(xs), "mean": statistics.fmean(xs), "p99": pct(xs, 99)}
        results[name] = row
        print(f"{name:34} {row['p50']:7.2f} {row['mean']:7.2f} {row['p99']:7.2f}")
    worst = max(results[k]["p50"] for k in arms if k.startswith("llmd"))
    for fmt in ("text 0.0.4", "OpenMetrics"):
        ratio = results[f"prometheus_client, {fmt}"]["p50"] / results[f"llmd, {fmt}"]["p50"]
        print(f"{fmt}: llmd's encoder {ratio:.1f}x faster than the library's (p50)")
    print(f"llmd p50 {'within' if worst < BUDGET_MS else 'OVER'} the {BUDGET_MS} ms budget")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "ms": results}, indent=2)
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
