"""The daemon's adaptive keep-alive takes the decisions the benchmark's replay predicts.

One short trace is replayed twice: through bench/replay.py (the discrete-event model that calls
llmd.policy) and in real time through the real daemon and simulator. Keep-alive bounds are
scaled to seconds ([keep_alive] min 1 s, default 3 s, max 12 s) so the trace takes ~40 s.
Each model's cold starts must match; the trace is built so that learning changes the outcome:
SLOW's 5.5 s gaps outlast the 3 s default, so without history every request would be cold;
once llmd has seen one gap it keeps SLOW loaded across them.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

from llmdproc import cleanup, make_llmd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.replay import Params, Simulator, make_policy
from bench.traces import ModelSpec, Request, Trace

FAST, SLOW = "tiny:1m", "tiny:2m"
PARAMS = Params(beta=0.001, min_s=1.0, max_s=12.0, default_s=3.0)
SLOW_AT = (0.5, 6.0, 11.5, 17.0, 22.5, 28.0, 33.5)
DURATION_S = 0.05


def trace() -> Trace:
    """FAST every 2 s, SLOW every 5.5 s; sizes and load times as the simulator's tiny models."""
    reqs = [(float(t), 0) for t in range(0, 36, 2)] + [(t, 1) for t in SLOW_AT]
    reqs.sort()
    models = (ModelSpec(FAST, 0.27, 0.02, 5), ModelSpec(SLOW, 0.28, 0.02, 5))
    return Trace(
        "e2e", "e2e", models, tuple(Request(t, m, DURATION_S) for t, m in reqs), 40.0, None
    )


def predicted_cold_starts(policy: str = "adaptive") -> dict[str, int]:
    sim = Simulator(trace(), make_policy(policy), PARAMS, warmup_s=0.0, vram_gb=None)
    result = sim.run()
    return {m.spec.name: m.cold for m in result.models}


def test_daemon_matches_replay(tmp_path: Path) -> None:
    """Cold starts per model through the daemon equal the replay's prediction."""
    expected = predicted_cold_starts()
    # The point of the trace: the fixed default would reload SLOW every time; learning doesn't.
    assert expected == {FAST: 1, SLOW: 2}
    d = make_llmd(
        tmp_path,
        sections={
            "keep_alive": {
                "policy": "adaptive",
                "min": "1s",
                "default": "3s",
                "max": "12s",
                "beta": PARAMS.beta,
            }
        },
    )
    try:
        d.start()
        t0 = time.monotonic() + 0.5
        errors: list[str] = []

        def send(at: float, model: str) -> None:
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            body = {"model": model, "prompt": "x", "stream": False, "options": {"num_predict": 1}}
            req = urllib.request.Request(d.url + "/api/generate", data=json.dumps(body).encode())
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
            except OSError as e:
                errors.append(f"{model}@{at}: {e}")

        names = {0: FAST, 1: SLOW}
        threads = [
            threading.Thread(target=send, args=(r.t, names[r.model])) for r in trace().requests
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        actual = {name: d.model(name)["loads"] for name in (FAST, SLOW)}
        assert actual == expected
        slow = d.model(SLOW)
        assert slow["keep_alive_source"] == "adaptive" and slow["keep_alive_samples"] >= 3
        # Learned: longer than its gaps, within [keep_alive] max.
        assert 5.5 <= slow["keep_alive_s"] <= 12
        events = json.loads(d.llmctl("events", "--model", SLOW, "--json").stdout)["events"]
        assert [e["kind"] for e in events].count("load") == expected[SLOW]
    finally:
        cleanup(d)
