"""Annotations in the training stream: a release pinned at planning, one lookup per batch.

A spec that names an annotation release (``PlanSpec.release``) is resolved
once, at planning, to the release's log position (sequence number and head
hash), which the resolved spec carries; every rank and every resumed stream
is checked against it. Each batch then asks for the accepted annotations of
all its samples in one call (never one per sample) and sends each sample's
as a canonical JSON array of ``{"annotation", "data", "schema",
"schema_version"}`` objects, ordered by annotation id.

Three sources answer: the annotate service of this process (the all-in-one
server), a remote one (``ingest.annotate_address``), and a release export
file (``Loader.from_folder(..., annotations=FILE)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gristmill.client.annolog import canonical_json
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.errors import (
    FailedPrecondition,
    GristmillError,
    InvalidArgument,
    NotFound,
    Unavailable,
    call_rpc,
)
from gristmill.v1 import annotate_pb2, annotate_pb2_grpc, ingest_pb2

__all__ = [
    "EMPTY",
    "ExportLabels",
    "LabelSource",
    "LocalLabels",
    "ReleasePin",
    "RemoteLabels",
    "StreamLabels",
    "label_json",
    "pin_spec",
]

#: The annotations of a sample that has none.
EMPTY = "[]"
#: The header's format in a release export (``gristmill annotate export``).
RELEASE_FORMAT = "gristmill-annotate-release/1"
#: Why a stream has no annotation source.
NO_ANNOTATE = "ANNOTATE_UNAVAILABLE"


@dataclass(frozen=True)
class ReleasePin:
    """A release resolved to its log position."""

    name: str
    seq: int
    head_hash: str
    dataset_version: str = ""


def label_json(annotation: str, schema: str, schema_version: int, data_json: str) -> str:
    """One delivered annotation as canonical JSON (``data_json`` is canonical already).

    Written by hand with the keys in sorted order, so the stored data is not
    parsed and printed again for every sample of every batch.
    """
    return (f'{{"annotation":{json.dumps(annotation, ensure_ascii=False)},"data":{data_json},'
            f'"schema":{json.dumps(schema, ensure_ascii=False)},'
            f'"schema_version":{int(schema_version)}}}')


def _array(items: Sequence[str]) -> str:
    return "[" + ",".join(items) + "]" if items else EMPTY


class LabelSource(Protocol):
    """Where a stream's annotations come from."""

    def pin(self, dataset: str, release: str) -> ReleasePin:
        """The release's log position; NotFound (naming the release and the fix) if none."""

    def labels(self, dataset: str, pin: ReleasePin, samples: Sequence[tuple[str, str]]
               ) -> list[str]:
        """Each (path, sha256)'s accepted annotations at ``pin``, as JSON arrays, in order.

        An empty sha256 matches annotations of the path whatever content they
        are pinned to; a sha256 matches those pinned to it or to none.
        """


def _moved(dataset: str, pin: ReleasePin, seq: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"annotation release {pin.name!r} of dataset {dataset!r} now answers at log position "
        f"{seq}, but the plan pinned it at {pin.seq} (the log was replaced since); plan again "
        "(a new Loader) to read the release as it is now", reason="RELEASE_CHANGED")


class LocalLabels:
    """The annotate service of this process (``ctx.local["annotate"]``), queried directly."""

    def __init__(self, log: Any) -> None:
        self.log = log
        # the annotate package is installed when its service runs in this process
        from gristmill.annotate import views

        self._views = views

    def pin(self, dataset: str, release: str) -> ReleasePin:
        """See :class:`LabelSource`."""
        row = self._views.release_row(self.log, dataset, release)
        return ReleasePin(release, int(row["seq"]), str(row["head_hash"]),
                          str(row["dataset_version"] or ""))

    def labels(self, dataset: str, pin: ReleasePin, samples: Sequence[tuple[str, str]]
               ) -> list[str]:
        """See :class:`LabelSource`."""
        seq, found = self._views.annotations_at(self.log, dataset, samples, pin.name)
        if seq != pin.seq:
            raise _moved(dataset, pin, seq)
        return [_array([label_json(r["id"], r["schema"], r["schema_version"], r["data"])
                        for r in rows]) for rows in found]


