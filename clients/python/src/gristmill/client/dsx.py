"""A drop-in for a DSX-style dataset hub client, over gristmill's store.

Code written for ``from dsx import DatasetHubClient`` runs with only the
import changed::

    from gristmill.client.dsx import DatasetHubClient

    hub = DatasetHubClient("http://localhost:7450", "my-key", cache_dir="./cache")
    names = hub.list_datasets()                      # list[str]
    manifest = hub.get_manifest(names[0])            # list[dict]: path, size, hash, ...
    data = hub.get_file_bytes(names[0], manifest[0]["path"])

The return types are DSX's; what differs is documented on each method: the
``hash`` is the file's full sha256 (DSX: MD5 of the first 1024 bytes), every
byte is verified, "latest" files in the cache are checked against the
current manifest, and the cache is keyed by the server's store id
(:class:`~gristmill.client.hub.Hub`). Where a DSX client raises
``ValueError`` (no cache for :meth:`get_file`) this one does too, and also
for an unknown dataset or file and for a bad name or path (DSX raises
``requests.HTTPError`` there); other failures are
:class:`~gristmill.client.errors.GristmillError` subclasses.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gristmill.client.channel import DEFAULT_ADDRESS
from gristmill.client.errors import InvalidArgument, NotFound
from gristmill.client.hub import Hub

__all__ = ["DEFAULT_PORT", "DatasetHubClient", "parse_base_url"]

#: gristmill's port, used when ``base_url`` names none (not 80 or 443).
DEFAULT_PORT = int(DEFAULT_ADDRESS.rsplit(":", 1)[1])
_PLAIN = {"http", "grpc"}
_TLS = {"https", "grpcs"}


def parse_base_url(base_url: str) -> tuple[str, bool]:
    """``(host:port, tls)`` for ``http://h:p``, ``grpc://h:p``, ``https://h:p`` or ``h:p``.

    A missing port is :data:`DEFAULT_PORT`; ``https://`` (or ``grpcs://``)
    means TLS. A path, query or user name is a ``ValueError``: gRPC has no
    place for them.
    """
    text = str(base_url).strip().rstrip("/")
    if not text:
        raise ValueError("base_url is empty; give e.g. 'http://localhost:7450'")
    if "://" not in text:
        text = f"grpc://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in _PLAIN | _TLS:
        raise ValueError(f"base_url {base_url!r}: scheme {parts.scheme!r} is not one of http, "
                         "https, grpc, grpcs")
    if parts.path or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"base_url {base_url!r}: only a scheme, host and port are used (no "
                         "path, query or user name)")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"base_url {base_url!r}: {e}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"base_url {base_url!r} names no host")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port or DEFAULT_PORT}", scheme in _TLS


def _system_ca_file() -> Path | None:
    paths = ssl.get_default_verify_paths()
    for name in (paths.cafile, paths.openssl_cafile):
        if name and os.path.isfile(name):
            return Path(name)
    return None


@contextmanager
def _as_value_errors() -> Iterator[None]:
    """NotFound and InvalidArgument become ValueError, as a DSX client's callers expect."""
    try:
        yield
    except (NotFound, InvalidArgument) as e:
        raise ValueError(e.message) from e


