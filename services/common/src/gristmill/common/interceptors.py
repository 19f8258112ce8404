"""Server interceptors: metrics (outermost), auth, and domain-error mapping.

Each wraps the method handler's behaviour once, for all four RPC kinds, with
the same small helper; streamed responses are wrapped as generators so that
errors raised mid-stream are mapped and timed too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_status import rpc_status

from gristmill.client.errors import GristmillError, Internal, Unauthenticated
from gristmill.common import metrics
from gristmill.common.auth import KeyStore, Role

__all__ = ["AuthInterceptor", "ErrorInterceptor", "MetricsInterceptor", "OPEN_SERVICES"]

log = logging.getLogger("gristmill.rpc")

#: Services anyone may call without a key (probes, tooling).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

Behavior = Callable[[Any, grpc.ServicerContext], Any]
#: wrap(behavior, method_name, streams_response) -> new behavior
Wrapper = Callable[[Behavior, str, bool], Behavior]


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _rewrap(handler: grpc.RpcMethodHandler[Any, Any], method: str, wrap: Wrapper
            ) -> grpc.RpcMethodHandler[Any, Any]:
    streams = bool(handler.response_streaming)
    factory: Callable[..., grpc.RpcMethodHandler[Any, Any]]
    behavior: Any
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return factory(wrap(behavior, method, streams),
                   request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)


class _Wrapping(grpc.ServerInterceptor):
    def wrap(self, behavior: Behavior, method: str, streams: bool) -> Behavior:
        raise NotImplementedError

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        return _rewrap(handler, details.method, self.wrap)


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code set on the call so far (None while it is running fine)."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    return code


def _abort(context: grpc.ServicerContext, error: GristmillError) -> None:
    context.abort_with_status(rpc_status.to_status(error.to_status()))


class ErrorInterceptor(_Wrapping):
    """Turns :class:`GristmillError` into its status; anything else into INTERNAL."""

    def wrap(self, behavior: Behavior, method: str, streams: bool) -> Behavior:
        """Map exceptions raised by ``behavior`` to statuses."""
        def handle(exc: Exception, context: grpc.ServicerContext) -> None:
            if isinstance(exc, GristmillError):
                _abort(context, exc)
            log.exception("unhandled error in %s", method, extra={"method": method})
            _abort(context, Internal(f"internal error in {method}: {type(exc).__name__}; "
                                     "see the server log"))

        if streams:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    if _code(context) is not None and not isinstance(exc, GristmillError):
                        raise  # already aborted by the handler itself
                    handle(exc, context)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                if _code(context) is not None and not isinstance(exc, GristmillError):
                    raise
                handle(exc, context)
        return unary


class MetricsInterceptor(_Wrapping):
    """Counts calls by status code, times them, tracks calls in flight."""

    def wrap(self, behavior: Behavior, method: str, streams: bool) -> Behavior:
        """Record count, code and latency of ``behavior``."""
        service, name = _split(method)
        total = metrics.RPC_TOTAL
        duration = metrics.RPC_DURATION.labels(service, name)
        in_flight = metrics.RPC_IN_FLIGHT.labels(service, name)

        def done(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = _code(context)
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            total.labels(service, name, code.name).inc()
            duration.observe(time.perf_counter() - start)
            in_flight.dec()

        if streams:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start, failed = time.perf_counter(), True
                in_flight.inc()
                try:
                    yield from behavior(request, context)
                    failed = False
                finally:
                    done(context, start, failed)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            start, failed = time.perf_counter(), True
            in_flight.inc()
            try:
                result = behavior(request, context)
                failed = False
                return result
            finally:
                done(context, start, failed)
        return unary


class AuthInterceptor(_Wrapping):
    """Requires ``authorization: Bearer <key>`` with a role high enough for the method."""

    def __init__(self, keys: KeyStore, roles: dict[str, Role]) -> None:
        self._keys = keys
        self._roles = roles

    def wrap(self, behavior: Behavior, method: str, streams: bool) -> Behavior:
        """Check the caller's key before ``behavior`` runs."""
        service, _ = _split(method)
        if service in OPEN_SERVICES:
            return behavior
        # methods nobody declared need admin: safe by default
        needed = self._roles.get(method, Role.ADMIN)

        def check(context: grpc.ServicerContext) -> None:
            header = dict(context.invocation_metadata()).get("authorization", "")
            scheme, _, token = str(header).partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise Unauthenticated(
                    "missing API key: send 'authorization: Bearer <key>' metadata (CLI: "
                    "--api-key or GRISTMILL_API_KEY)")
            key = self._keys.authenticate(token.strip())
            self._keys.require(key, needed, method)

        if streams:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                check(context)
                yield from behavior(request, context)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            check(context)
            return behavior(request, context)
        return unary
