"""The annotate service against a real server (gRPC on port 0) and a real SQLite file."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from gristmill.client.annotations import Annotations
from gristmill.client.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    call_rpc,
)
from gristmill.common.server import create_server
from gristmill.v1 import annotate_pb2
from tests.helpers import Running, config_for, start_in_process

DS = "photos"
LABEL: dict[str, Any] = {"type": "object", "properties": {"label": {"enum": ["cat", "dog", "bird"]},
                                          "box": {"type": "array", "items": {"type": "number"},
                                                  "minItems": 4, "maxItems": 4}},
         "required": ["label"], "additionalProperties": False}


@pytest.fixture
def ann_server(tmp_path: Path) -> Iterator[Running]:
    """The annotate service alone, in this process, on a real socket."""
    running = start_in_process(tmp_path / "data", services=["annotate"])
    yield running
    assert running.server is not None
    running.server.stop(0)


@pytest.fixture
def ann(ann_server: Running) -> Iterator[Annotations]:
    with Annotations(ann_server.address, ann_server.admin_key) as client:
        client.init(DS)
        client.add_schema(DS, "label", LABEL)
        yield client


def restart(old: Running) -> Running:
    """A new in-process server on ``old``'s data directory (its keys stay valid)."""
    server, port = create_server(config_for(old.config.data_dir, services=["annotate"]))
    server.start()
    return Running(f"127.0.0.1:{port}", old.config, old.admin_key, server=server)


def db_file(running: Running) -> Path:
    return running.config.data_dir / "annotate" / "annotate.sqlite"


def test_propose_review_release_reproduces_labels(ann: Annotations) -> None:
    cat = ann.propose(DS, "label", ["a/1.jpg", "a/2.jpg"], {"label": "cat"})
    cow = ann.propose(DS, "label", ["a/3.jpg"], {"label": "dog"})
    assert cat.status == annotate_pb2.PROPOSAL_STATUS_PENDING
    assert ann.annotations(DS, ["a/1.jpg"]) == [[]]  # pending is not a label
    ann.review(DS, cat.id, accept=True)
    ann.review(DS, cow.id, accept=False, reason="it is a cow")
    release = ann.create_release(DS, "r1", dataset_version="v-abc")
    assert release.annotation_count == 1 and release.dataset_version == "v-abc"
    first = io.BytesIO()
    ann.export_release(DS, "r1", first)
    # the log moves on: the annotation changes, another is added, then deleted
    upd = ann.propose_update(DS, cat.id, {"label": "dog"})
    ann.review(DS, upd.id, accept=True)
    bird = ann.propose(DS, "label", ["a/1.jpg"], {"label": "bird"})
    ann.review(DS, bird.id, accept=True)
    gone = ann.propose_delete(DS, bird.id)
    ann.review(DS, gone.id, accept=True)
    second = io.BytesIO()
    ann.export_release(DS, "r1", second)
    assert first.getvalue() == second.getvalue()
    lines = first.getvalue().decode().splitlines()
    assert len(lines) == 2 and '"label":"cat"' in lines[1] and "a/3.jpg" not in lines[1]
    at_release = ann.annotations(DS, ["a/1.jpg", "a/2.jpg", "a/3.jpg"], release="r1")
    assert [[a.data_json for a in s] for s in at_release] == [
        ['{"label":"cat"}'], ['{"label":"cat"}'], []]
    now = ann.annotations(DS, ["a/1.jpg", "a/3.jpg"])
    assert [[a.data_json for a in s] for s in now] == [['{"label":"dog"}'], []]
    history = ann.history(DS, cat.id)
    assert [e.type for e in history] == [annotate_pb2.EVENT_TYPE_ANNOTATION_CREATE,
                                         annotate_pb2.EVENT_TYPE_REVIEW_ACCEPT,
                                         annotate_pb2.EVENT_TYPE_ANNOTATION_UPDATE,
                                         annotate_pb2.EVENT_TYPE_REVIEW_ACCEPT]
    assert [p.id for p in ann.proposals(DS, status="rejected")] == [cow.id]
    assert [p.id for p in ann.proposals(DS, path="a/3.jpg")] == [cow.id]
    with pytest.raises(AlreadyExists):
        ann.create_release(DS, "r1")
    with pytest.raises(NotFound, match="no release"):
        ann.annotations(DS, ["a/1.jpg"], release="nope")


