"""``gristmill``: manage datasets from the command line.

With the server packages installed it also runs servers and manages API keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from gristmill.cli.annotate_cmds import add_annotate_commands
from gristmill.cli.array_cmds import add_array_commands
from gristmill.cli.cache_cmds import add_cache_commands, human_size
from gristmill.cli.decode_cmds import add_decode_commands
from gristmill.cli.stream_cmds import add_stream_commands
from gristmill.client.channel import DEFAULT_ADDRESS
from gristmill.client.errors import GristmillError
from gristmill.client.hub import DEFAULT_CACHE_DIR, Hub

__all__ = ["main"]

Handler = Callable[[argparse.Namespace], int]


def _connection_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--address", help=f"server host:port (env GRISTMILL_ADDRESS; default "
                   f"{DEFAULT_ADDRESS})")
    g.add_argument("--api-key", help="API key (env GRISTMILL_API_KEY)")
    g.add_argument("--ca-file", type=Path, help="PEM root certificate for TLS (env "
                   "GRISTMILL_CA_FILE)")
    g.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                   help="download cache (env GRISTMILL_CACHE_DIR; default %(default)s)")
    return p


def _hub(args: argparse.Namespace) -> Hub:
    return Hub(args.address, args.api_key, args.cache_dir, ca_file=args.ca_file)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


_INT64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
          FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64}


def _int64_as_numbers(descriptor: Any, obj: dict[str, Any]) -> dict[str, Any]:
    """Undo proto3 JSON's strings for 64-bit integers (sizes, counts), in place."""
    for f in descriptor.fields:
        if f.name not in obj:
            continue
        value = obj[f.name]
        if f.type in _INT64:
            obj[f.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif (f.message_type is not None and not f.message_type.GetOptions().map_entry
              and not f.message_type.full_name.startswith("google.protobuf.")):
            for item in value if isinstance(value, list) else [value]:
                _int64_as_numbers(f.message_type, item)
    return obj


def _json_dict(message: object) -> dict[str, Any]:
    """A message as a JSON object with field names as in the proto and numbers as numbers."""
    # a message, or a hub wrapper of one such as Manifest
    msg: Message = message if isinstance(message, Message) else message.message  # type: ignore[attr-defined]
    return _int64_as_numbers(msg.DESCRIPTOR,
                             MessageToDict(msg, preserving_proto_field_name=True))


def cmd_create(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        ds = hub.create_dataset(args.name, args.description)
    print(f"created dataset {ds.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        datasets = hub.list_datasets()
    if args.json:
        _print_json([_json_dict(d) for d in datasets])
        return 0
    if not datasets:
        print("no datasets; create one with `gristmill dataset create NAME`")
    for d in datasets:
        latest = d.latest_version[:12] or "-"
        size = human_size(d.total_bytes)
        print(f"{d.name:32} {d.file_count:>9} files {size:>11}  version {latest}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        ds = hub.get_dataset(args.name)
        versions = hub.list_versions(args.name)
    if args.json:
        _print_json({"dataset": _json_dict(ds), "versions": [_json_dict(v) for v in versions]})
        return 0
    print(f"dataset      {ds.name}")
    if ds.description:
        print(f"description  {ds.description}")
    print(f"created      {ds.create_time.ToDatetime().isoformat()}Z")
    print(f"files        {ds.file_count} ({human_size(ds.total_bytes)})")
    print(f"versions     {len(versions)}")
    for v in versions:
        print(f"  {v.id}  {v.create_time.ToDatetime().isoformat()}Z  {v.file_count} files  "
              f"{human_size(v.total_bytes)}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"refusing to delete dataset {args.name!r} without --yes", file=sys.stderr)
        return 2
    with _hub(args) as hub:
        resp = hub.delete_dataset(args.name)
    print(f"deleted dataset {args.name} ({resp.blobs_deleted} blobs, "
          f"{human_size(resp.bytes_freed)} freed)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        report = hub.import_folder(args.name, args.folder, create=not args.no_create,
                                   include=args.include, exclude=args.exclude,
                                   rehash=args.rehash)
    print(f"imported {args.folder} into {args.name}: {report}")
    for path, why in report.links_skipped:
        print(f"  link not followed: {path}: {why}", file=sys.stderr)
    for path, why in report.failed:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    if report.failed:
        print(f"error: {len(report.failed)} file(s) were not imported (listed above); the "
              "others were. Fix them and run the import again: files already stored are "
              "skipped", file=sys.stderr)
    return 1 if report.failed else 0


def cmd_manifest(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        manifest = hub.get_manifest(args.name, args.version)
    if args.json:
        _print_json(_json_dict(manifest))
        return 0
    print(f"# {manifest.dataset} @ {manifest.version}: {len(manifest.files)} files")
    for e in manifest.files:
        dims = f"{e.image.width}x{e.image.height} {e.image.format}" if e.HasField("image") else ""
        print(f"{e.sha256[:12]}  {e.size:>10}  {e.media_type:24} {dims:18} {e.path}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        paths = hub.download_dataset(args.name, version=args.version, dest=args.dest)
    print(f"downloaded {len(paths)} files of {args.name} into {args.dest}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    with _hub(args) as hub:
        version = hub.commit_version(args.name)
    print(f"{args.name} version {version.id} ({version.file_count} files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree (server commands come from installed packages)."""
    parser = argparse.ArgumentParser(
        prog="gristmill", description="gristmill: datasets, decoding and training streams "
        "over gRPC. Run `gristmill COMMAND --help` for details.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    conn = _connection_flags()

    ds = commands.add_parser("dataset", help="create, list, import, download datasets",
                             description="Manage datasets on a gristmill store.")
    dsc = ds.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(name: str, handler: Handler, help_: str) -> argparse.ArgumentParser:
        p = dsc.add_parser(name, help=help_, description=help_, parents=[conn])
        p.set_defaults(handler=handler)
        return p

    p = add("create", cmd_create, "create an empty dataset")
    p.add_argument("name")
    p.add_argument("--description", default="")
    p = add("list", cmd_list, "list datasets")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("show", cmd_show, "show a dataset and its versions")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("delete", cmd_delete, "delete a dataset (admin key); blobs used elsewhere stay")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="really delete")
    p = add("import", cmd_import, "upload a folder recursively (skips files already stored)")
    p.description = (
        "Upload a folder recursively; files already stored are skipped. Symbolic links "
        "that lead out of the folder, broken links and links to directories are not "
        "followed (and are listed); a link to a file inside the folder is imported at its "
        "own path. Dotfiles and dot-directories (.git/, .DS_Store), VCS directories and OS "
        "junk (Thumbs.db, desktop.ini, __MACOSX/) are skipped. Files that cannot be "
        "imported (unreadable, a name the store refuses, changed or deleted during the "
        "import) are listed and the rest are still uploaded; the exit status is then 1.")
    p.add_argument("name")
    p.add_argument("folder", type=Path)
    p.add_argument("--no-create", action="store_true", help="fail if the dataset is missing")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="import only files matching PATTERN (repeatable; fnmatch, "
                   "case-sensitive, '*' also matches '/'; a pattern without '/' matches the "
                   "file name at any depth, one with '/' the path relative to FOLDER, e.g. "
                   "'*.jpg' or 'train/*')")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="skip files matching PATTERN, and whole directories whose name or "
                   "path matches it (repeatable; same syntax as --include; wins over it)")
    p.add_argument("--rehash", action="store_true",
                   help="read every file again instead of trusting the hashes remembered in "
                   "the cache directory for files whose size and times are unchanged")
    p = add("manifest", cmd_manifest, "print a version's manifest")
    p.add_argument("name")
    p.add_argument("--version", default="latest", help="version id (or prefix) or 'latest'")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = add("download", cmd_download, "download a dataset into a folder (resumable)")
    p.description = (
        "Download a dataset into a folder through the cache (resumable: files already cached "
        "with the right hash are not fetched again). Every path, hash and size the server "
        "sends is checked before anything is written: none may leave DEST or the cache, and "
        "symbolic links inside them are not written through.")
    p.add_argument("name")
    p.add_argument("dest", type=Path)
    p.add_argument("--version", default="latest", help="version id (or prefix) or 'latest'")
    p = add("commit", cmd_commit, "freeze the dataset's current files as a version")
    p.add_argument("name")

    add_array_commands(commands, conn)
    add_decode_commands(commands, conn)
    add_stream_commands(commands, conn)
    add_cache_commands(commands)
    add_annotate_commands(commands, conn)

    found = False
    for ep in entry_points(group="gristmill.server"):
        ep.load()(commands)
        found = True
    if not found:
        p = commands.add_parser("serve", help="run a server (needs the server packages)")
        p.set_defaults(handler=lambda _a: _missing_server())
    return parser


def _missing_server() -> int:
    print("error: the gristmill server packages are not installed; install gristmill-store "
          "(and gristmill-common) next to gristmill-client", file=sys.stderr)
    return 2


def _quiet_stdout() -> None:
    """Send what is left for stdout nowhere: its reader is gone (``| head``)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # not a real file (tests capture stdout)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gristmill`` command.

    Errors are one line on stderr, never a traceback (``GRISTMILL_DEBUG=1``
    shows it for unexpected ones). A closed stdout (``| head``) ends the
    command quietly with status 141, as for other tools killed by SIGPIPE.
    """
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # a reader that went away shows here, not at exit
    except BrokenPipeError:
        _quiet_stdout()
        return 141
    except GristmillError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a file or folder named on the command line
        print(f"error: {e.strerror}: {e.filename}" if e.strerror and e.filename
              else f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if os.environ.get("GRISTMILL_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (run with GRISTMILL_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
