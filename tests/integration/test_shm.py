"""Pixels through a shared-memory ring against real servers, and the fallback to gRPC."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from prometheus_client import REGISTRY

from gristmill.client.errors import FailedPrecondition
from gristmill.client.hub import Hub
from gristmill.client.loader import Batch, Loader, _Assembler
from gristmill.client.shm import RING_UNAVAILABLE, RingReader
from gristmill.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc
from scripts.sample_data import make_sample_folder
from tests.helpers import SMALL, Running, epoch, loader, planned, start_in_process


def shm_bytes() -> float:
    return REGISTRY.get_sample_value("gristmill_ingest_bytes_out_total", {"path": "shm"}) or 0.0


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert planned(a) == planned(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.images, y.images)
        assert x.ids == y.ids and x.errors == y.errors and list(x.fresh) == list(y.fresh)
        for cx, cy in zip(x.companions, y.companions, strict=True):
            assert len(cx) == len(cy)
            for px, py in zip(cx, cy, strict=True):
                np.testing.assert_array_equal(px, py)


def test_the_ring_gives_the_same_batches_as_grpc(server: Running, hub: Hub,
                                                 tmp_path: Path) -> None:
    root = tmp_path / "masked"
    make_sample_folder(root / "images", count=10, max_side=300)
    for p in sorted((root / "images").rglob("*.*")):
        with Image.open(p) as im:
            mask = im.convert("L").resize((im.width // 2, im.height // 2))
        rel = p.relative_to(root / "images").with_suffix(".png")
        (root / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        mask.save(root / "masks" / rel)
    (root / "images" / "broken.jpg").write_bytes(b"not a jpeg" * 20)
    hub.import_folder("masked", root)
    hub.commit_version("masked")
    kw = {**SMALL, "batch_size": 3, "prefix": "images/", "companions": ["masks/{stem}.png"],
          "api_key": server.admin_key, "seed": 4}
    before = shm_bytes()
    with Loader(server.address, "masked", shared_memory=True,
                **kw) as ld:  # type: ignore[arg-type]
        shared = epoch(ld) + epoch(ld)
        assert ld.pixel_path == "shared memory"
    moved = shm_bytes() - before
    with Loader(server.address, "masked", shared_memory=False,
                **kw) as ld:  # type: ignore[arg-type]
        sent = epoch(ld) + epoch(ld)
        assert ld.pixel_path == "gRPC"
    assert shm_bytes() - before == moved  # the gRPC run put nothing in a ring
    assert moved == sum(b.images.nbytes + sum(c.nbytes for cs in b.companions for c in cs)
                        for b in shared)
    assert any(b.errors for b in shared) and all(b.companions for b in shared if len(b))
    assert_same(shared, sent)


def test_a_ring_too_small_for_a_batch_gets_it_inline(fed: Running) -> None:
    spec = loader(fed).spec
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    plain = [m for m in stub.StreamBatches(ingest_pb2.StreamBatchesRequest(spec=spec))]

    def through(capacity: int) -> tuple[list[Batch], list[ingest_pb2.StreamBatchesResponse]]:
        ring = RingReader.create(capacity)
        try:
            msgs = list(stub.StreamBatches(ingest_pb2.StreamBatchesRequest(
                spec=spec, ring=common_pb2.SharedMemoryRing(name=ring.name, capacity=ring.capacity,
                                            token=ring.token))))
            # unlike a Loader, this reads only after the stream ended: every batch
            # must have fitted beside the unreleased ones, or come inline
            batches, assembler = [], _Assembler(ring)
            for m in msgs:
                b = assembler.add(m)
                if b is not None:
                    batches.append(b)
                    assembler = _Assembler(ring)
            return batches, msgs
        finally:
            ring.close()

    def reference() -> list[Batch]:
        batches, assembler = [], _Assembler()
        for m in plain:
            b = assembler.add(m)
            if b is not None:
                batches.append(b)
                assembler = _Assembler()
        return batches

    tiny, tiny_msgs = through(4096)
    assert not any(m.HasField("ring_slice") for m in tiny_msgs)
    assert_same(tiny, reference())
    roomy, roomy_msgs = through(64 << 20)
    assert all(m.HasField("ring_slice") and not m.pixels for m in roomy_msgs)
    assert_same(roomy, reference())


def test_a_server_that_cannot_open_the_ring_falls_back_to_grpc(
        fed: Running, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    other.mkdir()
    store_key = fed.key("reader")
    for shm_dir in (None, other):  # shared memory off; another host's /dev/shm
        ingest = start_in_process(tmp_path / f"ingest-{shm_dir is None}", services=(
            "ingest", "decode"), ingest={"store_address": fed.address,
                                         "store_api_key": store_key, "shm_dir": shm_dir})
        try:
            with loader(ingest) as ld:
                assert ld.pixel_path == "shared memory"  # until the server says otherwise
                batches = epoch(ld)
                assert ld.pixel_path == "gRPC" and len(batches) == len(ld)
            with loader(ingest, shared_memory=True) as ld, \
                    pytest.raises(FailedPrecondition) as info:
                epoch(ld)
            assert info.value.reason == RING_UNAVAILABLE
            assert "stream without a ring" in info.value.message
        finally:
            assert ingest.server is not None
            ingest.server.stop(0)


def test_bad_ring_requests_get_invalid_argument(fed: Running) -> None:
    spec = loader(fed).spec
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    for ring, field in [(common_pb2.SharedMemoryRing(name="../../etc/passwd", capacity=4096),
                         "ring.name"),
                        (common_pb2.SharedMemoryRing(name="gristmill-ring-a", capacity=100),
                         "ring.capacity")]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamBatches(ingest_pb2.StreamBatchesRequest(spec=spec, ring=ring)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (info.value.details() or "")


def test_from_folder_has_nothing_to_share(photos: Path) -> None:
    with pytest.raises(ValueError, match="in this process"):
        Loader.from_folder(photos, shared_memory=True, show_progress=False)
    with Loader.from_folder(photos, show_progress=False, **SMALL) as ld:  # type: ignore[arg-type]
        assert ld.pixel_path == "in-process" and len(epoch(ld)) == len(ld)


def test_a_ring_named_without_its_token_is_not_written(fed: Running, shm_dir: Path) -> None:
    """Knowing a ring's name (listing /dev/shm) is not enough to have the server write it."""
    spec = loader(fed).spec
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    ring = RingReader.create(4 * 1024 * 1024)
    try:
        for token in (b"", bytes(16)):
            with pytest.raises(grpc.RpcError) as info:
                list(stub.StreamBatches(ingest_pb2.StreamBatchesRequest(
                    spec=spec, ring=common_pb2.SharedMemoryRing(
                        name=ring.name, capacity=ring.capacity, token=token))))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "token" in (info.value.details() or "")
            assert (shm_dir / ring.name).exists()  # not opened for writing, not unlinked
        assert not ring.view(0, 4096).any()
    finally:
        ring.close()
