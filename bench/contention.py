#!/usr/bin/env python3
"""Models contending for one GPU: llmd against Ollama's own scheduler, on the same open-loop trace.

A simulated 16 GiB GPU and three task models from a catalog written for this run: "code"
(priority 1, ~9.3 GiB loaded), "chat" (priority 3, ~3 GiB) and "summarise" (priority 5,
~8 GiB). code and summarise cannot be resident together; either fits with chat. The lowest
priority goes to summarise, one of the two models that must swap, so that the starvation target
is about a model that really waits behind a more important one.

One seeded open-loop trace (Poisson arrivals per model: code and chat at steady rates, summarise
mostly quiet with a burst of 12 s every 60 s) is written in simulated seconds and sent at
--speed times real time (OLLAMA_SIM_SPEED divides load and token times alike). In one run, one
after the other, each on a fresh simulated GPU:

1. uncontended: each model alone on a simulator, warm, with only its own requests of the trace
   (its p50/p99, its measured load and unload time and GPU footprint);
2. llmd: the whole trace through llmd (one backend, the simulator as its child, nvidia-smi probe,
   [[model]] priorities, every other setting at its default);
3. ollama: the whole trace straight to one simulator (Ollama's scheduler and eviction, its
   defaults: OLLAMA_MAX_LOADED_MODELS 3 per GPU, OLLAMA_KEEP_ALIVE 5m, OLLAMA_NUM_PARALLEL 1).

Both contended arms first load code and chat (one request each, not counted), as a box in use
would have them; the uncontended baseline is warm too.

Per arm and model: requests, p50/p99 latency of the 200 answers, p99 against the uncontended
p99, answers by status, worst wait (latency less the model's own prompt and generation time,
as the simulator reports them; for a refusal, the time until it came). Per arm: model loads
(the simulator's own `msg=offload` log lines, counted the same way in both arms: llmd copies its
child's log into its own), loads per 100 requests, throughput, and lost requests: any answer but
200, or 429/503 with Retry-After, and any request unanswered within --timeout. llmd's own timers
(keep-alive, aging, queue_timeout) are wall-clock and not scaled by --speed.

Targets (issue 11): (1) the priority-1 model's p99 within 2x its uncontended p99 under llmd and
beyond it under Ollama; (2) at least 50% fewer loads under llmd, no request lost; (3) the
lowest-priority model's worst wait under llmd within the bound llmd/scheduler.py states:
max(priority difference x aging, swap_batch x service time) of the model it waits behind, plus
num_parallel x that service time, that model's unload and its own load; for the last of
max_queue waiting requests, plus those ahead of it and ceil(max_queue / swap_batch) - 1 more
turns of the holder (its batch and two swaps each); all times measured above.

    .venv/bin/python bench/contention.py [--seed 1] [--duration 20] [--speed 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import re
import shlex
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmdproc import Llmd, cleanup, make_llmd  # noqa: E402
from simproc import start_sim, write_catalog, write_gpu_file  # noqa: E402

T = TypeVar("T")
MIB = 1024 * 1024
GPU_MIB = 16384
DEVICE = {"index": 0, "name": "NVIDIA GeForce RTX 4080", "total_mib": GPU_MIB}
NUM_CTX = 4096
GRAPH_MIB = 256  # the simulator's constant graph term (tests/sim/simlib/memory.py)
# llmd's defaults that the starvation bound uses ([scheduler] swap_batch and aging, backend
# num_parallel).
SWAP_BATCH = 8
AGING_S = 10.0
MAX_QUEUE = 64
NUM_PARALLEL = 1
LOAD_LINE = re.compile(r"msg=offload model=(\S+)")


@dataclass(frozen=True)
class TaskModel:
    """One model of the benchmark: catalog numbers, priority and its traffic."""

    name: str
    priority: int
    size_mib: int  # GGUF file size
    layers: int
    kv_heads: int
    head_dim: int
    embedding_length: int
    load_seconds: float
    tokens_per_second: float
    num_predict: int
    rate: float  # steady arrivals per simulated second
    burst_rate: float = 0.0  # extra arrivals per second during a burst
    burst_every: float = 60.0
    burst_len: float = 12.0
    burst_first: float = 20.0

    @property
    def footprint_mib(self) -> int:
        """size + f16 KV cache (num_ctx 4096, one slot) + graph, as the simulator computes it."""
        kv = 2 * self.layers * self.kv_heads * self.head_dim * NUM_CTX * NUM_PARALLEL * 2
        return self.size_mib + math.ceil(kv / MIB) + GRAPH_MIB

    def catalog(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size_mib * MIB,
            "family": "llama",
            "parameter_size": self.name.split(":")[1].upper(),
            "quantization": "Q4_K_M",
            "layers": self.layers,
            "heads": self.kv_heads * 4,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "embedding_length": self.embedding_length,
            "context_length": 32768,
            "load_seconds": self.load_seconds,
            "tokens_per_second": self.tokens_per_second,
            "pulled": True,
        }


# A 14B coder (Q4_K_M), a 3B chat model and a 13B summariser; load times and token rates of
# one mid-range card at speed 1.
MODELS = (
    TaskModel("code:14b", 1, 8448, 48, 8, 128, 5120, 5.0, 55, 24, rate=0.8),
    TaskModel("chat:3b", 3, 2368, 28, 8, 128, 3072, 2.0, 120, 24, rate=0.5),
    TaskModel("summarise:13b", 5, 7424, 32, 8, 128, 5120, 4.5, 60, 48, 0.02, burst_rate=1.0),
)


@dataclass(frozen=True)
class Req:
    at: float  # seconds after the start, wall clock (simulated seconds / speed)
    model: str
    prompt: str
    num_predict: int


def make_trace(seed: int, duration_s: float, speed: float) -> list[Req]:
    """The seeded open-loop trace: per model a Poisson process, piecewise-constant rate."""
    span = duration_s * speed
    out: list[tuple[float, str, int]] = []
    for m in MODELS:
        segments = [(0.0, span, m.rate)]
        start = m.burst_first
        while m.burst_rate and start < span:
            segments.append((start, min(span, start + m.burst_len), m.burst_rate))
            start += m.burst_every
        rng = random.Random(f"{seed}:{m.name}")
        for a, b, rate in segments:
            t = a + rng.expovariate(rate)
            while t < b:
                out.append((t, m.name, m.num_predict))
                t += rng.expovariate(rate)
    out.sort()
    return [
        Req(t / speed, name, f"request {i} for {name.split(':')[0]}", n)
        for i, (t, name, n) in enumerate(out)
    ]


@dataclass
class Result:
    model: str
    status: int | None  # None: no answer (timeout, connection error)
    latency: float
    wait: float
    retry_after: bool

    @property
    def lost(self) -> bool:
        if self.status == 200:
            return False
        return not (self.status in (429, 503) and self.retry_after)


async def send_one(
    s: aiohttp.ClientSession, base: str, r: Req, t0: float, timeout: float
) -> Result:
    await asyncio.sleep(max(0.0, t0 + r.at - time.monotonic()))
    body = {
        "model": r.model,
        "prompt": r.prompt,
        "stream": False,
        "options": {"num_predict": r.num_predict},
    }
    start = time.monotonic()
    try:
        async with s.post(
            base + "/api/generate", json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await resp.read()
            latency = time.monotonic() - start
            own = 0.0
            if resp.status == 200:
                done = json.loads(raw)
                own = (done.get("prompt_eval_duration", 0) + done.get("eval_duration", 0)) / 1e9
            return Result(
                r.model, resp.status, latency, latency - own, "Retry-After" in resp.headers
            )
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError):
        latency = time.monotonic() - start
        return Result(r.model, None, latency, latency, False)


async def replay(base: str, trace: list[Req], timeout: float) -> tuple[list[Result], float]:
    """Send every request at its time, whatever happened to the earlier ones; the results and
    the seconds from the first send to the last answer."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        t0 = time.monotonic() + 0.2
        results = await asyncio.gather(*(send_one(s, base, r, t0, timeout) for r in trace))
        return list(results), time.monotonic() - t0 - (trace[0].at if trace else 0.0)


