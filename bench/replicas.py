#!/usr/bin/env python3
"""One model on two GPUs: llmd with one copy, llmd with two (replicas), and Ollama alone.

Two simulated 16 GiB GPUs, one `ollama serve` child per GPU under llmd (backend gpus = [0] and
[1]), and one model ("code:14b", ~9.3 GiB loaded) that fits once per GPU. One seeded open-loop
trace of that model's requests (Poisson arrivals, a steady rate with bursts above what one copy
serves) is sent, in one run and one after the other, each on fresh simulated GPUs, to:

1. llmd, one copy: `[[model]] backend = "gpu0"` (what a user can do today with Ollama behind
   any router: the model lives on one GPU);
2. llmd, replicas: `[[model]] backends = ["gpu0", "gpu1"]`, llmd loads the second copy when the
   wait exceeds the model's load time (llmd/scheduler.py, Scheduler._grow);
3. ollama: the trace straight to one simulator that sees both GPUs (one runner per model,
   OLLAMA_NUM_PARALLEL 1, its defaults).

Every arm starts with the model loaded once (one request, not counted). Reported per arm:
requests, p50/p99 latency, worst wait (latency less the request's own prompt and generation
time, as the simulator reports them), answers by status, throughput, and the copies loaded
(the simulators' own `msg=offload` log lines).

    .venv/bin/python bench/replicas.py [--seed 1] [--duration 12] [--speed 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from contention import (  # noqa: E402
    LOAD_LINE,
    MODELS,
    Req,
    Result,
    http,
    replay,
    replay_through,
    summarise,
)
from llmdproc import make_llmd  # noqa: E402
from simproc import start_sim, write_catalog, write_gpu_file  # noqa: E402

MODEL = MODELS[0]  # code:14b: 8448 MiB file, ~9.3 GiB loaded, 5 s load, 55 tokens/s
GPU_MIB = 16384
DEVICES = [{"index": i, "name": "NVIDIA GeForce RTX 4080", "total_mib": GPU_MIB} for i in range(2)]
# Arrivals per simulated second: one copy serves about 2 (24 tokens at 55/s, plus the prompt).
RATE = 1.0
BURST_RATE = 4.0
BURST_EVERY = 40.0
BURST_LEN = 15.0
BURST_FIRST = 10.0
ARMS = ("llmd, one copy", "llmd, replicas", "ollama")


def make_trace(seed: int, duration_s: float, speed: float) -> list[Req]:
    """The seeded open-loop trace: a Poisson process whose rate rises in bursts."""
    span = duration_s * speed
    rng = random.Random(f"{seed}:replicas")
    out: list[float] = []
    t = 0.0
    while True:
        in_burst = t >= BURST_FIRST and (t - BURST_FIRST) % BURST_EVERY < BURST_LEN
        t += rng.expovariate(RATE + (BURST_RATE if in_burst else 0.0))
        if t >= span:
            break
        out.append(t)
    return [
        Req(t / speed, MODEL.name, f"request {i}", MODEL.num_predict) for i, t in enumerate(out)
    ]


def copies_loaded(log: str) -> int:
    return sum(1 for name in LOAD_LINE.findall(log) if name == MODEL.name)


def warm(base: str) -> None:
    http(base, "/api/generate", {"model": MODEL.name, "prompt": "warm", "stream": False})


def run_llmd(
    tmp: Path, env: dict[str, str], trace: list[Req], timeout: float, replicas: bool
) -> tuple[list[Result], float, int]:
    placed = {"backends": ["b0", "b1"]} if replicas else {"backend": "b0"}
    d = make_llmd(
        tmp / ("llmd-replicas" if replicas else "llmd-one"),
        backends=2,
        backend_extra=[{"gpus": [0]}, {"gpus": [1]}],
        models=[{"name": MODEL.name, **placed}],
        sections={"gpu": {"probe": "nvidia-smi"}, "daemon": {"log_level": "info"}},
        sim_env=env,
        gpu_devices=DEVICES,
    )
    return replay_through(d, warm, trace, timeout, copies_loaded)


def run_ollama(
    tmp: Path, env: dict[str, str], trace: list[Req], timeout: float
) -> tuple[list[Result], float, int]:
    gpu = write_gpu_file(tmp / "gpu-ollama.json", DEVICES)
    (tmp / "ollama").mkdir()
    with start_sim(tmp / "ollama", {**env, "OLLAMA_SIM_GPU": str(gpu)}, speed=None) as sim:
        warm(sim.url)
        before = len(sim.log())
        results, span = asyncio.run(replay(sim.url, trace, timeout))
        return results, span, copies_loaded(sim.log()[before:])


def markdown(out: dict[str, Any]) -> str:
    def ms(s: float | None) -> str:
        return "-" if s is None else f"{s * 1000:.0f}"

    lines = [
        f"`{out['command']}`",
        "",
        f"seed {out['seed']}, trace {out['duration_s']:g} s at speed {out['speed']:g} "
        f"({out['trace_requests']} requests of {MODEL.name}), two {GPU_MIB // 1024} GiB "
        f"simulated GPUs, run took {out['elapsed_s']:.0f} s",
        "",
        "| arm | requests | p50 ms | p99 ms | worst wait ms | 200 | 429 | 503 | other "
        "| throughput req/s | copies loaded during the trace |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        a = out["arms"][arm]
        st = a["status"]
        lines.append(
            f"| {arm} | {a['requests']} | {ms(a['p50_s'])} | {ms(a['p99_s'])} "
            f"| {ms(a['worst_wait_s'])} | {st['200']} | {st['429']} | {st['503']} "
            f"| {st['other']} | {a['throughput_rps']:.2f} | {a['copies_loaded']} |"
        )
    one, two = out["arms"][ARMS[0]], out["arms"][ARMS[1]]
    if one["p99_s"] and two["p99_s"]:
        lines += ["", f"replicas against one copy: p99 {two['p99_s'] / one['p99_s']:.2f}x"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="seed of the trace")
    ap.add_argument("--duration", type=float, default=12.0, help="seconds of trace per arm")
    ap.add_argument("--speed", type=float, default=10.0, help="OLLAMA_SIM_SPEED (1 = real time)")
    ap.add_argument("--timeout", type=float, default=130.0, help="seconds before a request is lost")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    started = time.monotonic()
    trace = make_trace(args.seed, args.duration, args.speed)
    out: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "seed": args.seed,
        "duration_s": args.duration,
        "speed": args.speed,
        "trace_requests": len(trace),
        "arms": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmd-replicas-") as tmp_s:
        tmp = Path(tmp_s)
        catalog = write_catalog(tmp / "catalog.toml", [MODEL.catalog()])
        env = {"OLLAMA_SIM_CATALOG": str(catalog), "OLLAMA_SIM_SPEED": f"{args.speed:g}"}
        for arm in ARMS:
            print(f"arm {arm}: {len(trace)} requests", file=sys.stderr)
            if arm == "ollama":
                results, span, copies = run_ollama(tmp, env, trace, args.timeout)
            else:
                results, span, copies = run_llmd(
                    tmp, env, trace, args.timeout, replicas=arm == "llmd, replicas"
                )
            sm = summarise(results)
            ok = sum(r.status == 200 for r in results)
            sm.update(throughput_rps=ok / span if span > 0 else None, copies_loaded=copies)
            out["arms"][arm] = sm
    out["elapsed_s"] = time.monotonic() - started
    print(markdown(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
