"""Issue 9 on the proxy path: broken streams, 400s for bad input, body memory, client aborts."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import httpx
import ollama
import openai
import psutil
import pytest
from llmdproc import Factory, Llmd, wait_for

TINY = "tiny:1m"
MIB = 1024**2


def post(url: str, raw: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url, data=raw, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read().split(b"\n")[0] or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def load(d: Llmd, model: str = TINY) -> None:
    status, _ = post(
        d.url + "/api/generate",
        json.dumps({"model": model, "prompt": "", "stream": False}).encode(),
    )
    assert status == 200


def requests_total(d: Llmd) -> dict[tuple[str, str], float]:
    """llmd_requests_total by (endpoint, status)."""
    with urllib.request.urlopen(d.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out: dict[tuple[str, str], float] = {}
    for m in re.finditer(r"^llmd_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (labels["endpoint"], labels["status"])
        out[key] = out.get(key, 0) + float(m.group(2))
    return out


# -- item 7: a stream cut by the child ends with an error the client raises ------------------------


def test_sse_stream_cut_by_killed_child_raises_in_openai_client(
    daemon: Factory, figures: Any
) -> None:
    """A /v1 stream whose child is SIGKILLed mid-stream ends with an error event the openai
    client raises as APIError, not with a silent end."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.5"}).start()  # about 100 tokens/s
    load(d)
    [pid] = d.child_pids()
    chunks: list[Any] = []
    with closing(openai.OpenAI(base_url=d.url + "/v1", api_key="x", max_retries=0)) as c:
        stream = c.chat.completions.create(
            model=TINY,
            messages=[{"role": "user", "content": "tell me a long story"}],
            max_tokens=2000,
            stream=True,
        )
        with pytest.raises(openai.APIError) as e:
            for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 10:
                    os.kill(pid, signal.SIGKILL)
    assert "failed mid-stream" in str(e.value.message)
    assert all(ch.choices[0].finish_reason is None for ch in chunks if ch.choices)
    figures.add(
        "mid-stream child death",
        tried=1,
        handled=1,
        note=f"openai: {len(chunks)} chunks then APIError",
    )


def test_ndjson_stream_cut_by_killed_child_raises_in_ollama_client(
    daemon: Factory, figures: Any
) -> None:
    """A native stream whose child is SIGKILLed mid-stream ends with an error line the ollama
    client raises as ResponseError."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.5"}).start()
    load(d)
    [pid] = d.child_pids()
    parts: list[Any] = []
    with closing(ollama.Client(host=d.url)) as c, pytest.raises(ollama.ResponseError) as e:
        for part in c.chat(
            model=TINY,
            messages=[{"role": "user", "content": "tell me a long story"}],
            options={"num_predict": 2000},
            stream=True,
        ):
            parts.append(part)
            if len(parts) == 10:
                os.kill(pid, signal.SIGKILL)
    assert "failed mid-stream" in e.value.error
    assert not any(p.done for p in parts)
    figures.add(
        "mid-stream child death", tried=1, handled=1, note=f"ollama: {len(parts)} parts then error"
    )


# -- item 8: 400, not 500, for input llmd reads --------------------------------------------------

DEEP = b'{"model": "tiny:1m", "prompt": "x", "options": ' + b"[" * 3000 + b"]" * 3000 + b"}"


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/api/generate", DEEP),
        ("/v1/chat/completions", DEEP),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"num_ctx": 1e309}}'),
        ("/api/chat", b'{"model": "tiny:1m", "messages": [], "options": {"num_ctx": -1e309}}'),
        (
            "/v1/chat/completions",
            b'{"model": "tiny:1m", "messages": [], "options": {"num_ctx": 1e309}}',
        ),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"num_ctx": NaN}}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"num_ctx": 1e300}}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"num_gpu": "all"}}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"num_batch": true}}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": {"use_mmap": 1}}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "x", "options": [1]}'),
        ("/api/embed", b'{"model": "tiny:1m", "input": "x", "options": "big"}'),
        ("/api/generate", b'{"model": "tiny:1m", "prompt": "", "keep_alive": "9999999999999h"}'),
    ],
)
def test_bad_input_llmd_reads_is_400_in_the_callers_shape(
    daemon: Factory, path: str, raw: bytes
) -> None:
    """Deep nesting, non-finite or out-of-range runner options and wrong option types get 400
    in the caller's API shape (Ollama's on /api, OpenAI's on /v1), and nothing loads."""
    d = daemon().start()
    status, body = post(d.url + path, raw)
    assert status == 400, body
    if path.startswith("/v1/"):
        assert body["error"]["type"] == "invalid_request_error"
        assert isinstance(body["error"]["message"], str)
    else:
        assert isinstance(body["error"], str)
    assert d.model(TINY)["state"] == "unloaded"


