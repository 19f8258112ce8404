"""The store's domain logic, independent of gRPC (used in-process too)."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from gristmill.client.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    GristmillError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from gristmill.client.names import nfc, validate_dataset_name, validate_path, validate_sha256
from gristmill.store import metrics as store_metrics
from gristmill.store.blobs import BlobStore, BlobWriter
from gristmill.store.catalog import CatalogApi, DatasetRow, HeadKey, VersionRow
from gristmill.store.disk import DiskReserve, storage_error
from gristmill.store.gc import GcReport, collect_garbage
from gristmill.store.images import sniff
from gristmill.store.manifests import ManifestFiles, read_pieces, write_manifest
from gristmill.v1 import common_pb2, store_pb2

__all__ = ["LATEST", "PutResult", "Store"]

log = logging.getLogger("gristmill.store")

LATEST = "latest"
MAX_PATHS_PER_CALL = 10_000
#: Heads whose built manifest is kept for the next GetManifest (one compressed,
#: unnamed file each on the manifests volume, ~40 bytes per entry), and the most
#: bytes they may take together (a bigger head is built per request).
HEADS_KEPT = 8
HEADS_KEPT_BYTES = 256 << 20
_HASH_CHUNK = 4 * 1024 * 1024


@dataclass
class PutResult:
    """What one PutFiles call stored."""

    entries: list[store_pb2.FileEntry] = field(default_factory=list)
    bytes_received: int = 0
    blobs_created: int = 0
    #: Blobs this call stored first; removed again if the call fails.
    created: list[str] = field(default_factory=list)
    #: Files received since the last publish: (path, sha256, size, sealed writer or None
    #: when the blob is stored already). Their blobs are stored together.
    waiting: list[tuple[str, str, int, BlobWriter | None]] = field(default_factory=list)


@dataclass
class _Upload:
    path: str
    size: int
    sha256: str
    writer: BlobWriter
    #: The path as the client spelled it (``path`` is its NFC form).
    sent_path: str = ""


def item_error(error: GristmillError) -> common_pb2.ItemError:
    """A per-item error record from a domain error."""
    store_metrics.STORE_ITEM_ERRORS.labels(error.reason).inc()
    return common_pb2.ItemError(code=error.code.value[0], reason=error.reason,
                                message=error.message)


class Store:
    """Datasets, manifests, versions and blobs."""

    def __init__(self, catalog: CatalogApi, blobs: BlobStore, *, read_message_bytes: int,
                 read_chunk_bytes: int,
                 reserve: DiskReserve | None = None, manifest_dir: Path | None = None) -> None:
        self.catalog = catalog
        #: Manifests of committed versions, built once (default: next to the catalog).
        self.manifests = ManifestFiles(manifest_dir or catalog.path.parent / "manifests")
        self.blobs = blobs
        #: Space held back for metadata writes on a full disk (released by the catalog).
        self.reserve = reserve
        if reserve is not None and catalog.on_full is None:
            catalog.on_full = reserve.release
        self.read_message_bytes = read_message_bytes
        self.read_chunk_bytes = read_chunk_bytes
        # blobs written by uploads not yet committed: garbage collection skips them
        self._pinned: Counter[str] = Counter()
        self._pin_lock = threading.Lock()
        #: the last heads' manifests built, by dataset: (head key, unnamed file, entries, bytes)
        self._heads: OrderedDict[str, tuple[HeadKey, IO[bytes], int, int]] = OrderedDict()
        self._heads_lock = threading.Lock()

    def close(self) -> None:
        """Close catalog and backend (kept head manifests go with their last reader)."""
        with self._heads_lock:
            self._heads.clear()
        self.catalog.close()
        self.blobs.close()

    @contextmanager
    def pins_held(self) -> Iterator[Callable[[str], bool]]:
        """Hold the pin lock (no upload can pin a blob meanwhile); yields "is it pinned"."""
        with self._pin_lock:
            yield lambda sha: self._pinned[sha] > 0

    def collect_garbage(self, grace_seconds: float = 0.0, *, dry_run: bool = False,
                        fix_modes: bool = False) -> GcReport:
        """Remove blobs nothing refers to and stale staging files (see :mod:`.gc`)."""
        return collect_garbage(self, grace_seconds, dry_run=dry_run, fix_modes=fix_modes)

    # datasets -------------------------------------------------------------
    def create_dataset(self, name: str, description: str = "") -> DatasetRow:
        """Create an empty dataset."""
        name = validate_dataset_name(name)
        if len(description) > 4096:
            raise InvalidArgument("description", "longer than 4096 characters")
        if not self.catalog.create_dataset(name, description):
            raise AlreadyExists(f"dataset {name!r} already exists; pick another name or use it",
                                reason="DATASET_EXISTS")
        return self.get_dataset(name)

    def get_dataset(self, name: str, field: str = "name") -> DatasetRow:
        """A dataset or NotFound: one row (its counters are kept as files change)."""
        name = validate_dataset_name(name, field)
        row = self.catalog.dataset(name)
        if row is None:
            raise _no_dataset(name)
        return row

    def require_dataset(self, name: str, field: str = "name") -> str:
        """The (NFC) name of an existing dataset, or NotFound; reads one row."""
        name = validate_dataset_name(name, field)
        if not self.catalog.exists(name):
            raise _no_dataset(name)
        return name

    def list_datasets(self, after: str | None, limit: int) -> list[DatasetRow]:
        """Datasets sorted by name."""
        return self.catalog.datasets(after, limit)

    def delete_dataset(self, name: str) -> tuple[int, int]:
        """Delete a dataset; returns (blobs deleted, bytes freed)."""
        name = self.require_dataset(name)
        unreferenced = self.catalog.delete_dataset(name)
        self.manifests.remove(name)
        with self._heads_lock:
            self._heads.pop(name, None)
        return self._collect(unreferenced)

    def _collect(self, unreferenced: list[tuple[str, int]]) -> tuple[int, int]:
        """Delete blobs the catalog no longer refers to (the catalog change is committed).

        A blob the volume is too full to delete (a small blob's row: SQLite
        writes before it frees) is left to garbage collection: the call that
        unreferenced it succeeded and must say so.
        """
        deleted = freed = 0
        with self._pin_lock:
            for sha, _size in unreferenced:
                if self._pinned[sha]:
                    continue
                gone = self.blobs.delete_unless_full(sha)
                if gone is None:
                    log.warning("volume full: blob %s stays until `gristmill store gc`", sha)
                    continue
                freed += gone
                deleted += 1
        return deleted, freed

    # versions -------------------------------------------------------------
    def resolve(self, dataset: str, version: str, field: str = "version") -> str:
        """"latest" or the full id of an existing version (one row per lookup)."""
        self.require_dataset(dataset, "dataset")
        if version in ("", LATEST):
            return LATEST
        resolved = self.catalog.resolve_version(dataset, version)
        if resolved is None:
            raise NotFound(f"version {version!r} of dataset {dataset!r} does not exist; list "
                           f"versions with `gristmill dataset show {dataset}`",
                           reason="VERSION_NOT_FOUND", metadata={"dataset": dataset})
        return resolved

    def commit_version(self, dataset: str) -> tuple[VersionRow, bool]:
        """Freeze the head; the id is the sha256 of its canonical manifest.

        The version's manifest is written once, here; if that fails (or the
        process stops first) the first GetManifest builds it.
        """
        dataset = self.require_dataset(dataset, "dataset")
        row, created = self.catalog.commit_version(dataset)
        try:
            self._stored_manifest(dataset, row.id)[0].close()
        except GristmillError:
            log.warning("cannot write the manifest of %r version %s now; the first request "
                        "for it will", dataset, row.id, exc_info=True)
        return row, created

    def list_versions(self, dataset: str, after: str | None, limit: int) -> list[VersionRow]:
        """Versions newest first."""
        self.require_dataset(dataset, "dataset")
        return self.catalog.versions(dataset, after, limit)

    # manifests -------------------------------------------------------------
    def list_manifest(self, dataset: str, version: str, after: str | None, limit: int,
                      prefix: str = "") -> tuple[str, list[store_pb2.FileEntry]]:
        """A page of entries and the resolved version."""
        resolved = self.resolve(dataset, version)
        prefix = nfc(prefix)  # stored paths are NFC
        return resolved, self.catalog.entries(dataset, resolved, after, limit, prefix)

    def manifest_chunks(self, dataset: str, version: str, chunk: int = 1024 * 1024
                        ) -> Iterator[tuple[str, int, bytes]]:
        """The whole manifest, zlib-compressed, as (version, count, piece) tuples.

        A committed version's comes from its file (built once); ``latest`` is
        built from one snapshot of the catalog into a temporary file. Memory
        is a page of entries and a piece, whatever the manifest's size.
        """
        resolved = self.resolve(dataset, version)
        if resolved == LATEST:
            f, count = self._head_manifest(dataset)
            for piece in read_pieces(f, chunk):  # shared with other requests: not closed here
                yield resolved, count, piece
            return
        f, count = self._stored_manifest(dataset, resolved)
        with f:
            for piece in read_pieces(f, chunk):
                yield resolved, count, piece

    def _head_manifest(self, dataset: str) -> tuple[IO[bytes], int]:
        """The head's manifest file and entry count, built again only after the head changed.

        The last :data:`HEADS_KEPT` heads built (at most
        :data:`HEADS_KEPT_BYTES` together) are kept, as unnamed files gone
        with their last reader, keyed by :meth:`Catalog.head_key` as read in
        the snapshot they were built from: asking again for an unchanged
        head costs one row read instead of a pass over its files.
        """
        with self.catalog.head_pages(dataset) as head:
            if head is None:
                raise _no_dataset(dataset)
            key, pages = head
            with self._heads_lock:
                kept = self._heads.get(dataset)
                if kept is not None and kept[0] == key:
                    self._heads.move_to_end(dataset)
                    return kept[1], kept[2]
            f = self.manifests.scratch()
            try:
                count = write_manifest(f, dataset, LATEST, pages)
                f.flush()
            except OSError as e:
                f.close()
                raise storage_error("build the manifest", e, self.manifests.root) from e
            except BaseException:
                f.close()
                raise
        size = f.seek(0, os.SEEK_END)
        with self._heads_lock:
            kept = self._heads.get(dataset)
            if size <= HEADS_KEPT_BYTES and (kept is None or kept[0][1] <= key[1]
                                             or kept[0][0] != key[0]):
                self._heads[dataset] = (key, f, count, size)
                self._heads.move_to_end(dataset)
            while (len(self._heads) > HEADS_KEPT
                   or sum(k[3] for k in self._heads.values()) > HEADS_KEPT_BYTES):
                self._heads.popitem(last=False)  # closed with its last reader
        return f, count

    def _stored_manifest(self, dataset: str, version: str) -> tuple[IO[bytes], int]:
        """A committed version's manifest file, open, and its entry count; built if missing."""
        counted = self.catalog.counts_of(dataset, version)
        if counted is None:
            raise NotFound(f"version {version!r} of dataset {dataset!r} does not exist",
                           reason="VERSION_NOT_FOUND", metadata={"dataset": dataset})
        f = self.manifests.open(dataset, version)
        if f is None:
            with self.manifests.building(dataset, version):
                f = self.manifests.open(dataset, version)
                if f is None:
                    with self.catalog.version_pages(dataset, version) as pages:
                        self.manifests.save(dataset, version, pages)
                    f = self.manifests.open(dataset, version)
        if f is None:  # removed as soon as written: the dataset was deleted meanwhile
            raise _no_dataset(dataset)
        return f, counted[0]

    def plan_rows(self, dataset: str, version: str, prefix: str = "", *,
                  images_only: bool = True) -> list[tuple[str, int, int, int, int]]:
        """(path, is image, width, height, size) of a version's files, sorted by path.

        The columns epoch planning needs and no others; with ``images_only``
        only image files under ``prefix`` (see :meth:`Catalog.image_columns`).
        """
        resolved = self.resolve(dataset, version)
        return self.catalog.image_columns(dataset, resolved, prefix, images_only)

    # uploads ---------------------------------------------------------------
    def find_blobs(self, shas: list[str]) -> list[str]:
        """The stored subset of ``shas``."""
        if len(shas) > MAX_PATHS_PER_CALL:
            raise InvalidArgument("sha256", f"at most {MAX_PATHS_PER_CALL} hashes per call; "
                                  "split the request")
        for i, sha in enumerate(shas):
            validate_sha256(sha, f"sha256[{i}]")
        known = self.catalog.known_blobs(shas)
        candidates = [s for s in shas if s in known]
        stored = self.blobs.exists_many(candidates)
        return [s for s, ok in zip(candidates, stored, strict=True) if ok]

    def find_files(self, dataset: str, files: list[store_pb2.FileRef]
                   ) -> tuple[list[str], list[str]]:
        """(paths whose head entry has the same size and sha256, stored blobs of the others).

        The cost follows the request (one lookup per path, one per hash), not
        the dataset's size: an import checks batch by batch what it can skip.
        """
        if len(files) > MAX_PATHS_PER_CALL:
            raise InvalidArgument("files", f"at most {MAX_PATHS_PER_CALL} files per call; "
                                  "split the request")
        dataset = self.require_dataset(dataset, "dataset")
        sent = [f.path for f in files]
        canonical = [validate_path(p, f"files[{i}].path", strict=False)
                     for i, p in enumerate(sent)]
        for i, f in enumerate(files):
            validate_sha256(f.sha256, f"files[{i}].sha256")
        found = _as_sent(self.catalog.lookup(dataset, LATEST, _spellings(sent, canonical)),
                         sent, canonical) if files else {}
        present: list[str] = []
        others: set[str] = set()
        for f in files:
            entry = found.get(f.path)
            if entry is not None and entry.size == f.size and entry.sha256 == f.sha256:
                present.append(f.path)
            else:
                others.add(f.sha256)
        stored = self.find_blobs(sorted(others)) if others else []
        return present, stored

    def _pin(self, sha: str, delta: int) -> None:
        with self._pin_lock:
            self._pinned[sha] += delta
            if self._pinned[sha] <= 0:
                del self._pinned[sha]

    def put_files(self, requests: Iterable[store_pb2.PutFilesRequest],
                  is_active: Callable[[], bool] = lambda: True) -> tuple[str, PutResult]:
        """Receive a PutFiles stream; entries land in the head only if it completes."""
        result = PutResult()
        dataset = ""
        upload: _Upload | None = None
        pinned: list[str] = []
        committed = False
        try:
            for n, req in enumerate(requests):
                if req.dataset and dataset and req.dataset != dataset:
                    raise InvalidArgument("dataset", f"message {n} names dataset "
                                          f"{req.dataset!r} but the stream is for {dataset!r}; "
                                          "use one PutFiles call per dataset")
                if not dataset:
                    if not req.dataset:
                        raise InvalidArgument("dataset", "the first PutFiles message must name "
                                              "the dataset")
                    dataset = req.dataset
                    self.require_dataset(dataset, "dataset")
                for chunk in req.chunks:
                    try:
                        if upload is None:  # owned here from the first byte: aborted on failure
                            upload = self._start(chunk, result, pinned)
                        elif chunk.path and chunk.path not in (upload.path, upload.sent_path):
                            raise InvalidArgument(
                                "chunks.path", f"file {upload.path!r} is not finished (no chunk "
                                f"with last=true) when {chunk.path!r} starts")
                        if upload is not None and self._receive(chunk, upload, result, pinned):
                            upload = None
                    except GristmillError as e:
                        # name the file for clients that retry without it
                        e.metadata.setdefault("path", upload.path if upload else chunk.path)
                        raise
                self._publish(result)  # the files this message completed, durable together
            if upload is not None:
                raise InvalidArgument("chunks.last", f"the stream ended inside file "
                                      f"{upload.path!r}; send its remaining bytes and a chunk "
                                      "with last=true")
            if not dataset:
                raise InvalidArgument("dataset", "empty PutFiles stream; send at least one "
                                      "message naming the dataset")
            if not is_active():
                raise FailedPrecondition("the upload was cancelled; nothing was stored")
            if result.entries:
                self.catalog.add_files(dataset, result.entries)
            committed = True
            return dataset, result
        finally:
            if upload is not None:
                upload.writer.abort()
            for _, _, _, sealed in result.waiting:
                if sealed is not None:
                    sealed.abort()
            for sha in pinned:
                self._pin(sha, -1)
            if not committed and result.created:
                self._discard(result.created)

    def _discard(self, shas: list[str]) -> None:
        """Remove blobs a failed upload stored, unless a dataset or an upload uses them now."""
        if self.catalog.shared:
            return  # only a full collection (gc, with its grace period) can tell
        try:
            with self.catalog.guard("discard a failed upload's blobs") as guard, \
                    self.pins_held() as pinned:
                used = guard.referenced(shas)
                for sha in shas:
                    if sha not in used and not pinned(sha):
                        self.blobs.delete(sha)
        except Exception:  # the upload's own error matters; gc removes what is left
            log.warning("cannot remove the blobs of a failed upload; `gristmill store gc` will",
                        exc_info=True)

    def _receive(self, chunk: store_pb2.FileChunk, upload: _Upload, result: PutResult,
                 pinned: list[str]) -> bool:
        """Take one chunk of ``upload``; True when the file is complete."""
        if chunk.data:
            if upload.writer.size + len(chunk.data) > upload.size:
                raise InvalidArgument("chunks.data", f"file {upload.path!r}: more bytes than its "
                                      f"declared size {upload.size}", reason="SIZE_MISMATCH")
            upload.writer.write(chunk.data)
            result.bytes_received += len(chunk.data)
            store_metrics.STORE_BYTES_WRITTEN.inc(len(chunk.data))
        if chunk.last:
            self._finish(upload, result, pinned)
            return True
        return False

    def _start(self, chunk: store_pb2.FileChunk, result: PutResult, pinned: list[str]
               ) -> _Upload | None:
        path = validate_path(chunk.path, "chunks.path")
        if chunk.size < 0:
            raise InvalidArgument("chunks.size", f"file {path!r}: size must not be negative")
        if chunk.sha256:
            validate_sha256(chunk.sha256, "chunks.sha256")
            # pinned before looking: a collector cannot remove it between look and use
            self._pin(chunk.sha256, 1)
            pinned.append(chunk.sha256)
        if not chunk.reuse_blob:
            # a blob stored already needs no staging space: its bytes are only hashed; a
            # small one staged in memory is not looked up (its commit finds it stored)
            stored = (bool(chunk.sha256) and not self.blobs.stages_in_memory(chunk.size)
                      and self.blobs.exists(chunk.sha256)
                      and self.blobs.touch(chunk.sha256))  # gone meanwhile: staged after all
            return _Upload(path, chunk.size, chunk.sha256,
                           self.blobs.writer(chunk.sha256, stage=not stored), chunk.path)
        if not chunk.sha256 or not chunk.last or chunk.data:
            raise InvalidArgument("chunks.reuse_blob", f"file {path!r}: reuse_blob needs sha256 "
                                  "and size, no data, and last=true")
        known = self.catalog.blob_known(chunk.sha256)
        if known is None or not self.blobs.touch(chunk.sha256):
            raise FailedPrecondition(f"file {path!r}: blob {chunk.sha256} is not stored; upload "
                                     "its bytes instead", reason="BLOB_NOT_FOUND")
        if known != chunk.size:
            raise InvalidArgument("chunks.size", f"file {path!r}: declared {chunk.size} bytes but "
                                  f"blob {chunk.sha256} has {known}", reason="SIZE_MISMATCH")
        result.waiting.append((path, chunk.sha256, chunk.size, None))
        return None

    def _finish(self, upload: _Upload, result: PutResult, pinned: list[str]) -> None:
        # pin before the blob becomes visible so a concurrent delete cannot collect it
        writer = upload.writer
        digest = writer.hexdigest()
        self._pin(digest, 1)
        pinned.append(digest)
        sha = writer.seal(upload.sha256, upload.size)
        result.waiting.append((upload.path, sha, upload.size, writer))

    def _publish(self, result: PutResult) -> None:
        """Store the blobs of the files received since the last call, then record their entries.

        The backend makes them durable together (:meth:`BlobStore.publish`:
        the fsyncs of a message's files are batched), all before the catalog
        commit, so a crash leaves only unreferenced blobs for garbage collection.
        """
        if not result.waiting:
            return
        waiting = result.waiting
        writers = [w for _, _, _, w in waiting if w is not None]
        try:
            self.blobs.publish(writers)
        finally:
            for _, sha, _, w in waiting:
                if w is not None and w.created:
                    result.blobs_created += 1
                    result.created.append(sha)
                    store_metrics.STORE_BLOBS_CREATED.inc()
        for path, sha, _, w in waiting:
            # in use again: a collector's grace period starts over; a blob a collector
            # removed between this upload's store and its touch is not referred to
            if w is not None and not w.created and not self.blobs.touch(sha):
                raise Aborted(f"file {path!r}: blob {sha} was removed by garbage collection "
                              "while it was uploaded; send the upload again",
                              reason="BLOB_COLLECTED", metadata={"path": path})
        result.waiting = []
        for path, sha, size, w in waiting:
            self._add_entry(path, sha, size, result, w)

    def _add_entry(self, path: str, sha: str, size: int, result: PutResult,
                   writer: BlobWriter | None) -> None:
        # the header only: a few KiB through bounded ranged reads, never the whole blob;
        # from the upload's first bytes while they are at hand
        def read_at(offset: int, length: int) -> bytes:
            held = writer.read_head(offset, length) if writer is not None else None
            return held if held is not None else self.blobs.read(sha, offset, length)
        media_type, image = sniff(path, read_at)
        entry = store_pb2.FileEntry(path=path, size=size, sha256=sha, media_type=media_type)
        if image is not None:
            entry.image.CopyFrom(image)
        result.entries.append(entry)

    def delete_files(self, dataset: str, paths: list[str]) -> int:
        """Remove paths from the head; returns how many were present."""
        self.require_dataset(dataset, "dataset")
        canonical = [validate_path(p, f"paths[{i}]", strict=False) for i, p in enumerate(paths)]
        # a path stored before NFC normalisation keeps its spelling: delete that too
        spellings = list(dict.fromkeys(canonical + paths))
        deleted, unreferenced = self.catalog.delete_files(dataset, spellings)
        self._collect(unreferenced)
        return deleted

    # reads ------------------------------------------------------------------
    def verify_blob(self, entry: store_pb2.FileEntry) -> None:
        """DataLoss unless the stored bytes still hash to the entry's sha256."""
        digest = hashlib.sha256()
        size = 0
        while True:
            data = self.blobs.read(entry.sha256, size, _HASH_CHUNK)
            if not data:
                break
            digest.update(data)
            size += len(data)
        if size != entry.size or digest.hexdigest() != entry.sha256:
            raise DataLoss(f"stored blob for {entry.path!r} is corrupt (expected sha256 "
                           f"{entry.sha256}, {entry.size} bytes; found {digest.hexdigest()}, "
                           f"{size} bytes); re-upload the file", reason="BLOB_CORRUPT")

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """Whole files as bytes, or the error of each, with no messages in between.

        For readers in this process (the decode and ingest services), which
        would otherwise copy every file into a ReadFilesResponse and out again.
        """
        canonical = _check_paths(paths)
        resolved = self.resolve(dataset, version)
        found = _as_sent(self.catalog.lookup(dataset, resolved, _spellings(paths, canonical)),
                         paths, canonical)
        out: dict[str, bytes | GristmillError] = {}
        for path in paths:
            entry = found.get(path)
            if entry is None:
                out[path] = _not_in_version(path, dataset, resolved)
                continue
            try:
                data = self.blobs.read(entry.sha256, 0, entry.size)
            except Unavailable:
                raise  # the storage is down, not this file: the whole call fails
            except GristmillError as e:
                out[path] = e
                continue
            if len(data) != entry.size:
                out[path] = _short_blob(path, entry.size)
                continue
            store_metrics.STORE_BYTES_READ.inc(len(data))
            out[path] = data
        return out

    def read_files(self, dataset: str, version: str, paths: list[str], *, verify: bool = False,
                   offset: int = 0, length: int = 0, budget: int = 0
                   ) -> Iterator[store_pb2.ReadFilesResponse]:
        """Yield responses of at most ``budget`` bytes (framing included), files in request order.

        ``budget`` 0 means the configured ``store.read_message_bytes``, which
        is also the most a request may ask for.

        Pieces are added to the response in place: copying a built FileData
        into a response would copy its bytes once more on the hot path.
        """
        canonical = _check_paths(paths)
        if offset < 0 or length < 0:
            raise InvalidArgument("offset" if offset < 0 else "length", "must not be negative")
        if (offset > 0 or length > 0) and len(paths) != 1:
            raise InvalidArgument("paths", "a ranged read (offset/length) names exactly one path")
        if budget < 0 or 0 < budget < 64 * 1024:
            raise InvalidArgument("max_message_bytes", "must be 0 (the server's default) or at "
                                  "least 65536")
        # a request may ask for smaller messages, never for more memory than configured
        budget = min(budget or self.read_message_bytes, self.read_message_bytes)
        resolved = self.resolve(dataset, version)
        found = _as_sent(self.catalog.lookup(dataset, resolved, _spellings(paths, canonical)),
                         paths, canonical)
        resp = store_pb2.ReadFilesResponse()
        used = 0
        # whole small files are fetched a message's worth at a time in one batched
        # backend call (aio on Ceph: one round trip per batch, not per file)
        ahead = _ReadAhead(self.blobs, paths, found, budget, self.read_chunk_bytes,
                           enabled=not verify and not offset and not length)
        for i, path in enumerate(paths):
            overhead = _piece_overhead(path)
            if used + overhead + _ERROR_BYTES > budget:  # room for this piece's framing
                yield resp
                resp, used = store_pb2.ReadFilesResponse(), 0
            entry = found.get(path)
            if entry is None:
                resp.files.add(path=path).error.CopyFrom(
                    item_error(_not_in_version(path, dataset, resolved)))
                used += overhead + _ERROR_BYTES
                continue
            start = min(offset, entry.size)
            end = entry.size if not length else min(entry.size, start + length)
            first_piece = len(resp.files)
            try:
                if verify:
                    self.verify_blob(entry)
                pos = start
                while True:
                    room = budget - used - overhead
                    if used and room < min(end - pos, self.read_chunk_bytes):
                        yield resp
                        resp, used, first_piece = store_pb2.ReadFilesResponse(), 0, 0
                        room = budget - overhead
                    # the rest in one piece if it fits, else a chunk of what room is left
                    n = end - pos if end - pos <= room else min(self.read_chunk_bytes, room)
                    data = ahead.take(i) if pos == 0 and n == entry.size else None
                    if data is None:
                        data = ahead.chunk(entry.sha256, pos, n, end)
                    if len(data) != n:
                        raise _short_blob(path, entry.size)
                    resp.files.add(path=path, sha256=entry.sha256, size=entry.size, offset=pos,
                                   data=data, eof=pos + n >= end)
                    used += n + _piece_overhead(path)
                    pos += n
                    store_metrics.STORE_BYTES_READ.inc(n)
                    if pos >= end:
                        break
            except Unavailable:
                raise  # the storage is down, not this file: the whole call fails
            except GristmillError as e:
                del resp.files[first_piece:]
                resp.files.add(path=path, sha256=entry.sha256, size=entry.size
                               ).error.CopyFrom(item_error(e))
                used += overhead + _ERROR_BYTES
        if len(resp.files):
            yield resp



