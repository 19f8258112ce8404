"""The store's metrics (in the default registry, served by the kit's /metrics)."""

from __future__ import annotations

from prometheus_client import Counter

STORE_BYTES_WRITTEN = Counter("gristmill_store_bytes_written", "File bytes received by PutFiles")
STORE_BYTES_READ = Counter("gristmill_store_bytes_read", "File bytes sent by ReadFiles")
STORE_BLOBS_CREATED = Counter("gristmill_store_blobs_created", "New content-addressed blobs")
STORE_ITEM_ERRORS = Counter(
    "gristmill_store_item_errors", "Per-file errors in batch calls", ["reason"],
)
CATALOG_WAITS = Counter(
    "gristmill_store_catalog_waits",
    "Times a change of the catalog in a Ceph pool waited: 'conflict' (another writer changed "
    "the object first; read again) or 'lease' (a commit or writers held the dataset)",
    ["reason"],
)
ARRAY_BYTES_OUT = Counter(
    "gristmill_store_array_bytes_out",
    "Array value bytes sent by GetKeys, by path: 'grpc' (in the messages) or 'shm' (written "
    "into a client's shared-memory ring)",
    ["path"],
)
