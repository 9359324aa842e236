"""Tests for llmd.store against real SQLite files."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmd import store as store_module
from llmd.policy import IdleHistogram
from llmd.store import DAY_S, RequestRecord, Store

T0 = 1_700_006_400.0  # 2023-11-15 00:00:00 UTC


class Clock:
    """A settable clock."""

    def __init__(self, t: float = T0 + 3600) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def req(t: float, model: str = "m", duration_s: float = 1.0, **kw: Any) -> RequestRecord:
    return RequestRecord(
        time=t, model=model, endpoint="/api/chat", status=200, duration_s=duration_s, **kw
    )


def hist(*gaps: float) -> dict[str, Any]:
    h = IdleHistogram()
    for g in gaps:
        h.add(g)
    return h.to_dict()


def query(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Query a copy of the database's files as they are on disk (the store holds the original)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        for suffix in ("", "-wal"):
            if Path(f"{path}{suffix}").exists():
                shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
        with sqlite3.connect(copy) as conn:
            rows = conn.execute(sql, params).fetchall()
        conn.close()
    return rows


def side(db_path: Path, suffix: str) -> Path:
    """One of the database's side files, -wal or -shm."""
    return db_path.with_name(db_path.name + suffix)


def overwrite_start(path: Path, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.write(data)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "llmd.db"


@pytest.fixture
async def opener(db_path: Path, clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """Open stores that are closed at the end of the test."""
    opened: list[Store] = []

    async def open_(path: Path = db_path, **kw: Any) -> Store:
        kw.setdefault("clock", clock)
        kw.setdefault("busy_timeout_s", 0.05)
        s = await Store.open(path, **kw)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


async def test_new_database_has_schema_wal_and_version(opener, db_path):
    """A new database is created in WAL mode with the current schema version."""
    s = await opener()
    assert s.degraded is None
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert query(db_path, "PRAGMA user_version") == [(store_module.SCHEMA_VERSION,)]


async def test_requests_are_buffered_then_written_in_one_flush(opener, db_path):
    """record_request only buffers; flush writes every field of the batch."""
    s = await opener()
    s.record_request(
        req(
            T0,
            ttfb_s=0.2,
            waited_for_load=True,
            load_duration_s=3.5,
            prompt_tokens=7,
            request_id="r-1",
        )
    )
    s.record_request(req(T0 + 10, model="n"))
    assert query(db_path, "SELECT count(*) FROM requests") == [(0,)]
    assert s.status()["pending"] == 2

    assert await s.flush()
    rows = query(db_path, "SELECT * FROM requests ORDER BY time")
    assert rows == [
        (1, T0, "m", "/api/chat", 200, 0.2, 1.0, 1, 3.5, 7, None, "r-1"),
        (2, T0 + 10, "n", "/api/chat", 200, None, 1.0, 0, None, None, None, None),
    ]
    assert s.status() == {
        "path": str(db_path),
        "degraded": None,
        "pending": 0,
        "dropped": 0,
        "rows": 2,
        "moved_aside": None,
    }


async def test_idle_gaps_are_rolled_up_in_start_order(opener):
    """Gaps run from the end of the latest busy period to the next start; overlaps add none."""
    s = await opener()
    # Recorded in end order, as the proxy does: the long first request ends last.
    s.record_request(req(T0 + 100, duration_s=5))  # gap 100 - 10 = 90
    s.record_request(req(T0 + 103, duration_s=1))  # overlaps: no gap, busy until 105
    s.record_request(req(T0, duration_s=10))
    s.record_request(req(T0 + 400))  # gap 400 - 105 = 295
    s.record_request(req(T0 + 50, model=""))  # no model: not idle history
    await s.flush()
    assert s.idle_histogram("m").to_dict() == hist(90, 295)
    assert s.idle_histogram("other").samples == 0

    s.record_request(req(T0 + 1000))  # a later flush continues from the watermark
    await s.flush()
    assert s.idle_histogram("m").to_dict() == hist(90, 295, 599)


async def test_non_finite_request_is_dropped(opener, db_path):
    """A record with a NaN time is dropped and counted, and does not block the batch."""
    s = await opener()
    s.record_request(req(float("nan")))
    s.record_request(req(T0))
    assert await s.flush()
    assert s.status()["dropped"] == 1
    assert query(db_path, "SELECT count(*) FROM requests") == [(1,)]


async def test_idle_histogram_returns_a_copy(opener):
    """Merging into a returned histogram does not change the store's."""
    s = await opener()
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))
    await s.flush()
    s.idle_histogram("m").merge(s.idle_histogram("m"))
    assert s.idle_histogram("m").samples == 1


