"""The store service and Hub client against a real server and real files."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from PIL import Image

from gristmill.client.errors import DataLoss, InvalidArgument, NotFound, from_rpc_error
from gristmill.client.hub import Hub
from gristmill.store.blobs import StoredBlob, blob_key
from gristmill.store.ceph import CephBackend
from gristmill.store.fsobjects import FsBackend
from gristmill.store.store import Store
from gristmill.v1 import store_pb2
from tests.helpers import (
    Running,
    both_backends,
    make_image_tree,
    sha256_of,
    spawn_server,
    stop_process,
)

# the server-based tests run on both store backends
storage = both_backends()


def blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "store" / "blobs").rglob("*") if p.is_file()]


def local_store(running: Running) -> Store:
    assert running.server is not None
    store: Store = running.server.context.local["store"]
    return store


def stored_blobs(running: Running) -> list[StoredBlob]:
    """The blobs the server's backend holds (files or RADOS objects)."""
    return list(local_store(running).blobs.stored_blobs())


def overwrite_blob(running: Running, sha: str, data: bytes) -> None:
    """Replace a stored blob's bytes behind the store's back (corruption on the backend)."""
    local_store(running).blobs.backend.put(blob_key(sha), data)


def staging_left(running: Running) -> int:
    """Uploads staged on the backend and not yet committed or dropped."""
    backend = local_store(running).blobs.backend
    if isinstance(backend, FsBackend):
        return len(list(backend.tmp_dir.iterdir()))
    assert isinstance(backend, CephBackend)
    return len(backend._active) + sum(1 for _ in backend.list_objects("pieces/"))


