"""ReadFiles on the Ceph backend against the filesystem backend and direct librados reads.

Brings up a throw-away single-node cluster (deploy/local/ceph-up; memstore, so
the OSD serves from RAM like the page cache serves the fs backend), starts
three `gristmill serve` processes: the fs backend, the Ceph backend with its
catalog in the pool (the default) and the Ceph backend with a local SQLite
catalog (`--ceph-catalog local`, in a namespace of its own), imports the same
files into each (timed: a folder of tiny files shows the catalog's cost) and
reads them back through ReadFiles. The baseline for the Ceph backend is a
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
import time
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
TINY_COUNT = int(os.environ.get("BENCH_CEPH_TINY_COUNT", "3000"))
TINY_SIZE = 1000
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
            small, large, tiny = work / "small", work / "large", work / "tiny"
            for folder in (small, large, tiny):
                folder.mkdir()
            for i in range(TINY_COUNT):
                (tiny / f"{i:05d}.bin").write_bytes(i.to_bytes(8, "little") * (TINY_SIZE // 8))
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
            imports: dict[str, float] = {}
            ceph = ["--storage", "ceph", "--ceph-conf", conf, "--ceph-pool", "gristmill"]
            local_config = work / "local-catalog.yaml"
            local_config.write_text(json.dumps({"store": {"backend": {  # YAML is JSON's superset
                "kind": "ceph", "conf": conf, "pool": "gristmill", "namespace": "local-catalog",
                "catalog": "local"}}}))
            for name, flags in (("fs", []), ("ceph", ceph),
                                ("ceph-local", ["--config", str(local_config)])):
                ready = work / f"{name}.ready"
                servers.append(start_and_wait(
                    [GRISTMILL, "serve", "--data", str(work / name), "--port", "0",
                     "--no-metrics", "--services", "store", "--ready-file", str(ready), *flags],
                    ready))
                address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
                key = (work / name / "admin.key").read_text().strip()
                with Hub(address, key, None, show_progress=False) as hub:
                    t0 = time.perf_counter()
                    hub.import_folder("tiny", tiny)
                    imports[name] = time.perf_counter() - t0
                    hub.import_folder("small", small)
                    hub.import_folder("large", large)
                stubs[name] = store_pb2_grpc.StoreServiceStub(
                    open_channel(ConnectionOptions(address, key)))
            print(f"\nimport of {TINY_COUNT} files of {TINY_SIZE} bytes (Hub.import_folder, "
                  "one run each)")
            for name, label in (("fs", "fs backend"), ("ceph", "ceph, catalog in the pool"),
                                ("ceph-local", "ceph, local SQLite catalog")):
                print(f"  {label:30} {TINY_COUNT / imports[name]:9.0f} files/s")
            print(f"  ratios: pool catalog / local catalog = "
                  f"{imports['ceph-local'] / imports['ceph']:.2f}, "
                  f"pool catalog / fs = {imports['fs'] / imports['ceph']:.2f}")
            client = rados.Rados(conffile=conf)
            client.connect()
            io = client.open_ioctx("gristmill")
            objects = rados_objects(io)
            small_paths = sorted(p.name for p in small.iterdir())
            small_total = SMALL_COUNT * SMALL_SIZE
            small_objects = [(n, s) for n, s in objects if s == SMALL_SIZE]
            large_objects = [(n, s) for n, s in objects if n.startswith("pieces/")]
            print(f"\nReadFiles by backend, medians of {REPEATS} runs (1 OSD, memstore)")
            tiny_paths = sorted(p.name for p in tiny.iterdir())
            for label, dataset, paths, total, objs in (
                    (f"(t) {TINY_COUNT} files x {TINY_SIZE} B", "tiny", tiny_paths,
                     TINY_COUNT * TINY_SIZE, [(n, s) for n, s in objects if s == TINY_SIZE]),
                    (f"(a) {SMALL_COUNT} files x 100 KB", "small", small_paths, small_total,
                     small_objects),
                    (f"(b) one {LARGE_SIZE // MiB} MiB file", "large", ["large.bin"],
                     LARGE_SIZE, large_objects)):
                t_fs = median_time(lambda s=stubs["fs"], d=dataset, p=paths:  # type: ignore[misc]
                                   read_files(s, d, p), total)
                t_ceph = median_time(lambda s=stubs["ceph"], d=dataset,  # type: ignore[misc]
                                     p=paths: read_files(s, d, p), total)
                t_local = median_time(lambda s=stubs["ceph-local"], d=dataset,  # type: ignore[misc]
                                      p=paths: read_files(s, d, p), total)
                t_rados = median_time(lambda o=objs: rados_read(io, o), total)  # type: ignore[misc]
                n = len(paths)
                print(f"\n{label} ({total / 1e6:.0f} MB)")
                for name, t in (("ReadFiles, fs backend", t_fs), ("ReadFiles, ceph backend",
                                                                  t_ceph),
                                ("  same, local catalog", t_local),
                                ("direct librados aio reads", t_rados)):
                    print(f"  {name:30} {n / t:9.0f} files/s {total / t / 1e6:8.0f} MB/s")
                print(f"  ratios: ceph / fs = {t_fs / t_ceph:.2f}, "
                      f"ceph / direct rados = {t_rados / t_ceph:.2f}, "
                      f"pool catalog / local catalog = {t_local / t_ceph:.2f}")
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
