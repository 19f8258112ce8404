"""``Loader.as_torch()`` with torch's DataLoader (the torch branch runs where torch is installed).

torch is not a dependency: CI runs the no-torch branch. To run the other one,
``pip install torch`` (a CPU wheel is enough) into the environment. Batches
as ``Batch`` objects and worker processes: ``test_ingest.py``.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

from tests.helpers import Running, loader

try:
    import torch
    from torch.utils.data import DataLoader, default_collate
except ImportError:
    torch = None


@pytest.mark.skipif(torch is not None, reason="torch is installed")
def test_without_torch_as_torch_says_how_to_get_it(fed: Running) -> None:
    with loader(fed) as ld:
        for tensors in (False, True):
            with pytest.raises(ImportError, match="pip install torch"):
                ld.as_torch(tensors=tensors)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_dataloader_defaults_are_refused_with_the_fix(fed: Running) -> None:
    with loader(fed) as ld:
        for tensors in (False, True):
            dataset = ld.as_torch(tensors=tensors)
            with pytest.raises(ValueError, match=r"DataLoader\(dataset, batch_size=None\)"):
                list(DataLoader(dataset))
            with pytest.raises(ValueError, match="batch_size=None"):
                list(DataLoader(dataset, batch_size=2))


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_tensors_are_nchw_uint8_with_ids_and_fresh_mask(fed: Running) -> None:
    with loader(fed, seed=3) as ld:
        expected = list(ld)
        ld.set_epoch(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pin_memory without an accelerator: a warning
            got = list(DataLoader(ld.as_torch(tensors=True), batch_size=None,
                                  pin_memory=True))
    assert len(got) == len(expected) > 1
    for item, batch in zip(got, expected, strict=True):
        assert isinstance(item, dict) and set(item) == {"images", "ids", "fresh"}
        images = item["images"]
        assert images.dtype == torch.uint8 and images.ndim == 4
        n, h, w, c = batch.images.shape
        assert tuple(images.shape) == (n, c, h, w)
        np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), batch.images)
        assert item["ids"] == batch.ids
        assert item["fresh"].dtype == torch.bool
        assert item["fresh"].tolist() == batch.fresh.tolist()
        # what pin_memory does to a dict (copy, then update with pinned tensors) works
        clone = copy.copy(item)
        clone.update({k: v for k, v in item.items()})
        assert clone.keys() == item.keys()
        # and what default_collate does to it (a batch of batches) is refused
        with pytest.raises(ValueError, match="batch_size=None"):
            default_collate([item])

