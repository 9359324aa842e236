"""Disk faults under the real daemon: a bad state directory degrades the store, never llmd."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llmdproc import Factory, Llmd, wait_for

TINY = "tiny:1m"
TINY2 = "tiny:2m"
EMBED = "tiny-embed:1m"
RECOVER_S = 60  # the store retries every few seconds; generous for a loaded CI machine
EXIT_NOT_SAVED = 4


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False)


class Faults:
    """chattr +i and mounts, each undone at the end of the test even when it fails."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.immutable: list[Path] = []
        self.mounts: list[Path] = []

    def need_chattr(self) -> None:
        probe = self.tmp_path / "chattr-probe"
        probe.touch()
        r = _run("chattr", "+i", probe)
        if r.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {r.stderr.strip()}")
        _run("chattr", "-i", probe)

    def set_immutable(self, path: Path) -> None:
        r = _run("chattr", "+i", path)
        assert r.returncode == 0, r.stderr
        self.immutable.append(path)

    def clear_immutable(self, path: Path) -> None:
        r = _run("chattr", "-i", path)
        assert r.returncode == 0, r.stderr

    def mount(self, *args: str | Path) -> None:
        r = _run("mount", *args)
        if r.returncode != 0:
            pytest.skip(f"mount {' '.join(map(str, args))} does not work here: {r.stderr}")
        self.mounts.append(Path(args[-1]))

    def remount(self, target: Path, opts: str) -> None:
        r = _run("mount", "-o", opts, target)
        assert r.returncode == 0, r.stderr

    def undo(self) -> None:
        for p in reversed(self.immutable):
            _run("chattr", "-i", p)
        for m in reversed(self.mounts):
            _run("umount", "-l", m)


@pytest.fixture
def faults(tmp_path: Path) -> Iterator[Faults]:
    f = Faults(tmp_path)
    try:
        yield f
    finally:
        f.undo()


