"""gristmill decode: JPEG, PNG and friends to pixels in aspect-ratio buckets.

The pipeline used by the decode service, as a plain Python API::

    from gristmill.decode import Decoder, SampleInput, Transform
    from gristmill.client.buckets import BucketConfig

    transform = Transform(buckets=BucketConfig(512, 16))
    with Decoder() as decoder:
        result = decoder.decode(SampleInput(open("cat.jpg", "rb").read()), transform)
"""

import importlib.util
import sys

# libvips (pyvips) links Debian's libhdf5 through libmatio. Loaded first, that
# HDF5 takes the symbols the HDF5 bundled with h5py needs, and a later
# `import h5py` fails ("Not a datatype"). Where h5py is installed, it is loaded
# first so that both work in one process (a training script with arrays and
# Loader.from_folder, say). Where pyvips was imported before this module, it is
# too late: h5py would fail to load, so it is left alone.
if "pyvips" not in sys.modules and importlib.util.find_spec("h5py") is not None:
    import h5py  # noqa: F401

from gristmill.client.buckets import Bucket, BucketConfig, BucketTable, bucket_table  # noqa: E402
from gristmill.decode.errors import DecodeError, Reason
from gristmill.decode.pipeline import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    DecodedSample,
    crop_window,
    decode_sample,
)
from gristmill.decode.pool import Decoder, SampleInput, SampleResult
from gristmill.decode.transform import (
    Color,
    CompanionTransform,
    Crop,
    Encoding,
    Resample,
    Transform,
    transform_from_proto,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Bucket",
    "BucketConfig",
    "BucketTable",
    "Color",
    "CompanionTransform",
    "Crop",
    "DecodeError",
    "DecodedImage",
    "DecodedSample",
    "Decoder",
    "Encoding",
    "Reason",
    "Resample",
    "SampleInput",
    "SampleResult",
    "Transform",
    "bucket_table",
    "crop_window",
    "decode_sample",
    "transform_from_proto",
]
