"""The store on Ceph through an outage: UNAVAILABLE within the timeout, NOT_SERVING on
health, and the same server serving again once the cluster is back, with nothing
acknowledged lost."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.v1 import store_pb2
from tests.ceph import CephCluster
from tests.helpers import ceph_backend, spawn_server, start_in_process, stop_process

TIMEOUT = 3


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status)


def wait_for(predicate: object, seconds: float) -> float:
    start = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - start < seconds, "condition not reached in time"
        time.sleep(0.2)
    return time.monotonic() - start


def test_cluster_down_gives_unavailable_then_resumes(tmp_path: Path,
                                                     ceph_cluster: CephCluster) -> None:
    running = start_in_process(
        tmp_path / "data",
        store={"backend": ceph_backend(ceph_cluster, timeout_seconds=TIMEOUT)})
    assert running.server is not None
    running.server.probe_seconds = 0.5
    stub = running.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"))
    before = os.urandom(200_000)
    stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="before.bin", size=len(before), data=before, last=True)])]))
    channel = running.channel(None)
    try:
        ceph_cluster.stop()
        # a write and a read that need the cluster fail fast with UNAVAILABLE
        after = os.urandom(1000)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
                store_pb2.FileChunk(path="after.bin", size=len(after), data=after,
                                    last=True)])]), timeout=60)
        took = time.monotonic() - t0
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        details = info.value.details() or ""
        assert "Ceph pool" in details and "ceph" in details and "-s" in details
        assert took < 3 * TIMEOUT + 5
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.ReadFiles(store_pb2.ReadFilesRequest(dataset="d",
                                                               paths=["before.bin"]),
                                    timeout=60):
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert time.monotonic() - t0 < 3 * TIMEOUT + 5
        # health turns NOT_SERVING (overall and for the store)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        wait_for(lambda: health(channel) == not_serving, 4 * TIMEOUT + 5)
        assert health(channel, "gristmill.v1.StoreService") == not_serving
        # the catalog is in the pool too: its calls fail as fast, naming the cluster
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetDataset(store_pb2.GetDatasetRequest(name="d"), timeout=60)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
        assert "Ceph pool" in (info.value.details() or "")
        assert time.monotonic() - t0 < 3 * TIMEOUT + 5
    finally:
        ceph_cluster.start()
    # the same server resumes by itself; what was acknowledged is there
    serving = health_pb2.HealthCheckResponse.SERVING
    wait_for(lambda: health(channel) == serving, 60)
    got = b"".join(f.data for r in stub.ReadFiles(store_pb2.ReadFilesRequest(
        dataset="d", paths=["before.bin"])) for f in r.files)
    assert got == before
    stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="d", chunks=[
        store_pb2.FileChunk(path="after.bin", size=len(after), data=after, last=True)])]))
    assert stub.GetDataset(store_pb2.GetDatasetRequest(name="d")).dataset.file_count == 2
    channel.close()
    running.server.stop(0)


def test_misconfigured_cluster_is_named_with_the_fix(tmp_path: Path,
                                                     ceph_cluster: CephCluster) -> None:
    """A wrong conf path or pool: the server starts, calls say what is wrong and how to fix it."""
    for backend, expect in (
            (ceph_backend(ceph_cluster, conf=str(tmp_path / "nope.conf")), "no conf file"),
            (ceph_backend(ceph_cluster, pool="no-such-pool"), "osd pool create no-such-pool")):
        running = start_in_process(tmp_path / f"data-{expect[:4]}", store={"backend": backend})
        assert running.server is not None
        stub = running.store()
        with pytest.raises(grpc.RpcError) as info:  # the catalog is in the pool
            stub.CreateDataset(store_pb2.CreateDatasetRequest(name="d"), timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert expect in (info.value.details() or "")
        assert not running.server.probe_health()
        running.server.stop(0)


def test_serve_cli_selects_ceph(tmp_path: Path, ceph_cluster: CephCluster) -> None:
    """`gristmill serve --storage ceph --ceph-conf F --ceph-pool P` keeps objects in the pool."""
    running = spawn_server(tmp_path / "data", "--storage", "ceph", "--ceph-conf",
                           str(ceph_cluster.conf), "--ceph-pool", ceph_cluster.pool,
                           "--ceph-timeout", "5")
    try:
        stub = running.store()
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name="cli"))
        data = os.urandom(5000)
        stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="cli", chunks=[
            store_pb2.FileChunk(path="a.bin", size=len(data), data=data, last=True)])]))
        client = ceph_cluster.connect(10)
        try:
            io = client.open_ioctx(ceph_cluster.pool)
            digest = hashlib.sha256(data).hexdigest()
            assert io.read(f"blobs/{digest[:2]}/{digest[2:4]}/{digest}", 10000) == data
            io.close()
        finally:
            client.shutdown()
        assert not (tmp_path / "data" / "store" / "blobs").exists()  # nothing on local disk
    finally:
        stop_process(running)
