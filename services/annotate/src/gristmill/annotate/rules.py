"""The state of a log as a projection of its events, and the rules each event must obey.

:func:`apply` is the only code that changes state: appends run it inside the
transaction that stores the event, and a rebuild runs it over the log alone,
so the live state and a rebuilt one are made by the same steps.

Annotation contents are kept with the log position range in which they held
(``from_seq`` inclusive, ``to_seq`` exclusive, NULL while current), so that any
past position (a release) is answered by one indexed query.
"""

from __future__ import annotations

import json
import re
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonschema import exceptions as js_exceptions
from jsonschema import validators as js_validators

from gristmill.client.annolog import ChainEvent, canonical_json
from gristmill.client.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from gristmill.client.names import validate_path, validate_sha256

__all__ = ["STATE_DDL", "STATE_TABLES", "Rules", "apply", "schema_validator"]

#: State tables and their primary key columns (the order rows are compared in).
STATE_TABLES: dict[str, tuple[str, ...]] = {
    "owners": ("dataset", "principal"),
    "schemas": ("dataset", "name", "version"),
    "proposals": ("dataset", "id"),
    "proposal_paths": ("dataset", "path", "proposal_id"),
    "annotations": ("dataset", "id", "from_seq"),
    "labels": ("dataset", "path", "annotation_id", "from_seq"),
    "releases": ("dataset", "name"),
}

STATE_DDL = """
CREATE TABLE IF NOT EXISTS owners (
    dataset TEXT NOT NULL, principal TEXT NOT NULL, added_seq INTEGER NOT NULL,
    PRIMARY KEY (dataset, principal)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schemas (
    dataset TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
    deprecated INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL, author TEXT NOT NULL,
    PRIMARY KEY (dataset, name, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS proposals (
    dataset TEXT NOT NULL, id TEXT NOT NULL, kind TEXT NOT NULL, annotation_id TEXT NOT NULL,
    status TEXT NOT NULL, schema TEXT NOT NULL, schema_version INTEGER NOT NULL,
    samples TEXT, data TEXT, author TEXT NOT NULL, seq INTEGER NOT NULL,
    reviewer TEXT, review_seq INTEGER, reason TEXT,
    PRIMARY KEY (dataset, id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS proposals_seq ON proposals (dataset, seq);
CREATE INDEX IF NOT EXISTS proposals_annotation ON proposals (dataset, annotation_id, seq);
CREATE TABLE IF NOT EXISTS proposal_paths (
    dataset TEXT NOT NULL, path TEXT NOT NULL, proposal_id TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (dataset, path, proposal_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS annotations (
    dataset TEXT NOT NULL, id TEXT NOT NULL, from_seq INTEGER NOT NULL, to_seq INTEGER,
    schema TEXT NOT NULL, schema_version INTEGER NOT NULL, samples TEXT NOT NULL,
    data TEXT NOT NULL, author TEXT NOT NULL, proposal_id TEXT NOT NULL,
    PRIMARY KEY (dataset, id, from_seq)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS annotations_open ON annotations (dataset, id, to_seq);
CREATE TABLE IF NOT EXISTS labels (
    dataset TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL,
    annotation_id TEXT NOT NULL, from_seq INTEGER NOT NULL, to_seq INTEGER,
    PRIMARY KEY (dataset, path, annotation_id, from_seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS releases (
    dataset TEXT NOT NULL, name TEXT NOT NULL, seq INTEGER NOT NULL, head_hash TEXT NOT NULL,
    dataset_version TEXT NOT NULL, author TEXT NOT NULL, time_us INTEGER NOT NULL,
    release_seq INTEGER NOT NULL,
    PRIMARY KEY (dataset, name)) WITHOUT ROWID;
"""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PRINCIPAL = re.compile(r"[\x21-\x7e]{1,200}")
MAX_SAMPLES = 1000
MAX_TEXT = 4096


