"""A seeded fuzzer: a few thousand malformed and hostile requests against a real llmd.

Every case is generated from one seed (LLMD_FUZZ_SEED, default 9; LLMD_FUZZ_N cases, default
3000), so a failure is reproducible by seed and case number. A 5xx fails the run unless the
child itself answered it: llmd passes a child's answer through with its own
`X-Accel-Buffering: no` header, which llmd's own error answers never carry.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from llmdproc import Llmd, cleanup, make_llmd
from yarl import URL

from llmd.bodies import BOOL_OPTIONS, INT_OPTIONS, check_runner_options

SEED = int(os.environ.get("LLMD_FUZZ_SEED", "9"))
N = int(os.environ.get("LLMD_FUZZ_N", "3000"))
CONCURRENCY = 8
TINY = "tiny:1m"
# Names management paths may use: none of them exists, so the fuzzer never deletes, copies
# over or pulls a model the run relies on.
GHOSTS = ["ghost:1", "nope", "x/y/z:q", "ghost" * 50, "", " ", "gh\u00f6st", "../../etc/passwd"]
INFERENCE = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
]
MANAGEMENT = ["/api/show", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"]
READS = ["/", "/healthz", "/metrics", "/api/tags", "/api/ps", "/api/version", "/v1/models"]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND", "X"]


@dataclass
class Case:
    """One request: over aiohttp's client, or raw bytes over a socket."""

    family: str
    method: str = "POST"
    path: str = "/api/generate"
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    raw: bytes | None = None
    half_close: bool = False  # raw: shut the write side after sending (a truncated body)
    abort: bool = False  # raw: go away after the first bytes of the answer (or none)


@dataclass
class Outcome:
    handled: bool
    why: str = ""


# -- values -----------------------------------------------------------------------------------


def deep(rng: random.Random) -> str:
    depth = rng.choice([64, 500, 999, 1000, 1001, 2000, 5000, 20000])
    inner = rng.choice(["", "1", '"x"', "{}"])
    if rng.random() < 0.5:
        return "[" * depth + inner + "]" * depth
    return '{"a":' * depth + (inner or "1") + "}" * depth


NUMBERS = [
    "1e309",
    "-1e309",
    "1e308",
    "1E400",
    "0.1e-400",
    "-0",
    "1" * 400,
    "1" * 5000,
    "NaN",
    "Infinity",
    "-Infinity",
    "9223372036854775808",
    "-9223372036854775809",
    "4096.7",
    "0",
    "-1",
]
STRINGS = [
    '""',
    '" "',
    '"\\u0000"',
    '"\\ud800"',
    '"\\udfff\\ud800"',
    '"' + "a" * 70000 + '"',
    '"-1"',
    '"5m"',
    '"1e9h"',
    '"9999999999999h"',
    '"0s"',
    '"\\n"',
    '"\u6a21\u578b"',
    '"tiny:1m"',
    '"TINY:1M"',
    '"tiny"',
]


def value(rng: random.Random) -> str:
    """Any JSON value text, hostile more often than not."""
    pick = rng.random()
    if pick < 0.3:
        return rng.choice(NUMBERS)
    if pick < 0.6:
        return rng.choice(STRINGS)
    if pick < 0.7:
        return deep(rng)
    return rng.choice(["true", "false", "null", "[]", "{}", "[1,2]", '{"a":1}', '[{"role":1}]'])


