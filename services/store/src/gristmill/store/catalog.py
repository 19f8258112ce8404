"""The store's metadata in SQLite: datasets, head manifests, versions, blobs."""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from gristmill.v1 import store_pb2

__all__ = ["Catalog", "DatasetRow", "VersionRow"]

_ENTRY_COLS = "path, sha256, size, media_type, width, height, format, orientation"
_LATEST = "latest"


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
    """All store metadata in one SQLite file (WAL), safe to share across threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
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

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Serialised write transaction."""
        with self.lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read query and fetch every row."""
        with self.lock:
            return list(self.db.conn.execute(sql, list(params)).fetchall())

    # datasets -------------------------------------------------------------
    def create_dataset(self, name: str, description: str) -> bool:
        """Insert; False if the name is taken."""
        with self.transaction() as conn:
            cur = conn.execute("INSERT OR IGNORE INTO datasets(name, description, created) "
                               "VALUES (?, ?, ?)", [name, description, now()])
            return cur.rowcount == 1

    def dataset(self, name: str) -> DatasetRow | None:
        """One dataset's summary."""
        rows = self.datasets(after=None, limit=1, exact=name)
        return rows[0] if rows else None

    def datasets(self, after: str | None, limit: int, exact: str | None = None) -> list[DatasetRow]:
        """Datasets by name after ``after``."""
        where, params = ("d.name = ?", [exact]) if exact is not None else (
            "d.name > ?", [after or ""])
        rows = self.query(
            f"""SELECT d.name, d.description, d.created,
                  (SELECT count(*) FROM files f WHERE f.dataset = d.name),
                  (SELECT coalesce(sum(size), 0) FROM files f WHERE f.dataset = d.name),
                  (SELECT id FROM versions v WHERE v.dataset = d.name
                    ORDER BY created DESC LIMIT 1)
                FROM datasets d WHERE {where} ORDER BY d.name LIMIT ?""", [*params, limit])
        return [DatasetRow(r[0], r[1] or "", r[2], r[3], r[4], r[5] or "") for r in rows]

    def delete_dataset(self, name: str) -> list[tuple[str, int]]:
        """Delete a dataset; returns blobs (sha, size) no longer referenced anywhere."""
        with self.transaction() as conn:
            candidates = [r[0] for r in conn.execute(
                "SELECT sha256 FROM files WHERE dataset = ? UNION "
                "SELECT sha256 FROM version_files WHERE dataset = ?", [name, name])]
            for table in ("files", "version_files", "versions"):
                conn.execute(f"DELETE FROM {table} WHERE dataset = ?", [name])
            conn.execute("DELETE FROM datasets WHERE name = ?", [name])
            return self._unreferenced(conn, candidates)

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
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR IGNORE INTO blobs(sha256, size, created) VALUES (?, ?, ?)",
                [(e.sha256, e.size, now()) for e in entries])
            conn.executemany(
                f"INSERT OR REPLACE INTO files(dataset, {_ENTRY_COLS}) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, ?)", [_entry_values(dataset, e) for e in entries])

    def delete_files(self, dataset: str, paths: list[str]) -> tuple[int, list[tuple[str, int]]]:
        """Remove head entries; returns (count, blobs no longer referenced)."""
        with self.transaction() as conn:
            shas, deleted = [], 0
            for path in paths:
                row = conn.execute("DELETE FROM files WHERE dataset = ? AND path = ? "
                                   "RETURNING sha256", [dataset, path]).fetchone()
                if row is not None:
                    deleted += 1
                    shas.append(row[0])
            return deleted, self._unreferenced(conn, sorted(set(shas)))

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
        """Manifest entries sorted by path."""
        source, params = self._source(dataset, version)
        sql = f"SELECT {_ENTRY_COLS} FROM {source} AND path > ?"
        params.append(after or "")
        if prefix:
            sql += " AND substr(path, 1, ?) = ?"
            params += [len(prefix), prefix]
        sql += " ORDER BY path LIMIT ?"
        return [entry_from_row(r) for r in self.query(sql, [*params, limit])]

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
        rows = self.query("SELECT id FROM versions WHERE dataset = ? AND substr(id, 1, ?) = ? "
                          "LIMIT 2", [dataset, len(version), version])
        return rows[0][0] if len(rows) == 1 else None

    def head_rows(self, dataset: str) -> list[tuple[str, int, str]]:
        """(path, size, sha256) of the head, sorted by path: the canonical content."""
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT path, size, sha256 FROM files WHERE dataset = ? ORDER BY path", [dataset])]

    def commit_version(self, dataset: str, version_id: str, expected: int
                       ) -> tuple[VersionRow, bool]:
        """Freeze the head as ``version_id``; returns (row, created)."""
        with self.transaction() as conn:
            existing = self._version(conn, dataset, version_id)
            if existing is not None:
                return existing, False
            count, total = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM files WHERE dataset = ?",
                [dataset]).fetchone()
            if count != expected:
                raise RuntimeError("head changed while committing")
            conn.execute("INSERT INTO versions(dataset, id, created, file_count, total_bytes) "
                         "VALUES (?, ?, ?, ?, ?)", [dataset, version_id, now(), count, total])
            conn.execute(f"INSERT INTO version_files(version, dataset, {_ENTRY_COLS}) "
                         f"SELECT ?, dataset, {_ENTRY_COLS} FROM files WHERE dataset = ?",
                         [version_id, dataset])
            row = self._version(conn, dataset, version_id)
            assert row is not None
            return row, True

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
