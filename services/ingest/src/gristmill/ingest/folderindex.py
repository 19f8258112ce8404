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
import struct
import sys
import threading
import zlib
from array import array
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from operator import attrgetter, itemgetter
from pathlib import Path
from typing import NamedTuple, cast

from gristmill.client.imageinfo import read_header
from gristmill.client.private import private_database
from gristmill.client.tuning import gc_paused

__all__ = ["IMAGE_SUFFIXES", "FolderFile", "FolderListing", "HeaderIndex", "decode_listing",
           "default_index_dir", "encode_listing", "walk", "walk_runs"]

log = logging.getLogger(__name__)

#: Extensions taken as images when listing a folder.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"})
#: Files listed (and their headers read) per step; readers see the list grow by this much.
CHUNK = 256
SCHEMA = 3


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


Run = tuple[str, list[str], list[int], list[int]]
"""A stretch of one directory's image files: the directory's full path, then
each file's relative POSIX path, size and mtime_ns, in path order."""


def walk_runs(root: Path) -> Iterator[Run]:
    """The image files below ``root``, sorted by path, a directory's stretch at a time.

    Directories are walked in place (``a/b.jpg`` sorts after ``a.jpg``, as
    strings do), so a directory's files come as one run, or several where
    subdirectories sort between them. Links to files are followed, links to
    directories are not (no loops, nothing outside the folder's tree);
    unreadable directories and names that are not valid UTF-8 are skipped
    with a warning. Each directory is opened once and its files are
    ``stat``-ed relative to it, which spares the kernel a walk of the whole
    path per file (~20% of a 100k-file listing); a run's columns are plain
    lists, so an unchanged stretch is matched against the index with three
    list comparisons.
    """
    fd = _open_directory(str(root))
    if fd is None:
        return
    try:
        yield from _walk(fd, str(root), "")
    finally:
        os.close(fd)


def walk(root: Path) -> Iterator[tuple[str, str, int, int]]:
    """(relative POSIX path, full path, size, mtime_ns) of each image file, as :func:`walk_runs`."""
    for directory, rels, sizes, mtimes in walk_runs(root):
        for rel, size, mtime in zip(rels, sizes, mtimes, strict=True):
            yield rel, _full_path(directory, rel), size, mtime


def _full_path(directory: str, rel: str) -> str:
    return f"{directory}/{rel[rel.rfind('/') + 1:]}"


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


def _walk(fd: int, directory: str, rel_dir: str) -> Iterator[Run]:
    with gc_paused():  # a directory's entries and stats: bounded, and no cycles
        listed = _list_directory(fd, directory)
    if listed is None:
        return
    names, sizes, mtimes, subdirectories = listed
    done = 0
    for at, name in subdirectories:
        if at > done:
            yield directory, [rel_dir + n for n in names[done:at]], sizes[done:at], mtimes[done:at]
            done = at
        sub = _open_directory(f"{directory}/{name}", name, fd)
        if sub is None:
            continue
        try:
            yield from _walk(sub, f"{directory}/{name}", f"{rel_dir}{name}/")
        finally:
            os.close(sub)
    if done < len(names):
        yield directory, [rel_dir + n for n in names[done:]], sizes[done:], mtimes[done:]


def _list_directory(fd: int, directory: str
                    ) -> tuple[list[str], list[int], list[int], list[tuple[int, str]]] | None:
    """A directory's image files (names, sizes, mtimes) and subdirectories, in path order.

    Each subdirectory comes with the number of files that sort before it.
    """
    try:
        with os.scandir(fd) as it:
            entries = list(it)
    except OSError as e:
        log.warning("skipping unreadable directory %s: %s", directory, e.strerror or e)
        return None
    files: list[os.DirEntry[str]] = []
    subdirectories: list[str] = []
    for ent in entries:
        name = ent.name
        try:
            if ent.is_dir(follow_symlinks=False):
                subdirectories.append(name)
            elif name[name.rfind("."):].lower() in IMAGE_SUFFIXES and ent.is_file():
                files.append(ent)
        except OSError:
            continue
    if not all(name.isascii() for name in subdirectories):
        subdirectories = [n for n in subdirectories if _utf8(directory, n)]
    files.sort(key=_NAME)
    if not all(map(str.isascii, map(_NAME, files))):
        files = [f for f in files if _utf8(directory, f.name)]
    stats: list[os.stat_result] = []
    gone = False
    for ent in files:
        try:
            stats.append(ent.stat())
        except OSError:  # vanished since the directory was read
            stats.append(_GONE)
            gone = True
    if gone:
        files = [f for f, st in zip(files, stats, strict=True) if st is not _GONE]
        stats = [st for st in stats if st is not _GONE]
    names = list(map(_NAME, files))
    sizes = [st.st_size for st in stats]
    mtimes = [st.st_mtime_ns for st in stats]
    # a directory sorts as its name and "/" (so "a/" after "a-b/" and "a.old/"): it comes
    # after the files whose names sort before that
    keys = sorted(d + "/" for d in subdirectories)
    return names, sizes, mtimes, [(bisect.bisect_left(names, k), k[:-1]) for k in keys]


