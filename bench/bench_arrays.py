"""Array reads through gristmill against zarr-python and h5py, measured in the same run.

One float32 array of 256 MiB (512 x 512 x 256) in 64^3 chunks (crc32c, no
compression: the data is random), read three ways:

- full read ``ds[...]``, a plane ``ds[:, :, 40]`` (cuts 64 chunks) and a
  strided read ``ds[::4, ::4, ::4]`` (touches every chunk);

through gristmill's array client (a real server process on this host, fs
backend; chunk bytes through a shared-memory ring, the default on one host,
or all over gRPC; ``njobs`` 1 and 4), against zarr-python on a local
directory of the same array and h5py on a local HDF5 file with the same
chunks. MB/s counts
the bytes of the result; the ratio is against zarr-python on a directory
(page cache warm for everyone), timed again in turn with gristmill's reads
(interleaved rounds) so that the machine's drifts touch both alike. Aim:
gristmill full read >= 0.8x zarr-python.

The Ceph backend's rows come from the same function with another store
config, on a throw-away local cluster (deploy/local/ceph-up) or the one
``BENCH_CEPH_CONF`` (and ``BENCH_CEPH_POOL``) names, against a bare librados
aio loop reading the same chunk objects, and against zarr-python decoding
the same chunks held in memory (``MemoryStore``): raw object reads do no
Zarr decoding, so the decode-only rate is the most any Zarr reader reaches.

    python bench/bench_arrays.py            # BENCH_ARRAY_MIB=64 for a quick run
    python bench/bench_arrays.py --serve DATA_DIR READY_FILE [STORE_JSON]
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gristmill.client.arrays import Dataset, File  # noqa: E402
from gristmill.client.arrays.store import GrpcZarrStore  # noqa: E402
from gristmill.client.tuning import tune_malloc  # noqa: E402
from scripts.processes import start_and_wait  # noqa: E402

MiB = 1024 * 1024
ARRAY_MIB = int(os.environ.get("BENCH_ARRAY_MIB", "256"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
CHUNK = 64
NAME = "volume"


@dataclass(frozen=True)
class Read:
    """A selection to time."""

    label: str
    selection: Any


READS = [
    Read("full read  [...]", ...),
    Read("plane      [:, :, 40]", (slice(None), slice(None), 40)),
    Read("strided    [::4, ::4, ::4]", (slice(None, None, 4),) * 3),
]


def shape_for(mib: int) -> tuple[int, int, int]:
    """512 x 512 x N float32 with N a multiple of 64 (256 MiB: N = 256)."""
    depth = max(CHUNK, (mib * MiB // (512 * 512 * 4)) // CHUNK * CHUNK)
    return (512, 512, depth)


def median_seconds(fn: Callable[[], np.ndarray], expect: np.ndarray) -> float:
    """Median wall time of ``fn`` over REPEATS runs after a warm-up; checks the result."""
    got = fn()
    if not np.array_equal(got, expect):
        raise RuntimeError("a reader returned different values")
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_read_seconds(read: Callable[[], int], total: int, what: str) -> float:
    """Median wall time of ``read`` (which returns the bytes it read) over REPEATS runs
    after a warm-up; each timed run must read ``total`` bytes."""
    read()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        if read() != total:
            raise RuntimeError(f"short {what} read")
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(fns: dict[str, Callable[[], np.ndarray]], expect: np.ndarray
                        ) -> dict[str, float]:
    """Median wall time of each function, timed in turn round after round.

    One warm-up (and check) each, then REPEATS rounds that run every function
    once: the shared machine's drifts touch all of them alike, so their
    ratios hold better than those of medians taken one after another.
    """
    for fn in fns.values():
        if not np.array_equal(fn(), expect):
            raise RuntimeError("a reader returned different values")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def reader(source: Any, selection: Any) -> Callable[[], np.ndarray]:
    """A function reading ``source[selection]`` as a numpy array."""
    return lambda: np.asarray(source[selection])


def row(name: str, seconds: float, nbytes: int, base: float | None) -> str:
    ratio = f"x{base / seconds:5.2f}" if base else "     -"
    return f"    {name:38} {seconds * 1e3:9.1f} ms {nbytes / seconds / 1e6:9.0f} MB/s   {ratio}"


# -- the server process -------------------------------------------------------------
def serve(data_dir: Path, ready: Path, store: dict[str, Any]) -> int:
    """A store + arrays server on port 0 (what `gristmill serve` runs once arrays is installed)."""
    from gristmill.common.config import load_config
    from gristmill.common.server import create_server, ensure_admin_key
    from gristmill.common.service import select_services

    tune_malloc()
    config = load_config(environ={}, overrides={"data_dir": data_dir, "port": 0,
                                                "metrics_port": None, "store": store})
    ensure_admin_key(config)
    specs = select_services(("store", "arrays"))
    server, port = create_server(config, specs)
    server.start()
    ready.write_text(json.dumps({"port": port}))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(0)
    return 0


def way_label(njobs: int, shm: bool) -> str:
    """How a row's chunk bytes travel."""
    return f"{'shm' if shm else 'gRPC'} njobs={njobs}"