class _ReadAhead:
    """Reads of a ReadFiles call, fetched ahead of the message being sent.

    Whole small files come a message's worth at a time in one batched backend
    call (aio on Ceph: one round trip per batch, not per file), and the next
    batch is fetched while the current one is sent; a large file's next chunk
    is fetched while this one is sent. At most one fetch is ahead, so a call
    holds about two messages' worth of bytes.
    """

    def __init__(self, blobs: BlobStore, paths: list[str], found: dict[str, store_pb2.FileEntry],
                 budget: int, largest: int, enabled: bool) -> None:
        self._blobs = blobs
        self._paths = paths
        self._found = found
        self._budget = budget
        self._largest = largest
        self._enabled = enabled
        self._next = 0  # first path index not yet considered
        self._data: dict[int, bytes] = {}
        self._window: Future[tuple[dict[int, bytes], int]] | None = None
        self._chunk: tuple[str, int, int, Future[bytes]] | None = None

    def take(self, index: int) -> bytes | None:
        """The bytes of file ``index`` if it is small (fetching a batch if needed)."""
        if not self._enabled:
            return None
        if index not in self._data and index >= self._next:
            if self._window is not None:  # the batch fetched ahead covers what follows
                got, self._next = self._window.result()
                self._window = None
                self._data.update(got)
            if index not in self._data and index >= self._next:
                got, self._next = self._fill(index)
                self._data.update(got)
            if self._next < len(self._paths):  # the next batch while this one is sent
                self._window = _READ_AHEAD.submit(self._fill, self._next)
        return self._data.pop(index, None)

    def chunk(self, sha256: str, pos: int, n: int, end: int) -> bytes:
        """``n`` bytes of a blob from ``pos`` (prefetched if asked for), fetching the next."""
        ahead, self._chunk = self._chunk, None
        if ahead is not None and ahead[:3] == (sha256, pos, n):
            data = ahead[3].result()
        else:
            data = self._blobs.read(sha256, pos, n)
        following = min(n, end - pos - n)
        if following > 0:
            self._chunk = (sha256, pos + n, following,
                           _READ_AHEAD.submit(self._blobs.read, sha256, pos + n, following))
        return data

    def _fill(self, start: int) -> tuple[dict[int, bytes], int]:
        """The small files of the window from ``start`` and the index after the window."""
        batch: list[tuple[int, str, int]] = []
        total = 0
        i = start
        while i < len(self._paths) and total < self._budget:
            entry = self._found.get(self._paths[i])
            if entry is not None and 0 < entry.size <= self._largest:
                batch.append((i, entry.sha256, entry.size))
                total += entry.size
            i += 1
        out: dict[int, bytes] = {}
        if batch:
            got = self._blobs.read_many([(sha, size) for _, sha, size in batch])
            for (j, _, _), data in zip(batch, got, strict=True):
                if data is not None:
                    out[j] = data
        return out, i


