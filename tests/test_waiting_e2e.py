"""Requests wait through a child's start, restart and backoff (up to its start_timeout) instead
of failing at once; /readyz tells a load balancer when every backend can serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ollama
from llmdproc import Factory, Llmd, call, wait_for

TINY = "tiny:1m"


def proxy_answers(d: Llmd) -> bool:
    try:
        with urllib.request.urlopen(d.url + "/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def state(d: Llmd) -> str:
    return str(d.status()["backends"][0]["state"])


def readyz(d: Llmd) -> tuple[int, Any]:
    status, _, doc, _ = call(d.url + "/readyz")
    return status, doc


def test_request_sent_as_llmd_starts_waits_for_the_child(daemon: Factory) -> None:
    """A request sent as soon as the proxy port answers, while the child is still starting,
    waits and is served (the `ollama` client does not retry a 503), as do requests on other
    routes; /readyz is 503 naming the backend until the child runs and its models are listed,
    then 200."""
    d = daemon(backend_extra=[{"env": {"OLLAMA_SIM_FAULTS": "slow_start=3"}}])
    d.start(wait=False)
    wait_for(lambda: proxy_answers(d), timeout=20, what="the proxy port")
    status, doc = readyz(d)
    assert status == 503, doc
    assert doc["ready"] is False and set(doc["not_ready"]) == {"b0"}, doc
    assert doc["not_ready"]["b0"] in ("stopped", "starting"), doc
    t0 = time.monotonic()
    client = ollama.Client(host=d.url, timeout=60)
    with ThreadPoolExecutor(max_workers=3) as pool:
        # The other kinds of route wait too: a passthrough, model admin, a model's /v1 entry.
        others = [
            pool.submit(call, d.url + "/api/version"),
            pool.submit(call, d.url + "/api/show", {"model": TINY}),
            pool.submit(call, d.url + f"/v1/models/{TINY}"),
        ]
        try:
            answer = client.generate(model=TINY, prompt="hi")
        finally:
            client.close()
        took = time.monotonic() - t0
        answers = [f.result() for f in others]
    assert answer.done and answer.response
    assert took > 1  # it did wait for the child
    assert [a[0] for a in answers] == [200, 200, 200], answers
    assert answers[2][2]["id"] == TINY
    status, doc = readyz(d)
    assert status == 200, doc
    assert doc == {"ready": True, "backends": {"b0": "running"}, "waiting": 0}


def test_request_during_a_restart_after_a_crash_waits_and_is_served(daemon: Factory) -> None:
    """A request sent while a killed child is backing off or restarting waits for the new child
    and is served by it."""
    d = daemon(backend_extra=[{"env": {"OLLAMA_SIM_FAULTS": "slow_start=1"}}]).start()
    assert call(d.url + "/api/generate", {"model": TINY, "prompt": "", "stream": False})[0] == 200
    [pid] = d.child_pids()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: state(d) in ("backoff", "starting"), timeout=10, what="b0 restarting")
    status, doc = readyz(d)
    assert status == 503 and doc["not_ready"]["b0"].startswith(("backoff", "starting")), doc
    status, _, doc, took = call(
        d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False}
    )
    assert status == 200, doc
    assert doc["done"] is True
    assert took > 0.5  # held until the new child answered
    [new_pid] = d.child_pids()
    assert new_pid != pid


def test_child_that_never_gets_ready_gives_503_after_start_timeout(daemon: Factory) -> None:
    """A request for a child that does not come up waits its backend's start_timeout, then gets
    503 with Retry-After naming the backend, its state and the limit; on /v1 in OpenAI's shape."""
    d = daemon(
        models=[{"name": TINY, "backend": "b0"}],
        backend_extra=[{"start_timeout": "2s", "env": {"OLLAMA_SIM_FAULTS": "never_ready=1"}}],
    )
    d.start(wait=False)
    wait_for(lambda: proxy_answers(d), timeout=20, what="the proxy port")
    body = {"model": TINY, "prompt": "x", "stream": False}
    status, headers, doc, took = call(d.url + "/api/generate", body)
    assert status == 503, doc
    assert 1.5 < took < 5, took
    assert int(headers["Retry-After"]) >= 1
    message = doc["error"]
    assert message.startswith("backend 'b0' did not become ready within its start_timeout (2s)")
    assert "it is starting" in message or "it is backoff" in message, message
    # A model no listed backend has, while b0 (which may have it) does not come up.
    chat = {"model": "ghost:1b", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, doc, took = call(d.url + "/v1/chat/completions", chat)
    assert status == 503, doc
    assert 1.5 < took < 5, took
    assert int(headers["Retry-After"]) >= 1
    assert set(doc) == {"error"} and doc["error"]["type"] == "api_error", doc
    assert doc["error"]["message"].startswith(
        "model 'ghost:1b' is not on any backend listed so far; backend 'b0', which may have it, "
        "did not become ready within its start_timeout (2s)"
    ), doc
    status, doc = readyz(d)
    assert status == 503 and doc["ready"] is False and "b0" in doc["not_ready"], doc


def test_backend_given_up_on_still_fails_fast(daemon: Factory) -> None:
    """A backend that cannot start at all (FATAL) is not waited for: 503 at once."""
    d = daemon(
        models=[{"name": TINY, "backend": "b0"}],
        backend_extra=[{"command": ["ollama-not-installed", "serve"]}],
    ).start()
    status, headers, doc, took = call(
        d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False}
    )
    assert status == 503 and int(headers["Retry-After"]) >= 1, doc
    assert took < 1.5, took
    assert doc["error"].startswith("backend 'b0' is not running (fatal")
    status, doc = readyz(d)
    assert status == 503 and doc["not_ready"]["b0"].startswith("fatal: "), doc


