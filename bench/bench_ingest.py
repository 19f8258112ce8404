"""Training-feed throughput: images/s reaching the training loop, against baselines.

A mixed photo set (0.3-4 MP, 2/3 JPEG q90, 1/3 PNG) in the aspect ratios of
cameras and phones (1:1, 4:3, 3:2, 16:9 and their portrait forms), the same
number of images in each, so every bucket fills whole batches and the epoch
has no padding: the steady state of a large dataset. S=512, d=16, batches of
8, one epoch per run, through:

(a) the all-in-one server over gRPC (`gristmill serve`, a Loader here),
(b) separate store, decode and ingest servers (three processes, gRPC between),
(c) the all-in-one server with pixels through a shared-memory ring,
(d) ``Loader.from_folder`` (the same pipeline in this process, no server),
(e) a plain PIL loop on all cores (a process per core: open, convert,
    resize, crop),
(f) datago (``pip install datago``) with the same config on the same folder.

Medians of several runs; compare the ratios.
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bench.bench_decode as bench_decode  # noqa: E402
from bench.bench_decode import median_rate, pil_one  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.client.loader import Loader  # noqa: E402
from gristmill.client.tuning import tune_malloc  # noqa: E402
from scripts.processes import start_and_wait  # noqa: E402
from scripts.sample_data import photo_like  # noqa: E402

RATIOS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3)
PER_RATIO = int(os.environ.get("BENCH_INGEST_PER_RATIO", "16"))
COUNT = PER_RATIO * len(RATIOS)
BATCH = 8
OPTIONS = {"batch_size": BATCH, "image_size": 512, "downsampling_ratio": 16,
           "drop_last": False}
CORES = os.cpu_count() or 1
GRISTMILL = str(Path(sys.executable).parent / "gristmill")
JPEG_MAGIC = b"\xff\xd8\xff"


def make_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(COUNT):
        ratio = RATIOS[i % len(RATIOS)]
        pixels = rng.uniform(0.3e6, 4e6)
        w, h = round(math.sqrt(pixels * ratio)), round(math.sqrt(pixels / ratio))
        buf = io.BytesIO()
        if i % 3 == 2:
            photo_like(w, h, i).save(buf, "PNG", compress_level=6)
        else:
            photo_like(w, h, i).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def serve(tmp: Path, name: str, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    ready = tmp / f"{name}.ready.json"
    proc = start_and_wait([GRISTMILL, "serve", "--data", str(tmp / name), "--port", "0",
                           "--no-metrics", "--no-auth", "--ready-file", str(ready), *extra],
                          ready, log=tmp / f"{name}.log")
    return f"127.0.0.1:{json.loads(ready.read_text())['port']}", proc


def epoch_through(loader: Loader) -> int:
    """Images of one epoch reaching the loop (padding repeats excluded)."""
    n = 0
    for batch in loader:
        n += int(batch.fresh.sum())
        if batch.errors:
            raise RuntimeError(batch.errors[0].message)
    return n


def pil_file(path: str) -> int:
    with open(path, "rb") as f:
        return int(pil_one(f.read()).shape[0] > 0)


def datago_config(folder: Path, limit: int) -> str:
    """datago's JSON config for one rank over ``folder``, buckets as OPTIONS (S=512, d=16)."""
    return json.dumps({
        "source_type": "file",
        "source_config": {"root_path": str(folder), "random_sampling": False, "rank": 0,
                          "world_size": 1},
        "image_config": {"crop_and_resize": True, "default_image_size": 512,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0, "pre_encode_images": False},
        "limit": limit, "samples_buffer_size": 64})


def datago_epoch(folder: Path) -> int:
    from datago import DatagoClient

    client = DatagoClient(datago_config(folder, COUNT))
    client.start()
    n = 0
    while n < COUNT and (sample := client.get_sample()) is not None:
        n += sample.image.to_numpy_array().shape[0] > 0
    client.stop()
    return n


def main() -> int:
    tune_malloc()
    print(f"preparing {COUNT} photo-like images (2/3 JPEG q90, 1/3 PNG), 0.3-4 MP ...",
          flush=True)
    images = make_images()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "images"
        folder.mkdir()
        files = []
        for i, data in enumerate(images):
            suffix = "jpg" if data.startswith(JPEG_MAGIC) else "png"
            path = folder / f"{i:03d}.{suffix}"
            path.write_bytes(data)
            files.append(str(path))
        procs = []
        try:
            address, proc = serve(tmp, "all")
            procs.append(proc)
            with Hub(address, None, None, show_progress=False) as hub:
                hub.import_folder("bench", folder)
                hub.commit_version("bench")
            with Loader(address, "bench", shared_memory=False,
                        **OPTIONS) as loader:  # type: ignore[arg-type]
                rows.append(("(a) all-in-one server, gRPC", median_rate(
                    lambda: epoch_through(loader))))
            with Loader(address, "bench", shared_memory=True,
                        **OPTIONS) as loader:  # type: ignore[arg-type]
                rows.append(("(c) all-in-one server, shared memory", median_rate(
                    lambda: epoch_through(loader))))
            store = address  # the all-in-one server serves as the store for (b)
            decode, proc = serve(tmp, "decode", "--services", "decode")
            procs.append(proc)
            config = tmp / "ingest.yaml"
            config.write_text(f"ingest:\n  store_address: '{store}'\n"
                              f"  decode_address: '{decode}'\n")
            ingest, proc = serve(tmp, "ingest", "--services", "ingest", "--config",
                                 str(config))
            procs.append(proc)
            with Loader(ingest, "bench", shared_memory=False,
                        **OPTIONS) as loader:  # type: ignore[arg-type]
                rows.append(("(b) separate store/decode/ingest", median_rate(
                    lambda: epoch_through(loader))))
        finally:
            for p in procs:
                p.terminate()
                p.wait(30)
        with Loader.from_folder(folder, show_progress=False, **OPTIONS) as loader:  # type: ignore[arg-type]
            rows.append(("(d) Loader.from_folder", median_rate(lambda: epoch_through(loader))))
        with multiprocessing.get_context("spawn").Pool(CORES) as pool:
            rows.append((f"(e) plain PIL loop, {CORES} processes", median_rate(
                lambda: sum(pool.map(pil_file, files, chunksize=2)))))
        rows.append(("(f) datago, same config", median_rate(lambda: datago_epoch(folder))))
    rates = dict(rows)
    pil = rates[f"(e) plain PIL loop, {CORES} processes"]
    dg = rates["(f) datago, same config"]
    assert pil and dg
    print(f"\nImages/s reaching the training loop; {COUNT} images, S=512 d=16, batches of "
          f"{BATCH}; {CORES} cores; medians of {bench_decode.REPEATS} epochs")
    rows.sort()
    for name, rate in rows:
        print(f"  {name:36} {rate:8.1f} images/s   x{rate / pil:5.2f} of PIL   "
              f"x{rate / dg:5.2f} of datago")
    a, c = rates["(a) all-in-one server, gRPC"], rates["(c) all-in-one server, shared memory"]
    d = rates["(d) Loader.from_folder"]
    print(f"  aims: (a), (c), (d) >= datago: x{a / dg:.2f}, x{c / dg:.2f}, x{d / dg:.2f}; "
          f">= 3x PIL on all cores: x{a / pil:.2f}, x{c / pil:.2f}, x{d / pil:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