class RemoteLabels:
    """An annotate service reached over gRPC (``ingest.annotate_address``)."""

    def __init__(self, options: ConnectionOptions) -> None:
        self.address = options.address
        self._channel = open_channel(options)
        self._stub = annotate_pb2_grpc.AnnotateServiceStub(self._channel)

    def _call(self, method: Callable[[Any], Any], request: Any) -> Any:
        try:
            return call_rpc(method, request)
        except Unavailable as e:
            raise Unavailable(f"the annotate service at {self.address} is unavailable "
                              f"({e.message}); start it, or check ingest.annotate_address",
                              reason=NO_ANNOTATE) from None

    def pin(self, dataset: str, release: str) -> ReleasePin:
        """See :class:`LabelSource`: pages through the log's releases."""
        request = annotate_pb2.ListReleasesRequest(dataset=dataset, page_size=1000)
        while True:
            page: annotate_pb2.ListReleasesResponse = self._call(self._stub.ListReleases,
                                                                 request)
            for r in page.releases:
                if r.name == release:
                    return ReleasePin(r.name, r.seq, r.head_hash, r.dataset_version)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        raise NotFound(f"no release {release!r} in the {dataset} log; see `gristmill annotate "
                       f"releases {dataset}` or create it with `gristmill annotate release "
                       f"{dataset} {release}`", reason="RELEASE_NOT_FOUND")

    def labels(self, dataset: str, pin: ReleasePin, samples: Sequence[tuple[str, str]]
               ) -> list[str]:
        """See :class:`LabelSource`: one GetAnnotations call."""
        reply: annotate_pb2.GetAnnotationsResponse = self._call(
            self._stub.GetAnnotations, annotate_pb2.GetAnnotationsRequest(
                dataset=dataset, release=pin.name,
                samples=[annotate_pb2.SampleRef(path=p, sha256=s) for p, s in samples]))
        if reply.seq != pin.seq:
            raise _moved(dataset, pin, reply.seq)
        return [_array([label_json(a.id, a.schema, a.schema_version, a.data_json)
                        for a in s.annotations]) for s in reply.samples]

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


@dataclass(frozen=True)
class _Target:
    annotation: str
    sha256: str
    text: str


