"""A full disk, failed uploads and crashes: clean errors, no garbage left, `store gc`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gristmill.cli.main import main
from gristmill.client.hub import Hub
from gristmill.common.service import ServiceContext
from gristmill.store.blobs import blob_key
from gristmill.store.fsobjects import SMALL_OBJECTS
from gristmill.store.service import open_store
from gristmill.store.store import Store
from gristmill.v1 import store_pb2
from tests.helpers import Running, spawn_server, start_in_process, stop_process

#: Small enough to fill in a blink, big enough for a server's databases.
VOLUME = "12m"
RESERVE = 256 * 1024


# helpers ------------------------------------------------------------------
def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put(dataset: str, files: list[tuple[str, bytes]], *, declare: bool = True,
        reuse: bool = False) -> Iterator[store_pb2.PutFilesRequest]:
    msg = store_pb2.PutFilesRequest(dataset=dataset)
    for path, data in files:
        if reuse:
            msg.chunks.add(path=path, size=len(data), sha256=sha(data), reuse_blob=True,
                           last=True)
        else:
            msg.chunks.add(path=path, size=len(data), sha256=sha(data) if declare else "",
                           data=data, last=True)
    yield msg


def reason_of(error: grpc.RpcError) -> str:
    assert isinstance(error, grpc.Call)
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def store_dir(running: Running) -> Path:
    return running.config.data_dir / "store"


def staging_files(running: Running) -> list[str]:
    return sorted(p.name for p in (store_dir(running) / "tmp").iterdir())


def blob_files(data_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in (data_dir / "store" / "blobs").rglob("*") if p.is_file()}


def small_rows(data_dir: Path) -> dict[str, int]:
    """The small blobs stored as rows (sha256 -> size), read behind the server's back."""
    path = data_dir / "store" / SMALL_OBJECTS
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {key.rsplit("/", 1)[1]: size for key, size in conn.execute(
            "SELECT key, length(data) FROM objects WHERE key LIKE 'blobs/%'")}


