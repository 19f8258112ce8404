"""Typed server configuration from a YAML file, ``GRISTMILL_*`` variables and flags.

Precedence, lowest first: defaults, the YAML file, environment variables,
command-line flags. Nested keys use ``__`` in variable names, e.g.
``GRISTMILL_TLS__CERT_FILE=/etc/tls/tls.crt``. An unknown key anywhere, or a
missing required one, stops start-up with a :class:`ConfigError` naming it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

__all__ = [
    "CLIENT_ENV_VARS",
    "AnnotateConfig",
    "AuthConfig",
    "CephBackendConfig",
    "ConfigError",
    "DecodeConfig",
    "FsBackendConfig",
    "IngestConfig",
    "LimitsConfig",
    "ServerConfig",
    "StoreConfig",
    "TLSConfig",
    "load_config",
]

ENV_PREFIX = "GRISTMILL_"
#: Variables read by clients and the CLI, not by the server config.
CLIENT_ENV_VARS = frozenset(
    {"GRISTMILL_ADDRESS", "GRISTMILL_API_KEY", "GRISTMILL_CA_FILE", "GRISTMILL_CONFIG",
     "GRISTMILL_CACHE_DIR", "GRISTMILL_SHM_DIR"}
)
MiB = 1024 * 1024


class ConfigError(ValueError):
    """The configuration is incomplete or names keys that do not exist."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSConfig(_Strict):
    """Serve TLS with this certificate chain and key (PEM files)."""

    cert_file: Path
    key_file: Path
    #: When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None


class AuthConfig(_Strict):
    """API keys (``authorization: Bearer <key>``)."""

    enabled: bool = True
    #: SQLite file with hashed keys; default ``<data_dir>/keys.sqlite``.
    keys_file: Path | None = None
    #: A read-only JSON file of key hashes shared by every server of a deployment
    #: (written by ``gristmill keys export``; in Kubernetes a mounted Secret). When
    #: set, keys come from it instead of ``keys_file``, and it is re-read on change.
    shared_keys_file: Path | None = None
    #: Seconds between checks of ``shared_keys_file`` for a change (inode, size, mtime).
    reload_seconds: float = Field(default=5.0, gt=0, le=300)

    @model_validator(mode="after")
    def _one_source(self) -> AuthConfig:
        if self.keys_file is not None and self.shared_keys_file is not None:
            raise ValueError("auth.keys_file and auth.shared_keys_file are both set: keys come "
                             "from one of them; remove one")
        return self


class LimitsConfig(_Strict):
    """What one server lets its clients hold at once (see docs/operations.md, "Limits").

    Streams (any call that streams requests or responses) hold an RPC thread
    for as long as they are open, so they are bounded below ``max_workers``:
    the threads left over always serve unary calls and health checks.
    """

    #: Open streams on this server; more are refused with RESOURCE_EXHAUSTED.
    #: Default: ``max_workers`` less a quarter of them (at least 4) for unary
    #: calls and health (48 of 64). Set, it must leave 4 of ``max_workers`` free.
    max_streams: int | None = Field(default=None, ge=1)
    #: Open streams per API key; default ``max_streams``. Lower it to keep one
    #: job (all its ranks share a key) from taking every stream, and keep
    #: it at least the ``max_streams`` of any gristmill service calling this
    #: one with a service key (ingest reading from store and decode).
    max_streams_per_key: int | None = Field(default=None, ge=1)
    #: Open streams of services anyone may call without a key (health Watch,
    #: reflection), counted together whatever key a caller sends.
    max_keyless_streams: int = Field(default=8, ge=1)
    #: Calls admitted at once, running or queued for a thread; more are
    #: refused with RESOURCE_EXHAUSTED before their request is read.
    max_pending_calls: int = Field(default=512, ge=8)
    #: Seconds between re-checks of the caller's API key inside a long
    #: stream (a revoked key ends it); PutFiles is re-checked before it commits.
    key_recheck_seconds: float = Field(default=5.0, gt=0, le=300)
    #: A peer sending malformed requests is logged at most once per this many seconds.
    malformed_log_seconds: float = Field(default=60.0, ge=0)


#: Room left in each ReadFiles message for field framing, so that a message
#: stays under gRPC's default 4 MiB receive limit in every client.
READ_MESSAGE_DEFAULT = 4 * MiB - 64 * 1024


class FsBackendConfig(_Strict):
    """Objects as files under ``<data_dir>/store`` (the default)."""

    kind: Literal["fs"] = "fs"


