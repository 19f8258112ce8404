"""Blob storage backends: immutable byte strings named by their sha256.

:class:`BlobStore` is the interface the store needs; :class:`FsBlobStore`
keeps blobs under a directory (the default). The Ceph backend implements the
same interface on RADOS objects.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from gristmill.client.errors import DataLoss, FailedPrecondition, GristmillError, InvalidArgument
from gristmill.store.disk import (
    DIR_MODE,
    FILE_MODE,
    disk_full,
    is_disk_full,
    private_dir,
    storage_error,
)

__all__ = ["SYNC_METHODS", "BlobStore", "BlobWriter", "FsBlobStore", "StoredBlob", "SyncMethod"]

#: How :meth:`FsBlobStore.publish` makes a group of new blobs durable.
SyncMethod = Literal["fsync", "syncfs"]
SYNC_METHODS: tuple[SyncMethod, ...] = ("fsync", "syncfs")


class BlobWriter(Protocol):
    """Receives one blob's bytes; hashes them as they arrive."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def write(self, data: bytes) -> None:
        """Append bytes."""

    def hexdigest(self) -> str:
        """The sha256 of the bytes written so far."""

    def seal(self, expected_sha256: str = "", expected_size: int = -1) -> str:
        """Check the bytes and close the writer; the blob is stored by a later ``publish``.

        Returns the sha256. On failure nothing is kept (the writer is aborted).
        """

    @property
    def created(self) -> bool:
        """Whether ``publish`` stored this blob first."""

    def abort(self) -> None:
        """Discard what was written (safe to call more than once)."""


class BlobStore(Protocol):
    """Immutable content-addressed blobs."""

    def writer(self, expected_sha256: str = "", *, stage: bool = True) -> BlobWriter:
        """A writer for a new blob; ``stage=False`` only hashes (the blob is stored already)."""

    def publish(self, writers: Sequence[BlobWriter]) -> None:
        """Store the blobs of sealed writers together, durably, before returning.

        Each writer's ``created`` says whether it stored its blob first (also
        when this raises: a failure may come after some were stored). Writers
        not stored are aborted.
        """

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""

    def touch(self, sha256: str) -> None:
        """Mark the blob as just used, so that a collector's grace period protects it."""

    def stat(self, sha256: str) -> StoredBlob | None:
        """Size and mtime of a stored blob, or None."""

    def size(self, sha256: str) -> int:
        """Stored size in bytes (FailedPrecondition if missing)."""

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``."""

    def delete(self, sha256: str) -> int:
        """Remove the blob; returns the bytes freed (0 if it was absent)."""

    def stored_blobs(self, fix_modes: bool = False) -> Iterator[StoredBlob]:
        """Every stored blob, for garbage collection."""

    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove staging files not written since ``older_than`` (epoch seconds).

        Writers open in this process keep theirs. Returns (files, bytes).
        """

    def close(self) -> None:
        """Release resources."""


@dataclass(frozen=True)
class StoredBlob:
    """A blob found on the backend: its hash, size and last write or use (epoch seconds)."""

    sha256: str
    size: int
    mtime: float


