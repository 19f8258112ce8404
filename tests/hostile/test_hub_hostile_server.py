"""The Hub against a hostile store: nothing the server sends may write outside dest or cache.

The peer here is a small fake StoreService on a real socket (port 0): the
point is a server that lies, which the real one never does. Names the caller
passes (``clear_cache``, ``get_cache_size``, ``file_list``) are checked too.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from gristmill.client.cache import safe_component
from gristmill.client.errors import DataLoss, GristmillError, InvalidArgument
from gristmill.client.hub import Hub
from gristmill.v1 import store_pb2, store_pb2_grpc

VERSION = "0123456789abcdef" * 4


@dataclass
class Lies:
    """What the hostile server says."""

    files: dict[str, bytes] = field(default_factory=lambda: {"ok.txt": b"fine"})
    #: manifest entry fields to override, by path
    entry_sha: dict[str, str] = field(default_factory=dict)
    entry_size: dict[str, int] = field(default_factory=dict)
    #: ReadFiles: the path sent back instead of the one requested
    read_path: dict[str, str] = field(default_factory=dict)
    #: ReadFiles: bytes sent instead of the file's own (sha256 and size stay the entry's)
    read_data: dict[str, bytes] = field(default_factory=dict)
    read_sha: dict[str, str] = field(default_factory=dict)
    #: ReadFiles: files never sent, and files sent without eof
    read_skip: set[str] = field(default_factory=set)
    read_no_eof: set[str] = field(default_factory=set)
    resolved: str | None = None  # GetManifest's version
    store_id: str = "5" * 32
    version_ids: list[str] = field(default_factory=lambda: [VERSION])


class HostileStore(store_pb2_grpc.StoreServiceServicer):
    def __init__(self, lies: Lies) -> None:
        self.lies = lies

    def _entries(self) -> list[store_pb2.FileEntry]:
        lies = self.lies
        return [store_pb2.FileEntry(path=p, size=lies.entry_size.get(p, len(d)),
                                    sha256=lies.entry_sha.get(p, hashlib.sha256(d).hexdigest()),
                                    media_type="application/octet-stream")
                for p, d in lies.files.items()]

    def GetStoreInfo(self, request: store_pb2.GetStoreInfoRequest,
                     context: grpc.ServicerContext) -> store_pb2.GetStoreInfoResponse:
        return store_pb2.GetStoreInfoResponse(store_id=self.lies.store_id)

    def GetDataset(self, request: store_pb2.GetDatasetRequest,
                   context: grpc.ServicerContext) -> store_pb2.GetDatasetResponse:
        return store_pb2.GetDatasetResponse(dataset=store_pb2.Dataset(
            name=request.name, file_count=len(self.lies.files)))

    def ListVersions(self, request: store_pb2.ListVersionsRequest,
                     context: grpc.ServicerContext) -> store_pb2.ListVersionsResponse:
        return store_pb2.ListVersionsResponse(versions=[
            store_pb2.Version(id=v, dataset=request.dataset) for v in self.lies.version_ids])

    def ListManifest(self, request: store_pb2.ListManifestRequest,
                     context: grpc.ServicerContext) -> store_pb2.ListManifestResponse:
        return store_pb2.ListManifestResponse(files=self._entries(), version="latest")

    def GetManifest(self, request: store_pb2.GetManifestRequest,
                    context: grpc.ServicerContext) -> Iterator[store_pb2.GetManifestResponse]:
        version = self.lies.resolved or request.version or "latest"
        manifest = store_pb2.Manifest(dataset=request.dataset, version=version,
                                      files=self._entries())
        yield store_pb2.GetManifestResponse(version=version, file_count=len(manifest.files),
                                            data=zlib.compress(manifest.SerializeToString()))

    def ReadFiles(self, request: store_pb2.ReadFilesRequest,
                  context: grpc.ServicerContext) -> Iterator[store_pb2.ReadFilesResponse]:
        lies = self.lies
        entries = {e.path: e for e in self._entries()}
        for path in request.paths:
            if path in lies.read_skip or path not in entries:
                continue
            entry = entries[path]
            data = lies.read_data.get(path, lies.files[path])
            yield store_pb2.ReadFilesResponse(files=[store_pb2.FileData(
                path=lies.read_path.get(path, path), size=entry.size,
                sha256=lies.read_sha.get(path, entry.sha256), data=data,
                eof=path not in lies.read_no_eof)])


@pytest.fixture
def lies() -> Lies:
    return Lies()


@pytest.fixture
def hostile(lies: Lies) -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # only the calls the Hub makes here are implemented; the rest stay abstract
    servicer = HostileStore(lies)  # type: ignore[abstract]
    store_pb2_grpc.add_StoreServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """Where dest and cache live, a few levels down so that '..' escapes stay in view."""
    work = tmp_path / "l1" / "l2" / "l3" / "work"
    (work / "victim").mkdir(parents=True)
    (work / "victim" / "keep.txt").write_text("precious")
    return work


@pytest.fixture
def hub(hostile: str, work: Path) -> Iterator[Hub]:
    with Hub(hostile, None, work / "cache", show_progress=False) as h:
        assert h.cache is not None  # the cache folder exists before each test looks
        yield h


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root: file contents, or None for directories and links.

    The cache's SQLite index is left out: reading it may touch its -shm file.
    """
    found: dict[str, bytes | None] = {}
    for p in sorted(root.rglob("*")):
        if p.name.startswith("index.sqlite"):
            continue
        rel = p.relative_to(root).as_posix()
        found[rel] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return found