def test_import_manifest_download_roundtrip(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    sizes = make_image_tree(src)
    (src / "notes" / "readme.txt").parent.mkdir()
    (src / "notes" / "readme.txt").write_text("not an image")
    report = hub.import_folder("photos", src)
    assert report.uploaded == 7 and not report.failed
    manifest = hub.get_manifest("photos")
    by_path = {e.path: e for e in manifest.files}
    assert sorted(by_path) == sorted([*sizes, "notes/readme.txt"])
    for rel, (w, h) in sizes.items():
        e = by_path[rel]
        assert e.size == (src / rel).stat().st_size
        assert e.sha256 == sha256_of(src / rel)
        assert (e.image.width, e.image.height) == (w, h), rel
        assert e.image.format == Image.open(src / rel).format
        assert e.media_type in ("image/jpeg", "image/png")
    assert by_path["val/rotated.jpg"].image.orientation == 6
    assert not by_path["notes/readme.txt"].HasField("image")
    assert by_path["notes/readme.txt"].media_type == "text/plain"
    dest = tmp_path / "dest"
    paths = hub.download_dataset("photos", dest=dest)
    assert len(paths) == 7
    for rel in by_path:
        assert (dest / rel).read_bytes() == (src / rel).read_bytes()
        assert hub.get_file_bytes("photos", rel) == (src / rel).read_bytes()
    # a second import stores nothing new
    again = hub.import_folder("photos", src)
    assert again.skipped == 7 and again.uploaded == 0


def test_image_facts_of_headers_past_the_kept_head(hub: Hub, tmp_path: Path) -> None:
    # the store reads headers from an upload's first 64 KiB in memory; a header
    # further in is read back from the stored blob, and deduplicated uploads
    # (hashed, not staged) are read from memory as well
    buf = io.BytesIO()
    Image.new("RGB", (37, 23), (10, 200, 30)).save(buf, "JPEG")
    plain = buf.getvalue()
    pad = b"".join(b"\xff\xef" + (60_002).to_bytes(2, "big") + bytes(60_000)
                   for _ in range(3))  # three APP15 segments: the frame header after 180 KB
    src = tmp_path / "src"
    (src / "copy").mkdir(parents=True)
    (src / "far.jpg").write_bytes(plain[:2] + pad + plain[2:])
    (src / "near.jpg").write_bytes(plain)
    (src / "copy" / "near.jpg").write_bytes(plain)
    assert hub.import_folder("heads", src).uploaded == 3
    for entry in hub.get_manifest("heads").files:
        assert (entry.image.width, entry.image.height, entry.image.format) == (37, 23, "JPEG"), \
            entry.path
        assert entry.media_type == "image/jpeg"


def test_same_content_is_stored_once(server: Running, hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    payload = os.urandom(50_000)
    (src / "a.bin").write_bytes(payload)
    (src / "copy").mkdir()
    (src / "copy" / "b.bin").write_bytes(payload)
    (src / "c.bin").write_bytes(b"other")
    first = hub.import_folder("one", src)
    assert first.uploaded == 3 and first.reused == 0  # both copies' bytes went in one call
    report = hub.import_folder("two", src)
    assert report.uploaded == 0 and report.reused == 3
    assert len(stored_blobs(server)) == 2
    # deleting one dataset keeps blobs the other still uses
    hub.delete_dataset("one")
    assert len(stored_blobs(server)) == 2
    assert hub.get_file_bytes("two", "copy/b.bin") == payload
    resp = hub.delete_dataset("two")
    if local_store(server).catalog.shared:
        # a catalog in the pool is shared by replicas: unreferenced blobs go by gc
        assert resp.blobs_deleted == 0 and len(stored_blobs(server)) == 2
        collected = local_store(server).collect_garbage(0.0)
        assert collected.blobs_deleted == 2 and collected.bytes_freed == 50_005
    else:
        assert resp.blobs_deleted == 2 and resp.bytes_freed == 50_005
    assert stored_blobs(server) == []


def _half_upload(payload: bytes, gate: threading.Event) -> Iterator[store_pb2.PutFilesRequest]:
    yield store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="done.bin", size=3, data=b"abc", last=True),
        store_pb2.FileChunk(path="big.bin", size=len(payload), data=payload[:len(payload) // 2]),
    ])
    gate.wait(30)


def _assert_nothing_landed(server_store: object, data_dir: Path) -> None:
    resp = server_store.ListManifest(store_pb2.ListManifestRequest(dataset="d"))  # type: ignore[attr-defined]
    assert list(resp.files) == []
    assert list((data_dir / "store" / "tmp").iterdir()) == []
    big = hashlib.sha256(b"abc").hexdigest()
    assert all(p.name != big or p.read_bytes() == b"abc" for p in blob_files(data_dir))


def _assert_nothing_landed_on(running: Running) -> None:
    resp = running.store().ListManifest(store_pb2.ListManifestRequest(dataset="d"))
    assert list(resp.files) == []
    assert staging_left(running) == 0
    if local_store(running).catalog.shared:
        # blobs a failed upload stored are left to gc when replicas share the catalog
        local_store(running).collect_garbage(0.0)
    assert stored_blobs(running) == []


def test_cancelled_upload_leaves_nothing(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    payload = os.urandom(3 * 1024 * 1024)
    gate = threading.Event()
    future = stub.PutFiles.future(_half_upload(payload, gate))
    time.sleep(0.5)
    future.cancel()
    gate.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    deadline = time.monotonic() + 10
    while staging_left(server):
        assert time.monotonic() < deadline, "staged bytes not dropped after cancel"
        time.sleep(0.05)
    _assert_nothing_landed_on(server)
    resp = stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="big.bin", size=len(payload), data=payload, last=True)])]))
    assert resp.files[0].sha256 == hashlib.sha256(payload).hexdigest()


