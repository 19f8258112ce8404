"""The dataset hub client: list, inspect, import, download and cache datasets."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gristmill.client import hashcache
from gristmill.client.cache import (
    Confined,
    FileCache,
    address_store_id,
    known_store,
    validate_store_id,
    validate_version_name,
)
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import (
    DataLoss,
    GristmillError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    call_pages,
    call_rpc,
    from_item_error,
    stream_rpc,
)
from gristmill.client.folder import FolderScan, LocalSource, open_regular, walk_folder
from gristmill.client.hashcache import FileStamp, HashCache, stamp
from gristmill.client.manifest import Manifest
from gristmill.client.names import nfc, validate_dataset_name, validate_path, validate_sha256
from gristmill.client.private import temp_token
from gristmill.client.progress import Progress, progress
from gristmill.v1 import store_pb2, store_pb2_grpc

__all__ = ["DEFAULT_CACHE_DIR", "Hub", "ImportReport", "Manifest"]

DEFAULT_CACHE_DIR = Path(os.environ.get("GRISTMILL_CACHE_DIR", "~/.cache/gristmill"))
LATEST = "latest"
CHUNK = 1024 * 1024
#: one PutFiles call carries at most this much (an interruption loses at most one call)
UPLOAD_CALL_BYTES = 256 * 1024 * 1024
UPLOAD_CALL_FILES = 2000
#: an import hashes and checks (one FindFiles call) this many files at a time
IMPORT_BATCH_FILES = 2000
#: most batches of an import in flight at once (PutFiles calls side by side)
IMPORT_STREAMS = 4
#: Average size of the files uploaded so far from which PutFiles calls go side by side
#: (below it, one at a time: 10k files of 3 KB took 1,440 files/s with 4 calls in flight
#: and 1,910 with one; 1 MB files 155 with 4 and 132 with one).
IMPORT_LARGE_FILE_BYTES = 256 * 1024
#: remembered hashes of local files, in the cache directory
IMPORT_HASHES = "import-hashes.sqlite"
#: one ReadFiles call during downloads asks for at most this much
DOWNLOAD_CALL_BYTES = 32 * 1024 * 1024
DOWNLOAD_CALL_FILES = 1000
#: pinned manifests a Hub keeps parsed in memory (each with its index by path)
PINNED_MANIFESTS = 4

_DEFAULT = object()


@dataclass
class ImportReport:
    """What :meth:`Hub.import_folder` did."""

    uploaded: int = 0
    reused: int = 0
    skipped: int = 0
    bytes_uploaded: int = 0
    #: (path, why) of every file that was not imported because of a problem
    failed: list[tuple[str, str]] = field(default_factory=list)
    #: (path, why) of symbolic links not followed (out of the folder, broken, to a directory)
    links_skipped: list[tuple[str, str]] = field(default_factory=list)
    #: paths left out by rule (dotfiles, VCS, OS junk) or pattern; directories end with "/"
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.uploaded} uploaded ({self.bytes_uploaded} bytes), {self.reused} "
                f"deduplicated, {self.skipped} already present, {len(self.failed)} failed")
        if self.links_skipped:
            n = len(self.links_skipped)
            text += f", {n} link{'s' if n != 1 else ''} not followed"
        if self.ignored:
            text += f", {len(self.ignored)} ignored (hidden, VCS, OS junk or by pattern)"
        return text


@dataclass(frozen=True)
class _LocalFile:
    path: str
    source: Path
    size: int
    sha256: str


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open_regular(path) as f:
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
            Files are kept under the store id the server reports
            (:meth:`store_id`), so every address of one server shares them.
        ca_file: PEM root certificate; enables TLS.
        workers: parallel ReadFiles calls in :meth:`download_dataset`; batches in
            flight (at most 4) in :meth:`import_folder`.
        show_progress: draw progress bars (when stderr is a terminal).
        cache_limit: most bytes of cached files in ``cache_dir`` (all stores);
            the least recently used files are deleted whole to stay under it,
            never a file being returned. None: unbounded.
        plaintext: keep the connection plain even where ``GRISTMILL_CA_FILE``
            is set (a server known to serve without TLS).
    """

    def __init__(self, address: str | None = None, api_key: str | None = None,
                 cache_dir: Path | str | None | object = _DEFAULT, *,
                 ca_file: Path | None = None, workers: int = 4,
                 show_progress: bool = True, cache_limit: int | None = None,
                 plaintext: bool = False) -> None:
        if cache_limit is not None and cache_limit < 0:
            raise InvalidArgument("cache_limit", f"{cache_limit} is negative; give a number of "
                                  "bytes, or None for no limit")
        self.options = ConnectionOptions(address, api_key, ca_file,
                                         plaintext=plaintext).resolved()
        self._channel = open_channel(self.options)
        self._stub = store_pb2_grpc.StoreServiceStub(self._channel)
        self.workers = workers
        self.show_progress = show_progress
        if cache_dir is _DEFAULT:
            cache_dir = DEFAULT_CACHE_DIR
        assert cache_dir is None or isinstance(cache_dir, (str, Path))
        #: where the cache lives (None: no cache); nothing is created before it is used
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_limit = cache_limit
        self._cache: FileCache | None = None
        self._store_id = ""
        self._latest: dict[str, Manifest] = {}
        #: pinned manifests by (dataset, version as asked and as resolved), newest last
        self._pinned: OrderedDict[tuple[str, str], Manifest] = OrderedDict()
        self._lock = threading.Lock()

    def store_id(self) -> str:
        """The id the server reports for its store (``GetStoreInfo``; asked once per Hub).

        A server too old to report one is keyed by the address it was reached at.
        """
        if not self._store_id:
            try:
                reply = call_rpc(self._stub.GetStoreInfo, store_pb2.GetStoreInfoRequest())
                try:
                    self._store_id = validate_store_id(reply.store_id)
                except InvalidArgument as e:
                    raise _unsafe(f"store id {ascii(reply.store_id)}", e) from None
            except GristmillError as e:
                if e.reason != "UNIMPLEMENTED":
                    raise
                assert self.options.address is not None
                self._store_id = address_store_id(self.options.address)
        return self._store_id

    @property
    def cache(self) -> FileCache | None:
        """The disk cache of this server's store, opened on first use (None without cache_dir).

        Opening it asks the server for its store id; when the server cannot be
        reached, the store last seen at this address is used (cached files
        stay readable offline). With neither, :class:`Unavailable` is raised
        and nothing is created on disk.
        """
        if self.cache_dir is None:
            return None
        with self._lock:
            if self._cache is None:
                assert self.options.address is not None
                try:
                    store = self.store_id()
                    online = True
                except Unavailable:
                    found = known_store(self.cache_dir, self.options.address)
                    if found is None:
                        raise
                    store, online = found, False
                self._cache = FileCache(self.cache_dir, store, self.cache_limit)
                if online:
                    self._cache.remember(self.options.address)
            return self._cache

    def _known_cache(self) -> FileCache | None:
        """The cache if its store can be known (None if never reached and offline)."""
        try:
            return self.cache
        except Unavailable:
            return None

    def close(self) -> None:
        """Close the channel and the cache index."""
        self._channel.close()
        if self._cache is not None:
            self._cache.close()

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
        return [d for page in call_pages(self._stub.ListDatasets, req) for d in page.datasets]

    def delete_dataset(self, name: str) -> store_pb2.DeleteDatasetResponse:
        """Delete a dataset (admin); blobs used elsewhere are kept."""
        req = store_pb2.DeleteDatasetRequest(name=name)
        resp = call_rpc(self._stub.DeleteDataset, req)
        self._latest.pop(name, None)
        self._forget_pinned(name)
        if (cache := self._known_cache()) is not None:
            cache.clear(name)
        return resp

    def commit_version(self, dataset: str) -> store_pb2.Version:
        """Freeze the dataset's head as an immutable version."""
        req = store_pb2.CommitVersionRequest(dataset=dataset)
        return call_rpc(self._stub.CommitVersion, req).version

    def list_versions(self, dataset: str) -> list[store_pb2.Version]:
        """Versions, newest first."""
        req = store_pb2.ListVersionsRequest(dataset=dataset)
        return [v for page in call_pages(self._stub.ListVersions, req) for v in page.versions]

    # manifests -------------------------------------------------------------
    def get_manifest(self, dataset: str, version: str = LATEST,
                     refresh: bool = False) -> Manifest:
        """A version's manifest, sized and iterable over its entries.

        The result has the message's fields (``.files``, ``.dataset``,
        ``.version``) and ``len(m)``, ``for e in m``, ``m[i]``. Pinned
        versions are cached on disk and never refetched; "latest" is fetched
        once per Hub (``refresh=True`` fetches it again).
        """
        version = version or LATEST
        if version == LATEST and not refresh and dataset in self._latest:
            return self._latest[dataset]
        if version != LATEST and (kept := self._pinned_manifest(dataset, version)) is not None:
            return kept
        cache = self._known_cache() if version != LATEST else None
        if cache is not None:
            cached = cache.manifest_path(dataset, version)
            if cached.is_file():
                stored = cached.read_bytes()
                found = Manifest(store_pb2.Manifest.FromString(zlib.decompress(stored)),
                                 hashlib.sha256(stored).hexdigest())
                self._keep_pinned(dataset, {version}, found)
                return found
        req = store_pb2.GetManifestRequest(dataset=dataset, version=version)
        blob = bytearray()
        resolved = version
        count = 0
        for resp in stream_rpc(self._stub.GetManifest(req)):
            if resp.version:
                resolved = resp.version
            count = max(count, resp.file_count)
            blob += resp.data
        manifest = Manifest(store_pb2.Manifest.FromString(_inflate_manifest(bytes(blob), count)),
                            hashlib.sha256(blob).hexdigest())
        if resolved == LATEST:
            self._latest[dataset] = manifest
        elif cache is not None:
            try:
                validate_version_name(resolved)
            except InvalidArgument as e:
                raise _unsafe(f"version {ascii(resolved)} for {version!r}", e) from None
            for name in {version, resolved}:
                target = cache.manifest_path(dataset, name)
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".gm-{temp_token()}.tmp")
                tmp.write_bytes(bytes(blob))
                os.replace(tmp, target)
            self._keep_pinned(dataset, {version, resolved}, manifest)
        return manifest

    def _pinned_manifest(self, dataset: str, version: str) -> Manifest | None:
        """A pinned manifest this Hub already parsed (versions never change)."""
        with self._lock:
            found = self._pinned.get((dataset, version))
            if found is not None:
                self._pinned.move_to_end((dataset, version))
            return found

    def _keep_pinned(self, dataset: str, names: set[str], manifest: Manifest) -> None:
        """Remember a parsed pinned manifest, so that lookups by path reuse its index."""
        with self._lock:
            for name in names:
                self._pinned[(dataset, name)] = manifest
                self._pinned.move_to_end((dataset, name))
            while len({id(m) for m in self._pinned.values()}) > PINNED_MANIFESTS:
                self._pinned.popitem(last=False)

    def _forget_pinned(self, dataset: str | None) -> None:
        with self._lock:
            for key in [k for k in self._pinned if dataset is None or k[0] == dataset]:
                del self._pinned[key]

    def list_manifest(self, dataset: str, version: str = LATEST, prefix: str = ""
                      ) -> Iterator[store_pb2.FileEntry]:
        """Stream manifest entries page by page (no caching)."""
        req = store_pb2.ListManifestRequest(dataset=dataset, version=version, prefix=prefix)
        for page in call_pages(self._stub.ListManifest, req):
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
        """A pinned version's entry of ``path``: its manifest's index, kept per Hub."""
        entry = self.get_manifest(dataset, version).find(path)
        if entry is not None:
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
                if len(buf) + len(data) > piece.size:
                    raise DataLoss(f"{path}: the server sent more than the file's {piece.size} "
                                   "bytes; retry, or report the server", reason="BAD_SERVER_READ")
                buf += data
                digest.update(data)
                expected = piece.sha256
        if digest.hexdigest() != expected:
            raise GristmillError(f"{path}: received bytes do not match sha256 {expected}; retry")
        return bytes(buf)

    def get_file(self, dataset: str, path: str, version: str = LATEST) -> Path:
        """Path of the file in the disk cache, downloading it if needed.

        The cached copy is used when its sha256 is the version's: for a pinned
        version that is checked against the version's (cached) manifest, with
        no network call; for "latest" against the dataset's current entry
        (one small ``ListManifest`` call), so a changed file is fetched again.
        When the server cannot be reached, a cached copy of "latest" is
        returned as it is.
        """
        dataset = validate_dataset_name(dataset, "dataset")
        path = validate_path(path, strict=False)
        cache = self._need_cache("get_file")
        entries: dict[str, store_pb2.FileEntry] | None = None
        if version in ("", LATEST):
            try:
                entry = self._head_entry(dataset, path)
            except Unavailable:
                if cache.lookup(dataset, path) is None:
                    raise
                cache.touch(dataset, [path])
                return cache.file_path(dataset, path)
        else:
            entry = self._entry(dataset, path, version)
            entries = {path: entry}
        _check_entry(entry)
        hit = cache.lookup(dataset, path)
        if hit is not None and hit[0] == entry.sha256:
            cache.touch(dataset, [path])
            return cache.file_path(dataset, path)
        cache.fits([entry.size], f"file {path!r}")
        with cache.keeping(dataset, [path]):
            self._fetch(dataset, version, [path], entries=entries, incoming=entry.size)
        return cache.file_path(dataset, path)

    def _head_entry(self, dataset: str, path: str) -> store_pb2.FileEntry:
        """The manifest entry of ``path`` in the dataset's head, asked of the server now."""
        req = store_pb2.ListManifestRequest(dataset=dataset, version=LATEST, prefix=path,
                                            page_size=1)
        for entry in call_rpc(self._stub.ListManifest, req).files:
            if entry.path == path:  # the first entry with this prefix, if it exists
                return entry
        raise NotFound(f"file {path!r} is not in dataset {dataset!r} (latest)",
                       reason="FILE_NOT_FOUND")

    def download_dataset(self, dataset: str, file_list: Iterable[str] | None = None, *,
                         version: str = LATEST, dest: Path | str | None = None,
                         verify: bool = False) -> list[Path]:
        """Download a dataset (or ``file_list``) into the cache, in parallel batches.

        Files already cached with the right hash are skipped, so an interrupted
        download resumes where it stopped. With ``dest``, the files are also
        linked (or copied) into that directory; the returned paths are there.

        A whole dataset (no ``file_list``, no ``dest``) downloaded once is
        remembered as complete for that exact manifest: asked again while the
        manifest is the same, no cached file was evicted, cleared or replaced
        since and the folders holding its files are unchanged (a file deleted
        by hand changes its folder), the paths come back without a check per
        file (one manifest fetch, one query, one ``stat`` per folder). A file
        edited in place by hand is not noticed then; ``verify=True`` checks
        every file's presence and size (one ``lstat`` each, no hashing) and
        downloads what is missing or of the wrong size.

        Nothing the server sends is trusted to name a place on disk: every
        path, hash and size is checked before a byte is written, and a server
        that sends an unsafe path, a file it was not asked for or bytes that
        do not match raises :class:`DataLoss`. A symbolic link inside ``dest``
        or the cache is never written through (:class:`FailedPrecondition`).
        """
        cache = self._need_cache("download_dataset")
        dataset = validate_dataset_name(dataset, "dataset")
        asked = None if file_list is None else [validate_path(p, "file_list", strict=False)
                                                for p in file_list]
        manifest = self.get_manifest(dataset, version, refresh=True)
        whole = asked is None and dest is None and bool(manifest.digest)
        if whole and not verify and cache.complete(dataset, manifest.digest, len(manifest)):
            if cache.limit is not None:
                cache.touch(dataset, [], every=True)
            return cache.paths(dataset, [nfc(e.path) for e in manifest.files])
        generation = cache.generation()  # before any file is checked: see mark_complete
        if asked is None:
            entries = {e.path: e for e in manifest.files}
        else:  # only what was asked for: looked up in the manifest's index
            entries = {p: e for p in dict.fromkeys(asked) if (e := manifest.find(p)) is not None}
        wanted = list(entries) if asked is None else asked
        missing = [p for p in wanted if p not in entries]
        if missing:
            raise NotFound(f"{len(missing)} requested file(s) are not in dataset {dataset!r}, "
                           f"e.g. {missing[0]!r}", reason="FILE_NOT_FOUND")
        for p in wanted:
            _check_entry(entries[p])
        folder = Confined(dest) if dest is not None else None
        if folder is not None:  # a link in dest fails before anything is downloaded
            for p in wanted:
                folder.path(p)
        unique = list(dict.fromkeys(wanted))
        cache.fits([entries[p].size for p in unique], f"downloading {len(unique)} files of "
                   f"{dataset!r}")
        with cache.keeping(dataset, unique):
            paths = self._download(cache, dataset, manifest.version, wanted, entries, folder)
        if whole and len(unique) == len(manifest):
            cache.mark_complete(dataset, manifest.digest,
                                [(nfc(p), entries[p].size) for p in unique], generation)
        return paths

    def _download(self, cache: FileCache, dataset: str, version: str, wanted: list[str],
                  entries: dict[str, store_pb2.FileEntry], folder: Confined | None
                  ) -> list[Path]:
        """The rest of :meth:`download_dataset`, with the wanted files kept from eviction.

        What is cached is read with one query for the dataset, then each
        wanted file costs one ``lstat`` (no query) to see that it is still there.
        """
        known = cache.cached(dataset)
        where: dict[str, Path] = {}
        todo: list[store_pb2.FileEntry] = []
        for p in dict.fromkeys(wanted):
            e = entries[p]
            if known.get(p) == (e.sha256, e.size) and \
                    (there := cache.on_disk(dataset, p, e.size)) is not None:
                where[p] = there
            else:
                todo.append(e)
        if where:
            cache.touch(dataset, list(where), every=len(where) == len(known))
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
                for fut in [pool.submit(self._fetch, dataset, version, b, bar, entries)
                            for b in batches]:
                    fut.result()
        finally:
            bar.close()
        paths = [where[p] if p in where else cache.file_path(dataset, p) for p in wanted]
        if folder is None:
            return paths
        out = []
        for p, src in zip(wanted, paths, strict=True):
            target = folder.path(p)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".gm-{temp_token()}.tmp")  # name may be 255 B
            try:
                os.link(src, tmp)
            except OSError:
                import shutil
                shutil.copyfile(src, tmp)
            os.replace(tmp, target)
            out.append(target)
        return out

    def _require_cache_dir(self, what: str) -> None:
        if self.cache_dir is None:
            raise InvalidArgument("cache_dir", f"{what} needs a disk cache; create the Hub with "
                                  "cache_dir=... or use get_file_bytes")

    def _need_cache(self, what: str) -> FileCache:
        self._require_cache_dir(what)
        cache = self.cache
        assert cache is not None
        return cache

    def _fetch(self, dataset: str, version: str, paths: list[str],
               bar: Progress | None = None,
               entries: dict[str, store_pb2.FileEntry] | None = None,
               incoming: int | None = None) -> None:
        """Stream files into the cache: temp file, verify sha256, rename, index.

        Each piece must name a requested file not yet received, carry a valid
        sha256 (the manifest's, when ``entries`` is given) and stay within the
        file's declared size; every requested file must arrive whole.

        Room for the ``incoming`` bytes (default: the entries' sizes) is made
        under the cache limit before the call; the files that arrived are
        indexed in one transaction at its end (also when it fails part way).
        """
        cache = self._need_cache("download")
        if incoming is None and entries is not None:
            incoming = sum(entries[p].size for p in paths if p in entries)
        cache.reserve(incoming or 0)
        arrived: list[tuple[str, str, int]] = []
        req = store_pb2.ReadFilesRequest(dataset=dataset, version=version, paths=paths)
        wanted = set(paths)
        done: set[str] = set()
        open_file: BinaryIO | None = None
        digest = hashlib.sha256()
        tmp: Path | None = None
        target: Path | None = None
        folders: set[Path] = set()  # made this call: one mkdir per folder, not per file
        current = ""
        sha, size, written = "", 0, 0
        try:
            for resp in stream_rpc(self._stub.ReadFiles(req)):
                for piece in resp.files:
                    if open_file is not None and piece.path != current:
                        raise _bad_read(f"file {current!r} ended without its last piece when "
                                        f"{ascii(piece.path)} began")
                    if open_file is None and (piece.path not in wanted or piece.path in done):
                        raise _bad_read(f"file {ascii(piece.path)} was not requested (or sent "
                                        "twice)")
                    if piece.HasField("error"):
                        raise _item_error(piece)
                    if open_file is None:
                        current, sha, size, written = piece.path, piece.sha256, piece.size, 0
                        _check_read(piece, entries)
                        target = cache.file_path(dataset, current)
                        if target.parent not in folders:
                            target.parent.mkdir(parents=True, exist_ok=True)
                            folders.add(target.parent)
                        tmp = target.with_name(f".gm-{temp_token()}.part")
                        open_file = open(tmp, "wb", buffering=0)  # noqa: SIM115
                        digest = hashlib.sha256()
                    data = piece.data
                    written += len(data)
                    if written > size:
                        raise _bad_read(f"{current!r}: more bytes than its size {size}")
                    _write_all(open_file, data)
                    digest.update(data)
                    if bar is not None:
                        bar.update(len(data))
                    if piece.eof:
                        open_file.close()
                        open_file = None
                        assert tmp is not None and target is not None
                        if written != size or digest.hexdigest() != sha:
                            raise DataLoss(f"{current}: downloaded bytes do not match sha256 "
                                           f"{sha} and size {size}; retry the download",
                                           reason="CHECKSUM_MISMATCH")
                        os.replace(tmp, target)
                        arrived.append((current, sha, size))
                        done.add(current)
                        tmp = None
            if open_file is not None:
                raise _bad_read(f"the stream ended inside file {current!r}")
            if len(done) < len(wanted):
                lost = sorted(wanted - done)
                raise _bad_read(f"{len(lost)} requested file(s) never arrived, e.g. {lost[0]!r}")
        finally:
            if open_file is not None:
                open_file.close()
            if tmp is not None:
                tmp.unlink(missing_ok=True)
            if arrived:
                cache.record_many(dataset, arrived)

    def get_cache_size(self, dataset: str | None = None) -> int:
        """Bytes of files and manifests cached for this store (all, or one dataset).

        The name is validated; the cache's own index is not counted. 0 when
        nothing was ever cached for this server and it cannot be reached.
        """
        if dataset is not None:
            dataset = validate_dataset_name(dataset, "dataset")
        self._require_cache_dir("get_cache_size")
        cache = self._known_cache()
        return cache.size(dataset) if cache is not None else 0

    def clear_cache(self, dataset: str | None = None) -> int:
        """Empty this store's disk cache (all, or one dataset); returns bytes freed.

        The bytes freed are what :meth:`get_cache_size` counted before.
        ``dataset`` must be a valid dataset name (``InvalidArgument`` otherwise,
        with nothing deleted); ``None`` clears everything cached for this store.
        """
        if dataset is not None:
            dataset = validate_dataset_name(dataset, "dataset")
        self._require_cache_dir("clear_cache")
        if dataset is None:
            self._latest.clear()
        else:
            self._latest.pop(dataset, None)
        self._forget_pinned(dataset)
        cache = self._known_cache()
        return cache.clear(dataset) if cache is not None else 0

    def import_folder(self, dataset: str, folder: Path | str, *, create: bool = True,
                      include: Sequence[str] = (), exclude: Sequence[str] = (),
                      rehash: bool = False) -> ImportReport:
        """Upload a folder recursively; files already stored are skipped.

        What is taken follows :mod:`gristmill.client.folder`: symbolic links
        that lead out of the folder (or to a directory) are not followed and
        are listed in ``links_skipped``; dotfiles, dot-directories (``.git/``),
        VCS directories and OS junk (``.DS_Store``, ``Thumbs.db``,
        ``__MACOSX/``) are listed in ``ignored``, as are files left out by the
        ``include``/``exclude`` patterns (``fnmatch``; a pattern without ``/``
        matches the file name at any depth, one with ``/`` the relative path).

        The folder is walked as a stream, in batches of
        :data:`IMPORT_BATCH_FILES` files: each batch is hashed, checked with
        one ``FindFiles`` call (paths stored with the same content are
        skipped, blobs the server has are linked) and the rest uploaded, with
        up to ``workers`` batches in flight. Their PutFiles calls go one at a
        time while the files uploaded so far average under
        :data:`IMPORT_LARGE_FILE_BYTES`, which is faster for small files: the
        server already syncs a call's files on threads of its own, and more
        calls only contend for its interpreter lock; larger files are sent
        side by side.
        Memory does not grow with the number of files. With a ``cache_dir``,
        the sha256 of files read before is remembered (see
        :mod:`gristmill.client.hashcache`): an unchanged file costs a stat.
        ``rehash=True`` reads every file again.

        A file that cannot be imported (unreadable, a name the store refuses,
        or changed, replaced or deleted between hashing and upload) is listed
        in ``failed`` with the reason; every other file is still uploaded.
        """
        root = Path(folder)
        if not root.is_dir():
            raise InvalidArgument("folder", f"{root} is not a directory")
        scan = FolderScan()
        files = walk_folder(root, include, exclude, scan)
        if create:
            try:
                self.get_dataset(dataset)
            except NotFound:
                self.create_dataset(dataset)
        report = ImportReport()
        hashes = (HashCache(self.cache_dir / IMPORT_HASHES)
                  if self.cache_dir is not None else None)
        streams = max(1, min(self.workers, IMPORT_STREAMS))
        bar = _Shared(progress(None, f"import {root.name}", "file", self.show_progress))
        sent = _Shared(progress(None, f"upload {dataset}", "B", self.show_progress))
        try:
            with ThreadPoolExecutor(streams, thread_name_prefix="gristmill-import") as pool:
                running: list[Future[ImportReport]] = []
                gate = _UploadGate()  # one upload at a time until files show large
                try:
                    for batch in _batches(files, IMPORT_BATCH_FILES):
                        running.append(pool.submit(self._import_batch, dataset, batch, hashes,
                                                   rehash, bar, sent, gate))
                        while len(running) >= streams:  # bounded: a few batches in memory
                            wait(running, return_when=FIRST_COMPLETED)
                            _merge_done(report, running)
                            gate.wide = (report.bytes_uploaded
                                         >= IMPORT_LARGE_FILE_BYTES * max(1, report.uploaded))
                    wait(running)
                    _merge_done(report, running)
                except BaseException:
                    for future in running:
                        future.cancel()
                    raise
        finally:
            bar.close()
            sent.close()
            if hashes is not None:
                hashes.close()
        report.failed[:0] = scan.failed
        report.links_skipped = list(scan.links)
        report.ignored = list(scan.ignored)
        self._latest.pop(dataset, None)
        return report

    def _import_batch(self, dataset: str, batch: list[LocalSource], hashes: HashCache | None,
                      rehash: bool, bar: Progress, sent: Progress, gate: _UploadGate
                      ) -> ImportReport:
        """Hash (or recall), check with one FindFiles call, and upload one batch of files."""
        part = ImportReport()
        started = hashcache.now()
        stamped: list[tuple[LocalSource, FileStamp]] = []
        for src in batch:
            try:
                st = os.stat(src.source)
            except OSError as e:
                part.failed.append((src.path, f"unreadable: {e.strerror or e}"))
                continue
            stamped.append((src, stamp(st)))
        known = (hashes.lookup([(str(src.source), s) for src, s in stamped])
                 if hashes is not None and not rehash else {})
        local: list[_LocalFile] = []
        fresh: list[tuple[str, FileStamp, str]] = []
        for src, s in stamped:
            sha = known.get(str(src.source))
            size = s.size
            if sha is None:
                try:
                    sha, size = _sha256_file(src.source)
                except OSError as e:
                    part.failed.append((src.path, f"unreadable: {e.strerror or e}"))
                    continue
                if size == s.size:
                    fresh.append((str(src.source), s, sha))
            local.append(_LocalFile(src.path, src.source, size, sha))
        if hashes is not None:
            hashes.remember(fresh, started)
        found = call_rpc(self._stub.FindFiles, store_pb2.FindFilesRequest(
            dataset=dataset, files=[store_pb2.FileRef(path=f.path, size=f.size, sha256=f.sha256)
                                    for f in local]))
        present = set(found.present)
        stored = set(found.stored)
        pending = [f for f in local if f.path not in present]
        part.skipped = len(local) - len(pending)
        call: list[_LocalFile] = []
        call_bytes = 0
        for f in pending:
            cost = 0 if f.sha256 in stored else f.size
            if call and (call_bytes + cost > UPLOAD_CALL_BYTES or len(call) >= UPLOAD_CALL_FILES):
                with gate:
                    self._put_batch(dataset, call, stored, part, sent)
                call, call_bytes = [], 0
            call.append(f)
            call_bytes += cost
        if call:
            with gate:
                self._put_batch(dataset, call, stored, part, sent)
        if hashes is not None and part.failed:  # a file found changed is read again next time
            failed = {path for path, _ in part.failed}
            hashes.forget(str(f.source) for f in local if f.path in failed)
        bar.update(len(batch))
        return part

    def _put_batch(self, dataset: str, batch: list[_LocalFile], stored: set[str],
                   report: ImportReport, bar: Progress) -> None:
        """Store ``batch``; a file that fails is reported and the others are sent again.

        The server keeps a call's files only when its whole stream succeeds,
        so one bad file would take the rest of its call down with it. Each
        failed call takes out the files it is about (named by the server's
        error, or found changed while sending) and the rest go again, until
        they are stored. A failure about no file in particular fails the
        remaining files with its message; one that no file can get past (no
        or a refused key, a missing dataset, no server) ends the import.
        """
        remaining = list(batch)
        resent: set[str] = set()  # linked, but the blob went away: sent with bytes instead
        while remaining:
            problems: dict[str, str] = {}
            linked = {f.path for f in remaining if f.sha256 in stored}
            try:
                resp = call_rpc(self._stub.PutFiles,
                                self._requests(dataset, remaining, stored, bar, problems))
            except GristmillError as e:
                named = next((f for f in remaining if f.path == e.metadata.get("path")), None)
                if named is None and not problems and isinstance(e, _FATAL):
                    raise
                relink = (named is not None and named.path in linked
                          and e.reason == "BLOB_NOT_FOUND" and named.path not in resent)
                if relink and named is not None:
                    resent.add(named.path)
                    stored.discard(named.sha256)
                elif named is not None:
                    problems.setdefault(named.path, e.message)
                if not problems and not relink:
                    report.failed.extend((f.path, e.message) for f in remaining)
                    return
                report.failed.extend(problems.items())
                remaining = [f for f in remaining if f.path not in problems]
                continue
            report.failed.extend(problems.items())
            done = {e.path for e in resp.files}
            for f in remaining:
                if f.path in problems:
                    continue
                if f.path not in done:
                    report.failed.append((f.path, "the server did not confirm storing it; "
                                          "import again"))
                elif f.path in linked:
                    report.reused += 1
                else:
                    report.uploaded += 1
                    report.bytes_uploaded += f.size
                stored.add(f.sha256)
            return

    @staticmethod
    def _requests(dataset: str, batch: list[_LocalFile], stored: set[str], bar: Progress,
                  problems: dict[str, str]) -> Iterator[store_pb2.PutFilesRequest]:
        """The PutFiles stream for ``batch``, checking each file against its scan as it is read.

        A file that vanished, changed size or became a link or pipe since it
        was hashed is left out before any of its bytes go. Changed content
        shows only at its last byte: if the file's bytes are all still in the
        unsent message they are dropped from it; otherwise the stream ends
        inside the file, so the server stores nothing of this call and
        :meth:`_put_batch` sends the rest again. Either way the file is in
        ``problems``.
        """
        msg = store_pb2.PutFilesRequest(dataset=dataset)
        pending = 0
        for f in batch:
            if f.sha256 in stored:
                msg.chunks.add(path=f.path, size=f.size, sha256=f.sha256, reuse_blob=True,
                               last=True)
                continue
            try:
                handle = open_regular(f.source)
            except OSError as e:
                problems[f.path] = f"unreadable: {e.strerror or e}"
                continue
            with handle:
                now = os.fstat(handle.fileno()).st_size
                if now != f.size:
                    problems[f.path] = (f"changed since it was hashed ({f.size} bytes then, "
                                        f"{now} now); import again to upload it")
                    continue
                start, held, sent = len(msg.chunks), 0, False  # this file's part of msg
                digest = hashlib.sha256()
                got = 0
                while True:
                    data = handle.read(min(CHUNK, f.size - got)) if got < f.size else b""
                    got += len(data)
                    digest.update(data)
                    last = got >= f.size
                    why = _changed(f, data, last, handle, digest)
                    if why:
                        problems[f.path] = why
                        if sent:
                            return  # ends inside this file: the server refuses the call
                        del msg.chunks[start:]
                        pending -= held
                        break
                    chunk = msg.chunks.add(data=data, last=last)
                    if got == len(data):
                        chunk.path, chunk.size, chunk.sha256 = f.path, f.size, f.sha256
                    pending += len(data)
                    held += len(data)
                    bar.update(len(data))
                    if pending >= CHUNK:
                        yield msg
                        msg = store_pb2.PutFilesRequest()
                        pending, start, held, sent = 0, 0, 0, True
                    if last:
                        break
        if msg.chunks or msg.dataset:
            yield msg


