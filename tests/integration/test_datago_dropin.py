"""gristmill's datago drop-in, checked against datago 2026.10.1 itself.

The same script runs on both clients over one folder of photo-like images
(nested folders, grayscale, RGBA, palette, an EXIF-rotated JPEG, a broken file
and a text file); ids, sizes, modes, pixels and the API surface must agree,
except where the drop-in differs on purpose (see ``docs/ingest.md``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import datago
import numpy as np
import pytest
from PIL import Image, ImageFilter

from gristmill.client.datago import DatagoClient, DatagoCompatibilityWarning
from scripts.sample_data import make_sample_folder, photo_like
from tests.images import oriented_jpeg, palette_png

PHOTOS = 12


def config(root: Path, limit: int = 100, source: dict[str, Any] | None = None,
           **image: Any) -> str:
    return json.dumps({
        "source_type": "file",
        "source_config": {"root_path": str(root), "random_sampling": False, **(source or {})},
        "image_config": {"crop_and_resize": True, "default_image_size": 256,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0, "pre_encode_images": False, **image},
        "limit": limit, "samples_buffer_size": 16})


def name(sample_id: str) -> str:
    return Path(json.loads(sample_id)).name


def script(client: Any) -> dict[str, dict[str, Any]]:
    """A datago user's loop: every attribute it reads is checked on both clients."""
    client.start()
    out: dict[str, dict[str, Any]] = {}
    while (sample := client.get_sample()) is not None:
        image = sample.image
        payload = image.get_payload()
        pil = image.to_pil_image()
        out[name(sample.id)] = {
            "id": sample.id, "mode": image.mode, "size": image.size,
            "wh": (image.width, image.height), "pil": pil,
            # datago 2026.10.1's to_numpy_array() raises on encoded payloads; ours works
            "array": None if payload.is_encoded else image.to_numpy_array(),
            "payload": (payload.width, payload.height, payload.channels, payload.bit_depth,
                        payload.is_encoded, len(payload.data)),
            "surface": None if payload.is_encoded else surface(sample, image, payload)}
    client.stop()
    return out


def surface(sample: Any, image: Any, payload: Any) -> dict[str, str]:
    """Type name of every public attribute the script (and a datago user) relies on."""
    kinds: dict[str, str] = {}
    for attr in ("id", "source", "attributes", "tags", "masks", "additional_images",
                 "latents", "coca_embedding", "duplicate_state"):
        kinds[f"sample.{attr}"] = type(getattr(sample, attr)).__name__
    for attr in ("info", "palette", "width", "height", "size", "mode"):
        kinds[f"image.{attr}"] = type(getattr(image, attr)).__name__
    for attr in ("to_pil_image", "to_numpy_array"):  # get_payload(): checked by its fields
        kinds[f"image.{attr}()"] = type(getattr(image, attr)()).__name__
    kinds["image()"] = type(image()).__name__
    for attr in ("data", "width", "height", "channels", "bit_depth", "is_encoded",
                 "original_width", "original_height"):
        kinds[f"payload.{attr}"] = type(getattr(payload, attr)).__name__
    for attr in ("to_pil_image", "to_numpy_array"):
        kinds[f"payload.{attr}()"] = type(getattr(payload, attr)()).__name__
    return kinds