def changed_outside(top: Path, before: dict[str, bytes | None], *allowed: Path) -> list[str]:
    """Paths under top created, changed or deleted since ``before``, outside ``allowed``."""
    after = snapshot(top)
    roots = [a.relative_to(top).as_posix() for a in allowed]
    keys = set(before) | set(after)
    diff = [k for k in keys if before.get(k, b"<absent>") != after.get(k, b"<absent>")]
    return sorted(k for k in diff if not any(k == a or k.startswith(a + "/") for a in roots))


def cache_dirs(hub: Hub) -> list[Path]:
    """Where the cache may write for dataset "ds"."""
    assert hub.cache is not None
    return [hub.cache.root / "datasets" / "ds", hub.cache.root / "manifests" / "ds"]


ESCAPES = ["../../../../evil.txt", "../../../victim/keep.txt", "a/../../../../../../evil.txt",
           "..", "a/./b", "a//b", "a\\..\\..\\evil", "%2e%2e/%2e%2e/%2e%2e/evil.txt"]


@pytest.mark.parametrize("bad", [*ESCAPES, "ABSOLUTE"])
def test_manifest_paths_that_leave_dest_or_cache_are_refused(
        hub: Hub, lies: Lies, work: Path, tmp_path: Path, bad: str) -> None:
    if bad == "ABSOLUTE":
        bad = str(work / "victim" / "keep.txt")
    lies.files = {"ok.txt": b"fine", bad: b"pwned"}
    before = snapshot(tmp_path)
    with pytest.raises(DataLoss) as info:
        hub.download_dataset("ds", dest=work / "dest")
    assert repr(bad) in info.value.message and "server" in info.value.message
    assert changed_outside(tmp_path, before, work / "dest", *cache_dirs(hub)) == []
    assert (work / "victim" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("bad", [*ESCAPES[:3], "ABSOLUTE", "other.txt"])
def test_read_files_answering_with_another_path_is_refused(
        hub: Hub, lies: Lies, work: Path, tmp_path: Path, bad: str) -> None:
    if bad == "ABSOLUTE":
        bad = str(work / "victim" / "keep.txt")
    lies.files = {"ok.txt": b"fine", "other.txt": b"other"}
    lies.read_path = {"ok.txt": bad}
    before = snapshot(tmp_path)
    with pytest.raises(DataLoss) as info:
        hub.download_dataset("ds", ["ok.txt"], dest=work / "dest")
    assert repr(bad) in info.value.message
    assert changed_outside(tmp_path, before, work / "dest", *cache_dirs(hub)) == []
    assert not (work / "dest" / "ok.txt").exists()
    assert (work / "victim" / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("where", ["entry", "read"])
@pytest.mark.parametrize("bad", ["../x", "../../../../victim/keep.txt", "", "A" * 64])
def test_bad_sha256_from_the_server_is_refused(hub: Hub, lies: Lies, work: Path,
                                               tmp_path: Path, where: str, bad: str) -> None:
    (lies.entry_sha if where == "entry" else lies.read_sha)["ok.txt"] = bad
    before = snapshot(tmp_path)
    with pytest.raises(DataLoss):
        hub.download_dataset("ds", dest=work / "dest")
    assert changed_outside(tmp_path, before, *cache_dirs(hub)) == []
    assert not (work / "dest").exists()


def test_more_fewer_or_unfinished_bytes_are_refused(hub: Hub, lies: Lies, work: Path) -> None:
    lies.files = {"big.bin": b"x" * 10}
    lies.read_data = {"big.bin": b"x" * 1_000_000}  # more than the manifest's size
    with pytest.raises(DataLoss, match="big.bin"):
        hub.download_dataset("ds", dest=work / "dest")
    lies.read_data = {}
    lies.read_no_eof = {"big.bin"}
    with pytest.raises(DataLoss, match="big.bin"):
        hub.download_dataset("ds", dest=work / "dest")
    lies.read_no_eof = set()
    lies.read_skip = {"big.bin"}
    with pytest.raises(DataLoss, match="big.bin"):
        hub.download_dataset("ds", dest=work / "dest")
    assert hub.cache is not None
    assert [p for p in hub.cache.root.rglob("*") if p.suffix in (".part", ".tmp")] == []
    assert not (work / "dest").exists()


@pytest.mark.parametrize("bad", ["../../../../evil", "a/b", "..", "latest/../../x", "v\x00"])
def test_version_ids_from_the_server_are_refused(hub: Hub, lies: Lies, tmp_path: Path,
                                                 bad: str) -> None:
    lies.resolved = bad
    lies.version_ids = [bad]
    before = snapshot(tmp_path)
    with pytest.raises(DataLoss) as info:
        hub.get_manifest("ds", VERSION[:12])
    assert repr(bad) in info.value.message
    for v in hub.list_versions("ds"):  # a caller passing the server's id back
        with pytest.raises(GristmillError):
            hub.get_manifest("ds", v.id)
    assert changed_outside(tmp_path, before, *cache_dirs(hub)) == []


@pytest.mark.parametrize("bad", ["../../x", "a/b", "..", ".", "", "/abs", "x\x00"])
def test_caller_names_are_checked_before_the_filesystem(hub: Hub, work: Path, tmp_path: Path,
                                                        bad: str) -> None:
    assert hub.cache is not None
    root = hub.cache.root
    hub.download_dataset("ds", dest=work / "dest")  # something in the cache to lose
    victims = [work / "cache" / "x", root / "datasets" / "a" / "b", root / "x"]
    for v in victims:
        v.mkdir(parents=True, exist_ok=True)
        (v / "keep.txt").write_text("precious")
    if bad == "/abs":
        bad = str(work / "victim")
    before = snapshot(tmp_path)
    with pytest.raises(InvalidArgument):
        hub.clear_cache(bad)
    with pytest.raises(InvalidArgument):
        hub.get_cache_size(bad)
    with pytest.raises(InvalidArgument):
        hub.download_dataset(bad, dest=work / "dest2")
    with pytest.raises(InvalidArgument):
        hub.get_manifest(bad, VERSION)
    with pytest.raises(InvalidArgument):
        hub.get_file(bad, "ok.txt")
    assert snapshot(tmp_path) == before
    assert hub.get_cache_size("ds") > 0


# never a real system path here: on a Hub without these checks the test itself would write it
@pytest.mark.parametrize("bad", ["../../../victim/keep.txt", "ABSOLUTE", "a//b", ".."])
def test_caller_file_paths_are_checked(hub: Hub, lies: Lies, work: Path, tmp_path: Path,
                                       bad: str) -> None:
    if bad == "ABSOLUTE":
        bad = str(work / "victim" / "keep.txt")
    lies.files = {"ok.txt": b"fine", bad: b"pwned"}  # even if the server lists them
    before = snapshot(tmp_path)
    with pytest.raises(InvalidArgument):
        hub.download_dataset("ds", [bad], dest=work / "dest")
    with pytest.raises(InvalidArgument):
        hub.get_file("ds", bad)
    assert snapshot(tmp_path) == before


def test_symlinked_folders_in_dest_and_cache_are_not_followed(hub: Hub, lies: Lies,
                                                              work: Path) -> None:
    lies.files = {"sub/a.txt": b"a"}
    (work / "dest").mkdir()
    (work / "dest" / "sub").symlink_to(work / "victim", target_is_directory=True)
    victim = snapshot(work / "victim")
    with pytest.raises(GristmillError, match="link"):
        hub.download_dataset("ds", dest=work / "dest")
    assert not (work / "victim" / "a.txt").exists()
    assert hub.cache is not None
    # a cache whose dataset folder was replaced by a link out of it
    hub.clear_cache("ds")
    (work / "dest" / "sub").unlink()
    (hub.cache.root / "datasets").mkdir(exist_ok=True)
    (hub.cache.root / "datasets" / "ds").symlink_to(work / "victim",
                                                    target_is_directory=True)
    with pytest.raises(GristmillError, match="link"):
        hub.download_dataset("ds")
    with pytest.raises(GristmillError, match="link"):
        hub.clear_cache("ds")
    assert (work / "victim" / "keep.txt").read_text() == "precious"
    assert not (work / "victim" / "sub").exists()
    assert snapshot(work / "victim") == victim


def test_a_good_download_still_works(hub: Hub, lies: Lies, work: Path) -> None:
    longest = "/".join(["s" * 255] * 3 + ["t" * 252])  # 1024 bytes: the longest valid path
    lies.files = {"a/b/c.txt": b"c", "d.txt": b"d", "caf\u00e9.txt": b"e", longest: b"l"}
    paths = hub.download_dataset("ds", dest=work / "dest")
    assert sorted(p.relative_to(work / "dest").as_posix() for p in paths) == sorted(lies.files)
    assert (work / "dest" / "a" / "b" / "c.txt").read_bytes() == b"c"
    assert hub.get_file("ds", "d.txt").read_bytes() == b"d"
    assert hub.get_cache_size("ds") > 0
    assert hub.clear_cache("ds") > 0 and hub.get_cache_size("ds") == 0


@pytest.mark.parametrize("bad", ["../../../../evil", "..", "", "a/b", "ABCDEF" * 6, "x\x00"])
def test_store_ids_from_the_server_are_refused(hostile: str, lies: Lies, work: Path,
                                               tmp_path: Path, bad: str) -> None:
    lies.store_id = bad
    before = snapshot(tmp_path)
    with Hub(hostile, None, work / "cache2", show_progress=False) as hub:
        with pytest.raises(DataLoss, match="store id"):
            hub.get_file("ds", "ok.txt")
        with pytest.raises(DataLoss, match="store id"):
            hub.download_dataset("ds", dest=work / "dest")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("address", ["..", ".", "", "../..:1"])
def test_server_address_never_names_a_parent_folder(address: str) -> None:
    assert safe_component(address) not in ("", ".", "..")
    assert "/" not in safe_component(address)


def test_inflate_manifest_stops_a_zlib_bomb() -> None:
    import zlib

    from gristmill.client.errors import DataLoss
    from gristmill.client.hub import _inflate_manifest
    from gristmill.v1 import store_pb2

    real = store_pb2.Manifest(dataset="d", version="v", files=[
        store_pb2.FileEntry(path=f"a/{i}.jpg", size=i, sha256=f"{i:064x}") for i in range(500)])
    blob = zlib.compress(real.SerializeToString(), 6)
    assert store_pb2.Manifest.FromString(_inflate_manifest(blob, 500)) == real
    bomb = zlib.compress(b"\0" * (256 * 1024 * 1024), 9)  # 256 MiB from ~250 KiB
    for claimed in (1, 10**12):
        with pytest.raises(DataLoss, match="inflates beyond"):
            _inflate_manifest(bomb, claimed)
    with pytest.raises(DataLoss, match="not valid zlib"):
        _inflate_manifest(b"not zlib", 1)
