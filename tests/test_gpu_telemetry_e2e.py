"""GPU telemetry end to end: the simulator's nvidia-smi reports utilisation, temperature and
power that follow the runners computing on its GPU; llmd's probe reads them into `llmctl
status`, /metrics and `llmctl top`."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

from llmdproc import Llmd, call, scrape, series

TINY = "tiny:1m"  # 200 tokens/s at OLLAMA_SIM_SPEED 1
Factory = Callable[..., Llmd]


def device(d: Llmd) -> dict[str, Any]:
    return dict(json.loads(d.llmctl("status", "--json").stdout)["gpu"]["devices"][0])


def until(pred: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_gpu_utilisation_temperature_and_power_follow_the_load(daemon: Factory) -> None:
    d = daemon(
        sim_env={"OLLAMA_SIM_SPEED": "1"},
        sections={"gpu": {"probe": "nvidia-smi", "interval": "0.3s"}},
    ).start()
    assert call(d.url + "/api/generate", {"model": TINY})[0] == 200  # load it
    until(lambda: device(d)["util_pct"] == 0, "an idle GPU")
    idle = device(d)
    assert (idle["temp_c"], idle["power_w"], idle["power_limit_w"]) == (35, 30, 450)

    # About 4 s of generation: the GPU is busy meanwhile.
    body = {"model": TINY, "prompt": "hi", "stream": False, "options": {"num_predict": 800}}
    done = threading.Event()
    threading.Thread(target=lambda: (call(d.url + "/api/generate", body), done.set())).start()
    until(lambda: device(d)["util_pct"] > 0, "a busy GPU")
    busy = device(d)
    assert busy["util_pct"] == 80 and busy["temp_c"] > 35 and 30 < busy["power_w"] <= 450
    page = scrape(d)
    assert page[series("llmd_gpu_utilization_percent", gpu="0")] == 80
    assert page[series("llmd_gpu_power_limit_watts", gpu="0")] == 450
    top = d.llmctl("top", "--once").stdout
    assert "80% " in top and "°C" in top and "/450 W" in top
    assert not done.is_set()  # all of it while the request ran
    until(done.is_set, "the request to finish", timeout=30)
    until(lambda: device(d)["util_pct"] == 0, "the GPU idle again")
