"""/metrics of a running llmd after traffic: every family keeps its name, type, labels and
values through prometheus_client, and OpenMetrics is served to clients that ask for it."""

from __future__ import annotations

import re
import urllib.request

from llmdproc import Factory, Llmd, call, parse_metrics, series

from llmd.metrics import BUCKETS

TINY, TINY2 = "tiny:1m", "tiny:2m"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

# Every family /metrics has, as `# TYPE` names it in the text format, with its labels. All but
# the two marked new are exactly what the hand-written renderer wrote before prometheus_client.
FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "llmd_requests_total": ("counter", ("model", "endpoint", "status")),
    "llmd_cold_starts_total": ("counter", ("model",)),
    "llmd_tokens_total": ("counter", ("model", "kind")),
    "llmd_model_events_total": ("counter", ("event", "model")),
    "llmd_request_duration_seconds": ("histogram", ("model",)),
    "llmd_time_to_first_byte_seconds": ("histogram", ("model",)),
    "llmd_model_loaded": ("gauge", ("model", "backend")),
    "llmd_model_in_flight": ("gauge", ("model",)),
    "llmd_model_vram_bytes": ("gauge", ("model",)),
    "llmd_model_keep_alive_seconds": ("gauge", ("model", "source")),
    "llmd_model_contended": ("gauge", ("model",)),
    # No series here: two requests teach no baseline.
    "llmd_model_baseline_seconds": ("gauge", ("model", "kind")),
    "llmd_runner_options_overridden_total": ("counter", ("model",)),
    "llmd_backend_up": ("gauge", ("backend",)),
    "llmd_backend_restarts_total": ("counter", ("backend",)),
    "llmd_queue_waiting": ("gauge", ("model",)),
    "llmd_queue_running": ("gauge", ("model",)),
    "llmd_queue_limit": ("gauge", ("model",)),
    "llmd_queue_max": ("gauge", ("model",)),  # new
    "llmd_queue_making_way": ("gauge", ("model",)),
    "llmd_queue_rejected_total": ("counter", ("model", "reason")),
    "llmd_queue_swaps_total": ("counter", ("model",)),
    "llmd_queue_wait_seconds": ("histogram", ("model",)),
    "llmd_swap_batch_requests": ("histogram", ("model",)),
    "llmd_gpu_memory_used_bytes": ("gauge", ("gpu",)),
    "llmd_gpu_memory_total_bytes": ("gauge", ("gpu",)),
    # GPU telemetry: the simulator's nvidia-smi reports it (a GPU whose probe cannot has none).
    "llmd_gpu_utilization_percent": ("gauge", ("gpu",)),
    "llmd_gpu_temperature_celsius": ("gauge", ("gpu",)),
    "llmd_gpu_power_watts": ("gauge", ("gpu",)),
    "llmd_gpu_power_limit_watts": ("gauge", ("gpu",)),
    "llmd_store_degraded": ("gauge", ()),  # new
    # The node as Kubernetes' endpoint picker reads a model server (issue 14).
    "llmd_node_requests_waiting": ("gauge", ()),
    "llmd_node_requests_running": ("gauge", ()),
    "llmd_node_cache_usage_ratio": ("gauge", ()),
    "llmd_node_models_info": (
        "gauge",
        ("max_lora", "running_lora_adapters", "waiting_lora_adapters"),
    ),
}


def with_traffic(daemon: Factory) -> Llmd:
    """Two backends, a model on each: two generates of one (the first a cold start), a chat of
    the other."""
    d = daemon(
        backends=2, models=[{"name": TINY, "backend": "b0"}, {"name": TINY2, "backend": "b1"}]
    ).start()
    for _ in range(2):
        body = {"model": TINY, "prompt": "x", "stream": False}
        assert call(d.url + "/api/generate", body)[0] == 200
    chat = {"model": TINY2, "messages": [{"role": "user", "content": "hi"}], "stream": False}
    assert call(d.url + "/api/chat", chat)[0] == 200
    return d