class DatasetHubClient:
    """DSX's ``DatasetHubClient`` API over a gristmill store.

    Args:
        base_url: ``http://host:port``, ``grpc://host:port`` or ``host:port``
            (plain gRPC); ``https://host:port`` for TLS. Without a port,
            gristmill's 7450.
        api_key: a gristmill API key (a reader key is enough); empty uses
            ``GRISTMILL_API_KEY``.
        cache_dir: the disk cache; None disables it (then :meth:`get_file`
            and :meth:`download_dataset` raise ``ValueError``, as in DSX).
        ca_file: PEM root certificate for ``https://`` (default
            ``GRISTMILL_CA_FILE``, else the system's CA bundle).
        cache_limit: most bytes of cached files; least recently used files
            are evicted (see :class:`~gristmill.client.hub.Hub`).
    """

    def __init__(self, base_url: str, api_key: str | None,
                 cache_dir: str | Path | None = "./cache", *, ca_file: Path | str | None = None,
                 cache_limit: int | None = None) -> None:
        address, tls = parse_base_url(base_url)
        ca = Path(ca_file) if ca_file else None
        if tls and ca is None:
            env = os.environ.get("GRISTMILL_CA_FILE")
            ca = Path(env) if env else _system_ca_file()
            if ca is None:
                raise ValueError(f"base_url {base_url!r} asks for TLS but no CA certificate "
                                 "was found: pass ca_file=... or set GRISTMILL_CA_FILE")
        if not tls and ca is not None:
            raise ValueError(f"ca_file was given but base_url {base_url!r} is not https://")
        self.base_url = str(base_url).rstrip("/")
        self.address = address
        self.cache_dir: Path | None = Path(cache_dir) if cache_dir else None
        try:
            # an explicit http:// or grpc:// stays plain even with GRISTMILL_CA_FILE set
            self.hub = Hub(address, api_key or None, self.cache_dir, ca_file=ca,
                           show_progress=False, cache_limit=cache_limit,
                           plaintext=not tls and "://" in str(base_url))
        except InvalidArgument as e:
            raise ValueError(e.message) from e

    def close(self) -> None:
        """Close the connection and the cache index."""
        self.hub.close()

    def __enter__(self) -> DatasetHubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def list_datasets(self) -> list[str]:
        """Names of every dataset on the server, sorted."""
        return [d.name for d in self.hub.list_datasets()]

    def get_manifest(self, dataset: str) -> list[dict[str, Any]]:
        """The dataset's current files, one dict each, sorted by path.

        Keys: ``path``, ``size``, ``hash`` (sha256), ``width`` and ``height``
        (None unless an image header gave them), ``media_type``. Fetched from
        the server on every call (DSX reuses a manifest cached on disk
        forever, which goes stale when the dataset changes).
        """
        with _as_value_errors():
            manifest = self.hub.get_manifest(dataset, refresh=True)
        out = []
        for e in manifest:
            image = e.HasField("image")
            out.append({"path": e.path, "size": e.size, "hash": e.sha256,
                        "width": e.image.width if image else None,
                        "height": e.image.height if image else None,
                        "media_type": e.media_type})
        return out

    def _need_cache(self, what: str) -> None:
        if self.cache_dir is None:
            raise ValueError(f"Cannot use {what}() when cache_dir is None. "
                             "Use get_file_bytes() for in-memory processing instead.")

    def get_file(self, dataset: str, subpath: str) -> Path:
        """Path of the file in the cache, downloaded (and sha256-verified) if needed."""
        self._need_cache("get_file")
        with _as_value_errors():
            return self.hub.get_file(dataset, subpath)

    def get_file_bytes(self, dataset: str, subpath: str) -> bytes:
        """The file's bytes, sha256-verified, with no disk write."""
        with _as_value_errors():
            return self.hub.get_file_bytes(dataset, subpath)

    def download_dataset(self, dataset: str, file_list: Iterable[str] | None = None
                         ) -> list[Path]:
        """Download the dataset (or ``file_list``) into the cache; paths in the same order.

        Parallel, resumable, and all-or-nothing on names: an unknown file is a
        ``ValueError`` before anything is downloaded.
        """
        self._need_cache("download_dataset")
        with _as_value_errors():
            return self.hub.download_dataset(dataset, None if file_list is None
                                             else list(file_list))

    def clear_cache(self, dataset: str | None = None) -> int:
        """Delete cached files (all, or one dataset's); returns bytes freed (0 without cache)."""
        if self.cache_dir is None:
            return 0
        with _as_value_errors():
            return self.hub.clear_cache(dataset or None)

    def get_cache_size(self, dataset: str | None = None) -> int:
        """Bytes cached (all, or one dataset's); 0 without cache."""
        if self.cache_dir is None:
            return 0
        with _as_value_errors():
            return self.hub.get_cache_size(dataset or None)
