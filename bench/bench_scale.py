"""Per-call cost at N and 10N files: what grows with the dataset (issue 13).

One in-process server (store, decode, ingest) on a temporary directory. The
big datasets are synthetic catalogs: N entries registered in one go
(``Catalog.add_files`` in big batches, or PutFiles with ``reuse_blob`` when
that is not there), all pointing at a few real tiny JPEGs, then committed.
Imports and downloads use real files, at a tenth of the catalog sizes. The
import is also timed as a user runs it: into ``gristmill serve`` in a process
of its own (default settings: ``store.sync_method: fsync``, blobs up to
``store.backend.inline_max_bytes`` kept as rows of one SQLite file), and again
with a file per blob, the layout before those rows; in-process, client and
server share one interpreter lock.

Each row prints the median cost per unit at both sizes and the growth ratio
(10N cost / N cost): about 1 means the per-unit cost is flat, so a per-call
row at 1 does not grow with the dataset and a per-file row at 1 grows only
linearly with its output. Default N = 10,000 (so 10N = 100,000);
``--million`` runs N = 100,000 and 10N = 1,000,000. ``BENCH_SCALE_N`` sets N.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import gristmill.client.cache as cache_module  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.client.planner import PlanConfig, Policy, SampleSet, plan_epoch  # noqa: E402
from gristmill.common.server import create_server  # noqa: E402
from gristmill.v1 import (  # noqa: E402
    decode_pb2,
    ingest_pb2,
    ingest_pb2_grpc,
    store_pb2,
)
from tests.helpers import Running, spawn_server, start_in_process, stop_process  # noqa: E402

REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
SEED_SHAPES = [(64, 64), (80, 60), (60, 80), (96, 54), (54, 96), (72, 48), (48, 72), (64, 48)]
BATCH = 16
STREAM_BATCHES = 40


@dataclass
class Row:
    """One operation's cost per unit at each size."""

    name: str
    unit: str
    costs: dict[int, float]  # size -> seconds per unit
    sizes: tuple[int, int]

    def line(self) -> str:
        small, big = (self.costs.get(s) for s in self.sizes)
        ratio = f"{big / small:6.2f}" if small and big else "     -"
        return (f"  {self.name:34} {_fmt(small):>10} {_fmt(big):>10}   x{ratio}  "
                f"per {self.unit}")


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def median(fn: Callable[[], Any], repeats: int = REPEATS) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def once(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_growth(fn: Callable[[], Any]) -> float:
    """Bytes this process's peak RSS rose above its RSS at the start while ``fn`` ran.

    The peak is reset first (``/proc/self/clear_refs``, Linux). Server and
    client share this process: a row is the memory of the whole call.
    """
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    fn()
    return float(max(0, _status_bytes("VmHWM") - before))


# setup -------------------------------------------------------------------
def seed_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate(SEED_SHAPES):
        im = Image.new("RGB", (w, h), (40 * i % 256, 90, 200 - 20 * i))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
        (folder / f"seed{i}.jpg").write_bytes(buf.getvalue())


def synthetic_entries(seeds: list[store_pb2.FileEntry], n: int, start: int = 0
                      ) -> Iterator[store_pb2.FileEntry]:
    for i in range(start, start + n):
        e = store_pb2.FileEntry()
        e.CopyFrom(seeds[i % len(seeds)])
        e.path = f"img/{i // 1000:05d}/{i:08d}.jpg"
        yield e


def add_synthetic(running: Running, hub: Hub, name: str, seeds: list[store_pb2.FileEntry],
                  n: int) -> None:
    """A dataset of ``n`` entries pointing at the seed blobs (catalog rows, no bytes)."""
    hub.create_dataset(name)
    assert running.server is not None
    store = running.server.context.local.get("store")
    add = getattr(getattr(store, "catalog", None), "add_files", None)
    step = 50_000
    for i in range(0, n, step):
        batch = list(synthetic_entries(seeds, min(step, n - i), i))
        if add is not None:
            try:
                add(name, batch)
                continue
            except TypeError:  # the catalog's signature changed: use the public call
                add = None
        put_reused(running, name, batch)


def put_reused(running: Running, name: str, entries: list[store_pb2.FileEntry]) -> None:
    stub = running.store()
    for i in range(0, len(entries), 5000):
        msg = store_pb2.PutFilesRequest(dataset=name)
        for e in entries[i:i + 5000]:
            msg.chunks.add(path=e.path, size=e.size, sha256=e.sha256, reuse_blob=True,
                           last=True)
        stub.PutFiles(iter([msg]))


def restart(running: Running) -> Running:
    """The same data directory on a fresh in-process server (every cache empty)."""
    assert running.server is not None
    running.server.stop(0)
    server, port = create_server(running.config)
    server.start()
    return Running(f"127.0.0.1:{port}", running.config, running.admin_key, server=server)


def spec(name: str, version: str,
         policy: ingest_pb2.PlanPolicy.ValueType = ingest_pb2.PLAN_POLICY_EXACT
         ) -> ingest_pb2.PlanSpec:
    return ingest_pb2.PlanSpec(
        dataset=name, version=version, world_size=1, batch_size=BATCH, seed=1, policy=policy,
        transform=decode_pb2.Transform(buckets=decode_pb2.BucketConfig(
            image_size=64, downsampling=16, min_aspect=0.5, max_aspect=2.0)))


def stream(ingest: ingest_pb2_grpc.IngestServiceStub, planned: ingest_pb2.PlanSpec,
           batches: int, position: int = 0) -> tuple[float, float]:
    """(seconds to the first message, seconds for ``batches`` batches)."""
    req = ingest_pb2.StreamBatchesRequest(spec=planned, rank=0, max_batches=batches,
                                          cursor=ingest_pb2.Cursor(position=position))
    t = time.perf_counter()
    first = 0.0
    for msg in ingest.StreamBatches(req):
        if not first:
            first = time.perf_counter() - t
        del msg
    return first, time.perf_counter() - t


# measurements --------------------------------------------------------------
def measure_catalog(running: Running, hub: Hub, seeds: list[store_pb2.FileEntry], n: int,
                    out: dict[str, dict[int, float]], memory: dict[str, dict[int, float]]
                    ) -> Running:
    name = f"syn{n}"
    t = once(lambda: add_synthetic(running, hub, name, seeds, n))
    print(f"    {n} synthetic entries in {t:.1f} s", flush=True)
    version = hub.commit_version(name).id
    stub = running.store()
    out["GetDataset"][n] = median(
        lambda: stub.GetDataset(store_pb2.GetDatasetRequest(name=name)), 20)

    def page() -> None:
        req = store_pb2.ListManifestRequest(dataset=name, version=version, page_size=1000)
        for _ in range(10):
            resp = stub.ListManifest(req)
            req.page_token = resp.next_page_token
    out["ListManifest page (1000)"][n] = median(page, 3) / 10
    fresh = Hub(running.address, running.admin_key, None, show_progress=False)
    out["GetManifest (committed)"][n] = median(
        lambda: fresh.get_manifest(name, version), 3) / n
    fresh.close()
    assert running.server is not None
    store = running.server.context.local.get("store")
    assert store is not None

    def serve_manifest() -> None:
        for _ in store.manifest_chunks(name, version):
            pass
    memory["GetManifest, server side (committed)"][n] = peak_rss_growth(serve_manifest)
    with Hub(running.address, running.admin_key, None, show_progress=False) as client:
        memory["get_manifest, client (committed)"][n] = peak_rss_growth(
            lambda: client.get_manifest(name, version))

    # planning and streaming: cold is a fresh server, warm the same one again
    running = restart(running)
    ingest = ingest_pb2_grpc.IngestServiceStub(running.channel())
    req = ingest_pb2.PlanEpochRequest(spec=spec(name, version), epoch=0)
    out["PlanEpoch cold"][n] = once(lambda: ingest.PlanEpoch(req)) / n
    out["PlanEpoch warm"][n] = median(lambda: ingest.PlanEpoch(req), 3) / n
    running = restart(running)
    ingest = ingest_pb2_grpc.IngestServiceStub(running.channel())

    def cold_first() -> float:
        planned = ingest.PlanEpoch(req).spec
        return stream(ingest, planned, 1)[0]
    t0 = time.perf_counter()
    first = cold_first()
    out["first batch cold (plan + stream)"][n] = time.perf_counter() - t0
    del first
    planned = ingest.PlanEpoch(req).spec
    out["first batch warm"][n] = statistics.median(
        stream(ingest, planned, 1, position=k)[0] for k in range(1, 4))
    out["stream batch"][n] = median(
        lambda: stream(ingest, planned, STREAM_BATCHES, position=10)[1], 3) / STREAM_BATCHES

    samples = SampleSet(tuple(f"img/{i // 1000:05d}/{i:08d}.jpg" for i in range(n)),
                        np.zeros(n, dtype=np.int64))
    config = PlanConfig(batch_size=BATCH, world_size=8, policy=Policy.HASH)
    out["plan_epoch hash (client)"][n] = once(
        lambda: plan_epoch(SampleSet(samples.ids, samples.buckets), config, 0)) / n

    # the Hub's cache on a pinned version of the big dataset
    cache_dir = Path(running.config.data_dir).parent / f"cache{n}"
    with Hub(running.address, running.admin_key, cache_dir, show_progress=False) as h:
        paths = [f"img/{i // 1000:05d}/{i:08d}.jpg" for i in (0, n // 2, n - 1)]
        for p in paths:
            h.get_file(name, p, version)
        out["Hub get_file (cached, pinned)"][n] = median(
            lambda: [h.get_file(name, p, version) for p in paths], 5) / len(paths)
    return running


#: The setting that makes every blob a file (the layout before small-object rows).
INLINE_OFF = "GRISTMILL_STORE__BACKEND__INLINE_MAX_BYTES"


def measure_files(running: Running, hub: Hub, work: Path, n: int,
                  out: dict[str, dict[int, float]], memory: dict[str, dict[int, float]]
                  ) -> None:
    folder = work / f"files{n}"
    for i in range(n):
        sub = folder / f"d{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:07d}.bin").write_bytes(b"%d-%d" % (n, i))
    name = f"files{n}"
    # as a user runs it: `gristmill serve` in a process of its own, default settings
    # (small blobs are rows of one SQLite file); then a file per blob, the baseline
    for row, env in (("import, server in its own process", {}),
                     ("import, own process, a file per blob", {INLINE_OFF: "0"})):
        os.environ.update(env)
        try:
            served = spawn_server(work / f"served{n}{len(env)}")
        finally:
            for key in env:
                del os.environ[key]
        try:
            with Hub(served.address, served.admin_key, None, show_progress=False) as remote:
                out[row][n] = once(lambda: remote.import_folder(name, folder)) / n
        finally:
            stop_process(served)
    out["import"][n] = once(lambda: hub.import_folder(name, folder)) / n
    out["re-import (unchanged)"][n] = once(lambda: hub.import_folder(name, folder)) / n
    memory["re-import (unchanged), client + server"][n] = peak_rss_growth(
        lambda: hub.import_folder(name, folder))
    cache_dir = work / f"dl{n}"
    with Hub(running.address, running.admin_key, cache_dir, show_progress=False) as h:
        out["Hub download"][n] = once(lambda: h.download_dataset(name)) / n
        # a download's record is trusted once its folders are older than RACY_NS: the
        # warm-up call below checks every file and records it again, the others do not
        time.sleep(cache_module.RACY_NS / 1e9)
        out["Hub re-download (all cached)"][n] = median(
            lambda: h.download_dataset(name), 3) / n


ROWS = [("GetDataset", "call"), ("ListManifest page (1000)", "page"),
        ("GetManifest (committed)", "file"), ("PlanEpoch cold", "sample"),
        ("PlanEpoch warm", "sample"), ("first batch cold (plan + stream)", "call"),
        ("first batch warm", "call"), ("stream batch", f"batch of {BATCH}"),
        ("plan_epoch hash (client)", "sample"), ("Hub get_file (cached, pinned)", "call"),
        ("import", "file"), ("import, server in its own process", "file"),
        ("import, own process, a file per blob", "file"),
        ("re-import (unchanged)", "file"), ("Hub download", "file"),
        ("Hub re-download (all cached)", "file")]
FILE_ROWS = {"import", "import, server in its own process", "import, own process, a file per blob",
             "re-import (unchanged)", "Hub download", "Hub re-download (all cached)"}
MEMORY_ROWS = ["GetManifest, server side (committed)", "get_manifest, client (committed)",
               "re-import (unchanged), client + server"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--million", action="store_true",
                        help="N = 100,000 and 10N = 1,000,000 (minutes, GBs of disk)")
    parser.add_argument("--n", type=int, default=int(os.environ.get("BENCH_SCALE_N", "10000")))
    args = parser.parse_args(argv)
    n = 100_000 if args.million else args.n
    sizes = (n, 10 * n)
    file_sizes = (n // 10, n)
    out: dict[str, dict[int, float]] = {name: {} for name, _ in ROWS}
    memory: dict[str, dict[int, float]] = {name: {} for name in MEMORY_ROWS}
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-scale-") as tmp:
        work = Path(tmp)
        running = start_in_process(work / "data")
        try:
            with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
                seed_images(work / "seed")
                hub.import_folder("seed", work / "seed")
                seeds = list(hub.get_manifest("seed").files)
            for size in sizes:
                print(f"  catalog of {size} files ...", flush=True)
                with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
                    running = measure_catalog(running, hub, seeds, size, out, memory)
            for size in file_sizes:
                print(f"  {size} real files ...", flush=True)
                with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
                    measure_files(running, hub, work, size, out, memory)
        finally:
            assert running.server is not None
            running.server.stop(0)
    print(f"\n  catalog rows at N={sizes[0]:,} and 10N={sizes[1]:,}; import and download rows "
          f"at {file_sizes[0]:,} and {file_sizes[1]:,} real files. Medians; ratio = 10N / N "
          "per unit (1 = flat per unit).")
    print(f"  {'operation':34} {'N':>10} {'10N':>10}   {'ratio':>7}")
    for name, unit in ROWS:
        used = file_sizes if name in FILE_ROWS else sizes
        print(Row(name, unit, out[name], used).line())
    rows, files = (out[name].get(file_sizes[1]) for name in (
        "import, server in its own process", "import, own process, a file per blob"))
    if rows and files:
        print(f"\n  import into `gristmill serve`, {file_sizes[1]:,} small files: "
              f"{1 / rows:,.0f} files/s with small blobs as rows, {1 / files:,.0f} with a "
              f"file per blob (x{files / rows:.2f})")
    print("\n  peak RSS growth during one call (server and client share this process)")
    for name in MEMORY_ROWS:
        used = file_sizes if name.startswith("re-import") else sizes
        small, big = (memory[name].get(k) for k in used)
        print(f"  {name:40} {_mib(small):>9} {_mib(big):>9}")
    return 0


def _mib(size: float | None) -> str:
    return "-" if size is None else f"{size / 2**20:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