async def test_histograms_are_kept_per_utc_day(opener, clock):
    """idle_histogram(days=N) merges the last N UTC days, today included."""
    s = await opener()
    s.record_request(req(T0 - 200))
    s.record_request(req(T0 - 100))  # gap 99 yesterday
    s.record_request(req(T0 + 100))  # gap 199 today
    await s.flush()
    assert s.idle_histogram("m", days=1).to_dict() == hist(199)
    assert s.idle_histogram("m", days=2).to_dict() == hist(99, 199)
    clock.t += DAY_S  # the cached merge notices the new day
    assert s.idle_histogram("m", days=1).samples == 0
    assert s.idle_histogram("m", days=2).to_dict() == hist(199)


async def test_prune_forgets_rows_events_and_histograms_past_retention(opener, db_path, clock):
    """Raw rows, events and day histograms older than retention_days are deleted."""
    s = await opener(retention_days=2)
    s.record_request(req(T0 - 200))
    s.record_request(req(T0 - 100))  # old day's gap
    s.record_event("load", model="m")
    await s.flush()
    clock.t += 2 * DAY_S + 1
    s.record_request(req(clock.t - 60))  # gap, today
    s.record_event("unload", model="m")
    await s.flush()

    await s.prune()
    assert query(db_path, "SELECT count(*) FROM requests") == [(1,)]
    assert query(db_path, "SELECT kind FROM events") == [("unload",)]
    assert query(db_path, "SELECT count(*) FROM idle_histograms") == [(1,)]
    assert s.idle_histogram("m", days=14).samples == 1
    assert s.status()["rows"] == 1


async def test_prune_of_a_long_history_keeps_the_write_ahead_log_small(
    opener, db_path, clock, monkeypatch
):
    """A prune deletes in transactions of at most PRUNE_BATCH rows, so the write-ahead log
    is checkpointed as it goes instead of growing by everything deleted (a year of history
    at 50 models made it 500 MB, kept until llmd stopped), and flushes may run in between."""
    monkeypatch.setattr(store_module, "PRUNE_BATCH", 2_000)
    s = await opener(retention_days=2)
    await s.close()
    old = [(T0 - 30 * DAY_S + i, "m", "/api/chat", 200, 1.0, 0, f"{i:016x}") for i in range(20_000)]
    with sqlite3.connect(db_path) as conn:
        conn.executemany(
            "INSERT INTO requests (time, model, endpoint, status, duration_s, waited_for_load,"
            " request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            old,
        )
        conn.executemany(
            "INSERT INTO events (time, kind, model, reason) VALUES (?, 'load', 'm', 'x')",
            [(t,) for t, *_ in old],
        )
    conn.close()
    s = await opener(retention_days=2)
    s.record_request(req(clock.t))
    assert await s.flush()
    await s._db.execute("PRAGMA wal_autocheckpoint = 50")  # 200 KiB: the data is ~5 MB
    statements: list[str] = []
    await s._db.set_trace_callback(statements.append)
    await s.prune()
    assert statements.count("BEGIN IMMEDIATE") >= 20  # 10 batches of each table at least
    assert side(db_path, "-wal").stat().st_size < 1_000_000
    assert s.status()["rows"] == 1
    assert query(db_path, "SELECT count(*) FROM events") == [(0,)]


