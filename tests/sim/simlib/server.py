"""`ollama serve`: the aiohttp app, its middlewares (host check, errors, faults) and lifecycle."""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web, web_server

from . import VERSION, logs
from .api_native import NativeApi
from .api_openai import OpenAiApi, openai_error
from .config import Settings
from .durations import format_duration
from .gpu import MIB, GpuState, free_bytes
from .httputil import ApiError, error_response
from .inference import Engine
from .sched import Scheduler
from .store import Store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Requests that reach a model: counted by the exit_after_requests and fail_request faults.
INFERENCE_PATHS = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
    }
)

# Go's netip.Addr.IsPrivate (RFC 1918 and RFC 4193), narrower than Python's is_private.
_PRIVATE = [
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
]


def _split_host(hostport: str) -> str:
    if hostport.startswith("["):
        end = hostport.find("]")
        return hostport[1:end] if end > 0 else hostport
    if hostport.count(":") == 1:
        return hostport.split(":")[0]
    return hostport


def _local_ips() -> set[str]:
    ips: set[str] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            ips.add(str(info[4][0]).split("%")[0])
    except OSError:
        pass
    return ips


class HostCheck:
    """server/routes.go allowedHostsMiddleware: on a loopback listener, 403 for foreign Hosts."""

    def __init__(self, bind_host: str) -> None:
        self.enabled = _is_loopback_bind(bind_host)
        self.hostname = socket.gethostname().lower()
        self.local_ips = _local_ips()

    def allowed(self, host_header: str) -> bool:
        """Whether a request with this Host header may proceed."""
        host = _split_host(host_header)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and (
            ip.is_loopback
            or ip.is_unspecified
            or any(ip in n for n in _PRIVATE if n.version == ip.version)
            or str(ip) in self.local_ips
        ):
            return True
        h = host.lower()
        # server/routes.go allowedHost
        if h in ("", "localhost") or h == self.hostname:
            return True
        return any(h.endswith("." + tld) for tld in ("localhost", "local", "internal"))

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Reject foreign Host headers before routing."""
        if not self.enabled:
            return await handler(request)
        if not self.allowed(request.headers.get("Host", "")):
            return web.Response(status=403)
        if request.method == "OPTIONS":
            return web.Response(status=204)
        return await handler(request)


def _is_loopback_bind(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Front:
    """Errors in Ollama's shapes, gin access logs, and the request-count faults."""

    def __init__(self, settings: Settings) -> None:
        self.faults = settings.faults
        self.header_log = settings.header_log
        self.requests = 0
        self.answered = 0
        self.exiting = False

    def error(self, request: web.Request, status: int, message: str) -> web.Response:
        """A native or OpenAI-shaped error, depending on the path."""
        if request.path.startswith("/v1/"):
            return openai_error(status, message)
        return error_response(status, message)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Convert errors, apply faults, log the request."""
        started = time.monotonic()
        if self.header_log is not None:
            self._log_headers(request)
        n = 0
        if request.path in INFERENCE_PATHS:
            if self.exiting:
                await asyncio.Event().wait()
            self.requests += 1
            n = self.requests
        resp: web.StreamResponse
        try:
            if n and n == self.faults.fail_request:
                resp = self.error(
                    request,
                    500,
                    "llama runner process has terminated: simulated failure "
                    "(OLLAMA_SIM_FAULTS fail_request)",
                )
            else:
                resp = await handler(request)
        except ApiError as e:
            resp = self.error(request, e.status, e.message)
        except web.HTTPNotFound:
            resp = web.Response(status=404, text="404 page not found", content_type="text/plain")
        except web.HTTPMethodNotAllowed:
            resp = web.Response(
                status=405, text="405 method not allowed", content_type="text/plain"
            )
        except (asyncio.CancelledError, ConnectionResetError):
            # The client went away (Go: a cancelled request context). Quietly stop.
            self._log(request, 499, started)
            raise asyncio.CancelledError from None
        self._log(request, resp.status, started)
        if n:
            self.answered += 1
            limit = self.faults.exit_after_requests
            if limit and self.answered >= limit and not self.exiting:
                self.exiting = True
                await self._answer_then_exit(request, resp)
        return resp

    def _log_headers(self, request: web.Request) -> None:
        assert self.header_log is not None
        line = {
            "method": request.method,
            "path": request.path,
            "headers": [[k, v] for k, v in request.headers.items()],
        }
        with open(self.header_log, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(json.dumps(line) + "\n")

    def _log(self, request: web.Request, status: int, started: float) -> None:
        peer = request.remote or "-"
        logs.gin(status, time.monotonic() - started, peer, request.method, request.path)

    async def _answer_then_exit(self, request: web.Request, resp: web.StreamResponse) -> None:
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write_eof()
        transport = request.transport
        for _ in range(100):
            if transport is None or transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.01)
        logs.error(
            "server.go:1",
            "simulated crash after answering requests (OLLAMA_SIM_FAULTS exit_after_requests)",
            requests=self.answered,
        )
        sys.stderr.flush()
        os._exit(1)


def build_app(settings: Settings, engine: Engine) -> web.Application:
    """The aiohttp application with Ollama's routes."""
    front = Front(settings)
    hosts = HostCheck(settings.host)
    # Ollama (gin) sets no limit on request bodies; aiohttp's default is 1 MiB.
    app = web.Application(client_max_size=1 << 40, middlewares=[front.middleware, hosts.middleware])
    native = NativeApi(engine)
    app.add_routes(native.routes())
    app.add_routes(OpenAiApi(native).routes())
    return app


