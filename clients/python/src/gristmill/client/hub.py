"""The dataset hub client: list, inspect, import, download and cache datasets."""

from __future__ import annotations

import hashlib
import os
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from gristmill.client.cache import FileCache, safe_component
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import (
    GristmillError,
    InvalidArgument,
    NotFound,
    call_rpc,
    from_item_error,
    stream_rpc,
)
from gristmill.client.names import validate_path
from gristmill.client.progress import Progress, progress
from gristmill.v1 import store_pb2, store_pb2_grpc

__all__ = ["DEFAULT_CACHE_DIR", "Hub", "ImportReport"]

DEFAULT_CACHE_DIR = Path(os.environ.get("GRISTMILL_CACHE_DIR", "~/.cache/gristmill"))
LATEST = "latest"
CHUNK = 1024 * 1024
#: one PutFiles call carries at most this much (an interruption loses at most one call)
UPLOAD_CALL_BYTES = 256 * 1024 * 1024
UPLOAD_CALL_FILES = 2000
#: one ReadFiles call during downloads asks for at most this much
DOWNLOAD_CALL_BYTES = 32 * 1024 * 1024
DOWNLOAD_CALL_FILES = 1000

_DEFAULT = object()


@dataclass
class ImportReport:
    """What :meth:`Hub.import_folder` did."""

    uploaded: int = 0
    reused: int = 0
    skipped: int = 0
    bytes_uploaded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.uploaded} uploaded ({self.bytes_uploaded} bytes), {self.reused} "
                f"deduplicated, {self.skipped} already present, {len(self.failed)} failed")


@dataclass(frozen=True)
class _LocalFile:
    path: str
    source: Path
    size: int
    sha256: str


class _PagedRequest(Protocol):
    page_token: str


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=_PagedRequest)
Pg = TypeVar("Pg", bound=_Page)


def _pages(method: Callable[[P], Pg], request: P) -> Iterator[Pg]:
    """Every page of an AIP-158 list call (the request's page_token is advanced)."""
    while True:
        page = call_rpc(method, request)
        yield page
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


