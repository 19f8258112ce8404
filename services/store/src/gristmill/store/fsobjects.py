"""The filesystem backend: each object a file ``<root>/<key>``.

Writes are staged in ``<root>/tmp/`` (0600) and renamed into place, so a
reader never sees a partial file; :meth:`FsBackend.commit` makes a group of
stagings durable together (one fsync per file and one per directory that
gained an entry, or one ``syncfs`` before and after the renames). Conditional
puts take one of 256 ``flock`` stripes under ``<root>/locks/``, so two
writers (threads or processes) to one key are serialised and a stale
expected version is detected. A key's version is its file's inode, mtime
and size: every write renames a new file into place, so it changes.

Reads refuse symlinks below the root, so nothing outside it is ever served.
Directories are created 0700 and files 0600.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
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

if TYPE_CHECKING:
    from gristmill.store.config import StoreConfig

__all__ = ["SYNC_METHODS", "FsBackend", "SyncMethod"]

#: How :meth:`FsBackend.commit` makes a group of new objects durable.
SyncMethod = Literal["fsync", "syncfs"]
SYNC_METHODS: tuple[SyncMethod, ...] = ("fsync", "syncfs")
_LOCK_STRIPES = 256


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


class FsBackend(ObjectBackend):
    """Objects as files under a root directory (see the module docstring).

    Args:
        root: the store's directory.
        sync: ``"fsync"`` (each file, then each directory that gained an
            entry, once) or ``"syncfs"`` (Linux: one ``syncfs`` of the volume
            before the renames and one after, whatever the number of files).
    """

    kind = "fs"

    def __init__(self, root: Path, sync: SyncMethod = "fsync") -> None:
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

    def describe(self) -> str:
        return f"directory {self.root}"

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
    def stage(self) -> _FsStaging:
        return _FsStaging(self)

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
        """Durable, then visible: flush (fsync or syncfs), rename, fsync the directories.

        A crash before the end leaves at most complete, unreferenced objects.
        """
        created = [False] * len(items)
        staged = [(i, s, k) for i, (s, k) in enumerate(items) if isinstance(s, _FsStaging)]
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
        return created

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
            staging = self.stage()
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
            now = self.stat(key)
            assert now is not None
            return PutResult(False, now.version)

    def delete(self, key: str, *, expected_version: str | None = None) -> tuple[PutResult, int]:
        path = self._checked_path(key)
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

    def touch(self, key: str) -> None:
        with contextlib.suppress(OSError, FailedPrecondition):
            os.utime(self._checked_path(key), follow_symlinks=False)

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

    def read(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        fd = self._open_fd(key)
        try:
            if length < 0:
                length = max(0, os.fstat(fd).st_size - offset)
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def read_versioned(self, key: str, offset: int = 0, length: int = -1
                       ) -> tuple[bytes, ObjectStat] | None:
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

    def stat(self, key: str) -> ObjectStat | None:
        try:
            st = self.path_for(validate_key(key)).lstat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return _stat(key, st) if stat.S_ISREG(st.st_mode) else None

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._is_file(f"{self._root}/{validate_key(k)}") for k in keys]

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
        yield from self._walk(start, f"{base}/" if base else "", prefix, start_after, fix_modes)

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
    return FsBackend(root, config.sync_method)


register_backend("fs", _open)
