"""Client of the annotate service: annotation logs, schemas, review, releases.

Example::

    with Annotations("127.0.0.1:7450", api_key) as ann:
        ann.init("photos")
        ann.add_schema("photos", "label", {"type": "object", "required": ["label"]})
        p = ann.propose("photos", "label", ["train/cats/001.jpg"], {"label": "cat"})
        ann.review("photos", p.id, accept=True)
        ann.create_release("photos", "v1")
        ann.annotations("photos", ["train/cats/001.jpg"], release="v1")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.client.annolog import (
    ChainEvent,
    ChainReport,
    canonical_json,
    event_hash,
    public_key_of,
    read_log_file,
    sign_hash,
    verify_chain,
)
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import (
    Aborted,
    DataLoss,
    InvalidArgument,
    Unavailable,
    call_pages,
    call_rpc,
    stream_rpc,
)
from gristmill.v1 import annotate_pb2, annotate_pb2_grpc

__all__ = ["Annotations", "Sample", "verify_file"]

#: Samples per GetAnnotations call.
QUERY_BATCH = 5000
#: Events per ImportLog message.
IMPORT_BATCH = 500


@dataclass(frozen=True)
class Sample:
    """A sample an annotation is about: its path, and optionally its content's sha256."""

    path: str
    sha256: str = ""


SampleLike = str | Sample | tuple[str, str]


def _ref(s: SampleLike) -> annotate_pb2.SampleRef:
    if isinstance(s, str):
        return annotate_pb2.SampleRef(path=s)
    if isinstance(s, Sample):
        return annotate_pb2.SampleRef(path=s.path, sha256=s.sha256)
    return annotate_pb2.SampleRef(path=s[0], sha256=s[1])


def _event_type(name: str) -> annotate_pb2.EventType.ValueType:
    return annotate_pb2.EventType.Value("EVENT_TYPE_" + name.upper().replace(".", "_"))


def chain_event(m: annotate_pb2.Event) -> ChainEvent:
    """A stored event's proto as a :class:`ChainEvent` (as exported)."""
    name = annotate_pb2.EventType.Name(m.type).removeprefix("EVENT_TYPE_").lower()
    type_ = name.replace("_", ".", 1)
    us = m.create_time.seconds * 1_000_000 + m.create_time.nanos // 1000
    return ChainEvent(m.seq, m.id, type_, m.author, us, m.payload_json, m.prev_hash, m.hash,
                      m.public_key, m.signature)


def event_proto(e: ChainEvent) -> annotate_pb2.Event:
    """A :class:`ChainEvent` as the proto ImportLog takes."""
    return annotate_pb2.Event(
        seq=e.seq, id=e.id, type=_event_type(e.type), author=e.author,
        create_time=Timestamp(seconds=e.time_us // 1_000_000,
                              nanos=(e.time_us % 1_000_000) * 1000),
        payload_json=e.payload, prev_hash=e.prev_hash, hash=e.hash, public_key=e.public_key,
        signature=e.signature)


def verify_file(path: Path) -> ChainReport:
    """Verify an exported log offline (no server): every hash, link and signature."""
    return verify_chain(read_log_file(Path(path)))


