#!/usr/bin/env python3
"""Scale and idle cost: llmd with 50 models on 4 backends and a year of request history.

Issue 13, items 3 and 4. The benchmark first writes a synthetic year of history for --models
models into a store file, then measures the store in-process and a real daemon (the simulator
as its children, one simulated 46 GiB GPU per backend, `gpus = [i]`), and prints one table of
every measure with its target, PASS or MISS and the ratio to the target.

The history is written straight into a SQLite file with llmd's own schema (`llmd.store.SCHEMA`
and `SCHEMA_VERSION`), not through `Store.record_request`: a year of a busy host is millions of
rows, minutes through the store's path. What the store would have derived from those rows is
derived the same way here: the idle gaps between busy periods (`Learned.count_gap`'s rule) as
one `IdleHistogram` per model per UTC day (`to_dict()` as JSON), the roll-up mark per model,
model facts, and a load and an unload event around every cold start (a gap longer than the
10-minute default keep-alive; that request `waited_for_load`). The daemon accepts the file: the
run checks that `llmctl models` shows learned keep-alives (source `adaptive`) for the models
with history. Requests per model and day follow a Zipf law (3,000 a day for the busiest model,
3000/(rank+1)^1.3, at least 8: most models get tens a day, ~8,700 a day in all at 50 models),
in sessions (a geometric number of requests 2-40 s apart) whose rate follows working hours
(weekday 9-18 h UTC full, evenings a third, nights and weekends a tenth). Every tenth model is
an embedding model. Rows are written day by day in time order across models, as a daemon
writes them.

Measured, in this order:

1. store, in-process (`llmd.store.Store` on a copy of the year's file): opening it and the
   first prune with the default 14-day retention (`daemon.retention_days`), with the file, its
   write-ahead log and its pages in use before and after; bytes per request (--growth-requests
   through the store's own path, `record_request` and `flush`, into a new file: pages in use
   after a checkpoint); what a VACUUM (llmd runs none) makes of the pruned file, and in how
   long; then --bounded-days more days of traffic, each followed by a prune with the clock a
   day on: the file's size stays where 14 days of traffic put it.
2. keep-alive decision, in-process: `llmd.models.keep_alive` (what the daemon calls as a model
   goes idle, and for every model in `llmctl status`/`models` and /metrics) for every model,
   on the year's store opened with `retention_days = 366`: --repeats calls with the store's
   merge of the model's 14 days cold (the first decision of a day), then --repeats warm; the
   median of each per model, and the slowest model's.
3. the children alone: the simulators of the daemon's backends started in parallel as llmd
   starts them, to GET / answering (what llmd's startup waits for); and a single one.
4. daemon, year's store, `retention_days = 366` (nothing to prune): startup (process start to
   `/readyz` 200, and to the admin socket answering `GET /v1/status`) and RSS (the daemon's own
   process, not its children).
5. daemon, year's store, default retention, --backends backends: startup; its first prune (the
   store's loop starts with one) finishing, seen as `store.rows` in the admin status; the two
   busiest models of each backend loaded (a request each) and pinned, so that none unloads
   while idle; `llmctl status` and `llmctl models` (the command's wall time, and separately
   the admin request over the Unix socket, without the interpreter's start), median of
   --repeats; `/metrics` on the proxy port (one kept-alive connection, as Prometheus scrapes),
   median and p99 of --scrapes, and its size; RSS; then its CPU over --idle-seconds with
   nothing sent to it: utime + stime of the daemon's process (its main thread's apart; its
   children's not counted, but those of the exited nvidia-smi runs are shown), and RSS again.
6. the same daemon restarted --restarts times on the pruned store (steady state): startup,
   the median.
7. daemon with 1 backend holding every model, on a copy of the pruned store: startup, idle
   CPU and RSS as in 5.

With --profile DIR, each idle daemon (5 and 7) is also profiled for --idle-seconds more
(cProfile on CPU time, started and stopped by signals; the measured windows are not profiled)
and `python -X importtime` is run on llmctl's and llmd's imports; sorted text goes into DIR.
The daemon and llmctl are this checkout's (PYTHONPATH), whatever llmd the venv has installed.

Exit 0 when every measure was taken, whatever PASS or MISS; 1 when one could not be.

    .venv/bin/python bench/scale.py [--models 50] [--backends 4] [--days 365] [--json OUT]
        [--idle-seconds 60] [--repeats 20] [--scrapes 50] [--growth-requests 100000]
        [--bounded-days 5] [--restarts 3] [--seed 1] [--profile DIR] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import io
import json
import math
import os
import pstats
import random
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# The daemon and llmctl started below are this tree's, whatever llmd the interpreter has installed.
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)]
)

import llmdproc  # noqa: E402
from llmdproc import Llmd, cleanup, make_llmd  # noqa: E402
from simproc import catalog_model, spawn_sim, write_catalog  # noqa: E402

from llmd import config as llmd_config  # noqa: E402
from llmd import models as llmd_models  # noqa: E402
from llmd.learned import DAY_S, utc_day  # noqa: E402
from llmd.policy import IdleHistogram  # noqa: E402
from llmd.store import SCHEMA, SCHEMA_VERSION, RequestRecord, Store  # noqa: E402

GIB = 1024**3
GPU = {"name": "NVIDIA L40S", "total_mib": 46068}
DEFAULT_KEEP_ALIVE_S = 600.0  # llmd's [keep_alive] default: gaps past it are cold starts
RETENTION_DAYS = 14  # llmd's [daemon] retention_days default
CLK_TCK = os.sysconf("SC_CLK_TCK")

# (kind, tag, file GiB, load seconds at speed 1, embedding): the catalogue cycles through them.
SHAPES = (
    ("chat", "7b", 4.1, 2.5, False),
    ("code", "14b", 8.4, 5.0, False),
    ("chat", "3b", 2.0, 1.5, False),
    ("summarise", "32b", 18.5, 9.0, False),
    ("chat", "1.5b", 1.0, 1.0, False),
)
EMBED_SHAPE = ("embed", "v1.5", 0.27, 0.5, True)


@dataclass(frozen=True)
class Spec:
    """One configured model of the synthetic host."""

    rank: int
    name: str
    backend: str
    per_day: float
    size: int  # bytes of its file
    load_s: float
    embedding: bool
    priority: int


def specs(models: int, backends: int) -> list[Spec]:
    """The host's models: Zipf-ranked daily rates, shapes and priorities cycling, and the busy
    ones spread over the backends (model i on backend i mod backends)."""
    out = []
    for i in range(models):
        kind, tag, gib, load_s, emb = EMBED_SHAPE if i % 10 == 9 else SHAPES[i % len(SHAPES)]
        out.append(
            Spec(
                rank=i,
                name=f"{kind}-{i:02d}:{tag}",
                backend=f"b{i % backends}",
                per_day=max(8.0, 3000.0 / (i + 1) ** 1.3),
                size=int(gib * GIB),
                load_s=load_s,
                embedding=emb,
                priority=1 + i % 5,
            )
        )
    return out


# -- the synthetic year ---------------------------------------------------------------------------


def activity(t: float) -> float:
    """Relative session rate at unix time t: working hours 1, evenings 1/3, else 1/10 (UTC)."""
    tm = time.gmtime(t)
    if tm.tm_wday >= 5:
        return 0.1
    if 9 <= tm.tm_hour < 18:
        return 1.0
    return 1 / 3 if 18 <= tm.tm_hour < 23 else 0.1


# The week's mean of activity(): 5 days x (9 h x 1 + 5 h x 1/3 + 10 h x 0.1) + 2 days x 2.4 h.
MEAN_ACTIVITY = (5 * (9 + 5 / 3 + 1.0) + 2 * 2.4) / (7 * 24)


def request_times(spec: Spec, rng: random.Random, start: float) -> Iterator[tuple[float, float]]:
    """(start, duration) of the model's requests from `start` on, in time order (sessions that
    run past midnight may interleave with the next day's first ones), forever."""
    per_session = max(2.0, min(30.0, spec.per_day / 60))
    sessions_per_s = spec.per_day / per_session / DAY_S / MEAN_ACTIVITY  # at activity 1
    t = start
    while True:
        day: list[tuple[float, float]] = []
        end = t + DAY_S
        while True:
            # Session starts: a non-homogeneous Poisson process, by thinning.
            t += rng.expovariate(sessions_per_s)
            if t >= end:
                break
            if rng.random() > activity(t):
                continue
            at = t
            for _ in range(1 + int(rng.expovariate(1 / (per_session - 0.5)))):
                if spec.embedding:
                    dur = 0.05 * rng.lognormvariate(0, 0.5)
                else:
                    dur = rng.lognormvariate(0.7, 0.8)
                day.append((at, dur))
                at += dur + rng.uniform(2, 40)
        t = end
        day.sort()
        yield from day


