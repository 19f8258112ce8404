"""The Hub's disk cache: files by dataset and path, indexed by sha256 in SQLite.

Every name that becomes part of a filesystem path here (dataset, file path,
version) is validated first, and :func:`inside` checks that the result stays
under its root: the names come from callers and from servers, and neither is
trusted to keep the Hub inside its cache or download folder.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import threading
from functools import lru_cache
from pathlib import Path

from gristmill.client.errors import FailedPrecondition, InvalidArgument
from gristmill.client.names import validate_dataset_name, validate_path

__all__ = ["Confined", "FileCache", "inside", "safe_component", "validate_version_name"]

_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def safe_component(text: str) -> str:
    """A string usable as one directory name (for server addresses); never ``.`` or ``..``."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
    return "_" if not name.strip(".") else name


def validate_version_name(version: str, field: str = "version") -> str:
    """A version as the cache names it: an id or id prefix, no separators or dots first."""
    if _VERSION.fullmatch(version) is None:
        shown = ascii(version if len(version) <= 80 else version[:80] + "...")
        raise InvalidArgument(field, f"{shown} is not a version: use 'latest', a version id or "
                              "a prefix of at least 8 of its characters", reason="INVALID_VERSION")
    return version


def inside(root: Path, relative: str, field: str = "path", *,
           real: set[str] | None = None) -> Path:
    """``root / relative``, refusing anything that would lead out of ``root``.

    ``relative`` must be a valid store path (:func:`~gristmill.client.names.validate_path`:
    no ``..``, not absolute; used in its NFC form). No folder between ``root``
    and the target may be a symbolic link (folders that do not exist yet are
    fine), and the target, if it is a link, must resolve to a place inside
    ``root``. ``root`` itself may be a link: that is the user's choice.

    ``real`` remembers folders already found to be real (not links) across
    calls, so that many files in one folder cost one check of it. The checks
    guard against links that are there before the Hub writes, not against a
    local process racing it.

    Raises:
        InvalidArgument: ``relative`` is not a valid path.
        FailedPrecondition: a symbolic link would lead the path out of ``root``.
    """
    rel = validate_path(relative, field)
    return _join(Path(root).resolve(), Path(root), rel.split("/"), real)


@lru_cache(maxsize=1 << 16)
def _valid_path(path: str) -> str:
    """:func:`validate_path` for paths met again and again (errors are not cached)."""
    return validate_path(path)


def _join(base: Path, root: Path, parts: list[str], real: set[str] | None = None) -> Path:
    """``root`` joined with valid path segments, refusing links (``base`` is root resolved)."""
    target = os.fspath(base)
    for part in parts[:-1]:
        target = os.path.join(target, part)
        if real is not None and target in real:
            continue
        if os.path.islink(target):
            raise _link_refused(Path(target), root)
        if real is not None and os.path.isdir(target):
            real.add(target)
    target = os.path.join(target, parts[-1])
    if os.path.islink(target) and not Path(os.path.realpath(target)).is_relative_to(base):
        raise _link_refused(Path(target), root)
    return root.joinpath(*parts)


