"""Photo-like sample images made locally (no downloads) for the demo, benchmarks and tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["jpeg_bytes", "make_sample_folder", "photo_like"]


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (gradients plus noise), deterministic per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        127 + 100 * np.sin(x / (17 + seed % 13) + seed),
        127 + 100 * np.cos(y / (23 + seed % 7)),
        127 + 100 * np.sin((x + y) / (31 + seed % 5)),
    ], axis=-1)
    noise = rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def jpeg_bytes(width: int = 32, height: int = 24, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG, encoded in memory."""
    buf = io.BytesIO()
    photo_like(width, height, seed).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_sample_folder(root: Path, count: int = 24, seed: int = 0,
                       max_side: int = 1024) -> list[Path]:
    """``count`` JPEG/PNG images of mixed sizes and aspect ratios in nested folders."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        ratio = float(rng.choice([0.5, 0.75, 1.0, 4 / 3, 16 / 9, 2.0]))
        long_side = int(rng.integers(max_side // 3, max_side + 1))
        w, h = (long_side, int(long_side / ratio)) if ratio >= 1 else (int(long_side * ratio),
                                                                        long_side)
        fmt = "PNG" if i % 4 == 3 else "JPEG"
        sub = ["landscapes", "portraits", "squares"][0 if ratio > 1 else 1 if ratio < 1 else 2]
        path = root / sub / f"img_{i:04d}.{'png' if fmt == 'PNG' else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo_like(w, h, seed * 1000 + i).save(path, fmt, **({"quality": 90} if fmt == "JPEG"
                                                            else {}))
        paths.append(path)
    return paths