def gristmill_rows(label: str, work: Path, data: np.ndarray, store: dict[str, Any],
                   baselines: dict[str, float]) -> dict[tuple[str, int, bool], float]:
    """Write the array through a server with ``store`` config, then time the reads."""
    times: dict[tuple[str, int, bool], float] = {}
    ready = work / f"{label}.ready"
    server = start_and_wait([sys.executable, str(Path(__file__).resolve()), "--serve",
                             str(work / f"data-{label}"), str(ready), json.dumps(store)],
                            ready, log=work / f"{label}.log", timeout=120)
    try:
        address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
        key = (work / f"data-{label}" / "admin.key").read_text().strip()
        with File(address, "w", api_key=key) as f:
            created = f.create_dataset(NAME, shape=data.shape, dtype=data.dtype,
                                       chunks=(CHUNK,) * 3)
            start = time.perf_counter()
            created[...] = data
            took = time.perf_counter() - start
            print(f"  gristmill {label}: wrote {data.nbytes / MiB:.0f} MiB in {took:.1f} s "
                  f"({data.nbytes / took / 1e6:.0f} MB/s, durable: one fsync per chunk)")
        zarr_dir = zarr.open_array(str(work / "local.zarr"), mode="r")
        # (njobs, shared memory): chunk bytes through /dev/shm rings, or all over gRPC
        ways = [(1, True), (4, True), (1, False), (4, False)]
        with contextlib.ExitStack() as files:
            datasets = {}
            for njobs, shm in ways:
                f = files.enter_context(File(address, "r", api_key=key, shared_memory=shm))
                ds = f[NAME]
                assert isinstance(ds, Dataset)
                ds.njobs = njobs
                datasets[way_label(njobs, shm)] = ds
            for read in READS:
                expect = data[read.selection]
                print(f"  {read.label}: {expect.nbytes / 1e6:.0f} MB of result "
                      "(zarr-python on the local directory timed again, in turn with these)")
                got = interleaved_seconds({"zarr": reader(zarr_dir, read.selection)} | {
                    name: reader(ds, read.selection) for name, ds in datasets.items()}, expect)
                print(row("zarr-python, local directory, in turn", got["zarr"], expect.nbytes,
                          got["zarr"]))
                for njobs, shm in ways:
                    t = got[way_label(njobs, shm)]
                    times[(read.label, njobs, shm)] = t
                    print(row(f"gristmill {label} {way_label(njobs, shm)}", t, expect.nbytes,
                              got["zarr"]))
                baselines[f"{label} {read.label}"] = got["zarr"]
        for shm in (True, False):
            times[("raw", 0, shm)] = raw_fetch_seconds(address, key, shm)
    finally:
        server.terminate()
        server.wait(30)
    return times


def raw_fetch_seconds(address: str, key: str, shm: bool) -> float:
    """Median seconds to fetch every chunk of the array as stored (GetKeys, no decode).

    The same bytes a direct rados loop reads: the store's own cost (gRPC or
    the shared-memory ring, batching, the backend) apart from zarr-python's
    decoding.
    """
    with File(address, "r", api_key=key, shared_memory=shm) as f:
        store = f.store
        assert isinstance(store, GrpcZarrStore)
        listed = list(store.list_keys(f"{NAME}/c/"))
        total = sum(size for _, size in listed)
        reads = [(k, 0, 0) for k, _ in listed]

        def fetch_all() -> int:
            got = [0]

            def deliver(_i: int, data: Any, _v: str) -> None:
                got[0] += len(data)
            store.read_values(reads, deliver, versions=False, settle=lambda: None)
            return got[0]

        return median_read_seconds(fetch_all, total, "GetKeys")


@contextlib.contextmanager
def ceph_cluster(work: Path) -> Iterator[str | None]:
    """A cluster's conf: ``BENCH_CEPH_CONF``, else a throw-away one from deploy/local/ceph-up."""
    conf = os.environ.get("BENCH_CEPH_CONF")
    if conf:
        yield conf
        return
    cluster = Path(tempfile.mkdtemp(prefix="gmbench-arr-", dir="/tmp"))
    up = subprocess.run([str(ROOT / "deploy/local/ceph-up"), str(cluster)], text=True,
                        capture_output=True, check=False,
                        env=dict(os.environ, CEPH_MGR="0", CEPH_MEMSTORE_BYTES=str(4 << 30)))
    try:
        if up.returncode != 0:
            print(f"  ceph rows: no cluster ({up.stderr.strip().splitlines()[-1:]})")
            yield None
        else:
            yield up.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(ROOT / "deploy/local/ceph-down"), str(cluster)],
                       capture_output=True, check=False)
        shutil.rmtree(cluster, ignore_errors=True)