class _UploadGate:
    """Lets an import's PutFiles calls go one at a time (small files) or side by side."""

    def __init__(self) -> None:
        #: side by side (set by the import once its files show large)
        self.wide = False
        self._lock = threading.Lock()
        self._held = threading.local()

    def __enter__(self) -> None:
        self._held.lock = not self.wide
        if self._held.lock:
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        if self._held.lock:
            self._lock.release()


def _batches(files: Iterable[LocalSource], size: int) -> Iterator[list[LocalSource]]:
    batch: list[LocalSource] = []
    for f in files:
        batch.append(f)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _merge_done(report: ImportReport, running: list[Future[ImportReport]]) -> None:
    """Add the reports of finished batches to ``report`` (and drop them from ``running``).

    A batch that raised (an error no file can get past) raises here.
    """
    for future in [f for f in running if f.done()]:
        running.remove(future)
        part = future.result()
        report.uploaded += part.uploaded
        report.reused += part.reused
        report.skipped += part.skipped
        report.bytes_uploaded += part.bytes_uploaded
        report.failed.extend(part.failed)


class _Shared:
    """A progress bar that threads may advance together."""

    def __init__(self, bar: Progress) -> None:
        self._bar = bar
        self._lock = threading.Lock()

    def update(self, n: float = 1) -> bool | None:
        with self._lock:
            return self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            self._bar.close()


