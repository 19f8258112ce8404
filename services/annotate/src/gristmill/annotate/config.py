"""The annotate service's section of the server config (``annotate:``)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from gristmill.common.config import MiB, ServiceConfig

__all__ = ["AnnotateConfig"]


class AnnotateConfig(ServiceConfig):
    """The annotate service (section ``annotate:``; see docs/annotate.md)."""

    section: ClassVar[str] = "annotate"

    #: Events one AppendEvents call (or one ImportLog message) may carry.
    max_batch_events: int = Field(default=10_000, ge=1, le=1_000_000)
    #: Bytes of one event's payload (canonical JSON).
    max_payload_bytes: int = Field(default=1 * MiB, ge=1024)
    #: Samples one GetAnnotations call may ask about.
    max_query_samples: int = Field(default=10_000, ge=1)
    #: How far a signed event's own timestamp may be from the server's clock.
    max_clock_skew_seconds: float = Field(default=600.0, ge=0)
