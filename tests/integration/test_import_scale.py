"""Import at scale: fsyncs batched per message, batches in flight, an incremental check.

No timing: the fsyncs of a PutFiles call, the RPCs of an import and the files
it hashes are counted.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import gristmill.client.hub as hub_module
import gristmill.store.fsobjects as blobs_module
from gristmill.client.folder import FolderScan, scan_folder, walk_folder
from gristmill.client.hub import Hub
from gristmill.store.blobs import BlobStore
from gristmill.store.catalog import Catalog
from gristmill.store.fsobjects import FsBackend
from gristmill.store.smallobjects import SmallObjects
from gristmill.store.store import Store
from gristmill.v1 import store_pb2
from tests.helpers import Running


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_store(root: Path, sync: blobs_module.SyncMethod = "fsync") -> Store:
    return Store(Catalog(root / "catalog.sqlite"), BlobStore(FsBackend(root, sync)),
                 read_message_bytes=4 << 20, read_chunk_bytes=1 << 20)


def one_message(dataset: str, files: dict[str, bytes]) -> Iterator[store_pb2.PutFilesRequest]:
    msg = store_pb2.PutFilesRequest(dataset=dataset)
    for path, data in files.items():
        msg.chunks.add(path=path, size=len(data), sha256=sha(data), data=data, last=True)
    yield msg


def make_folder(root: Path, n: int, size: int = 3000) -> dict[str, bytes]:
    """``n`` files in a few directories, their mtimes a minute old (not "racy")."""
    content = {f"d{i % 3}/f{i:03d}.bin": os.urandom(size + i) for i in range(n)}
    past = time.time() - 60
    for rel, data in content.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (past, past))
    return content


class CountingStub:
    """The Hub's store stub, counting the calls made through it (thread-safe)."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self.calls[name] += 1
            return method(*args, **kwargs)

        return call


# fsyncs batched per call ------------------------------------------------------
def test_put_files_fsyncs_each_file_and_each_directory_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path / "store")
    store.create_dataset("d")
    files = {f"f{i:02d}.bin": os.urandom(1000 + i) for i in range(40)}
    blob_dir = tmp_path / "store" / "blobs"
    fsyncs: list[int] = []
    real_fsync = os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    _, result = store.put_files(one_message("d", files))
    assert result.blobs_created == 40
    leaves = {(s[:2], s[2:4]) for s in map(sha, files.values())}
    firsts = {a for a, _ in leaves}
    # each file; each leaf directory that gained a blob; each new directory's
    # parent (blobs/ for the first level, the store's root for the new blobs/)
    assert len(fsyncs) == 40 + len(leaves) + len(firsts) + 2
    assert all(not p.name.endswith(".part") for p in blob_dir.rglob("*"))
    assert not any((tmp_path / "store" / "tmp").iterdir())

    # the same content again (deduplicated) and one new file: one file, its directories
    fsyncs.clear()
    more = {**files, "new.bin": b"new"}
    _, result = store.put_files(one_message("d", {f"again/{p}": d for p, d in more.items()}))
    assert result.blobs_created == 1
    new = sha(b"new")
    expected = 1 + 1 + ((new[:2], new[2:4]) not in leaves) + (new[:2] not in firsts)
    assert len(fsyncs) == expected
    store.close()


