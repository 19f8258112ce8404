"""One rank's batches from a cursor: read ahead, decode, cut into messages.

A producer thread walks the plan from the cursor, reads each batch's bytes
from the store in one call and queues it on the decoder; at most
``prefetch`` batches wait decoded (or decoding) ahead of the consumer, so the
pool stays busy. Memory is bounded in bytes: each batch is charged to the
stream's :class:`~gristmill.ingest.budget.StreamBudget` (its encoded bytes
and its largest possible pixels) before it is read, and given back once it
is sent. When the spec names an annotation release, the producer also looks
up the annotations of the batch's samples (one call per batch) while the
decoder works. The consumer takes batches in order and cuts each into
messages of about ``chunk_bytes``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from gristmill.client.buckets import Bucket
from gristmill.client.handoff import put_unless_stopped
from gristmill.client.planner import Cursor, EpochPlan, PlannedBatch
from gristmill.client.shm import RingWriter
from gristmill.decode.limits import sample_bytes
from gristmill.decode.service import bucket_message
from gristmill.ingest import metrics as ingest_metrics
from gristmill.ingest.budget import StreamBudget
from gristmill.ingest.samples import Samples, SpecInfo, sample_seed
from gristmill.ingest.sources import DecodeBackend, Decoded, Plane, Waiter
from gristmill.v1 import decode_pb2, ingest_pb2

__all__ = ["BatchFeed", "DecodedBatch", "batch_messages"]


@dataclass
class DecodedBatch:
    """A planned batch with its decode results, in batch order."""

    cursor: Cursor
    planned: PlannedBatch
    bucket: Bucket
    ids: list[str]
    results: list[Decoded]
    #: Each sample's annotations as a JSON array; empty when the spec names no release.
    annotations: list[str] = field(default_factory=list)


#: Sample indices of a batch to their annotations (JSON arrays), in order.
Labeler = Callable[[Sequence[int]], list[str]]


@dataclass
class _Queued:
    position: int
    planned: PlannedBatch
    wait: Waiter
    #: Bytes charged to the stream's budget.
    charge: int
    #: The planned samples' annotations, in batch order (empty without a release).
    annotations: list[str] = field(default_factory=list)


def _expand(wait: Waiter, unique: list[int], planned: PlannedBatch) -> Waiter:
    """The results of ``unique`` samples laid out as the planned batch."""
    if len(unique) == len(planned.samples):
        return wait

    def expanded() -> list[Decoded]:
        by_index = dict(zip(unique, wait(), strict=True))
        return [by_index[i] for i in planned.samples]
    return expanded


class BatchFeed:
    """Decoded batches of one rank, from ``start`` to ``stop`` (exclusive), in order.

    Iterate it once; :meth:`close` (or leaving the iteration) stops the producer.
    ``labels`` looks up the annotations of a batch's samples (None: no release).
    """

    def __init__(self, *, spec: ingest_pb2.PlanSpec, info: SpecInfo, samples: Samples,
                 plan: EpochPlan, rank: int, start: int, stop: int, decode: DecodeBackend,
                 prefetch: int, budget: StreamBudget, labels: Labeler | None = None) -> None:
        self.spec, self.info, self.samples, self.plan = spec, info, samples, plan
        self.rank, self.start, self.stop = rank, start, stop
        self.decode = decode
        self.budget = budget
        self.labels = labels
        self._queue: queue.Queue[_Queued | BaseException | None] = queue.Queue(prefetch)
        self._stopped = threading.Event()
        self._transforms: dict[int, decode_pb2.Transform] = {}
        self._producer = threading.Thread(target=self._produce, name="ingest-feed", daemon=True)

    def _transform(self, bucket: int) -> decode_pb2.Transform:
        """The spec's transform at the exact size of ``bucket``."""
        t = self._transforms.get(bucket)
        if t is None:
            b = self.info.buckets[bucket]
            t = decode_pb2.Transform()
            t.CopyFrom(self.spec.transform)
            t.fixed.width, t.fixed.height = b.width, b.height  # replaces the bucket config
            self._transforms[bucket] = t
        return t

    def _samples(self, indices: list[int]) -> list[decode_pb2.DecodeSample]:
        ids, companions = self.samples.set.ids, self.samples.companions
        ds, v = self.spec.dataset, self.spec.version
        return [decode_pb2.DecodeSample(
            id=ids[i], seed=sample_seed(self.spec.seed, self.plan.epoch, i),
            image=decode_pb2.ImageSource(ref=decode_pb2.StoreRef(dataset=ds, version=v,
                                                                 path=ids[i])),
            companions=[decode_pb2.ImageSource(ref=decode_pb2.StoreRef(
                dataset=ds, version=v, path=c)) for c in companions[i]],
        ) for i in indices]

    def _put(self, item: _Queued | BaseException | None) -> bool:
        return put_unless_stopped(self._queue, item, self._stopped)

    def charge(self, bucket: int, unique: list[int]) -> int:
        """Bytes a batch may hold: encoded inputs and the pixels of its bucket."""
        b = self.info.buckets[bucket]
        pixels = sample_bytes(self.info.transform, len(self.spec.companions),
                              (b.width, b.height))
        sizes = self.samples.sizes
        return len(unique) * pixels + (sum(sizes[i] for i in unique) if sizes else 0)

    def _annotations(self, unique: list[int], planned: PlannedBatch) -> list[str]:
        """The planned samples' annotations in batch order (each distinct sample asked once)."""
        if self.labels is None:
            return []
        found = dict(zip(unique, self.labels(unique), strict=True))
        return [found[i] for i in planned.samples]

    def _produce(self) -> None:
        end: BaseException | None = None
        try:
            batches = self.plan.ranks[self.rank]
            for position in range(self.start, self.stop):
                try:
                    planned = batches[position]
                except IndexError:
                    break  # a streamed plan (Loader.from_folder) ended: the epoch is over
                # a padded batch repeats samples: decode each once
                unique = list(dict.fromkeys(planned.samples))
                charge = self.charge(planned.bucket, unique)
                if not self.budget.acquire(charge):
                    return  # closed
                try:
                    wait = self.decode.submit(self._samples(unique),
                                              self._transform(planned.bucket))
                    # while the pool decodes: one lookup for the whole batch
                    annotations = self._annotations(unique, planned)
                except BaseException:
                    self.budget.release(charge)
                    raise
                if not self._put(_Queued(position, planned, _expand(wait, unique, planned),
                                         charge, annotations)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            end = e
        self._put(end)

    def __iter__(self) -> Iterator[DecodedBatch]:
        self._producer.start()
        try:
            while True:
                start = time.perf_counter()
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                results = item.wait()
                ingest_metrics.INGEST_WAIT.observe(time.perf_counter() - start)
                ids = self.samples.set.ids
                batch = DecodedBatch(Cursor(self.plan.epoch, item.position), item.planned,
                                     self.info.buckets[item.planned.bucket],
                                     [ids[i] for i in item.planned.samples], results,
                                     item.annotations)
                charge = item.charge
                del item, results
                yield batch
                del batch  # sent: its pixels may go before the charge is given back
                self.budget.release(charge)
        finally:
            self.close()

    def close(self) -> None:
        """Stop reading ahead, drop what was read ahead and end the decode stream."""
        self._stopped.set()
        self.budget.close()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self.decode.close()


def _add_sample(msg: ingest_pb2.StreamBatchesResponse, batch: DecodedBatch, k: int,
                inline: bool) -> list[Plane]:
    """Add sample ``k`` to ``msg``; its pixels, then its companions' (none for an error).

    With ``inline`` False the companions go into ``msg`` as shapes only:
    their pixels travel with the image's.
    """
    result = batch.results[k]
    sample = msg.samples.add(id=batch.ids[k], fresh=k < batch.planned.fresh)
    if batch.annotations:
        sample.annotations = batch.annotations[k]
    if result.error is not None:
        sample.error.CopyFrom(result.error)
        ingest_metrics.INGEST_SAMPLES.labels("error").inc()
        return []
    assert result.image is not None
    msg.channels = result.image.shape[2]
    sample.source_width, sample.source_height, sample.source_channels = result.source
    ingest_metrics.INGEST_SAMPLES.labels("ok" if sample.fresh else "repeat").inc()
    for c in result.companions:
        h, w, ch = c.shape
        sample.companions.add(width=w, height=h, channels=ch, encoding=decode_pb2.ENCODING_RAW,
                              data=c.tobytes() if inline else b"")
    return [result.image] if inline else [result.image, *result.companions]


def _raw_bytes(result: Decoded) -> int:
    if result.image is None:
        return 0
    return result.image.nbytes + sum(c.nbytes for c in result.companions)


def _ring_message(batch: DecodedBatch, ring: RingWriter, is_active: Callable[[], bool]
                  ) -> ingest_pb2.StreamBatchesResponse | None:
    """The whole batch as one message whose pixels are in ``ring``; None if they cannot fit."""
    if not ring.fits(sum(_raw_bytes(r) for r in batch.results)):
        return None
    n = len(batch.results)
    msg = ingest_pb2.StreamBatchesResponse(
        cursor=ingest_pb2.Cursor(epoch=batch.cursor.epoch, position=batch.cursor.position),
        bucket=bucket_message(batch.bucket), batch_size=n, offset=0,
        next=ingest_pb2.Cursor(epoch=batch.cursor.epoch, position=batch.cursor.position + 1))
    images: list[Plane] = []
    companions: list[Plane] = []
    for k in range(n):
        parts = _add_sample(msg, batch, k, inline=False)
        images.extend(parts[:1])
        companions.extend(parts[1:])
    offset, length, release = ring.write(images + companions, is_active)
    msg.ring_slice.offset, msg.ring_slice.length, msg.ring_slice.release = (
        offset, length, release)
    ingest_metrics.INGEST_BYTES_OUT.labels("shm").inc(length)
    return msg


def batch_messages(batch: DecodedBatch, chunk_bytes: int, ring: RingWriter | None = None,
                   is_active: Callable[[], bool] = lambda: True,
                   ) -> Iterator[ingest_pb2.StreamBatchesResponse]:
    """Cut a decoded batch into messages of about ``chunk_bytes`` of pixels each.

    Companions count towards the size; a sample is never split. The last
    message carries the next batch's cursor.
    With a ``ring`` the batch is one message whose pixels are written to the
    ring (unless they cannot fit it, or the batch's annotations alone are
    over ``chunk_bytes``; then they go inline). Annotations count towards a
    message's size like pixels.

    Raises:
        RingClosed: ``is_active`` turned false while waiting for ring space.
    """
    labels = [len(a) for a in batch.annotations] or [0] * len(batch.results)
    if ring is not None and sum(labels) <= chunk_bytes:
        msg = _ring_message(batch, ring, is_active)
        if msg is not None:
            yield msg
            ingest_metrics.INGEST_BATCHES.inc()
            return
    cursor = ingest_pb2.Cursor(epoch=batch.cursor.epoch, position=batch.cursor.position)
    bucket = bucket_message(batch.bucket)
    n = len(batch.results)
    offset = 0
    while True:
        msg = ingest_pb2.StreamBatchesResponse(cursor=cursor, bucket=bucket, batch_size=n,
                                               offset=offset)
        pixels: list[Plane] = []
        size = 0
        k = offset
        while k < n and (size < chunk_bytes or k == offset):
            pixels.extend(_add_sample(msg, batch, k, inline=True))
            size += _raw_bytes(batch.results[k]) + labels[k]  # companions included
            k += 1
        msg.pixels = b"".join([p.data for p in pixels])
        if k >= n:
            msg.next.CopyFrom(ingest_pb2.Cursor(epoch=cursor.epoch, position=cursor.position + 1))
        ingest_metrics.INGEST_BYTES_OUT.labels("grpc").inc(size)
        yield msg
        offset = k
        if offset >= n:
            break
    ingest_metrics.INGEST_BATCHES.inc()