def test_many_samples_in_one_call_and_content_pinning(ann: Annotations) -> None:
    sha_a, sha_b = "a" * 64, "b" * 64
    p = ann.propose(DS, "label", [("x/pinned.jpg", sha_a)], {"label": "cat"})
    ann.review(DS, p.id, accept=True)
    paths = [f"bulk/{i:05d}.jpg" for i in range(3000)]
    ids = ann.append(DS, [("annotation.create", {"schema": "label", "samples": [{"path": q}],
                                                 "data": {"label": "dog"}}) for q in paths])
    ann.append(DS, [("review.accept", {"proposal": e.id}) for e in ids.events[::2]])
    found = ann.annotations(DS, paths)
    assert [len(f) for f in found] == [1 if i % 2 == 0 else 0 for i in range(3000)]
    assert ann.annotations(DS, [("x/pinned.jpg", sha_a)])[0][0].id == p.id
    assert ann.annotations(DS, [("x/pinned.jpg", sha_b)]) == [[]]  # other content
    assert len(ann.annotations(DS, ["x/pinned.jpg"])[0]) == 1


def test_schema_refusals_name_the_failing_path(ann: Annotations) -> None:
    with pytest.raises(InvalidArgument) as bad:
        ann.propose(DS, "label", ["a.jpg"], {"label": "cat", "box": [1, 2, "x", 4]})
    assert bad.value.metadata["json_path"] == "$.box[2]"
    assert "'x' is not of type 'number'" in bad.value.message
    assert bad.value.reason == "SCHEMA_MISMATCH"
    with pytest.raises(InvalidArgument, match="not one of"):
        ann.propose(DS, "label", ["a.jpg"], {"label": "cow"})
    with pytest.raises(InvalidArgument, match="not a valid JSON Schema"):
        ann.add_schema(DS, "broken", {"type": "no-such-type"})
    with pytest.raises(NotFound, match="no schema 'nope'"):
        ann.propose(DS, "nope", ["a.jpg"], {})
    with pytest.raises(InvalidArgument, match="path"):
        ann.propose(DS, "label", ["../escape.jpg"], {"label": "cat"})
    # versions: v2 adds a label; deprecating v1 refuses proposals against it
    v2 = ann.add_schema(DS, "label", {**LABEL, "properties": {
        **LABEL["properties"], "label": {"enum": ["cat", "dog", "bird", "cow"]}}})
    assert v2.version == 2
    assert ann.propose(DS, "label", ["a.jpg"], {"label": "cow"}).schema_version == 2
    ann.deprecate_schema(DS, "label", 1)
    with pytest.raises(FailedPrecondition, match="deprecated"):
        ann.propose(DS, "label", ["a.jpg"], {"label": "cat"}, schema_version=1)
    assert [(s.version, s.deprecated) for s in ann.schemas(DS)] == [(1, True), (2, False)]