class CephBackendConfig(_Strict):
    """Objects in a Ceph pool through librados (see docs/storage.md)."""

    kind: Literal["ceph"] = "ceph"
    #: The cluster's ceph.conf (monitor addresses, auth).
    conf: Path
    #: The pool holding gristmill's objects (created by the operator).
    pool: str = Field(default="gristmill", min_length=1, max_length=128)
    #: RADOS namespace inside the pool ("" for the default one): stores with
    #: different namespaces share a pool without seeing each other's objects.
    namespace: str = Field(default="", max_length=128)
    #: Keyring with the client's key; default: the one ceph.conf names.
    keyring: Path | None = None
    #: The Ceph client name (``client.<id>``) to authenticate as.
    client: str = Field(default="client.admin", min_length=1)
    #: Whole seconds any one cluster operation may take (mount, monitor and
    #: OSD operations): with the cluster down, calls fail with UNAVAILABLE after it.
    timeout_seconds: int = Field(default=5, ge=1, le=300)
    #: Objects a blob is split into above this size (RADOS works best with
    #: objects of a few MiB).
    piece_bytes: int = Field(default=4 * MiB, ge=64 * 1024, le=64 * MiB)


def _backend_from_name(value: Any) -> Any:
    """``backend: fs`` (a bare name, as in older configs) means ``{kind: fs}``."""
    return {"kind": value} if isinstance(value, str) else value


class StoreConfig(_Strict):
    """The store service."""

    #: Where objects live: ``{kind: fs}`` (default) or ``{kind: ceph, conf: ..., pool: ...}``.
    backend: Annotated[FsBackendConfig | CephBackendConfig, Field(discriminator="kind"),
                       BeforeValidator(_backend_from_name)] = FsBackendConfig()
    #: Byte budget of one ReadFiles response message, framing included, and
    #: the most a request may ask for (requests may only ask for less). The
    #: default keeps messages under gRPC's default 4 MiB client limit.
    read_message_bytes: int = Field(default=READ_MESSAGE_DEFAULT, ge=64 * 1024)
    #: Chunk size used when streaming large files.
    read_chunk_bytes: int = Field(default=1 * MiB, ge=64 * 1024)
    #: Run garbage collection (unreferenced blobs, staging files) at start-up.
    gc_on_start: bool = True
    #: Bytes held back in DATA_DIR/store/reserve so that metadata writes
    #: (deduplicated uploads, deletes) work on a full disk; 0 disables it.
    disk_reserve_bytes: int = Field(default=16 * MiB, ge=0)
    #: How a PutFiles message's new blobs are made durable before they are
    #: recorded: "fsync" (each file, then each directory that gained a blob,
    #: once) or "syncfs" (Linux: one syncfs of the volume before the renames
    #: and one after; best on a volume of the store's own).
    sync_method: Literal["fsync", "syncfs"] = "fsync"
    #: Largest value the array service stores under one key (an encoded Zarr
    #: chunk); larger ones, and arrays whose chunks could be larger before
    #: compression, are refused with INVALID_ARGUMENT. A chunk travels in one
    #: PutKeys message: the limit used is at most ``max_message_bytes`` less 64 KiB.
    max_array_chunk_bytes: int = Field(default=32 * MiB, ge=64 * 1024, le=48 * MiB)


class DecodeConfig(_Strict):
    """The decode service."""

    #: Decoding threads (native code, outside the GIL); 0 means one per core.
    workers: int = Field(default=0, ge=0, le=256)
    #: Samples one Decode stream may have in flight (read but not yet sent).
    #: The stream stops reading requests at this bound: backpressure.
    max_inflight_samples: int = Field(default=64, ge=1, le=65536)
    #: Images with more pixels than this are refused before decoding; so are
    #: requests for a larger output (a fixed size or a bucket).
    max_pixels: int = Field(default=100_000_000, ge=1)
    #: Output bytes one Decode stream may have in flight (decoded, not yet
    #: sent), estimated from the output size; a request alone is always
    #: admitted. With ``max_inflight_samples``, the stream's backpressure.
    max_inflight_bytes: int = Field(default=256 * MiB, ge=MiB)
    #: Store for ``ref`` sources when the store service is not in this process:
    #: its address (host:port), the API key to read with (a reader key), and
    #: the CA certificate when the store serves TLS.
    store_address: str | None = None
    store_api_key: str | None = None
    store_ca_file: Path | None = None


class IngestConfig(_Strict):
    """The training feed (see docs/ingest.md)."""

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


class AnnotateConfig(_Strict):
    """The annotate service (see docs/annotate.md)."""

    #: Events one AppendEvents call (or one ImportLog message) may carry.
    max_batch_events: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Bytes of one event's payload (canonical JSON).
    max_payload_bytes: int = Field(default=1 * MiB, ge=1024)
    #: Samples one GetAnnotations call may ask about.
    max_query_samples: int = Field(default=10_000, ge=1)
    #: How far a signed event's own timestamp may be from the server's clock.
    max_clock_skew_seconds: float = Field(default=600.0, ge=0)


