"""A hung child is found within seconds and replaced; restart and reload drain a child first."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from llmdproc import Factory, Llmd, call, pull, wait_for

TINY = "tiny:1m"


def backend_pid(d: Llmd, name: str) -> int | None:
    return next(b["pid"] for b in d.status()["backends"] if b["name"] == name)


def backend_state(d: Llmd, name: str) -> str:
    return str(next(b["state"] for b in d.status()["backends"] if b["name"] == name))


def replaced(d: Llmd, name: str, old_pid: int) -> bool:
    b = next(b for b in d.status()["backends"] if b["name"] == name)
    return b["state"] == "running" and b["pid"] not in (None, old_pid)


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_stopped_child_is_declared_down_and_replaced_within_seconds(
    daemon: Factory, figures: Any
) -> None:
    """A SIGSTOPped child: /healthz goes 503 and new requests get a fast 503 with Retry-After
    within seconds, /api/tags never answers an empty list, and the child is replaced."""
    d = daemon().start()
    status, _, _, _ = call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})
    assert status == 200  # loaded, so that a request would otherwise be served at once
    [pid] = d.child_pids()
    done = threading.Event()
    healthz: list[tuple[float, int]] = []
    tags: list[tuple[float, int, Any]] = []
    gen: list[tuple[float, Future[tuple[int, dict[str, str], Any, float]]]] = []

    def poll_healthz() -> None:
        while not done.is_set():
            healthz.append((time.monotonic() - t0, call(d.url + "/healthz", timeout=30)[0]))
            time.sleep(0.1)

    def poll_tags() -> None:
        while not done.is_set():
            st, _, doc, took = call(d.url + "/api/tags", timeout=30)
            tags.append((time.monotonic() - t0 - took, st, doc))
            time.sleep(0.1)

    replaced_at: float | None = None
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(max_workers=64) as pool:
            pollers = [pool.submit(poll_healthz), pool.submit(poll_tags)]
            body = {"model": TINY, "prompt": "x", "stream": False}
            while time.monotonic() - t0 < 60 and replaced_at is None:
                gen.append(
                    (time.monotonic() - t0, pool.submit(call, d.url + "/api/generate", body))
                )
                if replaced(d, "b0", pid):
                    replaced_at = time.monotonic() - t0
                time.sleep(0.2)
            done.set()
            for p in pollers:
                p.result()
            results = [(sent, f.result()) for sent, f in gen]
    finally:
        done.set()
        resume(pid)
    healthz_down = next((t for t, st in healthz if st != 200), None)
    fast_503 = [
        sent + took
        for sent, (st, headers, _, took) in results
        if st == 503 and "Retry-After" in headers and took < 1.5
    ]
    empty_tags = sum(1 for _, st, doc in tags if st == 200 and not (doc or {}).get("models"))
    slowest = max(r[3] for _, r in results)
    figures.add(
        "hung child (SIGSTOP)",
        tried=len(results) + len(tags),
        handled=len(results) + len(tags) - empty_tags,
        failures=empty_tags,
        note=(
            f"/healthz non-200 after {healthz_down}s, first fast 503 after "
            f"{min(fast_503, default=None)}s, replaced after {replaced_at}s, "
            f"slowest request {slowest:.1f}s, {empty_tags} empty /api/tags of {len(tags)} "
            f"({sum(st == 503 for _, st, _ in tags)} answered 503)"
        ),
    )
    assert healthz_down is not None and healthz_down < 10, healthz
    assert fast_503 and min(fast_503) < 10, [(s, r[0], r[3]) for s, r in results]
    assert empty_tags == 0, tags
    assert all(st in (200, 503) for _, st, _ in tags), tags
    assert replaced_at is not None and replaced_at < 30
    # Requests caught on the hung child end when it is killed, not after a client-side timeout.
    assert slowest < 20
    assert {r[0] for _, r in results} <= {200, 502, 503}
    status, _, _, _ = call(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})
    assert status == 200


def test_lists_name_the_backend_that_did_not_answer(daemon: Factory) -> None:
    """With one of two children hung, /api/tags, /api/ps and /v1/models answer what the other
    child has and name the missing backend in X-LLMD-Warning, not a silently shorter list;
    /healthz answers 200 "degraded"."""
    # b1 stays hung (not replaced) for as long as the test looks at it.
    d = daemon(backends=2, backend_extra=[{}, {"probe_failures": 1000}]).start()
    pull(d, "phi3:mini", backend=1)
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})[0] == 200
    pid = backend_pid(d, "b1")
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=3) as pool:
            futures = {
                p: pool.submit(call, d.url + p) for p in ("/api/tags", "/api/ps", "/v1/models")
            }
            answers = {p: f.result() for p, f in futures.items()}
        # Still serving through b0: healthy enough to send requests to, and says what is not.
        status, _, doc, _ = call(d.url + "/healthz")
    finally:
        resume(pid)
    assert status == 200 and doc["status"] == "degraded" and doc["backends"]["b1"] != "running"
    for path, (status, headers, doc, _) in answers.items():
        assert status == 200, (path, status, doc)
        assert "b1" in headers.get("X-LLMD-Warning", ""), (path, headers)
    tags = answers["/api/tags"][2]
    assert TINY in {m["name"] for m in tags["models"]}  # b0's models are still listed
    assert TINY in {m["name"] for m in answers["/api/ps"][2]["models"]}
    assert TINY in {m["id"] for m in answers["/v1/models"][2]["data"]}


def test_lists_answer_503_when_no_child_answers(daemon: Factory) -> None:
    """With the only child hung, /api/tags, /api/ps and /v1/models answer 503 with Retry-After."""
    d = daemon(backend_extra=[{"probe_failures": 1000}]).start()
    [pid] = d.child_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: backend_state(d, "b0") != "running", timeout=15, what="b0 suspected")
        for path in ("/api/tags", "/api/ps", "/v1/models"):
            status, headers, doc, took = call(d.url + path)
            assert status == 503, (path, status, doc)
            assert int(headers["Retry-After"]) >= 1
            assert took < 3
            assert "b0" in json.dumps(doc)
        status, headers, _, took = call(
            d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False}
        )
        assert status == 503 and int(headers["Retry-After"]) >= 1 and took < 3
    finally:
        resume(pid)
    # Continued, it answers its probes again and is trusted again without a restart.
    wait_for(lambda: backend_state(d, "b0") == "running", timeout=15, what="b0 running again")
    assert d.child_pids() == [pid]


def stream_lines(d: Llmd, n: int, started: threading.Event) -> list[dict[str, Any]]:
    """A native stream of n tokens, read to its end; `started` is set after the first line."""
    req = urllib.request.Request(
        d.url + "/api/generate",
        data=json.dumps({"model": TINY, "prompt": "long", "options": {"num_predict": n}}).encode(),
    )
    lines: list[dict[str, Any]] = []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            lines.append(json.loads(line))
            started.set()
    return lines


def test_restart_lets_a_stream_finish_then_replaces_the_child(
    daemon: Factory, figures: Any
) -> None:
    """`llmctl restart` with a stream in flight: the stream completes normally, then the child
    is restarted (a new pid); a request sent meanwhile waits for the new child and is served by
    it (up to the backend's start_timeout), rather than failing or reaching the old child."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.1"}).start()  # 20 tokens/s
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})[0] == 200
    [pid] = d.child_pids()
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        stream = pool.submit(stream_lines, d, 60, started)  # about 3 s
        assert started.wait(30)
        r = d.llmctl("restart", "b0")
        assert r.returncode == 0, r.stderr
        assert backend_state(d, "b0") == "draining"
        waiting = pool.submit(
            call, d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False}
        )
        lines = stream.result()
        status, _, doc, _ = waiting.result()
        pids_when_served = d.child_pids()
    assert status == 200, (status, doc)
    assert doc["done"] is True
    # Held through the drain and the restart: by the time it was answered the old child was gone.
    assert pids_when_served and pid not in pids_when_served
    complete = lines[-1].get("done") is True and not any("error" in x for x in lines)
    figures.add(
        "drain on restart/reload",
        tried=1,
        handled=int(complete),
        failures=int(not complete),
        note=f"llmctl restart: stream {'complete' if complete else 'cut'}, {len(lines)} lines",
    )
    assert complete, lines[-3:]
    assert len(lines) == 61
    wait_for(lambda: replaced(d, "b0", pid), timeout=30, what="a new child")
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False})[0] == 200


