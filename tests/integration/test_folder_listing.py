"""Loader.from_folder: streaming start (hash, sequential) and the on-disk header index."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from gristmill.client.loader import Loader
from gristmill.ingest import folderindex
from gristmill.ingest.folderindex import FolderListing, HeaderIndex
from gristmill.ingest.local import FolderStore
from scripts.sample_data import jpeg_bytes, make_sample_folder

SMALL = {"batch_size": 4, "image_size": 128, "downsampling_ratio": 16}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GRISTMILL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "folder-index"


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    make_sample_folder(tmp_path / "photos", count=30, max_side=300)
    return tmp_path / "photos"


def fresh_ids(loader: Loader) -> list[str]:
    return [i for b in loader for i, f in zip(b.ids, b.fresh, strict=True) if f]


@pytest.mark.parametrize("policy", ["hash", "sequential"])
def test_streamed_policies_deliver_every_sample_once_across_ranks(
        photos: Path, cache: Path, policy: str) -> None:
    everything: list[str] = []
    for rank in range(3):
        with Loader.from_folder(photos, policy=policy, rank=rank, world_size=3, seed=5,
                                show_progress=False, **SMALL) as ld:  # type: ignore[arg-type]
            first = fresh_ids(ld)
            assert fresh_ids(ld) != [] and len(ld) > 0  # a second epoch, and len() counts
            with Loader.from_folder(photos, policy=policy, rank=rank, world_size=3, seed=5,
                                    show_progress=False, **SMALL) as again:  # type: ignore[arg-type]
                assert fresh_ids(again) == first  # same folder and seed: same order
        everything += first
    assert sorted(everything) == sorted({p.relative_to(photos).as_posix()
                                         for p in photos.rglob("*.*")})


def test_streamed_plan_resumes_from_state_dict(photos: Path, cache: Path) -> None:
    with Loader.from_folder(photos, policy="hash", show_progress=False,
                            **SMALL) as ld:  # type: ignore[arg-type]
        whole = [b.ids for b in ld]
    with Loader.from_folder(photos, policy="hash", show_progress=False,
                            **SMALL) as ld:  # type: ignore[arg-type]
        it = iter(ld)
        head = [next(it).ids for _ in range(3)]
        state = ld.state_dict()
        it.close()
    with Loader.from_folder(photos, policy="hash", show_progress=False,
                            **SMALL) as ld:  # type: ignore[arg-type]
        ld.load_state_dict(state)
        assert head + [b.ids for b in ld] == whole


def test_first_batch_arrives_while_the_folder_is_still_listed(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "many"
    folder.mkdir()
    data = jpeg_bytes(32, 24)
    for i in range(600):
        (folder / f"{i:04d}.jpg").write_bytes(data)
    release = threading.Event()
    real_walk = folderindex.walk_runs

    def slow_walk(root: Path) -> Iterator[folderindex.Run]:
        for directory, rels, sizes, mtimes in real_walk(root):  # one run of 600: cut at 300
            yield directory, rels[:300], sizes[:300], mtimes[:300]
            assert release.wait(30)
            yield directory, rels[300:], sizes[300:], mtimes[300:]

    monkeypatch.setattr(folderindex, "walk_runs", slow_walk)
    for policy in ("sequential", "hash"):
        release.clear()
        with Loader.from_folder(folder, policy=policy, show_progress=False,
                                **SMALL) as ld:  # type: ignore[arg-type]
            listing = ld._transport._ingest.planner.store.listing  # type: ignore[attr-defined]
            it = iter(ld)
            first = next(it)
            assert len(first) == 4 and not listing.done and len(listing.files) <= 300
            release.set()
            assert len(first.ids) + sum(len(b.ids) for b in it) == 600


def test_second_start_reads_no_header_and_only_changed_ones_later(
        photos: Path, cache: Path) -> None:
    store = FolderStore(photos, show_progress=False)
    assert store.listing.header_reads == 30
    index = HeaderIndex(store.root)
    assert stat.S_IMODE(os.stat(index.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(index.path.parent).st_mode) == 0o700
    again = FolderStore(photos, show_progress=False)
    assert again.listing.header_reads == 0
    assert [e.image for e in again.entries] == [e.image for e in store.entries]
    assert again.version == store.version
    changed = sorted(photos.rglob("*.jpg"))[0]
    changed.write_bytes(jpeg_bytes(64, 20))
    (photos / "new.jpg").write_bytes(jpeg_bytes(20, 64))
    third = FolderStore(photos, show_progress=False)
    assert third.listing.header_reads == 2 and third.version != store.version
    by_path = {e.path: e.image for e in third.entries}
    assert (by_path["new.jpg"].width, by_path["new.jpg"].height) == (20, 64)
    rel = changed.relative_to(photos).as_posix()
    assert (by_path[rel].width, by_path[rel].height) == (64, 20)
    assert FolderStore(photos, show_progress=False).listing.header_reads == 0


def test_index_follows_changes_in_the_middle_of_long_listings(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # unchanged stretches are matched whole against the index; a change anywhere must
    # still be seen, and the stretches after it must match again
    monkeypatch.setattr(folderindex, "CHUNK", 8)
    root = tmp_path / "many"
    make_sample_folder(root, count=60, max_side=64)
    first = FolderStore(root, show_progress=False)
    assert first.listing.header_reads == 60
    files = sorted(p for p in root.rglob("*") if p.is_file())
    files[20].unlink()  # removed
    files[33].write_bytes(jpeg_bytes(48, 16))  # rewritten in place
    (files[40].parent / "zz-new.jpg").write_bytes(jpeg_bytes(16, 48))  # added
    again = FolderStore(root, show_progress=False)
    assert again.listing.header_reads == 2
    by_path = {e.path: e.image for e in again.entries}
    removed, changed = (f.relative_to(root).as_posix() for f in (files[20], files[33]))
    assert removed not in by_path and len(by_path) == 60
    assert (by_path[changed].width, by_path[changed].height) == (48, 16)
    indexed = {row[0] for row in HeaderIndex(again.root).load()[0]}
    assert removed not in indexed and len(indexed) == 60
    third = FolderStore(root, show_progress=False)
    assert third.listing.header_reads == 0 and third.version == again.version
    assert [e.image for e in third.entries] == [e.image for e in again.entries]


def test_corrupt_index_is_ignored_and_rebuilt(photos: Path, cache: Path) -> None:
    store = FolderStore(photos, show_progress=False)
    index = HeaderIndex(store.root)
    index.path.write_bytes(b"this is not a database" * 100)
    again = FolderStore(photos, show_progress=False)
    assert again.listing.header_reads == 30
    assert [e.image for e in again.entries] == [e.image for e in store.entries]
    assert FolderStore(photos, show_progress=False).listing.header_reads == 0
    assert stat.S_IMODE(os.stat(index.path).st_mode) == 0o600


def _listing(head: dict[str, object] | None = None, tail: bytes = b"") -> bytes:
    """A stored listing of one file, with its head replaced or bytes added at the end."""
    good = zlib.decompress(folderindex.encode_listing(
        [folderindex.FolderFile("a.jpg", 1, 2, 3, 4, "JPEG", 1)]))
    (size,) = struct.unpack_from("<I", good)
    if head is None:
        return zlib.compress(good + tail)
    raw = json.dumps({"count": 1, "formats": ["JPEG"], "byteorder": sys.byteorder,
                      **head}).encode()
    return zlib.compress(struct.pack("<I", len(raw)) + raw + good[4 + size:] + tail)


@pytest.mark.parametrize("columns", [
    b"not zlib", zlib.compress(b"\x05\x00\x00\x00nope!"),  # not zlib; a head not JSON
    zlib.compress(b"\xff\xff\xff\x7f"), zlib.compress(b"short")[:-3],  # head cut; zlib cut
    _listing({"count": 2}), _listing({"count": -1}), _listing({"count": "1"}),  # bad count
    _listing({"formats": []}),  # a format code out of range
    _listing({"byteorder": "middle"}), _listing(tail=b"\0b.jpg"),  # foreign; a path too many
    _listing(tail=b"\xff"),  # a path not UTF-8
    zlib.compress(b"[" * 100000), _listing() + b"more",  # nested too deep; bytes after the end
], ids=["zlib", "json", "head-cut", "zlib-cut", "count-over", "count-negative", "count-text",
        "format", "byteorder", "paths-over", "utf8", "deep", "trailing"])
def test_a_tampered_listing_is_discarded(photos: Path, cache: Path, columns: bytes) -> None:
    with pytest.raises(ValueError):
        folderindex.decode_listing(columns)
    assert folderindex.decode_listing(_listing())[0].path == "a.jpg"  # the untampered one
    store = FolderStore(photos, show_progress=False)
    index = HeaderIndex(store.root)
    with sqlite3.connect(index.path) as con:
        con.execute("UPDATE listing SET columns = ?", (columns,))
    again = FolderStore(photos, show_progress=False)
    assert again.listing.header_reads == 30
    assert [e.image for e in again.entries] == [e.image for e in store.entries]
    assert FolderStore(photos, show_progress=False).listing.header_reads == 0


def test_walk_follows_file_links_not_directory_links(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.jpg").write_bytes(b"x" * 3)
    (root / "a.jpg").write_bytes(b"x" * 5)
    (root / "notes.txt").write_bytes(b"not an image")
    (root / "link.jpg").symlink_to(root / "a.jpg")  # a link to a file: listed
    (root / "loop").symlink_to(root)  # a link to a directory: not walked
    (root / "a" / "up").symlink_to(root / "a")
    os.mkdir(os.path.join(os.fsencode(root), b"bad-\xff"))
    (Path(os.fsdecode(os.path.join(os.fsencode(root), b"bad-\xff"))) / "x.jpg").write_bytes(b"x")
    with caplog.at_level("WARNING"):
        listed = list(folderindex.walk(root))
        runs = list(folderindex.walk_runs(root))
    # the root's files come in two runs, around the directory that sorts between them
    assert [(d, rels) for d, rels, _, _ in runs] == [
        (str(root), ["a.jpg"]), (str(root / "a" / "b"), ["a/b/deep.jpg"]),
        (str(root), ["link.jpg"])]
    assert [(rel, size) for rel, _, size, _ in listed] == [
        ("a.jpg", 5), ("a/b/deep.jpg", 3), ("link.jpg", 5)]  # "." sorts before "/"
    assert all(Path(full).read_bytes() == b"x" * size for _, full, size, _ in listed)
    assert "not valid UTF-8" in caplog.text


def test_index_can_be_turned_off(photos: Path, cache: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    FolderStore(photos, show_progress=False, folder_index=False)
    assert not cache.exists()
    monkeypatch.setenv("GRISTMILL_FOLDER_INDEX", "0")
    FolderStore(photos, show_progress=False)
    assert FolderStore(photos, show_progress=False).listing.header_reads == 30
    assert not cache.exists()


def test_parallel_scan_equals_serial_scan(photos: Path) -> None:
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    serial = FolderListing(photos.resolve(), None, workers=1).wait()
    parallel = FolderListing(photos.resolve(), None, workers=8).wait()
    assert serial == parallel and len(serial) == 31
    assert [f.path for f in serial] == sorted(f.path for f in serial)
    assert not next(f for f in serial if f.path == "broken.png").readable


def test_walk_is_in_path_order_when_folder_names_share_a_start(tmp_path: Path) -> None:
    # "-", "." and " " sort before "/": folder "a" comes after "a-b", "a.old" and "a b"
    root = tmp_path / "root"
    for folder in ("a", "a-b", "a.old", "a b", "b"):
        (root / folder).mkdir(parents=True)
        (root / folder / "x.jpg").write_bytes(b"x")
    for name in ("a.jpg", "a-.jpg", "b.jpg", "0.jpg"):
        (root / name).write_bytes(b"x")
    listed = [rel for rel, _, _, _ in folderindex.walk(root)]
    assert listed == sorted(listed) and len(listed) == 9


def test_the_stored_listing_round_trips(tmp_path: Path) -> None:
    files = [folderindex.FolderFile(p, size, mtime, w, h, fmt, o) for p, size, mtime, w, h, fmt, o
             in [("a.jpg", 10, -5, 640, 480, "JPEG", 6), ("b/ü.png", 2**40, 2**62, 0, 0, "", 0),
                 ("b/z.webp", 0, 1, 1, 1, "WEBP", 1)]]
    for listing in (files, []):
        back = folderindex.decode_listing(folderindex.encode_listing(listing))
        assert back == listing and all(type(f) is folderindex.FolderFile for f in back)
    index = HeaderIndex(tmp_path / "folder", tmp_path / "index")
    index.save(files, "digest")
    assert index.load() == (files, "digest")