def test_put_files_with_syncfs_syncs_twice_per_message(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if blobs_module._syncfs_call() is None:
        pytest.skip("no syncfs on this system")
    store = open_store(tmp_path / "store", "syncfs")
    store.create_dataset("d")
    calls: list[int] = []
    real = blobs_module._syncfs_call()
    assert real is not None

    def counting(fd: int) -> int:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(blobs_module, "_SYNCFS", [counting])
    fsyncs: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    files = {f"f{i:02d}.bin": os.urandom(1000 + i) for i in range(40)}
    _, result = store.put_files(one_message("d", files))
    assert result.blobs_created == 40 and len(calls) == 2 and not fsyncs
    got = store.read_bytes("d", "latest", ["f07.bin"])["f07.bin"]
    assert got == files["f07.bin"]
    store.close()


def test_small_blobs_of_a_message_are_rows_of_one_transaction_not_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the message's size: one transaction, no file created, no fsync of ours."""
    root = tmp_path / "store"
    store = Store(Catalog(root / "catalog.sqlite"), BlobStore(FsBackend(root, "fsync", 4096)),
                  read_message_bytes=4 << 20, read_chunk_bytes=1 << 20)
    store.create_dataset("d")
    transactions: list[int] = []
    real_insert = SmallObjects.insert_new

    def counting_insert(self: SmallObjects, rows: Any) -> list[bool]:
        transactions.append(len(rows))
        return real_insert(self, rows)

    created: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_CREAT:
            created.append(str(path))
        return real_open(path, flags, *args, **kwargs)

    lookups: list[int] = []
    real_stats = SmallObjects.stats

    def counting_stats(self: SmallObjects, keys: Any) -> Any:
        lookups.append(len(keys))
        return real_stats(self, keys)

    fsyncs: list[int] = []
    monkeypatch.setattr(SmallObjects, "stats", counting_stats)
    monkeypatch.setattr(SmallObjects, "insert_new", counting_insert)
    monkeypatch.setattr(os, "open", counting_open)
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd))
    stored: dict[str, bytes] = {}
    for n in (100, 200):
        files = {f"{n}/f{i:03d}.bin": os.urandom(100 + i) for i in range(n)}
        stored.update(files)
        transactions.clear()
        _, result = store.put_files(one_message("d", files))
        assert result.blobs_created == n
        assert transactions == [n] and created == [] and fsyncs == []
        assert lookups == []  # staged in memory: no lookup per file (the commit checks)
    assert not [p for p in root.rglob("*") if p.is_file() and "blobs" in p.parts]
    # over the limit: a staging file, renamed into blobs/
    _, result = store.put_files(one_message("d", {"large.bin": b"L" * 5000}))
    assert result.blobs_created == 1 and len(created) == 1 and transactions == [n, 0]
    got = store.read_bytes("d", "latest", [*stored, "large.bin"])
    assert got == {**stored, "large.bin": b"L" * 5000}
    store.close()


