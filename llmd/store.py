"""The only SQL in llmd: request log, events, and the learned state saved behind memory."""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import math
import os
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import aiosqlite

from llmd.learned import DAY_S, HISTORY_DAYS, Learned, ModelFacts, utc_day
from llmd.policy import IdleHistogram

log = logging.getLogger("llmd.store")

CACHE_KIB = 256  # SQLite's page cache (PRAGMA cache_size): writes are appends, reads are rare
PRUNE_BATCH = 20_000  # rows a prune deletes per transaction (see prune)

SCHEMA_VERSION = 3

# The whole current schema. A new database gets it in one transaction with user_version set to
# SCHEMA_VERSION; an older database gets MIGRATIONS instead, so the two must agree.
SCHEMA = """
CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,                 -- unix seconds at request start
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    status INTEGER NOT NULL,
    ttfb_s REAL,
    duration_s REAL NOT NULL,
    waited_for_load INTEGER NOT NULL,
    load_duration_s REAL,
    prompt_tokens INTEGER,
    eval_tokens INTEGER,
    request_id TEXT                     -- the client's X-Request-Id, or llmd's own
);
CREATE INDEX requests_time ON requests (time);
CREATE INDEX requests_model_time ON requests (model, time);

-- One policy.IdleHistogram (to_dict() as JSON) per model per UTC day, rolled up from requests.
CREATE TABLE idle_histograms (
    model TEXT NOT NULL,
    day TEXT NOT NULL,                  -- YYYY-MM-DD, UTC
    histogram TEXT NOT NULL,
    PRIMARY KEY (model, day)
) WITHOUT ROWID;

-- Roll-up watermark: the end of the model's latest busy period already counted. It is written
-- in the same transaction as the requests it comes from, so a restart never counts a gap twice.
CREATE TABLE idle_rollup (
    model TEXT PRIMARY KEY,
    busy_until REAL NOT NULL
);

CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    model TEXT,
    backend TEXT,
    reason TEXT NOT NULL DEFAULT '',
    request_id TEXT                     -- of the proxied request it happened in, if any
);
CREATE INDEX events_time ON events (time);

CREATE TABLE model_facts (
    model TEXT PRIMARY KEY,
    size_vram INTEGER,                  -- bytes in GPU memory after its last full load
    size INTEGER,                       -- bytes in memory in all
    load_s REAL,                        -- moving average of measured load times
    loads INTEGER NOT NULL,
    updated REAL NOT NULL
);

CREATE TABLE pins (
    model TEXT PRIMARY KEY
);
"""
_BASELINES = """
-- Per model, the quiet requests' latencies its contention baselines are the median of
-- (llmd.contention): JSON {"ttft": [seconds, ...], "tpot": [seconds, ...]}.
CREATE TABLE latency_baselines (
    model TEXT PRIMARY KEY,
    samples TEXT NOT NULL,
    updated REAL NOT NULL
);
"""
SCHEMA += _BASELINES

# MIGRATIONS[n] turns a version n-1 database into version n.
MIGRATIONS: dict[int, str] = {
    2: "ALTER TABLE requests ADD COLUMN request_id TEXT;\n"
    "ALTER TABLE events ADD COLUMN request_id TEXT;",
    3: _BASELINES,
}

# SQLite primary result codes (sqlite3.Error.sqlite_errorcode & 0xFF).
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26

# Linux's FS_IOC_GETFLAGS and FS_IMMUTABLE_FL, to name `chattr +i` as the cause of a failure.
_FS_IOC_GETFLAGS, _FS_IMMUTABLE_FL = 0x80086601, 0x10


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One proxied request, as the proxy saw it."""

    time: float  # unix seconds at start
    model: str  # "" for requests that use no model; those are not idle-gap history
    endpoint: str
    status: int
    duration_s: float
    ttfb_s: float | None = None
    waited_for_load: bool = False
    load_duration_s: float | None = None  # Ollama's load_duration, in seconds
    prompt_tokens: int | None = None
    eval_tokens: int | None = None
    request_id: str | None = None  # the client's X-Request-Id, or llmd's own
    # Not stored: for the contention rule only.
    queued_s: float = 0.0  # time it waited in llmd's queue for its turn
    streamed: bool = False  # answered as a stream (NDJSON or SSE): ttfb_s is the first token's

    def row(self) -> tuple[Any, ...]:
        """Its values in the requests table's INSERT order (the first 11 fields)."""
        return (
            self.time,
            self.model,
            self.endpoint,
            self.status,
            self.duration_s,
            self.ttfb_s,
            self.waited_for_load,
            self.load_duration_s,
            self.prompt_tokens,
            self.eval_tokens,
            self.request_id,
        )