ENDPOINTS = ("/api/chat", "/api/chat", "/api/generate", "/v1/chat/completions")


def generate(path: Path, models: list[Spec], days: int, now: float, seed: int) -> dict[str, Any]:
    """Write `days` days of history up to `now` into a new store file; what was written."""
    t0 = time.perf_counter()
    rng = random.Random(f"{seed}:scale")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.executescript(f"BEGIN;\n{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
    start = now - days * DAY_S
    streams = [request_times(s, random.Random(f"{seed}:{s.name}"), start) for s in models]
    pending: list[tuple[float, float] | None] = [next(st) for st in streams]
    busy_until: dict[str, float] = {}
    hists: dict[tuple[str, str], IdleHistogram] = {}
    day_names: dict[int, str] = {}
    requests = events = 0
    day_end = start
    while day_end < now:
        day_end = min(day_end + DAY_S, now)
        rows: list[tuple[Any, ...]] = []
        evs: list[tuple[Any, ...]] = []
        for i, spec in enumerate(models):
            nxt = pending[i]
            while nxt is not None and nxt[0] < day_end:
                t, dur = nxt
                until = busy_until.get(spec.name)
                cold = until is None or t - until > DEFAULT_KEEP_ALIVE_S
                if until is not None and t > until:
                    d = int(t // DAY_S)
                    day = day_names.get(d) or day_names.setdefault(d, utc_day(t))
                    hists.setdefault((spec.name, day), IdleHistogram()).add(t - until)
                if cold:
                    if until is not None:
                        evs.append(
                            (
                                until + DEFAULT_KEEP_ALIVE_S,
                                "unload",
                                spec.name,
                                spec.backend,
                                "idle past its keep-alive of 10m (adaptive)",
                                None,
                            )
                        )
                    load = spec.load_s * rng.uniform(0.9, 1.3)
                    evs.append(
                        (t, "load", spec.name, spec.backend, f"request; took {load:.2f}s", None)
                    )
                busy_until[spec.name] = max(until or 0.0, t + dur)
                status = 200 if rng.random() < 0.985 else rng.choice((429, 500, 503))
                if spec.embedding:
                    endpoint, prompt, evals = "/api/embed", rng.randint(8, 512), None
                else:
                    endpoint = rng.choice(ENDPOINTS)
                    prompt, evals = rng.randint(20, 3000), rng.randint(5, 800)
                rows.append(
                    (
                        t,
                        spec.name,
                        endpoint,
                        status,
                        dur + (load if cold else 0.0),
                        min(dur, 0.05 + rng.random() * 0.4) + (load if cold else 0.0),
                        int(cold),
                        load if cold else None,
                        prompt,
                        evals,
                        f"{rng.getrandbits(64):016x}",
                    )
                )
                nxt = next(streams[i])
            pending[i] = nxt
        rows.sort(key=lambda r: r[0])
        evs.sort(key=lambda e: e[0])
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO requests (time, model, endpoint, status, duration_s, ttfb_s,"
            " waited_for_load, load_duration_s, prompt_tokens, eval_tokens, request_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        db.executemany(
            "INSERT INTO events (time, kind, model, backend, reason, request_id)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            evs,
        )
        db.execute("COMMIT")
        requests += len(rows)
        events += len(evs)
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO idle_histograms (model, day, histogram) VALUES (?, ?, ?)",
        [
            (m, day, json.dumps(h.to_dict(), separators=(",", ":")))
            for (m, day), h in sorted(hists.items())
        ],
    )
    db.executemany("INSERT INTO idle_rollup (model, busy_until) VALUES (?, ?)", busy_until.items())
    db.executemany(
        "INSERT INTO model_facts (model, size_vram, size, load_s, loads, updated)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        [(s.name, s.size + GIB // 2, s.size + GIB // 2, s.load_s, 100, now) for s in models],
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return {
        "requests": requests,
        "events": events,
        "histograms": len(hists),
        "requests_per_day": requests / max(days, 1),
        "seconds": time.perf_counter() - t0,
        "bytes": file_bytes(path),
    }


# -- the store, in-process ------------------------------------------------------------------------


def file_bytes(path: Path) -> int:
    """The database file's size plus its write-ahead log's, if any."""
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


def page_stats(path: Path) -> dict[str, int]:
    """Pages of a closed database: page size, pages, free pages, bytes in use."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        size = db.execute("PRAGMA page_size").fetchone()[0]
        count = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        rows = db.execute("SELECT count(*) FROM requests").fetchone()[0]
    finally:
        db.close()
    return {
        "page_size": size,
        "pages": count,
        "free_pages": free,
        "used_bytes": (count - free) * size,
        "file_bytes": path.stat().st_size,
        "rows": rows,
    }


class Clock:
    """A settable clock for the store."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def store_startup(path: Path, now: float) -> dict[str, Any]:
    """What a daemon's start does to the year's file with the default retention: open, prune."""
    before = page_stats(path)
    t0 = time.perf_counter()
    store = await Store.open(path, retention_days=RETENTION_DAYS, clock=Clock(now))
    opened = time.perf_counter() - t0
    assert store.degraded is None, store.degraded
    t0 = time.perf_counter()
    await store.prune()
    pruned = time.perf_counter() - t0
    on_disk = file_bytes(path)
    wal_bytes = on_disk - path.stat().st_size  # noqa: ASYNC240 - a benchmark's measurement
    await store.close()
    after = page_stats(path)
    return {
        "open_s": opened,
        "prune_s": pruned,
        "before": before,
        "after": after,
        "bytes_while_open_after_prune": on_disk,
        "wal_bytes_after_prune": wal_bytes,
    }


def synthetic_records(
    models: list[Spec], start: float, n: int, seed: int
) -> Iterator[RequestRecord]:
    """n requests of the host's mix from `start` on, as the proxy records them."""
    rng = random.Random(f"{seed}:growth")
    streams = [request_times(s, random.Random(f"{seed}:g:{s.name}"), start) for s in models]
    pending = [next(st) for st in streams]
    for _ in range(n):
        i = min(range(len(models)), key=lambda k: pending[k][0])
        t, dur = pending[i]
        pending[i] = next(streams[i])
        spec = models[i]
        yield RequestRecord(
            time=t,
            model=spec.name,
            endpoint="/api/embed" if spec.embedding else rng.choice(ENDPOINTS),
            status=200,
            duration_s=dur,
            ttfb_s=min(dur, 0.2),
            prompt_tokens=rng.randint(20, 3000),
            eval_tokens=None if spec.embedding else rng.randint(5, 800),
            request_id=f"{rng.getrandbits(64):016x}",
        )


async def growth(path: Path, models: list[Spec], n: int, now: float, seed: int) -> dict[str, Any]:
    """Bytes per request: n requests through the store's own path into a new file."""
    start = now - 2 * DAY_S
    clock = Clock(start)
    store = await Store.open(path, retention_days=RETENTION_DAYS, clock=clock)
    await store.close()
    empty = page_stats(path)
    store = await Store.open(path, retention_days=RETENTION_DAYS, clock=clock)
    t0 = time.perf_counter()
    for i, rec in enumerate(synthetic_records(models, start, n, seed), 1):
        clock.t = rec.time
        store.record_request(rec)
        if i % 1000 == 0:  # about what a flush a second sees on a busy host
            await store.flush()
    await store.flush()
    took = time.perf_counter() - t0
    await store.close()
    full = page_stats(path)
    per = (full["used_bytes"] - empty["used_bytes"]) / n
    return {
        "requests": n,
        "bytes_per_request": per,
        "mb_per_million": per * 1e6 / 1e6,
        "file_bytes_per_request": (full["file_bytes"] - empty["file_bytes"]) / n,
        "seconds": took,
        "requests_per_s": n / took,
    }


async def bounded(
    path: Path, models: list[Spec], days: int, now: float, seed: int
) -> list[dict[str, Any]]:
    """`days` more days of traffic on a store at steady state, a prune after each: its size."""
    per_day = int(sum(s.per_day for s in models))
    out = []
    for day in range(days):
        start = now + day * DAY_S
        clock = Clock(start)
        store = await Store.open(path, retention_days=RETENTION_DAYS, clock=clock)
        for i, rec in enumerate(synthetic_records(models, start, per_day, seed + day), 1):
            clock.t = rec.time
            store.record_request(rec)
            if i % 1000 == 0:
                await store.flush()
        clock.t = start + DAY_S
        await store.flush()
        await store.prune()
        await store.close()
        out.append({"day": day + 1, "requests": per_day, **page_stats(path)})
    return out


def vacuum(path: Path) -> dict[str, float]:
    """What SQLite's VACUUM (which llmd never runs) would make of the file: seconds, bytes."""
    t0 = time.perf_counter()
    db = sqlite3.connect(path)
    try:
        db.execute("VACUUM")
    finally:
        db.close()
    return {"seconds": time.perf_counter() - t0, "file_bytes": path.stat().st_size}


async def decision_times(
    path: Path, cfg: llmd_config.Config, models: list[Spec], now: float, repeats: int
) -> dict[str, Any]:
    """llmd.models.keep_alive per model on the year's store (retention 366 days): `repeats`
    calls with the store's merge of the model's days cold (each on another day, as the first
    decision of a day is), then `repeats` warm; the median of each per model."""
    clock = Clock(now)
    store = await Store.open(path, retention_days=366, clock=clock)
    try:
        cold: dict[str, float] = {}
        warm: dict[str, float] = {}
        worst = 0.0
        sources: dict[str, str] = {}
        for spec in models:
            m = llmd_models.Model(spec.name, spec.backend)
            times = []
            for i in range(repeats):
                clock.t = now - (i % 2) * DAY_S  # another day than the last call's: a new merge
                t0 = time.perf_counter()
                ka = llmd_models.keep_alive(cfg, store, m)
                times.append((time.perf_counter() - t0) * 1e3)
            cold[spec.name] = statistics.median(times)
            worst = max(worst, *times)
            sources[spec.name] = ka.source
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                llmd_models.keep_alive(cfg, store, m)
                times.append((time.perf_counter() - t0) * 1e3)
            warm[spec.name] = statistics.median(times)
            worst = max(worst, *times)
        in_memory = sum(len(d) for d in store.learned.hists.values())
    finally:
        await store.close()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (on_disk,) = db.execute("SELECT count(*) FROM idle_histograms").fetchone()
    db.close()
    return {
        "histograms_on_disk": on_disk,
        "histograms_in_memory": in_memory,
        "cold_ms_median": statistics.median(cold.values()),
        "cold_ms_max": max(cold.values()),
        "warm_ms_median": statistics.median(warm.values()),
        "warm_ms_max": max(warm.values()),
        "slowest_call_ms": worst,
        "sources": {k: sum(v == k for v in sources.values()) for k in set(sources.values())},
    }


# -- the daemon -----------------------------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over the admin socket."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        super().__init__("llmd", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


def admin_get(d: Llmd, path: str, timeout: float = 30) -> tuple[int, bytes]:
    """One admin request on a new connection, as llmctl makes it: status and body."""
    conn = UnixHTTPConnection(d.socket, timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def proxy_get(d: Llmd, path: str, timeout: float = 5) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", d.proxy_port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def make_daemon(
    tmp: Path, models: list[Spec], backends: int, retention_days: int = RETENTION_DAYS
) -> Llmd:
    """An llmd with `backends` simulator children, one GPU each, each with its models pulled."""
    tmp.mkdir(parents=True, exist_ok=True)
    extra = []
    for b in range(backends):
        mine = [s for s in models if s.backend == f"b{b}"]
        cat = write_catalog(
            tmp / f"catalog-b{b}.toml",
            [
                catalog_model(
                    s.name,
                    s.size / 2**20,
                    layers=32,
                    load_seconds=s.load_s,
                    tokens_per_second=100,
                    embedding=s.embedding,
                )
                for s in mine
            ],
        )
        extra.append({"gpus": [b], "env": {"OLLAMA_SIM_CATALOG": str(cat)}})
    d = make_llmd(
        tmp,
        backends=backends,
        backend_extra=extra,
        models=[{"name": s.name, "backend": s.backend, "priority": s.priority} for s in models],
        sections={
            "gpu": {"probe": "nvidia-smi"},
            "daemon": {"log_level": "info", "retention_days": retention_days},
        },
        gpu_devices=[{"index": b, **GPU} for b in range(backends)],
    )
    return d


def start_timed(d: Llmd, timeout: float = 120) -> dict[str, float]:
    """Start the daemon; seconds from the process start to the admin socket answering
    `GET /v1/status` and to `/readyz` 200."""
    t0 = time.perf_counter()
    d.start(wait=False)
    assert d.proc is not None
    admin = ready = None
    last: object = None
    while (admin is None or ready is None) and time.perf_counter() - t0 < timeout:
        if d.proc.poll() is not None:
            raise RuntimeError(f"llmd exited with {d.proc.returncode}:\n{d.logs()[-3000:]}")
        if admin is None:
            try:
                last = admin_get(d, "/v1/status", timeout=5)[0]
                if last == 200:
                    admin = time.perf_counter() - t0
            except OSError as e:
                last = e
        if ready is None:
            try:
                last = proxy_get(d, "/readyz")
                if last == 200:
                    ready = time.perf_counter() - t0
            except (OSError, http.client.HTTPException) as e:
                last = e
        time.sleep(0.02)
    if admin is None or ready is None:
        raise RuntimeError(
            f"llmd not ready in {timeout}s (admin {admin}, ready {ready}, last {last!r}):\n"
            f"{d.logs()[-3000:]}"
        )
    d.wait_ready()
    return {"admin_s": admin, "ready_s": ready}


def status_doc(d: Llmd) -> dict[str, Any]:
    code, body = admin_get(d, "/v1/status")
    assert code == 200, body
    return dict(json.loads(body))


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 1e6


def stat_fields(path: str) -> list[str]:
    """/proc/.../stat's fields from the third (state) on: field n of proc(5) is [n - 3]."""
    stat = Path(path).read_text()
    return stat[stat.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> dict[str, int]:
    """Clock ticks of CPU (utime + stime): the process itself (not its children), its main
    thread, and its children that have exited and been reaped (cutime + cstime)."""
    f = stat_fields(f"/proc/{pid}/stat")
    m = stat_fields(f"/proc/{pid}/task/{pid}/stat")
    return {
        "process": int(f[11]) + int(f[12]),
        "main_thread": int(m[11]) + int(m[12]),
        "reaped_children": int(f[13]) + int(f[14]),
    }


def idle_cpu(d: Llmd, seconds: float) -> dict[str, Any]:
    """The daemon's CPU over `seconds` with nothing sent to it, and its events meanwhile."""
    assert d.proc is not None
    pid = d.proc.pid
    since = time.time()
    t0, c0 = time.monotonic(), cpu_ticks(pid)
    time.sleep(seconds)
    t1, c1 = time.monotonic(), cpu_ticks(pid)
    took = t1 - t0
    pct = {k: 100 * (c1[k] - c0[k]) / CLK_TCK / took for k in c0}
    code, body = admin_get(d, "/v1/events?limit=1000")
    events = json.loads(body)["events"] if code == 200 else []
    return {
        "seconds": took,
        "cpu_s": (c1["process"] - c0["process"]) / CLK_TCK,
        "cpu_pct": pct["process"],
        "main_thread_pct": pct["main_thread"],
        # The GPU probe's nvidia-smi runs (the simulator's stand-in is a Python script).
        "reaped_children_pct": pct["reaped_children"],
        "events": [
            f"{e['kind']} {e['model'] or e['backend'] or ''}" for e in events if e["time"] >= since
        ],
    }


# Runs the daemon with a profiler (CPU time of its main thread) that SIGUSR1 starts and SIGUSR2
# stops, writing its stats to argv[1] (--profile).
PROFILED = """
import cProfile, signal, sys, time
from llmd import daemon
prof = cProfile.Profile(time.thread_time)
def stop(signum, frame):
    prof.disable()
    prof.dump_stats(sys.argv[1])
signal.signal(signal.SIGUSR1, lambda signum, frame: prof.enable())
signal.signal(signal.SIGUSR2, stop)
sys.exit(daemon.main(sys.argv[2:]))
"""


def start_profiled(d: Llmd, stats: Path) -> dict[str, float]:
    """start_timed, the daemon under PROFILED (not profiling until idle_profile says so)."""
    plain = llmdproc.llmd_argv
    llmdproc.llmd_argv = lambda: [sys.executable, "-c", PROFILED, str(stats)]
    try:
        return start_timed(d)
    finally:
        llmdproc.llmd_argv = plain


def idle_profile(d: Llmd, seconds: float, stats: Path, out: Path, title: str) -> None:
    """Profile the daemon (started by start_profiled) over `seconds` of idling; write the
    stats sorted by cumulative and by own time to `out`."""
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGUSR1)
    time.sleep(seconds)
    os.kill(d.proc.pid, signal.SIGUSR2)
    deadline = time.monotonic() + 10
    while not stats.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # the dump finishing
    text = io.StringIO()
    text.write(f"{title}\n\n")
    st = pstats.Stats(str(stats), stream=text)
    st.strip_dirs().sort_stats("cumulative").print_stats(60)
    st.sort_stats("tottime").print_stats(30)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text.getvalue())


def python_wall_s(code: str, repeats: int = 10) -> float:
    """Median wall time of `python -c code` (this interpreter, this environment)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=os.environ, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_profile(module: str, out: Path) -> dict[str, float]:
    """`python -X importtime -c 'import module'` sorted by cumulative time, written to `out`
    under the wall times of the interpreter alone, of it importing what any asyncio CLI needs,
    and of it importing `module`; those times in seconds."""
    walls = {
        "pass": python_wall_s("pass"),
        "import asyncio, argparse, json": python_wall_s("import asyncio, argparse, json"),
        f"import {module}": python_wall_s(f"import {module}"),
    }
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        capture_output=True,
        text=True,
        env=os.environ,
        check=True,
    )
    rows = []
    for line in r.stderr.splitlines():
        # "import time:  self [us] | cumulative | imported package", indented by depth
        if line.startswith("import time:") and "cumulative" not in line:
            own, cum, name = line.removeprefix("import time:").split("|", 2)
            rows.append((int(cum), int(own), name.rstrip()))
    rows.sort(reverse=True)
    lines = [f"wall time of `python -c CODE`, median of 10: {sys.executable}", ""]
    lines += [f"{t * 1e3:6.0f} ms  {code}" for code, t in walls.items()]
    lines += [
        "",
        f"python -X importtime -c 'import {module}': microseconds, cumulative and own",
        "",
    ]
    lines += [f"{cum:>9} {own:>9}  {name}" for cum, own, name in rows[:60]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return walls


def sims_alone(tmp: Path, d: Llmd, timeout: float = 60) -> float:
    """Seconds for the daemon's children, started as the daemon starts them (same catalogs,
    GPUs and environment, in parallel) but without llmd, to all answer GET /."""
    ports = llmdproc.free_ports(len(d.arrays["backend"]))
    procs = []
    t0 = time.perf_counter()
    for b, port in zip(d.arrays["backend"], ports, strict=True):
        env = {**d.env, **b["env"], "CUDA_VISIBLE_DEVICES": ",".join(map(str, b["gpus"]))}
        procs.append(spawn_sim(tmp, env, port=port, speed=None, name=b["name"])[0])
    try:
        waiting = set(ports)
        while waiting and time.perf_counter() - t0 < timeout:
            for port in list(waiting):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                        if r.status == 200:
                            waiting.discard(port)
                except OSError:
                    pass
            time.sleep(0.02)
        if waiting:
            raise RuntimeError(f"simulators on ports {sorted(waiting)} not up in {timeout}s")
        return time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def wait_pruned(d: Llmd, rows_before: int, timeout: float = 120) -> float:
    """Seconds until the admin status shows fewer stored requests than the store held."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if status_doc(d)["store"]["rows"] < rows_before:
            return time.perf_counter() - t0
        time.sleep(0.1)
    raise RuntimeError(f"the first prune did not finish in {timeout}s")