class ExportLabels:
    """A release export file (``gristmill annotate export``), read into memory.

    Serves what GetAnnotations at that release would, without a server. An
    annotation pinned to a content sha256 is matched against the file's own
    bytes (read through ``content``, once per such file).
    """

    def __init__(self, path: Path | str, content: Callable[[str], bytes] | None = None
                 ) -> None:
        self.path = Path(path)
        self.content = content
        self._by_path: dict[str, list[_Target]] = {}
        self._sha: dict[str, str] = {}
        try:
            lines = self.path.read_bytes().splitlines()
        except OSError as e:
            raise NotFound(f"cannot read the annotation release {self.path}: {e.strerror}; "
                           "give a file written by `gristmill annotate export DATASET "
                           "--release NAME --out FILE`", reason="RELEASE_FILE") from None
        if not lines:
            raise self._bad(1, "the file is empty")
        header = self._parse(lines[0], 1)
        if header.get("format") != RELEASE_FORMAT:
            raise self._bad(1, f"the header's format is {header.get('format')!r}, not "
                            f"{RELEASE_FORMAT!r}")
        try:
            self.release = ReleasePin(str(header["release"]), int(header["seq"]),
                                      str(header["head_hash"]),
                                      str(header.get("dataset_version") or ""))
            self.dataset = str(header["dataset"])
            for n, line in enumerate(lines[1:], start=2):
                item = self._parse(line, n)
                text = label_json(str(item["annotation"]), str(item["schema"]),
                                  int(item["schema_version"]), canonical_json(item["data"]))
                for s in item["samples"]:
                    self._by_path.setdefault(str(s["path"]), []).append(
                        _Target(str(item["annotation"]), str(s.get("sha256", "")), text))
        except (KeyError, TypeError, ValueError) as e:
            raise self._bad(0, f"a field is missing or has the wrong type ({e})") from None
        for targets in self._by_path.values():
            targets.sort(key=lambda t: t.annotation)

    def _bad(self, line: int, why: str) -> InvalidArgument:
        where = f"{self.path}, line {line}" if line else str(self.path)
        return InvalidArgument("annotations", f"{where} is not a release export: {why}; give "
                               "a file written by `gristmill annotate export DATASET --release "
                               "NAME --out FILE`", reason="BAD_RELEASE_FILE")

    def _parse(self, line: bytes, n: int) -> dict[str, Any]:
        try:
            value = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._bad(n, f"not JSON ({e})") from None
        if not isinstance(value, dict):
            raise self._bad(n, "not a JSON object")
        return value

    def pin(self, dataset: str, release: str) -> ReleasePin:
        """See :class:`LabelSource`: the file's release, whatever the dataset is called."""
        if release != self.release.name:
            raise NotFound(f"{self.path} holds release {self.release.name!r}, not {release!r}; "
                           "export the release you want with `gristmill annotate export`",
                           reason="RELEASE_NOT_FOUND")
        return self.release

    def _content_sha(self, path: str) -> str:
        sha = self._sha.get(path)
        if sha is None:
            try:
                sha = hashlib.sha256(self.content(path)).hexdigest() if self.content else ""
            except (OSError, GristmillError):
                sha = ""  # unreadable: the decoder reports the sample's error
            self._sha[path] = sha
        return sha

    def labels(self, dataset: str, pin: ReleasePin, samples: Sequence[tuple[str, str]]
               ) -> list[str]:
        """See :class:`LabelSource`."""
        out = []
        for path, sha in samples:
            targets = self._by_path.get(path, ())
            if any(t.sha256 for t in targets):
                sha = sha or self._content_sha(path)
            out.append(_array([t.text for t in targets
                               if not sha or not t.sha256 or t.sha256 == sha]))
        return out


class StreamLabels:
    """The lookup of one stream: sample indices of a batch to their annotations.

    ``hashes`` holds each sample's content sha256 (32 bytes per sample, in
    sample order; zeros when unknown).
    """

    def __init__(self, source: LabelSource, dataset: str, pin: ReleasePin,
                 ids: Sequence[str], hashes: bytes | None) -> None:
        self.source, self.dataset, self.pin = source, dataset, pin
        self.ids, self.hashes = ids, hashes

    def _sha(self, i: int) -> str:
        if not self.hashes:
            return ""
        digest = self.hashes[32 * i:32 * i + 32]
        return digest.hex() if any(digest) else ""

    def __call__(self, indices: Sequence[int]) -> list[str]:
        """The annotations of these samples, in order: one call to the source."""
        return self.source.labels(self.dataset, self.pin,
                                  [(self.ids[i], self._sha(i)) for i in indices])


def pin_spec(source: LabelSource | None, spec: ingest_pb2.PlanSpec) -> ReleasePin:
    """Resolve a spec's release, checked against the position it carries, if any.

    Raises:
        FailedPrecondition: no annotate service, or the release moved.
        NotFound: no such release (or no log).
    """
    if source is None:
        raise FailedPrecondition(
            f"spec.release {spec.release!r}: this ingest service has no annotate service to "
            "read annotations from; run the annotate service in the same server, or set "
            "ingest.annotate_address", reason=NO_ANNOTATE)
    try:
        pin = source.pin(spec.dataset, spec.release)
    except NotFound as e:
        if spec.release in e.message:
            raise
        raise NotFound(f"no annotation release {spec.release!r}: {e.message}",
                       reason=e.reason, metadata=e.metadata) from None
    if spec.release_seq or spec.release_head_hash:
        if (spec.release_seq, spec.release_head_hash) != (pin.seq, pin.head_hash):
            raise FailedPrecondition(
                f"annotation release {spec.release!r} of dataset {spec.dataset!r} is at log "
                f"position {pin.seq} ({pin.head_hash[:12]}), but this plan pinned it at "
                f"{spec.release_seq} ({spec.release_head_hash[:12]}); the log was replaced "
                "since: plan again to read the release as it is now",
                reason="RELEASE_CHANGED")
    return pin