_NAME = attrgetter("name")
_GONE = os.stat_result((0,) * 10)


def _utf8(directory: str, name: str) -> bool:
    """Whether ``name`` is valid UTF-8 (warns when it is not: the entry is skipped)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        log.warning("skipping %s/%s: its name is not valid UTF-8", directory,
                    name.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        return False
    return True


def _read(path: str) -> tuple[int, int, str, int]:
    try:
        h = read_header(path)
    except OSError:
        return 0, 0, "", 0
    return (h.width, h.height, h.format, h.orientation) if h is not None else (0, 0, "", 0)


class _Known:
    """The index's rows, matched against the walk a stretch at a time.

    Both are in path order, so an unchanged stretch of the folder is three
    list comparisons and a slice of the indexed rows; a changed one falls
    back to lookups by path.
    """

    def __init__(self, rows: list[FolderFile]) -> None:
        self.rows = rows
        self.paths = list(map(itemgetter(0), rows))
        self.sizes = list(map(itemgetter(1), rows))
        self.mtimes = list(map(itemgetter(2), rows))
        self.hit = bytearray(len(rows))  # rows whose path the walk met
        self._by_path: dict[str, int] | None = None
        #: files new or changed since the index was saved
        self.changed = 0

    def same(self, rels: list[str], sizes: list[int], mtimes: list[int]
             ) -> list[FolderFile] | None:
        """The files of an unchanged stretch (path, size, mtime as indexed); else None."""
        start = bisect.bisect_left(self.paths, rels[0])
        end = start + len(rels)
        if (self.paths[start:end] != rels or self.sizes[start:end] != sizes
                or self.mtimes[start:end] != mtimes):
            return None
        self.hit[start:end] = b"\1" * len(rels)
        return self.rows[start:end]

    def get(self, path: str, size: int, mtime_ns: int) -> FolderFile | None:
        """The row of an unchanged file; None if it is new or changed."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths)}
        i = self._by_path.get(path)
        if i is None:
            return None
        self.hit[i] = 1
        row = self.rows[i]
        return row if row.size == size and row.mtime_ns == mtime_ns else None

    def unchanged(self, listed: int) -> bool:
        """Whether the walk, ``listed`` files, met exactly the indexed files, unchanged."""
        return listed == len(self.rows) and not self.changed and self.hit.count(0) == 0


