"""A drop-in for datago's ``DatagoClient`` on local folders, backed by gristmill.

Switch by changing one import::

    # from datago import DatagoClient
    from gristmill.client.datago import DatagoClient

    client = DatagoClient(json.dumps({
        "source_type": "file",
        "source_config": {"root_path": "/data/images", "random_sampling": True,
                          "rank": 0, "world_size": 1},
        "image_config": {"crop_and_resize": True, "default_image_size": 512,
                         "downsampling_ratio": 16, "min_aspect_ratio": 0.5,
                         "max_aspect_ratio": 2.0},
        "limit": 1000, "samples_buffer_size": 64}))
    client.start()
    while (sample := client.get_sample()) is not None:
        sample.image  # a PIL image in its aspect-ratio bucket

Samples are assigned to ranks by a stable hash of their path, as datago does,
and decoded by the in-process gristmill pipeline (``Loader.from_folder``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gristmill.client.loader import Loader

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["DatagoClient", "Sample"]

#: Samples decoded together (one bucket per batch); any size works for a per-sample API.
_BATCH = 8


@dataclass
class Sample:
    """One sample shaped like datago's: id, image (PIL), masks, additional_images."""

    id: str
    image: Image.Image
    masks: dict[str, Image.Image] = field(default_factory=dict)
    additional_images: dict[str, Image.Image] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)


def _get(section: dict[str, Any], key: str, default: Any) -> Any:
    value = section.get(key, default)
    return default if value is None else value


class DatagoClient:
    """datago's client interface over a gristmill in-process loader.

    Args:
        json_config: datago's JSON configuration. Supported: ``source_type``
            "file" with ``source_config.root_path``, ``rank``, ``world_size``,
            ``random_sampling``; ``image_config`` with ``crop_and_resize``
            (must be true), ``default_image_size``, ``downsampling_ratio``,
            ``min_aspect_ratio``, ``max_aspect_ratio``, ``pre_encode_images``
            (accepted; images are handed over as PIL either way);
            ``samples_buffer_size``; ``limit``.
    """

    def __init__(self, json_config: str) -> None:
        try:
            config = json.loads(json_config)
        except ValueError as e:
            raise ValueError(f"the datago config is not valid JSON: {e}") from None
        if config.get("source_type", "file") != "file":
            raise ValueError(f"source_type {config.get('source_type')!r} is not supported by "
                             "the gristmill drop-in; use 'file' (or gristmill.client.Loader "
                             "for datasets on a gristmill server)")
        source = config.get("source_config") or {}
        if "root_path" not in source:
            raise ValueError("source_config.root_path is required: the folder of images")
        image = config.get("image_config") or {}
        if not _get(image, "crop_and_resize", True):
            raise ValueError("image_config.crop_and_resize false is not supported: gristmill "
                             "always sizes images into aspect-ratio buckets")
        self.root = str(source["root_path"])
        self.limit = int(_get(config, "limit", 0))
        buffer = int(_get(config, "samples_buffer_size", 64))
        self._options: dict[str, Any] = {
            "batch_size": _BATCH,
            "image_size": int(_get(image, "default_image_size", 512)),
            "downsampling_ratio": int(_get(image, "downsampling_ratio", 16)),
            "min_aspect_ratio": float(_get(image, "min_aspect_ratio", 0.5)),
            "max_aspect_ratio": float(_get(image, "max_aspect_ratio", 2.0)),
            "policy": "hash",
            "seed": int(_get(config, "seed", 0)),
            "rank": int(_get(source, "rank", 0)),
            "world_size": int(_get(source, "world_size", 1)),
            "prefetch": max(1, math.ceil(buffer / _BATCH)),
        }
        self._random = bool(_get(source, "random_sampling", False))
        self._loader: Loader | None = None
        self._samples: Iterator[Sample] | None = None
        self._served = 0

    def start(self) -> None:
        """Scan the folder and start decoding ahead (``get_sample`` starts it if needed)."""
        if self._loader is not None:
            return
        policy = self._options["policy"] if self._random else "sequential"
        self._loader = Loader.from_folder(self.root, show_progress=False,
                                          **{**self._options, "policy": policy})
        self._samples = self._iterate(self._loader)

    def _iterate(self, loader: Loader) -> Iterator[Sample]:
        from PIL import Image

        for batch in loader:
            for i, sid in enumerate(batch.ids):
                if not batch.fresh[i]:
                    continue  # padding: datago hands out each sample once
                yield Sample(os.path.join(self.root, sid), Image.fromarray(
                    batch.images[i].squeeze() if batch.images.shape[3] == 1
                    else batch.images[i]))

    def get_sample(self) -> Sample | None:
        """The next sample, or None when the folder (or ``limit``) is exhausted."""
        if self._samples is None:
            self.start()
        assert self._samples is not None
        if self.limit and self._served >= self.limit:
            return None
        sample = next(self._samples, None)
        if sample is not None:
            self._served += 1
        return sample

    def stop(self) -> None:
        """Stop decoding and release the threads."""
        if self._loader is not None:
            self._loader.close()
        self._loader = self._samples = None
