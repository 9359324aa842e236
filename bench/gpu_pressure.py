#!/usr/bin/env python3
"""GPU-memory behaviour of llmd against Ollama's own, on the same request sequences.

Runs on the simulator with a small simulated GPU (14 GiB) and three 7B-class models whose
footprints add up to more than that, at realistic load times scaled by --speed:

1. spill: a mixed sequence of requests (and another program taking and releasing memory)
   sent through llmd and straight to a simulator (Ollama's own scheduler); counts CPU-spill loads
   (size_vram < size) and evictions of the most important model;
2. pressure: another program takes memory while models idle; time from the write until llmd's
   eviction shows in the GPU state, against the simulator's unload time;
3. priority wait: the top-priority model is requested on a full GPU; its latency against its own
   cold load time on an empty GPU.

    .venv/bin/python bench/gpu_pressure.py [--speed 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmdproc import cleanup, make_llmd, pull  # noqa: E402
from simproc import set_external_mib, start_sim, write_gpu_file  # noqa: E402

CODE = "codellama:7b-code-q4_K_M"
CHAT = "mistral:7b-instruct-q4_K_M"
SMALL = "phi3:mini"
PRIORITY = {CHAT: 1, CODE: 2, SMALL: 3}
DEVICE = {"index": 0, "name": "NVIDIA GeForce RTX 4080", "total_mib": 14 * 1024}
CTX = {"OLLAMA_CONTEXT_LENGTH": "4096"}
# (model, external MiB to set before it): another program comes and goes; a model of None
# unloads every model first (as `ollama stop` would).
SEQUENCE: list[tuple[str | None, int | None]] = [
    (SMALL, None), (CHAT, None), (CODE, None), (SMALL, None), (CHAT, None), (SMALL, 3000),
    (CODE, None), (CHAT, 0), (SMALL, None), (CODE, 6000), (CHAT, None), (SMALL, 0), (CODE, None),
    (None, None), (CHAT, 10240), (SMALL, None), (CHAT, 0), (CODE, None),
]  # fmt: skip


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ps(base: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(base + "/api/ps", timeout=10) as r:
        return {m["name"]: m for m in json.loads(r.read())["models"]}


def run_sequence(base: str, child: str, gpu_file: Path) -> dict[str, Any]:
    spills = spill_loads = important_evicted = errors = 0
    for model, external in SEQUENCE:
        if model is None:
            for m in PRIORITY:
                post(base, "/api/generate", {"model": m, "keep_alive": 0})
            while ps(child):
                time.sleep(0.05)
            continue
        if external is not None:
            set_external_mib(gpu_file, 0, external)
            time.sleep(1.0)  # let a pressure check see it
        before = set(ps(child))
        status, _ = post(base, "/api/generate", {"model": model, "prompt": "x", "stream": False})
        errors += status != 200
        after = ps(child)
        if "DEBUG" in __import__("os").environ:
            print(
                model,
                external,
                status,
                {k: (v["size_vram"] >> 20, v["size"] >> 20) for k, v in after.items()},
            )
        spills += sum(m["size_vram"] < m["size"] for m in after.values())
        spill_loads += model in after and after[model]["size_vram"] < after[model]["size"]
        if CHAT in before and CHAT not in after and model != CHAT:
            important_evicted += 1
    set_external_mib(gpu_file, 0, 0)
    return {
        "spill_loads": spill_loads,
        "spill_observations": spills,
        "top_priority_evicted": important_evicted,
        "refused_503": errors,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", default="5", help="OLLAMA_SIM_SPEED (1 = real load times)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = {"speed": float(args.speed)}
    with tempfile.TemporaryDirectory(prefix="llmd-gpu-bench-") as tmp:
        tmpdir = Path(tmp)
        d = make_llmd(
            tmpdir / "llmd",
            models=[{"name": m, "priority": p} for m, p in PRIORITY.items()],
            sections={
                "gpu": {"interval": "0.5s", "admission_timeout": "5s", "probe": "nvidia-smi"},
                "daemon": {"log_level": "warning"},
            },
            backend_extra=[{"env": CTX}],
            sim_env={"OLLAMA_SIM_SPEED": args.speed},
            gpu_devices=[DEVICE],
        )
        try:
            d.start()
            for m in PRIORITY:
                pull(d, m)
            out["llmd"] = run_sequence(d.url, d.backend_url(0), d.gpu_file)

            # Pressure: CHAT and SMALL idle, then another program takes 5000 MiB.
            for m in (CHAT, SMALL):
                post(d.url, "/api/generate", {"model": m, "prompt": "x", "stream": False})
            t0 = time.monotonic()
            set_external_mib(d.gpu_file, 0, 5000)
            while SMALL in ps(d.backend_url(0)):
                time.sleep(0.01)
            out["pressure_to_freed_s"] = round(time.monotonic() - t0, 2)
            set_external_mib(d.gpu_file, 0, 0)

            # Priority wait: the GPU holds SMALL and CODE; CHAT (priority 1) comes in.
            d.llmctl("unload", CHAT)
            for m in (SMALL, CODE):
                post(d.url, "/api/generate", {"model": m, "prompt": "x", "stream": False})
            t0 = time.monotonic()
            post(d.url, "/api/generate", {"model": CHAT, "prompt": "x", "stream": False})
            waited = time.monotonic() - t0
            for m in (SMALL, CODE, CHAT):
                d.llmctl("unload", m)
            t0 = time.monotonic()
            post(d.url, "/api/generate", {"model": CHAT, "prompt": "x", "stream": False})
            alone = time.monotonic() - t0
            out["top_priority_wait_s"] = round(waited, 2)
            out["top_priority_alone_s"] = round(alone, 2)
            out["top_priority_extra_s"] = round(waited - alone, 2)
        finally:
            cleanup(d)

        gpu_file = write_gpu_file(tmpdir / "direct-gpu.json", [DEVICE])
        (tmpdir / "direct").mkdir()
        with start_sim(
            tmpdir / "direct", {"OLLAMA_SIM_GPU": str(gpu_file), **CTX}, speed=float(args.speed)
        ) as sim:
            for m in PRIORITY:
                post(sim.url, "/api/pull", {"model": m, "stream": False})
            out["ollama"] = run_sequence(sim.url, sim.url, gpu_file)

    print(f"sequence of {len(SEQUENCE)} requests on a 14 GiB GPU, sim speed {args.speed}")
    print(f"{'':24}{'llmd':>8}{'ollama':>8}")
    for k in ("spill_loads", "spill_observations", "top_priority_evicted", "refused_503"):
        print(f"{k:24}{out['llmd'][k]:>8}{out['ollama'][k]:>8}")
    print(f"pressure to memory freed: {out['pressure_to_freed_s']} s (interval 0.5 s)")
    print(
        f"top-priority request on a full GPU: {out['top_priority_wait_s']} s, alone "
        f"{out['top_priority_alone_s']} s, extra {out['top_priority_extra_s']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
