"""One `ollama serve` child: spawn, readiness and liveness probes, restart with backoff, stop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import itertools
import logging
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp

from llmd.config import BackendConfig

log = logging.getLogger("llmd.process")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# A run shorter than this counts as a fast failure; this many in a row make the child FATAL.
FAST_FAILURE_S = 10.0
FATAL_AFTER = 5
PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 5.0
PROBE_FAILURES_BEFORE_RESTART = 3
# Marks every child in its environment, so a later llmd can recognise stale children.
CHILD_MARKER = "LLMD_BACKEND"
# Children get so many model slots that Ollama never evicts by count: llmd decides instead.
MAX_LOADED_MODELS = "64"
# Longest child log line kept whole (OLLAMA_DEBUG can log whole prompts).
LINE_LIMIT = 1024 * 1024


class State(enum.Enum):
    """Supervisor-style states of one child."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


class SpawnError(Exception):
    """The child's command cannot be started at all."""


SpawnFn = Callable[..., Awaitable[asyncio.subprocess.Process]]

_PR_SET_PDEATHSIG = 1
_generations = itertools.count(1)


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # PR_SET_PDEATHSIG: the kernel sends SIGTERM to the child when llmd dies, even by kill -9.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_libc = ctypes.CDLL(None, use_errno=True)


