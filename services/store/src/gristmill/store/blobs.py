"""Blob storage backends: immutable byte strings named by their sha256.

:class:`BlobStore` is the interface the store needs; :class:`FsBlobStore`
keeps blobs under a directory (the default). The Ceph backend implements the
same interface on RADOS objects.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol

from gristmill.client.errors import DataLoss, FailedPrecondition, InvalidArgument

__all__ = ["BlobStore", "BlobWriter", "FsBlobStore"]


class BlobWriter(Protocol):
    """Receives one blob's bytes; hashes them as they arrive."""

    @property
    def size(self) -> int:
        """Bytes written so far."""

    def write(self, data: bytes) -> None:
        """Append bytes."""

    def finish(self, expected_sha256: str = "", expected_size: int = -1) -> tuple[str, bool]:
        """Check and store; returns (sha256, created). Nothing is stored on failure."""

    def abort(self) -> None:
        """Discard what was written."""


class BlobStore(Protocol):
    """Immutable content-addressed blobs."""

    def writer(self) -> BlobWriter:
        """A writer for a new blob."""

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""

    def size(self, sha256: str) -> int:
        """Stored size in bytes (FailedPrecondition if missing)."""

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``."""

    def open(self, sha256: str) -> BinaryIO:
        """A seekable reader (for header sniffing)."""

    def delete(self, sha256: str) -> int:
        """Remove the blob; returns the bytes freed (0 if it was absent)."""

    def close(self) -> None:
        """Release resources."""


class _FsWriter:
    def __init__(self, store: FsBlobStore) -> None:
        self._store = store
        self._tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file = open(self._tmp, "xb")  # noqa: SIM115 - closed in finish/abort
        self._hash = hashlib.sha256()
        self._size = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def temp_path(self) -> Path:
        return self._tmp

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def finish(self, expected_sha256: str = "", expected_size: int = -1) -> tuple[str, bool]:
        try:
            digest = self._hash.hexdigest()
            if expected_size >= 0 and expected_size != self._size:
                raise InvalidArgument("size", f"declared {expected_size} bytes but received "
                                      f"{self._size}; resend the file", reason="SIZE_MISMATCH")
            if expected_sha256 and expected_sha256 != digest:
                raise DataLoss(f"declared sha256 {expected_sha256} but the received bytes hash to "
                               f"{digest}; the file changed or was corrupted in transit, resend "
                               "it", reason="HASH_MISMATCH")
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            final = self._store.path_for(digest)
            if final.exists():
                self._tmp.unlink()
                return digest, False
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp, final)
            dir_fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            return digest, True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self._tmp.unlink(missing_ok=True)


class FsBlobStore:
    """Blobs as files ``blobs/ab/cd/<sha256>`` under a root directory.

    Writes go to ``tmp/`` and are fsynced and renamed into place. Reads refuse
    symlinks anywhere below the root, so nothing outside it is ever served.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        # leftovers of uploads cut off by a crash are never visible; drop them
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

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

    def writer(self) -> _FsWriter:
        """A writer staging into tmp/."""
        return _FsWriter(self)

    def exists(self, sha256: str) -> bool:
        """Whether the blob file exists."""
        return self.path_for(sha256).is_file()

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

    def open(self, sha256: str) -> BinaryIO:
        """A seekable reader."""
        return os.fdopen(self._open_fd(sha256), "rb")

    def delete(self, sha256: str) -> int:
        """Remove the blob; returns the bytes freed."""
        path = self._checked_path(sha256)
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def close(self) -> None:
        """Nothing to release."""
