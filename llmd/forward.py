"""Forwarding a request to a child and its answer back, byte for byte, and recording it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from llmd import logs
from llmd.answers import BAD_BODY, ProxyError, compact_json, unreadable
from llmd.bodies import BodyHold
from llmd.derived import Rewrite
from llmd.lifecycle import Lease
from llmd.process import Child
from llmd.store import RequestRecord

# Its lines are the proxy port's, under the name they had before proxy.py was split.
log = logging.getLogger("llmd.proxy")

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}
# What a child has no business seeing: the client's credentials for llmd (a proxy key), its
# cookies, and forwarding claims nobody checked. X-Forwarded-* is matched by prefix.
PRIVATE_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "forwarded"})
TAIL_BYTES = 4096
# A body goes to the child in slices this big, so that the socket's send buffer never holds a
# second copy of a large one.
UPLOAD_SLICE = 256 * 1024
# What llmd_requests_total counts for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499
# The counters of an answer's final record, in one pass over its tail (the last of each wins).
_COUNTERS = re.compile(
    rb'"(load_duration|prompt_eval_count|eval_count|prompt_tokens|completion_tokens)"\s*:\s*(\d+)'
)

RecordFn = Callable[[RequestRecord], None]


def child_session() -> aiohttp.ClientSession:
    """The one HTTP client llmd talks to its children with (proxied requests and its own calls):
    connections kept alive and unlimited in number (the scheduler bounds them); bodies passed
    on as the child wrote them (no decompression: the client asked for its encoding, and the
    Content-Length must stay true); and no cookie jar, since a cookie one client's answer set
    must never ride along with another client's request (and the jar's filtering of every
    request's cookies costs time on the hot path)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
    )


class Forwarder:
    """Sends requests on to children and streams their answers back, recording each inference."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        record: RecordFn,
        draining: Callable[[], bool],
    ) -> None:
        self._session = session
        self._record = record
        self._draining = draining  # whether a cancellation is the proxy's shutdown

    async def forward(
        self,
        request: web.Request,
        child: Child,
        data: Any,
        lease: Lease | None,
        t0: float,
        queued_s: float = 0.0,
        rewrite: Rewrite | None = None,
        path: str | None = None,
        upstream_error: Callable[[int, bytes], ProxyError] | None = None,
    ) -> web.StreamResponse:
        """Send the request to the child and stream its answer back (through `rewrite`, if
        given: the length then changes, so the answer goes chunked). `path`: the child's path,
        if not the request's; `upstream_error`: what to answer instead of the child's error
        (status >= 400), given its status and the start of its body."""
        headers = _pass_headers(request.headers, PRIVATE_HEADERS)
        if isinstance(data, Upload):
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(data.size)
            data = data.payload(request.method)
        status = 502
        ttfb: float | None = None
        tail = Tail()
        streamed = False
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method, child.url + (path or request.path_qs), data=data, headers=headers
            ) as up:
                status = up.status
                if upstream_error is not None and status >= 400:
                    err = upstream_error(status, await up.content.read(TAIL_BYTES))
                    status = err.status
                    raise err
                ctype = up.headers.get("Content-Type", "")
                streamed = "ndjson" in ctype or "event-stream" in ctype
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in _pass_headers(up.headers, frozenset()).items():
                    resp.headers.add(k, v)
                if up.content_length is not None and rewrite is None:
                    resp.content_length = up.content_length
                resp.headers["X-Accel-Buffering"] = "no"
                await resp.prepare(request)
                chunks = up.content.iter_any().__aiter__()
                while True:
                    try:
                        chunk = await chunks.__anext__()
                    except StopAsyncIteration:
                        break
                    except (aiohttp.ClientError, TimeoutError) as e:
                        status = 502
                        await _end_broken(request, resp, up, child.name, e)
                        return resp
                    if ttfb is None:
                        ttfb = time.time() - t0
                    tail.add(chunk)
                    out = chunk if rewrite is None else rewrite.feed(chunk)
                    if out:
                        await resp.write(out)
                if rewrite is not None and (rest := rewrite.flush()):
                    await resp.write(rest)
                await resp.write_eof()
                return resp
        except asyncio.CancelledError:
            # Cancelled by aiohttp when the client went away, or by drain() at shutdown.
            status = 503 if self._draining() and not client_gone(request) else CLIENT_CLOSED
            raise
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
            if client_gone(request):
                # Writing to the client failed (aiohttp's ClientConnectionResetError is a
                # ClientError too): a client abort, not a backend failure.
                status = CLIENT_CLOSED
                log.debug("%s %s: client went away: %r", request.method, request.path, e)
                return resp if resp is not None else web.Response(status=CLIENT_CLOSED)
            # The client's body may have failed on its way through, rather than the child.
            bad = request.content.exception()
            err = unreadable(bad) if isinstance(bad, BAD_BODY) else _backend_error(child.name, e)
            status = err.status
            if resp is not None and resp.prepared:  # too late for an error status
                log.warning("%s %s: %s", request.method, request.path, err.message)
                resp.force_close()
                return resp
            raise err from None
        finally:
            if lease is not None:
                self.record(
                    lease.model.name,
                    request.path,
                    status,
                    t0,
                    ttfb,
                    lease.waited_for_load,
                    lease.load_s,
                    tail.bytes(),
                    queued_s=queued_s,
                    streamed=streamed,
                )

    def record(
        self,
        model: str,
        endpoint: str,
        status: int,
        t0: float,
        ttfb: float | None,
        waited: bool,
        load_s: float | None,
        tail: bytes,
        *,
        queued_s: float = 0.0,
        streamed: bool = False,
    ) -> None:
        """Record one request; token counts and load time come from its answer's tail."""
        counts = _counters(tail)
        load_ns = counts.get("load_duration")
        self._record(
            RequestRecord(
                time=t0,
                model=model,
                endpoint=endpoint,
                status=status,
                ttfb_s=ttfb,
                duration_s=time.time() - t0,
                waited_for_load=waited,
                load_duration_s=load_s
                if load_s is not None
                else (load_ns / 1e9 if load_ns else None),
                prompt_tokens=counts.get("prompt_eval_count", counts.get("prompt_tokens")),
                eval_tokens=counts.get("eval_count", counts.get("completion_tokens")),
                request_id=logs.request_id.get(),
                queued_s=queued_s,
                streamed=streamed,
            )
        )