def pct(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]


def summarise(results: list[Result]) -> dict[str, Any]:
    ok = [r.latency for r in results if r.status == 200]
    counts = {"200": 0, "429": 0, "503": 0, "other": 0}
    for r in results:
        key = str(r.status) if r.status in (200, 429, 503) else "other"
        counts[key] += 1
    return {
        "requests": len(results),
        "p50_s": pct(ok, 50),
        "p99_s": pct(ok, 99),
        "status": counts,
        "lost": sum(r.lost for r in results),
        "worst_wait_s": max((r.wait for r in results), default=None),
    }


def http(base: str, path: str, body: dict[str, Any] | None = None, timeout: float = 60) -> Any:
    data = None if body is None else json.dumps(body).encode()
    with urllib.request.urlopen(urllib.request.Request(base + path, data), timeout=timeout) as r:
        return json.loads(r.read())


def count_loads(log: str) -> dict[str, int]:
    loads: dict[str, int] = {m.name: 0 for m in MODELS}
    for name in LOAD_LINE.findall(log):
        loads[name] = loads.get(name, 0) + 1
    return loads


def arm_summary(
    results: list[Result], span: float, loads: dict[str, int], baseline: dict[str, Any]
) -> dict[str, Any]:
    models = {}
    for m in MODELS:
        sm = summarise([r for r in results if r.model == m.name])
        base_p99 = baseline[m.name]["p99_s"]
        sm["p99_ratio"] = sm["p99_s"] / base_p99 if sm["p99_s"] and base_p99 else None
        models[m.name] = sm
    total = sum(loads.values())
    ok = sum(r.status == 200 for r in results)
    lost = sum(r.lost for r in results)
    return {
        "models": models,
        "requests": len(results),
        # One row per request of the trace, in its order: model, status (null: no answer),
        # latency and wait in seconds.
        "log": [[r.model, r.status, round(r.latency, 4), round(r.wait, 4)] for r in results],
        "loads": loads,
        "loads_total": total,
        "loads_per_100": 100 * total / len(results) if results else None,
        "throughput_rps": ok / span if span > 0 else None,
        "lost": lost,
        "all_answered": lost == 0,
    }


