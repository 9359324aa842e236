"""Issue 9 item 3: file descriptors and connections are bounded, idle and slow clients are cut,
and a repeated log line cannot flood the log."""

from __future__ import annotations

import json
import logging
import re
import resource
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from llmdproc import STARTED, Llmd, cleanup, llmd_argv, make_llmd, wait_for

from llmd.connlimit import AUTO_MAX, RESERVE_FDS, connection_cap
from llmd.logfilter import RepeatFilter

TINY = "tiny:1m"


@pytest.fixture
def made(tmp_path: Path) -> Iterator[list[Llmd]]:
    daemons: list[Llmd] = []
    yield daemons
    for d in daemons:
        cleanup(d)


def start_limited(d: Llmd, soft: int, hard: int) -> Llmd:
    """Llmd.start, with the open-file limit a default systemd unit gives (soft, hard)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    d.write_config()
    d.log_path = d.workdir / f"llmd-{int(time.time() * 1000)}.log"
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            [*llmd_argv(), "--config", str(d.config_path)],
            env=d.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
        )
    STARTED.append(d)
    d.wait_ready(60)
    return d


def generate(d: Llmd, timeout: float = 60) -> int:
    req = urllib.request.Request(
        d.url + "/api/generate",
        data=json.dumps({"model": TINY, "prompt": "hi", "stream": False}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as r:
        r.read()
        return int(r.status)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    try:
        out = fn()
    except Exception as e:
        out = e
    return time.monotonic() - t0, out


def open_idle(port: int, n: int) -> list[socket.socket]:
    """n connections that send nothing, as an attacker (or a leaky client pool) holds them."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(30)
        try:
            s.connect(("127.0.0.1", port))
        except OSError:
            s.close()
            break
        socks.append(s)
    return socks


@pytest.mark.parametrize(
    ("soft", "hard"),
    [(1024, 20000), (1024, 1024)],
    ids=["soft-1024-raisable", "hard-1024"],
)
def test_idle_connections_do_not_starve_the_daemon(
    tmp_path: Path, made: list[Llmd], figures: Any, soft: int, hard: int
) -> None:
    """With the default soft limit of 1024 (raisable or not), 1,100 idle connections to the proxy
    leave `llmctl status`, a real request and the GPU probe working, and the log small."""
    d = make_llmd(tmp_path)
    made.append(d)
    start_limited(d, soft, hard)
    assert generate(d) == 200
    log_before = d.log_path.stat().st_size
    socks = open_idle(d.proxy_port, 1100)
    try:
        time.sleep(3)  # the accept loop, and a GPU probe or two, run with them all open
        t_status, status = timed(lambda: d.llmctl("status", "--json", timeout=60))
        t_req, code = timed(lambda: generate(d))
        time.sleep(3)
        log_growth = d.log_path.stat().st_size - log_before
        doc = json.loads(status.stdout) if isinstance(status, subprocess.CompletedProcess) else {}
        conns = doc.get("proxy", {}).get("connections", {})
        note = (
            f"soft {soft}/hard {hard}: {len(socks)} idle conns, llmctl status {t_status:.2f}s, "
            f"request {t_req:.2f}s ({code}), log +{log_growth // 1024} KiB, "
            f"open {conns.get('open')}/{conns.get('max')}, evicted {conns.get('evicted')}, "
            f"refused {conns.get('refused')}"
        )
        print(note)
        ok = isinstance(status, subprocess.CompletedProcess) and status.returncode == 0
        ok = ok and code == 200 and t_status < 10 and t_req < 10 and log_growth < 256 * 1024
        figures.add("descriptor limit", tried=1, handled=int(ok), failures=int(not ok), note=note)
        assert isinstance(status, subprocess.CompletedProcess) and status.returncode == 0, status
        assert code == 200, code
        assert t_status < 10 and t_req < 10, note
        assert log_growth < 256 * 1024, note
        assert "Too many open files" not in d.logs()
        assert doc["gpu"].get("error") is None, doc["gpu"]
        assert conns["open"] <= conns["max"]
        if hard == 1024:
            assert conns["max"] == (1024 - RESERVE_FDS) // 2
            assert conns["evicted"] + conns["refused"] > 0
        else:
            assert doc["proxy"]["open_file_limit"] == hard
            assert "raised the open-file limit from 1024 to 20000" in d.logs()
    finally:
        for s in socks:
            s.close()


def test_cap_refuses_new_connections_when_all_are_busy(tmp_path: Path, made: list[Llmd]) -> None:
    """At proxy.max_connections with every connection mid-request, a new one gets a prompt 503
    with Retry-After, and is served again once one frees up."""
    d = make_llmd(tmp_path, sections={"proxy": {"max_connections": 4, "body_timeout": "60s"}})
    made.append(d)
    d.start()
    busy = []
    for _ in range(4):
        s = socket.create_connection(("127.0.0.1", d.proxy_port), timeout=30)
        s.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )
        busy.append(s)
    wait_for(lambda: d.status()["proxy"]["connections"]["busy"] == 4, timeout=30, what="4 busy")
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", d.proxy_port), timeout=30) as s:
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _read_all(s)
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b"Retry-After: 1" in answer and b"proxy.max_connections = 4" in answer
    assert time.monotonic() - t0 < 10
    busy.pop().close()
    wait_for(lambda: d.status()["proxy"]["connections"]["open"] == 3, timeout=30, what="free")
    assert d.get("/api/version")["version"]
    assert d.status()["proxy"]["connections"]["refused"] >= 1
    for s in busy:
        s.close()


