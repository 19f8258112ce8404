"""Opening channels to a gristmill server: address, API key, TLS, limits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = ["DEFAULT_ADDRESS", "ConnectionOptions", "open_channel"]

DEFAULT_ADDRESS = "127.0.0.1:7450"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class ConnectionOptions:
    """Where and how to connect; unset fields come from the environment.

    ``GRISTMILL_ADDRESS``, ``GRISTMILL_API_KEY`` and ``GRISTMILL_CA_FILE``
    (a PEM root certificate, which switches the channel to TLS).
    """

    address: str | None = None
    api_key: str | None = None
    ca_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES

    def resolved(self) -> ConnectionOptions:
        """A copy with environment defaults filled in."""
        ca = self.ca_file or (Path(v) if (v := os.environ.get("GRISTMILL_CA_FILE")) else None)
        return ConnectionOptions(
            address=self.address or os.environ.get("GRISTMILL_ADDRESS") or DEFAULT_ADDRESS,
            api_key=self.api_key or os.environ.get("GRISTMILL_API_KEY") or None,
            ca_file=ca,
            max_message_bytes=self.max_message_bytes,
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


def open_channel(options: ConnectionOptions | None = None) -> grpc.Channel:
    """Open a channel (TLS when a CA file is given) that sends the API key."""
    opts = (options or ConnectionOptions()).resolved()
    assert opts.address is not None
    channel_options = [
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.max_send_message_length", opts.max_message_bytes),
    ]
    if opts.ca_file is not None:
        creds = grpc.ssl_channel_credentials(root_certificates=Path(opts.ca_file).read_bytes())
        channel = grpc.secure_channel(opts.address, creds, options=channel_options)
    else:
        channel = grpc.insecure_channel(opts.address, options=channel_options)
    if opts.api_key:
        channel = grpc.intercept_channel(channel, _BearerInterceptor(opts.api_key))
    return channel
