"""Tests for llmd.metrics: the families over a plain snapshot, and llmd's encoder against the
pages prometheus_client's own encoders write from the same families."""

from __future__ import annotations

import re
from typing import Any

import pytest
from llmdproc import parse_metrics, series

from llmd import metrics as M
from llmd.store import RequestRecord

OPENMETRICS = "application/openmetrics-text"
# What Prometheus 2.x sends.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def request(model: str, duration_s: float = 0.2) -> RequestRecord:
    return RequestRecord(
        time=0.0, model=model, endpoint="/api/generate", status=200, duration_s=duration_s
    )


def model(name: str, backend: str, **kw: Any) -> M.ModelGauges:
    kw.setdefault("loaded", True)
    kw.setdefault("in_flight", 0)
    kw.setdefault("vram_bytes", 0)
    kw.setdefault("keep_alive_s", 300.0)
    return M.ModelGauges(name, backend, keep_alive_source="default", **kw)


def page(counters: M.Metrics, snap: M.Snapshot | None = None, accept: str = "") -> tuple[str, str]:
    snap = snap or M.Snapshot(models=[], backends=[], gpus=[])
    body, content_type = M.Exposition(counters, lambda: snap).page(accept)
    return body.decode(), content_type


def test_the_text_format_unless_openmetrics_is_asked_for() -> None:
    """Without an Accept header (or with text/plain) /metrics is the 0.0.4 text format; a
    client that accepts OpenMetrics, as Prometheus does, gets OpenMetrics ending in # EOF."""
    counters = M.Metrics()
    counters.record_request(request("a"))
    for accept in ("", "text/plain", "*/*"):
        text, content_type = page(counters, accept=accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert not text.endswith("# EOF\n")
    for accept in (OPENMETRICS, PROMETHEUS_ACCEPT):
        text, content_type = page(counters, accept=accept)
        assert content_type.startswith("application/openmetrics-text; version=")
        assert text.endswith("# EOF\n")
        assert parse_metrics(text, openmetrics=True) == parse_metrics(page(counters)[0])


def test_counters_keep_their_total_names_and_have_no_created_series() -> None:
    """A counter is `# TYPE llmd_requests_total counter` in the text format, as before
    prometheus_client; OpenMetrics names the family without _total and the samples with it.
    The collector gives no creation time, so neither format has _created samples."""
    counters = M.Metrics()
    counters.record_request(request("a"))
    text, _ = page(counters)
    assert "# TYPE llmd_requests_total counter" in text
    assert re.search(r'^llmd_requests_total\{.*model="a".*\} 1\.0$', text, re.M)
    om, _ = page(counters, accept=OPENMETRICS)
    assert "# TYPE llmd_requests counter" in om
    assert re.search(r'^llmd_requests_total\{.*model="a".*\} 1\.0$', om, re.M)
    assert "_created" not in text + om


def test_only_llmd_families_are_exported() -> None:
    """The registry is private: no process_, python_gc_ or platform families."""
    text, _ = page(M.Metrics())
    names = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert names and all(n.startswith("llmd_") for n in names)


@pytest.mark.parametrize(
    ("observed", "le", "cumulative"),
    [
        # A value on a bound counts in that bucket (le is inclusive).
        ([0.25], "0.25", 1),
        ([0.25], "0.1", 0),
        ([0.05, 0.3, 200.0], "0.5", 2),
        ([0.05, 0.3, 200.0], "120.0", 2),
        ([0.05, 0.3, 200.0], "+Inf", 3),
    ],
)
def test_histogram_buckets_are_cumulative_and_inclusive(
    observed: list[float], le: str, cumulative: int
) -> None:
    counters = M.Metrics()
    for v in observed:
        counters.record_request(request("a", duration_s=v))
    s = parse_metrics(page(counters)[0])
    name = "llmd_request_duration_seconds"
    assert s[series(f"{name}_bucket", model="a", le=le)] == cumulative
    assert s[series(f"{name}_count", model="a")] == len(observed)
    assert s[series(f"{name}_sum", model="a")] == pytest.approx(sum(observed))
    # Every bound of BUCKETS is a series, as before (le as str() of the bound).
    buckets = [k for k in s if k.startswith(f"{name}_bucket")]
    assert len(buckets) == len(M.BUCKETS) + 1


def test_a_replicated_model_is_loaded_per_backend_and_summed_per_model() -> None:
    """llmd_model_loaded has a series per copy; in-flight and VRAM are the model's sum;
    keep-alive -1 means forever."""
    snap = M.Snapshot(
        models=[
            model("r", "b0", in_flight=2, vram_bytes=3 * 2**30, keep_alive_s=None),
            model("r", "b1", loaded=False, in_flight=1, vram_bytes=2**30, keep_alive_s=None),
        ],
        backends=[M.BackendGauges("b0", True, 0), M.BackendGauges("b1", False, 3)],
        gpus=[M.GpuGauges(0, 123, 24564 * 2**20)],
    )
    s = parse_metrics(page(M.Metrics(), snap)[0])
    assert s[series("llmd_model_loaded", model="r", backend="b0")] == 1
    assert s[series("llmd_model_loaded", model="r", backend="b1")] == 0
    assert s[series("llmd_model_in_flight", model="r")] == 3
    # Byte counts stay exact (the library writes them as 4.294967296e+09).
    assert s[series("llmd_model_vram_bytes", model="r")] == 4 * 2**30
    assert s[series("llmd_model_keep_alive_seconds", model="r", source="default")] == -1
    assert s[series("llmd_backend_up", backend="b1")] == 0
    assert s[series("llmd_backend_restarts_total", backend="b1")] == 3
    assert s[series("llmd_gpu_memory_total_bytes", gpu="0")] == 24564 * 2**20


def test_queue_limits_and_the_store_are_gauges() -> None:
    """llmd_queue_max is the model's max_queue (for a saturation alert beside
    llmd_queue_waiting); llmd_store_degraded is 1 while the store cannot save."""
    snap = M.Snapshot(
        models=[],
        backends=[],
        gpus=[],
        queues=[M.QueueGauges("a", 60, 1, 1, False, {"queue_full": 2}, 0, max_queue=64)],
        store_degraded=True,
    )
    s = parse_metrics(page(M.Metrics(), snap)[0])
    assert s[series("llmd_queue_waiting", model="a")] == 60
    assert s[series("llmd_queue_max", model="a")] == 64
    assert s[series("llmd_queue_rejected_total", model="a", reason="queue_full")] == 2
    assert s[series("llmd_queue_rejected_total", model="a", reason="queue_timeout")] == 0
    assert s[series("llmd_store_degraded")] == 1


def test_the_node_is_one_series_per_gauge_with_its_models_as_lists() -> None:
    """The model-server protocol's gauges: a single unlabelled sample each (the endpoint picker
    reads one sample per name), and the model sets as comma-separated label values."""
    node = M.NodeGauges(
        waiting=4,
        running=2,
        cache_usage=0.5,
        running_models=("code", "qwen2.5-coder:7b"),
        waiting_models=("llama3.1:8b",),
        max_models=4,
        changed_at=1_790_000_000.5,
    )
    snap = M.Snapshot(models=[], backends=[], gpus=[], node=node)
    text = page(M.Metrics(), snap)[0]
    s = parse_metrics(text)
    assert s[series("llmd_node_requests_waiting")] == 4
    assert s[series("llmd_node_requests_running")] == 2
    assert s[series("llmd_node_cache_usage_ratio")] == 0.5
    info = series(
        "llmd_node_models_info",
        max_lora="4",
        running_lora_adapters="code,qwen2.5-coder:7b",
        waiting_lora_adapters="llama3.1:8b",
    )
    assert s[info] == 1_790_000_000.5
    assert len([k for k in s if k.startswith("llmd_node_")]) == 4
    assert "# TYPE llmd_node_models_info gauge" in text
    # Without a node reading (an older snapshot), no family at all rather than zeros.
    assert "llmd_node_" not in page(M.Metrics())[0]


def test_label_values_are_escaped_and_read_back() -> None:
    odd = 'a "quoted" \\ name\nwith a newline'
    counters = M.Metrics()
    counters.record_request(request(odd))
    counters.record_event("crash", None)  # no model: an empty label
    for accept in ("", OPENMETRICS):
        s = parse_metrics(page(counters, accept=accept)[0], openmetrics=bool(accept))
        assert s[series("llmd_requests_total", model=odd, endpoint="/api/generate", status="200")]
        assert s[series("llmd_model_events_total", event="crash", model="")] == 1


ODD = 'a "quoted" \\ name\nwith a newline, ünïcode'


def odd_snapshot(extra_model: bool) -> tuple[M.Metrics, M.Snapshot]:
    """Every family filled, with label values to escape and numbers the library writes in each
    of its ways: small and large integers, floats, a negative, exponents, infinity and NaN."""
    counters = M.Metrics()
    for name, duration in ((ODD, 0.25), ("b", 1e-7), ("b", 7200.0)):
        counters.record_request(
            RequestRecord(
                time=0.0,
                model=name,
                endpoint="/v1/chat/completions",
                status=200,
                duration_s=duration,
                ttfb_s=duration / 3,
                prompt_tokens=2_000_000,
                eval_tokens=5,
                waited_for_load=True,
            )
        )
    counters.record_event("crash", None)
    counters.tokens[("b", "eval")] = 10**17  # past the fast path: the library's exponent form
    waits, batches = M.Histogram(), M.Histogram((1.0, 2.0, 4.0))
    waits.observe((ODD,), 0.01)
    batches.observe(("b",), 3)
    models = [
        model(ODD, 'gpu"0', keep_alive_s=None, vram_bytes=12 * 2**30, contended=True),
        model("b", "b0", keep_alive_s=1234.5, baseline_ttft_s=0.012, baseline_tpot_s=3e-5),
    ]
    if extra_model:
        models.append(model("c", "b0", loaded=False, keep_alive_s=float("inf")))
    snap = M.Snapshot(
        models=models,
        backends=[M.BackendGauges("b0", True, 0), M.BackendGauges('gpu"0', False, 7)],
        gpus=[
            M.GpuGauges(0, 123, 24564 * 2**20, util_pct=float("nan"), temp_c=61.0),
            M.GpuGauges(1, 0, 80 * 2**30),
        ],
        queues=[M.QueueGauges("b", 3, 1, 4, True, {"queue_timeout": 1}, 2, max_queue=64)],
        queue_waits=waits,
        batches=batches,
        store_degraded=True,
        node=M.NodeGauges(3, 1, 0.25, (ODD, "b"), ("c:latest", "c"), 5, 1_790_000_000.123),
    )
    return counters, snap


@pytest.mark.parametrize("accept", ["", "text/plain", OPENMETRICS, PROMETHEUS_ACCEPT, "*/*"])
@pytest.mark.parametrize("extra_model", [False, True])
def test_the_page_is_byte_for_byte_the_librarys(accept: str, extra_model: bool) -> None:
    """llmd's encoder writes what prometheus_client's encoders write for the same families,
    content type included, in whichever format the Accept header gets."""
    counters, snap = odd_snapshot(extra_model)
    expo = M.Exposition(counters, lambda: snap)
    ours, library = expo.page(accept), expo.library_page(accept)
    assert ours[1] == library[1]
    assert ours[0].decode().splitlines() == library[0].decode().splitlines()
    assert ours[0] == library[0]
    assert b"NaN" in ours[0] and b"e+17" in ours[0] and b"+Inf" in ours[0]


def test_kept_prefixes_follow_the_series_on_the_page() -> None:
    """Scrape after scrape the page stays the library's while values change and series come
    and go; a series missing from a scrape is forgotten, not kept forever."""
    counters, snap = odd_snapshot(extra_model=True)
    current = snap
    expo = M.Exposition(counters, lambda: current)
    assert expo.page()[0] == expo.library_page()[0]
    kept = set(expo.encoder._prefixes)
    assert ("llmd_model_loaded", ("c", "b0")) in kept

    current = odd_snapshot(extra_model=False)[1]  # "c" is gone
    counters.record_request(request("d", duration_s=3.0))  # "d" is new
    counters.record_request(request("b", duration_s=0.5))
    for _ in range(2):
        assert expo.page()[0] == expo.library_page()[0]
    assert ("llmd_model_loaded", ("c", "b0")) not in expo.encoder._prefixes
    assert ("llmd_request_duration_seconds", ("d",)) in expo.encoder._buckets

    current = snap  # "c" is back, as before
    assert expo.page(OPENMETRICS)[0] == expo.library_page(OPENMETRICS)[0]
    assert ("llmd_model_loaded", ("c", "b0")) in expo.encoder._prefixes
