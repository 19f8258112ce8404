"""StoreService over gRPC: validates, delegates to :class:`Store`, converts."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from gristmill.client.errors import FailedPrecondition, GristmillError
from gristmill.client.names import validate_dataset_name
from gristmill.common.auth import Role
from gristmill.common.paging import decode_page_token, encode_page_token, page_size
from gristmill.common.service import ServiceContext, ServiceSpec
from gristmill.store.blobs import BlobStore
from gristmill.store.catalog import Catalog, CatalogApi, DatasetRow, VersionRow
from gristmill.store.ceph import CephBackend
from gristmill.store.config import StoreConfig
from gristmill.store.disk import DiskReserve, private_dir
from gristmill.store.objects import open_backend
from gristmill.store.poolcatalog import PoolCatalog
from gristmill.store.store import Store
from gristmill.v1 import store_pb2, store_pb2_grpc

__all__ = ["SERVICE", "StoreServicer", "open_store"]

log = logging.getLogger("gristmill.store")


def _timestamp(iso: str) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.datetime.fromisoformat(iso))
    return ts


def dataset_message(row: DatasetRow) -> store_pb2.Dataset:
    """Proto view of a dataset row."""
    return store_pb2.Dataset(name=row.name, description=row.description,
                             create_time=_timestamp(row.created), file_count=row.file_count,
                             total_bytes=row.total_bytes, latest_version=row.latest_version)


def version_message(row: VersionRow) -> store_pb2.Version:
    """Proto view of a version row."""
    return store_pb2.Version(id=row.id, dataset=row.dataset, create_time=_timestamp(row.created),
                             file_count=row.file_count, total_bytes=row.total_bytes)


class StoreServicer(store_pb2_grpc.StoreServiceServicer):
    """gRPC front of the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def CreateDataset(self, request: store_pb2.CreateDatasetRequest,
                      context: grpc.ServicerContext) -> store_pb2.CreateDatasetResponse:
        row = self.store.create_dataset(request.name, request.description)
        return store_pb2.CreateDatasetResponse(dataset=dataset_message(row))

    def GetDataset(self, request: store_pb2.GetDatasetRequest,
                   context: grpc.ServicerContext) -> store_pb2.GetDatasetResponse:
        return store_pb2.GetDatasetResponse(
            dataset=dataset_message(self.store.get_dataset(request.name)))

    def ListDatasets(self, request: store_pb2.ListDatasetsRequest,
                     context: grpc.ServicerContext) -> store_pb2.ListDatasetsResponse:
        size = page_size(request.page_size, 100, 1000)
        after = decode_page_token(request.page_token, "datasets")
        rows = self.store.list_datasets(after, size + 1)
        token = encode_page_token("datasets", rows[size - 1].name) if len(rows) > size else ""
        return store_pb2.ListDatasetsResponse(
            datasets=[dataset_message(r) for r in rows[:size]], next_page_token=token)

    def DeleteDataset(self, request: store_pb2.DeleteDatasetRequest,
                      context: grpc.ServicerContext) -> store_pb2.DeleteDatasetResponse:
        blobs, freed = self.store.delete_dataset(request.name)
        return store_pb2.DeleteDatasetResponse(blobs_deleted=blobs, bytes_freed=freed)

    def PutFiles(self, request_iterator: Iterator[store_pb2.PutFilesRequest],
                 context: grpc.ServicerContext) -> store_pb2.PutFilesResponse:
        _, result = self.store.put_files(request_iterator, context.is_active)
        return store_pb2.PutFilesResponse(files=result.entries,
                                          bytes_received=result.bytes_received,
                                          blobs_created=result.blobs_created)

    def FindBlobs(self, request: store_pb2.FindBlobsRequest,
                  context: grpc.ServicerContext) -> store_pb2.FindBlobsResponse:
        return store_pb2.FindBlobsResponse(present=self.store.find_blobs(list(request.sha256)))

    def FindFiles(self, request: store_pb2.FindFilesRequest,
                  context: grpc.ServicerContext) -> store_pb2.FindFilesResponse:
        present, stored = self.store.find_files(request.dataset, list(request.files))
        return store_pb2.FindFilesResponse(present=present, stored=stored)

    def DeleteFiles(self, request: store_pb2.DeleteFilesRequest,
                    context: grpc.ServicerContext) -> store_pb2.DeleteFilesResponse:
        n = self.store.delete_files(request.dataset, list(request.paths))
        return store_pb2.DeleteFilesResponse(deleted=n)

    def ListManifest(self, request: store_pb2.ListManifestRequest,
                     context: grpc.ServicerContext) -> store_pb2.ListManifestResponse:
        size = page_size(request.page_size, 1000, 10_000)
        validate_dataset_name(request.dataset, "dataset")
        query = ["manifest", request.dataset, request.version or "latest", request.prefix]
        after = decode_page_token(request.page_token, query)
        version, entries = self.store.list_manifest(request.dataset, request.version, after,
                                                    size + 1, request.prefix)
        token = encode_page_token(query, entries[size - 1].path) if len(entries) > size else ""
        return store_pb2.ListManifestResponse(files=entries[:size], next_page_token=token,
                                              version=version)

    def GetManifest(self, request: store_pb2.GetManifestRequest,
                    context: grpc.ServicerContext) -> Iterator[store_pb2.GetManifestResponse]:
        for version, count, piece in self.store.manifest_chunks(request.dataset,
                                                                request.version):
            yield store_pb2.GetManifestResponse(version=version, file_count=count, data=piece)

    def ReadFiles(self, request: store_pb2.ReadFilesRequest,
                  context: grpc.ServicerContext) -> Iterator[store_pb2.ReadFilesResponse]:
        yield from self.store.read_files(
            request.dataset, request.version, list(request.paths), verify=request.verify,
            offset=request.offset, length=request.length, budget=request.max_message_bytes)

    def CommitVersion(self, request: store_pb2.CommitVersionRequest,
                      context: grpc.ServicerContext) -> store_pb2.CommitVersionResponse:
        row, created = self.store.commit_version(request.dataset)
        return store_pb2.CommitVersionResponse(version=version_message(row), created=created)

    def ListVersions(self, request: store_pb2.ListVersionsRequest,
                     context: grpc.ServicerContext) -> store_pb2.ListVersionsResponse:
        size = page_size(request.page_size, 100, 1000)
        validate_dataset_name(request.dataset, "dataset")
        query = ["versions", request.dataset]
        after = decode_page_token(request.page_token, query)
        rows = self.store.list_versions(request.dataset, after, size + 1)
        token = (encode_page_token(query, f"{rows[size - 1].created}|{rows[size - 1].id}")
                 if len(rows) > size else "")
        return store_pb2.ListVersionsResponse(versions=[version_message(r) for r in rows[:size]],
                                              next_page_token=token)

    def GetStoreInfo(self, request: store_pb2.GetStoreInfoRequest,
                     context: grpc.ServicerContext) -> store_pb2.GetStoreInfoResponse:
        return store_pb2.GetStoreInfoResponse(store_id=self.store.catalog.store_id)


