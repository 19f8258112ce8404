"""The store on Ceph through an outage: UNAVAILABLE within the timeout, NOT_SERVING on
health, and the same server serving again once the cluster is back, with nothing
acknowledged lost."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.v1 import store_pb2
from tests.ceph import CephCluster
from tests.helpers import ceph_backend, start_in_process

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
        # calls that need only the local catalog still answer
        assert stub.GetDataset(store_pb2.GetDatasetRequest(name="d")).dataset.file_count == 1
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
