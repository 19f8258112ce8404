"""What a request may make the server hold is bounded by configuration, not by the request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from gristmill.client.errors import InvalidArgument, ResourceExhausted, call_rpc
from gristmill.client.hub import Hub
from gristmill.v1 import decode_pb2, decode_pb2_grpc, ingest_pb2, ingest_pb2_grpc
from scripts.sample_data import jpeg_bytes, make_sample_folder
from tests.helpers import (
    DATASET,
    Running,
    epoch,
    loader,
    peak_rss_bytes,
    spawn_server,
    start_in_process,
    stop_process,
)

MiB = 1 << 20


@pytest.fixture
def fed(server: Running, hub: Hub, tmp_path: Path) -> Running:
    """The in-process server with a few small photos imported and committed.

    Their paths are about 90 bytes long (a long folder name).
    """
    make_sample_folder(tmp_path / "photos" / ("d" * 64), count=12, max_side=200)
    hub.import_folder(DATASET, tmp_path / "photos")
    hub.commit_version(DATASET)
    return server


def _rpc_error(call: Iterator[object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        for _ in call:
            pass
    return info.value


def test_a_batch_larger_than_the_stream_budget_is_refused_when_planned(fed: Running) -> None:
    # 4 x 8192 x 8192 x 3 bytes = 768 MiB for one batch: over the 256 MiB a stream may hold
    with pytest.raises(ResourceExhausted) as info:
        loader(fed, image_size=8192, batch_size=4)
    message = info.value.message
    assert "ingest.stream_prefetch_bytes" in message and "spec.batch_size" in message
    assert "MiB" in message and info.value.metadata.get("field") == "spec.batch_size"


def test_a_sample_larger_than_a_message_is_refused_before_decoding(fed: Running) -> None:
    with loader(fed, image_size=128) as ld:  # a plan that is fine, then one sample of 192 MiB
        spec = ld.spec
    spec.transform.buckets.image_size = 8192
    spec.batch_size = 1
    stub = ingest_pb2_grpc.IngestServiceStub(fed.channel())
    started = time.monotonic()
    error = _rpc_error(stub.StreamBatches(ingest_pb2.StreamBatchesRequest(spec=spec)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = error.details() or ""
    assert "max_message_bytes" in details and "image_size" in details, details
    assert time.monotonic() - started < 5  # refused up front, nothing decoded


def test_a_decode_request_whose_response_cannot_be_sent_is_refused(fed: Running) -> None:
    stub = decode_pb2_grpc.DecodeServiceStub(fed.channel())
    dot = decode_pb2.DecodeSample(image=decode_pb2.ImageSource(data=jpeg_bytes(1, 1)))
    request = decode_pb2.DecodeRequest(  # 2 x 48 MiB of raw pixels: over one 64 MiB response
        transform=decode_pb2.Transform(fixed=decode_pb2.FixedSize(width=4096, height=4096)),
        samples=[dot, dot])
    error = _rpc_error(stub.Decode(iter([request])))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "send at most 1 samples per request" in (error.details() or ""), error.details()


def test_a_remote_decoder_gets_batches_in_requests_whose_responses_fit(
        fed: Running, tmp_path: Path) -> None:
    # one batch is 4 x 1024 x 1024 x 3 = 12 MiB of pixels, a message at most 8 MiB
    small = {"max_message_bytes": 8 * MiB}
    decode = start_in_process(tmp_path / "decode", services=("decode",), **small)
    ingest = start_in_process(tmp_path / "ingest", services=("ingest",), **small, ingest={
        "store_address": fed.address, "store_api_key": fed.key("reader"),
        "decode_address": decode.address, "decode_api_key": decode.admin_key})
    try:
        with loader(ingest, image_size=1024, shared_memory=False) as ld:
            batches = epoch(ld)
            assert len(batches) == len(ld) and all(not b.errors for b in batches)
    finally:
        for r in (ingest, decode):
            assert r.server is not None
            r.server.stop(0)


def test_companion_templates_take_plain_fields_only(fed: Running) -> None:
    bad = ["{stem!r:>99999999}", "masks/{stem:>40}.png", "masks/{stem!s}.png",
           "masks/{stem.upper}.png", "masks/{path[0]}.png", "masks/" + "x" * 300 + "{stem}.png",
           "{{stem}}.png"]
    for template in bad:
        with pytest.raises(InvalidArgument) as info:
            loader(fed, companions=[template])
        assert info.value.field == "spec.companions[0]", template
        assert "{stem}" in info.value.message, template
    with pytest.raises(InvalidArgument, match="at most"):
        loader(fed, companions=[f"m{i}/{{stem}}.png" for i in range(17)])
    # a template whose expansion is longer than a store path is refused too
    with pytest.raises(InvalidArgument, match="1024 bytes"):
        loader(fed, companions=["/".join(["{path}"] * 12)])


def _spawn_fed(tmp_path: Path, count: int) -> Running:
    """A `gristmill serve` subprocess (its memory measured on its own), fed with photos."""
    running = spawn_server(tmp_path / "data")
    try:
        make_sample_folder(tmp_path / "photos", count=count, max_side=160)
        with Hub(running.address, running.admin_key, tmp_path / "cache",
                 show_progress=False) as hub:
            hub.import_folder(DATASET, tmp_path / "photos")
            hub.commit_version(DATASET)
    except BaseException:
        stop_process(running)
        raise
    return running


@pytest.fixture
def spawned(tmp_path: Path) -> Iterator[Running]:
    running = _spawn_fed(tmp_path, 4)
    yield running
    stop_process(running)


def test_a_fixed_output_over_max_pixels_is_refused_before_decoding(spawned: Running) -> None:
    assert spawned.process is not None
    before = peak_rss_bytes(spawned.process.pid)
    stub = decode_pb2_grpc.DecodeServiceStub(spawned.channel())
    request = decode_pb2.DecodeRequest(
        transform=decode_pb2.Transform(fixed=decode_pb2.FixedSize(width=16384, height=16384)),
        samples=[decode_pb2.DecodeSample(id="dot", image=decode_pb2.ImageSource(
            data=jpeg_bytes(1, 1)))])
    error = _rpc_error(stub.Decode(iter([request])))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "decode.max_pixels" in (error.details() or ""), error.details()
    with pytest.raises(ResourceExhausted, match="decode.max_pixels"):  # the feed alike
        _plan_fixed(spawned, 16384)
    grown = peak_rss_bytes(spawned.process.pid) - before
    assert grown < 64 * MiB, f"the server's peak RSS grew by {grown / MiB:.0f} MiB"


def _plan_fixed(running: Running, side: int) -> None:
    with loader(running, batch_size=1) as ld:
        spec = ld.spec
    spec.transform.ClearField("buckets")
    spec.transform.fixed.width = spec.transform.fixed.height = side
    stub = ingest_pb2_grpc.IngestServiceStub(running.channel())
    call_rpc(stub.PlanEpoch, ingest_pb2.PlanEpochRequest(spec=spec))


#: A small prefetch budget for the subprocess server: 2 batches per stream, 4 in all.
BATCH, SIZE = 8, 512
BATCH_BYTES = BATCH * SIZE * SIZE * 3  # the largest bucket of image_size 512 is square
BUDGET_ENV = {
    "GRISTMILL_INGEST__PREFETCH_BATCHES": "16",
    "GRISTMILL_INGEST__STREAM_PREFETCH_BYTES": str(2 * BATCH_BYTES),
    "GRISTMILL_INGEST__SERVER_PREFETCH_BYTES": str(4 * BATCH_BYTES),
}
STREAMS = 10


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _settled(pid: int, quiet: float = 3.0, limit: float = 60.0) -> int:
    """RSS once it stopped growing for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    high, since = _rss(pid), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < quiet:
        time.sleep(0.25)
        now = _rss(pid)
        if now > high + MiB:
            high, since = now, time.monotonic()
    return _rss(pid)


