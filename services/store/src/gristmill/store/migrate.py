"""Move a Ceph store's local SQLite catalog into its pool (``gristmill store migrate-catalog``).

Stores on Ceph made before the catalog moved into the pool kept it in
``DATA_DIR/store/catalog.sqlite``; their blobs are in the pool already. This
copies every dataset (name, description, creation time), its head and its
versions (ids and commit times kept) into the pool's catalog. It can be run
again after an interruption: a dataset already copied (same creation time)
is completed, not duplicated.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gristmill.client.errors import FailedPrecondition
from gristmill.client.progress import progress
from gristmill.store.catalog import Catalog
from gristmill.store.poolcatalog import PoolCatalog
from gristmill.v1 import store_pb2

__all__ = ["MigrationReport", "migrate_catalog"]

_PAGE = 1000


@dataclass
class MigrationReport:
    """What one migration copied."""

    datasets: int = 0
    files: int = 0
    versions: int = 0

    def summary(self) -> str:
        """One line for people."""
        return (f"copied {self.datasets} dataset(s), {self.files} head file(s) and "
                f"{self.versions} version(s) into the pool's catalog")


def _pages(source: Catalog, dataset: str, version: str
           ) -> Iterator[list[store_pb2.FileEntry]]:
    after: str | None = None
    while page := source.entries(dataset, version, after, _PAGE):
        yield page
        after = page[-1].path


def migrate_catalog(source: Catalog, target: PoolCatalog, *, show_progress: bool = True
                    ) -> MigrationReport:
    """Copy every dataset of ``source`` into ``target`` (see the module docstring).

    A dataset of the same name made independently in the pool (another
    creation time) is a conflict: nothing is copied and the error names them all.
    """
    rows = []
    after: str | None = None
    while page := source.datasets(after, _PAGE):
        rows += page
        after = page[-1].name
    conflicts = []
    for row in rows:
        there = target.dataset(row.name)
        if there is not None and there.created != row.created:
            conflicts.append(row.name)
    if conflicts:
        raise FailedPrecondition(
            f"the pool's catalog already has dataset(s) {', '.join(map(repr, conflicts))}, "
            "made there and not by an earlier migration; delete or rename them first "
            "(nothing was copied)", reason="DATASET_EXISTS")
    report = MigrationReport()
    bar = progress(sum(r.file_count for r in rows), "migrating the catalog", unit="file",
                   enabled=show_progress)
    try:
        for row in rows:
            target.create_dataset(row.name, row.description, row.created)
            for files in _pages(source, row.name, "latest"):
                target.add_files(row.name, files)
                report.files += len(files)
                bar.update(len(files))
            versions = source.versions(row.name, None, -1)
            for version in reversed(versions):  # oldest first
                if target.import_version(row.name, version, _pages(source, row.name,
                                                                    version.id)):
                    report.versions += 1
            report.datasets += 1
    finally:
        bar.close()
    return report
