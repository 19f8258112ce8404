"""Annotation logs in one SQLite file: appends, queries, verification and rebuilds.

One writer: every append takes one lock and one ``BEGIN IMMEDIATE``
transaction that stores the events *and* applies them to the state, then
commits with ``synchronous=FULL`` before it is acknowledged, so an
acknowledged append survives a killed process (and a power cut). Readers use
connections of their own (one per thread) and, in WAL mode, never wait for
the writer. A lock file keeps a second server process off the same file.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from gristmill.annotate import metrics
from gristmill.annotate.rules import STATE_DDL, STATE_TABLES, Rules, apply, valid_uuid
from gristmill.client.annolog import (
    EVENT_TYPES,
    GENESIS_HASH,
    BadEvent,
    ChainEvent,
    ChainReport,
    canonical_json,
    event_hash,
    signature_problem,
    verify_chain,
)
from gristmill.client.errors import (
    Aborted,
    AlreadyExists,
    GristmillError,
    InvalidArgument,
    NotFound,
)
from gristmill.client.names import validate_dataset_name
from gristmill.client.private import private_database, private_dir

__all__ = ["AnnotationLog", "Head", "NewEvent", "Rebuilt"]

log = logging.getLogger("gristmill.annotate")

_EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS logs (
    dataset TEXT PRIMARY KEY, head_seq INTEGER NOT NULL, head_hash TEXT NOT NULL,
    created_us INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    dataset TEXT NOT NULL, seq INTEGER NOT NULL, id TEXT NOT NULL, type TEXT NOT NULL,
    author TEXT NOT NULL, time_us INTEGER NOT NULL, payload TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL, public_key TEXT NOT NULL,
    signature TEXT NOT NULL,
    PRIMARY KEY (dataset, seq)) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS events_id ON events (dataset, id);
"""
_EVENT_COLUMNS = "seq, id, type, author, time_us, payload, prev_hash, hash, public_key, signature"
#: Rows read per query when walking a whole log.
_WALK = 5000


@dataclass(frozen=True)
class Head:
    """A log's last position and hash."""

    seq: int
    hash: str


@dataclass(frozen=True)
class NewEvent:
    """An event to append, as a caller gives it."""

    type: str
    payload: str
    id: str = ""
    #: Signed events only: the timestamp the signer hashed.
    time_us: int | None = None
    public_key: str = ""
    signature: str = ""


@dataclass(frozen=True)
class Rebuilt:
    """Outcome of replaying a log into fresh state."""

    equal: bool
    events: int
    differences: list[str]
    seconds: float


def _event(row: Sequence[Any]) -> ChainEvent:
    return ChainEvent(int(row[0]), row[1], row[2], row[3], int(row[4]), row[5], row[6], row[7],
                      row[8], row[9])