def run_baseline(tmp: Path, env: dict[str, str], trace: list[Req], timeout: float) -> Any:
    """Each model alone, warm, with its own requests of the trace."""
    out: dict[str, Any] = {}
    gpu = write_gpu_file(tmp / "gpu-alone.json", [DEVICE])
    (tmp / "alone").mkdir()
    with start_sim(tmp / "alone", {**env, "OLLAMA_SIM_GPU": str(gpu)}, speed=None) as sim:
        for m in MODELS:
            t = time.monotonic()
            http(sim.url, "/api/generate", {"model": m.name})  # empty prompt: load only
            load_s = time.monotonic() - t
            vram = {p["name"]: p["size_vram"] for p in http(sim.url, "/api/ps")["models"]}
            own = [r for r in trace if r.model == m.name]
            shift = own[0].at if own else 0.0
            own = [Req(r.at - shift, r.model, r.prompt, r.num_predict) for r in own]
            results, _ = asyncio.run(replay(sim.url, own, timeout))
            t = time.monotonic()
            http(sim.url, "/api/generate", {"model": m.name, "keep_alive": 0})
            while http(sim.url, "/api/ps")["models"]:
                time.sleep(0.005)
            unload_s = time.monotonic() - t
            sm = summarise(results)
            sm.update(
                load_s=load_s,
                unload_s=unload_s,
                footprint_mib=math.ceil(vram.get(m.name, 0) / MIB),
            )
            out[m.name] = sm
            print(f"  alone {m.name}: {len(results)} requests", file=sys.stderr)
    return out


def run_llmd(
    tmp: Path, env: dict[str, str], trace: list[Req], timeout: float
) -> tuple[list[Result], float, dict[str, int]]:
    d = make_llmd(
        tmp / "llmd",
        models=[{"name": m.name, "priority": m.priority} for m in MODELS],
        sections={
            "gpu": {"probe": "nvidia-smi"},
            # info: the child's log lines (its loads) are copied into llmd's log.
            "daemon": {"log_level": "info"},
        },
        sim_env=env,
        gpu_devices=[DEVICE],
    )
    return replay_through(d, warm_up, trace, timeout, count_loads)


def replay_through(
    d: Llmd,
    warm: Callable[[str], None],
    trace: list[Req],
    timeout: float,
    count: Callable[[str], T],
) -> tuple[list[Result], float, T]:
    """Start llmd, warm it up, send the trace; the results, the span and what `count` finds in
    llmd's log lines of the trace (its children's are copied there at info)."""
    try:
        d.start()
        warm(d.url)
        time.sleep(0.5)
        before = len(d.logs())
        results, span = asyncio.run(replay(d.url, trace, timeout))
        time.sleep(0.5)  # the children's last log lines reach llmd's log
        return results, span, count(d.logs()[before:])
    finally:
        cleanup(d)