@pytest.fixture
def budgeted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    """A fed subprocess server with the small prefetch budget above."""
    for key, value in BUDGET_ENV.items():
        monkeypatch.setenv(key, value)
    running = _spawn_fed(tmp_path, 96)
    yield running
    stop_process(running)


def test_slow_consumers_hold_no_more_than_the_prefetch_budget(budgeted: Running) -> None:
    spawned = budgeted
    assert spawned.process is not None
    pid = spawned.process.pid
    with loader(spawned, batch_size=BATCH, image_size=SIZE, shared_memory=False) as ld:
        biggest = max(b.bucket.width * b.bucket.height for b in ld.plan.buckets)
        assert BATCH * biggest * 3 <= BATCH_BYTES
        assert len(ld) >= 12
        for _ in ld:  # warm up: pools, caches, a first epoch
            pass
        spec = ld.spec
    baseline = _settled(pid)
    stub = ingest_pb2_grpc.IngestServiceStub(spawned.channel())
    calls = []
    for _ in range(STREAMS):  # open, read one message, stop reading
        call = stub.StreamBatches(ingest_pb2.StreamBatchesRequest(spec=spec))
        next(call)
        calls.append(call)
    held = _settled(pid) - baseline
    for call in calls:
        call.cancel()
    time.sleep(3)
    after = _rss(pid) - baseline
    # the budget: the server's share plus one batch per stream; gRPC buffers a few
    # messages per stream on top (chunk_bytes 1 MiB each)
    bound = 4 * BATCH_BYTES + STREAMS * (BATCH_BYTES + 4 * MiB) + 32 * MiB
    print(f"\nserver RSS: baseline {baseline / MiB:.0f} MiB, +{held / MiB:.0f} MiB with "
          f"{STREAMS} stalled streams (bound {bound / MiB:.0f} MiB), +{after / MiB:.0f} MiB "
          "after they ended")
    assert held <= bound, f"{STREAMS} stalled streams took {held / MiB:.0f} MiB"
    assert after <= 32 * MiB, f"{after / MiB:.0f} MiB stayed resident after the streams ended"
