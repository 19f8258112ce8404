"""Header facts per file: gristmill.client.imageinfo against Pillow, in the same run.

The baseline is what the store and the folder scan did before: ``Image.open``
plus ``getexif()`` (which, for a PNG, decodes every pixel). Measured on a
4000 x 3000 PNG and JPEG (with EXIF) from the page cache, and on the scan of
``Loader.from_folder`` (``FolderStore``) over a folder of mixed images.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
import timeit
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gristmill.client.imageinfo import read_header  # noqa: E402
from gristmill.v1 import store_pb2  # noqa: E402
from scripts.sample_data import make_sample_folder, photo_like  # noqa: E402

FOLDER_COUNT = int(os.environ.get("BENCH_FOLDER_COUNT", "100"))


def pillow_header(path: Path) -> store_pb2.ImageInfo | None:
    """The old path: Pillow's header plus getexif() (a full decode for PNG)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orientation = int(im.getexif().get(0x0112, 0) or 0)
    except Exception:  # noqa: BLE001 - the baseline swallowed everything too
        return None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return store_pb2.ImageInfo(width=w, height=h, format="", orientation=orientation)


def per_call(fn: Callable[[], object], budget: float = 2.0) -> float:
    """Seconds per call: the best of 5 timeit repeats, sized to about ``budget`` in all."""
    timer = timeit.Timer(fn)
    n, t = timer.autorange()
    number = max(1, int(n * (budget / 5) / max(t, 1e-9)))
    return min(timer.repeat(5, number)) / number


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:9.1f} us"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        root = Path(tmp)
        im = photo_like(4000, 3000, 1)
        exif = Image.Exif()
        exif[0x0112] = 6
        files = {"PNG 4000x3000": root / "big.png", "JPEG 4000x3000 +EXIF": root / "big.jpg"}
        im.save(files["PNG 4000x3000"], "PNG", compress_level=1)
        im.save(files["JPEG 4000x3000 +EXIF"], "JPEG", quality=90, exif=exif.tobytes())
        print("per file (best of 5):")
        for name, path in files.items():
            new, old = read_header(path), pillow_header(path)
            assert new is not None and old is not None
            assert (new.width, new.height, new.orientation) == (old.width, old.height,
                                                                 old.orientation)
            t_new = per_call(lambda p=path: read_header(p))  # type: ignore[misc]
            t_old = per_call(lambda p=path: pillow_header(p), 4.0)  # type: ignore[misc]
            data = path.read_bytes()
            t_mem = per_call(lambda d=data: read_header(io.BytesIO(d)))  # type: ignore[misc]
            print(f"  {name:22} imageinfo {fmt(t_new)}  (bytes in memory {fmt(t_mem)})"
                  f"   Pillow {fmt(t_old)}   x{t_old / t_new:8.0f}")

        folder = root / "folder"
        make_sample_folder(folder, count=FOLDER_COUNT, max_side=1600)
        listed = sorted(p for p in folder.rglob("*") if p.is_file())
        scans = {}
        readers: list[tuple[str, Callable[[Path], object]]] = [
            ("imageinfo", read_header), ("Pillow", pillow_header)]
        for name, header in readers:
            for f in listed:  # warm the page cache
                header(f)
            start = time.perf_counter()
            found = [header(f) for f in listed]
            scans[name] = time.perf_counter() - start
            assert all(found)
        print(f"Headers of a folder of {FOLDER_COUNT} JPEG/PNG files (what from_folder reads):")
        print(f"  imageinfo {scans['imageinfo'] * 1e3:8.1f} ms   Pillow "
              f"{scans['Pillow'] * 1e3:8.1f} ms   x{scans['Pillow'] / scans['imageinfo']:6.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
