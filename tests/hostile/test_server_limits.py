"""The server kit against hostile but legitimate clients: threads, parsing, keys, message sizes.

Each test reproduces a finding of the hardening issue against a real server
on port 0 and fails on the code before the fix.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gristmill.common.auth import KeyStore
from gristmill.store.config import StoreConfig
from gristmill.v1 import store_pb2, store_pb2_grpc
from tests.helpers import (
    Running,
    config_for,
    iter_chunks,
    spawn_server,
    start_in_process,
    stop_process,
)

MiB = 1024 * 1024
STORE = "/gristmill.v1.StoreService"


def _raw(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary call that sends bytes as they are (no protobuf on the client side)."""
    return channel.unary_unary(f"{STORE}/{method}")


def _auth(key: str) -> tuple[tuple[str, str | bytes], ...]:
    return (("authorization", f"Bearer {key}"),)


def _health(address: str, timeout: float = 2.0) -> float:
    """Seconds one health Check takes (raises if it fails or times out)."""
    with grpc.insecure_channel(address) as ch:
        start = time.perf_counter()
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                    timeout=timeout)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        return time.perf_counter() - start


def _upload(running: Running, dataset: str, path: str, data: bytes) -> None:
    stub = running.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name=dataset))

    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        pieces = list(iter_chunks(data, MiB)) or [b""]
        for i, piece in enumerate(pieces):
            chunk = store_pb2.FileChunk(path=path, data=piece, last=i == len(pieces) - 1)
            if i == 0:
                chunk.size = len(data)
            yield store_pb2.PutFilesRequest(dataset=dataset if i == 0 else "", chunks=[chunk])
    stub.PutFiles(requests())


# 3. streams cannot starve the server ------------------------------------------
def test_open_streams_never_starve_health_or_unary_calls(tmp_path: Path) -> None:
    """40 streams that are never read (more than the thread pool) leave health and unary calls
    answering; streams over the limit are refused with RESOURCE_EXHAUSTED at once."""
    running = start_in_process(tmp_path / "data", max_workers=16,
                               limits={"max_streams": 8, "max_streams_per_key": 8})
    assert running.server is not None
    channels = [grpc.insecure_channel(running.address) for _ in range(40)]
    try:
        # health Watch needs no key and holds a server thread for as long as it is open
        watches = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                   for ch in channels]
        refused = 0
        for w in watches:
            try:
                next(w)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                assert "limits.max_" in (e.details() or "")
                refused += 1
        assert refused == 32
        assert running.server.limiter.open_streams == 8
        latencies = sorted(_health(running.address) for _ in range(50))
        stub = running.store()
        for _ in range(20):
            stub.ListDatasets(store_pb2.ListDatasetsRequest(), timeout=2)
        logging.getLogger(__name__).info("health p99 with 8 open + 32 refused streams: %.1f ms",
                                         latencies[-1] * 1e3)
        for w in watches:
            w.cancel()
        deadline = time.monotonic() + 5
        while running.server.limiter.open_streams and time.monotonic() < deadline:
            time.sleep(0.02)
        assert running.server.limiter.open_streams == 0, "a closed stream kept its slot"
    finally:
        for ch in channels:
            ch.close()
        running.server.stop(0)


def test_health_port_answers_when_the_main_port_is_full(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "data", max_workers=16, health_port=0,
                               limits={"max_pending_calls": 8, "max_keyless_streams": 8})
    assert running.server is not None and running.server.health_port
    probe = f"127.0.0.1:{running.server.health_port}"
    channels = [grpc.insecure_channel(running.address) for _ in range(8)]
    try:
        watches = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                   for ch in channels]
        for w in watches:
            next(w)  # 8 calls admitted: the main port takes no more
        with pytest.raises(grpc.RpcError) as info:
            _health(running.address)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        _health(probe)  # the probe port has threads of its own
        with grpc.insecure_channel(probe) as ch, pytest.raises(grpc.RpcError) as info:
            next(health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest()))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        for w in watches:
            w.cancel()
    finally:
        for ch in channels:
            ch.close()
        running.server.stop(0)
    with pytest.raises(grpc.RpcError):
        _health(probe, timeout=1)


def test_keyless_streams_cannot_take_a_keys_slots(tmp_path: Path) -> None:
    """Health Watch needs no key: whatever key id its caller claims, it counts as keyless."""
    running = start_in_process(tmp_path / "data", max_workers=24, limits={
        "max_streams": 12, "max_streams_per_key": 3, "max_keyless_streams": 4})
    assert running.server is not None
    _upload(running, "big", "f.bin", os.urandom(MiB))
    reader = running.key("reader")
    claimed = f"gm_{reader.split('_')[1]}_not-the-secret"
    channels = [grpc.insecure_channel(running.address) for _ in range(10)]
    try:
        watches = [health_pb2_grpc.HealthStub(ch).Watch(
            health_pb2.HealthCheckRequest(), metadata=_auth(claimed)) for ch in channels]
        refused = 0
        for w in watches:
            try:
                next(w)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "max_keyless_streams" in (e.details() or "")
                refused += 1
        assert refused == 6
        req = store_pb2.ReadFilesRequest(dataset="big", paths=["f.bin"])
        got = sum(len(p.data) for r in running.store(reader).ReadFiles(req) for p in r.files)
        assert got == MiB
        for w in watches:
            w.cancel()
    finally:
        for ch in channels:
            ch.close()
        running.server.stop(0)


