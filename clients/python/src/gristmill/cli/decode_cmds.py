"""``gristmill decode``: bucket tables and decoding a dataset through the decode service."""

from __future__ import annotations

import argparse
import collections
from collections.abc import Iterator
from pathlib import Path

from gristmill.client.decoding import DecodeClient
from gristmill.client.hub import LATEST, Hub
from gristmill.client.progress import progress
from gristmill.v1 import decode_pb2

__all__ = ["add_decode_commands"]

#: Samples per DecodeRequest sent by the CLI.
BATCH = 16


def _client(args: argparse.Namespace) -> DecodeClient:
    return DecodeClient(args.address, args.api_key, args.ca_file)


def cmd_buckets(args: argparse.Namespace) -> int:
    with _client(args) as client:
        buckets = client.list_buckets(args.image_size, args.downsampling, args.min_aspect,
                                      args.max_aspect)
    print(f"{'index':>5} {'width':>6} {'height':>6} {'aspect':>7}")
    for b in buckets:
        print(f"{b.index:>5} {b.width:>6} {b.height:>6} {b.aspect:>7.3f}")
    print(f"{len(buckets)} buckets")
    return 0


def _size(text: str) -> tuple[int, int]:
    w, sep, h = text.lower().partition("x")
    if not (sep and w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 256x256, got {text!r}")
    return int(w), int(h)


def _transform(args: argparse.Namespace) -> decode_pb2.Transform:
    t = decode_pb2.Transform(
        crop=decode_pb2.CROP_MODE_RANDOM if args.crop == "random" else decode_pb2.CROP_MODE_CENTER,
        seed=args.seed, encoding=decode_pb2.ENCODING_PNG)
    if args.size:
        t.fixed.width, t.fixed.height = args.size
    else:
        t.buckets.image_size, t.buckets.downsampling = args.image_size, args.downsampling
    return t


def cmd_dataset(args: argparse.Namespace) -> int:
    with Hub(args.address, args.api_key, None, ca_file=args.ca_file,
             show_progress=False) as hub:
        paths = [e.path for e in hub.list_manifest(args.name, args.version)]
    if args.limit:
        paths = paths[:args.limit]
    transform = _transform(args)

    def requests() -> Iterator[decode_pb2.DecodeRequest]:
        for i in range(0, len(paths), BATCH):
            yield decode_pb2.DecodeRequest(
                transform=transform if i == 0 else None,
                samples=[decode_pb2.DecodeSample(id=p, image=decode_pb2.ImageSource(
                    ref=decode_pb2.StoreRef(dataset=args.name, version=args.version, path=p)))
                    for p in paths[i:i + BATCH]])

    buckets: collections.Counter[str] = collections.Counter()
    errors: list[str] = []
    bar = progress(len(paths), "decoding", "img")
    with _client(args) as client:
        for resp in client.decode(requests()):
            for r in resp.results:
                if r.WhichOneof("result") == "error":
                    reason = decode_pb2.DecodeErrorReason.Name(r.error.reason)
                    errors.append(f"{r.id}: {reason.removeprefix('DECODE_ERROR_REASON_')}: "
                                  f"{r.error.message}")
                else:
                    img = r.sample.image
                    buckets[f"{img.width}x{img.height}"] += 1
                    if args.out:
                        dest = args.out / (r.id + ".png")
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(img.data)
                bar.update(1)
    bar.close()
    print(f"decoded {sum(buckets.values())} of {len(paths)} files"
          + (f" into {args.out}" if args.out else ""))
    for size, n in sorted(buckets.items(), key=lambda kv: -kv[1]):
        print(f"  {size:>10}  {n}")
    for line in errors:
        print(f"  error {line}")
    return 1 if errors and args.strict else 0


def add_decode_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                        conn: argparse.ArgumentParser) -> None:
    """Register ``gristmill decode buckets`` and ``gristmill decode dataset``."""
    dec = commands.add_parser("decode", help="bucket tables; decode a dataset's images",
                              description="Use the decode service: aspect-ratio bucket tables, "
                              "and decoding a dataset's images into buckets (as PNG files).")
    sub = dec.add_subparsers(dest="action", required=True, metavar="ACTION")

    def bucket_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--image-size", type=int, default=512, help="S, the square bucket's "
                       "side (default %(default)s)")
        p.add_argument("--downsampling", type=int, default=16, help="d: bucket sides are "
                       "multiples of it (default %(default)s)")

    p = sub.add_parser("buckets", help="print the bucket table of a configuration",
                       description="Print the datago bucket table of S, d and the aspect "
                       "range, as the server computes it.", parents=[conn])
    bucket_flags(p)
    p.add_argument("--min-aspect", type=float, default=0.5, help="default %(default)s")
    p.add_argument("--max-aspect", type=float, default=2.0, help="default %(default)s")
    p.set_defaults(handler=cmd_buckets)

    p = sub.add_parser("dataset", help="decode a dataset's images into buckets",
                       description="Decode the images of a dataset version through the "
                       "decode service (by reference: the bytes stay on the server), print how "
                       "many landed in each bucket and every per-file error, and optionally "
                       "write the results as PNG files.", parents=[conn])
    p.add_argument("name", help="dataset")
    p.add_argument("--version", default=LATEST, help="version id or 'latest'")
    bucket_flags(p)
    p.add_argument("--size", type=_size, help="fixed output size WxH instead of buckets, "
                   "e.g. 256x256")
    p.add_argument("--crop", choices=["center", "random"], default="center")
    p.add_argument("--seed", type=int, default=0, help="seed of random crops")
    p.add_argument("--limit", type=int, default=0, help="only the first N files")
    p.add_argument("--out", type=Path, help="write each result as OUT/<path>.png")
    p.add_argument("--strict", action="store_true", help="exit 1 if any file fails")
    p.set_defaults(handler=cmd_dataset)
