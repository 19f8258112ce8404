r"""The store's catalog in the Ceph pool: no local state that another replica cannot see.

Every store replica that opens the same pool and namespace sees the same
datasets, heads and versions. Objects (names start with ``~cat/``, which no
key can: see :func:`gristmill.store.objects.validate_key`):

``~cat/info``
    omap ``store_id`` and ``schema``.
``~cat/datasets``
    omap ``d:<name>`` -> the dataset's record (JSON: a random ``uid`` made at
    creation, description, created, shard count) and ``t:<uid>`` -> a
    deleted dataset whose objects are still being removed.
``~cat/ds/<uid>/h/<k>``
    shard ``k`` of the head: omap ``<path>`` -> the entry (JSON), and
    ``\\x01`` -> "count bytes revision" of the shard, changed by the same
    write operation as the entries. A path's shard is ``crc32(path) % shards``,
    so no object holds more than a fraction of a big dataset's entries (Ceph
    warns about omaps of more than 200,000 keys).
``~cat/ds/<uid>/versions``
    omap ``v:<newest first>`` -> a version's record and ``i:<id>`` -> its
    ``v:`` key (lookup by id prefix).
``~cat/ds/<uid>/v/<id>/<k>``
    shard ``k`` of a committed version's entries, written before its record.

Each change of one object is one atomic write operation. A read-modify-write
(a shard's entries and its counters) reads the object's RADOS version and
writes with ``assert_version``: a concurrent writer makes it read again, so
no update is lost, whatever replica made it; "only if absent" is an
``omap_cmp`` against the empty value. A change that spans objects is ordered
so that a crash leaves nothing visible that is wrong:

- an upload is recorded shard by shard (a crash midway leaves some of its
  files in the head, each complete and stored; the client's retry adds the
  rest);
- a version's shards are copied first and published by its record, and the
  copy is kept only if no head shard changed meanwhile (the shards'
  versions are compared before and after), so a version is one instant of
  the head;
- a deleted dataset's record goes (and its trash entry comes) in one write,
  then its objects; garbage collection finishes what a crash left.

Blobs are not counted by reference here: the catalog is shared, so a blob no
head or version refers to any more is removed by garbage collection, which
marks every blob a head or version refers to and then removes older
unreferenced ones (``shared = True``; see :mod:`gristmill.store.gc`).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import heapq
import json
import logging
import random
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gristmill.client.errors import (
    FailedPrecondition,
    GristmillError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from gristmill.store import metrics as store_metrics
from gristmill.store.blobs import blob_key
from gristmill.store.catalog import (
    BlobGuard,
    DatasetRow,
    EntryRow,
    HeadKey,
    VersionRow,
    entry_from_row,
    now,
    version_line,
)
from gristmill.v1 import store_pb2

if TYPE_CHECKING:
    from gristmill.store.ceph import CephBackend

__all__ = ["POOL_SCHEMA", "PoolCatalog"]

T = TypeVar("T")
log = logging.getLogger("gristmill.store")
#: Version of the objects' layout, kept in ``~cat/info``.
POOL_SCHEMA = 1
_INFO = "~cat/info"
_DATASETS = "~cat/datasets"
#: A shard's counters: sorts before every path (paths have no control characters).
_COUNTS = "\x01"
#: How long a commit holds a dataset (its ``c`` key lapses after it: a crashed commit).
_COMMIT_LEASE = 600.0
#: How long a writer's ``w:`` key holds (recording one call's files takes milliseconds).
_WRITER_LEASE = 60.0
#: How long an upload or delete waits for a commit of its dataset, and a commit for
#: another commit or for writers, before UNAVAILABLE (the client retries).
_WAIT_SECONDS = 30.0
_PAGE = 1000
_ROWS_PAGE = 4096
#: Lost races before a change gives up (each waits a little longer, at random).
_RETRIES = 64
_COMMIT_TRIES = 8
_LATEST = "latest"
_HEX_DESC = str.maketrans("0123456789abcdef", "fedcba9876543210")


def _rados() -> Any:
    from gristmill.store.ceph import _rados as load
    return load()


@dataclass(frozen=True)
class _Record:
    """A dataset's record in ``~cat/datasets`` and the names of its objects."""

    name: str
    uid: str
    description: str
    created: str
    shards: int
    raw: str

    @classmethod
    def load(cls, name: str, raw: bytes) -> _Record:
        """A record as stored under ``d:<name>``."""
        d = json.loads(raw)
        return cls(name, d["uid"], d["description"], d["created"], int(d["shards"]),
                   raw.decode())

    def head(self, k: int) -> str:
        """Shard ``k`` of the head."""
        return f"~cat/ds/{self.uid}/h/{k}"

    @property
    def versions(self) -> str:
        """The version list (``v:`` and ``i:`` keys)."""
        return f"~cat/ds/{self.uid}/versions"

    @property
    def lock(self) -> str:
        """Its omap: ``c`` -> the commit holding the dataset, ``w:<token>`` -> writers in it."""
        return f"~cat/ds/{self.uid}/lock"

    def version(self, vid: str, copy: str, k: int) -> str:
        """Shard ``k`` of the copy ``copy`` (one per commit attempt) of version ``vid``."""
        return f"~cat/ds/{self.uid}/v/{vid}/{copy}/{k}"

    def shard_of(self, path: str) -> int:
        """The shard a path's entry is in."""
        return zlib.crc32(path.encode()) % self.shards