def test_review_transitions_and_owner_rules(ann_server: Running, ann: Annotations) -> None:
    writer_key = ann_server.key("writer")
    reader_key = ann_server.key("reader")
    with Annotations(ann_server.address, writer_key) as writer, \
            Annotations(ann_server.address, reader_key) as reader:
        p = writer.propose(DS, "label", ["w.jpg"], {"label": "cat"})  # contributors propose
        with pytest.raises(PermissionDenied, match="only owners"):
            writer.review(DS, p.id, accept=True)
        with pytest.raises(PermissionDenied, match="only owners"):
            writer.add_schema(DS, "mine", {"type": "object"})
        with pytest.raises(PermissionDenied, match="only owners"):
            writer.add_owner(DS, writer.principal(DS))
        with pytest.raises(PermissionDenied):  # a reader key may not propose at all
            reader.propose(DS, "label", ["w.jpg"], {"label": "cat"})
        upd = writer.propose_update(DS, p.id, {"label": "dog"})
        with pytest.raises(FailedPrecondition, match="accept its create proposal first"):
            ann.review(DS, upd.id, accept=True)
        with pytest.raises(FailedPrecondition, match="no proposal"):
            ann.review(DS, str(uuid.uuid4()), accept=True)
        ann.review(DS, p.id, accept=True)
        with pytest.raises(FailedPrecondition, match="already accepted"):
            ann.review(DS, p.id, accept=False)
        ann.review(DS, upd.id, accept=False)
        with pytest.raises(FailedPrecondition, match="already rejected"):
            ann.review(DS, upd.id, accept=True)
        # owners: the creator is the first and cannot leave alone
        me = ann.principal(DS)
        assert ann.owners(DS) == [me]
        with pytest.raises(FailedPrecondition, match="last owner"):
            ann.remove_owner(DS, me)
        w = writer.principal(DS)
        assert sorted(ann.add_owner(DS, w)) == sorted([me, w])
        with pytest.raises(FailedPrecondition, match="already"):
            ann.add_owner(DS, w)
        p2 = ann.propose(DS, "label", ["z.jpg"], {"label": "cat"})
        assert writer.review(DS, p2.id, accept=True).status == \
            annotate_pb2.PROPOSAL_STATUS_ACCEPTED
        assert writer.remove_owner(DS, me) == [w]
        with pytest.raises(PermissionDenied):
            ann.review(DS, ann.propose(DS, "label", ["y.jpg"], {"label": "cat"}).id,
                       accept=True)
        with pytest.raises(FailedPrecondition, match="last owner"):
            writer.remove_owner(DS, w)
    assert ann.rebuild(DS).equal


def test_idempotent_appends_and_expected_heads(ann: Annotations) -> None:
    eid = str(uuid.uuid4())
    event = ("annotation.create", {"schema": "label", "samples": [{"path": "i.jpg"}],
                                   "data": {"label": "cat"}}, eid)
    first = ann.append(DS, [event])
    again = ann.append(DS, [event])
    assert again.replayed and again.events == first.events
    assert ann.head(DS).seq == first.head.seq
    with pytest.raises(AlreadyExists, match="different content"):
        ann.append(DS, [(event[0], {**event[1], "data": {"label": "dog"}}, eid)])
    # a stale expected head is refused with the current head
    stale = annotate_pb2.ChainHead(seq=first.head.seq - 1)
    with pytest.raises(Aborted) as moved:
        ann.append(DS, [("annotation.delete", {"annotation": eid})], expected_head=stale)
    assert moved.value.metadata["head_seq"] == str(first.head.seq)
    assert moved.value.metadata["head_hash"] == first.head.hash
    ok = ann.append(DS, [("annotation.delete", {"annotation": eid})],
                    expected_head=first.head)
    assert ok.head.seq == first.head.seq + 1
    # all or nothing: a bad event in the middle of a batch appends none of it
    before = ann.head(DS)
    good = ("annotation.create", {"schema": "label", "samples": [{"path": "b.jpg"}],
                                  "data": {"label": "cat"}})
    with pytest.raises(InvalidArgument, match="not one of"):
        ann.append(DS, [good, (good[0], {**good[1], "data": {"label": "cow"}}), good])
    assert ann.head(DS) == before
    with pytest.raises(InvalidArgument, match="unknown field"):
        ann.append(DS, [("owner.add", {"principal": "key:x", "extra": 1})])


