"""Typed server configuration from a YAML file, ``GRISTMILL_*`` variables and flags.

Precedence, lowest first: defaults, the YAML file, environment variables,
command-line flags. Nested keys use ``__`` in variable names, e.g.
``GRISTMILL_TLS__CERT_FILE=/etc/tls/tls.crt``. An unknown key anywhere, or a
missing required one, stops start-up with a :class:`ConfigError` naming it;
only variables of a whole section that no installed service owns
(``GRISTMILL_INGEST__...`` in an image without ingest) are left to the
images they are for.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

__all__ = [
    "CLIENT_ENV_VARS",
    "AuthConfig",
    "ConfigError",
    "LimitsConfig",
    "ServerConfig",
    "ServiceConfig",
    "StrictConfig",
    "TLSConfig",
    "load_config",
    "server_config_model",
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


#: The base of config models nested in a service's section: unknown keys are
#: errors and values cannot change once loaded.
StrictConfig = _Strict


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


class ServiceConfig(_Strict):
    """A service's own section of the server config (``store:``, ``decode:``, ...).

    A service package registers its subclass under the ``gristmill.config``
    entry point group with the section's name; :func:`load_config` adds a
    section for every installed one, so the kit knows no service. Services
    read theirs with ``StoreConfig.of(config)``.
    """

    #: The section's key in the config (and in ``GRISTMILL_<SECTION>__...``).
    section: ClassVar[str]

    @classmethod
    def of(cls, config: ServerConfig) -> Self:
        """This service's section of a server config."""
        value = getattr(config, cls.section, None)
        if not isinstance(value, cls):
            raise ConfigError(f"the config has no {cls.section!r} section: is the package that "
                              f"provides it ({cls.__module__.rsplit('.', 1)[0]}) installed?")
        return value

    def check(self, server: ServerConfig) -> None:
        """Rules between this section and the server's keys; raise ValueError to refuse."""


class ServerConfig(_Strict):
    """Everything a gristmill server process needs.

    The kit's keys, plus one section per installed service (added by
    :func:`load_config` through :func:`server_config_model`).
    """

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

    @model_validator(mode="after")
    def _limits_fit(self) -> ServerConfig:
        if self.limits.max_streams is not None and \
                self.limits.max_streams > max(1, self.max_workers - 4):
            raise ValueError(f"limits.max_streams ({self.limits.max_streams}) must leave at least "
                             f"4 of max_workers ({self.max_workers}) for unary calls and health "
                             "checks: lower it or raise max_workers")
        for name in type(self).model_fields:
            section = getattr(self, name)
            if isinstance(section, ServiceConfig):
                section.check(self)
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
    model = server_config_model()
    env = _env_overrides(environ)
    # variables of a service not installed here belong to another image that
    # shares the environment (one .env for all services): not an error here
    env = {k: v for k, v in env.items()
           if k in model.model_fields or not isinstance(v, dict) or k in _KIT_SECTIONS}
    if env:
        sources.append("environment")
    data = _merge(data, env)
    if overrides:
        data = _merge(data, {k: v for k, v in overrides.items() if v is not None})
        sources.append("flags")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, ", ".join(sources))) from None


#: Nested keys of the kit itself: a variable under them is never another service's.
_KIT_SECTIONS = frozenset({"auth", "limits", "tls"})


@functools.cache
def server_config_model() -> type[ServerConfig]:
    """ServerConfig with a section per installed service (entry points ``gristmill.config``)."""
    sections: dict[str, Any] = {}
    for ep in sorted(entry_points(group="gristmill.config"), key=lambda e: e.name):
        model = ep.load()
        if not (isinstance(model, type) and issubclass(model, ServiceConfig)):
            raise TypeError(f"entry point {ep.value} is not a ServiceConfig")
        if ep.name != model.section:
            raise TypeError(f"entry point {ep.name} names section {model.section!r}")
        sections[model.section] = (model, model())
    return create_model("ServerConfig", __base__=ServerConfig, **sections)