async def test_memory_holds_only_the_days_the_policy_reads(opener, db_path, clock):
    """With retention_days beyond the policy's 14 days, older day histograms stay in the
    database but not in memory: not read at open, and dropped from memory by a prune (a year
    of them cost ~20 MB of RSS at 50 models); what the policy reads is the same."""
    s = await opener(retention_days=365)
    for day in (30, 13, 0):  # a gap on each of three days: 30, 13 and 0 days ago
        t = clock.t - day * DAY_S
        s.record_request(req(t - 100))
        s.record_request(req(t))
    await s.flush()
    recent = s.idle_histogram("m").to_dict()
    # Days 13 and 0; each one's first request ends a gap of weeks, out of the histogram's range.
    assert recent == hist(99, 99, 1000 * DAY_S, 1000 * DAY_S)
    await s.prune()
    assert len(s.learned.hists["m"]) == 2
    await s.close()
    assert query(db_path, "SELECT count(*) FROM idle_histograms") == [(3,)]

    s2 = await opener(retention_days=365)
    assert len(s2.learned.hists["m"]) == 2
    assert s2.idle_histogram("m").to_dict() == recent


async def test_events_newest_first_with_filters(opener, clock):
    """events() lists newest first, unwritten ones included, filtered by model and since."""
    s = await opener()
    for i, kind in enumerate(["load", "pin", "evict", "crash"]):
        clock.t = T0 + i
        s.record_event(
            kind,
            model="a" if i % 2 == 0 else "b",
            backend="gpu0",
            reason=f"r{i}",
            request_id=f"q{i}" if i else None,
        )
        if i == 1:
            await s.flush()  # two written, two still buffered
    evs = await s.events()
    assert [e["kind"] for e in evs] == ["crash", "evict", "pin", "load"]
    assert evs[0] == {
        "time": T0 + 3,
        "kind": "crash",
        "model": "b",
        "backend": "gpu0",
        "reason": "r3",
        "request_id": "q3",
    }
    assert [e["request_id"] for e in evs] == ["q3", "q2", "q1", None]  # written and not
    assert [e["kind"] for e in await s.events(model="a")] == ["evict", "load"]
    assert [e["kind"] for e in await s.events(kinds={"pin", "crash"})] == ["crash", "pin"]
    assert [e["kind"] for e in await s.events(since=T0 + 1)] == ["crash", "evict", "pin"]
    assert [e["kind"] for e in await s.events(limit=1)] == ["crash"]


async def test_model_facts_average_load_times_and_keep_unset_fields(opener):
    """load_s is a moving average of loads; a None argument keeps the old value."""
    s = await opener()
    assert s.model_facts("m") is None
    await s.set_model_facts("m", size_vram=5_000, size=6_000, load_s=10.0)
    f = await s.set_model_facts("m", load_s=20.0)
    assert (f.size_vram, f.size, f.loads) == (5_000, 6_000, 2)
    assert 10.0 < f.load_s < 20.0
    assert s.model_facts("m") == f
    assert s.model_facts("other") is None  # facts are per model


async def test_learned_state_survives_restart(opener, db_path, clock):
    """Histograms, the roll-up watermark, pins and facts come back after close and reopen."""
    s = await opener()
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))
    await s.set_pin("a", True)
    await s.set_pin("b", True)
    await s.set_pin("b", False)
    facts = await s.set_model_facts("m", size_vram=1, load_s=2.0)
    await s.close()

    s2 = await opener()
    assert s2.idle_histogram("m").to_dict() == hist(99)
    assert s2.pins() == {"a"}
    assert s2.model_facts("m") == facts
    s2.record_request(req(T0 + 300))  # counted once, from the persisted watermark
    await s2.flush()
    assert s2.idle_histogram("m").to_dict() == hist(99, 199)
    assert query(db_path, "SELECT count(*) FROM requests") == [(3,)]


async def test_run_flushes_each_interval_and_on_stop(opener, db_path):
    """run() writes within its flush interval and once more when stopped."""
    s = await opener()
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop, flush_s=0.02))
    s.record_request(req(T0))
    for _ in range(100):
        await asyncio.sleep(0.01)
        # pending is 0 from the moment a write starts: wait for the row itself.
        if s.status()["rows"] == 1:
            break
    assert query(db_path, "SELECT count(*) FROM requests") == [(1,)]
    s.record_request(req(T0 + 5))
    stop.set()
    await task
    assert query(db_path, "SELECT count(*) FROM requests") == [(2,)]


