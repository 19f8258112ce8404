"""Read-side queries over the state tables, and their proto messages."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.annotate.log import AnnotationLog, Head
from gristmill.annotate.rules import valid_name
from gristmill.client.annolog import EVENT_TYPES, ChainEvent, canonical_json
from gristmill.client.errors import InvalidArgument, NotFound
from gristmill.v1 import annotate_pb2

__all__ = [
    "TYPE_OF_ENUM",
    "annotation_message",
    "annotations_at",
    "event_message",
    "export_release",
    "history",
    "log_message",
    "proposal_message",
    "proposals",
    "release_message",
    "release_row",
    "schema_message",
    "timestamp_us",
]

#: EventType enum value -> type name ("schema.create", ...).
TYPE_OF_ENUM: dict[int, str] = {
    annotate_pb2.EventType.Value("EVENT_TYPE_" + name.upper().replace(".", "_")): name
    for name in EVENT_TYPES
}
_ENUM_OF_TYPE = {name: annotate_pb2.EventType.ValueType(value)
                 for value, name in TYPE_OF_ENUM.items()}
_STATUS = {"pending": annotate_pb2.PROPOSAL_STATUS_PENDING,
           "accepted": annotate_pb2.PROPOSAL_STATUS_ACCEPTED,
           "rejected": annotate_pb2.PROPOSAL_STATUS_REJECTED}
STATUS_NAME = {v: k for k, v in _STATUS.items()}
_KIND = {"create": annotate_pb2.PROPOSAL_KIND_CREATE, "update": annotate_pb2.PROPOSAL_KIND_UPDATE,
         "delete": annotate_pb2.PROPOSAL_KIND_DELETE}
#: Bytes per ExportRelease message.
EXPORT_CHUNK = 1 << 20
RELEASE_FORMAT = "gristmill-annotate-release/1"


def _ts(us: int) -> Timestamp:
    return Timestamp(seconds=us // 1_000_000, nanos=(us % 1_000_000) * 1000)


def timestamp_us(ts: Timestamp, field: str) -> int:
    """Microseconds of a Timestamp; INVALID_ARGUMENT if it has finer precision."""
    if ts.nanos % 1000:
        raise InvalidArgument(field, "timestamps have microsecond precision; round nanos to a "
                              "multiple of 1000 before hashing and signing")
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def event_message(e: ChainEvent) -> annotate_pb2.Event:
    """Proto view of a stored event."""
    return annotate_pb2.Event(seq=e.seq, id=e.id, type=_ENUM_OF_TYPE[e.type], author=e.author,
                              create_time=_ts(e.time_us), payload_json=e.payload,
                              prev_hash=e.prev_hash, hash=e.hash, public_key=e.public_key,
                              signature=e.signature)


def event_of_message(m: annotate_pb2.Event) -> ChainEvent:
    """A stored event from its proto (for imports); the type must be known."""
    name = TYPE_OF_ENUM.get(m.type)
    if name is None:
        raise InvalidArgument("events.type", f"event seq {m.seq} has no known type")
    return ChainEvent(m.seq, m.id, name, m.author, timestamp_us(m.create_time, "create_time"),
                      m.payload_json, m.prev_hash, m.hash, m.public_key, m.signature)


def _samples(text: str | None) -> list[annotate_pb2.SampleRef]:
    return [annotate_pb2.SampleRef(path=s["path"], sha256=s.get("sha256", ""))
            for s in json.loads(text or "[]")]


def proposal_message(r: sqlite3.Row) -> annotate_pb2.Proposal:
    """Proto view of a proposals row."""
    return annotate_pb2.Proposal(
        id=r["id"], kind=_KIND[r["kind"]], annotation_id=r["annotation_id"],
        status=_STATUS[r["status"]], schema=r["schema"], schema_version=r["schema_version"],
        samples=_samples(r["samples"]), data_json=r["data"] or "", author=r["author"],
        seq=r["seq"], reviewer=r["reviewer"] or "", review_seq=r["review_seq"] or 0,
        reason=r["reason"] or "")


def annotation_message(r: sqlite3.Row) -> annotate_pb2.Annotation:
    """Proto view of an annotations row."""
    return annotate_pb2.Annotation(
        id=r["id"], schema=r["schema"], schema_version=r["schema_version"],
        samples=_samples(r["samples"]), data_json=r["data"], author=r["author"],
        proposal_id=r["proposal_id"], accepted_seq=r["from_seq"])


def schema_message(r: sqlite3.Row) -> annotate_pb2.Schema:
    """Proto view of a schemas row."""
    return annotate_pb2.Schema(name=r["name"], version=r["version"], schema_json=r["body"],
                               deprecated=bool(r["deprecated"]), seq=r["seq"],
                               author=r["author"])


def _count_at(log: AnnotationLog, dataset: str, seq: int) -> int:
    return int(log.query("SELECT count(*) FROM annotations WHERE dataset=? AND from_seq<=? AND "
                         "(to_seq IS NULL OR to_seq>?)", (dataset, seq, seq))[0][0])


def release_message(log: AnnotationLog, r: sqlite3.Row) -> annotate_pb2.Release:
    """Proto view of a releases row (with its annotation count)."""
    return annotate_pb2.Release(
        name=r["name"], seq=r["seq"], head_hash=r["head_hash"],
        dataset_version=r["dataset_version"], author=r["author"], create_time=_ts(r["time_us"]),
        annotation_count=_count_at(log, r["dataset"], r["seq"]))


def log_message(log: AnnotationLog, dataset: str) -> annotate_pb2.Log:
    """A log's summary."""
    with log.snapshot() as db:
        head = log.head(dataset, db)

        def count(sql: str) -> int:
            return int(db.execute(sql, (dataset,)).fetchone()[0])

        owners = [r[0] for r in db.execute("SELECT principal FROM owners WHERE dataset=? ORDER "
                                           "BY principal", (dataset,))]
        return annotate_pb2.Log(
            dataset=dataset, head=annotate_pb2.ChainHead(seq=head.seq, hash=head.hash),
            owners=owners,
            schema_count=count("SELECT count(*) FROM schemas WHERE dataset=?"),
            pending_count=count("SELECT count(*) FROM proposals WHERE dataset=? AND "
                                "status='pending'"),
            annotation_count=count("SELECT count(*) FROM annotations WHERE dataset=? AND "
                                   "to_seq IS NULL"),
            release_count=count("SELECT count(*) FROM releases WHERE dataset=?"))


