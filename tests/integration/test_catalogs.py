"""The store's catalogs: one conformance suite for SQLite and the Ceph pool, and replicas.

`CatalogTests` runs the same tests against every catalog (zarr's StoreTests
pattern, as `test_backends.py` does for object backends): the SQLite catalog
(`Catalog`) and the catalog kept in a Ceph pool (`PoolCatalog`). The rest
checks what a shared catalog is for: two store replicas on one pool and
namespace see one store, concurrent writers lose nothing, and garbage
collection by one replica never removes what another refers to.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import REGISTRY

from gristmill.cli.main import main
from gristmill.client.errors import FailedPrecondition
from gristmill.client.hub import Hub
from gristmill.common.service import ServiceContext
from gristmill.store.blobs import blob_key
from gristmill.store.catalog import Catalog, CatalogApi
from gristmill.store.ceph import CephBackend
from gristmill.store.config import CephBackendConfig
from gristmill.store.migrate import migrate_catalog
from gristmill.store.poolcatalog import PoolCatalog
from gristmill.store.service import open_store
from gristmill.store.store import Store
from gristmill.v1 import store_pb2
from tests.ceph import CephCluster
from tests.helpers import Running, ceph_backend, config_for, start_in_process


def entry(path: str, size: int = 10, sha: str | None = None, width: int = 0
          ) -> store_pb2.FileEntry:
    e = store_pb2.FileEntry(path=path, size=size,
                            sha256=sha or hashlib.sha256(path.encode()).hexdigest(),
                            media_type="image/png" if width else "application/octet-stream")
    if width:
        e.image.CopyFrom(store_pb2.ImageInfo(width=width, height=width // 2, format="PNG",
                                             orientation=1))
    return e


def canonical_id(entries: list[store_pb2.FileEntry]) -> str:
    """A version's id as the store defines it (docs/store.md)."""
    text = "".join(f"{e.path}\t{e.size}\t{e.sha256}\n" for e in sorted(entries,
                                                                      key=lambda e: e.path))
    return hashlib.sha256(text.encode()).hexdigest()


