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

from llmd.childapi import ChildAPI, ChildAPIError
from llmd.config import KEY_VARIABLES, BackendConfig
from llmd.transitions import guard

log = logging.getLogger("llmd.process")

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
# A run shorter than this counts as a fast failure; this many in a row make the child FATAL.
FAST_FAILURE_S = 10.0
FATAL_AFTER = 5
# Most time between readiness probes of a starting child (after 0.05 s, 0.1 s...): a child is
# found ready at most this long after it answers. Each probe is one refused connection or one
# GET /; backing off to 0.5 s made llmd's start up to 0.5 s later than its slowest child's.
READY_POLL_S = 0.1
# A client's wait before retrying a child that is starting, draining or not answering.
RETRY_AFTER_S = 5
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
    # Running but failing its liveness probes: takes no new requests; replaced if it goes on.
    UNRESPONSIVE = "unresponsive"
    # Running, taking no new requests while its requests in flight finish, before a stop.
    DRAINING = "draining"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    FATAL = "fatal"


_ENDS_A_RUN = (State.BACKOFF, State.FATAL, State.STARTING, State.STOPPED)
# Every change a child makes (Child._change_state checks it). A run ends in any state it had
# reached: the process exits, the supervisor backs off, gives up, starts again at once when a
# restart was asked for (even from STARTING), or stops for good.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.RUNNING, *_ENDS_A_RUN}),
    State.RUNNING: frozenset({State.UNRESPONSIVE, State.DRAINING, State.STOPPING, *_ENDS_A_RUN}),
    State.UNRESPONSIVE: frozenset({State.RUNNING, State.DRAINING, State.STOPPING, *_ENDS_A_RUN}),
    State.DRAINING: frozenset({State.STOPPING, *_ENDS_A_RUN}),
    State.STOPPING: frozenset(_ENDS_A_RUN),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPED}),
    State.FATAL: frozenset({State.STOPPED}),
}
# The states of a child on its way (back) to RUNNING, unless it is being stopped for good: not
# started yet, starting, backing off, or draining or stopping ahead of a restart.
_COMING_UP = frozenset(
    {State.STOPPED, State.STARTING, State.BACKOFF, State.DRAINING, State.STOPPING}
)


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


