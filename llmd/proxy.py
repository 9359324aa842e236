"""The proxy port: Ollama's native API and /v1, routed by model, streamed without buffering."""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from llmd.backends import Backends
from llmd.config import Config, normalize_model, parse_go_duration
from llmd.lifecycle import Lease, Lifecycle, LoadError, MState
from llmd.process import RETRY_AFTER_S, Child, State
from llmd.store import RequestRecord

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
TAIL_BYTES = 4096
# Names the backends a merged list (/api/tags, /api/ps, /v1/models) had to leave out.
WARNING_HEADER = "X-LLMD-Warning"
# How often a merged list looks whether a child it waits for has been found hung meanwhile.
GATHER_RECHECK_S = 0.25
# Health checks answer without an API key.
OPEN_PATHS = frozenset({"/", "/healthz"})
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


def error_response(request: web.Request, e: ProxyError) -> web.Response:
    """Ollama's error shape on native paths; OpenAI's on /v1, as Ollama itself answers."""
    body: dict[str, Any]
    if request.path.startswith("/v1/"):
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "not_found_error",
        }.get(e.status, "api_error")
        body = {"error": {"message": e.message, "type": kind, "param": None, "code": None}}
    else:
        body = {"error": e.message}
    return web.json_response(body, status=e.status, headers=e.headers)


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
        self._idle = asyncio.Event()
        self._idle.set()

    def app(self) -> web.Application:
        """Build the aiohttp application (body limits are enforced per handler)."""
        app = web.Application(
            client_max_size=self.cfg.proxy.max_body_size, middlewares=[self._middleware]
        )
        r = app.router
        r.add_get("/", self._root)  # and HEAD /, the health check clients use
        r.add_get("/healthz", self._healthz)
        r.add_get("/metrics", self._metrics_page)
        r.add_get("/api/tags", self._tags)
        r.add_get("/api/ps", self._ps)
        r.add_get("/v1/models", self._v1_models)
        for path in NATIVE_INFERENCE + OPENAI_INFERENCE:
            r.add_post(path, self._inference)
        for path in MODEL_ADMIN:
            r.add_route("DELETE" if path == "/api/delete" else "POST", path, self._model_admin)
        r.add_get("/v1/models/{model:.+}", self._v1_model)
        r.add_route("*", "/{tail:.*}", self._passthrough)
        return app

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

    def _authorized(self, request: web.Request) -> bool:
        keys = self.cfg.proxy.api_keys
        if not keys or request.path in OPEN_PATHS:
            return True
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        given = token.strip().encode()
        # Compare with every key, in constant time, so timing tells nothing about a key.
        return any([hmac.compare_digest(given, k.encode()) for k in keys])

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self._authorized(request):
            return error_response(
                request,
                ProxyError(
                    401,
                    "unauthorized: send `Authorization: Bearer KEY` with a key from proxy.api_keys",
                    {"WWW-Authenticate": "Bearer"},
                ),
            )
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
            return error_response(request, e)
        except (web.HTTPException, asyncio.CancelledError):
            raise
        except Exception as e:  # answer in the client's API shape, not aiohttp's plain text
            log.exception("%s %s failed", request.method, request.path)
            return error_response(request, ProxyError(500, f"llmd: {type(e).__name__}: {e}"))
        finally:
            if task is not None:
                self._handlers.discard(task)
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
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        children = list(self.backends.children.values())
        states = {c.name: c.state.value for c in children}
        # "running" means answering its probes and taking requests: a hung child is not.
        answering = sum(c.running for c in children)
        status = "ok" if answering == len(children) else "degraded" if answering else "unavailable"
        return web.json_response(
            {"status": status, "backends": states},
            status=200 if answering else 503,
            headers=None if answering else {"Retry-After": str(RETRY_AFTER_S)},
        )

    async def _gather(self, path: str) -> tuple[list[tuple[Child, Any]], dict[str, str]]:
        """Each answering child's JSON at path, and why each other child's is missing.

        503 when no child answered: an empty list would tell clients there are no models."""
        children = list(self.backends.children.values())
        missing = {c.name: c.state.value for c in children if not c.running}
        loop = asyncio.get_running_loop()
        asked = {
            loop.create_task(self.backends.fetch_json(c, path), name=f"gather-{c.name}"): c
            for c in children
            if c.running
        }
        pending = set(asked)
        try:
            while pending:
                _, pending = await asyncio.wait(pending, timeout=GATHER_RECHECK_S)
                for task in [t for t in pending if not asked[t].running]:
                    # Found hung (or draining) meanwhile: do not wait out the fetch's timeout.
                    task.cancel()
                    pending.discard(task)
                    missing[asked[task].name] = asked[task].state.value
        finally:
            for task in pending:
                task.cancel()
        out = []
        for task, c in asked.items():
            if c.name in missing:
                continue
            e = task.exception()
            if e is not None:
                log.warning("%s from backend %s failed: %s", path, c.name, e)
                missing[c.name] = "no answer" if isinstance(e, TimeoutError) else "failed"
            else:
                out.append((c, task.result()))
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
            self.backends.set_tags(child.name, list(doc.get("models") or []))
            for m in doc.get("models") or []:
                merged.setdefault(m.get("name"), m)
        models = sorted(merged.values(), key=lambda m: str(m.get("modified_at", "")), reverse=True)
        return web.json_response({"models": models}, headers=self._partial(missing))

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
        return web.json_response({"models": entries}, headers=self._partial(missing))

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
        return web.json_response(
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
        limit = self.cfg.proxy.max_body_size
        if request.content_length is not None and request.content_length > limit:
            raise _too_large(request.content_length, limit)
        buf = bytearray()
        async for chunk in request.content.iter_any():
            buf += chunk
            if len(buf) > limit:
                raise _too_large(None, limit)
        if not buf.strip():
            raise ProxyError(400, "missing request body")
        try:
            body = json.loads(buf)
        except ValueError as e:
            raise ProxyError(400, f"invalid JSON in request body: {e}") from None
        if not isinstance(body, dict):
            raise ProxyError(400, "request body must be a JSON object")
        return body

    async def _owner(self, name: str) -> Child:
        child = await self.backends.locate(name)
        if child is None:
            raise self._not_found(name)
        if not child.running:
            raise self._no_backend(child)
        return child

    def _not_found(self, name: str) -> ProxyError:
        """404, unless a backend whose models are not known yet may have it: then 503."""
        child, why = self.backends.missing(name)
        if child is None:
            return ProxyError(404, why)
        return ProxyError(503, why, {"Retry-After": str(child.retry_after_s())})

    async def _inference(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        raw = body.get("model")
        if not isinstance(raw, str) or not raw.strip():
            raise ProxyError(400, "model is required")
        name = self.resolve(raw)
        body["model"] = name
        native = request.path.startswith("/api/")
        if native and self._is_unload(request.path, body):
            return await self._unload(request, body, name)
        child = await self._owner(name)
        if native:
            # llmd owns keep-alive: a client's value must not shorten (or pin) the model.
            body["keep_alive"] = -1
        options = body.get("options") if isinstance(body.get("options"), dict) else None
        t0 = time.time()
        try:
            async with self.lifecycle.lease(name, child, options) as lease:
                data = json.dumps(body).encode()
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
            raise ProxyError(400, f"invalid keep_alive {ka!r}: expected seconds or a duration")
        if isinstance(ka, str):
            try:
                seconds = parse_go_duration(ka)
            except ValueError as e:
                raise ProxyError(400, str(e)) from None
        else:
            seconds = float(ka)
        if seconds != 0 or path not in ("/api/generate", "/api/chat"):
            return False
        return not (body.get("messages") if path == "/api/chat" else body.get("prompt"))

    async def _unload(self, request: web.Request, body: dict[str, Any], name: str) -> web.Response:
        if await self.backends.locate(name) is None:
            raise self._not_found(name)
        outcome = await self.lifecycle.unload(name, reason="client asked (keep_alive: 0)")
        log.info("client unload of %s: %s", name, outcome)
        resp: dict[str, Any] = {"model": name, "created_at": _format_time(time.time())}
        if request.path == "/api/chat":
            resp["message"] = {"role": "assistant", "content": ""}
        else:
            resp["response"] = ""
        resp.update(done=True, done_reason="unload")
        return web.json_response(resp)

    async def _model_admin(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_json(request)
        key = "source" if request.path == "/api/copy" else "model"
        raw = body.get(key) or body.get("name")
        child: Child | None = None
        if isinstance(raw, str) and raw.strip():
            name = self.resolve(raw)
            body[key if key in body else "name"] = name
            child = await self.backends.locate(name)
        if child is None:
            child = self.backends.first_running()
            if child is None:
                raise self._no_backend()
        if not child.running:
            raise self._no_backend(child)
        try:
            return await self._forward(request, child, json.dumps(body).encode(), None, time.time())
        finally:
            if request.path in ("/api/pull", "/api/delete", "/api/copy", "/api/create"):
                await self.backends.refresh_tags()

    async def _v1_model(self, request: web.Request) -> web.StreamResponse:
        child = await self._owner(self.resolve(request.match_info["model"]))
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
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        if isinstance(data, bytes):
            headers["Content-Type"] = "application/json"
        status = 502
        ttfb: float | None = None
        tail = b""
        try:
            async with self._session.request(
                request.method, child.url + request.path_qs, data=data, headers=headers
            ) as up:
                status = up.status
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        resp.headers[k] = v
                if up.content_length is not None:
                    resp.content_length = up.content_length
                resp.headers["X-Accel-Buffering"] = "no"
                await resp.prepare(request)
                try:
                    async for chunk in up.content.iter_any():
                        if ttfb is None:
                            ttfb = time.time() - t0
                        tail = (tail + chunk)[-TAIL_BYTES:]
                        await resp.write(chunk)
                except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
                    # The child died mid-stream after the status line went out: end the body
                    # the way Ollama reports a mid-stream failure, with a last error line.
                    log.warning("stream from backend %s broke: %s", child.name, e)
                    status = 502
                    if "ndjson" in up.headers.get("Content-Type", ""):
                        msg = f"backend {child.name!r} failed mid-stream: {e}"
                        await resp.write(json.dumps({"error": msg}).encode() + b"\n")
                    return resp
                await resp.write_eof()
                return resp
        except aiohttp.ClientConnectorError as e:
            status = 503
            raise ProxyError(
                503, f"backend {child.name!r} is unreachable: {e.os_error}", {"Retry-After": "5"}
            ) from None
        except aiohttp.ServerDisconnectedError:
            status = 502
            raise ProxyError(502, f"backend {child.name!r} closed the connection") from None
        except aiohttp.ClientError as e:
            status = 502
            raise ProxyError(502, f"backend {child.name!r} failed: {e}") from None
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


def _too_large(size: int | None, limit: int) -> ProxyError:
    got = f"{size} bytes" if size is not None else "more"
    return ProxyError(
        413, f"request body too large: {got} exceeds proxy.max_body_size ({limit} bytes)"
    )


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
