"""The child state machine, against real small processes."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from llmdproc import free_port

from llmd import config, process
from llmd.config import BackendConfig, ConfigError
from llmd.process import TRANSITIONS, Child, State, child_env
from llmd.transitions import IllegalTransition

# A stand-in child: serves GET / on OLLAMA_HOST's port; behaviour set by argv.
SERVER = textwrap.dedent(
    """
    import http.server, os, signal, sys, time
    mode = sys.argv[1]
    if mode == "crash":
        sys.exit(3)
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if mode == "never-ready":
        time.sleep(3600)
    hung = []
    if mode in ("hang-on-usr1", "ignore-term"):
        # SIGUSR1: stop answering (a deadlocked server), the process still alive and running.
        signal.signal(signal.SIGUSR1, lambda *a: hung.append(1))
    host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            while hung:
                time.sleep(3600)
            self.send_response(200); self.end_headers(); self.wfile.write(b"Ollama is running")
        def log_message(self, *a):
            pass
    print("Listening on", port, flush=True)
    http.server.HTTPServer((host, int(port)), H).serve_forever()
    """
)


def backend(mode: str, **kw: object) -> BackendConfig:
    return BackendConfig(
        name="t",
        port=free_port(),
        command=(sys.executable, "-c", SERVER, mode),
        start_timeout=kw.pop("start_timeout", 5.0),  # type: ignore[arg-type]
        stop_timeout=kw.pop("stop_timeout", 2.0),  # type: ignore[arg-type]
        probe_interval=kw.pop("probe_interval", 0.2),  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process, "BACKOFF_FIRST_S", 0.05)


async def wait_state(child: Child, *states: State, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while child.state not in states:
            await asyncio.sleep(0.02)


def test_child_env_sets_llmd_owned_settings() -> None:
    """Children never unload on their own, never evict by count, and see only their GPUs."""
    b = BackendConfig(name="gpu1", port=11500, gpus=(1, 2), env={"OLLAMA_MODELS": "/m"})
    env = child_env(b, "/run/llmd/admin.sock", {"PATH": "/bin", "OLLAMA_KEEP_ALIVE": "5m"})
    assert env["OLLAMA_HOST"] == "127.0.0.1:11500"
    assert env["OLLAMA_KEEP_ALIVE"] == "-1"
    assert int(env["OLLAMA_MAX_LOADED_MODELS"]) >= 16
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"
    assert env["OLLAMA_MODELS"] == "/m"
    assert env["LLMD_BACKEND"] == "/run/llmd/admin.sock:gpu1"
    assert env["PATH"] == "/bin"
    assert "CUDA_VISIBLE_DEVICES" not in child_env(BackendConfig(name="x", port=1), "i", {})


def test_child_env_keeps_llmds_keys_from_the_child() -> None:
    """Keys given to llmd in its environment (a Kubernetes Secret's) never reach `ollama`."""
    base = {"PATH": "/bin", "LLMD_API_KEYS": "admin-key-1", "LLMD_INFERENCE_KEYS": "app-key-1"}
    env = child_env(BackendConfig(name="x", port=1), "i", base)
    assert env["PATH"] == "/bin"
    assert not {"LLMD_API_KEYS", "LLMD_INFERENCE_KEYS"} & set(env)


async def test_missing_binary_is_fatal_with_clear_message(session: aiohttp.ClientSession) -> None:
    """A command that is not on PATH is FATAL at once, saying how to fix it."""
    b = BackendConfig(name="t", port=free_port(), command=("ollama-nonexistent-xyz", "serve"))
    child = Child(b, instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await wait_state(child, State.FATAL)
    assert child.error == (
        "ollama-nonexistent-xyz not found on PATH: install Ollama or set backend.command"
    )
    await child.stop()
    await task


async def test_ready_then_stop_leaves_no_process(session: aiohttp.ClientSession) -> None:
    """A child that answers GET / is RUNNING; stop() ends it and its process group."""
    child = Child(backend("serve"), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    assert child.state is State.RUNNING
    pid = child.pid
    assert pid is not None and psutil.pid_exists(pid)
    assert os.getpgid(pid) == pid  # its own process group
    await child.stop()
    await task
    assert child.state is State.STOPPED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_crashing_child_backs_off_then_goes_fatal(session: aiohttp.ClientSession) -> None:
    """A child that keeps exiting is restarted with growing delays, then FATAL; restart retries."""
    exits: list[str] = []
    child = Child(
        backend("crash"), instance="i", session=session, on_exit=lambda c, why: exits.append(why)
    )
    task = asyncio.create_task(child.supervise())
    await wait_state(child, State.FATAL, timeout=15)
    assert len(exits) == process.FATAL_AFTER
    assert all("code 3" in e for e in exits)
    assert child.restarts == process.FATAL_AFTER - 1
    assert "code 3" in (child.error or "")
    child.restart()
    await wait_state(child, State.STARTING, State.BACKOFF)
    await wait_state(child, State.FATAL, timeout=15)
    await child.stop()
    await task


async def test_not_ready_in_time_is_a_failure(session: aiohttp.ClientSession) -> None:
    """A child that never answers within start_timeout is killed and retried."""
    child = Child(backend("never-ready", start_timeout=0.5), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await wait_state(child, State.BACKOFF)
    assert "start_timeout" in (child.error or "")
    await child.stop()
    await task


async def test_starting_child_is_probed_often_enough_to_be_found_ready_soon(
    session: aiohttp.ClientSession,
) -> None:
    """While a child starts, its readiness probes come at most READY_POLL_S apart (after a
    short ramp), so it is found ready within about that of answering: the probes used to back
    off to 0.5 s, which made llmd's start up to 0.5 s later than its slowest child's."""
    child = Child(backend("never-ready", start_timeout=1.5), instance="i", session=session)
    probes: list[float] = []

    async def probe() -> bool:
        probes.append(asyncio.get_running_loop().time())
        return False

    child._probe = probe  # type: ignore[method-assign]
    task = asyncio.create_task(child.supervise())
    await wait_state(child, State.BACKOFF)
    await child.stop()
    await task
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert len(gaps) >= 10
    assert max(gaps) < process.READY_POLL_S + 0.15, gaps


async def test_killed_child_is_restarted(session: aiohttp.ClientSession) -> None:
    """A child killed with SIGKILL is restarted and runs again with a new PID."""
    child = Child(backend("serve"), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    first = child.pid
    assert first is not None
    os.kill(first, 9)
    await wait_state(child, State.BACKOFF)
    await wait_state(child, State.RUNNING)
    assert child.pid != first
    assert child.restarts == 1
    await child.stop()
    await task


async def test_stop_escalates_to_sigkill(session: aiohttp.ClientSession) -> None:
    """A child that ignores SIGTERM is killed after stop_timeout."""
    child = Child(backend("ignore-term", stop_timeout=0.3), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    pid = child.pid
    assert pid is not None
    async with asyncio.timeout(5):
        await child.stop()
    await task
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_requested_restart_is_immediate(session: aiohttp.ClientSession) -> None:
    """`llmctl restart` on a running child replaces it without backoff."""
    child = Child(backend("serve"), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    first = child.pid
    child.restart()
    async with asyncio.timeout(10):
        while child.pid in (None, first) or child.state is not State.RUNNING:
            await asyncio.sleep(0.02)
    assert child.restarts == 1
    await child.stop()
    await task


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_stopped_child_is_seen_at_once_and_killed(session: aiohttp.ClientSession) -> None:
    """A SIGSTOPped child is unresponsive at the next probe, without waiting for the probe
    timeout, and after probe_failures probes it is killed (it would never act on SIGTERM)."""
    # A probe timeout longer than the test: only the /proc state can tell in time.
    # Nor is there time to wait for SIGTERM to act (stop_timeout): the kill must be SIGKILL.
    b = backend("serve", probe_timeout=60.0, probe_failures=3, stop_timeout=60.0)
    child = Child(b, instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await wait_state(child, State.UNRESPONSIVE, timeout=10)
        assert not child.running
        assert "stopped" in (child.error or "")
        async with asyncio.timeout(10):
            while not gone(pid):
                await asyncio.sleep(0.02)
        await wait_state(child, State.RUNNING)
        assert child.pid != pid and child.restarts == 1
        assert child.error is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        await child.stop()
        await task


async def test_hung_child_is_killed_after_failed_probes(session: aiohttp.ClientSession) -> None:
    """A child that stops answering (alive, ignoring SIGTERM) is unresponsive after one probe
    timeout and killed after probe_failures of them."""
    b = backend("ignore-term", probe_timeout=0.3, probe_failures=2, stop_timeout=60.0)
    exits: list[str] = []
    child = Child(b, instance="i", session=session, on_exit=lambda c, why: exits.append(why))
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGUSR1)
    await wait_state(child, State.UNRESPONSIVE, timeout=5)
    assert child.retry_after_s() >= 1
    async with asyncio.timeout(10):
        while not gone(pid):
            await asyncio.sleep(0.02)
    await wait_state(child, State.RUNNING)
    assert child.pid != pid
    assert "did not answer GET /" in exits[0] and "killed" in exits[0]
    child.cfg = dataclasses.replace(child.cfg, stop_timeout=0.3)  # the new one ignores SIGTERM too
    await child.stop()
    await task


async def test_continued_child_is_trusted_again(session: aiohttp.ClientSession) -> None:
    """A child that answers again before probe_failures is running again, same process."""
    b = backend("serve", probe_failures=1000)
    child = Child(b, instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        await wait_state(child, State.UNRESPONSIVE, timeout=3)
    finally:
        os.kill(pid, signal.SIGCONT)
    await wait_state(child, State.RUNNING, timeout=5)
    assert child.pid == pid and child.error is None and child.restarts == 0
    await child.stop()
    await task


async def test_stopping_a_stopped_child_needs_no_sigkill(session: aiohttp.ClientSession) -> None:
    """stop() on a SIGSTOPped child ends it well before stop_timeout: SIGTERM is let through."""
    child = Child(backend("serve", stop_timeout=30.0), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    pid = child.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    async with asyncio.timeout(10):
        await child.stop()
    await task
    assert gone(pid)


async def test_draining_child_takes_no_requests_until_restarted(
    session: aiohttp.ClientSession,
) -> None:
    """drain() leaves the process running but not taking requests; restart() replaces it."""
    child = Child(backend("serve"), instance="i", session=session)
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    first = child.pid
    assert child.drain()
    assert child.state is State.DRAINING and not child.running and child.pid == first
    await asyncio.sleep(0.5)  # probes that succeed do not make it running again
    assert child.state is State.DRAINING
    assert not child.drain()
    child.restart()
    async with asyncio.timeout(10):
        while child.pid in (None, first) or child.state is not State.RUNNING:
            await asyncio.sleep(0.02)
    await child.stop()
    await task


async def test_a_run_reports_each_state_change(session: aiohttp.ClientSession) -> None:
    """A child started and stopped tells on_change of each change, in order."""
    changes: list[tuple[State, State]] = []
    child = Child(
        backend("serve"),
        instance="i",
        session=session,
        on_change=lambda c, old, new: changes.append((old, new)),
    )
    task = asyncio.create_task(child.supervise())
    await child.wait_settled()
    await child.stop()
    await task
    assert changes == [
        (State.STOPPED, State.STARTING),
        (State.STARTING, State.RUNNING),
        (State.RUNNING, State.STOPPING),
        (State.STOPPING, State.STOPPED),
    ]


def test_transition_table_has_a_row_for_every_state() -> None:
    """Every state is a key of the transition table, and leads only to states."""
    assert set(TRANSITIONS) == set(State)
    assert all(isinstance(new, State) for news in TRANSITIONS.values() for new in news)


LISTED = [
    pytest.param(old, new, id=f"{old.value}->{new.value}")
    for old in State
    for new in sorted(TRANSITIONS[old], key=lambda s: s.value)
]
UNLISTED = [
    pytest.param(old, new, id=f"{old.value}->{new.value}")
    for old, new in [
        (State.STOPPED, State.RUNNING),
        (State.STOPPED, State.FATAL),
        (State.STOPPED, State.STOPPED),
        (State.FATAL, State.RUNNING),
        (State.FATAL, State.STARTING),
        (State.FATAL, State.FATAL),
        (State.BACKOFF, State.RUNNING),
        (State.BACKOFF, State.FATAL),
        (State.DRAINING, State.RUNNING),
        (State.STOPPING, State.RUNNING),
        (State.RUNNING, State.RUNNING),
    ]
]


@pytest.mark.parametrize(("old", "new"), LISTED)
async def test_listed_transition_is_made_and_reported(
    session: aiohttp.ClientSession, old: State, new: State
) -> None:
    """A change the transition table lists is made and reported to on_change."""
    seen: list[tuple[Child, State, State]] = []
    b = BackendConfig(name="b0", port=1)
    child = Child(b, instance="i", session=session, on_change=lambda *a: seen.append(a))
    child.state = old
    child._change_state(new)
    assert child.state is new
    assert seen == [(child, old, new)]


@pytest.mark.parametrize(("old", "new"), UNLISTED)
async def test_illegal_transition_raises_naming_both_states(
    session: aiohttp.ClientSession, old: State, new: State
) -> None:
    """An illegal transition raises, names the backend and both states, and changes nothing."""
    assert new not in TRANSITIONS[old]
    seen: list[tuple[Child, State, State]] = []
    b = BackendConfig(name="b0", port=1)
    child = Child(b, instance="i", session=session, on_change=lambda *a: seen.append(a))
    child.state = old
    with pytest.raises(IllegalTransition) as e:
        child._change_state(new)
    assert str(e.value) == f"backend b0: illegal state change {old.value} -> {new.value}"
    assert child.state is old and seen == []


@pytest.mark.parametrize(
    ("stat", "expected"),
    [
        (b"123 (ollama) S 1 123 123 0 -1", "S"),
        (b"123 (ollama) T 1 123 123 0 -1", "T"),
        (b"123 (gdb target) t 1", "t"),
        (b"123 (odd) name) R 1", "R"),  # a command name may hold ") "
        (b"", None),
        (b"123 (cut", None),
    ],
)
def test_stat_state_reads_the_state_letter(stat: bytes, expected: str | None) -> None:
    """The state letter is read after the command name, whatever that name holds."""
    assert process.stat_state(stat) == expected


def test_proc_state_of_live_and_missing_processes() -> None:
    """This process is running or sleeping; a pid that does not exist has no state."""
    assert process.proc_state(os.getpid()) in ("R", "S")
    assert process.proc_state(2**22 + 12345) is None


@pytest.mark.parametrize(
    ("line", "key", "why"),
    [
        ("probe_interval = 0", "backend[0].probe_interval", "positive"),
        ('probe_timeout = "-1s"', "backend[0].probe_timeout", ""),
        ("probe_failures = 0", "backend[0].probe_failures", "at least 1"),
        ('probe_failures = "3"', "backend[0].probe_failures", "integer"),
    ],
)
def test_probe_settings_are_validated(tmp_path: Path, line: str, key: str, why: str) -> None:
    """Bad liveness probe settings are refused, naming the key."""
    f = tmp_path / "llmd.toml"
    f.write_text(f'[[backend]]\nname = "a"\n{line}\n')
    with pytest.raises(ConfigError) as e:
        config.load(f)
    assert key in str(e.value) and why in str(e.value)


def test_probe_settings_have_defaults_that_find_a_hang_in_seconds(tmp_path: Path) -> None:
    """By default a stopped child is replaced within about 10 s."""
    f = tmp_path / "llmd.toml"
    f.write_text('[[backend]]\nname = "a"\nprobe_interval = "1s"\n')
    b = config.load(f).backends[0]
    assert b.probe_interval == 1.0
    d = BackendConfig(name="x", port=1)
    assert d.probe_interval * d.probe_failures + d.probe_timeout <= 10