def mad(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean())


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datago") / "imgs"
    for path in make_sample_folder(root, count=PHOTOS, max_side=400):
        # real photos carry correlated, not per-pixel, noise: soften the synthetic noise,
        # else the resampling filters (datago Lanczos-3, gristmill area) differ by ~4/255
        with Image.open(path) as im:
            soft = im.filter(ImageFilter.GaussianBlur(1.5))
        soft.save(path, quality=90)  # Pillow's PNG writer ignores quality
    extra = root / "extra" / "deeper"
    extra.mkdir(parents=True)
    photo_like(300, 200, 77).convert("L").save(extra / "gray.jpg", quality=90)
    photo_like(200, 260, 78).convert("L").save(extra / "gray.png")
    rgba = np.array(photo_like(240, 180, 79).convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, 240).astype(np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(extra / "alpha.png")
    (extra / "palette.png").write_bytes(palette_png())
    (extra / "rotated.jpg").write_bytes(oriented_jpeg(np.asarray(photo_like(320, 200, 80)), 6))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def both(folder: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    return script(DatagoClient(config(folder))), script(datago.DatagoClient(config(folder)))


def test_same_ids_sizes_modes_and_pixels_as_datago(both: Any, folder: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = both
    assert set(ours) == set(theirs)
    assert len(ours) == PHOTOS + 5  # the broken file is logged, the text file skipped
    for key, mine in ours.items():
        other = theirs[key]
        assert mine["id"] == other["id"]  # the path in double quotes, as datago gives it
        if key == "rotated.jpg":
            continue  # see test_exif_orientation_is_applied_unlike_datago
        assert (mine["mode"], mine["size"], mine["wh"]) == \
               (other["mode"], other["size"], other["wh"]), key
        assert mine["payload"] == other["payload"], key
        assert mine["array"].shape == other["array"].shape, key
        if mine["mode"] in ("RGB", "L"):  # photos: resampling filters differ only slightly
            assert mad(mine["pil"], other["pil"]) <= 3, key


def test_exif_orientation_is_applied_unlike_datago(both: Any) -> None:
    ours, theirs = both
    mine, other = ours["rotated.jpg"]["pil"], theirs["rotated.jpg"]["pil"]
    assert mine.size == other.size[::-1]  # ours upright (320 x 200 source), datago's as stored
    assert mad(mine, other.transpose(Image.Transpose.ROTATE_270)) <= 3


def test_api_surface_matches_datago(both: Any) -> None:
    ours, theirs = both
    for key in ours:
        assert ours[key]["surface"] == theirs[key]["surface"], key


def test_auto_convert_gives_datagos_types(folder: Path) -> None:
    results = []
    for client in (DatagoClient(config(folder)), datago.DatagoClient(config(folder))):
        client.start()
        sample = client.get_sample_auto_convert()
        client.stop()
        assert sample is not None
        results.append({k: type(v).__name__ if k != "image" else isinstance(v, Image.Image)
                        for k, v in sample.items()})
    assert results[0] == results[1]


def test_broken_images_are_logged_like_datago(folder: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gristmill.client.datago"):
        script(DatagoClient(config(folder)))
    failed = [r.getMessage() for r in caplog.records if "broken.jpg" in r.getMessage()]
    assert len(failed) == 1
    assert failed[0].startswith(f"Failed to load image from path {folder / 'broken.jpg'}: ")


@pytest.mark.parametrize("fmt,magic", [("png", b"\x89PNG"), ("jpeg", b"\xff\xd8\xff")])
def test_pre_encoded_payloads(folder: Path, fmt: str, magic: bytes) -> None:
    cfg = config(folder / "landscapes", pre_encode_images=True, encode_format=fmt,
                 jpeg_quality=90)
    ours, theirs = script(DatagoClient(cfg)), script(datago.DatagoClient(cfg))
    assert set(ours) == set(theirs)
    for key, mine in ours.items():
        width, height, channels, _, encoded, _ = mine["payload"]
        assert (channels, encoded) == (-1, True)
        assert mine["size"] == theirs[key]["size"] == (width, height)
        assert mad(mine["pil"], theirs[key]["pil"]) <= 4, key
    client = DatagoClient(cfg)
    sample = client.get_sample()
    client.stop()
    assert sample is not None and sample.image.get_payload().data.startswith(magic)
    assert sample.image.to_numpy_array().shape == (sample.image.height, sample.image.width, 3)


def test_image_to_rgb8_converts_and_its_absence_keeps_modes(folder: Path) -> None:
    cfg = config(folder / "extra", image_to_rgb8=True)
    ours, theirs = script(DatagoClient(cfg)), script(datago.DatagoClient(cfg))
    assert {k: v["mode"] for k, v in ours.items()} == {k: v["mode"] for k, v in theirs.items()}
    assert {v["mode"] for v in ours.values()} == {"RGB"}
    kept = script(DatagoClient(config(folder / "extra", image_to_rgb8=False)))
    assert {k: v["mode"] for k, v in kept.items()} == {
        "gray.jpg": "L", "gray.png": "L", "alpha.png": "RGBA", "palette.png": "RGBA",
        "rotated.jpg": "RGB"}


def test_start_after_a_pass_starts_a_reshuffled_pass(folder: Path) -> None:
    client = DatagoClient(config(folder, source={"random_sampling": True}))
    passes = []
    for _ in range(3):
        client.start()
        ids = []
        while (sample := client.get_sample()) is not None:
            ids.append(sample.id)
        assert client.get_sample() is None  # no silent restart, as datago 2026.10.1
        passes.append(ids)
    client.stop()
    assert client.get_sample() is None
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(passes[2])
    assert len(passes[0]) == PHOTOS + 5
    assert passes[0] != passes[1] or passes[1] != passes[2]


def test_limit_is_per_pass_and_exact(folder: Path) -> None:
    # datago 2026.10.1 hands out limit + 1 samples on a single rank; the drop-in exactly limit
    client = DatagoClient(config(folder, limit=5))
    for _ in range(2):
        client.start()
        count = 0
        while client.get_sample() is not None:
            count += 1
        assert count == 5
    client.stop()


def test_ranks_split_the_folder_by_a_stable_hash(folder: Path) -> None:
    def ids(client: Any) -> set[str]:
        return set(script(client))

    for random in (False, True):
        parts = [ids(DatagoClient(config(folder, source={"random_sampling": random, "rank": r,
                                                         "world_size": 2})))
                 for r in (0, 1)]
        assert not parts[0] & parts[1]
        assert len(parts[0]) + len(parts[1]) == PHOTOS + 5
    # a different hash from datago's: a file may sit on another rank (documented)
    again = ids(DatagoClient(config(folder, source={"rank": 0, "world_size": 2})))
    assert again == parts[0]


def test_unsupported_configs_are_refused_or_warned(folder: Path) -> None:
    with pytest.raises(ValueError, match="source_type"):
        DatagoClient(json.dumps({"source_type": "db"}))
    with pytest.raises(ValueError, match="root_path"):
        DatagoClient(json.dumps({"source_type": "file", "source_config": {}}))
    bad = json.loads(config(folder))
    bad["image_config"]["crop_and_resize"] = False
    with pytest.raises(ValueError, match="crop_and_resize"):
        DatagoClient(json.dumps(bad))
    with pytest.raises(ValueError, match="encode_format"):
        DatagoClient(config(folder, encode_format="webp"))
    with pytest.raises(ValueError, match="rank"):
        DatagoClient(config(folder, source={"rank": 2, "world_size": 2}))
    unknown = json.loads(config(folder))
    unknown["prefetch_buffer_size"] = 8
    unknown["source_config"]["concurrent_downloads"] = 4
    with pytest.warns(DatagoCompatibilityWarning) as caught:
        DatagoClient(json.dumps(unknown))
    text = " ".join(str(w.message) for w in caught)
    assert "prefetch_buffer_size" in text and "concurrent_downloads" in text
