#!/usr/bin/env python3
"""What llmd costs as a proxy: the same requests straight to one child and through nginx, a bare
aiohttp pass-through and llmd, in interleaved rounds, as ratios to the bare proxy.

One Ollama simulator child (llmd's own, `num_parallel` slots, at `--speed`) stands behind every
front, so all of them forward to the same process:

- direct: the child's own port;
- nginx: Debian's nginx-light, one worker, a keepalive upstream, buffering off (skipped, with
  the reason printed, where `nginx` is not installed);
- bare: bench/bare_proxy.py, a twenty-line aiohttp pass-through (one ClientSession, defaults);
- llmd: the daemon, with everything it does per request (routing, auth check, the scheduler's
  queue, the lease, recording, metrics);
- baseline (with `--baseline DIR`): the llmd of another source tree, beside this one;
- NAME (with `--also NAME:SECTION.KEY=VALUE`, repeatable): this llmd with one config value
  changed, e.g. `--also asyncio:daemon.event_loop=asyncio`.

A baseline or --also front has its own simulator child (an llmd owns its children), at the same
speed and slots as the shared one.

Cases: a tiny model's 8-token answer, non-streamed, at concurrency 1 (latency) and 64
(throughput); streams of 500 tokens at 8, 64 and 256 concurrent streams (chunks forwarded per
second: NDJSON lines the client receives). Each round runs every front once, in an order rotated
round by round so that drift in machine load hits all alike; per round each front's p50 and p99,
requests or chunks per second, and its CPU seconds (utime + stime from /proc/PID/stat, of the
front's processes only) are kept. Reported: per front and case the medians over rounds, and for
llmd (and nginx) the median of per-round ratios to the bare proxy with their spread (min..max):
added p50 (over direct), throughput, CPU per 1,000 requests or per 100,000 chunks. The machine
is shared and noisy; only these paired ratios mean anything.

    .venv/bin/python bench/proxy_overhead.py [--rounds 7] [--scale 1] [--json OUT]
    .venv/bin/python bench/proxy_overhead.py --baseline DIR   # e.g. git archive REV | tar -x -C DIR
    .venv/bin/python bench/proxy_overhead.py --also asyncio:daemon.event_loop=asyncio
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from llmdproc import Llmd, cleanup, free_port, make_llmd, pull  # noqa: E402

MODEL = "tiny:1m"
TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    key: str
    name: str
    concurrency: int
    stream: bool
    tokens: int
    requests: int  # per front per round, at --scale 1


CASES = [
    Case("c1", "non-streamed, concurrency 1", 1, False, 8, 300),
    Case("c64", "non-streamed, concurrency 64", 64, False, 8, 1280),
    Case("s8", "streams of 500 tokens, 8 at once", 8, True, 500, 32),
    Case("s64", "streams of 500 tokens, 64 at once", 64, True, 500, 128),
    Case("s256", "streams of 500 tokens, 256 at once", 256, True, 500, 256),
]
# What the targets compare (llmd / bare, median of rounds): key, measure, better.
TARGETS = [
    ("c1", "added_p50_ms", "lower", 1.0),
    ("c64", "rps", "higher", 1.0),
    ("s256", "chunks_per_s", "higher", 1.0),
]


# -- the fronts ------------------------------------------------------------------------------


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (not their children), in seconds."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / TICK


def wait_http(url: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            import urllib.request

            with urllib.request.urlopen(url + "/api/version", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.monotonic() > end:
                raise
        time.sleep(0.05)


@contextmanager
def bare_proxy(upstream: str, workdir: Path) -> Iterator[tuple[str, list[int]]]:
    port = free_port()
    with open(workdir / "bare.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "bare_proxy.py"), str(port), upstream],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url)
        yield url, [proc.pid]
    finally:
        stop(proc, signal.SIGINT)


NGINX_CONF = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream child {{ server 127.0.0.1:{upstream}; keepalive 300; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://child;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream};
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


@contextmanager
def nginx(upstream_port: int, workdir: Path) -> Iterator[tuple[str, list[int]]]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    d = workdir / "nginx"
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=d, upstream=upstream_port, port=port))
    proc = subprocess.Popen(
        [exe, "-c", str(conf), "-p", str(d), "-g", "daemon off;", "-e", str(d / "stderr.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url)
        pids = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children()]
        yield url, pids
    finally:
        stop(proc, signal.SIGQUIT)  # nginx's graceful stop


def stop(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Stop a front with `sig`, killing it if it has not gone within 10 s."""
    proc.send_signal(sig)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_from(d: Llmd, src: Path, timeout: float = 30) -> None:
    """Start d's daemon from the source tree src (`python -m llmd.daemon` in src, src first on
    PYTHONPATH); its llmctl calls then use src's client too."""
    d.env["PYTHONPATH"] = str(src)
    probe = [sys.executable, "-c", "import llmd; print(llmd.__file__)"]
    where = subprocess.run(probe, env=d.env, cwd=src, capture_output=True, text=True, check=True)
    loaded = Path(where.stdout.strip()).resolve()
    if not loaded.is_relative_to(src.resolve()):
        raise SystemExit(f"--baseline {src}: python imports llmd from {loaded}, not from there")
    d.write_config()
    d.log_path = d.workdir / "llmd-baseline.log"
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            [sys.executable, "-m", "llmd.daemon", "--config", str(d.config_path)],
            env=d.env,
            cwd=src,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    d.wait_ready(timeout)


