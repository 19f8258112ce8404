"""``gristmill stream`` (one rank of the training feed) and ``gristmill audit`` (exactly-once)."""

from __future__ import annotations

import argparse
import collections
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from gristmill.client.delivery import audit
from gristmill.client.loader import Batch, Loader
from gristmill.client.progress import progress
from gristmill.client.world import World

__all__ = ["add_stream_commands", "contact_sheet"]


def contact_sheet(batch: Batch, path: Path, tile: int = 160) -> Path:
    """Save a batch's images as one PNG grid, each scaled to fit a ``tile`` square."""
    from PIL import Image

    n = max(len(batch), 1)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = Image.new("RGB", (cols * tile, rows * tile), (32, 32, 32))
    for i, pixels in enumerate(batch.images):
        im = Image.fromarray(pixels.squeeze() if pixels.shape[2] == 1 else pixels)
        im.thumbnail((tile - 4, tile - 4))
        x, y = (i % cols) * tile, (i // cols) * tile
        sheet.paste(im.convert("RGB"), (x + (tile - im.width) // 2, y + (tile - im.height) // 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _check_world(args: argparse.Namespace) -> str | None:
    """What is wrong with --rank/--world-size (or RANK/WORLD_SIZE), if anything."""
    try:
        World.from_env(args.rank, args.world_size)
    except ValueError as e:
        return (f"{e}: pass --rank from 0 to --world-size - 1 (or set RANK and WORLD_SIZE as "
                "torchrun does)")
    return None


def cmd_stream(args: argparse.Namespace) -> int:
    if (problem := _check_world(args)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    common: dict[str, Any] = dict(
        batch_size=args.batch_size, image_size=args.image_size,
        downsampling_ratio=args.downsampling, seed=args.seed, policy=args.policy,
        drop_last=args.drop_last, rank=args.rank, world_size=args.world_size,
        prefix=args.prefix, companions=args.companion, delivery_log=args.delivery_log,
        annotations=args.annotations)
    if args.folder:
        loader = Loader.from_folder(args.name, show_progress=not args.quiet, **common)
    else:
        loader = Loader(args.address, args.name, args.version, api_key=args.api_key,
                        ca_file=args.ca_file, shared_memory=args.shared_memory, **common)
    with loader:
        rank = loader.world.rank
        plan = loader.plan
        print(f"rank {rank}/{loader.world.world_size}: dataset {args.name} version "
              f"{loader.spec.version[:12]}, {plan.dataset_samples} samples, "
              f"{len(loader)} batches of {args.batch_size} per epoch")
        if loader.spec.release:
            print(f"rank {rank}: annotations of release {loader.spec.release} (log position "
                  f"{loader.spec.release_seq}, {loader.spec.release_head_hash[:12]})")
        sizes: collections.Counter[str] = collections.Counter()
        images = errors = 0
        fresh = labelled = labels = shown = 0  # samples (not padding), those with labels
        start = time.perf_counter()
        for epoch in range(args.epochs):
            loader.set_epoch(epoch)
            bar = progress(len(loader), f"rank {rank} epoch {epoch}", "batch",
                           enabled=not args.quiet, position=rank, leave=True)
            for i, batch in enumerate(loader):
                if i == 0 and epoch == 0 and args.contact_sheet:
                    contact_sheet(batch, args.contact_sheet)
                h, w = batch.images.shape[1:3]
                sizes[f"{w}x{h}"] += 1
                images += len(batch)
                errors += len(batch.errors)
                for sample_id, found, is_fresh in zip(batch.ids, batch.annotations,
                                                      batch.fresh, strict=True):
                    if not is_fresh:
                        continue
                    fresh += 1
                    labelled += bool(found)
                    labels += len(found)
                    if found and shown < args.show_annotations and epoch == 0:
                        shown += 1
                        print(f"  {sample_id}: " + "; ".join(
                            f"{a['schema']} {json.dumps(a['data'], ensure_ascii=False)}"
                            for a in found))
                for e in batch.errors:
                    print(f"  error {e.id}: {e.reason}: {e.message}")
                bar.update(1)
            bar.close()
        elapsed = time.perf_counter() - start
        path = loader.pixel_path
    print(f"rank {rank}: {images} images in {elapsed:.2f} s = {images / elapsed:.1f} images/s, "
          f"{sum(sizes.values())} batches, {errors} errors; pixels via {path}")
    print(f"rank {rank}: batches per bucket (WxH): "
          + ", ".join(f"{k} {v}" for k, v in sorted(sizes.items())))
    if loader.spec.release:
        print(f"rank {rank}: {labelled} of {fresh} samples had annotations ({labels} in all) "
              f"at release {loader.spec.release}")
    if args.contact_sheet:
        print(f"rank {rank}: first batch written to {args.contact_sheet}")
    return 1 if errors and args.strict else 0


def cmd_audit(args: argparse.Namespace) -> int:
    if not args.logdir.is_dir():
        print(f"error: {args.logdir} is not a folder: pass the directory given to "
              "Loader(delivery_log=...) or `gristmill stream --delivery-log`", file=sys.stderr)
        return 2
    try:
        report = audit(args.logdir)
    except FileNotFoundError as e:  # a folder without logs
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    print("exactly once: OK" if report.ok else "exactly once: FAILED")
    return 0 if report.ok else 1


def add_stream_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                        conn: argparse.ArgumentParser) -> None:
    """Register ``stream`` and ``audit``."""
    p = commands.add_parser(
        "stream", parents=[conn], help="stream one rank's batches (a training loop without "
        "the training)", description="Stream a dataset as one rank of a training job would: "
        "prints images/s, batches per bucket and per-sample errors.")
    p.set_defaults(handler=cmd_stream)
    p.add_argument("name", help="dataset name (or a local folder with --folder)")
    p.add_argument("--folder", action="store_true",
                   help="NAME is a local folder: decode in this process, no server")
    p.add_argument("--version", default="latest", help="version id or 'latest' (newest "
                   "committed)")
    p.add_argument("--rank", type=int, default=None, help="this rank (default $RANK or 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks (default $WORLD_SIZE or 1)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=512, help="bucket side S (default 512)")
    p.add_argument("--downsampling", type=int, default=16, help="bucket step d (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", choices=["exact", "hash", "sequential"], default="exact")
    p.add_argument("--drop-last", action="store_true", help="drop the tail instead of padding")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--prefix", default="", help="only files under this path prefix")
    p.add_argument("--companion", action="append", default=[],
                   help="companion path template, e.g. 'masks/{stem}.png' (repeatable)")
    p.add_argument("--delivery-log", type=Path, default=None,
                   help="record every delivered sample here (check with `gristmill audit`)")
    p.add_argument("--contact-sheet", type=Path, default=None,
                   help="write the first batch as a PNG grid (needs Pillow)")
    p.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="pixels through a /dev/shm ring (default: when the server is on "
                   "this host)")
    p.add_argument("--annotations", metavar="RELEASE", default=None,
                   help="deliver each sample's accepted annotations at this release of the "
                   "dataset's annotation log (with --folder: a file written by `gristmill "
                   "annotate export`)")
    p.add_argument("--show-annotations", type=int, default=0, metavar="N",
                   help="print the annotations of the first N samples delivered that have "
                   "any (with --annotations)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any sample failed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = commands.add_parser(
        "audit", help="check delivery logs: every sample exactly once per epoch",
        description="Read the delivery logs of all ranks (Loader(delivery_log=DIR) or "
        "`gristmill stream --delivery-log DIR`) and prove each epoch delivered every planned "
        "sample exactly once across ranks, or list the duplicates and gaps. Exit 1 on failure.")
    p.set_defaults(handler=cmd_audit)
    p.add_argument("logdir", type=Path)

