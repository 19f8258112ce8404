"""The shape every storage backend has: named objects, staged writes, ranged reads.

A backend stores byte strings under keys such as ``blobs/ab/cd/<sha256>`` or
``arrays/features/c/0/1``; it knows nothing of hashes, datasets or Zarr. What
is common to all backends lives above it: :class:`gristmill.store.blobs.BlobStore`
owns hashing, size checks and errors for content-addressed blobs, and
:mod:`gristmill.store.arrays` owns key validation for Zarr hierarchies. A
backend implements only:

- ``stage()`` and ``commit()``: streamed writes of unknown size, made durable
  together (a blob's bytes arrive in many messages);
- ``put()``: one whole value, optionally only at an expected version (the
  guard that makes read-modify-write of a chunk safe against a concurrent
  writer) or only if absent;
- ``read()``, ``stat()``, ``delete()`` and ``list_objects()``;

and may override the batched ``exists_many()`` and ``read_many()`` whose
defaults loop. Backends are chosen by name from the ``store.backend`` config
through :data:`BACKENDS` (the pattern of zarr-python's ``zarr.abc.store``).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from gristmill.client.errors import FailedPrecondition, GristmillError, InvalidArgument
from gristmill.store.disk import storage_error

if TYPE_CHECKING:
    from gristmill.store.config import StoreConfig

__all__ = ["BACKENDS", "ObjectBackend", "ObjectMissing", "ObjectStat", "PutResult", "Staging",
           "open_backend", "register_backend", "validate_key"]


@dataclass(frozen=True)
class ObjectStat:
    """A stored object: its key, size, last write (epoch seconds) and version token."""

    key: str
    size: int
    mtime: float
    #: Changes on every write of the key; compared by conditional puts.
    version: str


@dataclass(frozen=True)
class PutResult:
    """The outcome of a (conditional) put or delete."""

    #: True if the expected version or absence did not hold: nothing changed.
    conflict: bool
    #: The version stored now ("" if the key is absent).
    version: str


class ObjectMissing(FailedPrecondition):
    """A key that should be stored is not."""

    def __init__(self, key: str) -> None:
        super().__init__(f"{key} is not stored", reason="OBJECT_NOT_FOUND")
        self.key = key


class Staging(abc.ABC):
    """Bytes of one object being written; invisible until committed."""

    #: Bytes staged so far.
    size: int = 0

    @abc.abstractmethod
    def write(self, data: bytes) -> None:
        """Append bytes. Raises ``OSError`` (ENOSPC when the volume is full)."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop what was staged (safe to call more than once)."""