# -- the load --------------------------------------------------------------------------------


async def one(session: aiohttp.ClientSession, url: str, case: Case) -> tuple[float, int]:
    """Latency (s) and NDJSON lines received of one generate request."""
    body = {
        "model": MODEL,
        "prompt": "benchmark",
        "stream": case.stream,
        "options": {"num_predict": case.tokens},
    }
    t0 = time.perf_counter()
    lines = 0
    async with session.post(url + "/api/generate", json=body) as r:
        async for chunk in r.content.iter_any():
            lines += chunk.count(b"\n")
        assert r.status == 200, r.status
    return time.perf_counter() - t0, lines


async def run_case(
    session: aiohttp.ClientSession, url: str, case: Case, n: int, cpu_pids: list[int]
) -> dict[str, float]:
    sem = asyncio.Semaphore(case.concurrency)
    lat: list[float] = []
    lines = 0

    async def task() -> None:
        nonlocal lines
        async with sem:
            t, k = await one(session, url, case)
            lat.append(t)
            lines += k

    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else 0.0
    t0 = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(n)))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(cpu_pids) - cpu0 if cpu_pids else float("nan")
    return {
        "p50_ms": pct(lat, 50) * 1e3,
        "p99_ms": pct(lat, 99) * 1e3,
        "rps": n / wall,
        "chunks_per_s": lines / wall,
        "cpu_per_1k_requests_s": cpu / n * 1000,
        "cpu_per_100k_chunks_s": cpu / max(lines, 1) * 100_000,
    }


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def measure(
    fronts: dict[str, tuple[str, list[int]]], cases: list[Case], rounds: int, scale: float
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """case key -> front -> one result per round."""
    names = list(fronts)
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as s:
        warm = Case("warm", "warm-up", 8, True, 16, 32)
        for url, _ in fronts.values():  # every path's connections and code warm
            await run_case(s, url, warm, 32, [])
        for case in cases:
            n = max(case.concurrency, round(case.requests * scale))
            acc: dict[str, list[dict[str, float]]] = {f: [] for f in names}
            for r in range(rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for front in order:
                    url, pids = fronts[front]
                    acc[front].append(await run_case(s, url, case, n, pids))
            out[case.key] = acc
    return out


# -- the report ------------------------------------------------------------------------------


def per_round_ratios(
    acc: dict[str, list[dict[str, float]]], front: str, measure: str
) -> list[float]:
    """front / bare, round by round; for added_p50_ms both sides less direct's p50."""
    out = []
    for i, (mine, bare) in enumerate(zip(acc[front], acc["bare"], strict=True)):
        if measure == "added_p50_ms":
            direct = acc["direct"][i]["p50_ms"]
            a, b = mine["p50_ms"] - direct, bare["p50_ms"] - direct
        else:
            a, b = mine[measure], bare[measure]
        out.append(a / b if b else float("nan"))
    return out


def summarise(
    measured: dict[str, dict[str, list[dict[str, float]]]], cases: list[Case]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in cases:
        acc = measured[case.key]
        row: dict[str, Any] = {"case": case.name, "fronts": {}, "vs_bare": {}}
        for front, results in acc.items():
            med = {k: statistics.median(r[k] for r in results) for k in results[0]}
            direct_p50 = [r["p50_ms"] for r in acc["direct"]]
            med["added_p50_ms"] = statistics.median(
                r["p50_ms"] - d for r, d in zip(results, direct_p50, strict=True)
            )
            row["fronts"][front] = med
        measures = ["added_p50_ms", "rps"] if not case.stream else ["chunks_per_s"]
        measures.append("cpu_per_100k_chunks_s" if case.stream else "cpu_per_1k_requests_s")
        for front in acc:
            if front in ("direct", "bare"):
                continue
            ratios = {}
            for m in measures:
                # NaN: not known that round (no CPU ticks counted on one side, say).
                rs = [r for r in per_round_ratios(acc, front, m) if r == r]
                ratios[m] = (
                    {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
                    if rs
                    else None
                )
            row["vs_bare"][front] = ratios
        out[case.key] = row
    return out


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for key, m, better, target in TARGETS:
        if key not in summary:
            continue
        got = summary[key]["vs_bare"]["llmd"][m]
        if got is None:
            continue
        r = got["median"]
        ok = r <= target if better == "lower" else r >= target
        out.append({"case": key, "measure": m, "ratio": r, "target": target, "met": ok})
    return out


def print_report(summary: dict[str, Any], rounds: int, skipped: dict[str, str]) -> None:
    for front, why in skipped.items():
        print(f"{front}: skipped ({why})")
    print(f"{rounds} rounds; medians over rounds; ratios are per-round front / bare, median")
    print("[min..max]. added = p50 less direct's p50 in the same round.\n")
    for row in summary.values():
        print(row["case"])
        for front, med in row["fronts"].items():
            stream = "chunks_per_s" if "streams" in row["case"] else None
            if stream:
                cpu = med["cpu_per_100k_chunks_s"]
                print(
                    f"  {front:9} {med['chunks_per_s']:10.0f} chunks/s   p50 {med['p50_ms']:8.1f} "
                    f"ms   cpu {cpu:6.2f} s/100k chunks"
                )
            else:
                cpu = med["cpu_per_1k_requests_s"]
                print(
                    f"  {front:9} p50 {med['p50_ms']:6.2f} ms (+{med['added_p50_ms']:5.2f})  "
                    f"p99 {med['p99_ms']:7.2f} ms  {med['rps']:7.0f} req/s  "
                    f"cpu {cpu:6.3f} s/1k req"
                )
        for front, ratios in row["vs_bare"].items():
            parts = [
                f"{m} {v['median']:.2f}x [{v['min']:.2f}..{v['max']:.2f}]"
                if v is not None
                else f"{m} unknown"
                for m, v in ratios.items()
            ]
            print(f"  {front} / bare: " + ", ".join(parts))
        print()
    for v in verdicts(summary):
        word = "at most" if v["measure"] == "added_p50_ms" else "at least"
        print(
            f"target {v['case']} {v['measure']}: llmd/bare {v['ratio']:.2f}x, {word} "
            f"{v['target']:.1f}x: {'MET' if v['met'] else 'MISSED'}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply requests per round")
    ap.add_argument("--cases", default=",".join(c.key for c in CASES), help="e.g. c1,c64,s256")
    ap.add_argument("--speed", default="1000", help="OLLAMA_SIM_SPEED of the child")
    ap.add_argument(
        "--num-parallel",
        type=int,
        default=256,
        help="the child's slots (backend.num_parallel; default 256, so that no front queues)",
    )
    ap.add_argument("--no-nginx", action="store_true", help="leave nginx out")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another llmd source tree to run beside this one as the front `baseline`",
    )
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=VALUE",
        help="another llmd front, with one config value changed (repeatable)",
    )
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    also: dict[str, dict[str, dict[str, Any]]] = {}
    for spec in args.also:
        try:
            name, rest = spec.split(":", 1)
            dotted, raw = rest.split("=", 1)
            section, key = dotted.split(".", 1)
        except ValueError:
            ap.error(f"--also {spec!r}: expected NAME:SECTION.KEY=VALUE")
        if name in ("direct", "bare", "nginx", "llmd", "baseline") or name in also:
            ap.error(f"--also {spec!r}: the name {name!r} is taken")
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw  # a bare string
        also[name] = {section: {key: value}}
    if args.baseline is not None and not (args.baseline / "llmd" / "daemon.py").is_file():
        ap.error(f"--baseline {args.baseline}: no llmd/daemon.py there")
    wanted = args.cases.split(",")
    cases = [c for c in CASES if c.key in wanted]
    if len(cases) != len(wanted):
        ap.error(f"--cases: known cases are {', '.join(c.key for c in CASES)}")
    skipped: dict[str, str] = {}
    if args.no_nginx:
        skipped["nginx"] = "--no-nginx"
    elif not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        skipped["nginx"] = "nginx is not installed (Debian: apt install nginx-light)"
    with tempfile.TemporaryDirectory(prefix="llmd-bench-") as tmp:
        work = Path(tmp)
        daemons: dict[str, Llmd] = {}
        try:
            labels = ["llmd", *(["baseline"] if args.baseline else []), *also]
            for label in labels:
                sections: dict[str, dict[str, Any]] = {"daemon": {"log_level": "warning"}}
                for section, values in also.get(label, {}).items():
                    sections.setdefault(section, {}).update(values)
                d = daemons[label] = make_llmd(
                    work / label,
                    sim_env={"OLLAMA_SIM_SPEED": args.speed},
                    sections=sections,
                    backend_extra=[{"num_parallel": args.num_parallel}],
                )
                if label == "baseline":
                    start_from(d, args.baseline)
                else:
                    d.start()
                pull(d, MODEL)
                r = d.llmctl("load", MODEL)
                assert r.returncode == 0, r.stderr
            llmd = daemons["llmd"]
            assert llmd.proc is not None
            direct = llmd.backend_url(0)
            fronts: dict[str, tuple[str, list[int]]] = {"direct": (direct, [])}
            with bare_proxy(direct, work) as bare:
                fronts["bare"] = bare
                with contextmanager_or_none("nginx" not in skipped, llmd, work) as ng:
                    if ng is not None:
                        fronts["nginx"] = ng
                    fronts["llmd"] = (llmd.url, [llmd.proc.pid])
                    for label in labels[1:]:
                        other = daemons[label]
                        assert other.proc is not None
                        fronts[label] = (other.url, [other.proc.pid])
                    measured = asyncio.run(measure(fronts, cases, args.rounds, args.scale))
        finally:
            for d in daemons.values():
                cleanup(d)
    summary = summarise(measured, cases)
    print_report(summary, args.rounds, skipped)
    if args.json:
        doc = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "skipped": skipped,
            "summary": summary,
            "targets": verdicts(summary),
            "rounds": measured,
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


@contextmanager
def contextmanager_or_none(
    wanted: bool, d: Llmd, work: Path
) -> Iterator[tuple[str, list[int]] | None]:
    if not wanted:
        yield None
        return
    with nginx(d.backend_ports[0], work) as ng:
        yield ng


if __name__ == "__main__":
    sys.exit(main())
