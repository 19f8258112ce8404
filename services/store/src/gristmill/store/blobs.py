"""Content-addressed blobs over any storage backend.

:class:`BlobStore` owns what every backend shares: hashing as bytes arrive,
the size and sha256 checks of an upload, the errors a client sees, and the
key layout ``blobs/ab/cd/<sha256>``. Where the bytes live is the backend's
business (:mod:`gristmill.store.objects`): files under a directory
(:mod:`gristmill.store.fsobjects`) or objects in a Ceph pool
(:mod:`gristmill.store.ceph`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from gristmill.client.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from gristmill.store.disk import DISK_FULL, disk_full, is_disk_full
from gristmill.store.objects import ObjectBackend, ObjectMissing, Staging

__all__ = ["BlobStore", "BlobWriter", "StoredBlob", "blob_key"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


def blob_key(sha256: str) -> str:
    """The object key of a blob: ``blobs/ab/cd/<sha256>``."""
    return f"blobs/{sha256[:2]}/{sha256[2:4]}/{sha256}"


@dataclass(frozen=True)
class StoredBlob:
    """A blob found on the backend: its hash, size and last write or use (epoch seconds)."""

    sha256: str
    size: int
    mtime: float
    #: The backend's version token ("" where unknown): deletes can be guarded by it.
    version: str = ""


#: Bytes of each upload kept in memory until it is stored, so that its header
#: (media type, image size) is read without reading the blob back: bounded per
#: file, and the files of one PutFiles message are stored together.
HEAD_BYTES = 64 << 10


class BlobWriter:
    """Receives one blob's bytes and hashes them as they arrive.

    The bytes are staged in the backend; :meth:`BlobStore.publish` stores
    them. When the backend is full, the writer drops what it staged and goes
    on hashing: if the bytes turn out to be a blob that is stored already,
    the upload still succeeds (deduplication needs no space); otherwise it
    ends with a DISK_FULL error. With ``stage=False`` it only hashes.
    """

    def __init__(self, store: BlobStore, expected_sha256: str = "", stage: bool = True
                 ) -> None:
        self._store = store
        self._expected = expected_sha256
        self._hash = hashlib.sha256()
        self._size = 0
        self._staging: Staging | None = None
        self._full = False
        #: set by a successful :meth:`seal` of staged bytes
        self._digest: str | None = None
        self._created = False
        self._head = bytearray()  # the first HEAD_BYTES, for reading the header without a read
        if stage:
            try:
                self._staging = store.backend.stage()
            except OSError as e:
                self._spill(e, "create a staging file for an upload")

    @property
    def size(self) -> int:
        """Bytes written so far."""
        return self._size

    def read_head(self, offset: int, length: int) -> bytes | None:
        """Bytes ``offset`` to ``offset + length`` (cut at the end) if the head holds them."""
        end = offset + length
        if end <= len(self._head) or len(self._head) == self._size:
            return bytes(self._head[offset:end])
        return None

    def hexdigest(self) -> str:
        """The sha256 of the bytes written so far."""
        return self._hash.hexdigest()

    def _spill(self, error: OSError, operation: str) -> None:
        """Stop staging after ``error``; keep hashing only if the backend is just full."""
        self.abort()
        if not is_disk_full(error):
            raise self._store.backend.error(operation, error) from None
        self._full = True
        if self._expected and not self._store.exists(self._expected):
            raise self._store.backend.error(operation, error) from None

    def write(self, data: bytes) -> None:
        """Append bytes."""
        self._hash.update(data)
        if self._size < HEAD_BYTES:
            self._head += data[:HEAD_BYTES - self._size]
        self._size += len(data)
        if self._staging is None:
            return
        try:
            self._staging.write(data)
        except OSError as e:
            self._spill(e, "write an upload's bytes")

    @property
    def created(self) -> bool:
        """Whether :meth:`BlobStore.publish` stored this blob first."""
        return self._created

    def seal(self, expected_sha256: str = "", expected_size: int = -1) -> str:
        """Check the bytes; the blob is stored by a later ``publish``. Returns the sha256.

        On failure nothing is kept (the writer is aborted).
        """
        try:
            digest = self._hash.hexdigest()
            if expected_size >= 0 and expected_size != self._size:
                raise InvalidArgument("size", f"declared {expected_size} bytes but received "
                                      f"{self._size}; resend the file", reason="SIZE_MISMATCH")
            if expected_sha256 and expected_sha256 != digest:
                raise DataLoss(f"declared sha256 {expected_sha256} but the received bytes hash to "
                               f"{digest}; the file changed or was corrupted in transit, resend "
                               "it", reason="HASH_MISMATCH")
            if self._staging is None:  # nothing staged: only a stored blob can take these bytes
                if self._store.exists(digest):
                    return digest
                if self._full:
                    raise disk_full("cannot store an upload's bytes",
                                    self._store.backend.describe())
                raise FailedPrecondition(f"blob {digest} is no longer stored; resend the file",
                                         reason="BLOB_NOT_FOUND")
            self._digest = digest
            return digest
        except BaseException:
            self.abort()
            raise

    @property
    def staged(self) -> bool:
        """Sealed with staged bytes that :meth:`BlobStore.publish` has yet to store."""
        return self._digest is not None and self._staging is not None

    def abort(self) -> None:
        """Discard what was written (safe to call more than once)."""
        if self._staging is not None:
            self._staging.abort()
            self._staging = None
        self._digest = None


class BlobStore:
    """Immutable blobs named by their sha256, on an :class:`ObjectBackend`."""

    def __init__(self, backend: ObjectBackend) -> None:
        self.backend = backend

    def writer(self, expected_sha256: str = "", *, stage: bool = True) -> BlobWriter:
        """A writer for a new blob; ``stage=False`` only hashes (the blob is stored already)."""
        return BlobWriter(self, expected_sha256, stage)

    def publish(self, writers: Sequence[BlobWriter]) -> None:
        """Store the blobs of sealed writers together, durably, before returning.

        Each writer's ``created`` says whether it stored its blob first (also
        when this raises: a failure may come after some were stored). A blob
        stored meanwhile is kept and the staged copy dropped. Writers not
        stored are aborted.
        """
        staged = [w for w in writers if w.staged]
        if not staged:
            return
        items: list[tuple[Staging, str]] = []
        for w in staged:
            assert w._staging is not None and w._digest is not None
            items.append((w._staging, blob_key(w._digest)))
        try:
            created = self.backend.commit(items)
            for w, made in zip(staged, created, strict=True):
                w._created = made
        finally:
            for w in staged:
                w._staging = None  # committed or aborted by the backend
                if not w._created:
                    w._digest = None

    def stages_in_memory(self, size: int) -> bool:
        """Whether staging a blob of ``size`` bytes costs only memory until it is stored."""
        return self.backend.stages_in_memory(size)

    def exists(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self.backend.exists_many([blob_key(sha256)])[0]

    def exists_many(self, shas: Sequence[str]) -> list[bool]:
        """Whether each blob is stored (one batched backend call)."""
        return self.backend.exists_many([blob_key(s) for s in shas])

    def touch(self, sha256: str) -> bool:
        """Mark the blob as just used, so that a collector's grace period protects it.

        False if it is not stored (a collector removed it meanwhile): the
        caller must not refer to it.
        """
        return self.backend.touch(blob_key(sha256))

    def stat(self, sha256: str) -> StoredBlob | None:
        """Size and mtime of a stored blob, or None."""
        st = self.backend.stat(blob_key(sha256))
        return None if st is None else StoredBlob(sha256, st.size, st.mtime, st.version)

    def size(self, sha256: str) -> int:
        """Stored size in bytes (FailedPrecondition if missing)."""
        st = self.backend.stat(blob_key(sha256))
        if st is None:
            raise _missing(sha256)
        return st.size

    def read(self, sha256: str, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset``."""
        try:
            return self.backend.read(blob_key(sha256), offset, length)
        except ObjectMissing:
            raise _missing(sha256) from None

    def read_many(self, blobs: Sequence[tuple[str, int]]) -> list[bytes | None]:
        """Several whole blobs ``(sha256, size)`` in one batched backend call.

        None for a missing blob; a blob whose stored size differs reads short or long.
        """
        got = self.backend.read_many([(blob_key(s), 0, n + 1) for s, n in blobs],
                                     versions=False)
        return [None if g is None else g[0] for g in got]

    def delete(self, sha256: str) -> int:
        """Remove the blob; returns the bytes freed (0 if it was absent)."""
        return self.backend.delete(blob_key(sha256))[1]

    def delete_unless_full(self, sha256: str, version: str | None = None) -> int | None:
        """:meth:`delete`, or None if the volume is too full to delete it now.

        (A small blob's row: SQLite writes its log before it frees a page.)
        With ``version``, only at that version: -1 if the blob changed
        (was used again) since, and it is kept.
        """
        try:
            if version is not None:
                result, freed = self.backend.delete(blob_key(sha256), expected_version=version)
                return -1 if result.conflict else freed
            return self.delete(sha256)
        except ResourceExhausted as e:
            if e.reason != DISK_FULL:
                raise
            return None

    def stored_blobs(self, fix_modes: bool = False) -> Iterator[StoredBlob]:
        """Every stored blob, for garbage collection (other objects are left alone).

        With ``fix_modes`` the filesystem backend makes what it walks private.
        """
        for st in self.backend.list_objects("blobs/", fix_modes=fix_modes):
            parts = st.key.split("/")
            if (len(parts) == 4 and _SHA256.fullmatch(parts[3])
                    and parts[1] == parts[3][:2] and parts[2] == parts[3][2:4]):
                yield StoredBlob(parts[3], st.size, st.mtime)

    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove stagings not written since ``older_than`` (epoch seconds); (objects, bytes)."""
        return self.backend.remove_temporaries(older_than, dry_run)

    def reclaim(self) -> int:
        """Give the space of deleted blobs kept inside the backend's files back; bytes."""
        return self.backend.reclaim()

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


def _missing(sha256: str) -> FailedPrecondition:
    return FailedPrecondition(f"blob {sha256} is missing from the store; re-upload the file",
                              reason="BLOB_NOT_FOUND")
