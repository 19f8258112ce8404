"""DecodeService over gRPC: a bidirectional stream of batches onto a bounded pool."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

from gristmill.client.buckets import Bucket, bucket_table
from gristmill.client.errors import GristmillError, InvalidArgument
from gristmill.client.names import validate_dataset_name, validate_path
from gristmill.client.tuning import trim_memory_soon
from gristmill.common.auth import Role
from gristmill.common.service import ServiceContext, ServiceSpec
from gristmill.decode import metrics as decode_metrics
from gristmill.decode.config import DecodeConfig
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.limits import (
    MESSAGE_FRAMING,
    check_output_pixels,
    mib,
    output_size,
    sample_bytes,
    size_field,
    too_large,
)
from gristmill.decode.pipeline import DecodedImage
from gristmill.decode.pool import Decoder, InflightLimit, SampleInput, SampleResult
from gristmill.decode.sources import FileSource, HubFiles, remote_store, resolve_samples
from gristmill.decode.transform import (
    Encoding,
    Transform,
    bucket_config_from_proto,
    transform_from_proto,
)
from gristmill.v1 import decode_pb2, decode_pb2_grpc

__all__ = ["SERVICE", "DecodeServicer", "bucket_message"]

log = logging.getLogger(__name__)

#: Samples in one request.
MAX_SAMPLES_PER_REQUEST = 4096

_REASON = {r: decode_pb2.DecodeErrorReason.Value(f"DECODE_ERROR_REASON_{r.value}")
           for r in Reason}
_ENCODING = {Encoding.RAW: decode_pb2.ENCODING_RAW, Encoding.JPEG: decode_pb2.ENCODING_JPEG,
             Encoding.PNG: decode_pb2.ENCODING_PNG}


def bucket_message(bucket: Bucket) -> decode_pb2.Bucket:
    """Proto view of a bucket."""
    return decode_pb2.Bucket(index=bucket.index, width=bucket.width, height=bucket.height,
                             aspect=bucket.aspect)


def _image_message(image: DecodedImage) -> decode_pb2.DecodedImage:
    return decode_pb2.DecodedImage(data=image.payload(), width=image.width, height=image.height,
                                   channels=image.channels, encoding=_ENCODING[image.encoding])


def result_message(sample_id: str, result: SampleResult) -> decode_pb2.DecodeResult:
    """Proto view of one sample's outcome."""
    if isinstance(result, DecodeError):
        return decode_pb2.DecodeResult(id=sample_id, error=decode_pb2.SampleError(
            reason=_REASON[result.reason], message=result.message,
            image_index=result.image_index))
    msg = decode_pb2.DecodeResult(id=sample_id)
    out = msg.sample
    out.image.CopyFrom(_image_message(result.image))
    out.companions.extend(_image_message(c) for c in result.companions)
    if result.bucket is not None:
        out.bucket.CopyFrom(bucket_message(result.bucket))
    out.source_width, out.source_height = result.source_size
    out.source_channels = result.source_channels
    return msg


@dataclass
class _Batch:
    index: int
    ids: list[str]
    futures: list[Future[SampleResult]]
    #: Estimated output bytes (what the in-flight limit counted).
    nbytes: int = 0


def _done(result: SampleResult) -> Future[SampleResult]:
    f: Future[SampleResult] = Future()
    f.set_result(result)
    return f


