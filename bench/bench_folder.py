"""Start-up of ``Loader.from_folder`` on a large folder: first start, second start, streaming.

A folder of COUNT tiny JPEGs in 100 subfolders (default 100,000). For the
exact policy, which must know every file's size before it plans, it prints
the time from the constructor to the first batch on the first start (every
header read, on 8 threads) and on a second start of the unchanged folder
(headers from the on-disk folder index: one walk with a ``stat`` per file,
one SQLite read), medians of REPEATS, in this warm process. The hash policy
streams while the folder is listed; its first batch is printed too. As a
baseline measured in the same run: a bare ``os.scandir`` walk with one
``stat`` per file, the least any listing that notices changed files pays.

Aims (issue 12): second start under 1 s; first batch of hash/sequential
under 0.5 s whatever the folder size.
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gristmill.client.loader import Loader  # noqa: E402

COUNT = int(os.environ.get("BENCH_FOLDER_COUNT", "100000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "3"))
DIRS = 100


def make_folder(folder: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (120, 30, 60)).save(buf, "JPEG")
    data = buf.getvalue()
    per_dir = -(-COUNT // DIRS)
    for i in range(COUNT):
        d = folder / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"img{i:06d}.jpg").write_bytes(data)


def first_batch(folder: Path, policy: str) -> float:
    start = time.perf_counter()
    with Loader.from_folder(folder, batch_size=32, image_size=256, policy=policy,
                            show_progress=False) as loader:
        next(iter(loader))
    return time.perf_counter() - start


def bare_walk(folder: Path) -> float:
    start = time.perf_counter()
    stack = [str(folder)]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                else:
                    entry.stat()
    return time.perf_counter() - start


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-folder-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ["GRISTMILL_CACHE_DIR"] = str(tmp / "cache")  # the index starts empty
        folder = tmp / "images"
        print(f"writing {COUNT:,} tiny JPEGs in {DIRS} folders ...", flush=True)
        make_folder(folder)
        first = first_batch(folder, "exact")
        second = statistics.median(first_batch(folder, "exact") for _ in range(REPEATS))
        hashed = statistics.median(first_batch(folder, "hash") for _ in range(REPEATS))
        walk = statistics.median(bare_walk(folder) for _ in range(REPEATS))
    print(f"\nLoader.from_folder on {COUNT:,} files, constructor to first batch "
          f"(medians of {REPEATS}, warm process)")
    print(f"  exact, first start (every header read)      {first:7.2f} s")
    print(f"  exact, second start (unchanged, index)      {second:7.2f} s   (aim < 1 s)")
    print(f"  hash, first batch while listing             {hashed:7.2f} s   (aim < 0.5 s)")
    print(f"  baseline: bare scandir + stat walk          {walk:7.2f} s   "
          f"(second start / walk x{second / walk:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
