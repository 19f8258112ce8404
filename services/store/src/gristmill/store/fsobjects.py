"""The filesystem backend: each object a file ``<root>/<key>``.

Writes are staged in ``<root>/tmp/`` (0600) and renamed into place, so a
reader never sees a partial file; :meth:`FsBackend.commit` makes a group of
stagings durable together (one fsync per file and one per directory that
gained an entry, or one ``syncfs`` before and after the renames). Conditional
puts take one of 256 ``flock`` stripes under ``<root>/locks/``, so two
writers (threads or processes) to one key are serialised and a stale
expected version is detected. A key's version is its file's inode, mtime
and size: every write renames a new file into place, so it changes.

Staged objects up to ``inline_max_bytes`` (small blobs) are kept as rows of
``<root>/small-objects.sqlite`` instead (:mod:`gristmill.store.smallobjects`):
their bytes stay in memory until the commit, which stores a message's rows
in one transaction. Every read, listing and delete sees both kinds.

Reads refuse symlinks below the root, so nothing outside it is ever served.
Directories are created 0700 and files 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import heapq
import os
import stat
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gristmill.client.errors import FailedPrecondition
from gristmill.client.private import temp_token
from gristmill.store.config import FsBackendConfig
from gristmill.store.disk import DIR_MODE, FILE_MODE, private_dir
from gristmill.store.objects import (
    ObjectBackend,
    ObjectMissing,
    ObjectStat,
    PutResult,
    Staging,
    register_backend,
    validate_key,
)
from gristmill.store.smallobjects import ROW_VERSION_PREFIX, SmallObjects

if TYPE_CHECKING:
    from gristmill.store.config import StoreConfig

__all__ = ["SMALL_OBJECTS", "SYNC_METHODS", "FsBackend", "SyncMethod"]

#: How :meth:`FsBackend.commit` makes a group of new objects durable.
SyncMethod = Literal["fsync", "syncfs"]
SYNC_METHODS: tuple[SyncMethod, ...] = ("fsync", "syncfs")
_LOCK_STRIPES = 256
#: The file of small staged objects, in the backend's root.
SMALL_OBJECTS = "small-objects.sqlite"


class _FsStaging(Staging):
    def __init__(self, backend: FsBackend) -> None:
        self._backend = backend
        self.path = backend.tmp_dir / f"{temp_token()}.part"
        self.size = 0
        backend.active_temporaries.add(self.path.name)  # before it exists: gc skips it
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                          | os.O_CLOEXEC, FILE_MODE)
        except OSError:
            backend.active_temporaries.discard(self.path.name)
            raise

    def write(self, data: bytes) -> None:
        assert self.fd is not None, "write after abort"
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.size += len(data)

    def flush(self, sync: bool) -> None:
        fd, self.fd = self.fd, None
        assert fd is not None
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.path.unlink(missing_ok=True)
        self._backend.active_temporaries.discard(self.path.name)


class _SmallStaging(Staging):
    """Bytes held in memory while they fit ``inline_max_bytes``; past it, a staging file."""

    def __init__(self, backend: FsBackend) -> None:
        self._backend = backend
        self.data: bytearray | None = bytearray()
        #: The staging file the bytes went to once they outgrew the limit.
        self.spilled: _FsStaging | None = None
        self.size = 0

    def write(self, data: bytes) -> None:
        if self.spilled is None:
            assert self.data is not None, "write after abort"
            if self.size + len(data) <= self._backend.inline_max_bytes:
                self.data += data
                self.size += len(data)
                return
            spilled = _FsStaging(self._backend)
            try:
                spilled.write(bytes(self.data))
            except OSError:
                spilled.abort()
                raise
            self.spilled, self.data = spilled, None
        self.spilled.write(data)
        self.size += len(data)

    def abort(self) -> None:
        self.data = None
        if self.spilled is not None:
            self.spilled.abort()


class FsBackend(ObjectBackend):
    """Objects as files under a root directory (see the module docstring).

    Args:
        root: the store's directory.
        sync: ``"fsync"`` (each file, then each directory that gained an
            entry, once) or ``"syncfs"`` (Linux: one ``syncfs`` of the volume
            before the renames and one after, whatever the number of files).
        inline_max_bytes: staged objects up to this size are kept as rows of
            ``small-objects.sqlite`` instead of files (0: none). Rows stored
            before are read whatever the setting.
    """

    kind = "fs"

    def __init__(self, root: Path, sync: SyncMethod = "fsync", inline_max_bytes: int = 0
                 ) -> None:
        if inline_max_bytes < 0:
            raise ValueError("inline_max_bytes must not be negative")
        if sync not in SYNC_METHODS:
            raise ValueError(f"unknown sync method {sync!r}; use one of {SYNC_METHODS}")
        if sync == "syncfs" and _syncfs_call() is None:
            raise ValueError("store.sync_method 'syncfs' needs Linux (the syncfs call); use "
                             "'fsync'")
        self.sync: SyncMethod = sync
        self.root = Path(root).resolve()
        self._root = str(self.root)
        self.tmp_dir = self.root / "tmp"
        self.lock_dir = self.root / "locks"
        for directory in (self.root, self.tmp_dir, self.lock_dir):
            private_dir(directory)
        #: Names of stagings open in this process (:meth:`remove_temporaries` skips them).
        self.active_temporaries: set[str] = set()
        self.inline_max_bytes = inline_max_bytes
        try:
            self.small = SmallObjects(self.root / SMALL_OBJECTS)
        except OSError as e:
            raise self.error("open the small-object database", e) from None

    def describe(self) -> str:
        return f"directory {self.root}"

    @contextlib.contextmanager
    def _rows(self, operation: str) -> Iterator[SmallObjects]:
        """The small objects, their ``OSError`` made this backend's error for ``operation``."""
        try:
            yield self.small
        except OSError as e:
            raise self.error(operation, e) from None

    def path_for(self, key: str) -> Path:
        """Where the object lives (no check that it exists)."""
        return self.root / key

    def _checked_path(self, key: str) -> Path:
        return Path(self._check(key)[0])

    def _check(self, key: str) -> tuple[str, int]:
        """The object's path, and how many of its parent directories exist.

        Each existing parent below the root must be a real directory: a
        symlink anywhere below the root is refused, so nothing outside it is
        read or written. (One lstat per level below the root; the root itself
        was resolved once.)
        """
        parts = validate_key(key).split("/")
        current = self._root
        for depth, part in enumerate(parts[:-1]):
            current = f"{current}/{part}"
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return f"{self._root}/{key}", depth
            if not stat.S_ISDIR(mode):
                raise FailedPrecondition(f"{key} is behind a symlink (or file) inside the data "
                                         "directory; refusing to follow it. Remove the link.",
                                         reason="OBJECT_CORRUPT")
        return f"{self._root}/{key}", len(parts) - 1

    # -- writes ---------------------------------------------------------------------
    def stages_in_memory(self, size: int) -> bool:
        return 0 <= size <= self.inline_max_bytes

    def stage(self) -> Staging:
        return _SmallStaging(self) if self.inline_max_bytes > 0 else _FsStaging(self)

    def _place(self, staged: Path, key: str, final: str, existing: int, made: set[Path]
               ) -> None:
        """Rename a staged file into place, making its parents.

        Again if a delete of the directory's last other object pruned them meanwhile.
        """
        self._make_parents(key, existing, made)
        try:
            os.replace(staged, final)
        except FileNotFoundError:
            if not staged.exists():
                raise
            self._make_parents(key, 0, made)
            os.replace(staged, final)

    def _make_parents(self, key: str, existing: int, made: set[Path]) -> None:
        """Create the parent directories of ``key`` below the first ``existing`` ones."""
        parts = key.split("/")[:-1]
        current = "/".join([self._root, *parts[:existing]])
        for part in parts[existing:]:
            current = f"{current}/{part}"
            try:
                os.mkdir(current, DIR_MODE)
                made.add(Path(current))
            except FileExistsError:
                pass

    def commit(self, items: Sequence[tuple[Staging, str]]) -> list[bool]:
        """Durable, then visible: rows in one transaction; files flushed, renamed, synced.

        Small objects become rows of one transaction; files are flushed (fsync
        or syncfs), renamed into place, and their directories fsynced. A crash
        before the end leaves at most complete, unreferenced objects.
        """
        created = [False] * len(items)
        files: list[tuple[int, _FsStaging, str]] = []
        small: list[tuple[int, _SmallStaging, str]] = []
        for i, (s, key) in enumerate(items):
            if isinstance(s, _SmallStaging):
                if s.spilled is None:
                    small.append((i, s, key))
                else:
                    files.append((i, s.spilled, key))
            elif isinstance(s, _FsStaging):
                files.append((i, s, key))
        try:
            if files:
                with self._rows("store an upload's bytes") as db:
                    rows = db.stats([key for _, _, key in files])
                self._commit_files([f for f in files if f[2] not in rows], created)
            self._commit_small(small, created)
        finally:
            for i, st, _ in [*files, *small]:
                if not created[i]:
                    st.abort()
        return created

    def _commit_small(self, small: list[tuple[int, _SmallStaging, str]], created: list[bool]
                      ) -> None:
        """Store in-memory stagings as rows, in one transaction (a key stored as a file stays)."""
        rows: list[tuple[int, str, bytearray]] = []
        for i, st, key in small:
            if st.data is not None and not os.path.lexists(f"{self._root}/{validate_key(key)}"):
                rows.append((i, key, st.data))
        with self._rows("store an upload's bytes") as db:
            made = db.insert_new([(key, data) for _, key, data in rows])
        for (i, _, _), new in zip(rows, made, strict=True):
            created[i] = new
        for i, st, _ in small:
            if created[i]:
                st.data = None  # stored: the memory goes

    def _commit_files(self, staged: list[tuple[int, _FsStaging, str]], created: list[bool]
                      ) -> None:
        try:
            try:
                if self.sync == "fsync":
                    _in_parallel([partial(st.flush, True) for _, st, _ in staged])
                else:
                    for _, st, _ in staged:
                        st.flush(sync=False)
                    if staged:
                        self._syncfs()
            except OSError as e:
                raise self.error("store an upload's bytes", e) from None
            touched: set[Path] = set()
            made: set[Path] = set()
            for i, s, key in staged:
                final, existing = self._check(key)
                if os.path.lexists(final):
                    s.abort()
                    continue
                try:
                    self._place(s.path, key, final, existing, made)
                except OSError as e:
                    if os.path.lexists(final):
                        s.abort()  # stored meanwhile by another upload
                        continue
                    raise self.error("store an upload's bytes", e) from None
                created[i] = True
                self.active_temporaries.discard(s.path.name)
                touched.add(Path(os.path.dirname(final)))
            touched.update(d.parent for d in made)  # a new directory is an entry of its parent
            try:
                self._sync_dirs(touched)
            except OSError as e:
                raise self.error("store an upload's bytes", e) from None
        finally:
            for i, s, _ in staged:
                if not created[i]:
                    s.abort()

    def _sync_dirs(self, directories: set[Path]) -> None:
        if directories and self.sync == "syncfs":
            self._syncfs()
        else:
            _in_parallel([partial(fsync_dir, d) for d in sorted(directories)])

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        stripe = zlib.crc32(key.encode()) % _LOCK_STRIPES
        fd = os.open(self.lock_dir / f"{stripe:02x}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def put(self, key: str, data: bytes, *, expected_version: str | None = None,
            if_absent: bool = False) -> PutResult:
        final, existing = self._check(key)
        path = Path(final)
        with self._key_lock(key):
            current = self.stat(key)
            if (if_absent and current is not None) or (
                    expected_version is not None
                    and (current.version if current else "") != expected_version):
                return PutResult(True, current.version if current else "")
            staging = _FsStaging(self)  # a put may replace: always a file (zarr reads it)
            try:
                staging.write(data)
                staging.flush(sync=self.sync == "fsync")
                if self.sync == "syncfs":
                    self._syncfs()
                made: set[Path] = set()
                self._place(staging.path, key, final, existing, made)
                self.active_temporaries.discard(staging.path.name)
                self._sync_dirs({path.parent} | {d.parent for d in made})
            except OSError as e:
                staging.abort()
                raise self.error(f"write {key}", e) from None
            if current is not None and self._is_row(current):
                with self._rows(f"write {key}") as db:  # the file replaces the row
                    db.delete(key)
            now = self.stat(key)
            assert now is not None
            return PutResult(False, now.version)

    def delete(self, key: str, *, expected_version: str | None = None) -> tuple[PutResult, int]:
        path = self._checked_path(key)
        with self._rows(f"delete {key}") as db:
            row = db.delete(key, expected_version)
        if row is not None:
            if not row[0].conflict:  # a file of the key too (a put that died midway) goes
                with contextlib.suppress(FileNotFoundError), self._key_lock(key):
                    path.unlink()
            return row
        with self._key_lock(key):
            current = self.stat(key)
            if current is None:
                return PutResult(expected_version not in (None, ""), ""), 0
            if expected_version is not None and current.version != expected_version:
                return PutResult(True, current.version), 0
            try:
                path.unlink()
            except FileNotFoundError:
                return PutResult(False, ""), 0
            except OSError as e:
                raise self.error(f"delete {key}", e) from None
            self._prune(key)
            return PutResult(False, ""), current.size

    def _prune(self, key: str) -> None:
        """Remove the parents a delete left empty (an array's ``c/0/...``), up to the root.

        The blob fan-out directories (``blobs/ab/cd``) stay: they fill up again.
        """
        parts = key.split("/")[:-1]
        if parts[:1] == ["blobs"]:
            return
        while parts:
            try:
                os.rmdir("/".join([self._root, *parts]))
            except OSError:  # not empty (or gone): nothing above is empty either
                return
            parts.pop()

    def touch(self, key: str) -> bool:
        try:
            if self.small.touch(validate_key(key)):
                return True
        except OSError:
            pass  # the database busy or the volume full: the file (if any) still counts
        try:
            os.utime(self._checked_path(key), follow_symlinks=False)
        except FileNotFoundError:
            return self.stat(key) is not None  # a row (its touch failed) or nothing
        except (OSError, FailedPrecondition):
            pass
        return True

    # -- reads ----------------------------------------------------------------------
    def _open_fd(self, key: str) -> int:
        path = self._checked_path(key)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        except OSError as e:
            raise FailedPrecondition(f"{key} cannot be opened ({e.strerror}); a symlink or a "
                                     "permission problem in the data directory",
                                     reason="OBJECT_CORRUPT") from None

    @staticmethod
    def _is_row(st: ObjectStat) -> bool:
        """Whether a stat is of a small object (a row), not a file."""
        return st.version.startswith(ROW_VERSION_PREFIX)

    def _row(self, key: str, offset: int = 0, length: int = -1
             ) -> tuple[bytes, ObjectStat] | None:
        """The key's row (a slice of it), or None if it is not a small object."""
        with self._rows(f"read {key}") as db:
            return db.read(validate_key(key), offset, length)

    def read(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        row = self._row(key, offset, length)
        if row is not None:
            return row[0]
        fd = self._open_fd(key)
        try:
            if length < 0:
                length = max(0, os.fstat(fd).st_size - offset)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def read_versioned(self, key: str, offset: int = 0, length: int = -1
                       ) -> tuple[bytes, ObjectStat] | None:
        row = self._row(key, offset, length)
        if row is not None:
            return row
        # one open file is one version: a rename replaces the name, not the file
        try:
            fd = self._open_fd(key)
        except ObjectMissing:
            return None
        try:
            st = os.fstat(fd)
            if length < 0:
                length = max(0, st.st_size - offset)
            return os.pread(fd, length, offset), _stat(key, st)
        finally:
            os.close(fd)

    def read_many(self, reads: Sequence[tuple[str, int, int]], versions: bool = True
                  ) -> list[tuple[bytes, ObjectStat] | None]:
        """Small objects in one query per few hundred keys; files one by one."""
        with self._rows("read small objects") as db:
            rows = db.read_many([validate_key(key) for key, _, _ in reads])
        got: list[tuple[bytes, ObjectStat] | None] = []
        for key, offset, length in reads:
            row = rows.get(key)
            if row is None:
                got.append(self.read_versioned(key, offset, length))
            else:
                data, st = row
                got.append((data[offset:offset + length] if length >= 0 else data[offset:], st))
        return got

    def stat(self, key: str) -> ObjectStat | None:
        with self._rows(f"look up {key}") as db:
            row = db.stats([validate_key(key)]).get(key)
        if row is not None:
            return row
        try:
            st = self.path_for(key).lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _stat(key, st) if stat.S_ISREG(st.st_mode) else None

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        with self._rows("look up objects") as db:
            rows = db.stats([validate_key(k) for k in keys])
        return [k in rows or self._is_file(f"{self._root}/{k}") for k in keys]

    @staticmethod
    def _is_file(path: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(path).st_mode)
        except OSError as e:  # as Path.is_file: absent, or a link loop
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            raise

    def list_objects(self, prefix: str, start_after: str = "", fix_modes: bool = False
             ) -> Iterator[ObjectStat]:
        """Files whose key starts with ``prefix``, in byte order; others are skipped.

        With ``fix_modes``, files and directories readable by others are made
        private on the way (data directories created before modes were set).
        """
        base, _, _ = prefix.rpartition("/")
        start = self.root / base if base else self.root
        files = self._walk(start, f"{base}/" if base else "", prefix, start_after, fix_modes)
        last = None
        try:
            # rows first: of a key both a row and a file (a put that died midway), the
            # row is what stat and read see, so the listing shows it too
            for st in heapq.merge(self.small.list_objects(prefix, start_after), files,
                                  key=lambda st: st.key):
                if st.key != last:
                    yield st
                last = st.key
        except OSError as e:
            raise self.error(f"list {prefix or 'the store'}", e) from None

    def _walk(self, directory: Path, base: str, prefix: str, start_after: str, fix_modes: bool
              ) -> Iterator[ObjectStat]:
        entries = []
        for entry in _entries(directory, fix_modes):
            is_dir = entry.is_dir(follow_symlinks=False)
            key = base + entry.name + ("/" if is_dir else "")
            if base == "" and entry.name in ("tmp", "locks") and is_dir:
                continue
            entries.append((key, is_dir, entry))
        entries.sort(key=lambda e: e[0])
        for key, is_dir, entry in entries:
            if is_dir:
                # prune subtrees wholly outside the prefix or before start_after
                if not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                if start_after and key < start_after and not start_after.startswith(key):
                    continue
                yield from self._walk(Path(entry.path), key, prefix, start_after, fix_modes)
                continue
            if not key.startswith(prefix) or (start_after and key <= start_after):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield _stat(key, st)

    # -- upkeep ---------------------------------------------------------------------
    def reclaim(self) -> int:
        """Give the space of deleted small objects (rows) back to the volume."""
        with self._rows("shrink the small-object database") as db:
            return db.reclaim()

    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        count = freed = 0
        for entry in _entries(self.tmp_dir, fix_modes=False):
            if entry.name in self.active_temporaries:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) or st.st_mtime >= older_than:
                    continue
                if not dry_run:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue
            count += 1
            freed += st.st_size
        return count, freed

    def close(self) -> None:
        self.small.close()

    def _syncfs(self) -> None:
        call = _syncfs_call()
        assert call is not None
        fd = os.open(self.tmp_dir, os.O_RDONLY)
        try:
            if call(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)