def test_signed_events(ann_server: Running, ann: Annotations) -> None:
    seed = bytes(range(32))
    with Annotations(ann_server.address, ann_server.admin_key, signing_key=seed) as signer:
        resp = signer.append(DS, [("annotation.create", {
            "schema": "label", "samples": [{"path": "s.jpg"}], "data": {"label": "cat"}})] * 3)
        assert all(e.signature and e.public_key for e in resp.events)
        signer.add_schema(DS, "signed-schema", {"type": "object"})
        request = signer._signed(DS, [("owner.add", '{"principal":"key:z"}',
                                       str(uuid.uuid4()))], signer.head(DS))
    assert ann.verify(DS).signatures_checked == 4
    forged = request.events[0].signature
    request.events[0].signature = ("0" if forged[0] != "0" else "1") + forged[1:]
    with pytest.raises(InvalidArgument, match="does not verify") as bad:
        call_rpc(ann._stub.AppendEvents, request)
    assert bad.value.reason == "BAD_SIGNATURE"
    unsigned_head = annotate_pb2.AppendEventsRequest(dataset=DS, events=request.events)
    with pytest.raises(InvalidArgument, match="expected_head"):
        call_rpc(ann._stub.AppendEvents, unsigned_head)


def _tamper(path: Path, sql: str, args: tuple[object, ...]) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


@pytest.mark.parametrize("column,value", [
    ("payload", '{"principal":"key:mallory"}'), ("author", "key:mallory"), ("type", "owner.remove"),
    ("time_us", 1), ("id", str(uuid.UUID(int=7))), ("hash", "f" * 64), ("prev_hash", "e" * 64),
    ("public_key", "ab" * 32),
])
def test_tampered_row_is_named_by_verify(ann_server: Running, ann: Annotations, column: str,
                                         value: object) -> None:
    batch = [("owner.add", {"principal": f"key:p{i}"}) for i in range(2000)]
    ann.append(DS, batch)
    ann.append(DS, [("owner.add", {"principal": "key:last"})])
    report = ann.verify(DS)
    assert report.ok and report.events_checked == 2 + 2000 + 1
    target = 1234
    row = sqlite3.connect(db_file(ann_server)).execute(
        "SELECT id FROM events WHERE dataset=? AND seq=?", (DS, target)).fetchone()
    _tamper(db_file(ann_server), f"UPDATE events SET {column}=? WHERE dataset=? AND seq=?",
            (value, DS, target))
    report = ann.verify(DS)
    assert not report.ok
    assert report.first_bad.seq == target
    assert report.first_bad.id in (row[0], value)


def test_removed_last_event_and_state_edits_are_found(ann_server: Running,
                                                      ann: Annotations) -> None:
    p = ann.propose(DS, "label", ["e.jpg"], {"label": "cat"})
    ann.review(DS, p.id, accept=True)
    assert ann.rebuild(DS).equal
    _tamper(db_file(ann_server), "UPDATE annotations SET data=? WHERE dataset=?",
            ('{"label":"dog"}', DS))
    rebuilt = ann.rebuild(DS)
    assert not rebuilt.equal and "annotations" in rebuilt.differences[0]
    head = ann.head(DS).seq
    _tamper(db_file(ann_server), "DELETE FROM events WHERE dataset=? AND seq=?", (DS, head))
    report = ann.verify(DS)
    assert not report.ok and report.first_bad.seq == head and "missing" in \
        report.first_bad.problem


def _failures(check: str) -> float:
    value = REGISTRY.get_sample_value("gristmill_annotate_verify_failures_total",
                                      {"check": check})
    assert value is not None, "the series exists from the start, at 0"
    return value


def test_failed_checks_count_for_the_alert(ann_server: Running, ann: Annotations) -> None:
    """gristmill_annotate_verify_failures_total: the GristmillAnnotateChainVerificationFailed
    alert (deploy/monitoring/rules.yaml) fires on its increase."""
    p = ann.propose(DS, "label", ["f.jpg"], {"label": "cat"})
    ann.review(DS, p.id, accept=True)
    chain, state = _failures("chain"), _failures("state")
    assert ann.verify(DS).ok and ann.rebuild(DS).equal
    assert (_failures("chain"), _failures("state")) == (chain, state)  # intact: no count
    _tamper(db_file(ann_server), "UPDATE annotations SET data=? WHERE dataset=?",
            ('{"label":"dog"}', DS))
    assert not ann.rebuild(DS).equal
    assert (_failures("chain"), _failures("state")) == (chain, state + 1)
    assert ann.verify(DS).ok  # the log itself is intact
    _tamper(db_file(ann_server), "UPDATE events SET payload=? WHERE dataset=? AND seq=?",
            ('{"principal":"key:mallory"}', DS, 1))
    report = ann.verify(DS)
    assert not report.ok and report.first_bad.seq == 1
    assert _failures("chain") == chain + 1
    assert not ann.verify(DS).ok  # every check that finds it counts
    assert (_failures("chain"), _failures("state")) == (chain + 2, state + 1)


