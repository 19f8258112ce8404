"""Server interceptors: metrics (outermost), error mapping, auth, stream limits.

Each wraps the method handler's behaviour once, for all four RPC kinds, with
the same small helper; streamed responses are wrapped as generators so that
errors raised mid-stream are mapped and timed too.

What a hostile client cannot do, and where that is enforced:

- **Call without a valid key**: :class:`AuthInterceptor` checks the key in
  ``intercept_service``, which gRPC runs when the call arrives, before the
  request body is read or parsed. A refused call gets a handler that never
  reads its request.
- **Keep using a revoked key**: long streams re-check the key every
  ``limits.key_recheck_seconds``, and a request stream (PutFiles) once more
  when it ends, before anything it sent is committed.
- **Hold every thread**: :class:`StreamLimiter` bounds open streams per server
  and per key below the thread pool, so unary calls and health always find a
  thread.
- **Flood the log**: a request that does not parse is INVALID_ARGUMENT, logged
  at WARNING at most once per peer per ``limits.malformed_log_seconds``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeAlias

import grpc
from grpc_status import rpc_status

from gristmill.client.errors import (
    GristmillError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from gristmill.common import metrics
from gristmill.common.auth import KeyChecker, Role

__all__ = [
    "OPEN_SERVICES",
    "AuthInterceptor",
    "ErrorInterceptor",
    "MetricsInterceptor",
    "StreamLimiter",
]

log = logging.getLogger("gristmill.rpc")

#: Services anyone may call without a key (probes, tooling).
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})

Behavior = Callable[[Any, grpc.ServicerContext], Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
#: wrap(behavior, handler) -> new behavior; the handler tells which RPC kind it is
Wrapper: TypeAlias = "Callable[[Behavior, Handler], Behavior]"
Metadata = Sequence[tuple[str, str | bytes]] | None


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _streams(handler: Handler) -> bool:
    return bool(handler.request_streaming or handler.response_streaming)


def _rewrap(handler: Handler, wrap: Wrapper,
            deserializer: Callable[[bytes], Any] | None = None) -> Handler:
    factory: Callable[..., Handler]
    behavior: Any
    if handler.request_streaming and handler.response_streaming:
        factory, behavior = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behavior = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behavior = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behavior = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    return factory(wrap(behavior, handler),
                   request_deserializer=deserializer or handler.request_deserializer,
                   response_serializer=handler.response_serializer)


def _rejection(error: GristmillError) -> Handler:
    """A handler that fails the call with ``error`` and never reads its request.

    It is a stream-stream handler whatever the method's kind: gRPC then never
    receives or parses a message for it, and answers any client with a status.
    """
    def reject(_requests: Iterator[Any], _context: grpc.ServicerContext) -> Iterator[Any]:
        raise error
        yield  # pragma: no cover - makes this a generator

    metrics.RPC_REJECTED.labels(error.reason).inc()
    return grpc.stream_stream_rpc_method_handler(reject)


#: The stream-limit bucket of open services (health, reflection), keys or not.
_KEYLESS = "(open services)"


def _bearer(metadata: Metadata) -> str:
    for name, value in metadata or ():
        if name == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""


def _key_id(metadata: Metadata) -> str:
    """The key id of a ``gm_<id>_<secret>`` bearer token ("" if none); not a check."""
    parts = _bearer(metadata).split("_", 2)
    return parts[1][:32] if len(parts) == 3 and parts[0] == "gm" else ""


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status code set on the call so far (None while it is running fine)."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    return code


def _abort(context: grpc.ServicerContext, error: GristmillError) -> None:
    context.abort_with_status(rpc_status.to_status(error.to_status()))


class _Wrapping(grpc.ServerInterceptor):
    def wrap(self, behavior: Behavior, handler: Handler, method: str) -> Behavior:
        raise NotImplementedError

    def deserializer(self, handler: Handler) -> Callable[[bytes], Any] | None:
        """How requests are parsed (None: as the handler parses them)."""
        return None

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        return _rewrap(handler, lambda b, h: self.wrap(b, h, method), self.deserializer(handler))


class _Malformed:
    """Stands in for a request message that did not parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``parse`` returning :class:`_Malformed` instead of raising (gRPC would log a traceback)."""
    if parse is None:
        return None

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the client's
            return _Malformed(exc)
    return tolerant


def _host(peer: str) -> str:
    """``ipv4:10.0.0.1:53211`` -> ``ipv4:10.0.0.1`` (a reconnecting client is one host)."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class _PeerLog:
    """At most one warning per peer host per interval, and a few per interval in all.

    What is not logged is counted and reported with the next warning that is.
    """

    #: Warnings per interval across all hosts (a spoofing or many-host flood).
    MAX_PER_INTERVAL = 10

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._window = (0.0, 0)  # start of the current interval, warnings in it
        self._suppressed = 0
        self._lock = threading.Lock()

    def warn(self, peer: str, message: str, *args: object) -> None:
        now = time.monotonic()
        host = _host(peer)
        with self._lock:
            start, count = self._window
            if now - start >= self._interval:
                start, count = now, 0
            if now - self._last.get(host, -1e18) < self._interval or \
                    count >= self.MAX_PER_INTERVAL:
                self._suppressed += 1
                return
            if len(self._last) > 4096:
                self._last = {h: t for h, t in self._last.items()
                              if now - t < self._interval}
            self._last[host] = now
            self._window = (start, count + 1)
            suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            message += f" ({suppressed} similar warnings suppressed)"
        log.warning(message, *args, extra={"peer": peer})


