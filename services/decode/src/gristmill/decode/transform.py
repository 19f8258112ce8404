"""What to do with an image: the plain-Python form of the ``Transform`` message."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TypeVar

from gristmill.client.buckets import BucketConfig, BucketTable, bucket_table
from gristmill.client.errors import InvalidArgument
from gristmill.v1 import decode_pb2

__all__ = [
    "MAX_OUTPUT_SIDE",
    "Color",
    "CompanionTransform",
    "Crop",
    "Encoding",
    "Resample",
    "Transform",
    "bucket_config_from_proto",
    "transform_from_proto",
]

E = TypeVar("E", bound=Enum)

#: Largest side of a fixed output size.
MAX_OUTPUT_SIDE = 16384


class Crop(Enum):
    """Where the crop window sits."""

    CENTER = "center"
    RANDOM = "random"


class Color(Enum):
    """Output pixel layout; KEEP (companions only) keeps the source's channels."""

    RGB = 3
    RGBA = 4
    GRAY = 1
    KEEP = 0


class Resample(Enum):
    """Resampling filter."""

    AREA = "area"
    LANCZOS = "lanczos"
    LINEAR = "linear"
    NEAREST = "nearest"


class Encoding(Enum):
    """How output pixels are carried."""

    RAW = "raw"
    JPEG = "jpeg"
    PNG = "png"


@dataclass(frozen=True)
class CompanionTransform:
    """How companions (masks, depth, ...) are resampled; geometry is the main image's."""

    resample: Resample = Resample.NEAREST
    color: Color = Color.KEEP