class CatalogTests:
    """What every catalog does; subclasses provide the `catalog` fixture."""

    @pytest.fixture
    def catalog(self, tmp_path: Path) -> Iterator[CatalogApi]:
        raise NotImplementedError

    def test_datasets_are_created_once_listed_by_name_and_deleted(self, catalog: CatalogApi
                                                                  ) -> None:
        assert catalog.create_dataset("b", "second")
        assert catalog.create_dataset("a", "first")
        assert not catalog.create_dataset("a", "again")
        assert catalog.exists("a") and not catalog.exists("c")
        assert [d.name for d in catalog.datasets(None, 10)] == ["a", "b"]
        assert [d.name for d in catalog.datasets("a", 10)] == ["b"]
        assert [d.name for d in catalog.datasets(None, 1)] == ["a"]
        row = catalog.dataset("a")
        assert row is not None and row.description == "first" and row.file_count == 0
        catalog.delete_dataset("a")
        assert catalog.dataset("a") is None
        assert [d.name for d in catalog.datasets(None, 10)] == ["b"]

    def test_counts_follow_adds_replacements_and_deletes(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry(f"f{i}", 100 + i) for i in range(50)])
        catalog.add_files("d", [entry("f0", 1000), entry("new", 5)])  # one replaced, one new
        row = catalog.dataset("d")
        assert row is not None
        assert row.file_count == 51
        assert row.total_bytes == sum(100 + i for i in range(1, 50)) + 1000 + 5
        deleted, _ = catalog.delete_files("d", ["f1", "f2", "absent"])
        assert deleted == 2
        assert catalog.counts_of("d", "latest") == (49, row.total_bytes - 101 - 102)

    def test_entries_are_sorted_as_utf8_bytes_and_paged_with_prefixes(
            self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        paths = ["a/1", "a/2", "a/10", "ab", "b/x", "é/1", "z", "日本/1", "a/é"]
        catalog.add_files("d", [entry(p) for p in paths])
        want = sorted(paths, key=lambda p: p.encode())
        assert [e.path for e in catalog.entries("d", "latest")] == want
        assert [e.path for e in catalog.entries("d", "latest", limit=3)] == want[:3]
        assert [e.path for e in catalog.entries("d", "latest", after=want[2], limit=3)
                ] == want[3:6]
        assert [e.path for e in catalog.entries("d", "latest", prefix="a/")] == [
            p for p in want if p.startswith("a/")]
        assert [e.path for e in catalog.entries("d", "latest", prefix="a/", after="a/2")] == [
            p for p in want if p.startswith("a/") and p.encode() > b"a/2"]
        found = catalog.lookup("d", "latest", ["a/1", "nope", "日本/1"])
        assert sorted(found) == ["a/1", "日本/1"]
        assert found["a/1"] == entry("a/1")

    def test_image_columns_and_head_pages(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry("img/a.png", 7, width=40), entry("img/b.bin", 8),
                                entry("other/c.png", 9, width=20)])
        assert catalog.image_columns("d", "latest", "img/") == [("img/a.png", 1, 40, 20, 7)]
        assert catalog.image_columns("d", "latest", "", images_only=False) == [
            ("img/a.png", 1, 40, 20, 7), ("img/b.bin", 0, 0, 0, 8),
            ("other/c.png", 1, 20, 10, 9)]
        with catalog.head_pages("d") as head:
            assert head is not None
            key, pages = head
            rows = [r for page in pages for r in page]
        assert [r[0] for r in rows] == ["img/a.png", "img/b.bin", "other/c.png"]
        assert key[2:] == (3, 24)
        catalog.add_files("d", [entry("img/d.png", 1)])
        with catalog.head_pages("d") as head:
            assert head is not None and head[0] != key and head[0][1] > key[1]
        with catalog.head_pages("absent") as head:
            assert head is None

    def test_versions_freeze_the_head_and_page_newest_first(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        first = [entry(f"f{i}", i + 1) for i in range(30)]
        catalog.add_files("d", first)
        v1, created = catalog.commit_version("d")
        assert created and v1.id == canonical_id(first) and v1.file_count == 30
        again, created = catalog.commit_version("d")
        assert not created and again.id == v1.id
        catalog.add_files("d", [entry("late", 99)])
        v2, _ = catalog.commit_version("d")
        assert [e.path for e in catalog.entries("d", v1.id)] == sorted(e.path for e in first)
        assert "late" in catalog.lookup("d", v2.id, ["late"])
        assert "late" not in catalog.lookup("d", v1.id, ["late"])
        assert catalog.counts_of("d", v1.id) == (30, sum(range(1, 31)))
        assert catalog.counts_of("d", "0" * 64) is None
        assert [v.id for v in catalog.versions("d", None, 10)] == [v2.id, v1.id]
        page = catalog.versions("d", None, 1)
        assert [v.id for v in catalog.versions("d", f"{page[0].created}|{page[0].id}", 10)
                ] == [v1.id]
        assert catalog.resolve_version("d", v1.id[:8]) == v1.id
        assert catalog.resolve_version("d", v1.id[:7]) is None
        assert catalog.resolve_version("d", "f" * 12) is None
        row = catalog.dataset("d")
        assert row is not None and row.latest_version == v2.id
        with catalog.version_pages("d", v1.id) as pages:
            assert len([r for p in pages for r in p]) == 30

    def test_a_name_deleted_and_created_again_is_a_new_dataset(self, catalog: CatalogApi
                                                               ) -> None:
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry("x")])
        catalog.commit_version("d")
        catalog.delete_dataset("d")
        catalog.create_dataset("d", "")
        assert catalog.entries("d", "latest") == []
        assert catalog.versions("d", None, 10) == []
        assert catalog.counts_of("d", "latest") == (0, 0)

    def test_concurrent_writers_lose_no_file_and_no_byte(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        errors: list[BaseException] = []

        def write(worker: int) -> None:
            try:
                for batch in range(5):
                    catalog.add_files("d", [entry(f"w{worker}/{batch}/{i}", worker + 1)
                                            for i in range(20)])
                    # every worker also rewrites shared paths: their counts must not drift
                    catalog.add_files("d", [entry(f"shared/{i}", worker + 1) for i in range(5)])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        entries = catalog.entries("d", "latest")
        assert len(entries) == 4 * 5 * 20 + 5
        assert catalog.counts_of("d", "latest") == (len(entries), sum(e.size for e in entries))


class TestSqliteCatalog(CatalogTests):
    @pytest.fixture
    def catalog(self, tmp_path: Path) -> Iterator[CatalogApi]:
        c = Catalog(tmp_path / "catalog.sqlite")
        yield c
        c.close()


def _pool_backend(cluster: CephCluster, namespace: str) -> CephBackend:
    return CephBackend(CephBackendConfig(conf=cluster.conf, pool=cluster.pool,
                                         namespace=namespace, timeout_seconds=5))


class TestPoolCatalog(CatalogTests):
    @pytest.fixture
    def catalog(self, tmp_path: Path, ceph_cluster: CephCluster) -> Iterator[CatalogApi]:
        backend = _pool_backend(ceph_cluster, f"t{os.urandom(8).hex()}")
        yield PoolCatalog(backend, tmp_path / "catalog", shards=4)
        backend.close()

    def test_a_head_is_spread_over_its_shards(self, catalog: CatalogApi) -> None:
        assert isinstance(catalog, PoolCatalog)
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry(f"f{i}") for i in range(200)])
        rec = catalog._record("d")
        assert rec is not None and rec.shards == 4
        sizes = [len(list(catalog._scan(rec.head(k)))) for k in range(4)]
        assert sum(sizes) == 200 and min(sizes) > 20  # crc32 spreads them

    def test_a_commit_racing_uploads_freezes_one_instant(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry(f"base/{i}") for i in range(300)])
        stop = threading.Event()

        def upload() -> None:
            n = 0
            while not stop.is_set():
                catalog.add_files("d", [entry(f"live/{n}/{i}") for i in range(10)])
                n += 1
        writer = threading.Thread(target=upload)
        writer.start()
        try:
            versions = [catalog.commit_version("d")[0] for _ in range(3)]
        finally:
            stop.set()
            writer.join()
        for v in versions:
            files = catalog.entries("d", v.id)
            # the id is the hash of exactly the files it holds, and its counts are theirs
            assert v.id == canonical_id(files)
            assert (v.file_count, v.total_bytes) == (len(files), sum(e.size for e in files))
            paths = {e.path for e in files}
            assert paths >= {f"base/{i}" for i in range(300)}
            # a commit waits for the uploads in flight: each call's ten files, all or none
            calls = {p.split("/")[1] for p in paths if p.startswith("live/")}
            for n in calls:
                assert {f"live/{n}/{i}" for i in range(10)} <= paths, n

    def test_a_commit_waits_for_writers_and_writers_for_a_commit(self, catalog: CatalogApi
                                                                 ) -> None:
        assert isinstance(catalog, PoolCatalog)
        catalog.create_dataset("d", "")
        rec = catalog._record("d")
        assert rec is not None
        order: list[str] = []
        with catalog._writing(rec, "test"):  # a writer in: the commit waits for it
            committing = threading.Thread(target=lambda: order.append(
                catalog.commit_version("d")[0].id))
            committing.start()
            time.sleep(0.3)
            order.append("writer done")
            catalog._add(rec, {"x": entry("x")}, "test")
        committing.join(10)
        assert order[0] == "writer done" and order[1] == canonical_id([entry("x")])
        # a commit holds the dataset: a writer waits for it, and a lapsed writer does not block
        lease = "someone 1.0"  # lapsed long ago (a crashed writer)
        catalog._write(rec.lock, "test", {"w:someone": lease.encode()})
        held = f"commit {time.time() + 0.5:.3f}"
        catalog._write(rec.lock, "test", {"c": held.encode()})
        waits = REGISTRY.get_sample_value("gristmill_store_catalog_waits_total",
                                          {"reason": "lease"}) or 0.0
        t0 = time.monotonic()
        catalog.add_files("d", [entry("y")])
        assert time.monotonic() - t0 >= 0.4  # waited until the commit's lease lapsed
        assert (REGISTRY.get_sample_value("gristmill_store_catalog_waits_total",
                                          {"reason": "lease"}) or 0.0) > waits  # and says so
        v, created = catalog.commit_version("d")  # the lapsed writer is ignored
        assert created and v.file_count == 2

    def test_a_crashed_commit_leaves_no_version_and_its_copy_goes_with_the_dataset(
            self, catalog: CatalogApi) -> None:
        assert isinstance(catalog, PoolCatalog)
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry("x")])
        rec = catalog._record("d")
        assert rec is not None
        # what a commit that died while copying leaves: its named copy, no record
        vid = canonical_id([entry("x")])
        catalog._write(rec.versions, "test", {"a:dead": vid.encode()})
        copy = rec.version(vid, "dead", rec.shard_of("x"))
        catalog._write(copy, "test", {"x": b'["",1,"",null,null,null,null]'})
        assert catalog.versions("d", None, 10) == [] and catalog.entries("d", vid) == []
        v, created = catalog.commit_version("d")  # a later commit makes its own copy
        assert created and v.id == vid and [e.path for e in catalog.entries("d", vid)] == ["x"]
        catalog.delete_dataset("d")
        assert catalog._read(copy)[1] is None

    def test_missing_versions_read_as_nothing(self, catalog: CatalogApi) -> None:
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry("x")])
        assert catalog.lookup("d", "0" * 64, ["x"]) == {}
        assert catalog.entries("d", "0" * 64) == []

    def test_a_delete_cut_short_is_finished_by_garbage_collection(self, catalog: CatalogApi
                                                                  ) -> None:
        assert isinstance(catalog, PoolCatalog)
        catalog.create_dataset("d", "")
        catalog.add_files("d", [entry("x")])
        catalog.commit_version("d")
        rec = catalog._record("d")
        assert rec is not None
        # the first step of a delete only (its record moved to the trash), as a crash leaves it
        moved = catalog._write("~cat/datasets", "test", {"t:" + rec.uid: b'{"name":"d",'
                                                         b'"shards":4}'}, ["d:d"])
        assert moved and not catalog.exists("d")
        assert list(catalog._scan(rec.head(rec.shard_of("x"))))  # still there
        with catalog.collection(dry_run=True):  # a dry run changes nothing
            pass
        assert list(catalog._scan(rec.head(rec.shard_of("x"))))
        with catalog.collection():
            pass
        assert all(catalog._read(rec.head(k))[1] is None for k in range(rec.shards))
        assert catalog._read(rec.versions)[1] is None
        assert all(catalog._read(oid)[1] is None for oid in catalog._objects(rec, "latest"))
        assert catalog._read("~cat/datasets", prefix="t:")[0] == []


