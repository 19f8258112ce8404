"""Image facts from file headers, without decoding pixels."""

from __future__ import annotations

import mimetypes
import warnings
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from gristmill.v1 import store_pb2

__all__ = ["sniff"]

_EXIF_ORIENTATION = 0x0112
_OCTET = "application/octet-stream"


def sniff(path: str, reader: BinaryIO) -> tuple[str, store_pb2.ImageInfo | None]:
    """Media type and, for images Pillow recognises, size/format/orientation.

    Width and height are as displayed: EXIF orientations 5-8 (rotated by 90
    degrees) swap them, so aspect-ratio buckets are computed right.
    """
    guessed = mimetypes.guess_type(path)[0] or _OCTET
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(reader) as im:  # reads the header only
                width, height = im.size
                fmt = im.format or ""
                orientation = 0
                try:
                    orientation = int(im.getexif().get(_EXIF_ORIENTATION, 0) or 0)
                except Exception:  # noqa: BLE001 - broken EXIF is not fatal here
                    orientation = 0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return guessed, None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    media_type = Image.MIME.get(fmt, guessed)
    return media_type, store_pb2.ImageInfo(width=width, height=height, format=fmt,
                                           orientation=orientation)


Image.MAX_IMAGE_PIXELS = None  # we never decode here; the decode service has the limit