def test_upload_cut_by_server_sigkill_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    running = spawn_server(data)
    stub = running.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    payload = os.urandom(3 * 1024 * 1024)
    gate = threading.Event()
    future = stub.PutFiles.future(_half_upload(payload, gate))
    deadline = time.monotonic() + 10
    while not list((data / "store" / "tmp").glob("*.part")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stop_process(running, signal.SIGKILL)
    gate.set()
    with pytest.raises(grpc.RpcError):
        future.result(timeout=30)
    running = spawn_server(data)
    try:
        stub = running.store()
        _assert_nothing_landed(stub, data)
        resp = stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
            store_pb2.FileChunk(path="big.bin", size=len(payload), data=payload, last=True)])]))
        assert resp.files[0].size == len(payload)
    finally:
        assert stop_process(running) == 0


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../x", "a\\..\\x", "%2e%2e/x"])
def test_traversal_refused_on_upload_and_read(server: Running, path: str) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="t"))
    with pytest.raises(grpc.RpcError) as info:
        stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="t", chunks=[
            store_pb2.FileChunk(path=path, size=1, data=b"x", last=True)])]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunks.path" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ReadFiles(store_pb2.ReadFilesRequest(dataset="t", paths=[path])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "paths[0]" in (info.value.details() or "")


@pytest.mark.parametrize("storage", ["fs"])  # symlinks are a filesystem matter
def test_symlink_inside_data_dir_is_not_followed(server: Running, hub: Hub,
                                                 tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"top secret" * 2000)
    src = tmp_path / "src"
    src.mkdir()
    # same size as the secret; over store.backend.inline_max_bytes, so a file
    (src / "a.txt").write_bytes(b"harmless!!" * 2000)
    hub.import_folder("s", src)
    blob = blob_files(server.config.data_dir)[0]
    # 1. the blob file itself replaced by a symlink to a file outside
    blob.unlink()
    blob.symlink_to(secret)
    with pytest.raises(Exception) as info:
        hub.get_file_bytes("s", "a.txt")
    assert "top secret" not in str(info.value)
    # 2. the blob's directory replaced by a symlink to a directory outside
    blob.unlink()
    outside_dir = tmp_path / "outside" / "dir"
    outside_dir.mkdir()
    (outside_dir / blob.name).write_bytes(b"top secret" * 2000)
    parent = blob.parent
    parent.rmdir()
    parent.symlink_to(outside_dir)
    resp = list(server.store().ReadFiles(store_pb2.ReadFilesRequest(dataset="s",
                                                                    paths=["a.txt"])))
    pieces = [f for r in resp for f in r.files]
    assert len(pieces) == 1 and pieces[0].HasField("error") and pieces[0].data == b""
    assert "symlink" in pieces[0].error.message


def test_corrupt_blob_detected(server: Running, hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.bin").write_bytes(os.urandom(10_000))
    hub.import_folder("c", src)
    blob = stored_blobs(server)[0]
    raw = bytearray(local_store(server).blobs.read(blob.sha256, 0, blob.size))
    raw[5000] ^= 0xFF
    overwrite_blob(server, blob.sha256, bytes(raw))
    resp = list(server.store().ReadFiles(store_pb2.ReadFilesRequest(
        dataset="c", paths=["x.bin"], verify=True)))
    piece = resp[0].files[0]
    assert piece.error.reason == "BLOB_CORRUPT" and piece.data == b""
    # without server-side verify, the Hub's own hash check still refuses the bytes
    with pytest.raises(Exception, match="do not match"):
        hub.get_file_bytes("c", "x.bin")


def test_pinned_version_is_immutable(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"version one")
    (src / "b.txt").write_bytes(b"bee")
    hub.import_folder("p", src)
    v1 = hub.commit_version("p")
    assert hub.commit_version("p").id == v1.id  # unchanged head, same id
    (src / "a.txt").write_bytes(b"version two")
    (src / "c.txt").write_bytes(b"sea")
    hub.import_folder("p", src)
    hub._stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="p", paths=["b.txt"]))
    v2 = hub.commit_version("p")
    assert v2.id != v1.id
    pinned = hub.get_manifest("p", v1.id)
    assert [e.path for e in pinned.files] == ["a.txt", "b.txt"]
    assert hub.get_file_bytes("p", "a.txt", version=v1.id) == b"version one"
    assert hub.get_file_bytes("p", "b.txt", version=v1.id[:12]) == b"bee"
    assert hub.get_file_bytes("p", "a.txt") == b"version two"
    with pytest.raises(NotFound):
        hub.get_file_bytes("p", "b.txt")
    with pytest.raises(NotFound, match="version"):
        hub.get_manifest("p", "0" * 64)
    assert [v.id for v in hub.list_versions("p")] == [v2.id, v1.id]


