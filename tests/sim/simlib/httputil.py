"""Request parsing and response writing with Ollama's (Go/gin) shapes and messages."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .config import Faults
from .gojson import first_value_error


class ApiError(Exception):
    """An error answer: HTTP status plus Ollama's message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(obj: Any) -> str:
    """Compact JSON like Go's encoding/json, which also escapes <, > and & (HTML-safe)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.translate(_GO_ESCAPES)


_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def json_response(obj: Any, status: int = 200) -> web.Response:
    """gin's c.JSON: application/json; charset=utf-8."""
    return web.Response(
        text=dumps(obj), status=status, content_type="application/json", charset="utf-8"
    )


def error_response(status: int, message: str) -> web.Response:
    """Ollama's native error body {"error": "..."}."""
    return json_response({"error": message}, status)


_GO_KIND = {
    bool: "bool",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
}


def go_kind(v: Any) -> str:
    """The JSON kind Go names in unmarshal errors."""
    return "null" if v is None else _GO_KIND.get(type(v), "value")


async def read_json(request: web.Request, go_type: str) -> dict[str, Any]:
    """Decode the body like gin's ShouldBindJSON; raise ApiError(400) with Go's messages."""
    raw = await request.read()
    text = raw.decode("utf-8", errors="replace")
    if not text.strip():
        # The native handlers check for io.EOF; the OpenAI middleware passes its text on.
        raise ApiError(400, "EOF" if request.path.startswith("/v1/") else "missing request body")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        err = first_value_error(text)
        if err is not None:
            raise ApiError(400, err) from None
        # Go's decoder reads the first value and never looks at what follows it.
        data, _ = json.JSONDecoder().raw_decode(text.lstrip(" \t\r\n"))
    if data is None:
        return {}  # Go decodes null into a struct as a no-op: an empty request
    if not isinstance(data, dict):
        raise ApiError(
            400, f"json: cannot unmarshal {go_kind(data)} into Go value of type {go_type}"
        )
    return data


def field(
    body: dict[str, Any], key: str, kinds: tuple[type, ...], go_type: str, go_field_type: str
) -> Any:
    """body[key] if absent/null or of an accepted type, else Go's unmarshal error."""
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, kinds) and not (isinstance(v, bool) and bool not in kinds):
        return v
    struct = go_type.split(".")[-1]
    raise ApiError(
        400,
        f"json: cannot unmarshal {go_kind(v)} into Go struct field {struct}.{key} "
        f"of type {go_field_type}",
    )


class StreamAborted(Exception):
    """The fail_stream fault ended a stream early."""


async def wait_for_disconnect(request: web.Request) -> None:
    """Block until the client goes away, then cancel the handler like a cancelled Go context.

    aiohttp 3.8 does not cancel handlers on disconnect, so this polls the transport."""
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            raise asyncio.CancelledError
        await asyncio.sleep(0.05)


class ChunkGate:
    """Counts the chunks of one response and applies the stall_stream / fail_stream faults."""

    def __init__(self, request: web.Request, faults: Faults) -> None:
        self.request = request
        self.faults = faults
        self.sent = 0

    async def before_chunk(self) -> None:
        """Stall until the client leaves, or raise StreamAborted (fail), once N chunks went out."""
        if self.faults.stall_stream >= 0 and self.sent >= self.faults.stall_stream:
            await wait_for_disconnect(self.request)
        if self.faults.fail_stream >= 0 and self.sent >= self.faults.fail_stream:
            raise StreamAborted
        self.sent += 1


class NdjsonStream:
    """An application/x-ndjson response, one JSON object per line (server/routes.go)."""

    def __init__(self, request: web.Request, faults: Faults | None = None) -> None:
        self.request = request
        self.resp = web.StreamResponse(status=200)
        self.resp.content_type = "application/x-ndjson"
        self.gate = ChunkGate(request, faults) if faults is not None else None

    async def start(self) -> None:
        """Send the headers."""
        await self.resp.prepare(self.request)

    async def send(self, obj: Any) -> None:
        """Write one line (after the fault gate, if any)."""
        if self.gate is not None:
            await self.gate.before_chunk()
        await self.resp.write((dumps(obj) + "\n").encode())

    async def send_raw(self, obj: Any) -> None:
        """Write one line bypassing the fault gate (the error line itself)."""
        await self.resp.write((dumps(obj) + "\n").encode())

    async def finish(self) -> web.StreamResponse:
        """End the chunked body."""
        await self.resp.write_eof()
        return self.resp


class SseStream:
    """A text/event-stream response of `data: {...}` events (middleware/openai.go)."""

    def __init__(self, request: web.Request, faults: Faults) -> None:
        self.request = request
        self.resp = web.StreamResponse(status=200)
        self.resp.content_type = "text/event-stream"
        self.gate = ChunkGate(request, faults)

    async def start(self) -> None:
        """Send the headers."""
        await self.resp.prepare(self.request)

    async def send(self, obj: Any) -> None:
        """Write one event (after the fault gate)."""
        await self.gate.before_chunk()
        await self.send_raw(obj)

    async def send_raw(self, obj: Any) -> None:
        """Write one event."""
        await self.resp.write(f"data: {dumps(obj)}\n\n".encode())

    async def done(self) -> None:
        """The closing `data: [DONE]` event."""
        await self.resp.write(b"data: [DONE]\n\n")

    async def finish(self) -> web.StreamResponse:
        """End the chunked body."""
        await self.resp.write_eof()
        return self.resp