def _encode(e: store_pb2.FileEntry) -> bytes:
    img = e.image if e.HasField("image") else None
    return json.dumps([e.sha256, e.size, e.media_type, img.width if img else None,
                       img.height if img else None, img.format if img else None,
                       img.orientation if img else None], separators=(",", ":")).encode()


def _row(path: str, raw: bytes) -> EntryRow:
    return (path, *json.loads(raw))


def _counts(raw: bytes | None) -> tuple[int, int, int]:
    if not raw:
        return 0, 0, 0
    count, size, rev = raw.split()
    return int(count), int(size), int(rev)


def _lease(seconds: float) -> str:
    """A lease value: "<token> <expiry, epoch seconds>"."""
    return f"{uuid.uuid4().hex} {time.time() + seconds:.3f}"


def _live(lease: bytes | str | None) -> bool:
    """Whether a lease has not lapsed (compared with this host's clock)."""
    if not lease:
        return False
    text = lease.decode() if isinstance(lease, bytes) else lease
    try:
        return time.time() < float(text.rpartition(" ")[2])
    except ValueError:
        return False


def _version_key(created: str, vid: str) -> str:
    """``v:`` key that sorts newest first (then by id, descending)."""
    at = dt.datetime.fromisoformat(created)
    micros = int(at.timestamp()) * 1_000_000 + at.microsecond
    return f"v:{10**17 - micros:017d}:{vid.translate(_HEX_DESC)}"


def _version_row(dataset: str, raw: bytes) -> VersionRow:
    d = json.loads(raw)
    return VersionRow(dataset, d["id"], d["created"], int(d["count"]), int(d["bytes"]))


class _Changed(Exception):
    """A shard changed while it was read as one instant (a commit tries again)."""


class _PoolGuard:
    """:class:`BlobGuard` from a mark of every blob a head or version refers to."""

    def __init__(self, catalog: PoolCatalog) -> None:
        self.catalog = catalog

    def referenced(self, shas: list[str]) -> set[str]:
        """See :class:`~gristmill.store.catalog.BlobGuard`."""
        return set(shas) & self.catalog.marked()

    def forget(self, shas: list[str]) -> None:
        """Nothing to do: the pool catalog keeps no blob registry."""


