"""Per-sample decode failures: data, not crashes."""

from __future__ import annotations

from enum import Enum

__all__ = ["DecodeError", "Reason"]


class Reason(Enum):
    """Why a sample could not be decoded (``DecodeErrorReason`` without its prefix)."""

    CORRUPT = "CORRUPT"
    TRUNCATED = "TRUNCATED"
    UNSUPPORTED_FORMAT = "UNSUPPORTED_FORMAT"
    TOO_LARGE = "TOO_LARGE"
    COMPANION_MISMATCH = "COMPANION_MISMATCH"
    SOURCE_UNAVAILABLE = "SOURCE_UNAVAILABLE"


class DecodeError(Exception):
    """One sample failed; the batch and the stream go on.

    Attributes:
        reason: machine-readable reason.
        message: what is wrong and what to do about it.
        image_index: -1 for the main image, else the failing companion's index.
    """

    def __init__(self, reason: Reason, message: str, image_index: int = -1) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.image_index = image_index

    def for_image(self, index: int) -> DecodeError:
        """The same error, attributed to image ``index`` (-1: main, else a companion)."""
        prefix = "" if index < 0 else f"companion {index}: "
        return DecodeError(self.reason, prefix + self.message, index)

    def __repr__(self) -> str:
        return f"DecodeError({self.reason.value}, {self.message!r}, image_index={self.image_index})"
