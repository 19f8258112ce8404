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

from gristmill.client.errors import ResourceExhausted
from gristmill.store.blobs import StoredBlob
from gristmill.store.disk import DISK_FULL, log

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
    #: Unreferenced blobs left because the volume was too full to delete them
    #: (a small blob's row: SQLite writes before it frees); a later run takes them.
    left_full: int = 0
    #: Bytes of deleted rows given back to the volume (``small-objects.sqlite`` shrunk).
    reclaimed_bytes: int = 0
    dry_run: bool = False

    def summary(self) -> str:
        """One line for people."""
        verb = "would remove" if self.dry_run else "removed"
        text = (f"{verb} {self.blobs_deleted} unreferenced blob(s), {self.bytes_freed} bytes, "
                f"and {self.temporaries_deleted} staging file(s), "
                f"{self.temporary_bytes_freed} bytes; kept {self.referenced} referenced, "
                f"{self.pinned} pinned by uploads and {self.recent} recent unreferenced blob(s)")
        if self.left_full:
            text += (f"; {self.left_full} left because the volume is full: free some space "
                     "and run `gristmill store gc` again")
        return text


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
    with store.catalog.collection(dry_run):
        batch: list[StoredBlob] = []
        full: list[StoredBlob] = []  # not deleted for lack of space: once more at the end
        for blob in store.blobs.stored_blobs(fix_modes):
            batch.append(blob)
            if len(batch) >= _BATCH:
                full += _sweep(store, batch, cutoff, report)
                batch = []
        if batch:
            full += _sweep(store, batch, cutoff, report)
        if full:
            # the files deleted since may have made room; else the reserve makes it
            if store.reserve is not None:
                store.reserve.release()
            report.left_full = len(_sweep(store, full, cutoff, report))
    if not dry_run:
        report.reclaimed_bytes = _reclaim(store)
        if store.reserve is not None:
            store.reserve.ensure()
    return report


def _reclaim(store: Store) -> int:
    """Shrink the backend's files after deletes; on a full volume with the reserve's room.

    It writes before it frees (SQLite's log): without room it is left for a
    later run, which the summary's figures show.
    """
    for attempt in range(2):
        try:
            return store.blobs.reclaim()
        except ResourceExhausted as e:
            if e.reason != DISK_FULL or attempt or store.reserve is None:
                log.warning("cannot shrink the store's files now (%s); a later "
                            "`gristmill store gc` will", e.message)
                return 0
            store.reserve.release()
    return 0


def _sweep(store: Store, batch: list[StoredBlob], cutoff: float, report: GcReport
           ) -> list[StoredBlob]:
    """Decide and delete one batch while nothing can start referring to its blobs.

    Returns the blobs the volume was too full to delete.
    """
    candidates = [b for b in batch if b.mtime < cutoff]
    report.recent += len(batch) - len(candidates)
    full: list[StoredBlob] = []
    if not candidates:
        return full
    shas = [b.sha256 for b in candidates]
    with store.catalog.guard("collect garbage") as guard, store.pins_held() as pinned:
        used = guard.referenced(shas)
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
                # a shared catalog: delete only as seen, so that a replica's touch (which
                # comes before it refers to the blob) and this delete exclude each other
                seen = now.version if store.catalog.shared else None
                freed = store.blobs.delete_unless_full(blob.sha256, seen)
                if freed is None:
                    full.append(blob)
                    continue
                if freed < 0:
                    report.recent += 1
                    continue
            report.blobs_deleted += 1
            report.bytes_freed += now.size
            gone.append(blob.sha256)
        if gone and not report.dry_run:
            guard.forget(gone)
    return full
