"""Bytes to pixels and back, in native code: simplejpeg for JPEG, libvips for the rest.

Everything here releases the GIL while it works (libjpeg-turbo through
simplejpeg, libvips through cffi, OpenCV), so a thread pool scales with cores.
The format is sniffed from the bytes, never taken from a file name.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import cv2
import numpy as np
import pyvips
import simplejpeg
from PIL import Image

from gristmill.client.imageinfo import read_header
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.transform import Color, Encoding

__all__ = ["Probe", "decode_oriented", "encode", "probe", "to_color"]

# one thread per image: our pool runs images in parallel, libraries must not add threads
cv2.setNumThreads(1)
pyvips.concurrency_set(1)
# libvips' operation cache would keep decoded images of past requests alive
pyvips.cache_set_max(0)
# never hand untrusted bytes to ImageMagick and the other loaders libvips marks unsafe
pyvips.block_untrusted_set(True)

#: libvips loaders allowed (besides JPEG, which libjpeg-turbo decodes directly).
VIPS_FORMATS = frozenset({"jpeg", "png", "webp", "tiff", "gif", "heif", "jp2k", "jxl"})
_SUPPORTED = "JPEG, PNG, WebP, TIFF, GIF (and HEIF, JPEG 2000, JPEG XL where libvips has them)"

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_PALETTE = 3
#: Channels of the PNG colour types OpenCV decodes here (gray, RGB, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 6: 4}
#: Chunks looked at before the image data for :func:`_plain_png`.
_PNG_HEADER_CHUNKS = 64

Array = np.ndarray


@dataclass(frozen=True)
class Probe:
    """What an image's header says, read before any pixel is decoded.

    Attributes:
        format: "jpeg", "png", "webp", ... (sniffed from the bytes).
        width: width after EXIF orientation.
        height: height after EXIF orientation.
        orientation: EXIF orientation 1-8 (1: as stored).
        jpeg_colorspace: libjpeg-turbo's colour space for JPEGs it decodes
            directly; None when libvips decodes the image.
    """

    format: str
    width: int
    height: int
    orientation: int = 1
    jpeg_colorspace: str | None = None
    #: A palette (indexed colour) PNG.
    palette: bool = False
    vips: pyvips.Image | None = field(default=None, compare=False, repr=False)
    #: IHDR colour type (0 gray, 2 RGB, 6 RGBA) of a plain 8-bit PNG that OpenCV
    #: decodes (see :func:`_plain_png`); None otherwise.
    png_color_type: int | None = None

    @property
    def channels(self) -> int:
        """The source's own channels: 1 gray, 2 gray + alpha, 3 colour, 4 colour + alpha.

        Transparency chunks (a PNG's tRNS) count as alpha; CMYK counts as colour.
        """
        if self.jpeg_colorspace is not None:
            return 1 if self.jpeg_colorspace == "Gray" else 3
        if self.png_color_type is not None:
            return _PNG_CHANNELS[self.png_color_type]
        img = self.vips
        if img is None:
            return 3
        alpha = bool(img.hasalpha())
        if img.interpretation in ("b-w", "grey16") or img.bands - alpha == 1:
            return 1 + alpha
        return 3 + alpha

    @property
    def stored_size(self) -> tuple[int, int]:
        """(width, height) as stored, before orientation."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def _looks_truncated(data: bytes, fmt: str, detail: str) -> bool:
    text = detail.lower()
    if "premature end" in text or "truncat" in text or "unexpected end" in text:
        return True
    if fmt == "jpeg":
        return b"\xff\xd9" not in data[-64:]
    if fmt == "png":
        return _png_ends_early(data)
    return False


def _plain_png(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour type) of a PNG OpenCV decodes as libvips would; else None.

    Plain means 8-bit gray, RGB or RGBA, with no transparency chunk, EXIF block
    or animation before the image data: everything else goes to libvips.
    """
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    depth, color = data[24], data[25]
    if depth != 8 or color not in _PNG_CHANNELS:
        return None
    for kind, _ in islice(_png_chunks(data), 1 + _PNG_HEADER_CHUNKS):  # IHDR, then the rest
        if kind == b"IDAT":
            return width, height, color
        if kind in (b"tRNS", b"eXIf", b"acTL"):
            return None
    return None


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, int]]:
    """(type, data length) of each chunk whose header lies in ``data``, from the first."""
    pos = len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        yield data[pos + 4:pos + 8], length
        pos += 12 + length


def _png_ends_early(data: bytes) -> bool:
    """Walk the chunks: True if they run past the end before IEND, False if one is garbage."""
    for kind, length in _png_chunks(data):
        if not kind.isalpha() or length > 2**31 - 1:
            return False
        if kind == b"IEND":
            return False
    return True


def failure(data: bytes, fmt: str, detail: str) -> DecodeError:
    """TRUNCATED when the bytes stop early, else CORRUPT, with the decoder's words."""
    detail = " ".join(detail.split()) or "the decoder gave no detail"
    if _looks_truncated(data, fmt, detail):
        return DecodeError(Reason.TRUNCATED, f"{fmt} file ends before its image data does "
                           f"({len(data)} bytes; {detail}); re-upload the complete file")
    return DecodeError(Reason.CORRUPT, f"{fmt} data is corrupt ({detail}); re-encode or drop "
                       f"the file")


def _check_pixels(fmt: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(Reason.CORRUPT, f"{fmt} header declares an empty image "
                          f"({width}x{height})")
    if width * height > max_pixels:
        raise DecodeError(Reason.TOO_LARGE, f"{fmt} image is {width}x{height} = "
                          f"{width * height / 1e6:.1f} MP, over the limit of "
                          f"{max_pixels / 1e6:.1f} MP; downscale the file or raise the limit "
                          f"(decode.max_pixels)")


def _jpeg_orientation(data: bytes) -> int:
    """EXIF orientation (1-8; 1 when absent or unreadable), read as the store reads it.

    :func:`gristmill.client.imageinfo.read_header` (Exif, else XMP) is what the
    store and ``Loader.from_folder`` plan buckets by, so the decoder must turn
    the image the same way. It reads the header segments only (~10 us).
    """
    header = read_header(data)
    return header.orientation if header is not None and header.orientation else 1


def _oriented(fmt: str, w: int, h: int, orientation: int, **kw: object) -> Probe:
    if orientation >= 5:
        w, h = h, w
    return Probe(fmt, w, h, orientation, **kw)  # type: ignore[arg-type]


def probe(data: bytes, max_pixels: int) -> Probe:
    """Read the header; DecodeError for empty, unknown, broken or too large images."""
    if not data:
        raise DecodeError(Reason.CORRUPT, "the file is empty (0 bytes); re-upload it")
    if data.startswith(_JPEG_MAGIC):
        try:
            h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        except ValueError as e:
            raise failure(data, "jpeg", str(e)) from None
        _check_pixels("jpeg", w, h, max_pixels)
        orientation = _jpeg_orientation(data)
        if colorspace in ("CMYK", "YCCK"):
            # libjpeg-turbo cannot convert these to RGB; libvips does, with ICC profiles
            return _oriented("jpeg", w, h, orientation, vips=_vips_header(data, "jpeg"))
        return _oriented("jpeg", w, h, orientation, jpeg_colorspace=colorspace)
    fmt = "png" if data.startswith(_PNG_MAGIC) else "image"
    plain = _plain_png(data) if fmt == "png" else None
    if plain is not None:
        _check_pixels(fmt, plain[0], plain[1], max_pixels)
        return Probe(fmt, plain[0], plain[1], png_color_type=plain[2])
    img = _vips_header(data, fmt)
    fmt = str(img.get("vips-loader")).removesuffix("_buffer").removesuffix("load")
    if fmt not in VIPS_FORMATS:
        raise _unsupported(data, f"{fmt} is not on the list of formats decoded here")
    _check_pixels(fmt, img.width, img.height, max_pixels)
    orientation = int(img.get("orientation")) if img.get_typeof("orientation") else 1
    palette = fmt == "png" and len(data) > 25 and data[25] == _PNG_PALETTE  # IHDR colour type
    return _oriented(fmt, img.width, img.height, orientation if 1 <= orientation <= 8 else 1,
                     vips=img, palette=palette)


def _vips_header(data: bytes, fmt: str) -> pyvips.Image:
    try:
        return pyvips.Image.new_from_buffer(data, "", access="sequential", fail_on="truncated")
    except pyvips.Error as e:
        if "not in a known format" in e.detail or "is blocked" in e.detail:
            raise _unsupported(data, "no decoder recognises it") from None
        raise failure(data, fmt, e.detail) from None


def _unsupported(data: bytes, why: str) -> DecodeError:
    return DecodeError(Reason.UNSUPPORTED_FORMAT, f"not an image format this server decodes "
                       f"({why}; first bytes {data[:8].hex()}); use {_SUPPORTED}")


# orientation (EXIF 1-8) -> view that shows the stored array upright
def _apply_orientation(a: Array, orientation: int) -> Array:
    if orientation == 2:
        return a[:, ::-1]
    if orientation == 3:
        return a[::-1, ::-1]
    if orientation == 4:
        return a[::-1]
    if orientation == 5:
        return a.transpose(1, 0, 2)
    if orientation == 6:
        return a.transpose(1, 0, 2)[:, ::-1]
    if orientation == 7:
        return a[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return a.transpose(1, 0, 2)[::-1]
    return a


#: JPEG has no alpha: RGBA is decoded as RGB and gains its opaque alpha after the
#: resize (:func:`to_color`), so the resize moves 3 channels, not 4.
_JPEG_COLORSPACE = {Color.RGB: "RGB", Color.RGBA: "RGB", Color.GRAY: "GRAY"}


def decode_oriented(data: bytes, info: Probe, scale: float, color: Color,
                    background: tuple[int, int, int]) -> Array:
    """Decode to an upright H x W x C uint8 array at least ``scale`` times the full size.

    JPEGs are decoded by libjpeg-turbo at the smallest DCT scale (1/8 ... 1) that is
    still at least ``scale``, straight into the requested layout, so the resize
    that follows is small. Other formats go through libvips at full size, alpha
    composited unless RGBA is asked for; their channels may still differ from
    ``color`` (convert after resizing, with :func:`to_color`, where it is cheaper).

    The returned array may be a strided view (orientation is applied as a view).
    """
    scale = min(1.0, scale)
    if info.jpeg_colorspace is not None:
        w, h = info.stored_size
        cs = (("GRAY" if info.jpeg_colorspace == "Gray" else "RGB") if color is Color.KEEP
              else _JPEG_COLORSPACE[color])
        try:
            a = simplejpeg.decode_jpeg(data, colorspace=cs, strict=True,
                                       min_width=math.ceil(w * scale),
                                       min_height=math.ceil(h * scale))
        except ValueError as e:
            raise failure(data, "jpeg", str(e)) from None
    else:
        a = _decode_png(data, info, color) if info.png_color_type is not None else None
        if a is None:
            a = _decode_vips(data, info, color, background, scale)
    return _apply_orientation(a, info.orientation)


def _decode_png(data: bytes, info: Probe, color: Color) -> Array | None:
    """A plain PNG decoded by OpenCV (libpng, no GIL, no extra copy), in its own channels.

    None where libvips must do it: an RGBA PNG to flatten (libvips composites
    it), channels kept as they are, or a file OpenCV cannot read (libvips then
    names the fault).
    """
    kind = info.png_color_type
    if color is Color.KEEP or (kind == 6 and color is not Color.RGBA):
        return None
    buf = np.frombuffer(data, np.uint8)
    if kind == 0:
        a = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)
        return None if a is None else a[..., None]
    if kind == 2:
        return cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
    a = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.shape[2] != 4:
        return None
    return cv2.cvtColor(a, cv2.COLOR_BGRA2RGBA)


def _palette_indices(data: bytes) -> Array:
    # libvips expands palettes to colours; a label mask needs the indices themselves
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)[..., None]
    except Exception as e:
        raise failure(data, "png", str(e)) from None


def _decode_vips(data: bytes, info: Probe, color: Color, background: tuple[int, int, int],
                 scale: float = 1.0) -> Array:
    if color is Color.KEEP and info.palette:
        return _palette_indices(data)
    img = info.vips if info.vips is not None else _vips_header(data, info.format)
    try:
        if info.format == "webp" and scale < 1:
            img = _webp_scaled(data, info, scale)
        if color is Color.KEEP:
            if img.format != "uchar":
                img = img.colourspace("b-w" if img.bands <= 2 else "srgb")
        else:
            # 16-bit, CMYK, Lab, ... to 8-bit sRGB; plain 8-bit RGB and gray pass as they
            # are (channel changes are cheaper after the resize, see to_color)
            if img.format != "uchar" or img.interpretation not in ("srgb", "b-w"):
                img = img.colourspace("srgb")
            if img.hasalpha() and color is not Color.RGBA:
                bg = list(background) if img.bands >= 3 else [_luma(background)]
                img = img.flatten(background=bg)
        if img.format != "uchar":
            img = img.cast("uchar")
        raw = img.write_to_memory()
    except pyvips.Error as e:
        raise failure(data, info.format, e.detail) from None
    a: Array = np.frombuffer(raw, np.uint8).reshape(img.height, img.width, img.bands)
    return a


def _webp_scaled(data: bytes, info: Probe, scale: float) -> pyvips.Image:
    """The WebP decoded by libwebp straight at about ``scale`` (never below it).

    libwebp scales while it decodes: a 4 MP WebP for a 512 px bucket took
    39 ms instead of 54 ms at full size.
    """
    w, h = info.stored_size
    # libvips rounds the scaled size: ask for half a pixel more than the least needed
    s = min(1.0, max(math.ceil(w * scale) / w, math.ceil(h * scale) / h) + 0.5 / min(w, h))
    return pyvips.Image.webpload_buffer(data, scale=s, access="sequential",
                                        fail_on="truncated")


def _luma(rgb: tuple[int, int, int]) -> int:
    r, g, b = rgb
    return round(0.299 * r + 0.587 * g + 0.114 * b)


_TO_COLOR = {
    (1, Color.RGB): cv2.COLOR_GRAY2RGB, (3, Color.GRAY): cv2.COLOR_RGB2GRAY,
    (1, Color.RGBA): cv2.COLOR_GRAY2RGBA, (3, Color.RGBA): cv2.COLOR_RGB2RGBA,
    (4, Color.RGB): cv2.COLOR_RGBA2RGB, (4, Color.GRAY): cv2.COLOR_RGBA2GRAY,
}


def to_color(a: Array, color: Color) -> Array:
    """Convert H x W x C pixels to the requested layout (KEEP: unchanged)."""
    channels = a.shape[2]
    if color is Color.KEEP or channels == color.value:
        return a
    if channels == 2:  # gray + alpha
        if color is Color.RGBA:
            out: Array = np.concatenate([np.repeat(a[..., :1], 3, axis=2), a[..., 1:]], axis=2)
            return out
        a = np.ascontiguousarray(a[..., :1])
        channels = 1
        if color is Color.GRAY:
            return a
    out = cv2.cvtColor(a, _TO_COLOR[(channels, color)])
    return out if out.ndim == 3 else out[..., None]


def encode(pixels: Array, encoding: Encoding, quality: int) -> bytes:
    """Re-encode an H x W x C uint8 array as JPEG or PNG."""
    channels = pixels.shape[2]
    if encoding is Encoding.JPEG:
        cs = {1: "GRAY", 3: "RGB"}.get(channels)
        if cs is None:
            raise ValueError(f"JPEG cannot carry {channels} channels; use PNG or RAW")
        return bytes(simplejpeg.encode_jpeg(pixels, quality=quality, colorspace=cs))
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif channels == 4:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