def options(rng: random.Random) -> str:
    keys = ["num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "num_predict"]
    if rng.random() < 0.2:
        return value(rng)
    items = [f'"{rng.choice(keys)}":{value(rng)}' for _ in range(rng.randint(1, 3))]
    return "{" + ",".join(items) + "}"


def messages(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return value(rng)
    one = rng.choice(
        [
            '{"role":"user","content":"hi"}',
            '{"role":' + value(rng) + ',"content":"hi"}',
            '{"role":"user","content":' + value(rng) + "}",
            '{"role":"user"}',
            value(rng),
        ]
    )
    return "[" + ",".join([one] * rng.randint(0, 3)) + "]"


def field_body(rng: random.Random, path: str) -> bytes:
    """A JSON object whose fields have the right names and, often, the wrong types."""
    fields: dict[str, str] = {}
    if rng.random() < 0.9:
        fields["model"] = rng.choice([json.dumps(TINY), json.dumps(TINY), value(rng)])
    if "chat" in path or "messages" in path:
        fields["messages"] = messages(rng)
    elif "embed" in path:
        fields["input"] = rng.choice(['"x"', '["a","b"]', value(rng)])
    else:
        fields["prompt"] = rng.choice(['"x"', '""', value(rng)])
    for name, make in (
        ("options", options),
        ("keep_alive", value),
        ("stream", value),
        ("max_tokens", value),
    ):
        if rng.random() < 0.5:
            fields[name] = make(rng)
    # The rare valid request is answered quickly: at most 3 tokens.
    fields.setdefault("options", '{"num_predict":3}')
    if rng.random() < 0.1:
        fields.setdefault("keep_alive", rng.choice(["0", '"0"', "-1", '"-1m"']))
    text = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    return text.encode("utf-8", "surrogatepass")


def bad_json(rng: random.Random) -> bytes:
    good = b'{"model":"tiny:1m","prompt":"x","options":{"num_predict":3}}'
    return rng.choice(
        [
            b"",
            b"   \n",
            b"null",
            b"[]",
            b'"tiny:1m"',
            b"42",
            b"{",
            b'{"model":',
            good[: rng.randint(1, len(good) - 1)],
            good + b"}",
            good + b"garbage",
            b"\xef\xbb\xbf" + good,
            b"\xff\xfe" + good,
            good.replace(b"x", b"\xff"),
            good.replace(b'"x"', b"'x'"),
            b'{"model":"tiny:1m",,}',
            b'{"model":"tiny:1m","model":7}',
            b"{" + b'"k":1,' * 20000 + b'"model":"tiny:1m"}',
            deep(rng).encode(),
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 300))),
            (
                '{"model":"tiny:1m","prompt":"x","options":{"num_ctx":' + rng.choice(NUMBERS) + "}}"
            ).encode(),
        ]
    )


# -- cases ------------------------------------------------------------------------------------


def case_json(rng: random.Random) -> Case:
    return Case(
        "bad JSON",
        path=rng.choice(INFERENCE + MANAGEMENT),
        method="POST",
        headers={"Content-Type": "application/json"},
        body=bad_json(rng),
    )


def case_fields(rng: random.Random) -> Case:
    path = rng.choice(INFERENCE)
    return Case(
        "field types",
        path=path,
        headers={"Content-Type": "application/json"},
        body=field_body(rng, path),
    )


def case_management(rng: random.Random) -> Case:
    path = rng.choice(MANAGEMENT)
    key = rng.choice(["model", "name", "source", "destination"])
    name = rng.choice([json.dumps(g) for g in GHOSTS] + [value(rng)])
    if name.strip('"') in (TINY, "tiny", "TINY:1M"):
        name = '"ghost:2"'
    body = f'{{"{key}":{name},"stream":false}}'.encode("utf-8", "surrogatepass")
    return Case(
        "management", path=path, method="DELETE" if path == "/api/delete" else "POST", body=body
    )


ODD_PATHS = [
    "/api//chat",
    "/api/chat/",
    "/API/CHAT",
    "/api/%63hat",
    "/api/chat%00",
    "/api/chat?x=%ff",
    "/api/../api/tags",
    "//api/tags",
    "/v1/models/" + "a" * 3000,
    "/v1/models/%2e%2e%2f%2e%2e",
    "/v1/models/tiny:1m",
    "/v1/models/%ff%fe",
    "/api/blobs/sha256:" + "0" * 64,
    "/api/blobs/../../etc/passwd",
    "/" + "x" * 5000,
    "/metrics?format=../../",
    "/healthz#frag",
    "/api/generate?stream=true",
    "/\u00fcber",
]


