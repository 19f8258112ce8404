"""The Hub's disk cache: files by dataset and path, indexed by sha256 in SQLite."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

__all__ = ["FileCache", "safe_component"]


def safe_component(text: str) -> str:
    """A string usable as one directory name (for server addresses)."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text) or "_"


class FileCache:
    """``<root>/datasets/<dataset>/<path>`` plus ``index.sqlite`` of what is verified there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.root / "index.sqlite"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS cached (dataset TEXT, path TEXT, "
                         "sha256 TEXT, size INTEGER, PRIMARY KEY (dataset, path))")

    def dataset_dir(self, dataset: str) -> Path:
        """Where a dataset's files are cached."""
        return self.root / "datasets" / dataset

    def file_path(self, dataset: str, path: str) -> Path:
        """Where one file is cached (path was validated by the server's manifest)."""
        return self.dataset_dir(dataset) / path

    def manifest_path(self, dataset: str, version: str) -> Path:
        """Where a pinned version's compressed manifest is cached."""
        return self.root / "manifests" / dataset / f"{version}.pb.z"

    def lookup(self, dataset: str, path: str) -> tuple[str, int] | None:
        """(sha256, size) of a cached file still present on disk."""
        with self._lock:
            row = self._db.execute("SELECT sha256, size FROM cached WHERE dataset = ? AND "
                                   "path = ?", [dataset, path]).fetchone()
        if row is None:
            return None
        try:
            if self.file_path(dataset, path).stat().st_size != row[1]:
                return None
        except OSError:
            return None
        return str(row[0]), int(row[1])

    def record(self, dataset: str, path: str, sha256: str, size: int) -> None:
        """Note a verified file."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO cached VALUES (?, ?, ?, ?)",
                             [dataset, path, sha256, size])

    def size(self, dataset: str | None = None) -> int:
        """Bytes on disk under the cache (or one dataset of it)."""
        base = self.dataset_dir(dataset) if dataset else self.root
        total = 0
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                try:
                    total += os.lstat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        if dataset:
            mdir = self.root / "manifests" / dataset
            total += sum(p.stat().st_size for p in mdir.glob("*") if p.is_file())
        return total

    def clear(self, dataset: str | None = None) -> int:
        """Delete cached files and manifests; returns the bytes freed."""
        freed = self.size(dataset)
        with self._lock:
            if dataset:
                self._db.execute("DELETE FROM cached WHERE dataset = ?", [dataset])
                shutil.rmtree(self.dataset_dir(dataset), ignore_errors=True)
                shutil.rmtree(self.root / "manifests" / dataset, ignore_errors=True)
            else:
                self._db.execute("DELETE FROM cached")
                shutil.rmtree(self.root / "datasets", ignore_errors=True)
                shutil.rmtree(self.root / "manifests", ignore_errors=True)
        return freed - (self.size(dataset) if not dataset else 0)

    def close(self) -> None:
        """Close the index."""
        self._db.close()
