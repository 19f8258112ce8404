"""The gristmill Python client."""

from gristmill.client.annotations import Annotations
from gristmill.client.buckets import Bucket, BucketConfig, BucketTable, bucket_table
from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.decoding import DecodeClient, to_array
from gristmill.client.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    GristmillError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from gristmill.client.hub import Hub, ImportReport
from gristmill.client.loader import Batch, Loader, SampleFailure
from gristmill.client.world import World

__all__ = [
    "AlreadyExists",
    "Annotations",
    "Batch",
    "Bucket",
    "BucketConfig",
    "BucketTable",
    "ConnectionOptions",
    "DataLoss",
    "DecodeClient",
    "FailedPrecondition",
    "GristmillError",
    "Hub",
    "ImportReport",
    "InvalidArgument",
    "Loader",
    "NotFound",
    "PermissionDenied",
    "SampleFailure",
    "Unauthenticated",
    "Unavailable",
    "World",
    "bucket_table",
    "open_channel",
    "to_array",
]
