"""A local folder's images for ``Loader.from_folder``: listed in the background, headers indexed.

:class:`FolderListing` walks the folder on a thread, in path order, and
readers follow the list as it grows (the hash and sequential policies start
planning at once). Image headers (size, orientation) are read by
:func:`gristmill.client.imageinfo.read_header` on a few threads, and kept in
a :class:`HeaderIndex` on disk, keyed by (path, size, mtime_ns), so the next
start on an unchanged folder reads no header: one ``os.scandir`` walk (a
``stat`` per file) and one read of the stored listing.

The index is a SQLite file per folder (keyed by its real path) under
``$GRISTMILL_CACHE_DIR/folder-index`` (default ``~/.cache/gristmill``),
0600 in a 0700 directory. ``GRISTMILL_FOLDER_INDEX=0`` or
``from_folder(..., folder_index=False)`` turns it off; deleting the directory
clears it. A corrupt or foreign file is discarded and rebuilt.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from operator import itemgetter
from pathlib import Path
from typing import NamedTuple, get_type_hints

from gristmill.client.imageinfo import read_header
from gristmill.client.private import private_database

__all__ = ["IMAGE_SUFFIXES", "FolderFile", "FolderListing", "HeaderIndex", "default_index_dir",
           "walk"]

log = logging.getLogger(__name__)

#: Extensions taken as images when listing a folder.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"})
#: Files listed (and their headers read) per step; readers see the list grow by this much.
CHUNK = 256
SCHEMA = 2


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
    skipped with a warning. Each directory is opened once and its files are
    ``stat``-ed relative to it, which spares the kernel a walk of the whole
    path per file (~20% of a 100k-file listing).
    """
    fd = _open_directory(str(root))
    if fd is None:
        return
    try:
        yield from _walk(fd, str(root), "")
    finally:
        os.close(fd)


_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_directory(path: str, name: str | None = None, parent: int | None = None
                    ) -> int | None:
    try:
        if parent is None:
            return os.open(path, _DIRECTORY_FLAGS & ~os.O_NOFOLLOW)  # the root may be a link
        return os.open(name or path, _DIRECTORY_FLAGS, dir_fd=parent)
    except OSError as e:
        log.warning("skipping unreadable directory %s: %s", path, e.strerror or e)
        return None