#: errors of a PutFiles call that no file of the import can get past
_FATAL = (Unauthenticated, PermissionDenied, NotFound, Unavailable)


def _changed(f: _LocalFile, data: bytes, last: bool, handle: BinaryIO,
             digest: hashlib._Hash) -> str:
    """Why the file being read is no longer the one hashed, or ""."""
    if not last and not data:
        return (f"changed since it was hashed (now shorter than {f.size} bytes); import again "
                "to upload it")
    if last and handle.read(1):
        return (f"changed since it was hashed (now longer than {f.size} bytes); import again "
                "to upload it")
    if last and digest.hexdigest() != f.sha256:
        return "changed since it was hashed (same size, other content); import again to upload it"
    return ""


def _item_error(piece: store_pb2.FileData) -> GristmillError:
    return from_item_error(piece.error.code, piece.error.reason,
                           f"{piece.path}: {piece.error.message}")


_DISTRUST = "nothing was written; is this the gristmill server you meant to use?"


def _unsafe(what: str, error: InvalidArgument) -> DataLoss:
    """The server sent a name the Hub will not use on disk."""
    return DataLoss(f"the server sent {what}, which is not safe to use as a file name "
                    f"({error.message}); {_DISTRUST}", reason="UNSAFE_SERVER_NAME")


