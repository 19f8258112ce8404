"""The store's metadata in SQLite: datasets, head manifests, versions, blobs."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlite_utils

from gristmill.client.errors import (
    GristmillError,
    Internal,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from gristmill.client.private import private_database
from gristmill.store.disk import DISK_FULL, disk_full
from gristmill.v1 import store_pb2

__all__ = ["SCHEMA_VERSION", "BlobGuard", "Catalog", "CatalogApi", "DatasetRow", "HeadKey",
           "VersionRow", "entry_from_row", "prefix_end", "version_line"]

T = TypeVar("T")

_ENTRY_COLS = "path, sha256, size, media_type, width, height, format, orientation"
_LATEST = "latest"
#: Version of the catalog's schema, kept in ``store_info``; see :meth:`Catalog._migrate`.
SCHEMA_VERSION = 3
#: Per-dataset counters kept by SQLite itself, in the transaction that changes ``files``
#: (with recursive_triggers on, the row an INSERT OR REPLACE replaces counts as deleted),
#: and the head's revision, which any change of its files moves on.
_COUNTER_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS files_counted_insert AFTER INSERT ON files BEGIN
         UPDATE datasets SET file_count = file_count + 1, total_bytes = total_bytes + NEW.size,
         revision = revision + 1 WHERE name = NEW.dataset; END""",
    """CREATE TRIGGER IF NOT EXISTS files_counted_delete AFTER DELETE ON files BEGIN
         UPDATE datasets SET file_count = file_count - 1, total_bytes = total_bytes - OLD.size,
         revision = revision + 1 WHERE name = OLD.dataset; END""",
    """CREATE TRIGGER IF NOT EXISTS files_counted_update AFTER UPDATE OF dataset, size ON files
       BEGIN
         UPDATE datasets SET file_count = file_count - 1, total_bytes = total_bytes - OLD.size
         WHERE name = OLD.dataset;
         UPDATE datasets SET file_count = file_count + 1, total_bytes = total_bytes + NEW.size
         WHERE name = NEW.dataset; END""",
    """CREATE TRIGGER IF NOT EXISTS files_revised_update AFTER UPDATE ON files BEGIN
         UPDATE datasets SET revision = revision + 1 WHERE name IN (OLD.dataset, NEW.dataset);
       END""",
)
_TRIGGER_NAMES = ("files_counted_insert", "files_counted_delete", "files_counted_update",
                  "files_revised_update")


#: What identifies a head's content: (dataset incarnation, revision, file count, bytes).
HeadKey = tuple[str, int, int, int]
#: Rows of ``_ENTRY_COLS``: (path, sha256, size, media type, width, height, format, orientation).
EntryRow = tuple[Any, ...]


class BlobGuard(Protocol):
    """While held, no upload can start referring to a blob (garbage collection's view)."""

    def referenced(self, shas: list[str]) -> set[str]:
        """The subset of ``shas`` that a dataset head or a version refers to."""

    def forget(self, shas: list[str]) -> None:
        """Drop registrations of blobs no longer stored."""


@dataclass(frozen=True)
class DatasetRow:
    """A dataset's summary."""

    name: str
    description: str
    created: str
    file_count: int
    total_bytes: int
    latest_version: str


@dataclass(frozen=True)
class VersionRow:
    """A committed version."""

    dataset: str
    id: str
    created: str
    file_count: int
    total_bytes: int


