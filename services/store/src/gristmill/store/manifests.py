"""Whole manifests as GetManifest sends them: zlib of a serialized ``Manifest``.

A committed version is immutable, so its manifest is built once (at commit,
or on the first request when the file is missing, e.g. in a store older than
this) and kept as a file ``manifests/<dataset>/<version>.zlib`` next to the
catalog, private to the server's user; requests then send that file in
pieces. ``latest`` changes with every upload: it is built from a snapshot
of the catalog into an unnamed temporary file in the same directory, and the
store keeps the last few built until their head changes (see
``Store._head_manifest``). Both builds page through the catalog and compress
as they go, so memory stays at one page of entries whatever the manifest's
size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from gristmill.client.private import private_dir
from gristmill.store.catalog import entry_from_row
from gristmill.store.disk import storage_error
from gristmill.store.fsobjects import fsync_dir
from gristmill.v1 import store_pb2

__all__ = ["ManifestFiles", "write_manifest"]

#: zlib level of manifests (as GetManifest has always sent them).
LEVEL = 6


def write_manifest(out: IO[bytes], dataset: str, version: str,
                   pages: Iterable[list[tuple[Any, ...]]]) -> int:
    """Write zlib(Manifest) to ``out`` from pages of catalog rows; returns the entry count.

    A serialized message is the concatenation of its fields, so the header
    (dataset, version) followed by one ``Manifest(files=page)`` per page is
    byte for byte the serialization of the whole manifest.
    """
    compressor = zlib.compressobj(LEVEL)
    head = store_pb2.Manifest(dataset=dataset, version=version).SerializeToString()
    out.write(compressor.compress(head))
    count = 0
    for rows in pages:
        piece = store_pb2.Manifest(files=[entry_from_row(r) for r in rows])
        out.write(compressor.compress(piece.SerializeToString()))
        count += len(rows)
    out.write(compressor.flush())
    return count


def read_pieces(f: IO[bytes], chunk: int) -> Iterator[bytes]:
    """The file from its start in pieces of ``chunk`` bytes (at least one piece).

    Positioned reads: several requests may read one (flushed) file at once.
    """
    fd = f.fileno()
    piece = os.pread(fd, chunk, 0)
    yield piece
    offset = len(piece)
    while piece := os.pread(fd, chunk, offset):
        yield piece
        offset += len(piece)


class ManifestFiles:
    """The manifest files of committed versions under ``root`` (created 0700, files 0600)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def path(self, dataset: str, version: str) -> Path:
        """Where a version's manifest is kept (dataset names and version ids are safe names)."""
        return self.root / dataset / f"{version}.zlib"

    def open(self, dataset: str, version: str) -> IO[bytes] | None:
        """The stored manifest, open for reading, or None if there is none."""
        try:
            return open(self.path(dataset, version), "rb")  # noqa: SIM115 - the caller closes
        except FileNotFoundError:
            return None
        except OSError as e:
            raise storage_error(f"read the manifest of {dataset!r} version {version}", e,
                                self.root) from e

    @contextlib.contextmanager
    def building(self, dataset: str, version: str) -> Iterator[None]:
        """Held while a version's manifest is built: concurrent first requests build once."""
        key = (dataset, version)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield
        with self._lock:
            self._locks.pop(key, None)

    def save(self, dataset: str, version: str, pages: Iterable[list[tuple[Any, ...]]]) -> int:
        """Build and keep a version's manifest (fsynced, then renamed into place)."""
        operation = f"write the manifest of {dataset!r} version {version}"
        try:
            directory = private_dir(self.root / dataset)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")  # 0600
        except OSError as e:
            raise storage_error(operation, e, self.root) from e
        try:
            with os.fdopen(fd, "wb") as out:
                count = write_manifest(out, dataset, version, pages)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(dataset, version))
            fsync_dir(directory)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(operation, e, self.root) from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return count

    def scratch(self) -> IO[bytes]:
        """An unnamed temporary file (0600) for a head's manifest (kept while unchanged)."""
        try:
            return tempfile.TemporaryFile(dir=private_dir(self.root))
        except OSError as e:
            raise storage_error("build a manifest", e, self.root) from e

    def remove(self, dataset: str) -> None:
        """Forget every manifest of a dataset (it was deleted)."""
        shutil.rmtree(self.root / dataset, ignore_errors=True)
