"""Building, running and gracefully stopping a gristmill gRPC server."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gristmill.client.private import private_dir
from gristmill.client.tuning import SERVER_ARENAS, tune_malloc
from gristmill.common.auth import KeyChecker, KeyStore, Role
from gristmill.common.config import ConfigError, ServerConfig
from gristmill.common.interceptors import (
    AuthInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
    StreamLimiter,
)
from gristmill.common.keyfile import KeyFile, KeyFileError
from gristmill.common.metrics import start_metrics_server, watch_health, watch_volume
from gristmill.common.service import ServiceContext, ServiceSpec, select_services

__all__ = ["GristmillServer", "create_server", "ensure_admin_key", "open_keys", "serve"]

log = logging.getLogger("gristmill.server")

#: Exit code when the server's serving machinery failed (EX_SOFTWARE).
SERVING_FAILED = 70


@dataclass
class GristmillServer:
    """A built gRPC server with its health service and what it must close."""

    grpc_server: grpc.Server
    health: health.HealthServicer
    context: ServiceContext
    services: list[ServiceSpec]
    keys: KeyChecker | None
    grace: float
    limiter: StreamLimiter
    #: The health-only server on ``health_port`` (None: health on the main port only).
    health_server: grpc.Server | None = None
    health_port: int | None = None
    #: gRPC's thread that accepts calls; set by :meth:`start`.
    serving_thread: threading.Thread | None = None
    #: Seconds between runs of the services' health probes.
    probe_seconds: float = 2.0
    _failing: set[str] = field(default_factory=set)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        """Start serving and report SERVING on health."""
        before = set(threading.enumerate())
        self.grpc_server.start()
        started = [t for t in threading.enumerate() if t not in before]
        # grpc starts exactly one thread, running grpc._server._serve
        self.serving_thread = next((t for t in started if "_serve" in t.name),
                                   started[0] if len(started) == 1 else None)
        if self.health_server is not None:
            self.health_server.start()
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        for spec in self.services:
            self.health.set(spec.full_name, health_pb2.HealthCheckResponse.SERVING)
        if self.context.health_checks:
            threading.Thread(target=self._probe_loop, name="gristmill-health-probe",
                             daemon=True).start()

    def probe_health(self) -> bool:
        """Run the services' health probes once and set health; True if all pass."""
        serving = health_pb2.HealthCheckResponse.SERVING
        failing = set()
        for name, check in self.context.health_checks.items():
            try:
                check()
            except Exception as e:  # noqa: BLE001 - any failure means not serving
                failing.add(name)
                if name not in self._failing:
                    log.warning("%s is not serving: %s", name, e)
            else:
                if name in self._failing:
                    log.info("%s is serving again", name)
        self._failing = failing
        if self._stopping.is_set():
            return not failing
        for name in self.context.health_checks:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING
                            if name in failing else serving)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING if failing else serving)
        return not failing

    def _probe_loop(self) -> None:
        while not self._stopping.wait(self.probe_seconds):
            self.probe_health()

    def serving(self) -> bool:
        """Whether gRPC's accepting thread is alive (False: no call will ever be served)."""
        return self.serving_thread is None or self.serving_thread.is_alive()

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish, close."""
        grace = self.grace if grace is None else grace
        self._stopping.set()
        self.health.enter_graceful_shutdown()
        # with a dead serving thread gRPC never reports the end: do not wait forever
        if not self.grpc_server.stop(grace).wait(grace + 5):
            log.error("the gRPC server did not stop within %.0f s; closing anyway", grace + 5)
        if self.health_server is not None:  # probes saw NOT_SERVING during the drain
            self.health_server.stop(0).wait(5)
        for res in reversed(self.context.resources):
            res.close()
        if self.keys is not None:
            self.keys.close()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server stops (or the timeout passes)."""
        return bool(self.grpc_server.wait_for_termination(timeout))


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls is None:
        return None
    tls = config.tls
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials([pair], tls.client_ca_file.read_bytes(),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


def open_keys(config: ServerConfig) -> KeyChecker | None:
    """The server's API keys: the shared key file if configured, else its SQLite database."""
    if not config.auth.enabled:
        return None
    if config.auth.shared_keys_file is not None:
        try:
            return KeyFile(config.auth.shared_keys_file, config.auth.reload_seconds)
        except KeyFileError as e:
            raise ConfigError(f"auth.shared_keys_file: {e}") from None
    return KeyStore(config.keys_file)


def create_server(config: ServerConfig,
                  services: list[ServiceSpec] | None = None) -> tuple[GristmillServer, int]:
    """Build (not start) a server for ``config``; returns it and the bound port.

    Binding port 0 picks a free port, which is what tests do.
    """
    specs = services if services is not None else select_services(config.services)
    private_dir(config.data_dir)
    limits = config.limits
    keys = open_keys(config)
    watch_volume("data", config.data_dir)
    roles: dict[str, Role] = {}
    for spec in specs:
        roles.update(spec.method_roles())
    # order matters: auth refuses before a stream takes a slot, errors map everything inside
    interceptors: list[grpc.ServerInterceptor] = [
        MetricsInterceptor(), ErrorInterceptor(limits.malformed_log_seconds)]
    if keys is not None:
        interceptors.append(AuthInterceptor(keys, roles, limits.key_recheck_seconds))
    limiter = StreamLimiter(config.max_streams, config.max_streams_per_key,
                            limits.max_keyless_streams, keys_verified=keys is not None)
    interceptors.append(limiter)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                   thread_name_prefix="gristmill-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=limits.max_pending_calls,
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    # bind first: a busy port fails before any service opens its storage
    health_servicer = health.HealthServicer()
    watch_health(health_servicer)
    health_server: tuple[grpc.Server, int] | tuple[None, None] = (None, None)
    try:
        port = _bind(server, config.host, config.port, _credentials(config), "--port")
        if config.health_port is not None:
            health_server = _health_server(config, health_servicer)
    except OSError:
        if keys is not None:
            keys.close()
        raise
    ctx = ServiceContext(config=config)
    for spec in specs:
        spec.build(ctx, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [s.full_name for s in specs] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    built = GristmillServer(server, health_servicer, ctx, specs, keys,
                            config.shutdown_grace_seconds, limiter, *health_server)
    return built, port


def _bind(server: grpc.Server, host: str, port: int,
          creds: grpc.ServerCredentials | None, option: str) -> int:
    """Listen on ``host:port``; the bound port, or OSError naming the option to change."""
    address = f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, creds) if creds is not None
                 else server.add_insecure_port(address))
    except RuntimeError:  # grpc: "Failed to bind to address ..."
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address}: port {port} is in use (or {host} is "
                      f"not an address of this host); stop what uses it or pick another "
                      f"port with {option}")
    return bound


