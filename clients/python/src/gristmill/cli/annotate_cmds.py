"""``gristmill annotate``: annotation logs, schemas, proposals, review, releases, verification."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from gristmill.client.annolog import ChainReport
from gristmill.client.annotations import Annotations, chain_event, verify_file
from gristmill.client.errors import InvalidArgument
from gristmill.v1 import annotate_pb2

__all__ = ["add_annotate_commands"]

Handler = Callable[[argparse.Namespace], int]


def _client(args: argparse.Namespace) -> Annotations:
    return Annotations(args.address, args.api_key, ca_file=args.ca_file)


def _dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _status(value: int) -> str:
    return annotate_pb2.ProposalStatus.Name(value).removeprefix("PROPOSAL_STATUS_").lower()  # type: ignore[arg-type]


def _kind(value: int) -> str:
    return annotate_pb2.ProposalKind.Name(value).removeprefix("PROPOSAL_KIND_").lower()  # type: ignore[arg-type]


def _json_arg(text: str, what: str) -> Any:
    """JSON text, or @FILE for a file's content."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(what, f"not JSON: {e.msg} at line {e.lineno} column "
                              f"{e.colno}") from None


def cmd_init(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        log = ann.init(args.dataset)
    print(f"created the annotation log of {args.dataset}; owner: {', '.join(log.owners)}")
    return 0


def cmd_schema_add(args: argparse.Namespace) -> int:
    schema = _json_arg("@" + str(args.file), "FILE")
    with _client(args) as ann:
        s = ann.add_schema(args.dataset, args.name, schema)
    if args.json:
        _print_json(_dict(s))
    else:
        print(f"schema {s.name} version {s.version} added at seq {s.seq}")
    return 0


def cmd_schema_list(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        schemas = ann.schemas(args.dataset, args.name or "")
    if args.json:
        _print_json([{**_dict(s), "schema": json.loads(s.schema_json)} for s in schemas])
        return 0
    if not schemas:
        print(f"no schemas; add one with `gristmill annotate schema add {args.dataset} NAME "
              "FILE.json`")
    for s in schemas:
        note = "  (deprecated)" if s.deprecated else ""
        print(f"{s.name:24} v{s.version:<4} seq {s.seq:<8} by {s.author}{note}")
    return 0


def cmd_propose(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        if args.delete:
            if not args.annotation:
                raise InvalidArgument("--annotation", "name the annotation to delete")
            p = ann.propose_delete(args.dataset, args.annotation)
        else:
            if args.payload is None:
                raise InvalidArgument("--payload", "give the annotation as JSON or @FILE")
            data = _json_arg(args.payload, "--payload")
            if args.annotation:
                p = ann.propose_update(args.dataset, args.annotation, data,
                                       samples=args.sample or (),
                                       schema_version=args.schema_version)
            else:
                if not args.schema or not args.sample:
                    raise InvalidArgument("--schema", "a new annotation needs --schema NAME and "
                                          "at least one --sample PATH")
                p = ann.propose(args.dataset, args.schema, args.sample, data,
                                schema_version=args.schema_version)
    if args.json:
        _print_json(_dict(p))
    else:
        print(f"proposed {_kind(p.kind)} of annotation {p.annotation_id} at seq {p.seq} "
              "(pending review); proposal id:")
    print(p.id)
    return 0


def cmd_review(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        p = ann.review(args.dataset, args.event_id, accept=args.accept, reason=args.reason)
    if args.json:
        _print_json(_dict(p))
    else:
        print(f"proposal {p.id} {_status(p.status)} at seq {p.review_seq}")
    return 0


def cmd_proposals(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        found = list(ann.proposals(args.dataset, status=args.status or "",
                                   schema=args.schema or "", path=args.path or ""))
    if args.json:
        _print_json([_dict(p) for p in found])
        return 0
    for p in found:
        paths = ", ".join(s.path for s in p.samples)
        print(f"{p.seq:>8}  {p.id}  {_kind(p.kind):6} {_status(p.status):8} {p.schema}"
              f"  {p.data_json or '-'}  {paths}")
    print(f"{len(found)} proposal(s)")
    return 0


def cmd_owners(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        if args.op == "list":
            owners = ann.owners(args.dataset)
            me = ann.principal(args.dataset)
        else:
            if not args.principal:
                raise InvalidArgument("PRINCIPAL", f"`owners {args.op}` needs a principal, "
                                      "e.g. key:0123456789ab")
            fn = ann.add_owner if args.op == "add" else ann.remove_owner
            owners = fn(args.dataset, args.principal)
            me = ""
    if args.json:
        _print_json({"owners": owners, **({"you": me} if me else {})})
        return 0
    for o in owners:
        print(o + ("  (you)" if o == me else ""))
    if me and me not in owners:
        print(f"(you are {me}, not an owner)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        [found] = ann.annotations(args.dataset, [args.path], release=args.release or "")
    if args.json:
        _print_json([{**_dict(a), "data": json.loads(a.data_json)} for a in found])
        return 0
    where = f"release {args.release}" if args.release else "now"
    if not found:
        print(f"no accepted annotations of {args.path} ({where})")
    for a in found:
        print(f"{a.id}  {a.schema} v{a.schema_version}  accepted at seq {a.accepted_seq}  "
              f"{a.data_json}")
    return 0


def _event_line(e: annotate_pb2.Event) -> str:
    ev = chain_event(e)
    signed = "  signed" if ev.signature else ""
    return f"{ev.seq:>8}  {ev.type:18} {ev.id}  {ev.author:20} {ev.payload}{signed}"


def cmd_log(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        events = (ann.watch(args.dataset, args.after) if args.follow
                  else ann.events(args.dataset, args.after))
        for e in events:
            print(chain_event(e).to_line() if args.json
                  else _event_line(e), flush=args.follow)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        r = ann.create_release(args.dataset, args.name, args.dataset_version or "")
    if args.json:
        _print_json(_dict(r))
    else:
        print(f"release {r.name} pins seq {r.seq} (hash {r.head_hash[:16]}…), "
              f"{r.annotation_count} accepted annotation(s)")
    return 0


def cmd_releases(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        found = ann.releases(args.dataset)
    if args.json:
        _print_json([_dict(r) for r in found])
        return 0
    for r in found:
        print(f"{r.name:24} seq {r.seq:<8} {r.annotation_count:>8} annotations  "
              f"{r.dataset_version}")
    return 0


def _output(path: Path | None, binary: bool) -> Any:
    if path is None or str(path) == "-":
        return sys.stdout.buffer if binary else sys.stdout
    return open(path, "wb" if binary else "w", encoding=None if binary else "utf-8")


def cmd_export(args: argparse.Namespace) -> int:
    out = _output(args.out, binary=True)
    try:
        with _client(args) as ann:
            r = ann.export_release(args.dataset, args.release, out)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    if args.out is not None and str(args.out) != "-":
        print(f"wrote release {r.name} ({r.annotation_count} annotations at seq {r.seq}) to "
              f"{args.out}", file=sys.stderr)
    return 0


def cmd_export_log(args: argparse.Namespace) -> int:
    out = _output(args.out, binary=False)
    try:
        with _client(args) as ann:
            n = ann.export_log(args.dataset, out)
    finally:
        if out is not sys.stdout:
            out.close()
    if args.out is not None and str(args.out) != "-":
        print(f"wrote {n} events of the {args.dataset} log to {args.out}", file=sys.stderr)
    return 0


def cmd_import_log(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        resp = ann.import_log(args.dataset, args.file)
    print(f"imported {resp.events_imported} events into the {args.dataset} log; head seq "
          f"{resp.head.seq} {resp.head.hash}")
    return 0


def _report(ok: bool, checked: int, signatures: int, head: tuple[int, str],
            bad: tuple[int, str, str, int] | None, args: argparse.Namespace,
            unchecked: int = 0) -> int:
    if args.json:
        _print_json({"ok": ok, "events_checked": checked, "signatures_checked": signatures,
                     "signatures_unchecked": unchecked, "head": {"seq": head[0], "hash": head[1]},
                     **({"first_bad": {"seq": bad[0], "id": bad[1], "problem": bad[2],
                                       **({"line": bad[3]} if bad[3] else {})}}
                        if bad else {})})
    elif ok:
        print(f"ok: {checked} events, {signatures} signatures verified; head seq {head[0]} "
              f"{head[1]}")
        if unchecked:
            print(f"warning: {unchecked} signatures not checked: install pynacl to check them",
                  file=sys.stderr)
    else:
        assert bad is not None
        line = f"line {bad[3]}, " if bad[3] else ""
        print(f"error: the log does not verify: first bad event at {line}seq {bad[0]}"
              + (f" (id {bad[1]})" if bad[1] else "") + f": {bad[2]}", file=sys.stderr)
    return 0 if ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    path = args.file or args.file_flag
    if (path is None) == (args.dataset is None):
        print("error: give an exported log FILE (offline) or --dataset DATASET (on the "
              "server), not both", file=sys.stderr)
        return 2
    if path is not None:
        report: ChainReport = verify_file(path)
        b = report.first_bad
        return _report(report.ok, report.events, report.signatures,
                       (report.head_seq, report.head_hash),
                       (b.seq, b.id, b.problem, b.line) if b else None, args,
                       report.signatures_unchecked)
    with _client(args) as ann:
        resp = ann.verify(args.dataset)
    fb = resp.first_bad
    return _report(resp.ok, resp.events_checked, resp.signatures_checked,
                   (resp.head.seq, resp.head.hash),
                   None if resp.ok else (fb.seq, fb.id, fb.problem, 0), args)


def cmd_rebuild(args: argparse.Namespace) -> int:
    with _client(args) as ann:
        resp = ann.rebuild(args.dataset)
    if args.json:
        _print_json(_dict(resp))
    elif resp.equal:
        print(f"ok: the state replayed from {resp.events_replayed} events equals the live "
              f"state ({resp.seconds:.2f} s)")
    else:
        print("error: the state replayed from the log differs from the live state:",
              file=sys.stderr)
        for d in resp.differences:
            print(f"  {d}", file=sys.stderr)
    return 0 if resp.equal else 1


def add_annotate_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser],
                          conn: argparse.ArgumentParser) -> None:
    """Register ``gristmill annotate ...``."""
    top = commands.add_parser(
        "annotate", help="annotation logs: schemas, proposals, review, releases",
        description="Annotations as a verifiable event log (see docs/annotate.md): owners add "
        "JSON Schemas, contributors propose annotations, owners accept or reject them, and a "
        "release pins the log so that the same labels come back byte for byte.")
    sub = top.add_subparsers(dest="action", required=True, metavar="ACTION")

    def add(parent: Any, name: str, handler: Handler, help_: str, *, json_flag: bool = False
            ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_,
                                                       parents=[conn])
        p.set_defaults(handler=handler)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print JSON")
        return p

    p = add(sub, "init", cmd_init, "create a dataset's annotation log (you become its first "
            "owner)")
    p.add_argument("dataset")

    schema = sub.add_parser("schema", help="add or list JSON Schemas",
                            description="JSON Schemas that annotations are checked against.")
    ssub = schema.add_subparsers(dest="schema_action", required=True, metavar="ACTION")
    p = add(ssub, "add", cmd_schema_add, "add FILE.json as schema NAME's next version (owners)",
            json_flag=True)
    p.add_argument("dataset")
    p.add_argument("name")
    p.add_argument("file", type=Path, metavar="FILE.json")
    p = add(ssub, "list", cmd_schema_list, "list schema versions", json_flag=True)
    p.add_argument("dataset")
    p.add_argument("--name", help="only this schema")

    p = add(sub, "propose", cmd_propose, "propose an annotation (or a change, or a deletion); "
            "prints the proposal's event id alone on the last line", json_flag=True)
    p.add_argument("dataset")
    p.add_argument("--schema", help="schema name (new annotations)")
    p.add_argument("--schema-version", type=int, default=0,
                   help="schema version (default: the newest not deprecated)")
    p.add_argument("--sample", action="append", default=[], metavar="PATH",
                   help="a sample's path in the dataset (repeatable)")
    p.add_argument("--payload", metavar="JSON|@FILE", help="the annotation's data")
    p.add_argument("--annotation", metavar="ID", help="propose a change to this annotation")
    p.add_argument("--delete", action="store_true", help="propose deleting --annotation")

    p = add(sub, "review", cmd_review, "accept or reject a pending proposal (owners)",
            json_flag=True)
    p.add_argument("dataset")
    p.add_argument("event_id", metavar="EVENT_ID", help="the proposal's id (from propose)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--accept", action="store_true")
    how.add_argument("--reject", action="store_true")
    p.add_argument("--reason", default="", help="why (recorded in the log)")

    p = add(sub, "proposals", cmd_proposals, "list proposals", json_flag=True)
    p.add_argument("dataset")
    p.add_argument("--status", choices=["pending", "accepted", "rejected"])
    p.add_argument("--schema")
    p.add_argument("--path", help="only proposals about this sample")

    p = add(sub, "owners", cmd_owners, "list, add or remove owners", json_flag=True)
    p.add_argument("op", choices=["add", "remove", "list"])
    p.add_argument("dataset")
    p.add_argument("principal", nargs="?", help="e.g. key:0123456789ab (`owners list` shows "
                   "yours)")

    p = add(sub, "show", cmd_show, "a sample's accepted annotations", json_flag=True)
    p.add_argument("dataset")
    p.add_argument("path")
    p.add_argument("--release", help="as of this release (default: now)")

    p = add(sub, "log", cmd_log, "print events (with --follow, wait for new ones)",
            json_flag=True)
    p.add_argument("dataset")
    p.add_argument("--after", type=int, default=0, metavar="SEQ",
                   help="start after this sequence number")
    p.add_argument("--follow", action="store_true",
                   help="keep printing new events (resumes across server restarts)")

    p = add(sub, "release", cmd_release, "pin the log's current position as release NAME "
            "(owners)", json_flag=True)
    p.add_argument("dataset")
    p.add_argument("name")
    p.add_argument("--dataset-version", help="the dataset version it labels (e.g. a store "
                   "version id)")

    p = add(sub, "releases", cmd_releases, "list releases", json_flag=True)
    p.add_argument("dataset")

    p = add(sub, "export", cmd_export, "write a release's accepted annotations as canonical "
            "JSON lines (identical bytes every time)")
    p.add_argument("dataset")
    p.add_argument("--release", required=True)
    p.add_argument("--out", type=Path, help="file to write (default: stdout)")

    p = add(sub, "export-log", cmd_export_log, "write the whole log (events, hashes, "
            "signatures) as JSON lines")
    p.add_argument("dataset")
    p.add_argument("--out", type=Path, help="file to write (default: stdout)")

    p = add(sub, "import-log", cmd_import_log, "create DATASET's log from an exported one "
            "(admin key); verified end to end")
    p.add_argument("dataset")
    p.add_argument("file", type=Path)

    p = add(sub, "verify", cmd_verify, "verify an exported log FILE offline, or a log on the "
            "server (--dataset); exit 1 naming the first bad event", json_flag=True)
    p.add_argument("file", type=Path, nargs="?", help="an exported log (export-log)")
    p.add_argument("--file", dest="file_flag", type=Path, help="same as FILE")
    p.add_argument("--dataset", help="verify this dataset's log on the server")

    p = add(sub, "rebuild", cmd_rebuild, "replay the log alone into fresh state and check it "
            "equals the live state", json_flag=True)
    p.add_argument("dataset")