def test_old_configs_still_start_with_derived_stream_limits(tmp_path: Path) -> None:
    config = config_for(tmp_path / "data", max_workers=32)
    assert (config.max_streams, config.max_streams_per_key) == (24, 24)
    assert config_for(tmp_path / "data", max_workers=4).max_streams == 1


def test_streams_are_bounded_per_key(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "data", max_workers=16,
                               limits={"max_streams": 10, "max_streams_per_key": 3})
    assert running.server is not None
    _upload(running, "big", "f.bin", os.urandom(2 * MiB))
    a, b = running.key("reader"), running.key("reader")
    req = store_pb2.ReadFilesRequest(dataset="big", paths=["f.bin"], max_message_bytes=65536)
    opened = []
    try:
        for _ in range(3):
            it = running.store(a).ReadFiles(req)
            next(it)  # running, then left unread
            opened.append(it)
        with pytest.raises(grpc.RpcError) as info:
            next(running.store(a).ReadFiles(req))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_key" in (info.value.details() or "")
        other = running.store(b).ReadFiles(req)  # another key still may
        assert sum(len(p.data) for r in other for p in r.files) == 2 * MiB
    finally:
        for it in opened:
            it.cancel()
        running.server.stop(0)


def test_unread_large_file_streams_use_bounded_memory(tmp_path: Path) -> None:
    """40 ReadFiles of a 64 MiB file asking for 64 MiB messages, opened and not read:
    the server holds at most its configured message budget per stream."""
    running = spawn_server(tmp_path / "data")
    try:
        _upload(running, "big", "f.bin", os.urandom(64 * MiB))
        proc = psutil.Process(running.process.pid)  # type: ignore[union-attr]
        before = proc.memory_info().rss
        req = store_pb2.ReadFilesRequest(dataset="big", paths=["f.bin"],
                                         max_message_bytes=63 * MiB)
        keys = [running.key("reader") for _ in range(2)]  # 40 > the per-key limit
        channels = [running.channel(keys[i % 2], max_message_bytes=128 * MiB)
                    for i in range(40)]
        streams = [store_pb2_grpc.StoreServiceStub(ch).ReadFiles(req) for ch in channels]
        sizes = [next(s).ByteSize() for s in streams]
        time.sleep(1.0)
        grown = proc.memory_info().rss - before
        assert max(sizes) <= StoreConfig.of(running.config).read_message_bytes
        # 40 x (one 4 MiB message + gRPC's buffers); before the fix: 40 x 64 MiB
        assert grown < 600 * MiB, f"server grew by {grown / MiB:.0f} MiB"
        _health(running.address)
        for s in streams:
            s.cancel()
        for ch in channels:
            ch.close()
    finally:
        assert stop_process(running) == 0


def test_server_exits_when_it_can_no_longer_start_threads(tmp_path: Path) -> None:
    """When gRPC's accepting thread dies (here: no address space left for thread stacks), the
    process exits non-zero with a log line instead of living on and serving nothing."""
    running = spawn_server(tmp_path / "data")
    proc = psutil.Process(running.process.pid)  # type: ignore[union-attr]
    _health(running.address)
    limit = proc.memory_info().vms + 48 * MiB
    proc.rlimit(psutil.RLIMIT_AS, (limit, limit))
    channels = [grpc.insecure_channel(running.address) for _ in range(40)]
    watches = []
    try:
        # each open Watch needs one more RPC thread (an 8 MiB stack); keep them referenced
        watches = [health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
                   for ch in channels]
        code = running.process.wait(30)  # type: ignore[union-attr]
    finally:
        for w in watches:
            w.cancel()
        for ch in channels:
            ch.close()
        if running.process is not None and running.process.poll() is None:
            running.process.kill()
    log = (tmp_path / "data.log").read_text()
    assert code == 70, log[-2000:]
    assert "serving thread died" in log


