"""Output sizes known before decoding, checked against a server's configured limits.

A transform fixes the largest output it can produce (a fixed size, or the
largest bucket of its table), so a request that would exceed the decoder's
pixel limit, a gRPC message or a memory budget is refused up front, before a
byte is decoded, with RESOURCE_EXHAUSTED naming the field, the limit's config
key and the fix.
"""

from __future__ import annotations

import functools

from gristmill.client.buckets import BucketConfig, bucket_table
from gristmill.client.errors import ResourceExhausted
from gristmill.decode.transform import Color, Transform

__all__ = [
    "MESSAGE_FRAMING",
    "check_output_pixels",
    "channels",
    "mib",
    "output_size",
    "sample_bytes",
    "size_field",
    "too_large",
]

#: Bytes of a message kept for everything but pixels (ids, shapes, errors, framing).
MESSAGE_FRAMING = 256 * 1024


def mib(n: int) -> str:
    """``n`` bytes in MiB, for messages."""
    return f"{n / 2**20:.1f} MiB"


def output_size(transform: Transform) -> tuple[int, int]:
    """(width, height) of the largest output: the fixed size, or the largest bucket."""
    if transform.size is not None:
        return transform.size
    assert transform.buckets is not None
    return _largest_bucket(transform.buckets)


@functools.lru_cache(maxsize=64)
def _largest_bucket(config: BucketConfig) -> tuple[int, int]:
    biggest = max(bucket_table(config).buckets, key=lambda b: b.width * b.height)
    return biggest.width, biggest.height


def channels(color: Color) -> int:
    """Channels of an output in ``color`` (KEEP: at most 4)."""
    return color.value or 4


def sample_bytes(transform: Transform, companions: int, size: tuple[int, int] | None = None
                 ) -> int:
    """Raw output bytes of one sample with ``companions``, at ``size`` (default: the largest)."""
    w, h = size or output_size(transform)
    return w * h * (channels(transform.color)
                    + companions * channels(transform.companions.color))


def size_field(transform: Transform, prefix: str = "transform") -> str:
    """The request field that sets the output size."""
    return f"{prefix}.fixed" if transform.size is not None else f"{prefix}.buckets.image_size"


def too_large(field: str, limit: str, message: str, reason: str) -> ResourceExhausted:
    """RESOURCE_EXHAUSTED for a request over a configured limit (the field and key in metadata)."""
    return ResourceExhausted(f"{field}: {message}", reason=reason,
                             metadata={"field": field, "limit": limit})


def check_output_pixels(transform: Transform, max_pixels: int, prefix: str = "transform"
                        ) -> None:
    """Refuse a transform whose output may have more than ``max_pixels`` pixels."""
    w, h = output_size(transform)
    if w * h > max_pixels:
        field = size_field(transform, prefix)
        raise too_large(field, "decode.max_pixels",
                        f"the output is up to {w}x{h} = {w * h / 1e6:.1f} MP, over this "
                        f"server's limit of {max_pixels / 1e6:.1f} MP (decode.max_pixels); ask "
                        "for a smaller size", "OUTPUT_TOO_LARGE")