def proc_state(pid: int) -> str | None:
    """The state letter of a process in /proc/PID/stat (R, S, D, T, Z...), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return stat_state(f.read())
    except OSError:
        return None


def stat_state(stat: bytes) -> str | None:
    """The state letter in the text of a /proc/PID/stat file."""
    # The command name in parentheses may itself hold spaces or parentheses: split after the last.
    end = stat.rfind(b") ")
    if end < 0:
        return None
    return stat[end + 2 : end + 3].decode(errors="replace") or None


def child_env(cfg: BackendConfig, instance: str, base: Mapping[str, str]) -> dict[str, str]:
    """The environment of a backend's child: llmd's fixed settings, then the backend's env.
    llmd's API keys from the environment stay with llmd: a child has no use for them."""
    env = {k: v for k, v in base.items() if k not in KEY_VARIABLES}
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
    env["OLLAMA_NUM_PARALLEL"] = str(cfg.num_parallel)
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
        on_change: Callable[[Child, State, State], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.instance = instance
        self.state = State.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.error: str | None = None
        # llmd's own questions to this child go through its API client.
        self.api = ChildAPI(session, f"http://127.0.0.1:{cfg.port}")
        self._spawn = spawn
        self._clock = clock
        self._on_exit = on_exit
        self._on_change = on_change
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
        """Answering and taking new requests."""
        return self.state is State.RUNNING

    @property
    def coming_up(self) -> bool:
        """Not taking requests now, but will be without anyone's action (not stopped for good,
        not given up on, not hung): a request for it may wait."""
        return self._want_running and not self._stopped.is_set() and self.state in _COMING_UP

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
        if self.state in (State.FATAL, State.STOPPED, State.STOPPING):
            return 30
        return RETRY_AFTER_S

    def configure(self, cfg: BackendConfig) -> None:
        """Take a reloaded backend config equal to the one it runs with (a changed backend
        gets a new Child instead)."""
        if cfg != self.cfg:
            raise ValueError(f"backend {self.name}: a changed config needs a new child")
        self.cfg = cfg

    def _change_state(self, new: State, why: str = "") -> None:
        """Move to `new` if TRANSITIONS allows it from the current state, and tell on_change."""
        old = self.state
        guard(TRANSITIONS, f"backend {self.name}", old, new)
        self.state = new
        log.debug("backend %s: %s -> %s%s", self.name, old.value, new.value, why and f" ({why})")
        if self._on_change is not None:
            self._on_change(self, old, new)

    def drain(self) -> bool:
        """Take no new requests (ahead of a stop or restart); False if it was not taking any."""
        if self.state not in (State.RUNNING, State.UNRESPONSIVE):
            return False
        self._change_state(State.DRAINING)  # RUNNING/UNRESPONSIVE -> DRAINING
        log.info("backend %s: draining: new requests wait until it is running again", self.name)
        return True

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
                        self._change_state(State.STOPPED, "restart requested")  # FATAL -> STOPPED
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
                    # A run that could not spawn is FATAL already (_run_once).
                    if not self._spawn_failed():  # STARTING/RUNNING/... (end of run) -> FATAL
                        self._change_state(State.FATAL, reason)
                    continue
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._fast_failures - 1))
                self._change_state(State.BACKOFF, reason)  # STARTING/RUNNING/... -> BACKOFF
                self._backoff_until = self._clock() + delay
                self._settled.set()
                log.warning("backend %s: %s; restarting in %.0fs", self.name, reason, delay)
                await self._wait_wake(delay)
                self._backoff_until = None
                self.restarts += 1
        finally:
            if self._proc is not None:  # cancelled rather than stopped: do not leave it behind
                self._signal_group(signal.SIGKILL)
            if self.state is not State.STOPPED:  # stopped before it started, or after FATAL
                self._change_state(State.STOPPED)  # any -> STOPPED
            self._settled.set()
            self._stopped.set()
            self._supervising = False

    async def _wait_wake(self, delay: float | None) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)

    async def _run_once(self) -> tuple[str, float]:
        """Start the child and watch it until it exits; return why and how long it was ready."""
        # STOPPED/BACKOFF -> STARTING, or straight from the end of a run on a restart request.
        self._change_state(State.STARTING)
        self.generation = next(_generations)
        try:
            proc = await self._start()
        except SpawnError as e:
            self.error = str(e)
            log.error("backend %s: %s", self.name, e)
            # A missing binary will not fix itself by retrying.
            self._change_state(State.FATAL, "cannot spawn")  # STARTING -> FATAL
            return str(e), 0.0
        # The run's helpers are its own: the finally below ends them and the group waits for them.
        async with asyncio.TaskGroup() as tg:
            pump = tg.create_task(self._pump_output(proc), name=f"output-{self.name}")
            exited = tg.create_task(proc.wait(), name=f"wait-{self.name}")
            ready_at: float | None = None
            try:
                if not await self._await_ready(exited):
                    if not self._want_running:
                        await self._terminate(proc, exited)
                        return "stopped", 0.0
                    if exited.done():
                        why = f"exited with code {proc.returncode} while starting"
                        return self._set_error(why), 0
                    await self._terminate(proc, exited)
                    why = f"not ready within start_timeout ({self.cfg.start_timeout:g}s)"
                    return self._set_error(why), 0.0
                if not self._want_running:
                    await self._terminate(proc, exited)
                    return "stopped", 0.0
                try:
                    version = f"ollama {await self.api.version() or '?'}"
                except ChildAPIError as e:
                    version = f"version unknown: {e}"
                self._change_state(State.RUNNING)  # STARTING -> RUNNING
                self.error = None
                ready_at = self._clock()
                self._settled.set()
                log.info(
                    "backend %s: ready on port %d (pid %d, %s)",
                    self.name,
                    self.cfg.port,
                    proc.pid,
                    version,
                )
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
            except Exception as e:  # stop copying, but an error here must not end the run
                log.warning("backend %s: cannot read its output any more: %s", self.name, e)
                return
            if not line:
                return
            child_log.info("[%s] %s", self.name, line.decode(errors="replace").rstrip())

    async def _probe(self) -> bool:
        return await self.api.alive(self.cfg.probe_timeout)

    async def _liveness(self, proc: asyncio.subprocess.Process) -> str | None:
        """Why the child is not serving, or None when it answers its probe."""
        if proc_state(proc.pid) in ("T", "t"):
            # Stopped (SIGSTOP, a debugger): no probe can succeed, so do not wait for one.
            return "stopped (process state T): it cannot answer until continued"
        if await self._probe():
            return None
        return f"did not answer GET / on port {self.cfg.port} within {self.cfg.probe_timeout:g}s"

    async def _await_ready(self, exited: asyncio.Task[int]) -> bool:
        deadline = self._clock() + self.cfg.start_timeout
        delay = 0.05
        while self._clock() < deadline and self._want_running:
            if exited.done():
                return False
            if await self._probe():
                return True
            await asyncio.wait([exited], timeout=delay)
            delay = min(delay * 2, READY_POLL_S)
        return False

    async def _watch(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> str:
        """Wait for an exit, a stop or restart request, or repeated failed liveness probes."""
        failures = 0
        while True:
            self._wake.clear()
            if self._want_running and not self._restart_requested:  # else asked during a probe
                async with asyncio.TaskGroup() as tg:
                    wake = tg.create_task(self._wake.wait(), name=f"wake-{self.name}")
                    try:
                        await asyncio.wait(
                            [exited, wake],
                            timeout=self.cfg.probe_interval,
                            return_when=asyncio.FIRST_COMPLETED,
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
                self._change_state(State.STOPPING)  # RUNNING/UNRESPONSIVE/DRAINING -> STOPPING
                await self._terminate(proc, exited)
                return "stopped" if not self._want_running else "restarted on request"
            why = await self._liveness(proc)
            if why is None:
                if self.state is State.UNRESPONSIVE:
                    self._change_state(State.RUNNING, "answering again")  # UNRESPONSIVE -> RUNNING
                    self.error = None
                    log.info("backend %s: answering again", self.name)
                failures = 0
                continue
            if exited.done() or self._restart_requested or not self._want_running:
                continue  # acted on at the top of the loop
            failures += 1
            if self.state is State.RUNNING:
                self._change_state(State.UNRESPONSIVE, why)  # RUNNING -> UNRESPONSIVE
                self.error = why
                log.warning(
                    "backend %s: %s; its new requests get 503 until it answers again",
                    self.name,
                    why,
                )
            if failures >= self.cfg.probe_failures:
                # UNRESPONSIVE/DRAINING -> STOPPING
                self._change_state(State.STOPPING, "failed probes")
                # A hung child is in no state to shut down cleanly, and a stopped one would not
                # even see SIGTERM until continued: kill it, runners and all.
                self._signal_group(signal.SIGKILL)
                await asyncio.wait([exited], timeout=5)
                return self._set_error(f"{why} ({failures} failed probes in a row); killed")

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
        # A stopped process keeps SIGTERM pending until continued: let it act on it.
        self._signal_group(signal.SIGCONT)
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