def http_post(
    d: Llmd, path: str, body: dict[str, Any] | None, admin: bool = False, method: str = "POST"
) -> None:
    """One request to the proxy port or the admin socket; raises unless it is answered 200."""
    conn: http.client.HTTPConnection = (
        UnixHTTPConnection(d.socket, 120)
        if admin
        else http.client.HTTPConnection("127.0.0.1", d.proxy_port, timeout=120)
    )
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        r = conn.getresponse()
        answer = r.read()
        if r.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {r.status}: {answer[:200]!r}")
    finally:
        conn.close()


def load_and_pin(d: Llmd, models: list[Spec], per_backend: int) -> list[str]:
    """Load the busiest `per_backend` models of each backend with a request each, then pin
    them (`llmctl pin`), so that none unloads while the daemon idles; their names."""
    chosen = []
    for b in sorted({s.backend for s in models}):
        chosen += [s for s in models if s.backend == b][:per_backend]
    for s in chosen:
        if s.embedding:
            http_post(d, "/api/embed", {"model": s.name, "input": "warm"})
        else:
            http_post(d, "/api/generate", {"model": s.name, "prompt": "warm", "stream": False})
        http_post(d, f"/v1/models/{urllib.parse.quote(s.name, safe='')}/pin", None, admin=True)
    return sorted(s.name for s in chosen)