class ObjectBackend(abc.ABC):
    """Objects under string keys. Subclasses register themselves in :data:`BACKENDS`."""

    #: The ``store.backend`` value that selects this backend.
    kind: ClassVar[str]

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the objects live, for messages (a directory, a cluster and pool)."""

    def error(self, operation: str, error: OSError) -> GristmillError:
        """The domain error for an ``OSError`` raised by this backend."""
        return storage_error(operation, error, self.describe())

    # -- writes ---------------------------------------------------------------------
    @abc.abstractmethod
    def stage(self) -> Staging:
        """A new staged object, to be written and then committed under a key."""

    def stages_in_memory(self, size: int) -> bool:
        """Whether a staging of ``size`` bytes costs only memory (no storage until commit)."""
        return False

    @abc.abstractmethod
    def commit(self, items: Sequence[tuple[Staging, str]]) -> list[bool]:
        """Make staged objects durable under their keys, all before any is visible.

        A key that is stored already keeps its value (content-addressed keys
        name equal bytes) and its staging is dropped. Returns, per item,
        whether it created the key. Stagings not committed are aborted, also
        when this raises.
        """

    @abc.abstractmethod
    def put(self, key: str, data: bytes, *, expected_version: str | None = None,
            if_absent: bool = False) -> PutResult:
        """Store one whole value durably, atomically replacing the old one.

        With ``expected_version``, only if the stored version is that one;
        with ``if_absent``, only if the key is not stored. Otherwise the result
        says ``conflict`` and nothing changes.
        """

    @abc.abstractmethod
    def delete(self, key: str, *, expected_version: str | None = None) -> tuple[PutResult, int]:
        """Remove a key (only at ``expected_version`` if given); returns (result, bytes freed)."""

    def touch(self, key: str) -> bool:
        """Mark the object as just used (for a collector's grace period); False if absent.

        A store that records a new reference to a stored blob touches it first
        and refers to it only if the touch found it: a collector deletes only
        at the version it decided on, so one of the two sees the other. The
        mark itself is best effort (a failure to write it counts as found).
        """
        return self.stat(key) is not None

    # -- reads ----------------------------------------------------------------------
    @abc.abstractmethod
    def read(self, key: str, offset: int = 0, length: int = -1) -> bytes:
        """Up to ``length`` bytes (-1: all) from ``offset``; :class:`ObjectMissing` if absent."""

    def read_versioned(self, key: str, offset: int = 0, length: int = -1
                       ) -> tuple[bytes, ObjectStat] | None:
        """A read with the stat it was taken at (consistent with each other), or None."""
        for _ in range(8):
            before = self.stat(key)
            if before is None:
                return None
            try:
                data = self.read(key, offset, length)
            except ObjectMissing:
                continue
            after = self.stat(key)
            if after is not None and after.version == before.version:
                return data, after
        raise FailedPrecondition(f"{key} keeps changing while it is read; retry",
                                 reason="OBJECT_BUSY")

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectStat | None:
        """Size, mtime and version, or None if absent."""

    @abc.abstractmethod
    def list_objects(self, prefix: str, start_after: str = "", fix_modes: bool = False
             ) -> Iterator[ObjectStat]:
        """Stored objects whose key starts with ``prefix``, in byte order of the key.

        ``fix_modes`` asks a filesystem backend to make what it walks private
        (data directories created before modes were set); others ignore it.
        """

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored (backends override to batch)."""
        return [self.stat(k) is not None for k in keys]

    def read_many(self, reads: Sequence[tuple[str, int, int]], versions: bool = True
                  ) -> list[tuple[bytes, ObjectStat] | None]:
        """Several ``(key, offset, length)`` reads; None for absent keys (backends fan out).

        With ``versions=False`` a stat may carry version "" and, for reads of
        known length, size -1 (a backend that cannot batch versioned reads then
        reads everything at once).
        """
        return [self.read_versioned(k, o, n) for k, o, n in reads]

    # -- upkeep ---------------------------------------------------------------------
    def remove_temporaries(self, older_than: float, dry_run: bool = False) -> tuple[int, int]:
        """Remove stagings abandoned before ``older_than``; returns (objects, bytes)."""
        return 0, 0

    def reclaim(self) -> int:
        """Give space that deletes left inside the backend's files back; returns bytes."""
        return 0

    def check_health(self) -> None:  # noqa: B027 (optional)
        """Raise :class:`gristmill.client.errors.Unavailable` if the backend cannot serve."""

    def close(self) -> None:  # noqa: B027 (optional)
        """Release connections."""


#: Backend factories by ``store.backend`` name: (store config, local state directory).
BACKENDS: dict[str, Callable[[StoreConfig, Path], ObjectBackend]] = {}


def register_backend(kind: str, factory: Callable[[StoreConfig, Path], ObjectBackend]) -> None:
    """Make a backend selectable as ``store.backend: <kind>``."""
    BACKENDS[kind] = factory


def open_backend(config: StoreConfig, root: Path) -> ObjectBackend:
    """The backend the config selects (``root``: the server's local store directory)."""
    # importing them registers the built-in backends
    from gristmill.store import ceph, fsobjects  # noqa: F401

    kind = config.backend.kind
    if kind not in BACKENDS:
        raise InvalidArgument("store.backend", f"unknown storage backend {kind!r}; use one of "
                              f"{', '.join(sorted(BACKENDS))}")
    return BACKENDS[kind](config, root)


_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/")


def validate_key(key: str) -> str:
    """A key of ``/``-separated segments of [A-Za-z0-9._-], none empty, '.' or '..'."""
    if not key or len(key) > 1024 or not set(key) <= _KEY_CHARS:
        raise InvalidArgument("key", f"invalid object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", ".."):
            raise InvalidArgument("key", f"invalid object key {key!r}")
    return key
