"""The Hub cache's cost per call does not grow with the dataset (issue 13).

Each test runs the same call on datasets of 200 and 2,000 files and counts
what grows: SQL statements on the cache index (``set_trace_callback``),
transactions, and entries a pinned lookup reads. No wall-clock asserts.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest

import gristmill.client.cache as cache_module
import gristmill.client.hub as hub_module
import gristmill.client.manifest as manifest_module
from gristmill.client.hub import Hub
from gristmill.client.manifest import Manifest
from gristmill.v1 import store_pb2
from tests.helpers import Running, start_in_process

SIZES = (200, 2000)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, dict[int, str]]]:
    """A server with one dataset per size (tiny files) and a committed version of each."""
    tmp = tmp_path_factory.mktemp("scale")
    running = start_in_process(tmp / "data")
    versions: dict[int, str] = {}
    try:
        with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
            for n in SIZES:
                folder = tmp / f"src{n}"
                for i in range(n):
                    sub = folder / f"d{i % 10}"
                    sub.mkdir(parents=True, exist_ok=True)
                    (sub / f"f{i:05d}.bin").write_bytes(b"%d" % (i % 7))
                report = hub.import_folder(f"s{n}", folder)
                assert report.uploaded + report.reused == n, report
                versions[n] = hub.commit_version(f"s{n}").id
        yield running, versions
    finally:
        assert running.server is not None
        running.server.stop(0)


def statements(hub: Hub) -> list[str]:
    """Every SQL statement run on the hub's cache index from now on."""
    assert hub.cache is not None
    seen: list[str] = []
    hub.cache._db.set_trace_callback(seen.append)
    return seen


def open_hub(running: Running, cache: Path, **kw: Any) -> Hub:
    return Hub(running.address, running.admin_key, cache, show_progress=False, **kw)


@pytest.mark.parametrize("racy", [True, False], ids=["checked", "remembered"])
def test_a_cached_redownload_reads_the_index_once(
        store: tuple[Running, dict[int, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, racy: bool) -> None:
    # "checked": just downloaded, so the whole-download record is not trusted yet and
    # every file is checked; "remembered": the record is trusted (no check per file)
    if not racy:
        monkeypatch.setattr(cache_module, "RACY_NS", 0)
    running, _ = store
    counts = {}
    for n in SIZES:
        with open_hub(running, tmp_path / f"c{n}") as hub:
            first = hub.download_dataset(f"s{n}")
            seen = statements(hub)
            again = hub.download_dataset(f"s{n}")
            assert again == first and len(again) == n
            counts[n] = len(seen)
            # a subset of a cached dataset: the same statements, not one per file
            seen.clear()
            part = [p.relative_to(hub.cache.root / "datasets" / f"s{n}").as_posix()  # type: ignore[union-attr]
                     for p in first[: n // 2]]
            assert hub.download_dataset(f"s{n}", part) == first[: n // 2]
            counts[-n] = len(seen)
    # checked: the record, the generation, the cached files, marking them used, a new
    # record; remembered: the record alone
    assert counts[SIZES[0]] == counts[SIZES[1]] <= (5 if racy else 1), counts
    assert counts[-SIZES[0]] == counts[-SIZES[1]] <= 3, counts


@pytest.mark.parametrize("limit", [None, 10**9])
def test_one_index_transaction_per_read_files_call(
        store: tuple[Running, dict[int, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, limit: int | None) -> None:
    running, _ = store
    monkeypatch.setattr(hub_module, "DOWNLOAD_CALL_FILES", 100)
    for n in SIZES:
        with open_hub(running, tmp_path / f"c{n}", cache_limit=limit) as hub:
            seen = statements(hub)
            assert len(hub.download_dataset(f"s{n}")) == n
            calls = math.ceil(n / 100)
            per_call = 1 if limit is None else 2  # with a limit, room is made first
            assert seen.count("BEGIN IMMEDIATE") == seen.count("COMMIT") == calls * per_call
            assert hub.get_cache_size(f"s{n}") == sum(len(b"%d" % (i % 7)) for i in range(n))


def counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts entries a Manifest.find reads (its key function's calls)."""
    calls = [0]
    real = attrgetter("path")

    def key(name: str) -> Callable[[Any], Any]:
        def get(entry: Any) -> Any:
            calls[0] += 1
            return real(entry)
        return get
    monkeypatch.setattr(manifest_module, "attrgetter", key)
    return calls


def test_get_file_on_a_pinned_version_uses_an_index(
        store: tuple[Running, dict[int, str]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    running, versions = store
    read = counting(monkeypatch)
    per_call: dict[int, tuple[int, int]] = {}
    for n in SIZES:
        with open_hub(running, tmp_path / f"c{n}") as hub:
            paths = [e.path for e in hub.get_manifest(f"s{n}", versions[n])]
            for p in paths[:3]:  # downloads, and builds the index once
                hub.get_file(f"s{n}", p, versions[n])
            seen = statements(hub)
            read[0] = 0
            for p in paths[:3]:
                assert hub.get_file(f"s{n}", p, versions[n]).read_bytes()
            per_call[n] = (len(seen), read[0])
            assert hub.get_manifest(f"s{n}", versions[n]) is \
                hub.get_manifest(f"s{n}", versions[n])  # parsed once per Hub
    (q_small, r_small), (q_big, r_big) = per_call[SIZES[0]], per_call[SIZES[1]]
    assert q_small == q_big  # one SELECT and one UPDATE per call, at any size
    assert r_small <= 3 * (math.log2(SIZES[0]) + 2) and r_big <= 3 * (math.log2(SIZES[1]) + 2)


def test_manifest_find_sorted_unsorted_and_missing() -> None:
    def manifest(paths: list[str]) -> Manifest:
        return Manifest(store_pb2.Manifest(files=[
            store_pb2.FileEntry(path=p, size=i) for i, p in enumerate(paths)]))
    m = manifest(["a", "b/c", "b/d", "z"])
    assert m.find("b/d").size == 2 and m.find("a").size == 0  # type: ignore[union-attr]
    assert m.find("b") is None and m.find("zz") is None and m.find("") is None
    odd = manifest(["z", "a", "a"])  # a server that sends another order still finds them
    assert odd.find("z").size == 0 and odd.find("a") is not None  # type: ignore[union-attr]
    assert odd.find("b") is None
    assert manifest([]).find("a") is None


def test_the_index_total_follows_every_change(tmp_path: Path) -> None:
    from gristmill.client.cache import FileCache

    cache = FileCache(tmp_path / "c", "a" * 32)
    try:
        cache.record_many("ds", [("x", "0" * 64, 10), ("y", "1" * 64, 20)])
        cache.record("ds", "x", "2" * 64, 5)  # replaced: 5 instead of 10
        total = cache._db.execute("SELECT bytes FROM cache_total").fetchone()[0]
        assert total == 25
        cache.clear("ds")
        assert cache._db.execute("SELECT bytes FROM cache_total").fetchone()[0] == 0
        # a row written without the triggers' knowledge is counted when the index opens
        cache._db.execute("INSERT INTO cache_files VALUES (?, 'ds', 'q', ?, 7, 0)",
                          ["a" * 32, "3" * 64])
        cache._db.execute("UPDATE cache_total SET bytes = 0")
    finally:
        cache.close()
    db = sqlite3.connect(str(tmp_path / "c" / "index.sqlite"))
    assert db.execute("SELECT bytes FROM cache_total").fetchone()[0] == 0
    db.close()
    again = FileCache(tmp_path / "c", "a" * 32)
    try:
        assert again._db.execute("SELECT bytes FROM cache_total").fetchone()[0] == 7
    finally:
        again.close()
