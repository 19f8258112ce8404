"""``gristmill array``: list, show and delete the N-d arrays (Zarr v3) a server stores.

These commands read the arrays' metadata through the array service; they
need neither zarr-python nor numpy's array client (``gristmill.client.arrays``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from gristmill.cli.cache_cmds import human_size
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import call_pages, call_rpc
from gristmill.v1 import arrays_pb2, arrays_pb2_grpc

__all__ = ["add_array_commands", "describe"]

_ITEM_SIZES = {"bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4,
               "uint32": 4, "int64": 8, "uint64": 8, "float16": 2, "float32": 4, "float64": 8,
               "complex64": 8, "complex128": 16}


def describe(info: arrays_pb2.ArrayInfo) -> dict[str, Any]:
    """What a person wants to know of an array, from its Zarr v3 metadata and stored bytes."""
    try:
        meta = json.loads(info.metadata)
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    shape = [int(n) for n in meta.get("shape") or []]
    grid = meta.get("chunk_grid") or {}
    chunks = [int(n) for n in (grid.get("configuration") or {}).get("chunk_shape") or []]
    data_type = meta.get("data_type")
    dtype = data_type.get("name") if isinstance(data_type, dict) else data_type
    codecs = [c.get("name") if isinstance(c, dict) else str(c) for c in meta.get("codecs") or []]
    grid_chunks = math.prod(math.ceil(s / c) for s, c in zip(shape, chunks, strict=False)
                            if c) if chunks else 0
    item = _ITEM_SIZES.get(str(dtype))
    return {
        "path": info.path,
        "shape": shape,
        "dtype": dtype,
        "chunks": chunks,
        "fill_value": meta.get("fill_value"),
        "codecs": codecs,
        "chunks_stored": info.chunks_stored,
        "chunks_in_grid": grid_chunks,
        "bytes_stored": info.bytes_stored,
        "bytes_uncompressed": math.prod(shape) * item if item is not None else None,
        "attributes": meta.get("attributes") or {},
    }


def _stub(args: argparse.Namespace) -> arrays_pb2_grpc.ArrayServiceStub:
    return arrays_pb2_grpc.ArrayServiceStub(open_channel(ConnectionOptions(
        args.address, args.api_key, args.ca_file)))


def _dims(values: list[int]) -> str:
    return "(" + ", ".join(str(v) for v in values) + ("," if len(values) == 1 else "") + ")"


def cmd_list(args: argparse.Namespace) -> int:
    stub = _stub(args)
    request = arrays_pb2.ListArraysRequest(page_size=1000)
    found: list[dict[str, Any]] = []
    for page in call_pages(stub.ListArrays, request):
        found.extend(describe(a) for a in page.arrays)
    if args.json:
        print(json.dumps(found, indent=2, sort_keys=True))
        return 0
    if not found:
        print("no arrays; create one with gristmill.client.arrays.File(ADDRESS, 'a')"
              ".create_dataset(...) (see docs/arrays.md)")
        return 0
    width = max(16, *(len(a["path"]) for a in found))
    print(f"{'PATH':{width}}  {'SHAPE':18} {'DTYPE':10} {'CHUNKS':16} STORED")
    for a in found:
        print(f"{a['path']:{width}}  {_dims(a['shape']):18} {str(a['dtype']):10} "
              f"{_dims(a['chunks']):16} {a['chunks_stored']}/{a['chunks_in_grid']} chunks, "
              f"{human_size(a['bytes_stored'])}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    info = call_rpc(_stub(args).GetArray, arrays_pb2.GetArrayRequest(path=args.path)).array
    a = describe(info)
    if args.json:
        print(json.dumps(a, indent=2, sort_keys=True))
        return 0
    print(f"array        {a['path']}")
    print(f"shape        {_dims(a['shape'])}")
    print(f"dtype        {a['dtype']}")
    print(f"chunks       {_dims(a['chunks'])} ({a['chunks_in_grid']} in the grid)")
    print(f"fill value   {a['fill_value']}")
    print(f"codecs       {', '.join(str(c) for c in a['codecs'])}")
    stored = f"{a['chunks_stored']} chunks, {human_size(a['bytes_stored'])}"
    if a["bytes_uncompressed"]:
        stored += f" (the whole array is {human_size(a['bytes_uncompressed'])} uncompressed)"
    print(f"stored       {stored}")
    if a["attributes"]:
        print(f"attributes   {json.dumps(a['attributes'], sort_keys=True)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"refusing to delete array {args.path!r} without --yes", file=sys.stderr)
        return 2
    resp = call_rpc(_stub(args).DeleteArray, arrays_pb2.DeleteArrayRequest(path=args.path))
    print(f"deleted array {args.path} ({resp.keys_deleted} keys, "
          f"{human_size(resp.bytes_freed)} freed)")
    return 0


def add_array_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                       conn: argparse.ArgumentParser) -> None:
    """Register ``gristmill array list|show|delete``."""
    arr = commands.add_parser("array", help="list, show, delete N-d arrays (Zarr v3)",
                              description="Inspect and delete the N-d arrays a server stores "
                              "(Zarr v3; create and slice them with gristmill.client.arrays, "
                              "see docs/arrays.md).")
    sub = arr.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="list arrays: shape, dtype, chunks, bytes stored",
                       description="List every array with its shape, dtype, chunk shape, the "
                       "chunks stored (of those in the grid) and their bytes.", parents=[conn])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_list)

    p = sub.add_parser("show", help="show one array's metadata and storage",
                       description="Show an array's shape, dtype, chunks, fill value, codecs, "
                       "chunks and bytes stored, and attributes.", parents=[conn])
    p.add_argument("path", help="the array's path, e.g. features or run1/latents")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_show)

    p = sub.add_parser("delete", help="delete an array (metadata and every chunk)",
                       description="Delete an array: its chunks, then its metadata (a writer "
                       "key). Asks for --yes.", parents=[conn])
    p.add_argument("path", help="the array's path")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.set_defaults(handler=cmd_delete)
