"""Where ingest gets manifests, bytes and pixels: in-process services or remote ones."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import grpc
import numpy as np
import numpy.typing as npt

from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.decoding import to_array
from gristmill.client.errors import FailedPrecondition, GristmillError, from_rpc_error
from gristmill.client.hub import LATEST, Hub
from gristmill.decode.errors import DecodeError
from gristmill.decode.limits import MESSAGE_FRAMING, sample_bytes
from gristmill.decode.pipeline import DecodedSample
from gristmill.decode.pool import Decoder
from gristmill.decode.service import result_message
from gristmill.decode.sources import FileSource, HubFiles, remote_store, resolve_samples
from gristmill.decode.transform import transform_from_proto
from gristmill.ingest.samples import PlanRow
from gristmill.v1 import decode_pb2, decode_pb2_grpc, store_pb2

__all__ = [
    "DecodeBackend",
    "Decoded",
    "LocalDecode",
    "LocalStore",
    "PlanRowSource",
    "RemoteDecode",
    "RemoteStoreAccess",
    "StoreAccess",
    "Waiter",
    "no_committed_version",
]

#: Encoded bytes per Decode request (well under the 64 MiB message limit).
REQUEST_BYTES = 16 * 1024 * 1024
Plane = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Decoded:
    """One sample's decode outcome as the feed sends it: an error, or raw pixel planes.

    Planes are C-contiguous ``[H, W, C]`` uint8 arrays: local results are the
    decoder's own arrays, remote ones views of the response bytes, so the
    feed copies pixels once, into the message or the ring.
    """

    error: decode_pb2.SampleError | None
    image: Plane | None = None
    companions: tuple[Plane, ...] = ()
    #: The source's (width, height, channels); zeros for an error.
    source: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def local(cls, sample_id: str, result: DecodedSample | DecodeError) -> Decoded:
        """From the decoder of this process."""
        if isinstance(result, DecodeError):
            return cls(result_message(sample_id, result).error)
        return cls(None, result.image.pixels, tuple(c.pixels for c in result.companions),
                   (*result.source_size, result.source_channels))

    @classmethod
    def remote(cls, result: decode_pb2.DecodeResult) -> Decoded:
        """From a decode service's result (raw encoding)."""
        if result.HasField("error"):
            return cls(result.error)
        s = result.sample
        return cls(None, to_array(s.image), tuple(to_array(c) for c in s.companions),
                   (s.source_width, s.source_height, s.source_channels))


#: Blocks until a batch's results are ready, then returns them in order.
Waiter = Callable[[], list[Decoded]]


def no_committed_version(dataset: str) -> FailedPrecondition:
    """The error for training on a dataset that was never committed."""
    return FailedPrecondition(
        f"dataset {dataset!r} has no committed version; training reads a pinned version so "
        f"that every rank sees the same files: run `gristmill dataset commit {dataset}`",
        reason="NO_COMMITTED_VERSION")


class StoreAccess(FileSource, Protocol):
    """Manifests and bytes of dataset versions."""

    def resolve_version(self, dataset: str, version: str) -> str:
        """A committed version id; "latest" is the newest committed version."""

    def manifest(self, dataset: str, version: str) -> Sequence[store_pb2.FileEntry]:
        """Every entry of a committed version, sorted by path."""


@runtime_checkable
class PlanRowSource(Protocol):
    """A store that reads the planning columns of a version straight from its catalog."""

    def plan_rows(self, dataset: str, version: str, prefix: str, *, images_only: bool
                  ) -> list[PlanRow]:
        """(path, is image, width, height, size) sorted by path.

        With ``images_only``, only the image files under ``prefix``.
        """


