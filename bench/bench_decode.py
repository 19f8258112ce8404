"""Decode throughput against baselines measured in the same run.

A mixed set of photo-like JPEGs (2/3) and PNGs (1/3) of 0.3-4 MP, resized and
centre-cropped into the buckets S=512, d=16, by:

(a) the decode service over gRPC (a real `gristmill serve` process; this
    process sends batches of about 4 MiB of images, inline or as references
    to the same files in the server's store, and reads raw pixels),
(b) the in-process pipeline (gristmill.decode.Decoder, one thread per core),
(c) a plain PIL loop (open, convert, resize, crop; one thread),
(d) the raw limit: the same decode + resize written directly against the
    libraries (simplejpeg DCT-scaled decode, libvips or OpenCV for PNG,
    OpenCV INTER_AREA resize) on a thread per core, no per-sample bookkeeping.

Each run decodes the set PASSES times over in one stream (one batch for the
pool), so ramp-up and drain weigh as little as in a long training stream.
Medians of several repeats; the ratios are what to compare across machines.
"""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# one thread per image everywhere, as the decode service runs libvips
os.environ.setdefault("VIPS_CONCURRENCY", "1")

import cv2  # noqa: E402
import pyvips  # noqa: E402
import simplejpeg  # noqa: E402
from PIL import Image  # noqa: E402

from gristmill.client import DecodeClient, to_array  # noqa: E402
from gristmill.client.buckets import BucketConfig, bucket_table  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.client.tuning import tune_malloc  # noqa: E402
from gristmill.decode import Decoder, SampleInput, Transform  # noqa: E402
from gristmill.v1 import decode_pb2  # noqa: E402
from scripts.processes import start_and_wait  # noqa: E402
from scripts.sample_data import photo_like  # noqa: E402

COUNT = int(os.environ.get("BENCH_DECODE_COUNT", "36"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "5"))
PASSES = int(os.environ.get("BENCH_DECODE_PASSES", "3"))
BATCH_BYTES = 4 * 1024 * 1024
CONFIG = BucketConfig(512, 16)
CORES = os.cpu_count() or 1


def make_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(COUNT):
        pixels = rng.uniform(0.3e6, 4e6)
        ratio = float(rng.uniform(0.5, 2.0))
        w, h = max(1, round(math.sqrt(pixels * ratio))), max(1, round(math.sqrt(pixels / ratio)))
        buf = io.BytesIO()
        img = photo_like(w, h, i)
        if i % 3 == 2:
            img.save(buf, "PNG", compress_level=6)
        else:
            img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def target(w: int, h: int) -> tuple[int, int, float]:
    b = bucket_table(CONFIG).nearest(w, h)
    return b.width, b.height, max(b.width / w, b.height / h)


def crop_resize(a: np.ndarray, tw: int, th: int, full_w: int) -> np.ndarray:
    h, w = a.shape[:2]
    s = max(tw / w, th / h)
    cw, ch = min(w, round(tw / s)), min(h, round(th / s))
    x, y = (w - cw) // 2, (h - ch) // 2
    return cv2.resize(a[y:y + ch, x:x + cw], (tw, th), interpolation=cv2.INTER_AREA)


def raw_one(data: bytes, png_with_cv2: bool) -> np.ndarray:
    if data[:3] == b"\xff\xd8\xff":
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        tw, th, s = target(w, h)
        a = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(w * s),
                                   min_height=math.ceil(h * s))
        return crop_resize(a, tw, th, w)
    if png_with_cv2:
        a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    else:
        img = pyvips.Image.new_from_buffer(data, "", access="sequential")
        a = np.frombuffer(img.write_to_memory(), np.uint8).reshape(img.height, img.width,
                                                                   img.bands)
    tw, th, _ = target(a.shape[1], a.shape[0])
    return crop_resize(a, tw, th, a.shape[1])


def pil_one(data: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(data)).convert("RGB")
    tw, th, s = target(im.width, im.height)
    rw, rh = max(tw, round(im.width * s)), max(th, round(im.height * s))
    im = im.resize((rw, rh), Image.Resampling.BILINEAR)
    x, y = (rw - tw) // 2, (rh - th) // 2
    return np.asarray(im.crop((x, y, x + tw, y + th)))


def median_rate(fn: Callable[[], int]) -> float:
    fn()  # warm-up
    rates = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        n = fn()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def requests(images: list[bytes], refs: bool) -> Iterator[decode_pb2.DecodeRequest]:
    """Batches of about BATCH_BYTES of encoded images (inline or as store references)."""
    transform = decode_pb2.Transform(buckets=decode_pb2.BucketConfig(
        image_size=CONFIG.image_size, downsampling=CONFIG.downsampling))
    batch: list[decode_pb2.DecodeSample] = []
    size = 0
    first = True
    for i, data in enumerate(images * PASSES):
        n = i % len(images)
        source = (decode_pb2.ImageSource(ref=decode_pb2.StoreRef(dataset="bench",
                                                                 path=f"{n:03d}.img"))
                  if refs else decode_pb2.ImageSource(data=data))
        batch.append(decode_pb2.DecodeSample(id=str(i), image=source))
        size += len(data)
        if size >= BATCH_BYTES or i == len(images) * PASSES - 1:
            yield decode_pb2.DecodeRequest(transform=transform if first else None,
                                           samples=batch)
            batch, size, first = [], 0, False