class _FsWriter:
    """Stages one blob in ``tmp/`` (0600); :meth:`FsBlobStore.publish` stores it.

    When the volume fills up, the writer drops what it staged and goes on
    hashing: if the bytes turn out to be a blob that is stored already, the
    upload still succeeds (deduplication needs no space); otherwise it ends
    with a DISK_FULL error. With ``stage=False`` it only hashes from the start.
    """

    def __init__(self, store: FsBlobStore, expected_sha256: str = "", stage: bool = True
                 ) -> None:
        self._store = store
        self._expected = expected_sha256
        self._tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._hash = hashlib.sha256()
        self._size = 0
        self._fd: int | None = None
        self._full = False
        #: set by a successful :meth:`seal` of staged bytes
        self._digest: str | None = None
        self._created = False
        if stage:
            store.active_temporaries.add(self._tmp.name)  # before it exists: gc skips it
            try:
                self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                   FILE_MODE)
            except OSError as e:
                self._spill(e, "create a staging file for an upload")

    @property
    def size(self) -> int:
        return self._size

    @property
    def temp_path(self) -> Path:
        return self._tmp

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def _spill(self, error: OSError, operation: str) -> None:
        """Stop staging after ``error``; keep hashing only if the volume is just full."""
        self.abort()
        if not is_disk_full(error):
            raise self._store.error(operation, error) from None
        self._full = True
        if self._expected and not self._store.exists(self._expected):
            raise self._store.error(operation, error) from None

    def write(self, data: bytes) -> None:
        self._hash.update(data)
        self._size += len(data)
        if self._fd is None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self._spill(e, "write an upload's bytes")

    @property
    def created(self) -> bool:
        return self._created

    def seal(self, expected_sha256: str = "", expected_size: int = -1) -> str:
        try:
            digest = self._hash.hexdigest()
            if expected_size >= 0 and expected_size != self._size:
                raise InvalidArgument("size", f"declared {expected_size} bytes but received "
                                      f"{self._size}; resend the file", reason="SIZE_MISMATCH")
            if expected_sha256 and expected_sha256 != digest:
                raise DataLoss(f"declared sha256 {expected_sha256} but the received bytes hash to "
                               f"{digest}; the file changed or was corrupted in transit, resend "
                               "it", reason="HASH_MISMATCH")
            if self._fd is None:  # nothing staged: only a stored blob can take these bytes
                if self._store.exists(digest):
                    return digest
                if self._full:
                    raise disk_full("cannot store an upload's bytes", self._store.root)
                raise FailedPrecondition(f"blob {digest} is no longer stored; resend the file",
                                         reason="BLOB_NOT_FOUND")
            self._digest = digest
            return digest
        except BaseException:
            self.abort()
            raise

    @property
    def digest(self) -> str | None:
        """The sha256 of sealed staged bytes (None before :meth:`seal` or after :meth:`abort`)."""
        return self._digest

    @property
    def staged(self) -> bool:
        """Sealed with bytes in ``tmp/`` that :meth:`FsBlobStore.publish` has yet to store."""
        return self._digest is not None and self._fd is not None

    def flush(self, sync: bool) -> None:
        """Close the staging file, fsyncing it first if ``sync``."""
        fd, self._fd = self._fd, None
        assert fd is not None
        try:
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def place(self, made: set[Path]) -> Path | None:
        """Rename the flushed file into place; returns its directory (None: stored already).

        Directories created on the way are added to ``made``.
        """
        assert self._digest is not None
        final = self._store.path_for(self._digest)
        if final.exists():
            self.abort()
            return None
        for directory in (final.parent.parent, final.parent):
            try:
                os.mkdir(directory, DIR_MODE)
                made.add(directory)
            except FileExistsError:
                pass
        os.replace(self._tmp, final)
        self._created = True
        self._store.active_temporaries.discard(self._tmp.name)
        return final.parent

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tmp.unlink(missing_ok=True)
        self._store.active_temporaries.discard(self._tmp.name)
        self._digest = None