def wait_for(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def fill(directory: Path) -> Path:
    """Write a file until the volume refuses more bytes; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for block in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * block)
            except OSError as e:
                assert e.errno == 28, e
    finally:
        os.close(fd)
    assert os.statvfs(directory).f_bavail == 0
    return filler


def local_store(running: Running) -> Store:
    assert running.server is not None
    store: Store = running.server.context.local["store"]
    return store


# a real full filesystem ------------------------------------------------------
@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of this test's own: a filesystem that really fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs the tests as root)")
    mnt = tmp_path / "volume"
    mnt.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={VOLUME},mode=0700", "tmpfs",
                          str(mnt)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): "
                    f"{out.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def full_server(volume: Path) -> Iterator[Running]:
    """An all-in-one server whose data directory is on the small volume."""
    running = start_in_process(volume / "data", store={"disk_reserve_bytes": RESERVE})
    assert (store_dir(running) / "reserve").stat().st_size == RESERVE
    try:
        yield running
    finally:
        assert running.server is not None
        running.server.stop(0)


def test_upload_to_a_full_disk_is_resource_exhausted(full_server: Running,
                                                     volume: Path) -> None:
    stub = full_server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    filler = fill(volume)
    # a file per blob, and small blobs (rows of small-objects.sqlite: 5 MB of them, more
    # than the room SQLite's write-ahead log keeps); declared or not
    for size, count, declare in ((300_000, 1, True), (300_000, 1, False),
                                 (10_000, 500, True), (10_000, 500, False)):
        with pytest.raises(grpc.RpcError) as info:
            stub.PutFiles(put("d", [(f"new{i}.bin", os.urandom(size)) for i in range(count)],
                              declare=declare))
        err = info.value
        details = err.details() or ""
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert details.startswith("disk full: "), details
        assert str(store_dir(full_server)) in details
        assert "gristmill store gc" in details
        assert reason_of(err) == "DISK_FULL"
        assert staging_files(full_server) == []
    assert blob_files(full_server.config.data_dir) == {}
    assert small_rows(full_server.config.data_dir) == {}
    # space back: the same uploads go through
    filler.unlink()
    resp = stub.PutFiles(put("d", [("new.bin", b"x" * 300_000), ("small.bin", b"s" * 2_000)]))
    assert resp.blobs_created == 2
    assert list(small_rows(full_server.config.data_dir).values()) == [2_000]


@pytest.mark.parametrize("size", [200_000, 2_000])  # a blob file, a small blob's row
def test_deduplicated_uploads_succeed_on_a_full_disk(full_server: Running, volume: Path,
                                                     size: int) -> None:
    stub = full_server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    data = os.urandom(size)
    stub.PutFiles(put("d", [("first.bin", data)]))
    fill(volume)
    # bytes sent with their hash, bytes sent without it, and a reuse_blob reference
    for i in range(20):
        resp = stub.PutFiles(put("d", [(f"declared/{i}.bin", data)]))
        assert resp.blobs_created == 0
    resp = stub.PutFiles(put("d", [("undeclared.bin", data)], declare=False))
    assert resp.blobs_created == 0 and resp.files[0].sha256 == sha(data)
    resp = stub.PutFiles(put("d", [("reused.bin", data)], reuse=True))
    assert resp.files[0].path == "reused.bin"
    manifest = stub.ListManifest(store_pb2.ListManifestRequest(dataset="d", page_size=100))
    assert len(manifest.files) == 23 and {f.sha256 for f in manifest.files} == {sha(data)}
    assert staging_files(full_server) == []
    # new bytes are still refused, cleanly
    with pytest.raises(grpc.RpcError) as info:
        stub.PutFiles(put("d", [("other.bin", os.urandom(100_000))]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# failed uploads leave nothing ----------------------------------------------
def test_small_blobs_are_deleted_and_collected_on_a_full_disk(volume: Path) -> None:
    """Deleting a row writes before it frees: a full volume neither fails the delete
    nor keeps the space once gc ran (with a disk reserve that covers SQLite's log)."""
    running = start_in_process(volume / "data", store={"disk_reserve_bytes": 2 << 20})
    try:
        _rows_on_a_full_disk(running, volume)
    finally:
        assert running.server is not None
        running.server.stop(0)


def _rows_on_a_full_disk(running: Running, volume: Path) -> None:
    stub = running.store()
    data_dir = running.config.data_dir
    for name in ("a", "b"):
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name=name))
    small = [(f"s{i:03d}.bin", os.urandom(3000 + i)) for i in range(300)]  # ~1 MB of rows
    stub.PutFiles(put("a", small))
    stub.PutFiles(put("b", [("large.bin", os.urandom(300_000))]))
    assert len(small_rows(data_dir)) == 300 and len(blob_files(data_dir)) == 1
    filler = fill(volume)
    # the datasets go (the catalog uses its reserve); blobs it cannot delete wait for gc
    stub.DeleteDataset(store_pb2.DeleteDatasetRequest(name="a"))
    stub.DeleteDataset(store_pb2.DeleteDatasetRequest(name="b"))
    assert not stub.ListDatasets(store_pb2.ListDatasetsRequest()).datasets
    report = local_store(running).collect_garbage(0)
    assert report.left_full == 0
    assert small_rows(data_dir) == {} and blob_files(data_dir) == {}
    st = os.statvfs(volume)
    assert st.f_bavail * st.f_frsize > 1_000_000  # the rows' pages went back to the volume
    filler.unlink()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="a"))
    assert stub.PutFiles(put("a", small[:10])).blobs_created == 10


