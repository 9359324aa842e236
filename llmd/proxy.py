"""The proxy port: Ollama's native API and /v1, routed by model, streamed without buffering."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from llmd.backends import Backends
from llmd.bodies import (
    BodyBudget,
    BodyHold,
    check_runner_options,
    decode_json,
    dump_json,
    parse_json,
)
from llmd.childapi import ChildAPIError, Pulled
from llmd.config import Config, normalize_model
from llmd.lifecycle import Lease, Lifecycle
from llmd.metrics import CONTENT_TYPE
from llmd.models import LoadError, MState
from llmd.ollama_errors import (
    go_duration,
    json_syntax_error,
    keep_alive_seconds,
    missing_body,
    model_not_found,
    not_an_object,
)
from llmd.process import RETRY_AFTER_S, Child, State
from llmd.store import RequestRecord

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware  # a Protocol in aiohttp >= 3.9

log = logging.getLogger("llmd.proxy")

# Endpoints that run a model: they take a lease (load if cold, keep-alive after).
NATIVE_INFERENCE = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings")
OPENAI_INFERENCE = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
)
# Endpoints that name a model but do not run it: routed to its owner or the first backend.
MODEL_ADMIN = ("/api/show", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")
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
# Names the backends a merged list (/api/tags, /api/ps, /v1/models) had to leave out.
WARNING_HEADER = "X-LLMD-Warning"
# How often a merged list looks whether a child it waits for has been found hung meanwhile.
GATHER_RECHECK_S = 0.25
# A body goes to the child in slices this big, so that the socket's send buffer never holds a
# second copy of a large one.
UPLOAD_SLICE = 256 * 1024
# Chunked bodies (no Content-Length) take their share of proxy.body_memory in steps this big.
BODY_STEP = 1024 * 1024
# What llmd_requests_total counts for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499
# A client's malformed request or body, as aiohttp reports it.
BAD_BODY = (HttpProcessingError, RequestPayloadError)
# The longest duration Go's time.Duration holds (int64 nanoseconds), in seconds.
MAX_DURATION_S = (2**63 - 1) / 1e9
# Health checks answer GET and HEAD without an API key; any other method needs one.
OPEN_PATHS = frozenset({"/", "/healthz"})
# Paths an inference key may use: they run or describe a model. Model management (pull, push,
# create, copy, delete, blobs) and any other write need a key from proxy.api_keys.
INFERENCE_PATHS = frozenset((*NATIVE_INFERENCE, *OPENAI_INFERENCE, "/api/show"))
OPEN, INFERENCE, MANAGE = "open", "inference", "manage"
_COUNTERS = {
    name: re.compile(rf'"{name}"\s*:\s*(\d+)')
    for name in (
        "load_duration",
        "prompt_eval_count",
        "eval_count",
        "prompt_tokens",
        "completion_tokens",
    )
}


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
    """Ollama's error shape on native paths; OpenAI's on /v1, as Ollama itself answers."""
    body: dict[str, Any]
    if request.path.startswith("/v1/"):
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
        }.get(e.status, "api_error")
        body = {"error": {"message": e.message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": e.message}
    return json_response(body, status=e.status, headers=e.headers)


RecordFn = Callable[[RequestRecord], None]


class Proxy:
    """The aiohttp application on the proxy port."""

    def __init__(
        self,
        cfg: Config,
        backends: Backends,
        lifecycle: Lifecycle,
        *,
        session: aiohttp.ClientSession,
        record: RecordFn,
        metrics: Callable[[], str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.lifecycle = lifecycle
        self._session = session
        self._record = record
        self._metrics = metrics
        self.in_flight = 0
        self.draining = False
        self._handlers: set[asyncio.Task[Any]] = set()
        self._budget = BodyBudget()
        self._holds: dict[asyncio.Task[Any], BodyHold] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def configure(self, cfg: Config) -> None:
        """Take a reloaded config (keys, aliases, limits)."""
        self.cfg = cfg

    def app(self, outer: Sequence[Middleware] = ()) -> web.Application:
        """Build the aiohttp application (body limits are enforced per handler); `outer`
        middlewares run first (the connection limiter's)."""
        _quiet_bad_requests()
        app = web.Application(
            client_max_size=self.cfg.proxy.max_body_size, middlewares=[*outer, self._middleware]
        )
        r = app.router
        r.add_get("/", self._root)  # and HEAD /, the health check clients use
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics_page)
        r.add_get("/api/tags", self._tags)
        # Ollama routes no HEAD for these: the child answers it, 405 (gin HandleMethodNotAllowed).
        r.add_get("/api/ps", self._ps, allow_head=False)
        r.add_get("/v1/models", self._v1_models, allow_head=False)
        # Routes that read a JSON body refuse an over-limit Expect: 100-continue up front.
        for path in NATIVE_INFERENCE + OPENAI_INFERENCE:
            r.add_post(path, self._inference, expect_handler=self._expect)
        for path in MODEL_ADMIN:
            method = "DELETE" if path == "/api/delete" else "POST"
            r.add_route(method, path, self._model_admin, expect_handler=self._expect)
        r.add_get("/v1/models/{model:.+}", self._v1_model)
        r.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """Answer 413 instead of `100 Continue` when the announced body is over the limit."""
        limit = self.cfg.proxy.max_body_size
        if request.content_length is not None and request.content_length > limit:
            resp = error_response(request, _too_large(request.content_length, limit))
            resp.force_close()  # the client may send the body anyway: do not read it
            return resp
        expect = request.headers.get("Expect", "")
        if request.version == aiohttp.HttpVersion11:
            if expect.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    async def drain(self, timeout: float) -> int:
        """Stop taking requests, wait for in-flight ones, then cancel what is left; return how
        many were cancelled."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass
        left = list(self._handlers)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5)
        return len(left)

    def _authorized(self, request: web.Request) -> ProxyError | None:
        """None if the request's key (if any is needed) allows it, else the 401 or 403."""
        p = self.cfg.proxy
        need = permission(request.method, request.path)
        if need == OPEN or not p.keyed:
            return None
        given = _bearer(request.headers.get("Authorization", ""))
        full = _key_in(given, p.api_keys)
        app = _key_in(given, p.inference_keys)
        if not (full or app):
            return ProxyError(
                401,
                "unauthorized: send `Authorization: Bearer KEY` with a key from proxy.api_keys "
                "or proxy.inference_keys",
                {"WWW-Authenticate": "Bearer"},
            )
        if need == MANAGE and not full:
            return ProxyError(
                403,
                f"forbidden: {request.method} {request.path} manages models and needs a key from "
                "proxy.api_keys; this key is from proxy.inference_keys (inference and listing)",
            )
        return None

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        denied = self._authorized(request)
        if denied is not None:
            return error_response(request, denied)
        if self.draining:
            return error_response(
                request, ProxyError(503, "llmd is shutting down", {"Connection": "close"})
            )
        self.in_flight += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            return await handler(request)
        except ProxyError as e:
            resp = error_response(request, e)
            if e.headers.get("Connection") == "close":
                resp.force_close()  # rather than read the rest of a body nobody wants
            return resp
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception as e:  # answer in the client's API shape, not aiohttp's plain text
            if _client_gone(request):
                # Nobody is left to answer, and it is no fault of llmd's or a child's.
                log.debug("%s %s: client went away: %r", request.method, request.path, e)
                return web.Response(status=CLIENT_CLOSED)
            log.exception("%s %s failed", request.method, request.path)
            return error_response(request, ProxyError(500, f"llmd: {type(e).__name__}: {e}"))
        finally:
            if task is not None:
                self._handlers.discard(task)
                hold = self._holds.pop(task, None)
                if hold is not None:
                    hold.release()
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    # -- llmd's own answers -----------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _metrics_page(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise ProxyError(404, "metrics are not enabled")
        return web.Response(
            body=self._metrics().encode(),
            headers={"Content-Type": CONTENT_TYPE},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        children = list(self.backends.children.values())
        states = {c.name: c.state.value for c in children}
        # "running" means answering its probes and taking requests: a hung child is not.
        answering = sum(c.running for c in children)
        status = "ok" if answering == len(children) else "degraded" if answering else "unavailable"
        return json_response(
            {"status": status, "backends": states},
            status=200 if answering else 503,
            headers=None if answering else {"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _gather(self, path: str) -> tuple[list[tuple[Child, Any]], dict[str, str]]:
        """Each answering child's JSON at path, and why each other child's is missing.

        503 when no child answered: an empty list would tell clients there are no models."""
        children = list(self.backends.children.values())
        missing = {c.name: c.state.value for c in children if not c.running}
        answers: dict[str, dict[str, Any]] = {}

        async def ask(c: Child) -> None:
            try:
                answers[c.name] = await c.api.get_json(path)
            except ChildAPIError as e:
                log.warning("%s from backend %s failed: %s", path, c.name, e)
                missing[c.name] = "no answer" if e.timed_out else "failed"

        async with asyncio.TaskGroup() as tg:  # this request's: cancelled with it
            asked = {
                tg.create_task(ask(c), name=f"gather-{c.name}"): c for c in children if c.running
            }
            pending = set(asked)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=GATHER_RECHECK_S)
                for task in [t for t in pending if not asked[t].running]:
                    # Found hung (or draining) meanwhile: do not wait out the fetch's timeout.
                    task.cancel()
                    pending.discard(task)
                    missing[asked[task].name] = asked[task].state.value
        out = [
            (c, answers[c.name]) for c in children if c.name in answers and c.name not in missing
        ]
        if not out:
            raise self._no_backend(None, missing)
        return out, missing

    def _partial(self, missing: dict[str, str]) -> dict[str, str] | None:
        """The header that names the backends a merged list left out, or None."""
        if not missing:
            return None
        names = ", ".join(f"{n} ({why})" for n, why in missing.items())
        return {WARNING_HEADER: f"incomplete: backends not answering: {names}"}

    async def _tags(self, request: web.Request) -> web.Response:
        merged: dict[str, dict[str, Any]] = {}
        answers, missing = await self._gather("/api/tags")
        for child, doc in answers:
            listed = [e for e in doc.get("models") or [] if isinstance(e, dict)]
            self.backends.set_tags(child.name, [Pulled.from_json(e) for e in listed])
            for m in doc.get("models") or []:
                merged.setdefault(m.get("name"), m)
        models = sorted(merged.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)
        return json_response({"models": models}, headers=self._partial(missing))

    async def _ps(self, request: web.Request) -> web.Response:
        entries = []
        answers, missing = await self._gather("/api/ps")
        for child, doc in answers:
            for e in doc.get("models") or []:
                m = self.lifecycle.models.get(e.get("name", ""))
                if m is not None and m.backend == child.name:
                    e = {**e, "expires_at": self._expires_at(m, e.get("expires_at"))}
                entries.append(e)
        entries.sort(key=lambda e: _parse_time(e.get("expires_at")), reverse=True)
        return json_response({"models": entries}, headers=self._partial(missing))

    def _expires_at(self, m: Any, child_value: Any) -> Any:
        """llmd's own unload time: children are told never to unload, so theirs is meaningless."""
        if m.state is MState.UNLOADING:
            return _format_time(time.time())
        if m.in_flight > 0 or m.deadline is None:
            return child_value  # forever, as far as anyone can tell now
        return _format_time(time.time() + (m.deadline - time.monotonic()))

    async def _v1_models(self, request: web.Request) -> web.Response:
        merged: dict[str, dict[str, Any]] = {}
        answers, missing = await self._gather("/v1/models")
        for _, doc in answers:
            for m in doc.get("data") or []:
                merged.setdefault(m.get("id"), m)
        # Ollama answers "data": null rather than [] when there are no models (openai/openai.go).
        return json_response(
            {"object": "list", "data": list(merged.values()) or None},
            headers=self._partial(missing),
        )

    # -- routing ----------------------------------------------------------------------------------

    def _no_backend(
        self, child: Child | None = None, missing: dict[str, str] | None = None
    ) -> ProxyError:
        if child is None:
            if not missing:
                return ProxyError(503, "no backend is running", {"Retry-After": str(RETRY_AFTER_S)})
            names = ", ".join(f"{n} ({why})" for n, why in missing.items())
            waits = [c.retry_after_s() for c in self.backends.children.values()]
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

    def resolve(self, name: str) -> str:
        """An alias's model name, else the canonical form of the name."""
        aliases = self.cfg.aliases()
        return aliases.get(name) or aliases.get(normalize_model(name)) or normalize_model(name)

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object, read within proxy.max_body_size and proxy.body_memory.

        The body's share of body_memory is held until the request ends or its body has been
        sent to the child (see _upload).
        """
        limit = self.cfg.proxy.max_body_size
        size = request.content_length
        if size is not None and size > limit:
            raise _too_large(size, limit)
        hold = self._hold()
        await self._reserve(hold, size or 0)
        buf = bytearray()
        try:
            async for chunk in request.content.iter_any():
                buf += chunk
                if len(buf) > limit:
                    raise _too_large(None, limit)
                if len(buf) > hold.n:  # chunked: no size was announced
                    await self._reserve(hold, max(BODY_STEP, len(buf) - hold.n))
        except BAD_BODY as e:
            raise _unreadable(e) from None
        if not buf or buf.isspace():
            raise ProxyError(400, missing_body(request.path))
        text = ""
        try:
            text = decode_json(buf)
            del buf  # the text is the one copy now
            body = parse_json(text)
        except ValueError as e:
            raise ProxyError(400, _syntax_message(text, e)) from None
        if body is None:
            return {}  # Go decodes null into an empty request, as if no field were sent
        if not isinstance(body, dict):
            raise ProxyError(400, not_an_object(request.path, body))
        return body

    def _hold(self) -> BodyHold:
        """This request's share of proxy.body_memory (released when the request ends)."""
        task = _task()
        hold = self._holds.get(task)
        if hold is None:
            hold = self._holds[task] = BodyHold(self._budget)
        return hold

    async def _reserve(self, hold: BodyHold, n: int) -> None:
        p = self.cfg.proxy
        if not await hold.grow(n, p.body_memory, p.body_wait):
            raise ProxyError(
                503,
                f"llmd is holding {self._budget.used} bytes of request bodies, its limit "
                f"(proxy.body_memory = {p.body_memory}); try again shortly",
                {"Retry-After": "5"},
            )

    async def _owner(self, name: str, request: web.Request, shown: str) -> Child:
        child = await self.backends.locate(name)
        if child is None:
            raise self._not_found(request, shown)
        if not child.running:
            raise self._no_backend(child)
        return child

    def _not_found(self, request: web.Request, shown: str) -> ProxyError:
        """404 in Ollama's words for the endpoint, with the name as the client sent it; 503
        while a backend whose models are not known yet may have it."""
        child, why = self.backends.missing(shown, model_not_found(request.path, shown))
        if child is None:
            return ProxyError(404, why)
        return ProxyError(503, why, {"Retry-After": str(child.retry_after_s())})

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        raw = body.get("model")
        native = request.path.startswith("/api/")
        if not isinstance(raw, str) or not raw.strip():
            # Nothing to load: the child answers as Ollama does (a 404 for '' on generate,
            # "model is required" on chat, Go's type error for a number...).
            return await self._without_model(request, body)
        name = self.resolve(raw)
        if name != normalize_model(raw):
            body["model"] = name  # an alias: the child knows the model; else echo as sent
        if native and self._is_unload(request.path, body):
            return await self._unload(request, raw, name)
        child = await self._owner(name, request, raw)
        if native:
            # llmd owns keep-alive: a client's value must not shorten (or pin) the model.
            body["keep_alive"] = -1
        options = body.get("options")
        if native or isinstance(options, dict):  # /v1 has no options field: Ollama ignores it
            try:
                check_runner_options(options)
            except ValueError as e:
                raise ProxyError(400, str(e)) from None
        options = dict(options) if isinstance(options, dict) else None
        # Made before a load, so that the parsed body is freed while the load runs.
        data = Upload(self._dump(body), self._holds.get(_task()))
        t0 = time.time()
        try:
            async with self.lifecycle.lease(name, child, options) as lease:
                return await self._forward(request, lease.child, data, lease, t0)
        except LoadError as e:
            self._record_req(name, request.path, e.status, t0, None, True, None, b"")
            retry = {"Retry-After": str(e.retry_after_s)} if e.retry_after_s else None
            raise ProxyError(e.status, e.message, retry) from None

    def _is_unload(self, path: str, body: dict[str, Any]) -> bool:
        """A client's explicit unload: empty prompt with keep_alive 0, as `ollama stop` sends."""
        if "keep_alive" not in body or body["keep_alive"] is None:
            return False
        ka = body["keep_alive"]
        if isinstance(ka, bool) or not isinstance(ka, int | float | str):
            try:
                keep_alive_seconds(ka)  # raises with Ollama's wording
            except ValueError as e:
                raise ProxyError(400, str(e)) from None
        if isinstance(ka, str):
            try:
                seconds = go_duration(ka)
            except ValueError as e:
                raise ProxyError(400, str(e)) from None
            if not abs(seconds) < MAX_DURATION_S:  # Go's time.ParseDuration overflows
                raise ProxyError(400, f"time: invalid duration {json.dumps(ka)}")
        else:
            try:
                seconds = float(ka)
            except OverflowError:  # an integer no float64 can hold: Go's decoder refuses it
                raise ProxyError(400, f"invalid keep_alive: {ka} is out of range") from None
        if seconds != 0 or path not in ("/api/generate", "/api/chat"):
            return False
        return not (body.get("messages") if path == "/api/chat" else body.get("prompt"))

    def _dump(self, body: dict[str, Any]) -> bytes:
        """The body to send to the child (see dump_json: body is emptied)."""
        try:
            return dump_json(body)
        except ValueError as e:
            raise ProxyError(400, f"invalid JSON in request body: {e}") from None

    async def _unload(self, request: web.Request, shown: str, name: str) -> web.Response:
        if await self.backends.locate(name) is None:
            raise self._not_found(request, shown)
        outcome = await self.lifecycle.unload(name, reason="client asked (keep_alive: 0)")
        log.info("client unload of %s: %s", name, outcome)
        # Ollama echoes the name as sent (GenerateResponse{Model: req.Model}).
        resp: dict[str, Any] = {"model": shown, "created_at": _format_time(time.time())}
        if request.path == "/api/chat":
            resp["message"] = {"role": "assistant", "content": ""}
        else:
            resp["response"] = ""
        resp.update(done=True, done_reason="unload")
        return json_response(resp)

    async def _model_admin(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        key = "source" if request.path == "/api/copy" else "model"
        raw = body.get(key) or body.get("name")
        child: Child | None = None
        if isinstance(raw, str) and raw.strip():
            name = self.resolve(raw)
            if name != normalize_model(raw):  # an alias; else the child words its answers
                body[key if key in body else "name"] = name
            child = await self.backends.locate(name)
        if child is None:
            child = self.backends.first_running()
            if child is None:
                raise self._no_backend()
        if not child.running:
            raise self._no_backend(child)
        try:
            data = Upload(self._dump(body), self._holds.get(_task()))
            return await self._forward(request, child, data, None, time.time())
        finally:
            if request.path in ("/api/pull", "/api/delete", "/api/copy", "/api/create"):
                await self.backends.refresh_tags()

    async def _without_model(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        """A request that names no model: no load can follow, so any running child may answer."""
        child = self.backends.first_running()
        if child is None:
            raise self._no_backend()
        data = Upload(self._dump(body), self._holds.get(_task()))
        return await self._forward(request, child, data, None, time.time())

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        shown = request.match_info["model"]
        child = await self._owner(self.resolve(shown), request, shown)
        return await self._forward(request, child, None, None, time.time())

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        child = self.backends.first_running()
        if child is None:
            raise self._no_backend()
        # Blob uploads can be gigabytes: stream the request body through rather than read it.
        data = request.content if request.body_exists else None
        return await self._forward(request, child, data, None, time.time())

    # -- forwarding -------------------------------------------------------------------------------

    async def _forward(
        self,
        request: web.Request,
        child: Child,
        data: Any,
        lease: Lease | None,
        t0: float,
    ) -> web.StreamResponse:
        headers = _pass_headers(request.headers, PRIVATE_HEADERS)
        if isinstance(data, Upload):
            headers["Content-Type"] = "application/json"
            headers["Content-Length"] = str(data.size)
            data = data.payload(request.method)
        status = 502
        ttfb: float | None = None
        tail = b""
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(
                request.method, child.url + request.path_qs, data=data, headers=headers
            ) as up:
                status = up.status
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in _pass_headers(up.headers, frozenset()).items():
                    resp.headers.add(k, v)
                if up.content_length is not None:
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
                    tail = (tail + chunk)[-TAIL_BYTES:]
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except asyncio.CancelledError:
            # Cancelled by aiohttp when the client went away, or by drain() at shutdown.
            status = 503 if self.draining and not _client_gone(request) else CLIENT_CLOSED
            raise
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
            if _client_gone(request):
                # Writing to the client failed (aiohttp's ClientConnectionResetError is a
                # ClientError too): a client abort, not a backend failure.
                status = CLIENT_CLOSED
                log.debug("%s %s: client went away: %r", request.method, request.path, e)
                return resp if resp is not None else web.Response(status=CLIENT_CLOSED)
            # The client's body may have failed on its way through, rather than the child.
            bad = request.content.exception()
            err = _unreadable(bad) if isinstance(bad, BAD_BODY) else _backend_error(child.name, e)
            status = err.status
            if resp is not None and resp.prepared:  # too late for an error status
                log.warning("%s %s: %s", request.method, request.path, err.message)
                resp.force_close()
                return resp
            raise err from None
        finally:
            if lease is not None:
                self._record_req(
                    lease.model.name,
                    request.path,
                    status,
                    t0,
                    ttfb,
                    lease.waited_for_load,
                    lease.load_s,
                    tail,
                )

    def _record_req(
        self,
        model: str,
        endpoint: str,
        status: int,
        t0: float,
        ttfb: float | None,
        waited: bool,
        load_s: float | None,
        tail: bytes,
    ) -> None:
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
            )
        )


def permission(method: str, path: str) -> str:
    """What a request needs: OPEN (no key), INFERENCE (any key) or MANAGE (an api_keys key)."""
    if path.startswith("/api/blobs"):
        return MANAGE  # blob uploads (and their HEAD check) are the first step of a create
    if method in ("GET", "HEAD"):
        return OPEN if path in OPEN_PATHS else INFERENCE
    return INFERENCE if path in INFERENCE_PATHS else MANAGE


def _bearer(header: str) -> bytes:
    """The token of `Authorization: Bearer TOKEN` as bytes, b"" for any other header."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return b""
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this restores them exactly,
    # so a non-UTF-8 key is simply a wrong key, not an exception.
    return token.strip().encode("utf-8", "surrogateescape")


def _key_in(given: bytes, keys: tuple[str, ...]) -> bool:
    # Compare with every key, in constant time, so timing tells nothing about a key.
    return bool(given) and any([hmac.compare_digest(given, k.encode()) for k in keys])


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


def _task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None, "called outside a task"
    return task


def _client_gone(request: web.Request) -> bool:
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


class _BadRequestFilter(logging.Filter):
    """aiohttp logs each malformed request with a traceback, mostly at ERROR; a client's garbage
    is not llmd's error: one debug line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, BAD_BODY):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        why = " ".join(str(getattr(exc, "message", "") or exc.__cause__ or exc).split())[:200]
        log.debug("bad HTTP request from %s: %s", args[0] if args else "?", why)
        return False


_BAD_REQUESTS = _BadRequestFilter()


def _quiet_bad_requests() -> None:
    server = logging.getLogger("aiohttp.server")
    if _BAD_REQUESTS not in server.filters:
        server.addFilter(_BAD_REQUESTS)


def _syntax_message(text: str, e: ValueError) -> str:
    """Go's encoding/json wording for a body Go would refuse too (as Ollama answers it), else
    what Python's parser found. Only the first 64 KiB are worth scanning in Python."""
    if text and len(text) <= 64 * 1024:
        go = json_syntax_error(text)
        if go is not None:
            return go
    return f"invalid JSON in request body: {e}"


def _too_large(size: int | None, limit: int) -> ProxyError:
    got = f"{size} bytes" if size is not None else "more"
    # The connection stays open: aiohttp reads and drops the rest for a while (its lingering
    # close), so that a client still sending sees this answer rather than a reset.
    return ProxyError(
        413, f"request body too large: {got} exceeds proxy.max_body_size ({limit} bytes)"
    )


def _unreadable(e: BaseException) -> ProxyError:
    """400 for a body that cannot be read as sent (bad chunking or content encoding)."""
    why = " ".join(str(getattr(e, "message", "") or e.__cause__ or e).split())
    return ProxyError(400, f"cannot read the request body: {why}", {"Connection": "close"})


def _counters(tail: bytes) -> dict[str, int]:
    """Token counts and load time from the end of a response (the final done record)."""
    text = tail.decode(errors="replace")
    out = {}
    for name, rx in _COUNTERS.items():
        found = rx.findall(text)
        if found:
            out[name] = int(found[-1])
    return out


def _format_time(t: float) -> str:
    """RFC 3339 in local time with an offset, as Ollama writes times."""
    return dt.datetime.fromtimestamp(t).astimezone().isoformat()


def _parse_time(s: Any) -> float:
    if not isinstance(s, str):
        return 0.0
    try:
        # Go writes nanoseconds; Python parses at most microseconds.
        s = re.sub(r"(\.\d{6})\d+", r"\1", s).replace("Z", "+00:00")
        return dt.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return 0.0
