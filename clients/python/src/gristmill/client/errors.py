"""Typed errors shared by the gristmill client and servers.

Servers raise these; one interceptor turns them into a gRPC status with a
``google.rpc.ErrorInfo`` detail (AIP-193). Clients turn a ``grpc.RpcError``
back into the same class with :func:`from_rpc_error`, so callers can write
``except NotFound:`` on either side of the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import ClassVar, Protocol, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "DOMAIN",
    "NO_SERVER",
    "Aborted",
    "AlreadyExists",
    "DataLoss",
    "FailedPrecondition",
    "GristmillError",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "call_rpc",
    "from_item_error",
    "from_rpc_error",
    "stream_rpc",
]

DOMAIN = "gristmill.dev"
#: Reason of the :class:`Unavailable` raised when a call could not connect at all
#: (no server at the address, a name that does not resolve, a TLS mismatch).
NO_SERVER = "NO_SERVER"


class GristmillError(Exception):
    """Base class: a message for people, a reason for programs."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNSPECIFIED"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def to_status(self) -> status_pb2.Status:
        """The google.rpc.Status carrying this error and its ErrorInfo."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN,
                                           metadata=self.metadata)
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.add().Pack(info)
        return status


class InvalidArgument(GristmillError):
    """A request field is malformed; ``metadata["field"]`` names it."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}", reason=reason, metadata={"field": field})
        self.field = field


class NotFound(GristmillError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(GristmillError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(GristmillError):
    """The system is not in the state the request needs."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(GristmillError):
    """A conditional write lost a race (the state moved on); re-read and retry."""

    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DataLoss(GristmillError):
    """Bytes did not match their hash or size."""

    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unauthenticated(GristmillError):
    """No API key, or an unknown or revoked one."""

    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(GristmillError):
    """The API key's role may not call this method."""

    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(GristmillError):
    """A limit was hit (message size, pixels, queue)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(GristmillError):
    """The server cannot be reached or is shutting down; retry later."""

    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Internal(GristmillError):
    """A bug or an unexpected failure on the server."""

    code = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[GristmillError]] = {
    cls.code: cls
    for cls in (NotFound, AlreadyExists, Aborted, FailedPrecondition, DataLoss,
                Unauthenticated, PermissionDenied, ResourceExhausted, Unavailable, Internal)
}


def from_item_error(code: int, reason: str, message: str) -> GristmillError:
    """The exception for a per-item error record (``gristmill.v1.ItemError`` fields)."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if status == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("item", message, reason=reason)
    return _BY_CODE.get(status, GristmillError)(message, reason=reason)


def from_rpc_error(error: grpc.RpcError) -> GristmillError:
    """Turn a failed call into the matching :class:`GristmillError` subclass."""
    code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    reason: str | None = None
    metadata: dict[str, str] = {}
    if isinstance(error, grpc.Call):
        status = rpc_status.from_call(error)
        for detail in status.details if status is not None else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = metadata.get("field", "request")
        err: GristmillError = InvalidArgument(field, message, reason=reason)
        err.message = message
        err.args = (message,)
        err.metadata.update(metadata)
        return err
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"deadline exceeded: {message}", reason="DEADLINE_EXCEEDED")
    cls = _BY_CODE.get(code, GristmillError)
    result = cls(message, reason=reason, metadata=metadata)
    if cls is GristmillError:
        result.reason = reason or code.name
    return result


T = TypeVar("T")
R = TypeVar("R")


def call_rpc(method: Callable[[R], T], request: R) -> T:
    """Call a unary method; a failed call raises the matching :class:`GristmillError`."""
    try:
        return method(request)
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None


class _PagedRequest(Protocol):
    page_token: str


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


P = TypeVar("P", bound=_PagedRequest)
Pg = TypeVar("Pg", bound=_Page)


def call_pages(method: Callable[[P], Pg], request: P) -> Iterator[Pg]:
    """Every page of an AIP-158 list call (the request's page_token is advanced)."""
    while True:
        page = call_rpc(method, request)
        yield page
        if not page.next_page_token:
            return
        request.page_token = page.next_page_token


def stream_rpc(it: Iterable[T]) -> Iterator[T]:
    """Iterate a streaming call; a failed call raises the matching :class:`GristmillError`."""
    try:
        yield from it
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