def expected(per_model: dict[str, int]) -> tuple[dict[str, float], set[str]]:
    """The series after with_traffic: those whose value is known, and those only present
    (timings, token counts, memory and keep-alive depend on the simulator and the machine)."""
    values: dict[str, float] = {
        series("llmd_requests_total", model=TINY, endpoint="/api/generate", status="200"): 2,
        series("llmd_requests_total", model=TINY2, endpoint="/api/chat", status="200"): 1,
        series("llmd_backend_up", backend="b0"): 1,
        series("llmd_backend_up", backend="b1"): 1,
        series("llmd_backend_restarts_total", backend="b0"): 0,
        series("llmd_backend_restarts_total", backend="b1"): 0,
        series("llmd_model_loaded", model=TINY, backend="b0"): 1,
        series("llmd_model_loaded", model=TINY2, backend="b1"): 1,
        series("llmd_store_degraded"): 0,
        series("llmd_node_requests_waiting"): 0,
        series("llmd_node_requests_running"): 0,
        series("llmd_node_cache_usage_ratio"): 0,
    }
    present = {
        series("llmd_gpu_memory_used_bytes", gpu="0"),
        series("llmd_gpu_memory_total_bytes", gpu="0"),
        series("llmd_gpu_utilization_percent", gpu="0"),
        series("llmd_gpu_temperature_celsius", gpu="0"),
        series("llmd_gpu_power_watts", gpu="0"),
        # Both configured models resident, none other to load: the node holds 2. The value is
        # the time the set last changed.
        series(
            "llmd_node_models_info",
            max_lora=str(len(per_model)),
            running_lora_adapters=",".join(sorted(per_model)),
            waiting_lora_adapters="",
        ),
    }
    values[series("llmd_gpu_power_limit_watts", gpu="0")] = 450
    for m, n in per_model.items():
        values |= {
            series("llmd_cold_starts_total", model=m): 1,
            series("llmd_model_events_total", event="load", model=m): 1,
            series("llmd_model_in_flight", model=m): 0,
            series("llmd_runner_options_overridden_total", model=m): 0,
            series("llmd_model_contended", model=m): 0,
            series("llmd_queue_waiting", model=m): 0,
            series("llmd_queue_running", model=m): 0,
            series("llmd_queue_limit", model=m): 1,
            series("llmd_queue_max", model=m): 64,
            series("llmd_queue_making_way", model=m): 0,
            series("llmd_queue_rejected_total", model=m, reason="queue_full"): 0,
            series("llmd_queue_rejected_total", model=m, reason="queue_timeout"): 0,
            series("llmd_queue_swaps_total", model=m): 0,
        }
        present |= {
            series("llmd_tokens_total", model=m, kind="prompt"),
            series("llmd_tokens_total", model=m, kind="eval"),
            series("llmd_model_vram_bytes", model=m),
            series("llmd_model_keep_alive_seconds", model=m, source="default"),
        }
        for h in ("llmd_request_duration_seconds", "llmd_time_to_first_byte_seconds"):
            values[series(f"{h}_count", model=m)] = n
            values[series(f"{h}_bucket", model=m, le="+Inf")] = n
            present |= {series(f"{h}_sum", model=m)}
            present |= {series(f"{h}_bucket", model=m, le=str(b)) for b in BUCKETS}
        # Requests that did not wait: every bucket holds them, and the sum is 0.
        h = "llmd_queue_wait_seconds"
        values[series(f"{h}_count", model=m)] = n
        values[series(f"{h}_sum", model=m)] = 0
        for le in (*map(str, BUCKETS), "+Inf"):
            values[series(f"{h}_bucket", model=m, le=le)] = n
    return values, present


def test_every_series_keeps_its_name_type_labels_and_value(daemon: Factory) -> None:
    """After traffic, /metrics has exactly the expected families (types and label names as
    before prometheus_client, plus llmd_queue_max and llmd_store_degraded) and exactly the
    expected series, with their values; no _created series."""
    d = with_traffic(daemon)
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = r.read().decode()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert types == {name: kind for name, (kind, _) in FAMILIES.items()}
    assert set(re.findall(r"^# HELP (\S+) ", text, re.M)) == set(FAMILIES)
    assert "_created" not in text
    s = parse_metrics(text)
    for key in s:
        name, _, labels = key.partition("{")
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        family = family if family in FAMILIES else name
        names = re.findall(r'(\w+)="', labels)
        extra = ("le",) if name.endswith("_bucket") else ()
        assert sorted(names) == sorted((*FAMILIES[family][1], *extra)), key
    values, present = expected({TINY: 2, TINY2: 1})
    assert set(s) == set(values) | present
    assert {k: s[k] for k in values} == values


def test_prometheus_gets_openmetrics_with_the_same_series(daemon: Factory) -> None:
    """Asked as Prometheus asks (OpenMetrics first), llmd answers OpenMetrics, ending in # EOF,
    with the same series and values as the text format."""
    d = with_traffic(daemon)
    req = urllib.request.Request(d.url + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=")
        om = r.read().decode()
    assert om.endswith("# EOF\n")
    assert "# TYPE llmd_requests counter" in om  # OpenMetrics' family name; samples keep _total
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
        text = parse_metrics(r.read().decode())
    openmetrics = parse_metrics(om, openmetrics=True)
    assert set(openmetrics) == set(text)
    steady = [k for k in text if "gpu_memory_used" not in k]
    assert {k: openmetrics[k] for k in steady} == {k: text[k] for k in steady}
