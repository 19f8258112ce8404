"""Shared test helpers: real servers (in-process or subprocess), images, certificates."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from PIL import Image

from gristmill.client.channel import ConnectionOptions, open_channel
from gristmill.client.loader import Batch, Loader
from gristmill.client.shm import ring_dir
from gristmill.common.auth import KeyStore, Role
from gristmill.common.config import ServerConfig, load_config
from gristmill.common.server import GristmillServer, create_server, ensure_admin_key
from gristmill.v1 import store_pb2_grpc
from scripts.processes import start_and_wait
from scripts.sample_data import photo_like

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Running:
    """A server under test and how to reach it."""

    address: str
    config: ServerConfig
    admin_key: str
    server: GristmillServer | None = None
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int | None = None

    def key(self, role: str) -> str:
        keys = KeyStore(self.config.keys_file)
        try:
            return keys.create(Role.parse(role), f"test {role}")[0]
        finally:
            keys.close()

    def channel(self, api_key: str | None = "admin", **kw: object) -> grpc.Channel:
        key = self.admin_key if api_key == "admin" else api_key
        return open_channel(ConnectionOptions(self.address, key or None, **kw))  # type: ignore[arg-type]

    def store(self, api_key: str | None = "admin") -> store_pb2_grpc.StoreServiceStub:
        return store_pb2_grpc.StoreServiceStub(self.channel(api_key))


def both_backends() -> Any:
    """A `storage` fixture running a module's `server` tests on both store backends."""

    @pytest.fixture(params=["fs", "ceph"], name="storage")
    def storage(request: pytest.FixtureRequest) -> str:
        return str(request.param)
    return storage


def ceph_backend(cluster: Any, **overrides: object) -> dict[str, object]:
    """`store.backend` config for a store of its own (a fresh namespace) in a test cluster."""
    backend: dict[str, object] = {"kind": "ceph", "conf": str(cluster.conf), "pool": cluster.pool,
                                  "namespace": f"t{uuid.uuid4().hex[:16]}", "timeout_seconds": 5}
    backend.update(overrides)
    return backend


def config_for(data_dir: Path, **overrides: object) -> ServerConfig:
    base: dict[str, object] = {"data_dir": data_dir, "port": 0, "metrics_port": None}
    base.update(overrides)
    # rings go where this test's Loaders put them (the shm_dir fixture)
    ingest = dict(base.get("ingest") or {})  # type: ignore[call-overload]
    ingest.setdefault("shm_dir", ring_dir())
    base["ingest"] = ingest
    store = dict(base.get("store") or {})  # type: ignore[call-overload]
    store.setdefault("shm_dir", ring_dir())
    base["store"] = store
    return load_config(environ={}, overrides=base)


def start_in_process(data_dir: Path, **overrides: object) -> Running:
    config = config_for(data_dir, **overrides)
    key_file = ensure_admin_key(config)
    assert key_file is not None
    server, port = create_server(config)
    server.start()
    return Running(f"127.0.0.1:{port}", config, key_file.read_text().strip(), server=server)


def spawn_server(data_dir: Path, *extra: str, timeout: float = 30) -> Running:
    """`gristmill serve` in a subprocess on port 0; waits until it serves."""
    ready = data_dir.parent / f"{data_dir.name}.ready.json"
    proc = start_and_wait(
        [sys.executable, "-m", "gristmill.cli.main", "serve", "--data", str(data_dir),
         "--port", "0", "--metrics-port", "0", "--ready-file", str(ready), *extra],
        ready, log=data_dir.parent / f"{data_dir.name}.log", timeout=timeout)
    info = json.loads(ready.read_text())
    config = config_for(data_dir)
    return Running(f"127.0.0.1:{info['port']}", config,
                   (data_dir / "admin.key").read_text().strip(), process=proc,
                   metrics_port=info["metrics_port"])


def stop_process(running: Running, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    assert running.process is not None
    if running.process.poll() is None:
        running.process.send_signal(sig)
    return running.process.wait(timeout)


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


# images -----------------------------------------------------------------
def make_image_tree(root: Path) -> dict[str, tuple[int, int]]:
    """A nested folder of JPEG/PNG images; returns path -> (width, height) as displayed."""
    specs = [
        ("train/cats/001.jpg", 640, 480, "JPEG", 0),
        ("train/cats/002.jpg", 300, 500, "JPEG", 0),
        ("train/dogs/001.png", 256, 128, "PNG", 0),
        ("train/dogs/deep/er/003.png", 64, 64, "PNG", 0),
        ("val/rotated.jpg", 400, 200, "JPEG", 6),   # EXIF: displayed as 200x400
        ("val/gray.png", 90, 30, "PNG", 0),
    ]
    sizes: dict[str, tuple[int, int]] = {}
    for i, (rel, w, h, fmt, orientation) in enumerate(specs):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        im = photo_like(w, h, i)
        if rel.endswith("gray.png"):
            im = im.convert("L")
        kwargs: dict[str, object] = {}
        if orientation:
            exif = Image.Exif()
            exif[0x0112] = orientation
            kwargs["exif"] = exif.tobytes()
        im.save(path, fmt, **kwargs)
        sizes[rel] = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    return sizes


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# TLS --------------------------------------------------------------------
def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost/127.0.0.1; returns (cert, key) paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def iter_chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


#: The dataset the feed tests import, and small Loader options for it.
DATASET = "photos"
SMALL = {"batch_size": 4, "image_size": 128, "downsampling_ratio": 16}


def loader(running: Running, **kw: object) -> Loader:
    """A Loader of DATASET on ``running`` with SMALL options."""
    args: dict[str, object] = {**SMALL, "api_key": running.admin_key, **kw}
    return Loader(running.address, DATASET, **args)  # type: ignore[arg-type]


def epoch(ld: Loader) -> list[Batch]:
    return list(ld)


def planned(batches: list[Batch]) -> list[list[str]]:
    return [b.planned_ids for b in batches]
