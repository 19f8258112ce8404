"""DecodeService over real gRPC: batches, store references, errors, backpressure, metrics."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from gristmill.client import DecodeClient, InvalidArgument, to_array
from gristmill.client.buckets import BucketConfig, bucket_table
from gristmill.client.errors import ResourceExhausted
from gristmill.client.hub import Hub
from gristmill.common.metrics import start_metrics_server
from gristmill.decode import Transform, decode_sample
from gristmill.v1 import decode_pb2, decode_pb2_grpc, store_pb2
from tests import images
from tests.helpers import Running, start_in_process

TRANSFORM = decode_pb2.Transform(buckets=decode_pb2.BucketConfig(image_size=256, downsampling=16))


def inline(data: bytes, sample_id: str, *companions: bytes) -> decode_pb2.DecodeSample:
    return decode_pb2.DecodeSample(
        id=sample_id, image=decode_pb2.ImageSource(data=data),
        companions=[decode_pb2.ImageSource(data=c) for c in companions])


def ref(dataset: str, path: str, sample_id: str) -> decode_pb2.DecodeSample:
    return decode_pb2.DecodeSample(id=sample_id, image=decode_pb2.ImageSource(
        ref=decode_pb2.StoreRef(dataset=dataset, path=path)))


@pytest.fixture
def client(server: Running) -> Iterator[DecodeClient]:
    with DecodeClient(server.address, server.admin_key) as c:
        yield c


def test_list_buckets(client: DecodeClient) -> None:
    got = client.list_buckets(1024, 32)
    want = bucket_table(BucketConfig(1024, 32))
    assert [(b.width, b.height, b.index) for b in got] == [
        (b.width, b.height, b.index) for b in want]
    assert len(client.list_buckets(224, 16)) == 11
    with pytest.raises(InvalidArgument, match="downsampling"):
        client.list_buckets(512, 1024)


def test_stream_with_corrupt_samples_returns_every_good_one(client: DecodeClient) -> None:
    good = {f"g{i}": images.encode(images.gradient(300 + 37 * i, 200 + 11 * i, seed=i),
                                   "JPEG" if i % 2 else "PNG") for i in range(20)}
    bad = {"empty": b"", "junk": b"\x00" * 100,
           "cut": images.encode(images.gradient(400, 300))[:2000],
           "huge": images.huge_png_header()}
    batches = []
    for b in range(4):
        samples = [inline(good[f"g{i}"], f"g{i}") for i in range(b * 5, b * 5 + 5)]
        samples.insert(2, inline(list(bad.values())[b], list(bad)[b]))
        batches.append(decode_pb2.DecodeRequest(transform=TRANSFORM if b == 0 else None,
                                                samples=samples))
    responses = list(client.decode(batches))
    assert [r.batch_index for r in responses] == [0, 1, 2, 3]
    results = [res for r in responses for res in r.results]
    assert len(results) == 24
    reasons = {r.id: decode_pb2.DecodeErrorReason.Name(r.error.reason)
               for r in results if r.WhichOneof("result") == "error"}
    assert reasons == {"empty": "DECODE_ERROR_REASON_CORRUPT",
                       "junk": "DECODE_ERROR_REASON_UNSUPPORTED_FORMAT",
                       "cut": "DECODE_ERROR_REASON_TRUNCATED",
                       "huge": "DECODE_ERROR_REASON_TOO_LARGE"}
    local = Transform(buckets=BucketConfig(256, 16))
    for r in results:
        if r.id in good:
            pixels = to_array(r.sample.image)
            expected = decode_sample(good[r.id], local)
            assert np.array_equal(pixels, expected.image.pixels)
            assert (r.sample.bucket.width, r.sample.bucket.height) == pixels.shape[1::-1]


def test_references_to_store_files(server: Running, hub: Hub, client: DecodeClient,
                                   tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    jpeg = images.encode(images.gradient(640, 480))
    (folder / "photo.jpg").write_bytes(jpeg)
    (folder / "lies.png").write_bytes(jpeg)  # a JPEG with a .png name
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    hub.create_dataset("pics")
    hub.import_folder("pics", folder)
    hub.commit_version("pics")
    req = decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[
        ref("pics", "photo.jpg", "a"), ref("pics", "lies.png", "b"),
        ref("pics", "missing.jpg", "c"), ref("pics", "broken.jpg", "d"),
        ref("nosuchset", "x.jpg", "e")])
    (resp,) = list(client.decode([req]))
    by_id = {r.id: r for r in resp.results}
    assert np.array_equal(to_array(by_id["a"].sample.image), to_array(by_id["b"].sample.image))
    assert by_id["c"].error.reason == decode_pb2.DECODE_ERROR_REASON_SOURCE_UNAVAILABLE
    assert "missing.jpg" in by_id["c"].error.message
    assert by_id["d"].error.reason in (decode_pb2.DECODE_ERROR_REASON_CORRUPT,
                                       decode_pb2.DECODE_ERROR_REASON_TRUNCATED)
    assert by_id["e"].error.reason == decode_pb2.DECODE_ERROR_REASON_SOURCE_UNAVAILABLE
    assert "nosuchset" in by_id["e"].error.message


def test_decode_apart_from_the_store(server: Running, hub: Hub, tmp_path: Path) -> None:
    """A decode-only server reads references from a remote store."""
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(images.encode(images.gradient(300, 300), "PNG"))
    hub.create_dataset("remote")
    hub.import_folder("remote", folder)
    hub.commit_version("remote")
    decode_only = start_in_process(tmp_path / "decode-data", services=("decode",),
                                   decode={"store_address": server.address,
                                           "store_api_key": server.key("reader")})
    try:
        with DecodeClient(decode_only.address, decode_only.admin_key) as c:
            (resp,) = list(c.decode([decode_pb2.DecodeRequest(
                transform=TRANSFORM, samples=[ref("remote", "a.png", "x")])]))
        assert to_array(resp.results[0].sample.image).shape == (256, 256, 3)
    finally:
        assert decode_only.server is not None
        decode_only.server.stop(0)


def test_companions_and_encoding_over_the_wire(client: DecodeClient) -> None:
    img = images.gradient(600, 400)
    mask = (np.arange(600)[None, :] // 100 * np.ones((400, 1), int)).astype(np.uint8)
    t = decode_pb2.Transform(fixed=decode_pb2.FixedSize(width=300, height=200),
                             encoding=decode_pb2.ENCODING_PNG)
    (resp,) = list(client.decode([decode_pb2.DecodeRequest(transform=t, samples=[
        inline(images.encode(img, "PNG"), "s", images.encode(mask, "PNG"))])]))
    sample = resp.results[0].sample
    assert sample.image.encoding == decode_pb2.ENCODING_PNG and sample.image.data[:4] == b"\x89PNG"
    assert len(sample.companions) == 1 and sample.companions[0].channels == 1
    with pytest.raises(ValueError, match="encoded"):
        to_array(sample.image)


@pytest.mark.parametrize("request_msg, field", [
    (decode_pb2.DecodeRequest(samples=[inline(b"x", "a")]), "transform"),
    (decode_pb2.DecodeRequest(transform=decode_pb2.Transform(), samples=[]), "transform.size"),
    (decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[decode_pb2.DecodeSample(id="a")]),
     "samples[0].image"),
    (decode_pb2.DecodeRequest(transform=decode_pb2.Transform(
        fixed=decode_pb2.FixedSize(width=10, height=10), quality=101)), "transform.quality"),
    (decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[
        decode_pb2.DecodeSample(id="a", image=decode_pb2.ImageSource(
            ref=decode_pb2.StoreRef(dataset="ds", path="../etc/passwd")))]), "path"),
])
def test_bad_requests_are_invalid_argument(client: DecodeClient,
                                           request_msg: decode_pb2.DecodeRequest,
                                           field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        list(client.decode([request_msg]))
    assert field in str(info.value)


def test_reader_role_may_decode(server: Running) -> None:
    with DecodeClient(server.address, server.key("reader")) as c:
        assert c.list_buckets(224, 16)
    with pytest.raises(grpc.RpcError) as info:
        decode_pb2_grpc.DecodeServiceStub(server.channel(None)).ListBuckets(
            decode_pb2.ListBucketsRequest(config=decode_pb2.BucketConfig(image_size=224)))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_backpressure_bounds_what_is_read_ahead(tmp_path: Path) -> None:
    """A client that sends fast while reading slowly: the server stops reading."""
    running = start_in_process(tmp_path / "data", decode={"max_inflight_samples": 4})
    sent = 0
    lock = threading.Lock()
    data = images.encode(images.gradient(64, 64))

    def requests() -> Iterator[decode_pb2.DecodeRequest]:
        nonlocal sent
        for i in range(200):
            with lock:
                sent += 1
            yield decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[
                inline(data + b"\x00" * 200_000, f"{i}-{j}") for j in range(2)])

    try:
        with DecodeClient(running.address, running.admin_key) as c:
            stream = c.decode(requests())
            first = next(stream)
            time.sleep(1.0)  # a slow consumer
            with lock:
                ahead = sent
            rest = list(stream)
        assert first.batch_index == 0 and len(rest) == 199
        # without backpressure all 200 requests (80 MB) would have been read by now;
        # with it, the bound plus what gRPC's flow-control windows buffer
        assert ahead < 120, ahead
    finally:
        assert running.server is not None
        running.server.stop(0)


def test_decode_metrics_are_exported(client: DecodeClient) -> None:
    _, port = start_metrics_server(0)
    list(client.decode([decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[
        inline(images.encode(images.gradient(100, 100)), "ok"), inline(b"", "bad")])]))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("gristmill_decode_samples_total", "gristmill_decode_errors_total",
                 "gristmill_decode_seconds_bucket", "gristmill_decode_queue_depth",
                 "gristmill_decode_bytes_out_total", "gristmill_decode_bytes_in_total"):
        assert name in body, name
    assert 'gristmill_decode_errors_total{reason="CORRUPT"}' in body
    assert 'gristmill_decode_samples_total{format="jpeg"}' in body


def test_a_cancelled_stream_frees_its_handler(server: Running) -> None:
    from prometheus_client import REGISTRY

    data = images.encode(images.gradient(64, 64))

    def forever() -> Iterator[decode_pb2.DecodeRequest]:
        i = 0
        while True:
            yield decode_pb2.DecodeRequest(transform=TRANSFORM, samples=[inline(data, str(i))])
            i += 1
            time.sleep(0.01)

    labels = {"service": "gristmill.v1.DecodeService", "method": "Decode"}
    stub = decode_pb2_grpc.DecodeServiceStub(server.channel())
    call = stub.Decode(forever())
    assert next(call).batch_index == 0
    assert REGISTRY.get_sample_value("gristmill_rpc_in_flight", labels) == 1
    call.cancel()
    deadline = time.monotonic() + 10
    while REGISTRY.get_sample_value("gristmill_rpc_in_flight", labels) != 0:
        assert time.monotonic() < deadline, "the Decode handler is still running"
        time.sleep(0.05)
    with DecodeClient(server.address, server.admin_key) as c:  # the server still serves
        (resp,) = list(c.decode([decode_pb2.DecodeRequest(transform=TRANSFORM,
                                                          samples=[inline(data, "x")])]))
    assert resp.results[0].WhichOneof("result") == "sample"


def test_decode_apart_fails_the_call_when_the_store_refuses_it(tmp_path: Path) -> None:
    """A store at its stream limit for decode's key fails the Decode call (the client retries
    or reports it); it never turns every sample of the batch into a per-sample error."""
    store = start_in_process(tmp_path / "store-data", services=("store",),
                             limits={"max_streams_per_key": 1})
    files = {"a.png": images.encode(images.gradient(300, 300), "PNG"),
             "big.bin": bytes(32 << 20)}  # beyond flow-control windows
    stub = store.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="remote"))
    stub.PutFiles(iter([store_pb2.PutFilesRequest(dataset="remote", chunks=[
        store_pb2.FileChunk(path=p, size=len(d), data=d, last=True)]) for p, d in files.items()]))
    reader = store.key("reader")
    held = store.store(reader).ReadFiles(store_pb2.ReadFilesRequest(
        dataset="remote", paths=["big.bin"], max_message_bytes=65536))
    next(held)  # the key's one stream, left open
    decode_only = start_in_process(tmp_path / "decode-data", services=("decode",),
                                   decode={"store_address": store.address,
                                           "store_api_key": reader})
    try:
        with DecodeClient(decode_only.address, decode_only.admin_key) as c, \
                pytest.raises(ResourceExhausted, match="max_streams_per_key"):
            list(c.decode([decode_pb2.DecodeRequest(
                transform=TRANSFORM, samples=[ref("remote", "a.png", "x")])]))
    finally:
        held.cancel()
        assert decode_only.server is not None and store.server is not None
        decode_only.server.stop(0)
        store.server.stop(0)