def release_row(log: AnnotationLog, dataset: str, name: str) -> sqlite3.Row:
    """A release's row; NOT_FOUND names the fix."""
    valid_name(name, "release", "release")
    rows = log.query("SELECT * FROM releases WHERE dataset=? AND name=?", (dataset, name))
    if not rows:
        log.head(dataset)
        raise NotFound(f"no release {name!r} in the {dataset} log; see `gristmill annotate log "
                       f"{dataset}` or create it with `gristmill annotate release {dataset} "
                       f"{name}`", reason="RELEASE_NOT_FOUND")
    return rows[0]


def annotations_at(log: AnnotationLog, dataset: str, samples: Sequence[tuple[str, str]],
                   release: str) -> tuple[int, list[list[sqlite3.Row]]]:
    """Accepted annotations of each (path, sha256) at a release (or now), in request order."""
    with log.snapshot():
        seq = (release_row(log, dataset, release)["seq"] if release
               else log.head(dataset).seq)
        by_path: dict[str, list[sqlite3.Row]] = {}
        paths = sorted({p for p, _ in samples})
        for i in range(0, len(paths), 500):
            part = paths[i:i + 500]
            rows = log.query(
                "SELECT l.path AS path, l.sha256 AS target_sha256, a.* FROM labels l JOIN "
                "annotations a ON a.dataset=l.dataset AND a.id=l.annotation_id AND "
                "a.from_seq=l.from_seq WHERE l.dataset=? AND l.path IN "
                f"({','.join('?' * len(part))}) AND l.from_seq<=? AND (l.to_seq IS NULL OR "
                "l.to_seq>?) ORDER BY l.path, a.id", (dataset, *part, seq, seq))
            for r in rows:
                by_path.setdefault(r["path"], []).append(r)
    out = []
    for path, sha in samples:
        found = by_path.get(path, [])
        out.append([r for r in found if not sha or not r["target_sha256"]
                    or r["target_sha256"] == sha])
    return seq, out


