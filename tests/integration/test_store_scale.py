"""Per-call cost of the store and of epoch planning does not grow with the dataset.

Complexity is pinned by counting work inside SQLite, not by timing: the
virtual machine steps (a progress handler called on every instruction) and
the statements a call runs, at two dataset sizes. A call that counts or scans
the files of a dataset does N times more steps at N times more files; a call
that reads one row or one page does the same number at both sizes.
"""

from __future__ import annotations

import sqlite3
import stat
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gristmill.ingest import samples as samples_module
from gristmill.ingest.config import IngestConfig
from gristmill.ingest.samples import Samples, check_spec
from gristmill.ingest.service import Planner
from gristmill.ingest.sources import LocalStore
from gristmill.store import store as store_module
from gristmill.store.blobs import BlobStore
from gristmill.store.catalog import SCHEMA_VERSION, Catalog
from gristmill.store.fsobjects import FsBackend
from gristmill.store.store import Store
from gristmill.v1 import decode_pb2, ingest_pb2, store_pb2

SMALL, LARGE = 100, 2_000


def open_store(root: Path) -> Store:
    return Store(Catalog(root / "catalog.sqlite"), BlobStore(FsBackend(root)),
                 read_message_bytes=4 << 20, read_chunk_bytes=1 << 20)


def sql(store: Store) -> Catalog:
    """The SQLite catalog of a store these tests opened."""
    assert isinstance(store.catalog, Catalog)
    return store.catalog


def row(dataset: str, i: int, folder: str = "img") -> tuple[Any, ...]:
    return (dataset, f"{folder}/{i:08d}.jpg", f"{i:064x}", 1000 + i, "image/jpeg",
            300 + i % 7, 200 + i % 5, "JPEG", 1)


