"""The Hub's disk cache: files by store, dataset and path, indexed by sha256 in SQLite.

A cache folder holds one folder per store, named by the id the server reports
(``GetStoreInfo``), so that every address of one server shares its files and
two servers never mix theirs; see :class:`FileCache`.

Every name that becomes part of a filesystem path here (dataset, file path,
version) is validated first, and :func:`inside` checks that the result stays
under its root: the names come from callers and from servers, and neither is
trusted to keep the Hub inside its cache or download folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from gristmill.client.errors import FailedPrecondition, GristmillError, InvalidArgument
from gristmill.client.names import validate_dataset_name, validate_path
from gristmill.client.tuning import gc_paused

__all__ = ["Confined", "FileCache", "address_store_id", "cache_summary", "clear_folder", "inside",
           "known_store", "safe_component", "validate_store_id", "validate_version_name"]

#: A folder changed less than this before a complete record was made may have changed
#: again in the same clock tick (coarse timestamps): the record is not trusted.
RACY_NS = 2_000_000_000
#: Bytes a complete record's folder list may inflate to.
_MAX_RECORD_BYTES = 64 << 20
_FOLDER = re.compile(r"(?:(?!\.\.?/)[^/\x00]+/)+")  # a record's folder: "a/" or "a/b/"
log = logging.getLogger(__name__)

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_component(text: str) -> str:
    """A string usable as one directory name (for server addresses); never ``.`` or ``..``."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
    return "_" if not name.strip(".") else name


def validate_version_name(version: str, field: str = "version") -> str:
    """A version as the cache names it: an id or id prefix, no separators or dots first."""
    if _VERSION.fullmatch(version) is None:
        shown = ascii(version if len(version) <= 80 else version[:80] + "...")
        raise InvalidArgument(field, f"{shown} is not a version: use 'latest', a version id or "
                              "a prefix of at least 8 of its characters", reason="INVALID_VERSION")
    return version


def inside(root: Path, relative: str, field: str = "path", *,
           real: set[str] | None = None) -> Path:
    """``root / relative``, refusing anything that would lead out of ``root``.

    ``relative`` must be a valid store path (:func:`~gristmill.client.names.validate_path`:
    no ``..``, not absolute; used in its NFC form). No folder between ``root``
    and the target may be a symbolic link (folders that do not exist yet are
    fine), and the target, if it is a link, must resolve to a place inside
    ``root``. ``root`` itself may be a link: that is the user's choice.

    ``real`` remembers folders already found to be real (not links) across
    calls, so that many files in one folder cost one check of it. The checks
    guard against links that are there before the Hub writes, not against a
    local process racing it.

    Raises:
        InvalidArgument: ``relative`` is not a valid path.
        FailedPrecondition: a symbolic link would lead the path out of ``root``.
    """
    rel = validate_path(relative, field, strict=False)
    return _join(Path(root).resolve(), Path(root), rel.split("/"), real)


@lru_cache(maxsize=1 << 16)
def _valid_path(path: str) -> str:
    """:func:`validate_path` for paths met again and again (errors are not cached)."""
    return validate_path(path, strict=False)


def _join(base: Path, root: Path, parts: list[str], real: set[str] | None = None, *,
          last: bool = True) -> Path:
    """``root`` joined with valid path segments, refusing links (``base`` is root resolved).

    ``last=False`` leaves the target itself unchecked: for a caller that
    ``lstat``s it anyway and treats a link as absent.
    """
    # segments are validated (no separators, no '.' or '..'): plain string joins
    target = os.fspath(base)
    for part in parts[:-1]:
        target = f"{target}/{part}"
        if real is not None and target in real:
            continue
        if os.path.islink(target):
            raise _link_refused(Path(target), root)
        if real is not None and os.path.isdir(target):
            real.add(target)
    target = f"{target}/{parts[-1]}"
    if last and os.path.islink(target) and \
            not Path(os.path.realpath(target)).is_relative_to(base):
        raise _link_refused(Path(target), root)
    return Path(os.path.join(os.fspath(root), "/".join(parts)))


