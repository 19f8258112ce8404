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
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gristmill.client.private import private_database
from gristmill.store.catalog import prefix_end
from gristmill.store.objects import ObjectStat, PutResult

__all__ = ["ROW_VERSION_PREFIX", "SmallObjects"]

#: Keys per SQL statement (SQLite allows 32,766 parameters; smaller IN lists plan better).
_BATCH = 500
#: Rows per page of a listing (a listing holds no read transaction between pages).
_PAGE = 1000


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
                self._local.conn = conn
            yield conn
        except sqlite3.Error as e:
            code = getattr(e, "sqlite_errorcode", -1) & 0xFF
            number = errno.ENOSPC if code == sqlite3.SQLITE_FULL else errno.EIO
            raise OSError(number, f"cannot {operation} ({self.path}): {e}") from e
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    # -- reads ----------------------------------------------------------------------
    def stats(self, keys: Sequence[str]) -> dict[str, ObjectStat]:
        """The stored ones among ``keys``."""
        found: dict[str, ObjectStat] = {}
        unique = list(dict.fromkeys(keys))
        with self._use("read the small-object database") as conn:
            for i in range(0, len(unique), _BATCH):
                part = unique[i:i + _BATCH]
                marks = ",".join("?" * len(part))
                for key, size, mtime_ns, rowid in conn.execute(
                        "SELECT key, length(data), mtime_ns, rowid FROM objects "
                        f"WHERE key IN ({marks})", part):
                    found[key] = _stat(key, size, mtime_ns, rowid)
        return found

    def read_many(self, keys: Sequence[str]) -> dict[str, tuple[bytes, ObjectStat]]:
        """Whole values of the stored ones among ``keys``, with their stats."""
        found: dict[str, tuple[bytes, ObjectStat]] = {}
        unique = list(dict.fromkeys(keys))
        with self._use("read the small-object database") as conn:
            for i in range(0, len(unique), _BATCH):
                part = unique[i:i + _BATCH]
                marks = ",".join("?" * len(part))
                for key, data, mtime_ns, rowid in conn.execute(
                        "SELECT key, data, mtime_ns, rowid FROM objects "
                        f"WHERE key IN ({marks})", part):
                    found[key] = (bytes(data), _stat(key, len(data), mtime_ns, rowid))
        return found

    def read(self, key: str, offset: int = 0, length: int = -1
             ) -> tuple[bytes, ObjectStat] | None:
        """Bytes ``offset`` to ``offset + length`` (-1: to the end) and the stat, or None."""
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
        after = max(start_after, prefix[:-1] if prefix else "")
        end = prefix_end(prefix) if prefix else None
        while True:
            sql = "SELECT key, length(data), mtime_ns, rowid FROM objects WHERE key > ?"
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
            after = rows[-1][0]

    # -- writes ---------------------------------------------------------------------
    def insert_new(self, rows: Sequence[tuple[str, bytes]]) -> list[bool]:
        """Store each ``(key, data)`` whose key is not stored yet, all in one transaction.

        Durable when this returns. Per row: whether it was stored now (a key
        stored already, or twice in ``rows``, keeps its first value).
        """
        if not rows:
            return []
        now = time.time_ns()
        with self._use("store small objects") as conn:
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
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
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
        """Remove a row (only at ``expected_version``); None if the key is not a row."""
        with self._use("delete from the small-object database") as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT length(data), mtime_ns, rowid FROM objects "
                                   "WHERE key = ?", [key]).fetchone()
                if row is None:
                    result = None
                elif expected_version is not None and expected_version != _version(row[2],
                                                                                    row[1]):
                    result = PutResult(True, _version(row[2], row[1])), 0
                else:
                    conn.execute("DELETE FROM objects WHERE key = ?", [key])
                    result = PutResult(False, ""), int(row[0])
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return result

    def touch(self, key: str) -> bool:
        """Mark a row as just used; False if the key is not a row.

        Best effort, as a file's mtime is: not synced on its own (the next
        durable write syncs it), so a touch per deduplicated upload costs no fsync.
        """
        with self._use("update the small-object database") as conn:
            conn.execute("PRAGMA synchronous=NORMAL")
            try:
                cur = conn.execute("UPDATE objects SET mtime_ns = ? WHERE key = ?",
                                   [time.time_ns(), key])
            finally:
                conn.execute("PRAGMA synchronous=FULL")
        return cur.rowcount > 0

    def reclaim(self) -> None:
        """Give the pages of deleted rows back to the volume."""
        with self._use("shrink the small-object database") as conn:
            conn.execute("PRAGMA incremental_vacuum").fetchall()  # a step per page

    def close(self) -> None:
        """Refuse new calls, wait for those running, and close every thread's connection."""
        with self._lock:
            self._closed = True
            self._lock.wait_for(lambda: self._busy == 0)
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
