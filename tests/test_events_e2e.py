"""`llmctl events --follow` end to end: the real llmctl following a real llmd's events as its
models load and unload, filtered by model and kind, and what happens when either side goes."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from llmdproc import Llmd, llmctl_argv

TINY = "tiny:1m"
OTHER = "tiny:2m"

Factory = Callable[..., Llmd]


class Follow:
    """A running `llmctl events --follow ...`: its stdout lines as they come."""

    def __init__(self, d: Llmd, *args: str) -> None:
        self.proc = subprocess.Popen(
            [*llmctl_argv(), "--socket", str(d.socket), "events", "--follow", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=d.env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 10) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from llmctl within {timeout}s") from None

    def quiet(self, s: float = 0.5) -> list[str]:
        """Whatever it printed within the next s seconds."""
        out = []
        deadline = time.monotonic() + s
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.lines.get(timeout=left))
            except queue.Empty:
                break
        return out


@contextmanager
def following(d: Llmd, *args: str) -> Iterator[Follow]:
    f = Follow(d, *args)
    try:
        yield f
    finally:
        if f.proc.poll() is None:
            f.proc.kill()
        f.proc.wait(10)
        f.reader.join(10)
        for stream in (f.proc.stdout, f.proc.stderr):
            if stream is not None:
                stream.close()


def ok(d: Llmd, *args: str) -> None:
    r = d.llmctl(*args)
    assert r.returncode == 0, r.stderr


def test_follow_shows_the_backlog_then_new_events_of_one_model_and_kind(daemon: Factory) -> None:
    d = daemon().start()
    ok(d, "load", TINY)  # before following: in the backlog
    with following(d, "--model", TINY, "--kind", "load,unload") as f:
        assert f.next().split() == ["TIME", "EVENT", "MODEL", "BACKEND", "REASON"]
        first = f.next()
        assert first.split()[2:5] == ["load", TINY, "b0"] and "llmctl load" in first
        ok(d, "pin", TINY)  # another kind: not shown
        ok(d, "load", OTHER)  # another model: not shown
        ok(d, "unload", TINY)
        line = f.next()
        assert line.split()[2:5] == ["unload", TINY, "b0"], line
        assert f.quiet() == []
        assert f.proc.poll() is None  # still following
        f.proc.send_signal(signal.SIGINT)  # Ctrl-C ends a follow, successfully
        assert f.proc.wait(10) == 0
    # The next event finds the follower gone: llmd lets it go quietly.
    ok(d, "load", TINY)
    time.sleep(0.5)
    assert "an events follower went away" in d.logs()
    assert "/v1/events/follow failed" not in d.logs()


def test_follow_json_lines_and_the_end_when_llmd_stops(daemon: Factory) -> None:
    d = daemon().start()
    with following(d, "--json", "--limit", "0") as f:
        ok(d, "load", TINY)
        e = json.loads(f.next())
        assert (e["kind"], e["model"], e["backend"]) == ("load", TINY, "b0")
        assert isinstance(e["time"], float) and abs(e["time"] - time.time()) < 60
        # A follower does not hold llmd up as it stops (daemon.shutdown_timeout is 10 s).
        t0 = time.monotonic()
        assert d.stop(timeout=20) == 0
        assert time.monotonic() - t0 < 8
        assert f.proc.wait(10) == 3  # llmd unreachable
        assert f.proc.stderr is not None and "ended the stream" in f.proc.stderr.read()


def test_events_without_follow_filter_by_kind_before_the_limit(daemon: Factory) -> None:
    d = daemon().start()
    ok(d, "load", TINY)
    ok(d, "unload", TINY)
    ok(d, "load", OTHER)
    r = d.llmctl("events", "--kind", "unload", "--limit", "1", "--json")
    assert r.returncode == 0, r.stderr
    assert [(e["kind"], e["model"]) for e in json.loads(r.stdout)["events"]] == [("unload", TINY)]
