"""The Hub's disk cache: byte accounting, freshness of "latest", store ids, LRU limit, CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import unicodedata
import zlib
from pathlib import Path

import grpc
import pytest

import gristmill.client.cache as cache_module
from gristmill.cli.main import main
from gristmill.client.errors import InvalidArgument, Unavailable
from gristmill.client.hub import Hub
from gristmill.common.server import create_server
from gristmill.v1 import store_pb2
from tests.helpers import Running, both_backends, start_in_process

# the server-based tests run on both store backends
storage = both_backends()


def files(folder: Path, sizes: dict[str, int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, size in sizes.items():
        (folder / name).write_bytes(os.urandom(size))
    return folder


def test_clear_after_a_dataset_clear_reports_what_it_freed(hub: Hub, tmp_path: Path) -> None:
    hub.import_folder("a", files(tmp_path / "a", {"x.bin": 3000, "y.bin": 4000}))
    hub.import_folder("b", files(tmp_path / "b", {"z.bin": 5000}))
    hub.download_dataset("a")
    hub.download_dataset("b")
    assert hub.get_cache_size("a") == 7000 and hub.get_cache_size("b") == 5000
    assert hub.get_cache_size() == 12000  # files only: the index is not "cache"
    assert hub.clear_cache("a") == 7000
    assert hub.get_cache_size() == 5000
    assert hub.clear_cache() == 5000  # was -8240 (the index's WAL grew by two pages)
    assert hub.clear_cache() == 0
    assert hub.get_cache_size() == 0


def test_latest_is_checked_against_the_current_manifest(server: Running, hub: Hub,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"first")
    hub.import_folder("fresh", src)
    assert hub.get_file("fresh", "a.txt").read_bytes() == b"first"
    (src / "a.txt").write_bytes(b"second, longer")
    with Hub(server.address, server.admin_key, tmp_path / "other", show_progress=False) as w:
        w.import_folder("fresh", src)
    assert hub.get_file("fresh", "a.txt").read_bytes() == b"second, longer"  # same Hub
    (src / "a.txt").write_bytes(b"third!")  # same size as nothing before: the hash decides
    with Hub(server.address, server.admin_key, tmp_path / "other", show_progress=False) as w:
        w.import_folder("fresh", src)
    with Hub(server.address, server.admin_key, tmp_path / "cache", show_progress=False) as new:
        assert new.get_file("fresh", "a.txt").read_bytes() == b"third!"
    assert hub.get_file_bytes("fresh", "a.txt") == b"third!"


def test_the_store_reports_a_persistent_id(tmp_path: Path) -> None:
    first = start_in_process(tmp_path / "d1")
    other = start_in_process(tmp_path / "d2")
    try:
        ids = [r.store().GetStoreInfo(store_pb2.GetStoreInfoRequest()).store_id
               for r in (first, other)]
        assert len(ids[0]) == 32 and int(ids[0], 16) >= 0 and ids[0] != ids[1]
        assert first.server is not None
        first.server.stop(0)
        server, port = create_server(first.config)  # the same data directory again
        server.start()
        again = Running(f"127.0.0.1:{port}", first.config, first.admin_key, server=server)
        try:
            assert again.store().GetStoreInfo(
                store_pb2.GetStoreInfoRequest()).store_id == ids[0]
            with pytest.raises(grpc.RpcError) as info:
                again.store(None).GetStoreInfo(store_pb2.GetStoreInfoRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            server.stop(0)
    finally:
        assert other.server is not None
        other.server.stop(0)


def test_cache_is_keyed_by_store_not_by_address(server: Running, hub: Hub,
                                                tmp_path: Path) -> None:
    hub.import_folder("k", files(tmp_path / "k", {"a.bin": 1000}))
    first = hub.get_file("k", "a.bin")
    stamp = first.stat().st_mtime_ns
    port = server.address.rsplit(":", 1)[1]
    with Hub(f"localhost:{port}", server.admin_key, tmp_path / "cache",
             show_progress=False) as other:
        again = other.get_file("k", "a.bin")
        assert again == first and again.stat().st_mtime_ns == stamp  # not downloaded twice
        assert other.cache is not None and hub.cache is not None
        assert other.cache.root == hub.cache.root
        assert other.store_id() == hub.store_id() == other.cache.root.name
    stores = {p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()}
    assert stores == {hub.store_id()}  # files beside it: the cache index, import hashes


def test_a_failed_call_creates_no_directory(tmp_path: Path) -> None:
    cache = tmp_path / "never"
    with Hub("127.0.0.1:1", None, cache, show_progress=False) as hub:
        with pytest.raises(Unavailable):
            hub.get_file("ds", "a.txt")
        with pytest.raises(Unavailable):
            hub.download_dataset("ds")
        assert hub.get_cache_size() == 0 and hub.clear_cache() == 0
    assert not cache.exists()


def test_lru_eviction_keeps_the_cache_under_its_limit(server: Running, tmp_path: Path) -> None:
    sizes = {f"f{i}.bin": 1000 for i in range(5)}
    src = files(tmp_path / "src", sizes)
    with Hub(server.address, server.admin_key, tmp_path / "cache", show_progress=False,
             cache_limit=3500) as hub:
        hub.import_folder("lru", src)
        for name in ("f0.bin", "f1.bin", "f2.bin"):
            hub.get_file("lru", name)
        hub.get_file("lru", "f0.bin")  # f0 used again: f1 is now the least recently used
        hub.get_file("lru", "f3.bin")
        cached = sorted(p.name for p in hub.get_file("lru", "f3.bin").parent.iterdir()
                        if not p.name.startswith("."))
        assert cached == ["f0.bin", "f2.bin", "f3.bin"]
        assert hub.get_cache_size() <= 3500
        # a download keeps every file it returns; too much for the limit is refused up front
        paths = hub.download_dataset("lru", ["f1.bin", "f4.bin", "f0.bin"])
        assert all(p.exists() for p in paths) and hub.get_cache_size() <= 3500
        with pytest.raises(InvalidArgument, match="cache_limit"):
            hub.download_dataset("lru")
        assert all(p.exists() for p in paths)
    with Hub(server.address, server.admin_key, tmp_path / "small", show_progress=False,
             cache_limit=500) as tiny:
        with pytest.raises(InvalidArgument, match="cache_limit"):
            tiny.get_file("lru", "f0.bin")
        assert tiny.get_file_bytes("lru", "f0.bin") == (src / "f0.bin").read_bytes()
    with pytest.raises(InvalidArgument, match="cache_limit"):
        Hub(server.address, server.admin_key, tmp_path / "c", cache_limit=-1)


def test_manifest_is_iterable_and_sized(hub: Hub, tmp_path: Path) -> None:
    hub.import_folder("m", files(tmp_path / "m", {"a.bin": 10, "b.bin": 20}))
    m = hub.get_manifest("m")
    assert len(m) == 2 and [e.path for e in m] == ["a.bin", "b.bin"]
    assert [e.path for e in m.files] == ["a.bin", "b.bin"]
    assert m.dataset == "m" and m.version == "latest" and m[1].size == 20
    assert isinstance(m.message, store_pb2.Manifest)
    v = hub.commit_version("m")
    pinned = hub.get_manifest("m", v.id)
    assert len(pinned) == 2 and pinned.version == v.id
    assert len(hub.get_manifest("m", v.id)) == 2  # from the disk cache


def test_cli_cache_info_and_clear(server: Running, hub: Hub, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hub.import_folder("c1", files(tmp_path / "c1", {"a.bin": 2000}))
    hub.import_folder("c2", files(tmp_path / "c2", {"b.bin": 3000}))
    hub.download_dataset("c1")
    hub.download_dataset("c2")
    monkeypatch.setenv("GRISTMILL_ADDRESS", "127.0.0.1:1")  # info and clear need no server
    cache = ["--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert main(["cache", "info", *cache]) == 0
    out = capsys.readouterr().out
    assert hub.store_id() in out and "c1" in out and "c2" in out and server.address in out
    assert main(["cache", "info", "--json", *cache]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes"] == 5000 and info["stores"][0]["datasets"]["c2"]["bytes"] == 3000
    assert main(["cache", "clear", "c1", *cache]) == 0
    assert "freed 2000 bytes" in capsys.readouterr().out
    assert hub.get_cache_size("c1") == 0 and hub.get_cache_size("c2") == 3000
    assert main(["cache", "clear", "../x", *cache]) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert main(["cache", "clear", *cache]) == 0
    assert hub.get_cache_size() == 0
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "none")]) == 0
    assert "empty" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_a_whole_cached_dataset_comes_back_without_a_check_per_file(
        server: Running, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_NS", 0)  # folders changed just now: trusted here
    src = files(tmp_path / "src", {"a.bin": 100, "b.bin": 200})
    files(src / "sub", {"c.bin": 300})
    hub.import_folder("whole", src)
    first = hub.download_dataset("whole")
    assert hub.cache is not None
    checks: list[str] = []
    real_on_disk = hub.cache.on_disk

    def on_disk(dataset: str, path: str, size: int) -> Path | None:
        checks.append(path)
        return real_on_disk(dataset, path, size)

    monkeypatch.setattr(hub.cache, "on_disk", on_disk)
    assert hub.download_dataset("whole") == first and checks == []  # remembered complete
    # a file edited in place by hand is not seen (its folder did not change) ...
    first[0].write_bytes(b"x" * 100)
    assert hub.download_dataset("whole") == first and checks == []
    # ... until verify=True checks each file (the size matches: the index decides)
    assert hub.download_dataset("whole", verify=True) == first and len(checks) == 3
    # a file deleted by hand changes its folder: noticed, checked and fetched again
    checks.clear()
    first[2].unlink()
    assert hub.download_dataset("whole") == first and len(checks) == 3
    assert first[2].read_bytes() == (src / "sub" / "c.bin").read_bytes()
    checks.clear()
    assert hub.download_dataset("whole") == first and checks == []
    # anything leaving the index (another dataset cleared) makes every record stale
    hub.import_folder("other", files(tmp_path / "o", {"o.bin": 10}))
    hub.download_dataset("other")
    hub.clear_cache("other")
    assert hub.download_dataset("whole") == first and len(checks) == 3
    # a new head: another manifest, checked file by file, with the new file
    checks.clear()
    files(src, {"d.bin": 50})
    hub.import_folder("whole", src)
    again = hub.download_dataset("whole")
    assert len(again) == 4 and sorted(checks) == ["a.bin", "b.bin", "sub/c.bin"]
    assert again[2].read_bytes() == (src / "d.bin").read_bytes()
    # a subset or a copy to dest is always checked
    checks.clear()
    hub.download_dataset("whole", ["a.bin"])
    assert checks == ["a.bin"]


def test_a_record_is_not_trusted_right_after_its_folders_changed(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a deletion in the same clock tick as the last write leaves the folder's time as
    # it was: a record is trusted only once its folders are older than RACY_NS
    monkeypatch.setattr(cache_module, "RACY_NS", 300_000_000)
    hub.import_folder("racy", files(tmp_path / "src", {"a.bin": 10, "b.bin": 20}))
    first = hub.download_dataset("racy")
    assert hub.cache is not None
    digest = hub.get_manifest("racy", refresh=True).digest
    assert not hub.cache.complete("racy", digest, 2)  # made in the tick of the download
    time.sleep(0.35)
    assert hub.download_dataset("racy") == first  # checked file by file, recorded again
    assert hub.cache.complete("racy", digest, 2)


def test_no_record_when_a_file_is_missing_at_the_end(hub: Hub, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    hub.import_folder("gone", files(tmp_path / "src", {"a.bin": 10, "b.bin": 20}))
    first = hub.download_dataset("gone")
    assert hub.cache is not None
    digest = hub.get_manifest("gone", refresh=True).digest
    assert hub.cache.complete("gone", digest, 2)
    generation = hub.cache.generation()
    first[1].unlink()  # deleted by hand between the download's checks and its record
    hub.cache._db.execute("DELETE FROM cache_whole")
    hub.cache.mark_complete("gone", digest, [("a.bin", 10), ("b.bin", 20)], generation)
    assert not hub.cache.complete("gone", digest, 2)
    assert hub.download_dataset("gone") == first and first[1].stat().st_size == 20


def test_a_whole_download_of_names_stored_before_nfc(server: Running, hub: Hub,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # a store keeps names stored before it normalised them (NFD here); the cache
    # names files in NFC, and the remembered whole download must name them alike
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    hub.import_folder("nfd", files(tmp_path / "src", {"plain.bin": 10}))
    stored = hub.get_manifest("nfd", refresh=True).files[0]
    assert server.server is not None
    store = server.server.context.local["store"]
    decomposed = "cafe\u0301/\u00e9te\u0301.bin"
    store.catalog.add_files("nfd", [store_pb2.FileEntry(
        path=decomposed, sha256=stored.sha256, size=stored.size, media_type="text/plain")])
    first = hub.download_dataset("nfd")
    assert all(p.is_file() for p in first)
    assert hub.download_dataset("nfd") == first  # the remembered record: same names
    assert unicodedata.normalize("NFC", decomposed) in {
        p.relative_to(hub.cache.dataset_dir("nfd")).as_posix()  # type: ignore[union-attr]
        for p in first}


def test_a_complete_record_from_a_tampered_index_is_not_trusted(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    src = files(tmp_path / "src", {"a.bin": 100})
    hub.import_folder("t", src)
    first = hub.download_dataset("t")
    assert hub.cache is not None
    manifest = hub.get_manifest("t", refresh=True)
    assert hub.cache.complete("t", manifest.digest, 1)
    for folders in (b"not zlib", zlib.compress(b'[["../", 1]]'),
                    zlib.compress(b"[" * 100_000), zlib.compress(b"0" * (70 << 20))):
        hub.cache._db.execute("UPDATE cache_whole SET folders = ?", [folders])
        assert not hub.cache.complete("t", manifest.digest, 1)
        assert hub.download_dataset("t") == first  # checked file by file, and recorded again
        assert hub.cache.complete("t", manifest.digest, 1)


def test_an_unusable_whole_download_record_never_fails_a_download(
        hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the record is a shortcut: when its table cannot be read or written (here another
    # client dropped it), downloads check every file and still succeed
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    hub.import_folder("shortcut", files(tmp_path / "src", {"a.bin": 10, "b.bin": 20}))
    assert hub.cache is not None
    with sqlite3.connect(hub.cache.top / "index.sqlite") as other:
        other.execute("DROP TABLE cache_whole")
    first = hub.download_dataset("shortcut")  # the record cannot be written
    assert [p.stat().st_size for p in first] == [10, 20]
    assert hub.download_dataset("shortcut") == first  # nor read: checked file by file
    assert not hub.cache.complete("shortcut", hub.get_manifest("shortcut").digest, 2)
