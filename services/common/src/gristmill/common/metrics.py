"""The one place gristmill metrics are defined (all prefixed ``gristmill_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

__all__ = [
    "DECODE_BYTES_IN",
    "DECODE_BYTES_OUT",
    "DECODE_ERRORS",
    "DECODE_LATENCY",
    "DECODE_QUEUE_DEPTH",
    "DECODE_SAMPLES",
    "INGEST_BATCHES",
    "INGEST_BYTES_OUT",
    "INGEST_PREFETCH_BYTES",
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
    "start_metrics_server",
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


def start_metrics_server(port: int, host: str = "127.0.0.1") -> tuple[object, int]:
    """Serve /metrics over HTTP; returns (server, bound port). Port 0 picks one."""
    server, _thread = start_http_server(port, addr=host)
    return server, int(server.server_port)
