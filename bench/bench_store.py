"""ReadFiles throughput against baselines measured in the same run.

(a) 2,000 files of ~100 KB and (b) one 512 MiB file, read through the store's
ReadFiles stream (a real `gristmill serve` process, the client in this one),
compared with a bare grpcio stream of the same files in 1 MiB messages (read
from disk, raw bytes, no protobuf), a raw loopback TCP socket, and reading the
files directly from disk (page cache). Both ends use the malloc tuning of
gristmill.client.tuning, as `gristmill serve` does.
Medians of several repeats; ratios are what to compare across machines.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.baselines import grpc_fetch, tcp_fetch  # noqa: E402
from gristmill.client.channel import ConnectionOptions, open_channel  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.client.tuning import tune_malloc  # noqa: E402
from gristmill.v1 import store_pb2, store_pb2_grpc  # noqa: E402
from scripts.processes import start_and_wait  # noqa: E402

MiB = 1024 * 1024
SMALL_COUNT = int(os.environ.get("BENCH_SMALL_COUNT", "2000"))
SMALL_SIZE = 100_000
LARGE_SIZE = int(os.environ.get("BENCH_LARGE_MIB", "512")) * MiB
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))


def median_time(fn: Callable[[], int], expect: int) -> float:
    times = []
    fn()  # warm-up (page cache, connections)
    for _ in range(REPEATS):
        start = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - start)
        if got != expect:
            raise RuntimeError(f"expected {expect} bytes, got {got}")
    return statistics.median(times)


def read_files(stub: store_pb2_grpc.StoreServiceStub, dataset: str, paths: list[str]) -> int:
    got = 0
    for resp in stub.ReadFiles(store_pb2.ReadFilesRequest(dataset=dataset, paths=paths)):
        for f in resp.files:
            got += len(f.data)
    return got


def read_disk(paths: list[Path]) -> int:
    got = 0
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(MiB):
                got += len(block)
    return got


def row(name: str, seconds: float, nbytes: int, files: int, base: float | None) -> str:
    ratio = f"{base / seconds:6.2f}" if base else "     -"
    return (f"  {name:34} {files / seconds:10.0f} files/s {nbytes / seconds / 1e6:9.0f} MB/s"
            f"   x{ratio} of bare grpcio")


def main() -> int:
    tune_malloc()  # the client side too; gristmill serve applies it itself
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        work = Path(tmp)
        src_small, src_large = work / "small", work / "large"
        src_small.mkdir()
        src_large.mkdir()
        print(f"preparing {SMALL_COUNT} files of {SMALL_SIZE // 1000} KB and one "
              f"{LARGE_SIZE // MiB} MiB file ...", flush=True)
        block = os.urandom(MiB)
        for i in range(SMALL_COUNT):
            (src_small / f"{i:05d}.bin").write_bytes(i.to_bytes(8, "little")
                                                      + block[8:SMALL_SIZE])
        with open(src_large / "large.bin", "wb") as f:
            for i in range(LARGE_SIZE // MiB):
                f.write(i.to_bytes(8, "little") + block[8:])
        ready = work / "ready.json"
        server = start_and_wait([str(Path(sys.executable).parent / "gristmill"), "serve", "--data",
                         str(work / "data"), "--port", "0", "--no-metrics", "--ready-file",
                         str(ready)], ready)
        grpc_port_file, tcp_port_file = work / "grpc.port", work / "tcp.port"
        baselines = [
            start_and_wait([sys.executable, str(ROOT / "bench" / "baselines.py"), "grpc",
                    str(grpc_port_file)], grpc_port_file),
            start_and_wait([sys.executable, str(ROOT / "bench" / "baselines.py"), "tcp",
                    str(tcp_port_file)], tcp_port_file),
        ]
        try:
            port = json.loads(ready.read_text())["port"]
            address = f"127.0.0.1:{port}"
            key = (work / "data" / "admin.key").read_text().strip()
            with Hub(address, key, None, show_progress=False) as hub:
                hub.import_folder("small", src_small)
                hub.import_folder("large", src_large)
            channel: grpc.Channel = open_channel(ConnectionOptions(address, key))
            stub = store_pb2_grpc.StoreServiceStub(channel)
            gport, tport = int(grpc_port_file.read_text()), int(tcp_port_file.read_text())
            small_paths = sorted(p.name for p in src_small.iterdir())
            small_total = sum((src_small / p).stat().st_size for p in small_paths)
            print(f"\nReadFiles, medians of {REPEATS} runs (client and server on this machine)")
            for label, dataset, paths, total, disk_paths in (
                (f"(a) {SMALL_COUNT} files x ~100 KB", "small", small_paths, small_total,
                 [src_small / p for p in small_paths]),
                (f"(b) one {LARGE_SIZE // MiB} MiB file", "large", ["large.bin"], LARGE_SIZE,
                 [src_large / "large.bin"]),
            ):
                n = len(paths)
                folder = disk_paths[0].parent
                t_store = median_time(partial(read_files, stub, dataset, paths), total)
                t_grpc = median_time(partial(grpc_fetch, gport, folder), total)
                t_tcp = median_time(partial(tcp_fetch, tport, total), total)
                t_disk = median_time(partial(read_disk, disk_paths), total)
                print(f"\n{label} ({total / 1e6:.0f} MB)")
                print(row("gristmill ReadFiles", t_store, total, n, t_grpc))
                print(row("bare grpcio stream, 1 MiB msgs", t_grpc, total, n, t_grpc))
                print(row("raw loopback TCP socket", t_tcp, total, n, t_grpc))
                print(row("direct disk read (page cache)", t_disk, total, n, t_grpc))
                print(f"  ratios: ReadFiles / bare grpcio = {t_grpc / t_store:.2f}, "
                      f"/ raw socket = {t_tcp / t_store:.2f}, / direct disk = "
                      f"{t_disk / t_store:.2f}")
            channel.close()
        finally:
            for proc in (server, *baselines):
                proc.terminate()
                proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
