"""Small immutable objects as rows of one SQLite file, for the filesystem backend.

A file per small blob costs an inode, a directory entry, often a new fan-out
directory, and a rename: on a busy volume creating one file takes 0.3–0.9 ms,
so a folder of tiny images imports at the pace of the filesystem's metadata,
not of its bytes. SQLite keeps small values faster than files (see
https://www.sqlite.org/intern-v-extern-blob.html) and makes a whole PutFiles
message's rows durable with one transaction (one fsync of its write-ahead
log). Only staged objects (content-addressed blobs, written once and never
changed) are kept here; conditional puts (array chunks) stay files, so that
plain zarr-python can read an array's directory.

Errors come out as ``OSError`` (ENOSPC on a full volume), the currency of
the filesystem backend, which turns them into the store's domain errors.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gristmill.client.private import private_database
from gristmill.store.catalog import prefix_end
from gristmill.store.objects import ObjectStat, PutResult

__all__ = ["ROW_VERSION_PREFIX", "SmallObjects"]

#: Keys per SQL statement (SQLite allows 32,766 parameters; smaller IN lists plan better).
_BATCH = 500
#: Rows per page of a listing (a listing holds no read transaction between pages).
_PAGE = 1000
#: The write-ahead log is cut back to this size when it restarts. It keeps room
#: for deletes on a full volume (a delete appends to the log before it frees).
WAL_KEPT_BYTES = 4 << 20
#: Pages in the log after which a commit copies it into the database: what the
#: database file may still have to grow by on a full volume (1 MiB; the store's
#: disk reserve, 16 MiB by default, covers it when deletes need it).
_AUTOCHECKPOINT_PAGES = 256
#: Free pages given back per transaction by :meth:`SmallObjects.reclaim`
#: (short transactions: writers wait at most one of them).
_RECLAIM_PAGES = 2048


#: How a row's version token starts (a file's starts with its inode, in hex digits).
ROW_VERSION_PREFIX = "row"


def _version(rowid: int, mtime_ns: int) -> str:
    """A row's version token: distinct from any file's."""
    return f"{ROW_VERSION_PREFIX}{rowid:x}.{mtime_ns:x}"


def _stat(key: str, size: int, mtime_ns: int, rowid: int) -> ObjectStat:
    return ObjectStat(key, size, mtime_ns / 1e9, _version(rowid, mtime_ns))


class SmallObjects:
    """Objects as rows ``(key, data, mtime_ns)`` of ``path``, shared by threads and processes.

    Each thread has its own connection (WAL: readers never wait for a
    writer); writes are ``BEGIN IMMEDIATE`` transactions, so another process
    (``gristmill store gc``) can share the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        private_database(path)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Condition()
        self._closed = False
        self._busy = 0  # calls using a connection now: close() waits for them
        with self._use("open the small-object database") as conn:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new file only
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY NOT NULL, "
                         "data BLOB NOT NULL, mtime_ns INTEGER NOT NULL)")
            conn.execute("CREATE TABLE IF NOT EXISTS upkeep (name TEXT PRIMARY KEY NOT NULL, "
                         "value INTEGER NOT NULL)")

    @contextmanager
    def _use(self, operation: str) -> Iterator[sqlite3.Connection]:
        """This thread's connection, for one call; database errors come out as ``OSError``.

        A full volume is ENOSPC, anything else EIO. :meth:`close` waits until
        no call uses a connection (closing one in use could crash SQLite).
        """
        with self._lock:
            if self._closed:
                raise OSError(errno.EIO, f"cannot {operation}: the store is shutting down")
            self._busy += 1
        try:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                       isolation_level=None)
                with self._lock:
                    self._connections.append(conn)
                conn.execute("PRAGMA busy_timeout=10000")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute(f"PRAGMA journal_size_limit={WAL_KEPT_BYTES}")
                conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
                self._local.conn = conn
            yield conn
        except sqlite3.Error as e:
            raise OSError(self._errno(e), f"cannot {operation} ({self.path}): {e}") from e
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    def _errno(self, error: sqlite3.Error) -> int:
        """The errno a database error stands for.

        SQLite says SQLITE_FULL only for ENOSPC; a write refused otherwise (a
        quota, EDQUOT) is an I/O error, told apart here by the volume's free space.
        """
        code = getattr(error, "sqlite_errorcode", -1) & 0xFF
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return errno.EBUSY
        if code == sqlite3.SQLITE_FULL:
            return errno.ENOSPC
        if code == sqlite3.SQLITE_IOERR:
            try:
                if os.statvfs(self.path.parent).f_bavail == 0:
                    return errno.ENOSPC
            except OSError:
                pass
        return errno.EIO

    # -- reads ----------------------------------------------------------------------
    def _rows_of(self, column: str, keys: Sequence[str]) -> list[tuple[Any, ...]]:
        """(key, ``column``, mtime_ns, rowid) of the stored ones among ``keys``."""
        rows: list[tuple[Any, ...]] = []
        unique = list(dict.fromkeys(keys))
        with self._use("read the small-object database") as conn:
            for i in range(0, len(unique), _BATCH):
                part = unique[i:i + _BATCH]
                marks = ",".join("?" * len(part))
                rows += conn.execute(f"SELECT key, {column}, mtime_ns, rowid FROM objects "
                                     f"WHERE key IN ({marks})", part).fetchall()
        return rows

    def stats(self, keys: Sequence[str]) -> dict[str, ObjectStat]:
        """The stored ones among ``keys``."""
        return {key: _stat(key, size, mtime_ns, rowid)
                for key, size, mtime_ns, rowid in self._rows_of("length(data)", keys)}

    def read_many(self, keys: Sequence[str]) -> dict[str, tuple[bytes, ObjectStat]]:
        """Whole values of the stored ones among ``keys``, with their stats."""
        return {key: (bytes(data), _stat(key, len(data), mtime_ns, rowid))
                for key, data, mtime_ns, rowid in self._rows_of("data", keys)}

    def read(self, key: str, offset: int = 0, length: int = -1
             ) -> tuple[bytes, ObjectStat] | None:
        """Bytes ``offset`` to ``offset + length`` (-1: to the end) and the stat, or None."""
        if offset < 0:
            raise OSError(errno.EINVAL, f"negative offset {offset} reading {key}")
        with self._use("read the small-object database") as conn:
            part, params = ("substr(data, ?, ?)", [offset + 1, length]) if length >= 0 else (
                "substr(data, ?)", [offset + 1])
            row = conn.execute(f"SELECT {part}, length(data), mtime_ns, rowid FROM objects "
                               "WHERE key = ?", [*params, key]).fetchone()
        if row is None:
            return None
        data, size, mtime_ns, rowid = row
        return bytes(data or b""), _stat(key, size, mtime_ns, rowid)

    def list_objects(self, prefix: str, start_after: str = "") -> Iterator[ObjectStat]:
        """Stored keys starting with ``prefix`` after ``start_after``, in byte order, paged."""
        end = prefix_end(prefix) if prefix else None
        # the first page from the prefix itself (or after start_after), then after the last
        bound, after = (">", start_after) if start_after >= prefix else (">=", prefix)
        while True:
            sql = f"SELECT key, length(data), mtime_ns, rowid FROM objects WHERE key {bound} ?"
            params: list[object] = [after]
            if end is not None:
                sql += " AND key < ?"
                params.append(end)
            with self._use("list the small-object database") as conn:
                rows = conn.execute(sql + " ORDER BY key LIMIT ?",
                                            [*params, _PAGE]).fetchall()
            for key, size, mtime_ns, rowid in rows:
                if key.startswith(prefix):
                    yield _stat(key, size, mtime_ns, rowid)
            if len(rows) < _PAGE:
                return
            bound, after = ">", rows[-1][0]

    # -- writes ---------------------------------------------------------------------
    def insert_new(self, rows: Sequence[tuple[str, bytes | bytearray]]) -> list[bool]:
        """Store each ``(key, data)`` whose key is not stored yet, all in one transaction.

        Durable when this returns. Per row: whether it was stored now (a key
        stored already, or twice in ``rows``, keeps its first value).
        """
        if not rows:
            return []
        now = time.time_ns()
        with self._use("store small objects") as conn:
            conn.execute("PRAGMA synchronous=FULL")  # durable when this returns
            conn.execute("BEGIN IMMEDIATE")
            try:
                seen = set(self._present(conn, [key for key, _ in rows]))
                created = []
                fresh = []
                for key, data in rows:
                    created.append(key not in seen)
                    if key not in seen:
                        seen.add(key)
                        fresh.append((key, data, now))
                conn.executemany("INSERT INTO objects (key, data, mtime_ns) VALUES (?, ?, ?)",
                                 fresh)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        return created

    @staticmethod
    def _present(conn: sqlite3.Connection, keys: list[str]) -> Iterator[str]:
        for i in range(0, len(keys), _BATCH):
            part = keys[i:i + _BATCH]
            marks = ",".join("?" * len(part))
            for (key,) in conn.execute(f"SELECT key FROM objects WHERE key IN ({marks})", part):
                yield key

    def delete(self, key: str, expected_version: str | None = None
               ) -> tuple[PutResult, int] | None:
        """Remove a row (only at ``expected_version``); None if the key is not a row.

        A delete appends to SQLite's log before it frees anything: on a full
        volume the log is first copied into the database and restarted (its
        space reused, as the catalog does), then the delete is tried again.
        """
        with self._use("delete from the small-object database") as conn:
            if conn.execute("SELECT 1 FROM objects WHERE key = ?", [key]).fetchone() is None:
                return None  # not a row: no write transaction
            for attempt in range(2):
                try:
                    return self._delete(conn, key, expected_version)
                except sqlite3.Error as e:
                    if attempt or self._errno(e) != errno.ENOSPC:
                        raise
                    conn.execute("PRAGMA wal_checkpoint(RESTART)")
        return None  # not reached

    @staticmethod
    def _delete(conn: sqlite3.Connection, key: str, expected_version: str | None
                ) -> tuple[PutResult, int] | None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT length(data), mtime_ns, rowid FROM objects "
                               "WHERE key = ?", [key]).fetchone()
            result: tuple[PutResult, int] | None
            if row is None:
                result = None
            elif expected_version is not None and expected_version != _version(row[2], row[1]):
                result = PutResult(True, _version(row[2], row[1])), 0
            else:
                conn.execute("DELETE FROM objects WHERE key = ?", [key])
                result = PutResult(False, ""), int(row[0])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def touch(self, key: str) -> bool:
        """Mark a row as just used; False if the key is not a row.

        Best effort, as a file's mtime is: not synced on its own (the next
        durable write syncs it), so a touch per deduplicated upload costs no fsync.
        """
        with self._use("update the small-object database") as conn:
            if conn.execute("SELECT 1 FROM objects WHERE key = ?", [key]).fetchone() is None:
                return False  # a file's key: no write lock taken
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                cur = conn.execute("UPDATE objects SET mtime_ns = ? WHERE key = ?",
                                   [time.time_ns(), key])
            finally:
                conn.execute("PRAGMA synchronous=FULL")
        return cur.rowcount > 0

    def reclaim(self) -> int:
        """Give the pages of deleted rows back to the volume; returns the bytes given back.

        Free pages are cut from the file's end in short transactions, then the
        write-ahead log is copied in and restarts (cut back to :data:`WAL_KEPT_BYTES`).
        """
        with self._use("shrink the small-object database") as conn:
            page = int(conn.execute("PRAGMA page_size").fetchone()[0])
            freed = 0
            while (free := int(conn.execute("PRAGMA freelist_count").fetchone()[0])) > 0:
                # executescript steps the pragma to its end (execute would free one page)
                conn.executescript(f"PRAGMA incremental_vacuum({_RECLAIM_PAGES})")
                left = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if left >= free:
                    break  # the file does not use incremental vacuum (made elsewhere)
                freed += (free - left) * page
            conn.execute("PRAGMA wal_checkpoint(RESTART)")
            conn.execute("PRAGMA synchronous=FULL")
            # the first write after a whole checkpoint restarts the log, cut back to the limit
            conn.execute("INSERT OR REPLACE INTO upkeep (name, value) VALUES ('reclaimed', ?)",
                         [time.time_ns()])
        return freed

    def close(self) -> None:
        """Refuse new calls, wait for those running, and close every thread's connection."""
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._busy == 0)
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