def _listen_addr(addresses: list[Any], host: str) -> str:
    for addr in addresses:
        if isinstance(addr, tuple):
            ip, port = str(addr[0]), int(addr[1])
            if host == "":
                return f"[::]:{port}"
            return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    return f"{host}:0"


def _all_interfaces_socket(port: int) -> socket.socket:
    """Like Go's net.Listen("tcp", ":port"): one dual-stack socket on every interface."""
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr: tuple[str, int] = ("::", port)
    except OSError:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        addr = ("0.0.0.0", port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    return sock


def _runner_kwargs() -> dict[str, Any]:
    # aiohttp >= 3.9 no longer cancels a handler when its client goes away unless asked to;
    # 3.8 always did. Ollama cancels the request context either way.
    params = inspect.signature(web_server.Server.__init__).parameters
    return {"handler_cancellation": True} if "handler_cancellation" in params else {}


def log_config(settings: Settings) -> None:
    """The "server config" line Ollama logs first."""
    env = {
        "CUDA_VISIBLE_DEVICES": ",".join(settings.visible_devices or ()),
        "OLLAMA_CONTEXT_LENGTH": settings.context_length,
        "OLLAMA_HOST": f"{settings.scheme}://{settings.host}:{settings.port}",
        "OLLAMA_KEEP_ALIVE": format_duration(settings.keep_alive_s),
        "OLLAMA_MAX_LOADED_MODELS": settings.max_loaded_models,
        "OLLAMA_MAX_QUEUE": settings.max_queue,
        "OLLAMA_MODELS": settings.models_dir,
        "OLLAMA_NUM_PARALLEL": settings.num_parallel,
    }
    logs.info(
        "routes.go:1",
        "server config",
        env="map[" + " ".join(f"{k}:{v}" for k, v in env.items()) + "]",
    )


async def _serve(settings: Settings, engine: Engine) -> int:
    app = build_app(settings, engine)
    runner = web.AppRunner(app, access_log=None, **_runner_kwargs())
    await runner.setup()
    try:
        site: web.BaseSite
        if settings.host:
            site = web.TCPSite(runner, settings.host, settings.port)
        else:
            site = web.SockSite(runner, _all_interfaces_socket(settings.port))
        await site.start()
    except OSError as e:
        bind = f"{settings.host}:{settings.port}"
        why = os.strerror(e.errno) if e.errno else str(e)
        print(f"Error: listen tcp {bind}: bind: {why[:1].lower()}{why[1:]}", file=sys.stderr)
        return 1
    sched = engine.sched
    addr = _listen_addr(list(runner.addresses), settings.host)
    logs.info("routes.go:1", f"Listening on {addr} (version {VERSION})")
    devices, allocs = sched.gpu.snapshot()
    visible = sched.visible(devices)
    free = free_bytes(visible, allocs)
    for d in visible:
        logs.info(
            "types.go:1",
            "inference compute",
            id=d.uuid,
            library="cuda",
            compute="8.9",
            name=d.name,
            total=f"{d.total_mib * MIB / 2**30:.1f} GiB",
            available=f"{free[d.index] / 2**30:.1f} GiB",
        )
    if not visible:
        logs.info("gpu.go:1", "no compatible GPUs were discovered")
    logs.info(
        "sim.go:1",
        "simulator",
        speed=settings.speed,
        gpu_file=settings.gpu_file or "private",
        faults=settings.faults.active() or "none",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sched_task = asyncio.create_task(sched.run(), name="sched-pending")
    await stop.wait()
    # routes.go Serve: on a signal, close the server and unload every runner.
    logs.info("routes.go:1", "received signal, shutting down")
    sched_task.cancel()
    sched.shutdown()
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)


def serve(settings: Settings, gpu: GpuState, store: Store) -> int:
    """Run `ollama serve` until SIGTERM/SIGINT; returns an exit code on startup failure."""
    logs.info("images.go:1", f"total blobs: {len(store.list())}")
    engine = Engine(settings, store, Scheduler(settings, gpu))
    return asyncio.run(_serve(settings, engine))
