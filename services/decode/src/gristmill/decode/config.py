"""The decode service's section of the server config (``decode:``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from gristmill.common.config import MiB, ServiceConfig

__all__ = ["DecodeConfig"]


class DecodeConfig(ServiceConfig):
    """The decode service (section ``decode:``)."""

    section: ClassVar[str] = "decode"

    #: Decoding threads (native code, outside the GIL); 0 means one per core.
    workers: int = Field(default=0, ge=0, le=256)
    #: Samples one Decode stream may have in flight (read but not yet sent).
    #: The stream stops reading requests at this bound: backpressure.
    max_inflight_samples: int = Field(default=64, ge=1, le=65536)
    #: Images with more pixels than this are refused before decoding; so are
    #: requests for a larger output (a fixed size or a bucket).
    max_pixels: int = Field(default=100_000_000, ge=1)
    #: Output bytes one Decode stream may have in flight (decoded, not yet
    #: sent), estimated from the output size; a request alone is always
    #: admitted. With ``max_inflight_samples``, the stream's backpressure.
    max_inflight_bytes: int = Field(default=256 * MiB, ge=MiB)
    #: Store for ``ref`` sources when the store service is not in this process:
    #: its address (host:port), the API key to read with (a reader key), and
    #: the CA certificate when the store serves TLS.
    store_address: str | None = None
    store_api_key: str | None = None
    store_ca_file: Path | None = None