def unpin(d: Llmd, names: list[str]) -> None:
    """`llmctl unpin` each: pins are kept in the store, which the next daemons start from."""
    for name in names:
        path = f"/v1/models/{urllib.parse.quote(name, safe='')}/pin"
        http_post(d, path, None, admin=True, method="DELETE")


def timed_cli(d: Llmd, args: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = d.llmctl(*args)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"llmctl {' '.join(args)}: {r.stderr}")
    return out


def timed_admin(d: Llmd, path: str, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        code, _ = admin_get(d, path)
        out.append(time.perf_counter() - t0)
        assert code == 200
    return out


def timed_metrics(d: Llmd, scrapes: int) -> tuple[list[float], int]:
    conn = http.client.HTTPConnection("127.0.0.1", d.proxy_port, timeout=30)
    out, size = [], 0
    try:
        for _ in range(scrapes):
            t0 = time.perf_counter()
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            body = r.read()
            out.append(time.perf_counter() - t0)
            assert r.status == 200
            size = len(body)
    finally:
        conn.close()
    return out, size


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Measure:
    """One row of the table."""

    key: str
    what: str
    value: float
    unit: str
    target: float | None = None  # the bound (smaller is better), if it sets one

    @property
    def ratio(self) -> float | None:
        return None if self.target is None else self.value / self.target

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "PASS" if self.value <= self.target else "MISS"


def fmt(v: float) -> str:
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}" if v < 1 else f"{v:.2f}"