class DecodeServicer(decode_pb2_grpc.DecodeServiceServicer):
    """gRPC front of a :class:`Decoder`."""

    def __init__(self, decoder: Decoder, source: FileSource | None,
                 max_inflight_samples: int, *, max_message_bytes: int | None = None,
                 max_inflight_bytes: int | None = None) -> None:
        self.decoder = decoder
        self.source = source
        self.max_inflight_samples = max_inflight_samples
        self.max_message_bytes = max_message_bytes
        self.max_inflight_bytes = max_inflight_bytes

    def ListBuckets(self, request: decode_pb2.ListBucketsRequest,
                    context: grpc.ServicerContext) -> decode_pb2.ListBucketsResponse:
        if not request.HasField("config"):
            raise InvalidArgument("config", "give a bucket config, e.g. image_size 1024 and "
                                  "downsampling 32")
        try:
            table = bucket_table(bucket_config_from_proto(request.config))
        except ValueError as e:
            raise InvalidArgument("config", str(e)) from None
        return decode_pb2.ListBucketsResponse(buckets=[bucket_message(b) for b in table])

    def Decode(self, request_iterator: Iterator[decode_pb2.DecodeRequest],
               context: grpc.ServicerContext) -> Iterator[decode_pb2.DecodeResponse]:
        # A reader thread takes requests and queues their samples on the pool while
        # this generator sends finished batches in order. The reader stops reading
        # (so gRPC flow control pushes back on the client) while too many samples
        # are read but not yet sent.
        limit = InflightLimit(self.max_inflight_samples, self.max_inflight_bytes)
        cancelled = threading.Event()
        batches: queue.Queue[_Batch | BaseException | None] = queue.Queue()
        context.add_callback(cancelled.set)
        reader = threading.Thread(target=self._read, name="decode-reader", daemon=True,
                                  args=(request_iterator, limit, cancelled, batches))
        reader.start()
        try:
            while True:
                try:
                    item = batches.get(timeout=0.5)
                except queue.Empty:
                    if cancelled.is_set() or not context.is_active():
                        return  # the client went away; the reader stops too
                    continue
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                results = [result_message(i, f.result()) for i, f in zip(item.ids, item.futures,
                                                                          strict=True)]
                response = decode_pb2.DecodeResponse(results=results, batch_index=item.index)
                decode_metrics.DECODE_BYTES_OUT.inc(response.ByteSize())
                limit.release(len(item.futures), item.nbytes)
                del results, item
                yield response
        finally:
            cancelled.set()
            _cancel_pending(batches)
            trim_memory_soon()

    def _read(self, requests: Iterator[decode_pb2.DecodeRequest], limit: InflightLimit,
              cancelled: threading.Event, out: queue.Queue[_Batch | BaseException | None]
              ) -> None:
        transform: Transform | None = None
        end: BaseException | None = None
        try:
            for index, request in enumerate(requests):
                if request.HasField("transform"):
                    transform = transform_from_proto(request.transform)
                    check_output_pixels(transform, self.decoder.max_pixels)
                elif transform is None:
                    raise InvalidArgument("transform", "the first request of a stream must "
                                          "carry a transform (later ones may omit it)")
                nbytes = self._output_bytes(request, transform)
                samples = self._samples(request)
                if not limit.acquire(len(samples), cancelled, nbytes):
                    return
                futures = [_done(s) if isinstance(s, DecodeError) else
                           self.decoder.submit(s, transform) for s in samples]
                out.put(_Batch(index, [s.id for s in request.samples], futures, nbytes))
        except GristmillError as e:
            end = e
        except grpc.RpcError:  # the client went away
            pass
        except Exception as e:
            log.exception("decode stream reader failed")
            end = e
        finally:
            out.put(end)  # always a last item: the sender never waits forever
            if cancelled.is_set():
                _cancel_pending(out)

    def _output_bytes(self, request: decode_pb2.DecodeRequest, transform: Transform) -> int:
        """Raw output bytes the request may produce; refused if its response cannot be sent.

        Re-encoded (JPEG, PNG) outputs are not checked against the message
        limit: their size is known only after encoding.
        """
        size = output_size(transform)
        sizes = [sample_bytes(transform, len(s.companions), size) for s in request.samples]
        total = sum(sizes)
        if self.max_message_bytes is None or transform.encoding is not Encoding.RAW or \
                not sizes:
            return total
        room = self.max_message_bytes - MESSAGE_FRAMING
        biggest = max(sizes)
        if biggest > room:
            raise too_large(size_field(transform), "max_message_bytes",
                            f"one sample's raw output (companions included) is up to "
                            f"{mib(biggest)}, and a response message carries at most "
                            f"{mib(room)} (max_message_bytes {mib(self.max_message_bytes)}); ask "
                            "for a smaller size or a JPEG/PNG encoding", "SAMPLE_TOO_LARGE")
        if total > room:
            raise too_large("samples", "max_message_bytes",
                            f"the {len(sizes)} samples of this request make up to "
                            f"{mib(total)} of raw pixels, and one response carries at most "
                            f"{mib(room)} (max_message_bytes); send at most {room // biggest} "
                            "samples per request at this size", "RESPONSE_TOO_LARGE")
        return total

    def _samples(self, request: decode_pb2.DecodeRequest) -> list[SampleInput | DecodeError]:
        """Inputs of a request, store references resolved (a failed read fails its sample)."""
        if len(request.samples) > MAX_SAMPLES_PER_REQUEST:
            raise InvalidArgument("samples", f"at most {MAX_SAMPLES_PER_REQUEST} samples per "
                                  f"request, got {len(request.samples)}; split the batch")
        for i, s in enumerate(request.samples):
            for j, src in enumerate([s.image, *s.companions]):
                name = f"samples[{i}].image" if j == 0 else f"samples[{i}].companions[{j - 1}]"
                kind = src.WhichOneof("source")
                if kind is None:
                    raise InvalidArgument(name, "set data (the encoded bytes) or ref (a store "
                                          "file)")
                if kind == "ref":
                    validate_dataset_name(src.ref.dataset, f"{name}.ref.dataset")
                    validate_path(src.ref.path, f"{name}.ref.path")
        return resolve_samples(self.source, request.samples)


def _cancel_pending(batches: queue.Queue[_Batch | BaseException | None]) -> None:
    """Drop queued batches of a finished stream; decoding not yet started is cancelled."""
    while True:
        try:
            item = batches.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, _Batch):
            for f in item.futures:
                f.cancel()


def _build(ctx: ServiceContext, server: grpc.Server) -> None:
    cfg = DecodeConfig.of(ctx.config)
    decoder = Decoder(cfg.workers, cfg.max_pixels)
    ctx.local["decode"] = decoder
    ctx.resources.append(decoder)
    source: FileSource | None = ctx.local.get("store")
    if cfg.store_address:
        remote = remote_store(cfg.store_address, cfg.store_api_key, cfg.store_ca_file)
        ctx.resources.append(remote)
        source = HubFiles(remote)
    decode_pb2_grpc.add_DecodeServiceServicer_to_server(
        DecodeServicer(decoder, source, cfg.max_inflight_samples,
                       max_message_bytes=ctx.config.max_message_bytes,
                       max_inflight_bytes=cfg.max_inflight_bytes), server)


SERVICE = ServiceSpec(
    name="decode",
    # built after these when they run in this process: it uses them in-process
    after=("store",),
    full_name="gristmill.v1.DecodeService",
    build=_build,
    roles={"Decode": Role.READER, "ListBuckets": Role.READER},
)