# time, kind, model, backend, reason
_Event = tuple[float, str, str | None, str | None, str, str | None]
# An event as `Store.events` lists it, and as `llmctl events` shows it.
EVENT_KEYS = ("time", "kind", "model", "backend", "reason", "request_id")
_T = TypeVar("_T")


class SchemaTooNewError(Exception):
    """The database was written by a newer llmd whose schema this one does not know."""


def _errcode(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _file_id(path: Path) -> tuple[int, int] | None:
    """The file's (device, inode), or None if there is no file at the path."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _immutable(path: Path) -> bool:
    """Whether the file or directory has the immutable attribute (chattr +i)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        buf = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, struct.pack("i", 0))
        return bool(struct.unpack("i", buf)[0] & _FS_IMMUTABLE_FL)
    except OSError:
        return False  # not supported by this file system
    finally:
        os.close(fd)


def _disk_fault(path: Path) -> str | None:
    """What in the database's directory stops writes, as far as can be seen from outside."""
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        return f"{parent} is not a directory"
    try:
        vfs = os.statvfs(parent)
    except OSError:
        return None
    if vfs.f_flag & os.ST_RDONLY:
        return f"{parent} is on a read-only file system"
    for p in (path, Path(f"{path}-wal"), parent):
        if _immutable(p):
            return f"{p} is immutable (chattr +i)"
    if vfs.f_bavail == 0:
        return f"no space left on the file system of {parent}"
    if not os.access(parent, os.W_OK):
        return f"no write permission on {parent}"
    return None


async def _fetchall(db: aiosqlite.Connection, sql: str, params: Iterable[Any] = ()) -> list[Any]:
    async with db.execute(sql, tuple(params)) as cur:
        return list(await cur.fetchall())


