"""The `local` overlay's four services as four processes on loopback, one shared key file.

Each process gets the config its ConfigMap holds, with only what a pod has and
this machine has not changed: addresses and ports (port 0 on 127.0.0.1), the
data directory, and the key file's path (a Secret mount in the cluster). The
service keys come from environment variables, as the Secret gristmill-service-keys
provides them to each Deployment. The two-rank stream carries the labels of an
annotation release, which ingest fetches from the annotate process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from gristmill.client import Annotations, Hub, Loader
from gristmill.common.auth import KeyStore, Role
from gristmill.common.keyfile import dump_key_file
from gristmill.common.service import available_services
from scripts.k8s_render import render
from scripts.processes import start_and_wait
from scripts.sample_data import make_sample_folder
from tests.helpers import ROOT

RELOAD = 0.5
LABEL = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"]}
ORDER = ("store", "annotate", "decode", "ingest")  # callees before callers


def local_configs() -> dict[str, dict[str, Any]]:
    docs = render(ROOT / "deploy" / "k8s" / "overlays" / "local")
    configs = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]:
            cfg = yaml.safe_load(d["data"]["config.yaml"])
            service = cfg["services"][0]  # the store's pod also serves arrays
            configs[service] = cfg
    return configs


def local_service_keys() -> dict[str, dict[str, str]]:
    """Per service, the environment variables its pod takes from gristmill-service-keys:
    variable -> the Secret's key."""
    docs = render(ROOT / "deploy" / "k8s" / "overlays" / "local")
    found: dict[str, dict[str, str]] = {}
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        [container] = d["spec"]["template"]["spec"]["containers"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
                if "secretKeyRef" in e.get("valueFrom", {})}
        assert all(r["name"] == "gristmill-service-keys" for r in refs.values())
        found[container["name"]] = {var: r["key"] for var, r in refs.items()}
    return found


