"""Opening channels to a gristmill server: address, API key, TLS, limits, retries.

Every channel carries a gRPC service config that retries idempotent calls on
UNAVAILABLE (gRPC's own retry policy, about 3 s in all), and turns gRPC's
"failed to connect to all addresses" into ``no gristmill server at ADDR: ...``
with the reason :data:`~gristmill.client.errors.NO_SERVER`, so that a wrong
address or a server that is not up fails in seconds with a message that says
what to do.
"""

from __future__ import annotations

import json
import os
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gristmill.client.errors import NO_SERVER, Unavailable

__all__ = ["DEFAULT_ADDRESS", "SERVICE_CONFIG", "ConnectionOptions", "open_channel"]

DEFAULT_ADDRESS = "127.0.0.1:7450"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Calls that change nothing, so that gRPC may send them again. Calls that
#: change state (create, put, commit, delete) are never retried; the batch
#: stream resumes from its cursor in the Loader, with a backoff long enough
#: to outlast a server restart.
_IDEMPOTENT = {
    "gristmill.v1.StoreService": ["GetStoreInfo", "GetDataset", "ListDatasets", "FindBlobs",
                                  "FindFiles", "ListManifest", "GetManifest", "ReadFiles",
                                  "ListVersions"],
    "gristmill.v1.ArrayService": ["GetKeys", "ListKeys", "ListArrays", "GetArray"],
    "gristmill.v1.IngestService": ["PlanEpoch"],
    "gristmill.v1.DecodeService": ["ListBuckets"],
    "grpc.health.v1.Health": ["Check"],
}
#: gRPC's retry policy for those calls: 5 attempts, 0.2 s doubling to 2 s
#: (gRPC draws each delay at random below that), at most ~3 s before failing.
SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": s, "method": m} for s, ms in _IDEMPOTENT.items() for m in ms],
    "retryPolicy": {"maxAttempts": 5, "initialBackoff": "0.2s", "maxBackoff": "2s",
                    "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]},
}]})
#: How gRPC says that no connection could be made (as opposed to one that broke).
_CONNECT_FAILED = ("failed to connect to all addresses", "errors resolving",
                   "DNS resolution failed", "Name resolution failure",
                   "connections to all backends failing")


@dataclass(frozen=True)
class ConnectionOptions:
    """Where and how to connect; unset fields come from the environment.

    ``GRISTMILL_ADDRESS``, ``GRISTMILL_API_KEY`` and ``GRISTMILL_CA_FILE``
    (a PEM root certificate, which switches the channel to TLS). ``plaintext``
    True keeps the channel plain whatever ``GRISTMILL_CA_FILE`` says (an
    ``http://`` or ``grpc://`` address asked for it).
    """

    address: str | None = None
    api_key: str | None = None
    ca_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    plaintext: bool = False

    def resolved(self) -> ConnectionOptions:
        """A copy with environment defaults filled in."""
        if self.plaintext and self.ca_file is not None:
            raise ValueError("a plaintext connection was asked for together with a CA file; "
                             "drop one of them")
        ca = self.ca_file or (Path(v) if not self.plaintext and
                              (v := os.environ.get("GRISTMILL_CA_FILE")) else None)
        return ConnectionOptions(
            address=self.address or os.environ.get("GRISTMILL_ADDRESS") or DEFAULT_ADDRESS,
            api_key=self.api_key or os.environ.get("GRISTMILL_API_KEY") or None,
            ca_file=ca,
            max_message_bytes=self.max_message_bytes,
            plaintext=self.plaintext,
        )


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <key>`` to every call."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def _details(self, details: Any) -> Any:
        metadata = (*(details.metadata or ()), self._header)
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Iterator[Any]) -> Any:
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Iterator[Any]) -> Any:
        return continuation(self._details(details), request_iterator)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str | bytes], ...] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def _unreachable_message(address: str, details: str) -> str:
    """What to tell a user whose call could not connect to ``address`` (gRPC ``details``)."""
    if "handshake" in details.lower():
        return (f"cannot open a TLS connection to {address}: the server there does not use "
                "TLS, or its certificate is not signed by the CA given with --ca-file "
                "(GRISTMILL_CA_FILE)")
    cause = details.rsplit("last error: ", 1)[-1].rstrip("]").rsplit(": ", 1)[-1].strip()
    if cause == "Socket closed":
        cause = "the connection closed while opening: does the server expect TLS (--ca-file)?"
    return (f"no gristmill server at {address}: start `gristmill serve` or set "
            "GRISTMILL_ADDRESS" + (f" ({cause})" if cause else ""))