def raw_exchange(port: int, data: bytes, *, read_first: bool = False) -> bytes:
    """Send raw bytes, read what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        s.settimeout(3)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
                if read_first and b"\r\n\r\n" in got:
                    break
        except TimeoutError:
            pass
        return got


def test_expect_continue_over_limit_is_refused_before_continuing(daemon: Factory) -> None:
    """`Expect: 100-continue` with a Content-Length over proxy.max_body_size gets 413 at once,
    never `100 Continue`."""
    d = daemon(sections={"proxy": {"max_body_size": "1MiB"}}).start()
    head = (
        "POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Expect: 100-continue\r\nContent-Length: {2 * MIB}\r\n\r\n"
    ).encode()
    got = raw_exchange(d.proxy_port, head, read_first=True)
    assert got.startswith(b"HTTP/1.1 413"), got[:200]
    assert b"100 Continue" not in got
    # Under the limit, the client is told to go on.
    small = head.replace(str(2 * MIB).encode(), b"100")
    assert raw_exchange(d.proxy_port, small, read_first=True).startswith(b"HTTP/1.1 100")


def test_chunked_body_over_limit_gets_413_while_still_sending(daemon: Factory) -> None:
    """A chunked body that grows past proxy.max_body_size gets 413, which the client reads,
    rather than a reset connection."""
    d = daemon(sections={"proxy": {"max_body_size": "1MiB"}}).start()

    def body() -> Iterator[bytes]:
        yield b'{"model": "tiny:1m", "prompt": "'
        for _ in range(64):
            yield b"x" * 65536

    with httpx.Client(timeout=30) as c:
        r = c.post(d.url + "/api/generate", content=body())
    assert r.status_code == 413 and "max_body_size" in r.json()["error"]


MALFORMED = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
]


def test_malformed_http_is_one_debug_line_not_a_traceback(daemon: Factory) -> None:
    """Malformed HTTP gets 400 and one short log line each, no ERROR and no traceback."""
    d = daemon().start()
    before = len(d.logs().splitlines())
    for raw in MALFORMED:
        got = raw_exchange(d.proxy_port, raw)
        assert re.match(rb"HTTP/1\.[01] 4\d\d ", got), (raw[:60], got[:200])
    time.sleep(0.5)
    new = d.logs().splitlines()[before:]
    assert not [x for x in new if "ERROR" in x or "Traceback" in x], "\n".join(new)
    assert sum("bad HTTP request" in x for x in new) == len(MALFORMED), "\n".join(new)


# -- item 9: memory held by concurrent large bodies ---------------------------------------------


def test_concurrent_large_bodies_have_bounded_memory(daemon: Factory, figures: Any) -> None:
    """Eight concurrent 32 MiB bodies keep llmd's RSS near its base plus proxy.body_memory
    (128 MiB) plus twice proxy.max_body_size (32 MiB), with room for the allocator; llmd
    answers none of them with a 5xx but a 503 for a body that waited too long for room."""
    d = daemon().start()
    load(d)
    assert d.proc is not None
    proc = psutil.Process(d.proc.pid)
    base = proc.memory_info().rss
    peak = base
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    prompt = "x" * (32 * MIB - 200)  # one word: cheap for the simulator to answer
    raw = json.dumps({"model": TINY, "prompt": prompt, "stream": False}).encode()
    assert 31 * MIB < len(raw) <= 32 * MIB
    results: list[tuple[int, str]] = []

    def send() -> None:
        with httpx.Client(timeout=120) as c:
            r = c.post(d.url + "/api/generate", content=raw)
            results.append((r.status_code, r.text[:200]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    senders = [threading.Thread(target=send) for _ in range(8)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    done.set()
    sampler.join()
    grew = (peak - base) / MIB
    ok = [s for s, _ in results if s == 200]
    busy = [s for s, text in results if s == 503 and "proxy.body_memory" in text]
    figures.add(
        "8 x 32 MiB bodies",
        tried=8,
        handled=len(ok) + len(busy),
        failures=8 - len(ok) - len(busy),
        note=f"RSS base {base / MIB:.0f} MiB, peak +{grew:.0f} MiB, {len(busy)} waited too long",
    )
    assert len(ok) + len(busy) == 8, results
    assert grew < 128 + 2 * 32 + 96, f"RSS grew {grew:.0f} MiB over its base {base / MIB:.0f} MiB"


def test_body_waiting_too_long_for_memory_gets_503(daemon: Factory) -> None:
    """While other bodies hold proxy.body_memory, a body that does not fit waits up to
    proxy.body_wait, then gets 503 with Retry-After in the caller's shape; once they are
    done, it is served."""
    d = daemon(sections={"proxy": {"body_memory": "1MiB", "body_wait": "1s"}}).start()
    size = 900 * 1024
    raw = json.dumps({"model": TINY, "prompt": "x" * (size - 60), "stream": False}).encode()
    head = (
        f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", d.proxy_port), timeout=30) as slow:
        slow.sendall(head + raw[:1000])  # holds its share while the rest is "on its way"
        time.sleep(0.5)
        t0 = time.monotonic()
        status, body = post(d.url + "/v1/chat/completions", raw.replace(b'"prompt"', b'"p"'))
        assert status == 503, body
        assert "proxy.body_memory" in body["error"]["message"]
        assert time.monotonic() - t0 >= 0.9
        slow.sendall(raw[1000:])
        assert slow.recv(100).startswith(b"HTTP/1.1 200")
    status, body = post(d.url + "/api/generate", raw)
    assert status == 200, body


# -- item 12: a client abort is 499, not a backend failure -------------------------------------


def test_client_abort_is_counted_499(daemon: Factory) -> None:
    """Streams the client aborts are counted as status 499 in llmd_requests_total, never 502
    or 200."""
    d = daemon(sim_env={"OLLAMA_SIM_SPEED": "0.05"}).start()  # 10 tokens/s
    load(d)
    base = requests_total(d)
    n = 6
    for i in range(n):
        req = urllib.request.Request(
            d.url + "/api/generate",
            data=json.dumps(
                {"model": TINY, "prompt": f"abort {i}", "options": {"num_predict": 50}}
            ).encode(),
        )
        r = urllib.request.urlopen(req, timeout=30)
        r.readline()
        r.close()
        wait_for(lambda: d.model(TINY)["in_flight"] == 0, timeout=10, what="in_flight 0")

    def counted() -> dict[str, float]:
        now = requests_total(d)
        return {
            s: now.get(("/api/generate", s), 0) - base.get(("/api/generate", s), 0)
            for s in ("200", "499", "502")
        }

    wait_for(lambda: sum(counted().values()) >= n, timeout=10, what="requests counted")
    assert counted() == {"200": 0, "499": n, "502": 0}


@pytest.fixture(autouse=True)
def _quiet_httpx() -> Iterator[None]:
    level = logging.getLogger("httpx").level
    logging.getLogger("httpx").setLevel(logging.WARNING)
    yield
    logging.getLogger("httpx").setLevel(level)