def _read_all(s: socket.socket, limit: float = 30) -> bytes:
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
    return out


def _closed_within(s: socket.socket, limit: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes s (None if it did not within limit); trickle sends a
    byte of `trickle` every 0.3 s meanwhile."""
    t0 = time.monotonic()
    s.settimeout(0.3)
    i = 0
    while time.monotonic() - t0 < limit:
        try:
            if s.recv(65536) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            pass
        except ConnectionResetError:
            return time.monotonic() - t0
        if i < len(trickle):
            try:
                s.sendall(trickle[i : i + 1])
            except OSError:
                return time.monotonic() - t0
            i += 1
    return None


def test_idle_and_slow_clients_are_cut(tmp_path: Path, made: list[Llmd], figures: Any) -> None:
    """An idle keep-alive connection is closed after idle_timeout, headers trickled byte by byte
    after header_timeout, a stalled body after body_timeout; a slow but steady body is served."""
    d = make_llmd(
        tmp_path,
        sections={"proxy": {"idle_timeout": "3s", "header_timeout": "2s", "body_timeout": "2s"}},
    )
    made.append(d)
    d.start()
    port = d.proxy_port
    results = {}
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        results["idle"] = _closed_within(s, 20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        head = b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: 1\r\n" * 20
        results["header"] = _closed_within(s, 20, trickle=head)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        results["body"] = _closed_within(s, 20)
    print(results)
    figures.add(
        "slow clients",
        tried=3,
        handled=sum(v is not None for v in results.values()),
        failures=sum(v is None for v in results.values()),
        note=", ".join(
            f"{k} cut after {v:.1f}s" if v else f"{k} never cut" for k, v in results.items()
        ),
    )
    assert results["idle"] is not None and 2.5 < results["idle"] < 10, results
    assert results["header"] is not None and 1.5 < results["header"] < 10, results
    assert results["body"] is not None and 1.5 < results["body"] < 10, results
    # Slow but steady: a body sent in pieces over 4 s, never pausing 2 s, is served.
    body = json.dumps({"model": TINY, "prompt": "hi", "stream": False}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(
            b"POST /api/generate HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        step = max(1, len(body) // 8)
        for i in range(0, len(body), step):
            time.sleep(0.5)
            s.sendall(body[i : i + step])
        assert _read_all(s).startswith(b"HTTP/1.1 200")
    timed_out = d.status()["proxy"]["connections"]["timed_out"]
    assert timed_out["idle"] >= 1 and timed_out["header"] >= 1 and timed_out["body"] >= 1
    assert "Traceback" not in d.logs()


@pytest.mark.parametrize(
    ("configured", "nofile", "cap", "warns"),
    [
        (None, 1024, (1024 - RESERVE_FDS) // 2, False),
        (None, 20000, AUTO_MAX, False),
        (None, 65536, AUTO_MAX, False),
        (None, 260, 16, False),
        (100, 1024, 100, False),
        (10000, 65536, 10000, False),
        (1000, 1024, (1024 - RESERVE_FDS) // 2, True),
    ],
)
def test_connection_cap(configured: int | None, nofile: int, cap: int, warns: bool) -> None:
    """max_connections "auto" leaves a reserve and two descriptors per connection, at most
    AUTO_MAX; a configured cap the limit cannot hold is lowered, with a warning naming it."""
    got, why = connection_cap(configured, nofile)
    assert got == cap
    assert (why is not None) is warns
    if why:
        assert "proxy.max_connections" in why and "LimitNOFILE" in why


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _record(msg: str, *args: Any, level: int = logging.ERROR, name: str = "x") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    ("events", "passed", "summaries"),
    [
        # (time, message template, argument) per record
        ([(0, "a %s", 1)] * 5, 5, []),
        ([(0, "a %s", 1)] * 1000, 5, []),
        ([(0, "a %s", i) for i in range(1000)], 1000, []),
        ([(0, "a %s", 1)] * 100 + [(61, "a %s", 1)], 6, ["a 1 ... repeated 95 more"]),
        ([(0, "a %s", 1)] * 100 + [(61, "a %s", 2)], 6, ["a 1 ... repeated 95 more"]),
        ([(0, "a %s", 1)] * 10 + [(0, "b %s", 1)] * 10, 10, []),
        ([(t, "a %s", 0) for t in range(0, 600, 15)], 40, []),
        # info lines are not limited (nor tracked)
        ([(0, "a %s", 1, logging.INFO)] * 100, 100, []),
    ],
)
def test_repeat_filter(events: list[tuple[Any, ...]], passed: int, summaries: list[str]) -> None:
    """The same warning or error passes 5 times a minute; the rest is held back and summarised
    in one "... repeated N more times" line when its minute is over (or at exit); different
    lines, and info lines, all pass."""
    clock = Clock()
    emitted: list[logging.LogRecord] = []
    f = RepeatFilter(emitted.append, clock=clock)
    n = 0
    for t, msg, arg, *level in events:
        clock.t = t
        n += f.filter(_record(msg, arg, level=level[0] if level else logging.ERROR))
    assert n == passed
    assert len(emitted) == len(summaries)
    for rec, want in zip(emitted, summaries, strict=True):
        assert want in rec.getMessage() and rec.levelno == logging.ERROR
    f.flush()
    counts = [re.search(r"repeated (\d+) more", r.getMessage()) for r in emitted]
    assert sum(int(m[1]) for m in counts if m) == len(events) - passed
