"""Plans that start before every sample is known: ``hash`` and ``sequential`` while listing.

:func:`stream_epoch` is the planner of ``Loader.from_folder`` for the hash
and sequential policies: it takes the samples one at a time, in listing
order, and hands out a rank's batches as soon as they are whole, so the
first batch can be decoded while the folder is still being listed. Its
output depends only on its inputs (the samples in order, the config, the
epoch and the rank), so a resumed rank replays it and skips what it had.

It keeps the rules of :func:`~gristmill.client.planner.plan_epoch`: every
batch holds samples of one bucket; each sample is delivered exactly once per
epoch across ranks; every rank gets the same number of batches; a bucket's
short tail is padded by repeating the bucket's first samples (or dropped
with ``drop_last``) and ranks are evened out by repeating whole batches,
marked as repeats. What differs is the order, which is fixed by when a batch
fills up:

* ``sequential``: one accumulator per bucket, in listing order; the k-th
  batch that fills up goes to rank ``k % world_size``; the short tails come
  at the end, in the order of their first sample. With one bucket this is
  exactly ``plan_epoch``'s order.
* ``hash``: the rank of a sample is the same stable hash of its path as in
  ``plan_epoch`` (so a rank gets the same samples); within a rank, samples
  pass through a seeded shuffle window (reshuffled per epoch) before they are
  cut into batches; the window holds 32 samples plus half of those seen so
  far, up to :data:`SHUFFLE_WINDOW`, so the first batch needs few samples.

With ``drop_last`` a batch is handed out only once it is sure not to be cut
when ranks are evened out, i.e. a few batches later (world size > 1).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from gristmill.client.planner import PlanConfig, PlannedBatch, Policy, _repeat, rank_key

__all__ = ["SHUFFLE_WINDOW", "rank_of", "stream_epoch"]

#: Samples of a rank held back and drawn from at random (hash policy).
SHUFFLE_WINDOW = 1024


def rank_of(sample_id: str, world_size: int) -> int:
    """The rank of a sample under the hash policy (as ``SampleSet.rank_keys``)."""
    return rank_key(sample_id) % world_size


def stream_epoch(samples: Iterable[tuple[str, int]], config: PlanConfig, epoch: int,
                 rank: int) -> Iterator[PlannedBatch]:
    """One rank's batches of one epoch, each as soon as it is known.

    Args:
        samples: (sample id, bucket) in listing order; a batch refers to a
            sample by its position in this sequence.
        config: batch size, world size, seed, policy (hash or sequential)
            and ``drop_last``.
        epoch: the epoch (the hash policy shuffles per epoch).
        rank: the rank whose batches to yield.
    """
    config.validate()
    if config.policy is Policy.EXACT:
        raise ValueError("the exact policy shuffles the whole epoch and needs every sample "
                         "first: use plan_epoch")
    if not 0 <= rank < config.world_size:
        raise ValueError(f"rank {rank} is outside world size {config.world_size}")
    if epoch < 0:
        raise ValueError(f"epoch must not be negative, got {epoch}")
    if config.policy is Policy.SEQUENTIAL:
        return _sequential(samples, config, rank)
    return _hash(samples, config, epoch, rank)


def _filled(head: list[int], bucket: int, members: list[int], batch_size: int
            ) -> PlannedBatch:
    """A bucket's short tail filled up by cycling through the bucket's first samples."""
    filler = np.resize(np.asarray(head, dtype=np.int64), batch_size - len(members))
    return PlannedBatch(bucket, tuple(members) + tuple(filler.tolist()), len(members))


def _sequential(samples: Iterable[tuple[str, int]], config: PlanConfig, rank: int
                ) -> Iterator[PlannedBatch]:
    w, bs, drop = config.world_size, config.batch_size, config.drop_last
    open_: dict[int, list[int]] = {}
    heads: dict[int, list[int]] = {}
    first: list[PlannedBatch] = []  # the first w batches, to even out ranks
    held: list[PlannedBatch] = []
    count = 0
    for i, (_, bucket) in enumerate(samples):
        head = heads.setdefault(bucket, [])
        if len(head) < bs:
            head.append(i)
        members = open_.setdefault(bucket, [])
        members.append(i)
        if len(members) < bs:
            continue
        del open_[bucket]
        batch = PlannedBatch(bucket, tuple(members), bs)
        if len(first) < w:
            first.append(batch)
        if count % w == rank:
            held.append(batch)
        if not drop or count % w == w - 1:  # with drop_last, only whole rounds are kept
            yield from held
            held.clear()
        count += 1
    if drop:
        return
    for bucket, members in sorted(open_.items(), key=lambda kv: kv[1][0]):
        batch = _filled(heads[bucket], bucket, members, bs)
        if len(first) < w:
            first.append(batch)
        if count % w == rank:
            yield batch
        count += 1
    total = math.ceil(count / w) * w
    # the padding batches count..total-1 repeat the first batches; this rank takes its share
    yield from _repeat(first, total - count)[(rank - count) % w::w]


def _rng(config: PlanConfig, epoch: int, rank: int) -> random.Random:
    digest = hashlib.blake2b(f"stream:{config.seed}:{epoch}:{rank}".encode(),
                             digest_size=16).digest()
    return random.Random(int.from_bytes(digest, "little"))


def _hash(samples: Iterable[tuple[str, int]], config: PlanConfig, epoch: int, rank: int
          ) -> Iterator[PlannedBatch]:
    w, bs, drop = config.world_size, config.batch_size, config.drop_last
    rng = _rng(config, epoch, rank)
    counts: list[dict[int, int]] = [{} for _ in range(w)]  # per rank, samples per bucket
    full = [0] * w  # per rank, whole batches so far
    at_least: dict[int, int] = {}  # k -> ranks with at least k whole batches
    window: list[tuple[int, int]] = []
    open_: dict[int, list[int]] = {}
    heads: dict[int, list[int]] = {}  # this rank's first samples per bucket
    global_heads: dict[int, list[int]] = {}  # everyone's, for a rank with no batch at all
    mine: list[PlannedBatch] = []  # every batch of this rank, to repeat for evening out
    pending: deque[PlannedBatch] = deque()
    released = 0
    own = 0

    def cut(i: int, bucket: int) -> None:
        head = heads.setdefault(bucket, [])
        if len(head) < bs:
            head.append(i)
        members = open_.setdefault(bucket, [])
        members.append(i)
        if len(members) == bs:
            del open_[bucket]
            batch = PlannedBatch(bucket, tuple(members), bs)
            mine.append(batch)
            pending.append(batch)

    def draw() -> None:
        k = rng.randrange(len(window))
        window[k], window[-1] = window[-1], window[k]
        cut(*window.pop())

    for i, (sid, bucket) in enumerate(samples):
        gh = global_heads.setdefault(bucket, [])
        if len(gh) < bs:
            gh.append(i)
        r = rank_of(sid, w)
        c = counts[r]
        c[bucket] = c.get(bucket, 0) + 1
        if c[bucket] % bs == 0:
            full[r] += 1
            at_least[full[r]] = at_least.get(full[r], 0) + 1
        if r == rank:
            window.append((i, bucket))
            own += 1
            # the window grows with what was seen, so the first batches come early
            if len(window) > min(SHUFFLE_WINDOW, 32 + own // 2):
                draw()
        # without drop_last nothing is ever cut; with it, batch k is safe once every
        # rank has k + 1 whole batches
        while pending and (not drop or at_least.get(released + 1, 0) == w):
            yield pending.popleft()
            released += 1
    while window:
        draw()
    if not drop:
        for bucket, members in sorted(open_.items(), key=lambda kv: kv[1][0]):
            batch = _filled(heads[bucket], bucket, members, bs)
            mine.append(batch)
            pending.append(batch)
    tails = [0 if drop else sum(1 for n in c.values() if n % bs) for c in counts]
    totals = [f + t for f, t in zip(full, tails, strict=True)]
    target = min(totals) if drop else max(totals)
    while pending and released < target:
        yield pending.popleft()
        released += 1
    if released >= target:
        return
    if not mine:  # this rank drew no sample: repeat the first samples of the dataset
        bucket = min(global_heads, key=lambda b: global_heads[b][0])
        mine = [_filled(global_heads[bucket], bucket, [], bs)]
    yield from _repeat(mine, target - released)