class Annotations:
    """Client of a gristmill annotate service.

    Args:
        address: ``host:port``; default ``GRISTMILL_ADDRESS`` or 127.0.0.1:7450.
        api_key: default ``GRISTMILL_API_KEY``.
        ca_file: PEM root certificate; enables TLS.
        signing_key: a 32-byte Ed25519 seed; when set, every event this client
            appends is signed (needs PyNaCl) and appended at the head it read
            (retried if another writer got there first).
    """

    def __init__(self, address: str | None = None, api_key: str | None = None, *,
                 ca_file: Path | None = None, signing_key: bytes | None = None) -> None:
        self.options = ConnectionOptions(address, api_key, ca_file).resolved()
        self._channel = open_channel(self.options)
        self._stub = annotate_pb2_grpc.AnnotateServiceStub(self._channel)
        if signing_key is not None and len(signing_key) != 32:
            raise InvalidArgument("signing_key", "an Ed25519 seed is 32 bytes")
        self.signing_key = signing_key
        self._principal = ""

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Annotations:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # logs -----------------------------------------------------------------
    def init(self, dataset: str) -> annotate_pb2.Log:
        """Create the dataset's log; you become its first owner."""
        return call_rpc(self._stub.InitLog, annotate_pb2.InitLogRequest(
            dataset=dataset, event_id=str(uuid.uuid4()))).log

    def get_log(self, dataset: str) -> annotate_pb2.Log:
        """The log's head, owners and counts."""
        return self._get_log(dataset).log

    def _get_log(self, dataset: str) -> annotate_pb2.GetLogResponse:
        reply = call_rpc(self._stub.GetLog, annotate_pb2.GetLogRequest(dataset=dataset))
        self._principal = reply.principal
        return reply

    def principal(self, dataset: str) -> str:
        """Your principal as the server sees it (what owner lists hold)."""
        if not self._principal:
            self._get_log(dataset)
        return self._principal

    def head(self, dataset: str) -> annotate_pb2.ChainHead:
        """The log's head now."""
        return self.get_log(dataset).head

    # appends --------------------------------------------------------------
    def append(self, dataset: str, events: Sequence[tuple[str, Any] | tuple[str, Any, str]],
               expected_head: annotate_pb2.ChainHead | None = None, *, retries: int = 10
               ) -> annotate_pb2.AppendEventsResponse:
        """Append (type, payload[, event id]) events in one all-or-nothing call.

        With ``expected_head``, ABORTED (:class:`Aborted`) when the log moved on.
        Signed (``signing_key``) and without ``expected_head``, the head is read
        and the call retried up to ``retries`` times when another writer wins.
        """
        items = [(e[0], canonical_json(e[1]), e[2] if len(e) > 2 else str(uuid.uuid4()))
                 for e in events]
        if self.signing_key is None:
            return call_rpc(self._stub.AppendEvents, annotate_pb2.AppendEventsRequest(
                dataset=dataset, expected_head=expected_head, events=[
                    annotate_pb2.NewEvent(id=i, type=_event_type(t), payload_json=p)
                    for t, p, i in items]))
        for attempt in range(retries + 1):
            head = expected_head or self.head(dataset)
            try:
                return call_rpc(self._stub.AppendEvents, self._signed(dataset, items, head))
            except Aborted:
                if expected_head is not None or attempt == retries:
                    raise
        raise AssertionError("unreachable")

    def _signed(self, dataset: str, items: list[tuple[str, str, str]],
                head: annotate_pb2.ChainHead) -> annotate_pb2.AppendEventsRequest:
        assert self.signing_key is not None
        author = self.principal(dataset)
        key = public_key_of(self.signing_key)
        seq, prev = head.seq, head.hash
        now = time.time_ns() // 1000
        out = []
        for type_, payload, event_id in items:
            seq += 1
            digest = event_hash(prev, seq, type_, author, now, event_id, payload, key)
            _, signature = sign_hash(self.signing_key, digest)
            out.append(annotate_pb2.NewEvent(
                id=event_id, type=_event_type(type_), payload_json=payload,
                create_time=Timestamp(seconds=now // 1_000_000, nanos=(now % 1_000_000) * 1000),
                public_key=key, signature=signature))
            prev = digest
        return annotate_pb2.AppendEventsRequest(dataset=dataset, events=out,
                                                expected_head=head)

    def _one(self, dataset: str, type_: str, payload: Any) -> annotate_pb2.Event:
        return self.append(dataset, [(type_, payload)]).events[0]

    # schemas --------------------------------------------------------------
    def add_schema(self, dataset: str, name: str, schema: Any) -> annotate_pb2.Schema:
        """Add a JSON Schema (a dict, or JSON text) as the name's next version."""
        text = schema if isinstance(schema, str) else canonical_json(schema)
        if self.signing_key is not None:
            self._one(dataset, "schema.create", {"name": name, "schema": _loads(text)})
            return [s for s in self.schemas(dataset, name)][-1]
        return call_rpc(self._stub.CreateSchema, annotate_pb2.CreateSchemaRequest(
            dataset=dataset, name=name, schema_json=text, event_id=str(uuid.uuid4()))).schema

    def deprecate_schema(self, dataset: str, name: str, version: int) -> annotate_pb2.Event:
        """Refuse new proposals against one version of a schema."""
        return self._one(dataset, "schema.deprecate", {"name": name, "version": version})

    def schemas(self, dataset: str, name: str = "") -> list[annotate_pb2.Schema]:
        """Every schema version (of one name, or all), by name then version."""
        request = annotate_pb2.ListSchemasRequest(dataset=dataset, name=name, page_size=1000)
        out: list[annotate_pb2.Schema] = []
        for page in call_pages(self._stub.ListSchemas, request):
            out += page.schemas
        return out

    # proposals ------------------------------------------------------------
    def propose(self, dataset: str, schema: str, samples: Iterable[SampleLike], data: Any, *,
                schema_version: int = 0, event_id: str | None = None) -> annotate_pb2.Proposal:
        """Propose a new annotation of ``samples``; returns the pending proposal."""
        return call_rpc(self._stub.Propose, annotate_pb2.ProposeRequest(
            dataset=dataset, event_id=event_id or str(uuid.uuid4()), schema=schema,
            schema_version=schema_version, samples=[_ref(s) for s in samples],
            data_json=canonical_json(data))).proposal

    def propose_update(self, dataset: str, annotation_id: str, data: Any, *,
                       samples: Iterable[SampleLike] = (), schema_version: int = 0
                       ) -> annotate_pb2.Proposal:
        """Propose new data (and optionally new samples) for an annotation."""
        return call_rpc(self._stub.Propose, annotate_pb2.ProposeRequest(
            dataset=dataset, event_id=str(uuid.uuid4()), annotation_id=annotation_id,
            schema_version=schema_version, samples=[_ref(s) for s in samples],
            data_json=canonical_json(data))).proposal

    def propose_delete(self, dataset: str, annotation_id: str) -> annotate_pb2.Proposal:
        """Propose removing an annotation."""
        return call_rpc(self._stub.Propose, annotate_pb2.ProposeRequest(
            dataset=dataset, event_id=str(uuid.uuid4()), annotation_id=annotation_id,
            delete=True)).proposal

    def review(self, dataset: str, proposal_id: str, *, accept: bool, reason: str = ""
               ) -> annotate_pb2.Proposal:
        """Accept or reject a pending proposal (owners only)."""
        decision = annotate_pb2.DECISION_ACCEPT if accept else annotate_pb2.DECISION_REJECT
        return call_rpc(self._stub.Review, annotate_pb2.ReviewRequest(
            dataset=dataset, proposal_id=proposal_id, decision=decision, reason=reason,
            event_id=str(uuid.uuid4()))).proposal

    def proposals(self, dataset: str, *, status: str = "", schema: str = "", path: str = "",
                  annotation_id: str = "") -> Iterator[annotate_pb2.Proposal]:
        """Proposals in log order; status is "", "pending", "accepted" or "rejected"."""
        statuses = {"": annotate_pb2.PROPOSAL_STATUS_UNSPECIFIED,
                    "pending": annotate_pb2.PROPOSAL_STATUS_PENDING,
                    "accepted": annotate_pb2.PROPOSAL_STATUS_ACCEPTED,
                    "rejected": annotate_pb2.PROPOSAL_STATUS_REJECTED}
        if status not in statuses:
            raise InvalidArgument("status", f"{status!r} is not one of pending, accepted, "
                                  "rejected")
        request = annotate_pb2.ListProposalsRequest(
            dataset=dataset, status=statuses[status], schema=schema, path=path,
            annotation_id=annotation_id, page_size=1000)
        for page in call_pages(self._stub.ListProposals, request):
            yield from page.proposals

    def history(self, dataset: str, annotation_id: str) -> list[annotate_pb2.Event]:
        """Every event that proposed a change to an annotation or reviewed one, in order."""
        return list(call_rpc(self._stub.GetAnnotationHistory,
                             annotate_pb2.GetAnnotationHistoryRequest(
                                 dataset=dataset, annotation_id=annotation_id)).events)

    # owners ---------------------------------------------------------------
    def owners(self, dataset: str) -> list[str]:
        """The log's owners."""
        return list(self.get_log(dataset).owners)

    def add_owner(self, dataset: str, principal: str) -> list[str]:
        """Add an owner (owners only); returns the owners."""
        return list(call_rpc(self._stub.AddOwner, annotate_pb2.AddOwnerRequest(
            dataset=dataset, principal=principal, event_id=str(uuid.uuid4()))).owners)

    def remove_owner(self, dataset: str, principal: str) -> list[str]:
        """Remove an owner (owners only; never the last); returns the owners."""
        return list(call_rpc(self._stub.RemoveOwner, annotate_pb2.RemoveOwnerRequest(
            dataset=dataset, principal=principal, event_id=str(uuid.uuid4()))).owners)

    # reading annotations --------------------------------------------------
    def annotations(self, dataset: str, samples: Sequence[SampleLike], release: str = ""
                    ) -> list[list[annotate_pb2.Annotation]]:
        """Accepted annotations of each sample (aligned with ``samples``), now or at a release.

        Many samples go in few calls (``QUERY_BATCH`` per call). With a
        release, every call answers at the release's position.
        """
        out: list[list[annotate_pb2.Annotation]] = []
        refs = [_ref(s) for s in samples]
        for i in range(0, len(refs), QUERY_BATCH):
            reply = call_rpc(self._stub.GetAnnotations, annotate_pb2.GetAnnotationsRequest(
                dataset=dataset, samples=refs[i:i + QUERY_BATCH], release=release))
            out += [list(s.annotations) for s in reply.samples]
        return out

    def events(self, dataset: str, after: int = 0) -> Iterator[annotate_pb2.Event]:
        """Stored events after a sequence number, in order (paged)."""
        request = annotate_pb2.ListEventsRequest(dataset=dataset, after_seq=after,
                                                 page_size=5000)
        for page in call_pages(self._stub.ListEvents, request):
            yield from page.events

    def watch(self, dataset: str, after: int = 0, *, reconnect: bool = True,
              retry_seconds: float = 1.0) -> Iterator[annotate_pb2.Event]:
        """Events after ``after``: stored ones, then new ones as they come, without end.

        With ``reconnect``, a lost server (a restart) is waited for and the
        stream resumes after the last event received: none is skipped or repeated.
        """
        while True:
            call = self._stub.WatchEvents(annotate_pb2.WatchEventsRequest(dataset=dataset,
                                                                          after_seq=after))
            try:
                for message in stream_rpc(call):
                    for event in message.events:
                        after = event.seq
                        yield event
                return
            except Unavailable:
                if not reconnect:
                    raise
                time.sleep(retry_seconds)
            finally:
                call.cancel()

    # integrity ------------------------------------------------------------
    def verify(self, dataset: str) -> annotate_pb2.VerifyResponse:
        """Re-walk the log on the server; ``first_bad`` names the first bad event."""
        return call_rpc(self._stub.Verify, annotate_pb2.VerifyRequest(dataset=dataset))

    def rebuild(self, dataset: str) -> annotate_pb2.RebuildStateResponse:
        """Replay the log into fresh state on the server and compare with the live state."""
        return call_rpc(self._stub.RebuildState,
                        annotate_pb2.RebuildStateRequest(dataset=dataset))

    # releases -------------------------------------------------------------
    def create_release(self, dataset: str, name: str, dataset_version: str = ""
                       ) -> annotate_pb2.Release:
        """Pin the log's current position as a release (owners only)."""
        return call_rpc(self._stub.CreateRelease, annotate_pb2.CreateReleaseRequest(
            dataset=dataset, name=name, dataset_version=dataset_version,
            event_id=str(uuid.uuid4()))).release

    def releases(self, dataset: str) -> list[annotate_pb2.Release]:
        """The log's releases, oldest first."""
        request = annotate_pb2.ListReleasesRequest(dataset=dataset, page_size=1000)
        out: list[annotate_pb2.Release] = []
        for page in call_pages(self._stub.ListReleases, request):
            out += page.releases
        return out

    def export_release(self, dataset: str, name: str, out: IO[bytes]) -> annotate_pb2.Release:
        """Write a release's canonical JSON lines to ``out``; returns the release."""
        release = annotate_pb2.Release()
        for message in stream_rpc(self._stub.ExportRelease(annotate_pb2.ExportReleaseRequest(
                dataset=dataset, release=name))):
            if message.HasField("release"):
                release = message.release
            out.write(message.data)
        return release

    def export_log(self, dataset: str, out: IO[str]) -> int:
        """Write the whole log as JSON lines (one event a line); returns the event count."""
        count = 0
        for message in stream_rpc(self._stub.ExportLog(
                annotate_pb2.ExportLogRequest(dataset=dataset))):
            for event in message.events:
                out.write(chain_event(event).to_line() + "\n")
                count += 1
        return count

    def import_log(self, dataset: str, path: Path) -> annotate_pb2.ImportLogResponse:
        """Create ``dataset``'s log from an exported file (admin key).

        The file is verified here first (a damaged one is refused with
        :class:`DataLoss` naming the line); the server verifies it again.
        """
        report = verify_file(path)
        if report.first_bad is not None:
            raise DataLoss(f"{path} does not verify: {report.first_bad}", reason="CHAIN_BROKEN")

        def requests() -> Iterator[annotate_pb2.ImportLogRequest]:
            batch: list[annotate_pb2.Event] = []
            first = True
            for _, event in read_log_file(path):
                assert isinstance(event, ChainEvent)
                batch.append(event_proto(event))
                if len(batch) >= IMPORT_BATCH:
                    yield annotate_pb2.ImportLogRequest(dataset=dataset if first else "",
                                                        events=batch)
                    batch, first = [], False
            if batch or first:
                yield annotate_pb2.ImportLogRequest(dataset=dataset if first else "",
                                                    events=batch)

        return call_rpc(self._stub.ImportLog, requests())


def _loads(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument("schema", f"not JSON: {e}") from None