class ErrorInterceptor(_Wrapping):
    """Turns :class:`GristmillError` into its status; anything else into INTERNAL.

    Also answers requests that do not parse with INVALID_ARGUMENT.
    """

    def __init__(self, malformed_log_seconds: float = 60.0) -> None:
        self._peers = _PeerLog(malformed_log_seconds)

    def deserializer(self, handler: Handler) -> Callable[[bytes], Any] | None:
        """Parse requests without raising (gRPC would log a traceback)."""
        return _tolerant(handler.request_deserializer)

    def _malformed(self, request: _Malformed, method: str,
                   context: grpc.ServicerContext) -> InvalidArgument:
        service, name = _split(method)
        metrics.RPC_MALFORMED.labels(service, name).inc()
        self._peers.warn(context.peer(), "malformed %s request from %s: %s", method,
                         context.peer(), request.error)
        return InvalidArgument("request", f"the {name} request message does not parse "
                               f"({type(request.error).__name__}); send a {name}Request built "
                               "from the gristmill protos", reason="MALFORMED_REQUEST")

    def wrap(self, behavior: Behavior, handler: Handler, method: str) -> Behavior:
        """Map exceptions raised by ``behavior`` to statuses."""
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            if handler.request_streaming:
                return self._parsed(request, method, context)
            if isinstance(request, _Malformed):
                raise self._malformed(request, method, context)
            return request

        def handle(exc: Exception, context: grpc.ServicerContext) -> None:
            if isinstance(exc, GristmillError):
                _abort(context, exc)
            log.exception("unhandled error in %s", method, extra={"method": method})
            _abort(context, Internal(f"internal error in {method}: {type(exc).__name__}; "
                                     "see the server log"))

        if handler.response_streaming:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from behavior(checked(request, context), context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status
                    if _code(context) is not None and not isinstance(exc, GristmillError):
                        raise  # already aborted by the handler itself
                    handle(exc, context)
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return behavior(checked(request, context), context)
            except Exception as exc:  # noqa: BLE001 - mapped to a status
                if _code(context) is not None and not isinstance(exc, GristmillError):
                    raise
                handle(exc, context)
        return unary

    def _parsed(self, requests: Iterator[Any], method: str,
                context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if isinstance(request, _Malformed):
                raise self._malformed(request, method, context)
            yield request


class MetricsInterceptor(_Wrapping):
    """Counts calls by status code, times them, tracks calls in flight."""

    def wrap(self, behavior: Behavior, handler: Handler, method: str) -> Behavior:
        """Record count, code and latency of ``behavior``."""
        service, name = _split(method)
        duration = metrics.RPC_DURATION.labels(service, name)
        in_flight = metrics.RPC_IN_FLIGHT.labels(service, name)

        def done(context: grpc.ServicerContext, start: float, failed: bool) -> None:
            code = _code(context)
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            metrics.RPC_TOTAL.labels(service, name, code.name).inc()
            duration.observe(time.perf_counter() - start)
            in_flight.dec()

        if handler.response_streaming:
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


class AuthInterceptor(grpc.ServerInterceptor):
    """Requires ``authorization: Bearer <key>`` with a role high enough for the method.

    The key is checked when the call arrives, before its request is read; long
    streams re-check it every ``recheck_seconds`` and request streams once more
    at their end, so a revoked key stops streaming and cannot commit an upload.
    """

    def __init__(self, keys: KeyChecker, roles: dict[str, Role], recheck_seconds: float = 5.0
                 ) -> None:
        self._keys = keys
        self._roles = roles
        self._recheck = recheck_seconds

    def _check(self, token: str, needed: Role, method: str) -> None:
        if not token:
            raise Unauthenticated(
                "missing API key: send 'authorization: Bearer <key>' metadata (CLI: "
                "--api-key or GRISTMILL_API_KEY)")
        key = self._keys.authenticate(token)
        self._keys.require(key, needed, method)

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """Refuse the call now (request unread) or wrap it with periodic re-checks.

        The key is checked before the interceptors after this one run, so the
        stream limiter only ever sees keys that were verified.
        """
        method = details.method
        if _split(method)[0] in OPEN_SERVICES:
            return continuation(details)
        # methods nobody declared need admin: safe by default
        needed = self._roles.get(method, Role.ADMIN)
        token = _bearer(details.invocation_metadata)
        try:
            self._check(token, needed, method)
        except GristmillError as e:
            return _rejection(e)
        except sqlite3.Error as e:  # the key file is unreadable: not the caller's fault
            log.error("cannot read API keys: %s", e)
            return _rejection(Unavailable(
                "the server cannot read its API keys right now; retry, and tell the operator",
                reason="KEYS_UNAVAILABLE"))
        handler = continuation(details)
        if handler is None:
            return None
        if not _streams(handler):
            return handler
        return _rewrap(handler, lambda b, h: self._rechecking(b, h, token, needed, method))

    def _rechecking(self, behavior: Behavior, handler: Handler, token: str, needed: Role,
                    method: str) -> Behavior:
        interval = self._recheck

        def recheck() -> None:
            try:
                self._check(token, needed, method)
            except sqlite3.Error:
                return  # the key file is briefly unreadable: check again next time
            except GristmillError as e:
                metrics.RPC_REJECTED.labels("KEY_REVOKED").inc()
                log.warning("ending %s: the caller's API key is no longer valid (%s)", method,
                            e.message)
                raise

        def paced(items: Iterator[Any]) -> Iterator[Any]:
            """``items``, re-checking the key whenever ``interval`` has passed."""
            due = time.monotonic() + interval
            for item in items:
                if time.monotonic() >= due:
                    recheck()
                    due = time.monotonic() + interval
                yield item

        def requests(it: Iterator[Any]) -> Iterator[Any]:
            yield from paced(it)
            recheck()  # the stream is complete: what it sent may now be committed

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            return behavior(requests(request) if handler.request_streaming else request,
                            context)

        if not handler.response_streaming:
            return call

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            responses = call(request, context)
            try:
                yield from paced(responses)
            finally:
                responses.close()
        return stream


class StreamLimiter(grpc.ServerInterceptor):
    """Bounds open streams per server and per API key; excess gets RESOURCE_EXHAUSTED.

    A stream holds an RPC thread while it is open (even when its client has
    stopped reading), so this bound is what keeps threads free for unary
    calls and health checks. Streams of open services (health Watch,
    reflection) count too, under the empty key.
    """

    def __init__(self, max_streams: int, max_per_key: int, max_keyless: int,
                 keys_verified: bool = True) -> None:
        self._max = max_streams
        self._max_per_key = max_per_key
        self._max_keyless = max_keyless
        #: False when auth is off: a key id in the header proves nothing then
        self._keys_verified = keys_verified
        self._lock = threading.Lock()
        self._open = 0
        self._by_key: Counter[str] = Counter()

    @property
    def open_streams(self) -> int:
        """Streams open now."""
        return self._open

    def _refusal(self, key: str) -> ResourceExhausted | None:
        if self._open >= self._max:
            return ResourceExhausted(
                f"this server has {self._open} open streams, its limit (limits.max_streams); "
                "retry with backoff, or ask the operator to raise limits.max_streams and "
                "max_workers or add replicas", reason="TOO_MANY_STREAMS")
        if key == _KEYLESS:
            if self._by_key[key] >= self._max_keyless:
                return ResourceExhausted(
                    f"{self._by_key[key]} streams without an API key (health Watch, reflection) "
                    "are open, the limit (limits.max_keyless_streams); close some or retry "
                    "later", reason="TOO_MANY_STREAMS_PER_KEY")
            return None
        if self._by_key[key] >= self._max_per_key:
            who = f"API key {key}" if key else "this server's callers (auth is off)"
            return ResourceExhausted(
                f"{who}: {self._by_key[key]} open streams already, the per-key limit "
                "(limits.max_streams_per_key); close finished streams (e.g. Loader.close()) "
                "or use another key", reason="TOO_MANY_STREAMS_PER_KEY")
        return None

    def _acquire(self, key: str) -> None:
        with self._lock:
            refusal = self._refusal(key)
            if refusal is not None:
                metrics.RPC_REJECTED.labels(refusal.reason).inc()
                raise refusal
            self._open += 1
            self._by_key[key] += 1
        metrics.RPC_STREAMS_OPEN.inc()

    def _release(self, key: str) -> None:
        with self._lock:
            self._open -= 1
            self._by_key[key] -= 1
            if self._by_key[key] <= 0:
                del self._by_key[key]
        metrics.RPC_STREAMS_OPEN.dec()

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        """Refuse a stream over the limits before it takes a thread; hold a slot while open."""
        handler = continuation(details)
        if handler is None or not _streams(handler):
            return handler
        if _split(details.method)[0] in OPEN_SERVICES:
            key = _KEYLESS  # whatever the header claims: nobody checked it
        elif self._keys_verified:
            key = _key_id(details.invocation_metadata)  # verified by AuthInterceptor
        else:
            key = ""
        with self._lock:
            refusal = self._refusal(key)
        if refusal is not None:
            return _rejection(refusal)

        def wrap(behavior: Behavior, h: Handler) -> Behavior:
            if h.response_streaming:
                def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                    self._acquire(key)  # authoritative: the check above may have raced
                    try:
                        yield from behavior(request, context)
                    finally:
                        self._release(key)
                return stream

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                self._acquire(key)
                try:
                    return behavior(request, context)
                finally:
                    self._release(key)
            return unary
        return _rewrap(handler, wrap)
