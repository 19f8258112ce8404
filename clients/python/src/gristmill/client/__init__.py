"""The gristmill Python client."""

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

__all__ = [
    "AlreadyExists",
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
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "bucket_table",
    "open_channel",
    "to_array",
]
