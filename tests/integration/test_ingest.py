"""The ingest service and the Loader against real servers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from gristmill.client.delivery import audit
from gristmill.client.errors import FailedPrecondition, InvalidArgument, NotFound
from gristmill.client.hub import Hub
from gristmill.client.loader import Batch, Loader
from gristmill.decode import Decoder, SampleInput, Transform
from gristmill.v1 import ingest_pb2, ingest_pb2_grpc
from scripts.sample_data import make_sample_folder
from tests.helpers import (
    DATASET,
    SMALL,
    Running,
    both_backends,
    epoch,
    loader,
    planned,
    start_in_process,
)

# the server-based tests run on both store backends
storage = both_backends()


def test_two_ranks_get_every_sample_once_in_single_bucket_batches(fed: Running) -> None:
    fresh: Counter[str] = Counter()
    lengths = []
    for rank in (0, 1):
        with loader(fed, rank=rank, world_size=2) as ld:
            batches = epoch(ld)
            lengths.append(len(batches))
            assert len(batches) == len(ld)
            for b in batches:
                assert b.images.dtype == np.uint8 and b.images.flags.writeable
                assert b.images.shape[0] == 4 and b.images.shape[3] == 3
                assert not b.errors
                fresh.update(i for i, f in zip(b.ids, b.fresh, strict=True) if f)
            assert ld.plan.dataset_samples == 22
    assert lengths[0] == lengths[1]
    assert sorted(fresh) == sorted(e.path for e in Hub(fed.address, fed.admin_key, None)
                                   .list_manifest(DATASET)) and set(fresh.values()) == {1}


def test_pixels_are_the_decoders_at_the_bucket_size(fed: Running, photos: Path) -> None:
    with loader(fed) as ld:
        batch = next(iter(ld))
    h, w = batch.images.shape[1:3]
    with Decoder(1) as decoder:
        expected = decoder.decode(SampleInput((photos / batch.ids[0]).read_bytes()),
                                  Transform(size=(w, h)))
    assert not isinstance(expected, Exception)
    np.testing.assert_array_equal(batch.images[0], expected.image.pixels)


def test_small_chunks_assemble_to_the_same_batches(fed: Running) -> None:
    spec = loader(fed).spec
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())

    def collect(chunk_bytes: int) -> tuple[int, list[bytes]]:
        msgs = list(stub.StreamBatches(ingest_pb2.StreamBatchesRequest(
            spec=spec, rank=0, chunk_bytes=chunk_bytes, max_batches=3)))
        return len(msgs), [m.pixels for m in msgs]

    n_big, big = collect(32 * 1024 * 1024)
    n_small, small = collect(64 * 1024)
    assert n_big == 3 and n_small > 3
    assert b"".join(big) == b"".join(small)


def test_state_dict_resumes_at_exactly_the_next_batch(fed: Running) -> None:
    with loader(fed, seed=5) as ld:
        ld.set_epoch(1)
        whole = epoch(ld)
    with loader(fed, seed=5) as ld:
        ld.set_epoch(1)
        it = iter(ld)
        first = [next(it), next(it)]
        state = ld.state_dict()
        it.close()  # the process "dies" here
    assert state["epoch"] == 1 and state["position"] == 2
    with loader(fed, seed=5) as ld:
        ld.load_state_dict(state)
        rest = epoch(ld)
        assert ld.epoch == 2  # a finished epoch moves on
    assert planned(first + rest) == planned(whole)
    for a, b in zip(first + rest, whole, strict=True):
        np.testing.assert_array_equal(a.images, b.images)
    with loader(fed, seed=6) as other, pytest.raises(ValueError, match="different plan"):
        other.load_state_dict(state)


def test_epochs_differ_and_repeat_deterministically(fed: Running) -> None:
    with loader(fed, seed=1) as ld:
        e0, e1 = planned(epoch(ld)), planned(epoch(ld))
        ld.set_epoch(0)
        again = planned(epoch(ld))
    assert e0 != e1 and e0 == again


def test_errors_name_the_problem(fed: Running, server: Running, hub: Hub) -> None:
    with pytest.raises(NotFound):
        Loader(fed.address, "nope", api_key=fed.admin_key)
    hub.create_dataset("empty")
    with pytest.raises(FailedPrecondition, match="gristmill dataset commit empty"):
        Loader(fed.address, "empty", api_key=fed.admin_key)
    with pytest.raises(InvalidArgument, match="batch_size"):
        loader(fed, batch_size=0)
    with pytest.raises(InvalidArgument, match="companions"):
        loader(fed, companions=["masks/{oops}.png"])
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    spec = loader(fed).spec
    for request, field in [
        (ingest_pb2.StreamBatchesRequest(spec=spec, rank=1), "rank"),
        (ingest_pb2.StreamBatchesRequest(spec=spec, cursor=ingest_pb2.Cursor(position=999)),
         "cursor.position"),
        (ingest_pb2.StreamBatchesRequest(spec=ingest_pb2.PlanSpec(
            dataset=DATASET, version="latest", world_size=1, batch_size=1,
            transform=spec.transform)), "spec.version"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamBatches(request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (info.value.details() or "")
    bad = ingest_pb2.PlanSpec()
    bad.CopyFrom(spec)
    bad.release = "r1"  # no annotation log (see test_stream_annotations.py)
    with pytest.raises(grpc.RpcError) as info:
        stub.PlanEpoch(ingest_pb2.PlanEpochRequest(spec=bad))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'r1'" in (info.value.details() or "")
    assert "gristmill annotate init" in (info.value.details() or "")


def test_corrupt_images_are_reported_while_the_rest_flow(server: Running, hub: Hub,
                                                         photos: Path, tmp_path: Path) -> None:
    good = (photos / "squares").glob("*.jpg")
    data = next(iter(good)).read_bytes()
    (photos / "broken").mkdir()
    (photos / "broken" / "truncated.jpg").write_bytes(data[:len(data) // 3])
    (photos / "broken" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    hub.import_folder(DATASET, photos)
    hub.commit_version(DATASET)
    failures = {}
    delivered = 0
    with loader(server, batch_size=3, delivery_log=tmp_path / "log") as ld:
        for b in epoch(ld):
            failures.update({e.id: e.reason for e in b.errors})
            delivered += len(b)
            assert b.images.shape[0] == len(b.ids) == len(b) == 3 - len(b.errors)
    assert failures == {"broken/truncated.jpg": "TRUNCATED",
                        "broken/garbage.jpg": "UNSUPPORTED_FORMAT"}
    assert delivered >= 22
    report = audit(tmp_path / "log")
    assert report.ok and report.epochs[0].failed_samples == 2


def test_companions_are_cut_like_their_image(server: Running, hub: Hub, tmp_path: Path) -> None:
    root = tmp_path / "masked"
    make_sample_folder(root / "images", count=6, max_side=300)
    for p in (root / "images").rglob("*.*"):
        with Image.open(p) as im:
            size = im.size
        mask = Image.new("L", (size[0] // 2, size[1] // 2), 7)
        rel = p.relative_to(root / "images").with_suffix(".png")
        (root / "masks" / rel).parent.mkdir(parents=True, exist_ok=True)
        mask.save(root / "masks" / rel)
    hub.import_folder("masked", root)
    hub.commit_version("masked")
    with Loader(server.address, "masked", **SMALL, prefix="images/",  # type: ignore[arg-type]
                companions=["masks/{stem}.png"], api_key=server.admin_key) as ld:
        batches = epoch(ld)
    assert sum(len(b) for b in batches) >= 6
    for b in batches:
        assert all(i.startswith("images/") for i in b.ids)
        masks = b.companion(0)
        assert masks.shape[:3] == b.images.shape[:3] and (masks == 7).all()


def test_separate_services_give_the_same_batches(fed: Running, tmp_path: Path) -> None:
    store_key = fed.key("reader")
    decode = start_in_process(tmp_path / "decode", services=("decode",))
    ingest = start_in_process(tmp_path / "ingest", services=("ingest",), ingest={
        "store_address": fed.address, "store_api_key": store_key,
        "decode_address": decode.address, "decode_api_key": decode.admin_key})
    try:
        with loader(fed, seed=3) as ld:
            together = epoch(ld)
        with loader(ingest, seed=3) as ld:
            apart = epoch(ld)
        assert planned(apart) == planned(together)
        for a, b in zip(apart, together, strict=True):
            np.testing.assert_array_equal(a.images, b.images)
            assert a.source_sizes == b.source_sizes
            assert a.source_channels == b.source_channels
    finally:
        for r in (ingest, decode):
            assert r.server is not None
            r.server.stop(0)


def test_from_folder_matches_the_server(fed: Running, photos: Path) -> None:
    with loader(fed, seed=9, rank=1, world_size=2) as ld:
        served = epoch(ld)
    with Loader.from_folder(photos, seed=9, rank=1, world_size=2, show_progress=False,
                            **SMALL) as ld:  # type: ignore[arg-type]
        local = epoch(ld)
    assert planned(local) == planned(served)
    for a, b in zip(local, served, strict=True):
        np.testing.assert_array_equal(a.images, b.images)


def test_batches_carry_each_sources_size_and_channels(fed: Running, photos: Path) -> None:
    with loader(fed) as ld:
        served = epoch(ld)
    with Loader.from_folder(photos, show_progress=False, **SMALL) as ld:  # type: ignore[arg-type]
        local = epoch(ld)
    for batches in (served, local):
        seen = 0
        for b in batches:
            assert len(b.source_sizes) == len(b.source_channels) == len(b.ids)
            for sid, size, channels in zip(b.ids, b.source_sizes, b.source_channels,
                                           strict=True):
                with Image.open(photos / sid) as im:
                    assert size == im.size
                    assert channels == {"L": 1, "RGB": 3}[im.mode]
                seen += 1
        assert seen >= 22


def test_as_torch_needs_torch_or_says_how_to_get_it(fed: Running) -> None:
    with loader(fed) as ld:
        try:
            import torch  # noqa: F401
        except ImportError:
            with pytest.raises(ImportError, match="pip install torch"):
                ld.as_torch()
            return
        from torch.utils.data import DataLoader

        dataset = ld.as_torch()
        batches = list(DataLoader(dataset, batch_size=None))
        assert len(batches) == len(dataset) == len(ld)
        assert all(isinstance(b, Batch) and b.images.shape[0] == 4 for b in batches)
        with pytest.raises(RuntimeError, match="num_workers=0"):
            list(DataLoader(dataset, batch_size=None, num_workers=1))