def case_methods(rng: random.Random) -> Case:
    path = rng.choice(INFERENCE + MANAGEMENT + READS + ODD_PATHS)
    method = rng.choice(METHODS)
    body = rng.choice([None, b"", b"{}", b'{"model":"ghost:1"}', bad_json(rng)])
    if path in ("/api/delete", "/api/copy", "/api/pull", "/api/push", "/api/create"):
        body = rng.choice([None, b"{}", b'{"model":"ghost:1"}'])  # never a real model
    return Case("methods and paths", method=method, path=path, body=body)


def case_headers(rng: random.Random) -> Case:
    path = rng.choice(INFERENCE + READS)
    headers = rng.choice(
        [
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
            {"Content-Type": "multipart/form-data; boundary=x"},
            {"Content-Encoding": "gzip"},
            {"Content-Encoding": "br"},
            {"Content-Encoding": "identity, gzip"},
            {"Expect": "100-continue"},
            {"Expect": "200-ok"},
            {"Authorization": "Bearer " + "k" * 5000},
            {"Authorization": "Basic \u00e9\u00e9"},
            {"Accept": "text/html"},
            {"Accept-Encoding": "gzip, br, zstd"},
            {"Connection": "Upgrade, X-Foo", "Upgrade": "websocket", "X-Foo": "1"},
            {"Transfer-Encoding": "gzip"},
            {"X-Forwarded-For": "1.2.3.4, " * 200},
            {"Cookie": "a=" + "b" * 6000},
            {f"X-H{i}": "v" for i in range(90)},
            {"Range": "bytes=0-1"},
            {"Host": "evil.example.com"},
            {"Host": "localhost:1"},
        ]
    )
    body = field_body(rng, path) if rng.random() < 0.7 else bad_json(rng)
    return Case(
        "headers", method=rng.choice(["POST", "GET"]), path=path, headers=headers, body=body
    )


RAW = [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffff\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n",
    b"GET / HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"G\xffT / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X: y\r\n" * 500 + b"\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"\r\n\r\n\r\n",
]


def case_raw(rng: random.Random) -> Case:
    if rng.random() < 0.7:
        raw = rng.choice(RAW)
    else:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))) + b"\r\n\r\n"
    return Case("raw HTTP", raw=raw)


def case_truncated(rng: random.Random) -> Case:
    path = rng.choice([*INFERENCE, "/api/show", "/api/blobs/sha256:" + "1" * 64])
    body = field_body(rng, path)
    cut = rng.randint(0, max(0, len(body) - 1))
    if rng.random() < 0.5:
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        raw = head.encode() + body[:cut]
    else:  # a chunked body that stops inside a chunk
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        raw = head.encode() + f"{len(body):x}\r\n".encode() + body[:cut]
    return Case("truncated bodies", raw=raw, half_close=True)