class Hub:
    """Client of a gristmill store.

    Args:
        address: ``host:port``; default ``GRISTMILL_ADDRESS`` or 127.0.0.1:7450.
        api_key: default ``GRISTMILL_API_KEY``.
        cache_dir: disk cache for files and pinned manifests; None disables it
            (then :meth:`get_file` and :meth:`download_dataset` are unavailable).
        ca_file: PEM root certificate; enables TLS.
        workers: parallel ReadFiles calls in :meth:`download_dataset`.
        show_progress: draw progress bars (when stderr is a terminal).
    """

    def __init__(self, address: str | None = None, api_key: str | None = None,
                 cache_dir: Path | str | None | object = _DEFAULT, *,
                 ca_file: Path | None = None, workers: int = 4,
                 show_progress: bool = True) -> None:
        self.options = ConnectionOptions(address, api_key, ca_file).resolved()
        self._channel = open_channel(self.options)
        self._stub = store_pb2_grpc.StoreServiceStub(self._channel)
        self.workers = workers
        self.show_progress = show_progress
        if cache_dir is _DEFAULT:
            cache_dir = DEFAULT_CACHE_DIR
        self.cache: FileCache | None = None
        if cache_dir is not None:
            assert isinstance(cache_dir, (str, Path))
            assert self.options.address is not None
            root = Path(cache_dir).expanduser() / safe_component(self.options.address)
            self.cache = FileCache(root)
        self._latest: dict[str, store_pb2.Manifest] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the channel and the cache index."""
        self._channel.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self) -> Hub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # datasets -------------------------------------------------------------
    def create_dataset(self, name: str, description: str = "") -> store_pb2.Dataset:
        """Create an empty dataset."""
        req = store_pb2.CreateDatasetRequest(name=name, description=description)
        return call_rpc(self._stub.CreateDataset, req).dataset

    def get_dataset(self, name: str) -> store_pb2.Dataset:
        """One dataset's summary."""
        return call_rpc(self._stub.GetDataset, store_pb2.GetDatasetRequest(name=name)).dataset

    def list_datasets(self, page_size: int = 0) -> list[store_pb2.Dataset]:
        """Every dataset, sorted by name (pages are fetched as needed)."""
        req = store_pb2.ListDatasetsRequest(page_size=page_size)
        return [d for page in _pages(self._stub.ListDatasets, req) for d in page.datasets]

    def delete_dataset(self, name: str) -> store_pb2.DeleteDatasetResponse:
        """Delete a dataset (admin); blobs used elsewhere are kept."""
        req = store_pb2.DeleteDatasetRequest(name=name)
        resp = call_rpc(self._stub.DeleteDataset, req)
        if self.cache is not None:
            self.cache.clear(name)
        return resp

    def commit_version(self, dataset: str) -> store_pb2.Version:
        """Freeze the dataset's head as an immutable version."""
        req = store_pb2.CommitVersionRequest(dataset=dataset)
        return call_rpc(self._stub.CommitVersion, req).version

    def list_versions(self, dataset: str) -> list[store_pb2.Version]:
        """Versions, newest first."""
        req = store_pb2.ListVersionsRequest(dataset=dataset)
        return [v for page in _pages(self._stub.ListVersions, req) for v in page.versions]

    # manifests -------------------------------------------------------------
    def get_manifest(self, dataset: str, version: str = LATEST,
                     refresh: bool = False) -> store_pb2.Manifest:
        """A version's manifest.

        Pinned versions are cached on disk and never refetched; "latest" is
        fetched once per Hub (``refresh=True`` fetches it again).
        """
        version = version or LATEST
        if version == LATEST and not refresh and dataset in self._latest:
            return self._latest[dataset]
        if version != LATEST and self.cache is not None:
            cached = self.cache.manifest_path(dataset, version)
            if cached.is_file():
                return store_pb2.Manifest.FromString(zlib.decompress(cached.read_bytes()))
        req = store_pb2.GetManifestRequest(dataset=dataset, version=version)
        blob = bytearray()
        resolved = version
        for resp in stream_rpc(self._stub.GetManifest(req)):
            if resp.version:
                resolved = resp.version
            blob += resp.data
        manifest = store_pb2.Manifest.FromString(zlib.decompress(bytes(blob)))
        if resolved == LATEST:
            self._latest[dataset] = manifest
        elif self.cache is not None:
            for name in {version, resolved}:
                target = self.cache.manifest_path(dataset, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(f".{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(bytes(blob))
                os.replace(tmp, target)
        return manifest

    def list_manifest(self, dataset: str, version: str = LATEST, prefix: str = ""
                      ) -> Iterator[store_pb2.FileEntry]:
        """Stream manifest entries page by page (no caching)."""
        req = store_pb2.ListManifestRequest(dataset=dataset, version=version, prefix=prefix)
        for page in _pages(self._stub.ListManifest, req):
            yield from page.files

    def read_files(self, dataset: str, version: str, paths: list[str]
                   ) -> Iterator[store_pb2.ReadFilesResponse]:
        """Raw ReadFiles responses: many files per message, per-file errors inline.

        This is what services use to read from a remote store; most callers
        want :meth:`get_file_bytes` or :meth:`download_dataset`.
        """
        req = store_pb2.ReadFilesRequest(dataset=dataset, version=version, paths=paths)
        yield from stream_rpc(self._stub.ReadFiles(req))

    def _entry(self, dataset: str, path: str, version: str) -> store_pb2.FileEntry:
        for entry in self.get_manifest(dataset, version).files:
            if entry.path == path:
                return entry
        raise NotFound(f"file {path!r} is not in dataset {dataset!r} ({version})",
                       reason="FILE_NOT_FOUND")

    # reading -------------------------------------------------------------
    def get_file_bytes(self, dataset: str, path: str, version: str = LATEST) -> bytes:
        """A file's bytes, hash-verified, without touching the disk cache."""
        buf = bytearray()
        digest = hashlib.sha256()
        expected = ""
        req = store_pb2.ReadFilesRequest(dataset=dataset, version=version, paths=[path])
        for resp in stream_rpc(self._stub.ReadFiles(req)):
            for piece in resp.files:
                if piece.HasField("error"):
                    raise _item_error(piece)
                data = piece.data
                buf += data
                digest.update(data)
                expected = piece.sha256
        if digest.hexdigest() != expected:
            raise GristmillError(f"{path}: received bytes do not match sha256 {expected}; retry")
        return bytes(buf)

    def get_file(self, dataset: str, path: str, version: str = LATEST) -> Path:
        """Path of the file in the disk cache, downloading it if needed.

        A cached file is returned without a network call; for a pinned version
        it is also checked against that version's (cached) manifest.
        """
        cache = self._need_cache("get_file")
        hit = cache.lookup(dataset, path)
        if hit is not None and version in ("", LATEST):
            return cache.file_path(dataset, path)
        if hit is not None and hit[0] == self._entry(dataset, path, version).sha256:
            return cache.file_path(dataset, path)
        self._fetch(dataset, version, [path])
        return cache.file_path(dataset, path)

    def download_dataset(self, dataset: str, file_list: Iterable[str] | None = None, *,
                         version: str = LATEST, dest: Path | str | None = None) -> list[Path]:
        """Download a dataset (or ``file_list``) into the cache, in parallel batches.

        Files already cached with the right hash are skipped, so an interrupted
        download resumes where it stopped. With ``dest``, the files are also
        linked (or copied) into that directory; the returned paths are there.
        """
        cache = self._need_cache("download_dataset")
        manifest = self.get_manifest(dataset, version, refresh=True)
        entries = {e.path: e for e in manifest.files}
        wanted = list(entries) if file_list is None else list(file_list)
        missing = [p for p in wanted if p not in entries]
        if missing:
            raise NotFound(f"{len(missing)} requested file(s) are not in dataset {dataset!r}, "
                           f"e.g. {missing[0]!r}", reason="FILE_NOT_FOUND")
        todo = [entries[p] for p in wanted
                if (hit := cache.lookup(dataset, p)) is None or hit[0] != entries[p].sha256]
        batches: list[list[str]] = []
        cur: list[str] = []
        cur_bytes = 0
        for e in todo:
            if cur and (cur_bytes + e.size > DOWNLOAD_CALL_BYTES
                        or len(cur) >= DOWNLOAD_CALL_FILES):
                batches.append(cur)
                cur, cur_bytes = [], 0
            cur.append(e.path)
            cur_bytes += e.size
        if cur:
            batches.append(cur)
        bar = progress(sum(e.size for e in todo), f"download {dataset}", "B",
                       self.show_progress)
        try:
            with ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool:
                for fut in [pool.submit(self._fetch, dataset, manifest.version, b, bar)
                            for b in batches]:
                    fut.result()
        finally:
            bar.close()
        paths = [cache.file_path(dataset, p) for p in wanted]
        if dest is None:
            return paths
        out = []
        for p, src in zip(wanted, paths, strict=True):
            target = Path(dest) / p
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
            try:
                os.link(src, tmp)
            except OSError:
                import shutil
                shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            out.append(target)
        return out

    def _need_cache(self, what: str) -> FileCache:
        if self.cache is None:
            raise InvalidArgument("cache_dir", f"{what} needs a disk cache; create the Hub with "
                                  "cache_dir=... or use get_file_bytes")
        return self.cache

    def _fetch(self, dataset: str, version: str, paths: list[str],
               bar: Progress | None = None) -> None:
        """Stream files into the cache: temp file, verify sha256, rename, index."""
        cache = self._need_cache("download")
        req = store_pb2.ReadFilesRequest(dataset=dataset, version=version, paths=paths)
        open_file = None
        digest = hashlib.sha256()
        tmp: Path | None = None
        try:
            for resp in stream_rpc(self._stub.ReadFiles(req)):
                for piece in resp.files:
                    if piece.HasField("error"):
                        raise _item_error(piece)
                    if open_file is None:
                        target = cache.file_path(dataset, piece.path)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
                        open_file = open(tmp, "wb")  # noqa: SIM115
                        digest = hashlib.sha256()
                    data = piece.data
                    open_file.write(data)
                    digest.update(data)
                    if bar is not None:
                        bar.update(len(data))
                    if piece.eof:
                        open_file.close()
                        open_file = None
                        assert tmp is not None
                        if digest.hexdigest() != piece.sha256:
                            tmp.unlink(missing_ok=True)
                            raise GristmillError(f"{piece.path}: downloaded bytes do not match "
                                                 f"sha256 {piece.sha256}; retry the download")
                        os.replace(tmp, cache.file_path(dataset, piece.path))
                        cache.record(dataset, piece.path, piece.sha256, piece.size)
                        tmp = None
        finally:
            if open_file is not None:
                open_file.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)

    def get_cache_size(self, dataset: str | None = None) -> int:
        """Bytes in the disk cache (all, or one dataset)."""
        return self._need_cache("get_cache_size").size(dataset)

    def clear_cache(self, dataset: str | None = None) -> int:
        """Empty the disk cache (all, or one dataset); returns bytes freed."""
        self._latest.pop(dataset, None) if dataset else self._latest.clear()
        return self._need_cache("clear_cache").clear(dataset)

    # writing --------------------------------------------------------------
    def import_folder(self, dataset: str, folder: Path | str, *,
                      create: bool = True) -> ImportReport:
        """Upload a folder recursively; files already stored are skipped.

        Unreadable or unacceptable files are reported in the result's
        ``failed`` list; the import goes on without them.
        """
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgument("folder", f"{root} is not a directory")
        if create:
            try:
                self.get_dataset(dataset)
            except NotFound:
                self.create_dataset(dataset)
        report = ImportReport()
        sources = sorted(p for p in root.rglob("*") if p.is_file())
        local: list[_LocalFile] = []
        bar = progress(len(sources), f"hash {root.name}", "file", self.show_progress)
        for src in sources:
            rel = src.relative_to(root).as_posix()
            try:
                validate_path(rel)
            except InvalidArgument as e:
                report.failed.append((rel, e.message))
                bar.update()
                continue
            try:
                sha, size = _sha256_file(src)
                local.append(_LocalFile(rel, src, size, sha))
            except OSError as e:
                report.failed.append((rel, f"unreadable: {e.strerror or e}"))
            bar.update()
        bar.close()
        present = {e.path: e.sha256 for e in self.get_manifest(dataset, refresh=True).files}
        pending = [f for f in local if present.get(f.path) != f.sha256]
        report.skipped = len(local) - len(pending)
        stored: set[str] = set()
        shas = sorted({f.sha256 for f in pending})
        for i in range(0, len(shas), 10_000):
            req = store_pb2.FindBlobsRequest(sha256=shas[i:i + 10_000])
            stored.update(call_rpc(self._stub.FindBlobs, req).present)
        bar = progress(sum(f.size for f in pending if f.sha256 not in stored),
                       f"upload {dataset}", "B", self.show_progress)
        try:
            batch: list[_LocalFile] = []
            batch_bytes = 0
            for f in pending:
                cost = 0 if f.sha256 in stored else f.size
                if batch and (batch_bytes + cost > UPLOAD_CALL_BYTES
                              or len(batch) >= UPLOAD_CALL_FILES):
                    self._put_batch(dataset, batch, stored, report, bar)
                    batch, batch_bytes = [], 0
                batch.append(f)
                batch_bytes += cost
            if batch:
                self._put_batch(dataset, batch, stored, report, bar)
        finally:
            bar.close()
        self._latest.pop(dataset, None)
        return report

    def _put_batch(self, dataset: str, batch: list[_LocalFile], stored: set[str],
                   report: ImportReport, bar: Progress) -> None:
        """One PutFiles call; a file that fails is reported and the rest retried once."""
        linked = {f.path for f in batch if f.sha256 in stored}  # sent as reuse_blob, no bytes
        for _attempt in range(2):
            unreadable: list[tuple[str, str]] = []
            try:
                resp = call_rpc(self._stub.PutFiles,
                            self._requests(dataset, batch, stored, bar, unreadable))
            except GristmillError as e:
                bad = [f for f in batch if f.path == e.metadata.get("path")] or batch
                report.failed.extend((f.path, e.message) for f in bad)
                batch = [f for f in batch if f not in bad]
                if not batch:
                    return
                continue
            report.failed.extend(unreadable)
            done = {e.path for e in resp.files}
            for f in batch:
                if f.path not in done:
                    continue
                if f.path in linked:
                    report.reused += 1
                else:
                    report.uploaded += 1
                    report.bytes_uploaded += f.size
                stored.add(f.sha256)
            return

    @staticmethod
    def _requests(dataset: str, batch: list[_LocalFile], stored: set[str], bar: Progress,
                  unreadable: list[tuple[str, str]]) -> Iterator[store_pb2.PutFilesRequest]:
        msg = store_pb2.PutFilesRequest(dataset=dataset)
        pending = 0
        for f in batch:
            if f.sha256 in stored:
                msg.chunks.add(path=f.path, size=f.size, sha256=f.sha256, reuse_blob=True,
                               last=True)
                continue
            try:
                handle = open(f.source, "rb")  # noqa: SIM115
            except OSError as e:
                unreadable.append((f.path, f"unreadable: {e.strerror or e}"))
                continue
            with handle:
                first = True
                while True:
                    data = handle.read(CHUNK)
                    last = handle.tell() >= f.size or not data
                    chunk = msg.chunks.add(data=data, last=last)
                    if first:
                        chunk.path, chunk.size, chunk.sha256 = f.path, f.size, f.sha256
                        first = False
                    pending += len(data)
                    bar.update(len(data))
                    if pending >= CHUNK:
                        yield msg
                        msg = store_pb2.PutFilesRequest()
                        pending = 0
                    if last:
                        break
        if msg.chunks or msg.dataset:
            yield msg


def _item_error(piece: store_pb2.FileData) -> GristmillError:
    return from_item_error(piece.error.code, piece.error.reason,
                           f"{piece.path}: {piece.error.message}")
