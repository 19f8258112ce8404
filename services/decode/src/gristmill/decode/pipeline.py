"""One sample: decode, scale to cover the target, crop, resize; companions alike.

The geometry is worked out once, on the main image, as a crop window in
fractions of the upright image; every companion is cut with that same window,
so masks stay pixel-aligned with their image whatever their resolution.
The window is cut before resizing, so an extreme aspect ratio (9000x12) costs
no more than a normal one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pyvips

from gristmill.client.buckets import Bucket
from gristmill.decode.codecs import Array, Probe, decode_oriented, encode, probe, to_color
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.transform import Color, Crop, Encoding, Resample, Transform

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodedImage",
    "DecodedSample",
    "Window",
    "crop_window",
    "decode_sample",
]

#: Pixel limit when neither the decoder nor the transform sets one.
DEFAULT_MAX_PIXELS = 100_000_000
#: Largest relative difference of aspect ratio between a companion and its image.
COMPANION_ASPECT_TOLERANCE = 0.02

_CV_FILTER = {Resample.AREA: cv2.INTER_AREA, Resample.LINEAR: cv2.INTER_LINEAR,
              Resample.NEAREST: cv2.INTER_NEAREST}


@dataclass(frozen=True)
class Window:
    """The crop window as fractions of the upright source, and the cover scale."""

    x: float
    y: float
    width: float
    height: float
    #: Output pixels per source pixel.
    scale: float

    def pixels(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) on an image of this size, at least one pixel each way."""
        x0 = min(width - 1, round(self.x * width))
        y0 = min(height - 1, round(self.y * height))
        x1 = max(x0 + 1, min(width, round((self.x + self.width) * width)))
        y1 = max(y0 + 1, min(height, round((self.y + self.height) * height)))
        return x0, y0, x1, y1


@dataclass
class DecodedImage:
    """Pixels of one output image.

    Attributes:
        pixels: H x W x C uint8, C-contiguous.
        data: the re-encoded bytes when ``encoding`` is JPEG or PNG, else None.
        encoding: how the image is carried.
    """

    pixels: Array
    data: bytes | None = None
    encoding: Encoding = Encoding.RAW

    @property
    def width(self) -> int:
        """Width in pixels."""
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        """Height in pixels."""
        return int(self.pixels.shape[0])

    @property
    def channels(self) -> int:
        """1, 3 or 4 (or the companion's own count)."""
        return int(self.pixels.shape[2])

    def payload(self) -> bytes:
        """The bytes to send: encoded data, or the raw pixels."""
        return self.data if self.data is not None else self.pixels.tobytes()


@dataclass
class DecodedSample:
    """A decoded sample: main image, companions, bucket, source size."""

    image: DecodedImage
    companions: list[DecodedImage]
    bucket: Bucket | None
    #: (width, height) of the source after EXIF orientation.
    source_size: tuple[int, int]
    format: str
    #: channels of the source: 1 gray, 2 gray + alpha, 3 colour, 4 colour + alpha.
    source_channels: int = 3


def crop_window(width: int, height: int, target: tuple[int, int], crop: Crop,
                seeds: tuple[int, int] = (0, 0)) -> Window:
    """The window of a ``width`` x ``height`` image that scales to cover ``target``.

    The scale is max(tw/W, th/H); the window is the target's size divided by
    it, centred or placed uniformly at random from ``seeds``.
    """
    tw, th = target
    scale = max(tw / width, th / height)
    cw, ch = min(width, tw / scale), min(height, th / scale)
    if crop is Crop.RANDOM:
        u, v = np.random.default_rng(list(seeds)).random(2)
    else:
        u = v = 0.5
    x, y = (width - cw) * float(u), (height - ch) * float(v)
    return Window(x / width, y / height, cw / width, ch / height, scale)


def _resize(a: Array, size: tuple[int, int], resample: Resample) -> Array:
    tw, th = size
    if resample is Resample.AREA:
        a = _halve(a, size)
    if a.shape[1] == tw and a.shape[0] == th:
        return np.ascontiguousarray(a)
    if resample is Resample.LANCZOS:
        return _lanczos(np.ascontiguousarray(a), size)
    out = cv2.resize(a, (tw, th), interpolation=_CV_FILTER[resample])
    return out if out.ndim == 3 else out[..., None]


def _halve(a: Array, size: tuple[int, int]) -> Array:
    """Exact 2x2 box averages while ``a`` is at least twice ``size`` both ways.

    OpenCV's area filter has a fast path for halving only; at other ratios it
    is 3-4x slower per input pixel. A full-size PNG at 3x its bucket took 17 ms
    in one step and 8 ms halved first (the same filter family: Pillow's
    ``reducing_gap``). An odd last row or column is left out.
    """
    tw, th = size
    c = a.shape[2]
    while a.shape[1] >= 2 * tw and a.shape[0] >= 2 * th:
        h, w = a.shape[0] // 2, a.shape[1] // 2
        a = cv2.resize(a[:2 * h, :2 * w], (w, h), interpolation=cv2.INTER_AREA).reshape(h, w, c)
    return a