def case_abort(rng: random.Random) -> Case:
    path = rng.choice(["/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"])
    fields = '"messages":[{"role":"user","content":"hi"}]' if "chat" in path else '"prompt":"hi"'
    body = (
        '{"model":"tiny:1m","stream":true,' + fields + ',"max_tokens":40,'
        '"options":{"num_predict":40}}'
    ).encode()
    cut = rng.choice([len(body), len(body), len(body) // 2, 0])
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return Case("client aborts", raw=head.encode() + body[:cut], abort=True)


FAMILIES: list[tuple[float, Callable[[random.Random], Case]]] = [
    (0.2, case_json),
    (0.3, case_fields),
    (0.05, case_management),
    (0.12, case_methods),
    (0.1, case_headers),
    (0.15, case_raw),
    (0.08, case_truncated),
    (0.04, case_abort),
]


# The daemon requires a key: most requests carry it, so that they reach past the key check;
# the rest carry odd Authorization headers.
KEY = "fuzz-key-0123456789"
ODD_AUTH = [
    "",
    "Bearer",
    "Bearer ",
    "bearer " + KEY,
    "Bearer " + KEY + " extra",
    "Bearer " + KEY[:-1],
    "Bearer \u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9\u00e9",
    "Basic Zm9vOmJhcg==",
    "Bearer " + "k" * 10000,
    "Bearer\t" + KEY,
]


def cases(seed: int, n: int) -> Iterator[Case]:
    rng = random.Random(seed)
    weights = [w for w, _ in FAMILIES]
    makers = [m for _, m in FAMILIES]
    for _ in range(n):
        c = rng.choices(makers, weights)[0](rng)
        if c.raw is None and "Authorization" not in c.headers:
            auth = "Bearer " + KEY if rng.random() < 0.85 else rng.choice(ODD_AUTH)
            c.headers = {**c.headers, "Authorization": auth}
        yield _no_reload(c)


# Valid runner options that differ from the loaded runner's make the child reload the model,
# and Ollama's scheduler (which the simulator follows) waits for the model's other requests to
# finish first; under the fuzzer's unbroken traffic, each of which re-arms the runner, that wait
# can outlast the client. That is request scheduling (issue 11: llmd-owned queues, no reload
# thrash), not malformed input: such a request is sent for a model no backend has, so llmd
# still reads and validates all of it, and answers 404.
RELOAD_GHOST = "ghost-reload:1m"
RUNNER_KEYS = frozenset(INT_OPTIONS) | frozenset(BOOL_OPTIONS)


def _no_reload(c: Case) -> Case:
    if c.body is None:
        return c
    try:
        doc = json.loads(c.body)
    except (ValueError, RecursionError):
        return c
    if not (isinstance(doc, dict) and doc.get("model") == TINY):
        return c
    opts = doc.get("options")
    if not (isinstance(opts, dict) and RUNNER_KEYS & opts.keys()):
        return c
    try:
        check_runner_options(opts)
    except ValueError:
        return c  # llmd refuses it with 400 before any load: keep it as it is
    c.body = c.body.replace(json.dumps(TINY).encode(), json.dumps(RELOAD_GHOST).encode(), 1)
    return c


# -- sending ----------------------------------------------------------------------------------


def judge(status: int, headers: Any, text: str) -> Outcome:
    if status < 500:
        return Outcome(True)
    if headers.get("X-Accel-Buffering") == "no":
        return Outcome(True, f"child's own {status}")  # passed through, not llmd's
    return Outcome(False, f"llmd answered {status}: {text[:160]}")


async def send_http(session: aiohttp.ClientSession, base: str, c: Case) -> Outcome:
    url = URL(base + c.path, encoded=True) if "%" in c.path or ".." in c.path else base + c.path
    try:
        async with session.request(
            c.method, url, data=c.body, headers=c.headers, allow_redirects=False
        ) as r:
            text = (await r.read()).decode(errors="replace")
            return judge(r.status, r.headers, text)
    except (aiohttp.ClientError, ValueError) as e:
        # The client refused to send it (an invalid header for aiohttp) or llmd closed the
        # connection, which is a fine answer to garbage.
        return Outcome(True, f"no answer: {type(e).__name__}")


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})")


