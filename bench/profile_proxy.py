#!/usr/bin/env python3
"""Where llmd's proxy spends its CPU: py-spy samples the running daemon under one load case of
bench/proxy_overhead.py and the samples are summed per function.

Starts llmd with one simulator child (as proxy_overhead does), loads the tiny model, then runs
`py-spy record` on the daemon's pid (idle time left out) while the case's requests go through
llmd. Writes, under --out (default bench/profiles/):

- CASE.collapsed: the raw stacks (flamegraph.pl or speedscope read them);
- CASE.txt: the functions by own samples and by inclusive samples, as shares of all samples.

py-spy is a development tool, not a dependency of llmd: `.venv/bin/pip install py-spy`.

    .venv/bin/python bench/profile_proxy.py [--case c1|c64|s256] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import aiohttp  # noqa: E402
from llmdproc import cleanup, make_llmd, pull  # noqa: E402
from proxy_overhead import CASES, MODEL, run_case  # noqa: E402


async def drive(url: str, key: str, seconds: float) -> int:
    case = next(c for c in CASES if c.key == key)
    end = time.monotonic() + seconds
    n = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        while time.monotonic() < end:
            await run_case(s, url, case, case.concurrency * 4, [])
            n += case.concurrency * 4
    return n


def summarise(collapsed: str, top: int = 40) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            inclusive[f] += k
    by_file: Counter[str] = Counter()
    for f, k in own.items():
        where = f.rpartition(" (")[2].rstrip(")").rpartition(":")[0] or "?"
        by_file[where if where.startswith("llmd/") else where.split("/")[0]] += k
    llmd_own = sum(k for w, k in by_file.items() if w.startswith("llmd/"))
    out = [f"{total} samples; llmd's own code {100 * llmd_own / total:.1f}% of them\n"]
    out.append("own samples by module (llmd) or package (the rest):")
    out += [f"  {100 * k / total:5.1f}%  {w}" for w, k in by_file.most_common(top)]
    out += ["", "own samples (share of all):"]
    out += [f"  {100 * k / total:5.1f}%  {f}" for f, k in own.most_common(top)]
    out += ["", "inclusive samples (share of all):"]
    out += [f"  {100 * k / total:5.1f}%  {f}" for f, k in inclusive.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="c1", choices=[c.key for c in CASES])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--speed", default="1000")
    ap.add_argument("--num-parallel", type=int, default=256)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "profiles")
    args = ap.parse_args()
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / f"{args.case}.collapsed"
    with tempfile.TemporaryDirectory(prefix="llmd-profile-") as tmp:
        d = make_llmd(
            Path(tmp),
            sim_env={"OLLAMA_SIM_SPEED": args.speed},
            sections={"daemon": {"log_level": "warning"}},
            backend_extra=[{"num_parallel": args.num_parallel}],
        )
        try:
            d.start()
            pull(d, MODEL)
            assert d.llmctl("load", MODEL).returncode == 0
            assert d.proc is not None
            asyncio.run(drive(d.url, args.case, 2))  # warm
            argv = [spy, "record", "-p", str(d.proc.pid), "-d", str(int(args.seconds))]
            rec = subprocess.Popen(
                [*argv, "-r", "200", "-f", "raw", "-o", str(raw), "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            time.sleep(1)
            n = asyncio.run(drive(d.url, args.case, args.seconds - 1))
            _, err = rec.communicate(timeout=60)
            if rec.returncode != 0:
                print(err.decode(), file=sys.stderr)
                return 1
        finally:
            cleanup(d)
    text = summarise(raw.read_text())
    header = f"case {args.case}: {n} requests through llmd in {args.seconds - 1:g} s\n"
    (args.out / f"{args.case}.txt").write_text(header + text)
    print(header + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