#: Threads that fsync a commit's files (and directories) at once: the disk
#: takes them as one queue and the filesystem's journal commits them together,
#: instead of one flush after another.
_SYNC_THREADS = 8
_SYNC_POOL: list[ThreadPoolExecutor] = []
_SYNC_POOL_LOCK = threading.Lock()


def _in_parallel(calls: list[Callable[[], None]]) -> None:
    """Run ``calls`` (fsyncs) on the sync threads; raise the first error after all ended."""
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with _SYNC_POOL_LOCK:
        if not _SYNC_POOL:
            _SYNC_POOL.append(ThreadPoolExecutor(_SYNC_THREADS,
                                                 thread_name_prefix="gristmill-fsync"))
    futures = [_SYNC_POOL[0].submit(call) for call in calls]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _stat(key: str, st: os.stat_result) -> ObjectStat:
    return ObjectStat(key, st.st_size, st.st_mtime,
                      f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}")


def fsync_dir(directory: Path) -> None:
    """Make a directory's entries durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNCFS: list[Callable[[int], int] | None] = []


def _syncfs_call() -> Callable[[int], int] | None:
    """The C library's ``syncfs`` (Linux), or None where there is none."""
    if not _SYNCFS:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            call = getattr(libc, "syncfs", None)
        except OSError:
            call = None
        if call is not None:
            call.argtypes = [ctypes.c_int]
            call.restype = ctypes.c_int
        _SYNCFS.append(call)
    return _SYNCFS[0]


def _entries(directory: Path, fix_modes: bool) -> list[os.DirEntry[str]]:
    """The entries of a directory (none if it vanished); made private if asked."""
    try:
        if fix_modes and directory.stat().st_mode & 0o077:
            directory.chmod(DIR_MODE)
        with os.scandir(directory) as it:
            entries = list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []
    if fix_modes:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(entry.path, FILE_MODE)
    return entries


def _open(config: StoreConfig, root: Path) -> FsBackend:
    backend = config.backend
    inline = backend.inline_max_bytes if isinstance(backend, FsBackendConfig) else 0
    return FsBackend(root, config.sync_method, inline)


register_backend("fs", _open)
