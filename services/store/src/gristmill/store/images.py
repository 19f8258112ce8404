"""Image facts from file headers, without decoding pixels."""

from __future__ import annotations

import mimetypes

from gristmill.client.imageinfo import ReadAt, read_header_at
from gristmill.v1 import store_pb2

__all__ = ["sniff"]

_OCTET = "application/octet-stream"


def sniff(path: str, read_at: ReadAt) -> tuple[str, store_pb2.ImageInfo | None]:
    """Media type and, for images, displayed size, format and orientation.

    Reads only the header through ``read_at(offset, length)``: a few KiB, at
    most :data:`gristmill.client.imageinfo.MAX_READ_BYTES` more, whatever
    size the header declares. Width and height are as displayed: EXIF
    orientations 5-8 (rotated by 90 degrees) swap them, so aspect-ratio
    buckets are computed right. Files that are not images of a known format
    get the media type their name suggests and no image facts.
    """
    header = read_header_at(read_at)
    if header is None:
        return mimetypes.guess_type(path)[0] or _OCTET, None
    return header.media_type, store_pb2.ImageInfo(width=header.width, height=header.height,
                                                  format=header.format,
                                                  orientation=header.orientation)
