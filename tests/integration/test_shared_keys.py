"""One key store for a deployment: servers reading one shared key file (auth.shared_keys_file)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from gristmill.common import metrics
from gristmill.common.auth import KeyStore, Role
from gristmill.common.config import ConfigError
from gristmill.common.keyfile import dump_key_file
from gristmill.common.server import GristmillServer, create_server, ensure_admin_key
from gristmill.v1 import decode_pb2, decode_pb2_grpc, store_pb2, store_pb2_grpc
from tests.helpers import config_for

RELOAD = 0.2
BUCKETS = decode_pb2.BucketConfig(image_size=256, downsampling=16)


def export(keys: KeyStore, target: Path) -> None:
    """What an operator does after a change: export and replace the file atomically."""
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(dump_key_file(keys))
    os.replace(tmp, target)


@pytest.fixture
def operator_keys(tmp_path: Path) -> Iterator[KeyStore]:
    keys = KeyStore(tmp_path / "operator" / "keys.sqlite")
    yield keys
    keys.close()


def start(tmp_path: Path, name: str, key_file: Path, service: str) -> tuple[GristmillServer, str]:
    config = config_for(tmp_path / name, services=[service],
                        auth={"shared_keys_file": key_file, "reload_seconds": RELOAD})
    assert ensure_admin_key(config) is None  # keys are made where the file comes from
    server, port = create_server(config)
    server.start()
    return server, f"127.0.0.1:{port}"


def store_call(address: str, key: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            store_pb2_grpc.StoreServiceStub(ch).ListDatasets(
                store_pb2.ListDatasetsRequest(), metadata=(("authorization", f"Bearer {key}"),),
                timeout=10)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
    return grpc.StatusCode.OK


def decode_call(address: str, key: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            decode_pb2_grpc.DecodeServiceStub(ch).ListBuckets(
                decode_pb2.ListBucketsRequest(config=BUCKETS),
                metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
    return grpc.StatusCode.OK


def test_two_servers_share_keys_and_a_revocation_reaches_both(
        tmp_path: Path, operator_keys: KeyStore) -> None:
    reader, record = operator_keys.create(Role.READER, "training")
    other, _ = operator_keys.create(Role.READER, "import")
    key_file = tmp_path / "keys.json"
    export(operator_keys, key_file)
    store, store_address = start(tmp_path, "store", key_file, "store")
    decode, decode_address = start(tmp_path, "decode", key_file, "decode")
    try:
        calls: list[Callable[[str], grpc.StatusCode]] = [
            lambda k: store_call(store_address, k), lambda k: decode_call(decode_address, k)]
        for call in calls:
            assert call(reader) == grpc.StatusCode.OK
            assert call(other) == grpc.StatusCode.OK
            assert call(reader[:-2] + "xx") == grpc.StatusCode.UNAUTHENTICATED

        reloads = metrics.AUTH_KEY_FILE_RELOADS._value.get()
        operator_keys.revoke(record.key_id)
        export(operator_keys, key_file)
        revoked_at = time.monotonic()
        refused: dict[int, float] = {}
        while len(refused) < 2 and time.monotonic() - revoked_at < 5:
            for i, call in enumerate(calls):
                if i not in refused and call(reader) == grpc.StatusCode.UNAUTHENTICATED:
                    refused[i] = time.monotonic() - revoked_at
            time.sleep(0.02)
        assert len(refused) == 2, "a server still accepts the revoked key after 5 s"
        # the bound: one reload interval (plus the time of the calls themselves)
        assert max(refused.values()) < RELOAD + 1.0, refused
        assert metrics.AUTH_KEY_FILE_RELOADS._value.get() >= reloads + 2
        for call in calls:  # the other key goes on working, without a restart
            assert call(other) == grpc.StatusCode.OK
    finally:
        store.stop(0)
        decode.stop(0)


def test_kubelet_style_symlink_swap_is_seen(tmp_path: Path, operator_keys: KeyStore) -> None:
    """A mounted Secret: keys.json -> ..data/keys.json, ..data -> a timestamped directory."""
    reader, record = operator_keys.create(Role.READER)
    mount = tmp_path / "secret"
    first = mount / "..2026_01_01_00_00_00.1"
    first.mkdir(parents=True)
    export(operator_keys, first / "keys.json")
    (mount / "..data").symlink_to(first.name)
    (mount / "keys.json").symlink_to("..data/keys.json")
    server, address = start(tmp_path, "store", mount / "keys.json", "store")
    try:
        assert store_call(address, reader) == grpc.StatusCode.OK
        operator_keys.revoke(record.key_id)
        second = mount / "..2026_01_01_00_01_00.2"
        second.mkdir()
        export(operator_keys, second / "keys.json")
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")  # the kubelet's atomic swap
        deadline = time.monotonic() + 5
        while store_call(address, reader) == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the swapped file was never re-read"
            time.sleep(0.05)
        assert store_call(address, reader) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_a_broken_update_keeps_the_last_good_keys(
        tmp_path: Path, operator_keys: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    reader, _ = operator_keys.create(Role.READER)
    key_file = tmp_path / "keys.json"
    export(operator_keys, key_file)
    server, address = start(tmp_path, "store", key_file, "store")
    try:
        errors = metrics.AUTH_KEY_FILE_ERRORS._value.get()
        key_file.write_text('{"gristmill_keys": 1, "keys": [{"id": "x"')  # cut short
        time.sleep(RELOAD * 2)
        with caplog.at_level(logging.ERROR, logger="gristmill.auth"):
            assert store_call(address, reader) == grpc.StatusCode.OK
            time.sleep(RELOAD * 2)
            assert store_call(address, reader) == grpc.StatusCode.OK  # logged once, not again
        assert metrics.AUTH_KEY_FILE_ERRORS._value.get() == errors + 1
        [message] = [r.getMessage() for r in caplog.records]
        assert "cannot reload the shared key file" in message and "keeping the 1 keys" in message
        export(operator_keys, key_file)  # fixed: read again
        time.sleep(RELOAD * 2)
        assert store_call(address, reader) == grpc.StatusCode.OK
    finally:
        server.stop(0)


def test_a_missing_or_invalid_file_stops_start_up(tmp_path: Path) -> None:
    config = config_for(tmp_path / "d", services=["store"],
                        auth={"shared_keys_file": tmp_path / "nope.json"})
    with pytest.raises(ConfigError, match=r"auth.shared_keys_file: cannot read the shared key "
                       r"file .*nope.json.*gristmill keys export"):
        create_server(config)
    bad = tmp_path / "bad.json"
    bad.write_text('{"keys": []}')
    config = config_for(tmp_path / "d", services=["store"], auth={"shared_keys_file": bad})
    with pytest.raises(ConfigError, match="is not a gristmill key file"):
        create_server(config)
    with pytest.raises(ConfigError, match="both set"):
        config_for(tmp_path / "d", auth={"shared_keys_file": bad, "keys_file": bad})


def test_keys_export_cli_writes_the_file_and_the_secret(tmp_path: Path) -> None:
    import subprocess
    import sys

    import kubernetes_validate
    import yaml

    from gristmill.common.keyfile import parse_key_file

    data = tmp_path / "operator"
    gristmill = [sys.executable, "-m", "gristmill.cli.main", "keys"]
    created = subprocess.run([*gristmill, "create", "--data", str(data), "--role", "reader",
                              "--name", "training"], capture_output=True, text=True,
                             check=True, timeout=60)
    key_id = created.stdout.split("_")[1]
    out = tmp_path / "keys.json"
    subprocess.run([*gristmill, "export", "--data", str(data), "--out", str(out)],
                   capture_output=True, check=True, timeout=60)
    keys = parse_key_file(out.read_text())
    assert list(keys) == [key_id] and keys[key_id][1].role == Role.READER
    assert created.stdout.strip().split("_", 2)[2] not in out.read_text()  # never a secret
    secret = subprocess.run([*gristmill, "export", "--data", str(data), "--secret",
                             "gristmill-api-keys"], capture_output=True, text=True, check=True,
                            timeout=60).stdout
    doc = yaml.safe_load(secret)
    kubernetes_validate.validate(doc, "1.37.0", strict=True)
    assert doc["metadata"] == {"name": "gristmill-api-keys", "namespace": "gristmill",
                               "labels": {"app.kubernetes.io/part-of": "gristmill"}}
    assert parse_key_file(doc["stringData"]["keys.json"]) == keys
