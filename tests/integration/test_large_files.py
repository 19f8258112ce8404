"""A 1 GiB file goes up and down in chunks: neither side holds it in memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import peak_rss_bytes, spawn_server, stop_process

GiB = 1024 ** 3
MiB = 1024 ** 2
LIMIT = 300 * MiB  # "far below 1 GiB"

CLIENT = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from gristmill.client.hub import Hub
    address, key, src, cache = sys.argv[1:5]
    with Hub(address, key, cache, show_progress=False) as hub:
        report = hub.import_folder("big", src)
        assert report.uploaded == 1, report
        [path] = hub.download_dataset("big")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        print(digest.hexdigest(), path.stat().st_size)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(int(line.split()[1]) * 1024)
""")


@pytest.mark.slow
def test_one_gib_upload_and_download_stay_small_in_memory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    block = os.urandom(MiB)
    import hashlib
    digest = hashlib.sha256()
    with open(src / "huge.bin", "wb") as f:
        for i in range(GiB // MiB):
            chunk = block[:8] + i.to_bytes(8, "little") + block[16:]
            f.write(chunk)
            digest.update(chunk)
    running = spawn_server(tmp_path / "data")
    try:
        out = subprocess.run([sys.executable, "-c", CLIENT, running.address, running.admin_key,
                              str(src), str(tmp_path / "cache")],
                             capture_output=True, text=True, timeout=540, check=False)
        assert out.returncode == 0, out.stderr
        sha, size, client_peak = out.stdout.split()
        assert process_peak(running) < LIMIT
    finally:
        assert stop_process(running) == 0
    assert sha == digest.hexdigest() and int(size) == GiB
    assert int(client_peak) < LIMIT, f"client peak RSS {int(client_peak) / MiB:.0f} MiB"


def process_peak(running: object) -> int:
    pid = running.process.pid  # type: ignore[attr-defined]
    peak = peak_rss_bytes(pid)
    print(f"server peak RSS {peak / MiB:.0f} MiB")
    return peak
