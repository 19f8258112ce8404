"""The epoch planner: which sample goes to which rank, in which batch, in which order.

One pure function, :func:`plan_epoch`, imported by the ingest service and by
the client alike. Its output depends only on its inputs (the samples of a
dataset version with their buckets, the seed, the epoch, the world size, the
batch size, the policy and ``drop_last``), so a rank that knows its cursor
``(epoch, position)`` can resume anywhere, on any server, after any restart.

Every batch holds samples of one bucket, so its images stack into one array.

Policies:

* ``exact`` (default): one seeded shuffle of the whole epoch; every sample
  goes to exactly one rank and every rank gets the same number of batches.
  The tail is padded by repeating samples (or dropped with ``drop_last``).
* ``hash``: a stable hash of the sample id (:func:`rank_keys`) picks the rank,
  independent of the seed and the epoch (like datago, though not datago's
  hash), so a sample stays on its rank as the dataset grows; ranks are then
  evened out by padding (or trimming).
* ``sequential``: ``exact`` without shuffling: manifest order.

Repeated samples (padding) are marked: :attr:`PlannedBatch.fresh` counts the
leading samples of a batch that are delivered for the first time this epoch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import numpy as np
import numpy.typing as npt

from gristmill.client.buckets import BucketConfig, BucketTable, bucket_table

__all__ = [
    "Cursor",
    "EpochPlan",
    "PlanConfig",
    "PlannedBatch",
    "Policy",
    "SampleSet",
    "plan_epoch",
    "rank_key",
    "rank_keys",
]

IntArray = npt.NDArray[np.int64]

_MASK64 = (1 << 64) - 1
_M1, _M2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53  # MurmurHash3's 64-bit finaliser


def rank_key(sample_id: str) -> int:
    """The hash policy's stable 64-bit key of one sample id (as :func:`rank_keys`).

    MurmurHash3's 64-bit finaliser (fmix64) of the CRC-32 of the id's UTF-8
    bytes: fixed, independent of platform, seed, epoch and dataset version,
    and the same in the server's planner, the client's and the streaming
    planner. A sample's rank is ``rank_key(id) % world_size``.
    """
    k = zlib.crc32(sample_id.encode())
    k ^= k >> 33
    k = (k * _M1) & _MASK64
    k ^= k >> 33
    k = (k * _M2) & _MASK64
    return k ^ (k >> 33)


def rank_keys(ids: Sequence[str]) -> npt.NDArray[np.uint64]:
    """:func:`rank_key` of every id, vectorised: one C call per id, the mixing in numpy."""
    k = np.fromiter(map(zlib.crc32, map(str.encode, ids)), dtype=np.uint64, count=len(ids))
    shift = np.uint64(33)
    k ^= k >> shift
    k *= np.uint64(_M1)  # uint64 arithmetic wraps, as the mask does in rank_key
    k ^= k >> shift
    k *= np.uint64(_M2)
    k ^= k >> shift
    return k


class Policy(Enum):
    """How samples are assigned to ranks."""

    EXACT = "exact"
    HASH = "hash"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class Cursor:
    """Where a rank is: the epoch, and the index of its next batch in that epoch."""

    epoch: int = 0
    position: int = 0


@dataclass(frozen=True)
class PlanConfig:
    """Everything besides the samples and the epoch that decides a plan."""

    batch_size: int = 32
    world_size: int = 1
    seed: int = 0
    policy: Policy = Policy.EXACT
    drop_last: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2**64), got {self.seed}")


@dataclass(frozen=True)
class SampleSet:
    """The samples of a dataset version, in manifest order, each with its bucket.

    Attributes:
        ids: sample ids (store paths), in manifest order; a plan refers to
            samples by their index here.
        buckets: bucket index of each sample.
    """

    ids: tuple[str, ...]
    buckets: IntArray = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.buckets):
            raise ValueError(f"{len(self.ids)} ids but {len(self.buckets)} bucket indices")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_sizes(cls, ids: Sequence[str], sizes: Sequence[tuple[int, int]] | IntArray,
                   table: BucketTable | BucketConfig) -> SampleSet:
        """Bucket each sample by its (width, height) as displayed.

        A size of (0, 0) (the store could not read the header) goes to the
        bucket nearest to square: the sample is still planned, and the decoder
        reports it as a per-sample error if it is indeed unreadable.
        """
        table = table if isinstance(table, BucketTable) else bucket_table(table)
        wh = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
        known = (wh[:, 0] > 0) & (wh[:, 1] > 0)
        ratio = np.ones(len(wh))
        np.divide(wh[:, 0], wh[:, 1], out=ratio, where=known)
        return cls(tuple(ids), nearest_buckets(table, ratio))

    @cached_property
    def rank_keys(self) -> npt.NDArray[np.uint64]:
        """:func:`rank_keys` of the ids: the stable 64-bit hash the ``hash`` policy uses."""
        return rank_keys(self.ids)


def nearest_buckets(table: BucketTable, ratios: npt.NDArray[np.float64]) -> IntArray:
    """Vectorised :meth:`BucketTable.nearest`: nearest ratio, ties to the larger one."""
    known = np.array([b.aspect for b in table.buckets])
    i = np.searchsorted(known, ratios, side="left")
    above = np.clip(i, 0, len(known) - 1)
    below = np.clip(i - 1, 0, len(known) - 1)
    take_above = (known[above] - ratios) <= (ratios - known[below])
    return np.where(take_above, above, below).astype(np.int64)


@dataclass(frozen=True)
class PlannedBatch:
    """One batch: sample indices of one bucket; the first ``fresh`` are first deliveries."""

    bucket: int
    samples: tuple[int, ...]
    fresh: int

    def __len__(self) -> int:
        return len(self.samples)


@dataclass(frozen=True)
class EpochPlan:
    """Each rank's ordered batches for one epoch."""

    epoch: int
    config: PlanConfig
    ranks: tuple[tuple[PlannedBatch, ...], ...]

    @property
    def batches_per_rank(self) -> int:
        """Batches every rank gets (equal across ranks)."""
        return len(self.ranks[0]) if self.ranks else 0

    @property
    def fresh_samples(self) -> int:
        """Distinct samples delivered this epoch."""
        return sum(b.fresh for rank in self.ranks for b in rank)

    def batches(self, rank: int, cursor: Cursor | None = None) -> Sequence[PlannedBatch]:
        """A rank's batches from ``cursor`` (its position) to the end of the epoch."""
        if not 0 <= rank < len(self.ranks):
            raise ValueError(f"rank {rank} is outside world size {len(self.ranks)}")
        start = cursor.position if cursor is not None else 0
        if cursor is not None and cursor.epoch != self.epoch:
            raise ValueError(f"cursor is in epoch {cursor.epoch}, the plan is for {self.epoch}")
        if not 0 <= start <= self.batches_per_rank:
            raise ValueError(f"cursor position {start} is outside 0..{self.batches_per_rank}")
        return self.ranks[rank][start:]