def send_raw(d: Llmd, body: dict[str, Any]) -> socket.socket:
    """A generate request written to a socket whose answer nobody reads yet."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", d.proxy_port), timeout=10)
    s.sendall(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return s


def test_client_that_leaves_while_waiting_leaves_nothing_behind(daemon: Factory) -> None:
    """A client that disconnects while its request waits for a child is forgotten at once: the
    waiter count goes back to 0 and llmd keeps answering."""
    d = daemon(backend_extra=[{"env": {"OLLAMA_SIM_FAULTS": "never_ready=1"}}])
    d.start(wait=False)
    wait_for(lambda: proxy_answers(d), timeout=20, what="the proxy port")
    socks = [send_raw(d, {"model": TINY, "prompt": "x"}) for _ in range(3)]
    wait_for(lambda: readyz(d)[1]["waiting"] == 3, timeout=5, what="3 waiting")
    for s in socks:
        s.close()
    wait_for(lambda: readyz(d)[1]["waiting"] == 0, timeout=2, what="no one waiting")
    assert d.proc is not None and d.proc.poll() is None
    assert proxy_answers(d)
    assert call(d.url + "/healthz")[0] == 503  # answered: nothing runs yet
    status = d.status()
    assert status["backends"][0]["state"] in ("starting", "backoff")


def test_shutdown_answers_the_waiting_requests_at_once(daemon: Factory) -> None:
    """On SIGTERM a request waiting for a child gets 503 at once and llmd exits without
    waiting for it (nor for daemon.shutdown_timeout)."""
    d = daemon(
        sections={"daemon": {"shutdown_timeout": "20s"}},
        backend_extra=[{"env": {"OLLAMA_SIM_FAULTS": "never_ready=1"}}],
    )
    d.start(wait=False)
    wait_for(lambda: proxy_answers(d), timeout=20, what="the proxy port")
    with ThreadPoolExecutor(max_workers=1) as pool:
        waiting = pool.submit(
            call, d.url + "/api/generate", {"model": TINY, "prompt": "x", "stream": False}
        )
        wait_for(lambda: readyz(d)[1]["waiting"] == 1, timeout=5, what="1 waiting")
        t0 = time.monotonic()
        assert d.proc is not None
        d.proc.send_signal(signal.SIGTERM)
        status, _, doc, _ = waiting.result(timeout=10)
        assert d.proc.wait(15) == 0
    assert time.monotonic() - t0 < 8
    assert (status, doc) == (503, {"error": "llmd is shutting down"})
