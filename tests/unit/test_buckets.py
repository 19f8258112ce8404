"""Bucket tables against the datago algorithm, re-derived here by brute force."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gristmill.client.buckets import BucketConfig, BucketTable, bucket_table


def brute_force(size: int, d: int, a_min: float, a_max: float) -> list[tuple[int, int]]:
    """Every (pw, ph) pair the two loops of the scheme produce, written as a search."""
    p = size // d
    area = p * p
    found: dict[float, tuple[int, int]] = {}
    candidates = []
    for pw in range(1, 10 * p):
        if a_min <= pw * pw / area <= a_max:  # pw in [sqrt(P a_min), sqrt(P a_max)]
            candidates.append((pw * d, (area // pw) * d))
    for ph in range(1, 10 * p):
        if 1 / a_max <= ph * ph / area <= 1 / a_min:
            candidates.append(((area // ph) * d, ph * d))
    for w, h in candidates:
        found[round(w / h, 3)] = (w, h)
    return [found[k] for k in sorted(found)]


def test_known_tables() -> None:
    t = bucket_table(BucketConfig(1024, 32, 0.5, 2.0))
    assert len(t) == 27
    assert (t.buckets[0].width, t.buckets[0].height) == (704, 1440)
    assert (t.buckets[-1].width, t.buckets[-1].height) == (1440, 704)
    t = bucket_table(BucketConfig(224, 16, 0.5, 2.0))
    assert len(t) == 11
    assert (t.buckets[0].width, t.buckets[0].height) == (160, 304)
    assert (t.buckets[-1].width, t.buckets[-1].height) == (304, 160)
    assert (1024, 1024) in [(b.width, b.height) for b in bucket_table(BucketConfig(1024, 32))]


@pytest.mark.parametrize("config", [
    BucketConfig(1024, 32, 0.5, 2.0), BucketConfig(224, 16, 0.5, 2.0),
    BucketConfig(512, 16, 0.5, 2.0), BucketConfig(768, 64, 0.25, 4.0),
    BucketConfig(256, 8, 0.75, 1.5), BucketConfig(640, 32, 1.0, 1.0),
])
def test_tables_match_the_algorithm(config: BucketConfig) -> None:
    table = BucketTable(config)
    expected = brute_force(config.image_size, config.downsampling, config.min_aspect,
                           config.max_aspect)
    assert [(b.width, b.height) for b in table] == expected
    assert [b.index for b in table] == list(range(len(table)))
    assert [b.aspect for b in table] == sorted(b.aspect for b in table)
    for b in table:
        assert b.width % config.downsampling == 0 and b.height % config.downsampling == 0


@given(st.integers(1, 20000), st.integers(1, 20000))
def test_nearest_is_nearest_ties_to_larger(w: int, h: int) -> None:
    table = bucket_table(BucketConfig(512, 16))
    got = table.nearest(w, h)
    ratio = w / h
    best = min(abs(b.aspect - ratio) for b in table)
    assert abs(got.aspect - ratio) == best
    ties = [b for b in table if abs(b.aspect - ratio) == best]
    assert got == max(ties, key=lambda b: b.aspect)


def test_beyond_the_ends() -> None:
    table = bucket_table(BucketConfig(512, 16))
    assert table.nearest(10000, 1) == table.buckets[-1]
    assert table.nearest(1, 10000) == table.buckets[0]


@pytest.mark.parametrize("bad, field", [
    (BucketConfig(8, 4), "image_size"), (BucketConfig(512, 0), "downsampling"),
    (BucketConfig(512, 16, 1.5, 2.0), "aspect"), (BucketConfig(512, 16, 0.5, 0.9), "aspect"),
    (BucketConfig(512, 16, float("nan"), 2.0), "aspect"),
])
def test_bad_configs_are_refused(bad: BucketConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        BucketTable(bad)