class PoolCatalog:
    """Datasets, heads and versions as omap objects of the store's Ceph pool."""

    shared = True

    def __init__(self, backend: CephBackend, path: Path, shards: int = 16) -> None:
        self.backend = backend
        #: Where local caches go (committed manifests: ``path.parent / "manifests"``).
        self.path = path
        self.on_full: Callable[[], bool] | None = None
        self.shards = shards
        self._store_id = ""
        self._mark: set[str] | None = None
        #: (uid, version id) -> (``v:`` key, copy) of versions read (they never change)
        self._versions_seen: dict[tuple[str, str], tuple[str, str]] = {}
        try:  # made and checked now if the cluster answers; else at the first create
            self.store_id  # noqa: B018
        except Unavailable as e:
            log.warning("%s", e)

    # -- raw reads and writes ----------------------------------------------------------
    def _read(self, oid: str, *, keys: Iterable[str] | None = None, after: str = "",
              prefix: str = "", limit: int = _PAGE) -> tuple[list[tuple[str, bytes]], int | None]:
        """Omap entries of ``oid`` (by keys, or a page) and the version read.

        An absent object reads as ``([], None)``.
        """
        rados = _rados()

        def body(io: Any) -> tuple[list[tuple[str, bytes]], int | None]:
            with rados.ReadOpCtx() as op:
                if keys is not None:
                    it, _ = io.get_omap_vals_by_keys(op, tuple(keys))
                else:
                    it, _ = io.get_omap_vals(op, after, prefix, limit)
                try:
                    io.operate_read_op(op, oid)
                except rados.ObjectNotFound:
                    return [], None
                return [(str(k), bytes(v)) for k, v in it], int(io.get_last_version())
        return self.backend.call("read the catalog", body)

    def _read_many(self, oids: list[str], keys: list[str]) -> list[dict[str, bytes]]:
        """The same omap keys of several objects, in one round trip (aio)."""

        def body(io: Any) -> list[dict[str, bytes]]:
            ops: list[tuple[Any, Any, Any]] = []
            try:
                for oid in oids:
                    op = io.create_read_op()
                    it, _ = io.get_omap_vals_by_keys(op, tuple(keys))
                    ops.append((op, it, io.operate_aio_read_op(op, oid)))
                codes = []
                for _, _, completion in ops:
                    completion.wait_for_complete()
                    codes.append(completion.get_return_value())
                self.backend.check_codes("read the catalog", codes)
                # an absent object (ENOENT) reads as no keys
                return [{str(k): bytes(v) for k, v in it} if code >= 0 else {}
                        for (_, it, _), code in zip(ops, codes, strict=True)]
            finally:
                for op, _, _ in ops:
                    io.release_read_op(op)
        return self.backend.call("read the catalog", body)

    def _write(self, oid: str, what: str, sets: dict[str, bytes] | None = None,
               removes: Iterable[str] = (), *, version: int | None = -1,
               absent: Iterable[str] = (), equal: dict[str, str] | None = None) -> int | None:
        """One atomic write operation on ``oid``: the object's version after it.

        None if its guard failed (a lost race).

        ``version``: the object's version as read (None: it must not exist
        yet; -1: any, made if missing); ``absent``: omap keys that must not
        exist; ``equal``: omap keys that must hold these values.
        """
        rados = _rados()
        sets = sets or {}
        removes = tuple(removes)

        def body(io: Any) -> int | None:
            with rados.WriteOpCtx() as op:
                if version is None:
                    op.new(rados.LIBRADOS_CREATE_EXCLUSIVE)
                elif version < 0:
                    op.new(rados.LIBRADOS_CREATE_IDEMPOTENT)
                else:
                    op.assert_version(version)
                for key in absent:
                    op.omap_cmp(key, "", rados.LIBRADOS_CMPXATTR_OP_EQ)
                for key, value in (equal or {}).items():
                    op.omap_cmp(key, value, rados.LIBRADOS_CMPXATTR_OP_EQ)
                if sets:
                    io.set_omap(op, tuple(sets), tuple(sets.values()))
                if removes:
                    io.remove_omap_keys(op, removes)
                try:
                    io.operate_write_op(op, oid)
                except rados.Error as e:
                    code = abs(getattr(e, "errno", 0) or 0)
                    if isinstance(e, rados.ObjectExists) or code in (
                            errno.EEXIST, errno.ERANGE, errno.EOVERFLOW, errno.ECANCELED):
                        return None
                    raise
                return int(io.get_last_version())
        return self.backend.call(what, body)

    def _update(self, oid: str, what: str, keys: list[str],
                change: Callable[[dict[str, bytes]], tuple[dict[str, bytes], list[str], T]]
                ) -> T:
        """Read ``keys`` of ``oid``, compute a change, write it guarded by the version read."""
        for attempt in range(_RETRIES):
            got, version = self._read(oid, keys=keys)
            sets, removes, result = change(dict(got))
            if not sets and not removes:
                return result
            if self._write(oid, what, sets, removes, version=version) is not None:
                return result
            store_metrics.CATALOG_WAITS.labels("conflict").inc()
            time.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 7)))
        raise Unavailable(f"cannot {what}: other writers changed it {_RETRIES} times in a row; "
                          "retry", reason="CATALOG_BUSY")

    def _remove(self, oids: list[str]) -> None:
        """Remove objects (aio; absent ones are fine)."""

        def body(io: Any) -> None:
            completions = [io.aio_remove(oid) for oid in oids]
            for c in completions:
                c.wait_for_complete()
            self.backend.check_codes("remove catalog objects",
                                     [c.get_return_value() for c in completions])
        self.backend.call("remove catalog objects", body)

    def _acquire(self, oid: str, key: str, what: str, waiting_for: str,
                 lease: str, absent: list[str]) -> None:
        """Set ``key`` to ``lease`` once ``absent`` keys are absent (a lapsed one is cleared)."""
        deadline = time.monotonic() + _WAIT_SECONDS
        while self._write(oid, what, {key: lease.encode()}, absent=absent) is None:
            store_metrics.CATALOG_WAITS.labels("lease").inc()
            held = dict(self._read(oid, keys=absent)[0])
            for k, value in held.items():
                if not _live(value):  # its holder died: take its place
                    self._write(oid, what, removes=[k], equal={k: value.decode()})
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot {what}: {waiting_for} for {_WAIT_SECONDS:g} s; retry "
                                  "in a moment", reason="CATALOG_BUSY")
            time.sleep(random.uniform(0.005, 0.05))

    def _release(self, oid: str, key: str, lease: str) -> None:
        """Drop a lease (best effort: it lapses anyway)."""
        try:
            self._write(oid, "release a catalog lease", removes=[key], equal={key: lease})
        except GristmillError:
            log.warning("cannot release %s of %s now; it lapses by itself", key, oid,
                        exc_info=True)

    @contextmanager
    def _writing(self, rec: _Record, what: str) -> Iterator[None]:
        """A writer of ``rec``'s head: waits while a commit holds the dataset."""
        lease = _lease(_WRITER_LEASE)
        key = "w:" + lease.partition(" ")[0]
        self._acquire(rec.lock, key, what, "a commit of the dataset has held it", lease, ["c"])
        try:
            yield
        finally:
            self._release(rec.lock, key, lease)

    # -- info ----------------------------------------------------------------------------
    @property
    def store_id(self) -> str:
        """This store's id: made once per pool namespace, shared by every replica."""
        if not self._store_id:
            made = uuid.uuid4().hex
            self._write(_INFO, "record the store's id", {"store_id": made.encode(),
                                                         "schema": str(POOL_SCHEMA).encode()},
                        absent=["store_id"])
            got = dict(self._read(_INFO, keys=["store_id", "schema"])[0])
            schema = int(got.get("schema", b"0"))
            if schema > POOL_SCHEMA:
                raise FailedPrecondition(
                    f"the catalog in {self.backend.describe()} was written by a newer gristmill "
                    f"(layout {schema}, this one knows {POOL_SCHEMA}); upgrade this server",
                    reason="CATALOG_TOO_NEW")
            self._store_id = got["store_id"].decode()
        return self._store_id

    # -- datasets ------------------------------------------------------------------------
    def _record(self, name: str) -> _Record | None:
        got = self._read(_DATASETS, keys=["d:" + name])[0]
        return _Record.load(name, got[0][1]) if got else None

    def _existing(self, name: str) -> _Record:
        rec = self._record(name)
        if rec is None:
            raise NotFound(f"dataset {name!r} does not exist (deleted meanwhile?)",
                           reason="DATASET_NOT_FOUND", metadata={"dataset": name})
        return rec

    def create_dataset(self, name: str, description: str, created: str = "") -> bool:
        """Record a new dataset; False if the name is taken."""
        self.store_id  # noqa: B018 - the pool's catalog is made (and checked) first
        raw = json.dumps({"uid": uuid.uuid4().hex, "description": description,
                          "created": created or now(), "shards": self.shards}).encode()
        return self._write(_DATASETS, f"create dataset {name!r}", {"d:" + name: raw},
                           absent=["d:" + name]) is not None

    def exists(self, name: str) -> bool:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        return self._record(name) is not None

    def _totals(self, rec: _Record) -> tuple[int, int, int]:
        """(files, bytes, revision) of the head: its shards' counters summed (one round trip)."""
        got = self._read_many([rec.head(k) for k in range(rec.shards)], [_COUNTS])
        state = [_counts(g.get(_COUNTS)) for g in got]
        return sum(s[0] for s in state), sum(s[1] for s in state), sum(s[2] for s in state)

    def _latest(self, rec: _Record) -> str:
        got = self._read(rec.versions, prefix="v:", limit=1)[0]
        return str(json.loads(got[0][1])["id"]) if got else ""

    def _summary(self, rec: _Record) -> DatasetRow:
        count, total, _ = self._totals(rec)
        return DatasetRow(rec.name, rec.description, rec.created, count, total,
                          self._latest(rec))

    def dataset(self, name: str) -> DatasetRow | None:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._record(name)
        return None if rec is None else self._summary(rec)

    def datasets(self, after: str | None, limit: int) -> list[DatasetRow]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        got = self._read(_DATASETS, after="d:" + after if after else "", prefix="d:",
                         limit=limit)[0]
        return [self._summary(_Record.load(k[2:], raw)) for k, raw in got]

    def delete_dataset(self, name: str) -> list[tuple[str, int]]:
        """Remove the dataset's record, then its objects; its blobs are left to gc."""
        for _ in range(_RETRIES):
            rec = self._record(name)
            if rec is None:
                return []
            trash = json.dumps({"name": name, "shards": rec.shards}).encode()
            if self._write(_DATASETS, f"delete dataset {name!r}", {"t:" + rec.uid: trash},
                           ["d:" + name], equal={"d:" + name: rec.raw}) is not None:
                try:
                    self._purge(rec)
                except GristmillError:  # deleted for every replica already; gc finishes it
                    log.warning("cannot remove the objects of deleted dataset %r now; "
                                "`gristmill store gc` will", name, exc_info=True)
                return []
        raise Unavailable(f"cannot delete dataset {name!r}: it keeps changing; retry",
                          reason="CATALOG_BUSY")

    def _purge(self, rec: _Record) -> None:
        """Remove a deleted dataset's objects, then its trash entry (kept if one stays)."""
        oids = [rec.head(k) for k in range(rec.shards)]
        for key, raw in self._all(rec.versions, "i:") + self._all(rec.versions, "a:"):
            vid, copy = (key[2:], json.loads(raw)["copy"]) if key[0] == "i" else (
                raw.decode(), key[2:])
            oids += [rec.version(vid, copy, k) for k in range(rec.shards)]
        for i in range(0, len(oids), 256):
            self._remove(oids[i:i + 256])
        self._remove([rec.versions, rec.lock])
        self._write(_DATASETS, "finish deleting a dataset", removes=["t:" + rec.uid])

    def _all(self, oid: str, prefix: str) -> list[tuple[str, bytes]]:
        """Every omap entry of ``oid`` under ``prefix`` (a printable one), page by page."""
        return list(self._scan(oid, prefix=prefix))

    def purge_deleted(self) -> int:
        """Finish deleting datasets whose removal a crash interrupted; returns how many."""
        got = self._read(_DATASETS, prefix="t:", limit=_PAGE)[0]
        for key, raw in got:
            d = json.loads(raw)
            self._purge(_Record(d["name"], key[2:], "", "", int(d["shards"]), ""))
        return len(got)

    # -- head files ----------------------------------------------------------------------
    def _grouped(self, rec: _Record, paths: Iterable[str]) -> dict[int, list[str]]:
        shards: dict[int, list[str]] = {}
        for path in dict.fromkeys(paths):
            shards.setdefault(rec.shard_of(path), []).append(path)
        return shards

    def add_files(self, dataset: str, entries: list[store_pb2.FileEntry]) -> None:
        """Add or replace head entries: one guarded write per shard touched."""
        rec = self._existing(dataset)
        latest = {e.path: e for e in entries}  # a path sent twice: its last entry
        what = f"record uploaded files in dataset {dataset!r}"
        with self._writing(rec, what):
            self._add(rec, latest, what)
        self._still(rec)

    def _add(self, rec: _Record, latest: dict[str, store_pb2.FileEntry], what: str) -> None:
        for k, paths in sorted(self._grouped(rec, latest).items()):
            def change(current: dict[str, bytes], paths: list[str] = paths
                       ) -> tuple[dict[str, bytes], list[str], None]:
                count, size, rev = _counts(current.get(_COUNTS))
                sets: dict[str, bytes] = {}
                for path in paths:
                    old = current.get(path)
                    if old is not None:
                        count, size = count - 1, size - int(json.loads(old)[1])
                    e = latest[path]
                    count, size = count + 1, size + e.size
                    sets[path] = _encode(e)
                sets[_COUNTS] = f"{count} {size} {rev + 1}".encode()
                return sets, [], None
            self._update(rec.head(k), what, [_COUNTS, *paths], change)

    def _still(self, rec: _Record) -> None:
        """NotFound (and the objects just written removed) if the dataset went meanwhile."""
        now_rec = self._record(rec.name)
        if now_rec is None or now_rec.uid != rec.uid:
            self._purge(rec)
            raise NotFound(f"dataset {rec.name!r} was deleted while it was being changed",
                           reason="DATASET_NOT_FOUND", metadata={"dataset": rec.name})

    def delete_files(self, dataset: str, paths: list[str]) -> tuple[int, list[tuple[str, int]]]:
        """Remove head entries; returns (count, []): blobs are left to gc."""
        rec = self._existing(dataset)
        what = f"delete files of dataset {dataset!r}"
        with self._writing(rec, what):
            deleted = self._delete(rec, paths, what)
        self._still(rec)
        return deleted, []

    def _delete(self, rec: _Record, paths: list[str], what: str) -> int:
        deleted = 0
        for k, group in sorted(self._grouped(rec, paths).items()):
            def change(current: dict[str, bytes], group: list[str] = group
                       ) -> tuple[dict[str, bytes], list[str], int]:
                count, size, rev = _counts(current.get(_COUNTS))
                gone = [p for p in group if p in current]
                for path in gone:
                    count, size = count - 1, size - int(json.loads(current[path])[1])
                if not gone:
                    return {}, [], 0
                return {_COUNTS: f"{count} {size} {rev + 1}".encode()}, gone, len(gone)
            deleted += self._update(rec.head(k), what, [_COUNTS, *group], change)
        return deleted

    def blob_known(self, sha256: str) -> int | None:
        """The stored blob's size (the pool is the registry)."""
        st = self.backend.stat(blob_key(sha256))
        return None if st is None else st.size

    def known_blobs(self, shas: list[str]) -> set[str]:
        """Every one: the caller checks which are stored."""
        return set(shas)

    # -- reading entries -----------------------------------------------------------------
    def _objects(self, rec: _Record, version: str) -> list[str]:
        """The shard objects of the head or of a committed version (none if it is absent)."""
        if version == _LATEST:
            return [rec.head(k) for k in range(rec.shards)]
        found = self._version_index(rec, version)
        if found is None:
            return []
        return [rec.version(version, found[1], k) for k in range(rec.shards)]

    def _scan(self, oid: str, after: str = "", prefix: str = "", page: int = _PAGE,
              versions: list[int | None] | None = None) -> Iterator[tuple[str, bytes]]:
        """An object's entries in key order, a page per read.

        With ``versions`` (one item: the version expected), :class:`_Changed`
        if a page was read at another version.
        """
        while True:
            got, version = self._read(oid, after=after, prefix=prefix, limit=page)
            if versions is not None and got and version != versions[0]:
                raise _Changed(oid)
            for key, raw in got:
                if key >= " ":  # not the shard's own counters key
                    yield key, raw
            if len(got) < page:
                return
            after = got[-1][0]

    def _merged(self, oids: list[str], after: str = "", prefix: str = "", page: int = _PAGE,
                versions: list[int | None] | None = None) -> Iterator[tuple[str, bytes]]:
        scans = [self._scan(oid, after, prefix, page,
                            None if versions is None else [versions[i]])
                 for i, oid in enumerate(oids)]
        return heapq.merge(*scans, key=lambda item: item[0].encode())

    def entries(self, dataset: str, version: str, after: str | None = None,
                limit: int = -1, prefix: str = "") -> list[store_pb2.FileEntry]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._existing(dataset)
        page = min(_PAGE, limit) if limit > 0 else _PAGE
        out: list[store_pb2.FileEntry] = []
        for path, raw in self._merged(self._objects(rec, version), after or "", prefix, page):
            if 0 <= limit <= len(out):
                break
            out.append(entry_from_row(_row(path, raw)))
        return out

    def lookup(self, dataset: str, version: str, paths: list[str]
               ) -> dict[str, store_pb2.FileEntry]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._existing(dataset)
        oids = self._objects(rec, version)
        found: dict[str, store_pb2.FileEntry] = {}
        if not oids:  # no such version
            return found
        for k, group in self._grouped(rec, paths).items():
            for i in range(0, len(group), _PAGE):
                for path, raw in self._read(oids[k], keys=group[i:i + _PAGE])[0]:
                    found[path] = entry_from_row(_row(path, raw))
        return found

    def image_columns(self, dataset: str, version: str, prefix: str = "",
                      images_only: bool = True) -> list[tuple[str, int, int, int, int]]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._existing(dataset)
        out = []
        for path, raw in self._merged(self._objects(rec, version), "", prefix):
            _, size, media, width, height = json.loads(raw)[:5]
            image = int(width is not None or media.startswith("image/"))
            if image or not images_only:
                out.append((path, image, width or 0, height or 0, size))
        return out

    def _pages(self, rows: Iterator[tuple[str, bytes]]) -> Iterator[list[EntryRow]]:
        page: list[EntryRow] = []
        for path, raw in rows:
            page.append(_row(path, raw))
            if len(page) >= _ROWS_PAGE:
                yield page
                page = []
        if page:
            yield page

    def _head_key(self, rec: _Record) -> HeadKey:
        """(uid, revision, count, bytes): the revision is the sum of the shards'."""
        count, total, revision = self._totals(rec)
        return rec.uid, revision, count, total

    @contextmanager
    def head_pages(self, dataset: str
                   ) -> Iterator[tuple[HeadKey, Iterator[list[EntryRow]]] | None]:
        """The head's key and rows; each shard is read as it is, page by page.

        A head written meanwhile may show a shard before and another after
        the change: the key read first then differs from the head's next key,
        so a manifest built from it is built again on the next request.
        """
        rec = self._record(dataset)
        if rec is None:
            yield None
            return
        yield self._head_key(rec), self._pages(self._merged(self._objects(rec, _LATEST)))

    @contextmanager
    def version_pages(self, dataset: str, version: str) -> Iterator[Iterator[list[EntryRow]]]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._existing(dataset)
        yield self._pages(self._merged(self._objects(rec, version)))

    def counts_of(self, dataset: str, version: str) -> tuple[int, int] | None:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._record(dataset)
        if rec is None:
            return None
        if version == _LATEST:
            return self._totals(rec)[:2]
        row = self._version(rec, version)
        return None if row is None else (row.file_count, row.total_bytes)

    # -- versions ------------------------------------------------------------------------
    def _version_index(self, rec: _Record, vid: str) -> tuple[str, str] | None:
        """(``v:`` key, copy) of a committed version; kept once read (it never changes)."""
        cached = self._versions_seen.get((rec.uid, vid))
        if cached is not None:
            return cached
        got = self._read(rec.versions, keys=["i:" + vid])[0]
        if not got:
            return None
        d = json.loads(got[0][1])
        found = (str(d["key"]), str(d["copy"]))
        if len(self._versions_seen) >= 4096:
            self._versions_seen.clear()
        self._versions_seen[(rec.uid, vid)] = found
        return found

    def _version(self, rec: _Record, vid: str) -> VersionRow | None:
        index = self._version_index(rec, vid)
        if index is None:
            return None
        found = self._read(rec.versions, keys=[index[0]])[0]
        return _version_row(rec.name, found[0][1]) if found else None

    def resolve_version(self, dataset: str, version: str) -> str | None:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        if len(version) < 8:
            return None
        rec = self._record(dataset)
        if rec is None:
            return None
        got = self._read(rec.versions, prefix="i:" + version, limit=2)[0]
        return got[0][0][2:] if len(got) == 1 else None

    def versions(self, dataset: str, after: str | None, limit: int) -> list[VersionRow]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        rec = self._existing(dataset)
        start = ""
        if after:
            created, _, vid = after.partition("|")
            try:
                start = _version_key(created, vid)
            except ValueError:
                raise InvalidArgument("page_token", "not a token this server gave; start "
                                      "again without one") from None
        got = self._read(rec.versions, after=start, prefix="v:", limit=limit)[0]
        return [_version_row(dataset, raw) for _, raw in got]

    def commit_version(self, dataset: str) -> tuple[VersionRow, bool]:
        """Freeze the head as it is at one instant; the id is the hash of its content.

        The commit holds the dataset (its lock object's ``c`` key, set only
        while no other commit holds it), waits until the writers that came in
        before it are done (their ``w:`` keys gone or lapsed) while new
        writers wait for it, then hashes the head, copies it to the version's
        shards, writes the version's record and lets writers in again: a
        version is the head at one instant and holds every file of an upload
        or none, as with SQLite's write lock on a local catalog.
        """
        rec = self._existing(dataset)
        what = f"commit a version of dataset {dataset!r}"
        lease = _lease(_COMMIT_LEASE)
        self._acquire(rec.lock, "c", what, "another commit of the dataset has held it",
                      lease, ["c"])
        try:
            self._wait_for_writers(rec, what)
            for _ in range(_COMMIT_TRIES):
                try:
                    return self._commit_quiet(rec, what)
                except _Changed:
                    continue  # a writer whose lease lapsed wrote meanwhile: again
            raise Unavailable(f"cannot {what}: its files keep changing; retry when the uploads "
                              "are done", reason="CATALOG_BUSY")
        finally:
            self._release(rec.lock, "c", lease)

    def _wait_for_writers(self, rec: _Record, what: str) -> None:
        deadline = time.monotonic() + _WAIT_SECONDS
        while any(_live(value) for _, value in self._all(rec.lock, "w:")):
            store_metrics.CATALOG_WAITS.labels("lease").inc()
            if time.monotonic() > deadline:
                raise Unavailable(f"cannot {what}: uploads into it are still being recorded "
                                  f"after {_WAIT_SECONDS:g} s; retry", reason="CATALOG_BUSY")
            time.sleep(random.uniform(0.002, 0.02))

    def _commit_quiet(self, rec: _Record, what: str) -> tuple[VersionRow, bool]:
        """Commit while no writer is in: each shard is checked to stay at its version."""
        heads = self._objects(rec, _LATEST)
        before = [self._read(oid, keys=[_COUNTS])[1] for oid in heads]
        digest = hashlib.sha256()
        count = total = 0
        for path, raw in self._merged(heads, versions=before):
            entry = json.loads(raw)
            digest.update(version_line(path, entry[1], entry[0]).encode())
            count, total = count + 1, total + int(entry[1])
        vid = digest.hexdigest()
        existing = self._version(rec, vid)
        if existing is not None:
            return existing, False

        def fill(copies: list[str]) -> tuple[str, int, int]:
            for k, oid in enumerate(heads):
                self._copy(oid, copies[k], before[k])
            if [self._read(oid, keys=[_COUNTS])[1] for oid in heads] != before:
                raise _Changed(rec.name)
            return now(), count, total
        row = self._new_version(rec, vid, what, fill)
        if row is None:
            existing = self._version(rec, vid)  # committed by another replica meanwhile
            if existing is None:
                raise _Changed(rec.name)
            return existing, False
        self._still(rec)
        return row, True

    def _new_version(self, rec: _Record, vid: str, what: str,
                     fill: Callable[[list[str]], tuple[str, int, int]]) -> VersionRow | None:
        """Write a version's own copy, then publish it; None if the version exists already.

        The copy is named (``a:<copy>``) before ``fill`` writes its shard
        objects and returns (created, count, bytes); the record, written last
        and only if there is no version of that id yet, publishes it. A copy
        not published is removed.
        """
        copy = uuid.uuid4().hex[:16]
        copies = [rec.version(vid, copy, k) for k in range(rec.shards)]
        self._write(rec.versions, what, {"a:" + copy: vid.encode()})
        row = None
        try:
            created, count, total = fill(copies)
            vkey = _version_key(created, vid)
            record = json.dumps({"id": vid, "created": created, "count": count,
                                 "bytes": total}).encode()
            index = json.dumps({"key": vkey, "copy": copy}).encode()
            if self._write(rec.versions, what, {vkey: record, "i:" + vid: index},
                           ["a:" + copy], absent=["i:" + vid]) is not None:
                row = VersionRow(rec.name, vid, created, count, total)
        finally:
            if row is None:
                self._discard_copy(rec, copy, copies)
        return row

    def _discard_copy(self, rec: _Record, copy: str, copies: list[str]) -> None:
        try:
            self._remove(copies)
            self._write(rec.versions, "remove an unfinished commit", removes=["a:" + copy])
        except GristmillError:  # named by its a: key: a delete of the dataset removes it
            log.warning("cannot remove an unfinished commit of %r now", rec.name, exc_info=True)

    def _copy(self, source: str, target: str, version: int | None) -> None:
        """A head shard's entries into a version's shard, a page per write."""
        page: dict[str, bytes] = {}
        for path, raw in self._scan(source, versions=[version]):
            page[path] = raw
            if len(page) >= _PAGE:
                self._write(target, "copy a version's files", page)
                page = {}
        if page:
            self._write(target, "copy a version's files", page)

    def import_version(self, dataset: str, version: VersionRow,
                       pages: Iterable[list[store_pb2.FileEntry]]) -> bool:
        """Record a version made elsewhere (a migrated catalog) with its id and time.

        Its entries (sorted by path) must hash to its id, as a commit's do;
        False if the dataset has it already.
        """
        rec = self._existing(dataset)
        if self._version(rec, version.id) is not None:
            return False
        what = f"import version {version.id} of dataset {dataset!r}"

        def fill(copies: list[str]) -> tuple[str, int, int]:
            digest = hashlib.sha256()
            count = total = 0
            for page in pages:
                shards: dict[int, dict[str, bytes]] = {}
                for e in page:
                    digest.update(version_line(e.path, e.size, e.sha256).encode())
                    count, total = count + 1, total + e.size
                    shards.setdefault(rec.shard_of(e.path), {})[e.path] = _encode(e)
                for k, values in shards.items():
                    self._write(copies[k], what, values)
            if digest.hexdigest() != version.id:
                raise FailedPrecondition(
                    f"{what}: its files hash to {digest.hexdigest()}, not to its id; the "
                    "source catalog is damaged (nothing of this version was imported)",
                    reason="VERSION_MISMATCH")
            return version.created, count, total
        return self._new_version(rec, version.id, what, fill) is not None

    # -- garbage collection --------------------------------------------------------------
    def marked(self) -> set[str]:
        """Every blob a head or version refers to (the collection's mark, or a fresh one)."""
        return self._mark if self._mark is not None else self._marking()

    def _marking(self) -> set[str]:
        """One pass over every dataset: its head first, then its versions.

        In that order no reference is missed: a version committed after the
        head was read holds only entries the head had then (read) or entries
        recorded after the mark began, whose blobs were touched after the
        collection's cutoff.
        """
        used: set[str] = set()
        for key, raw in self._all(_DATASETS, "d:"):
            rec = _Record.load(key[2:], raw)
            for oid in self._objects(rec, _LATEST):
                used.update(json.loads(v)[0] for _, v in self._scan(oid))
            for vkey, _ in self._all(rec.versions, "i:"):
                for oid in self._objects(rec, vkey[2:]):
                    used.update(json.loads(v)[0] for _, v in self._scan(oid))
        return used

    @contextmanager
    def collection(self, dry_run: bool = False) -> Iterator[None]:
        """One garbage collection: deletions a crash left are finished, then blobs marked."""
        if not dry_run:
            self.purge_deleted()
        self._mark = self._marking()
        try:
            yield
        finally:
            self._mark = None

    @contextmanager
    def guard(self, operation: str) -> Iterator[BlobGuard]:
        """See :class:`~gristmill.store.catalog.CatalogApi`."""
        yield _PoolGuard(self)

    def close(self) -> None:
        """Nothing of its own to close (the backend holds the connection)."""
