"""llmd's own answers on the proxy port: ProxyError, in Ollama's or OpenAI's JSON shape."""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from llmd.backends import Backends
from llmd.process import RETRY_AFTER_S, Child, State

# A client's malformed request or body, as aiohttp reports it.
BAD_BODY = (HttpProcessingError, RequestPayloadError)


class ProxyError(Exception):
    """An error llmd itself answers, in the caller's API shape."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def compact_json(obj: Any) -> str:
    """JSON as Go's encoding/json writes it (and so Ollama): no spaces after separators, and
    <, >, & escaped."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).translate(_GO_ESCAPES)


_GO_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def json_response(body: Any, status: int = 200, **kw: Any) -> web.Response:
    """A JSON answer in Ollama's compact form."""
    return web.json_response(body, status=status, dumps=compact_json, **kw)


def error_response(request: web.Request, e: ProxyError) -> web.Response:
    """Ollama's error shape on native paths; OpenAI's on /v1, as Ollama itself answers; and
    FastAPI's on /infer, the task router llmd stands in for (llmd.infer)."""
    body: dict[str, Any]
    if request.path == "/infer":
        body = {"detail": e.message}
    elif request.path.startswith("/v1/"):
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            429: "rate_limit_error",
        }.get(e.status, "api_error")
        body = {"error": {"message": e.message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": e.message}
    return json_response(body, status=e.status, headers=e.headers)


def no_backend(
    backends: Backends, child: Child | None = None, missing: dict[str, str] | None = None
) -> ProxyError:
    """503 for a request no backend can take: why this child cannot, or which did not answer."""
    if child is None:
        if not missing:
            return ProxyError(503, "no backend is running", {"Retry-After": str(RETRY_AFTER_S)})
        names = ", ".join(f"{n} ({why})" for n, why in missing.items())
        waits = [c.retry_after_s() for c in backends.children.values()]
        retry = str(min(waits, default=RETRY_AFTER_S))
        return ProxyError(503, f"no backend answered: {names}", {"Retry-After": retry})
    st = child.status()
    if child.state is State.UNRESPONSIVE:
        why = f"backend {child.name!r} is not answering ({st.state}"
    else:
        why = f"backend {child.name!r} is not running ({st.state}"
    if child.state is State.DRAINING:
        why += ": finishing its requests in flight before it restarts"
    elif st.error:
        why += f": {st.error}"
    why += ")"
    return ProxyError(503, why, {"Retry-After": str(child.retry_after_s())})


def not_started(child: Child, waited_s: float, model: str | None = None) -> ProxyError:
    """503 for a request that waited its backend's start_timeout for the backend to come up.

    `model`: the request's model, when the backend was awaited because it may have it."""
    st = child.status()
    state = f"{st.state}: {st.error}" if st.error else st.state
    who = f"backend {child.name!r}"
    if model is not None:
        who = f"model {model!r} is not on any backend listed so far; {who}, which may have it,"
    return ProxyError(
        503,
        f"{who} did not become ready within its start_timeout ({waited_s:g}s) of this "
        f"request's arrival: it is {state}",
        {"Retry-After": str(child.retry_after_s())},
    )


def unreadable(e: BaseException) -> ProxyError:
    """400 for a body that cannot be read as sent (bad chunking or content encoding)."""
    why = " ".join(str(getattr(e, "message", "") or e.__cause__ or e).split())
    return ProxyError(400, f"cannot read the request body: {why}", {"Connection": "close"})


def format_time(t: float) -> str:
    """RFC 3339 in local time with an offset, as Ollama writes times."""
    return dt.datetime.fromtimestamp(t).astimezone().isoformat()


def parse_time(s: Any) -> float:
    if not isinstance(s, str):
        return 0.0
    try:
        # Go writes nanoseconds; Python parses at most microseconds.
        s = re.sub(r"(\.\d{6})\d+", r"\1", s).replace("Z", "+00:00")
        return dt.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0