class ServerConfig(_Strict):
    """Everything a gristmill server process needs."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=7450, ge=0, le=65535)
    #: Prometheus /metrics port; 0 picks a free one, None disables it.
    metrics_port: int | None = Field(default=9450, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: A port that answers only health Check, on two threads of its own, so
    #: Kubernetes probes never wait behind other calls; 0 picks a free one,
    #: None (default) serves health on ``port`` only.
    health_port: int | None = Field(default=None, ge=0, le=65535)
    #: Services to run; empty means every installed one.
    services: tuple[str, ...] = ()
    max_message_bytes: int = Field(default=64 * MiB, ge=MiB)
    #: RPC threads; streams may hold at most ``limits.max_streams`` of them.
    max_workers: int = Field(default=64, ge=2, le=1024)
    #: Seconds in-flight calls may take to finish after SIGTERM; keep it below
    #: Kubernetes' terminationGracePeriodSeconds.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    auth: AuthConfig = AuthConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TLSConfig | None = None
    store: StoreConfig = StoreConfig()
    decode: DecodeConfig = DecodeConfig()
    ingest: IngestConfig = IngestConfig()
    annotate: AnnotateConfig = AnnotateConfig()

    @model_validator(mode="after")
    def _limits_fit(self) -> ServerConfig:
        if self.limits.max_streams is not None and \
                self.limits.max_streams > max(1, self.max_workers - 4):
            raise ValueError(f"limits.max_streams ({self.limits.max_streams}) must leave at least "
                             f"4 of max_workers ({self.max_workers}) for unary calls and health "
                             "checks: lower it or raise max_workers")
        if self.ingest.stream_prefetch_bytes > self.ingest.server_prefetch_bytes:
            raise ValueError(f"ingest.stream_prefetch_bytes ({self.ingest.stream_prefetch_bytes}) "
                             "must not exceed ingest.server_prefetch_bytes "
                             f"({self.ingest.server_prefetch_bytes})")
        if self.store.read_message_bytes > self.max_message_bytes - 64 * 1024:
            raise ValueError(f"store.read_message_bytes ({self.store.read_message_bytes}) must be "
                             f"at least 64 KiB below max_message_bytes ({self.max_message_bytes})")
        return self

    @property
    def max_streams(self) -> int:
        """Open streams allowed (``limits.max_streams`` or its default from ``max_workers``)."""
        if self.limits.max_streams is not None:
            return self.limits.max_streams
        return max(1, self.max_workers - max(4, self.max_workers // 4))

    @property
    def max_streams_per_key(self) -> int:
        """Open streams allowed per API key."""
        return self.limits.max_streams_per_key or self.max_streams

    @property
    def keys_file(self) -> Path:
        """Where API keys are stored."""
        return self.auth.keys_file or self.data_dir / "keys.sqlite"


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in CLIENT_ENV_VARS:
            continue
        path = name[len(ENV_PREFIX):].lower().split("__")
        node = result
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"environment variable {name} conflicts with another variable")
        leaf: Any = value
        if path[-1] == "services":
            leaf = [s.strip() for s in value.split(",") if s.strip()]
        elif value.lower() in ("none", "null", ""):
            leaf = None
        node[path[-1]] = leaf
    return result


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError, sources: str) -> str:
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a rule between keys
            lines.append(str(e["msg"]).removeprefix("Value error, "))
            continue
        key = ".".join(str(p) for p in e["loc"])
        env = ENV_PREFIX + "__".join(str(p) for p in e["loc"]).upper()
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}' (or variable {env}): remove it or fix "
                         "its spelling")
        elif e["type"] == "missing":
            lines.append(f"missing config key '{key}': set it in the YAML file or as {env}")
        else:
            lines.append(f"config key '{key}' (or {env}): {e['msg']}")
    return f"invalid configuration ({sources}):\n  " + "\n  ".join(lines)


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Build the config from a YAML file, the environment and explicit overrides."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    sources = ["defaults"]
    if path is None and environ.get("GRISTMILL_CONFIG"):
        path = Path(environ["GRISTMILL_CONFIG"])
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys, not "
                              f"{type(loaded).__name__}")
        data = loaded
        sources.append(str(path))
    env = _env_overrides(environ)
    if env:
        sources.append("environment")
    data = _merge(data, env)
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
        sources.append("flags")
    try:
        return ServerConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, ", ".join(sources))) from None