@pytest.mark.parametrize(
    "change",
    [
        "nothing",
        "request",
        "event",
        "pin",
        "facts",
        "baselines",
    ],
)
async def test_flush_touches_the_database_only_with_something_to_write(opener, change):
    """An idle flush (nothing recorded or learned since the last one) runs no SQL at all: an
    idle llmd flushes every second. Anything new is written as before."""
    s = await opener()
    s.record_request(req(T0))
    assert await s.flush()
    statements: list[str] = []
    await s._db.set_trace_callback(statements.append)
    if change == "request":
        s.record_request(req(T0 + 100))
    elif change == "event":
        s.record_event("load", model="m")
    elif change == "pin":
        s.learned.set_pin("m", True)  # as set_pin does, without its own flush
    elif change == "facts":
        s.learned.set_model_facts("m", 7, 7, 1.0)
    elif change == "baselines":
        s.set_baselines("m", {"ttft": [0.1]})
    assert await s.flush()
    if change == "nothing":
        assert statements == []
    else:
        assert statements[0] == "BEGIN IMMEDIATE" and statements[-1] == "COMMIT"


async def test_corrupt_database_is_moved_aside_and_replaced(opener, db_path, caplog):
    """A file that is not a database is renamed .corrupt-<time> and a new one is started."""
    db_path.write_bytes(b"this is not a database" * 100)
    s = await opener()
    assert s.degraded is None
    aside = db_path.with_name("llmd.db.corrupt-20231115T010000Z")
    assert s.moved_aside == aside
    assert aside.read_bytes().startswith(b"this is not")
    assert "is corrupt" in caplog.text
    s.record_request(req(T0))
    assert await s.flush()
    assert query(db_path, "SELECT count(*) FROM requests") == [(1,)]
    assert s.status()["moved_aside"] == str(aside)


async def test_unopenable_path_degrades_and_keeps_learning_in_memory(opener, tmp_path):
    """A database that cannot be opened degrades the store; it still rolls up and never raises."""
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "llmd.db"
    s = await opener(path)
    assert s.degraded == (
        f"cannot open database {path}: {tmp_path / 'file'} is not a directory;"
        " learned state is not being saved"
    )
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))
    s.record_event("load", model="m")
    await s.set_pin("m", True)
    assert not await s.flush()
    assert s.idle_histogram("m").to_dict() == hist(99)
    assert s.pins() == {"m"}
    assert [e["kind"] for e in await s.events()] == ["load", "degraded"]
    assert s.status()["pending"] == 4
    await s.prune()
    await s.close()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
async def test_unwritable_directory_degrades(opener, tmp_path):
    """A state directory without write permission degrades the store."""
    d = tmp_path / "ro"
    d.mkdir(mode=0o500)
    s = await opener(d / "llmd.db")
    assert s.degraded is not None and "no write permission" in s.degraded


async def test_buffers_are_bounded_and_drops_counted(opener, tmp_path):
    """With no database, the oldest records are dropped and counted; gaps are still learned."""
    (tmp_path / "file").write_text("")
    s = await opener(tmp_path / "file" / "llmd.db", max_pending=5)
    for i in range(8):
        s.record_request(req(T0 + 100 * i))
    for _ in range(7):
        s.record_event("load")
    await s.flush()
    assert s.status()["pending"] == 10
    assert s.status()["dropped"] == 3 + 3  # the events' first is the store's own "degraded"
    assert s.idle_histogram("m").samples == 7


