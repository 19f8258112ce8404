"""The streaming planner (hash and sequential while a folder is listed) against plan_epoch."""

from __future__ import annotations

import collections
import collections.abc

from hypothesis import given, settings
from hypothesis import strategies as st

from gristmill.client.planner import PlanConfig, PlannedBatch, Policy, plan_epoch
from gristmill.client.streamplan import rank_of, stream_epoch
from tests.unit.test_planner import make_samples

plans = st.fixed_dictionaries({
    "n": st.integers(0, 300),
    "n_buckets": st.integers(1, 6),
    "world_size": st.integers(1, 7),
    "batch_size": st.integers(1, 9),
    "seed": st.integers(0, 2**64 - 1),
    "epoch": st.integers(0, 50),
    "policy": st.sampled_from([Policy.HASH, Policy.SEQUENTIAL]),
    "drop_last": st.booleans(),
})


def streamed(p: dict[str, object]) -> tuple[object, PlanConfig, list[list[PlannedBatch]]]:
    samples = make_samples(int(p["n"]), int(p["n_buckets"]))  # type: ignore[call-overload]
    config = PlanConfig(batch_size=p["batch_size"], world_size=p["world_size"],  # type: ignore[arg-type]
                        seed=p["seed"], policy=p["policy"], drop_last=p["drop_last"])  # type: ignore[arg-type]
    pairs = list(zip(samples.ids, samples.buckets.tolist(), strict=True))
    ranks = [list(stream_epoch(iter(pairs), config, p["epoch"], r))  # type: ignore[arg-type]
             for r in range(config.world_size)]
    return samples, config, ranks


@settings(max_examples=300, deadline=None)
@given(plans)
def test_same_samples_exactly_once_and_same_counts_as_the_full_plan(p: dict[str, object]
                                                                    ) -> None:
    samples, config, ranks = streamed(p)
    whole = plan_epoch(samples, config, p["epoch"])  # type: ignore[arg-type]
    buckets = samples.buckets  # type: ignore[attr-defined]
    assert [len(r) for r in ranks] == [len(r) for r in whole.ranks]
    fresh: collections.Counter[int] = collections.Counter()
    for r, (mine, theirs) in enumerate(zip(ranks, whole.ranks, strict=True)):
        for b in mine:
            assert len(b) == config.batch_size and 0 <= b.fresh <= len(b)
            assert {int(buckets[i]) for i in b.samples} == {b.bucket}
            fresh.update(b.samples[:b.fresh])
        if config.policy is Policy.HASH:  # a sample stays on the rank the hash gives it
            assert all(rank_of(samples.ids[i], config.world_size) == r  # type: ignore[attr-defined]
                       for b in mine if b.fresh for i in b.samples), r
            if not config.drop_last:  # the same samples (with drop_last: other tails cut)
                assert {i for b in mine for i in b.samples[:b.fresh]} == \
                    {i for b in theirs for i in b.samples[:b.fresh]}, r
    assert all(c == 1 for c in fresh.values())
    assert len(fresh) == whole.fresh_samples


@settings(max_examples=100, deadline=None)
@given(plans)
def test_deterministic(p: dict[str, object]) -> None:
    assert streamed(p)[2] == streamed(p)[2]


def test_sequential_with_one_bucket_is_the_full_plan() -> None:
    samples = make_samples(203, 1)
    for drop_last in (False, True):
        config = PlanConfig(batch_size=10, world_size=3, policy=Policy.SEQUENTIAL,
                            drop_last=drop_last)
        whole = plan_epoch(samples, config, 0)
        pairs = list(zip(samples.ids, samples.buckets.tolist(), strict=True))
        for r in range(3):
            assert tuple(stream_epoch(iter(pairs), config, 0, r)) == whole.ranks[r]


def test_hash_epochs_shuffle_differently() -> None:
    samples = make_samples(3000, 2)
    pairs = list(zip(samples.ids, samples.buckets.tolist(), strict=True))
    config = PlanConfig(batch_size=8, world_size=2, policy=Policy.HASH)
    e0, e1 = (list(stream_epoch(iter(pairs), config, e, 0)) for e in (0, 1))
    assert e0 != e1
    assert sorted(i for b in e0 for i in b.samples[:b.fresh]) == \
        sorted(i for b in e1 for i in b.samples[:b.fresh])


def test_first_batch_before_the_listing_ends() -> None:
    taken = 0

    def listing() -> collections.abc.Iterator[tuple[str, int]]:
        nonlocal taken
        for i in range(100_000):
            taken += 1
            yield f"img/{i:06d}.jpg", i % 3

    for policy in (Policy.SEQUENTIAL, Policy.HASH):
        taken = 0
        first = next(stream_epoch(listing(), PlanConfig(batch_size=4, policy=policy), 0, 0))
        assert len(first) == 4 and taken < 5000