def test_a_failed_call_stores_nothing_of_its_message(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    store.create_dataset("d")
    msg = store_pb2.PutFilesRequest(dataset="d")
    msg.chunks.add(path="ok.bin", size=3, sha256=sha(b"abc"), data=b"abc", last=True)
    msg.chunks.add(path="bad.bin", size=3, sha256=sha(b"xyz"), data=b"xyw", last=True)
    with pytest.raises(Exception, match="sha256"):
        store.put_files(iter([msg]))
    assert not any((tmp_path / "store" / "tmp").iterdir())
    assert not [p for p in (tmp_path / "store" / "blobs").rglob("*") if p.is_file()]
    store.close()


# the folder walk ------------------------------------------------------------------
def test_the_walk_streams_files_in_path_order(tmp_path: Path) -> None:
    for rel in ("a.txt", "a/b.txt", "a/c/d.txt", "a0.txt", "b/x.txt", "a-b.txt", ".git/x"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    scan = FolderScan()
    walked = [f.path for f in walk_folder(tmp_path, (), (), scan)]
    assert walked == sorted(walked) == [f.path for f in scan_folder(tmp_path).files]
    assert ".git/" in scan.ignored and not scan.files


def test_the_walk_stats_only_what_the_listing_does_not_say_is_a_regular_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(40):
        (tmp_path / "d" / f"f{i:02d}.bin").parent.mkdir(exist_ok=True)
        (tmp_path / "d" / f"f{i:02d}.bin").write_bytes(b"x")
    (tmp_path / "link.bin").symlink_to(tmp_path / "d" / "f00.bin")
    os.mkfifo(tmp_path / "pipe")
    looked: list[str] = []

    def counting(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def call(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            looked.append(os.fspath(path))
            return real(path, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "lstat", counting(os.lstat))  # Path.lstat is os.stat's
    monkeypatch.setattr(os, "stat", counting(os.stat))
    scan = FolderScan()
    walked = [f.path for f in walk_folder(tmp_path, (), (), scan)]
    assert len(walked) == 41 and "link.bin" in walked  # a link inside the folder is followed
    # 40 regular files, no lstat each (f00.bin only as the link's target, resolving it)
    assert [p for p in looked if "/d/" in p and not p.endswith("f00.bin")] == []
    assert any(p.endswith("link.bin") for p in looked)
    assert [rel for rel, _ in scan.failed] == ["pipe"]


# concurrent and incremental import ----------------------------------------------
@pytest.mark.parametrize("large", [0, hub_module.IMPORT_LARGE_FILE_BYTES],
                         ids=["side-by-side", "small-one-at-a-time"])
def test_concurrent_import_stores_what_a_serial_one_does(
        server: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, large: int) -> None:
    src = tmp_path / "src"
    content = make_folder(src, 60)
    (src / "d0" / "dup.bin").write_bytes(content["d1/f001.bin"])  # deduplicated across batches
    monkeypatch.setattr(hub_module, "IMPORT_BATCH_FILES", 7)
    monkeypatch.setattr(hub_module, "IMPORT_LARGE_FILE_BYTES", large)
    lock = threading.Lock()
    now = [0]
    most = [0]
    original = Hub._put_batch

    def put_batch(self: Hub, *args: Any) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.05)  # long enough for another batch to start, if one may
            original(self, *args)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(Hub, "_put_batch", put_batch)
    manifests = {}
    for name, workers in (("serial", 1), ("parallel", 4)):
        most[0] = 0
        with Hub(server.address, server.admin_key, tmp_path / f"cache-{name}", workers=workers,
                 show_progress=False) as hub:
            report = hub.import_folder(name, src)
            assert report.uploaded + report.reused == 61 and not report.failed
            manifests[name] = [(e.path, e.size, e.sha256, e.media_type)
                               for e in hub.get_manifest(name, refresh=True).files]
            version = hub.commit_version(name).id
            manifests[f"{name}-version"] = [(version, 0, "", "")]
    assert manifests["serial"] == manifests["parallel"]
    assert len(manifests["serial"]) == 61
    assert manifests["serial-version"] == manifests["parallel-version"]
    # small files (under IMPORT_LARGE_FILE_BYTES on average) go one PutFiles call at a time
    assert most[0] > 1 if large == 0 else most[0] == 1


def test_reimport_of_an_unchanged_folder_hashes_nothing_and_sends_no_bytes(
        server: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    content = make_folder(src, 50)
    monkeypatch.setattr(hub_module, "IMPORT_BATCH_FILES", 10)
    hashed: list[Path] = []
    original = hub_module._sha256_file

    def hashing(path: Path) -> tuple[str, int]:
        hashed.append(path)
        return original(path)

    monkeypatch.setattr(hub_module, "_sha256_file", hashing)
    cache = tmp_path / "cache"
    with Hub(server.address, server.admin_key, cache, show_progress=False) as hub:
        first = hub.import_folder("r", src)
        assert first.uploaded == 50 and len(hashed) == 50
        index = cache / hub_module.IMPORT_HASHES
        assert stat.S_IMODE(index.stat().st_mode) == 0o600

        hashed.clear()
        stub = CountingStub(hub._stub)
        hub._stub = stub  # type: ignore[assignment]
        again = hub.import_folder("r", src)
        assert again.skipped == 50 and again.uploaded == again.reused == 0
        assert hashed == []
        # the dataset's existence, one check per batch of 10 files; no manifest, no upload
        assert stub.calls == Counter({"GetDataset": 1, "FindFiles": 5})

        # a changed file (same size, new content, new mtime) is read and sent again
        changed = src / "d1" / "f004.bin"
        changed.write_bytes(os.urandom(len(content["d1/f004.bin"])))
        os.utime(changed, (time.time() - 30, time.time() - 30))
        stub.calls.clear()
        third = hub.import_folder("r", src)
        assert third.uploaded == 1 and third.skipped == 49
        assert hashed == [changed]
        assert stub.calls == Counter({"GetDataset": 1, "FindFiles": 5, "PutFiles": 1})
        assert hub.get_file_bytes("r", "d1/f004.bin") == changed.read_bytes()

        # rehash=True reads every file again, and still sends nothing
        hashed.clear()
        assert hub.import_folder("r", src, rehash=True).skipped == 50
        assert len(hashed) == 50


def test_files_written_just_now_are_not_remembered(
        server: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file modified in the second before it was read is read again next time."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "fresh.bin").write_bytes(b"fresh")
    hashed: list[Path] = []
    original = hub_module._sha256_file

    def hashing(path: Path) -> tuple[str, int]:
        hashed.append(path)
        return original(path)

    monkeypatch.setattr(hub_module, "_sha256_file", hashing)
    with Hub(server.address, server.admin_key, tmp_path / "cache", show_progress=False) as hub:
        hub.import_folder("fresh", src)
        hub.import_folder("fresh", src)
    assert len(hashed) == 2


def test_find_files(server: Running) -> None:
    stub = server.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="f"))
    stub.PutFiles(one_message("f", {"a.bin": b"aaa", "b.bin": b"bbb"}))
    ref = store_pb2.FileRef
    resp = stub.FindFiles(store_pb2.FindFilesRequest(dataset="f", files=[
        ref(path="a.bin", size=3, sha256=sha(b"aaa")),       # present
        ref(path="b.bin", size=3, sha256=sha(b"ccc")),       # other content: not present
        ref(path="c.bin", size=3, sha256=sha(b"bbb")),       # new path, blob stored
        ref(path="d.bin", size=3, sha256=sha(b"ddd"))]))     # new everything
    assert list(resp.present) == ["a.bin"]
    assert list(resp.stored) == [sha(b"bbb")]