async def test_database_is_held_exclusively_without_a_shm_file(opener, db_path):
    """The open database has no -shm file to fault on (SIGBUS) and no other process can lock it."""
    s = await opener()
    s.record_request(req(T0))
    assert await s.flush()
    assert not side(db_path, "-shm").exists()
    assert side(db_path, "-wal").exists()
    other = sqlite3.connect(db_path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM requests").fetchall()
    finally:
        other.close()
    s.record_request(req(T0 + 100))
    assert await s.flush()
    await s.close()
    assert query(db_path, "SELECT count(*) FROM requests") == [(2,)]


async def test_locked_at_open_merges_memory_into_database_later(opener, db_path):
    """State learned while the database was unreadable is merged with what it held."""
    s = await opener()
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))
    await s.set_pin("a", True)
    await s.set_model_facts("m", size_vram=10, load_s=4.0)
    await s.close()
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("PRAGMA journal_mode = DELETE")  # so that an exclusive lock blocks readers
    other.execute("BEGIN EXCLUSIVE")
    try:
        s2 = await opener()
        assert s2.degraded is not None and "locked" in s2.degraded
        s2.record_request(req(T0 + 300))  # gap 199 from the database's watermark, at merge
        s2.record_request(req(T0 + 400))  # gap 99 while degraded
        assert not await s2.set_pin("b", True)  # kept in memory, without waiting out the lock
        await s2.set_model_facts("m", load_s=4.0)
        assert not await s2.flush()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await s2.flush()
    assert s2.idle_histogram("m").to_dict() == hist(99, 199, 99)
    assert s2.pins() == {"a", "b"}
    facts = s2.model_facts("m")
    assert facts is not None and (facts.size_vram, facts.loads) == (10, 2)
    await s2.close()
    s3 = await opener()
    assert s3.idle_histogram("m").to_dict() == hist(99, 199, 99)
    assert s3.pins() == {"a", "b"}
    assert query(db_path, "SELECT count(*) FROM requests") == [(4,)]


async def test_full_disk_keeps_batch_for_retry(opener, db_path):
    """A write that runs out of space is rolled back and retried; nothing is counted twice."""
    s = await opener()
    s.record_request(req(T0))
    await s.flush()
    ((pages,),) = query(db_path, "PRAGMA page_count")
    # The seam: SQLite's own size cap raises the same SQLITE_FULL a full disk does.
    await s._db.execute(f"PRAGMA max_page_count = {pages}")
    for i in range(1, 300):
        s.record_request(req(T0 + 100 * i, model="x" * 200))
    assert not await s.flush()
    assert s.degraded is not None and "disk is full" in s.degraded
    assert s.status()["pending"] == 299 + 1  # and the store's own "degraded" event
    await s._db.execute("PRAGMA max_page_count = 1000000")
    assert await s.flush()
    assert query(db_path, "SELECT count(*) FROM requests") == [(300,)]
    assert s.idle_histogram("x" * 200).samples == 298


async def test_newer_schema_degrades_without_touching_the_file(opener, db_path):
    """A database from a newer llmd is left alone and the store runs from memory."""
    with sqlite3.connect(db_path) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    s = await opener()
    assert s.degraded == (
        f"database {db_path} has schema version 99, newer than this llmd's"
        f" {store_module.SCHEMA_VERSION} (written by a newer llmd?);"
        " learned state is not being saved"
    )
    s.record_request(req(T0))
    assert not await s.flush()
    assert query(db_path, "SELECT count(*) FROM sqlite_master") == [(0,)]


async def test_migrations_upgrade_an_older_database(opener, db_path, monkeypatch):
    """Numbered migrations bring an older database up to SCHEMA_VERSION."""
    s = await opener()
    await s.close()
    nxt = store_module.SCHEMA_VERSION + 1
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", nxt)
    monkeypatch.setattr(
        store_module, "MIGRATIONS", {nxt: "ALTER TABLE events ADD COLUMN extra TEXT;"}
    )
    s2 = await opener()
    assert s2.degraded is None
    assert query(db_path, "PRAGMA user_version") == [(nxt,)]
    assert "extra" in [r[1] for r in query(db_path, "PRAGMA table_info(events)")]


async def test_version_2_database_gains_the_baselines_table(opener, db_path):
    """A schema 2 database (no latency_baselines) is migrated to 3 and keeps its rows."""
    with sqlite3.connect(db_path) as conn:
        v2 = store_module.SCHEMA.replace(store_module._BASELINES, "")
        conn.executescript(v2 + "PRAGMA user_version = 2;")
        conn.execute("INSERT INTO pins (model) VALUES ('a')")
    s = await opener()
    assert s.degraded is None and s.pins() == {"a"}
    assert query(db_path, "PRAGMA user_version") == [(3,)]
    s.set_baselines("m", {"ttft": [0.1, 0.2], "tpot": [0.01]})
    assert await s.flush()
    assert query(db_path, "SELECT model FROM latency_baselines") == [("m",)]


