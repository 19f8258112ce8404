"""A drop-in for datago's ``DatagoClient`` (2026.10.1) on local folders, backed by gristmill.

Switch by changing one import::

    # from datago import DatagoClient
    from gristmill.client.datago import DatagoClient

    client = DatagoClient(json.dumps({
        "source_type": "file",
        "source_config": {"root_path": "/data/images", "random_sampling": True,
                          "rank": 0, "world_size": 1},
        "image_config": {"crop_and_resize": True, "default_image_size": 512,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0},
        "limit": 1000, "samples_buffer_size": 64}))
    client.start()
    while (sample := client.get_sample()) is not None:
        sample.image.to_pil_image()  # in its aspect-ratio bucket

Samples look like datago's: ``sample.image`` is an :class:`ImagePayload` (a PIL
image that also has ``to_pil_image()``, ``to_numpy_array()`` and
``get_payload()``), ids are the file path in double quotes, and
``get_sample_auto_convert()`` returns a dict of plain Python types. Images are
decoded by the in-process gristmill pipeline (``Loader.from_folder``).

Where gristmill differs from datago on purpose: EXIF orientation is applied
(datago ignores it); ``limit`` is exactly the number of samples per pass
(datago hands out one more on a single rank); transparent pixels are composited
over white when RGB is asked for; ranks are split by a stable hash of the path,
but not datago's hash, so a file may land on another rank than under datago.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import warnings
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from gristmill.client.loader import Batch, Loader

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DatagoClient", "DatagoCompatibilityWarning", "ImagePayload", "ImagePayloadData",
           "Sample"]

log = logging.getLogger(__name__)

#: Samples decoded together (one bucket per batch); any size works for a per-sample API.
#: Small, because each bucket's last batch is padded with repeats that are
#: decoded and then skipped: 2 wastes at most one decode per bucket, where 8
#: wasted up to 7 (about a tenth of a 400-image folder); a batch costs ~0.25 ms.
_BATCH = 2
#: datago 2026.10.1's keys for the file source; others are refused or warned about.
_TOP_KEYS = {"source_type", "source_config", "image_config", "limit", "samples_buffer_size"}
_SOURCE_KEYS = {"root_path", "random_sampling", "rank", "world_size"}
_IMAGE_KEYS = {"crop_and_resize", "default_image_size", "downsampling_ratio",
               "min_aspect_ratio", "max_aspect_ratio", "pre_encode_images", "image_to_rgb8",
               "encode_format", "jpeg_quality"}
#: gristmill additions to datago's configuration.
_EXTRA_TOP_KEYS = {"seed"}
_ENCODE_FORMATS = ("png", "jpeg")
#: datago's JPEG quality when ``jpeg_quality`` is not set (its payload sizes match 92).
_DEFAULT_JPEG_QUALITY = 92
_GRAY_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
#: Channels -> PIL mode, as datago hands images out.
_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_WHITE = 255.0

Pixels = npt.NDArray[np.uint8]


class DatagoCompatibilityWarning(UserWarning):
    """A datago setting the drop-in ignores or treats differently."""


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, DatagoCompatibilityWarning, stacklevel=4)


class ImagePayloadData:
    """datago's raw payload (``ImagePayload.get_payload()``): bytes plus their geometry.

    Attributes:
        data: row-major ``height x width x channels`` uint8 pixels, or the
            encoded file when ``is_encoded``.
        width: width in pixels.
        height: height in pixels.
        channels: 1 (L), 2 (LA), 3 (RGB), 4 (RGBA); -1 when encoded, as in datago.
        bit_depth: bits per channel (8).
        is_encoded: whether ``data`` is a PNG or JPEG file.
        original_width: width of the source file (after EXIF orientation).
        original_height: height of the source file (after EXIF orientation).
    """

    def __init__(self, data: bytes | Pixels, width: int, height: int, channels: int,
                 bit_depth: int, is_encoded: bool, original_width: int,
                 original_height: int) -> None:
        # raw pixels may come as the array, turned into bytes when first asked for
        self._data = data
        self.width = width
        self.height = height
        self.channels = channels
        self.bit_depth = bit_depth
        self.is_encoded = is_encoded
        self.original_width = original_width
        self.original_height = original_height

    @property
    def data(self) -> bytes:
        """The pixels' or the encoded file's bytes."""
        if not isinstance(self._data, bytes):
            self._data = self._data.tobytes()
        return self._data

    @data.setter
    def data(self, value: bytes) -> None:
        self._data = value

    def to_pil_image(self) -> Image.Image:
        """A new PIL image of the pixels (decoded first if the payload is encoded)."""
        from PIL import Image

        if self.is_encoded:
            image = Image.open(io.BytesIO(self.data))
            image.load()
            return image
        mode = _MODES[self.channels]
        if not isinstance(self._data, bytes):
            return Image.fromarray(_plane(self._data, mode), mode).copy()
        return Image.frombytes(mode, (self.width, self.height), self.data)

    def to_numpy_array(self) -> Pixels:
        """``height x width x channels`` uint8 (3-D even for one channel, as datago)."""
        if not self.is_encoded and not isinstance(self._data, bytes):
            return np.array(self._data)
        a: Pixels = np.asarray(self.to_pil_image(), np.uint8)
        return a if a.ndim == 3 else a[..., None]


class ImagePayload:
    """datago's ``sample.image``: a PIL image with datago's three converters.

    Every PIL attribute (``size``, ``mode``, ``width``, ``height``, ``info``,
    ``palette``, ``resize``, ``save``, ...) is the image's own; calling the
    payload returns the PIL image, as datago's does. The PIL image is made
    when first used: a loop that reads only ``to_numpy_array()`` never pays
    for one.
    """

    def __init__(self, payload: ImagePayloadData, pixels: Pixels | None = None) -> None:
        self._payload = payload
        self._pixels = pixels  # H x W x C uint8 of a raw payload
        self._image: Image.Image | None = None

    def _pil(self) -> Image.Image:
        if self._image is None:
            if self._pixels is None:
                self._image = self._payload.to_pil_image()
            else:
                from PIL import Image

                mode = _MODES[self._pixels.shape[2]]
                self._image = Image.fromarray(_plane(self._pixels, mode), mode)
        return self._image

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_image", "_payload", "_pixels"):
            raise AttributeError(name)
        return getattr(self._pil(), name)

    def __call__(self) -> Image.Image:
        """The PIL image itself."""
        return self._pil()

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """So that ``np.asarray(sample.image)`` works, as on a PIL image."""
        interface: dict[str, Any] = self._pil().__array_interface__
        return interface

    @property
    def mode(self) -> str:
        """PIL's mode: L, LA, RGB or RGBA."""
        return _MODES[self._pixels.shape[2]] if self._pixels is not None else self._pil().mode

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL's."""
        return self._payload.width, self._payload.height

    @property
    def width(self) -> int:
        """Width in pixels."""
        return self._payload.width

    @property
    def height(self) -> int:
        """Height in pixels."""
        return self._payload.height

    @property
    def info(self) -> dict[str | tuple[int, int], Any]:
        """PIL's ``info`` dict of the image (empty here, as in datago)."""
        return self._pil().info

    @property
    def palette(self) -> Any:
        """PIL's palette (None: images are never handed out as palette images)."""
        return self._pil().palette

    def to_pil_image(self) -> Image.Image:
        """A new PIL image (a copy: changing it leaves the sample as it is)."""
        return self._pil().copy()

    def to_numpy_array(self) -> Pixels:
        """``height x width x channels`` uint8, 3-D even for one channel, as datago."""
        if self._pixels is not None:
            return np.array(self._pixels)  # a copy: changing it leaves the sample as it is
        a: Pixels = np.array(self._pil(), np.uint8)
        return a if a.ndim == 3 else a[..., None]

    def get_payload(self) -> ImagePayloadData:
        """The raw payload: bytes, width, height, channels, encoding, original size."""
        return self._payload

    def __repr__(self) -> str:
        return f"<gristmill.client.datago.ImagePayload {self._pil()!r}>"