def daemon_run(
    tmp: Path, models: list[Spec], backends: int, db: Path, retention_days: int = RETENTION_DAYS
) -> Llmd:
    """A daemon whose state directory holds `db` (moved there) as its store."""
    d = make_daemon(tmp, models, backends, retention_days)
    state = tmp / "state"
    state.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal"):
        src = Path(f"{db}{suffix}")
        if src.exists():
            src.rename(state / f"llmd.db{suffix}")
    return d


def learned_sources(d: Llmd) -> dict[str, int]:
    """How many models' keep-alives come from each source, as `llmctl models` shows them."""
    _, body = admin_get(d, "/v1/models")
    out: dict[str, int] = {}
    for r in json.loads(body)["models"]:
        out[r["keep_alive_source"]] = out.get(r["keep_alive_source"], 0) + 1
    return out


def idle_phase(
    d: Llmd, args: argparse.Namespace, name: str, log: Callable[[str], None]
) -> dict[str, Any]:
    """The daemon's idle CPU and RSS (after a few seconds for the last flush and status tick);
    with --profile, then a profiled idle window of the same length."""
    assert d.proc is not None
    time.sleep(3)
    log(f"  idle for {args.idle_seconds:g} s")
    out = idle_cpu(d, args.idle_seconds)
    out["rss_mb"] = rss_mb(d.proc.pid)
    if args.profile:
        log(f"  idle for {args.idle_seconds:g} s more, profiled")
        idle_profile(
            d,
            args.idle_seconds,
            d.workdir / "idle.prof",
            args.profile / f"idle-{name}.txt",
            f"llmd idle for {args.idle_seconds:g} s, {name} ({args.models} models), CPU time of"
            " the main thread (cProfile with time.thread_time)",
        )
    return out