def test_cache_hits_without_network_and_resumes(server: Running, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(1000 + i))
    cache = tmp_path / "cache"
    with Hub(server.address, server.admin_key, cache, show_progress=False) as hub:
        hub.import_folder("cache", src)
        v = hub.commit_version("cache")
        first = hub.download_dataset("cache", ["f00.bin", "f01.bin"])
        assert [p.read_bytes() for p in first] == [(src / "f00.bin").read_bytes(),
                                                    (src / "f01.bin").read_bytes()]
        hub.get_manifest("cache", v.id)  # pins the manifest on disk
        assert hub.get_cache_size("cache") > 2000
    assert server.server is not None
    server.server.stop(0)  # the server is gone: cached files still come back
    with Hub(server.address, server.admin_key, cache, show_progress=False) as offline:
        assert offline.get_file("cache", "f00.bin").read_bytes() == (src / "f00.bin").read_bytes()
        assert offline.get_file("cache", "f01.bin", version=v.id).exists()
        with pytest.raises(Exception, match="nreachable|UNAVAILABLE|failed to connect|onnect"):
            offline.get_file("cache", "f02.bin")


def test_download_resumes_after_interruption(server: Running, hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i:02d}.bin").write_bytes(os.urandom(2000))
    hub.import_folder("r", src)
    paths = hub.download_dataset("r")
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    paths[3].unlink()
    paths[7].write_bytes(b"truncated")  # a half-written file from an interruption
    again = hub.download_dataset("r")
    assert again == paths
    for p in paths:
        assert p.read_bytes() == (src / p.name).read_bytes()
    changed = {p for p in paths if p.stat().st_mtime_ns != stamps.get(p)}
    assert changed == {paths[3], paths[7]}
    freed = hub.clear_cache("r")
    assert freed >= 30 * 2000 and hub.get_cache_size("r") == 0