class LocalStore:
    """The store service of this process, called directly."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def resolve_version(self, dataset: str, version: str) -> str:
        """See :class:`StoreAccess`."""
        resolved: str = self.store.resolve(dataset, version)
        if resolved != LATEST:
            return resolved
        rows = self.store.list_versions(dataset, None, 1)
        if not rows:
            raise no_committed_version(dataset)
        return str(rows[0].id)

    def manifest(self, dataset: str, version: str) -> Sequence[store_pb2.FileEntry]:
        """See :class:`StoreAccess`."""
        return self.store.list_manifest(dataset, version, None, -1)[1]  # type: ignore[no-any-return]

    def plan_rows(self, dataset: str, version: str, prefix: str, *, images_only: bool
                  ) -> list[PlanRow]:
        """See :class:`PlanRowSource`."""
        return self.store.plan_rows(dataset, version, prefix,  # type: ignore[no-any-return]
                                    images_only=images_only)

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """See :class:`~gristmill.decode.sources.ByteSource`."""
        return self.store.read_bytes(dataset, version, paths)  # type: ignore[no-any-return]


class RemoteStoreAccess:
    """A store service reached over gRPC."""

    def __init__(self, options: ConnectionOptions) -> None:
        assert options.address is not None
        self.hub: Hub = remote_store(options.address, options.api_key, options.ca_file)

    def resolve_version(self, dataset: str, version: str) -> str:
        """See :class:`StoreAccess`."""
        if version not in ("", LATEST):
            return self.hub.get_manifest(dataset, version).version
        versions = self.hub.list_versions(dataset)
        if not versions:
            raise no_committed_version(dataset)
        return versions[0].id

    def manifest(self, dataset: str, version: str) -> Sequence[store_pb2.FileEntry]:
        """See :class:`StoreAccess`."""
        return list(self.hub.get_manifest(dataset, version).files)

    def read_bytes(self, dataset: str, version: str, paths: list[str]
                   ) -> dict[str, bytes | GristmillError]:
        """See :class:`FileSource`."""
        return HubFiles(self.hub).read_bytes(dataset, version, paths)

    def close(self) -> None:
        """Close the channel."""
        self.hub.close()


class DecodeBackend(Protocol):
    """Decodes batches for one stream; results come back as :class:`Decoded`."""

    def submit(self, samples: Sequence[decode_pb2.DecodeSample],
               transform: decode_pb2.Transform) -> Waiter:
        """Queue one batch (store references allowed); wait with the returned callable."""

    def close(self) -> None:
        """End the stream; pending work is dropped."""


@dataclass
class LocalDecode:
    """The decode pool of this process; store references are read from ``source``."""

    decoder: Decoder
    source: FileSource | None

    def submit(self, samples: Sequence[decode_pb2.DecodeSample],
               transform: decode_pb2.Transform) -> Waiter:
        """See :class:`DecodeBackend`."""
        t = transform_from_proto(transform)
        inputs = resolve_samples(self.source, samples)
        futures: list[Future[Any] | DecodeError] = [
            s if isinstance(s, DecodeError) else self.decoder.submit(s, t) for s in inputs]

        def wait() -> list[Decoded]:
            return [Decoded.local(s.id, f if isinstance(f, DecodeError) else f.result())
                    for s, f in zip(samples, futures, strict=True)]
        return wait

    def close(self) -> None:
        """Nothing to close: the pool belongs to the decode service."""


class RemoteDecode:
    """One Decode stream to a remote decode service, kept open for a feed.

    Store references are resolved here (from ``source``) and sent as bytes, so
    the decode service needs no store of its own. A request carries at most
    REQUEST_BYTES of encoded bytes, and at most as many samples as their raw
    output fits one response of ``max_message_bytes``.
    """

    def __init__(self, stub: decode_pb2_grpc.DecodeServiceStub, source: FileSource,
                 max_message_bytes: int = 64 * 1024 * 1024) -> None:
        self.source = source
        self.response_bytes = max_message_bytes - MESSAGE_FRAMING
        self._requests: queue.Queue[decode_pb2.DecodeRequest | None] = queue.Queue()
        self._pending: queue.Queue[Future[decode_pb2.DecodeResponse]] = queue.Queue()
        self._call = stub.Decode(iter(self._requests.get, None))
        self._reader = threading.Thread(target=self._read, name="ingest-decode", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                self._pending.get().set_result(response)
        except grpc.RpcError as e:
            error: BaseException = from_rpc_error(e)
        else:
            error = GristmillError("the decode service ended the stream early")
        while True:  # fail whatever is still waiting
            try:
                self._pending.get_nowait().set_exception(error)
            except queue.Empty:
                return

    def submit(self, samples: Sequence[decode_pb2.DecodeSample],
               transform: decode_pb2.Transform) -> Waiter:
        """See :class:`DecodeBackend`."""
        inputs = resolve_samples(self.source, samples)
        t = transform_from_proto(transform)
        futures: list[Future[decode_pb2.DecodeResponse]] = []
        request, size, out = decode_pb2.DecodeRequest(transform=transform), 0, 0
        for s in inputs:
            if isinstance(s, DecodeError):
                continue  # failed reads are not sent
            n = len(s.image) + sum(len(c) for c in s.companions)
            pixels = sample_bytes(t, len(s.companions))
            if request.samples and (size + n > REQUEST_BYTES or
                                    out + pixels > self.response_bytes):
                futures.append(self._send(request))
                request, size, out = decode_pb2.DecodeRequest(), 0, 0
            request.samples.add(id=s.id, seed=s.seed, image=decode_pb2.ImageSource(data=s.image),
                                companions=[decode_pb2.ImageSource(data=c)
                                            for c in s.companions])
            size += n
            out += pixels
        if request.samples:
            futures.append(self._send(request))

        def wait() -> list[Decoded]:
            decoded = (r for f in futures for r in f.result().results)
            return [Decoded.local(samples[i].id, s) if isinstance(s, DecodeError)
                    else Decoded.remote(next(decoded)) for i, s in enumerate(inputs)]
        return wait

    def _send(self, request: decode_pb2.DecodeRequest) -> Future[decode_pb2.DecodeResponse]:
        future: Future[decode_pb2.DecodeResponse] = Future()
        self._pending.put(future)
        self._requests.put(request)
        return future

    def close(self) -> None:
        """End the request stream and cancel the call."""
        self._requests.put(None)
        self._call.cancel()


def decode_stub(options: ConnectionOptions) -> tuple[grpc.Channel,
                                                     decode_pb2_grpc.DecodeServiceStub]:
    """A channel and stub for a remote decode service."""
    channel = open_channel(options)
    return channel, decode_pb2_grpc.DecodeServiceStub(channel)