async def test_baselines_are_kept_across_a_restart(opener):
    """Latency baselines are written behind memory and read back at the next start."""
    s = await opener()
    s.set_baselines("m", {"ttft": [0.1, 0.2], "tpot": [0.01, 0.02]})
    await s.close()
    s2 = await opener()
    assert s2.baselines() == {"m": {"ttft": [0.1, 0.2], "tpot": [0.01, 0.02]}}


async def test_request_fields_for_contention_are_not_stored(opener, db_path):
    """queued_s and streamed travel with a request record but are not columns."""
    s = await opener()
    s.record_request(req(T0, queued_s=1.5, streamed=True))
    assert await s.flush()
    assert query(db_path, "SELECT count(*) FROM requests") == [(1,)]


async def test_corruption_found_while_running_moves_the_file_aside(opener, db_path, clock):
    """Corruption found by a write moves the file aside; memory's whole state goes to a new one."""
    s = await opener()
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))
    await s.set_pin("a", True)
    assert await s.flush()
    # Checkpoint and drop the cache, so the store must read pages from the file; then break it.
    await s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    await s._db.execute("PRAGMA shrink_memory")
    overwrite_start(db_path, b"garbage!" * 512)
    s.record_request(req(T0 + 300))
    assert not await s.flush()
    assert s.degraded is not None and "is corrupt" in s.degraded
    assert s.moved_aside is not None and s.moved_aside.exists()
    assert await s.flush()
    assert s.degraded is None
    assert query(db_path, "SELECT model FROM pins") == [("a",)]
    assert query(db_path, "SELECT count(*) FROM idle_histograms") == [(1,)]
    assert s.idle_histogram("m").to_dict() == hist(99, 199)


def _learn(s: Store) -> None:
    s.record_request(req(T0))
    s.record_request(req(T0 + 100))


@pytest.mark.parametrize("how", ["deleted", "replaced", "wal deleted"])
async def test_deleted_or_replaced_database_is_recreated_from_memory(opener, db_path, caplog, how):
    """A database deleted or replaced under the store is rewritten whole from memory."""
    s = await opener()
    _learn(s)
    assert await s.set_pin("a", True)
    facts = await s.set_model_facts("m", size_vram=7, load_s=3.0)
    if how == "deleted":
        for f in db_path.parent.glob("llmd.db*"):
            f.unlink()
    elif how == "replaced":
        other = db_path.with_name("other.db")
        other.write_bytes(b"")
        other.replace(db_path)
    else:
        side(db_path, "-wal").unlink()
    s.record_request(req(T0 + 300))
    assert await s.flush()
    assert s.degraded is None
    assert "recreating it from what llmd holds in memory" in caplog.text
    await s.close()
    assert query(db_path, "SELECT model FROM pins") == [("a",)]
    s2 = await opener()
    assert s2.pins() == {"a"}
    assert s2.idle_histogram("m").to_dict() == hist(99, 199)
    assert s2.model_facts("m") == facts
    assert "recreated" in [e["kind"] for e in await s2.events()]


async def test_unchanged_database_is_not_recreated(opener, db_path, caplog):
    """Flushes, checkpoints and reopening keep the same file: nothing is taken for a deletion."""
    s = await opener()
    for i in range(50):
        s.record_request(req(T0 + 10 * i, model="x" * 2000))
        assert await s.flush()
    await s._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert await s.flush()
    await s.close()
    s2 = await opener()
    s2.record_request(req(T0 + 1000))
    assert await s2.flush()
    assert "recreating" not in caplog.text
    assert s2.status()["rows"] == 51


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


@pytest.fixture
def immutable(tmp_path) -> Iterator[Callable[[Path], None]]:
    """Set chattr +i on paths, cleared at the end of the test; skip where chattr cannot."""
    probe = tmp_path / "probe"
    probe.touch()
    if not _chattr("+i", probe):
        pytest.skip("chattr +i does not work on this file system")
    _chattr("-i", probe)
    made: list[Path] = []

    def set_(path: Path) -> None:
        assert _chattr("+i", path)
        made.append(path)

    yield set_
    for path in made:
        _chattr("-i", path)