async def default_spawn(argv: list[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
    """Start a child in its own process group that dies with llmd, its output piped."""
    return await asyncio.create_subprocess_exec(
        *argv,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        limit=LINE_LIMIT,
    )


def child_env(cfg: BackendConfig, instance: str, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a backend's child: llmd's fixed settings, then the backend's env."""
    env = dict(base)
    env.update(
        {
            "OLLAMA_HOST": f"127.0.0.1:{cfg.port}",
            # llmd owns keep-alive: children never unload on their own (DESIGN.md).
            "OLLAMA_KEEP_ALIVE": "-1",
            "OLLAMA_MAX_LOADED_MODELS": MAX_LOADED_MODELS,
            CHILD_MARKER: f"{instance}:{cfg.name}",
            # NVML and nvidia-smi number GPUs by PCI bus; make CUDA agree so `gpus` means one
            # thing everywhere.
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        }
    )
    if cfg.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in cfg.gpus)
    env.update(cfg.env)
    return env


@dataclass
class ChildStatus:
    """What status reports about a child."""

    name: str
    state: str
    pid: int | None
    port: int
    restarts: int
    error: str | None
    backoff_s: float | None


class Child:
    """One supervised `ollama serve` process and its state machine."""

    def __init__(
        self,
        cfg: BackendConfig,
        *,
        instance: str,
        session: aiohttp.ClientSession,
        spawn: SpawnFn = default_spawn,
        clock: Callable[[], float] = time.monotonic,
        on_exit: Callable[[Child, str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.instance = instance
        self.state = State.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.error: str | None = None
        self._session = session
        self._spawn = spawn
        self._clock = clock
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._fast_failures = 0
        self._backoff_until: float | None = None
        self._wake = asyncio.Event()
        self._want_running = True
        self._restart_requested = False
        self._supervising = False
        self._settled = asyncio.Event()  # first start succeeded or failed
        self._stopped = asyncio.Event()
        # A new number at every start of any child, so callers can tell a restarted child
        # (or one replaced by a reload) from the one they knew.
        self.generation = 0

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.cfg.port}"

    @property
    def running(self) -> bool:
        return self.state is State.RUNNING

    @property
    def fatal(self) -> bool:
        """Given up on: only `llmctl restart` or a reload starts it again."""
        return self.state is State.FATAL

    def status(self) -> ChildStatus:
        backoff = None
        if self.state is State.BACKOFF and self._backoff_until is not None:
            backoff = max(0.0, self._backoff_until - self._clock())
        return ChildStatus(
            self.name, self.state.value, self.pid, self.cfg.port, self.restarts, self.error, backoff
        )

    def retry_after_s(self) -> int:
        """A client's sensible wait before retrying a request to this child."""
        if self.state is State.BACKOFF and self._backoff_until is not None:
            return max(1, int(self._backoff_until - self._clock() + 0.999))
        return 5 if self.state in (State.STARTING, State.RUNNING) else 30

    async def wait_settled(self) -> None:
        """Wait until the first start has succeeded or failed."""
        await self._settled.wait()

    def restart(self) -> None:
        """Ask the supervisor to restart the child now, even from FATAL or BACKOFF."""
        self._fast_failures = 0
        self._restart_requested = True
        self._wake.set()

    async def supervise(self) -> None:
        """Run the child until stop(): start, probe, restart with backoff, give up when FATAL."""
        self._supervising = True
        try:
            while self._want_running:
                if self.state is State.FATAL:
                    self._settled.set()
                    await self._wait_wake(None)
                    if self._restart_requested:
                        self.state = State.STOPPED  # FATAL -> STOPPED
                    continue
                self._restart_requested = False
                reason, ran_s = await self._run_once()
                if not self._want_running:
                    break
                if self._on_exit is not None:
                    self._on_exit(self, reason)
                if self._restart_requested:
                    self.restarts += 1
                    continue  # asked for: no backoff
                if ran_s >= FAST_FAILURE_S:
                    self._fast_failures = 0
                self._fast_failures += 1
                if self._spawn_failed() or self._fast_failures >= FATAL_AFTER:
                    log.error(
                        "backend %s: giving up: %s (llmctl restart %s retries)",
                        self.name,
                        reason,
                        self.name,
                    )
                    self.state = State.FATAL  # STARTING/RUNNING -> FATAL
                    continue
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._fast_failures - 1))
                self.state = State.BACKOFF  # STARTING/RUNNING -> BACKOFF
                self._backoff_until = self._clock() + delay
                self._settled.set()
                log.warning("backend %s: %s; restarting in %.0fs", self.name, reason, delay)
                await self._wait_wake(delay)
                self._backoff_until = None
                self.restarts += 1
        finally:
            if self._proc is not None:  # cancelled rather than stopped: do not leave it behind
                self._signal_group(signal.SIGKILL)
            self.state = State.STOPPED
            self._settled.set()
            self._stopped.set()
            self._supervising = False

    async def _wait_wake(self, delay: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _run_once(self) -> tuple[str, float]:
        """Start the child and watch it until it exits; return why and how long it was ready."""
        self.state = State.STARTING  # STOPPED/BACKOFF -> STARTING
        self.generation = next(_generations)
        try:
            proc = await self._start()
        except SpawnError as e:
            self.error = str(e)
            log.error("backend %s: %s", self.name, e)
            self.state = State.FATAL  # a missing binary will not fix itself by retrying
            return str(e), 0.0
        loop = asyncio.get_running_loop()
        pump = loop.create_task(self._pump_output(proc), name=f"output-{self.name}")
        exited = loop.create_task(proc.wait(), name=f"wait-{self.name}")
        ready_at: float | None = None
        try:
            if not await self._await_ready(exited):
                if not self._want_running:
                    await self._terminate(proc, exited)
                    return "stopped", 0.0
                if exited.done():
                    return self._set_error(f"exited with code {proc.returncode} while starting"), 0
                await self._terminate(proc, exited)
                why = f"not ready within start_timeout ({self.cfg.start_timeout:g}s)"
                return self._set_error(why), 0.0
            if not self._want_running:
                await self._terminate(proc, exited)
                return "stopped", 0.0
            self.state = State.RUNNING  # STARTING -> RUNNING
            self.error = None
            ready_at = self._clock()
            self._settled.set()
            log.info("backend %s: ready on port %d (pid %d)", self.name, self.cfg.port, proc.pid)
            reason = await self._watch(proc, exited)
            return reason, self._clock() - ready_at
        finally:
            if not exited.done():
                self._signal_group(signal.SIGKILL)
                exited.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(pump, 2)
            self._proc = None
            self.pid = None

    def _spawn_failed(self) -> bool:
        """_run_once went straight to FATAL: the command cannot be started at all."""
        return self.state is State.FATAL

    def _set_error(self, why: str) -> str:
        self.error = why
        return why

    async def _start(self) -> asyncio.subprocess.Process:
        argv = list(self.cfg.command)
        exe = shutil.which(argv[0], path=self.cfg.env.get("PATH", os.environ.get("PATH")))
        if exe is None:
            raise SpawnError(f"{argv[0]} not found on PATH: install Ollama or set backend.command")
        argv[0] = exe
        env = child_env(self.cfg, self.instance, os.environ)
        try:
            proc = await self._spawn(argv, env)
        except OSError as e:
            raise SpawnError(f"cannot start {exe}: {e.strerror or e}") from None
        self._proc = proc
        self.pid = proc.pid
        log.info("backend %s: started %s (pid %d)", self.name, " ".join(argv), proc.pid)
        return proc

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        """Copy the child's output into llmd's log, one line at a time, prefixed by its name."""
        assert proc.stdout is not None
        child_log = logging.getLogger(f"llmd.backend.{self.name}")
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than the stream's limit: it was dropped
                child_log.info("[%s] (a log line over %d bytes, left out)", self.name, LINE_LIMIT)
                continue
            if not line:
                return
            child_log.info("[%s] %s", self.name, line.decode(errors="replace").rstrip())

    async def _probe(self) -> bool:
        try:
            async with self._session.get(
                self.url + "/", timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            ) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _await_ready(self, exited: asyncio.Task[int]) -> bool:
        deadline = self._clock() + self.cfg.start_timeout
        delay = 0.05
        while self._clock() < deadline and self._want_running:
            if exited.done():
                return False
            if await self._probe():
                return True
            await asyncio.wait([exited], timeout=delay)
            delay = min(delay * 2, 0.5)
        return False

    async def _watch(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> str:
        """Wait for an exit, a stop or restart request, or repeated failed liveness probes."""
        failures = 0
        while True:
            self._wake.clear()
            wake = asyncio.get_running_loop().create_task(self._wake.wait())
            try:
                await asyncio.wait(
                    [exited, wake], timeout=PROBE_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                wake.cancel()
            if exited.done():
                code = proc.returncode
                if not self._want_running:
                    return "stopped"
                if code is not None and code < 0:
                    return self._set_error(f"killed by signal {-code}")
                return self._set_error(f"exited with code {code}")
            if not self._want_running or self._restart_requested:
                self.state = State.STOPPING  # RUNNING -> STOPPING
                await self._terminate(proc, exited)
                return "stopped" if not self._want_running else "restarted on request"
            if await self._probe():
                failures = 0
                continue
            failures += 1
            if failures >= PROBE_FAILURES_BEFORE_RESTART:
                await self._terminate(proc, exited)
                return self._set_error(
                    f"stopped answering on port {self.cfg.port} ({failures} failed probes)"
                )

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> None:
        """SIGTERM the child's group, SIGKILL after stop_timeout, then reap the group."""
        self._signal_group(signal.SIGTERM)
        done, _ = await asyncio.wait([exited], timeout=self.cfg.stop_timeout)
        if not done:
            log.warning(
                "backend %s: still running %gs after SIGTERM; sending SIGKILL",
                self.name,
                self.cfg.stop_timeout,
            )
            self._signal_group(signal.SIGKILL)
            await asyncio.wait([exited], timeout=5)
        # Runners the child started share its group; none may outlive it.
        self._signal_group(signal.SIGKILL)

    async def stop(self) -> None:
        """Stop the child for good and wait for the supervisor to finish."""
        self._want_running = False
        self._wake.set()
        if self._supervising:
            await self._stopped.wait()