class _Unreachable(grpc.RpcError, grpc.Future, grpc.Call):  # type: ignore[type-arg]
    """A call that could not connect: UNAVAILABLE with a clear message and NO_SERVER.

    Shaped like gRPC's own failed outcome, so stubs raise it and
    :func:`~gristmill.client.errors.from_rpc_error` reads it like any other.
    """

    def __init__(self, address: str, error: grpc.RpcError) -> None:
        super().__init__()
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        self._status = Unavailable(_unreachable_message(address, details or ""),
                                   reason=NO_SERVER, metadata={"address": address})
        self._grpc_details = details

    def __str__(self) -> str:
        return self._status.message

    def initial_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return ()

    def trailing_metadata(self) -> Any:
        return (("grpc-status-details-bin", self._status.to_status().SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._status.message

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def running(self) -> bool:
        return False

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> Any:
        raise self

    def exception(self, timeout: float | None = None) -> grpc.RpcError:
        return self

    def traceback(self, timeout: float | None = None) -> types.TracebackType | None:
        return self.__traceback__

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        fn(self)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        raise self


def _connect_failed(error: BaseException | None) -> bool:
    return (isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call)
            and not isinstance(error, _Unreachable)
            and error.code() == grpc.StatusCode.UNAVAILABLE
            and any(s in (error.details() or "") for s in _CONNECT_FAILED))


class _Stream:
    """A streaming call whose connection failure reads as :class:`_Unreachable`."""

    def __init__(self, call: Any, address: str) -> None:
        self._call = call
        self._address = address

    def __iter__(self) -> _Stream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._call)
        except grpc.RpcError as e:
            if _connect_failed(e):
                raise _Unreachable(self._address, e) from None
            raise

    def __getattr__(self, name: str) -> Any:  # cancel(), code(), details(), ...
        return getattr(self._call, name)


class _NameTheAddress(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Replaces gRPC's "failed to connect" text with one naming the address and the fix."""

    def __init__(self, address: str) -> None:
        self._address = address

    def _outcome(self, outcome: Any) -> Any:
        if outcome.done() and _connect_failed(outcome.exception()):
            return _Unreachable(self._address, outcome.exception())
        return outcome

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any,
                              request: Any) -> Any:
        return self._outcome(continuation(details, request))

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any,
                               request_iterator: Iterator[Any]) -> Any:
        return self._outcome(continuation(details, request_iterator))

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any,
                               request: Any) -> Any:
        return _Stream(continuation(details, request), self._address)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any,
                                request_iterator: Iterator[Any]) -> Any:
        return _Stream(continuation(details, request_iterator), self._address)


def open_channel(options: ConnectionOptions | None = None) -> grpc.Channel:
    """Open a channel (TLS when a CA file is given) that sends the API key.

    Idempotent calls are retried by gRPC on UNAVAILABLE for about 3 s
    (:data:`SERVICE_CONFIG`); a call that cannot connect then fails with
    ``no gristmill server at ADDR: ...`` (reason ``NO_SERVER``).
    """
    opts = (options or ConnectionOptions()).resolved()
    assert opts.address is not None
    channel_options = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
    ]
    if opts.ca_file is not None:
        try:
            root = Path(opts.ca_file).read_bytes()
        except OSError as e:
            raise OSError(f"cannot read the TLS CA certificate {opts.ca_file} (--ca-file, "
                          f"GRISTMILL_CA_FILE): {e.strerror or e}") from e
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        channel = grpc.secure_channel(opts.address, creds, options=channel_options)
    else:
        channel = grpc.insecure_channel(opts.address, options=channel_options)
    interceptors: list[Any] = [_NameTheAddress(opts.address)]
    if opts.api_key:
        interceptors.append(_BearerInterceptor(opts.api_key))
    return grpc.intercept_channel(channel, *interceptors)