def warm_up(base: str) -> None:
    """Both arms start as a user's box would: the steady models loaded (the most important
    and the small one; the other big one cannot join them). Not counted."""
    for m in sorted(MODELS, key=lambda m: m.priority)[:2]:
        http(base, "/api/generate", {"model": m.name, "prompt": "warm", "stream": False})


def run_ollama(
    tmp: Path, env: dict[str, str], trace: list[Req], timeout: float
) -> tuple[list[Result], float, dict[str, int]]:
    gpu = write_gpu_file(tmp / "gpu-ollama.json", [DEVICE])
    (tmp / "ollama").mkdir()
    with start_sim(tmp / "ollama", {**env, "OLLAMA_SIM_GPU": str(gpu)}, speed=None) as sim:
        warm_up(sim.url)
        before = len(sim.log())
        results, span = asyncio.run(replay(sim.url, trace, timeout))
        return results, span, count_loads(sim.log()[before:])


def check_targets(out: dict[str, Any]) -> list[dict[str, Any]]:
    base, llmd, ollama = out["uncontended"], out["arms"]["llmd"], out["arms"]["ollama"]
    top = min(MODELS, key=lambda m: m.priority)
    low = max(MODELS, key=lambda m: m.priority)
    targets = []

    lr, orr = llmd["models"][top.name]["p99_ratio"], ollama["models"][top.name]["p99_ratio"]
    ok = lr is not None and orr is not None and lr <= 2 and orr > 2
    targets.append(
        {
            "target": f"1. {top.name} (priority {top.priority}) p99 within 2x uncontended "
            "under llmd, beyond under Ollama",
            "pass": ok,
            "detail": f"llmd {fmt_x(lr)}, ollama {fmt_x(orr)}",
        }
    )

    ll, ol = llmd["loads_per_100"], ollama["loads_per_100"]
    ok = ll is not None and ol is not None and ll <= 0.5 * ol and llmd["lost"] == 0
    fewer = f"{100 * (1 - ll / ol):.0f}% fewer" if ll is not None and ol else "n/a"
    targets.append(
        {
            "target": "2. at least 50% fewer model loads under llmd, no request lost",
            "pass": ok,
            "detail": f"loads/100 requests llmd {ll:.1f}, ollama {ol:.1f} ({fewer}); "
            f"lost llmd {llmd['lost']}, ollama {ollama['lost']}",
        }
    )

    # The models the lowest-priority one cannot share the GPU with: it waits behind them.
    behind = [
        m
        for m in MODELS
        if m is not low
        and base[m.name]["footprint_mib"] + base[low.name]["footprint_mib"] > GPU_MIB
    ]

    # llmd's stated bound (llmd/scheduler.py): the holder makes way once the waiting request
    # outranks its requests ((priority difference) x aging) and it has served its batch since
    # its load, then its requests in flight end, it unloads and the waiting model loads; the
    # last of MAX_QUEUE waiting requests also waits for those ahead of it, and for up to
    # ceil(MAX_QUEUE / swap_batch) - 1 more turns of the holder (its batch and two swaps each).
    def behind_bound(b: TaskModel) -> float:
        service, own = base[b.name]["p50_s"] or 0.0, base[low.name]["p50_s"] or 0.0
        swap = (
            base[b.name]["unload_s"]
            + base[low.name]["load_s"]
            + base[low.name]["unload_s"]
            + base[b.name]["load_s"]
        )
        rank_wait = max(0, low.priority - b.priority) * AGING_S
        first = (
            max(rank_wait, SWAP_BATCH * service)
            + NUM_PARALLEL * service
            + base[b.name]["unload_s"]
            + base[low.name]["load_s"]
        )
        turns = math.ceil(MAX_QUEUE / SWAP_BATCH) - 1
        return first + (MAX_QUEUE - 1) * own / NUM_PARALLEL + turns * (SWAP_BATCH * service + swap)

    bound = max((behind_bound(b) for b in behind), default=0.0)
    worst = llmd["models"][low.name]["worst_wait_s"]
    ok = worst is not None and worst <= bound
    targets.append(
        {
            "target": f"3. no starvation: {low.name} (priority {low.priority}) worst wait under "
            "llmd within the bound",
            "pass": ok,
            "bound_s": bound,
            "detail": f"worst wait llmd {fmt_ms(worst)}, ollama "
            f"{fmt_ms(ollama['models'][low.name]['worst_wait_s'])}; bound {fmt_ms(bound)} = "
            f"max(priority difference x aging {AGING_S:g}s, {SWAP_BATCH} x service) + "
            f"{NUM_PARALLEL} x service of "
            + ", ".join(b.name for b in behind)
            + f" + its unload + a load, + {MAX_QUEUE - 1} requests ahead in its own queue and "
            f"{math.ceil(MAX_QUEUE / SWAP_BATCH) - 1} more turns of the holder",
        }
    )
    return targets