class Traffic:
    """A client thread sending small generate requests through the proxy until stopped."""

    def __init__(self, url: str, model: str = TINY) -> None:
        self.url = url
        self.model = model
        self.ok = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="traffic", daemon=True)

    def _loop(self) -> None:
        body = json.dumps(
            {"model": self.model, "prompt": "x", "stream": False, "options": {"num_predict": 1}}
        ).encode()
        while not self._stop.is_set():
            req = urllib.request.Request(
                self.url + "/api/generate", data=body, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    r.read()
                self.ok += 1
            except (urllib.error.URLError, OSError) as e:
                self.failed.append(repr(e))
                time.sleep(0.2)
            time.sleep(0.02)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def state_of(d: Llmd) -> Path:
    return Path(d.sections["daemon"]["state_dir"])


def store(d: Llmd) -> dict[str, Any]:
    return dict(d.status()["store"])


def generate(d: Llmd, n: int, model: str = TINY) -> None:
    with Traffic(d.url, model) as t:
        wait_for(lambda: t.ok >= n or t.failed, timeout=60, what=f"{n} requests")
    assert not t.failed, t.failed


def alive(d: Llmd) -> bool:
    return d.proc is not None and d.proc.poll() is None


def serve_through(d: Llmd, t: Traffic, seconds: float) -> None:
    """Keep the traffic going for `seconds`, failing at once if llmd dies."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert alive(d), f"llmd died (exit {d.proc.returncode if d.proc else None}) during fault"
        time.sleep(0.1)


def recovered(d: Llmd, rows_at_least: int) -> bool:
    """Not degraded, and rows recorded after the fault cleared are saved."""
    st = store(d)
    return st["degraded"] is None and st["rows"] >= rows_at_least


FILE_FAULTS = ["llmd.db-shm", "llmd.db-wal", "llmd.db", "state directory"]


@pytest.mark.parametrize("target", FILE_FAULTS)
def test_immutable_state_file_degrades_the_store_not_the_daemon(
    daemon: Factory, faults: Faults, figures: Any, target: str
) -> None:
    """An immutable database file or directory never stops llmd; the store recovers after."""
    faults.need_chattr()
    d = daemon().start()
    state = state_of(d)
    generate(d, 3)
    wait_for(lambda: store(d)["rows"] >= 3, timeout=RECOVER_S, what="first rows saved")
    path = state if target == "state directory" else state / target
    if not path.exists():
        path.touch()  # a stray file left by someone else: it must not matter either
    with Traffic(d.url) as t:
        faults.set_immutable(path)
        t_fault = time.monotonic()
        serve_through(d, t, 6)  # several flush intervals
        during = t.ok
        st = store(d)
        if target == "llmd.db-wal":
            # The write-ahead log is where every write goes: saving stops, and status says why.
            assert st["degraded"] and f"database {state / 'llmd.db'}" in st["degraded"]
            assert f"{path} is immutable (chattr +i)" in st["degraded"]
            assert "DEGRADED" in d.llmctl("status").stdout
        faults.clear_immutable(path)
        t_clear = time.monotonic()
        rows = store(d)["rows"]
        wait_for(lambda: recovered(d, rows + 1), timeout=RECOVER_S, what="the store to recover")
        recovery_s = time.monotonic() - t_clear
    assert alive(d)
    assert not t.failed, t.failed[:5]
    assert during > 0
    figures.add(
        "disk faults",
        tried=during,
        handled=during,
        note=f"{target} immutable {t_clear - t_fault:.0f}s: {during} served, "
        f"recovered in {recovery_s:.1f}s",
    )


def test_full_disk_degrades_and_recovers(
    daemon: Factory, faults: Faults, figures: Any, tmp_path: Path
) -> None:
    """A full state file system degrades the store; it saves again once space is freed."""
    d = daemon()
    state = state_of(d)
    state.mkdir(parents=True)
    faults.mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", state)
    d.start()
    generate(d, 3)
    wait_for(lambda: store(d)["rows"] >= 3, timeout=RECOVER_S, what="first rows saved")
    filler = state / "filler"
    with Traffic(d.url) as t:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        finally:
            os.close(fd)
        t_fault = time.monotonic()
        wait_for(
            lambda: "disk is full" in (store(d)["degraded"] or ""),
            timeout=RECOVER_S,
            what="the store to notice the full disk",
        )
        assert str(state / "llmd.db") in store(d)["degraded"]
        serve_through(d, t, 3)
        during = t.ok
        filler.unlink()
        t_clear = time.monotonic()
        rows = store(d)["rows"]
        wait_for(lambda: recovered(d, rows + 1), timeout=RECOVER_S, what="the store to recover")
        recovery_s = time.monotonic() - t_clear
    assert not t.failed, t.failed[:5]
    figures.add(
        "disk faults",
        tried=during,
        handled=during,
        note=f"full disk {t_clear - t_fault:.0f}s: {during} served, recovered in {recovery_s:.1f}s",
    )


def pinned(d: Llmd) -> set[str]:
    r = d.llmctl("models", "--json")
    assert r.returncode == 0, r.stderr
    return {m["name"] for m in json.loads(r.stdout)["models"] if m["pinned"]}


def samples(d: Llmd, model: str = TINY) -> int:
    return int(d.model(model)["keep_alive_samples"])


def recreated(d: Llmd) -> list[dict[str, Any]]:
    r = d.llmctl("events", "--json")
    assert r.returncode == 0, r.stderr
    return [e for e in json.loads(r.stdout)["events"] if e["kind"] == "recreated"]


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_deleted_database_is_recreated_from_memory(daemon: Factory, how: str) -> None:
    """A deleted or replaced llmd.db is noticed and rewritten; pins and history survive restart."""
    d = daemon().start()
    state = state_of(d)
    assert d.llmctl("pin", TINY2).returncode == 0
    generate(d, 5)
    wait_for(lambda: samples(d) >= 2 and store(d)["pending"] == 0, timeout=RECOVER_S)
    learned = samples(d)
    if how == "deleted":
        for f in state.glob("llmd.db*"):
            f.unlink()
    else:
        other = state / "other.db"
        other.write_bytes(b"")
        other.replace(state / "llmd.db")
    generate(d, 3)
    [event] = wait_for(lambda: recreated(d), timeout=RECOVER_S, what="the database recreated")
    assert f"database {state / 'llmd.db'} was {how}" in event["reason"]
    wait_for(lambda: recovered(d, 1), timeout=RECOVER_S, what="rows saved in the new database")
    assert (state / "llmd.db").exists()
    assert d.stop() == 0
    d.start()
    assert TINY2 in pinned(d)
    assert samples(d) >= learned
    assert recreated(d)  # the event itself was saved in the new database


def test_pin_on_read_only_disk_says_not_saved_and_is_saved_later(
    daemon: Factory, faults: Faults
) -> None:
    """`llmctl pin` on a read-only disk exits 4 saying so; the pin is saved once it is writable."""
    d = daemon().start()
    state = state_of(d)
    assert d.llmctl("pin", TINY2).returncode == 0
    generate(d, 3)
    assert d.stop() == 0
    faults.mount("--bind", state, state)
    faults.remount(state, "remount,ro,bind")
    d.start()
    st = store(d)
    assert st["degraded"] and str(state / "llmd.db") in st["degraded"]
    assert f"{state} is on a read-only file system" in st["degraded"]
    generate(d, 3)  # serving as usual
    assert TINY2 in pinned(d)  # read from the file as it is on disk

    r = d.llmctl("pin", EMBED)
    assert r.returncode == EXIT_NOT_SAVED, (r.returncode, r.stdout, r.stderr)
    assert "pinned now; not yet saved" in r.stdout and str(state / "llmd.db") in r.stdout
    assert "is on a read-only file system" in r.stdout and "retrying" in r.stdout
    doc = json.loads(d.llmctl("pin", EMBED, "--json").stdout)
    assert doc["saved"] is False and "is on a read-only file system" in doc["not_saved"]
    assert EMBED in pinned(d)  # in force now

    faults.remount(state, "remount,rw,bind")
    wait_for(lambda: recovered(d, 0), timeout=RECOVER_S, what="the store to recover")
    assert {TINY2, EMBED} <= pinned(d)
    r = d.llmctl("unpin", TINY2, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["saved"] is True
    assert d.stop() == 0
    d.start()
    assert pinned(d) >= {EMBED} and TINY2 not in pinned(d)


def test_pin_on_unwritable_database_while_serving(daemon: Factory, faults: Faults) -> None:
    """A pin made while the write-ahead log is immutable is saved once it is writable again."""
    faults.need_chattr()
    d = daemon().start()
    state = state_of(d)
    generate(d, 2)
    wait_for(lambda: store(d)["rows"] >= 2, timeout=RECOVER_S, what="first rows saved")
    wal = state / "llmd.db-wal"
    faults.set_immutable(wal)
    r = d.llmctl("pin", TINY2)
    assert r.returncode == EXIT_NOT_SAVED, (r.returncode, r.stdout, r.stderr)
    assert f"{wal} is immutable (chattr +i)" in r.stdout
    faults.clear_immutable(wal)
    wait_for(lambda: recovered(d, 0), timeout=RECOVER_S, what="the store to recover")
    assert d.stop() == 0
    d.start()
    assert TINY2 in pinned(d)