def valid_name(value: Any, field: str, what: str) -> str:
    """A schema or release name, or INVALID_ARGUMENT."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InvalidArgument(field, f"{what} name {str(value)[:80]!r} must be 1-128 characters "
                              "of letters, digits, '.', '_' or '-', starting with a letter or "
                              "digit")
    return value


def valid_uuid(value: Any, field: str) -> str:
    """A UUID in canonical form (lower case, hyphens), or INVALID_ARGUMENT."""
    try:
        parsed = uuid.UUID(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None:
        raise InvalidArgument(field, f"{str(value)[:80]!r} is not a UUID; event, proposal and "
                              "annotation ids are UUIDs such as those `uuid.uuid4()` gives")
    return str(parsed)


def schema_validator(body: Any, field: str = "schema") -> Any:
    """A jsonschema validator for ``body``, or INVALID_ARGUMENT when it is not a valid schema."""
    if not isinstance(body, (dict, bool)):
        raise InvalidArgument(field, "a JSON Schema must be a JSON object (or true/false)")
    cls = js_validators.validator_for(body)
    try:
        cls.check_schema(body)  # type: ignore[arg-type]  # booleans are schemas too
    except js_exceptions.SchemaError as e:
        where = e.json_path if hasattr(e, "json_path") else "$"
        raise InvalidArgument(field, f"not a valid JSON Schema ({cls.__name__}): at {where}: "
                              f"{e.message}") from None
    return cls(body)


@dataclass
class Rules:
    """Per-process caches the rules use (compiled schema validators)."""

    validators: dict[tuple[str, str, int], Any]

    def __init__(self) -> None:
        self.validators = {}

    def validator(self, db: sqlite3.Connection, dataset: str, name: str, version: int) -> Any:
        """The compiled validator of a stored schema version."""
        key = (dataset, name, version)
        found = self.validators.get(key)
        if found is None:
            row = db.execute("SELECT body FROM schemas WHERE dataset=? AND name=? AND version=?",
                             key).fetchone()
            found = schema_validator(json.loads(row[0]))
            if len(self.validators) > 4096:
                self.validators.clear()
            self.validators[key] = found
        return found


def _payload(event: ChainEvent, allowed: set[str], required: set[str]) -> dict[str, Any]:
    try:
        data = json.loads(event.payload)
    except json.JSONDecodeError as e:
        raise InvalidArgument("payload_json", f"not JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(data, dict):
        raise InvalidArgument("payload_json", f"a {event.type} payload must be a JSON object")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidArgument("payload_json", f"unknown field(s) {unknown} in a {event.type} "
                              f"payload; it takes {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise InvalidArgument("payload_json", f"a {event.type} payload needs {missing}")
    return data


def _text(data: dict[str, Any], key: str, limit: int = MAX_TEXT) -> str:
    value = data.get(key, "")
    if not isinstance(value, str) or len(value) > limit:
        raise InvalidArgument(f"payload_json.{key}", f"must be a string of at most {limit} "
                              "characters")
    return value


def _require_owner(db: sqlite3.Connection, event: ChainEvent, dataset: str, what: str) -> None:
    if db.execute("SELECT 1 FROM owners WHERE dataset=? AND principal=?",
                  (dataset, event.author)).fetchone() is None:
        raise PermissionDenied(f"only owners of the {dataset} log may {what}; {event.author} is "
                               f"not one (see `gristmill annotate owners list {dataset}`)",
                               reason="NOT_AN_OWNER")


def _owners(db: sqlite3.Connection, dataset: str) -> list[str]:
    return [r[0] for r in db.execute("SELECT principal FROM owners WHERE dataset=? ORDER BY "
                                     "principal", (dataset,))]


def _samples(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_SAMPLES:
        raise InvalidArgument("samples", f"give 1 to {MAX_SAMPLES} samples, each "
                              '{"path": ..., "sha256": ...} (sha256 optional)')
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for i, s in enumerate(value):
        if not isinstance(s, dict) or "path" not in s or set(s) - {"path", "sha256"}:
            raise InvalidArgument(f"samples[{i}]", 'must be {"path": ..., "sha256": ...}')
        path = s["path"]
        if not isinstance(path, str) or validate_path(path, f"samples[{i}].path") != path:
            raise InvalidArgument(f"samples[{i}].path", "must be in Unicode NFC form")
        sha = s.get("sha256", "")
        if not isinstance(sha, str):
            raise InvalidArgument(f"samples[{i}].sha256", "must be a string")
        if sha:
            validate_sha256(sha, f"samples[{i}].sha256")
        if path in seen:
            raise InvalidArgument(f"samples[{i}].path", f"{path!r} is named twice")
        seen.add(path)
        out.append({"path": path, "sha256": sha} if sha else {"path": path})
    return out


def _schema_version(db: sqlite3.Connection, dataset: str, name: str, asked: Any) -> int:
    if asked is not None:
        if type(asked) is not int or asked < 1:
            raise InvalidArgument("schema_version", "must be a positive integer")
        row = db.execute("SELECT deprecated FROM schemas WHERE dataset=? AND name=? AND "
                         "version=?", (dataset, name, asked)).fetchone()
        if row is None:
            raise NotFound(f"schema {name!r} has no version {asked} in the {dataset} log; see "
                           f"`gristmill annotate schema list {dataset}`",
                           reason="SCHEMA_NOT_FOUND")
        if row[0]:
            raise FailedPrecondition(f"schema {name!r} version {asked} is deprecated; propose "
                                     "against a newer version", reason="SCHEMA_DEPRECATED")
        return int(asked)
    row = db.execute("SELECT max(version) FROM schemas WHERE dataset=? AND name=? AND "
                     "deprecated=0", (dataset, name)).fetchone()
    if row[0] is None:
        known = db.execute("SELECT 1 FROM schemas WHERE dataset=? AND name=?",
                           (dataset, name)).fetchone()
        if known:
            raise FailedPrecondition(f"every version of schema {name!r} is deprecated; add a "
                                     "new version first", reason="SCHEMA_DEPRECATED")
        raise NotFound(f"no schema {name!r} in the {dataset} log; add it with `gristmill "
                       f"annotate schema add {dataset} {name} FILE.json`",
                       reason="SCHEMA_NOT_FOUND")
    return int(row[0])


def _check_data(rules: Rules, db: sqlite3.Connection, dataset: str, schema: str, version: int,
                data: Any) -> None:
    validator = rules.validator(db, dataset, schema, version)
    error = js_exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        err = InvalidArgument("data", f"does not match schema {schema!r} version {version}: at "
                              f"{error.json_path}: {error.message}", reason="SCHEMA_MISMATCH")
        err.metadata["json_path"] = error.json_path
        err.metadata["validator"] = str(error.validator)
        raise err


def _annotation_base(db: sqlite3.Connection, dataset: str, annotation: str) -> sqlite3.Row:
    row: sqlite3.Row | None = db.execute(
        "SELECT status, schema FROM proposals WHERE dataset=? AND id=? AND kind='create'",
        (dataset, annotation)).fetchone()
    if row is None:
        raise NotFound(f"no annotation {annotation} in the {dataset} log",
                       reason="ANNOTATION_NOT_FOUND")
    if row[0] == "rejected":
        raise FailedPrecondition(f"annotation {annotation} was rejected; propose a new one",
                                 reason="ANNOTATION_REJECTED")
    deleted = db.execute("SELECT max(to_seq) FROM annotations WHERE dataset=? AND id=? AND "
                         "NOT EXISTS (SELECT 1 FROM annotations WHERE dataset=? AND id=? AND "
                         "to_seq IS NULL)", (dataset, annotation, dataset, annotation)).fetchone()
    if deleted[0] is not None:
        raise FailedPrecondition(f"annotation {annotation} was deleted at seq {deleted[0]}",
                                 reason="ANNOTATION_DELETED")
    return row


def _insert_proposal(db: sqlite3.Connection, dataset: str, event: ChainEvent, kind: str,
                     annotation: str, schema: str, version: int,
                     samples: list[dict[str, str]] | None, data: Any) -> None:
    db.execute("INSERT INTO proposals VALUES (?,?,?,?,'pending',?,?,?,?,?,?,NULL,NULL,NULL)",
               (dataset, event.id, kind, annotation, schema, version,
                None if samples is None else canonical_json(samples),
                None if kind == "delete" else canonical_json(data), event.author, event.seq))
    for s in samples or ():
        db.execute("INSERT INTO proposal_paths VALUES (?,?,?,?)",
                   (dataset, s["path"], event.id, event.seq))


def _open_version(db: sqlite3.Connection, dataset: str, annotation: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT from_seq, samples FROM annotations WHERE dataset=? AND id=? AND to_seq IS NULL",
        (dataset, annotation)).fetchone()
    return row


def _close(db: sqlite3.Connection, dataset: str, annotation: str, seq: int) -> None:
    db.execute("UPDATE annotations SET to_seq=? WHERE dataset=? AND id=? AND to_seq IS NULL",
               (seq, dataset, annotation))
    db.execute("UPDATE labels SET to_seq=? WHERE dataset=? AND annotation_id=? AND to_seq IS "
               "NULL", (seq, dataset, annotation))


def _open(db: sqlite3.Connection, dataset: str, annotation: str, seq: int, proposal: Any,
          samples: str) -> None:
    db.execute("INSERT INTO annotations VALUES (?,?,?,NULL,?,?,?,?,?,?)",
               (dataset, annotation, seq, proposal["schema"], proposal["schema_version"],
                samples, proposal["data"], proposal["author"], proposal["id"]))
    for s in json.loads(samples):
        db.execute("INSERT INTO labels VALUES (?,?,?,?,?,NULL)",
                   (dataset, s["path"], s.get("sha256", ""), annotation, seq))


def _review(db: sqlite3.Connection, dataset: str, event: ChainEvent, accept: bool) -> None:
    data = _payload(event, {"proposal", "reason"}, {"proposal"})
    _require_owner(db, event, dataset, "review proposals")
    pid = valid_uuid(data["proposal"], "proposal_id")
    reason = _text(data, "reason")
    row = db.execute("SELECT * FROM proposals WHERE dataset=? AND id=?", (dataset, pid)
                     ).fetchone()
    if row is None:
        raise FailedPrecondition(f"no proposal {pid} in the {dataset} log to review; list "
                                 f"pending ones with `gristmill annotate log {dataset}`",
                                 reason="PROPOSAL_NOT_FOUND")
    if row["status"] != "pending":
        raise FailedPrecondition(f"proposal {pid} was already {row['status']} by "
                                 f"{row['reviewer']} at seq {row['review_seq']}; a proposal is "
                                 "reviewed once (propose again to change it)",
                                 reason="ALREADY_REVIEWED")
    annotation = row["annotation_id"]
    if accept:
        current = _open_version(db, dataset, annotation)
        if row["kind"] == "create":
            _open(db, dataset, annotation, event.seq, row, row["samples"])
        else:
            if current is None:
                ever = db.execute("SELECT max(to_seq) FROM annotations WHERE dataset=? AND id=?",
                                  (dataset, annotation)).fetchone()[0]
                why = (f"was deleted at seq {ever}" if ever is not None
                       else "has not been accepted yet (accept its create proposal first)")
                raise FailedPrecondition(f"cannot accept {row['kind']} proposal {pid}: "
                                         f"annotation {annotation} {why}",
                                         reason="ANNOTATION_NOT_CURRENT")
            _close(db, dataset, annotation, event.seq)
            if row["kind"] == "update":
                _open(db, dataset, annotation, event.seq, row,
                      row["samples"] if row["samples"] is not None else current["samples"])
    db.execute("UPDATE proposals SET status=?, reviewer=?, review_seq=?, reason=? WHERE "
               "dataset=? AND id=?", ("accepted" if accept else "rejected", event.author,
                                      event.seq, reason, dataset, pid))


def apply(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    """Check ``event`` against the log's state and change the state; raises on a refused event.

    ``db`` must be inside a transaction (the caller commits or rolls back).
    """
    handler = _HANDLERS.get(event.type)
    if handler is None:
        raise InvalidArgument("type", f"unknown event type {event.type!r}")
    if event.seq == 1 and event.type != "owner.add":
        raise FailedPrecondition("a log's first event must be owner.add of its author (see "
                                 "InitLog)", reason="FIRST_OWNER")
    handler(rules, db, dataset, event)


def _schema_create(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    data = _payload(event, {"name", "schema"}, {"name", "schema"})
    _require_owner(db, event, dataset, "add schemas")
    name = valid_name(data["name"], "name", "schema")
    schema_validator(data["schema"], "schema_json")
    version = db.execute("SELECT coalesce(max(version), 0) + 1 FROM schemas WHERE dataset=? "
                         "AND name=?", (dataset, name)).fetchone()[0]
    db.execute("INSERT INTO schemas VALUES (?,?,?,?,0,?,?)",
               (dataset, name, version, canonical_json(data["schema"]), event.seq,
                event.author))


def _schema_deprecate(rules: Rules, db: sqlite3.Connection, dataset: str,
                      event: ChainEvent) -> None:
    data = _payload(event, {"name", "version"}, {"name", "version"})
    _require_owner(db, event, dataset, "deprecate schemas")
    name = valid_name(data["name"], "name", "schema")
    version = data["version"]
    if type(version) is not int:
        raise InvalidArgument("version", "must be an integer")
    row = db.execute("SELECT deprecated FROM schemas WHERE dataset=? AND name=? AND version=?",
                     (dataset, name, version)).fetchone()
    if row is None:
        raise NotFound(f"schema {name!r} has no version {version}", reason="SCHEMA_NOT_FOUND")
    if row[0]:
        raise FailedPrecondition(f"schema {name!r} version {version} is deprecated already",
                                 reason="SCHEMA_DEPRECATED")
    db.execute("UPDATE schemas SET deprecated=1 WHERE dataset=? AND name=? AND version=?",
               (dataset, name, version))


def _annotation_create(rules: Rules, db: sqlite3.Connection, dataset: str,
                       event: ChainEvent) -> None:
    data = _payload(event, {"schema", "schema_version", "samples", "data"},
                    {"schema", "samples", "data"})
    schema = valid_name(data["schema"], "schema", "schema")
    version = _schema_version(db, dataset, schema, data.get("schema_version"))
    samples = _samples(data["samples"])
    _check_data(rules, db, dataset, schema, version, data["data"])
    _insert_proposal(db, dataset, event, "create", event.id, schema, version, samples,
                     data["data"])


def _annotation_update(rules: Rules, db: sqlite3.Connection, dataset: str,
                       event: ChainEvent) -> None:
    data = _payload(event, {"annotation", "schema_version", "samples", "data"},
                    {"annotation", "data"})
    annotation = valid_uuid(data["annotation"], "annotation_id")
    base = _annotation_base(db, dataset, annotation)
    schema = base["schema"]
    version = _schema_version(db, dataset, schema, data.get("schema_version"))
    samples = _samples(data["samples"]) if "samples" in data else None
    _check_data(rules, db, dataset, schema, version, data["data"])
    _insert_proposal(db, dataset, event, "update", annotation, schema, version, samples,
                     data["data"])


def _annotation_delete(rules: Rules, db: sqlite3.Connection, dataset: str,
                       event: ChainEvent) -> None:
    data = _payload(event, {"annotation"}, {"annotation"})
    annotation = valid_uuid(data["annotation"], "annotation_id")
    base = _annotation_base(db, dataset, annotation)
    version = db.execute("SELECT schema_version FROM proposals WHERE dataset=? AND id=?",
                         (dataset, annotation)).fetchone()[0]
    _insert_proposal(db, dataset, event, "delete", annotation, base["schema"], version, None,
                     None)


def _owner_add(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    data = _payload(event, {"principal"}, {"principal"})
    principal = data["principal"]
    if not isinstance(principal, str) or not _PRINCIPAL.fullmatch(principal):
        raise InvalidArgument("principal", "must be 1-200 printable characters without spaces, "
                              "e.g. key:0123456789ab (see `gristmill annotate owners list`)")
    if event.seq == 1:
        if principal != event.author:
            raise FailedPrecondition("a log's first event makes its author the first owner",
                                     reason="FIRST_OWNER")
    else:
        _require_owner(db, event, dataset, "add owners")
    if db.execute("SELECT 1 FROM owners WHERE dataset=? AND principal=?",
                  (dataset, principal)).fetchone() is not None:
        raise FailedPrecondition(f"{principal} is an owner of the {dataset} log already",
                                 reason="ALREADY_OWNER")
    db.execute("INSERT INTO owners VALUES (?,?,?)", (dataset, principal, event.seq))


def _owner_remove(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    data = _payload(event, {"principal"}, {"principal"})
    _require_owner(db, event, dataset, "remove owners")
    principal = data["principal"]
    owners = db.execute("SELECT count(*) FROM owners WHERE dataset=?", (dataset,)).fetchone()[0]
    if db.execute("SELECT 1 FROM owners WHERE dataset=? AND principal=?",
                  (dataset, principal)).fetchone() is None:
        raise FailedPrecondition(f"{str(principal)[:200]} is not an owner of the {dataset} log",
                                 reason="NOT_AN_OWNER")
    if owners == 1:
        raise FailedPrecondition(f"{principal} is the last owner of the {dataset} log and "
                                 "cannot be removed; add another owner first",
                                 reason="LAST_OWNER")
    db.execute("DELETE FROM owners WHERE dataset=? AND principal=?", (dataset, principal))


def _release_create(rules: Rules, db: sqlite3.Connection, dataset: str,
                    event: ChainEvent) -> None:
    data = _payload(event, {"name", "dataset_version"}, {"name"})
    _require_owner(db, event, dataset, "create releases")
    name = valid_name(data["name"], "name", "release")
    version = _text(data, "dataset_version", 256)
    found = db.execute("SELECT seq FROM releases WHERE dataset=? AND name=?",
                       (dataset, name)).fetchone()
    if found is not None:
        raise AlreadyExists(f"release {name!r} of the {dataset} log exists already (at seq "
                            f"{found[0]}); pick another name", reason="RELEASE_EXISTS")
    db.execute("INSERT INTO releases VALUES (?,?,?,?,?,?,?,?)",
               (dataset, name, event.seq - 1, event.prev_hash, version, event.author,
                event.time_us, event.seq))


def _review_accept(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    _review(db, dataset, event, True)


def _review_reject(rules: Rules, db: sqlite3.Connection, dataset: str, event: ChainEvent) -> None:
    _review(db, dataset, event, False)


_HANDLERS: dict[str, Callable[[Rules, sqlite3.Connection, str, ChainEvent], None]] = {
    "schema.create": _schema_create,
    "schema.deprecate": _schema_deprecate,
    "annotation.create": _annotation_create,
    "annotation.update": _annotation_update,
    "annotation.delete": _annotation_delete,
    "review.accept": _review_accept,
    "review.reject": _review_reject,
    "owner.add": _owner_add,
    "owner.remove": _owner_remove,
    "release.create": _release_create,
}
