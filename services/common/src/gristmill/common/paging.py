"""AIP-158 paging: validated page sizes and opaque, query-bound page tokens."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from gristmill.client.errors import InvalidArgument

__all__ = ["decode_page_token", "encode_page_token", "page_size"]


def page_size(value: int, default: int, maximum: int, field: str = "page_size") -> int:
    """0 means ``default``; negative is INVALID_ARGUMENT; larger than max is clamped."""
    if value < 0:
        raise InvalidArgument(field, f"must not be negative (got {value}); use 0 for the "
                              f"default of {default}")
    return min(value or default, maximum)


def _query_key(query: Any) -> str:
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def encode_page_token(query: Any, after: str) -> str:
    """Token resuming after ``after`` for the same ``query`` only."""
    raw = json.dumps({"q": _query_key(query), "a": after}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, query: Any, field: str = "page_token") -> str | None:
    """The position a token resumes after; None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, key = data["a"], data["q"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(field, "malformed page token; pass back next_page_token from the "
                              "previous response unchanged", reason="INVALID_PAGE_TOKEN") from None
    if key != _query_key(query) or not isinstance(after, str):
        raise InvalidArgument(field, "page token belongs to a different query; keep the other "
                              "request fields the same while paging", reason="INVALID_PAGE_TOKEN")
    return after