def test_reload_changing_a_backend_lets_a_stream_finish(daemon: Factory, figures: Any) -> None:
    """A reload that changes a backend with a stream in flight: the stream completes, then the
    child is restarted with its new settings."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.1"}).start()
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})[0] == 200
    [pid] = d.child_pids()
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        stream = pool.submit(stream_lines, d, 60, started)
        assert started.wait(30)
        d.arrays["backend"][0]["env"]["LLMD_TEST_CHANGED"] = "1"
        d.write_config()
        reload = pool.submit(d.llmctl, "reload")
        lines = stream.result()
        r = reload.result()
    assert r.returncode == 0, r.stderr
    assert "b0 restarted" in r.stdout
    complete = lines[-1].get("done") is True and not any("error" in x for x in lines)
    figures.add(
        "drain on restart/reload",
        tried=1,
        handled=int(complete),
        failures=int(not complete),
        note=f"llmctl reload: stream {'complete' if complete else 'cut'}, {len(lines)} lines",
    )
    assert complete, lines[-3:]
    wait_for(lambda: replaced(d, "b0", pid), timeout=30, what="a new child")


def test_restart_drain_is_bounded_by_shutdown_timeout(daemon: Factory) -> None:
    """A stream that never ends holds a restart back for daemon.shutdown_timeout, no longer."""
    d = daemon(
        sections={"daemon": {"shutdown_timeout": "4s"}},
        sim_env={"OLLAMA_SIM_FAULTS": "stall_stream=2"},
    ).start()
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})[0] == 200
    [pid] = d.child_pids()
    started = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        stream = pool.submit(stream_lines, d, 50, started)
        assert started.wait(30)
        t0 = time.monotonic()
        assert d.llmctl("restart", "b0").returncode == 0
        wait_for(lambda: replaced(d, "b0", pid), timeout=30, what="a new child")
        took = time.monotonic() - t0
        lines = stream.result()
    assert took >= 3.5  # it did wait for the stream
    assert "error" in lines[-1]  # the cut stream says so
