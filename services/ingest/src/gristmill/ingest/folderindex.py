"""A local folder's images for ``Loader.from_folder``: listed in the background, headers indexed.

:class:`FolderListing` walks the folder on a thread, in path order, and
readers follow the list as it grows (the hash and sequential policies start
planning at once). Image headers (size, orientation) are read by
:func:`gristmill.client.imageinfo.read_header` on a few threads, and kept in
a :class:`HeaderIndex` on disk, keyed by (path, size, mtime_ns), so the next
start on an unchanged folder reads no header: one ``os.scandir`` walk and one
SQLite query.

The index is a SQLite file per folder (keyed by its real path) under
``$GRISTMILL_CACHE_DIR/folder-index`` (default ``~/.cache/gristmill``),
0600 in a 0700 directory. ``GRISTMILL_FOLDER_INDEX=0`` or
``from_folder(..., folder_index=False)`` turns it off; deleting the directory
clears it. A corrupt or foreign file is discarded and rebuilt.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import NamedTuple

from gristmill.client.imageinfo import read_header
from gristmill.client.private import private_database

__all__ = ["IMAGE_SUFFIXES", "FolderFile", "FolderListing", "HeaderIndex", "default_index_dir",
           "walk"]

log = logging.getLogger(__name__)

#: Extensions taken as images when listing a folder.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"})
#: Files listed (and their headers read) per step; readers see the list grow by this much.
CHUNK = 256
SCHEMA = 1


class FolderFile(NamedTuple):
    """One image file: its path below the folder, stat and header facts (0s when unreadable)."""

    path: str
    size: int
    mtime_ns: int
    width: int = 0
    height: int = 0
    format: str = ""
    orientation: int = 0

    @property
    def readable(self) -> bool:
        """Whether its header was read."""
        return self.width > 0 and self.height > 0


def default_index_dir() -> Path:
    """``$GRISTMILL_CACHE_DIR/folder-index`` (default ``~/.cache/gristmill/folder-index``)."""
    base = os.environ.get("GRISTMILL_CACHE_DIR") or "~/.cache/gristmill"
    return Path(base).expanduser() / "folder-index"


def walk(root: Path) -> Iterator[tuple[str, str, int, int]]:
    """(relative POSIX path, full path, size, mtime_ns) of each image file, sorted by path.

    Directories are walked in place (``a/b.jpg`` sorts after ``a.jpg``, as
    strings do); links to files are followed, links to directories are not
    (no loops); unreadable directories and names that are not UTF-8 are
    skipped with a warning.
    """
    yield from _walk(str(root), "")


def _walk(directory: str, rel_dir: str) -> Iterator[tuple[str, str, int, int]]:
    try:
        with os.scandir(directory) as it:
            entries = list(it)
    except OSError as e:
        log.warning("skipping unreadable directory %s: %s", directory, e.strerror or e)
        return
    keyed: list[tuple[str, os.DirEntry[str], bool]] = []
    for ent in entries:
        try:
            if ent.is_dir(follow_symlinks=False):
                keyed.append((ent.name + "/", ent, True))
            elif "." + ent.name.rpartition(".")[2].lower() in IMAGE_SUFFIXES and ent.is_file():
                keyed.append((ent.name, ent, False))
        except OSError:
            continue
    keyed.sort(key=lambda k: k[0])
    for _, ent, is_dir in keyed:
        rel = rel_dir + ent.name
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            log.warning("skipping %s: its name is not valid UTF-8", ent.path)
            continue
        if is_dir:
            yield from _walk(ent.path, rel + "/")
            continue
        try:
            st = ent.stat()
        except OSError:
            continue  # vanished since the directory was read
        yield rel, ent.path, st.st_size, st.st_mtime_ns


def _read(path: str) -> tuple[int, int, str, int]:
    try:
        h = read_header(path)
    except OSError:
        return 0, 0, "", 0
    return (h.width, h.height, h.format, h.orientation) if h is not None else (0, 0, "", 0)


Row = tuple[int, int, int, int, str, int]  # size, mtime_ns, width, height, format, orientation


class HeaderIndex:
    """Headers of one folder's files in a private SQLite file, keyed by (path, size, mtime_ns)."""

    def __init__(self, root: Path, directory: Path | None = None) -> None:
        self.root = str(root)
        key = hashlib.sha256(self.root.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = (directory or default_index_dir()) / f"{key}.sqlite"

    def _connect(self) -> sqlite3.Connection:
        private_database(self.path)
        con = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("CREATE TABLE IF NOT EXISTS headers (path TEXT PRIMARY KEY, size INTEGER, "
                    "mtime_ns INTEGER, width INTEGER, height INTEGER, format TEXT, "
                    "orientation INTEGER)")
        return con

    def _discard(self, why: object) -> None:
        log.warning("folder index %s is unusable (%s); rebuilding it", self.path, why)
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")

    def load(self) -> dict[str, Row]:
        """Every row, or nothing when the file is missing, corrupt or of another folder."""
        for attempt in (0, 1):
            try:
                con = self._connect()
                try:
                    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                    if meta and (meta.get("root") != self.root or
                                 meta.get("schema") != str(SCHEMA)):
                        raise sqlite3.DatabaseError("it belongs to another folder or version")
                    return {r[0]: r[1:] for r in con.execute(
                        "SELECT path, size, mtime_ns, width, height, format, orientation "
                        "FROM headers")}
                finally:
                    con.close()
            except sqlite3.DatabaseError as e:
                if attempt:
                    log.warning("folder index %s cannot be used: %s", self.path, e)
                    return {}
                self._discard(e)
            except OSError as e:
                log.warning("folder index %s cannot be used: %s", self.path, e)
                return {}
        return {}

    def save(self, changed: list[tuple[str, Row]], removed: list[str]) -> None:
        """Write ``changed`` rows and delete ``removed`` paths in one transaction."""
        try:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("root", self.root), ("schema", str(SCHEMA))])
                con.executemany("DELETE FROM headers WHERE path = ?", [(p,) for p in removed])
                con.executemany("INSERT OR REPLACE INTO headers VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [(p, *row) for p, row in changed])
                con.execute("COMMIT")
            finally:
                con.close()
        except (sqlite3.Error, OSError) as e:  # a cache: the listing stands without it
            log.warning("could not update the folder index %s: %s", self.path, e)


class FolderListing:
    """A folder's image files in path order, listed on a background thread as readers follow.

    Args:
        root: the folder (resolved).
        index: where headers are remembered between starts; None reads every header.
        workers: threads reading headers (1: serially).
    """

    def __init__(self, root: Path, index: HeaderIndex | None, workers: int = 8) -> None:
        self.root = root
        self.index = index
        self.workers = max(1, workers)
        self.files: list[FolderFile] = []
        self.done = False
        self.error: BaseException | None = None
        #: headers read from files (not from the index) by this listing
        self.header_reads = 0
        self._digest = hashlib.sha256()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gristmill-folder-listing",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._list()
        except BaseException as e:  # noqa: BLE001 - raised to the readers
            with self._cond:
                self.error = e
        with self._cond:
            self.done = True
            self._cond.notify_all()

    def _list(self) -> None:
        known = self.index.load() if self.index is not None else {}
        changed: list[tuple[str, Row]] = []
        seen: set[str] = set()
        pool = ThreadPoolExecutor(self.workers, "gristmill-header") if self.workers > 1 else None
        try:
            entries = walk(self.root)
            while not self._stop.is_set():
                chunk = list(islice(entries, CHUNK))
                if not chunk:
                    break
                misses = [e for e in chunk if (row := known.get(e[0])) is None
                          or row[0] != e[2] or row[1] != e[3]]
                paths = [e[1] for e in misses]
                headers = list(pool.map(_read, paths) if pool is not None else map(_read, paths))
                fresh = {e[0]: (e[2], e[3], *h) for e, h in zip(misses, headers, strict=True)}
                changed.extend(fresh.items())
                files = [FolderFile(rel, size, mtime, *(fresh.get(rel) or known[rel])[2:])
                         for rel, _, size, mtime in chunk]
                self._digest.update("".join(f"{rel}\t{size}\t{mtime}\n"
                                            for rel, _, size, mtime in chunk).encode())
                seen.update(f.path for f in files)
                with self._cond:
                    self.files.extend(files)
                    self.header_reads += len(misses)
                    self._cond.notify_all()
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if self.index is not None and not self._stop.is_set():
            removed = [p for p in known if p not in seen]
            if changed or removed:
                self.index.save(changed, removed)

    def take(self, start: int, limit: int) -> list[FolderFile]:
        """Up to ``limit`` files from ``start``: waits for one at least; [] once the list ended."""
        with self._cond:
            while start >= len(self.files) and not self.done:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            return self.files[start:start + limit]

    def follow(self, start: int = 0) -> Iterator[FolderFile]:
        """The files from ``start`` on, waiting for the listing as needed, until it ends."""
        i = start
        while ready := self.take(i, CHUNK):
            yield from ready
            i += len(ready)

    def wait(self) -> list[FolderFile]:
        """Every file, once the listing has ended."""
        with self._cond:
            while not self.done:
                self._cond.wait()
            if self.error is not None:
                raise self.error
            return self.files

    @property
    def digest(self) -> str:
        """Digest of (path, size, mtime) of every file; valid once :meth:`wait` returned."""
        return self._digest.hexdigest()

    def close(self) -> None:
        """Stop listing (readers see the list end where it stopped)."""
        self._stop.set()