class _CheckOnly(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """Health Check of another servicer; Watch stays unimplemented (it would hold a thread)."""

    def __init__(self, inner: health.HealthServicer) -> None:
        self._inner = inner

    def Check(self, request: health_pb2.HealthCheckRequest,  # noqa: N802 - gRPC's name
              context: grpc.ServicerContext) -> health_pb2.HealthCheckResponse:
        """The main server's status."""
        return self._inner.Check(request, context)


def _health_server(config: ServerConfig, servicer: health.HealthServicer
                   ) -> tuple[grpc.Server, int]:
    """A plaintext server with its own two threads that answers only health Check.

    Probes there never queue behind the main server's calls (Kubernetes'
    grpc probe speaks plaintext).
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2,
                                                    thread_name_prefix="gristmill-health"),
                         maximum_concurrent_rpcs=64, options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(_CheckOnly(servicer), server)
    port = _bind(server, config.host, config.health_port or 0, None, "health_port")
    return server, port


def ensure_admin_key(config: ServerConfig) -> Path | None:
    """On a data directory without keys, create an admin key; returns its file.

    Servers reading a shared key file create none: keys are made where that
    file is exported from.
    """
    if not config.auth.enabled or config.auth.shared_keys_file is not None:
        return None
    keys = KeyStore(config.keys_file)
    try:
        if keys.count_active() or keys.list():
            return None
        key, record = keys.create(Role.ADMIN, name="initial admin")
    finally:
        keys.close()
    path = config.data_dir / "admin.key"
    path.touch(mode=0o600)
    path.write_text(key + "\n")
    return path


def serve(config: ServerConfig, ready_file: Path | None = None) -> int:
    """Run until SIGTERM or SIGINT, then drain gracefully; returns the exit code.

    With ``ready_file``, writes ``{"port": ..., "metrics_port": ...}`` there once
    serving (atomically), so scripts can use port 0.
    """
    tune_malloc(arena_max=SERVER_ARENAS)  # memory freed by a stream can go back (trim)
    server, port = create_server(config)  # binds the port: a busy one fails before any key
    admin_file = ensure_admin_key(config)
    if admin_file is not None:
        print(f"created an admin API key, stored in {admin_file} (readable by you only)",
              file=sys.stderr, flush=True)
    server.start()
    metrics_port = None
    if config.metrics_port is not None:
        _, metrics_port = start_metrics_server(config.metrics_port, config.metrics_host)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("serving", extra={"address": f"{config.host}:{port}", "metrics_port": metrics_port,
                               "services": [s.name for s in server.services],
                               "tls": config.tls is not None})
    print(f"gristmill serving {', '.join(s.name for s in server.services)} on "
          f"{config.host}:{port}" + (f", metrics on :{metrics_port}" if metrics_port else "")
          + (f", health on :{server.health_port}" if server.health_port else ""),
          file=sys.stderr, flush=True)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps({"port": port, "metrics_port": metrics_port,
                                   "health_port": server.health_port}))
        os.replace(tmp, ready_file)
    while not stop.wait(0.5):
        if not server.serving():
            # e.g. "can't start new thread" killed gRPC's accepting thread: the
            # process would live on and serve nothing. Exit so a supervisor restarts it.
            log.critical("the gRPC serving thread died; exiting so that a supervisor "
                         "restarts this server")
            print("gristmill: the gRPC serving thread died (see the log); exiting",
                  file=sys.stderr, flush=True)
            server.stop(0)
            logging.shutdown()
            os._exit(SERVING_FAILED)  # RPC threads stuck in streams would block a normal exit
    server.stop()
    log.info("stopped")
    return 0