class Store:
    """llmd's learned state in one SQLite file, served from memory so a bad disk never stops it."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        retention_days: int,
        clock: Callable[[], float],
        busy_timeout_s: float,
        max_pending: int,
    ) -> None:
        self.path = Path(path)
        self.retention_days = retention_days
        self.degraded: str | None = None  # why learned state is not being saved, or None
        self.moved_aside: Path | None = None  # where a corrupt database was moved, if it was
        self._clock = clock
        self._busy_timeout_s = busy_timeout_s
        self._max_pending = max_pending
        self._db: aiosqlite.Connection | None = None
        # (device, inode) of the open database and its WAL, to notice them deleted or replaced.
        self._db_id: tuple[int, int] | None = None
        self._wal_id: tuple[int, int] | None = None
        self._lock = asyncio.Lock()  # one transaction at a time on the one connection
        self._closed = False
        self._rows = 0
        self._dropped = 0
        self._drop_logged = False

        # Buffers: requests wait in _unrolled until the next roll-up, then in _unwritten.
        self._unrolled: list[RequestRecord] = []
        self._unwritten: deque[RequestRecord] = deque()
        self._events: deque[_Event] = deque()

        # The learned state, whole in memory; written behind it when the disk allows.
        self.learned = Learned(clock)

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        retention_days: int = 14,
        clock: Callable[[], float] = time.time,
        *,
        busy_timeout_s: float = 5.0,
        max_pending: int = 10_000,
    ) -> Store:
        """Open (or create) the database; on any problem return a degraded, memory-only store."""
        store = cls(
            path,
            retention_days=retention_days,
            clock=clock,
            busy_timeout_s=busy_timeout_s,
            max_pending=max_pending,
        )
        async with store._lock:
            await store._connect()
        return store

    # -- recording (synchronous, never touches the disk) ------------------------------------

    def record_request(self, rec: RequestRecord) -> None:
        """Queue one request for the next flush."""
        if not (math.isfinite(rec.time) and math.isfinite(rec.duration_s)):
            # A NaN would stop the model's roll-up for good and fail every batch it is in.
            log.error("dropping a request record with a non-finite time: %r", rec)
            self._dropped += 1
            return
        self._unrolled.append(rec)
        if len(self._unrolled) >= self._max_pending:
            # Nobody is flushing (or the loop is starved): keep learning, bound the memory.
            self._roll_up()

    def record_event(
        self,
        kind: str,
        *,
        model: str | None = None,
        backend: str | None = None,
        reason: str = "",
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Queue one lifecycle event (load, unload, evict, crash, pin, degraded...); return it
        as `events` will list it."""
        event = (self._clock(), kind, model, backend, reason, request_id)
        self._push(self._events, event)
        return dict(zip(EVENT_KEYS, event, strict=True))

    # -- reading (synchronous, from memory) -------------------------------------------------

    def idle_histogram(self, model: str, days: int = HISTORY_DAYS) -> IdleHistogram:
        """The model's idle gaps over the last `days` UTC days, today included."""
        # The daemon asks as a model goes idle, right after its last request was recorded:
        # count that request's gap now rather than at the next flush.
        self._roll_up()
        return self.learned.idle_histogram(model, days)

    def model_facts(self, model: str) -> ModelFacts | None:
        """What has been learned about the model, if anything."""
        return self.learned.model_facts(model)

    def pins(self) -> set[str]:
        """The models pinned at runtime."""
        return self.learned.pins()

    def baselines(self) -> dict[str, dict[str, list[float]]]:
        """Every model's saved latency baseline samples, by kind."""
        return {m: {k: list(v) for k, v in b.items()} for m, b in self.learned.baselines.items()}

    def set_baselines(self, model: str, samples: dict[str, list[float]]) -> None:
        """Remember a model's latency baseline samples; written at the next flush."""
        self.learned.set_baselines(model, samples)

    def status(self) -> dict[str, Any]:
        """The store's health for the admin API."""
        return {
            "path": str(self.path),
            "degraded": self.degraded,
            "pending": len(self._unrolled) + len(self._unwritten) + len(self._events),
            "dropped": self._dropped,
            "rows": self._rows,
            "moved_aside": str(self.moved_aside) if self.moved_aside else None,
        }

    async def events(
        self,
        limit: int = 50,
        model: str | None = None,
        since: float | None = None,
        kinds: Collection[str] = (),
    ) -> list[dict[str, Any]]:
        """Events newest first, optionally only one model's, those at or after `since`, or
        those of some kinds."""

        def wanted(e: _Event) -> bool:
            return (
                (model is None or e[2] == model)
                and (since is None or e[0] >= since)
                and (not kinds or e[1] in kinds)
            )

        async with self._lock:
            found = [e for e in reversed(self._events) if wanted(e)]
            if self._db is not None:
                sql = "SELECT time, kind, model, backend, reason, request_id FROM events WHERE 1"
                params: list[Any] = []
                if model is not None:
                    sql += " AND model = ?"
                    params.append(model)
                if since is not None:
                    sql += " AND time >= ?"
                    params.append(since)
                if kinds:
                    sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
                    params += sorted(kinds)
                sql += " ORDER BY time DESC, id DESC LIMIT ?"
                params.append(limit)
                try:
                    found += [tuple(r) for r in await _fetchall(self._db, sql, params)]
                except Exception as exc:
                    log.warning("reading events from %s failed: %s", self.path, _one_line(exc))
        found.sort(key=lambda e: e[0], reverse=True)  # stable: unwritten (newer) ones first
        return [dict(zip(EVENT_KEYS, e, strict=True)) for e in found[:limit]]

    # -- learned facts and pins (saved at once when the database is healthy) ------------------

    async def set_model_facts(
        self,
        model: str,
        *,
        size_vram: int | None = None,
        size: int | None = None,
        load_s: float | None = None,
    ) -> ModelFacts:
        """Remember what a load of the model showed; None leaves a fact as it was."""
        facts = self.learned.set_model_facts(model, size_vram, size, load_s)
        await self._flush_if_healthy()
        return facts

    async def set_pin(self, model: str, pinned: bool) -> bool:
        """Pin or unpin the model at runtime; True if saved, False if in memory until it is."""
        self.learned.set_pin(model, pinned)
        return await self._flush_if_healthy()

    # -- background work --------------------------------------------------------------------

    async def run(
        self,
        stop: asyncio.Event,
        *,
        flush_s: float = 1.0,
        prune_s: float = 600.0,
        retry_s: float = 5.0,
    ) -> None:
        """Flush every flush_s (retrying at most retry_s apart while degraded) until stop; prune."""
        loop = asyncio.get_running_loop()
        next_prune = next_try = loop.time()
        backoff = flush_s
        while not stop.is_set():
            now = loop.time()
            if now >= next_prune:
                await self.prune()
                next_prune = now + prune_s
            if self.degraded is None or now >= next_try:
                # A fault often clears in seconds (space freed, a lock released): retry soon,
                # then less often; a retry is one cheap open or transaction.
                backoff = flush_s if await self.flush() else min(backoff * 2, retry_s)
                next_try = loop.time() + backoff  # only consulted while degraded
            else:
                self._roll_up()  # the policy keeps learning between retries
            try:
                await asyncio.wait_for(stop.wait(), flush_s)
            except TimeoutError:
                pass
        await self.flush()

    async def flush(self) -> bool:
        """Roll up new requests and write all that is pending in one transaction; True if saved."""
        async with self._lock:
            self._roll_up()
            if self._closed:
                return False
            if self._db is not None and (gone := self._files_gone()) is not None:
                # Writes would go on into an unlinked file and vanish at the next start.
                log.error(
                    "%s while llmd had it open; recreating it from what llmd holds in memory"
                    " (pins, learned keep-alive, model facts; older request rows and events are"
                    " lost)",
                    gone,
                )
                self.record_event("recreated", reason=f"{gone}; recreated from memory")
                await self._close_db()
            if self._db is None and not await self._connect():
                return False
            idle = not (self._unwritten or self._events or self.learned.changed)
            if idle and self.degraded is None:
                # Nothing to write: an idle llmd flushes every second and must not wake the
                # database (and its thread) each time for an empty transaction.
                return True
            return await self._write()

    async def prune(self) -> None:
        """Forget requests, events and histograms older than retention_days."""
        now = self._clock()
        cutoff = now - self.retention_days * DAY_S
        first_day = utc_day(now - (self.retention_days - 1) * DAY_S)
        self.learned.prune(cutoff, self._first_day_in_memory(now))
        # Requests and events go PRUNE_BATCH rows per transaction: each commit lets SQLite
        # checkpoint the write-ahead log and start it over, and lets flushes in between. In one
        # transaction, pruning a long history (a lowered retention_days) grew the log by all
        # it deleted, and the log file keeps its largest size until llmd stops.
        for table in ("requests", "events"):
            while (deleted := await self._prune_batch(table, cutoff)) == PRUNE_BATCH:
                pass
            if deleted is None:
                return
        async with self._lock:
            db = self._db
            if db is None or self.degraded is not None or self._closed:
                return
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    await db.execute("DELETE FROM idle_histograms WHERE day < ?", (first_day,))
                    await db.execute("DELETE FROM idle_rollup WHERE busy_until < ?", (cutoff,))
                    await db.execute("COMMIT")
                except BaseException:
                    await self._rollback(db)
                    raise
                (self._rows,) = (await _fetchall(db, "SELECT count(*) FROM requests"))[0]
            except Exception as exc:
                await self._failed(exc)

    async def _prune_batch(self, table: str, cutoff: float) -> int | None:
        """Delete up to PRUNE_BATCH rows of `table` older than cutoff in one transaction; how
        many, or None when the database cannot be written now."""
        async with self._lock:
            db = self._db
            if db is None or self.degraded is not None or self._closed:
                return None
            try:
                await db.execute("BEGIN IMMEDIATE")
                try:
                    async with db.execute(
                        f"DELETE FROM {table} WHERE id IN"
                        f" (SELECT id FROM {table} WHERE time < ? LIMIT ?)",
                        (cutoff, PRUNE_BATCH),
                    ) as cur:
                        deleted = cur.rowcount
                    await db.execute("COMMIT")
                except BaseException:
                    await self._rollback(db)
                    raise
            except Exception as exc:
                await self._failed(exc)
                return None
        return deleted

    async def close(self) -> None:
        """Write what is pending and close the database."""
        if self._closed:
            return
        if not await self.flush() and (unsaved := self.learned.unsaved_pins()):
            # Said as the daemon stops, so that nobody takes a lost pin for a kept one.
            log.error(
                "pin changes not saved, lost at this stop: %s",
                ", ".join(f"{m} {'pinned' if pinned else 'unpinned'}" for m, pinned in unsaved),
            )
        async with self._lock:
            self._closed = True
            await self._close_db()

    # -- internals --------------------------------------------------------------------------

    def _push(self, buf: deque[_T], item: _T) -> None:
        """Append to a bounded buffer, dropping (and counting) the oldest item when it is full."""
        if len(buf) >= self._max_pending:
            buf.popleft()
            self._count_drops(1)
        buf.append(item)

    def _count_drops(self, n: int) -> None:
        self._dropped += n
        if not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "store buffer full (%d records); dropping the oldest until %s is writable",
                self._max_pending,
                self.path,
            )

    def _requeue(self, older: deque[_T], newer: deque[_T]) -> deque[_T]:
        """A failed batch goes back in front of what arrived meanwhile, within the bound."""
        merged = older
        merged.extend(newer)
        excess = len(merged) - self._max_pending
        for _ in range(max(excess, 0)):
            merged.popleft()
        if excess > 0:
            self._count_drops(excess)
        return merged

    def _first_day_in_memory(self, now: float) -> str:
        """The oldest UTC day whose idle-gap histograms memory holds: those the policy reads,
        within retention. A longer retention keeps older days in the database only: a year of
        them would cost tens of MB of memory at 50 models, and be read at every start."""
        return utc_day(now - (min(self.retention_days, HISTORY_DAYS) - 1) * DAY_S)

    def _roll_up(self) -> None:
        """Count the idle gaps that new requests close, and move them on to be written."""
        if not self._unrolled:
            return
        # Requests are recorded when they end; gaps are between starts and earlier ends.
        batch = sorted(self._unrolled, key=lambda r: r.time)
        self._unrolled = []
        for rec in batch:
            self._push(self._unwritten, rec)
            if rec.model:
                self.learned.count_gap(rec.model, rec.time, rec.duration_s)

    async def _flush_if_healthy(self) -> bool:
        # While degraded the run loop retries; an admin call should not wait out a lock.
        if self._db is not None and self.degraded is None:
            return await self.flush()
        return False

    async def _connect(self) -> bool:
        """Open the database, moving it aside once if it is corrupt; the lock is held."""
        try:
            self._db = await self._open_db()
            return True
        except Exception as exc:
            if _errcode(exc) not in (_CORRUPT, _NOTADB):
                self._set_degraded(exc)
                await self._peek_pins(exc)
                return False
            if not self._move_aside(exc):
                return False
        try:
            self._db = await self._open_db()
            return True
        except Exception as exc:
            self._set_degraded(exc)
            return False

    async def _peek_pins(self, exc: Exception) -> None:
        """Read the pins of a database that cannot be opened for writing, to keep them in force."""
        learned = self.learned
        if learned.loaded or learned.peeked_pins or _errcode(exc) in (_BUSY, _LOCKED):
            return  # another writer may be halfway through: no lock-free read then
        # immutable=1 reads the file as it is, without locks, -wal or -shm: a read-only disk
        # allows nothing more. Pins written since the last checkpoint may be missing.
        uri = f"file:{quote(str(self.path.absolute()))}?immutable=1"
        try:
            if not self.path.is_file():
                return
            async with aiosqlite.connect(uri, uri=True) as db:
                rows = await _fetchall(db, "SELECT model FROM pins")
        except Exception as err:
            log.debug("database %s: pins unreadable too: %s", self.path, _one_line(err))
            return
        learned.peeked_pins = {str(r[0]) for r in rows}
        if learned.peeked_pins:
            log.warning(
                "database %s: pins read from the file as it is on disk, in force meanwhile: %s",
                self.path,
                ", ".join(sorted(learned.peeked_pins)),
            )

    async def _open_db(self) -> aiosqlite.Connection:
        """Connect, set the pragmas, migrate and read the learned state."""
        # The daemon's state_dir normally exists (systemd StateDirectory); a dev setup may not.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(
            str(self.path), timeout=self._busy_timeout_s, isolation_level=None
        )
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            # Exclusive before WAL: SQLite then keeps the WAL index in heap memory instead of
            # mmapping a -shm file, whose write fault (immutable, full or vanished file) is a
            # SIGBUS that kills llmd. llmd is the database's only user, so the lock costs nothing
            # but outside readers while llmd runs (stop llmd, or copy the files, to inspect it).
            await db.execute("PRAGMA locking_mode = EXCLUSIVE")
            ((mode,),) = await _fetchall(db, "PRAGMA journal_mode = WAL")
            if str(mode).lower() != "wal":
                log.warning("database %s: WAL mode unavailable, using %s", self.path, mode)
            # In WAL mode NORMAL is crash-safe; a power loss can only lose the last flushes.
            await db.execute("PRAGMA synchronous = NORMAL")
            # SQLite caches every page it touches up to 2 MiB by default, so llmd's memory grew
            # with the request log (~100 B per request); llmd reads the database only at start,
            # for `llmctl events` and when pruning, so a small cache costs nothing.
            await db.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
            await self._migrate(db)
            await self._load(db)
        except BaseException:
            try:
                await db.close()
            except Exception:
                pass
            raise
        self._db_id, self._wal_id = _file_id(self.path), _file_id(self._wal_path)
        return db

    @property
    def _wal_path(self) -> Path:
        return Path(f"{self.path}-wal")

    def _files_gone(self) -> str | None:
        """How the open database's files were deleted or replaced behind llmd's back, if so."""
        # The open file keeps its inode number taken, so a new file at the path never has it.
        for name, path, known in (
            (f"database {self.path}", self.path, self._db_id),
            (
                f"database {self.path}: its write-ahead log {self._wal_path}",
                self._wal_path,
                self._wal_id,
            ),
        ):
            if known is None:
                continue
            try:
                now = _file_id(path)
            except OSError:
                continue  # cannot tell; a write says what is wrong
            if now is None:
                return f"{name} was deleted"
            if now != known:
                return f"{name} was replaced by another file"
        return None

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        ((version,),) = await _fetchall(db, "PRAGMA user_version")
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError(
                f"database {self.path} has schema version {version}, newer than this llmd's "
                f"{SCHEMA_VERSION} (written by a newer llmd?)"
            )
        if version == SCHEMA_VERSION:
            return
        if version == 0:
            script = SCHEMA
        else:
            script = "\n".join(MIGRATIONS[v] for v in range(version + 1, SCHEMA_VERSION + 1))
        # One transaction: a failed migration leaves the database as it was.
        await db.executescript(
            f"BEGIN IMMEDIATE;\n{script}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        )
        if version == 0:
            log.info("database %s: created, schema version %d", self.path, SCHEMA_VERSION)
        else:
            log.info("database %s: migrated schema %d -> %d", self.path, version, SCHEMA_VERSION)

    async def _load(self, db: aiosqlite.Connection) -> None:
        """Merge the database's learned state with memory's (see Learned.loaded)."""
        (rows,) = (await _fetchall(db, "SELECT count(*) FROM requests"))[0]
        if self.learned.loaded:
            # Memory is complete: write all of it to this (perhaps new) database.
            self.learned.mark_all_changed()
            self._rows = rows
            return
        first_day = self._first_day_in_memory(self._clock())
        hist_rows = await _fetchall(
            db, "SELECT model, day, histogram FROM idle_histograms WHERE day >= ?", (first_day,)
        )
        busy_rows = await _fetchall(db, "SELECT model, busy_until FROM idle_rollup")
        fact_rows = await _fetchall(
            db, "SELECT model, size_vram, size, load_s, loads, updated FROM model_facts"
        )
        pin_rows = await _fetchall(db, "SELECT model FROM pins")
        baseline_rows = await _fetchall(db, "SELECT model, samples FROM latency_baselines")

        # No awaits below: memory changes all at once or not at all.
        hists: list[tuple[str, str, IdleHistogram]] = []
        for model, day, text in hist_rows:
            try:
                hist = IdleHistogram.from_dict(json.loads(text))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning(
                    "database %s: skipping bad histogram %s %s: %s", self.path, model, day, exc
                )
                continue
            hists.append((model, day, hist))
        baselines = []
        for model, text in baseline_rows:
            try:
                doc = json.loads(text)
                baselines.append((model, {k: [float(v) for v in doc[k]] for k in doc}))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("database %s: skipping bad baseline of %s: %s", self.path, model, exc)
        self.learned.load(
            hists,
            busy_rows,
            [ModelFacts(*r) for r in fact_rows],
            [r[0] for r in pin_rows],
            baselines,
        )
        self._rows = rows

    async def _write(self) -> bool:
        """Write the buffers and changed state in one transaction; the lock is held."""
        db = self._db
        assert db is not None
        reqs, self._unwritten = self._unwritten, deque()
        evs, self._events = self._events, deque()
        learned = self.learned
        changes = learned.take_changes()

        hist_rows = [
            (m, d, json.dumps(learned.hists[m][d].to_dict(), separators=(",", ":")))
            for m, d in changes.hists
            if d in learned.hists.get(m, {})  # else pruned meanwhile
        ]
        busy_rows = [(m, learned.busy_until[m]) for m in changes.busy if m in learned.busy_until]
        fact_rows = [astuple(learned.facts[m]) for m in changes.facts if m in learned.facts]
        now = self._clock()
        baseline_rows = [
            (m, json.dumps(learned.baselines[m], separators=(",", ":")), now)
            for m in changes.baselines
            if m in learned.baselines
        ]
        try:
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(
                    "INSERT INTO requests (time, model, endpoint, status, duration_s, ttfb_s,"
                    " waited_for_load, load_duration_s, prompt_tokens, eval_tokens, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [r.row() for r in reqs],
                )
                await db.executemany(
                    "INSERT INTO events (time, kind, model, backend, reason, request_id)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    evs,
                )
                await db.executemany(
                    "INSERT OR REPLACE INTO idle_histograms (model, day, histogram)"
                    " VALUES (?, ?, ?)",
                    hist_rows,
                )
                await db.executemany(
                    "INSERT OR REPLACE INTO idle_rollup (model, busy_until) VALUES (?, ?)",
                    busy_rows,
                )
                await db.executemany(
                    "INSERT OR REPLACE INTO model_facts"
                    " (model, size_vram, size, load_s, loads, updated) VALUES (?, ?, ?, ?, ?, ?)",
                    fact_rows,
                )
                await db.executemany(
                    "INSERT OR IGNORE INTO pins (model) VALUES (?)",
                    [(m,) for m in changes.pins if m in learned.pinned],
                )
                await db.executemany(
                    "DELETE FROM pins WHERE model = ?",
                    [(m,) for m in changes.pins if m not in learned.pinned],
                )
                await db.executemany(
                    "INSERT OR REPLACE INTO latency_baselines (model, samples, updated)"
                    " VALUES (?, ?, ?)",
                    baseline_rows,
                )
                await db.execute("COMMIT")
            except BaseException:
                await self._rollback(db)
                raise
        except BaseException as exc:
            # Keep everything for the next try, older records ahead of newer ones.
            self._unwritten = self._requeue(reqs, self._unwritten)
            self._events = self._requeue(evs, self._events)
            learned.put_back(changes)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, sqlite3.IntegrityError | sqlite3.InterfaceError):
                # Bad data, not a bad disk: retrying would fail forever, so let the rows go.
                dropped = len(self._unwritten) + len(self._events)
                log.error("dropping %d unwritable records: %s", dropped, _one_line(exc))
                self._dropped += dropped
                self._unwritten.clear()
                self._events.clear()
            await self._failed(exc)
            return False
        self._rows += len(reqs)
        if self._wal_id is None:
            self._wal_id = _file_id(self._wal_path)
        if self.degraded is not None:
            log.warning("database %s is being saved again", self.path)
            self.degraded = None
            self._drop_logged = False
        return True

    async def _failed(self, exc: Exception) -> None:
        """Degrade after a failed write; reconnect later unless the failure is a passing one."""
        self._set_degraded(exc)
        code = _errcode(exc)
        if code in (_BUSY, _LOCKED, _FULL):
            return  # the same connection will do once the lock is gone or space is freed
        await self._close_db()
        if code in (_CORRUPT, _NOTADB):
            self._move_aside(exc)

    async def _rollback(self, db: aiosqlite.Connection) -> None:
        try:
            await db.execute("ROLLBACK")
        except Exception:
            pass  # no transaction left to roll back, or the connection is gone

    async def _close_db(self) -> None:
        db, self._db = self._db, None
        self._db_id = self._wal_id = None
        if db is not None:
            try:
                await db.close()
            except Exception as exc:
                log.warning("closing database %s failed: %s", self.path, _one_line(exc))

    def _move_aside(self, exc: BaseException) -> bool:
        """Rename a corrupt database (and its -wal, -shm) so that a new one can start."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    src.rename(f"{target}{suffix}")
        except OSError as err:
            self._set_degraded(exc, f"; could not move it aside: {_one_line(err)}")
            return False
        self.moved_aside = target
        if self.learned.loaded:
            fate = "what llmd has learned is in memory and goes into a new database"
        else:
            fate = "a new database starts empty; what was learned before is in the moved file"
        log.error(
            "database %s is corrupt (%s); moved it to %s: %s",
            self.path,
            _one_line(exc),
            target,
            fate,
        )
        return True

    def _set_degraded(self, exc: BaseException, extra: str = "") -> None:
        """Say once, in one line, why learned state is not being saved."""
        p, why, code = self.path, _one_line(exc), _errcode(exc)
        if isinstance(exc, SchemaTooNewError):
            what = why
        elif code in (_CORRUPT, _NOTADB):
            what = f"database {p} is corrupt: {why}"
        elif code in (_BUSY, _LOCKED):
            what = f"database {p} is locked by another process: {why}"
        elif code == _FULL:
            what = f"database {p}: disk is full: {why}"
        elif code == _READONLY:
            fault = _disk_fault(p)
            what = f"database {p} is read-only: {f'{fault} ({why})' if fault else why}"
        elif code in (_CANTOPEN, _IOERR) or isinstance(exc, OSError):
            # SQLite says only "disk I/O error" or "unable to open": look for the cause.
            fault = _disk_fault(p)
            if fault is not None:
                why = fault if code == _CANTOPEN or isinstance(exc, OSError) else f"{fault} ({why})"
            verb = "open" if self._db is None else "write"
            what = f"cannot {verb} database {p}: {why}"
        else:
            what = f"database {p} failed: {type(exc).__name__}: {why}"
        reason = f"{what}{extra}; learned state is not being saved"
        if reason != self.degraded:
            unexpected = not isinstance(exc, sqlite3.Error | OSError | SchemaTooNewError)
            log.error("%s", reason, exc_info=exc if unexpected else None)
            # Also in the event history, where `llmctl events` shows it next to its effects.
            self.record_event("degraded", reason=reason)
        self.degraded = reason