# -- replicas: two stores on one pool and namespace -----------------------------------------
@pytest.fixture
def replicas(tmp_path: Path, ceph_cluster: CephCluster) -> Iterator[tuple[Running, Running]]:
    backend = ceph_backend(ceph_cluster)  # one namespace for both
    one = start_in_process(tmp_path / "one", store={"backend": backend, "gc_on_start": False})
    two = start_in_process(tmp_path / "two", store={"backend": backend, "gc_on_start": False})
    yield one, two
    for r in (one, two):
        assert r.server is not None
        r.server.stop(0)


def hub_of(running: Running) -> Hub:
    return Hub(running.address, running.admin_key, None, show_progress=False)


def _store(running: Running) -> Store:
    assert running.server is not None
    store: Store = running.server.context.local["store"]
    return store


def test_two_replicas_on_one_namespace_are_one_store(replicas: tuple[Running, Running],
                                                     tmp_path: Path) -> None:
    one, two = replicas
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"{i}.bin").write_bytes(os.urandom(100 + i))
    hub_of(one).import_folder("shared", src)
    hub2 = hub_of(two)
    assert hub2.get_file_bytes("shared", "sub/3.bin") == (src / "sub" / "3.bin").read_bytes()
    version = hub2.commit_version("shared")
    stub1 = one.store()
    listed = stub1.ListVersions(store_pb2.ListVersionsRequest(dataset="shared"))
    assert [v.id for v in listed.versions] == [version.id]
    ds = stub1.GetDataset(store_pb2.GetDatasetRequest(name="shared")).dataset
    assert ds.file_count == 20 and ds.latest_version == version.id
    info = [r.store().GetStoreInfo(store_pb2.GetStoreInfoRequest()).store_id for r in replicas]
    assert info[0] == info[1] != ""
    # a name is taken for both
    with pytest.raises(grpc.RpcError) as caught:
        two.store().CreateDataset(store_pb2.CreateDatasetRequest(name="shared"))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_gc_of_one_replica_keeps_what_the_other_refers_to(
        replicas: tuple[Running, Running], tmp_path: Path) -> None:
    one, two = replicas
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.bin").write_bytes(os.urandom(5000))
    hub_of(one).import_folder("kept", src)
    report = _store(two).collect_garbage(0.0)
    assert report.blobs_deleted == 0 and report.referenced == 10
    hub2 = hub_of(two)
    for i in range(10):
        assert hub2.get_file_bytes("kept", f"{i}.bin") == (src / f"{i}.bin").read_bytes()
    hub2.delete_dataset("kept")
    report = _store(one).collect_garbage(0.0)
    assert report.blobs_deleted == 10