class HeaderIndex:
    """A folder's listing with headers, in a private SQLite file.

    One row holds the whole listing, in path order, and its digest. The
    listing is stored as columns (see :func:`encode_listing`): a 100k-file
    listing loads in ~0.03 s, and an unchanged folder's digest needs no
    hashing.
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

    def load(self) -> tuple[list[FolderFile], str]:
        """Every row in path order, and their digest; nothing if unusable."""
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
                return decode_listing(found[1]) if found else [], found[0] if found else ""
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
        try:
            columns = encode_listing(files)
            con = self._connect()
            try:
                con.execute("BEGIN IMMEDIATE")
                con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [("root", self.root), ("schema", str(SCHEMA))])
                con.execute("INSERT OR REPLACE INTO listing VALUES (0, ?, ?)", (digest, columns))
                con.execute("COMMIT")
            finally:
                con.close()
        except (sqlite3.Error, OSError, OverflowError) as e:  # a cache: the listing stands
            log.warning("could not update the folder index %s: %s", self.path, e)


#: The most bytes a stored listing may inflate to (about 20M files); more is taken as corrupt.
MAX_LISTING_BYTES = 2 << 30
_HEAD = struct.Struct("<I")


def encode_listing(files: list[FolderFile]) -> bytes:
    """A listing as stored: zlib of a JSON head, integer columns, format codes, paths.

    The head (its length first, 4 bytes little-endian) holds the file count,
    the distinct formats and the byte order; then size, mtime_ns, width,
    height and orientation as native 64-bit integers, the format of each
    file as a 16-bit index into the head's list, and the paths joined by NUL
    (which no file name holds). Decoding is a few C-level calls per column.
    """
    paths, sizes, mtimes, widths, heights, formats, orientations = (
        zip(*files, strict=True) if files else ([],) * len(FolderFile._fields))
    names = sorted(set(formats))
    code = {name: i for i, name in enumerate(names)}
    head = json.dumps({"count": len(files), "formats": names,
                       "byteorder": sys.byteorder}).encode()
    parts = [_HEAD.pack(len(head)), head]
    parts += [array("q", c).tobytes() for c in (sizes, mtimes, widths, heights, orientations)]
    parts += [array("H", map(code.__getitem__, formats)).tobytes(),
              "\0".join(paths).encode("utf-8", "surrogateescape")]
    return zlib.compress(b"".join(parts), 1)


def decode_listing(blob: bytes) -> list[FolderFile]:
    """The files of a stored listing; ValueError if it is not one (corrupt, foreign, tampered)."""
    inflate = zlib.decompressobj()
    try:
        data = inflate.decompress(blob, MAX_LISTING_BYTES)
    except zlib.error as e:
        raise ValueError(f"the listing is not readable ({e})") from None
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise ValueError("the listing is cut short, too large or followed by other bytes")
    try:
        (size,) = _HEAD.unpack_from(data)
        head = json.loads(data[_HEAD.size:_HEAD.size + size])
        count, names = head["count"], head["formats"]
        if head["byteorder"] != sys.byteorder:
            raise ValueError("it was written on a machine of another byte order")
    except (struct.error, ValueError, TypeError, KeyError, RecursionError) as e:
        raise ValueError(f"the listing's head is not readable ({e})") from None
    if (type(count) is not int or count < 0 or not isinstance(names, list)
            or not all(isinstance(n, str) for n in names)):
        raise ValueError("the listing's head has the wrong shape or types")
    pos = _HEAD.size + size
    ints: list[list[int]] = []
    for _ in range(5):
        column = array("q", data[pos:pos + 8 * count])
        ints.append(column.tolist())
        pos += 8 * count
    codes = array("H", data[pos:pos + 2 * count])
    pos += 2 * count
    try:
        paths = data[pos:].decode("utf-8").split("\0") if count else []
        formats = list(map(names.__getitem__, codes))
    except (UnicodeDecodeError, IndexError) as e:
        raise ValueError(f"the listing has a bad path or format ({e})") from None
    if any(n != count for n in (*map(len, ints), len(codes), len(paths))):
        raise ValueError("the listing's columns are not all as long as its count")
    sizes, mtimes, widths, heights, orientations = ints
    with gc_paused():  # 100k rows: 26 ms instead of 100
        return list(map(tuple.__new__, repeat(FolderFile),
                        zip(paths, sizes, mtimes, widths, heights, formats, orientations,
                            strict=True)))


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
            for directory, rels, sizes, mtimes in walk_runs(self.root):
                for i in range(0, len(rels), CHUNK):
                    if self._stop.is_set():
                        break
                    self._take_chunk(directory, rels[i:i + CHUNK], sizes[i:i + CHUNK],
                                     mtimes[i:i + CHUNK], known, pool)
                if self._stop.is_set():
                    break
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

    def _take_chunk(self, directory: str, rels: list[str], sizes: list[int], mtimes: list[int],
                    known: _Known, pool: ThreadPoolExecutor | None) -> None:
        files = known.same(rels, sizes, mtimes)
        misses: list[int] = []
        if files is None:  # something changed in this stretch: file by file
            found = [known.get(*key) for key in zip(rels, sizes, mtimes, strict=True)]
            misses = [i for i, row in enumerate(found) if row is None]
            paths = [_full_path(directory, rels[i]) for i in misses]
            headers = list(pool.map(_read, paths) if pool is not None else map(_read, paths))
            for i, header in zip(misses, headers, strict=True):
                found[i] = FolderFile(rels[i], sizes[i], mtimes[i], *header)
            known.changed += len(misses)
            files = cast(list[FolderFile], found)
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
