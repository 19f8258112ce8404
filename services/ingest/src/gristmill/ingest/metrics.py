"""The ingest service's metrics (in the default registry, served by the kit's /metrics)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gristmill.common.metrics import LATENCY_BUCKETS

INGEST_BATCHES = Counter("gristmill_ingest_batches", "Batches sent to trainers")
INGEST_SAMPLES = Counter("gristmill_ingest_samples",
                         "Samples sent to trainers, by outcome (ok, error, repeat)", ["outcome"])
INGEST_BYTES_OUT = Counter("gristmill_ingest_bytes_out",
                           "Pixel bytes sent to trainers, by path (grpc, shm)", ["path"])
INGEST_STREAMS = Gauge("gristmill_ingest_streams", "Open StreamBatches calls")
INGEST_PREFETCH_BYTES = Gauge(
    "gristmill_ingest_prefetch_bytes",
    "Bytes streams hold ahead of their consumers (bounded by ingest.server_prefetch_bytes "
    "plus one batch per stream)")
INGEST_WAIT = Histogram(
    "gristmill_ingest_wait_seconds",
    "Time a stream waited for its next batch to be decoded (0 when prefetch keeps up)",
    buckets=LATENCY_BUCKETS,
)

INGEST_RANK_BATCHES = Counter("gristmill_ingest_rank_batches",
                              "Batches sent by StreamBatches, by the rank that asked for them",
                              ["rank"])


class StreamProgress:
    """One open stream's progress, for ``gristmill_ingest_rank_idle_seconds``."""

    def __init__(self, tracker: _StreamTracker, rank: str) -> None:
        self._tracker = tracker
        self.rank = rank
        self.last = time.monotonic()

    def progress(self) -> None:
        """The stream sent a batch."""
        self.last = time.monotonic()
        INGEST_RANK_BATCHES.labels(self.rank).inc()

    def close(self) -> None:
        """The stream ended."""
        self._tracker.remove(self)


class _StreamTracker(Collector):
    """Open streams by rank; at each scrape, how long each rank has waited for a batch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[StreamProgress] = set()

    def add(self, rank: int) -> StreamProgress:
        handle = StreamProgress(self, str(rank))
        with self._lock:
            self._open.add(handle)
        return handle

    def remove(self, handle: StreamProgress) -> None:
        with self._lock:
            self._open.discard(handle)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        idle = GaugeMetricFamily(
            "gristmill_ingest_rank_idle_seconds",
            "Per rank with an open StreamBatches call: the longest any of its open streams "
            "has gone without sending a batch (since it opened or since its last batch)",
            labels=["rank"])
        now = time.monotonic()
        longest: dict[str, float] = {}
        with self._lock:
            for h in self._open:
                longest[h.rank] = max(longest.get(h.rank, 0.0), now - h.last)
        for rank, seconds in sorted(longest.items(), key=lambda kv: int(kv[0])):
            idle.add_metric([rank], seconds)
        yield idle


_STREAMS = _StreamTracker()
REGISTRY.register(_STREAMS)


def track_stream(rank: int) -> StreamProgress:
    """Count an open StreamBatches call of ``rank``; call ``progress()`` per batch, ``close()``."""
    return _STREAMS.add(rank)