def test_a_touch_and_a_guarded_delete_exclude_each_other(replicas: tuple[Running, Running]
                                                         ) -> None:
    one, two = replicas
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    stub = one.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="a", size=len(data), data=data, last=True)])]))
    stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="d", paths=["a"]))
    blobs_one, blobs_two = _store(one).blobs, _store(two).blobs
    # a collector decided at this version; then a replica reuses the blob (touch first)
    seen = blobs_two.stat(sha)
    assert seen is not None and seen.version
    assert blobs_one.touch(sha)
    assert blobs_two.delete_unless_full(sha, seen.version) == -1  # changed: kept
    assert blobs_one.stat(sha) is not None
    # the other order: the delete goes first, and the touch then says it is gone
    now = blobs_two.stat(sha)
    assert now is not None
    assert blobs_two.delete_unless_full(sha, now.version) == 1000
    assert not blobs_one.touch(sha)
    # an upload that would reuse it stores its bytes again instead
    stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="b", size=len(data), sha256=sha, data=data, last=True)])]))
    assert hub_of(two).get_file_bytes("d", "b") == data
    assert blobs_two.backend.stat(blob_key(sha)) is not None


def test_a_local_catalog_with_datasets_is_not_hidden_by_the_pool(
        tmp_path: Path, ceph_cluster: CephCluster) -> None:
    data = tmp_path / "data"
    backend = ceph_backend(ceph_cluster)
    local = start_in_process(data, store={"backend": {**backend, "catalog": "local"}})
    local.store().CreateDataset(store_pb2.CreateDatasetRequest(name="old"))
    assert local.server is not None
    local.server.stop(0)
    with pytest.raises(FailedPrecondition, match="catalog: local"):
        open_store(ServiceContext(config_for(data, store={"backend": backend})))