class CatalogApi(Protocol):
    """What the store asks of a catalog: SQLite (:class:`Catalog`) or a Ceph pool.

    (:class:`gristmill.store.poolcatalog.PoolCatalog`.) ``shared`` says that
    other processes write the same catalog, so a blob no longer referenced is
    left to garbage collection (with its grace period) instead of being
    deleted at once.
    """

    path: Path
    shared: bool
    on_full: Callable[[], bool] | None

    @property
    def store_id(self) -> str:
        """The store's id, made once and kept."""

    def create_dataset(self, name: str, description: str) -> bool:
        """Record a new dataset; False if the name is taken."""

    def dataset(self, name: str) -> DatasetRow | None:
        """One dataset's summary, or None."""

    def exists(self, name: str) -> bool:
        """Whether the dataset exists."""

    def datasets(self, after: str | None, limit: int) -> list[DatasetRow]:
        """Datasets by name after ``after``."""

    def delete_dataset(self, name: str) -> list[tuple[str, int]]:
        """Delete a dataset; returns blobs (sha, size) no longer referenced."""

    def add_files(self, dataset: str, entries: list[store_pb2.FileEntry]) -> None:
        """Add or replace head entries."""

    def delete_files(self, dataset: str, paths: list[str]
                     ) -> tuple[int, list[tuple[str, int]]]:
        """Remove head entries; returns (count, blobs no longer referenced)."""

    def blob_known(self, sha256: str) -> int | None:
        """Size of a known blob, or None."""

    def known_blobs(self, shas: list[str]) -> set[str]:
        """The known subset of ``shas``."""

    def entries(self, dataset: str, version: str, after: str | None = None,
                limit: int = -1, prefix: str = "") -> list[store_pb2.FileEntry]:
        """Entries sorted by path, a page after ``after`` under ``prefix``."""

    def lookup(self, dataset: str, version: str, paths: list[str]
               ) -> dict[str, store_pb2.FileEntry]:
        """Entries for the given paths (missing ones absent)."""

    def image_columns(self, dataset: str, version: str, prefix: str = "",
                      images_only: bool = True) -> list[tuple[str, int, int, int, int]]:
        """(path, is image, width, height, size) rows sorted by path."""

    def counts_of(self, dataset: str, version: str) -> tuple[int, int] | None:
        """(file count, total bytes) of the head or a version; None if absent."""

    def head_pages(self, dataset: str
                   ) -> contextlib.AbstractContextManager[
                       tuple[HeadKey, Iterator[list[EntryRow]]] | None]:
        """The head's key and rows in pages; None if there is no dataset."""

    def version_pages(self, dataset: str, version: str
                      ) -> contextlib.AbstractContextManager[Iterator[list[EntryRow]]]:
        """A committed version's rows in pages."""

    def guard(self, operation: str) -> contextlib.AbstractContextManager[BlobGuard]:
        """While held, no upload can start referring to a blob."""

    def collection(self, dry_run: bool = False) -> contextlib.AbstractContextManager[None]:
        """One garbage collection runs inside."""

    def resolve_version(self, dataset: str, version: str) -> str | None:
        """Full version id for an id or a unique prefix of 8+ characters."""

    def commit_version(self, dataset: str) -> tuple[VersionRow, bool]:
        """Freeze the head; returns (row, created)."""

    def versions(self, dataset: str, after: str | None, limit: int) -> list[VersionRow]:
        """Versions newest first."""

    def close(self) -> None:
        """Release what the catalog holds."""


class _SqlGuard:
    """:class:`BlobGuard` over one write transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def referenced(self, shas: list[str]) -> set[str]:
        return Catalog.referenced_blobs(self.conn, shas)

    def forget(self, shas: list[str]) -> None:
        Catalog.forget_blobs(self.conn, shas)


def now() -> str:
    """UTC timestamp, ISO 8601 with microseconds (sorts as text)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def entry_from_row(row: tuple[Any, ...]) -> store_pb2.FileEntry:
    """FileEntry from a row of ``_ENTRY_COLS``."""
    path, sha, size, media, width, height, fmt, orient = row
    entry = store_pb2.FileEntry(path=path, sha256=sha, size=size, media_type=media)
    if width is not None:
        entry.image.CopyFrom(store_pb2.ImageInfo(width=width, height=height, format=fmt or "",
                                                 orientation=orient or 0))
    return entry


