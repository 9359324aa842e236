"""End to end: a model slowed by a partial CPU load (other programs' GPU memory forced it) is
flagged as contended, alone, with the cause named; it clears once it is back on the GPU.

Two backends share one small simulated GPU (4 GiB), one tiny model each, both pinned so that
GPU pressure evicts neither. tiny:2m is 266 MiB (8 + 2 + 256 graph); with 3573 MiB held by other
programs and tiny:1m's 262 MiB only 261 MiB are free, so the simulator puts 2 of its 4 layers
on the GPU and generates 1 + 9 x 0.5 = 5.5 times slower (tests/sim/README.md)."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from llmdproc import Llmd, cleanup, make_llmd, scrape, series, wait_for
from simproc import set_external_mib

FAST = "tiny:1m"
SLOW = "tiny:2m"
PROMPT = " ".join(["word"] * 100)  # 100 prompt tokens: a measurable time to first token


@pytest.fixture
def d(tmp_path: Any) -> Iterator[Llmd]:
    d = make_llmd(
        tmp_path,
        backends=2,
        models=[
            {"name": FAST, "backend": "b0", "pin": True},
            {"name": SLOW, "backend": "b1", "pin": True, "allow_cpu_spill": True},
        ],
        sections={
            "gpu": {"probe": "nvidia-smi", "interval": "0.5s", "reserve": "1MiB"},
            "contention": {
                "window": 8,
                "window_time": "60s",
                "min_samples": 5,
                "min_slow": 3,
                "baseline_samples": 6,
            },
        },
        backend_extra=[{"env": {"OLLAMA_CONTEXT_LENGTH": "4096"}}] * 2,
        sim_env={"OLLAMA_SIM_SPEED": "1"},
        gpu_devices=[{"index": 0, "name": "NVIDIA GeForce RTX 4080", "total_mib": 4096}],
    )
    try:
        d.start()
        yield d
    finally:
        cleanup(d)


def stream(d: Llmd, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "stream": True, "options": {"num_predict": 10}}
    req = urllib.request.Request(d.url + "/api/generate", data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200
        lines = r.read().splitlines()
    assert json.loads(lines[-1])["done"] is True


def traffic(d: Llmd, n: int, models: tuple[str, ...] = (FAST, SLOW)) -> None:
    for _ in range(n):
        for m in models:
            stream(d, m)


def restart_b1(d: Llmd) -> None:
    """Restart the slow model's backend, so that its next request loads it afresh."""
    pid = next(b["pid"] for b in d.status()["backends"] if b["name"] == "b1")
    assert d.llmctl("restart", "b1").returncode == 0
    wait_for(
        lambda: any(
            b["name"] == "b1" and b["state"] == "running" and b["pid"] not in (None, pid)
            for b in d.status()["backends"]
        ),
        timeout=20,
        what="b1 restarted",
    )


def events(d: Llmd, kind: str) -> list[dict[str, Any]]:
    r = d.llmctl("events", "--json", "--kind", kind)
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout)["events"])


def contended(d: Llmd, model: str) -> float:
    return scrape(d).get(series("llmd_model_contended", model=model), -1.0)


def test_partial_cpu_load_is_contention_of_that_model_only(d: Llmd) -> None:
    """Quiet traffic teaches both baselines; a partial load of one model (other programs took
    its GPU memory) makes it contended, alone, naming the CPU offload; back on the GPU, it
    clears."""
    t0 = time.monotonic()
    traffic(d, 1)  # the cold loads
    traffic(d, 8)  # quiet: the baselines
    m = d.model(SLOW)
    assert m["baseline_ttft_s"] and m["baseline_tpot_s"] and not m["contended"]
    assert contended(d, SLOW) == 0.0 and contended(d, FAST) == 0.0
    assert scrape(d)[series("llmd_model_baseline_seconds", model=SLOW, kind="tpot")] > 0

    restart_b1(d)
    set_external_mib(d.gpu_file, 0, 4096 - 262 - 261)
    traffic(d, 6)
    ps = d.get("/api/ps", backend=1)["models"]
    assert ps[0]["size_vram"] < ps[0]["size"]  # partly on the CPU

    (ev,) = events(d, "contention")
    assert ev["model"] == SLOW
    assert "its baseline" in ev["reason"] and "likely: partly on the CPU" in ev["reason"]
    assert contended(d, SLOW) == 1.0 and contended(d, FAST) == 0.0
    assert d.model(SLOW)["contended"] and not d.model(FAST)["contended"]
    out = d.llmctl("status").stdout
    assert f"warning: model {SLOW} is CONTENDED: p99" in out
    # llmctl top flags it too, in its p99-against-baseline column; the other model is not.
    top = d.llmctl("top", "--once").stdout.splitlines()
    slow_row = next(ln for ln in top if f" {SLOW} " in f" {ln} ")
    fast_row = next(ln for ln in top if f" {FAST} " in f" {ln} ")
    assert "CONTENDED" in slow_row and "CONTENDED" not in fast_row, top
    assert FAST + " is CONTENDED" not in out
    assert d.logs().count(f"model {SLOW} is contended") == 1  # one line, not one per request

    set_external_mib(d.gpu_file, 0, 0)
    restart_b1(d)
    traffic(d, 10, (SLOW,))
    (cleared,) = events(d, "contention-cleared")
    assert cleared["model"] == SLOW
    assert contended(d, SLOW) == 0.0
    assert "CONTENDED" not in d.llmctl("status").stdout
    assert len(events(d, "contention")) == 1
    assert time.monotonic() - t0 < 40