SERVICE_NAME = "gristmill.v1.StoreService"


def open_store(ctx: ServiceContext) -> Store:
    """The store for a server config: objects on the configured backend, and its catalog.

    The catalog is SQLite in ``data_dir/store``, or (Ceph with
    ``store.backend.catalog: pool``, the default there) objects of the pool,
    shared by every replica. Committed manifests are files in
    ``data_dir/store/manifests`` either way (on Ceph a cache, built again
    from the pool when missing). The data directory and everything the store
    creates in it are private to the server's user (directories 0700, files 0600).
    """
    cfg = ctx.config
    private_dir(cfg.data_dir)
    root = private_dir(cfg.data_dir / "store")
    config = StoreConfig.of(cfg)
    reserve = DiskReserve(root / "reserve", config.disk_reserve_bytes)
    backend = open_backend(config, root)
    catalog: CatalogApi
    if isinstance(backend, CephBackend) and config.catalog_in_pool:
        _refuse_local_catalog(root / "catalog.sqlite")
        catalog = PoolCatalog(backend, root / "catalog", backend.config.catalog_shards)
    else:
        catalog = Catalog(root / "catalog.sqlite")
    return Store(catalog, BlobStore(backend), read_message_bytes=config.read_message_bytes,
                 read_chunk_bytes=config.read_chunk_bytes, reserve=reserve,
                 manifest_dir=root / "manifests")