def start(d: Llmd, args: argparse.Namespace) -> dict[str, float]:
    return start_profiled(d, d.workdir / "idle.prof") if args.profile else start_timed(d)


def measure(args: argparse.Namespace, tmp: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Everything, in the order of the module docstring."""
    out: dict[str, Any] = {}
    now = time.time()
    models = specs(args.models, args.backends)
    one = [
        Spec(s.rank, s.name, "b0", s.per_day, s.size, s.load_s, s.embedding, s.priority)
        for s in models
    ]
    year = tmp / "year.db"
    log(f"writing {args.days} days of history for {args.models} models")
    out["history"] = generate(year, models, args.days, now, args.seed)
    log(f"  {out['history']['requests']:,} requests in {out['history']['seconds']:.0f} s")

    log("store in-process: open and prune the year with the default retention")
    copy = tmp / "store-copy.db"
    shutil.copy(year, copy)
    out["store_startup"] = asyncio.run(store_startup(copy, time.time()))
    log(f"bytes per request: {args.growth_requests:,} requests through the store")
    out["growth"] = asyncio.run(
        growth(tmp / "growth.db", models, args.growth_requests, time.time(), args.seed)
    )
    out["vacuum"] = vacuum(copy)
    log(f"retention: {args.bounded_days} more days, a prune after each")
    out["bounded"] = asyncio.run(bounded(copy, models, args.bounded_days, time.time(), args.seed))
    for suffix in ("", "-wal"):
        Path(f"{copy}{suffix}").unlink(missing_ok=True)

    log("keep-alive decisions in-process, on the year's store")
    probe = make_daemon(tmp / "cfg", models, args.backends)
    probe.write_config()
    cfg = llmd_config.load(probe.config_path)
    out["decision"] = asyncio.run(decision_times(year, cfg, models, time.time(), args.repeats))

    log("the children alone (simulators, no llmd): how long they take to start")
    out["sims_alone_s"] = sims_alone(tmp / "cfg", probe)
    cleanup(probe)
    probe = make_daemon(tmp / "cfg1", one, 1)
    out["sims_alone_one_s"] = sims_alone(tmp / "cfg1", probe)
    cleanup(probe)
    if args.profile:
        out["import_s"] = {
            "llmd.cli": import_profile("llmd.cli", args.profile / "import-llmctl.txt"),
            "llmd.daemon": import_profile("llmd.daemon", args.profile / "import-llmd.txt"),
        }

    log("daemon on the year's store, retention_days = 366: startup and RSS")
    d = daemon_run(tmp / "year-kept", models, args.backends, year, retention_days=366)
    try:
        kept = start_timed(d)
        assert d.proc is not None
        kept["rss_mb"] = rss_mb(d.proc.pid)
        kept["rows"] = status_doc(d)["store"]["rows"]
        kept["sources"] = learned_sources(d)
        d.stop()
    finally:
        cleanup(d)
    out["year_kept"] = kept
    year = d.workdir / "state" / "llmd.db"

    log(f"daemon on the year's store, default retention, {args.backends} backends")
    d = daemon_run(tmp / "main", models, args.backends, year)
    try:
        t0 = time.perf_counter()
        run: dict[str, Any] = {"startup": start(d, args)}
        assert d.proc is not None
        pid = d.proc.pid
        run["rss_mb_started"] = rss_mb(pid)
        run["sources"] = learned_sources(d)
        if not run["sources"].get("adaptive"):
            raise RuntimeError(f"no keep-alive learned from the store: {run['sources']}")
        if args.days > RETENTION_DAYS:  # else there is nothing to prune
            wait_pruned(d, kept["rows"])
        run["pruned_after_s"] = time.perf_counter() - t0
        run["rows_after_prune"] = status_doc(d)["store"]["rows"]
        run["loaded"] = load_and_pin(d, models, 2)
        log(f"  loaded {', '.join(run['loaded'])}; timing llmctl and /metrics")
        run["status_cli_s"] = timed_cli(d, ["status"], args.repeats)
        run["models_cli_s"] = timed_cli(d, ["models"], args.repeats)
        run["status_admin_s"] = timed_admin(d, "/v1/status", args.repeats)
        run["models_admin_s"] = timed_admin(d, "/v1/models", args.repeats)
        run["status_bytes"] = len(admin_get(d, "/v1/status")[1])
        run["metrics_s"], run["metrics_bytes"] = timed_metrics(d, args.scrapes)
        run["rss_mb_measured"] = rss_mb(pid)
        run["idle"] = idle_phase(d, args, f"{args.backends}-backends", log)
        unpin(d, run["loaded"])
        d.stop()
        log(f"  {args.restarts} restarts on the pruned store")
        run["restarts"] = []
        for _ in range(args.restarts):
            run["restarts"].append(start_timed(d))
            run["restarts"][-1]["rss_mb"] = rss_mb(d.proc.pid)
            d.stop()
    finally:
        cleanup(d)
    out["main"] = run

    log("daemon with 1 backend and every model, on the pruned store: idle")
    steady = tmp / "steady.db"
    shutil.copy(d.workdir / "state" / "llmd.db", steady)
    d = daemon_run(tmp / "one", one, 1, steady)
    try:
        single: dict[str, Any] = {"startup": start(d, args)}
        single["loaded"] = load_and_pin(d, one, 2)
        single["idle"] = idle_phase(d, args, "1-backend", log)
        d.stop()
    finally:
        cleanup(d)
    out["one_backend"] = single
    return out


# The table, in order: key -> (what, unit, the target or None); {b}: backends.
ROWS: dict[str, tuple[str, str, float | None]] = {
    "status_cli_ms": ("`llmctl status`, the command", "ms", 50.0),
    "status_admin_ms": ("`GET /v1/status` on the admin socket", "ms", 50.0),
    "models_cli_ms": ("`llmctl models`, the command", "ms", None),
    "models_admin_ms": ("`GET /v1/models` on the admin socket", "ms", None),
    "metrics_ms_p50": ("`GET /metrics`, median", "ms", 10.0),
    "metrics_ms_p99": ("`GET /metrics`, p99", "ms", 10.0),
    "metrics_kib": ("`/metrics` page", "KiB", None),
    "decision_cold_ms": ("keep-alive decision, first of a day, slowest model", "ms", 1.0),
    "decision_warm_ms": ("keep-alive decision, slowest model", "ms", 1.0),
    "startup_s": ("startup, year's store, {b} backends (`/readyz` 200)", "s", 2.0),
    "startup_admin_s": ("the same, admin socket answering", "s", 2.0),
    "sims_alone_s": ("the {b} simulators alone, started in parallel", "s", None),
    "pruned_after_s": ("the same startup, first prune done", "s", None),
    "startup_year_kept_s": ("startup, year kept (retention 366 days)", "s", 2.0),
    "startup_year_kept_admin_s": ("the same, admin socket answering", "s", 2.0),
    "startup_steady_s": ("startup, pruned store (steady state), median", "s", 2.0),
    "startup_one_s": ("startup, 1 backend, pruned store", "s", 2.0),
    "sims_alone_one_s": ("the 1 simulator alone", "s", None),
    "store_open_s": ("store open, year's file (in-process)", "s", None),
    "store_prune_s": ("first prune of the year (in-process)", "s", None),
    "store_year_mb": ("store, a year of history", "MB", None),
    "store_pruned_open_mb": ("after the prune: file + WAL, open", "MB", None),
    "store_used_mb": ("after the prune: pages in use", "MB", None),
    "store_vacuum_mb": ("then VACUUM (llmd does not run one)", "MB", None),
    "store_vacuum_s": ("the VACUUM's time", "s", None),
    "store_bounded_mb": ("then more days, a prune after each", "MB", None),
    "bytes_per_request": ("store growth per request", "B", None),
    "rss_mb_started": ("RSS after startup, {b} backends", "MB", 60.0),
    "rss_mb_4": ("RSS after the measurements and idle, {b} backends", "MB", 60.0),
    "rss_mb_year_kept": ("RSS, year kept, {b} backends", "MB", 60.0),
    "rss_mb_1": ("RSS after idle, 1 backend", "MB", 60.0),
    "idle_cpu_pct_4": ("idle CPU, {b} backends", "% core", 0.2),
    "idle_main_pct_4": ("of which the event loop's thread", "% core", None),
    "idle_smi_pct_4": ("nvidia-smi runs (children, not counted)", "% core", None),
    "idle_cpu_pct_1": ("idle CPU, 1 backend", "% core", 0.2),
    "idle_main_pct_1": ("of which the event loop's thread", "% core", None),
}


def values(out: dict[str, Any]) -> dict[str, float]:
    """Each row's value from a run's numbers."""
    run, st, one, kept = out["main"], out["store_startup"], out["one_backend"], out["year_kept"]
    dec, idle4, idle1 = out["decision"], run["idle"], one["idle"]
    ms, mb, med = 1e3, 1e6, statistics.median
    last = out["bounded"][-1] if out["bounded"] else st["after"]
    return {
        "status_cli_ms": med(run["status_cli_s"]) * ms,
        "status_admin_ms": med(run["status_admin_s"]) * ms,
        "models_cli_ms": med(run["models_cli_s"]) * ms,
        "models_admin_ms": med(run["models_admin_s"]) * ms,
        "metrics_ms_p50": med(run["metrics_s"]) * ms,
        "metrics_ms_p99": pct(run["metrics_s"], 99) * ms,
        "metrics_kib": run["metrics_bytes"] / 1024,
        "decision_cold_ms": dec["cold_ms_max"],
        "decision_warm_ms": dec["warm_ms_max"],
        "startup_s": run["startup"]["ready_s"],
        "startup_admin_s": run["startup"]["admin_s"],
        "sims_alone_s": out["sims_alone_s"],
        "pruned_after_s": run["pruned_after_s"],
        "startup_year_kept_s": kept["ready_s"],
        "startup_year_kept_admin_s": kept["admin_s"],
        "startup_steady_s": med(r["ready_s"] for r in run["restarts"]),
        "startup_one_s": one["startup"]["ready_s"],
        "sims_alone_one_s": out["sims_alone_one_s"],
        "store_open_s": st["open_s"],
        "store_prune_s": st["prune_s"],
        "store_year_mb": st["before"]["file_bytes"] / mb,
        "store_pruned_open_mb": st["bytes_while_open_after_prune"] / mb,
        "store_used_mb": st["after"]["used_bytes"] / mb,
        "store_vacuum_mb": out["vacuum"]["file_bytes"] / mb,
        "store_vacuum_s": out["vacuum"]["seconds"],
        "store_bounded_mb": last["file_bytes"] / mb,
        "bytes_per_request": out["growth"]["bytes_per_request"],
        "rss_mb_started": run["rss_mb_started"],
        "rss_mb_4": idle4["rss_mb"],
        "rss_mb_year_kept": kept["rss_mb"],
        "rss_mb_1": idle1["rss_mb"],
        "idle_cpu_pct_4": idle4["cpu_pct"],
        "idle_main_pct_4": idle4["main_thread_pct"],
        "idle_smi_pct_4": idle4["reaped_children_pct"],
        "idle_cpu_pct_1": idle1["cpu_pct"],
        "idle_main_pct_1": idle1["main_thread_pct"],
    }


def measures(out: dict[str, Any], args: argparse.Namespace) -> list[Measure]:
    """The table's rows from a run's numbers."""
    v = values(out)
    return [
        Measure(key, what.format(b=args.backends), v[key], unit, target)
        for key, (what, unit, target) in ROWS.items()
    ]


def table(rows: list[Measure]) -> str:
    lines = ["| measure | value | target | verdict | ratio |", "|---|---|---|---|---|"]
    for m in rows:
        target = f"{fmt(m.target)} {m.unit}" if m.target is not None else "-"
        ratio = f"{m.ratio:.2f}" if m.ratio is not None else "-"
        lines.append(f"| {m.what} | {fmt(m.value)} {m.unit} | {target} | {m.verdict} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--days", type=int, default=365, help="days of history to write (365)")
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--repeats", type=int, default=20, help="llmctl and decision timings (20)")
    ap.add_argument("--scrapes", type=int, default=50, help="/metrics timings (50)")
    ap.add_argument("--growth-requests", type=int, default=100_000)
    ap.add_argument("--bounded-days", type=int, default=5)
    ap.add_argument("--restarts", type=int, default=3, help="steady-state startups (3)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", type=Path, metavar="OUT")
    ap.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also profile each idle daemon for --idle-seconds more (cProfile, CPU time) and the "
        "imports of llmctl and llmd (-X importtime); sorted text into DIR",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    if args.models < args.backends or args.backends < 1:
        ap.error("--models must be at least --backends, and --backends at least 1")
    command = "python " + shlex.join(
        ["bench/scale.py", *(argv if argv is not None else sys.argv[1:])]
    )
    tmp = Path(tempfile.mkdtemp(prefix="llmd-scale-"))
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", file=sys.stderr, flush=True)

    try:
        out = measure(args, tmp, log)
        rows = measures(out, args)
    except Exception as e:  # a measurement that could not be taken: say which and why
        import traceback

        traceback.print_exc()
        print(f"scale: a measurement could not be taken: {e}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    took = time.perf_counter() - started
    h = out["history"]
    print(f"`{command}`")
    print()
    print(
        f"{args.models} models on {args.backends} backends, {args.days} days of history "
        f"({h['requests']:,} requests, {h['requests_per_day']:,.0f} a day; "
        f"{h['events']:,} events), "
        f"run took {took:.0f} s"
    )
    print()
    print(table(rows))
    print()
    for m in rows:
        if m.target is not None:
            target = f"target {fmt(m.target)} {m.unit}"
            print(f"{m.verdict} {m.what}: {fmt(m.value)} {m.unit}, {target} ({m.ratio:.2f}x)")
    if args.json:
        doc = {
            "command": command,
            "args": vars(args) | {"json": str(args.json)},
            "seconds": took,
            "measures": {
                m.key: {
                    "what": m.what.strip(),
                    "value": m.value,
                    "unit": m.unit,
                    "target": m.target,
                    "verdict": m.verdict,
                    "ratio": m.ratio,
                }
                for m in rows
            },
            "raw": out,
        }
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
