"""The DSX-style drop-in: a DSX README's usage, run against a real server.

Each test is written as DSX code is: only the import (and the server's URL,
key and dataset name) differ.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from gristmill.client.dsx import DEFAULT_PORT, DatasetHubClient, parse_base_url
from gristmill.client.errors import GristmillError
from tests.helpers import DATASET, Running, make_certificate, start_in_process


def url(server: Running, scheme: str = "http") -> str:
    return f"{scheme}://{server.address}"


def test_list_datasets_and_manifest(fed: Running, photos: Path, tmp_path: Path) -> None:
    hub = DatasetHubClient(base_url=url(fed), api_key=fed.admin_key,
                           cache_dir=str(tmp_path / "dsx"))
    datasets = hub.list_datasets()
    assert datasets == [DATASET] and all(isinstance(d, str) for d in datasets)
    manifest = hub.get_manifest(DATASET)
    assert isinstance(manifest, list) and len(manifest) == 22
    item = manifest[0]
    assert isinstance(item, dict) and {"path", "size", "hash", "width", "height"} <= set(item)
    assert isinstance(item["size"], int) and len(item["hash"]) == 64
    source = photos / item["path"]
    assert item["size"] == source.stat().st_size
    with Image.open(source) as im:
        assert (item["width"], item["height"]) == im.size


def test_filter_manifest_by_extension_and_download(fed: Running, tmp_path: Path) -> None:
    hub = DatasetHubClient(url(fed), fed.admin_key, cache_dir=str(tmp_path / "dsx"))
    manifest = hub.get_manifest(DATASET)
    image_files = [item["path"] for item in manifest
                   if item["path"].lower().endswith((".jpg", ".jpeg", ".png"))]
    assert 0 < len(image_files) <= len(manifest)
    downloaded = hub.download_dataset(DATASET, file_list=image_files)
    assert all(isinstance(p, Path) and p.is_file() for p in downloaded)
    assert all(p.as_posix().endswith(f) for p, f in zip(downloaded, image_files, strict=True))
    everything = hub.download_dataset(DATASET)
    assert len(everything) == len(manifest)
    local_path = hub.get_file(DATASET, image_files[0])
    assert isinstance(local_path, Path) and local_path == downloaded[0]


def test_in_memory_loading_with_pil(fed: Running) -> None:
    hub = DatasetHubClient(url(fed), fed.admin_key, cache_dir=None)
    manifest = hub.get_manifest(DATASET)
    for item in manifest[:10]:
        file_bytes = hub.get_file_bytes(DATASET, item["path"])
        assert isinstance(file_bytes, bytes) and len(file_bytes) == item["size"]
        image = Image.open(io.BytesIO(file_bytes))
        assert image.size == (item["width"], item["height"])
    with pytest.raises(ValueError, match="cache_dir is None"):
        hub.get_file(DATASET, manifest[0]["path"])
    with pytest.raises(ValueError, match="cache_dir is None"):
        hub.download_dataset(DATASET)
    assert hub.get_cache_size() == 0 and hub.clear_cache() == 0


def test_cache_management(fed: Running, tmp_path: Path) -> None:
    hub = DatasetHubClient(url(fed), fed.admin_key, cache_dir=str(tmp_path / "dsx"))
    assert hub.get_cache_size() == 0
    hub.download_dataset(DATASET)
    size = hub.get_cache_size()
    size_mb = size / (1024**2)
    assert size > 0 and f"{size_mb:.2f}"
    assert hub.get_cache_size(DATASET) == size
    bytes_freed = hub.clear_cache(DATASET)
    assert bytes_freed == size and hub.get_cache_size() == 0
    hub.get_file(DATASET, hub.get_manifest(DATASET)[0]["path"])
    assert hub.clear_cache() > 0 and hub.clear_cache() == 0


def test_value_errors_where_dsx_raises_them(fed: Running, tmp_path: Path) -> None:
    hub = DatasetHubClient(url(fed), fed.admin_key, cache_dir=str(tmp_path / "dsx"))
    for call in (lambda: hub.get_manifest("nope"), lambda: hub.get_file(DATASET, "nope.jpg"),
                 lambda: hub.get_file_bytes(DATASET, "nope.jpg"),
                 lambda: hub.get_file("nope", "a.jpg"),
                 lambda: hub.download_dataset(DATASET, ["nope.jpg"]),
                 lambda: hub.get_file(DATASET, "../../etc/passwd"),
                 lambda: hub.clear_cache("../x"), lambda: hub.get_cache_size("a/b")):
        with pytest.raises(ValueError):
            call()
    assert hub.clear_cache("unknown") == 0 and hub.get_cache_size("unknown") == 0
    with pytest.raises(ValueError):
        DatasetHubClient(url(fed), fed.admin_key, cache_limit=-5)
    bad_key = DatasetHubClient(url(fed), "not-a-key", cache_dir=None)
    with pytest.raises(GristmillError, match="key"):
        bad_key.list_datasets()


@pytest.mark.parametrize(("base_url", "expected"), [
    ("http://localhost:8000", ("localhost:8000", False)),
    ("http://localhost:8000/", ("localhost:8000", False)),
    ("grpc://10.0.0.5:7451", ("10.0.0.5:7451", False)),
    ("hub.example:9000", ("hub.example:9000", False)),
    ("hub.example", (f"hub.example:{DEFAULT_PORT}", False)),
    ("http://hub.example", (f"hub.example:{DEFAULT_PORT}", False)),
    ("https://hub.example", (f"hub.example:{DEFAULT_PORT}", True)),
    ("https://hub.example:443", ("hub.example:443", True)),
    ("grpcs://hub.example:8443", ("hub.example:8443", True)),
    ("http://[::1]:7450", ("[::1]:7450", False)),
])
def test_base_url_forms(base_url: str, expected: tuple[str, bool]) -> None:
    assert parse_base_url(base_url) == expected


@pytest.mark.parametrize("base_url", ["", "ftp://h:1", "http://h:99999", "http://h:1/api",
                                      "http://user@h:1", "http://:1"])
def test_bad_base_urls(base_url: str) -> None:
    with pytest.raises(ValueError):
        parse_base_url(base_url)


def test_a_plain_url_stays_plain_whatever_the_environment(
        fed: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # GRISTMILL_CA_FILE switches the native clients to TLS; an http:// or grpc:// base_url
    # says plain gRPC and must win, or a training job with the variable set cannot connect
    (tmp_path / "tls").mkdir()
    cert, _ = make_certificate(tmp_path / "tls")
    monkeypatch.setenv("GRISTMILL_CA_FILE", str(cert))
    port = fed.address.rsplit(":", 1)[1]
    for base_url in (url(fed), f"grpc://127.0.0.1:{port}"):
        assert DatasetHubClient(base_url, fed.admin_key, None).list_datasets() == [DATASET]


def test_host_port_and_https_reach_the_server(fed: Running, tmp_path: Path) -> None:
    assert DatasetHubClient(fed.address, fed.admin_key, None).list_datasets() == [DATASET]
    port = fed.address.rsplit(":", 1)[1]
    assert DatasetHubClient(f"grpc://localhost:{port}", fed.admin_key,
                            None).list_datasets() == [DATASET]
    (tmp_path / "tls").mkdir()
    cert, key = make_certificate(tmp_path / "tls")
    secure = start_in_process(tmp_path / "tls-data", tls={"cert_file": cert, "key_file": key})
    try:
        hub = DatasetHubClient(url(secure, "https"), secure.admin_key, None, ca_file=cert)
        assert hub.list_datasets() == []
    finally:
        assert secure.server is not None
        secure.server.stop(0)