def _rng(config: PlanConfig, epoch: int, stream: int) -> np.random.RandomState:
    # RandomState's stream is frozen across numpy versions, unlike Generator's,
    # so clients and servers on different numpy releases agree on every plan.
    words = [config.seed & 0xFFFFFFFF, config.seed >> 32, epoch & 0xFFFFFFFF, epoch >> 32,
             stream]
    return np.random.RandomState(np.array(words, dtype=np.uint32))


def _bucket_batches(order: IntArray, buckets: IntArray, batch_size: int, drop_last: bool
                    ) -> list[PlannedBatch]:
    """Cut ``order`` into single-bucket batches, keeping order within each bucket.

    A bucket's last, short batch is dropped, or filled up by repeating that
    bucket's samples from its start.
    """
    if len(order) == 0:
        return []
    grouped = order[np.argsort(buckets[order], kind="stable")]
    counts = np.bincount(buckets[grouped])
    out: list[PlannedBatch] = []
    start = 0
    for bucket, count in enumerate(counts.tolist()):
        if not count:
            continue
        members = grouped[start:start + count]
        start += count
        full = count // batch_size
        for k in range(full):
            out.append(PlannedBatch(bucket, tuple(members[k * batch_size:(k + 1) * batch_size]
                                                  .tolist()), batch_size))
        rest = count - full * batch_size
        if rest and not drop_last:
            filler = np.resize(members, batch_size - rest)
            out.append(PlannedBatch(bucket, tuple(members[full * batch_size:].tolist())
                                    + tuple(filler.tolist()), rest))
    return out


def _order_batches(batches: list[PlannedBatch], rng: np.random.RandomState | None
                   ) -> list[PlannedBatch]:
    if rng is None:  # sequential: batches in the order of their first sample
        return sorted(batches, key=lambda b: b.samples[0])
    return [batches[i] for i in rng.permutation(len(batches))]


def _repeat(batches: Sequence[PlannedBatch], n: int) -> list[PlannedBatch]:
    """``n`` batches cycling through ``batches``, all marked as repeats."""
    return [PlannedBatch(b.bucket, b.samples, 0)
            for b in (batches[i % len(batches)] for i in range(n))]


def plan_epoch(samples: SampleSet, config: PlanConfig, epoch: int) -> EpochPlan:
    """Plan one epoch: every rank's batches, equal in number across ranks.

    The same arguments always give the same plan; different epochs shuffle
    differently (unless the policy is ``sequential``).
    """
    config.validate()
    if epoch < 0:
        raise ValueError(f"epoch must not be negative, got {epoch}")
    w, bs = config.world_size, config.batch_size
    n = len(samples)
    if config.policy is Policy.HASH:
        return _plan_hash(samples, config, epoch)
    shuffle = config.policy is Policy.EXACT
    rng = _rng(config, epoch, 0) if shuffle else None
    order = rng.permutation(n).astype(np.int64) if rng is not None else np.arange(n)
    batches = _order_batches(_bucket_batches(order, samples.buckets, bs, config.drop_last), rng)
    per_rank = len(batches) // w if config.drop_last else math.ceil(len(batches) / w)
    batches = batches[:per_rank * w] + _repeat(batches, per_rank * w - len(batches))
    return EpochPlan(epoch, config, tuple(tuple(batches[r::w]) for r in range(w)))


def _plan_hash(samples: SampleSet, config: PlanConfig, epoch: int) -> EpochPlan:
    w = config.world_size
    owner = (samples.rank_keys % np.uint64(w)).astype(np.int64)
    order = _rng(config, epoch, 0).permutation(len(samples)).astype(np.int64)
    per_rank: list[list[PlannedBatch]] = []
    for r in range(w):
        mine = order[owner[order] == r]
        per_rank.append(_order_batches(
            _bucket_batches(mine, samples.buckets, config.batch_size, config.drop_last),
            _rng(config, epoch, r + 1)))
    lengths = [len(b) for b in per_rank]
    target = min(lengths) if config.drop_last else max(lengths)
    everything = [b for rank in per_rank for b in rank]
    ranks = tuple(tuple(b[:target] + _repeat(b or everything, target - len(b)))
                  for b in per_rank)
    return EpochPlan(epoch, config, ranks)

