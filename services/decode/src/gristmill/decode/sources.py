"""Encoded bytes for samples that name a store file instead of carrying bytes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from gristmill.client.errors import (
    GristmillError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_item_error,
)
from gristmill.client.hub import Hub
from gristmill.decode import metrics as decode_metrics
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.pool import SampleInput
from gristmill.v1 import decode_pb2, store_pb2

__all__ = ["FileSource", "HubFiles", "assemble", "read_refs", "remote_store", "resolve_samples"]

#: Paths per ReadFiles call (the store's own limit is larger).
PATHS_PER_CALL = 1000


class FileSource(Protocol):
    """Something that reads store files: the in-process Store or a remote one."""

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """Each of ``paths`` of a dataset version whole, or its error.

        Raises:
            Unavailable: the store cannot be reached (retry the whole call).
        """


@dataclass
class HubFiles:
    """Files of a store service reached through a :class:`Hub` (ReadFiles, joined)."""

    hub: Hub

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """See :class:`FileSource`."""
        return assemble(self.hub.read_files(dataset, version, paths))


def remote_store(address: str, api_key: str | None, ca_file: Path | None) -> Hub:
    """A store service reached over gRPC, for services deployed apart from it."""
    return Hub(address, api_key, cache_dir=None, ca_file=ca_file, show_progress=False)


def assemble(responses: Iterable[store_pb2.ReadFilesResponse]
             ) -> dict[str, bytes | GristmillError]:
    """Join the pieces of each file; a per-file error replaces its bytes."""
    parts: dict[str, list[bytes]] = {}
    out: dict[str, bytes | GristmillError] = {}
    for resp in responses:
        for piece in resp.files:
            if piece.HasField("error"):
                err = piece.error
                out[piece.path] = from_item_error(err.code, err.reason, err.message)
                continue
            parts.setdefault(piece.path, []).append(piece.data)
            if piece.eof:
                out[piece.path] = b"".join(parts.pop(piece.path))
    return out


def read_refs(source: FileSource | None, refs: list[decode_pb2.StoreRef]
              ) -> list[bytes | GristmillError]:
    """The bytes (or the error) of each reference, in order; few calls per batch."""
    groups: dict[tuple[str, str], list[str]] = {}
    for ref in refs:
        groups.setdefault((ref.dataset, ref.version), []).append(ref.path)
    found: dict[tuple[str, str, str], bytes | GristmillError] = {}
    for (dataset, version), paths in groups.items():
        unique = list(dict.fromkeys(paths))
        for i in range(0, len(unique), PATHS_PER_CALL):
            chunk = unique[i:i + PATHS_PER_CALL]
            try:
                if source is None:
                    raise GristmillError("this server has no store to read references from; "
                                         "send the bytes inline or set decode.store_address")
                got = source.read_bytes(dataset, version, chunk)
            except (Unavailable, ResourceExhausted, Unauthenticated, PermissionDenied):
                # the store is down, at its stream limit, or refuses this server's key:
                # fail the call (the client retries or reports it) rather than
                # turning every sample of the batch into an error and dropping it
                raise
            except GristmillError as e:
                got = dict.fromkeys(chunk, e)
            for p in chunk:
                data = got.get(p)
                found[(dataset, version, p)] = data if data is not None else GristmillError(
                    f"the store sent no data for {p!r}")
    return [found[(r.dataset, r.version, r.path)] for r in refs]


def resolve_samples(source: FileSource | None, samples: Sequence[decode_pb2.DecodeSample]
                    ) -> list[SampleInput | DecodeError]:
    """Inputs of validated samples, store references read in few calls.

    A reference that cannot be read fails its sample (SOURCE_UNAVAILABLE),
    never the batch.
    """
    refs = [src.ref for s in samples for src in (s.image, *s.companions)
            if src.WhichOneof("source") == "ref"]
    fetched = iter(read_refs(source, refs)) if refs else iter(())
    out: list[SampleInput | DecodeError] = []
    for s in samples:
        datas: list[bytes] = []
        failed: DecodeError | None = None
        for j, src in enumerate([s.image, *s.companions]):
            if src.WhichOneof("source") == "data":
                datas.append(src.data)
                continue
            got = next(fetched)
            if isinstance(got, GristmillError) and failed is None:
                failed = DecodeError(Reason.SOURCE_UNAVAILABLE,
                                     f"{src.ref.dataset}:{src.ref.path}: {got.message}", j - 1)
            datas.append(got if isinstance(got, bytes) else b"")
        if failed is not None:
            decode_metrics.DECODE_ERRORS.labels(failed.reason.value).inc()
            out.append(failed)
        else:
            out.append(SampleInput(datas[0], tuple(datas[1:]), s.seed, s.id))
    return out
