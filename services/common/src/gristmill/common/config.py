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
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CLIENT_ENV_VARS",
    "AuthConfig",
    "ConfigError",
    "DecodeConfig",
    "IngestConfig",
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


class StoreConfig(_Strict):
    """The store service."""

    backend: Literal["fs"] = "fs"
    #: Default byte budget of one ReadFiles response message.
    read_message_bytes: int = Field(default=4 * MiB, ge=64 * 1024)
    #: Chunk size used when streaming large files.
    read_chunk_bytes: int = Field(default=1 * MiB, ge=64 * 1024)


class DecodeConfig(_Strict):
    """The decode service."""

    #: Decoding threads (native code, outside the GIL); 0 means one per core.
    workers: int = Field(default=0, ge=0, le=256)
    #: Samples one Decode stream may have in flight (read but not yet sent).
    #: The stream stops reading requests at this bound: backpressure.
    max_inflight_samples: int = Field(default=64, ge=1, le=65536)
    #: Images with more pixels than this are refused before decoding.
    max_pixels: int = Field(default=100_000_000, ge=1)
    #: Store for ``ref`` sources when the store service is not in this process:
    #: its address (host:port), the API key to read with (a reader key), and
    #: the CA certificate when the store serves TLS.
    store_address: str | None = None
    store_api_key: str | None = None
    store_ca_file: Path | None = None


class IngestConfig(_Strict):
    """The training feed (see docs/ingest.md)."""

    #: Batches one stream decodes ahead of what it has sent: keeps the decode
    #: pool busy while bounding memory (about prefetch x batch bytes).
    prefetch_batches: int = Field(default=4, ge=1, le=256)
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
    #: Shared-memory directory of this host, where Loaders running beside the
    #: server put the rings that carry pixels without a socket. In Kubernetes
    #: mount the same emptyDir (medium: Memory) at /dev/shm in the training
    #: container and this one. None turns shared memory off: pixels go over gRPC.
    shm_dir: Path | None = Path("/dev/shm")


class ServerConfig(_Strict):
    """Everything a gristmill server process needs."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = Field(default=7450, ge=0, le=65535)
    #: Prometheus /metrics port; 0 picks a free one, None disables it.
    metrics_port: int | None = Field(default=9450, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: Services to run; empty means every installed one.
    services: tuple[str, ...] = ()
    max_message_bytes: int = Field(default=64 * MiB, ge=MiB)
    max_workers: int = Field(default=32, ge=2)
    #: Seconds in-flight calls may take to finish after SIGTERM; keep it below
    #: Kubernetes' terminationGracePeriodSeconds.
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    auth: AuthConfig = AuthConfig()
    tls: TLSConfig | None = None
    store: StoreConfig = StoreConfig()
    decode: DecodeConfig = DecodeConfig()
    ingest: IngestConfig = IngestConfig()

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
