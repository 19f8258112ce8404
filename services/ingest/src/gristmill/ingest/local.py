"""The ingest pipeline on a local folder, in-process, with no server.

:func:`folder_ingest` builds an :class:`Ingest` whose store is a folder:
the same planner, feed and decoder as the service, so
``Loader.from_folder`` and a server give identical batches for identical
files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from gristmill.client.errors import GristmillError, NotFound
from gristmill.client.imageinfo import read_header
from gristmill.client.progress import progress
from gristmill.common.config import IngestConfig
from gristmill.decode.pool import Decoder
from gristmill.ingest.service import Ingest, Planner
from gristmill.ingest.sources import LocalDecode
from gristmill.v1 import store_pb2

__all__ = ["FolderStore", "folder_ingest"]

log = logging.getLogger(__name__)

#: Extensions taken as images when scanning a folder.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff"}


def _header(path: Path) -> store_pb2.ImageInfo | None:
    """Displayed size from the header only (EXIF 5-8 swap the sides); None if unreadable.

    The same reader as the store's manifests (a few KiB per file, no pixels).
    """
    try:
        header = read_header(path)
    except OSError:
        return None
    if header is None:
        return None
    return store_pb2.ImageInfo(width=header.width, height=header.height, format=header.format,
                               orientation=header.orientation)


class FolderStore:
    """A folder seen as one dataset with one version (a digest of its listing)."""

    def __init__(self, root: Path | str, show_progress: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise NotFound(f"folder {self.root} does not exist; give a folder of images")
        files = sorted(p for p in self.root.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        entries = []
        digest = hashlib.sha256()
        bar = progress(len(files), "scanning", "file", enabled=show_progress)
        try:
            for p in files:
                rel = p.relative_to(self.root).as_posix()
                st = p.stat()
                digest.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                entry = store_pb2.FileEntry(path=rel, size=st.st_size, media_type="image/*")
                info = _header(p)
                if info is not None:
                    entry.image.CopyFrom(info)
                entries.append(entry)
                bar.update(1)
        finally:
            bar.close()
        self.entries = entries
        self.version = digest.hexdigest()

    def resolve_version(self, dataset: str, version: str) -> str:
        """The folder's one version."""
        return self.version

    def manifest(self, dataset: str, version: str) -> Sequence[store_pb2.FileEntry]:
        """The files found when the folder was scanned."""
        return self.entries

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """Each file's bytes, or the error reading it."""
        out: dict[str, bytes | GristmillError] = {}
        for rel in paths:
            try:
                out[rel] = (self.root / rel).read_bytes()
            except OSError as e:
                out[rel] = NotFound(f"cannot read {self.root / rel}: {e.strerror}",
                                    reason="FILE_NOT_FOUND")
        return out


def folder_ingest(root: Path | str, *, workers: int = 0, prefetch_batches: int = 4,
                  show_progress: bool = True) -> tuple[Ingest, Decoder]:
    """An in-process ingest over a folder, and its decoder (close it when done)."""
    store = FolderStore(root, show_progress)
    decoder = Decoder(workers or os.cpu_count() or 1)
    # the caller's own memory, in its own process: bounded by prefetch_batches alone
    unbounded = 1 << 62
    config = IngestConfig(prefetch_batches=prefetch_batches, stream_prefetch_bytes=unbounded,
                          server_prefetch_bytes=unbounded)
    local = LocalDecode(decoder, store)
    return Ingest(Planner(store, config), lambda: local, config,
                  max_pixels=decoder.max_pixels), decoder
