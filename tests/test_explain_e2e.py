"""`llmctl explain` end to end: a real llmd over a store that has seen a model's idle gaps
explains the keep-alive that `llmctl models` shows, with the policy's own numbers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

from llmdproc import Llmd

from llmd import policy
from llmd.store import RequestRecord, Store

TINY = "tiny:1m"
Factory = Callable[..., Llmd]
# Idle gaps seeded into the store (seconds): mostly ~100 s, a few short, two past the default.
GAPS = [100.0] * 12 + [20.0] * 3 + [1000.0] * 2


def seed(state_dir: Path, model: str, gaps: list[float]) -> None:
    """Requests of 0.5 s separated by these idle gaps, ending an hour ago, into the store."""

    async def write() -> None:
        store = await Store.open(state_dir / "llmd.db")
        t = time.time() - 3600 - sum(gaps) - 0.5 * len(gaps)
        for gap in [0.0, *gaps]:
            t += gap
            rec = RequestRecord(
                time=t, model=model, endpoint="/api/generate", status=200, duration_s=0.5
            )
            store.record_request(rec)
            t += 0.5
        await store.close()

    state_dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(write())


def test_explain_shows_the_decision_llmctl_models_shows_and_its_numbers(
    daemon: Factory,
) -> None:
    d = daemon()
    seed(Path(d.sections["daemon"]["state_dir"]), TINY, GAPS)
    d.start()
    r = d.llmctl("explain", TINY, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    shown = d.model(TINY)
    assert doc["decision"]["keep_alive_s"] == shown["keep_alive_s"]
    assert doc["decision"]["source"] == shown["keep_alive_source"] == "adaptive"
    assert doc["samples"] == len(GAPS) == shown["keep_alive_samples"]
    assert sum(b["count"] for b in doc["histogram"]) == len(GAPS)
    i = doc["inputs"]
    # The policy's own numbers for the same inputs.
    hist = policy.IdleHistogram()
    for g in GAPS:
        hist.add(g)
    args = {k: i[k] for k in ("load_s", "size_gb", "priority", "beta", "min_s", "max_s")}
    args.update(default_s=i["default_s"], prewarm=i["prewarm"])
    mine = policy.explain(hist, **args)
    assert mine["decision"] == doc["decision"] and mine["curve"] == doc["curve"]
    assert doc["break_even_s"] == policy.break_even_s(
        i["load_s"], i["size_gb"], i["priority"], i["beta"]
    )
    # The chosen timeout is the cheapest point of the curve, plus the 10% margin.
    best = min(doc["curve"], key=lambda c: c["cost_per_gap"])
    assert doc["decision"]["keep_alive_s"] == min(best["timeout_s"] * 1.1, doc["cap_s"])

    text = d.llmctl("explain", TINY)
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert out.startswith(f"{TINY}: keep-alive ") and "(adaptive, from 17 idle gaps" in out
    assert "idle gaps (17 recorded" in out and "expected cost per idle gap" in out
    marked = [ln for ln in out.splitlines() if "<- " in ln]
    assert len(marked) == 1 and marked[0].split()[0] == _secs(best["timeout_s"]), out

    # A preview with another beta: keeping costs 10x more, so break-even is 10x shorter.
    r = d.llmctl("explain", TINY, "--beta", str(i["beta"] * 10), "--json")
    preview = json.loads(r.stdout)
    assert abs(preview["break_even_s"] * 10 - doc["break_even_s"]) < 1e-6
    assert preview["decision"]["keep_alive_s"] <= doc["decision"]["keep_alive_s"]
    assert d.model(TINY)["keep_alive_s"] == shown["keep_alive_s"]  # nothing changed

    # A pin: the decision says so, and what learning would choose.
    assert d.llmctl("pin", TINY).returncode == 0
    pinned = json.loads(d.llmctl("explain", TINY, "--json").stdout)
    assert pinned["decision"]["source"] == "pinned" and pinned["decision"]["keep_alive_s"] is None
    assert pinned["learned"] == doc["decision"]


def test_explain_errors_name_what_was_wrong(daemon: Factory) -> None:
    d = daemon().start()
    r = d.llmctl("explain", "no-such-model:7b")
    assert r.returncode == 1 and "no-such-model:7b" in r.stderr
    r = d.llmctl("explain", TINY, "--beta", "-1")
    assert r.returncode == 1 and "beta must be a number >= 0" in r.stderr
    fresh = d.llmctl("explain", TINY)
    assert fresh.returncode == 0 and "no idle gaps recorded yet" in fresh.stdout


def _secs(s: float) -> str:
    from llmd.cli import _secs as fmt

    return fmt(s)
