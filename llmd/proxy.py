"""The proxy port: Ollama's native API and /v1, routed by model, streamed without buffering."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from llmd import infer, logs
from llmd.answers import (
    BAD_BODY,
    ProxyError,
    error_response,
    format_time,
    json_response,
    no_backend,
    not_started,
    unreadable,
)
from llmd.auth import NATIVE_INFERENCE, OPENAI_INFERENCE, authorize
from llmd.backends import Backends
from llmd.bodies import (
    BodyBudget,
    BodyHold,
    check_runner_options,
    decode_json,
    dump_json,
    parse_json,
)
from llmd.config import TASK_PREFIX, Config, normalize_model
from llmd.derived import Rewrite
from llmd.forward import CLIENT_CLOSED, Forwarder, RecordFn, Upload, client_gone
from llmd.lifecycle import Lifecycle
from llmd.merged import Merged
from llmd.models import LoadError
from llmd.ollama_errors import (
    go_duration,
    json_syntax_error,
    keep_alive_seconds,
    missing_body,
    model_not_found,
    not_an_object,
)
from llmd.process import Child
from llmd.scheduler import Rejected, Scheduler

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware  # a Protocol in aiohttp >= 3.9

log = logging.getLogger("llmd.proxy")

# Endpoints that name a model but do not run it: routed to its owner or the first backend.
MODEL_ADMIN = ("/api/show", "/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete")
# Chunked bodies (no Content-Length) take their share of proxy.body_memory in steps this big.
BODY_STEP = 1024 * 1024
# The longest duration Go's time.Duration holds (int64 nanoseconds), in seconds.
MAX_DURATION_S = (2**63 - 1) / 1e9
# The request's key for when it arrived (time.monotonic()): waits for a child count from it.
ARRIVED = "llmd.arrived"
REQUEST_ID = "llmd.request_id"
SERVED_BY = "llmd.served_by"  # the model a request's lease holds
# A task for clients that cannot change a request's model field ([[model]] tasks).
TASK_HEADER = "X-LLMD-Task"
# Every answer a model gave names it (the model behind an alias or a task).
MODEL_HEADER = "X-LLMD-Model"


class Proxy:
    """The aiohttp application on the proxy port."""

    def __init__(
        self,
        cfg: Config,
        backends: Backends,
        lifecycle: Lifecycle,
        scheduler: Scheduler,
        *,
        session: aiohttp.ClientSession,
        record: RecordFn,
        metrics: Callable[[str], tuple[bytes, str]] | None = None,  # Accept -> page, type
    ) -> None:
        self.cfg = cfg
        self.backends = backends
        self.lifecycle = lifecycle
        self.scheduler = scheduler
        self._forwarder = Forwarder(session, record, lambda: self.draining)
        self._merged = Merged(backends, lifecycle)
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
        app.on_response_prepare.append(_tag)
        r = app.router
        r.add_get("/", self._root)  # and HEAD /, the health check clients use
        r.add_get("/healthz", self._merged.healthz)
        r.add_get("/readyz", self._merged.readyz)
        r.add_get("/metrics", self._metrics_page)
        r.add_get("/api/tags", self._merged.tags)
        # Ollama routes no HEAD for these: the child answers it, 405 (gin HandleMethodNotAllowed).
        r.add_get("/api/ps", self._merged.ps, allow_head=False)
        r.add_get("/v1/models", self._merged.v1_models, allow_head=False)
        # Routes that read a JSON body refuse an over-limit Expect: 100-continue up front.
        for path in NATIVE_INFERENCE + OPENAI_INFERENCE:
            r.add_post(path, self._inference, expect_handler=self._expect)
        r.add_post(infer.PATH, self._infer, expect_handler=self._expect)
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
        self.backends.stop_waiting()  # requests waiting for a child to start answer 503 now
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

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        request[ARRIVED] = time.monotonic()
        # Every line logged and every event recorded while it is handled carries its id, and
        # so does its answer (see _tag).
        rid = request[REQUEST_ID] = logs.new_id(request.headers.get(logs.HEADER))
        token = logs.request_id.set(rid)
        try:
            return await self._serve(request, handler)
        finally:
            logs.request_id.reset(token)

    async def _serve(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        denied = authorize(self.cfg.proxy, request)
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
            if client_gone(request):
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
        body, content_type = self._metrics(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- routing ----------------------------------------------------------------------------------

    def resolve(self, name: str) -> str:
        """A task's model ("task:code"), an alias's model, else the canonical form of the
        name."""
        if name.startswith(TASK_PREFIX):
            return self.task_model(name.removeprefix(TASK_PREFIX))
        aliases = self.cfg.aliases()
        return aliases.get(name) or aliases.get(normalize_model(name)) or normalize_model(name)

    def task_model(self, task: str) -> str:
        """The model a task names ([[model]] tasks), else 404 listing the tasks there are."""
        tasks = self.cfg.tasks()
        model = tasks.get(task)
        if model is None:
            known = ", ".join(sorted(tasks)) if tasks else "none ([[model]] tasks)"
            raise ProxyError(404, f"unknown task {task!r}: the configured tasks are {known}")
        return model

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
            raise unreadable(e) from None
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
        """The running child that owns a model, once it is running (see _located, _serving)."""
        return await self._serving(request, await self._located(name, request, shown))

    async def _copies(self, name: str, request: web.Request, shown: str) -> list[Child]:
        """The children that may serve a model: its owner once it is running (see _owner), or,
        for a model with several backends (replicas), all of them once any is running; the
        scheduler picks one. While none is, they are waited for like one child."""
        children = self.backends.copies(name)
        if not children:
            return [await self._owner(name, request, shown)]
        if any(c.running for c in children):
            return children
        coming = [c for c in children if c.coming_up]
        if coming:
            limit = max(c.cfg.start_timeout for c in coming)
            await self.backends.wait_for(
                lambda: any(c.running for c in children) or not any(c.coming_up for c in children),
                _arrived(request) + limit,
            )
            if any(c.running for c in children):
                return children
            self._stop_waiting_if_draining()
            still = [c for c in children if c.coming_up]
            if still:
                raise not_started(still[0], limit)
        raise no_backend(self.backends, children[0])

    async def _located(self, name: str, request: web.Request, shown: str) -> Child:
        """The child that owns a model, running or not. While the model is on no backend listed
        so far but one coming up may have it, wait for that one (see _wait_running) and look
        again; 404 (or 503) when no backend has it or can be waited for."""
        while True:
            child = await self.backends.locate(name)
            if child is not None:
                return child
            maybe, _ = self.backends.missing(shown)
            if maybe is None or not maybe.coming_up:
                raise self._not_found(request, shown)
            await self._wait_running(request, maybe, shown)

    async def _serving(self, request: web.Request, child: Child | None = None) -> Child:
        """`child` once it is running, or (None) the first child running. A child starting,
        restarting or backing off (or, for None, any child, while none is running) is waited
        for, up to its backend.start_timeout from the request's arrival; one stopped for good,
        given up on or hung is 503 at once."""
        while True:
            if child is not None:
                if child.running:
                    return child
                if not child.coming_up:
                    raise no_backend(self.backends, child)
                await self._wait_running(request, child)
                continue
            first = self.backends.first_running()
            if first is not None:
                return first
            coming = self.backends.coming_up()
            if not coming:
                raise no_backend(self.backends)
            limit = max(c.cfg.start_timeout for c in coming)
            if not await self.backends.wait_any_running(_arrived(request) + limit):
                self._stop_waiting_if_draining()
                still = self.backends.coming_up()
                if still:
                    raise not_started(still[0], limit)

    async def _wait_running(
        self, request: web.Request, child: Child, model: str | None = None
    ) -> None:
        """Wait while `child` is coming up, up to its start_timeout from the request's arrival;
        503 naming the backend, its state and the limit if it is still coming up then (`model`:
        the request's model, when the child may have it)."""
        limit = child.cfg.start_timeout
        if await self.backends.wait_running(child, _arrived(request) + limit):
            return
        self._stop_waiting_if_draining()
        if child.coming_up:
            raise not_started(child, limit, model)
        # Stopped for good or given up on meanwhile: the caller looks again and says so.

    def _stop_waiting_if_draining(self) -> None:
        if self.draining:
            raise ProxyError(503, "llmd is shutting down", {"Connection": "close"})

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
        task = request.headers.get(TASK_HEADER)
        if task is not None:
            # For clients that cannot change the model field: the header wins over it.
            raw = TASK_PREFIX + task.strip()
        elif not isinstance(raw, str) or not raw.strip():
            # Nothing to load: the child answers as Ollama does (a 404 for '' on generate,
            # "model is required" on chat, Go's type error for a number...).
            return await self._without_model(request, body)
        name = self.resolve(raw)
        if name != normalize_model(raw):
            # An alias or a task: the child knows the model; else echo as sent.
            body["model"] = name
        native = request.path.startswith("/api/")
        if native and self._is_unload(request.path, body):
            return await self._unload(request, raw, name)
        return await self._run(request, body, raw, name, native=native)

    async def _infer(self, request: web.Request) -> web.StreamResponse:
        """POST /infer, the task router's API (llmd.infer): its request and errors, Ollama's
        /api/generate answer."""
        try:
            req = infer.parse(await self._read_json(request))
        except infer.Invalid as e:
            return json_response({"detail": e.errors}, status=422)
        except ProxyError as e:
            if e.status != 400:
                raise
            # FastAPI's answer to a body that is not JSON (the message says where).
            bad = [{"type": "json_invalid", "loc": ["body"], "msg": e.message}]
            return json_response({"detail": bad}, status=422)
        name = self.task_model(req.task)
        try:
            return await self._run(
                request,
                infer.generate_body(req, name),
                name,
                name,
                native=True,
                path="/api/generate",
                upstream_error=infer.upstream_error,
            )
        except ProxyError as e:
            if e.status not in (404, 500):
                raise  # llmd's own: 429 queue full, 503 unreachable or no room, ...
            # What the router's Ollama answered itself (a model it lacks, a load that failed),
            # to which the router said 502.
            raise infer.answered(e.status, e.message) from None

    async def _run(
        self,
        request: web.Request,
        body: dict[str, Any],
        raw: str,
        name: str,
        *,
        native: bool,
        path: str | None = None,
        upstream_error: Callable[[int, bytes], ProxyError] | None = None,
    ) -> web.StreamResponse:
        """A request for model `name` (asked for as `raw`): its turn in the queue, a lease on
        the model (loading it if cold), and the child's answer."""
        children = await self._copies(name, request, raw)
        if native:
            # llmd owns keep-alive: a client's value must not shorten (or pin) the model.
            body["keep_alive"] = -1
        options = body.get("options")
        if native or isinstance(options, dict):  # /v1 has no options field: Ollama ignores it
            try:
                check_runner_options(options)
            except ValueError as e:
                raise ProxyError(400, str(e)) from None
        t0 = time.time()
        try:
            async with self.scheduler.turn(name, children) as child:
                queued_s = time.time() - t0
                if not native:
                    await self.lifecycle.prepare_v1(name, child)  # see llmd/derived.py
                # The model's state as the request's turn comes decides its runner options
                # (no await from here to the lease, which may start a load with them).
                sent = body.get("model")
                options = self.lifecycle.fit_options(name, child, body, native=native)
                # A /v1 request sent to a derived model: the answer names the model as sent.
                to = body.get("model")
                rewrite = Rewrite(to, str(sent)) if isinstance(to, str) and to != sent else None
                # Made before a load, so that the parsed body is freed while the load runs.
                data = Upload(self._dump(body), self._holds.get(_task()))
                async with self.lifecycle.lease(name, child, options) as lease:
                    request[SERVED_BY] = lease.model.name  # the X-LLMD-Model header (_tag)
                    resp = await self._forwarder.forward(
                        request,
                        lease.child,
                        data,
                        lease,
                        t0,
                        queued_s=queued_s,
                        rewrite=rewrite,
                        path=path,
                        upstream_error=upstream_error,
                    )
                    if rewrite is not None and resp.status == 404 and isinstance(to, str):
                        self.lifecycle.derived.forget(lease.child.name, to)  # removed there
                    return resp
        except Rejected as e:
            self._forwarder.record(name, request.path, e.status, t0, None, False, None, b"")
            raise ProxyError(e.status, e.message, {"Retry-After": str(e.retry_after_s)}) from None
        except LoadError as e:
            self._forwarder.record(name, request.path, e.status, t0, None, True, None, b"")
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
        await self._located(name, request, shown)
        outcome = await self.lifecycle.unload(name, reason="client asked (keep_alive: 0)")
        log.info("client unload of %s: %s", name, outcome)
        # Ollama echoes the name as sent (GenerateResponse{Model: req.Model}).
        resp: dict[str, Any] = {"model": shown, "created_at": format_time(time.time())}
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
        child = await self._serving(request, child)
        try:
            data = Upload(self._dump(body), self._holds.get(_task()))
            resp = await self._forwarder.forward(request, child, data, None, time.time())
            if request.path == "/api/delete" and resp.status == 200 and isinstance(raw, str):
                # llmd's derived models of it would keep its file on disk (llmd/derived.py).
                self.lifecycle.derived.drop_base(child, self.resolve(raw))
            return resp
        finally:
            if request.path in ("/api/pull", "/api/delete", "/api/copy", "/api/create"):
                await self.backends.refresh_tags()

    async def _without_model(
        self, request: web.Request, body: dict[str, Any]
    ) -> web.StreamResponse:
        """A request that names no model: no load can follow, so any running child may answer."""
        child = await self._serving(request)
        data = Upload(self._dump(body), self._holds.get(_task()))
        return await self._forwarder.forward(request, child, data, None, time.time())

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        shown = request.match_info["model"]
        child = await self._owner(self.resolve(shown), request, shown)
        return await self._forwarder.forward(request, child, None, None, time.time())

    async def _passthrough(self, request: web.Request) -> web.StreamResponse:
        child = await self._serving(request)
        # Blob uploads can be gigabytes: stream the request body through rather than read it.
        data = request.content if request.body_exists else None
        return await self._forwarder.forward(request, child, data, None, time.time())


async def _tag(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer carries its request's id (streamed ones too: this runs before the headers
    go out)."""
    rid = request.get(REQUEST_ID)
    if rid is not None:
        response.headers[logs.HEADER] = rid
    served = request.get(SERVED_BY)
    if served is not None:
        response.headers[MODEL_HEADER] = served


def _arrived(request: web.Request) -> float:
    """When the request arrived (time.monotonic()), as the middleware noted it."""
    arrived = request.get(ARRIVED)
    return arrived if isinstance(arrived, float) else time.monotonic()


def _task() -> asyncio.Task[Any]:
    task = asyncio.current_task()
    assert task is not None, "called outside a task"
    return task


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
