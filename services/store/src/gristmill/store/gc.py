"""Garbage collection: blobs nothing refers to, and staging files of dead uploads.

A blob is garbage when no dataset head and no version refers to it, no
upload in this process has pinned it, and it was not written or used (its
mtime) within the grace period. The grace period protects uploads of another
process on the same data directory (``gristmill store gc`` next to a running
server): the server touches every blob an upload writes or reuses, and
commits it to the catalog before the grace period is over unless the upload
stalls for longer.

The reference check and the delete of each batch happen under the catalog's
write lock (in-process lock and SQLite ``BEGIN IMMEDIATE``, so another
process cannot commit meanwhile) and the store's pin lock (no upload of this
process can pin a blob meanwhile).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gristmill.store.blobs import StoredBlob
from gristmill.store.catalog import Catalog

if TYPE_CHECKING:
    from gristmill.store.store import Store

__all__ = ["GcReport", "collect_garbage"]

_BATCH = 1000


@dataclass
class GcReport:
    """What one collection removed (or, with ``dry_run``, would remove)."""

    blobs_deleted: int = 0
    bytes_freed: int = 0
    temporaries_deleted: int = 0
    temporary_bytes_freed: int = 0
    #: Blobs kept because a dataset head or version refers to them.
    referenced: int = 0
    #: Unreferenced blobs kept because an upload in this process pinned them.
    pinned: int = 0
    #: Unreferenced blobs kept because they were written or used within the grace period.
    recent: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        """One line for people."""
        verb = "would remove" if self.dry_run else "removed"
        return (f"{verb} {self.blobs_deleted} unreferenced blob(s), {self.bytes_freed} bytes, "
                f"and {self.temporaries_deleted} staging file(s), "
                f"{self.temporary_bytes_freed} bytes; kept {self.referenced} referenced, "
                f"{self.pinned} pinned by uploads and {self.recent} recent unreferenced blob(s)")


def collect_garbage(store: Store, grace_seconds: float = 0.0, *, dry_run: bool = False,
                    fix_modes: bool = False) -> GcReport:
    """Remove unreferenced blobs and stale staging files older than ``grace_seconds``.

    With ``fix_modes``, blob files and directories readable by others are made
    private on the way. Afterwards the disk reserve is put back if there is room.
    """
    if grace_seconds < 0:
        raise ValueError("grace_seconds must not be negative")
    cutoff = time.time() - grace_seconds
    report = GcReport(dry_run=dry_run)
    report.temporaries_deleted, report.temporary_bytes_freed = (
        store.blobs.remove_temporaries(cutoff, dry_run))
    batch: list[StoredBlob] = []
    for blob in store.blobs.stored_blobs(fix_modes):
        batch.append(blob)
        if len(batch) >= _BATCH:
            _sweep(store, batch, cutoff, report)
            batch = []
    if batch:
        _sweep(store, batch, cutoff, report)
    if not dry_run and store.reserve is not None:
        store.reserve.ensure()
    return report


def _sweep(store: Store, batch: list[StoredBlob], cutoff: float, report: GcReport) -> None:
    """Decide and delete one batch while nothing can start referring to its blobs."""
    candidates = [b for b in batch if b.mtime < cutoff]
    report.recent += len(batch) - len(candidates)
    if not candidates:
        return
    shas = [b.sha256 for b in candidates]
    with store.catalog.transaction("collect garbage") as conn, store.pins_held() as pinned:
        used = Catalog.referenced_blobs(conn, shas)
        gone: list[str] = []
        for blob in candidates:
            if blob.sha256 in used:
                report.referenced += 1
                continue
            if pinned(blob.sha256):
                report.pinned += 1
                continue
            now = store.blobs.stat(blob.sha256)  # an upload may have used it since the walk
            if now is None:
                continue
            if now.mtime >= cutoff:
                report.recent += 1
                continue
            if not report.dry_run:
                store.blobs.delete(blob.sha256)
            report.blobs_deleted += 1
            report.bytes_freed += now.size
            gone.append(blob.sha256)
        if gone and not report.dry_run:
            Catalog.forget_blobs(conn, gone)