def test_import_reports_bad_files_and_goes_on(hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("ok")
    (src / "back\\slash.txt").write_text("refused by the server")
    (src / "unreadable.bin").symlink_to("/proc/1/mem")
    with pytest.raises(OSError):
        (src / "unreadable.bin").read_bytes()
    os.mkfifo(src / "pipe.bin")  # opening it would block: refused, never read
    report = hub.import_folder("bad", src)
    failed = dict(report.failed)
    assert set(failed) == {"back\\slash.txt", "pipe.bin"}
    assert "backslash" in failed["back\\slash.txt"]
    # a link out of the folder is not followed (not even to fail reading it)
    assert "outside the folder" in dict(report.links_skipped)["unreadable.bin"]
    assert [e.path for e in hub.get_manifest("bad", refresh=True).files] == ["good.txt"]


def test_ranged_and_batched_reads(server: Running, hub: Hub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 * 1024 * 1024 + 17)
    (src / "big.bin").write_bytes(big)
    for i in range(50):
        (src / f"small{i:02d}.bin").write_bytes(os.urandom(10_000))
    hub.import_folder("rr", src)
    stub = server.store()
    resp = list(stub.ReadFiles(store_pb2.ReadFilesRequest(dataset="rr", paths=["big.bin"],
                                                          offset=1000, length=2_000_000)))
    data = b"".join(f.data for r in resp for f in r.files)
    assert data == big[1000:2_001_000]
    assert [f.eof for r in resp for f in r.files][-1]
    names = [f"small{i:02d}.bin" for i in range(50)] + ["missing.bin"]
    resp = list(stub.ReadFiles(store_pb2.ReadFilesRequest(dataset="rr", paths=names,
                                                          max_message_bytes=128 * 1024)))
    assert 3 <= len(resp) <= 6  # many files per message, bounded by the budget
    assert all(sum(len(f.data) for f in r.files) <= 128 * 1024 for r in resp)
    pieces = [f for r in resp for f in r.files]
    assert [p.path for p in pieces] == names
    assert pieces[-1].error.reason == "FILE_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ReadFiles(store_pb2.ReadFilesRequest(dataset="rr", paths=["a", "b"],
                                                       offset=5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_upload_validation_errors(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="v"))

    def put(*chunks: store_pb2.FileChunk, dataset: str = "v") -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as info:
            stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset=dataset, chunks=chunks)]))
        return info.value

    err = put(store_pb2.FileChunk(path="a", size=3, data=b"ab", last=True))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "received 2" in (err.details() or "")
    err = put(store_pb2.FileChunk(path="a", size=2, sha256="0" * 64, data=b"ab", last=True))
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert from_rpc_error(err).metadata["path"] == "a"  # clients can retry without it
    err = put(store_pb2.FileChunk(path="a", size=2, data=b"ab"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ended inside" in (err.details() or "")
    err = put(store_pb2.FileChunk(path="a", size=2, sha256="1" * 64, reuse_blob=True, last=True))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    err = put(store_pb2.FileChunk(path="a", size=1, data=b"a", last=True), dataset="nope")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert list(stub.ListManifest(store_pb2.ListManifestRequest(dataset="v")).files) == []


def test_manifest_paging_and_prefix(hub: Hub, server: Running, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in ("a", "b"):
        (src / d).mkdir(parents=True)
        for i in range(12):
            (src / d / f"{i:02d}.txt").write_text(f"{d}{i}")
    hub.import_folder("m", src)
    stub = server.store()
    token, seen = "", []
    while True:
        resp = stub.ListManifest(store_pb2.ListManifestRequest(dataset="m", page_size=5,
                                                               prefix="b/", page_token=token))
        seen += [f.path for f in resp.files]
        token = resp.next_page_token
        if not token:
            break
    assert seen == [f"b/{i:02d}.txt" for i in range(12)]
    assert len(list(hub.list_manifest("m"))) == 24
    with pytest.raises(InvalidArgument):
        hub.get_file_bytes("m", "../a/00.txt")
    with pytest.raises(DataLoss.__mro__[1]):  # any GristmillError
        hub.get_file_bytes("m", "absent.txt")


def test_read_bytes_for_in_process_readers_equals_read_files(server: Running, hub: Hub,
                                                            tmp_path: Path) -> None:
    from gristmill.common.service import ServiceContext
    from gristmill.store.service import open_store

    src = tmp_path / "src"
    src.mkdir()
    files = {"a.bin": os.urandom(5_000_000), "b/c.bin": os.urandom(10), "empty.bin": b""}
    for name, data in files.items():
        (src / name).parent.mkdir(exist_ok=True)
        (src / name).write_bytes(data)
    hub.import_folder("rb", src)
    store = open_store(ServiceContext(server.config))  # a second reader of the same data
    try:
        got = store.read_bytes("rb", "latest", [*files, "missing.bin"])
        assert {k: v for k, v in got.items() if k in files} == files
        assert isinstance(got["missing.bin"], NotFound)
        blob = next(b for b in stored_blobs(server) if b.size == 10)
        overwrite_blob(server, blob.sha256, b"short")
        assert isinstance(store.read_bytes("rb", "latest", ["b/c.bin"])["b/c.bin"], DataLoss)
        with pytest.raises(InvalidArgument):
            store.read_bytes("rb", "latest", ["../etc/passwd"])
    finally:
        store.close()
