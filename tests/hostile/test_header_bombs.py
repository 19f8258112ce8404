"""Header sniffing against image bombs, through a real server process.

The store records each image's size from its header. Before the shared
header reader, Pillow's ``getexif()`` decoded whole PNGs: a 70-byte header
claiming 60000 x 60000 took the server to gigabytes, a small zlib bomb did
the same, and every 95-byte ``reuse_blob`` request decoded it again. Each test
runs `gristmill serve` in a subprocess under an address-space cap (so the old
code fails instead of eating the machine) and reads its peak RSS (VmHWM).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from gristmill.v1 import store_pb2
from tests import images
from tests.helpers import Running, iter_chunks, peak_rss_bytes, spawn_server, stop_process

MiB = 1024 * 1024
#: What sniffing one file may add to the server's peak RSS.
RSS_GROWTH_LIMIT = 50 * MiB
#: Address space the server may reserve beyond what it has at start-up: room for
#: its threads' stacks and arenas, not for a 60000 x 60000 image (10.8 GB).
ADDRESS_SPACE_HEADROOM = 2048 * MiB


@pytest.fixture
def capped(tmp_path: Path) -> Iterator[Running]:
    """A subprocess server with an address-space cap, warmed up by one ordinary upload."""
    running = spawn_server(tmp_path / "data")
    assert running.process is not None
    try:
        proc = psutil.Process(running.process.pid)
        cap = proc.memory_info().vms + ADDRESS_SPACE_HEADROOM
        proc.rlimit(psutil.RLIMIT_AS, (cap, cap))
        running.store().CreateDataset(store_pb2.CreateDatasetRequest(name="bombs"))
        put(running, "warm-up.png", images.encode(images.gradient(640, 480), "PNG"))
        yield running
    finally:
        stop_process(running)


def put(running: Running, path: str, data: bytes) -> store_pb2.FileEntry:
    """Upload one file in 1 MiB chunks; returns its manifest entry."""
    def requests() -> Iterator[store_pb2.PutFilesRequest]:
        pieces = list(iter_chunks(data, MiB)) or [b""]
        for i, piece in enumerate(pieces):
            chunk = store_pb2.FileChunk(path=path if i == 0 else "", data=piece,
                                        last=i == len(pieces) - 1)
            if i == 0:
                chunk.size = len(data)
            yield store_pb2.PutFilesRequest(dataset="bombs" if i == 0 else "", chunks=[chunk])

    resp = running.store().PutFiles(requests(), timeout=120)
    [entry] = resp.files
    return entry


def reuse(running: Running, path: str, sha256: str, size: int) -> store_pb2.FileEntry:
    """Link a stored blob under another path: a request of under 100 bytes."""
    request = store_pb2.PutFilesRequest(dataset="bombs", chunks=[store_pb2.FileChunk(
        path=path, size=size, sha256=sha256, reuse_blob=True, last=True)])
    assert request.ByteSize() < 100
    resp = running.store().PutFiles(iter([request]), timeout=120)
    [entry] = resp.files
    return entry


def manifest(running: Running) -> dict[str, store_pb2.FileEntry]:
    resp = running.store().ListManifest(store_pb2.ListManifestRequest(dataset="bombs"))
    return {e.path: e for e in resp.files}


def assert_small_growth(running: Running, baseline: int, what: str) -> None:
    assert running.process is not None and running.process.poll() is None, "server died"
    grown = peak_rss_bytes(running.process.pid) - baseline
    assert grown < RSS_GROWTH_LIMIT, (f"{what}: server peak RSS grew by {grown / MiB:.0f} MiB "
                                      f"(limit {RSS_GROWTH_LIMIT / MiB:.0f} MiB)")


@pytest.mark.parametrize(("name", "data", "fmt"), [
    ("claims.png", images.huge_png_header(60000, 60000), "PNG"),
    ("claims.jpg", images.huge_jpeg_header(60000, 60000), "JPEG"),
], ids=["png", "jpeg"])
def test_tiny_header_claiming_60000_squared(capped: Running, name: str, data: bytes,
                                            fmt: str) -> None:
    assert len(data) < 1000
    assert capped.process is not None
    baseline = peak_rss_bytes(capped.process.pid)
    entry = put(capped, name, data)
    assert_small_growth(capped, baseline, name)
    assert (entry.image.width, entry.image.height, entry.image.format) == (60000, 60000, fmt)
    assert manifest(capped)[name].image == entry.image


def test_png_decompression_bomb(capped: Running) -> None:
    bomb = images.png_bomb(20000, 20000)  # 400 MB of grey pixels in ~390 KB
    assert capped.process is not None
    baseline = peak_rss_bytes(capped.process.pid)
    entry = put(capped, "bomb.png", bomb)
    assert_small_growth(capped, baseline, "bomb.png")
    assert (entry.image.width, entry.image.height) == (20000, 20000)
    assert entry.media_type == "image/png" and entry.image.format == "PNG"


def test_reuse_blob_does_not_sniff_again_at_any_cost(capped: Running) -> None:
    bomb = images.png_bomb(20000, 20000)
    sha = hashlib.sha256(bomb).hexdigest()
    assert capped.process is not None
    proc = psutil.Process(capped.process.pid)
    baseline = peak_rss_bytes(capped.process.pid)
    first = put(capped, "bomb.png", bomb)
    cpu = sum(proc.cpu_times()[:2])
    for i in range(10):
        entry = reuse(capped, f"again/{i}.png", sha, len(bomb))
        assert entry.image == first.image and entry.sha256 == sha
    spent = sum(proc.cpu_times()[:2]) - cpu
    # ten 95-byte requests: the old code inflated 400 MB for each (over 1 s of CPU apiece)
    assert spent < 2.0, f"10 reuse_blob requests cost the server {spent:.1f} s of CPU"
    assert_small_growth(capped, baseline, "bomb.png and 10 reuse_blob requests")
    entries = manifest(capped)
    assert all(entries[f"again/{i}.png"].image.width == 20000 for i in range(10))
