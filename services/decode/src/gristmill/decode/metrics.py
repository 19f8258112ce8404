"""The decode service's metrics (in the default registry, served by the kit's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