def fmt_ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.0f} ms"


def fmt_x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def markdown(out: dict[str, Any]) -> str:
    lines = [
        f"`{out['command']}`",
        "",
        f"seed {out['seed']}, trace {out['duration_s']:g} s at speed {out['speed']:g} "
        f"({out['trace_requests']} requests), {GPU_MIB // 1024} GiB simulated GPU, "
        f"run took {out['elapsed_s']:.0f} s",
        "",
        "| arm | model | prio | requests | p50 ms | p99 ms | p99 / alone | 200 | 429 | 503 "
        "| other | lost | worst wait ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ms(s: float | None) -> str:
        return "-" if s is None else f"{s * 1000:.0f}"

    for arm in ("alone", "llmd", "ollama"):
        for m in MODELS:
            if arm == "alone":
                r, ratio = out["uncontended"][m.name], "1"
            else:
                r = out["arms"][arm]["models"][m.name]
                ratio = "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.2f}"
            st = r["status"]
            lines.append(
                f"| {arm} | {m.name} | {m.priority} | {r['requests']} | {ms(r['p50_s'])} "
                f"| {ms(r['p99_s'])} | {ratio} | {st['200']} | {st['429']} | {st['503']} "
                f"| {st['other']} | {r['lost']} | {ms(r['worst_wait_s'])} |"
            )
    lines += [
        "",
        "| arm | requests | model loads | loads / 100 requests | throughput req/s | lost "
        "| every request answered |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ("llmd", "ollama"):
        a = out["arms"][arm]
        loads = ", ".join(f"{k.split(':')[0]} {v}" for k, v in a["loads"].items())
        lines.append(
            f"| {arm} | {a['requests']} | {a['loads_total']} ({loads}) | "
            f"{a['loads_per_100']:.1f} | {a['throughput_rps']:.2f} | {a['lost']} | "
            f"{'yes' if a['all_answered'] else 'no'} |"
        )
    lines.append("")
    for t in out["targets"]:
        lines.append(f"{'PASS' if t['pass'] else 'MISS'} {t['target']}: {t['detail']}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1, help="seed of the trace")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of trace per arm")
    ap.add_argument("--speed", type=float, default=10.0, help="OLLAMA_SIM_SPEED (1 = real time)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=130.0,
        help="seconds a request may take before it counts as lost (default: past llmd's "
        "2-minute queue_timeout, so its 503 answers come first)",
    )
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    started = time.monotonic()
    for a, b in ((0, 2), (0, 1), (1, 2)):  # the two large models cannot share; chat fits
        fits = MODELS[a].footprint_mib + MODELS[b].footprint_mib <= GPU_MIB * 0.8
        assert fits == ((a, b) != (0, 2)), (MODELS[a].name, MODELS[b].name)
    trace = make_trace(args.seed, args.duration, args.speed)
    out: dict[str, Any] = {
        "command": shlex.join(["python", *sys.argv]),
        "seed": args.seed,
        "duration_s": args.duration,
        "speed": args.speed,
        "gpu_mib": GPU_MIB,
        "trace_requests": len(trace),
        "models": {
            m.name: {"priority": m.priority, "footprint_mib": m.footprint_mib} for m in MODELS
        },
        "arms": {},
    }
    with tempfile.TemporaryDirectory(prefix="llmd-contention-") as tmp_s:
        tmp = Path(tmp_s)
        catalog = write_catalog(tmp / "catalog.toml", [m.catalog() for m in MODELS])
        env = {"OLLAMA_SIM_CATALOG": str(catalog), "OLLAMA_SIM_SPEED": f"{args.speed:g}"}
        print(f"trace: {len(trace)} requests; uncontended baselines", file=sys.stderr)
        out["uncontended"] = run_baseline(tmp, env, trace, args.timeout)
        for name, run in (("llmd", run_llmd), ("ollama", run_ollama)):
            print(f"arm {name}", file=sys.stderr)
            results, span, loads = run(tmp, env, trace, args.timeout)
            out["arms"][name] = arm_summary(results, span, loads, out["uncontended"])
    out["targets"] = check_targets(out)
    out["elapsed_s"] = time.monotonic() - started
    print(markdown(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
