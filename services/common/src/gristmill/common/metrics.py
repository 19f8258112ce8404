"""The one place gristmill metrics are defined (all prefixed ``gristmill_``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "AUTH_KEY_FILE_ERRORS",
    "AUTH_KEY_FILE_RELOADS",
    "DECODE_BYTES_IN",
    "DECODE_BYTES_OUT",
    "DECODE_ERRORS",
    "DECODE_LATENCY",
    "DECODE_QUEUE_DEPTH",
    "DECODE_SAMPLES",
    "INGEST_BATCHES",
    "INGEST_BYTES_OUT",
    "INGEST_PREFETCH_BYTES",
    "INGEST_RANK_BATCHES",
    "INGEST_SAMPLES",
    "INGEST_STREAMS",
    "INGEST_WAIT",
    "RPC_DURATION",
    "RPC_IN_FLIGHT",
    "RPC_MALFORMED",
    "RPC_REJECTED",
    "RPC_STREAMS_OPEN",
    "RPC_TOTAL",
    "STORE_BLOBS_CREATED",
    "STORE_BYTES_READ",
    "STORE_BYTES_WRITTEN",
    "STORE_ITEM_ERRORS",
    "StreamProgress",
    "start_metrics_server",
    "track_stream",
    "watch_health",
    "watch_volume",
]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

RPC_TOTAL = Counter(
    "gristmill_rpc_requests", "Finished RPCs by method and status code",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "gristmill_rpc_duration_seconds", "RPC latency (streams: until the last message)",
    ["service", "method"], buckets=_LATENCY_BUCKETS,
)
RPC_IN_FLIGHT = Gauge("gristmill_rpc_in_flight", "RPCs being served", ["service", "method"])
RPC_STREAMS_OPEN = Gauge("gristmill_rpc_streams_open",
                         "Open streaming calls (bounded by limits.max_streams)")
RPC_REJECTED = Counter(
    "gristmill_rpc_rejected", "Calls refused before they ran, by reason (UNAUTHENTICATED, "
    "PERMISSION_DENIED, TOO_MANY_STREAMS, TOO_MANY_STREAMS_PER_KEY, KEY_REVOKED)", ["reason"],
)
RPC_MALFORMED = Counter("gristmill_rpc_malformed_requests",
                        "Request messages that did not parse", ["service", "method"])

STORE_BYTES_WRITTEN = Counter("gristmill_store_bytes_written", "File bytes received by PutFiles")
STORE_BYTES_READ = Counter("gristmill_store_bytes_read", "File bytes sent by ReadFiles")
STORE_BLOBS_CREATED = Counter("gristmill_store_blobs_created", "New content-addressed blobs")
STORE_ITEM_ERRORS = Counter(
    "gristmill_store_item_errors", "Per-file errors in batch calls", ["reason"],
)

DECODE_SAMPLES = Counter("gristmill_decode_samples", "Samples decoded successfully", ["format"])
DECODE_BYTES_IN = Counter("gristmill_decode_bytes_in", "Encoded bytes decoded (main images)")
DECODE_BYTES_OUT = Counter("gristmill_decode_bytes_out", "Output pixel bytes (or re-encoded)")
DECODE_ERRORS = Counter("gristmill_decode_errors", "Samples that failed, by reason", ["reason"])
DECODE_LATENCY = Histogram(
    "gristmill_decode_seconds", "Time to decode, resize and crop one sample",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 5.0),
)
DECODE_QUEUE_DEPTH = Gauge("gristmill_decode_queue_depth",
                           "Samples submitted to the decode pool and not yet finished")

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
    buckets=_LATENCY_BUCKETS,
)

INGEST_RANK_BATCHES = Counter("gristmill_ingest_rank_batches",
                              "Batches sent by StreamBatches, by the rank that asked for them",
                              ["rank"])

AUTH_KEY_FILE_RELOADS = Counter("gristmill_auth_key_file_reloads",
                                "Times the shared key file (auth.shared_keys_file) was re-read")
AUTH_KEY_FILE_ERRORS = Counter(
    "gristmill_auth_key_file_errors",
    "Changes of the shared key file that could not be read or parsed (the last good keys stay)")


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


class _VolumeCollector(Collector):
    """Free and total bytes of the volumes a server writes to, read at each scrape."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[str, Path] = {}

    def watch(self, name: str, path: Path) -> None:
        with self._lock:
            self._paths[name] = Path(path)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        free = GaugeMetricFamily(
            "gristmill_volume_free_bytes",
            "Bytes available to the server on a volume it writes (data: data_dir, "
            "shm: ingest.shm_dir)", labels=["volume"])
        size = GaugeMetricFamily("gristmill_volume_size_bytes", "Size of that volume in bytes",
                                 labels=["volume"])
        with self._lock:
            paths = sorted(self._paths.items())
        for name, path in paths:
            try:
                st = os.statvfs(path)
            except OSError:  # gone or not mounted: no sample rather than a wrong one
                continue
            free.add_metric([name], float(st.f_bavail * st.f_frsize))
            size.add_metric([name], float(st.f_blocks * st.f_frsize))
        yield free
        yield size


class _HealthCollector(Collector):
    """What the server's health service answers for each service name, read at each scrape."""

    def __init__(self) -> None:
        self._servicer: object | None = None

    def watch(self, servicer: object) -> None:
        self._servicer = servicer

    def collect(self) -> Iterator[GaugeMetricFamily]:
        serving = GaugeMetricFamily(
            "gristmill_health_serving",
            "1 while gRPC health reports SERVING for a service (e.g. gristmill.v1.StoreService),"
            " 0 while NOT_SERVING (draining, or a backend such as Ceph unreachable)",
            labels=["service"])
        # grpc_health's HealthServicer keeps its answers in this table (under its lock)
        table = getattr(self._servicer, "_server_status", None)
        lock = getattr(self._servicer, "_lock", None)
        if isinstance(table, dict) and lock is not None:
            with lock:
                statuses = dict(table)
            for name, status in sorted(statuses.items()):
                if name:  # "" is the whole server; each service has its own name
                    serving.add_metric([name], 1.0 if status == _SERVING else 0.0)
        yield serving


_SERVING = 1  # grpc.health.v1.HealthCheckResponse.SERVING
_STREAMS = _StreamTracker()
_VOLUMES = _VolumeCollector()
_HEALTH = _HealthCollector()
REGISTRY.register(_STREAMS)
REGISTRY.register(_VOLUMES)
REGISTRY.register(_HEALTH)


def watch_health(servicer: object) -> None:
    """Export ``gristmill_health_serving`` from this gRPC health servicer's answers."""
    _HEALTH.watch(servicer)


def track_stream(rank: int) -> StreamProgress:
    """Count an open StreamBatches call of ``rank``; call ``progress()`` per batch, ``close()``."""
    return _STREAMS.add(rank)


def watch_volume(name: str, path: Path) -> None:
    """Export free and total bytes of the volume holding ``path`` as ``volume=name``."""
    _VOLUMES.watch(name, path)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> tuple[object, int]:
    """Serve /metrics over HTTP; returns (server, bound port). Port 0 picks one."""
    server, _thread = start_http_server(port, addr=host)
    return server, int(server.server_port)
