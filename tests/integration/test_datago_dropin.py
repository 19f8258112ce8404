"""gristmill's datago drop-in, checked against datago itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datago
import pytest

from gristmill.client.datago import DatagoClient
from scripts.sample_data import make_sample_folder


def config(root: Path, **source: Any) -> str:
    return json.dumps({
        "source_type": "file",
        "source_config": {"root_path": str(root), "random_sampling": False, **source},
        "image_config": {"crop_and_resize": True, "default_image_size": 256,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0, "pre_encode_images": False},
        "limit": 100, "samples_buffer_size": 16})


def drain(client: Any) -> dict[str, tuple[int, int]]:
    client.start()
    out: dict[str, tuple[int, int]] = {}
    while (sample := client.get_sample()) is not None and len(out) < 100:
        image = sample.image
        size = image.size if hasattr(image, "size") and not callable(image.size) else \
            image.to_pil_image().size
        out[str(sample.id).strip('"')] = size
    client.stop()
    return out


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    make_sample_folder(tmp_path / "imgs", count=14, max_side=500)
    return tmp_path / "imgs"


def test_same_samples_and_bucket_sizes_as_datago(folder: Path) -> None:
    ours = drain(DatagoClient(config(folder)))
    theirs = drain(datago.DatagoClient(config(folder)))
    assert len(ours) == 14
    assert ours == theirs


def test_ranks_split_the_folder_and_limit_is_honoured(folder: Path) -> None:
    parts = [drain(DatagoClient(config(folder, random_sampling=True, rank=r, world_size=2)))
             for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == 14
    limited = json.loads(config(folder))
    limited["limit"] = 5
    assert len(drain(DatagoClient(json.dumps(limited)))) == 5


def test_unsupported_configs_are_refused_clearly(folder: Path) -> None:
    with pytest.raises(ValueError, match="source_type"):
        DatagoClient(json.dumps({"source_type": "db"}))
    with pytest.raises(ValueError, match="root_path"):
        DatagoClient(json.dumps({"source_type": "file", "source_config": {}}))
    bad = json.loads(config(folder))
    bad["image_config"]["crop_and_resize"] = False
    with pytest.raises(ValueError, match="crop_and_resize"):
        DatagoClient(json.dumps(bad))