def proposals(log: AnnotationLog, dataset: str, status: str, schema: str, path: str,
              annotation: str, after_seq: int, limit: int) -> list[sqlite3.Row]:
    """Proposals matching the filters, in log order, after a sequence number."""
    log.head(dataset)
    where, args = ["p.dataset=?", "p.seq>?"], [dataset, after_seq]
    table = "proposals p"
    if status:
        where.append("p.status=?")
        args.append(status)
    if schema:
        where.append("p.schema=?")
        args.append(schema)
    if annotation:
        where.append("p.annotation_id=?")
        args.append(annotation)
    if path:
        table += " JOIN proposal_paths pp ON pp.dataset=p.dataset AND pp.proposal_id=p.id"
        where.append("pp.path=?")
        args.append(path)
    return log.query(f"SELECT p.* FROM {table} WHERE {' AND '.join(where)} ORDER BY p.seq "
                     "LIMIT ?", (*args, limit))


def history(log: AnnotationLog, dataset: str, annotation: str) -> list[ChainEvent]:
    """The events that proposed changes to an annotation and those that reviewed them."""
    log.head(dataset)
    rows = log.query("SELECT seq, review_seq FROM proposals WHERE dataset=? AND annotation_id=?",
                     (dataset, annotation))
    if not rows:
        raise NotFound(f"no annotation {annotation} in the {dataset} log",
                       reason="ANNOTATION_NOT_FOUND")
    seqs = [r[0] for r in rows] + [r[1] for r in rows if r[1] is not None]
    return log.events_at(dataset, seqs)


def export_release(log: AnnotationLog, dataset: str, name: str
                   ) -> tuple[sqlite3.Row, Iterator[bytes]]:
    """A release's row and its canonical JSON lines (a header, then annotations by id)."""
    row = release_row(log, dataset, name)
    seq = int(row["seq"])

    def lines() -> Iterator[bytes]:
        header: dict[str, Any] = {"format": RELEASE_FORMAT, "dataset": dataset, "release": name,
                                  "seq": seq, "head_hash": row["head_hash"],
                                  "dataset_version": row["dataset_version"]}
        buf = bytearray((canonical_json(header) + "\n").encode())
        after = ""
        while True:
            rows = log.query("SELECT * FROM annotations WHERE dataset=? AND id>? AND "
                             "from_seq<=? AND (to_seq IS NULL OR to_seq>?) ORDER BY id LIMIT "
                             "1000", (dataset, after, seq, seq))
            for r in rows:
                item = {"annotation": r["id"], "schema": r["schema"],
                        "schema_version": r["schema_version"],
                        "samples": json.loads(r["samples"]), "data": json.loads(r["data"]),
                        "author": r["author"], "proposal": r["proposal_id"],
                        "accepted_seq": r["from_seq"]}
                buf += (canonical_json(item) + "\n").encode()
                if len(buf) >= EXPORT_CHUNK:
                    yield bytes(buf)
                    buf.clear()
            if len(rows) < 1000:
                break
            after = rows[-1]["id"]
        if buf:
            yield bytes(buf)

    return row, lines()


def head_message(head: Head) -> annotate_pb2.ChainHead:
    """Proto view of a head."""
    return annotate_pb2.ChainHead(seq=head.seq, hash=head.hash)