def rados_full_read(conf: str, pool: str) -> tuple[float, int]:
    """Median seconds (and bytes) to read every chunk object of the array with a bare
    librados aio loop (64 in flight): what the cluster alone delivers here."""
    import rados

    client = rados.Rados(conffile=conf)
    client.connect()
    try:
        io = client.open_ioctx(pool)
        names = [o.key for o in io.list_objects() if o.key.startswith(f"arrays/{NAME}/c/")]
        sizes = {n: io.stat(n)[0] for n in names}
        total = sum(sizes.values())

        def read_all() -> int:
            got: list[int] = []

            def done(_c: Any, data: bytes) -> None:
                got.append(len(data))
            for i in range(0, len(names), 64):
                pending = [io.aio_read(n, sizes[n], 0, done) for n in names[i:i + 64]]
                for c in pending:
                    c.wait_for_complete_and_cb()
            return sum(got)

        seconds = median_read_seconds(read_all, total, "rados")
        io.close()
        return seconds, total
    finally:
        client.shutdown()


def main() -> int:
    tune_malloc()
    shape = shape_for(ARRAY_MIB)
    rng = np.random.default_rng(0)
    data = rng.random(shape, dtype=np.float32)
    print(f"array {shape} float32, {data.nbytes / MiB:.0f} MiB, chunks {CHUNK}^3 "
          f"(crc32c, uncompressed); medians of {REPEATS} runs after a warm-up; ratio: "
          "against zarr-python on a local directory", flush=True)
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-arrays-") as tmp:
        work = Path(tmp)
        local = zarr.create_array(str(work / "local.zarr"), shape=shape, dtype="float32",
                                  chunks=(CHUNK,) * 3, compressors=[Crc32cCodec()],
                                  fill_value=0.0)
        local[...] = data
        with h5py.File(work / "local.h5", "w") as h:
            h.create_dataset(NAME, data=data, chunks=(CHUNK,) * 3)
        baselines: dict[str, float] = {}
        # the same chunks held in memory: zarr-python's decode alone, no storage at all
        in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=shape, dtype="float32",
                                      chunks=(CHUNK,) * 3, compressors=[Crc32cCodec()],
                                      fill_value=0.0)
        in_memory[...] = data
        zarr_dir = zarr.open_array(str(work / "local.zarr"), mode="r")
        with h5py.File(work / "local.h5", "r") as h:
            hds = h[NAME]
            print("\nbaselines (local, no server)")
            for read in READS:
                expect = data[read.selection]
                t_zarr = median_seconds(reader(zarr_dir, read.selection), expect)
                t_h5 = median_seconds(reader(hds, read.selection), expect)
                t_mem = median_seconds(reader(in_memory, read.selection), expect)
                baselines[read.label] = t_zarr
                baselines[f"memory {read.label}"] = t_mem
                print(f"  {read.label}: {expect.nbytes / 1e6:.0f} MB of result")
                print(row("zarr-python, local directory", t_zarr, expect.nbytes, t_zarr))
                print(row("zarr-python, chunks in memory (decode only)", t_mem, expect.nbytes,
                          t_zarr))
                print(row("h5py, local file", t_h5, expect.nbytes, t_zarr))
        print("\ngristmill, client and server on this machine (shm: chunk bytes through a "
              "shared-memory ring; gRPC: all over the socket)")
        fs = gristmill_rows("fs", work, data, {}, baselines)
        full, zarr_full = READS[0].label, baselines[f"fs {READS[0].label}"]
        fastest = {shm: min(fs[(full, n, shm)] for n in (1, 4)) for shm in (True, False)}
        print(f"  ratio: gristmill fs full read (shm) / zarr-python = "
              f"{zarr_full / fastest[True]:.2f} (aim >= 0.8); over gRPC alone "
              f"{zarr_full / fastest[False]:.2f}")
        with ceph_cluster(work) as conf:
            if conf is not None:
                pool = os.environ.get("BENCH_CEPH_POOL", "gristmill")
                print(f"\ngristmill on the Ceph backend (1 OSD, memstore; conf {conf})")
                times = gristmill_rows("ceph", work, data, {"backend": {
                    "kind": "ceph", "conf": conf, "pool": pool}}, baselines)
                t_rados, nbytes = rados_full_read(conf, pool)
                print(row("direct librados aio reads (chunks)", t_rados, nbytes,
                          baselines[f"ceph {READS[0].label}"]))
                for shm in (True, False):
                    print(row(f"gristmill ceph GetKeys, no decode ({way_label(4, shm)[:4]})",
                              times[("raw", 0, shm)], nbytes,
                              baselines[f"ceph {READS[0].label}"]))
                raw = times[("raw", 0, True)]
                print(f"  ratio: gristmill ceph chunk fetch (shm) / direct rados = "
                      f"{t_rados / raw:.2f} (the store's own cost: batching, the ring, same "
                      "bytes, no decode)")
                best = min(times[(READS[0].label, n, True)] for n in (1, 4))
                print(f"  ratio: gristmill ceph full read (shm) / direct rados = "
                      f"{t_rados / best:.2f} (aim >= 0.7)")
                decode = baselines[f"memory {READS[0].label}"]
                print(f"  the raw reads carry no Zarr decoding: zarr-python decoding the same "
                      f"chunks from memory reaches {t_rados / decode:.2f} of direct rados, and "
                      f"gristmill ceph reaches {decode / best:.2f} of that decode-only ceiling")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--serve":
        sys.exit(serve(Path(sys.argv[2]), Path(sys.argv[3]),
                       json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}))
    sys.exit(main())
