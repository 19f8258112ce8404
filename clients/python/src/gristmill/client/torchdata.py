"""A :class:`~gristmill.client.loader.Loader` as a ``torch.utils.data.IterableDataset``.

The Loader's batches are batches already (one bucket each, prefetched on the
Loader's thread), so the DataLoader must not batch them again:
``DataLoader(dataset, batch_size=None)``. With torch's default
``batch_size=1`` every item would be collated into a batch of one batch; the
dataset refuses that with an error saying what to pass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch.utils.data import IterableDataset

    from gristmill.client.loader import Batch, Loader

__all__ = ["TorchBatch", "as_torch"]

_FIX = "DataLoader(dataset, batch_size=None)"


class TorchBatch(dict[str, Any]):
    """One batch as torch tensors, a ``dict`` ready for ``pin_memory``.

    Keys: ``images`` (uint8 ``[B, C, H, W]``, in channels-last memory: no
    copy; ``.contiguous()`` makes it NCHW-contiguous), ``ids`` (``list[str]``)
    and ``fresh`` (bool ``[B]``, False for padding repeats).
    """

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Update like a dict, refusing what torch's collation makes of a batch.

        ``default_collate`` copies a dict item and updates it with the
        collated values, ``images`` then having a batch dimension more.
        """
        new = dict(*args, **kwargs)
        images = new.get("images")
        if images is not None and getattr(images, "ndim", 4) != 4:
            raise ValueError(
                f"a gristmill batch was collated into a batch of batches (images of shape "
                f"{tuple(images.shape)}): its items are whole batches already, so pass "
                f"{_FIX}")
        super().update(new)


def _collating_dataloader() -> bool:
    """Whether the DataLoader iterating us batches its items (``batch_size`` not None).

    torch gives a dataset no handle on its DataLoader; the fetcher that calls
    ``iter(dataset)`` holds ``auto_collation``. Best effort: if torch renames
    it, :meth:`TorchBatch.update` and torch's own collate error still stop
    a wrong ``batch_size``.
    """
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return False
        local = frame.f_locals
        auto = local.get("auto_collation", getattr(local.get("self"), "auto_collation", None))
        if isinstance(auto, bool):
            return auto
        frame = frame.f_back  # type: ignore[assignment]
    return False


def _tensors(batch: Batch) -> TorchBatch:
    import torch

    images = torch.from_numpy(batch.images).permute(0, 3, 1, 2)  # NCHW view, channels-last
    return TorchBatch(images=images, ids=list(batch.ids), fresh=torch.from_numpy(batch.fresh))


def as_torch(loader: Loader, tensors: bool = False) -> IterableDataset[Any]:
    """``loader`` as an IterableDataset of its batches (see :meth:`Loader.as_torch`)."""
    try:
        from torch.utils.data import IterableDataset, get_worker_info
    except ImportError as e:
        raise ImportError("as_torch() needs PyTorch: pip install torch") from e

    class GristmillBatches(IterableDataset[Any]):  # type: ignore[misc,unused-ignore]
        """The Loader's batches; use with ``DataLoader(dataset, batch_size=None)``."""

        def __iter__(self) -> Iterator[Batch | TorchBatch]:
            if get_worker_info() is not None:
                raise RuntimeError(
                    "a gristmill Loader must not run in DataLoader worker processes: each "
                    "worker would stream this rank's whole epoch again. Use "
                    "DataLoader(dataset, batch_size=None, num_workers=0); the Loader "
                    "prefetches on its own thread and the server decodes")
            if _collating_dataloader():
                raise ValueError(
                    "a gristmill dataset yields whole batches (the Loader's batch_size, one "
                    "bucket each): DataLoader's default batch_size=1 would wrap each in "
                    f"another batch. Pass {_FIX} (pin_memory=True works too)")
            if not tensors:
                return iter(loader)
            return (_tensors(b) for b in loader)

        def __len__(self) -> int:
            return len(loader)

    return GristmillBatches()