@dataclass(frozen=True)
class Transform:
    """Decode options for one image and its companions.

    Exactly one of ``buckets`` and ``size`` is set.

    Attributes:
        buckets: resize into the nearest bucket of this configuration.
        size: resize to exactly (width, height).
        crop: centre or seeded random crop window.
        seed: combined with each sample's seed for random crops.
        color: output layout of the main image.
        resample: filter of the main image.
        background: RGB behind transparent pixels when alpha is not kept.
        encoding: raw pixels, or re-encoded as JPEG or PNG.
        quality: JPEG quality.
        max_pixels: refuse larger images before decoding (None: the decoder's limit).
        companions: how companion images are treated.
    """

    buckets: BucketConfig | None = None
    size: tuple[int, int] | None = None
    crop: Crop = Crop.CENTER
    seed: int = 0
    color: Color = Color.RGB
    resample: Resample = Resample.AREA
    background: tuple[int, int, int] = (255, 255, 255)
    encoding: Encoding = Encoding.RAW
    quality: int = 90
    max_pixels: int | None = None
    companions: CompanionTransform = field(default_factory=CompanionTransform)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise InvalidArgument naming the bad field and the fix."""
        if (self.buckets is None) == (self.size is None):
            raise InvalidArgument("transform.size", "set exactly one of buckets (a bucket "
                                  "config) and fixed (a width and height)")
        if self.buckets is not None:
            try:
                self.buckets.validate()
            except ValueError as e:
                raise InvalidArgument("transform.buckets", str(e)) from None
        if self.size is not None:
            w, h = self.size
            if not (1 <= w <= MAX_OUTPUT_SIDE and 1 <= h <= MAX_OUTPUT_SIDE):
                raise InvalidArgument("transform.fixed", f"width and height must be between 1 "
                                      f"and {MAX_OUTPUT_SIDE}, got {w}x{h}")
        if self.color is Color.KEEP:
            raise InvalidArgument("transform.color", "the main image needs RGB, RGBA or GRAY")
        if not 1 <= self.quality <= 100:
            raise InvalidArgument("transform.quality", f"must be 1 to 100, got {self.quality}")
        if any(not 0 <= c <= 255 for c in self.background):
            raise InvalidArgument("transform.background", "each channel must be 0 to 255")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise InvalidArgument("transform.max_pixels", "must be positive (0 in the request "
                                  "means the server's limit)")
        if self.encoding is Encoding.JPEG and Color.RGBA in (self.color, self.companions.color):
            raise InvalidArgument("transform.encoding", "JPEG has no alpha channel; use PNG or "
                                  "RAW with RGBA, or RGB with JPEG")

    @property
    def table(self) -> BucketTable | None:
        """The bucket table, when resizing into buckets."""
        return bucket_table(self.buckets) if self.buckets is not None else None


_CROP: dict[int, Crop] = {
    decode_pb2.CROP_MODE_UNSPECIFIED: Crop.CENTER,
    decode_pb2.CROP_MODE_CENTER: Crop.CENTER,
    decode_pb2.CROP_MODE_RANDOM: Crop.RANDOM,
}
_COLOR: dict[int, Color] = {
    decode_pb2.COLOR_MODE_RGB: Color.RGB,
    decode_pb2.COLOR_MODE_RGBA: Color.RGBA,
    decode_pb2.COLOR_MODE_GRAY: Color.GRAY,
}
_RESAMPLE: dict[int, Resample] = {
    decode_pb2.RESAMPLE_AREA: Resample.AREA,
    decode_pb2.RESAMPLE_LANCZOS: Resample.LANCZOS,
    decode_pb2.RESAMPLE_LINEAR: Resample.LINEAR,
    decode_pb2.RESAMPLE_NEAREST: Resample.NEAREST,
}
_ENCODING: dict[int, Encoding] = {
    decode_pb2.ENCODING_UNSPECIFIED: Encoding.RAW,
    decode_pb2.ENCODING_RAW: Encoding.RAW,
    decode_pb2.ENCODING_JPEG: Encoding.JPEG,
    decode_pb2.ENCODING_PNG: Encoding.PNG,
}


def _enum(table: Mapping[int, E], value: int, name: str) -> E:
    try:
        return table[value]
    except KeyError:
        raise InvalidArgument(name, f"unknown value {value}; see decode.proto for the choices"
                              ) from None


def bucket_config_from_proto(msg: decode_pb2.BucketConfig) -> BucketConfig:
    """A BucketConfig message with its zero fields given their documented defaults."""
    return BucketConfig(msg.image_size, msg.downsampling or 16, msg.min_aspect or 0.5,
                        msg.max_aspect or 2.0)


def transform_from_proto(msg: decode_pb2.Transform) -> Transform:
    """Validate a Transform message and convert it (InvalidArgument on a bad field)."""
    which = msg.WhichOneof("size")
    buckets = size = None
    if which == "buckets":
        buckets = bucket_config_from_proto(msg.buckets)
    elif which == "fixed":
        size = (msg.fixed.width, msg.fixed.height)
    bg = (msg.background.red, msg.background.green, msg.background.blue
          ) if msg.HasField("background") else (255, 255, 255)
    comp = msg.companions
    if msg.max_pixels < 0:
        raise InvalidArgument("transform.max_pixels", "must not be negative (0 means the "
                              "server's limit)")
    return Transform(
        buckets=buckets, size=size,
        crop=_enum(_CROP, msg.crop, "transform.crop"),
        seed=msg.seed,
        color=(Color.RGB if msg.color == decode_pb2.COLOR_MODE_UNSPECIFIED else
               _enum(_COLOR, msg.color, "transform.color")),
        resample=(Resample.AREA if msg.resample == decode_pb2.RESAMPLE_UNSPECIFIED else
                  _enum(_RESAMPLE, msg.resample, "transform.resample")),
        background=bg,
        encoding=_enum(_ENCODING, msg.encoding, "transform.encoding"),
        quality=msg.quality or 90,
        max_pixels=msg.max_pixels or None,
        companions=CompanionTransform(
            resample=(Resample.NEAREST if comp.resample == decode_pb2.RESAMPLE_UNSPECIFIED else
                      _enum(_RESAMPLE, comp.resample,
                            "transform.companions.resample")),
            color=(Color.KEEP if comp.color == decode_pb2.COLOR_MODE_UNSPECIFIED else
                   _enum(_COLOR, comp.color, "transform.companions.color")),
        ),
    )
