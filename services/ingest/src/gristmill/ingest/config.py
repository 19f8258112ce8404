"""The ingest service's section of the server config (``ingest:``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from gristmill.common.config import MiB, ServerConfig, ServiceConfig

__all__ = ["IngestConfig"]


class IngestConfig(ServiceConfig):
    """The training feed (section ``ingest:``; see docs/ingest.md)."""

    section: ClassVar[str] = "ingest"

    #: Batches one stream decodes ahead of what it has sent: keeps the decode
    #: pool busy. Memory is bounded by the two byte budgets below.
    prefetch_batches: int = Field(default=4, ge=1, le=256)
    #: Bytes one stream may hold ahead of its consumer: decoded pixels (and
    #: companions) of the batches it decoded or is decoding and not yet sent,
    #: plus their encoded bytes until decoded. A request whose single batch
    #: (batch_size x largest bucket x channels, companions included) is larger
    #: is refused with RESOURCE_EXHAUSTED.
    stream_prefetch_bytes: int = Field(default=256 * MiB, ge=MiB)
    #: Bytes all streams of this server may hold ahead of their consumers
    #: together. A stream that holds nothing may always take its next batch, so
    #: the most held is this plus one batch per open stream.
    server_prefetch_bytes: int = Field(default=1024 * MiB, ge=MiB)
    #: Default payload bytes per StreamBatches message (a sample is never split).
    chunk_bytes: int = Field(default=1 * MiB, ge=64 * 1024, le=32 * MiB)
    #: Sample lists (from manifests) and epoch plans kept in memory.
    cached_sample_sets: int = Field(default=8, ge=1)
    cached_plans: int = Field(default=32, ge=1)
    #: Store and decode services when they are not in this process: address
    #: (host:port), API key (a reader key) and CA certificate for TLS.
    store_address: str | None = None
    store_api_key: str | None = None
    store_ca_file: Path | None = None
    decode_address: str | None = None
    decode_api_key: str | None = None
    decode_ca_file: Path | None = None
    #: The annotate service, for streams that name an annotation release, when
    #: it is not in this process (a reader key is enough).
    annotate_address: str | None = None
    annotate_api_key: str | None = None
    annotate_ca_file: Path | None = None
    #: Shared-memory directory of this host, where Loaders running beside the
    #: server put the rings that carry pixels without a socket. In Kubernetes
    #: mount the same emptyDir (medium: Memory) at /dev/shm in the training
    #: container and this one. None turns shared memory off: pixels go over gRPC.
    shm_dir: Path | None = Path("/dev/shm")

    def check(self, server: ServerConfig) -> None:
        """One stream's prefetch fits in the server's."""
        if self.stream_prefetch_bytes > self.server_prefetch_bytes:
            raise ValueError(f"ingest.stream_prefetch_bytes ({self.stream_prefetch_bytes}) "
                             "must not exceed ingest.server_prefetch_bytes "
                             f"({self.server_prefetch_bytes})")
