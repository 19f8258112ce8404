"""One conformance suite for every storage backend (zarr's StoreTests pattern).

`BackendTests` holds the contract of `gristmill.store.objects.ObjectBackend` and
of `BlobStore` above it; each backend runs it through a subclass that says how
to open one. Backend-specific behaviour (filesystem layout and modes, RADOS
pieces) is tested in the subclasses.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gristmill.client.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Unavailable,
)
from gristmill.store.blobs import BlobStore, blob_key
from gristmill.store.ceph import CephBackend
from gristmill.store.config import CephBackendConfig
from gristmill.store.fsobjects import SMALL_OBJECTS, FsBackend
from gristmill.store.objects import ObjectBackend, ObjectMissing, PutResult, validate_key
from gristmill.store.smallobjects import WAL_KEPT_BYTES
from tests.ceph import CephCluster

PIECE = 64 * 1024  # small pieces, so that multi-piece values are cheap to test


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BackendTests:
    """The contract every backend keeps; subclasses provide `backend`."""

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ObjectBackend]:
        raise NotImplementedError

    @pytest.fixture
    def blobs(self, backend: ObjectBackend) -> BlobStore:
        return BlobStore(backend)

    # -- whole values -------------------------------------------------------------
    def test_put_read_stat_delete(self, backend: ObjectBackend) -> None:
        assert backend.stat("a/b") is None
        with pytest.raises(ObjectMissing):
            backend.read("a/b")
        first = backend.put("a/b", b"hello world")
        assert not first.conflict and first.version
        st = backend.stat("a/b")
        assert st is not None and st.size == 11 and st.version == first.version
        assert abs(st.mtime - time.time()) < 120
        assert backend.read("a/b") == b"hello world"
        assert backend.read("a/b", 6) == b"world"
        assert backend.read("a/b", 2, 3) == b"llo"
        assert backend.read("a/b", 20, 5) == b""
        result, freed = backend.delete("a/b")
        assert not result.conflict and freed == 11
        assert backend.stat("a/b") is None
        assert backend.delete("a/b") == (result, 0)

    def test_every_write_changes_the_version(self, backend: ObjectBackend) -> None:
        versions = {backend.put("k", bytes([i]) * 10).version for i in range(5)}
        assert len(versions) == 5

    def test_foreign_version_tokens_are_conflicts(self, backend: ObjectBackend) -> None:
        """A client's expected version is opaque and untrusted: a malformed one never matches."""
        current = backend.put("t", b"1").version
        for token in ("stale", "-1", "1.5", "ffff" * 40, "\x00"):
            result = backend.put("t", b"2", expected_version=token)
            assert result.conflict and result.version == current
            assert backend.delete("t", expected_version=token)[0].conflict
        assert backend.read("t") == b"1"

    def test_conditional_put_and_delete(self, backend: ObjectBackend) -> None:
        assert not backend.put("c", b"1", if_absent=True).conflict
        lost = backend.put("c", b"2", if_absent=True)
        assert lost.conflict and backend.read("c") == b"1"
        v1 = lost.version
        v2 = backend.put("c", b"2", expected_version=v1)
        assert not v2.conflict and backend.read("c") == b"2"
        stale = backend.put("c", b"3", expected_version=v1)
        assert stale.conflict and stale.version == v2.version and backend.read("c") == b"2"
        # "" expects absence
        assert backend.put("c", b"4", expected_version="").conflict
        result, freed = backend.delete("c", expected_version=v1)
        assert result.conflict and freed == 0 and backend.read("c") == b"2"
        result, freed = backend.delete("c", expected_version=v2.version)
        assert not result.conflict and freed == 1
        assert backend.put("c", b"5", expected_version="").conflict is False

    def test_read_versioned_is_consistent(self, backend: ObjectBackend) -> None:
        put = backend.put("v", b"abcdef")
        got = backend.read_versioned("v", 1, 3)
        assert got is not None
        data, st = got
        assert data == b"bcd" and st.version == put.version and st.size == 6
        assert backend.read_versioned("absent") is None

    def test_concurrent_read_modify_write_loses_nothing(self, backend: ObjectBackend) -> None:
        backend.put("counter", b"0")

        def bump(times: int) -> None:
            for _ in range(times):
                while True:
                    got = backend.read_versioned("counter")
                    assert got is not None
                    value, st = got
                    done = backend.put("counter", str(int(value) + 1).encode(),
                                       expected_version=st.version)
                    if not done.conflict:
                        break

        threads = [threading.Thread(target=bump, args=(15,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backend.read("counter") == b"60"

    def test_list_is_sorted_by_key_with_prefix_and_start_after(
            self, backend: ObjectBackend) -> None:
        keys = ["arr/a/c/0/1", "arr/a/c/0/10", "arr/a/c/0/2", "arr/a.b", "arr/a/zarr.json",
                "arr/b/zarr.json", "other/x"]
        for k in keys:
            backend.put(k, k.encode())
        listed = [s.key for s in backend.list_objects("arr/")]
        assert listed == sorted(k for k in keys if k.startswith("arr/"))
        assert [s.key for s in backend.list_objects("arr/a/")] == sorted(
            k for k in keys if k.startswith("arr/a/"))
        after = [s.key for s in backend.list_objects("arr/", start_after="arr/a/c/0/2")]
        assert after == ["arr/a/zarr.json", "arr/b/zarr.json"]
        assert [s.size for s in backend.list_objects("other/")] == [7]
        assert list(backend.list_objects("nothing/")) == []

    def test_batched_exists_and_reads(self, backend: ObjectBackend) -> None:
        backend.put("m/1", b"one")
        backend.put("m/2", b"two")
        assert backend.exists_many(["m/1", "m/x", "m/2"]) == [True, False, True]
        got = backend.read_many([("m/2", 1, 2), ("m/x", 0, -1), ("m/1", 0, -1)])
        assert got[0] is not None and got[0][0] == b"wo"
        assert got[1] is None
        assert got[2] is not None and got[2][0] == b"one"

    @pytest.mark.parametrize("key", ["", "/a", "a//b", "a/../b", "./a", "a/.", "a b", "a\x00b",
                                     "ä", "a/" * 600])
    def test_hostile_keys_are_refused(self, backend: ObjectBackend, key: str) -> None:
        with pytest.raises(InvalidArgument):
            validate_key(key)
        with pytest.raises(InvalidArgument):
            backend.put(key, b"x")
        with pytest.raises(InvalidArgument):
            backend.stat(key)

    # -- staged writes ------------------------------------------------------------
    def test_staged_values_appear_only_when_committed(self, backend: ObjectBackend) -> None:
        big = os.urandom(3 * PIECE + 123)
        s1, s2 = backend.stage(), backend.stage()
        for i in range(0, len(big), 10_000):
            s1.write(big[i:i + 10_000])
        s2.write(b"small")
        assert backend.stat("s/big") is None
        assert backend.commit([(s1, "s/big"), (s2, "s/small")]) == [True, True]
        st = backend.stat("s/big")
        assert st is not None and st.size == len(big)
        assert backend.read("s/big") == big
        assert backend.read("s/big", PIECE - 5, 10) == big[PIECE - 5:PIECE + 5]
        assert backend.read("s/big", 2 * PIECE, PIECE + 500) == big[2 * PIECE:]
        # an existing key keeps its value; the new staging is dropped
        s3 = backend.stage()
        s3.write(b"other")
        assert backend.commit([(s3, "s/small")]) == [False]
        assert backend.read("s/small") == b"small"
        assert self.staging_left(backend) == 0

    def test_aborted_staging_leaves_nothing(self, backend: ObjectBackend) -> None:
        s = backend.stage()
        s.write(os.urandom(2 * PIECE + 1))
        s.abort()
        s.abort()
        assert self.staging_left(backend) == 0

    def staging_left(self, backend: ObjectBackend) -> int:
        raise NotImplementedError

    # -- blobs over the backend ---------------------------------------------------
    def test_blob_round_trip_dedup_and_listing(self, blobs: BlobStore) -> None:
        data = os.urandom(2 * PIECE + 7)
        w = blobs.writer(sha(data))
        w.write(data[:1000])
        w.write(data[1000:])
        assert w.seal(sha(data), len(data)) == sha(data)
        blobs.publish([w])
        assert w.created and blobs.exists(sha(data))
        assert blobs.read(sha(data), 5, 10) == data[5:15]
        again = blobs.writer()
        again.write(data)
        again.seal()
        blobs.publish([again])
        assert not again.created
        assert [b.sha256 for b in blobs.stored_blobs()] == [sha(data)]
        assert blobs.exists_many([sha(data), sha(b"no")]) == [True, False]
        assert blobs.delete(sha(data)) == len(data)
        assert not blobs.exists(sha(data))

    def test_blob_checks(self, blobs: BlobStore) -> None:
        w = blobs.writer()
        w.write(b"abc")
        with pytest.raises(InvalidArgument, match="declared 4 bytes"):
            w.seal(expected_size=4)
        w = blobs.writer()
        w.write(b"abc")
        with pytest.raises(DataLoss, match="HASH_MISMATCH|hash to"):
            w.seal(sha(b"abd"))
        with pytest.raises(FailedPrecondition, match="missing"):
            blobs.read(sha(b"absent"), 0, 1)
        assert self.staging_left(blobs.backend) == 0

    def test_touch_never_creates(self, blobs: BlobStore) -> None:
        blobs.touch(sha(b"ghost"))
        assert not blobs.exists(sha(b"ghost"))

    def test_remove_temporaries_keeps_active_stagings(self, backend: ObjectBackend) -> None:
        s = backend.stage()
        s.write(os.urandom(PIECE + 1))
        assert backend.remove_temporaries(time.time() + 60) == (0, 0)
        s.abort()


class TestFsBackend(BackendTests):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ObjectBackend]:
        b = FsBackend(tmp_path / "store")
        yield b
        b.close()

    def staging_left(self, backend: ObjectBackend) -> int:
        assert isinstance(backend, FsBackend)
        return len(list(backend.tmp_dir.iterdir()))

    def test_layout_is_files_under_the_root_and_private(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        blobs = BlobStore(backend)
        w = blobs.writer()
        w.write(b"layout")
        digest = w.seal()
        blobs.publish([w])
        path = backend.root / "blobs" / digest[:2] / digest[2:4] / digest
        assert path.read_bytes() == b"layout"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        backend.put("arrays/x/zarr.json", b"{}")
        assert (backend.root / "arrays" / "x" / "zarr.json").read_bytes() == b"{}"

    def test_symlinks_are_not_followed(self, backend: ObjectBackend, tmp_path: Path) -> None:
        assert isinstance(backend, FsBackend)
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret").write_bytes(b"secret")
        (backend.root / "link").symlink_to(outside)
        with pytest.raises(FailedPrecondition, match="symlink"):
            backend.read("link/secret")
        (backend.root / "file").symlink_to(outside / "secret")
        with pytest.raises(FailedPrecondition):
            backend.read("file")

    def test_deletes_prune_empty_directories_and_writes_recreate_them(
            self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        backend.put("arrays/a/c/0/0", b"1")
        backend.put("arrays/a/zarr.json", b"{}")
        backend.delete("arrays/a/c/0/0")
        assert not (backend.root / "arrays" / "a" / "c").exists()  # plain zarr sees no chunk dir
        assert (backend.root / "arrays" / "a" / "zarr.json").exists()
        backend.delete("arrays/a/zarr.json")
        assert not (backend.root / "arrays").exists()
        assert not backend.put("arrays/a/c/1/1", b"2").conflict
        assert backend.read("arrays/a/c/1/1") == b"2"

    def test_old_temporaries_are_removed(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        left = backend.tmp_dir / "crashed.part"
        left.write_bytes(b"x" * 10)
        os.utime(left, (time.time() - 3600, time.time() - 3600))
        assert backend.remove_temporaries(time.time() - 60) == (1, 10)
        assert not left.exists()


class TestFsBackendWithRows(BackendTests):
    """The filesystem backend keeping staged values up to PIECE bytes as SQLite rows.

    The whole contract holds with both kinds at once: ``s/small`` is a row,
    ``s/big`` (over the limit) a file.
    """

    @pytest.fixture
    def backend(self, tmp_path: Path) -> Iterator[ObjectBackend]:
        b = FsBackend(tmp_path / "store", inline_max_bytes=PIECE)
        yield b
        b.close()

    def staging_left(self, backend: ObjectBackend) -> int:
        assert isinstance(backend, FsBackend)
        return len(list(backend.tmp_dir.iterdir()))

    @staticmethod
    def rows(backend: FsBackend) -> dict[str, bytes]:
        with sqlite3.connect(backend.root / SMALL_OBJECTS) as conn:
            return dict(conn.execute("SELECT key, data FROM objects"))

    @staticmethod
    def files(backend: FsBackend) -> list[str]:
        return sorted(str(p.relative_to(backend.root)) for p in backend.root.rglob("*")
                      if p.is_file() and p.parent != backend.root
                      and p.parent.name not in ("tmp", "locks"))

    def test_small_values_are_rows_large_ones_files(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        blobs = BlobStore(backend)
        small, large = os.urandom(PIECE), os.urandom(PIECE + 1)
        writers = []
        for data in (small, large):
            w = blobs.writer(sha(data))
            for i in range(0, len(data), 10_000):  # arriving in pieces, as uploads do
                w.write(data[i:i + 10_000])
            w.seal(sha(data), len(data))
            writers.append(w)
        blobs.publish(writers)
        assert [w.created for w in writers] == [True, True]
        assert self.rows(backend) == {blob_key(sha(small)): small}
        assert self.files(backend) == [blob_key(sha(large))]
        assert stat.S_IMODE((backend.root / SMALL_OBJECTS).stat().st_mode) == 0o600
        assert blobs.read(sha(small), 0, PIECE) == small
        assert [b.sha256 for b in blobs.stored_blobs()] == sorted([sha(small), sha(large)])
        # put (array chunks) always writes files, which plain zarr-python reads
        backend.put("arrays/x/zarr.json", b"{}")
        assert (backend.root / "arrays" / "x" / "zarr.json").read_bytes() == b"{}"

    def test_rows_survive_a_restart_and_are_read_with_rows_turned_off(
            self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        s = backend.stage()
        s.write(b"kept as a row")
        assert backend.commit([(s, "blobs/k")]) == [True]
        backend.close()
        plain = FsBackend(backend.root)  # inline_max_bytes=0: new values become files
        try:
            assert plain.read("blobs/k") == b"kept as a row"
            assert [st.key for st in plain.list_objects("blobs/")] == ["blobs/k"]
            again = plain.stage()
            again.write(b"kept as a row")
            assert plain.commit([(again, "blobs/k")]) == [False]  # stored already, as a row
            new = plain.stage()
            new.write(b"a file")
            assert plain.commit([(new, "blobs/n")]) == [True]
            assert (plain.root / "blobs" / "n").read_bytes() == b"a file"
        finally:
            plain.close()

    def test_a_key_stored_as_a_file_is_not_stored_again_as_a_row(
            self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        (backend.root / "blobs").mkdir()
        (backend.root / "blobs" / "f").write_bytes(b"file")
        s = backend.stage()
        s.write(b"file")
        assert backend.commit([(s, "blobs/f")]) == [False]
        assert self.rows(backend) == {}
        twice = [backend.stage(), backend.stage()]
        for st in twice:
            st.write(b"same")
        assert backend.commit([(twice[0], "blobs/t"), (twice[1], "blobs/t")]) == [True, False]

    def test_put_replaces_a_row_and_guards_its_version(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        s = backend.stage()
        s.write(b"row")
        backend.commit([(s, "k/v")])
        row = backend.stat("k/v")
        assert row is not None and row.version.startswith("row")
        assert backend.put("k/v", b"x", expected_version="stale").conflict
        assert backend.read("k/v") == b"row"
        done = backend.put("k/v", b"file now", expected_version=row.version)
        assert not done.conflict and backend.read("k/v") == b"file now"
        assert self.rows(backend) == {}
        assert [st.key for st in backend.list_objects("k/")] == ["k/v"]

    def test_rows_and_files_list_merged_in_key_order(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        for key in ("p/b", "p/d/x", "q/a"):
            s = backend.stage()
            s.write(key.encode())
            backend.commit([(s, key)])
        for key in ("p/a", "p/c", "p/d/y"):
            backend.put(key, key.encode())
        assert [st.key for st in backend.list_objects("p/")] == ["p/a", "p/b", "p/c", "p/d/x",
                                                                 "p/d/y"]
        assert [st.key for st in backend.list_objects("p/", start_after="p/c")] == ["p/d/x",
                                                                                   "p/d/y"]
        assert [st.key for st in backend.list_objects("p/d")] == ["p/d/x", "p/d/y"]
        assert backend.exists_many(["p/b", "p/a", "p/z"]) == [True, True, False]
        got = backend.read_many([("p/b", 1, 2), ("p/c", 0, -1), ("p/z", 0, 1)])
        assert got[0] is not None and got[0][0] == b"/b"
        assert got[1] is not None and got[1][0] == b"p/c"
        assert got[2] is None

    def test_touch_and_delete_rows(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        s = backend.stage()
        s.write(b"old")
        backend.commit([(s, "blobs/old")])
        with sqlite3.connect(backend.root / SMALL_OBJECTS) as conn:
            conn.execute("UPDATE objects SET mtime_ns = ?", [int((time.time() - 7200) * 1e9)])
        before = backend.stat("blobs/old")
        assert before is not None and before.mtime < time.time() - 3600
        backend.touch("blobs/old")
        after = backend.stat("blobs/old")
        assert after is not None and after.mtime > time.time() - 60
        assert backend.delete("blobs/old", expected_version=before.version)[0].conflict
        assert backend.delete("blobs/old") == (PutResult(False, ""), 3)
        assert backend.stat("blobs/old") is None and self.rows(backend) == {}
        with pytest.raises(Internal, match="negative offset"):
            backend.read("blobs/other", -1)

    def test_deleted_rows_give_their_space_back(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        keys = [f"blobs/{i:04d}" for i in range(2000)]
        for i in range(0, len(keys), 500):
            stagings = [(backend.stage(), key) for key in keys[i:i + 500]]
            for st, _ in stagings:
                st.write(os.urandom(8000))
            backend.commit(stagings)
        path = backend.root / SMALL_OBJECTS
        full = path.stat().st_size
        for key in keys[::2]:
            backend.delete(key)
        assert backend.reclaim() > 6_000_000
        assert path.stat().st_size < full * 0.6
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size <= WAL_KEPT_BYTES
        assert backend.read(keys[1]) and backend.stat(keys[0]) is None
        assert backend.reclaim() == 0

    def test_a_key_both_row_and_file_reads_lists_and_deletes_as_one(
            self, backend: ObjectBackend) -> None:
        """What a put that died between its rename and its row delete leaves."""
        assert isinstance(backend, FsBackend)
        s = backend.stage()
        s.write(b"the row")
        backend.commit([(s, "k/v")])
        (backend.root / "k").mkdir()
        (backend.root / "k" / "v").write_bytes(b"a file")
        row = backend.stat("k/v")
        assert row is not None and row.version.startswith("row")
        assert backend.read("k/v") == b"the row"
        assert [(st.key, st.version) for st in backend.list_objects("k/")] == [("k/v",
                                                                               row.version)]
        assert backend.delete("k/v") == (PutResult(False, ""), 7)
        assert backend.stat("k/v") is None and list(backend.list_objects("k/")) == []
        assert not (backend.root / "k" / "v").exists()

    def test_close_waits_for_calls_in_flight_and_refuses_later_ones(
            self, backend: ObjectBackend) -> None:
        assert isinstance(backend, FsBackend)
        s = backend.stage()
        s.write(b"v")
        backend.commit([(s, "blobs/v")])
        stop = threading.Event()
        errors: list[BaseException] = []

        def read() -> None:
            while not stop.is_set():
                try:
                    backend.read("blobs/v")
                except Exception as e:  # after close: a domain error, never a crash
                    errors.append(e)
                    return

        readers = [threading.Thread(target=read) for _ in range(4)]
        for t in readers:
            t.start()
        time.sleep(0.05)
        backend.close()
        stop.set()
        for t in readers:
            t.join()
        assert errors and all(isinstance(e, Internal) and "shutting down" in e.message
                              for e in errors)


class TestCephBackend(BackendTests):
    @pytest.fixture
    def backend(self, ceph_cluster: CephCluster) -> Iterator[ObjectBackend]:
        config = CephBackendConfig(conf=ceph_cluster.conf, pool=ceph_cluster.pool,
                                   namespace=f"t{os.urandom(8).hex()}", timeout_seconds=5,
                                   piece_bytes=PIECE)
        b = CephBackend(config)
        yield b
        b.close()

    def staging_left(self, backend: ObjectBackend) -> int:
        """Stagings in progress, and pieces that no published head names."""
        assert isinstance(backend, CephBackend)
        return len(backend._active) + backend.remove_temporaries(time.time() + 60,
                                                                 dry_run=True)[0]

    def test_close_waits_for_calls_in_flight_then_refuses_new_ones(
            self, backend: ObjectBackend) -> None:
        """Shutting librados down under a waiting call would leave that call waiting forever."""
        assert isinstance(backend, CephBackend)
        backend.put("k/v", b"value")
        io = backend._io()
        inside, release = threading.Event(), threading.Event()

        class SlowIo:  # an I/O context whose reads are held until released
            def __getattr__(self, name: str) -> Any:
                return getattr(io, name)

            def read(self, *args: Any) -> Any:
                inside.set()
                release.wait(10)
                return io.read(*args)
        slow = SlowIo()
        backend._io = lambda: slow  # type: ignore[method-assign]
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(backend.read("k/v", 0, 5)))
        reader.start()
        assert inside.wait(5)
        closer = threading.Thread(target=backend.close)
        closer.start()
        closer.join(0.5)
        assert closer.is_alive()  # waits for the read instead of shutting down under it
        release.set()
        reader.join(10)
        closer.join(10)
        assert got == [b"value"] and not closer.is_alive()
        with pytest.raises(Unavailable, match="shutting down"):
            backend.stat("k/v")

    def test_large_values_are_pieces_no_object_larger(self, backend: ObjectBackend,
                                                      ceph_cluster: CephCluster) -> None:
        assert isinstance(backend, CephBackend)
        blobs = BlobStore(backend)
        data = os.urandom(5 * PIECE + 3)
        w = blobs.writer()
        w.write(data)
        digest = w.seal()
        blobs.publish([w])
        io: Any = backend._io()
        sizes = {o.key: io.stat(o.key)[0] for o in io.list_objects()
                 if not o.key.startswith("~")}
        pieces = [k for k in sizes if k.startswith("pieces/")]
        assert len(pieces) == 6 and max(sizes.values()) <= PIECE
        assert sizes[blob_key(digest)] == 0  # the head carries the piece list in xattrs
        assert blobs.read(digest, 0, len(data)) == data
        assert blobs.delete(digest) == len(data)
        # only the (empty) listing index and piece registry objects are left
        left = [o.key for o in io.list_objects()]
        assert all(k.startswith("~") and io.stat(k)[0] == 0 for k in left), left
        assert list(backend.list_objects("")) == []

    def test_listing_visits_only_the_prefix(self, backend: ObjectBackend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
        """A listing reads the index of the directories under its prefix, not the pool."""
        assert isinstance(backend, CephBackend)
        for i in range(30):
            backend.put(f"noise/d{i}/x", b"n")
        backend.put("arrays/a/zarr.json", b"{}")
        backend.put("arrays/a/c/0/0", b"1")
        backend.put("arrays/b/zarr.json", b"{}")
        visited: list[str] = []
        real = backend._index_page

        def page(directory: str, after: str, only: str) -> list[str]:
            visited.append(directory)
            return real(directory, after, only)
        monkeypatch.setattr(backend, "_index_page", page)
        assert [s.key for s in backend.list_objects("arrays/a/")] == ["arrays/a/c/0/0",
                                                                      "arrays/a/zarr.json"]
        assert sorted(visited) == ["arrays/a", "arrays/a/c", "arrays/a/c/0"]
        visited.clear()
        assert [s.key for s in backend.list_objects("arrays/")][-1] == "arrays/b/zarr.json"
        assert not any(d.startswith("noise") for d in visited)

    def test_crashed_stagings_are_collected(self, backend: ObjectBackend) -> None:
        assert isinstance(backend, CephBackend)
        s = backend.stage()
        s.write(os.urandom(2 * PIECE + 1))
        backend._active.discard(s.id)  # as if its process had died
        assert backend.remove_temporaries(time.time() - 3600) == (0, 0)  # too young
        count, freed = backend.remove_temporaries(time.time() + 60)
        assert count == 2 and freed == 2 * PIECE
        assert self.staging_left(backend) == 0
