"""A bounded pool of decoding threads: the in-process face of the decode service."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from gristmill.decode import metrics as decode_metrics
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.pipeline import DEFAULT_MAX_PIXELS, DecodedSample, decode_sample
from gristmill.decode.transform import Transform

__all__ = ["Decoder", "SampleInput", "SampleResult"]

log = logging.getLogger(__name__)

#: A sample's outcome: pixels or a per-sample error.
SampleResult = DecodedSample | DecodeError


@dataclass(frozen=True)
class SampleInput:
    """One sample to decode: encoded main image, companions, seed, caller's id."""

    image: bytes
    companions: tuple[bytes, ...] = ()
    seed: int = 0
    id: str = ""


class Decoder:
    """Decodes samples on a pool of threads (native code, outside the GIL).

    Args:
        workers: threads; 0 means one per core.
        max_pixels: images with more pixels are refused before decoding.

    Use it as a context manager, or call :meth:`close`.
    """

    def __init__(self, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.workers = workers or os.cpu_count() or 1
        self.max_pixels = max_pixels
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="decode")

    def close(self) -> None:
        """Stop the threads (waits for running work)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def decode(self, sample: SampleInput, transform: Transform) -> SampleResult:
        """Decode one sample in the calling thread; errors are returned, not raised."""
        start = time.perf_counter()
        try:
            result = decode_sample(sample.image, transform, companions=sample.companions,
                                   seed=sample.seed, max_pixels=self.max_pixels)
        except DecodeError as e:
            decode_metrics.DECODE_ERRORS.labels(e.reason.value).inc()
            return e
        except Exception as e:  # a bug or a library failure: one sample, not the stream
            log.exception("unexpected failure decoding sample %r", sample.id)
            decode_metrics.DECODE_ERRORS.labels(Reason.CORRUPT.value).inc()
            return DecodeError(Reason.CORRUPT, f"the decoder failed on this file ({e!r}); "
                               f"it is logged on the server; re-encode or drop the file")
        decode_metrics.DECODE_LATENCY.observe(time.perf_counter() - start)
        decode_metrics.DECODE_SAMPLES.labels(result.format).inc()
        decode_metrics.DECODE_BYTES_IN.inc(len(sample.image))
        return result

    def submit(self, sample: SampleInput, transform: Transform) -> Future[SampleResult]:
        """Queue one sample; the future never raises for a bad image."""
        decode_metrics.DECODE_QUEUE_DEPTH.inc()
        future = self._pool.submit(self.decode, sample, transform)
        future.add_done_callback(lambda _: decode_metrics.DECODE_QUEUE_DEPTH.dec())
        return future

    def decode_batch(self, samples: Sequence[SampleInput], transform: Transform
                     ) -> list[SampleResult]:
        """Decode a batch on the pool; results in input order."""
        return [f.result() for f in [self.submit(s, transform) for s in samples]]

    def map(self, samples: Iterable[SampleInput], transform: Transform, *,
            max_inflight: int = 0) -> Iterator[SampleResult]:
        """Decode a stream of samples, in order, with at most ``max_inflight`` queued.

        ``max_inflight`` defaults to four per worker: enough to keep every
        thread busy, bounded so a long input cannot fill memory.
        """
        limit = max_inflight or 4 * self.workers
        pending: deque[Future[SampleResult]] = deque()
        for sample in samples:
            pending.append(self.submit(sample, transform))
            if len(pending) >= limit:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class InflightLimit:
    """Counts samples and their output bytes in flight; ``acquire`` waits while over a limit.

    A batch larger than a limit is admitted alone, so no batch waits forever.
    """

    def __init__(self, limit: int, limit_bytes: int | None = None) -> None:
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.count = 0
        self.bytes = 0
        self._cond = threading.Condition()

    def _full(self, n: int, nbytes: int) -> bool:
        if not self.count:
            return False
        return self.count + n > self.limit or (
            self.limit_bytes is not None and self.bytes + nbytes > self.limit_bytes)

    def acquire(self, n: int, cancelled: threading.Event, nbytes: int = 0) -> bool:
        """Wait for room for ``n`` samples of ``nbytes``; False if ``cancelled`` was set first."""
        with self._cond:
            while self._full(n, nbytes):
                if cancelled.is_set():
                    return False
                self._cond.wait(0.25)
            self.count += n
            self.bytes += nbytes
            return True

    def release(self, n: int, nbytes: int = 0) -> None:
        """Give back ``n`` samples of ``nbytes``."""
        with self._cond:
            self.count -= n
            self.bytes -= nbytes
            self._cond.notify_all()
