"""AnnotateService over gRPC: validates, appends through :class:`AnnotationLog`, converts."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator

import grpc

from gristmill.annotate import metrics, views
from gristmill.annotate.config import AnnotateConfig
from gristmill.annotate.log import AnnotationLog, Head, NewEvent
from gristmill.annotate.rules import valid_name, valid_uuid
from gristmill.client.annolog import ChainEvent, canonical_json
from gristmill.client.errors import InvalidArgument
from gristmill.client.names import validate_dataset_name, validate_path, validate_sha256
from gristmill.common.auth import Role
from gristmill.common.paging import decode_page_token, encode_page_token, page_size
from gristmill.common.service import ServiceContext, ServiceSpec
from gristmill.v1 import annotate_pb2, annotate_pb2_grpc

__all__ = ["SERVICE", "AnnotateServicer", "caller_principal", "open_log"]

log = logging.getLogger("gristmill.annotate")

#: Principal of every caller on a server without API keys.
ANONYMOUS = "anonymous"
#: Events per WatchEvents / ExportLog message.
STREAM_EVENTS = 500
#: Seconds a watcher sleeps between checks that its caller is still there.
WATCH_POLL = 1.0


def caller_principal(context: grpc.ServicerContext, auth_enabled: bool) -> str:
    """``key:<key id>`` of the (already verified) API key, or ``anonymous`` without auth."""
    if not auth_enabled:
        return ANONYMOUS
    for name, value in context.invocation_metadata() or ():
        if name == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            parts = text.partition(" ")[2].strip().split("_", 2)
            if len(parts) == 3 and parts[0] == "gm":
                return f"key:{parts[1]}"
    return ANONYMOUS


def _json(text: str, field: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(field, f"not JSON: {e.msg} at line {e.lineno} column "
                              f"{e.colno}") from None


def _dataset(name: str) -> str:
    return validate_dataset_name(name, "dataset")


def _samples(refs: Iterable[annotate_pb2.SampleRef], field: str = "samples"
             ) -> list[dict[str, str]]:
    out = []
    for i, s in enumerate(refs):
        validate_path(s.path, f"{field}[{i}].path")
        if s.sha256:
            validate_sha256(s.sha256, f"{field}[{i}].sha256")
        out.append({"path": s.path, "sha256": s.sha256} if s.sha256 else {"path": s.path})
    return out


class AnnotateServicer(annotate_pb2_grpc.AnnotateServiceServicer):
    """gRPC front of the annotation logs."""

    def __init__(self, alog: AnnotationLog, auth_enabled: bool, max_query_samples: int) -> None:
        self.log = alog
        self.auth_enabled = auth_enabled
        self.max_query_samples = max_query_samples

    def _who(self, context: grpc.ServicerContext) -> str:
        return caller_principal(context, self.auth_enabled)

    def _one(self, dataset: str, type_: str, payload: object, event_id: str,
             context: grpc.ServicerContext) -> ChainEvent:
        events, _, _ = self.log.append(_dataset(dataset), [
            NewEvent(type_, canonical_json(payload), event_id)], self._who(context))
        return events[0]

    def _proposal(self, dataset: str, pid: str) -> annotate_pb2.Proposal:
        rows = self.log.query("SELECT * FROM proposals WHERE dataset=? AND id=?", (dataset, pid))
        return views.proposal_message(rows[0])

    # log ------------------------------------------------------------------
    def InitLog(self, request: annotate_pb2.InitLogRequest,
                context: grpc.ServicerContext) -> annotate_pb2.InitLogResponse:
        dataset = _dataset(request.dataset)
        who = self._who(context)
        self.log.append(dataset, [NewEvent("owner.add", canonical_json({"principal": who}),
                                           request.event_id)], who, create=True)
        return annotate_pb2.InitLogResponse(log=views.log_message(self.log, dataset))

    def GetLog(self, request: annotate_pb2.GetLogRequest,
               context: grpc.ServicerContext) -> annotate_pb2.GetLogResponse:
        return annotate_pb2.GetLogResponse(log=views.log_message(self.log,
                                                                 _dataset(request.dataset)),
                                           principal=self._who(context))

    def AppendEvents(self, request: annotate_pb2.AppendEventsRequest,
                     context: grpc.ServicerContext) -> annotate_pb2.AppendEventsResponse:
        specs = []
        for i, e in enumerate(request.events):
            type_ = views.TYPE_OF_ENUM.get(e.type)
            if type_ is None:
                raise InvalidArgument(f"events[{i}].type", "set an event type (EventType)")
            when = (views.timestamp_us(e.create_time, f"events[{i}].create_time")
                    if e.HasField("create_time") else None)
            specs.append(NewEvent(type_, e.payload_json, e.id, when, e.public_key,
                                  e.signature))
        expected = (Head(request.expected_head.seq, request.expected_head.hash)
                    if request.HasField("expected_head") else None)
        events, head, replayed = self.log.append(_dataset(request.dataset), specs,
                                                 self._who(context), expected)
        return annotate_pb2.AppendEventsResponse(
            events=[views.event_message(e) for e in events], head=views.head_message(head),
            replayed=replayed)

    # schemas --------------------------------------------------------------
    def CreateSchema(self, request: annotate_pb2.CreateSchemaRequest,
                     context: grpc.ServicerContext) -> annotate_pb2.CreateSchemaResponse:
        valid_name(request.name, "name", "schema")
        body = _json(request.schema_json, "schema_json")
        event = self._one(request.dataset, "schema.create",
                          {"name": request.name, "schema": body}, request.event_id, context)
        row = self.log.query("SELECT * FROM schemas WHERE dataset=? AND seq=?",
                             (request.dataset, event.seq))[0]
        return annotate_pb2.CreateSchemaResponse(schema=views.schema_message(row),
                                                 event=views.event_message(event))

    def DeprecateSchema(self, request: annotate_pb2.DeprecateSchemaRequest,
                        context: grpc.ServicerContext) -> annotate_pb2.DeprecateSchemaResponse:
        event = self._one(request.dataset, "schema.deprecate",
                          {"name": request.name, "version": request.version}, request.event_id,
                          context)
        return annotate_pb2.DeprecateSchemaResponse(event=views.event_message(event))

    def ListSchemas(self, request: annotate_pb2.ListSchemasRequest,
                    context: grpc.ServicerContext) -> annotate_pb2.ListSchemasResponse:
        dataset = _dataset(request.dataset)
        size = page_size(request.page_size, 100, 1000)
        query = ["schemas", dataset, request.name]
        after = decode_page_token(request.page_token, query)
        self.log.head(dataset)
        after_name, _, after_version = (after or "").partition("\x00")
        rows = self.log.query(
            "SELECT * FROM schemas WHERE dataset=? AND (?='' OR name=?) AND (name>? OR (name=? "
            "AND version>?)) ORDER BY name, version LIMIT ?",
            (dataset, request.name, request.name, after_name, after_name,
             int(after_version or 0), size + 1))
        token = (encode_page_token(query, f"{rows[size - 1]['name']}\x00"
                                          f"{rows[size - 1]['version']}")
                 if len(rows) > size else "")
        return annotate_pb2.ListSchemasResponse(
            schemas=[views.schema_message(r) for r in rows[:size]], next_page_token=token)

    # proposals and review -------------------------------------------------
    def Propose(self, request: annotate_pb2.ProposeRequest,
                context: grpc.ServicerContext) -> annotate_pb2.ProposeResponse:
        payload: dict[str, object]
        if request.delete:
            if not request.annotation_id:
                raise InvalidArgument("annotation_id", "name the annotation to delete")
            payload = {"annotation": valid_uuid(request.annotation_id, "annotation_id")}
            type_ = "annotation.delete"
        else:
            if not request.data_json:
                raise InvalidArgument("data_json", "give the annotation's data as JSON")
            payload = {"data": _json(request.data_json, "data_json")}
            if request.schema_version:
                payload["schema_version"] = request.schema_version
            if request.samples:
                payload["samples"] = _samples(request.samples)
            if request.annotation_id:
                payload["annotation"] = valid_uuid(request.annotation_id, "annotation_id")
                type_ = "annotation.update"
            else:
                if not request.samples:
                    raise InvalidArgument("samples", "a new annotation names at least one "
                                          "sample (its path in the dataset)")
                payload["schema"] = valid_name(request.schema, "schema", "schema")
                type_ = "annotation.create"
        event = self._one(request.dataset, type_, payload, request.event_id, context)
        return annotate_pb2.ProposeResponse(proposal=self._proposal(request.dataset, event.id),
                                            event=views.event_message(event))

    def Review(self, request: annotate_pb2.ReviewRequest,
               context: grpc.ServicerContext) -> annotate_pb2.ReviewResponse:
        if request.decision == annotate_pb2.DECISION_UNSPECIFIED:
            raise InvalidArgument("decision", "set DECISION_ACCEPT or DECISION_REJECT")
        pid = valid_uuid(request.proposal_id, "proposal_id")
        payload = {"proposal": pid}
        if request.reason:
            payload["reason"] = request.reason
        type_ = ("review.accept" if request.decision == annotate_pb2.DECISION_ACCEPT
                 else "review.reject")
        event = self._one(request.dataset, type_, payload, request.event_id, context)
        return annotate_pb2.ReviewResponse(proposal=self._proposal(request.dataset, pid),
                                           event=views.event_message(event))

    def _owners(self, dataset: str) -> list[str]:
        return [r[0] for r in self.log.query("SELECT principal FROM owners WHERE dataset=? "
                                             "ORDER BY principal", (dataset,))]

    def AddOwner(self, request: annotate_pb2.AddOwnerRequest,
                 context: grpc.ServicerContext) -> annotate_pb2.AddOwnerResponse:
        event = self._one(request.dataset, "owner.add", {"principal": request.principal},
                          request.event_id, context)
        return annotate_pb2.AddOwnerResponse(owners=self._owners(request.dataset),
                                             event=views.event_message(event))

    def RemoveOwner(self, request: annotate_pb2.RemoveOwnerRequest,
                    context: grpc.ServicerContext) -> annotate_pb2.RemoveOwnerResponse:
        event = self._one(request.dataset, "owner.remove", {"principal": request.principal},
                          request.event_id, context)
        return annotate_pb2.RemoveOwnerResponse(owners=self._owners(request.dataset),
                                                event=views.event_message(event))

    # queries --------------------------------------------------------------
    def GetAnnotations(self, request: annotate_pb2.GetAnnotationsRequest,
                       context: grpc.ServicerContext) -> annotate_pb2.GetAnnotationsResponse:
        dataset = _dataset(request.dataset)
        if len(request.samples) > self.max_query_samples:
            raise InvalidArgument("samples", f"{len(request.samples)} samples is over the "
                                  f"server's limit of {self.max_query_samples} per call "
                                  "(annotate.max_query_samples); ask in batches")
        wanted = [(s["path"], s.get("sha256", "")) for s in _samples(request.samples)]
        seq, found = views.annotations_at(self.log, dataset, wanted, request.release)
        return annotate_pb2.GetAnnotationsResponse(seq=seq, samples=[
            annotate_pb2.SampleAnnotations(path=path, annotations=[
                views.annotation_message(r) for r in rows])
            for (path, _), rows in zip(wanted, found, strict=True)])

    def ListProposals(self, request: annotate_pb2.ListProposalsRequest,
                      context: grpc.ServicerContext) -> annotate_pb2.ListProposalsResponse:
        dataset = _dataset(request.dataset)
        size = page_size(request.page_size, 100, 1000)
        status = views.STATUS_NAME.get(request.status, "")
        if request.schema:
            valid_name(request.schema, "schema", "schema")
        if request.path:
            validate_path(request.path, "path", strict=False)
        annotation = (valid_uuid(request.annotation_id, "annotation_id")
                      if request.annotation_id else "")
        query = ["proposals", dataset, status, request.schema, request.path, annotation]
        after = int(decode_page_token(request.page_token, query) or 0)
        rows = views.proposals(self.log, dataset, status, request.schema, request.path,
                               annotation, after, size + 1)
        token = encode_page_token(query, str(rows[size - 1]["seq"])) if len(rows) > size else ""
        return annotate_pb2.ListProposalsResponse(
            proposals=[views.proposal_message(r) for r in rows[:size]], next_page_token=token)

    def GetAnnotationHistory(self, request: annotate_pb2.GetAnnotationHistoryRequest,
                             context: grpc.ServicerContext
                             ) -> annotate_pb2.GetAnnotationHistoryResponse:
        events = views.history(self.log, _dataset(request.dataset),
                               valid_uuid(request.annotation_id, "annotation_id"))
        return annotate_pb2.GetAnnotationHistoryResponse(
            events=[views.event_message(e) for e in events])

    def ListEvents(self, request: annotate_pb2.ListEventsRequest,
                   context: grpc.ServicerContext) -> annotate_pb2.ListEventsResponse:
        dataset = _dataset(request.dataset)
        size = page_size(request.page_size, 1000, 10_000)
        if request.after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        query = ["events", dataset, request.after_seq]
        after = int(decode_page_token(request.page_token, query) or request.after_seq)
        events = self.log.events(dataset, after, size + 1)
        token = encode_page_token(query, str(events[size - 1].seq)) if len(events) > size else ""
        return annotate_pb2.ListEventsResponse(
            events=[views.event_message(e) for e in events[:size]], next_page_token=token)

    def WatchEvents(self, request: annotate_pb2.WatchEventsRequest,
                    context: grpc.ServicerContext) -> Iterator[annotate_pb2.WatchEventsResponse]:
        dataset = _dataset(request.dataset)
        if request.after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        after = request.after_seq
        self.log.head(dataset)
        metrics.WATCH_STREAMS.inc()
        try:
            while context.is_active() and not self.log.closed:
                events = self.log.events(dataset, after, STREAM_EVENTS)
                if events:
                    yield annotate_pb2.WatchEventsResponse(
                        events=[views.event_message(e) for e in events])
                    after = events[-1].seq
                    continue
                self.log.wait_for(dataset, after, WATCH_POLL)
        finally:
            metrics.WATCH_STREAMS.dec()

    # integrity ------------------------------------------------------------
    def Verify(self, request: annotate_pb2.VerifyRequest,
               context: grpc.ServicerContext) -> annotate_pb2.VerifyResponse:
        report = self.log.verify(_dataset(request.dataset))
        resp = annotate_pb2.VerifyResponse(
            ok=report.ok, events_checked=report.events, signatures_checked=report.signatures,
            head=annotate_pb2.ChainHead(seq=report.head_seq, hash=report.head_hash))
        if report.first_bad is not None:
            bad = report.first_bad
            resp.first_bad.CopyFrom(annotate_pb2.BadEvent(seq=bad.seq, id=bad.id,
                                                          problem=bad.problem))
            log.error("annotation log %s does not verify: %s", request.dataset, bad)
        return resp

    def RebuildState(self, request: annotate_pb2.RebuildStateRequest,
                     context: grpc.ServicerContext) -> annotate_pb2.RebuildStateResponse:
        result = self.log.rebuild(_dataset(request.dataset))
        if not result.equal:
            log.error("annotation log %s: the live state differs from the replayed log: %s",
                      request.dataset, "; ".join(result.differences[:3]))
        return annotate_pb2.RebuildStateResponse(
            equal=result.equal, events_replayed=result.events, differences=result.differences,
            seconds=result.seconds)

    # releases -------------------------------------------------------------
    def CreateRelease(self, request: annotate_pb2.CreateReleaseRequest,
                      context: grpc.ServicerContext) -> annotate_pb2.CreateReleaseResponse:
        payload = {"name": valid_name(request.name, "name", "release")}
        if request.dataset_version:
            payload["dataset_version"] = request.dataset_version
        event = self._one(request.dataset, "release.create", payload, request.event_id, context)
        row = views.release_row(self.log, request.dataset, request.name)
        return annotate_pb2.CreateReleaseResponse(release=views.release_message(self.log, row),
                                                  event=views.event_message(event))

    def ListReleases(self, request: annotate_pb2.ListReleasesRequest,
                     context: grpc.ServicerContext) -> annotate_pb2.ListReleasesResponse:
        dataset = _dataset(request.dataset)
        size = page_size(request.page_size, 100, 1000)
        query = ["releases", dataset]
        after = int(decode_page_token(request.page_token, query) or 0)
        self.log.head(dataset)
        rows = self.log.query("SELECT * FROM releases WHERE dataset=? AND release_seq>? ORDER "
                              "BY release_seq LIMIT ?", (dataset, after, size + 1))
        token = (encode_page_token(query, str(rows[size - 1]["release_seq"]))
                 if len(rows) > size else "")
        return annotate_pb2.ListReleasesResponse(
            releases=[views.release_message(self.log, r) for r in rows[:size]],
            next_page_token=token)

    def ExportRelease(self, request: annotate_pb2.ExportReleaseRequest,
                      context: grpc.ServicerContext
                      ) -> Iterator[annotate_pb2.ExportReleaseResponse]:
        row, chunks = views.export_release(self.log, _dataset(request.dataset), request.release)
        first = True
        for chunk in chunks:
            resp = annotate_pb2.ExportReleaseResponse(data=chunk)
            if first:
                resp.release.CopyFrom(views.release_message(self.log, row))
                first = False
            yield resp

    def ExportLog(self, request: annotate_pb2.ExportLogRequest,
                  context: grpc.ServicerContext) -> Iterator[annotate_pb2.ExportLogResponse]:
        dataset = _dataset(request.dataset)
        end = self.log.head(dataset).seq  # the log as it is now: a consistent prefix
        after = 0
        while after < end:
            events = self.log.events(dataset, after, min(STREAM_EVENTS, end - after))
            if not events:
                break
            yield annotate_pb2.ExportLogResponse(events=[views.event_message(e) for e in events])
            after = events[-1].seq

    def ImportLog(self, request_iterator: Iterator[annotate_pb2.ImportLogRequest],
                  context: grpc.ServicerContext) -> annotate_pb2.ImportLogResponse:
        dataset = ""
        events: list[ChainEvent] = []
        for message in request_iterator:
            if not dataset:
                dataset = _dataset(message.dataset)
            events += [views.event_of_message(e) for e in message.events]
        if not dataset:
            raise InvalidArgument("dataset", "name the dataset of the new log in the first "
                                  "message")
        start = time.perf_counter()
        head = self.log.import_events(dataset, events)
        log.info("imported an annotation log", extra={"dataset": dataset, "events": len(events),
                                                      "seconds": time.perf_counter() - start})
        return annotate_pb2.ImportLogResponse(head=views.head_message(head),
                                              events_imported=len(events))


def open_log(ctx: ServiceContext) -> AnnotationLog:
    """The annotation logs of a server config: ``<data_dir>/annotate/annotate.sqlite``."""
    cfg = ctx.config
    return AnnotationLog(cfg.data_dir / "annotate",
                         max_batch_events=AnnotateConfig.of(cfg).max_batch_events,
                         max_payload_bytes=AnnotateConfig.of(cfg).max_payload_bytes,
                         max_clock_skew_seconds=AnnotateConfig.of(cfg).max_clock_skew_seconds)


def _build(ctx: ServiceContext, server: grpc.Server) -> None:
    alog = open_log(ctx)
    ctx.local["annotate"] = alog
    ctx.resources.append(alog)
    annotate_pb2_grpc.add_AnnotateServiceServicer_to_server(
        AnnotateServicer(alog, ctx.config.auth.enabled,
                         AnnotateConfig.of(ctx.config).max_query_samples),
        server)


SERVICE = ServiceSpec(
    name="annotate",
    full_name="gristmill.v1.AnnotateService",
    build=_build,
    roles={
        "InitLog": Role.WRITER,
        "GetLog": Role.READER,
        "AppendEvents": Role.WRITER,
        "CreateSchema": Role.WRITER,
        "DeprecateSchema": Role.WRITER,
        "ListSchemas": Role.READER,
        "Propose": Role.WRITER,
        "Review": Role.WRITER,
        "AddOwner": Role.WRITER,
        "RemoveOwner": Role.WRITER,
        "GetAnnotations": Role.READER,
        "ListProposals": Role.READER,
        "GetAnnotationHistory": Role.READER,
        "ListEvents": Role.READER,
        "WatchEvents": Role.READER,
        "Verify": Role.READER,
        "RebuildState": Role.READER,
        "CreateRelease": Role.WRITER,
        "ListReleases": Role.READER,
        "ExportRelease": Role.READER,
        "ExportLog": Role.READER,
        "ImportLog": Role.ADMIN,
    },
)
