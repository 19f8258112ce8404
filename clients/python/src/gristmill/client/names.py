"""Validation of dataset names, file paths and hashes: the store's safety rules.

Shared by the server (which enforces them) and the Hub (which checks before
uploading, so a bad file name is reported without a round trip).

Names and paths are Unicode normalised to NFC, so ``café`` typed on Linux and
``café`` (``e`` + U+0301) from macOS are one name: the validators return the
normalised value, and callers use what they return. Characters that make a
name look like another one, or display differently from what it is, are
refused: bidirectional controls (U+202A-202E, U+2066-2069, U+200E, U+200F,
U+061C), zero-width characters (U+200B-200D, U+2060, U+FEFF), C0 and C1
control characters, every other format character (Unicode category Cf),
line and paragraph separators and lone surrogates.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from gristmill.client.errors import InvalidArgument

__all__ = ["nfc", "refused_character", "validate_dataset_name", "validate_path",
           "validate_sha256"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_PATH_BYTES = 1024
MAX_SEGMENT_BYTES = 255

_BIDI = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])
_ZERO_WIDTH = frozenset([0x200B, 0x200C, 0x200D, 0x2060, 0xFEFF])
_ASCII_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refused_character(text: str) -> str | None:
    """Why the first character that no name or path may contain is refused, or None.

    The reason names the character as ``U+XXXX NAME``.
    """
    if text.isascii() and _ASCII_CONTROL.search(text) is None:
        return None  # every refused character but the C0 controls and DEL is non-ASCII
    for i, c in enumerate(text):
        code = ord(c)
        category = unicodedata.category(c)
        if code in _BIDI:
            kind = "a bidirectional control, which makes text display differently from what it is"
        elif code in _ZERO_WIDTH:
            kind = "an invisible zero-width character, which makes two names look the same"
        elif category == "Cc":
            kind = "a control character"
        elif category == "Cf":
            kind = "an invisible format character"
        elif category in ("Zl", "Zp"):
            kind = "a line or paragraph separator"
        elif category == "Cs":
            kind = "a lone surrogate (not valid Unicode)"
        else:
            continue
        name = unicodedata.name(c, "")
        shown = f"U+{code:04X}" + (f" {name}" if name else "")
        return f"character {i + 1} is {shown}, {kind}"
    return None


def _shown(text: str, limit: int, escape: bool) -> str:
    """Text quoted for a message; escaped to ASCII when it holds refused characters."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return ascii(text) if escape else repr(text)


def validate_dataset_name(name: str, field: str = "name") -> str:
    """Names are 1-128 of [A-Za-z0-9._-], starting with a letter or digit; returns it (NFC)."""
    if not name:
        raise InvalidArgument(field, "dataset name is empty; give a name like 'imagenet-val'")
    refused = refused_character(name)
    shown = _shown(name, 40, escape=refused is not None)
    if refused is not None:
        raise InvalidArgument(field, f"invalid dataset name {shown}: {refused}; remove it and "
                              "use 1-128 characters of letters, digits, '.', '_' and '-'",
                              reason="INVALID_NAME")
    name = nfc(name)
    if _NAME.fullmatch(name) is None:
        raise InvalidArgument(
            field, f"invalid dataset name {shown}: use 1-128 characters of letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (no '/', spaces or NUL)")
    return name


def validate_sha256(value: str, field: str = "sha256") -> str:
    """A lower-case hex sha256."""
    if _SHA256.fullmatch(value) is None:
        raise InvalidArgument(field, f"{value[:80]!r} is not a sha256: expected 64 lower-case "
                              "hex digits")
    return value


def nfc(text: str) -> str:
    """``text`` in Unicode NFC, the form names and paths are stored and cached in."""
    return text if text.isascii() else unicodedata.normalize("NFC", text)  # ASCII is NFC


def validate_path(path: str, field: str = "path", *, strict: bool = True) -> str:
    """A relative, normalised POSIX path that cannot escape the dataset; returns its NFC form.

    Refused: empty, absolute, ``.``/``..`` segments (also percent-encoded),
    empty segments (``a//b``, trailing ``/``), backslashes, NUL, control,
    bidirectional, zero-width and other invisible format characters, over
    1024 bytes or a segment over 255 bytes (both counted in UTF-8 after NFC).

    ``strict=False`` (reads and deletes of what may have been stored before
    these rules) refuses only what the first release refused of characters:
    NUL and the C0 controls; every rule that keeps a path inside its dataset
    still applies.
    """
    def bad(why: str, fix: str = "use a relative path like 'train/cats/001.jpg'"
            ) -> InvalidArgument:
        shown = _shown(path, 80, escape=refused is not None)
        return InvalidArgument(field, f"path {shown} is not allowed: {why}; {fix}",
                               reason="INVALID_PATH")

    refused = refused_character(path)
    if not strict and refused is not None and \
            not any(ord(c) < 32 or ord(c) == 127 for c in path):
        refused = None
    if not path:
        raise bad("it is empty")
    if refused is not None:
        raise bad(refused, "rename the file without it and use a relative path like "
                  "'train/cats/001.jpg'")
    path = nfc(path)
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise bad(f"it is longer than {MAX_PATH_BYTES} bytes")
    if "\\" in path:
        raise bad("it contains a backslash (use '/' as the separator)")
    if path.startswith("/"):
        raise bad("it is absolute")
    for segment in path.split("/"):
        if not segment:
            raise bad("it has an empty segment ('//' or a leading or trailing '/')")
        decoded = unquote(segment) if "%" in segment else segment
        if segment in (".", "..") or decoded in (".", "..") or "/" in decoded or "\\" in decoded:
            raise bad("'.' and '..' segments (also percent-encoded) could escape the dataset")
        if len(segment.encode()) > MAX_SEGMENT_BYTES:
            raise bad(f"a segment is longer than {MAX_SEGMENT_BYTES} bytes")
    return path