def test_store_gc_command_collects_a_shared_catalog_next_to_serving_replicas(
        replicas: tuple[Running, Running], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    one, _ = replicas
    stub = one.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    for name, data in (("kept", b"k" * 3000), ("gone", b"g" * 5000)):
        stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
            store_pb2.FileChunk(path=name, size=len(data), data=data, last=True)])]))
    stub.DeleteFiles(store_pb2.DeleteFilesRequest(dataset="d", paths=["gone"]))
    config = tmp_path / "gc.yaml"  # the replicas' backend, a data directory of its own
    backend = one.config.model_dump(mode="json")["store"]["backend"]
    config.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "gc-data"),
                                      "store": {"backend": backend}}))
    gc = ["store", "gc", "--config", str(config)]
    assert main([*gc, "--grace-minutes", "0", "--dry-run"]) == 0
    assert "would remove 1 unreferenced blob(s), 5000 bytes" in capsys.readouterr().out
    assert main(gc) == 0  # the default grace period keeps what was used just now
    assert "removed 0 unreferenced blob(s)" in capsys.readouterr().out
    assert main([*gc, "--grace-minutes", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["blobs_deleted"] == 1 and report["bytes_freed"] == 5000
    assert report["referenced"] == 1
    assert hub_of(one).get_file_bytes("d", "kept") == b"k" * 3000


def test_a_local_catalog_migrates_into_the_pool(tmp_path: Path, ceph_cluster: CephCluster,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    backend = ceph_backend(ceph_cluster)
    local = start_in_process(data, store={"backend": {**backend, "catalog": "local"}})
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(30):
        (src / "sub" / f"{i}.bin").write_bytes(os.urandom(200 + i))
    hub = hub_of(local)
    hub.import_folder("a", src)
    hub.commit_version("a")
    (src / "late.bin").write_bytes(b"late")
    hub.import_folder("a", src)
    hub.commit_version("a")
    hub.import_folder("b", src / "sub")

    def state(running: Running) -> list[object]:
        stub = running.store()
        out: list[object] = []
        for name in ("a", "b"):
            ds = stub.GetDataset(store_pb2.GetDatasetRequest(name=name)).dataset
            versions = stub.ListVersions(store_pb2.ListVersionsRequest(dataset=name)).versions
            out += [ds, list(versions)]
            for version in ["latest", *(v.id for v in versions)]:
                out.append(list(stub.ListManifest(store_pb2.ListManifestRequest(
                    dataset=name, version=version, page_size=1000)).files))
        return out
    before = state(local)
    assert local.server is not None
    local.server.stop(0)
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({"data_dir": str(data), "store": {"backend": backend}}))
    assert main(["store", "migrate-catalog", "--config", str(config), "--quiet"]) == 0
    assert "copied 2 dataset(s), 61 head file(s) and 2 version(s)" in capsys.readouterr().out
    # any data directory serves it now (here a new one: nothing needed is local)
    pool = start_in_process(tmp_path / "elsewhere", store={"backend": backend})
    try:
        assert state(pool) == before  # names, times, counts, version ids, every entry
        assert hub_of(pool).get_file_bytes("a", "late.bin") == b"late"
    finally:
        assert pool.server is not None
        pool.server.stop(0)
    # run again: the local catalog is gone (renamed), which the command says
    assert main(["store", "migrate-catalog", "--config", str(config), "--quiet"]) == 2
    assert "holds no local catalog" in capsys.readouterr().err
    assert (data / "store" / "catalog.sqlite.migrated").is_file()
    # and the old data directory serves from the pool (no longer refused)
    store = open_store(ServiceContext(config_for(data, store={"backend": backend})))
    try:
        assert store.catalog.shared and store.get_dataset("b").file_count == 30
    finally:
        store.close()


def test_a_migration_resumes_and_refuses_datasets_made_in_the_pool(
        tmp_path: Path, ceph_cluster: CephCluster) -> None:
    source = Catalog(tmp_path / "catalog.sqlite")
    source.create_dataset("a", "first")
    source.add_files("a", [entry(f"f{i}", i + 1) for i in range(2500)])
    source.commit_version("a")
    backend = _pool_backend(ceph_cluster, f"t{os.urandom(8).hex()}")
    target = PoolCatalog(backend, tmp_path / "catalog", shards=4)
    try:
        first = migrate_catalog(source, target, show_progress=False)
        assert (first.datasets, first.files, first.versions) == (1, 2500, 1)
        again = migrate_catalog(source, target, show_progress=False)  # as after a crash
        assert again.versions == 0
        assert target.counts_of("a", "latest") == source.counts_of("a", "latest")
        [v] = target.versions("a", None, 10)
        assert v == source.versions("a", None, 10)[0]
        # a dataset of the same name made in the pool stops the next one before any copy
        source.create_dataset("b", "")
        source.add_files("b", [entry("x")])
        target.create_dataset("b", "made in the pool")
        with pytest.raises(FailedPrecondition, match="'b'"):
            migrate_catalog(source, target, show_progress=False)
        assert target.entries("b", "latest") == []
    finally:
        source.close()
        backend.close()