class Confined:
    """A folder that relative paths are joined under with :func:`inside`'s checks.

    The root is resolved once and folders found real are remembered, so that
    many files cost one check per folder.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._base = self.root.resolve()
        self._real: set[str] = set()

    def path(self, relative: str, field: str = "path") -> Path:
        """``root / relative`` (validated; links out of root refused, see :func:`inside`)."""
        try:
            rel = _valid_path(relative)
        except InvalidArgument:
            rel = validate_path(relative, field)  # raises, naming the field
        return self.join(rel.split("/"))

    def join(self, segments: list[str]) -> Path:
        """``root`` joined with segments already validated (links out of root refused)."""
        return _join(self._base, self.root, segments, self._real)

    def forget(self) -> None:
        """Check every folder again (after deleting some)."""
        self._real.clear()


def _link_refused(link: Path, root: Path) -> FailedPrecondition:
    return FailedPrecondition(f"{link} is a symbolic link; refusing to follow it out of {root} "
                              "(remove the link, or choose another folder)",
                              reason="SYMLINK_REFUSED")


def _tree_bytes(base: Path) -> int:
    """Bytes of the regular files under ``base`` (links are not followed)."""
    total = 0
    for dirpath, _dirs, files in os.walk(base):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class FileCache:
    """``<root>/datasets/<dataset>/<path>`` plus ``index.sqlite`` of what is verified there."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._folder = Confined(self.root)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.root / "index.sqlite"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS cached (dataset TEXT, path TEXT, "
                         "sha256 TEXT, size INTEGER, PRIMARY KEY (dataset, path))")

    def _under(self, *parts: str) -> Path:
        """``root/parts...`` (each part already a valid name or path), refusing links out of it."""
        return self._folder.join([s for p in parts for s in p.split("/")])

    def dataset_dir(self, dataset: str) -> Path:
        """Where a dataset's files are cached (the name is validated)."""
        return self._under("datasets", validate_dataset_name(dataset, "dataset"))

    def file_path(self, dataset: str, path: str) -> Path:
        """Where one file is cached (dataset and path are validated; see :func:`inside`)."""
        return self._file(validate_dataset_name(dataset, "dataset"), _valid_path(path))

    def _file(self, dataset: str, path: str) -> Path:
        return self._under("datasets", dataset, path)

    def manifest_path(self, dataset: str, version: str) -> Path:
        """Where a pinned version's compressed manifest is cached."""
        name = validate_dataset_name(dataset, "dataset")
        return self._under("manifests", name, f"{validate_version_name(version)}.pb.z")

    def lookup(self, dataset: str, path: str) -> tuple[str, int] | None:
        """(sha256, size) of a cached file still present on disk."""
        dataset, path = validate_dataset_name(dataset, "dataset"), _valid_path(path)
        target = self._file(dataset, path)
        with self._lock:
            row = self._db.execute("SELECT sha256, size FROM cached WHERE dataset = ? AND "
                                   "path = ?", [dataset, path]).fetchone()
        if row is None:
            return None
        try:
            if target.stat().st_size != row[1]:
                return None
        except OSError:
            return None
        return str(row[0]), int(row[1])

    def record(self, dataset: str, path: str, sha256: str, size: int) -> None:
        """Note a verified file."""
        dataset, path = validate_dataset_name(dataset), _valid_path(path)
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO cached VALUES (?, ?, ?, ?)",
                             [dataset, path, sha256, size])

    def _dataset_dirs(self, dataset: str) -> tuple[str, Path, Path]:
        name = validate_dataset_name(dataset, "dataset")
        return name, self._under("datasets", name), self._under("manifests", name)

    def size(self, dataset: str | None = None) -> int:
        """Bytes on disk under the cache (or one dataset of it); links are not followed."""
        if dataset is None:
            return _tree_bytes(self.root)
        _, files, manifests = self._dataset_dirs(dataset)
        return _tree_bytes(files) + _tree_bytes(manifests)

    def clear(self, dataset: str | None = None) -> int:
        """Delete cached files and manifests; returns the bytes freed."""
        dirs = self._dataset_dirs(dataset) if dataset is not None else None
        freed = self.size(dataset)
        with self._lock:
            self._folder.forget()
            if dirs is not None:
                name, files, manifests = dirs
                self._db.execute("DELETE FROM cached WHERE dataset = ?", [name])
                shutil.rmtree(files, ignore_errors=True)
                shutil.rmtree(manifests, ignore_errors=True)
            else:
                self._db.execute("DELETE FROM cached")
                shutil.rmtree(self.root / "datasets", ignore_errors=True)
                shutil.rmtree(self.root / "manifests", ignore_errors=True)
        return freed - (self.size() if dataset is None else 0)

    def close(self) -> None:
        """Close the index."""
        self._db.close()