def fill(store: Store, dataset: str, n: int, folder: str = "img") -> None:
    """A dataset of ``n`` rows written straight into the catalog (no blobs: not read here)."""
    if not store.catalog.exists(dataset):
        store.create_dataset(dataset)
    with sql(store).transaction() as conn:
        conn.executemany("INSERT INTO files(dataset, path, sha256, size, media_type, width, "
                         "height, format, orientation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         [row(dataset, i, folder) for i in range(n)])


@dataclass
class Work:
    """SQLite work seen on the catalog's connections while counting."""

    steps: int = 0
    statements: list[str] = field(default_factory=list)

    def step(self) -> int:
        self.steps += 1
        return 0


@contextmanager
def counting(store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[Work]:
    """Count VM steps and statements on the catalog's connection and on any it opens."""
    work = Work()
    real_connect = sqlite3.connect

    def watch(conn: sqlite3.Connection) -> sqlite3.Connection:
        conn.set_progress_handler(work.step, 1)
        conn.set_trace_callback(work.statements.append)
        return conn

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return watch(real_connect(*args, **kwargs))

    with monkeypatch.context() as m:
        m.setattr(sqlite3, "connect", connect)
        main = watch(sql(store).db.conn)
        try:
            yield work
        finally:
            main.set_progress_handler(None, 1)
            main.set_trace_callback(None)


def measure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            call: Callable[[Store], object], *, commit: bool = False) -> dict[int, Work]:
    """The work of ``call`` on a dataset "ds" of SMALL and of LARGE files."""
    out = {}
    for n in (SMALL, LARGE):
        store = open_store(tmp_path / str(n))
        fill(store, "ds", n)
        if commit:
            store.commit_version("ds")
        try:
            with counting(store, monkeypatch) as work:
                call(store)
            out[n] = work
        finally:
            store.close()
    return out


def assert_flat(work: dict[int, Work]) -> None:
    small, large = work[SMALL], work[LARGE]
    assert large.steps == small.steps, (small.steps, large.steps, large.statements)
    assert len(large.statements) == len(small.statements)


# counters ---------------------------------------------------------------------
def test_counters_follow_every_change_in_the_same_transaction(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    fill(store, "ds", 10)
    fill(store, "other", 3)

    def truth(name: str) -> tuple[int, int]:
        n, total = sql(store).query("SELECT count(*), coalesce(sum(size), 0) FROM files "
                                       "WHERE dataset = ?", [name])[0]
        return n, total

    def counters(name: str) -> tuple[int, int]:
        r = store.get_dataset(name)
        return r.file_count, r.total_bytes

    assert counters("ds") == truth("ds") == (10, sum(1000 + i for i in range(10)))
    # replacing a file counts its new size once
    store.catalog.add_files("ds", [store_pb2.FileEntry(path="img/00000001.jpg", sha256="f" * 64,
                                                       size=5, media_type="image/jpeg"),
                                   store_pb2.FileEntry(path="new.txt", sha256="e" * 64, size=7,
                                                       media_type="text/plain")])
    assert counters("ds") == truth("ds") == (11, truth("ds")[1])
    assert store.delete_files("ds", ["img/00000002.jpg", "missing.jpg"]) == 1
    assert counters("ds") == truth("ds")
    # a failed transaction leaves the counters as the files: both rolled back
    with pytest.raises(RuntimeError), sql(store).transaction() as conn:
        conn.execute("DELETE FROM files WHERE dataset = 'ds'")
        raise RuntimeError("abort")
    assert counters("ds") == truth("ds") and counters("ds")[0] == 10
    version, created = store.commit_version("ds")
    assert created and (version.file_count, version.total_bytes) == truth("ds")
    store.delete_dataset("ds")
    assert counters("other") == truth("other") == (3, 3003)
    store.close()


def catalog_without_triggers(root: Path, n: int) -> sqlite3.Connection:
    """A closed store's catalog with dataset "ds" of ``n`` files, its triggers dropped."""
    store = open_store(root)
    fill(store, "ds", n)
    store.close()
    conn = sqlite3.connect(root / "catalog.sqlite")
    with conn:
        for trigger in ("counted_insert", "counted_delete", "counted_update", "revised_update"):
            conn.execute(f"DROP TRIGGER files_{trigger}")
    return conn


def test_older_catalog_is_counted_once_when_opened(tmp_path: Path) -> None:
    """A catalog without the counter columns (schema 1) gets them, counted, on first open."""
    conn = catalog_without_triggers(tmp_path, 25)
    with conn:  # as the previous release left it
        conn.execute("DROP INDEX idx_versions_created")
        for column in ("file_count", "total_bytes", "revision"):
            conn.execute(f"ALTER TABLE datasets DROP COLUMN {column}")
        conn.execute("DELETE FROM store_info WHERE key = 'schema_version'")
        conn.execute("INSERT INTO files(dataset, path, sha256, size, media_type) "
                     "VALUES ('ds', 'late.txt', ?, 5, 'text/plain')", ["a" * 64])
    conn.close()
    store = open_store(tmp_path)
    row = store.get_dataset("ds")
    assert (row.file_count, row.total_bytes) == (26, sum(1000 + i for i in range(25)) + 5)
    assert sql(store).query("SELECT value FROM store_info WHERE key = 'schema_version'"
                               ) == [(str(SCHEMA_VERSION),)]
    store.catalog.add_files("ds", [store_pb2.FileEntry(path="more.txt", sha256="b" * 64,
                                                       size=1, media_type="text/plain")])
    assert store.get_dataset("ds").file_count == 27
    store.close()


def test_kept_head_manifests_are_bounded_by_count_and_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    monkeypatch.setattr(store_module, "HEADS_KEPT", 2)
    for name in ("a", "b", "c"):
        fill(store, name, 50)
        list(store.manifest_chunks(name, "latest"))
    assert list(store._heads) == ["b", "c"]  # the least recently asked for went first
    monkeypatch.setattr(store_module, "HEADS_KEPT_BYTES", 1000)
    fill(store, "big", 300)  # compressed, more than 1000 bytes: built per request
    list(store.manifest_chunks("big", "latest"))
    assert "big" not in store._heads
    kept = [k[1] for k in store._heads.values()]
    store.close()
    assert not store._heads and all(not f.closed for f in kept)  # closed with their readers
    del kept


def test_a_schema_2_catalog_gets_the_head_revision(tmp_path: Path) -> None:
    """Schema 2 counted files but had no revision: opened, its triggers move one."""
    conn = catalog_without_triggers(tmp_path, 5)
    with conn:  # as schema 2 left it: counting triggers without the revision
        conn.execute("ALTER TABLE datasets DROP COLUMN revision")
        conn.execute("""CREATE TRIGGER files_counted_insert AFTER INSERT ON files BEGIN
            UPDATE datasets SET file_count = file_count + 1, total_bytes = total_bytes + NEW.size
            WHERE name = NEW.dataset; END""")
        conn.execute("UPDATE store_info SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    store = open_store(tmp_path)
    with sql(store).snapshot() as snap:
        before = sql(store).head_key(snap, "ds")
    assert before is not None and before[2] == 5
    store.catalog.add_files("ds", [store_pb2.FileEntry(path="z.txt", sha256="c" * 64, size=1,
                                                       media_type="text/plain")])
    with sql(store).snapshot() as snap:
        after = sql(store).head_key(snap, "ds")
    assert after is not None and after[1] > before[1] and after[2] == 6
    store.close()


def test_an_unchanged_head_manifest_is_built_once_and_follows_every_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    fill(store, "ds", 300)
    builds = []
    real_pages = sql(store).entry_pages

    def pages(*args: Any, **kwargs: Any) -> Iterator[list[tuple[Any, ...]]]:
        builds.append(args)
        return real_pages(*args, **kwargs)

    monkeypatch.setattr(sql(store), "entry_pages", pages)

    def latest() -> store_pb2.Manifest:
        manifest = unpack(list(store.manifest_chunks("ds", "latest", chunk=1000)))
        assert list(manifest.files) == store.catalog.entries("ds", "latest")
        return manifest

    def remake(n: int) -> None:
        store.delete_dataset("ds")
        fill(store, "ds", n, folder="again")

    first = latest()
    assert len(first.files) == 300 and len(builds) == 1
    assert latest() == first and len(builds) == 1  # unchanged: served as built
    changes: list[Callable[[], object]] = [
        lambda: fill(store, "ds", 2, folder="new"),  # files added
        lambda: store.delete_files("ds", ["img/00000003.jpg"]),  # one removed
        lambda: store.catalog.add_files("ds", [store_pb2.FileEntry(  # replaced, same size
            path="img/00000004.jpg", sha256="d" * 64, size=1004, media_type="image/jpeg")]),
        lambda: sql(store).query("SELECT 1"),  # no change: no build
        lambda: remake(7),  # deleted, and made again under the same name
    ]
    seen = first
    for i, change in enumerate(changes):
        change()
        now = latest()
        if i == 3:
            assert now == seen and len(builds) == 4
        else:
            assert now != seen
        seen = now
    assert len(builds) == 5 and len(seen.files) == 7
    store.close()


@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.get_dataset("ds"), id="get_dataset"),
    pytest.param(lambda s: s.list_datasets(None, 10), id="list_datasets"),
    pytest.param(lambda s: s.resolve("ds", "latest"), id="resolve-latest"),
    pytest.param(lambda s: s.resolve("ds", s.list_versions("ds", None, 1)[0].id[:12]),
                 id="resolve-version"),
    pytest.param(lambda s: s.catalog.lookup("ds", "latest", ["img/00000007.jpg"]),
                 id="lookup"),
])
def test_per_call_reads_are_flat_in_the_dataset_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: Callable[[Store], object]) -> None:
    work = measure(tmp_path, monkeypatch, call, commit=True)
    assert_flat(work)
    assert not any("count(" in s.lower() or "sum(" in s.lower()
                   for s in work[LARGE].statements)


