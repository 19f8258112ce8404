"""The training-loop side of the feed: ``for batch in Loader(...)``.

A :class:`Loader` asks the ingest service for its rank's plan, streams the
rank's batches on a background thread (a few batches ahead), and assembles
each batch's messages into one ``[B, H, W, C]`` uint8 array. When the
server runs on the same host, pixels come through a shared-memory ring
(:mod:`gristmill.client.shm`) and only their place in it crosses gRPC. A dropped
connection or a restarted server is retried with backoff, resuming from the
cursor of the first batch not yet received: no sample is lost or repeated.
A Loader that never reached its server (a wrong address, no server started)
fails within seconds instead, with ``no gristmill server at ADDR``.
``state_dict()`` / ``load_state_dict()`` resume a training run mid-epoch.
With ``annotations="RELEASE"`` each batch also carries its samples' accepted
annotations at that release of the dataset's annotation log
(``batch.annotations``); the plan pins the release, so every rank and every
resumed stream gets the same labels.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from gristmill.client.channel import DEFAULT_MAX_MESSAGE_BYTES, ConnectionOptions, open_channel
from gristmill.client.decoding import to_array
from gristmill.client.delivery import DeliveryLog
from gristmill.client.errors import (
    NO_SERVER,
    FailedPrecondition,
    GristmillError,
    Internal,
    Unavailable,
    call_rpc,
    stream_rpc,
)
from gristmill.client.handoff import put_unless_stopped
from gristmill.client.planner import Cursor, Policy
from gristmill.client.shm import RING_UNAVAILABLE, RingReader
from gristmill.client.world import World
from gristmill.v1 import decode_pb2, ingest_pb2, ingest_pb2_grpc

if TYPE_CHECKING:
    from torch.utils.data import IterableDataset

__all__ = ["Batch", "Loader", "SampleFailure"]

log = logging.getLogger(__name__)

_POLICY = {Policy.EXACT: ingest_pb2.PLAN_POLICY_EXACT, Policy.HASH: ingest_pb2.PLAN_POLICY_HASH,
           Policy.SEQUENTIAL: ingest_pb2.PLAN_POLICY_SEQUENTIAL}
_CROP = {"center": decode_pb2.CROP_MODE_CENTER, "random": decode_pb2.CROP_MODE_RANDOM}
_COLOR = {"rgb": decode_pb2.COLOR_MODE_RGB, "rgba": decode_pb2.COLOR_MODE_RGBA,
          "gray": decode_pb2.COLOR_MODE_GRAY}
#: Error reasons worth retrying: the server went away or is restarting.
#: Failures worth retrying within ``retry_timeout``: the server is restarting,
#: or it is at its stream limit (other jobs' streams will end). Not the
#: per-key limit: a job's own ranks hold those slots and would wait forever.
_RETRY_REASONS = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "ABORTED", "TOO_MANY_STREAMS"}
#: The ingest service could not reach its annotate service: like NO_SERVER, not
#: retried before a first plan came back (a wrong setting fails at once).
ANNOTATE_UNAVAILABLE = "ANNOTATE_UNAVAILABLE"
_CHANNELS = {decode_pb2.COLOR_MODE_GRAY: 1, decode_pb2.COLOR_MODE_RGB: 3,
             decode_pb2.COLOR_MODE_RGBA: 4}
#: Batches of the largest bucket a shared-memory ring holds.
RING_BATCHES = 3
MiB = 1 << 20
_END = object()

Images = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class SampleFailure:
    """A sample of the batch that could not be decoded (it has no row in ``images``)."""

    id: str
    reason: str
    message: str


@dataclass
class Batch:
    """One batch of one bucket, as the training loop gets it.

    Attributes:
        images: ``[B, H, W, C]`` uint8, one row per sample decoded without error.
        ids: the sample id (store path) of each row.
        fresh: per row, False for padding (a repeat of a sample delivered
            earlier in the epoch, used to keep ranks even).
        companions: per row, its companion images (masks), cut like the image.
        annotations: per row, the sample's accepted annotations at the
            Loader's release: a list of dicts ``{"annotation": id, "schema":
            name, "schema_version": n, "data": {...}}`` ordered by annotation
            id; empty lists when the Loader names no release.
        errors: samples of this batch that failed (not in ``images``).
        cursor: (epoch, position) of this batch in the rank's plan.
        source_sizes: per row, the (width, height) of the source image after
            EXIF orientation (SDXL-style size conditioning, say).
        source_channels: per row, the source image's channels: 1 gray, 2
            gray + alpha, 3 colour, 4 colour + alpha.
    """

    images: Images
    ids: list[str]
    fresh: npt.NDArray[np.bool_]
    companions: list[tuple[Images, ...]]
    annotations: list[list[dict[str, Any]]]
    errors: list[SampleFailure]
    cursor: Cursor
    planned_ids: list[str] = field(repr=False, default_factory=list)
    planned_fresh: int = field(repr=False, default=0)
    source_sizes: list[tuple[int, int]] = field(repr=False, default_factory=list)
    source_channels: list[int] = field(repr=False, default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def companion(self, k: int) -> Images:
        """The ``k``-th companion of every row stacked as ``[B, H, W, C]``."""
        return np.stack([c[k] if c[k].ndim == 3 else c[k][..., None] for c in self.companions])


class _Assembler:
    """Joins the chunks of one batch into a :class:`Batch` (use a new one per batch).

    With a ``ring``, messages that carry a ring slice are read from it and
    the slice is released once copied out.
    """

    def __init__(self, ring: RingReader | None = None) -> None:
        self._ring = ring
        self._images: Images | None = None
        self._rows = 0
        self._next_offset = 0
        self._head: ingest_pb2.StreamBatchesResponse | None = None
        self._ids: list[str] = []
        self._fresh: list[bool] = []
        self._companions: list[tuple[Images, ...]] = []
        self._annotations: list[list[dict[str, Any]]] = []
        self._errors: list[SampleFailure] = []
        self._planned: list[str] = []
        self._planned_fresh = 0
        self._source_sizes: list[tuple[int, int]] = []
        self._source_channels: list[int] = []

    def _allocate(self, rows: int, channels: int) -> Images:
        assert self._head is not None
        bucket = self._head.bucket
        return np.empty((rows, bucket.height, bucket.width, channels), np.uint8)

    def _pixels(self, msg: ingest_pb2.StreamBatchesResponse, in_ring: bool) -> Images:
        if not in_ring:
            return np.frombuffer(msg.pixels, np.uint8)  # read the field once (each read copies)
        if self._ring is None:
            raise Internal("the server sent pixels through a shared-memory ring this stream "
                           "did not ask for")
        return self._ring.view(msg.ring_slice.offset, msg.ring_slice.length)

    def add(self, msg: ingest_pb2.StreamBatchesResponse) -> Batch | None:
        """Take one message; the batch once its last message arrived."""
        if self._head is None:
            if msg.offset != 0:
                raise Internal(f"stream started mid-batch (offset {msg.offset})")
            self._head = msg
        elif (msg.cursor.position != self._head.cursor.position
              or msg.offset != self._next_offset):
            raise Internal(f"out-of-order chunk: batch {msg.cursor.position} offset "
                           f"{msg.offset}, expected batch {self._head.cursor.position} offset "
                           f"{self._next_offset}")
        ok = [s for s in msg.samples if not s.HasField("error")]
        in_ring = msg.HasField("ring_slice")
        data = self._pixels(msg, in_ring)
        used = 0
        if ok:
            if self._images is None:  # the first chunk with pixels tells the channels
                self._images = self._allocate(msg.batch_size, msg.channels)
            elif msg.channels != self._images.shape[3]:
                raise Internal("channels changed within a batch")
            shape = self._images.shape[1:]
            n = len(ok)
            used = n * shape[0] * shape[1] * shape[2]
            expected = used + (sum(c.width * c.height * c.channels
                                   for s in ok for c in s.companions) if in_ring else 0)
            if len(data) != expected:
                raise Internal(f"batch {msg.cursor.position} offset {msg.offset}: "
                               f"{len(data)} pixel bytes for {n} samples, expected {expected}")
            self._images[self._rows:self._rows + n] = data[:used].reshape(n, *shape)
            self._rows += n
        for s in msg.samples:
            self._planned.append(s.id)
            self._planned_fresh += s.fresh
            if s.HasField("error"):
                self._errors.append(SampleFailure(
                    s.id, decode_pb2.DecodeErrorReason.Name(s.error.reason).removeprefix(
                        "DECODE_ERROR_REASON_"), s.error.message))
                continue
            self._ids.append(s.id)
            self._fresh.append(s.fresh)
            self._source_sizes.append((s.source_width, s.source_height))
            self._source_channels.append(s.source_channels)
            if in_ring:  # companions follow the images in the record: copy them out
                planes = []
                for c in s.companions:
                    size = c.width * c.height * c.channels
                    planes.append(data[used:used + size].reshape(
                        c.height, c.width, c.channels).copy())
                    used += size
                self._companions.append(tuple(planes))
            else:
                self._companions.append(tuple(to_array(c) for c in s.companions))
            self._annotations.append(json.loads(s.annotations) if s.annotations else [])
        if in_ring:
            assert self._ring is not None
            del data
            self._ring.release(msg.ring_slice.release)
        self._next_offset = msg.offset + len(msg.samples)
        if not msg.HasField("next"):
            return None
        images = self._images if self._images is not None else self._allocate(0, 1)
        return Batch(images[:self._rows], self._ids, np.array(self._fresh, bool),
                     self._companions, self._annotations, self._errors,
                     Cursor(msg.cursor.epoch, msg.cursor.position), self._planned,
                     self._planned_fresh, self._source_sizes, self._source_channels)


class _Call(Protocol):
    def __iter__(self) -> Iterator[ingest_pb2.StreamBatchesResponse]: ...
    def cancel(self) -> Any: ...


class Transport(Protocol):
    """How a Loader reaches an ingest: a gRPC channel, or in-process."""

    def plan(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        """PlanEpoch."""

    def stream(self, request: ingest_pb2.StreamBatchesRequest, ring: RingReader | None
               ) -> _Call:
        """StreamBatches; ``cancel()`` on the result stops it.

        ``ring`` is the stream's ring: named in the request for a server, or
        written directly by an in-process ingest.
        """

    def close(self) -> None:
        """Release connections and threads."""


class _GrpcTransport:
    def __init__(self, options: ConnectionOptions) -> None:
        self._channel = open_channel(options)
        self._stub = ingest_pb2_grpc.IngestServiceStub(self._channel)

    def plan(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        return call_rpc(self._stub.PlanEpoch, request)

    def stream(self, request: ingest_pb2.StreamBatchesRequest, ring: RingReader | None
               ) -> _Call:
        return _GrpcCall(self._stub.StreamBatches(request))

    def close(self) -> None:
        self._channel.close()


class _GrpcCall:
    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[ingest_pb2.StreamBatchesResponse]:
        return stream_rpc(self._call)

    def cancel(self) -> Any:
        return self._call.cancel()


def _retryable(error: GristmillError) -> bool:
    return isinstance(error, Unavailable) or error.reason in _RETRY_REASONS


class Loader:
    """Batches of one rank for a training loop: ``for batch in loader``.

    Args:
        address: ingest service ``host:port``; default ``GRISTMILL_ADDRESS``
            or 127.0.0.1:7450.
        dataset: dataset name.
        version: a committed version id, or "latest" (the newest committed
            version, pinned when the Loader starts).
        batch_size: samples per batch (per rank).
        image_size: side of the square bucket (datago ``default_image_size``).
        downsampling_ratio: bucket sides are multiples of this.
        min_aspect_ratio: smallest bucket aspect ratio (width / height).
        max_aspect_ratio: largest bucket aspect ratio.
        seed: shuffle seed; equal seeds give equal plans.
        shuffle: False streams in manifest order (policy "sequential").
        policy: "exact" (default: each sample once per epoch, ranks even),
            "hash" (a sample stays on its rank as the dataset grows) or
            "sequential".
        drop_last: drop the short tail instead of padding it with repeats.
        rank: this rank; default ``RANK`` from the environment, else 0.
        world_size: number of ranks; default ``WORLD_SIZE``, else 1.
        prefix: only files under this path prefix are samples.
        companions: path templates of companion images, e.g. "masks/{stem}.png".
        crop: "center" or "random" (seeded per sample and epoch).
        color: "rgb", "rgba" or "gray".
        prefetch: batches kept ready ahead of the training loop.
        delivery_log: directory for the delivery log (see ``gristmill audit``).
        retry_timeout: seconds to keep retrying a lost connection before raising
            (a server that was reached and went away, e.g. restarts). A server
            never reached fails at once (after gRPC's own ~3 s of retries) with
            :class:`~gristmill.client.errors.Unavailable`, reason ``NO_SERVER``.
        shared_memory: pixels through a shared-memory ring in ``/dev/shm``
            (or ``GRISTMILL_SHM_DIR``) instead of the socket. None (default):
            when the server can open the ring, i.e. runs on this host, else
            gRPC. True: required (an error otherwise). False: never.
        api_key: default ``GRISTMILL_API_KEY``.
        ca_file: PEM CA certificate for TLS.
        annotations: an annotation release of the dataset (``gristmill
            annotate release DATASET NAME``): each batch carries its samples'
            accepted annotations at that release in ``batch.annotations``.
            An unknown release fails here with
            :class:`~gristmill.client.errors.NotFound`.
    """

    def __init__(self, address: str | None = None, dataset: str = "", version: str = "latest",
                 batch_size: int = 32, image_size: int = 512, downsampling_ratio: int = 16,
                 min_aspect_ratio: float = 0.5, max_aspect_ratio: float = 2.0, seed: int = 0,
                 shuffle: bool = True, policy: str | Policy = "exact", drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, *,
                 prefix: str = "", companions: Sequence[str] = (), crop: str = "center",
                 color: str = "rgb", prefetch: int = 4, delivery_log: Path | str | None = None,
                 retry_timeout: float = 300.0, shared_memory: bool | None = None,
                 api_key: str | None = None, ca_file: Path | str | None = None,
                 annotations: str | None = None, transport: Transport | None = None) -> None:
        if not dataset:
            raise ValueError("name the dataset to stream: Loader(address, dataset='...')")
        pol = Policy(policy) if isinstance(policy, str) else policy
        if not shuffle:
            if pol is Policy.HASH:
                raise ValueError("policy 'hash' always shuffles within a rank; use "
                                 "policy='sequential' for manifest order")
            pol = Policy.SEQUENTIAL
        if crop not in _CROP or color not in _COLOR:
            raise ValueError(f"crop must be one of {sorted(_CROP)} and color one of "
                             f"{sorted(_COLOR)}; got crop={crop!r}, color={color!r}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        self.world = World.from_env(rank, world_size)
        self.prefetch = prefetch
        self.shared_memory = shared_memory
        self._use_ring = shared_memory is not False
        self.retry_timeout = retry_timeout
        self._transport = transport or _GrpcTransport(ConnectionOptions(
            address, api_key, Path(ca_file) if ca_file else None,
            DEFAULT_MAX_MESSAGE_BYTES).resolved())
        spec = ingest_pb2.PlanSpec(
            dataset=dataset, version=version, prefix=prefix, companions=list(companions),
            seed=seed, world_size=self.world.world_size, batch_size=batch_size,
            policy=_POLICY[pol], drop_last=drop_last, release=annotations or "",
            transform=decode_pb2.Transform(
                buckets=decode_pb2.BucketConfig(image_size=image_size,
                                                downsampling=downsampling_ratio,
                                                min_aspect=min_aspect_ratio,
                                                max_aspect=max_aspect_ratio),
                crop=_CROP[crop], color=_COLOR[color]))
        self._epoch = 0
        self._position = 0
        self._planned: ingest_pb2.PlanEpochResponse | None = None
        self._planned_epoch = -1
        # a live folder (from_folder, hash or sequential) streams while it is listed: its
        # plan is counted only when asked (len, .plan) or when a delivery log needs it
        self._streamed = (isinstance(self._transport, _LocalTransport)
                          and self._transport.live and delivery_log is None)
        try:
            if self._streamed:
                assert isinstance(self._transport, _LocalTransport)
                first = self._transport.begin(ingest_pb2.PlanEpochRequest(spec=spec, epoch=0))
            else:
                first = self._plan(spec, 0)  # pins "latest" to a version id
        except BaseException:
            self._transport.close()
            raise
        self.spec = first.spec
        self.plan_id = first.plan_id
        self._ring_bytes = self._ring_capacity(first)
        self._log: DeliveryLog | None = None
        if delivery_log is not None:
            self._log = DeliveryLog(delivery_log, self.world.rank, {
                "plan_id": self.plan_id, "world_size": self.world.world_size,
                "dataset": dataset, "version": self.spec.version})

    @classmethod
    def from_folder(cls, path: Path | str, batch_size: int = 32, image_size: int = 512,
                    downsampling_ratio: int = 16, min_aspect_ratio: float = 0.5,
                    max_aspect_ratio: float = 2.0, seed: int = 0, shuffle: bool = True,
                    policy: str | Policy = "exact", drop_last: bool = False,
                    rank: int | None = None, world_size: int | None = None, *,
                    workers: int = 0, show_progress: bool = True,
                    folder_index: bool | None = None, annotations: Path | str | None = None,
                    **kwargs: Any) -> Loader:
        """The same pipeline in this process on a local folder of images, no server.

        Needs the ingest package (``pip install gristmill-ingest``), which
        brings the decoders. ``workers`` decoding threads (0: one per core).
        With the hash and sequential policies batches stream while the folder
        is being listed; the exact policy lists it first. ``folder_index``
        remembers image headers on disk between starts (default on, unless
        ``GRISTMILL_FOLDER_INDEX=0``; see docs/ingest.md).
        ``annotations`` is a released export file (``gristmill annotate export
        DATASET --release NAME --out FILE``): batches then carry its labels
        in ``batch.annotations``, matched to the folder's files by path, as a
        server would at that release.
        Other keyword arguments are those of :class:`Loader`.
        """
        if kwargs.get("shared_memory"):
            raise ValueError("from_folder runs the pipeline in this process: there is no "
                             "server to share memory with; leave shared_memory unset")
        try:
            from gristmill.ingest.local import folder_ingest
        except ImportError as e:
            raise ImportError("Loader.from_folder decodes in this process and needs the "
                              "gristmill-ingest package: pip install gristmill-ingest") from e
        pol = Policy(policy) if isinstance(policy, str) else policy
        ingest, decoder = folder_ingest(path, workers=workers,
                                        prefetch_batches=kwargs.get("prefetch", 4),
                                        show_progress=show_progress,
                                        live=pol is not Policy.EXACT or not shuffle,
                                        folder_index=folder_index, annotations=annotations)
        labels = ingest.planner.labels
        release = getattr(labels, "release", None) if annotations is not None else None
        return cls(None, "folder", "latest", batch_size, image_size, downsampling_ratio,
                   min_aspect_ratio, max_aspect_ratio, seed, shuffle, policy, drop_last, rank,
                   world_size, annotations=release.name if release is not None else None,
                   transport=_LocalTransport(ingest, decoder), **kwargs)

    # plans -----------------------------------------------------------------
    def _retry(self) -> _Retry:
        # a plan came back: the server was reached, so retry for retry_timeout
        return _Retry(self.retry_timeout, lambda: self._planned is not None)

    def _with_retry(self, what: str, fn: Callable[[], Any]) -> Any:
        retry = self._retry()
        while True:
            try:
                return fn()
            except GristmillError as e:
                if not retry.pause(e, what):
                    raise

    def _plan(self, spec: ingest_pb2.PlanSpec, epoch: int) -> ingest_pb2.PlanEpochResponse:
        if self._planned is not None and self._planned.spec == spec and \
                self._planned_epoch == epoch:
            return self._planned
        resp: ingest_pb2.PlanEpochResponse = self._with_retry(
            "PlanEpoch", lambda: self._transport.plan(
                ingest_pb2.PlanEpochRequest(spec=spec, epoch=epoch)))
        self._planned, self._planned_epoch = resp, epoch
        return resp

    @property
    def epoch(self) -> int:
        """The epoch the next iteration streams."""
        return self._epoch

    @property
    def plan(self) -> ingest_pb2.PlanEpochResponse:
        """The current epoch's plan summary (batches per rank, buckets, samples)."""
        return self._plan(self.spec, self._epoch)

    @property
    def pixel_path(self) -> str:
        """How pixels reach this process: "shared memory", "gRPC" or "in-process".

        With ``shared_memory=None`` this says "shared memory" until a stream
        finds that the server cannot open the ring.
        """
        if isinstance(self._transport, _LocalTransport):
            return "in-process"
        return "shared memory" if self._use_ring else "gRPC"

    def __len__(self) -> int:
        """Batches this rank gets per epoch."""
        return int(self.plan.batches_per_rank)

    def set_epoch(self, epoch: int) -> None:
        """Stream ``epoch`` from its start on the next iteration."""
        if epoch < 0:
            raise ValueError(f"epoch must not be negative, got {epoch}")
        self._epoch, self._position = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: save it with the model checkpoint."""
        return {"plan_id": self.plan_id, "version": self.spec.version, "epoch": self._epoch,
                "position": self._position, "rank": self.world.rank,
                "world_size": self.world.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at exactly the batch after the last one delivered when ``state`` was saved."""
        saved = state.get("plan_id")
        if saved != self.plan_id:
            raise ValueError(
                f"this state was saved by a Loader with a different plan ({saved!r}, version "
                f"{state.get('version')!r}; this one is {self.plan_id!r}, version "
                f"{self.spec.version!r}): create the Loader with the same dataset version, "
                "seed, batch size, world size and options to resume")
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    # iteration ---------------------------------------------------------------
    def __iter__(self) -> Generator[Batch, None, None]:
        epoch, start = self._epoch, self._position
        total: int | None = None  # a streamed plan: until the stream ends
        if not self._streamed:
            plan = self._plan(self.spec, epoch)
            total = int(plan.batches_per_rank)
            if self._log is not None:
                self._log.epoch(epoch, total, int(plan.samples_per_epoch))
        ready: queue.Queue[Any] = queue.Queue(self.prefetch)
        stop = threading.Event()
        calls: list[_Call] = []
        thread = threading.Thread(target=self._produce, name="gristmill-loader", daemon=True,
                                  args=(epoch, start, total, ready, stop, calls))
        thread.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                batch: Batch = item
                self._position = batch.cursor.position + 1
                if self._log is not None:
                    self._log.batch(epoch, batch.cursor.position, batch.planned_ids,
                                    batch.planned_fresh, [e.id for e in batch.errors])
                yield batch
            self._epoch, self._position = epoch + 1, 0
        finally:
            stop.set()
            for call in calls:
                call.cancel()
            thread.join(timeout=10)

    def _produce(self, epoch: int, position: int, total: int | None, ready: queue.Queue[Any],
                 stop: threading.Event, calls: list[_Call]) -> None:
        def put(item: Any) -> bool:
            return put_unless_stopped(ready, item, stop)

        retry = self._retry()
        while (total is None or position < total) and not stop.is_set():
            request = ingest_pb2.StreamBatchesRequest(
                spec=self.spec, rank=self.world.rank,
                cursor=ingest_pb2.Cursor(epoch=epoch, position=position))
            ring: RingReader | None = None
            try:
                ring = self._new_ring()
                if ring is not None and ring.name:
                    request.ring.name, request.ring.capacity, request.ring.token = (
                        ring.name, ring.capacity, ring.token)
                call = self._transport.stream(request, ring)
                calls[:] = [call]
                assembler = _Assembler(ring)
                for msg in call:
                    if ring is not None:
                        ring.attached()
                    batch = assembler.add(msg)
                    if batch is None:
                        continue
                    assembler = _Assembler(ring)
                    if not put(batch):
                        return
                    position = batch.cursor.position + 1
                    retry.progressed()
                if total is None:
                    break  # a streamed plan ends with its stream
                if position < total:
                    raise Unavailable(f"the stream ended at batch {position} of {total}")
            except GristmillError as e:
                if stop.is_set():
                    return
                if self._ring_refused(e):
                    continue
                if not retry.pause(e, f"batch stream of rank {self.world.rank} at batch "
                                      f"{position}"):
                    put(e)
                    return
            except BaseException as e:  # noqa: BLE001 - handed to the training loop
                put(e)
                return
            finally:
                if ring is not None:
                    ring.close()
        put(_END)

    # shared memory -----------------------------------------------------------
    def _ring_capacity(self, plan: ingest_pb2.PlanEpochResponse) -> int:
        """Room for RING_BATCHES batches of the largest bucket, companions included.

        Every epoch of a plan has the same buckets, so any epoch's plan tells.
        """
        area = max((b.bucket.width * b.bucket.height for b in plan.buckets), default=0)
        channels = _CHANNELS.get(self.spec.transform.color, 4)
        per_sample = area * channels * (1 + len(self.spec.companions))
        size = RING_BATCHES * self.spec.batch_size * per_sample
        return max(4 * MiB, -(-size // MiB) * MiB)

    def _new_ring(self) -> RingReader | None:
        """A ring for the next stream call, or None to stream pixels over gRPC."""
        if not self._use_ring:
            return None
        try:
            if isinstance(self._transport, _LocalTransport):  # in-process: a private ring
                return RingReader.private(self._ring_bytes)
            return RingReader.create(self._ring_bytes)
        except FailedPrecondition as e:
            if self._ring_refused(e):
                return None
            raise

    def _ring_refused(self, error: GristmillError) -> bool:
        """Whether ``error`` turned shared memory off (automatic mode only)."""
        if self.shared_memory is not None or error.reason != RING_UNAVAILABLE or \
                not self._use_ring:
            return False
        log.info("pixels go over gRPC: %s", error.message)
        self._use_ring = False
        return True

    def as_torch(self, tensors: bool = False) -> IterableDataset[Any]:
        """This loader as a ``torch.utils.data.IterableDataset`` (needs torch).

        Use it with ``DataLoader(dataset, batch_size=None)``: batching, prefetch
        and decoding are done already (torch's default ``batch_size=1`` is
        refused with an error saying so). DataLoader worker processes are
        refused too: each would stream the whole rank again.

        Args:
            tensors: yield :class:`~gristmill.client.torchdata.TorchBatch`
                dicts of torch tensors (``images`` uint8 ``[B, C, H, W]``,
                ``ids``, ``fresh`` bool mask), ready for ``pin_memory=True``,
                instead of :class:`Batch` objects.
        """
        from gristmill.client.torchdata import as_torch

        return as_torch(self, tensors)

    def close(self) -> None:
        """Close the connection (and the local pipeline of ``from_folder``)."""
        self._transport.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Retry:
    """Backoff of one retried operation; the deadline restarts whenever it progresses.

    ``connected()`` tells whether the server was ever reached: until then a
    call that cannot connect (reason ``NO_SERVER``) is not retried here (gRPC's
    retry policy gave it a few seconds already), so a wrong address fails fast.
    """

    def __init__(self, timeout: float, connected: Callable[[], bool]) -> None:
        self.timeout = timeout
        self.connected = connected
        self.progressed()

    def progressed(self) -> None:
        """The operation got somewhere: back to short delays and a fresh deadline."""
        self.attempt, self.deadline = 0, time.monotonic() + self.timeout

    def pause(self, error: GristmillError, what: str) -> bool:
        """Wait before the next try; False if ``error`` is not worth retrying or time is up.

        Delays go from 0.1 s doubling to 5 s, with jitter so ranks do not
        reconnect in step.
        """
        if not _retryable(error) or time.monotonic() >= self.deadline:
            return False
        if error.reason in (NO_SERVER, ANNOTATE_UNAVAILABLE) and not self.connected():
            return False
        delay = min(5.0, 0.1 * 2 ** self.attempt) * (0.5 + random.random() / 2)
        log.warning("%s failed (%s); retrying in %.1fs", what, error, delay)
        time.sleep(delay)
        self.attempt += 1
        return True


class _LocalTransport:
    """An in-process ingest (``Loader.from_folder``)."""

    def __init__(self, ingest: Any, decoder: Any) -> None:
        self._ingest = ingest
        self._decoder = decoder

    @property
    def live(self) -> bool:
        """Whether plans stream while the folder is listed (hash and sequential)."""
        return bool(getattr(self._ingest, "live", False))

    def begin(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        """A live folder's spec and plan id at once (counts unknown, every bucket listed)."""
        return self._ingest.begin(request)  # type: ignore[no-any-return]

    def plan(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        return self._ingest.plan_epoch(request)  # type: ignore[no-any-return]

    def stream(self, request: ingest_pb2.StreamBatchesRequest, ring: RingReader | None
               ) -> _Call:
        writer = ring.local_writer() if ring is not None else None
        return _LocalCall(self._ingest.stream_batches(request, ring=writer))

    def close(self) -> None:
        close = getattr(self._ingest, "close", None)
        if close is not None:
            close()  # stop listing the folder
        self._decoder.close()


class _LocalCall:
    def __init__(self, messages: Iterator[ingest_pb2.StreamBatchesResponse]) -> None:
        self._messages = messages
        self._cancelled = False

    def __iter__(self) -> Iterator[ingest_pb2.StreamBatchesResponse]:
        try:
            for msg in self._messages:
                if self._cancelled:
                    return
                yield msg
        finally:
            close = getattr(self._messages, "close", None)
            if close is not None:
                close()

    def cancel(self) -> Any:
        self._cancelled = True
        return True