def _refuse_local_catalog(path: Path) -> None:
    """A pool catalog must not hide datasets an older server recorded in SQLite."""
    if not path.is_file():
        return
    # read only: opening it as a Catalog would migrate and write a file this server does not use
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            held = conn.execute("SELECT count(*) FROM datasets").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            held = 0
    if held:
        raise FailedPrecondition(
            f"{path} holds {held} dataset(s) recorded in the local catalog; the Ceph backend "
            "now keeps its catalog in the pool (store.backend.catalog: pool). Copy them there "
            "with `gristmill store migrate-catalog --config CONFIG` (server stopped), or set "
            "store.backend.catalog: local to keep serving them from this directory",
            reason="LOCAL_CATALOG_IN_USE")


#: Grace period of start-up garbage collection when other replicas share the catalog.
SHARED_GC_GRACE = 3600.0


def start_up(store: Store, gc: bool) -> None:
    """Before serving: collect garbage left by a crash (or only staging files), fill the reserve.

    The filesystem backend has a single writer (one server per data
    directory), so nothing in flight can be lost: no grace period. A catalog
    in the pool is shared with other replicas, whose uploads may be in
    flight: only their staging older than :data:`SHARED_GC_GRACE` seconds is
    removed, and collecting blobs is left to ``gristmill store gc``.
    """
    try:
        if store.catalog.shared:
            # other replicas' uploads may be in flight, and a collection marks the whole
            # catalog: leave it to `gristmill store gc` (docs/storage.md)
            store.blobs.remove_temporaries(time.time() - SHARED_GC_GRACE)
            log.info("the catalog is shared: garbage collection is left to `gristmill store "
                     "gc`; removed only staging older than %g s", SHARED_GC_GRACE)
        elif gc:
            report = store.collect_garbage(0.0, fix_modes=True)
            log.info("start-up garbage collection: %s", report.summary())
            return
        else:
            store.blobs.remove_temporaries(float("inf"))
        if store.reserve is not None:
            store.reserve.ensure()
    except (GristmillError, OSError):  # serve anyway: `gristmill store gc` can run later
        log.warning("start-up garbage collection failed", exc_info=True)


def _build(ctx: ServiceContext, server: grpc.Server) -> None:
    store = open_store(ctx)
    start_up(store, StoreConfig.of(ctx.config).gc_on_start)
    ctx.local["store"] = store
    ctx.resources.append(store)
    ctx.health_checks[SERVICE_NAME] = store.blobs.backend.check_health
    store_pb2_grpc.add_StoreServiceServicer_to_server(StoreServicer(store), server)


SERVICE = ServiceSpec(
    name="store",
    full_name=SERVICE_NAME,
    build=_build,
    roles={
        "CreateDataset": Role.WRITER,
        "GetDataset": Role.READER,
        "ListDatasets": Role.READER,
        "DeleteDataset": Role.ADMIN,
        "PutFiles": Role.WRITER,
        "FindBlobs": Role.WRITER,
        "FindFiles": Role.WRITER,
        "DeleteFiles": Role.WRITER,
        "ListManifest": Role.READER,
        "GetManifest": Role.READER,
        "ReadFiles": Role.READER,
        "CommitVersion": Role.WRITER,
        "ListVersions": Role.READER,
        "GetStoreInfo": Role.READER,
    },
)
