"""Server-side store commands of the ``gristmill`` CLI: ``gristmill store gc``.

They work on a data directory directly (like ``gristmill keys``), so they run
on the store's host, as the server's user.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from gristmill.common.config import ConfigError, ServerConfig, load_config
from gristmill.common.service import ServiceContext

__all__ = ["register"]

_GC_HELP = """\
Remove blobs that no dataset head, version or upload in flight refers to, and
staging files of uploads that died. A server removes both at start-up (config
store.gc_on_start); run this to free space without a restart.

Safe next to a running server: a blob is removed only if it was neither
written nor used by an upload for --grace-minutes (uploads of the server touch
every blob they write or reuse), and the reference check and the delete hold
the catalog's write lock. Use --grace-minutes 0 only when no server is running.

On Ceph with the catalog in the pool (shared by every store replica), pass the
servers' --config: it marks every blob a dataset refers to, then deletes each
unreferenced one only at the RADOS version it saw, so a replica's upload that
reuses a blob meanwhile keeps it (docs/storage.md).
"""


def _config(args: argparse.Namespace) -> ServerConfig | None:
    """The server's config from --config and --data (files made private); None: said why."""
    os.umask(0o077)
    try:
        return load_config(args.config, overrides={"data_dir": args.data})
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def _gc(args: argparse.Namespace) -> int:
    from gristmill.store.config import StoreConfig
    from gristmill.store.service import open_store

    config = _config(args)
    if config is None:
        return 2
    if args.grace_minutes < 0:
        print("error: --grace-minutes must not be negative", file=sys.stderr)
        return 2
    catalog = config.data_dir / "store" / "catalog.sqlite"
    in_pool = StoreConfig.of(config).catalog_in_pool
    if not in_pool and not catalog.is_file():
        print(f"error: {config.data_dir} holds no store (no {catalog}); pass the server's "
              "--data directory", file=sys.stderr)
        return 2
    store = open_store(ServiceContext(config))
    try:
        report = store.collect_garbage(args.grace_minutes * 60, dry_run=args.dry_run,
                                       fix_modes=True)
    finally:
        store.close()
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True))
    else:
        print(report.summary())
    return 0


_MIGRATE_HELP = """\
Copy the local SQLite catalog of a store on Ceph (DATA_DIR/store/catalog.sqlite,
made before the catalog moved into the pool) into the pool's catalog, then
rename it to catalog.sqlite.migrated. Datasets, heads and versions (ids and
commit times) are copied; blobs are in the pool already. Stop the server that
uses the local catalog first. Run it again if it was interrupted.
"""


def _migrate(args: argparse.Namespace) -> int:
    from gristmill.store.catalog import Catalog
    from gristmill.store.ceph import CephBackend
    from gristmill.store.config import StoreConfig
    from gristmill.store.migrate import migrate_catalog
    from gristmill.store.poolcatalog import PoolCatalog

    config = _config(args)
    if config is None:
        return 2
    backend_config = StoreConfig.of(config).backend
    if backend_config.kind != "ceph":
        print("error: the config's store is not on Ceph (store.backend.kind: ceph); a "
              "filesystem store keeps its catalog in SQLite", file=sys.stderr)
        return 2
    path = config.data_dir / "store" / "catalog.sqlite"
    if not path.is_file():
        print(f"error: {config.data_dir} holds no local catalog (no {path}); pass the "
              "server's --data directory", file=sys.stderr)
        return 2
    source = Catalog(path)
    backend = CephBackend(backend_config)
    try:
        report = migrate_catalog(source, PoolCatalog(backend, path.parent / "catalog",
                                                     backend_config.catalog_shards),
                                 show_progress=not args.quiet)
    finally:
        source.close()
        backend.close()
    done = path.with_name("catalog.sqlite.migrated")
    path.rename(done)
    print(f"{report.summary()}; the local catalog is now {done}")
    if backend_config.catalog != "pool":
        print("set store.backend.catalog: pool (the default) to serve from the pool's catalog")
    return 0


def register(commands: Any) -> None:
    """Add ``store`` (with ``gc`` and ``migrate-catalog``) to the CLI's sub-commands."""
    store = commands.add_parser("store", help="maintain a store's data directory (server side)",
                                description="Maintenance of the store's data directory, run on "
                                "the store's host as the server's user.")
    actions = store.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("gc", help="remove unreferenced blobs and dead uploads' staging files",
                           description=_GC_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="data directory of the server (config key data_dir)")
    p.add_argument("--config", type=Path, help="YAML config file")
    p.add_argument("--grace-minutes", type=float, default=60.0,
                   help="keep unreferenced blobs and staging files written or used this recently "
                   "(default 60)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; "
                   "remove nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_gc)
    p = actions.add_parser("migrate-catalog", help="copy a Ceph store's local catalog into "
                           "its pool", description=_MIGRATE_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="data directory of the server (config key data_dir)")
    p.add_argument("--config", type=Path, help="YAML config file (its store.backend: the pool)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_migrate)