# manifest pages ---------------------------------------------------------------------
@pytest.mark.parametrize(("after", "prefix"), [
    (None, ""), ("img/00000050.jpg", ""), (None, "img/0000006"), ("img/00000061.jpg", "img/"),
])
def test_manifest_pages_are_index_ranges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         after: str | None, prefix: str) -> None:
    """A page costs its rows, wherever it starts: no OFFSET, no count, no scan to the start."""
    def page(store: Store) -> None:
        fill(store, "ds", 100, folder="zzz")  # rows after the prefix must not be read either
        with counting(store, monkeypatch) as work:
            _, entries = store.list_manifest("ds", "latest", after, 5, prefix)
        assert len(entries) == 5 and all(e.path.startswith(prefix) for e in entries)
        assert after is None or entries[0].path > after
        page.work[store.catalog.path] = work  # type: ignore[attr-defined]
    page.work = {}  # type: ignore[attr-defined]
    measure(tmp_path, monkeypatch, page)
    small, large = page.work.values()  # type: ignore[attr-defined]
    assert_flat({SMALL: small, LARGE: large})
    sql = " ".join(large.statements).upper()
    assert "OFFSET" not in sql and "COUNT(" not in sql and "SUBSTR" not in sql


# whole manifests -----------------------------------------------------------------------
def unpack(pieces: list[tuple[str, int, bytes]]) -> store_pb2.Manifest:
    return store_pb2.Manifest.FromString(zlib.decompress(b"".join(p for _, _, p in pieces)))