class FsBlobStore:
    """Blobs as files ``blobs/ab/cd/<sha256>`` under a root directory.

    Writes go to ``tmp/``; :meth:`publish` makes a group of them durable and
    renames them into place (see there). Reads refuse symlinks anywhere below
    the root, so nothing outside it is ever served. Directories are created
    0700 and files 0600. Staging files left by a crash are removed by garbage
    collection (see :mod:`gristmill.store.gc`).

    Args:
        root: the store's directory.
        sync: ``"fsync"`` (each file, then each directory a blob went into,
            once) or ``"syncfs"`` (Linux: one ``syncfs`` of the volume before
            the renames and one after, whatever the number of files).
    """

    def __init__(self, root: Path, sync: SyncMethod = "fsync") -> None:
        if sync not in SYNC_METHODS:
            raise ValueError(f"unknown sync method {sync!r}; use one of {SYNC_METHODS}")
        if sync == "syncfs" and _syncfs_call() is None:
            raise ValueError("store.sync_method 'syncfs' needs Linux (the syncfs call); use "
                             "'fsync'")
        self.sync: SyncMethod = sync
        self.root = Path(root).resolve()
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        for directory in (self.root, self.blob_dir, self.tmp_dir):
            private_dir(directory)
        #: Names of staging files of writers open in this process (gc skips them).
        self.active_temporaries: set[str] = set()

    def error(self, operation: str, error: OSError) -> GristmillError:
        """The domain error for an ``OSError`` on this store's volume."""
        return storage_error(operation, error, self.root)

    def path_for(self, sha256: str) -> Path:
        """Where the blob lives (no check that it exists)."""
        return self.blob_dir / sha256[:2] / sha256[2:4] / sha256

    def _checked_path(self, sha256: str) -> Path:
        path = self.path_for(sha256)
        if os.path.realpath(path.parent) != str(path.parent):
            raise FailedPrecondition(f"blob {sha256} is behind a symlink inside the data "
                                     "directory; refusing to follow it. Remove the link.",
                                     reason="BLOB_CORRUPT")
        return path

    def _open_fd(self, sha256: str) -> int:
        path = self._checked_path(sha256)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise FailedPrecondition(f"blob {sha256} is missing from the store; re-upload the "
                                     "file", reason="BLOB_NOT_FOUND") from None
        except OSError as e:
            raise FailedPrecondition(f"blob {sha256} cannot be opened ({e.strerror}); a symlink "
                                     "or a permission problem in the data directory",
                                     reason="BLOB_CORRUPT") from None

    def writer(self, expected_sha256: str = "", *, stage: bool = True) -> _FsWriter:
        """A writer staging into tmp/ (or only hashing, with ``stage=False``)."""
        return _FsWriter(self, expected_sha256, stage)

    def publish(self, writers: Sequence[BlobWriter]) -> None:
        """Store sealed writers' blobs: all durable before any is visible, then their names.

        In order: every staged file is flushed (fsynced, or one ``syncfs``),
        renamed into ``blobs/ab/cd/``, and then each directory that gained an
        entry is fsynced once (or one more ``syncfs``). A crash before the end
        leaves at most complete, unreferenced blobs (garbage collection removes
        them); the catalog commit that makes them part of a dataset comes
        after this returns. A blob stored meanwhile is kept and the staged
        copy dropped. On failure writers not stored are aborted.
        """
        staged = [w for w in writers if isinstance(w, _FsWriter) and w.staged]
        if not staged:
            return
        try:
            try:
                for w in staged:
                    w.flush(sync=self.sync == "fsync")
                if self.sync == "syncfs":
                    self._syncfs()
            except OSError as e:
                raise self.error("store an upload's bytes", e) from None
            touched: set[Path] = set()
            made: set[Path] = set()
            for w in staged:
                try:
                    directory = w.place(made)
                except OSError as e:
                    if w.digest is not None and self.path_for(w.digest).exists():
                        w.abort()  # stored meanwhile by another upload
                        continue
                    raise self.error("store an upload's bytes", e) from None
                if directory is not None:
                    touched.add(directory)
            touched.update(d.parent for d in made)  # a new directory is an entry of its parent
            try:
                if touched and self.sync == "syncfs":
                    self._syncfs()
                elif touched:
                    for directory in sorted(touched):
                        _fsync_dir(directory)
            except OSError as e:
                raise self.error("store an upload's bytes", e) from None
        finally:
            for w in staged:
                if not w.created:
                    w.abort()

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

    def exists(self, sha256: str) -> bool:
        """Whether the blob file exists."""
        return self.path_for(sha256).is_file()

    def touch(self, sha256: str) -> None:
        """Set the blob's mtime to now (a best effort: errors are ignored)."""
        with contextlib.suppress(OSError, FailedPrecondition):
            os.utime(self._checked_path(sha256), follow_symlinks=False)

    def stat(self, sha256: str) -> StoredBlob | None:
        """Size and mtime of the blob file, or None if it is absent."""
        try:
            st = self.path_for(sha256).lstat()
        except FileNotFoundError:
            return None
        return StoredBlob(sha256, st.st_size, st.st_mtime) if stat.S_ISREG(st.st_mode) else None

    def size(self, sha256: str) -> int:
        """Stored size in bytes."""
        fd = self._open_fd(sha256)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (pread, no symlinks)."""
        fd = self._open_fd(sha256)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def delete(self, sha256: str) -> int:
        """Remove the blob; returns the bytes freed."""
        path = self._checked_path(sha256)
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def stored_blobs(self, fix_modes: bool = False) -> Iterator[StoredBlob]:
        """Every file ``blobs/ab/cd/<sha256>``; other entries are left alone.

        With ``fix_modes``, files and directories readable by others are made
        private on the way (data directories created before modes were set).
        """
        for first in _entries(self.blob_dir, fix_modes):
            if not (first.is_dir(follow_symlinks=False) and _HEX2.fullmatch(first.name)):
                continue
            for second in _entries(Path(first.path), fix_modes):
                if not (second.is_dir(follow_symlinks=False) and _HEX2.fullmatch(second.name)):
                    continue
                for entry in _entries(Path(second.path), fix_modes):
                    name = entry.name
                    if (_SHA256.fullmatch(name) is None or name[:2] != first.name
                            or name[2:4] != second.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    yield StoredBlob(name, st.st_size, st.st_mtime)

    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove staging files not written since ``older_than``; returns (files, bytes)."""
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
        """Nothing to release."""


def _fsync_dir(directory: Path) -> None:
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


_HEX2 = re.compile(r"[0-9a-f]{2}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _entries(directory: Path, fix_modes: bool) -> list[os.DirEntry[str]]:
    """The entries of a directory (none if it vanished); made private if asked."""
    try:
        if fix_modes and directory.stat().st_mode & 0o077:
            directory.chmod(DIR_MODE)
        with os.scandir(directory) as it:
            entries = list(it)
    except FileNotFoundError:
        return []
    if fix_modes:
        for entry in entries:
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
                    os.chmod(entry.path, FILE_MODE)
    return entries
