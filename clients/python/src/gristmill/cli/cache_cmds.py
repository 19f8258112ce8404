"""``gristmill cache``: what the local download cache holds, and emptying it.

Both commands read only the cache folder: no server is needed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gristmill.client.cache import cache_summary, clear_folder
from gristmill.client.hub import DEFAULT_CACHE_DIR

__all__ = ["add_cache_commands", "human_size"]


def human_size(n: int) -> str:
    """Bytes as B, KiB, MiB, GiB or TiB, for people."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def cmd_info(args: argparse.Namespace) -> int:
    info = cache_summary(args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    if not info["stores"]:
        print(f"cache {info['path']} is empty")
        return 0
    print(f"cache {info['path']}: {info['files']} files, {info['bytes']} bytes "
          f"({human_size(info['bytes'])})")
    for store in info["stores"]:
        seen = ", ".join(store["addresses"]) or "address not recorded"
        print(f"  store {store['store_id']} ({seen}): {store['files']} files, "
              f"{human_size(store['bytes'])}")
        for name, d in store["datasets"].items():
            print(f"    {name:32} {d['files']:>9} files {human_size(d['bytes']):>11}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    freed = clear_folder(args.cache_dir, args.dataset)
    what = f"dataset {args.dataset}" if args.dataset else "everything"
    print(f"cleared {what} from {Path(args.cache_dir).expanduser()}: freed {freed} bytes "
          f"({human_size(freed)})")
    return 0


def add_cache_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``cache info`` and ``cache clear [DATASET]`` to the command tree."""
    cache = commands.add_parser(
        "cache", help="show or empty the local download cache",
        description="The local cache of downloaded files (Hub.get_file, dataset download), "
        "one folder per store id. No server is needed.")
    sub = cache.add_subparsers(dest="action", required=True, metavar="ACTION")
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                       help="the cache (env GRISTMILL_CACHE_DIR; default %(default)s)")
    p = sub.add_parser("info", parents=[flags], help="files and bytes by store and dataset",
                       description="Files and bytes cached, by store and dataset, with the "
                       "addresses each store was reached at.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)
    p = sub.add_parser("clear", parents=[flags], help="delete cached files (all, or a dataset)",
                       description="Delete cached files and manifests: everything, or one "
                       "dataset's in every store cached here. Prints the bytes freed.")
    p.add_argument("dataset", nargs="?", default=None, help="only this dataset")
    p.set_defaults(handler=cmd_clear)