def test_committed_manifest_is_written_once_and_served_from_its_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    fill(store, "ds", 300)
    version, _ = store.commit_version("ds")
    kept = tmp_path / "manifests" / "ds" / f"{version.id}.zlib"
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    pieces = list(store.manifest_chunks("ds", version.id, chunk=1000))
    assert len(pieces) > 1 and {(v, n) for v, n, _ in pieces} == {(version.id, 300)}
    manifest = unpack(pieces)
    assert (manifest.dataset, manifest.version) == ("ds", version.id)
    assert list(manifest.files) == store.catalog.entries("ds", version.id)
    # the head moves on; the version's manifest does not
    fill(store, "ds", 5, folder="new")
    assert unpack(list(store.manifest_chunks("ds", version.id))) == manifest
    latest = unpack(list(store.manifest_chunks("ds", "latest")))
    assert latest.version == "latest" and len(latest.files) == 305
    # a store older than manifest files builds one on the first request
    kept.unlink()
    assert unpack(list(store.manifest_chunks("ds", version.id[:10]))) == manifest
    assert kept.exists()
    store.delete_dataset("ds")
    assert not kept.parent.exists()
    store.close()


def test_committed_manifest_request_is_flat_in_the_dataset_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def get(store: Store) -> None:
        version = store.list_versions("ds", None, 1)[0].id
        list(store.manifest_chunks("ds", version))
    assert_flat(measure(tmp_path, monkeypatch, get, commit=True))


def test_latest_manifest_memory_is_flat(tmp_path: Path) -> None:
    """Built page by page into a file: the peak is one page, not the manifest."""
    peaks = {}
    for n in (10_000, 60_000):
        store = open_store(tmp_path / str(n))
        fill(store, "ds", n)
        tracemalloc.start()
        try:
            count = sum(len(p) for _, _, p in store.manifest_chunks("ds", "latest", 64 * 1024))
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count > 0
        store.close()
    # 60,000 entries in a list are tens of MiB: the peak would grow sixfold
    assert peaks[60_000] < 1.2 * peaks[10_000], peaks


# planning ------------------------------------------------------------------------------
def spec(prefix: str = "", companions: tuple[str, ...] = ()) -> ingest_pb2.PlanSpec:
    return ingest_pb2.PlanSpec(
        dataset="ds", batch_size=4, world_size=2, prefix=prefix, companions=companions,
        transform=decode_pb2.Transform(buckets=decode_pb2.BucketConfig(image_size=256,
                                                                       downsampling=16)))


def plan(store: Store, s: ingest_pb2.PlanSpec) -> Samples:
    planner = Planner(LocalStore(store), IngestConfig())
    resolved = planner.resolve(s)
    return planner.plan(resolved, check_spec(resolved), 0)[0]


def test_planning_reads_only_its_columns_and_skips_companion_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store(tmp_path)
    fill(store, "ds", 40)
    store.catalog.add_files("ds", [store_pb2.FileEntry(path="img/notes.txt", sha256="c" * 64,
                                                       size=3, media_type="text/plain")])
    store.commit_version("ds")
    expected = Samples.from_manifest(spec("img/"), check_spec(spec("img/")),
                                     store.catalog.entries("ds", store.list_versions(
                                         "ds", None, 1)[0].id))

    def no_companions(*args: object) -> tuple[str, ...]:
        raise AssertionError("companion paths built for a spec without companions")

    with monkeypatch.context() as m, counting(store, m) as work:
        m.setattr(samples_module, "companion_paths", no_companions)
        got = plan(store, spec("img/"))
    assert got.set.ids == expected.set.ids and len(got) == 40
    assert list(got.set.buckets) == list(expected.set.buckets)
    assert got.sizes == expected.sizes and got.companions == ((),) * 40
    [select] = [s for s in work.statements if "coalesce(width" in s]
    for unused in ("sha256", "format", "orientation"):
        assert unused not in select
    store.close()


def test_planning_a_prefix_reads_only_the_prefix(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def planned(store: Store) -> None:
        fill(store, "ds", 30, folder="a")
        store.commit_version("ds")
        with counting(store, monkeypatch) as work:
            assert len(plan(store, spec("a/"))) == 30
        planned.work[store.catalog.path] = work  # type: ignore[attr-defined]
    planned.work = {}  # type: ignore[attr-defined]
    measure(tmp_path, monkeypatch, planned)
    small, large = planned.work.values()  # type: ignore[attr-defined]
    assert_flat({SMALL: small, LARGE: large})


def test_planning_with_companions_matches_the_manifest(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    fill(store, "ds", 6)
    fill(store, "ds", 3, folder="masks")
    store.commit_version("ds")
    version = store.list_versions("ds", None, 1)[0].id
    s = spec(companions=("masks/{name}.jpg",))
    expected = Samples.from_manifest(s, check_spec(s), store.catalog.entries("ds", version))
    got = plan(store, s)
    assert got.set.ids == expected.set.ids and got.companions == expected.companions
    assert got.sizes == expected.sizes
    assert len(got) == 6 and got.companions[0] == ("masks/00000000.jpg",)
    assert got.sizes[0] == 1000 + 1000  # the image's bytes and its mask's
    store.close()
