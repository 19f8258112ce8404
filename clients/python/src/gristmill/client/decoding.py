"""Client of the decode service: bucket tables, and a stream of batches to pixels."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gristmill.client.channel import DEFAULT_MAX_MESSAGE_BYTES, ConnectionOptions, open_channel
from gristmill.client.errors import call_rpc, stream_rpc
from gristmill.v1 import decode_pb2, decode_pb2_grpc

__all__ = ["DecodeClient", "to_array"]


def to_array(image: decode_pb2.DecodedImage) -> np.ndarray:
    """A read-only H x W x C uint8 view of a raw decoded image (no copy)."""
    if image.encoding not in (decode_pb2.ENCODING_UNSPECIFIED, decode_pb2.ENCODING_RAW):
        raise ValueError(f"this image is encoded ({decode_pb2.Encoding.Name(image.encoding)}); "
                         "decode its bytes with an image library, or ask for ENCODING_RAW")
    data = image.data  # each access to a bytes field copies it: read it once
    return np.frombuffer(data, np.uint8).reshape(image.height, image.width, image.channels)


class DecodeClient:
    """Connection to a decode service.

    Args:
        address: host:port; default ``GRISTMILL_ADDRESS`` or 127.0.0.1:7450.
        api_key: default ``GRISTMILL_API_KEY``.
        ca_file: PEM CA certificate for TLS; default ``GRISTMILL_CA_FILE``.
        max_message_bytes: largest response accepted (a batch of raw pixels is big).
    """

    def __init__(self, address: str | None = None, api_key: str | None = None,
                 ca_file: Path | str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self._channel = open_channel(ConnectionOptions(
            address, api_key, Path(ca_file) if ca_file else None, max_message_bytes))
        self._stub = decode_pb2_grpc.DecodeServiceStub(self._channel)

    def close(self) -> None:
        """Close the connection."""
        self._channel.close()

    def __enter__(self) -> DecodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_buckets(self, image_size: int, downsampling: int = 16, min_aspect: float = 0.5,
                     max_aspect: float = 2.0) -> list[decode_pb2.Bucket]:
        """The bucket table of a configuration, sorted by aspect ratio."""
        config = decode_pb2.BucketConfig(image_size=image_size, downsampling=downsampling,
                                         min_aspect=min_aspect, max_aspect=max_aspect)
        resp = call_rpc(self._stub.ListBuckets, decode_pb2.ListBucketsRequest(config=config))
        return list(resp.buckets)

    def decode(self, requests: Iterable[decode_pb2.DecodeRequest]
               ) -> Iterator[decode_pb2.DecodeResponse]:
        """Send batches, get one response per batch, in order.

        ``requests`` is consumed lazily on gRPC's thread, so a generator may
        produce batches while earlier ones are decoded; the server reads no
        further ahead than its in-flight bound.
        """
        yield from stream_rpc(self._stub.Decode(iter(requests)))
