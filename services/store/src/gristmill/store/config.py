"""The store's section of the server config (``store:``): backends and limits."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from gristmill.common.config import MiB, ServerConfig, ServiceConfig, StrictConfig

__all__ = ["READ_MESSAGE_DEFAULT", "CephBackendConfig", "FsBackendConfig", "StoreConfig"]


#: Room left in each ReadFiles message for field framing, so that a message
#: stays under gRPC's default 4 MiB receive limit in every client.
READ_MESSAGE_DEFAULT = 4 * MiB - 64 * 1024


class FsBackendConfig(StrictConfig):
    """Objects as files under ``<data_dir>/store`` (the default)."""

    kind: Literal["fs"] = "fs"
    #: Blobs up to this size are kept as rows of ``DATA_DIR/store/small-objects.sqlite``
    #: instead of a file each: a message's small blobs are stored by one transaction, not
    #: a file creation (and often a directory) each. 0 keeps every blob a file; rows
    #: stored before are still read. See docs/storage.md.
    inline_max_bytes: int = Field(default=16 * 1024, ge=0, le=MiB)


class CephBackendConfig(StrictConfig):
    """Objects in a Ceph pool through librados (see docs/storage.md)."""

    kind: Literal["ceph"] = "ceph"
    #: The cluster's ceph.conf (monitor addresses, auth).
    conf: Path
    #: The pool holding gristmill's objects (created by the operator).
    pool: str = Field(default="gristmill", min_length=1, max_length=128)
    #: RADOS namespace inside the pool ("" for the default one): stores with
    #: different namespaces share a pool without seeing each other's objects.
    namespace: str = Field(default="", max_length=128)
    #: Keyring with the client's key; default: the one ceph.conf names.
    keyring: Path | None = None
    #: The Ceph client name (``client.<id>``) to authenticate as.
    client: str = Field(default="client.admin", min_length=1)
    #: Whole seconds any one cluster operation may take (mount, monitor and
    #: OSD operations): with the cluster down, calls fail with UNAVAILABLE after it.
    timeout_seconds: int = Field(default=5, ge=1, le=300)
    #: Objects a blob is split into above this size (RADOS works best with
    #: objects of a few MiB).
    piece_bytes: int = Field(default=4 * MiB, ge=64 * 1024, le=64 * MiB)
    #: Where the catalog (datasets, heads, versions) lives: "pool" (objects of
    #: this pool and namespace, shared by every store replica that opens them) or
    #: "local" (SQLite in DATA_DIR/store, one replica only).
    catalog: Literal["pool", "local"] = "pool"
    #: Objects each dataset's head (and each version) is spread over in the
    #: pool catalog, fixed when the dataset is created: a dataset of N files
    #: keeps about N / shards omap keys per object (Ceph warns above 200,000).
    catalog_shards: int = Field(default=16, ge=1, le=1024)


def _backend_from_name(value: Any) -> Any:
    """``backend: fs`` (a bare name, as in older configs) means ``{kind: fs}``.

    Keys without a ``kind`` (``GRISTMILL_STORE__BACKEND__INLINE_MAX_BYTES=0``
    alone) are the default backend's.
    """
    if isinstance(value, str):
        return {"kind": value}
    if isinstance(value, dict) and "kind" not in value:
        return {"kind": "fs", **value}
    return value


class StoreConfig(ServiceConfig):
    """The store service (section ``store:``)."""

    section: ClassVar[str] = "store"

    #: Where objects live: ``{kind: fs}`` (default) or ``{kind: ceph, conf: ..., pool: ...}``.
    backend: Annotated[FsBackendConfig | CephBackendConfig, Field(discriminator="kind"),
                       BeforeValidator(_backend_from_name)] = FsBackendConfig()
    #: Byte budget of one ReadFiles response message, framing included, and
    #: the most a request may ask for (requests may only ask for less). The
    #: default keeps messages under gRPC's default 4 MiB client limit.
    read_message_bytes: int = Field(default=READ_MESSAGE_DEFAULT, ge=64 * 1024)
    #: Chunk size used when streaming large files.
    read_chunk_bytes: int = Field(default=1 * MiB, ge=64 * 1024)
    #: Run garbage collection (unreferenced blobs, staging files) at start-up.
    gc_on_start: bool = True
    #: Bytes held back in DATA_DIR/store/reserve so that metadata writes
    #: (deduplicated uploads, deletes) work on a full disk; 0 disables it.
    disk_reserve_bytes: int = Field(default=16 * MiB, ge=0)
    #: How a PutFiles message's new blobs are made durable before they are
    #: recorded: "fsync" (each file, then each directory that gained a blob,
    #: once) or "syncfs" (Linux: one syncfs of the volume before the renames
    #: and one after; best on a volume of the store's own).
    sync_method: Literal["fsync", "syncfs"] = "fsync"
    #: Largest value the array service stores under one key (an encoded Zarr
    #: chunk); larger ones, and arrays whose chunks could be larger before
    #: compression, are refused with INVALID_ARGUMENT. A chunk travels in one
    #: PutKeys message: the limit used is at most ``max_message_bytes`` less 64 KiB.
    max_array_chunk_bytes: int = Field(default=32 * MiB, ge=64 * 1024, le=48 * MiB)
    #: Shared-memory directory of this host, where array clients running
    #: beside the server put the rings that carry GetKeys values without a
    #: socket (docs/arrays.md). None turns it off: values go over gRPC.
    shm_dir: Path | None = Path("/dev/shm")

    @property
    def catalog_in_pool(self) -> bool:
        """Whether the catalog lives in the Ceph pool (shared by replicas), not in data_dir."""
        return isinstance(self.backend, CephBackendConfig) and self.backend.catalog == "pool"

    def check(self, server: ServerConfig) -> None:
        """ReadFiles messages fit in the server's message size."""
        if self.read_message_bytes > server.max_message_bytes - 64 * 1024:
            raise ValueError(f"store.read_message_bytes ({self.read_message_bytes}) must be at "
                             "least 64 KiB below max_message_bytes "
                             f"({server.max_message_bytes})")