def _entry_values(dataset: str, e: store_pb2.FileEntry) -> tuple[Any, ...]:
    img = e.image if e.HasField("image") else None
    return (dataset, e.path, e.sha256, e.size, e.media_type,
            img.width if img else None, img.height if img else None,
            img.format if img else None, img.orientation if img else None)


class Catalog:
    """All store metadata in one SQLite file (WAL), safe to share across threads.

    ``on_full`` is called when a write fails because the volume is full; if it
    returns True (it freed space, e.g. the disk reserve), the write is retried
    once. Database errors become domain errors: a full disk is DISK_FULL.
    """

    #: One process writes it (see :class:`CatalogApi`).
    shared = False

    def __init__(self, path: Path, on_full: Callable[[], bool] | None = None) -> None:
        self.path = path
        self.on_full = on_full
        private_database(path)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=10000")  # `gristmill store gc` may hold the lock
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA recursive_triggers=ON")  # REPLACE fires the delete trigger
        self.db = sqlite_utils.Database(conn)
        self.lock = threading.RLock()
        entry = {"dataset": str, "path": str, "sha256": str, "size": int, "media_type": str,
                 "width": int, "height": int, "format": str, "orientation": int}
        self.db.table("datasets").create({"name": str, "description": str, "created": str},
                                   pk="name", if_not_exists=True)
        self.db.table("files").create(entry, pk=("dataset", "path"), if_not_exists=True,
                                foreign_keys=[("dataset", "datasets", "name")])
        self.db.table("versions").create(
            {"dataset": str, "id": str, "created": str, "file_count": int, "total_bytes": int},
            pk=("dataset", "id"), if_not_exists=True,
            foreign_keys=[("dataset", "datasets", "name")])
        self.db.table("version_files").create({"version": str, **entry},
                                        pk=("dataset", "version", "path"), if_not_exists=True)
        self.db.table("blobs").create({"sha256": str, "size": int, "created": str}, pk="sha256",
                                if_not_exists=True)
        self.db.table("files").create_index(["sha256"], if_not_exists=True)
        self.db.table("version_files").create_index(["sha256"], if_not_exists=True)
        self.db.table("store_info").create({"key": str, "value": str}, pk="key",
                                           if_not_exists=True)
        self._migrate(conn)
        #: This store's id: made once per catalog (data directory), kept across restarts.
        self.store_id = self._store_id(conn)

    @staticmethod
    def _store_id(conn: sqlite3.Connection) -> str:
        """The id in ``store_info``, made (32 hex characters) the first time."""
        query = "SELECT value FROM store_info WHERE key = 'store_id'"
        row = conn.execute(query).fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO store_info (key, value) VALUES ('store_id', ?)",
                         [uuid.uuid4().hex])
            row = conn.execute(query).fetchone()
        return str(row[0])

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        """Bring an older catalog to :data:`SCHEMA_VERSION`, once, in one transaction.

        Version 2 keeps each dataset's file count and bytes in its row (counted
        once here for existing files, then by triggers), and indexes versions
        by creation time, so that per-call reads touch one row whatever the
        dataset's size. Version 3 adds the head's revision (see
        :meth:`head_key`), moved on by the same triggers.
        """
        query = "SELECT value FROM store_info WHERE key = 'schema_version'"
        row = conn.execute(query).fetchone()
        if row is not None and int(row[0]) >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(query).fetchone()  # another process may have migrated meanwhile
            if row is None or int(row[0]) < SCHEMA_VERSION:
                columns = {r[1] for r in conn.execute("PRAGMA table_info(datasets)")}
                if "file_count" not in columns:
                    for column in ("file_count", "total_bytes"):
                        conn.execute(f"ALTER TABLE datasets ADD COLUMN {column} INTEGER "
                                     "NOT NULL DEFAULT 0")
                    conn.execute(
                        "UPDATE datasets SET "
                        "file_count = (SELECT count(*) FROM files f WHERE f.dataset = name), "
                        "total_bytes = (SELECT coalesce(sum(size), 0) FROM files f "
                        "WHERE f.dataset = name)")
                if "revision" not in columns:
                    conn.execute("ALTER TABLE datasets ADD COLUMN revision INTEGER NOT NULL "
                                 "DEFAULT 0")
                for name in _TRIGGER_NAMES:  # made again: older ones do not move the revision
                    conn.execute(f"DROP TRIGGER IF EXISTS {name}")
                for trigger in _COUNTER_TRIGGERS:
                    conn.execute(trigger)
                conn.execute("CREATE INDEX IF NOT EXISTS idx_versions_created "
                             "ON versions(dataset, created, id)")
                conn.execute("INSERT OR REPLACE INTO store_info (key, value) "
                             "VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _error(self, operation: str, error: sqlite3.Error) -> GristmillError | None:
        """The domain error for a database error, or None to let it through."""
        code = getattr(error, "sqlite_errorcode", -1) & 0xFF
        if code == sqlite3.SQLITE_FULL:
            return disk_full(f"cannot {operation}", self.path.parent)
        if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return Unavailable(f"the store's catalog is locked by another process (cannot "
                               f"{operation}); retry in a moment", reason="CATALOG_BUSY")
        if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY,
                    sqlite3.SQLITE_PERM):
            return Internal(f"the store cannot {operation}: {error}; check the catalog "
                            f"{self.path} and its volume", reason="STORAGE_ERROR")
        return None

    @contextmanager
    def transaction(self, operation: str = "write the catalog") -> Iterator[sqlite3.Connection]:
        """Serialised write transaction; database errors become domain errors."""
        with self.lock:
            conn = self.db.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:  # SQLite may have rolled back already
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                mapped = self._error(operation, e)
                if mapped is None:
                    raise
                raise mapped from e

    def _checkpoint(self) -> bool:
        """Copy the WAL into the database so that writers reuse the WAL's space from its start.

        Returns True if the whole WAL was copied (there is room to write again).
        """
        with self.lock:
            try:
                busy, frames, done = self.db.conn.execute(
                    "PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            except sqlite3.Error:
                return False
        return bool(busy == 0 and frames > 0 and frames == done)

    def _release_reserve(self) -> bool:
        if self.on_full is None or not self.on_full():
            return False
        self._checkpoint()
        return True

    def write(self, operation: str, body: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``body`` in a transaction; on a full disk make room and retry.

        The remedies, in order: reuse the WAL's space (checkpoint), then free
        the disk reserve. A write that still does not fit is DISK_FULL.
        """
        remedies = [self._checkpoint, self._release_reserve]
        while True:
            try:
                with self.transaction(operation) as conn:
                    return body(conn)
            except ResourceExhausted as e:
                if e.reason != DISK_FULL:
                    raise
                while remedies:
                    if remedies.pop(0)():
                        break  # room made: try again
                else:
                    raise

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query and fetch every row."""
        with self.lock:
            try:
                return list(self.db.conn.execute(sql, list(params)).fetchall())
            except sqlite3.Error as e:
                mapped = self._error("read the catalog", e)
                if mapped is None:
                    raise
                raise mapped from e

    # datasets -------------------------------------------------------------
    def create_dataset(self, name: str, description: str) -> bool:
        """Insert; False if the name is taken."""
        def body(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("INSERT OR IGNORE INTO datasets(name, description, created) "
                               "VALUES (?, ?, ?)", [name, description, now()])
            return cur.rowcount == 1
        return self.write(f"create dataset {name!r}", body)

    def dataset(self, name: str) -> DatasetRow | None:
        """One dataset's summary."""
        rows = self.datasets(after=None, limit=1, exact=name)
        return rows[0] if rows else None

    def exists(self, name: str) -> bool:
        """Whether the dataset exists (one row read)."""
        return bool(self.query("SELECT 1 FROM datasets WHERE name = ?", [name]))

    def datasets(self, after: str | None, limit: int, exact: str | None = None
                 ) -> list[DatasetRow]:
        """Datasets by name after ``after``: one row each, plus one index probe for the latest."""
        where, params = ("d.name = ?", [exact]) if exact is not None else (
            "d.name > ?", [after or ""])
        rows = self.query(
            f"""SELECT d.name, d.description, d.created, d.file_count, d.total_bytes,
                  (SELECT id FROM versions v WHERE v.dataset = d.name
                    ORDER BY created DESC, id DESC LIMIT 1)
                FROM datasets d WHERE {where} ORDER BY d.name LIMIT ?""", [*params, limit])
        return [DatasetRow(r[0], r[1] or "", r[2], r[3], r[4], r[5] or "") for r in rows]

    def delete_dataset(self, name: str) -> list[tuple[str, int]]:
        """Delete a dataset; returns blobs (sha, size) no longer referenced anywhere."""
        def body(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            candidates = [r[0] for r in conn.execute(
                "SELECT sha256 FROM files WHERE dataset = ? UNION "
                "SELECT sha256 FROM version_files WHERE dataset = ?", [name, name])]
            for table in ("files", "version_files", "versions"):
                conn.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])
            conn.execute("DELETE FROM datasets WHERE name = ?", [name])
            return self._unreferenced(conn, candidates)
        return self.write(f"delete dataset {name!r}", body)

    @staticmethod
    def _unreferenced(conn: sqlite3.Connection, shas: list[str]) -> list[tuple[str, int]]:
        gone = []
        for sha in shas:
            used = conn.execute("SELECT 1 FROM files WHERE sha256 = ? UNION ALL "
                                "SELECT 1 FROM version_files WHERE sha256 = ? LIMIT 1",
                                [sha, sha]).fetchone()
            if used is None:
                row = conn.execute("SELECT size FROM blobs WHERE sha256 = ?", [sha]).fetchone()
                conn.execute("DELETE FROM blobs WHERE sha256 = ?", [sha])
                gone.append((sha, row[0] if row else 0))
        return gone

    # files ---------------------------------------------------------------
    def add_files(self, dataset: str, entries: list[store_pb2.FileEntry]) -> None:
        """Add or replace head entries, registering their blobs, in one transaction."""
        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO blobs(sha256, size, created) VALUES (?, ?, ?)",
                [(e.sha256, e.size, now()) for e in entries])
            conn.executemany(
                f"INSERT OR REPLACE INTO files(dataset, {_ENTRY_COLS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?)", [_entry_values(dataset, e) for e in entries])
        self.write(f"record {len(entries)} uploaded file(s) in dataset {dataset!r}", body)

    def delete_files(self, dataset: str, paths: list[str]) -> tuple[int, list[tuple[str, int]]]:
        """Remove head entries; returns (count, blobs no longer referenced)."""
        def body(conn: sqlite3.Connection) -> tuple[int, list[tuple[str, int]]]:
            shas, deleted = [], 0
            for path in paths:
                row = conn.execute("DELETE FROM files WHERE dataset = ? AND path = ? "
                                   "RETURNING sha256", [dataset, path]).fetchone()
                if row is not None:
                    deleted += 1
                    shas.append(row[0])
            return deleted, self._unreferenced(conn, sorted(set(shas)))
        return self.write(f"delete files of dataset {dataset!r}", body)

    @staticmethod
    def referenced_blobs(conn: sqlite3.Connection, shas: list[str]) -> set[str]:
        """The subset of ``shas`` that a dataset head or a version refers to."""
        used: set[str] = set()
        for i in range(0, len(shas), 400):
            part = shas[i:i + 400]
            marks = ",".join("?" * len(part))
            used.update(r[0] for r in conn.execute(
                f"SELECT sha256 FROM files WHERE sha256 IN ({marks}) UNION "
                f"SELECT sha256 FROM version_files WHERE sha256 IN ({marks})", part + part))
        return used

    @staticmethod
    def forget_blobs(conn: sqlite3.Connection, shas: list[str]) -> None:
        """Drop blob registrations (of blobs no longer stored); writes only if there are any."""
        for i in range(0, len(shas), 400):
            part = shas[i:i + 400]
            marks = ",".join("?" * len(part))
            if conn.execute(f"SELECT 1 FROM blobs WHERE sha256 IN ({marks}) LIMIT 1",
                            part).fetchone():
                conn.execute(f"DELETE FROM blobs WHERE sha256 IN ({marks})", part)

    def blob_known(self, sha256: str) -> int | None:
        """Size of a registered blob, or None."""
        rows = self.query("SELECT size FROM blobs WHERE sha256 = ?", [sha256])
        return int(rows[0][0]) if rows else None

    def known_blobs(self, shas: list[str]) -> set[str]:
        """The registered subset of ``shas``."""
        found: set[str] = set()
        for i in range(0, len(shas), 500):
            part = shas[i:i + 500]
            marks = ",".join("?" * len(part))
            found.update(r[0] for r in self.query(
                f"SELECT sha256 FROM blobs WHERE sha256 IN ({marks})", part))
        return found

    def _source(self, dataset: str, version: str) -> tuple[str, list[Any]]:
        if version == _LATEST:
            return "files WHERE dataset = ?", [dataset]
        return "version_files WHERE dataset = ? AND version = ?", [dataset, version]

    def entries(self, dataset: str, version: str, after: str | None = None,
                limit: int = -1, prefix: str = "") -> list[store_pb2.FileEntry]:
        """Manifest entries sorted by path: a range of the primary key, never an OFFSET.

        A page reads the rows it returns (and one index seek), wherever in the
        manifest it starts.
        """
        source, params = self._source(dataset, version)
        where, bounds = _path_range(after, prefix)
        sql = f"SELECT {_ENTRY_COLS} FROM {source}{where} ORDER BY path LIMIT ?"
        return [entry_from_row(r) for r in self.query(sql, [*params, *bounds, limit])]

    @contextmanager
    def snapshot(self, operation: str = "read the catalog") -> Iterator[sqlite3.Connection]:
        """A connection of its own inside one read transaction.

        A consistent view of the catalog while writers go on (WAL), for reads
        that stream many rows without holding the catalog's lock.
        """
        conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None)
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA query_only=ON")
            conn.execute("BEGIN")
            yield conn
        except sqlite3.Error as e:
            mapped = self._error(operation, e)
            if mapped is None:
                raise
            raise mapped from e
        finally:
            if conn is not None:
                conn.close()

    def counts_of(self, dataset: str, version: str) -> tuple[int, int] | None:
        """(file count, total bytes) of the head or a version; None if absent."""
        with self.snapshot("read the catalog") as conn:
            return self.counts(conn, dataset, version)

    @contextmanager
    def head_pages(self, dataset: str
                   ) -> Iterator[tuple[HeadKey, Iterator[list[EntryRow]]] | None]:
        """The head's key and its rows in pages, from one snapshot; None if no dataset."""
        with self.snapshot("read the manifest") as conn:
            key = self.head_key(conn, dataset)

            def pages() -> Iterator[list[EntryRow]]:  # read only if the caller builds
                yield from self.entry_pages(conn, dataset, _LATEST)
            yield None if key is None else (key, pages())

    @contextmanager
    def version_pages(self, dataset: str, version: str) -> Iterator[Iterator[list[EntryRow]]]:
        """A committed version's rows in pages (see :meth:`entry_pages`)."""
        with self.snapshot("read the manifest") as conn:
            yield self.entry_pages(conn, dataset, version)

    @contextmanager
    def collection(self, dry_run: bool = False) -> Iterator[None]:
        """One garbage collection (each batch holds its own :meth:`guard`)."""
        yield

    @contextmanager
    def guard(self, operation: str) -> Iterator[BlobGuard]:
        """A write transaction: no upload can record a blob while it is held."""
        with self.transaction(operation) as conn:
            yield _SqlGuard(conn)

    @staticmethod
    def counts(conn: sqlite3.Connection, dataset: str, version: str) -> tuple[int, int] | None:
        """(file count, total bytes) of the head or a version, from its row; None if absent."""
        if version == _LATEST:
            row = conn.execute("SELECT file_count, total_bytes FROM datasets WHERE name = ?",
                               [dataset]).fetchone()
        else:
            row = conn.execute("SELECT file_count, total_bytes FROM versions "
                               "WHERE dataset = ? AND id = ?", [dataset, version]).fetchone()
        return (int(row[0]), int(row[1])) if row else None

    @staticmethod
    def head_key(conn: sqlite3.Connection, dataset: str) -> tuple[str, int, int, int] | None:
        """What identifies the head's content: (created, revision, file count, bytes).

        The revision moves on with every change of the head's files, in the
        transaction that makes it; ``created`` tells a dataset from one of
        the same name made after it was deleted. None if there is no dataset.
        """
        row = conn.execute("SELECT created, revision, file_count, total_bytes FROM datasets "
                           "WHERE name = ?", [dataset]).fetchone()
        return (str(row[0]), int(row[1]), int(row[2]), int(row[3])) if row else None

    def entry_pages(self, conn: sqlite3.Connection, dataset: str, version: str,
                    page: int = 4096) -> Iterator[list[tuple[Any, ...]]]:
        """Rows of ``_ENTRY_COLS`` sorted by path, ``page`` at a time.

        From one cursor of ``conn`` (a :meth:`snapshot`): memory is one page,
        whatever the manifest's size.
        """
        source, params = self._source(dataset, version)
        cursor = conn.execute(f"SELECT {_ENTRY_COLS} FROM {source} ORDER BY path", params)
        while rows := cursor.fetchmany(page):
            yield rows

    def image_columns(self, dataset: str, version: str, prefix: str = "",
                      images_only: bool = True) -> list[tuple[str, int, int, int, int]]:
        """(path, is image, width, height, size) rows sorted by path, for planning.

        Only these columns are read. With ``images_only`` only image files
        under ``prefix`` (a key range): a file counts as an image when its
        header was read or its media type says image. Width and height are as
        displayed (0 when unknown).
        """
        source, params = self._source(dataset, version)
        where, bounds = _path_range(None, prefix)
        sql = ("SELECT path, width IS NOT NULL OR substr(media_type, 1, 6) = 'image/', "
               f"coalesce(width, 0), coalesce(height, 0), size FROM {source}{where}")
        if images_only:
            sql += " AND (width IS NOT NULL OR substr(media_type, 1, 6) = 'image/')"
        with self.snapshot("read a manifest for planning") as conn:
            return conn.execute(sql + " ORDER BY path", [*params, *bounds]).fetchall()

    def lookup(self, dataset: str, version: str, paths: list[str]
               ) -> dict[str, store_pb2.FileEntry]:
        """Entries for the given paths (missing ones absent)."""
        source, params = self._source(dataset, version)
        found: dict[str, store_pb2.FileEntry] = {}
        unique = sorted(set(paths))
        for i in range(0, len(unique), 500):
            part = unique[i:i + 500]
            marks = ",".join("?" * len(part))
            for r in self.query(f"SELECT {_ENTRY_COLS} FROM {source} AND path IN ({marks})",
                                [*params, *part]):
                found[r[0]] = entry_from_row(r)
        return found

    # versions ------------------------------------------------------------
    def resolve_version(self, dataset: str, version: str) -> str | None:
        """Full version id for an id or a unique prefix of at least 8 characters."""
        if len(version) < 8:
            return None
        where, bounds = _path_range(None, version, "id")
        rows = self.query(f"SELECT id FROM versions WHERE dataset = ?{where} LIMIT 2",
                          [dataset, *bounds])
        return rows[0][0] if len(rows) == 1 else None

    def commit_version(self, dataset: str) -> tuple[VersionRow, bool]:
        """Freeze the head; returns (row, created).

        The id is the sha256 of the canonical content (per file sorted by
        path: path, size and sha256 joined by tabs, ending in a newline),
        hashed as the rows stream by, in the transaction that freezes them (no
        upload lands in between).
        """
        def body(conn: sqlite3.Connection) -> tuple[VersionRow, bool]:
            digest = hashlib.sha256()
            cursor = conn.execute("SELECT path, size, sha256 FROM files WHERE dataset = ? "
                                  "ORDER BY path", [dataset])
            while rows := cursor.fetchmany(4096):
                digest.update("".join(version_line(p, n, h) for p, n, h in rows).encode())
            version_id = digest.hexdigest()
            existing = self._version(conn, dataset, version_id)
            if existing is not None:
                return existing, False
            counted = self.counts(conn, dataset, _LATEST)
            if counted is None:
                raise NotFound(f"dataset {dataset!r} does not exist (deleted while committing)",
                               reason="DATASET_NOT_FOUND", metadata={"dataset": dataset})
            count, total = counted
            conn.execute("INSERT INTO versions(dataset, id, created, file_count, total_bytes) "
                         "VALUES (?, ?, ?, ?, ?)", [dataset, version_id, now(), count, total])
            conn.execute(f"INSERT INTO version_files(version, dataset, {_ENTRY_COLS}) "
                         f"SELECT ?, dataset, {_ENTRY_COLS} FROM files WHERE dataset = ?",
                         [version_id, dataset])
            row = self._version(conn, dataset, version_id)
            assert row is not None
            return row, True
        return self.write(f"commit a version of dataset {dataset!r}", body)

    @staticmethod
    def _version(conn: sqlite3.Connection, dataset: str, version_id: str) -> VersionRow | None:
        r = conn.execute("SELECT dataset, id, created, file_count, total_bytes FROM versions "
                         "WHERE dataset = ? AND id = ?", [dataset, version_id]).fetchone()
        return VersionRow(*r) if r else None

    def versions(self, dataset: str, after: str | None, limit: int) -> list[VersionRow]:
        """Versions newest first; ``after`` is "created|id" of the previous page's last."""
        params: list[Any] = [dataset]
        sql = ("SELECT dataset, id, created, file_count, total_bytes FROM versions "
               "WHERE dataset = ?")
        if after:
            created, _, vid = after.partition("|")
            sql += " AND (created < ? OR (created = ? AND id < ?))"
            params += [created, created, vid]
        sql += " ORDER BY created DESC, id DESC LIMIT ?"
        return [VersionRow(*r) for r in self.query(sql, [*params, limit])]

    def close(self) -> None:
        """Close the database."""
        self.db.conn.close()


def version_line(path: str, size: int, sha256: str) -> str:
    """A file's line in the canonical content a version id is the sha256 of."""
    return f"{path}\t{size}\t{sha256}\n"


def prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound).

    SQLite compares text as UTF-8 bytes, which order like code points, so
    ``column >= prefix AND column < prefix_end(prefix)`` is exactly "starts
    with ``prefix``", answered by an index range.
    """
    for i in range(len(prefix) - 1, -1, -1):
        code = ord(prefix[i]) + 1
        if code == 0xD800:
            code = 0xE000  # surrogates are not text
        if code <= 0x10FFFF:
            return prefix[:i] + chr(code)
    return None


def _path_range(after: str | None, prefix: str, column: str = "path"
                ) -> tuple[str, list[str]]:
    """SQL conditions (each after an AND) and parameters: ``column`` after ``after``.

    And starting with ``prefix``: a range of the index either way.
    """
    where, params = "", []
    if after:
        where += f" AND {column} > ?"
        params.append(after)
    if prefix:
        where += f" AND {column} >= ?"
        params.append(prefix)
        end = prefix_end(prefix)
        if end is not None:
            where += f" AND {column} < ?"
            params.append(end)
    return where, params