def _write_all(f: BinaryIO, data: bytes) -> None:
    """Write all of ``data`` to an unbuffered file (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "the disk took no bytes of a write")
        view = view[n:]


def _bad_read(what: str) -> DataLoss:
    return DataLoss(f"the server's ReadFiles answer is wrong: {what}; the download stopped "
                    "and the partial file was removed", reason="BAD_SERVER_READ")


def _check_entry(entry: store_pb2.FileEntry) -> None:
    """DataLoss unless a manifest entry from the server is safe to download."""
    try:
        validate_path(entry.path, "manifest.files.path", strict=False)
        validate_sha256(entry.sha256, "manifest.files.sha256")
    except InvalidArgument as e:
        raise _unsafe(f"manifest entry {ascii(entry.path)}", e) from None
    if entry.size < 0:
        raise DataLoss(f"the server sent manifest entry {entry.path!r} with a negative size; "
                       f"{_DISTRUST}", reason="UNSAFE_SERVER_NAME")


def _check_read(piece: store_pb2.FileData, entries: dict[str, store_pb2.FileEntry] | None
                ) -> None:
    """DataLoss unless a file's first ReadFiles piece agrees with its manifest entry."""
    try:
        validate_sha256(piece.sha256, "files.sha256")
    except InvalidArgument as e:
        raise _unsafe(f"a sha256 for {ascii(piece.path)}", e) from None
    if piece.size < 0:
        raise _bad_read(f"{piece.path!r} has a negative size")
    entry = entries.get(piece.path) if entries is not None else None
    if entry is not None and (piece.sha256, piece.size) != (entry.sha256, entry.size):
        raise _bad_read(f"{piece.path!r} is sha256 {piece.sha256} ({piece.size} bytes) but the "
                        f"manifest says {entry.sha256} ({entry.size} bytes)")


#: Serialized bytes a manifest entry can take at most (a 1024-byte path, hash,
#: size, media type and image facts), so a manifest of N files inflates to at
#: most N times this: a compressed bomb from a hostile server stops there.
_MAX_ENTRY_BYTES = 2048


def _inflate_manifest(blob: bytes, file_count: int) -> bytes:
    """``zlib.decompress`` bounded by what ``file_count`` entries can take.

    Real manifests compress 2-5x (hashes hardly compress), so 64x the received
    bytes also bounds it whatever count the server claims.
    """
    limit = min((file_count + 1) * _MAX_ENTRY_BYTES, 64 * len(blob)) + 4096
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(blob, limit)
    except zlib.error as e:
        raise DataLoss(f"the manifest the server sent is not valid zlib ({e}); retry",
                       reason="BAD_SERVER_READ") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise DataLoss(f"the manifest the server sent inflates beyond {limit} bytes for "
                       f"{file_count} files, or is cut short; retry, or report the server",
                       reason="BAD_SERVER_READ")
    return data
