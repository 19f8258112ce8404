"""Files and directories only their owner can read: 0600 and 0700.

Everything a gristmill server keeps in its data directory (blobs, catalogs,
API key hashes), and what clients keep in their cache directory (indexes,
import hashes), is created with these modes whatever the umask, and modes of
existing paths are tightened when they are opened. Standard library only, so
the client and every service share it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import uuid
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "private_database", "private_dir", "temp_token"]

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, and tighten it if it exists."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def private_database(path: Path) -> None:
    """Create a SQLite file 0600 before SQLite opens it (its -wal and -shm take that mode)."""
    private_dir(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    for name in (path.name, path.name + "-wal", path.name + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            f = path.with_name(name)
            if f.stat().st_mode & 0o077:
                f.chmod(FILE_MODE)


_TEMP_PREFIX = uuid.uuid4().hex[:8]
_TEMP_COUNT = itertools.count()


def temp_token() -> str:
    """A name part for a temporary file, made without a system call.

    Unique across threads, processes (the pid) and runs (random per process).
    """
    return f"{_TEMP_PREFIX}{os.getpid():x}-{next(_TEMP_COUNT):x}"
