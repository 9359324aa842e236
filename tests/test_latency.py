"""The contention watch's judgement of a quiet request, over the real lifecycle (fakes at the
child API and GPU probe seams: tests/fakes.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from fakes import Events, make_config, rig

from llmd.latency import LatencyWatch
from llmd.models import MState
from llmd.store import RequestRecord


class Baselines:
    """The store's seam for baselines: none saved, whatever is set kept."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, list[float]]] = {}

    def baselines(self) -> dict[str, dict[str, list[float]]]:
        return {}

    def set_baselines(self, model: str, samples: dict[str, list[float]]) -> None:
        self.saved[model] = samples


def quiet_request(model: str) -> RequestRecord:
    return RequestRecord(
        time=1000.0,
        model=model,
        endpoint="/api/generate",
        status=200,
        duration_s=0.5,
        ttfb_s=0.1,
        eval_tokens=20,
        streamed=True,
    )


async def test_a_replicated_models_warm_unqueued_request_teaches_its_baseline() -> None:
    """Its copies are records keyed name@backend: the watch finds them, and a request with
    every copy wholly on the GPU and nothing else busy there counts as quiet."""
    cfg = make_config([{"name": "a:1b", "backends": ["b0", "b1"]}], backends=("b0", "b1"))
    async with rig(cfg) as r:
        r.add("a:1b", 1)
        r.add("a:1b", 1, backend="b1")
        await r.lc.load("a:1b", r.child, reason="test")
        assert r.lc.add_replica("a:1b", r.backends.children["b1"], reason="test")
        async with asyncio.timeout(5):
            while r.lc.models["a:1b@b1"].state is not MState.LOADED:
                await asyncio.sleep(0.001)
        store = Baselines()
        kw: dict[str, Any] = {"store": store, "events": Events()}
        watch = LatencyWatch(cfg, lifecycle=r.lc, backends=r.backends, **kw)
        watch.record(quiet_request("a:1b"))
        assert watch.tracker.baseline_samples("a:1b") == {"ttft": [0.1], "tpot": [0.02]}
        assert store.saved["a:1b"]["ttft"] == [0.1]
