"""Image facts from file headers alone: format, displayed size, EXIF orientation.

The store (for manifests) and the in-process folder ingest read image facts
with :func:`read_header`. It reads a few KiB from the start of the file, and
more only to walk JPEG marker segments, PNG chunks before ``IDAT``, WebP
chunks or a TIFF IFD, within fixed caps. It never decompresses anything, so
its cost does not depend on the number of pixels a header declares, and it
never raises on hostile bytes: a header it cannot read completely within the
caps is reported as not an image (``None``). The one exception is WebP's
orientation, kept in a chunk after the image data: when that walk is cut
short (a truncated file, or more frames than the caps), the size is still
given, with orientation 0.

Formats: JPEG (every SOFn marker, APP1 Exif and XMP orientation), PNG (IHDR,
``eXIf`` and uncompressed XMP before ``IDAT``), WebP (VP8, VP8L, VP8X with
its EXIF/XMP chunk), GIF (logical screen), TIFF and BigTIFF (IFD0), BMP.
Format names are the ones Pillow's ``Image.format`` gives, since manifests
written before this module used those.

Pure Python (standard library only), so every package can import it.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

__all__ = [
    "HEAD_BYTES",
    "MAX_READ_BYTES",
    "MAX_SEGMENTS",
    "ImageHeader",
    "ReadAt",
    "read_header",
    "read_header_at",
]

#: A random-access reader: ``read_at(offset, length)`` returns up to ``length``
#: bytes starting at ``offset`` (fewer at the end of the file).
ReadAt = Callable[[int, int], bytes]

#: Bytes read from the start of every file.
HEAD_BYTES = 4096
#: Bytes read beyond the head at most, for metadata segments and chunk walks.
MAX_READ_BYTES = 256 * 1024
#: JPEG marker segments, PNG/WebP chunks or TIFF IFD entries walked at most.
MAX_SEGMENTS = 1024

_WINDOW = 1024  # smallest read past the head, so neighbouring small segments share one
_EXIF_SEGMENT_MAX = 65536  # an APP1 segment is at most 64 KiB; eXIf/EXIF chunks are cut there
_MAX_SIDE = 2**31 - 1  # manifests keep sides as int32
_MAX_OFFSET = 2**62  # offsets past this are garbage (and overflow os.pread's off_t)
_EXIF_ORIENTATION = 0x0112
_IMAGE_WIDTH = 0x0100
_IMAGE_LENGTH = 0x0101
_SAMPLES_PER_PIXEL = 0x0115
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(?:="|>)([0-9])')
_XMP_JPEG = b"http://ns.adobe.com/xap/1.0/\x00"
_XMP_PNG = b"XML:com.adobe.xmp\x00"

_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
                "GIF": "image/gif", "TIFF": "image/tiff", "BMP": "image/bmp"}


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image's header says.

    Attributes:
        format: Pillow's name for the format: "JPEG", "PNG", "WEBP", "GIF",
            "TIFF" or "BMP".
        media_type: The IANA media type, e.g. "image/jpeg".
        width: Width as displayed: EXIF orientations 5-8 (a quarter turn)
            swap the stored sides.
        height: Height as displayed.
        orientation: EXIF orientation 1-8 (from Exif, or XMP when Exif has
            none); 0 when absent or out of range.
        components: Samples per stored pixel (1 grey or palette, 2 grey and
            alpha, 3 colour, 4 colour and alpha or CMYK); 0 when the header
            does not say.
    """

    format: str
    media_type: str
    width: int
    height: int
    orientation: int = 0
    components: int = 0

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) of the pixels as stored, before orientation."""
        if self.orientation >= 5:
            return self.height, self.width
        return self.width, self.height


class _Stop(Exception):
    """The header is truncated, malformed, or needs more than the caps allow."""


class _Source:
    """Bounded random access: the head once, then windows charged to a budget."""

    def __init__(self, read_at: ReadAt) -> None:
        self._read_at = read_at
        self.head = bytes(read_at(0, HEAD_BYTES))[:HEAD_BYTES]
        self._whole = len(self.head) < HEAD_BYTES  # the head is the whole file
        self._window = b""
        self._window_at = 0
        self.budget = MAX_READ_BYTES
        self.steps = 0

    def step(self) -> None:
        """Count one segment, chunk or entry walked."""
        self.steps += 1
        if self.steps > MAX_SEGMENTS:
            raise _Stop("too many segments")

    def get(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or :class:`_Stop`."""
        data = self.read(offset, length)
        if len(data) != length:
            raise _Stop("truncated")
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the file)."""
        end = offset + length
        if offset < 0 or length < 0 or end > _MAX_OFFSET:
            raise _Stop("offset outside any file")  # before os.pread overflows
        if end <= len(self.head) or self._whole:
            return self.head[offset:end]
        w = self._window_at
        if w <= offset and end <= w + len(self._window):
            return self._window[offset - w:end - w]
        size = max(length, _WINDOW)
        if size > self.budget:
            raise _Stop("read budget spent")
        self.budget -= size
        data = bytes(self._read_at(offset, size))[:size]
        self._window, self._window_at = data, offset
        return data[:length]


def read_header_at(read_at: ReadAt) -> ImageHeader | None:
    """Image facts from a random-access reader.

    Args:
        read_at: ``read_at(offset, length)`` returns up to ``length`` bytes
            from ``offset``; called at most a few hundred times, for at most
            :data:`HEAD_BYTES` plus :data:`MAX_READ_BYTES` bytes in all.

    Returns:
        The header's facts, or None for anything that is not a complete,
        well-formed header of a supported format within the caps.

    Raises:
        OSError: Only if ``read_at`` raises it; malformed bytes never raise.
    """
    src = _Source(read_at)
    head = src.head
    try:
        if head.startswith(b"\xff\xd8\xff"):
            return _jpeg(src)
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return _png(src)
        if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
            return _webp(src)
        if head.startswith((b"GIF87a", b"GIF89a")):
            return _gif(src)
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return _tiff(src)
        if head.startswith(b"BM"):
            return _bmp(src)
    except (_Stop, struct.error, IndexError, ValueError):
        return None
    return None


def read_header(source: bytes | bytearray | memoryview | BinaryIO | str | os.PathLike[str]
                ) -> ImageHeader | None:
    """Image facts from bytes, a seekable binary file, or a file path.

    Args:
        source: The whole file or a prefix of it as bytes; an open seekable
            binary file (its position is changed); or a path, opened and
            closed here.

    Returns:
        As :func:`read_header_at`.

    Raises:
        OSError: If the file cannot be opened or read.
    """
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        return read_header_at(lambda offset, length: data[offset:offset + length])
    if isinstance(source, str | os.PathLike):
        fd = os.open(source, os.O_RDONLY)
        try:
            return read_header_at(lambda offset, length: os.pread(fd, length, offset))
        finally:
            os.close(fd)
    f = source

    def read_at(offset: int, length: int) -> bytes:
        f.seek(offset)
        return f.read(length)

    return read_header_at(read_at)


def _result(fmt: str, width: int, height: int, orientation: int = 0,
            components: int = 0) -> ImageHeader | None:
    if not (0 < width <= _MAX_SIDE and 0 < height <= _MAX_SIDE):
        return None
    if not 1 <= orientation <= 8:
        orientation = 0
    if orientation >= 5:
        width, height = height, width
    return ImageHeader(fmt, _MEDIA_TYPES[fmt], width, height, orientation, components)


def _xmp_orientation(xmp: bytes) -> int | None:
    match = _XMP_ORIENTATION.search(xmp)
    return int(match[1]) if match else None


# JPEG ---------------------------------------------------------------------
# frame headers: SOF0-3, 5-7, 9-11, 13-15, and DHP (hierarchical)
_SOF = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC),
                  *range(0xCD, 0xD0), 0xDE})
# markers with no length: TEM, RST0-7, SOI
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})


def _jpeg(src: _Source) -> ImageHeader | None:
    pos = 2
    frame: tuple[int, int, int] | None = None
    exif: int | None = None
    xmp: int | None = None
    while True:
        src.step()
        if src.get(pos, 1)[0] != 0xFF:
            pos += 1  # junk between segments; Pillow skips it too
            continue
        marker = src.get(pos + 1, 1)[0]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x00 or marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: the header is over
            break
        length = struct.unpack(">H", src.get(pos + 2, 2))[0]
        if length < 2:
            return None
        body = pos + 4
        if marker in _SOF and frame is None:
            _precision, height, width, components = struct.unpack(">BHHB", src.get(body, 6))
            frame = (width, height, components)
        elif marker == 0xE1 and length > 8:
            # identify by the prefix; read the whole segment only when it is needed
            prefix = src.get(body, min(length - 2, len(_XMP_JPEG)))
            if prefix.startswith(b"Exif\x00\x00") and exif is None:
                exif = _exif_orientation(src.get(body + 6, length - 8))
            elif prefix == _XMP_JPEG and xmp is None:
                xmp = _xmp_orientation(src.get(body, length - 2))
        pos = body + length - 2
    if frame is None:
        return None
    orientation = exif if exif is not None else xmp or 0
    return _result("JPEG", frame[0], frame[1], orientation, frame[2])


# PNG ----------------------------------------------------------------------
_PNG_COMPONENTS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png(src: _Source) -> ImageHeader | None:
    length, kind = struct.unpack(">I4s", src.get(8, 8))
    if kind != b"IHDR" or length != 13:
        return None
    width, height, _depth, color = struct.unpack(">IIBB", src.get(16, 10))
    exif: int | None = None
    xmp: int | None = None
    pos = 8 + 12 + 13
    while True:
        src.step()
        length, kind = struct.unpack(">I4s", src.get(pos, 8))
        if length > _MAX_SIDE:
            return None
        if kind in (b"IDAT", b"IEND"):
            break
        if kind == b"eXIf" and exif is None:
            exif = _exif_orientation(src.get(pos + 8, min(length, _EXIF_SEGMENT_MAX)))
        elif (kind == b"iTXt" and xmp is None and length <= _EXIF_SEGMENT_MAX
              and src.get(pos + 8, min(length, len(_XMP_PNG))) == _XMP_PNG):
            xmp = _png_xmp(src.get(pos + 8, length))
        pos += 12 + length
    orientation = exif if exif is not None else xmp or 0
    return _result("PNG", width, height, orientation, _PNG_COMPONENTS.get(color, 0))


def _png_xmp(body: bytes) -> int | None:
    # keyword NUL, compression flag, method, language NUL, translated keyword NUL, text
    keyword, _, rest = body.partition(b"\x00")
    if keyword != b"XML:com.adobe.xmp" or rest[:1] != b"\x00":
        return None  # another keyword, or compressed (never inflated here)
    return _xmp_orientation(rest)


# WebP ---------------------------------------------------------------------
def _webp(src: _Source) -> ImageHeader | None:
    kind = src.get(12, 4)
    body = src.get(20, 10)
    if kind == b"VP8 ":
        if body[3:6] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", body[6:10])
        return _result("WEBP", width & 0x3FFF, height & 0x3FFF, 0, 3)
    if kind == b"VP8L":
        if body[0] != 0x2F:
            return None
        bits = struct.unpack("<I", body[1:5])[0]
        alpha = (bits >> 28) & 1
        return _result("WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 0, 3 + alpha)
    if kind != b"VP8X":
        return None
    flags = body[0]
    width = int.from_bytes(body[4:7], "little") + 1
    height = int.from_bytes(body[7:10], "little") + 1
    orientation = 0
    if flags & 0x0C:  # EXIF or XMP chunk present: they follow the image data
        try:
            orientation = _webp_orientation(src, 12 + 8 + 10)
        except (_Stop, struct.error):
            orientation = 0  # cut short or past the caps (many frames): size without it
    return _result("WEBP", width, height, orientation, 4 if flags & 0x10 else 3)


def _webp_orientation(src: _Source, pos: int) -> int:
    xmp: int | None = None
    while True:
        src.step()
        header = src.read(pos, 8)
        if len(header) < 8:
            break  # the end of the file
        kind, length = struct.unpack("<4sI", header)
        if kind == b"EXIF":
            data = src.get(pos + 8, min(length, _EXIF_SEGMENT_MAX))
            exif = _exif_orientation(data[6:] if data.startswith(b"Exif\x00\x00") else data)
            if exif is not None:
                return exif
        elif kind == b"XMP " and xmp is None and length <= _EXIF_SEGMENT_MAX:
            xmp = _xmp_orientation(src.get(pos + 8, length))
        pos += 8 + length + (length & 1)
    return xmp or 0


# GIF, BMP -----------------------------------------------------------------
def _gif(src: _Source) -> ImageHeader | None:
    width, height = struct.unpack("<HH", src.get(6, 4))
    return _result("GIF", width, height, 0, 1)


def _bmp(src: _Source) -> ImageHeader | None:
    header_size = struct.unpack("<I", src.get(14, 4))[0]
    if header_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", src.get(18, 4))
    elif 40 <= header_size <= 124:  # BITMAPINFOHEADER and its successors
        width, height = struct.unpack("<ii", src.get(18, 8))
        height = abs(height)  # negative: stored top-down
    else:
        return None
    return _result("BMP", width, height)


# TIFF and Exif ------------------------------------------------------------
_TYPE_SIZES = {1: 1, 3: 2, 4: 4, 16: 8}  # BYTE, SHORT, LONG, LONG8: the unsigned integers


def _ifd0(read: Callable[[int, int], bytes], step: Callable[[], None], wanted: frozenset[int]
          ) -> dict[int, int]:
    """The first value of each wanted unsigned-integer tag in a TIFF stream's IFD0.

    ``read(offset, length)`` returns exactly ``length`` bytes of the TIFF
    stream (offsets relative to its byte-order mark) or raises.
    """
    order = read(0, 4)
    if order[:2] == b"II":
        e = "<"
    elif order[:2] == b"MM":
        e = ">"
    else:
        raise _Stop("no TIFF byte order")
    magic = struct.unpack(e + "H", order[2:4])[0]
    # entry count, value count and offset formats
    if magic == 42:
        count_fmt, n_fmt, offset_fmt = "H", "I", "I"
        ifd = struct.unpack(e + "I", read(4, 4))[0]
    elif magic == 43:  # BigTIFF
        count_fmt, n_fmt, offset_fmt = "Q", "Q", "Q"
        ifd = struct.unpack(e + "Q", read(8, 8))[0]
    else:
        raise _Stop("bad TIFF magic")
    count_size = struct.calcsize(count_fmt)
    value_size = struct.calcsize(offset_fmt)
    entry_size = 4 + 2 * value_size
    count = struct.unpack(e + count_fmt, read(ifd, count_size))[0]
    if count > MAX_SEGMENTS:
        raise _Stop("too many IFD entries")
    entries = read(ifd + count_size, count * entry_size)
    found: dict[int, int] = {}
    for i in range(count):
        step()
        entry = entries[i * entry_size:(i + 1) * entry_size]
        tag, kind = struct.unpack(e + "HH", entry[:4])
        if tag not in wanted or tag in found or kind not in _TYPE_SIZES:
            continue
        size = _TYPE_SIZES[kind]
        n = struct.unpack(e + n_fmt, entry[4:4 + value_size])[0]
        if n < 1:
            continue
        field = entry[4 + value_size:]
        if n * size > value_size:  # stored elsewhere; the first value is at the offset
            offset = struct.unpack(e + offset_fmt, field)[0]
            field = read(offset, size)
        found[tag] = int.from_bytes(field[:size], "little" if e == "<" else "big")
    return found


def _exif_orientation(tiff: bytes) -> int | None:
    """Orientation from an in-memory Exif TIFF stream; None if it has none.

    Pillow accepts a doubled "Exif" prefix, so this does too.
    """
    if tiff.startswith(b"Exif\x00\x00"):
        tiff = tiff[6:]

    def read(offset: int, length: int) -> bytes:
        data = tiff[offset:offset + length]
        if len(data) != length or offset < 0:
            raise _Stop("Exif offset outside the segment")
        return data

    steps = 0

    def step() -> None:
        nonlocal steps
        steps += 1
        if steps > MAX_SEGMENTS:
            raise _Stop("too many IFD entries")

    try:
        tags = _ifd0(read, step, frozenset({_EXIF_ORIENTATION}))
    except (_Stop, struct.error, IndexError, ValueError):
        return None  # a broken Exif block does not make a broken image
    return tags.get(_EXIF_ORIENTATION)


def _tiff(src: _Source) -> ImageHeader | None:
    tags = _ifd0(src.get, src.step,
                 frozenset({_IMAGE_WIDTH, _IMAGE_LENGTH, _EXIF_ORIENTATION, _SAMPLES_PER_PIXEL}))
    if _IMAGE_WIDTH not in tags or _IMAGE_LENGTH not in tags:
        return None
    return _result("TIFF", tags[_IMAGE_WIDTH], tags[_IMAGE_LENGTH],
                   tags.get(_EXIF_ORIENTATION, 0), tags.get(_SAMPLES_PER_PIXEL, 1))