def _pass_headers(headers: CIMultiDictProxy[str], private: frozenset[str]) -> CIMultiDict[str]:
    """The headers to pass on: without hop-by-hop ones, those the sender's Connection names
    (RFC 9110 7.6.1) and the private ones."""
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        low = k.lower()
        if low in HOP_BY_HOP or low in named or low in private:
            continue
        if private and low.startswith("x-forwarded-"):
            continue
        out.add(k, v)
    return out


class Upload:
    """A JSON body on its way to a child: a large one is sent in slices and freed, with its
    share of proxy.body_memory, as soon as the child has it all."""

    def __init__(self, data: bytes, hold: BodyHold | None) -> None:
        self._data = data
        self._hold = hold
        self.size = len(data)

    def payload(self, method: str) -> bytes | AsyncIterator[memoryview]:
        """What to give aiohttp as the request data (the bytes themselves if small)."""
        data, self._data = self._data, b""
        # aiohttp may resend an idempotent request's data on a stale connection: only a POST
        # gets the one-shot iterator.
        if len(data) <= UPLOAD_SLICE or method != "POST":
            return data
        return self._slices(data)

    async def _slices(self, data: bytes) -> AsyncIterator[memoryview]:
        try:
            view = memoryview(data)
            for i in range(0, len(data), UPLOAD_SLICE):
                yield view[i : i + UPLOAD_SLICE]
        finally:
            del data
            if self._hold is not None:
                self._hold.release()


def client_gone(request: web.Request) -> bool:
    """The client's connection is closed or closing."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _backend_error(name: str, e: BaseException) -> ProxyError:
    """The answer for a child that failed before or while answering."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return ProxyError(
            503, f"backend {name!r} is unreachable: {e.os_error}", {"Retry-After": "5"}
        )
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return ProxyError(502, f"backend {name!r} closed the connection")
    if isinstance(e, TimeoutError):
        return ProxyError(503, f"backend {name!r} did not answer in time", {"Retry-After": "5"})
    return ProxyError(502, f"backend {name!r} failed: {e}")


async def _end_broken(
    request: web.Request,
    resp: web.StreamResponse,
    up: aiohttp.ClientResponse,
    name: str,
    e: BaseException,
) -> None:
    """End a response whose child failed after the status line went out, so that clients
    raise: a last error line (NDJSON, as Ollama does), an error event (SSE), else a cut."""
    log.warning("%s %s: backend %s failed mid-stream: %s", request.method, request.path, name, e)
    if isinstance(e, TimeoutError):
        why = "it did not answer in time"
    elif isinstance(e, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        why = "its connection closed before the answer was complete"
    else:
        why = str(e)
    msg = f"backend {name!r} failed mid-stream: {why}"
    ctype = up.headers.get("Content-Type", "")
    last: dict[str, Any]
    if "ndjson" in ctype:
        await _write_quietly(resp, compact_json({"error": msg}).encode() + b"\n")
    elif "event-stream" in ctype:
        if request.path == "/v1/messages":  # Anthropic's error event
            last = {"type": "error", "error": {"type": "api_error", "message": msg}}
            event = b"event: error\n"
        elif request.path == "/v1/responses":  # the Responses API's error event
            last = {"type": "error", "code": "api_error", "message": msg, "param": None}
            event = b"event: error\n"
        else:  # openai-python raises APIError on a data event with an "error" key
            last = {"error": {"message": msg, "type": "api_error", "param": None, "code": None}}
            event = b""
        await _write_quietly(resp, event + b"data: " + compact_json(last).encode() + b"\n\n")
    else:
        # A plain body with a Content-Length: closing the connection short of it is the only
        # way to tell the client it is incomplete.
        resp.force_close()


async def _write_quietly(resp: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        await resp.write(data)


def _counters(tail: bytes) -> dict[str, int]:
    """Token counts and load time from the end of a response (the final done record)."""
    return {name.decode(): int(n) for name, n in _COUNTERS.findall(tail)}


class Tail:
    """The last TAIL_BYTES (at least) of a streamed answer, for its final record's counters:
    chunks are kept as they come and joined only when more than twice that is held, not
    copied on every chunk."""

    __slots__ = ("_parts", "_size")

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, chunk: bytes) -> None:
        self._parts.append(chunk)
        self._size += len(chunk)
        if self._size > 2 * TAIL_BYTES:
            kept = self.bytes()
            self._parts, self._size = [kept], len(kept)

    def bytes(self) -> bytes:
        return b"".join(self._parts)[-TAIL_BYTES:]