def test_failed_uploads_leave_no_staging_files_or_blobs(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    for i in range(50):  # the first chunk has more bytes than the size it declares
        req = store_pb2.PutFilesRequest(dataset="d")
        req.chunks.add(path=f"f{i}.bin", size=10, data=os.urandom(20), last=False)
        with pytest.raises(grpc.RpcError) as info:
            stub.PutFiles(iter([req]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:  # a wrong hash
        req = store_pb2.PutFilesRequest(dataset="d")
        req.chunks.add(path="h.bin", size=3, sha256="0" * 64, data=b"abc", last=True)
        stub.PutFiles(iter([req]))
    assert info.value.code() == grpc.StatusCode.DATA_LOSS
    with pytest.raises(grpc.RpcError):  # a whole file, then a bad one: nothing is committed
        stub.PutFiles(put("d", [("good.bin", os.urandom(1000)), ("../bad", b"x")]))
    with pytest.raises(grpc.RpcError):  # the stream ends inside a file
        req = store_pb2.PutFilesRequest(dataset="d")
        req.chunks.add(path="cut.bin", size=100, data=b"x" * 10, last=False)
        stub.PutFiles(iter([req]))
    assert staging_files(server) == []
    assert blob_files(server.config.data_dir) == {}
    listing = stub.ListManifest(store_pb2.ListManifestRequest(dataset="d"))
    assert list(listing.files) == []


def test_cancelled_upload_leaves_no_staging_file(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    more = threading.Event()

    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        req = store_pb2.PutFilesRequest(dataset="d")
        req.chunks.add(path="big.bin", size=10_000_000, data=b"x" * 100_000)
        yield req
        more.wait(30)

    future = stub.PutFiles.future(requests())
    wait_for(lambda: staging_files(server) != [])
    future.cancel()
    more.set()
    wait_for(lambda: staging_files(server) == [])


# garbage collection ------------------------------------------------------------
def _kill_mid_upload(running: Running, orphan: bytes,
                     stored: Callable[[Path], Iterable[str]] = blob_files) -> None:
    """Send one whole file and part of another, then SIGKILL the server."""
    stub = running.store()
    hold = threading.Event()

    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        req = store_pb2.PutFilesRequest(dataset="d")
        req.chunks.add(path="orphan.bin", size=len(orphan), sha256=sha(orphan), data=orphan,
                       last=True)
        # past store.backend.inline_max_bytes: staged in a file, not in memory
        req.chunks.add(path="partial.bin", size=1_000_000, data=b"p" * 20_000)
        yield req
        hold.wait(30)

    future = stub.PutFiles.future(requests())
    data_dir = running.config.data_dir
    wait_for(lambda: sha(orphan) in stored(data_dir)
             and any((data_dir / "store" / "tmp").iterdir()))
    assert stop_process(running, signal.SIGKILL) == -signal.SIGKILL
    hold.set()
    with pytest.raises(grpc.RpcError):
        future.result(timeout=10)


def _kept_by_a_version_then_killed(data_dir: Path, kept: bytes, orphan: bytes,
                                   stored: Callable[[Path], Iterable[str]]) -> None:
    """A server stores ``kept`` only in a version, then dies mid-upload leaving ``orphan``."""
    running = spawn_server(data_dir)
    try:
        stub = running.store()
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
        stub.PutFiles(put("d", [("kept.bin", kept)]))
        stub.CommitVersion(store_pb2.CommitVersionRequest(dataset="d"))
        stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="d", paths=["kept.bin"]))
        _kill_mid_upload(running, orphan, stored)
    finally:
        stop_process(running, signal.SIGKILL)


def _read_from_the_version(running: Running, path: str) -> bytes:
    """A file's bytes in dataset d's (only) version."""
    version = running.store().ListVersions(
        store_pb2.ListVersionsRequest(dataset="d")).versions[0].id
    return b"".join(piece.data for resp in running.store().ReadFiles(
        store_pb2.ReadFilesRequest(dataset="d", version=version, paths=[path]))
        for piece in resp.files)


def test_orphans_of_a_killed_server_are_collected_by_gc_and_restart(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = tmp_path / "data"
    kept = b"kept" * 5000  # over store.backend.inline_max_bytes: blobs here are files
    _kept_by_a_version_then_killed(data_dir, kept, b"orphan-1" * 5000, blob_files)
    assert set(blob_files(data_dir)) == {sha(kept), sha(b"orphan-1" * 5000)}
    assert any((data_dir / "store" / "tmp").iterdir())

    gc = ["store", "gc", "--data", str(data_dir)]
    assert main([*gc, "--grace-minutes", "0", "--dry-run"]) == 0
    assert "would remove 1 unreferenced blob(s), 40000 bytes, and 1 staging" in \
        capsys.readouterr().out
    assert main(gc) == 0  # the default grace period keeps what was written just now
    assert "removed 0 unreferenced blob(s)" in capsys.readouterr().out
    assert len(blob_files(data_dir)) == 2
    assert main([*gc, "--grace-minutes", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 unreferenced blob(s), 40000 bytes, and 1 staging file(s)" in out
    assert "kept 1 referenced" in out  # by the version only
    assert set(blob_files(data_dir)) == {sha(kept)}
    assert not any((data_dir / "store" / "tmp").iterdir())

    # killed again; the restart collects (and tightens modes of an old data directory)
    running = spawn_server(data_dir)
    try:
        _kill_mid_upload(running, b"orphan-2" * 5000)
    finally:
        stop_process(running, signal.SIGKILL)
    assert len(blob_files(data_dir)) == 2
    os.chmod(blob_files(data_dir)[sha(kept)], 0o644)
    os.chmod(data_dir / "store" / "blobs", 0o755)
    running = spawn_server(data_dir)
    try:
        assert set(blob_files(data_dir)) == {sha(kept)}
        assert not any((data_dir / "store" / "tmp").iterdir())
        assert stat.S_IMODE(blob_files(data_dir)[sha(kept)].stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "store" / "blobs").stat().st_mode) == 0o700
        assert _read_from_the_version(running, "kept.bin") == kept
    finally:
        stop_process(running)


def test_small_blobs_kept_as_rows_are_collected_like_files(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rows (blobs under store.backend.inline_max_bytes) of a killed server: gc and restart."""
    data_dir = tmp_path / "data"
    kept, orphan = b"kept" * 100, b"orphan" * 100
    _kept_by_a_version_then_killed(data_dir, kept, orphan, small_rows)
    assert small_rows(data_dir) == {sha(kept): 400, sha(orphan): 600}
    assert blob_files(data_dir) == {}

    gc = ["store", "gc", "--data", str(data_dir)]
    assert main(gc) == 0  # the grace period keeps what was written just now
    assert "removed 0 unreferenced blob(s)" in capsys.readouterr().out
    assert main([*gc, "--grace-minutes", "0"]) == 0
    out = capsys.readouterr().out
    assert "removed 1 unreferenced blob(s), 600 bytes, and 1 staging file(s)" in out
    assert small_rows(data_dir) == {sha(kept): 400}

    running = spawn_server(data_dir)
    try:
        assert _read_from_the_version(running, "kept.bin") == kept
    finally:
        stop_process(running)


def test_gc_does_not_break_uploads_in_flight(server: Running, tmp_path: Path) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    store = local_store(server)
    # over store.backend.inline_max_bytes: files (rows: test_small_blobs_kept_as_rows_...)
    fresh, stale = b"fresh" * 4000, b"stale" * 4000
    # an unreferenced blob from long ago (a crash), which an upload is about to reuse
    old = store.blobs.backend.path_for(blob_key(sha(stale)))  # type: ignore[attr-defined]
    old.parent.mkdir(parents=True)
    old.write_bytes(stale)
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    hold = threading.Event()

    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        yield from put("d", [("fresh.bin", fresh), ("stale.bin", stale)])
        hold.wait(30)

    future = stub.PutFiles.future(requests())
    wait_for(lambda: sha(fresh) in blob_files(server.config.data_dir))
    wait_for(lambda: store._pinned[sha(stale)] > 0)
    # in the server: pins protect both, whatever the grace period
    report = store.collect_garbage(0)
    assert report.blobs_deleted == 0 and report.pinned == 2
    # another process sees no pins: the grace period protects both (the reused one was touched)
    other = open_store(ServiceContext(server.config))
    try:
        report = other.collect_garbage(60)
        assert report.blobs_deleted == 0 and report.recent == 2
    finally:
        other.close()
    hold.set()
    assert len(future.result(timeout=10).files) == 2
    assert store.collect_garbage(0).blobs_deleted == 0

    # a collector running all the time during an import loses nothing
    folder = tmp_path / "many"
    folder.mkdir()
    files = {f"{i:02d}.bin": os.urandom(20_000 + i) for i in range(40)}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    stop = threading.Event()
    deleted: list[int] = []

    def collect() -> None:
        while not stop.is_set():
            deleted.append(store.collect_garbage(0).blobs_deleted)

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        with Hub(server.address, server.admin_key, tmp_path / "cache",
                 show_progress=False) as hub:
            imported = hub.import_folder("d", folder)
            assert imported.uploaded == 40 and not imported.failed
    finally:
        stop.set()
        collector.join()
    assert sum(deleted) == 0
    with Hub(server.address, server.admin_key, tmp_path / "cache2", show_progress=False) as hub:
        for name, data in files.items():
            assert hub.get_file_bytes("d", name) == data


def test_store_gc_cli_refuses_a_directory_without_a_store(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["store", "gc", "--data", str(tmp_path)]) == 2
    assert "holds no store" in capsys.readouterr().err


# permissions (finding 10) ------------------------------------------------------------
def _exposed(root: Path) -> list[str]:
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if stat.S_IMODE(mode) & 0o077 and not stat.S_ISLNK(mode):
            found.append(f"{path.relative_to(root.parent)} {stat.S_IMODE(mode):o}")
    return found


def test_data_directory_is_private_to_the_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    running = spawn_server(data_dir)
    try:
        stub = running.store()
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
        stub.PutFiles(put("d", [("a.bin", os.urandom(5000))]))
        stub.CommitVersion(store_pb2.CommitVersionRequest(dataset="d"))
        assert _exposed(data_dir) == []  # -wal and -shm included while they exist
    finally:
        assert stop_process(running) == 0
    assert _exposed(data_dir) == []


def test_store_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        running = start_in_process(tmp_path / "data")
        try:
            stub = running.store()
            stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
            stub.PutFiles(put("d", [("a.bin", os.urandom(5000))]))
            assert stat.S_IMODE(running.config.data_dir.stat().st_mode) == 0o700
            assert _exposed(store_dir(running)) == []
        finally:
            assert running.server is not None
            running.server.stop(0)
    finally:
        os.umask(old)