async def send_raw(port: int, c: Case) -> Outcome:
    assert c.raw is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(c.raw)
        await writer.drain()
        if c.half_close and writer.can_write_eof():
            writer.write_eof()
        if c.abort:
            if c.raw.endswith(b"}"):  # the whole body went: wait for the answer to begin
                await asyncio.wait_for(reader.read(1), 15)
            return Outcome(True, "aborted")
        try:
            got = await asyncio.wait_for(reader.read(65536), 15)
        except TimeoutError:
            return Outcome(False, "no answer in 15 s")
        m = STATUS_LINE.match(got)
        if m is None:
            return Outcome(True, "closed")
        status = int(m.group(1))
        head = got.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
        headers = {
            k.strip(): v.strip() for k, _, v in (x.partition(":") for x in head.split("\r\n")[1:])
        }
        return judge(status, headers, got.decode(errors="replace"))
    except ConnectionError:
        return Outcome(True, "reset")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def run_cases(d: Llmd, all_cases: list[Case]) -> list[Outcome]:
    sem = asyncio.Semaphore(CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:

        async def one(c: Case) -> Outcome:
            async with sem:
                if c.raw is not None:
                    return await send_raw(d.proxy_port, c)
                try:
                    return await send_http(session, d.url, c)
                except TimeoutError:
                    return Outcome(False, "no answer in 30 s")

        return await asyncio.gather(*(one(c) for c in all_cases))


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[Llmd]:
    d = make_llmd(
        tmp_path / "d",
        sections={
            "daemon": {"log_level": "info"},
            "proxy": {"max_body_size": "4MiB", "api_keys": [KEY]},
        },
    )
    try:
        yield d.start()
    finally:
        cleanup(d)


def test_fuzzed_requests_get_no_llmd_5xx_and_the_daemon_lives(fuzzed: Llmd, figures: Any) -> None:
    """A few thousand seeded malformed or hostile requests get no 5xx from llmd itself, no
    traceback in its log, and leave the daemon serving."""
    d = fuzzed
    all_cases = list(cases(SEED, N))
    t0 = time.monotonic()
    outcomes = asyncio.run(run_cases(d, all_cases))
    elapsed = time.monotonic() - t0
    by_family: dict[str, Counter[str]] = {}
    failures: list[str] = []
    for i, (c, o) in enumerate(zip(all_cases, outcomes, strict=True)):
        counts = by_family.setdefault(c.family, Counter())
        counts["tried"] += 1
        counts["handled" if o.handled else "failures"] += 1
        if o.why.startswith("child's"):
            counts["child 5xx"] += 1
        if not o.handled:
            what = c.raw[:80] if c.raw is not None else (c.method, c.path, (c.body or b"")[:80])
            failures.append(f"case {i} ({c.family}): {o.why}; {what!r}")
    for family, counts in sorted(by_family.items()):
        note = f"seed {SEED}"
        if counts["child 5xx"]:
            note += f", {counts['child 5xx']} 5xx from the child passed through"
        figures.add(
            f"fuzz: {family}",
            tried=counts["tried"],
            handled=counts["handled"],
            failures=counts["failures"],
            note=note,
        )
    # Still serving: health, a real request, the admin socket.
    assert d.proc is not None and d.proc.poll() is None, "llmd died"
    assert get_status(d.url + "/healthz") == 200
    assert d.llmctl("status").returncode == 0
    # Nothing the clients did is counted as a backend failure; their aborts are 499s.
    counted = requests_by_status(d)
    figures.add(
        "fuzz: requests counted",
        tried=sum(counted.values()),
        handled=sum(counted.values()) - counted["502"],
        failures=counted["502"],
        note=", ".join(f"{k}: {v}" for k, v in sorted(counted.items())),
    )
    assert counted["502"] == 0, counted
    # A child's own log lines come through llmd's log as "llmd.backend.NAME": its tracebacks
    # are the simulator's, not llmd's.
    lines = [x for x in d.logs().splitlines() if "Traceback" in x]
    tracebacks = [x for x in lines if "llmd.backend." not in x]
    figures.add(
        "fuzz: total time",
        tried=len(all_cases),
        handled=len(all_cases) - len(failures),
        failures=len(failures),
        note=f"{elapsed:.1f} s; tracebacks: {len(tracebacks)} llmd's, "
        f"{len(lines) - len(tracebacks)} the child's",
    )
    assert not failures, "\n".join(failures[:30])
    assert not tracebacks, d.logs()[-5000:]


def get_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as r:
        return int(r.status)


def requests_by_status(d: Llmd) -> Counter[str]:
    """llmd_requests_total summed by status."""
    req = urllib.request.Request(d.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for labels, n in re.findall(r"^llmd_requests_total\{(.*)\} (\S+)$", text, re.M):
        status = re.search(r'status="(\d+)"', labels)
        out[status.group(1) if status else "?"] += int(float(n))
    return out
