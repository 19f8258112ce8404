"""The server kit's metrics (all prefixed ``gristmill_``): RPCs, auth, health, volumes.

Each service defines its own metrics in its package (``gristmill.store.metrics``,
``gristmill.decode.metrics``, ...), in the same default registry.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "LATENCY_BUCKETS",
    "AUTH_KEY_FILE_ERRORS",
    "AUTH_KEY_FILE_RELOADS",
    "RPC_DURATION",
    "RPC_IN_FLIGHT",
    "RPC_MALFORMED",
    "RPC_REJECTED",
    "RPC_STREAMS_OPEN",
    "RPC_TOTAL",
    "start_metrics_server",
    "watch_health",
    "watch_volume",
]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

RPC_TOTAL = Counter(
    "gristmill_rpc_requests", "Finished RPCs by method and status code",
    ["service", "method", "code"],
)
RPC_DURATION = Histogram(
    "gristmill_rpc_duration_seconds", "RPC latency (streams: until the last message)",
    ["service", "method"], buckets=LATENCY_BUCKETS,
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

AUTH_KEY_FILE_RELOADS = Counter("gristmill_auth_key_file_reloads",
                                "Times the shared key file (auth.shared_keys_file) was re-read")
AUTH_KEY_FILE_ERRORS = Counter(
    "gristmill_auth_key_file_errors",
    "Changes of the shared key file that could not be read or parsed (the last good keys stay)")


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
_VOLUMES = _VolumeCollector()
_HEALTH = _HealthCollector()
REGISTRY.register(_VOLUMES)
REGISTRY.register(_HEALTH)


def watch_health(servicer: object) -> None:
    """Export ``gristmill_health_serving`` from this gRPC health servicer's answers."""
    _HEALTH.watch(servicer)


def watch_volume(name: str, path: Path) -> None:
    """Export free and total bytes of the volume holding ``path`` as ``volume=name``."""
    _VOLUMES.watch(name, path)


def start_metrics_server(port: int, host: str = "127.0.0.1") -> tuple[object, int]:
    """Serve /metrics over HTTP; returns (server, bound port). Port 0 picks one."""
    server, _thread = start_http_server(port, addr=host)
    return server, int(server.server_port)