#: Threads that fetch ReadFiles' next batch or chunk while the current one is sent.
_READ_AHEAD = ThreadPoolExecutor(max_workers=8, thread_name_prefix="gristmill-read-ahead")


#: Bytes an item error record may take besides its path (message, reason, code).
_ERROR_BYTES = 1024


def _piece_overhead(path: str) -> int:
    """Serialized bytes of a FileData piece besides its data: path, sha256, sizes, tags."""
    return len(path.encode()) + 128


def _check_paths(paths: list[str]) -> list[str]:
    """A read names 1 to MAX_PATHS_PER_CALL valid paths; returns their NFC forms."""
    if not paths:
        raise InvalidArgument("paths", "no paths given; name at least one file")
    if len(paths) > MAX_PATHS_PER_CALL:
        raise InvalidArgument("paths", f"at most {MAX_PATHS_PER_CALL} paths per call; split "
                              "the request")
    return [validate_path(p, f"paths[{i}]", strict=False) for i, p in enumerate(paths)]


def _spellings(sent: list[str], canonical: list[str]) -> list[str]:
    """NFC paths, and the spelling sent where it differs (rows stored before NFC)."""
    return list(dict.fromkeys(canonical + [s for s, c in zip(sent, canonical, strict=True)
                                           if s != c]))


def _as_sent(found: dict[str, store_pb2.FileEntry], sent: list[str], canonical: list[str]
             ) -> dict[str, store_pb2.FileEntry]:
    """Entries found by NFC path (else as spelled), keyed by the path as the request spelled it."""
    out = {}
    for s, c in zip(sent, canonical, strict=True):
        entry = found.get(c) or found.get(s)
        if entry is not None:
            out[s] = entry
    return out


def _no_dataset(name: str) -> NotFound:
    return NotFound(f"dataset {name!r} does not exist; create it with `gristmill dataset "
                    f"create {name}`", reason="DATASET_NOT_FOUND", metadata={"dataset": name})


def _not_in_version(path: str, dataset: str, version: str) -> NotFound:
    return NotFound(f"file {path!r} is not in dataset {dataset!r} ({version})",
                    reason="FILE_NOT_FOUND")


def _short_blob(path: str, size: int) -> DataLoss:
    return DataLoss(f"stored blob for {path!r} is shorter than its recorded size {size}; "
                    "re-upload the file", reason="BLOB_CORRUPT")