def test_export_then_import_on_a_second_server(ann: Annotations, tmp_path: Path) -> None:
    seed = bytes(32)
    with Annotations(ann.options.address, ann.options.api_key, signing_key=seed) as signer:
        p = signer.propose(DS, "label", ["c.jpg"], {"label": "cat"})
        signer.append(DS, [("review.accept", {"proposal": p.id})])
    ann.create_release(DS, "r1")
    log_file = tmp_path / "log.jsonl"
    with open(log_file, "w") as f:
        count = ann.export_log(DS, f)
    assert count == ann.head(DS).seq
    release = io.BytesIO()
    ann.export_release(DS, "r1", release)
    other = start_in_process(tmp_path / "second", services=["annotate"])
    try:
        with Annotations(other.address, other.admin_key) as clone:
            resp = clone.import_log("copied", log_file)
            assert resp.events_imported == count and resp.head == ann.head(DS)
            report = clone.verify("copied")
            assert report.ok and report.signatures_checked == 1
            again = io.BytesIO()
            clone.export_release("copied", "r1", again)
            assert again.getvalue().replace(b'"copied"', b'"photos"') == release.getvalue()
            assert clone.rebuild("copied").equal
            with pytest.raises(AlreadyExists):
                clone.import_log("copied", log_file)
    finally:
        assert other.server is not None
        other.server.stop(0)


def test_watch_catches_up_then_streams_live(ann: Annotations) -> None:
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        for event in ann.watch(DS, after=1):
            seen.append(event.seq)
            if event.seq >= 6:
                done.set()
                return

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    time.sleep(0.3)
    assert seen == [2]  # caught up (the schema), now waiting
    for i in range(4):
        ann.append(DS, [("owner.add", {"principal": f"key:w{i}"})])
    assert done.wait(10)
    assert seen == [2, 3, 4, 5, 6]
    list_page = list(ann.events(DS, after=3))
    assert [e.seq for e in list_page] == [4, 5, 6]


def test_watch_resumes_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = start_in_process(data, services=["annotate"])
    with Annotations(first.address, first.admin_key) as a:
        a.init(DS)
        a.append(DS, [("owner.add", {"principal": f"key:{i}"}) for i in range(3)])
        got = [e.seq for _, e in zip(range(2), a.watch(DS, reconnect=False), strict=False)]
    assert first.server is not None
    first.server.stop(0)
    second = restart(first)
    try:
        with Annotations(second.address, second.admin_key) as b:
            b.append(DS, [("owner.add", {"principal": "key:after-restart"})])
            rest = [e.seq for _, e in zip(range(3), b.watch(DS, after=got[-1]), strict=False)]
        assert got + rest == [1, 2, 3, 4, 5]
    finally:
        assert second.server is not None
        second.server.stop(0)


def test_a_second_server_on_the_same_data_is_refused(ann_server: Running) -> None:
    with pytest.raises(OSError, match="one writer"):
        restart(ann_server)


def test_all_in_one_server_serves_annotate(server: Running) -> None:
    with Annotations(server.address, server.admin_key) as a:
        log = a.init("anything")
        assert log.head.seq == 1 and log.owners == [a.principal("anything")]
        with pytest.raises(AlreadyExists):
            a.init("anything")
        with pytest.raises(NotFound, match="annotate init"):
            a.get_log("missing")
        with pytest.raises(InvalidArgument):
            a.get_log("bad name!")
