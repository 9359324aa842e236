"""Client connections on the proxy port: a cap that leaves file descriptors for everything else,
and timeouts for idle connections and for clients that send a request too slowly."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from aiohttp import web

from llmd.config import ProxyConfig

log = logging.getLogger("llmd.connections")

# Descriptors kept out of the proxy's reach: the admin socket and its clients, the children's
# pipes, the store (db, -wal, -shm), the GPU probe's subprocess, logs, the event loop itself.
RESERVE_FDS = 256
# "auto" stops here: more idle connections than this on one GPU host is an attack, not load.
AUTO_MAX = 4096
MIN_CAP = 16
# Refused connections get their 503 and a moment to read it before the socket closes; at most
# this many wait so at once (the rest are closed at once), so a flood cannot use the reserve.
MAX_LINGERING = 64
LINGER_S = 2.0
# asyncio accepts up to `backlog` connections in a row before any of them is counted: keep
# that burst well inside RESERVE_FDS.
BACKLOG = 128
# Only a connection idle this long may be closed to make room: a response may still be on its
# way out of one that just finished, and a new client needs a moment to send its request.
EVICT_AFTER_S = 1.0
# Cap, eviction and refusal warnings: at most one line per kind this often.
WARN_EVERY_S = 60.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def fd_cap(nofile: int) -> int:
    """The most client connections an open-file limit allows: each may hold two descriptors
    (the client's and one to a child) beyond the reserve."""
    return max(MIN_CAP, (nofile - RESERVE_FDS) // 2)


def open_file_limit() -> int:
    """The process's soft limit on open files (every connection takes one)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_cap(configured: int | None, nofile: int) -> tuple[int, str | None]:
    """The cap to use, and a warning when the configured one does not fit the open-file limit."""
    fits = fd_cap(nofile)
    if configured is None:
        return min(AUTO_MAX, fits), None
    if configured <= fits:
        return configured, None
    return fits, (
        f"proxy.max_connections = {configured} needs about {2 * configured + RESERVE_FDS} open "
        f"files but the limit is {nofile}: serving at most {fits} connections (raise "
        "LimitNOFILE in the unit to allow more)"
    )


@dataclass
class Stats:
    """What the limiter did since start, for `llmctl status`."""

    accepted: int = 0
    peak: int = 0
    evicted: int = 0
    refused: int = 0
    timed_out: dict[str, int] = field(default_factory=lambda: {"idle": 0, "header": 0, "body": 0})


class Connections:
    """Counts the proxy's client connections, closes the longest-idle one when the cap is
    reached (503 when all are busy), and enforces the idle, header and body timeouts."""

    def __init__(self, cfg: ProxyConfig, cap: int) -> None:
        self.cap = cap
        self.configure(cfg)
        self.stats = Stats()
        # Every admitted open connection, and those without a request in progress, oldest
        # idle first (dicts keep insertion order).
        self._open: dict[_Conn, None] = {}
        self._idle: dict[_Conn, None] = {}
        self._by_transport: dict[Any, _Conn] = {}
        self._lingering = 0
        self._warned: dict[str, float] = {}

    def configure(self, cfg: ProxyConfig) -> None:
        """Apply the timeouts of a (re)loaded config; the cap is fixed at start."""
        self.idle_timeout = cfg.idle_timeout
        self.header_timeout = cfg.header_timeout
        self.body_timeout = cfg.body_timeout

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for loop.create_server wrapping aiohttp's one."""
        return lambda: _Conn(self, make())

    def snapshot(self) -> dict[str, Any]:
        """Open, busy and the counters, for `llmctl status`."""
        busy = len(self._open) - len(self._idle)
        return {
            "open": len(self._open),
            "busy": busy,
            "max": self.cap,
            "peak": self.stats.peak,
            "accepted": self.stats.accepted,
            "evicted": self.stats.evicted,
            "refused": self.stats.refused,
            "timed_out": dict(self.stats.timed_out),
        }

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Mark the request's connection busy while its handler runs."""
        conn = self._by_transport.get(request.transport)
        if conn is None:
            return await handler(request)
        conn.begin(request)
        try:
            return await handler(request)
        finally:
            conn.end()

    # -- bookkeeping, called by _Conn ------------------------------------------------------------

    def _admit(self, conn: _Conn) -> bool:
        if len(self._open) >= self.cap:
            victim = next(iter(self._idle), None)
            if victim is None or conn.since - victim.since < EVICT_AFTER_S:
                self._refuse(conn)
                return False
            self.stats.evicted += 1
            self._warn(
                "evict",
                "proxy connections at proxy.max_connections (%d): closing the longest idle ones "
                "to make room (%d so far)",
                self.cap,
                self.stats.evicted,
            )
            victim.close()
        self.stats.accepted += 1
        self._open[conn] = None
        self._idle[conn] = None
        self._by_transport[conn.transport] = conn
        self.stats.peak = max(self.stats.peak, len(self._open))
        return True

    def _forget(self, conn: _Conn) -> None:
        self._open.pop(conn, None)
        self._idle.pop(conn, None)
        self._by_transport.pop(conn.transport, None)

    def _set_busy(self, conn: _Conn, busy: bool) -> None:
        if conn not in self._open:
            return
        if busy:
            self._idle.pop(conn, None)
        else:
            self._idle[conn] = None

    def _refuse(self, conn: _Conn) -> None:
        self.stats.refused += 1
        self._warn(
            "refuse",
            "proxy connections at proxy.max_connections (%d), all busy: refusing new ones with "
            "503 (%d so far)",
            self.cap,
            self.stats.refused,
        )
        transport = conn.transport
        assert transport is not None
        body = (
            b'{"error":"llmd: too many connections (proxy.max_connections = '
            + str(self.cap).encode()
            + b'), try again"}'
        )
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8"
            b"\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        if self._lingering >= MAX_LINGERING:
            transport.close()
            return
        # Closing right away with the request unread would send a reset, which may destroy
        # the 503 before the client reads it: read and discard for a moment first.
        self._lingering += 1
        conn.linger(LINGER_S)

    def _lingered(self) -> None:
        self._lingering -= 1

    def _timed_out(self, kind: str) -> None:
        self.stats.timed_out[kind] += 1

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._warned.get(kind, -WARN_EVERY_S) >= WARN_EVERY_S:
            self._warned[kind] = now
            log.warning(msg, *args)


class _Conn(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the limiter's timers around it."""

    def __init__(self, owner: Connections, inner: asyncio.Protocol) -> None:
        self.owner = owner
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.request: web.Request | None = None
        # Bytes of a next request arrived while idle: its headers are on their way.
        self.partial = False
        self.since = 0.0  # when it went idle, or the partial request's first byte
        self.last_rx = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is one without subclassing asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.since = self.last_rx = self._loop.time()
        if not self.owner._admit(self):
            return
        self.admitted = True
        self.inner.connection_made(transport)
        self._schedule(self.since + self.owner.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        if self.admitted:
            self.owner._forget(self)
            self.admitted = False
            self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return  # a refused connection's request, read only to be discarded
        now = self._loop.time()
        self.last_rx = now
        if self.request is None and not self.partial:
            self.partial = True
            self.since = now
            self._schedule(now + self.owner.header_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if not self.admitted:
            return None  # close
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # -- the limiter's view -----------------------------------------------------------------------

    def begin(self, request: web.Request) -> None:
        self.request = request
        self.partial = False
        self.last_rx = self._loop.time()
        self.owner._set_busy(self, True)
        self._schedule(self.last_rx + self.owner.body_timeout)

    def end(self) -> None:
        self.request = None
        self.partial = False
        if not self.admitted:
            # The client left mid-request: a new timer would hold this connection (and
            # aiohttp's handler) for idle_timeout after it closed (issue 9, the leak check).
            return
        self.since = self._loop.time()
        self.owner._set_busy(self, False)
        self._schedule(self.since + self.owner.idle_timeout)

    def close(self) -> None:
        """Close now (the cap needs the room): the count drops at once."""
        self.owner._forget(self)
        if self.transport is not None:
            self.transport.close()

    def linger(self, seconds: float) -> None:
        def done() -> None:
            self.owner._lingered()
            if self.transport is not None:
                self.transport.close()

        self._loop.call_later(seconds, done)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self, when: float) -> None:
        """Have _check run by `when`. A timer already due earlier is kept: _check judges the
        state it finds and sets the next one, so a connection's requests (three timer changes
        each) do not churn the loop's timers."""
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._check)

    def _check(self) -> None:
        """A timer fired: close the connection if it overstayed what its state allows."""
        self._timer = None
        if not self.admitted or self.transport is None or self.transport.is_closing():
            return
        o, now = self.owner, self._loop.time()
        if self.request is not None:
            # A body still on its way while llmd is ready to read it: the client stalled. When
            # llmd paused reading (the child reads slowly), the wait is not the client's.
            waiting = not self.request.content.is_eof() and self.transport.is_reading()
            if waiting and now - self.last_rx >= o.body_timeout:
                self._expire("body", o.body_timeout)
                return
            due = self.last_rx + o.body_timeout if waiting else now + o.body_timeout
            self._schedule(max(due, now + 0.5))
            return
        kind, limit = ("header", o.header_timeout) if self.partial else ("idle", o.idle_timeout)
        if now - self.since >= limit:
            self._expire(kind, limit)
            return
        self._schedule(self.since + limit)

    def _expire(self, kind: str, limit: float) -> None:
        self.owner._timed_out(kind)
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.debug("closing %s connection from %s after %gs", kind, peer, limit)
        self.close()


class LimitedSite(web.BaseSite):
    """A TCP site whose connections go through a Connections limiter."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        connections: Connections,
        *,
        backlog: int = BACKLOG,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._connections = connections

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
