"""The datago drop-in against datago itself and the raw limit, measured in the same run.

A mixed folder like real photographs: COUNT images of 0.3-4 MP in nested
folders, ~78% JPEG (a quarter progressive, a tenth grayscale), ~15% PNG (a
third RGBA), the rest WebP, in camera and phone aspect ratios. For each of

(1) ``gristmill.client.datago.DatagoClient`` (the drop-in, on ``Loader.from_folder``),
(2) datago itself (``pip install datago``), same config,
(3) the raw limit: bytes already in memory, simplejpeg DCT-scaled decode (OpenCV
    for PNG/WebP) + resize into the bucket on 2 threads, no bookkeeping,

it prints the whole-run rate (constructor to last sample, images/s) and the
time to the first sample, medians of interleaved rounds, and the ratios
drop-in/datago and drop-in/raw. Aims (issue 12): >= 1.2x datago, >= 0.9x raw,
first sample < 0.5 s.
"""

from __future__ import annotations

import io
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VIPS_CONCURRENCY", "1")

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

from bench.bench_decode import raw_one  # noqa: E402
from bench.bench_ingest import datago_config  # noqa: E402
from gristmill.client.tuning import tune_malloc  # noqa: E402
from scripts.sample_data import photo_like  # noqa: E402

COUNT = int(os.environ.get("BENCH_DATAGO_COUNT", "400"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "7"))
THREADS = 2
RATIOS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3, 9 / 16)
DIRS = ("2023/holiday", "2023/garden", "2024", "phone/camera", "phone/screenshots")


def make_folder(folder: Path) -> list[bytes]:
    """Write the photo-like folder; return each file's bytes (for the raw limit)."""
    rng = np.random.default_rng(12)
    out = []
    for i in range(COUNT):
        ratio = RATIOS[int(rng.integers(len(RATIOS)))]
        pixels = rng.uniform(0.3e6, 4e6)
        w, h = round(math.sqrt(pixels * ratio)), round(math.sqrt(pixels / ratio))
        img = photo_like(w, h, i)
        kind = rng.uniform()
        buf = io.BytesIO()
        if kind < 0.78:
            if rng.uniform() < 0.1:
                img = img.convert("L")
            img.save(buf, "JPEG", quality=90, progressive=bool(rng.uniform() < 0.25))
            suffix = "jpg"
        elif kind < 0.93:
            if rng.uniform() < 1 / 3:
                img.putalpha(Image.fromarray(
                    np.full((h, w), 255, np.uint8) - (np.arange(w, dtype=np.uint8)[None, :] // 4)))
            img.save(buf, "PNG", compress_level=6)
            suffix = "png"
        else:
            img.save(buf, "WEBP", quality=85)
            suffix = "webp"
        path = folder / DIRS[i % len(DIRS)] / f"IMG_{i:04d}.{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buf.getvalue())
        out.append(buf.getvalue())
    return out


def pixels(image: object) -> int:
    """Touch a sample's pixels (a PIL image or datago's ImagePayload)."""
    to_numpy = getattr(image, "to_numpy_array", None)
    a = to_numpy() if to_numpy is not None else np.asarray(image)
    return int(a.shape[0] > 0)


def client_run(make: Callable[[], object]) -> tuple[int, float, float]:
    """(samples, seconds to the first, seconds to the last), from the constructor."""
    start = time.perf_counter()
    client = make()
    client.start()  # type: ignore[attr-defined]
    n, first = 0, 0.0
    while n < COUNT and (sample := client.get_sample()) is not None:  # type: ignore[attr-defined]
        n += pixels(sample.image)
        if n == 1:
            first = time.perf_counter() - start
    end = time.perf_counter() - start
    client.stop()  # type: ignore[attr-defined]
    return n, first, end


def raw_run(images: list[bytes]) -> tuple[int, float, float]:
    start = time.perf_counter()
    n, first = 0, 0.0
    with ThreadPoolExecutor(THREADS) as pool:
        for a in pool.map(lambda d: raw_one(d, True), images):
            n += int(a.shape[0] > 0)
            if n == 1:
                first = time.perf_counter() - start
    return n, first, time.perf_counter() - start


def medians(runs: dict[str, Callable[[], tuple[int, float, float]]]
            ) -> dict[str, tuple[float, float, int]]:
    """Per run: (images/s, seconds to first sample, images), medians over REPEATS rounds.

    The rounds interleave the runs (one of each per round, after a warm-up of
    each), so that the shared machine's drifts in load touch all of them alike
    and the ratios stay fair.
    """
    for run in runs.values():
        run()
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in runs}
    for _ in range(REPEATS):
        for name, run in runs.items():
            results[name].append(run())
    return {name: (statistics.median(n / end for n, _, end in rs),
                   statistics.median(first for _, first, _ in rs), rs[0][0])
            for name, rs in results.items()}


def main() -> int:
    tune_malloc()
    cv2.setNumThreads(1)
    print(f"preparing {COUNT} photo-like images (~78% JPEG incl. progressive and grayscale, "
          "~15% PNG incl. RGBA, WebP; 0.3-4 MP; nested folders) ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-datago-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["GRISTMILL_CACHE_DIR"] = str(tmp / "cache")  # the index starts empty
        folder = tmp / "photos"
        images = make_folder(folder)
        config = datago_config(folder, COUNT)

        from datago import DatagoClient as Datago

        from gristmill.client.datago import DatagoClient as DropIn

        rows = medians({
            "(1) gristmill drop-in": lambda: client_run(lambda: DropIn(config)),
            "(2) datago 2026.10.1": lambda: client_run(lambda: Datago(config)),
            f"(3) raw limit, {THREADS} threads, bytes in memory": lambda: raw_run(images),
        })
    print(f"\nWhole run, constructor to last sample; {COUNT} images, S=512 d=16; "
          f"medians of {REPEATS} interleaved rounds (after one warm-up)")
    for name, (rate, first, n) in rows.items():
        print(f"  {name:42} {rate:7.1f} images/s   first sample {first * 1000:7.1f} ms"
              f"   ({n} images)")
    ours, dg, raw = (r[0] for r in rows.values())
    first = next(iter(rows.values()))[1]
    print(f"  drop-in / datago x{ours / dg:.2f} (aim >= 1.2); drop-in / raw x{ours / raw:.2f} "
          f"(aim >= 0.9); drop-in first sample {first * 1000:.0f} ms (aim < 500)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
