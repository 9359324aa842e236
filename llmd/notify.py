"""systemd notification: READY, STATUS, RELOADING, STOPPING and watchdog pings."""

from __future__ import annotations

import asyncio
import logging
import os

log = logging.getLogger("llmd.notify")


class Notifier:
    """sd_notify over $NOTIFY_SOCKET; silently does nothing without it."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self._sd = None
        if self.enabled:
            import sdnotify

            self._sd = sdnotify.SystemdNotifier()
            if self._sd.socket is not None:
                # Never block the event loop on a full notification queue; systemd reads fast.
                self._sd.socket.setblocking(False)
        self.watchdog_s = _watchdog_interval(env)

    def notify(self, *lines: str) -> None:
        """Send one notification message made of KEY=VALUE lines."""
        if self._sd is not None:
            self._sd.notify("\n".join(lines))

    async def run_watchdog(self) -> None:
        """Ping WATCHDOG=1 at half the interval systemd asked for.

        The pings come from a task on the event loop, so they stop when the loop is stuck: that
        is the point of the watchdog.
        """
        if self._sd is None or self.watchdog_s is None:
            await asyncio.Event().wait()  # nothing to do; stays until cancelled
            return
        log.info("systemd watchdog: pinging every %.1fs", self.watchdog_s / 2)
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)


def _watchdog_interval(env: os._Environ[str] | dict[str, str]) -> float | None:
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