def main() -> int:
    tune_malloc()
    print(f"preparing {COUNT} photo-like images (2/3 JPEG q90, 1/3 PNG), 0.3-4 MP ...",
          flush=True)
    images = make_images()
    mp = sum(math.prod(Image.open(io.BytesIO(d)).size) for d in images) / len(images) / 1e6
    transform = Transform(buckets=CONFIG)
    samples = [SampleInput(d) for d in images]
    with tempfile.TemporaryDirectory(prefix="gristmill-bench-") as tmp:
        ready = Path(tmp) / "ready.json"
        server = start_and_wait([str(Path(sys.executable).parent / "gristmill"), "serve",
                                 "--data", str(Path(tmp) / "data"), "--port", "0",
                                 "--no-metrics", "--no-auth", "--ready-file", str(ready)], ready)
        try:
            address = f"127.0.0.1:{json.loads(ready.read_text())['port']}"
            folder = Path(tmp) / "images"
            folder.mkdir()
            for i, data in enumerate(images):
                (folder / f"{i:03d}.img").write_bytes(data)
            with Hub(address, None, None, show_progress=False) as hub:
                hub.import_folder("bench", folder)
                hub.commit_version("bench")
            with DecodeClient(address) as client:
                def service(refs: bool) -> int:
                    n = 0
                    for resp in client.decode(requests(images, refs)):
                        for r in resp.results:
                            if r.WhichOneof("result") != "sample":
                                raise RuntimeError(r.error.message)
                            n += to_array(r.sample.image).shape[0] > 0
                    return n

                r_service = median_rate(lambda: service(False))
                r_refs = median_rate(lambda: service(True))
        finally:
            server.terminate()
            server.wait(30)
    with Decoder() as decoder:
        def in_process() -> int:
            results = decoder.decode_batch(samples * PASSES, transform)
            if any(isinstance(r, Exception) for r in results):
                raise RuntimeError("decode failed")
            return len(results)

        r_inproc = median_rate(in_process)
        by_format = {}
        for name, magic in (("JPEG", b"\xff\xd8\xff"), ("PNG", b"\x89PNG")):
            subset = [s for s in samples if s.image.startswith(magic)]

            def ours(sub: list[SampleInput] = subset) -> int:
                return len(decoder.decode_batch(sub * PASSES, transform))

            def pil(sub: list[SampleInput] = subset) -> int:
                return len([pil_one(s.image) for s in sub])

            by_format[name] = (median_rate(ours), median_rate(pil))
    with ThreadPoolExecutor(CORES) as pool:
        r_raw_vips = median_rate(lambda: len(list(pool.map(lambda d: raw_one(d, False),
                                                           images * PASSES))))
        r_raw_cv2 = median_rate(lambda: len(list(pool.map(lambda d: raw_one(d, True),
                                                          images * PASSES))))
    r_raw = max(r_raw_vips, r_raw_cv2)
    r_pil = median_rate(lambda: len([pil_one(d) for d in images]))
    print(f"\nDecode + resize + crop into S=512, d=16 buckets; {COUNT} images averaging "
          f"{mp:.1f} MP; {CORES} cores; medians of {REPEATS} runs")
    rows = [("(a) service, inline bytes", r_service),
            ("(a) service, store references", r_refs),
            ("(b) in-process pipeline", r_inproc),
            ("(c) plain PIL loop, 1 thread", r_pil),
            ("(d) raw limit, PNG via libvips", r_raw_vips),
            ("(d) raw limit, PNG via OpenCV", r_raw_cv2)]
    for name, rate in rows:
        print(f"  {name:34} {rate:8.1f} images/s   x{rate / r_raw:5.2f} of raw   "
              f"x{rate / r_pil:5.2f} of PIL")
    for name, (r_ours, r_pil_fmt) in by_format.items():
        print(f"  {name} only: in-process {r_ours:.1f} images/s, PIL loop {r_pil_fmt:.1f} "
              f"images/s, x{r_ours / r_pil_fmt:.2f}")
    print(f"  ratios: in-process / raw = {r_inproc / r_raw:.2f} (aim 0.90), service / raw = "
          f"{r_service / r_raw:.2f} inline, {r_refs / r_raw:.2f} by reference (aim 0.75), "
          f"in-process / PIL = {r_inproc / r_pil:.2f} (aim 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