def _lanczos(a: Array, size: tuple[int, int]) -> Array:
    # libvips' resize widens the kernel when shrinking: antialiased, unlike cv2's LANCZOS4
    tw, th = size
    h, w, c = a.shape
    img = pyvips.Image.new_from_memory(a.data, w, h, c, "uchar")
    img = img.resize(tw / w, vscale=th / h, kernel="lanczos3")
    out: Array = np.frombuffer(img.write_to_memory(), np.uint8).reshape(img.height, img.width,
                                                                        c)
    if out.shape[:2] != (th, tw):  # rounding of the output size: fix the odd pixel
        out = cv2.resize(out, (tw, th), interpolation=cv2.INTER_LINEAR).reshape(th, tw, c)
    return out


def _render(data: bytes, info: Probe, window: Window, size: tuple[int, int], color: Color,
            resample: Resample, encoding: Encoding, transform: Transform) -> DecodedImage:
    a = decode_oriented(data, info, window.scale, color, transform.background)
    x0, y0, x1, y1 = window.pixels(a.shape[1], a.shape[0])
    out = to_color(_resize(a[y0:y1, x0:x1], size, resample), color)
    if encoding is Encoding.RAW:
        return DecodedImage(out)
    return DecodedImage(out, encode(out, encoding, transform.quality), encoding)


def _companion_scale(main: Probe, other: Probe, window: Window) -> float:
    # the companion may have another resolution: scale relative to its own size
    return window.scale * main.width / other.width


def decode_sample(image: bytes, transform: Transform, *, companions: Sequence[bytes] = (),
                  seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedSample:
    """Decode one sample; DecodeError (with the failing image's index) if it cannot be.

    Args:
        image: the encoded main image.
        transform: what to do with it.
        companions: encoded companion images, cut with the main image's geometry.
        seed: per-sample seed for random crops (combined with ``transform.seed``).
        max_pixels: the decoder's pixel limit; the transform may only lower it.
    """
    limit = min(max_pixels, transform.max_pixels or max_pixels)
    if transform.size is not None and transform.size[0] * transform.size[1] > max_pixels:
        w, h = transform.size  # the services refuse such a request before it gets here
        raise DecodeError(Reason.TOO_LARGE, f"the output size {w}x{h} is over the limit of "
                          f"{max_pixels / 1e6:.1f} MP (decode.max_pixels); ask for less")
    info = probe(image, limit)
    bucket = None
    table = transform.table
    if table is not None:
        bucket = table.nearest(info.width, info.height)
        size = (bucket.width, bucket.height)
        if size[0] * size[1] > max_pixels:
            raise DecodeError(Reason.TOO_LARGE, f"the bucket {size[0]}x{size[1]} is over the "
                              f"limit of {max_pixels / 1e6:.1f} MP (decode.max_pixels); ask for "
                              "a smaller image_size")
    else:
        assert transform.size is not None
        size = transform.size
    window = crop_window(info.width, info.height, size, transform.crop,
                         (transform.seed, seed))
    extra = []
    for i, data in enumerate(companions):
        try:
            cinfo = probe(data, limit)
        except DecodeError as e:
            raise e.for_image(i) from None
        main_ratio, ratio = info.width / info.height, cinfo.width / cinfo.height
        if abs(ratio / main_ratio - 1) > COMPANION_ASPECT_TOLERANCE:
            raise DecodeError(Reason.COMPANION_MISMATCH, f"companion {i} is {cinfo.width}x"
                              f"{cinfo.height} (after EXIF orientation), the image "
                              f"{info.width}x{info.height}: their aspect ratios differ by more "
                              f"than {COMPANION_ASPECT_TOLERANCE:.0%}; give the companion the "
                              f"image's shape", i)
        extra.append((data, cinfo))
    main = _render(image, info, window, size, transform.color, transform.resample,
                   transform.encoding, transform)
    # companions are re-encoded losslessly: JPEG artefacts would mix a mask's labels
    comp_encoding = Encoding.RAW if transform.encoding is Encoding.RAW else Encoding.PNG
    rendered = []
    comp = transform.companions
    for i, (data, cinfo) in enumerate(extra):
        cwindow = Window(window.x, window.y, window.width, window.height,
                         _companion_scale(info, cinfo, window))
        try:
            rendered.append(_render(data, cinfo, cwindow, size, comp.color, comp.resample,
                                    comp_encoding, transform))
        except DecodeError as e:
            raise e.for_image(i) from None
    return DecodedSample(main, rendered, bucket, (info.width, info.height), info.format,
                         info.channels)