class Confined:
    """A folder that relative paths are joined under with :func:`inside`'s checks.

    The root is resolved once and folders found real are remembered, so that
    many files cost one check per folder.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._base = self.root.resolve()
        self._real: set[str] = set()

    def path(self, relative: str, field: str = "path") -> Path:
        """``root / relative`` (validated; links out of root refused, see :func:`inside`)."""
        try:
            rel = _valid_path(relative)
        except InvalidArgument:
            rel = validate_path(relative, field, strict=False)  # raises, naming the field
        return self.join(rel.split("/"))

    def join(self, segments: list[str], *, last: bool = True) -> Path:
        """``root`` joined with segments already validated (links out of root refused).

        ``last=False``: the target itself is not checked (see :func:`_join`).
        """
        return _join(self._base, self.root, segments, self._real, last=last)

    def forget(self) -> None:
        """Check every folder again (after deleting some)."""
        self._real.clear()


def child_paths(base: Path, relatives: list[str]) -> list[Path]:
    """``base / r`` for each relative path made of plain segments (no ``.``, ``..``, ``//``).

    On CPython 3.11, ``Path`` parses every string it is given again (~4 us a
    path): a million cached files would take 4 s to name. There the paths
    are made from ``base``'s parsed parts plus the segments (~0.7 us), which
    is what ``joinpath`` ends with; the first is checked against
    ``joinpath``, and any other Python takes the plain way. The garbage
    collector is paused meanwhile (a million new paths made it walk them
    again and again: 2 us a path instead of 0.7).
    """
    with gc_paused():
        make = getattr(type(base), "_from_parsed_parts", None)
        parts = getattr(base, "_parts", None)
        if (sys.version_info[:2] != (3, 11) or not relatives or make is None
                or not isinstance(parts, list)):
            return [base.joinpath(r) for r in relatives]
        drv, root = base.drive, base.root
        out: list[Path] = [make(drv, root, [*parts, *r.split("/")]) for r in relatives]
        for i in (0, -1):  # made as joinpath makes them, or the plain way
            plain = base.joinpath(relatives[i])
            if out[i] != plain or str(out[i]) != str(plain):
                return [base.joinpath(r) for r in relatives]
        return out


def _folder_times(base: str, folders: list[str]) -> list[tuple[str, int]] | None:
    """(folder, mtime_ns) of each folder ("" or "a/b/") below ``base``; None if one is gone."""
    try:
        return [(f, os.lstat(f"{base}/{f}").st_mtime_ns) for f in folders]
    except OSError:
        return None


def _link_refused(link: Path, root: Path) -> FailedPrecondition:
    return FailedPrecondition(f"{link} is a symbolic link; refusing to follow it out of {root} "
                              "(remove the link, or choose another folder)",
                              reason="SYMLINK_REFUSED")


def _tree_bytes(base: Path) -> int:
    """Bytes of the regular files under ``base`` (links are not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


_STORE_ID = re.compile(r"[0-9a-f]{32}|addr-[A-Za-z0-9._-]{1,200}")
INDEX = "index.sqlite"


def validate_store_id(store_id: str, field: str = "store_id") -> str:
    """A store id as a cache folder name: 32 hex digits (or ``addr-...`` for an old server)."""
    if _STORE_ID.fullmatch(store_id) is None:
        shown = ascii(store_id if len(store_id) <= 80 else store_id[:80] + "...")
        raise InvalidArgument(field, f"{shown} is not a store id (32 lower-case hex digits)",
                              reason="INVALID_STORE_ID")
    return store_id


def address_store_id(address: str) -> str:
    """The cache key for a server too old to report its store id: its address."""
    return "addr-" + safe_component(address)[:200]


#: Files being returned right now, by (cache folder, store, dataset, path): never evicted.
_KEPT: Counter[tuple[str, str, str, str]] = Counter()
_KEPT_LOCK = threading.Lock()


#: Paths per statement when many files are marked used at once.
_TOUCH_CHUNK = 50_000

#: The bytes of all indexed files, kept by triggers in the same transaction as the rows
#: (an upsert fires the UPDATE trigger; INSERT OR REPLACE would skip the DELETE one).
_TOTAL_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cache_total (id INTEGER PRIMARY KEY CHECK (id = 0), "
    "bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO cache_total VALUES (0, 0)",
    "CREATE TRIGGER IF NOT EXISTS cache_files_added AFTER INSERT ON cache_files BEGIN "
    "UPDATE cache_total SET bytes = bytes + NEW.size WHERE id = 0; END",
    "CREATE TRIGGER IF NOT EXISTS cache_files_removed AFTER DELETE ON cache_files BEGIN "
    "UPDATE cache_total SET bytes = bytes - OLD.size WHERE id = 0; END",
    "CREATE TRIGGER IF NOT EXISTS cache_files_resized AFTER UPDATE OF size ON cache_files "
    "BEGIN UPDATE cache_total SET bytes = bytes - OLD.size + NEW.size WHERE id = 0; END",
    # once per open: rows written by a client that predates the triggers are counted too
    "UPDATE cache_total SET bytes = (SELECT COALESCE(SUM(size), 0) FROM cache_files) "
    "WHERE id = 0",
)

#: Datasets (by manifest digest) downloaded whole, and a counter that any loss or change
#: of an indexed file moves on (triggers, so every writer of the index keeps it):
#: a record made at an older generation no longer holds.
_COMPLETE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cache_generation (id INTEGER PRIMARY KEY CHECK (id = 0), "
    "generation INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO cache_generation VALUES (0, 0)",
    "CREATE TABLE IF NOT EXISTS cache_whole (store TEXT, dataset TEXT, manifest TEXT, "
    "files INTEGER, generation INTEGER, folders BLOB, made INTEGER, "
    "PRIMARY KEY (store, dataset, manifest))",
    "CREATE TRIGGER IF NOT EXISTS cache_files_lost AFTER DELETE ON cache_files BEGIN "
    "UPDATE cache_generation SET generation = generation + 1 WHERE id = 0; END",
    "CREATE TRIGGER IF NOT EXISTS cache_files_changed AFTER UPDATE OF sha256, size ON "
    "cache_files WHEN OLD.sha256 IS NOT NEW.sha256 OR OLD.size IS NOT NEW.size BEGIN "
    "UPDATE cache_generation SET generation = generation + 1 WHERE id = 0; END",
)

_UPSERT = ("INSERT INTO cache_files VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (store, dataset, "
           "path) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, "
           "used = excluded.used")


def _connect(top: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(top / INDEX), check_same_thread=False, isolation_level=None,
                         timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # a cache: a lost row costs a download
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS stores (address TEXT PRIMARY KEY, store TEXT, "
                   "seen REAL)")
        db.execute("CREATE TABLE IF NOT EXISTS cache_files (store TEXT, dataset TEXT, "
                   "path TEXT, sha256 TEXT, size INTEGER, used INTEGER, "
                   "PRIMARY KEY (store, dataset, path))")
        db.execute("CREATE INDEX IF NOT EXISTS cache_files_used ON cache_files (used)")
        for statement in (*_TOTAL_SCHEMA, *_COMPLETE_SCHEMA):
            db.execute(statement)
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()
        raise
    return db


def known_store(top: Path, address: str) -> str | None:
    """The store id last seen at ``address`` by a cache in ``top`` (None; nothing is created)."""
    index = Path(top).expanduser() / INDEX
    if not index.is_file():
        return None
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT store FROM stores WHERE address = ?", [address]).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    if row is None or _STORE_ID.fullmatch(str(row[0])) is None:
        return None
    return str(row[0])


class FileCache:
    """One store's cached files: ``<top>/<store id>/datasets/<dataset>/<path>``.

    ``<top>/index.sqlite`` records every verified file of every store cached
    under ``top`` (sha256, size, last use) and the store id last seen at each
    address. ``limit`` bounds the bytes of cached files under ``top``: when a
    new file takes the total above it, the least recently used files (of any
    store) are deleted whole until it fits, except files being returned.
    Manifests of pinned versions are kept beside the files (small; not counted
    in the limit).
    """

    def __init__(self, top: Path, store_id: str, limit: int | None = None) -> None:
        self.top = Path(top).expanduser()
        self.store = validate_store_id(store_id)
        self.root = self.top / self.store
        self.limit = limit
        self.root.mkdir(parents=True, exist_ok=True)
        self._top = Confined(self.top)
        self._folder = Confined(self.root)
        self._key = os.fspath(self.top.resolve())
        self._lock = threading.Lock()
        self._db = _connect(self.top)

    def _under(self, *parts: str) -> Path:
        """``root/parts...`` (each part already a valid name or path), refusing links out of it."""
        return self._folder.join([s for p in parts for s in p.split("/")])

    def remember(self, address: str) -> None:
        """Note that ``address`` reached this store (for offline use)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO stores VALUES (?, ?, ?)",
                             [address, self.store, time.time()])

    def dataset_dir(self, dataset: str) -> Path:
        """Where a dataset's files are cached (the name is validated)."""
        return self._under("datasets", validate_dataset_name(dataset, "dataset"))

    def file_path(self, dataset: str, path: str) -> Path:
        """Where one file is cached (dataset and path are validated; see :func:`inside`)."""
        return self._file(validate_dataset_name(dataset, "dataset"), _valid_path(path))

    def _file(self, dataset: str, path: str) -> Path:
        return self._under("datasets", dataset, path)

    def paths(self, dataset: str, relatives: list[str]) -> list[Path]:
        """Where these files are cached, as :meth:`on_disk` names them, with no check per file.

        Only for paths already validated and NFC-normalised when they were
        cached (see :meth:`complete`): nothing here checks them again.
        """
        return child_paths(self.dataset_dir(dataset), relatives)

    def manifest_path(self, dataset: str, version: str) -> Path:
        """Where a pinned version's compressed manifest is cached."""
        name = validate_dataset_name(dataset, "dataset")
        return self._under("manifests", name, f"{validate_version_name(version)}.pb.z")

    def cached(self, dataset: str) -> dict[str, tuple[str, int]]:
        """Every indexed file of a dataset: path -> (sha256, size), in one query.

        The index only; whether each file is still on disk is :meth:`on_disk`'s
        question.
        """
        dataset = validate_dataset_name(dataset, "dataset")
        with self._lock:
            rows = self._db.execute("SELECT path, sha256, size FROM cache_files WHERE "
                                    "store = ? AND dataset = ?", [self.store, dataset])
            return {str(p): (str(h), int(n)) for p, h, n in rows}

    def on_disk(self, dataset: str, path: str, size: int) -> Path | None:
        """Where a cached file is, if a regular file of ``size`` bytes is there (else None).

        One ``lstat`` (no query): for files the index (:meth:`cached`) says are
        cached. A link there counts as absent (a download replaces the link,
        never what it points to); folders on the way are checked as in
        :func:`inside`.
        """
        target = self._folder.join(["datasets", dataset, *_valid_path(path).split("/")],
                                   last=False)
        try:
            st = os.lstat(target)
        except OSError:
            return None
        return target if stat.S_ISREG(st.st_mode) and st.st_size == size else None

    def lookup(self, dataset: str, path: str) -> tuple[str, int] | None:
        """(sha256, size) of a cached file still present on disk."""
        dataset, path = validate_dataset_name(dataset, "dataset"), _valid_path(path)
        target = self._file(dataset, path)
        with self._lock:
            row = self._db.execute("SELECT sha256, size FROM cache_files WHERE store = ? AND "
                                   "dataset = ? AND path = ?",
                                   [self.store, dataset, path]).fetchone()
        if row is None:
            return None
        try:
            if target.stat().st_size != row[1]:
                return None
        except OSError:
            return None
        return str(row[0]), int(row[1])

    def touch(self, dataset: str, paths: list[str], *, every: bool = False) -> None:
        """Mark cached files as just used (the last to be evicted).

        One statement per 50,000 paths; ``every=True`` marks all of the
        dataset's files in one (``paths`` is then ignored).
        """
        now = time.time_ns()
        with self._lock:
            if every:
                self._db.execute("UPDATE cache_files SET used = ? WHERE store = ? AND "
                                 "dataset = ?", [now, self.store, dataset])
                return
            for i in range(0, len(paths), _TOUCH_CHUNK):
                self._db.execute("UPDATE cache_files SET used = ? WHERE store = ? AND "
                                 "dataset = ? AND path IN (SELECT value FROM json_each(?))",
                                 [now, self.store, dataset,
                                  json.dumps(paths[i:i + _TOUCH_CHUNK])])

    def record(self, dataset: str, path: str, sha256: str, size: int) -> None:
        """Note a verified file, then evict others if the cache is over its limit."""
        self.record_many(dataset, [(path, sha256, size)])

    def record_many(self, dataset: str, files: list[tuple[str, str, int]]) -> None:
        """Note verified files (path, sha256, size) in one transaction, evicting as needed."""
        dataset = validate_dataset_name(dataset)
        now = time.time_ns()
        rows = [(self.store, dataset, _valid_path(p), h, n, now) for p, h, n in files]
        with self._lock, self._transaction():
            self._db.executemany(_UPSERT, rows)
            self._evict()

    def generation(self) -> int:
        """The index's generation: it moves on whenever an indexed file is removed or changed.

        -1 if the index cannot be read (then nothing is recorded complete).
        """
        try:
            with self._lock:
                return int(self._db.execute("SELECT generation FROM cache_generation "
                                            "WHERE id = 0").fetchone()[0])
        except sqlite3.Error as e:
            log.warning("cache index %s: %s; whole downloads are checked file by file", self.top,
                        e)
            return -1

    def mark_complete(self, dataset: str, manifest: str, files: list[tuple[str, int]],
                      generation: int) -> None:
        """Note that every file (path, size) of the manifest with digest ``manifest`` is cached.

        ``generation`` is :meth:`generation` as read before the files were
        checked: if anything left the index since, the record is already
        stale. The modification times of the folders that hold the files are
        kept with it, so that a file deleted by hand later is noticed; they
        are read before and after one more ``lstat`` of every file, and
        nothing is recorded if a file is missing or a folder changed meanwhile.
        A record is a shortcut: when it cannot be written, the next download
        checks every file.
        """
        if generation < 0:
            return
        dataset = validate_dataset_name(dataset)
        folders = sorted({p[:p.rfind("/") + 1] for p, _ in files})
        base = os.fspath(self.dataset_dir(dataset))
        before = _folder_times(base, folders)
        for path, size in files:
            try:
                st = os.lstat(f"{base}/{path}")
            except OSError:
                return
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return
        if before is None or _folder_times(base, folders) != before:
            return
        blob = zlib.compress(json.dumps(before, separators=(",", ":")).encode(), 1)
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO cache_whole VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 [self.store, dataset, manifest, len(files), generation, blob,
                                  time.time_ns()])
        except sqlite3.Error as e:
            log.warning("cache index %s: cannot record %r as complete (%s); the next download "
                        "checks every file", self.top, dataset, e)

    def complete(self, dataset: str, manifest: str, files: int) -> bool:
        """Whether the manifest's ``files`` files are all cached, with nothing lost since.

        True only for a record made by :meth:`mark_complete` at the current
        generation (nothing evicted, cleared or replaced through the index
        since), with every folder of the files unchanged (nothing deleted,
        added or renamed in them by hand) and last changed well before the
        record was made (:data:`RACY_NS`: a change in the same clock tick
        would leave a folder's time as it was). A file edited in place by
        hand is not seen (``download_dataset(verify=True)`` checks each one).
        """
        dataset = validate_dataset_name(dataset)
        try:
            with self._lock:
                row = self._db.execute(
                    "SELECT c.files, c.generation = g.generation, c.folders, c.made FROM "
                    "cache_whole AS c, cache_generation AS g WHERE g.id = 0 AND c.store = ? "
                    "AND c.dataset = ? AND c.manifest = ?",
                    [self.store, dataset, manifest]).fetchone()
        except sqlite3.Error as e:
            log.warning("cache index %s: %s; checking every file", self.top, e)
            return False
        if row is None or int(row[0]) != files or not row[1]:
            return False
        try:
            inflate = zlib.decompressobj()
            raw = inflate.decompress(row[2], _MAX_RECORD_BYTES)
            if inflate.unconsumed_tail:
                return False
            recorded = [(str(f), int(t)) for f, t in json.loads(raw)]
        except (zlib.error, ValueError, TypeError, RecursionError):
            return False  # not a record this code wrote: check every file instead
        if any(f and not _FOLDER.fullmatch(f) for f, _ in recorded):
            return False
        if any(t >= int(row[3]) - RACY_NS for _, t in recorded):
            return False  # changed too close to the record to tell
        base = os.fspath(self.dataset_dir(dataset))
        return _folder_times(base, [f for f, _ in recorded]) == recorded

    def reserve(self, incoming: int) -> None:
        """Evict until ``incoming`` more bytes fit under the limit (files kept stay)."""
        if self.limit is None:
            return
        with self._lock, self._transaction():
            self._evict(incoming)

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction on the index (lock held by the caller)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def fits(self, sizes: list[int], what: str) -> None:
        """InvalidArgument if files of these sizes, kept together, exceed the limit."""
        need = sum(sizes)
        if self.limit is not None and need > self.limit:
            raise InvalidArgument("cache_limit", f"{what} needs {need} bytes in the cache at "
                                  f"once, more than cache_limit={self.limit}; raise "
                                  "cache_limit, ask for fewer files, or use get_file_bytes",
                                  reason="CACHE_LIMIT")

    @contextmanager
    def keeping(self, dataset: str, paths: list[str]) -> Iterator[None]:
        """Files that eviction leaves alone while the block runs (they are being returned)."""
        keys = [(self._key, self.store, dataset, p) for p in paths]
        with _KEPT_LOCK:
            _KEPT.update(keys)
        try:
            yield
        finally:
            with _KEPT_LOCK:
                _KEPT.subtract(keys)
                for k in keys:
                    if _KEPT[k] <= 0:
                        del _KEPT[k]

    def _evict(self, incoming: int = 0) -> None:
        """Delete least recently used files until the total fits the limit (lock held).

        The total is one row kept by triggers, so a cache under its limit
        costs one query; candidates are read oldest first, a page at a time.
        """
        if self.limit is None:
            return
        limit = self.limit - incoming
        total = int(self._db.execute("SELECT bytes FROM cache_total WHERE id = 0")
                    .fetchone()[0])
        if total <= limit:
            return
        with _KEPT_LOCK:
            kept = set(_KEPT)
        for store, dataset, path, size in self._oldest():
            if total <= limit:
                break
            if (self._key, store, dataset, path) in kept:
                continue
            try:
                target = self._top.join([validate_store_id(store), "datasets",
                                         validate_dataset_name(dataset), *_valid_path(path)
                                         .split("/")])
                target.unlink(missing_ok=True)
            except (GristmillError, IsADirectoryError):
                pass  # a row naming nothing the cache may delete: forget it
            except OSError:
                continue
            self._db.execute("DELETE FROM cache_files WHERE store = ? AND dataset = ? AND "
                             "path = ?", [store, dataset, path])
            total -= int(size)

    def _oldest(self, page: int = 256) -> Iterator[tuple[str, str, str, int]]:
        """Indexed files, least recently used first, read a page at a time."""
        after: tuple[int, int] = (-(1 << 63), -1)
        while True:
            rows = self._db.execute("SELECT used, rowid, store, dataset, path, size FROM "
                                    "cache_files WHERE (used, rowid) > (?, ?) "
                                    "ORDER BY used, rowid LIMIT ?", [*after, page]).fetchall()
            for _used, _rowid, store, dataset, path, size in rows:
                yield str(store), str(dataset), str(path), int(size)
            if len(rows) < page:
                return
            after = (int(rows[-1][0]), int(rows[-1][1]))

    def _scope(self, dataset: str | None) -> tuple[str | None, list[Path]]:
        if dataset is None:
            return None, [self._under("datasets"), self._under("manifests")]
        name = validate_dataset_name(dataset, "dataset")
        return name, [self._under("datasets", name), self._under("manifests", name)]

    def size(self, dataset: str | None = None) -> int:
        """Bytes of files and manifests cached for this store (or one dataset of it).

        The index is not counted, and links are not followed.
        """
        _, dirs = self._scope(dataset)
        return sum(_tree_bytes(d) for d in dirs)

    def clear(self, dataset: str | None = None) -> int:
        """Delete this store's cached files and manifests (all, or one dataset's).

        Returns the bytes freed: what :meth:`size` counted before, less what
        could not be deleted.
        """
        name, dirs = self._scope(dataset)
        before = sum(_tree_bytes(d) for d in dirs)
        with self._lock:
            self._folder.forget()
            self._top.forget()
            if name is None:
                self._db.execute("DELETE FROM cache_files WHERE store = ?", [self.store])
                self._db.execute("DELETE FROM cache_whole WHERE store = ?", [self.store])
            else:
                self._db.execute("DELETE FROM cache_files WHERE store = ? AND dataset = ?",
                                 [self.store, name])
                self._db.execute("DELETE FROM cache_whole WHERE store = ? AND dataset = ?",
                                 [self.store, name])
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)
        return max(0, before - sum(_tree_bytes(d) for d in dirs))

    def close(self) -> None:
        """Close the index."""
        self._db.close()


def cache_summary(top: Path) -> dict[str, Any]:
    """What a cache folder holds, by store and dataset (read-only; nothing is created).

    ``{"path", "bytes", "files", "stores": [{"store_id", "addresses", "bytes",
    "files", "datasets": {name: {"bytes", "files"}}}]}``; bytes are files on
    disk (manifests included), files are the indexed files.
    """
    top = Path(top).expanduser()
    out: dict[str, Any] = {"path": str(top), "bytes": 0, "files": 0, "stores": []}
    if not (top / INDEX).is_file():
        return out
    db = sqlite3.connect(f"file:{top / INDEX}?mode=ro", uri=True, timeout=30)
    try:
        addresses = db.execute("SELECT store, address FROM stores ORDER BY seen DESC").fetchall()
        counts = db.execute("SELECT store, dataset, COUNT(*) FROM cache_files "
                            "GROUP BY store, dataset").fetchall()
    except sqlite3.Error:
        addresses, counts = [], []
    finally:
        db.close()
    by_store: dict[str, list[str]] = {}
    for store, address in addresses:
        by_store.setdefault(str(store), []).append(str(address))
    indexed = {(str(s), str(d)): int(n) for s, d, n in counts}
    for folder in sorted(top.iterdir()):
        if _STORE_ID.fullmatch(folder.name) is None or folder.is_symlink() or \
                not folder.is_dir():
            continue
        names: set[str] = set()
        for sub in ("datasets", "manifests"):
            d = folder / sub
            if d.is_dir() and not d.is_symlink():
                names.update(p.name for p in d.iterdir())
        datasets: dict[str, dict[str, int]] = {}
        for name in sorted(names):
            if _dataset_or_none(name) is None:
                continue
            size = _tree_bytes(folder / "datasets" / name) + _tree_bytes(
                folder / "manifests" / name)
            datasets[name] = {"bytes": size, "files": indexed.get((folder.name, name), 0)}
        store = {"store_id": folder.name, "addresses": by_store.get(folder.name, []),
                 "bytes": sum(d["bytes"] for d in datasets.values()),
                 "files": sum(d["files"] for d in datasets.values()), "datasets": datasets}
        out["stores"].append(store)
        out["bytes"] += store["bytes"]
        out["files"] += store["files"]
    return out


def _dataset_or_none(name: str) -> str | None:
    try:
        return validate_dataset_name(name)
    except InvalidArgument:
        return None


def clear_folder(top: Path, dataset: str | None = None) -> int:
    """Clear every store cached in ``top`` (or one dataset in each); returns bytes freed."""
    top = Path(top).expanduser()
    if dataset is not None:
        validate_dataset_name(dataset, "dataset")
    if not (top / INDEX).is_file():
        return 0
    freed = 0
    for store in cache_summary(top)["stores"]:
        cache = FileCache(top, store["store_id"])
        try:
            freed += cache.clear(dataset)
        finally:
            cache.close()
    return freed
