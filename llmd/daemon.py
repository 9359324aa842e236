"""The daemon: builds the parts, runs them in one TaskGroup, handles signals, reload and systemd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import faulthandler
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import aiohttp
import psutil
from aiohttp import web

from llmd import __version__, config, gpu, logfilter, logs
from llmd.admin import Admin, prepare_socket, secure_socket
from llmd.backends import Backends
from llmd.config import Config, ConfigError
from llmd.connlimit import Connections, LimitedSite, connection_cap, open_file_limit
from llmd.feed import Feed
from llmd.forward import child_session
from llmd.latency import LatencyWatch
from llmd.lifecycle import Lifecycle
from llmd.memory import Memory
from llmd.metrics import Exposition, Metrics
from llmd.models import Model
from llmd.notify import Notifier
from llmd.process import Child, SpawnFn, default_spawn
from llmd.proxy import Proxy
from llmd.scheduler import Scheduler
from llmd.store import RequestRecord, Store

log = logging.getLogger("llmd")

STATUS_EVERY_S = 5.0
# How often a drain looks whether a child's requests in flight have finished.
DRAIN_POLL_S = 0.1
EX_CONFIG = 78


class StartupError(Exception):
    """llmd cannot start; the message says what to do."""


def _runner_kwargs() -> dict[str, Any]:
    # aiohttp >= 3.9 no longer cancels a handler when its client goes away unless asked to;
    # the proxy relies on it to cancel the upstream request. 3.8 always cancels.
    major, minor = (int(x) for x in aiohttp.__version__.split(".")[:2])
    return {"handler_cancellation": True} if (major, minor) >= (3, 9) else {}


class Daemon:
    """One llmd instance."""

    def __init__(self, cfg: Config, *, spawn: SpawnFn = default_spawn) -> None:
        self.cfg = cfg
        self._spawn = spawn
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._restarts: dict[str, asyncio.Task[None]] = {}  # `llmctl restart`s draining first
        self._stopping = False
        self.started_at = time.time()
        self.exit_code = 0
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.feed = Feed()  # live events for `llmctl events --follow`
        self.store: Store
        self.backends: Backends
        self.lifecycle: Lifecycle
        self.scheduler: Scheduler
        self.proxy: Proxy
        self.connections: Connections
        self.memory: Memory
        self.admin: Admin
        self.latency: LatencyWatch | None = None
        self._tg: asyncio.TaskGroup

    # -- running ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, then shut down in order."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._reload_requested.set)
        async with contextlib.AsyncExitStack() as stack:
            self.store = await Store.open(
                self.cfg.daemon.state_dir / "llmd.db", retention_days=self.cfg.daemon.retention_days
            )
            stack.push_async_callback(self.store.close)
            session = child_session()
            stack.push_async_callback(session.close)
            self.backends = Backends(
                self.cfg,
                session=session,
                start_task=self._start_task,
                spawn=self._spawn,
                on_exit=self._child_exited,
            )
            self.memory = Memory(
                self.cfg, self._make_probe(), backends=self.backends, history=self.store
            )
            stack.push_async_callback(self.memory.probe.close)
            self.lifecycle = Lifecycle(
                self.cfg,
                self.backends,
                self.memory,
                history=self.store,
                events=self,
                start_task=self._start_task,
                on_loaded=self._loaded,
            )
            self.scheduler = Scheduler(self.cfg, self.lifecycle)
            self.latency = LatencyWatch(
                self.cfg,
                lifecycle=self.lifecycle,
                backends=self.backends,
                store=self.store,
                events=self,
            )
            self.proxy = Proxy(
                self.cfg,
                self.backends,
                self.lifecycle,
                self.scheduler,
                session=session,
                record=self.record_request,
                # The snapshot is read at scrape time; the admin layer exists by the first one.
                metrics=Exposition(self.metrics, lambda: self.admin.metrics_snapshot()).page,
            )
            # The TaskGroup exists before the sockets are bound: the first request may start
            # a load or a scan of the children's models, and those run in it.
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    # First: a second llmd must fail here, not stop our children.
                    await self._bind(stack)
                    await asyncio.to_thread(self.backends.stop_stale)
                    self.backends.start()
                    tg.create_task(self._main(), name="main")
            except* StartupError as eg:
                raise eg.exceptions[0] from None

    def record_event(
        self, kind: str, *, model: str | None = None, backend: str | None = None, reason: str = ""
    ) -> None:
        """A lifecycle event: counted for /metrics, kept in the store for `llmctl events`, and
        sent to whoever follows them."""
        self.metrics.record_event(kind, model)
        event = self.store.record_event(
            kind, model=model, backend=backend, reason=reason, request_id=logs.request_id.get()
        )
        self.feed.publish(event)
        if self.latency is not None:
            self.latency.note_event(kind, model)

    def record_request(self, rec: RequestRecord) -> None:
        """A finished proxied request: counted for /metrics, kept in the store for learning,
        judged for contention."""
        self.metrics.record_request(rec)
        self.store.record_request(rec)
        if self.latency is not None:
            self.latency.record(rec)

    def _make_probe(self) -> gpu.Probe:
        g = self.cfg.gpu
        totals = [g.total] if g.total else []
        return gpu.make_probe(g.probe, totals=totals, ps=self._all_ps)

    async def _all_ps(self) -> list[dict[str, Any]]:
        """Every child's /api/ps entries, tagged with the GPUs of their backend."""
        out = []
        for child in self.backends.children.values():
            if not child.running:
                continue
            for r in await child.api.ps():
                out.append({**r.raw, "gpus": list(child.cfg.gpus or [])})
        return out

    async def _loaded(self, m: Model, load_s: float) -> None:
        """Remember what a load measured: its size (a full load's) and how long it took."""
        full = bool(m.size) and m.size_vram >= m.size
        await self.store.set_model_facts(
            m.name, size_vram=m.size_vram if full else None, size=m.size or None, load_s=load_s
        )

    def _start_task(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return self._tg.create_task(coro, name=name)

    async def _bind(self, stack: contextlib.AsyncExitStack) -> None:
        """Bind the proxy port and the admin socket; both or neither."""
        p = self.cfg.proxy
        cap, why = connection_cap(p.max_connections, open_file_limit())
        if why:
            log.warning("%s", why)
        self.connections = Connections(p, cap)
        proxy_runner = web.AppRunner(
            self.proxy.app(outer=[self.connections.middleware]),
            access_log=None,
            # The limiter closes idle connections; aiohttp's own timer only as a backstop.
            keepalive_timeout=p.idle_timeout + p.header_timeout,
            **_runner_kwargs(),
        )
        await proxy_runner.setup()
        stack.push_async_callback(proxy_runner.cleanup)
        try:
            await LimitedSite(proxy_runner, p.host, p.port, self.connections).start()
        except OSError as e:
            raise StartupError(_port_in_use_message(p.listen, p.port, e)) from None
        self.admin = Admin(
            self.cfg,
            backends=self.backends,
            lifecycle=self.lifecycle,
            scheduler=self.scheduler,
            store=self.store,
            proxy=self.proxy,
            connections=self.connections,
            events=self,
            feed=self.feed,
            control=self,
            latency=self.latency,
            counters=self.metrics,
        )
        admin_runner = web.AppRunner(self.admin.app(), access_log=None)
        await admin_runner.setup()
        stack.push_async_callback(admin_runner.cleanup)
        stack.callback(self.feed.close)  # first: followers' streams end, so cleanup need not wait
        sock = self.cfg.daemon.admin_socket
        try:
            prepare_socket(sock)
            await web.UnixSite(admin_runner, str(sock)).start()
            secure_socket(sock)
        except OSError as e:
            raise StartupError(f"cannot serve the admin socket {sock}: {e}") from None
        stack.callback(_unlink, sock)
        log.info(
            "proxy listening on %s (at most %d connections); admin socket %s", p.listen, cap, sock
        )
        _warn_exposure(self.cfg)

    async def _main(self) -> None:
        """Start-up, then the background loops, then the orderly shutdown."""
        tg = self._tg
        loops = [
            tg.create_task(self.scheduler.run(), name="scheduler"),
            tg.create_task(self.lifecycle.run_timers(), name="keep-alive-timers"),
            tg.create_task(self._watch_reload(), name="reload"),
            tg.create_task(self.notifier.run_watchdog(), name="watchdog"),
            tg.create_task(self._report_status(), name="status"),
            tg.create_task(self._startup(), name="startup"),
            tg.create_task(self.lifecycle.run_reconcile(), name="reconcile"),
            tg.create_task(self.lifecycle.run_pressure(), name="gpu-pressure"),
        ]
        store_stop = asyncio.Event()
        store_task = tg.create_task(self.store.run(store_stop), name="store")
        await self._stop.wait()

        # Shutdown: stop taking requests, drain, stop children, flush the store.
        self.notifier.notify("STOPPING=1")
        timeout = self.cfg.daemon.shutdown_timeout
        left = await self.proxy.drain(timeout)
        if left:
            log.warning(
                "shutdown: cancelled %d request(s) still in flight after %gs", left, timeout
            )
        for t in [*loops, *self._restarts.values()]:
            t.cancel()
        await self.lifecycle.close()
        await self.backends.stop_all()
        store_stop.set()
        await store_task
        log.info("llmd stopped")

    async def _startup(self) -> None:
        """READY=1 once every backend is ready or has failed; then preload, then reconcile."""
        await self.backends.wait_settled()
        await self.backends.refresh_tags()
        err = await self.lifecycle.pinned_fit_error(self.cfg)
        if err is not None:
            log.error("%s: %s", self.cfg.path, err)
            self.exit_code = EX_CONFIG
            self._stop.set()
            return
        self.notifier.notify("READY=1", f"STATUS={self.summary()}")
        log.info("llmd %s ready: %s", __version__, self.summary())
        await self.lifecycle.preload()

    def _on_stop_signal(self, name: str) -> None:
        if self._stopping:
            if name == "SIGINT":
                log.error("second SIGINT: exiting now without waiting")
                os._exit(130)
            return
        log.info("%s: shutting down", name)
        self._stopping = True
        self._stop.set()

    def restart_backend(self, child: Child) -> int:
        """Restart a child once its requests in flight finish; return how many there are."""
        pending = self._restarts.get(child.name)
        if pending is not None and not pending.done():
            return self.lifecycle.in_flight_on(child.name)  # already draining for a restart
        if not child.drain():  # not serving (backoff, fatal, starting): nothing to wait for
            child.restart()
            return 0
        self._restarts[child.name] = self._tg.create_task(
            self._drain_then_restart(child), name=f"restart-{child.name}"
        )
        return self.lifecycle.in_flight_on(child.name)

    async def _drain_then_restart(self, child: Child) -> None:
        generation = child.generation
        try:
            await self._drain([child])
        except Exception:  # the restart must happen regardless; a task error would stop llmd
            log.exception("backend %s: draining before its restart failed", child.name)
        if child.generation == generation:  # else it died meanwhile and was replaced
            child.restart()

    async def _drain(self, children: list[Child]) -> None:
        """Route no new requests to these children and wait, up to daemon.shutdown_timeout,
        for their requests in flight to finish."""
        for c in children:
            c.drain()
        timeout = self.cfg.daemon.shutdown_timeout
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(self.lifecycle.in_flight_on(c.name) for c in children):
                return
            await asyncio.sleep(DRAIN_POLL_S)
        for c in children:
            n = self.lifecycle.in_flight_on(c.name)
            if n:
                log.warning(
                    "backend %s: %d request(s) still in flight after %gs (daemon.shutdown_timeout);"
                    " stopping it anyway",
                    c.name,
                    n,
                    timeout,
                )

    def _child_exited(self, child: Child, reason: str) -> None:
        self.lifecycle.child_restarted(child, reason)
        kind = "crash" if reason == child.error else "restart"
        self.record_event(kind, backend=child.name, reason=reason)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            self.notifier.notify(f"STATUS={self.summary()}")
            if self.latency is not None:
                self.latency.tick()
            release_free_heap()

    def summary(self) -> str:
        """One line for systemd's STATUS= and the log."""
        return self.admin.summary()

    # -- reload -----------------------------------------------------------------------------------

    async def _watch_reload(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self.reload()

    async def reload(self) -> tuple[bool, list[str]]:
        """Re-read the config file and apply the difference; keep the old config if invalid."""
        async with self._reload_lock:  # SIGHUP and `llmctl reload` one after the other
            return await self._reload()

    async def _reload(self) -> tuple[bool, list[str]]:
        self.notifier.notify("RELOADING=1", _monotonic_usec())
        try:
            try:
                new = config.load(self.cfg.path)
            except ConfigError as e:
                log.error("reload failed, keeping the running config: %s", e)
                self.record_event("reload", reason=f"rejected: {e}")
                return False, [str(e)]
            notes = []
            for what, old_v, new_v in (
                ("proxy.listen", self.cfg.proxy.listen, new.proxy.listen),
                (
                    "proxy.max_connections",
                    self.cfg.proxy.max_connections,
                    new.proxy.max_connections,
                ),
                ("daemon.admin_socket", self.cfg.daemon.admin_socket, new.daemon.admin_socket),
                ("daemon.state_dir", self.cfg.daemon.state_dir, new.daemon.state_dir),
                ("gpu.probe", self.cfg.gpu.probe, new.gpu.probe),
                ("gpu.total", self.cfg.gpu.total, new.gpu.total),
                (
                    "daemon.retention_days",
                    self.cfg.daemon.retention_days,
                    new.daemon.retention_days,
                ),
                ("daemon.event_loop", self.cfg.daemon.event_loop, new.daemon.event_loop),
            ):
                if old_v != new_v:
                    notes.append(f"{what} changed: restart llmd to apply it")
            err = await self.lifecycle.pinned_fit_error(new)
            if err is not None:
                log.error("reload failed, keeping the running config: %s", err)
                self.record_event("reload", reason=f"rejected: {err}")
                return False, [f"{new.path}: {err}"]
            # Streams in flight on a child about to stop finish first (bounded).
            await self._drain(self.backends.leaving(new))
            notes += await self.backends.configure(new)
            self.cfg = new
            for part in (self.memory, self.lifecycle, self.scheduler, self.proxy, self.admin):
                part.configure(new)
            if self.latency is not None:
                self.latency.configure(new)
            self.connections.configure(new.proxy)
            _warn_exposure(new)
            self.lifecycle.rearm()  # keep-alives decided under the new config
            logs.configure(new.daemon.log_level, new.daemon.log_format)
            self.record_event("reload", reason="; ".join(notes) or "no backend changes")
            log.info("reloaded %s: %s", new.path, "; ".join(notes) or "no backend changes")
            return True, notes
        finally:
            self.notifier.notify("READY=1", f"STATUS={self.summary()}")


def _libc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, where there is one."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return cast(Callable[[int], int], libc.malloc_trim)
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_trim()


def release_free_heap() -> None:
    """Give memory freed inside the C heap back to the system (glibc only).

    Requests of every size leave free holes in glibc's heap that it keeps; without this llmd's
    RSS crept up by tens of bytes per request for as long as it ran (issue 9). It takes well
    under a millisecond."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def _port_in_use_message(listen: str, port: int, e: OSError) -> str:
    """Why the proxy port cannot be bound, naming who holds it and what to do."""
    if e.errno != errno.EADDRINUSE:
        return f"cannot listen on {listen} (proxy.listen): {e.strerror or e}"
    holder = ""
    with contextlib.suppress(psutil.Error):
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                proc = psutil.Process(c.pid)
                holder = f"{proc.name()} (pid {c.pid})"
                # The binary, or an `ollama serve` started through a wrapper or interpreter.
                argv0 = [Path(a).name for a in proc.cmdline()[:2]]
                if proc.name() == "ollama" or "ollama" in argv0:
                    return (
                        f"port {port} (proxy.listen) is held by ollama (pid {c.pid}), probably "
                        "Ollama's own service: llmd runs Ollama itself. Stop and disable it with "
                        "`systemctl disable --now ollama`, or set proxy.listen to another port"
                    )
                break
    who = f" by {holder}" if holder else ""
    return (
        f"port {port} (proxy.listen = {listen!r}) is already in use{who}: "
        "stop it or change proxy.listen"
    )


def _warn_exposure(cfg: Config) -> None:
    """The warning proxy.allow_unauthenticated asks for, each time it takes effect."""
    p = cfg.proxy
    if not p.loopback and not p.keyed:
        log.warning(
            "proxy.listen = %r is reachable from other machines without API keys "
            "(proxy.allow_unauthenticated = true): anyone there can run, pull, copy and delete "
            "models; set proxy.api_keys to stop that",
            p.listen,
        )


def _raise_nofile() -> None:
    """Raise the soft open-file limit to the hard one: every client connection, child and
    probe needs descriptors, and the usual soft default of 1024 runs out under load."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one for files: take the kernel's usual cap.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft >= target:
        log.debug("open-file limit %d (hard limit %d)", soft, hard)
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, e)
        return
    log.info("raised the open-file limit from %d to %d (the hard limit)", soft, target)


def _setup_logging(level: str, fmt: str) -> logfilter.RepeatFilter:
    handler = logs.setup(level, fmt)
    # Library chatter (every SQL statement, the selector in use) drowns llmd's own debug log.
    for noisy in ("aiosqlite", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # One fault repeated per connection or per request must not flood the journal.
    return logfilter.install(handler)


def main(argv: list[str] | None = None) -> int:
    """`llmd`: run the daemon in the foreground, or check or print a config file."""
    ap = argparse.ArgumentParser(prog="llmd", description="Local LLM model daemon.")
    ap.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("LLMD_CONFIG") or config.DEFAULT_PATH),
        metavar="PATH",
        help=f"config file (default $LLMD_CONFIG or {config.DEFAULT_PATH}); $LLMD_API_KEYS and "
        "$LLMD_INFERENCE_KEYS (comma-separated) add to its keys",
    )
    ap.add_argument(
        "--check-config",
        type=Path,
        metavar="PATH",
        help="validate PATH and exit 0 if it is valid, 1 with the first error if not",
    )
    ap.add_argument(
        "--print-config",
        nargs="?",
        const=True,
        type=Path,
        metavar="PATH",
        help="print the effective config of PATH (default: the --config file) as TOML, "
        "every default filled in, and exit; 1 with the first error if it is invalid",
    )
    ap.add_argument("--version", action="version", version=f"llmd {__version__}")
    args = ap.parse_args(argv)
    if args.print_config is not None:
        path = args.config if args.print_config is True else args.print_config
        try:
            print(config.to_toml(config.load(path)), end="")
        except ConfigError as e:
            print(f"llmd: {e}", file=sys.stderr)
            return 1
        return 0
    if args.check_config is not None:
        try:
            config.load(args.check_config)
        except ConfigError as e:
            print(f"llmd: {e}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0
    try:
        cfg = config.load(args.config)
    except ConfigError as e:
        print(f"llmd: {e}", file=sys.stderr)
        # EX_CONFIG: the unit's RestartPreventExitStatus=78 keeps systemd from retrying a
        # config that cannot start, and `systemctl status llmd` shows why.
        return EX_CONFIG
    repeats = _setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    _raise_nofile()
    # A hung daemon killed by the systemd watchdog (SIGABRT) leaves its stacks in the journal.
    faulthandler.enable()
    try:
        loop_factory, loop_name = event_loop(cfg.daemon.event_loop)
    except ImportError as e:
        print(f'llmd: {cfg.path}: daemon.event_loop = "uvloop": {e}', file=sys.stderr)
        return EX_CONFIG
    log.debug("event loop: %s", loop_name)
    daemon = Daemon(cfg)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(daemon.run())
    except StartupError as e:
        log.error("cannot start: %s", e)
        return 1
    finally:
        repeats.flush()
    return daemon.exit_code


def event_loop(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop factory for daemon.event_loop (None: asyncio's own) and its name. uvloop moves
    the proxy's socket work into C (bench/proxy_overhead.py measures what it saves); "auto"
    takes it where it is installed. ImportError: "uvloop" asked for, and not installed."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ImportError(
                "uvloop is not installed (Debian: apt install python3-uvloop; pip: uvloop)"
            ) from None
        return None, "asyncio"
    return uvloop.new_event_loop, f"uvloop {getattr(uvloop, '__version__', '')}".strip()


if __name__ == "__main__":
    sys.exit(main())
