"""Validation of dataset names, file paths and hashes: the store's safety rules.

Shared by the server (which enforces them) and the Hub (which checks before
uploading, so a bad file name is reported without a round trip).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from gristmill.client.errors import InvalidArgument

__all__ = ["validate_dataset_name", "validate_path", "validate_sha256"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255


def validate_dataset_name(name: str, field: str = "name") -> str:
    """Names are 1-128 of [A-Za-z0-9._-], starting with a letter or digit."""
    if not name:
        raise InvalidArgument(field, "dataset name is empty; give a name like 'imagenet-val'")
    if _NAME.fullmatch(name) is None:
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise InvalidArgument(
            field, f"invalid dataset name {shown!r}: use 1-128 characters of letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (no '/', spaces or NUL)")
    return name


def validate_sha256(value: str, field: str = "sha256") -> str:
    """A lower-case hex sha256."""
    if _SHA256.fullmatch(value) is None:
        raise InvalidArgument(field, f"{value[:80]!r} is not a sha256: expected 64 lower-case "
                              "hex digits")
    return value


def validate_path(path: str, field: str = "path") -> str:
    """A relative, normalised POSIX path that cannot escape the dataset.

    Refused: empty, absolute, ``.``/``..`` segments (also percent-encoded),
    empty segments (``a//b``, trailing ``/``), backslashes, NUL and other
    control characters, over 1024 bytes or a segment over 255 bytes.
    """
    def bad(why: str) -> InvalidArgument:
        shown = path if len(path) <= 80 else path[:80] + "..."
        return InvalidArgument(field, f"path {shown!r} is not allowed: {why}; use a relative "
                               "path like 'train/cats/001.jpg'", reason="INVALID_PATH")

    if not path:
        raise bad("it is empty")
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise bad(f"it is longer than {MAX_PATH_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise bad("it contains NUL or control characters")
    if "\\" in path:
        raise bad("it contains a backslash (use '/' as the separator)")
    if path.startswith("/"):
        raise bad("it is absolute")
    for segment in path.split("/"):
        if not segment:
            raise bad("it has an empty segment ('//' or a leading or trailing '/')")
        decoded = unquote(segment)
        if segment in (".", "..") or decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise bad("'.' and '..' segments (also percent-encoded) could escape the dataset")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise bad(f"a segment is longer than {MAX_SEGMENT_BYTES} bytes")
    return path
