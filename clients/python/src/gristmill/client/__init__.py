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
from gristmill.client.hub import Hub, ImportReport

__all__ = [
    "AlreadyExists",
    "ConnectionOptions",
    "DataLoss",
    "FailedPrecondition",
    "GristmillError",
    "Hub",
    "ImportReport",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "Unauthenticated",
    "Unavailable",
    "open_channel",
]