# 5. no parsing and no tracebacks before the key is checked --------------------
def test_requests_without_a_key_are_refused_before_parsing(
        server: Running, caplog: pytest.LogCaptureFixture) -> None:
    garbage = b"\xff" * (8 * MiB)
    with grpc.insecure_channel(server.address,
                               options=[("grpc.max_send_message_length", 64 * MiB)]) as ch:
        for _ in range(5):
            with pytest.raises(grpc.RpcError) as info:
                _raw(ch, "CreateDataset")(garbage, timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as info:
                _raw(ch, "CreateDataset")(garbage, metadata=_auth("gm_no_such"), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_malformed_requests_are_invalid_argument_and_logged_once(
        server: Running, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(server.address) as ch:
        for _ in range(30):
            with pytest.raises(grpc.RpcError) as info:
                _raw(ch, "CreateDataset")(b"\xff" * 100, metadata=_auth(server.admin_key),
                                          timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse" in (info.value.details() or "")
        # a request stream with a malformed message
        stream: grpc.StreamUnaryMultiCallable[bytes, bytes] = ch.stream_unary(
            f"{STORE}/PutFiles")
        with pytest.raises(grpc.RpcError) as info:
            stream(iter([b"\xff" * 100]), metadata=_auth(server.admin_key), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    warned = [r for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


def test_keyless_large_bodies_do_not_grow_the_server(tmp_path: Path) -> None:
    running = spawn_server(tmp_path / "data")
    try:
        proc = psutil.Process(running.process.pid)  # type: ignore[union-attr]
        before = proc.memory_info().rss
        garbage = b"\xff" * (63 * MiB)
        errors: list[grpc.StatusCode] = []

        def send() -> None:
            with grpc.insecure_channel(running.address, options=[
                    ("grpc.max_send_message_length", 64 * MiB)]) as ch:
                for _ in range(2):
                    try:
                        _raw(ch, "CreateDataset")(garbage, timeout=30)
                    except grpc.RpcError as e:
                        errors.append(e.code())

        threads = [threading.Thread(target=send) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        grown = proc.memory_info().rss - before
        assert errors and set(errors) == {grpc.StatusCode.UNAUTHENTICATED}, set(errors)
        assert grown < 300 * MiB, f"server grew by {grown / MiB:.0f} MiB"
    finally:
        assert stop_process(running) == 0


# 6. revocation reaches open streams --------------------------------------------
def test_revoked_key_ends_an_open_read_stream(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "data", limits={"key_recheck_seconds": 0.2})
    assert running.server is not None
    try:
        _upload(running, "big", "f.bin", os.urandom(32 * MiB))
        reader = running.key("reader")
        stream = running.store(reader).ReadFiles(store_pb2.ReadFilesRequest(
            dataset="big", paths=["f.bin"], max_message_bytes=65536))
        received = len(next(stream).files[0].data)
        keys = KeyStore(running.config.keys_file)
        keys.revoke(reader.split("_")[1])
        keys.close()
        time.sleep(0.3)
        after = 0
        with pytest.raises(grpc.RpcError) as info:
            for resp in stream:
                after += sum(len(p.data) for p in resp.files)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (info.value.details() or "")
        # what the server sent before the re-check sits in gRPC's flow-control window
        assert received + after < 12 * MiB, "the stream went on long after the revocation"
    finally:
        running.server.stop(0)


def test_revoked_key_cannot_commit_an_upload(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "data")
    assert running.server is not None
    try:
        running.store().CreateDataset(store_pb2.CreateDatasetRequest(name="up"))
        writer = running.key("writer")
        data = os.urandom(4 * MiB)
        sent = threading.Event()

        def requests() -> Iterator[store_pb2.PutFilesRequest]:
            pieces = list(iter_chunks(data, MiB))
            for i, piece in enumerate(pieces):
                chunk = store_pb2.FileChunk(path="x.bin", data=piece,
                                            last=i == len(pieces) - 1)
                if i == 0:
                    chunk.size = len(data)
                yield store_pb2.PutFilesRequest(dataset="up" if i == 0 else "", chunks=[chunk])
                if i == 1:
                    keys = KeyStore(running.config.keys_file)
                    keys.revoke(writer.split("_")[1])
                    keys.close()
                    sent.set()

        with pytest.raises(grpc.RpcError) as info:
            running.store(writer).PutFiles(requests())
        assert sent.is_set()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        manifest = running.store().ListManifest(store_pb2.ListManifestRequest(dataset="up"))
        assert list(manifest.files) == [], "a revoked key's upload was committed"
    finally:
        running.server.stop(0)


# 12. messages fit gRPC's default receive limit --------------------------------
def test_read_files_messages_fit_a_default_client(server: Running) -> None:
    sizes = {"big.bin": 10 * MiB, **{f"{'d' * 200}/{i:03d}-{'n' * 200}.bin": 50_000
                                    for i in range(120)}}
    server.store().CreateDataset(store_pb2.CreateDatasetRequest(name="fit"))
    for path, size in sizes.items():
        data = os.urandom(size)
        server.store().PutFiles(iter([store_pb2.PutFilesRequest(dataset="fit", chunks=[
            store_pb2.FileChunk(path=path, size=size, data=data, last=True)])]))
    # a client with gRPC's defaults: 4 MiB receive limit
    with grpc.insecure_channel(server.address) as ch:
        stub = store_pb2_grpc.StoreServiceStub(ch)
        got: dict[str, int] = {}
        for asked in (0, 60 * MiB):
            got.clear()
            for resp in stub.ReadFiles(store_pb2.ReadFilesRequest(
                    dataset="fit", paths=list(sizes), max_message_bytes=asked),
                    metadata=_auth(server.admin_key)):
                assert resp.ByteSize() < 4 * MiB
                for piece in resp.files:
                    got[piece.path] = got.get(piece.path, 0) + len(piece.data)
            assert got == sizes