async def test_immutable_wal_degrades_naming_the_cause_and_pin_waits(opener, db_path, immutable):
    """An immutable -wal degrades the store with the cause named; a pin then says not saved."""
    s = await opener()
    _learn(s)
    assert await s.flush()
    wal = side(db_path, "-wal")
    immutable(wal)
    s.record_request(req(T0 + 300))
    assert not await s.flush()
    assert s.degraded == (
        f"cannot write database {db_path}: {wal} is immutable (chattr +i) (disk I/O error);"
        " learned state is not being saved"
    )
    assert not await s.set_pin("a", True)
    assert s.pins() == {"a"}
    _chattr("-i", wal)
    assert await s.flush()
    assert s.degraded is None
    await s.close()
    assert query(db_path, "SELECT model FROM pins") == [("a",)]
    assert query(db_path, "SELECT count(*) FROM requests") == [(3,)]


async def test_run_retries_soon_after_a_fault_clears(opener, db_path, immutable):
    """While degraded, run() retries with a short backoff, so a cleared fault heals in seconds."""
    s = await opener()
    assert await s.flush()
    wal = side(db_path, "-wal")
    immutable(wal)
    s.record_request(req(T0))
    assert not await s.flush()
    stop = asyncio.Event()
    task = asyncio.create_task(s.run(stop, flush_s=0.05, retry_s=0.2))
    await asyncio.sleep(0.5)  # a few failed retries
    assert s.degraded is not None
    _chattr("-i", wal)
    for _ in range(200):
        await asyncio.sleep(0.02)
        if s.degraded is None:
            break
    assert s.degraded is None and s.status()["pending"] == 0
    stop.set()
    await task


async def test_unsaved_pin_is_named_when_the_store_closes(opener, tmp_path, caplog):
    """Closing with a pin change still unsaved logs which pin is lost."""
    (tmp_path / "file").write_text("")
    s = await opener(tmp_path / "file" / "llmd.db")
    assert not await s.set_pin("m", True)
    await s.close()
    assert "pin changes not saved, lost at this stop: m pinned" in caplog.text


async def test_pins_of_an_unwritable_database_stay_in_force(opener, db_path, immutable, caplog):
    """A database that cannot be opened for writing still lends its pins until it can."""
    s = await opener()
    await s.set_pin("a", True)
    await s.set_pin("b", True)
    _learn(s)
    await s.close()
    immutable(db_path.parent)  # no -wal can be created: SQLite cannot open the database
    s2 = await opener()
    assert s2.degraded is not None and "immutable" in s2.degraded
    assert s2.pins() == {"a", "b"}
    assert "pins read from the file as it is on disk" in caplog.text
    assert not await s2.set_pin("b", False)
    assert not await s2.set_pin("c", True)
    assert s2.pins() == {"a", "c"}
    _chattr("-i", db_path.parent)
    assert await s2.flush()
    assert s2.pins() == {"a", "c"}
    assert s2.idle_histogram("m").to_dict() == hist(99)
    await s2.close()
    assert sorted(query(db_path, "SELECT model FROM pins")) == [("a",), ("c",)]


def test_a_request_row_is_its_first_eleven_fields_in_order() -> None:
    """row() spells the INSERT's columns out (astuple was a tenth of the recording path): it
    must stay the record's first 11 fields, in order, whatever fields are added after them."""
    import dataclasses

    rec = RequestRecord(
        time=1.5,
        model="m",
        endpoint="/api/chat",
        status=200,
        duration_s=0.25,
        ttfb_s=0.1,
        waited_for_load=True,
        load_duration_s=3.0,
        prompt_tokens=7,
        eval_tokens=9,
        request_id="abc",
        queued_s=0.5,
        streamed=True,
    )
    assert rec.row() == dataclasses.astuple(rec)[:11]
    names = [f.name for f in dataclasses.fields(RequestRecord)][:11]
    assert names == [
        "time", "model", "endpoint", "status", "duration_s", "ttfb_s", "waited_for_load",
        "load_duration_s", "prompt_tokens", "eval_tokens", "request_id",
    ]  # fmt: skip