def _connect(path: Path | str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=10000")
    return conn


class AnnotationLog:
    """Every dataset's annotation log, in one SQLite database."""

    def __init__(self, directory: Path, *, max_batch_events: int = 10_000,
                 max_payload_bytes: int = 1 << 20, max_clock_skew_seconds: float = 600.0
                 ) -> None:
        private_dir(directory)
        self.path = directory / "annotate.sqlite"
        self._lock_file = os.open(directory / "writer.lock",
                                  os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_file)
            raise OSError(f"another annotate server is using {directory}: the annotate service "
                          "runs as one writer per data directory; stop the other one, or give "
                          "this one its own --data") from None
        self.max_batch_events = max_batch_events
        self.max_payload_bytes = max_payload_bytes
        self.max_clock_skew_us = int(max_clock_skew_seconds * 1e6)
        private_database(self.path)
        self._writer = _connect(self.path)
        self._writer.execute("PRAGMA journal_mode=WAL")
        self._writer.execute("PRAGMA synchronous=FULL")
        db = sqlite_utils.Database(self._writer)
        db.executescript(_EVENTS_DDL + STATE_DDL)
        self._rules = Rules()
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._heads: dict[str, int] = {}
        self._closed = False
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()

    # connections ---------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection and release the writer lock; wakes watchers (idempotent)."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        with self._write_lock:
            self._writer.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()
        os.close(self._lock_file)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (watchers end)."""
        return self._closed

    # heads ---------------------------------------------------------------
    def head(self, dataset: str, db: sqlite3.Connection | None = None) -> Head:
        """The log's head; NOT_FOUND when the dataset has no log."""
        validate_dataset_name(dataset, "dataset")
        row = (db or self._reader()).execute(
            "SELECT head_seq, head_hash FROM logs WHERE dataset=?", (dataset,)).fetchone()
        if row is None:
            raise NotFound(f"dataset {dataset!r} has no annotation log; create it with "
                           f"`gristmill annotate init {dataset}`", reason="LOG_NOT_FOUND")
        return Head(int(row[0]), row[1])

    # appends -------------------------------------------------------------
    def _prepare(self, spec: NewEvent, index: int) -> tuple[str, str]:
        """(canonical id, canonical payload) of a new event, checked."""
        field = f"events[{index}]"
        if spec.type not in EVENT_TYPES:
            raise InvalidArgument(f"{field}.type", f"unknown event type {spec.type!r}; one of "
                                  f"{', '.join(EVENT_TYPES)}")
        event_id = valid_uuid(spec.id, f"{field}.id") if spec.id else str(uuid.uuid4())
        if len(spec.payload.encode()) > self.max_payload_bytes:
            raise InvalidArgument(f"{field}.payload_json", f"{len(spec.payload.encode())} bytes "
                                  f"is over the server's limit of {self.max_payload_bytes} "
                                  "(annotate.max_payload_bytes)", reason="PAYLOAD_TOO_LARGE")
        try:
            payload = canonical_json(json.loads(spec.payload))
        except (json.JSONDecodeError, ValueError) as e:
            raise InvalidArgument(f"{field}.payload_json", f"not JSON: {e}") from None
        if bool(spec.public_key) != bool(spec.signature):
            raise InvalidArgument(f"{field}.signature", "give both public_key and signature, "
                                  "or neither")
        if spec.signature:
            if payload != spec.payload:
                raise InvalidArgument(f"{field}.payload_json", "a signed event's payload must "
                                      "be canonical JSON (sorted keys, no spaces, UTF-8), since "
                                      "the signature covers its bytes; see gristmill.client."
                                      "annolog.canonical_json")
            if spec.id != event_id:
                raise InvalidArgument(f"{field}.id", f"a signed event's id must be a UUID in "
                                      f"canonical form ({event_id})")
            if spec.time_us is None:
                raise InvalidArgument(f"{field}.create_time", "a signed event must carry the "
                                      "timestamp its hash covers")
        return event_id, payload

    def append(self, dataset: str, specs: Sequence[NewEvent], author: str,
               expected: Head | None = None, *, create: bool = False
               ) -> tuple[list[ChainEvent], Head, bool]:
        """Append events all or nothing; returns (stored events, new head, replayed).

        ``create`` makes the log (the first event must then be owner.add of
        the author). Events whose ids are all in the log already with the same
        type and payload are a replay: nothing changes and the stored events
        are returned.
        """
        validate_dataset_name(dataset, "dataset")
        if not specs:
            raise InvalidArgument("events", "give at least one event")
        if len(specs) > self.max_batch_events:
            raise InvalidArgument("events", f"{len(specs)} events is over the server's limit "
                                  f"of {self.max_batch_events} per call "
                                  "(annotate.max_batch_events); split the batch")
        prepared = [self._prepare(s, i) for i, s in enumerate(specs)]
        ids = [p[0] for p in prepared]
        if len(set(ids)) != len(ids):
            raise InvalidArgument("events", "the same event id appears twice in one batch")
        for i, s in enumerate(specs):
            if s.signature and expected is None:
                raise InvalidArgument(f"events[{i}].signature", "signed events must state "
                                      "expected_head: their hash, which they sign, covers "
                                      "their position in the log")
        start = time.perf_counter()
        with self._write_lock:
            if self._closed:
                raise GristmillError("the annotate service is shutting down")
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                stored, head, replayed = self._append_locked(db, dataset, specs, prepared,
                                                             author, expected, create)
                db.execute("ROLLBACK" if replayed else "COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        if replayed:
            metrics.REPLAYS.inc()
        else:
            for ev in stored:
                metrics.EVENTS_APPENDED.labels(ev.type).inc()
            metrics.APPEND_SECONDS.observe(time.perf_counter() - start)
            with self._changed:
                self._heads[dataset] = head.seq
                self._changed.notify_all()
        return stored, head, replayed

    def _append_locked(self, db: sqlite3.Connection, dataset: str, specs: Sequence[NewEvent],
                       prepared: list[tuple[str, str]], author: str, expected: Head | None,
                       create: bool) -> tuple[list[ChainEvent], Head, bool]:
        row = db.execute("SELECT head_seq, head_hash FROM logs WHERE dataset=?",
                         (dataset,)).fetchone()
        replay = self._replay(db, dataset, specs, prepared) if row is not None else None
        if replay is not None:
            return replay, Head(int(row[0]), row[1]), True
        if create:
            if row is not None:
                raise AlreadyExists(f"dataset {dataset!r} has an annotation log already",
                                    reason="LOG_EXISTS")
            db.execute("INSERT INTO logs VALUES (?, 0, ?, ?)",
                       (dataset, GENESIS_HASH, time.time_ns() // 1000))
            head = Head(0, GENESIS_HASH)
        else:
            head = self.head(dataset, db)
        if expected is not None and (expected.seq != head.seq or
                                     (expected.hash and expected.hash != head.hash)):
            metrics.CONFLICTS.inc()
            raise Aborted(f"the {dataset} log's head is seq {head.seq} (hash {head.hash}), not "
                          f"the expected seq {expected.seq}; read the new events and retry",
                          reason="HEAD_MOVED",
                          metadata={"head_seq": str(head.seq), "head_hash": head.hash})
        stored: list[ChainEvent] = []
        now = time.time_ns() // 1000
        for i, (spec, (event_id, payload)) in enumerate(zip(specs, prepared, strict=True)):
            if spec.time_us is not None and spec.signature:
                if abs(spec.time_us - now) > self.max_clock_skew_us:
                    raise InvalidArgument(f"events[{i}].create_time", "the signed timestamp is "
                                          f"{abs(spec.time_us - now) / 1e6:.0f} s from the "
                                          "server's clock; sign with the current time")
                time_us = spec.time_us
            else:
                time_us = now
            seq = head.seq + 1
            digest = event_hash(head.hash, seq, spec.type, author, time_us, event_id, payload,
                                spec.public_key)
            if spec.signature:
                try:
                    problem = signature_problem(spec.public_key, spec.signature, digest)
                except ValueError as e:
                    problem = str(e)
                if problem is not None:
                    raise InvalidArgument(f"events[{i}].signature", f"{problem}. The hash "
                                          f"covers seq {seq}, author {author}, the timestamp "
                                          "and the canonical payload",
                                          reason="BAD_SIGNATURE")
            event = ChainEvent(seq, event_id, spec.type, author, time_us, payload, head.hash,
                               digest, spec.public_key, spec.signature)
            self._store(db, dataset, event, i)
            stored.append(event)
            head = Head(seq, digest)
        db.execute("UPDATE logs SET head_seq=?, head_hash=? WHERE dataset=?",
                   (head.seq, head.hash, dataset))
        return stored, head, False

    def _store(self, db: sqlite3.Connection, dataset: str, event: ChainEvent,
               index: int) -> None:
        try:
            apply(self._rules, db, dataset, event)
        except GristmillError as e:
            e.metadata["event_index"] = str(index)
            raise
        db.execute(f"INSERT INTO events ({_EVENT_COLUMNS}, dataset) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                   (event.seq, event.id, event.type, event.author, event.time_us, event.payload,
                    event.prev_hash, event.hash, event.public_key, event.signature, dataset))

    def _replay(self, db: sqlite3.Connection, dataset: str, specs: Sequence[NewEvent],
                prepared: list[tuple[str, str]]) -> list[ChainEvent] | None:
        """The stored events when every id is in the log already; None when none is."""
        found: dict[str, ChainEvent] = {}
        ids = [p[0] for p in prepared]
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            for row in db.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE dataset=? AND id "
                                  f"IN ({marks})", (dataset, *part)):
                found[row[1]] = _event(row)
        if not found:
            return None
        if len(found) != len(ids):
            raise InvalidArgument("events", f"{len(found)} of the {len(ids)} event ids are in "
                                  "the log already and the others are not; replay a batch "
                                  "whole, or give the new events new ids",
                                  reason="PARTIAL_REPLAY")
        for spec, (event_id, payload) in zip(specs, prepared, strict=True):
            old = found[event_id]
            if old.type != spec.type or old.payload != payload:
                raise AlreadyExists(f"event id {event_id} is in the log already (seq "
                                    f"{old.seq}) with different content; give a new event a "
                                    "new id", reason="EVENT_ID_REUSED")
        return [found[i] for i in ids]

    def import_events(self, dataset: str, events: Sequence[ChainEvent]) -> Head:
        """Create a log from another server's events: the chain must verify and obey the rules."""
        validate_dataset_name(dataset, "dataset")
        if not events:
            raise InvalidArgument("events", "an imported log needs at least one event")
        report = verify_chain((0, e) for e in events)
        if report.first_bad is not None:
            raise InvalidArgument("events", f"the imported log does not verify: "
                                  f"{report.first_bad}", reason="CHAIN_BROKEN")
        with self._write_lock:
            db = self._writer
            db.execute("BEGIN IMMEDIATE")
            try:
                if db.execute("SELECT 1 FROM logs WHERE dataset=?", (dataset,)).fetchone():
                    raise AlreadyExists(f"dataset {dataset!r} has an annotation log already; "
                                        "import into a new name", reason="LOG_EXISTS")
                db.execute("INSERT INTO logs VALUES (?, ?, ?, ?)",
                           (dataset, report.head_seq, report.head_hash,
                            time.time_ns() // 1000))
                for i, event in enumerate(events):
                    try:
                        self._store(db, dataset, event, i)
                    except GristmillError as e:
                        raise InvalidArgument("events", f"event seq {event.seq} ({event.id}) "
                                              f"breaks the log's rules: {e.message}",
                                              reason="RULE_BROKEN") from None
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        head = Head(report.head_seq, report.head_hash)
        with self._changed:
            self._heads[dataset] = head.seq
            self._changed.notify_all()
        return head

    # reads ---------------------------------------------------------------
    def events(self, dataset: str, after: int, limit: int) -> list[ChainEvent]:
        """Up to ``limit`` events after ``after``, in order."""
        self.head(dataset)
        rows = self._reader().execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE dataset=? AND seq>? ORDER BY seq "
            "LIMIT ?", (dataset, after, limit)).fetchall()
        return [_event(r) for r in rows]

    def events_at(self, dataset: str, seqs: Sequence[int]) -> list[ChainEvent]:
        """Events by sequence number, in order."""
        out: list[ChainEvent] = []
        unique = sorted(set(seqs))
        for i in range(0, len(unique), 500):
            part = unique[i:i + 500]
            out += [_event(r) for r in self._reader().execute(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE dataset=? AND seq IN "
                f"({','.join('?' * len(part))}) ORDER BY seq", (dataset, *part))]
        return out

    def walk(self, dataset: str, db: sqlite3.Connection | None = None) -> Iterator[ChainEvent]:
        """Every event of the log, in order (read in pages)."""
        db = db or self._reader()
        after = 0
        while True:
            rows = db.execute(f"SELECT {_EVENT_COLUMNS} FROM events WHERE dataset=? AND seq>? "
                              "ORDER BY seq LIMIT ?", (dataset, after, _WALK)).fetchall()
            if not rows:
                return
            for r in rows:
                yield _event(r)
            after = int(rows[-1][0])

    def query(self, sql: str, args: Sequence[Any]) -> list[sqlite3.Row]:
        """Rows of a read-only query on this thread's reader connection."""
        return self._reader().execute(sql, tuple(args)).fetchall()

    def snapshot(self) -> _Snapshot:
        """A read transaction: every query in it sees one state of the database."""
        return _Snapshot(self._reader())

    def wait_for(self, dataset: str, after: int, timeout: float) -> bool:
        """Wait until the log has an event after ``after`` (True) or the timeout passes."""
        with self._changed:
            if self._closed:
                return False
            known = self._heads.get(dataset)
            if known is not None and known > after:
                return True
            self._changed.wait(timeout)
            known = self._heads.get(dataset)
            return known is not None and known > after

    # integrity -----------------------------------------------------------
    def verify(self, dataset: str) -> ChainReport:
        """Re-walk the chain and signatures; the report names the first bad event."""
        with self.snapshot() as db:
            head = self.head(dataset, db)
            report = verify_chain((0, e) for e in self.walk(dataset, db))
        if report.first_bad is None:
            if report.head_seq != head.seq:
                report.first_bad = BadEvent(
                    report.head_seq + 1, "",
                    f"missing: the log's head is seq {head.seq} but its events end at seq "
                    f"{report.head_seq}")
            elif report.head_hash != head.hash:
                report.first_bad = BadEvent(head.seq, "", "the stored head hash differs "
                                            "from the last event's hash")
        report.head_seq, report.head_hash = head.seq, head.hash
        if report.first_bad is not None:
            metrics.VERIFY_FAILURES.labels("chain").inc()
        return report

    def rebuild(self, dataset: str) -> Rebuilt:
        """Replay the log alone into empty state and compare it with the live state."""
        start = time.perf_counter()
        fresh = sqlite3.connect(":memory:", isolation_level=None)
        fresh.row_factory = sqlite3.Row
        fresh.executescript(STATE_DDL)
        differences: list[str] = []
        count = 0
        try:
            with self.snapshot() as db:
                self.head(dataset, db)
                rules = Rules()
                fresh.execute("BEGIN")
                for event in self.walk(dataset, db):
                    try:
                        apply(rules, fresh, dataset, event)
                    except GristmillError as e:
                        differences.append(f"event seq {event.seq} is refused on replay: "
                                           f"{e.message}")
                        break
                    count += 1
                fresh.execute("COMMIT")
                if not differences:
                    for table, key in STATE_TABLES.items():
                        differences += _compare(table, key, dataset, db, fresh)
        finally:
            fresh.close()
        if differences:
            metrics.VERIFY_FAILURES.labels("state").inc()
        return Rebuilt(not differences, count, differences[:20], time.perf_counter() - start)


class _Snapshot:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN")
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("COMMIT")


def _compare(table: str, key: tuple[str, ...], dataset: str, live: sqlite3.Connection,
             fresh: sqlite3.Connection) -> list[str]:
    order = ", ".join(key)
    sql = f"SELECT * FROM {table} WHERE dataset=? ORDER BY {order}"
    a = [tuple(r) for r in live.execute(sql, (dataset,))]
    b = [tuple(r) for r in fresh.execute(sql, (dataset,))]
    if a == b:
        return []
    n = len(key)
    live_rows, fresh_rows = {r[:n]: r for r in a}, {r[:n]: r for r in b}
    out: list[str] = []
    for k in sorted(set(live_rows) | set(fresh_rows), key=repr):
        if live_rows.get(k) == fresh_rows.get(k):
            continue
        shown = "/".join(str(v) for v in k[1:])
        if k not in fresh_rows:
            out.append(f"{table} {shown}: in the live state only")
        elif k not in live_rows:
            out.append(f"{table} {shown}: missing from the live state")
        else:
            out.append(f"{table} {shown}: differs (live {live_rows[k][n:]}, replayed "
                       f"{fresh_rows[k][n:]})")
        if len(out) >= 20:
            break
    return out
