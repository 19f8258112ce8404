"""ReadFiles on the Ceph backend against the filesystem backend and direct librados reads.

Brings up a throw-away single-node cluster (deploy/local/ceph-up; memstore, so
the OSD serves from RAM like the page cache serves the fs backend), starts two
`gristmill serve` processes, one per backend, imports the same files into both,
and reads them back through ReadFiles. The baseline for the Ceph backend is a
direct `rados` read loop of the same objects in this process (aio, all pieces
of a batch in flight), i.e. what librados alone delivers here.
Medians of several repeats; ratios are what to compare across machines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_store import median_time, read_files  # noqa: E402
from gristmill.client.channel import ConnectionOptions, open_channel  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.v1 import store_pb2_grpc  # noqa: E402
from scripts.processes import start_and_wait  # noqa: E402

MiB = 1024 * 1024
SMALL_COUNT = int(os.environ.get("BENCH_CEPH_SMALL_COUNT", "1000"))
SMALL_SIZE = 100_000
LARGE_SIZE = int(os.environ.get("BENCH_CEPH_LARGE_MIB", "128")) * MiB
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
GRISTMILL = str(Path(sys.executable).parent / "gristmill")


def rados_objects(io: Any) -> list[tuple[str, int]]:
    """Every data-carrying object of the pool (blobs and pieces) with its size."""
    found = []
    for obj in io.list_objects():
        size, _ = io.stat(obj.key)
        if size:
            found.append((obj.key, size))
    return found


def rados_read(io: Any, objects: list[tuple[str, int]], window: int = 64) -> int:
    results: list[int] = []

    def done(_c: Any, data: bytes) -> None:
        results.append(len(data))
    for i in range(0, len(objects), window):
        completions = [io.aio_read(name, size, 0, done) for name, size in objects[i:i + window]]
        for c in completions:
            c.wait_for_complete_and_cb()
    return sum(results)


def main() -> int:
    import rados

    cluster = Path(tempfile.mkdtemp(prefix="gmbench-ceph-", dir="/tmp"))
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-ceph-") as tmp:
        work = Path(tmp)
        servers = []
        try:
            up = subprocess.run([str(ROOT / "deploy/local/ceph-up"), str(cluster)], text=True,
                                capture_output=True, check=True,
                                env=dict(os.environ, CEPH_MGR="0",
                                         CEPH_MEMSTORE_BYTES=str(8 << 30)))
            conf = up.stdout.strip().splitlines()[-1]
            small, large = work / "small", work / "large"
            small.mkdir()
            large.mkdir()
            print(f"preparing {SMALL_COUNT} files of {SMALL_SIZE // 1000} KB and one "
                  f"{LARGE_SIZE // MiB} MiB file ...", flush=True)
            block = os.urandom(MiB)
            for i in range(SMALL_COUNT):
                (small / f"{i:05d}.bin").write_bytes(i.to_bytes(8, "little")
                                                     + block[8:SMALL_SIZE])
            with open(large / "large.bin", "wb") as f:
                for i in range(LARGE_SIZE // MiB):
                    f.write(i.to_bytes(8, "little") + block[8:])
            stubs = {}
            for name, flags in (("fs", []), ("ceph", ["--storage", "ceph", "--ceph-conf", conf,
                                                      "--ceph-pool", "gristmill"])):
                ready = work / f"{name}.ready"
                servers.append(start_and_wait(
                    [GRISTMILL, "serve", "--data", str(work / name), "--port", "0",
                     "--no-metrics", "--services", "store", "--ready-file", str(ready), *flags],
                    ready))
                address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
                key = (work / name / "admin.key").read_text().strip()
                with Hub(address, key, None, show_progress=False) as hub:
                    hub.import_folder("small", small)
                    hub.import_folder("large", large)
                stubs[name] = store_pb2_grpc.StoreServiceStub(
                    open_channel(ConnectionOptions(address, key)))
            client = rados.Rados(conffile=conf)
            client.connect()
            io = client.open_ioctx("gristmill")
            objects = rados_objects(io)
            small_paths = sorted(p.name for p in small.iterdir())
            small_total = SMALL_COUNT * SMALL_SIZE
            small_objects = [(n, s) for n, s in objects if s == SMALL_SIZE]
            large_objects = [(n, s) for n, s in objects if n.startswith("pieces/")]
            print(f"\nReadFiles by backend, medians of {REPEATS} runs (1 OSD, memstore)")
            for label, dataset, paths, total, objs in (
                    (f"(a) {SMALL_COUNT} files x 100 KB", "small", small_paths, small_total,
                     small_objects),
                    (f"(b) one {LARGE_SIZE // MiB} MiB file", "large", ["large.bin"],
                     LARGE_SIZE, large_objects)):
                t_fs = median_time(lambda s=stubs["fs"], d=dataset, p=paths:  # type: ignore[misc]
                                   read_files(s, d, p), total)
                t_ceph = median_time(lambda s=stubs["ceph"], d=dataset,  # type: ignore[misc]
                                     p=paths: read_files(s, d, p), total)
                t_rados = median_time(lambda o=objs: rados_read(io, o), total)  # type: ignore[misc]
                n = len(paths)
                print(f"\n{label} ({total / 1e6:.0f} MB)")
                for name, t in (("ReadFiles, fs backend", t_fs), ("ReadFiles, ceph backend",
                                                                  t_ceph),
                                ("direct librados aio reads", t_rados)):
                    print(f"  {name:30} {n / t:9.0f} files/s {total / t / 1e6:8.0f} MB/s")
                print(f"  ratios: ceph / fs = {t_fs / t_ceph:.2f}, "
                      f"ceph / direct rados = {t_rados / t_ceph:.2f}")
            io.close()
            client.shutdown()
        finally:
            for proc in servers:
                proc.terminate()
                proc.wait(30)
            subprocess.run([str(ROOT / "deploy/local/ceph-down"), str(cluster)],
                           capture_output=True, check=False)
            shutil.rmtree(cluster, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
