"""The sha256 of local files an import has hashed, so that an unchanged file costs a stat.

One SQLite file (``CACHE_DIR/import-hashes.sqlite``, 0600) maps a file's
absolute path to the sha256 of its content, with the ``stat`` fields that
must all be unchanged for the hash to be trusted: size, mtime, ctime (in
nanoseconds) and inode. ``ctime`` cannot be set by a user, so a tool that
rewrites a file and restores its mtime (``rsync -a``, ``cp -p``) still
makes the import read it again.

Like git's index, a hash is only remembered for a file whose mtime is more
than :data:`RACY_SECONDS` older than the moment it was read: a file written
in the same clock tick as its hashing could change again without its mtime
moving. Such a file is hashed again by the next import.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gristmill.client.private import private_database

__all__ = ["RACY_SECONDS", "FileStamp", "HashCache", "stamp"]

#: A file modified this recently before it was read is not remembered.
RACY_SECONDS = 1.0


@dataclass(frozen=True)
class FileStamp:
    """What must not change for a remembered hash to hold."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int


def stamp(st: os.stat_result) -> FileStamp:
    """The stamp of a ``stat`` result."""
    return FileStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS hashes (
    path TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    inode INTEGER NOT NULL,
    sha256 TEXT NOT NULL
) WITHOUT ROWID
"""


class HashCache:
    """Remembered hashes of local files; safe to share between threads.

    A cache that cannot be opened or written (read-only home, a corrupt file)
    is not an error: the import then hashes every file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            private_database(path)  # before SQLite writes: its -wal and -shm take the mode
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(_SCHEMA)
            self._conn = conn
        except (OSError, sqlite3.Error):
            self._conn = None

    def lookup(self, files: Sequence[tuple[str, FileStamp]]) -> dict[str, str]:
        """sha256 by path of the files whose stamp is the remembered one."""
        if self._conn is None or not files:
            return {}
        want = dict(files)
        found: dict[str, str] = {}
        paths = list(want)
        with self._lock, contextlib.suppress(sqlite3.Error):
            for i in range(0, len(paths), 500):
                part = paths[i:i + 500]
                marks = ",".join("?" * len(part))
                for path, size, mtime, ctime, inode, sha in self._conn.execute(
                        "SELECT path, size, mtime_ns, ctime_ns, inode, sha256 FROM hashes "
                        f"WHERE path IN ({marks})", part):
                    if want[path] == FileStamp(size, mtime, ctime, inode):
                        found[path] = sha
        return found

    def remember(self, files: Iterable[tuple[str, FileStamp, str]], started: float) -> None:
        """Remember (path, stamp, sha256) of files read from ``started`` (epoch seconds) on."""
        if self._conn is None:
            return
        limit = int((started - RACY_SECONDS) * 1e9)
        rows = [(p, s.size, s.mtime_ns, s.ctime_ns, s.inode, sha) for p, s, sha in files
                if s.mtime_ns < limit]
        if not rows:
            return
        with self._lock, contextlib.suppress(sqlite3.Error):
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                                       rows)

    def forget(self, paths: Iterable[str]) -> None:
        """Drop remembered hashes (of files found changed)."""
        if self._conn is None:
            return
        with self._lock, contextlib.suppress(sqlite3.Error):
            with self._conn:
                self._conn.execute("BEGIN")
                self._conn.executemany("DELETE FROM hashes WHERE path = ?", [(p,) for p in paths])

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def now() -> float:
    """The clock :meth:`HashCache.remember` compares mtimes with."""
    return time.time()
