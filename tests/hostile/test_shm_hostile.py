"""A client that breaks its own shared-memory ring must not take the server down."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gristmill.client.hub import Hub
from gristmill.client.shm import HEADER, RingReader
from gristmill.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from scripts.sample_data import make_sample_folder
from tests.helpers import DATASET, Running, epoch, loader, spawn_server, stop_process

#: Room for one batch of the SMALL options (4 x 128 x 128 x 3 bytes), not two.
ONE_BATCH = 256 * 1024


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    """A `gristmill serve` subprocess (a crash must not take the test with it), fed."""
    running = spawn_server(tmp_path / "data")
    try:
        folder = tmp_path / "photos"
        make_sample_folder(folder, count=22, max_side=360)
        with Hub(running.address, running.admin_key, tmp_path / "cache",
                 show_progress=False) as hub:
            hub.import_folder(DATASET, folder)
            hub.commit_version(DATASET)
        yield running
    finally:
        stop_process(running)


@pytest.mark.parametrize("size, release", [(HEADER, True), (0, False)],
                         ids=["data-area-cut-off", "emptied"])
def test_a_client_truncating_its_ring_fails_its_stream_only(
        served: Running, size: int, release: bool) -> None:
    with loader(served) as ld:
        spec = ld.spec
    stub = ingest_pb2_grpc.IngestServiceStub(served.channel())
    ring = RingReader.create(ONE_BATCH)
    try:
        call = stub.StreamBatches(ingest_pb2.StreamBatchesRequest(
            spec=spec, ring=common_pb2.SharedMemoryRing(name=ring.name, capacity=ring.capacity,
                                            token=ring.token)))
        first = next(call)
        assert first.HasField("ring_slice")
        # the server now waits for the release of batch 0 before writing batch 1;
        # the client cuts the file under it (its name is gone: through the fd)
        os.ftruncate(ring._fd, size)
        if release:  # all of the ring, as a hostile client may claim; through the fd,
            # since the client's own mapping of the cut-off pages would fault too
            os.pwrite(ring._fd, struct.pack("<Q", first.ring_slice.release + ring.capacity),
                      16)
        with pytest.raises(grpc.RpcError) as info:
            for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION, info.value
        assert ring.name in (info.value.details() or "")
        assert "truncated" in (info.value.details() or "")
    finally:
        ring.close()
    assert served.process is not None and served.process.poll() is None, "the server died"
    with loader(served, shared_memory=True) as ld:  # the next client is served in full
        batches = epoch(ld)
        assert len(batches) == len(ld) and ld.pixel_path == "shared memory"