def _walk(fd: int, directory: str, rel_dir: str) -> Iterator[tuple[str, str, int, int]]:
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as e:
        log.warning("skipping unreadable directory %s: %s", directory, e.strerror or e)
        return
    keyed: list[tuple[str, os.DirEntry[str], bool]] = []
    for ent in entries:
        name = ent.name
        try:
            if ent.is_dir(follow_symlinks=False):
                keyed.append((name + "/", ent, True))
            elif name[name.rfind("."):].lower() in IMAGE_SUFFIXES and ent.is_file():
                keyed.append((name, ent, False))
        except OSError:
            continue
    keyed.sort(key=itemgetter(0))
    for _, ent, is_dir in keyed:
        name = ent.name
        rel = rel_dir + name
        if not rel.isascii():
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                log.warning("skipping %s/%s: its name is not valid UTF-8", directory,
                            name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
                continue
        if is_dir:
            sub = _open_directory(f"{directory}/{name}", name, fd)
            if sub is None:
                continue
            try:
                yield from _walk(sub, f"{directory}/{name}", rel + "/")
            finally:
                os.close(sub)
            continue
        try:
            st = ent.stat()
        except OSError:
            continue  # vanished since the directory was read
        yield rel, f"{directory}/{name}", st.st_size, st.st_mtime_ns


def _read(path: str) -> tuple[int, int, str, int]:
    try:
        h = read_header(path)
    except OSError:
        return 0, 0, "", 0
    return (h.width, h.height, h.format, h.orientation) if h is not None else (0, 0, "", 0)


Row = tuple[int, int, int, int, str, int]  # size, mtime_ns, width, height, format, orientation
IndexRow = tuple[str, int, int, int, int, str, int]  # path, then a Row


class _Known:
    """The index's rows, matched against the walk a stretch at a time.

    Both are in path order, so an unchanged stretch of the folder is one
    slice comparison; a changed one falls back to lookups by path.
    """

    def __init__(self, rows: list[IndexRow]) -> None:
        self.rows = rows
        self.keys = [r[:3] for r in rows]
        self.paths = [r[0] for r in rows]
        self.hit = bytearray(len(rows))  # rows whose path the walk met
        self._by_path: dict[str, int] | None = None
        #: rows to write: new or changed files
        self.changed: list[tuple[str, Row]] = []

    def same(self, keys: list[tuple[str, int, int]]) -> list[FolderFile] | None:
        """The files of an unchanged stretch (path, size, mtime as indexed); else None."""
        start = bisect.bisect_left(self.paths, keys[0][0])
        end = start + len(keys)
        if self.keys[start:end] != keys:
            return None
        self.hit[start:end] = b"\1" * len(keys)
        return list(map(FolderFile._make, self.rows[start:end]))

    def get(self, path: str, size: int, mtime_ns: int) -> IndexRow | None:
        """The row of an unchanged file; None if it is new or changed."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        i = self._by_path.get(path)
        if i is None:
            return None
        self.hit[i] = 1
        row = self.rows[i]
        return row if row[1] == size and row[2] == mtime_ns else None

    def unchanged(self, listed: int) -> bool:
        """Whether the walk, ``listed`` files, met exactly the indexed files, unchanged."""
        return listed == len(self.rows) and not self.changed and self.hit.count(0) == 0


class HeaderIndex:
    """A folder's listing with headers, in a private SQLite file.

    One row holds the whole listing as zlib-compressed JSON columns (path,
    size, mtime_ns, width, height, format, orientation, in path order) and
    its digest: a 100k-file listing loads in ~0.07 s, against ~0.1 s for as
    many SQLite rows, and an unchanged folder's digest needs no hashing.
    """

    def __init__(self, root: Path, directory: Path | None = None) -> None:
        self.root = str(root)
        key = hashlib.sha256(self.root.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.path = (directory or default_index_dir()) / f"{key}.sqlite"

    def _connect(self) -> sqlite3.Connection:
        private_database(self.path)
        con = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        con.execute("CREATE TABLE IF NOT EXISTS listing (id INTEGER PRIMARY KEY CHECK (id = 0), "
                    "digest TEXT NOT NULL, columns BLOB NOT NULL)")
        return con

    def _discard(self, why: object) -> None:
        log.warning("folder index %s is unusable (%s); rebuilding it", self.path, why)
        for suffix in ("", "-journal", "-wal", "-shm"):
            with contextlib.suppress(OSError):
                os.unlink(f"{self.path}{suffix}")

    def load(self) -> tuple[list[IndexRow], str]:
        """Every row (path first) in path order, and their digest; nothing if unusable."""
        for attempt in (0, 1):
            try:
                con = self._connect()
                try:
                    meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
                    if meta and (meta.get("root") != self.root or
                                 meta.get("schema") != str(SCHEMA)):
                        raise sqlite3.DatabaseError("it belongs to another folder or version")
                    found = con.execute("SELECT digest, columns FROM listing").fetchone()
                finally:
                    con.close()
                return _columns_rows(found[1]) if found else [], found[0] if found else ""
            except (sqlite3.DatabaseError, ValueError) as e:
                if attempt:
                    log.warning("folder index %s cannot be used: %s", self.path, e)
                    return [], ""
                self._discard(e)
            except OSError as e:
                log.warning("folder index %s cannot be used: %s", self.path, e)
                return [], ""
        return [], ""

    def save(self, files: list[FolderFile], digest: str) -> None:
        """Replace the listing by ``files`` (in path order), whose digest is ``digest``."""
        columns = zlib.compress(json.dumps([list(c) for c in zip(*files, strict=True)] or
                                           [[]] * len(FolderFile._fields),
                                           separators=(",", ":")).encode(), 1)
        try:
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("root", self.root), ("schema", str(SCHEMA))])
                con.execute("INSERT OR REPLACE INTO listing VALUES (0, ?, ?)", (digest, columns))
                con.execute("COMMIT")
            finally:
                con.close()
        except (sqlite3.Error, OSError) as e:  # a cache: the listing stands without it
            log.warning("could not update the folder index %s: %s", self.path, e)


#: Python type of each FolderFile field, as the index stores it.
_COLUMN_TYPES = tuple(get_type_hints(FolderFile).values())


def _columns_rows(blob: bytes) -> list[IndexRow]:
    """Rows of a stored listing; ValueError if it is not one (corrupt or foreign)."""
    try:
        columns = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError, RecursionError) as e:
        raise ValueError(f"the listing is not readable ({e})") from None
    if (not isinstance(columns, list) or len(columns) != len(_COLUMN_TYPES)
            or not all(isinstance(c, list) for c in columns)
            or len({len(c) for c in columns}) != 1
            or any(set(map(type, c)) - {kind} for c, kind in zip(columns, _COLUMN_TYPES,
                                                                  strict=True))):
        raise ValueError("the listing has the wrong shape or types")
    return list(zip(*columns, strict=True))


def listing_digest(files: list[FolderFile]) -> str:
    """Digest of the (path, size, mtime_ns) of ``files``, in order: the folder's version."""
    return hashlib.sha256(repr([f[:3] for f in files]).encode()).hexdigest()


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
        self._digest = ""
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
        pool = ThreadPoolExecutor(self.workers, "gristmill-header") if self.workers > 1 else None
        try:
            rows, indexed_digest = self.index.load() if self.index is not None else ([], "")
            known = _Known(rows)
            entries = walk(self.root)
            chunk = list(islice(entries, CHUNK))
            while chunk and not self._stop.is_set():
                self._take_chunk(chunk, known, pool)
                chunk = list(islice(entries, CHUNK))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)
        if self._stop.is_set():
            self._digest = listing_digest(self.files)
        elif known.unchanged(len(self.files)) and indexed_digest:
            self._digest = indexed_digest  # the indexed listing, hashed when it was saved
        else:
            self._digest = listing_digest(self.files)
            if self.index is not None:
                self.index.save(self.files, self._digest)

    def _take_chunk(self, chunk: list[tuple[str, str, int, int]], known: _Known,
                    pool: ThreadPoolExecutor | None) -> None:
        keys = [(rel, size, mtime) for rel, _, size, mtime in chunk]
        files = known.same(keys)
        misses: list[tuple[str, str, int, int]] = []
        if files is None:  # something changed in this stretch: file by file
            rows = [known.get(e[0], e[2], e[3]) for e in chunk]
            misses = [e for e, row in zip(chunk, rows, strict=True) if row is None]
            paths = [e[1] for e in misses]
            headers = list(pool.map(_read, paths) if pool is not None else map(_read, paths))
            fresh = {e[0]: (e[2], e[3], *h) for e, h in zip(misses, headers, strict=True)}
            known.changed.extend(fresh.items())
            files = [FolderFile(rel, size, mtime, *(row[3:] if row is not None
                                                    else fresh[rel][2:]))
                     for (rel, _, size, mtime), row in zip(chunk, rows, strict=True)]
        with self._cond:
            self.files.extend(files)
            self.header_reads += len(misses)
            self._cond.notify_all()

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
        return self._digest

    def close(self) -> None:
        """Stop listing (readers see the list end where it stopped)."""
        self._stop.set()
