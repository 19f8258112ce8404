"""IngestService over gRPC: epoch plans and each rank's stream of ready batches."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

import grpc

from gristmill.client.channel import ConnectionOptions
from gristmill.client.errors import InvalidArgument
from gristmill.client.hub import LATEST
from gristmill.client.planner import EpochPlan, plan_epoch
from gristmill.client.shm import RingClosed, RingWriter
from gristmill.client.tuning import trim_memory_soon
from gristmill.common import metrics
from gristmill.common.auth import Role
from gristmill.common.config import ConfigError
from gristmill.common.service import ServiceContext, ServiceSpec
from gristmill.decode.limits import (
    MESSAGE_FRAMING,
    check_output_pixels,
    mib,
    output_size,
    sample_bytes,
    size_field,
    too_large,
)
from gristmill.decode.service import bucket_message
from gristmill.ingest import metrics as ingest_metrics
from gristmill.ingest.budget import PrefetchBudget
from gristmill.ingest.config import IngestConfig
from gristmill.ingest.feed import BatchFeed, batch_messages
from gristmill.ingest.labels import (
    LabelSource,
    LocalLabels,
    ReleasePin,
    RemoteLabels,
    StreamLabels,
    pin_spec,
)
from gristmill.ingest.samples import Samples, SpecInfo, check_spec, plan_id
from gristmill.ingest.sources import (
    DecodeBackend,
    LocalDecode,
    LocalStore,
    PlanRowSource,
    RemoteDecode,
    RemoteStoreAccess,
    StoreAccess,
    decode_stub,
)
from gristmill.v1 import ingest_pb2, ingest_pb2_grpc

__all__ = ["SERVICE", "Ingest", "IngestServicer", "Planner"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Memo(Generic[K, V]):
    """A bounded LRU map whose values are computed once, even under concurrent asks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[K, V] = OrderedDict()
        self._locks: dict[K, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            key_lock = self._locks.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._values:
                    return self._values[key]
            value = compute()  # outside the map lock: other keys proceed meanwhile
            with self._lock:
                self._values[key] = value
                self._locks.pop(key, None)
                while len(self._values) > self.size:
                    self._values.popitem(last=False)
            return value


class Planner:
    """Resolves specs and plans epochs, remembering recent sample sets and plans.

    ``labels`` answers for specs that name an annotation release (None: such
    specs are refused).
    """

    def __init__(self, store: StoreAccess, config: IngestConfig,
                 labels: LabelSource | None = None) -> None:
        self.store = store
        self.labels = labels
        self._samples: _Memo[tuple[object, ...], Samples] = _Memo(config.cached_sample_sets)
        self._plans: _Memo[tuple[str, int], EpochPlan] = _Memo(config.cached_plans)
        self._hashes: _Memo[tuple[object, ...], bytes] = _Memo(config.cached_sample_sets)

    def resolve(self, spec: ingest_pb2.PlanSpec) -> ingest_pb2.PlanSpec:
        """The spec with its version pinned to a committed version id (and its release)."""
        return self.resolve_pinned(spec)[0]

    def resolve_pinned(self, spec: ingest_pb2.PlanSpec
                       ) -> tuple[ingest_pb2.PlanSpec, ReleasePin | None]:
        """The spec with its version and its release's log position pinned, and the release.

        Raises:
            NotFound: no such release; FailedPrecondition: it moved, or no
            annotate service; Unavailable: the annotate service is down.
        """
        resolved = ingest_pb2.PlanSpec()
        resolved.CopyFrom(spec)
        resolved.version = self.store.resolve_version(spec.dataset, spec.version or LATEST)
        if not spec.release:
            return resolved, None
        pin = pin_spec(self.labels, spec)
        resolved.release_seq, resolved.release_head_hash = pin.seq, pin.head_hash
        return resolved, pin

    def hashes(self, spec: ingest_pb2.PlanSpec, info: SpecInfo, samples: Samples
               ) -> bytes | None:
        """Each sample's content sha256 (32 bytes each, in sample order) from the manifest.

        Annotations pinned to other content are then not delivered. Read
        once per sample set, only for streams with annotations.
        """
        key = (spec.dataset, spec.version, spec.prefix, tuple(spec.companions), info.buckets)

        def read() -> bytes:
            index = {path: i for i, path in enumerate(samples.set.ids)}
            out = bytearray(32 * len(index))
            for e in self.store.manifest(spec.dataset, spec.version):
                i = index.get(e.path)
                if i is not None and len(e.sha256) == 64:
                    out[32 * i:32 * i + 32] = bytes.fromhex(e.sha256)
            return bytes(out)
        return self._hashes.get(key, read)

    def samples(self, spec: ingest_pb2.PlanSpec, info: SpecInfo) -> Samples:
        """The samples of a resolved spec."""
        key = (spec.dataset, spec.version, spec.prefix, tuple(spec.companions), info.buckets)
        return self._samples.get(key, lambda: self._read_samples(spec, info))

    def _read_samples(self, spec: ingest_pb2.PlanSpec, info: SpecInfo) -> Samples:
        """Samples from the planning columns of the catalog, else from the whole manifest."""
        if not isinstance(self.store, PlanRowSource):
            return Samples.from_manifest(spec, info,
                                         self.store.manifest(spec.dataset, spec.version))
        if spec.companions:  # companions may lie anywhere, of any type
            rows = self.store.plan_rows(spec.dataset, spec.version, "", images_only=False)
            return Samples.from_rows(spec, info, rows)
        rows = self.store.plan_rows(spec.dataset, spec.version, spec.prefix, images_only=True)
        return Samples.from_rows(spec, info, rows, selected=True)

    def plan(self, spec: ingest_pb2.PlanSpec, info: SpecInfo, epoch: int
             ) -> tuple[Samples, EpochPlan]:
        """Samples and plan of one epoch of a resolved spec."""
        if epoch < 0:
            raise InvalidArgument("epoch", f"must not be negative, got {epoch}")
        samples = self.samples(spec, info)
        plan = self._plans.get((plan_id(spec), epoch),
                               lambda: plan_epoch(samples.set, info.config, epoch))
        return samples, plan


class Ingest:
    """The ingest service's logic, free of gRPC: also runs in-process (``Loader.from_folder``).

    Args:
        planner: resolves specs and plans epochs.
        decode: opens a decode backend for one stream.
        config: prefetch depth and budgets, message size.
        max_message_bytes: the largest message a stream may send (None: no
            messages, in-process).
        max_pixels: the decoder's pixel limit, when it runs in this process.
    """

    def __init__(self, planner: Planner, decode: Callable[[], DecodeBackend],
                 config: IngestConfig, *, max_message_bytes: int | None = None,
                 max_pixels: int | None = None) -> None:
        self.planner = planner
        self.decode = decode
        self.config = config
        self.max_message_bytes = max_message_bytes
        self.max_pixels = max_pixels
        self.budget = PrefetchBudget(config.server_prefetch_bytes)

    def check_limits(self, spec: ingest_pb2.PlanSpec, info: SpecInfo) -> int:
        """Refuse a spec whose output this server cannot decode or whose batch cannot fit.

        Returns the most bytes one batch of the spec takes.

        Raises:
            ResourceExhausted: naming the field, the limit's config key and the fix.
        """
        t = info.transform
        if self.max_pixels is not None:
            check_output_pixels(t, self.max_pixels, "spec.transform")
        w, h = output_size(t)
        batch = spec.batch_size * sample_bytes(t, len(spec.companions))
        limit = self.config.stream_prefetch_bytes
        if batch > limit:
            raise too_large("spec.batch_size", "ingest.stream_prefetch_bytes",
                            f"one batch of {spec.batch_size} samples of up to {w}x{h} pixels "
                            f"({len(spec.companions)} companions each) is up to {mib(batch)}, "
                            f"over the {mib(limit)} one stream may hold "
                            "(ingest.stream_prefetch_bytes); lower batch_size or image_size, "
                            "or raise the limit", "BATCH_TOO_LARGE")
        return batch

    def _check_message(self, spec: ingest_pb2.PlanSpec, info: SpecInfo) -> None:
        """Refuse a spec whose single sample (a message's least) cannot fit a message."""
        if self.max_message_bytes is None:
            return
        t = info.transform
        one = sample_bytes(t, len(spec.companions))
        room = self.max_message_bytes - MESSAGE_FRAMING
        if one > room:
            w, h = output_size(t)
            raise too_large(size_field(t, "spec.transform"), "max_message_bytes",
                            f"one sample of up to {w}x{h} pixels ({len(spec.companions)} "
                            f"companions) is up to {mib(one)}, and a message carries at most "
                            f"{mib(room)} (max_message_bytes {mib(self.max_message_bytes)}); "
                            "lower image_size, or stream through shared memory on the "
                            "server's host", "SAMPLE_TOO_LARGE")

    def plan_epoch(self, request: ingest_pb2.PlanEpochRequest) -> ingest_pb2.PlanEpochResponse:
        """See the PlanEpoch RPC."""
        info = check_spec(request.spec)
        self.check_limits(request.spec, info)
        spec, pin = self.planner.resolve_pinned(request.spec)
        samples, plan = self.planner.plan(spec, info, request.epoch)
        summary = self.summary(spec, info, len(samples), plan)
        if pin is not None:
            summary.release_dataset_version = pin.dataset_version
        return summary

    @staticmethod
    def summary(spec: ingest_pb2.PlanSpec, info: SpecInfo, dataset_samples: int,
                plan: EpochPlan) -> ingest_pb2.PlanEpochResponse:
        """The PlanEpoch response of a planned epoch."""
        per_bucket: dict[int, int] = {}
        for rank in plan.ranks:
            for b in rank:
                per_bucket[b.bucket] = per_bucket.get(b.bucket, 0) + 1
        return ingest_pb2.PlanEpochResponse(
            spec=spec, plan_id=plan_id(spec), batches_per_rank=plan.batches_per_rank,
            samples_per_epoch=plan.fresh_samples, dataset_samples=dataset_samples,
            buckets=[ingest_pb2.BucketCount(bucket=bucket_message(info.buckets[i]), batches=n)
                     for i, n in sorted(per_bucket.items())])

    def _labels(self, spec: ingest_pb2.PlanSpec, info: SpecInfo, samples: Samples
                ) -> StreamLabels | None:
        """The annotation lookup of a stream whose spec names a release (checked again)."""
        if not spec.release:
            return None
        pin = pin_spec(self.planner.labels, spec)
        assert self.planner.labels is not None
        return StreamLabels(self.planner.labels, spec.dataset, pin, samples.set.ids,
                            self.planner.hashes(spec, info, samples))

    def stream_batches(self, request: ingest_pb2.StreamBatchesRequest,
                       is_active: Callable[[], bool] = lambda: True,
                       ring: RingWriter | None = None,
                       ) -> Iterator[ingest_pb2.StreamBatchesResponse]:
        """See the StreamBatches RPC; stops early when ``is_active`` turns false.

        ``ring`` is a ring of this process's caller (``Loader.from_folder``),
        used instead of one the request names; it is closed at the end.
        """
        spec = request.spec
        info = check_spec(spec)
        batch_bytes = self.check_limits(spec, info)
        if spec.version in ("", LATEST):
            raise InvalidArgument("spec.version", "stream with the spec PlanEpoch returned: its "
                                  "version is pinned, so every rank reads the same files")
        if spec.release and not spec.release_head_hash:
            raise InvalidArgument("spec.release_head_hash", "stream with the spec PlanEpoch "
                                  "returned: its annotation release is pinned to a log "
                                  "position, so every rank reads the same labels")
        if not 0 <= request.rank < spec.world_size:
            raise InvalidArgument("rank", f"must be 0 to {spec.world_size - 1} (world_size "
                                  f"{spec.world_size}), got {request.rank}")
        if request.max_batches < 0 or request.chunk_bytes < 0:
            raise InvalidArgument("max_batches" if request.max_batches < 0 else "chunk_bytes",
                                  "must not be negative (0 means the default)")
        samples, plan = self.planner.plan(spec, info, request.cursor.epoch)
        labels = self._labels(spec, info, samples)
        start = request.cursor.position
        if not 0 <= start <= plan.batches_per_rank:
            raise InvalidArgument("cursor.position", f"must be 0 to {plan.batches_per_rank} "
                                  f"(batches per rank in epoch {plan.epoch}), got {start}")
        stop = plan.batches_per_rank
        if request.max_batches:
            stop = min(stop, start + request.max_batches)
        chunk = request.chunk_bytes or self.config.chunk_bytes
        if ring is None and request.HasField("ring"):
            ring = RingWriter.open(self.config.shm_dir, request.ring.name,
                                   request.ring.capacity, token=request.ring.token)
        try:
            if ring is None or not ring.fits(batch_bytes):  # pixels may go inline
                self._check_message(spec, info)
            feed = BatchFeed(spec=spec, info=info, samples=samples, plan=plan,
                             rank=request.rank, start=start, stop=stop, decode=self.decode(),
                             prefetch=self.config.prefetch_batches,
                             budget=self.budget.stream(self.config.stream_prefetch_bytes),
                             labels=labels)
        except BaseException:
            if ring is not None:
                ring.close()
            raise
        ingest_metrics.INGEST_STREAMS.inc()
        progress = ingest_metrics.track_stream(request.rank)
        try:
            for batch in feed:
                if not is_active():
                    return
                yield from batch_messages(batch, chunk, ring, is_active)
                progress.progress()
                del batch  # its pixels go now, not when the next batch is ready
        except RingClosed:
            return
        finally:
            progress.close()
            feed.close()
            if ring is not None:
                ring.close()
            ingest_metrics.INGEST_STREAMS.dec()
            trim_memory_soon()  # give back what the stream's batches used


class IngestServicer(ingest_pb2_grpc.IngestServiceServicer):
    """gRPC front of :class:`Ingest`."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def PlanEpoch(self, request: ingest_pb2.PlanEpochRequest, context: grpc.ServicerContext
                  ) -> ingest_pb2.PlanEpochResponse:
        return self.ingest.plan_epoch(request)

    def StreamBatches(self, request: ingest_pb2.StreamBatchesRequest,
                      context: grpc.ServicerContext
                      ) -> Iterator[ingest_pb2.StreamBatchesResponse]:
        return self.ingest.stream_batches(request, context.is_active)


def _build(ctx: ServiceContext, server: grpc.Server) -> None:
    cfg = IngestConfig.of(ctx.config)
    store: StoreAccess
    if cfg.store_address:
        remote = RemoteStoreAccess(ConnectionOptions(cfg.store_address, cfg.store_api_key,
                                                     cfg.store_ca_file))
        ctx.resources.append(remote)
        store = remote
    elif "store" in ctx.local:
        store = LocalStore(ctx.local["store"])
    else:
        raise ConfigError("ingest needs a store: run the store service in the same server or "
                          "set ingest.store_address")
    decode: Callable[[], DecodeBackend]
    if cfg.decode_address:
        channel, stub = decode_stub(ConnectionOptions(cfg.decode_address, cfg.decode_api_key,
                                                      cfg.decode_ca_file))
        ctx.resources.append(channel)

        def decode() -> DecodeBackend:
            return RemoteDecode(stub, store, ctx.config.max_message_bytes)
    elif "decode" in ctx.local:
        local = LocalDecode(ctx.local["decode"], store)

        def decode() -> DecodeBackend:
            return local
    else:
        raise ConfigError("ingest needs a decoder: run the decode service in the same server "
                          "or set ingest.decode_address")
    labels: LabelSource | None = None
    if cfg.annotate_address:
        remote_labels = RemoteLabels(ConnectionOptions(cfg.annotate_address,
                                                       cfg.annotate_api_key,
                                                       cfg.annotate_ca_file))
        ctx.resources.append(remote_labels)
        labels = remote_labels
    elif "annotate" in ctx.local:
        labels = LocalLabels(ctx.local["annotate"])
    # else: streams without annotations only (a release is refused, naming the setting)
    local_decoder = ctx.local.get("decode") if not cfg.decode_address else None
    ingest = Ingest(Planner(store, cfg, labels), decode, cfg,
                    max_message_bytes=ctx.config.max_message_bytes,
                    max_pixels=local_decoder.max_pixels if local_decoder is not None else None)
    ctx.local["ingest"] = ingest
    if cfg.shm_dir is not None:
        metrics.watch_volume("shm", cfg.shm_dir)
    ingest_pb2_grpc.add_IngestServiceServicer_to_server(IngestServicer(ingest), server)


SERVICE = ServiceSpec(
    name="ingest",
    # built after these when they run in this process: it uses them in-process
    after=("store", "decode", "annotate"),
    full_name="gristmill.v1.IngestService",
    build=_build,
    roles={"PlanEpoch": Role.READER, "StreamBatches": Role.READER},
)
