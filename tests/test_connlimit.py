"""llmd.connlimit's timers on one connection, in-process: a fake transport under a real loop."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from llmd.config import ProxyConfig
from llmd.connlimit import Connections


class Transport:
    """Enough of a stream transport for the limiter."""

    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def is_reading(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


async def test_a_busy_connection_does_not_churn_timers_and_still_times_out_idle() -> None:
    """A keep-alive connection's requests each moved its timer three times (arrival, start,
    end: a cancel and a new timer each); now a timer already due earlier is kept and judges
    the state it finds. The idle timeout still closes the connection once the requests stop."""
    cfg = dataclasses.replace(ProxyConfig(), idle_timeout=0.3, header_timeout=0.2, body_timeout=0.3)
    conns = Connections(cfg, cap=10)
    loop = asyncio.get_running_loop()
    armed = 0
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kw: Any) -> asyncio.TimerHandle:
        nonlocal armed
        armed += 1
        return call_at(when, callback, *args, **kw)

    loop.call_at = counted  # type: ignore[method-assign]
    try:
        conn = conns.factory(asyncio.Protocol)()
        transport = Transport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for _ in range(100):
            conn.data_received(b"POST /api/generate HTTP/1.1\r\n...")
            conn.begin(object())  # type: ignore[arg-type]
            conn.end()
            await asyncio.sleep(0)
        assert armed <= 2
        assert conns.snapshot()["open"] == 1 and not transport.closed
        await asyncio.sleep(0.6)  # past the idle timeout: checked, then closed
        assert transport.closed
        assert conns.snapshot()["timed_out"] == {"idle": 1, "header": 0, "body": 0}
    finally:
        loop.call_at = call_at  # type: ignore[method-assign]
