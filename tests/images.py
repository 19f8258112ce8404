"""Messy images made on the spot: every case the decoder must survive."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
import pyvips
import simplejpeg
from PIL import Image

#: Quadrant colours of :func:`quadrants`: top-left, top-right, bottom-left, bottom-right.
QUADRANT_COLORS = np.array([[220, 30, 30], [30, 200, 30], [30, 30, 220], [240, 240, 240]],
                           np.uint8)

# upright -> stored: the inverse of what Pillow's exif_transpose applies
_TO_STORED = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
              6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_270}


def quadrants(width: int, height: int) -> np.ndarray:
    """An upright test card: four coloured quadrants."""
    a = np.empty((height, width, 3), np.uint8)
    hy, hx = height // 2, width // 2
    a[:hy, :hx], a[:hy, hx:] = QUADRANT_COLORS[0], QUADRANT_COLORS[1]
    a[hy:, :hx], a[hy:, hx:] = QUADRANT_COLORS[2], QUADRANT_COLORS[3]
    return a


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image (compresses like a photo, resizes predictably)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    fx, fy = rng.uniform(20, 80, 2)
    base = 128 + 60 * np.sin(x / fx) + 50 * np.cos(y / fy)
    img = np.stack([base, 255 * x / max(1, width - 1), 255 * y / max(1, height - 1)], -1)
    out: np.ndarray = np.clip(img, 0, 255).astype(np.uint8)
    return out


def encode(a: np.ndarray, fmt: str = "JPEG", **kw: object) -> bytes:
    """Encode an array (H x W x C or H x W) with Pillow."""
    buf = io.BytesIO()
    Image.fromarray(a.squeeze() if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, fmt, **kw)
    return buf.getvalue()


def oriented_jpeg(upright: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels need EXIF ``orientation`` to look like ``upright``."""
    img = Image.fromarray(upright)
    if orientation in _TO_STORED:
        img = img.transpose(_TO_STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def cmyk_jpeg(cmyk: tuple[int, int, int, int], size: int = 64) -> bytes:
    """A plain CMYK JPEG (Adobe, as Photoshop writes) of one ink mix, written by Pillow."""
    a = np.empty((size, size, 4), np.uint8)
    a[...] = cmyk
    buf = io.BytesIO()
    Image.fromarray(a, "CMYK").save(buf, "JPEG", quality=95)
    return buf.getvalue()


def ycck_jpeg(cmyk: tuple[int, int, int, int], size: int = 64) -> bytes:
    """A YCCK JPEG (libjpeg-turbo writes CMYK input as YCCK; inverted, Adobe style)."""
    a = np.empty((size, size, 4), np.uint8)
    a[...] = [255 - c for c in cmyk]
    return bytes(simplejpeg.encode_jpeg(a, quality=95, colorspace="CMYK"))


def png16(value: int, width: int = 30, height: int = 20) -> bytes:
    """A 16-bit RGB PNG filled with ``value`` (0-65535)."""
    a = np.full((height, width, 3), value, np.uint16)
    img = pyvips.Image.new_from_memory(a.tobytes(), width, height, 3, "ushort")
    return bytes(img.copy(interpretation="rgb16").pngsave_buffer())


def palette_png(transparent_left: bool = True) -> bytes:
    """10x10 palette PNG: left half index 0 (transparent), right half index 1 (green)."""
    img = Image.new("P", (10, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.paste(1, (5, 0, 10, 10))
    buf = io.BytesIO()
    if transparent_left:
        img.save(buf, "PNG", transparency=0)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))


def huge_png_header(width: int = 60000, height: int = 60000) -> bytes:
    """A small, valid-looking PNG whose header declares width x height pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * min(width, 100))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def huge_jpeg_header(width: int = 60000, height: int = 60000) -> bytes:
    """A small JPEG with its frame header rewritten to declare width x height."""
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@functools.lru_cache(maxsize=4)
def png_bomb(width: int = 20000, height: int = 20000, color_type: int = 0) -> bytes:
    """A valid PNG of all-zero pixels, compressed with zlib (no Pillow, no pixel array).

    20000 x 20000 grey is 400 MB of pixels in 389 KB; colour type 2 (RGB) is
    1.2 GB in 1.2 MB. Made row block by row block, so making it costs little memory.
    """
    channels = {0: 1, 2: 3, 6: 4}[color_type]
    row = b"\x00" * (1 + width * channels)  # filter byte 0, then the samples
    rows_per_block = max(1, (4 << 20) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))
