"""The service kit over real sockets: health, reflection, metrics, auth, validation,
paging, graceful shutdown and TLS."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gristmill.client.errors import InvalidArgument, from_rpc_error
from gristmill.common.auth import KeyStore
from gristmill.common.metrics import start_metrics_server
from gristmill.v1 import store_pb2, store_pb2_grpc
from tests.helpers import (
    Running,
    make_certificate,
    spawn_server,
    start_in_process,
    stop_process,
)


def rpc_error(fn: object, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


def test_health_serving_and_open_without_key(server: Running) -> None:
    health = health_pb2_grpc.HealthStub(server.channel(api_key=None))
    for name in ("", "gristmill.v1.StoreService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_services(server: Running) -> None:
    db = ProtoReflectionDescriptorDatabase(server.channel(api_key=None))
    services = set(db.get_services())
    assert {"gristmill.v1.StoreService", "grpc.health.v1.Health"} <= services
    desc = db.FindFileContainingSymbol("gristmill.v1.StoreService")
    assert desc.package == "gristmill.v1"


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_endpoint_counts_calls(server: Running) -> None:
    _, port = start_metrics_server(0)
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    before = scrape()
    stub = server.store()
    for _ in range(3):
        stub.ListDatasets(store_pb2.ListDatasetsRequest())
    rpc_error(stub.GetDataset, store_pb2.GetDatasetRequest(name="missing"))
    after = scrape()
    assert "gristmill_rpc_duration_seconds_bucket" in after
    ok = dict(method="ListDatasets", code="OK")
    assert (_metric(after, "gristmill_rpc_requests_total", **ok)
            - _metric(before, "gristmill_rpc_requests_total", **ok)) == 3
    nf = dict(method="GetDataset", code="NOT_FOUND")
    assert (_metric(after, "gristmill_rpc_requests_total", **nf)
            - _metric(before, "gristmill_rpc_requests_total", **nf)) == 1


def test_auth_missing_wrong_revoked_key(server: Running) -> None:
    req = store_pb2.ListDatasetsRequest()
    for key in (None, "gm_nope_nope", "not-a-key"):
        err = rpc_error(server.store(key).ListDatasets, req)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, key
        assert "key" in (err.details() or "").lower()
    reader = server.key("reader")
    server.store(reader).ListDatasets(req)
    keys = KeyStore(server.config.keys_file)
    keys.revoke(reader.split("_")[1])
    keys.close()
    err = rpc_error(server.store(reader).ListDatasets, req)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in (err.details() or "")


def test_roles(server: Running) -> None:
    reader, writer = server.key("reader"), server.key("writer")
    err = rpc_error(server.store(reader).CreateDataset, store_pb2.CreateDatasetRequest(name="x"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "writer" in (err.details() or "")
    server.store(writer).CreateDataset(store_pb2.CreateDatasetRequest(name="x"))
    err = rpc_error(server.store(writer).DeleteDataset, store_pb2.DeleteDatasetRequest(name="x"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    server.store().DeleteDataset(store_pb2.DeleteDatasetRequest(name="x"))


@pytest.mark.parametrize("name", ["", "a/b", "..", ".hidden", "a\x00b", "x" * 129, "sp ace",
                                  "../etc", "ünïcode"])
def test_invalid_dataset_names(server: Running, name: str) -> None:
    stub = server.store()
    for call in (lambda: stub.CreateDataset(store_pb2.CreateDatasetRequest(name=name)),
                 lambda: stub.GetDataset(store_pb2.GetDatasetRequest(name=name))):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        typed = from_rpc_error(err)
        assert isinstance(typed, InvalidArgument) and typed.field == "name"
        assert (err.details() or "").startswith("name:")


def test_invalid_paging(server: Running) -> None:
    stub = server.store()
    err = rpc_error(stub.ListDatasets, store_pb2.ListDatasetsRequest(page_size=-1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in (err.details() or "")
    for token in ("garbage!", "eyJhIjogMX0"):
        err = rpc_error(stub.ListDatasets, store_pb2.ListDatasetsRequest(page_token=token))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "page_token" in (err.details() or "")
        assert from_rpc_error(err).reason == "INVALID_PAGE_TOKEN"


def test_paging_returns_every_dataset_once(server: Running) -> None:
    stub = server.store()
    names = {f"ds-{i:03d}" for i in range(23)}
    for n in names:
        stub.CreateDataset(store_pb2.CreateDatasetRequest(name=n))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = stub.ListDatasets(store_pb2.ListDatasetsRequest(page_size=5, page_token=token))
        assert len(resp.datasets) <= 5
        seen += [d.name for d in resp.datasets]
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 5
    assert seen == sorted(names)


def test_sigterm_drains_in_flight_call_and_exits_zero(tmp_path: Path) -> None:
    running = spawn_server(tmp_path / "data")
    stub = running.store()
    stub.CreateDataset(store_pb2.CreateDatasetRequest(name="slow"))
    release = threading.Event()
    sent_first = threading.Event()

    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        yield store_pb2.PutFilesRequest(dataset="slow", chunks=[
            store_pb2.FileChunk(path="a.bin", size=6, data=b"abc")])
        sent_first.set()
        release.wait(30)
        yield store_pb2.PutFilesRequest(chunks=[store_pb2.FileChunk(data=b"def", last=True)])

    future = stub.PutFiles.future(requests())
    assert sent_first.wait(10)
    time.sleep(0.3)
    running.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    time.sleep(1.0)
    # new calls are refused while the in-flight one drains
    fresh = running.store()
    err = rpc_error(fresh.ListDatasets, store_pb2.ListDatasetsRequest())
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert running.process.poll() is None  # type: ignore[union-attr]
    release.set()
    resp = future.result(timeout=30)
    assert [f.path for f in resp.files] == ["a.bin"] and resp.files[0].size == 6
    assert stop_process(running) == 0


def test_tls_client_works_plaintext_refused(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    running = start_in_process(tmp_path / "data", tls={"cert_file": cert, "key_file": key})
    try:
        secure = store_pb2_grpc.StoreServiceStub(running.channel(ca_file=cert))
        secure.CreateDataset(store_pb2.CreateDatasetRequest(name="tls"))
        assert [d.name for d in secure.ListDatasets(store_pb2.ListDatasetsRequest()).datasets] \
            == ["tls"]
        plain = running.store()
        err = rpc_error(lambda: plain.ListDatasets(store_pb2.ListDatasetsRequest(), timeout=5))
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        assert running.server is not None
        running.server.stop(0)


def test_json_logs_on_stdout(tmp_path: Path) -> None:
    running = spawn_server(tmp_path / "data")
    assert stop_process(running) == 0
    log = (tmp_path / "data.log").read_text()
    import json
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r["message"] == "serving" and r["severity"] == "INFO" for r in records)
    assert re.search(r"created an admin API key, stored in .*admin.key", log)
