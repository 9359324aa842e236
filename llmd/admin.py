"""The admin API: HTTP/JSON on a Unix socket, versioned under /v1/, driven by llmctl."""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from llmd.lifecycle import LoadError

if TYPE_CHECKING:
    from llmd.backends import Backends
    from llmd.daemon import Daemon

log = logging.getLogger("llmd.admin")

API_VERSION = 1
API_HEADER = "X-Llmd-Api-Version"
SOCKET_MODE = 0o660


class AdminError(Exception):
    """An error answered as {"error": {"code", "message"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        resp = await handler(request)
    except AdminError as e:
        resp = web.json_response({"error": {"code": e.code, "message": e.message}}, status=e.status)
    except web.HTTPException as e:
        code = "not_found" if e.status == 404 else "bad_request"
        resp = web.json_response(
            {"error": {"code": code, "message": f"{request.method} {request.path}: {e.reason}"}},
            status=e.status,
        )
    except Exception as e:
        log.exception("admin %s %s failed", request.method, request.path)
        resp = web.json_response(
            {"error": {"code": "internal", "message": f"{type(e).__name__}: {e}"}}, status=500
        )
    resp.headers[API_HEADER] = str(API_VERSION)
    return resp


class Admin:
    """Routes of the admin API, each a thin call into the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_errors])
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/models/{name:.+}/load", self.load)
        r.add_post("/v1/models/{name:.+}/unload", self.unload)
        r.add_post("/v1/models/{name:.+}/pin", self.pin)
        r.add_delete("/v1/models/{name:.+}/pin", self.unpin)
        r.add_post("/v1/backends/{name}/restart", self.restart)
        r.add_post("/v1/reload", self.reload)
        r.add_get("/v1/events", self.events)
        return app

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.d.status_doc())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.d.models_doc()})

    def _name(self, request: web.Request) -> str:
        return self.d.resolve(request.match_info["name"])

    async def load(self, request: web.Request) -> web.Response:
        name = self._name(request)
        child = await self.d.backends.locate(name)
        if child is None:
            raise not_found(self.d.backends, name)
        if not child.running:
            raise AdminError(
                503, "backend_unavailable", f"backend {child.name!r} is {child.state.value}"
            )
        try:
            m = await self.d.lifecycle.load(name, child, reason="llmctl load")
        except LoadError as e:
            # No room in GPU memory keeps its 503 (try again later); a child's failure is 502.
            status = e.status if e.status < 500 or e.retry_after_s else 502
            code = "no_room" if e.retry_after_s else "load_failed"
            raise AdminError(status, code, e.message) from None
        return web.json_response(
            {"model": name, "backend": child.name, "state": m.state.value, "load_s": m.last_load_s}
        )

    async def unload(self, request: web.Request) -> web.Response:
        name = self._name(request)
        if name not in self.d.lifecycle.models and await self.d.backends.locate(name) is None:
            raise not_found(self.d.backends, name)
        outcome = await self.d.lifecycle.unload(name, reason="llmctl unload")
        return web.json_response({"model": name, "outcome": outcome})

    async def pin(self, request: web.Request) -> web.Response:
        return web.json_response(await self.d.set_pin(self._name(request), True))

    async def unpin(self, request: web.Request) -> web.Response:
        return web.json_response(await self.d.set_pin(self._name(request), False))

    async def restart(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        child = self.d.backends.children.get(name)
        if child is None:
            known = ", ".join(self.d.backends.children) or "none"
            raise AdminError(404, "not_found", f"no backend named {name!r} (backends: {known})")
        # Its requests in flight finish first (up to daemon.shutdown_timeout); new ones get 503.
        n = self.d.restart_backend(child)
        outcome = f"restarting once its {n} request(s) in flight finish" if n else "restarting"
        return web.json_response({"backend": name, "outcome": outcome, "in_flight": n})

    async def reload(self, request: web.Request) -> web.Response:
        ok, changes = await self.d.reload()
        if not ok:
            raise AdminError(400, "invalid_config", changes[0])
        return web.json_response({"reloaded": True, "changes": changes})

    async def events(self, request: web.Request) -> web.Response:
        try:
            limit = int(request.query.get("limit", "50"))
        except ValueError:
            raise AdminError(400, "bad_request", "limit must be an integer") from None
        model = request.query.get("model")
        events = await self.d.store.events(
            limit=limit, model=self.d.resolve(model) if model else None
        )
        return web.json_response({"events": events})


def not_found(backends: Backends, name: str) -> AdminError:
    """404, or 503 while a backend that may have the model has not listed its models yet."""
    child, why = backends.missing(name)
    if child is None:
        return AdminError(404, "not_found", why)
    return AdminError(503, "backend_unavailable", why)


def prepare_socket(path: Path) -> None:
    """Create the socket's directory and clear a stale socket; refuse a live one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left by an llmd that did not exit cleanly
        return
    finally:
        probe.close()
    raise OSError(f"another llmd is already serving {path}: stop it first (systemctl stop llmd)")


def secure_socket(path: Path) -> None:
    """Owner and group may talk to the daemon; nobody else."""
    path.chmod(SOCKET_MODE)