def export(keys: KeyStore, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(dump_key_file(keys))
    os.replace(tmp, target)


def status_of(address: str, method: str, key: str) -> grpc.StatusCode:
    """The status of ``method`` called with an empty request (the key is checked first)."""
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        try:
            call(b"", metadata=(("authorization", f"Bearer {key}"),), timeout=10)
        except grpc.RpcError as e:
            code: grpc.StatusCode = e.code()
            return code
    return grpc.StatusCode.OK


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[dict[str, Any]]:
    configs = local_configs()
    assert set(configs) == set(ORDER)
    env_keys = local_service_keys()
    # each call between services, with its own key (deploy/k8s/secrets/service-keys)
    assert env_keys == {
        "store": {}, "annotate": {},
        "decode": {"GRISTMILL_DECODE__STORE_API_KEY": "decode-store-key"},
        "ingest": {"GRISTMILL_INGEST__STORE_API_KEY": "ingest-store-key",
                   "GRISTMILL_INGEST__DECODE_API_KEY": "ingest-decode-key",
                   "GRISTMILL_INGEST__ANNOTATE_API_KEY": "ingest-annotate-key"}}
    operator = KeyStore(tmp_path / "operator" / "keys.sqlite")
    admin, _ = operator.create(Role.ADMIN, "operator")
    training, training_record = operator.create(Role.READER, "training")
    service_keys = {name: operator.create(Role.READER, name)[0]
                    for keys in env_keys.values() for name in keys.values()}
    key_file = tmp_path / "keys.json"
    export(operator, key_file)
    procs: dict[str, Any] = {}
    addresses: dict[str, str] = {}
    try:
        for service in ORDER:
            cfg = configs[service]
            cfg.update(host="127.0.0.1", port=0, health_port=0, metrics_port=0,
                       metrics_host="127.0.0.1", data_dir=str(tmp_path / service))
            cfg["auth"].update(shared_keys_file=str(key_file), reload_seconds=RELOAD)
            env = dict(os.environ)
            # the Services' names (gristmill-store:7450, ...) become the processes' addresses
            section = cfg.get(service) or {}
            for key, address in section.items():
                if key.endswith("_address"):
                    callee = key.removesuffix("_address")
                    assert address == f"gristmill-{callee}:7450", (service, key)
                    section[key] = addresses[callee]
            env.update({var: service_keys[name] for var, name in env_keys[service].items()})
            config_file = tmp_path / f"{service}.yaml"
            config_file.write_text(yaml.safe_dump(cfg))
            ready = tmp_path / f"{service}.ready"
            procs[service] = start_with_env(
                [sys.executable, "-m", "gristmill.cli.main", "serve", "--config",
                 str(config_file), "--ready-file", str(ready)], ready,
                tmp_path / f"{service}.log", env)
            addresses[service] = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        yield {"addresses": addresses, "admin": admin, "training": training,
               "training_id": training_record.key_id, "operator": operator,
               "key_file": key_file, "tmp": tmp_path}
    finally:
        for proc in reversed(list(procs.values())):
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
        operator.close()


def start_with_env(cmd: list[str], ready: Path, log: Path, env: dict[str, str]) -> Any:
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        return start_and_wait(cmd, ready, log=log, timeout=60)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_local_overlay_as_four_processes_streams_two_ranks_and_revokes_everywhere(
        deployment: dict[str, Any]) -> None:
    addresses, tmp = deployment["addresses"], deployment["tmp"]
    photos = make_sample_folder(tmp / "photos", count=10, max_side=300)
    paths = sorted(str(p.relative_to(tmp / "photos")) for p in photos)
    with Hub(addresses["store"], deployment["admin"]) as hub:
        hub.import_folder("photos", tmp / "photos")
        hub.commit_version("photos")
    with Annotations(addresses["annotate"], deployment["admin"]) as ann:
        ann.init("photos")
        ann.add_schema("photos", "label", LABEL)
        accepted = ann.propose("photos", "label", [paths[0], paths[1]], {"label": "cat"})
        ann.review("photos", accepted.id, accept=True)
        rejected = ann.propose("photos", "label", [paths[2]], {"label": "dog"})
        ann.review("photos", rejected.id, accept=False)
        ann.create_release("photos", "v1")
    cat = [{"annotation": accepted.id, "data": {"label": "cat"}, "schema": "label",
            "schema_version": 1}]

    seen: list[str] = []
    for rank in (0, 1):  # a two-rank job: the training key, through ingest -> store, decode,
        # and the labels of release v1 through ingest -> annotate
        with Loader(addresses["ingest"], "photos", batch_size=2, image_size=128,
                    api_key=deployment["training"], rank=rank, world_size=2,
                    annotations="v1") as loader:
            for batch in loader:
                assert batch.images is not None and not batch.errors
                for sample, labels in zip(batch.ids, batch.annotations, strict=True):
                    assert labels == (cat if sample in paths[:2] else []), sample
                seen += batch.ids
    # every sample, and equal batches per rank: 10 samples pad to 3 batches of 2 per rank
    assert set(seen) == set(paths)
    assert len(seen) == 12

    services = available_services()
    methods = {}
    for name in ORDER:
        spec = services[name]
        [method, *_] = sorted(m for m, r in spec.roles.items() if r == Role.READER)
        methods[name] = f"/{spec.full_name}/{method}"

    def refused(name: str, key: str) -> bool:
        return status_of(addresses[name], methods[name], key) == grpc.StatusCode.UNAUTHENTICATED

    for name in ORDER:
        assert not refused(name, deployment["training"]), name

    deployment["operator"].revoke(deployment["training_id"])
    export(deployment["operator"], deployment["key_file"])
    start = time.monotonic()
    pending = set(ORDER)
    while pending and time.monotonic() - start < 10:
        pending = {name for name in pending if not refused(name, deployment["training"])}
        time.sleep(0.05)
    assert not pending, f"still accepting the revoked key after 10 s: {pending}"
    assert time.monotonic() - start < RELOAD + 2.0
    for name in ORDER:  # the other keys still work: no restart, nothing else changed
        assert not refused(name, deployment["admin"]), name
    with pytest.raises(Exception, match="revoked"):
        with Loader(addresses["ingest"], "photos", batch_size=2, image_size=128,
                    api_key=deployment["training"], retry_timeout=0) as loader:
            next(iter(loader))