def _plane(a: Pixels, mode: str) -> Pixels:
    """``a`` as PIL's fromarray takes it: 2-D for L."""
    return a[..., 0] if mode == "L" else a


@dataclass
class Sample:
    """One sample, typed as datago's: file sources leave the metadata fields empty."""

    id: str
    image: ImagePayload
    source: str = "filesystem"
    attributes: str = "{}"
    duplicate_state: int = 0
    tags: list[str] = field(default_factory=list)
    coca_embedding: list[float] = field(default_factory=list)
    latents: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, ImagePayload] = field(default_factory=dict)
    additional_images: dict[str, ImagePayload] = field(default_factory=dict)


def _get(section: dict[str, Any], key: str, default: Any) -> Any:
    value = section.get(key, default)
    return default if value is None else value


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _check_keys(section: dict[str, Any], known: set[str], where: str) -> None:
    for key in sorted(set(section) - known):
        _warn_once(f"datago config key {where}{key!r} is not used by the gristmill drop-in "
                   "(nor by datago's file source); it is ignored")


@dataclass(frozen=True)
class _Output:
    to_rgb: bool
    encode: str | None
    quality: int


class DatagoClient:
    """datago's client interface over a gristmill in-process loader.

    Args:
        json_config: datago's JSON configuration. Supported: ``source_type``
            "file" with ``source_config.root_path``, ``rank``, ``world_size``,
            ``random_sampling``; ``image_config`` with ``crop_and_resize``
            (must be true), ``default_image_size``, ``downsampling_ratio``,
            ``min_aspect_ratio``, ``max_aspect_ratio``, ``pre_encode_images``,
            ``encode_format`` ("png" or "jpeg"), ``jpeg_quality``,
            ``image_to_rgb8``; ``samples_buffer_size``; ``limit`` (0 or absent:
            no limit). gristmill adds ``seed`` (the shuffle seed). Other keys
            are ignored with a :class:`DatagoCompatibilityWarning`.
    """

    def __init__(self, json_config: str) -> None:
        try:
            config = json.loads(json_config)
        except ValueError as e:
            raise ValueError(f"the datago config is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError("the datago config must be a JSON object")
        if config.get("source_type", "file") != "file":
            raise ValueError(f"source_type {config.get('source_type')!r} is not supported by "
                             "the gristmill drop-in; use 'file' (or gristmill.client.Loader "
                             "for datasets on a gristmill server)")
        source, image = _section(config, "source_config"), _section(config, "image_config")
        _check_keys(config, _TOP_KEYS | _EXTRA_TOP_KEYS, "")
        _check_keys(source, _SOURCE_KEYS, "source_config.")
        _check_keys(image, _IMAGE_KEYS, "image_config.")
        if "root_path" not in source:
            raise ValueError("source_config.root_path is required: the folder of images")
        if not image:
            _warn_once("no image_config: datago would hand out images at their original size; "
                       "the gristmill drop-in always sizes them into aspect-ratio buckets "
                       "(default_image_size 512, downsampling_ratio 16)")
        elif not _get(image, "crop_and_resize", False):
            raise ValueError("image_config.crop_and_resize false is not supported: gristmill "
                             "always sizes images into aspect-ratio buckets; set it to true")
        self._output = self._parse_output(image)
        self.root = str(source["root_path"])
        self.limit = int(_get(config, "limit", 0))
        buffer = int(_get(config, "samples_buffer_size", 64))
        rank, world_size = int(_get(source, "rank", 0)), int(_get(source, "world_size", 1))
        if self.limit < 0 or buffer <= 0:
            raise ValueError(f"limit must be 0 (no limit) or more and samples_buffer_size "
                             f"greater than 0; got limit={self.limit}, "
                             f"samples_buffer_size={buffer}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"source_config.rank must be in [0, world_size) and world_size "
                             f"greater than 0; got rank={rank}, world_size={world_size}")
        self._random = bool(_get(source, "random_sampling", False))
        self._options: dict[str, Any] = {
            "batch_size": _BATCH,
            "image_size": int(_get(image, "default_image_size", 512)),
            "downsampling_ratio": int(_get(image, "downsampling_ratio", 16)),
            "min_aspect_ratio": float(_get(image, "min_aspect_ratio", 0.5)),
            "max_aspect_ratio": float(_get(image, "max_aspect_ratio", 2.0)),
            # a stable hash picks the rank whatever random_sampling says, as in datago
            "policy": "hash" if self._random or world_size > 1 else "sequential",
            "seed": int(_get(config, "seed", 0)),
            "rank": rank,
            "world_size": world_size,
            "prefetch": max(1, math.ceil(buffer / _BATCH)),
            "color": "rgb" if self._output.to_rgb else "rgba",
        }
        self._loader: Loader | None = None
        self._samples: Generator[Sample, None, None] | None = None
        self._pass = 0  # passes started so far; pass n streams the loader's epoch n - 1
        self._done = False
        self._served = 0

    @staticmethod
    def _parse_output(image: dict[str, Any]) -> _Output:
        fmt = str(_get(image, "encode_format", "png"))
        if fmt not in _ENCODE_FORMATS:
            raise ValueError(f"image_config.encode_format must be one of {list(_ENCODE_FORMATS)} "
                             f"(as in datago), got {fmt!r}")
        quality = int(_get(image, "jpeg_quality", _DEFAULT_JPEG_QUALITY))
        if not 1 <= quality <= 100:
            raise ValueError(f"image_config.jpeg_quality must be 1 to 100, got {quality}")
        encode = fmt if _get(image, "pre_encode_images", False) else None
        return _Output(bool(_get(image, "image_to_rgb8", False)), encode, quality)

    # passes ------------------------------------------------------------------
    def start(self) -> None:
        """Start a pass; after a finished pass (or ``stop()``), a new one.

        A new pass is reshuffled when ``random_sampling`` is set. During a
        pass this does nothing, as in datago.
        """
        if self._samples is not None and not self._done:
            return
        if self._loader is None:
            self._loader = Loader.from_folder(self.root, show_progress=False, **self._options)
        self._loader.set_epoch(self._pass)
        self._pass += 1
        self._served, self._done = 0, False
        self._samples = self._iterate(self._loader)

    def _iterate(self, loader: Loader) -> Generator[Sample, None, None]:
        logged: set[str] = set()  # padding repeats a failed sample: log it once a pass
        for batch in loader:
            for failure in batch.errors:
                if failure.id in logged:
                    continue
                logged.add(failure.id)
                log.error("Failed to load image from path %s: %s",
                          os.path.join(self.root, failure.id), failure.message)
            yield from self._samples_of(batch)

    def _samples_of(self, batch: Batch) -> Generator[Sample, None, None]:
        sizes, channels = batch.source_sizes, batch.source_channels
        for i, sid in enumerate(batch.ids):
            if not batch.fresh[i]:
                continue  # padding: datago hands out each sample once per pass
            path = os.path.join(self.root, sid)
            source = (_MODES[channels[i]], sizes[i]) if i < len(channels) and channels[i] \
                else _source_mode(path, batch.images[i])  # a server that does not say
            yield Sample(json.dumps(path, ensure_ascii=False),
                         self._payload(batch.images[i], *source))

    def _payload(self, pixels: Pixels, mode: str, original: tuple[int, int]) -> ImagePayload:
        if self._output.to_rgb:
            mode = "RGB"
        a = _to_mode(pixels, mode)
        height, width = a.shape[:2]
        if self._output.encode is None:
            return ImagePayload(ImagePayloadData(a, width, height, a.shape[2], 8, False,
                                                 *original), a)
        data = _encode(a, mode, self._output.encode, self._output.quality)
        return ImagePayload(ImagePayloadData(data, width, height, -1, 8, True, *original))

    def get_sample(self) -> Sample | None:
        """The next sample, or None at the end of the pass (or of ``limit``) or after ``stop()``.

        The first call starts the first pass; later passes need ``start()``.
        """
        if self._samples is None:
            if self._pass:
                return None  # stopped: datago does not restart on its own
            self.start()
        assert self._samples is not None
        if self._done or (self.limit and self._served >= self.limit):
            self._end_pass()
            return None
        sample = next(self._samples, None)
        if sample is None:
            self._end_pass()
            return None
        self._served += 1
        return sample

    def get_sample_auto_convert(self) -> dict[str, Any] | None:
        """The next sample as datago's plain Python types: PIL images, parsed attributes."""
        sample = self.get_sample()
        if sample is None:
            return None
        return {"id": sample.id, "source": sample.source,
                "duplicate_state": sample.duplicate_state,
                "attributes": json.loads(sample.attributes), "tags": sample.tags,
                "coca_embedding": sample.coca_embedding, "latents": sample.latents,
                "image": sample.image(),
                "masks": {k: v() for k, v in sample.masks.items()},
                "additional_images": {k: v() for k, v in sample.additional_images.items()}}

    def _end_pass(self) -> None:
        if self._samples is not None and not self._done:
            self._samples.close()  # stops the loader's decoding thread
        self._done = True

    def stop(self) -> None:
        """Stop decoding and release the threads; ``start()`` begins a new pass."""
        self._end_pass()
        if self._loader is not None:
            self._loader.close()
        self._loader = None
        self._samples = None


def _source_mode(path: str, pixels: Pixels) -> tuple[str, tuple[int, int]]:
    """The mode datago gives the file (L, LA, RGB or RGBA) and its upright size."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            transparent = "transparency" in im.info
            if im.format in ("JPEG", "MPO", "TIFF", "WEBP") and \
                    im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                w, h = h, w
    except Exception:  # noqa: BLE001 - decoded fine by gristmill: fall back to the pixels
        return ("RGBA" if pixels.shape[2] == 4 else "RGB"), (pixels.shape[1], pixels.shape[0])
    if mode in _GRAY_MODES:
        return ("LA" if transparent else "L"), (w, h)
    if mode in ("LA", "La"):
        return "LA", (w, h)
    if mode in ("RGBA", "RGBa", "PA") or transparent:
        return "RGBA", (w, h)
    return "RGB", (w, h)


def _to_mode(rgba: Pixels, mode: str) -> Pixels:
    """Pixels the loader gave (RGB, or RGBA with gray replicated) in ``mode``."""
    if rgba.shape[2] == 3 or mode == "RGBA":
        return np.ascontiguousarray(rgba)
    import cv2  # the drop-in decodes with gristmill.decode, which brings OpenCV

    # OpenCV's SIMD channel copies: numpy's strided copy of 3 of 4 channels took
    # 1.6 ms per 512 px image on the consumer thread, next to the decoders
    src = np.ascontiguousarray(rgba)
    if mode == "RGB":
        return cv2.cvtColor(src, cv2.COLOR_RGBA2RGB).astype(np.uint8, copy=False)
    if mode == "L":
        return cv2.extractChannel(src, 0)[..., None].astype(np.uint8, copy=False)
    return np.ascontiguousarray(src[..., ::3])  # LA: channels 0 and 3


def _encode(a: Pixels, mode: str, fmt: str, quality: int) -> bytes:
    from gristmill.decode.codecs import encode
    from gristmill.decode.transform import Encoding

    if fmt == "jpeg" and mode in ("LA", "RGBA"):
        # datago fails such samples ("Jpeg does not support the color type"); JPEG has
        # no alpha, so gristmill composites over white, as its RGB output does
        alpha = a[..., -1:].astype(np.float32) / 255
        flat = a[..., :-1].astype(np.float32) * alpha + _WHITE * (1 - alpha)
        a = np.clip(np.rint(flat), 0, 255).astype(np.uint8)
    if a.shape[2] == 2:  # LA as PNG: OpenCV writes 1, 3 or 4 channels only
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(a, "LA").save(buf, "PNG", compress_level=1)
        return buf.getvalue()
    return encode(a, Encoding.JPEG if fmt == "jpeg" else Encoding.PNG, quality)
