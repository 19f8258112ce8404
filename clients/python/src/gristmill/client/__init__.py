"""The gristmill Python client."""

from gristmill.client.channel import ConnectionOptions, open_channel
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

__all__ = [
    "AlreadyExists",
    "ConnectionOptions",
    "DataLoss",
    "FailedPrecondition",
    "GristmillError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "open_channel",
]
