"""Aspect-ratio buckets: the datago scheme, exactly.

With S the image size, d the downsampling ratio, p = floor(S/d) and P = p²:

1. for pw from ceil(sqrt(P·a_min)) to floor(sqrt(P·a_max)): bucket (pw·d, floor(P/pw)·d);
2. for ph from ceil(sqrt(P/a_max)) to floor(sqrt(P/a_min)): bucket (floor(P/ph)·d, ph·d);
3. key each bucket by w/h rounded to 3 decimals (a later duplicate replaces an
   earlier one) and sort by that ratio;
4. an image of ratio W/H goes to the bucket with the nearest ratio (ties to the
   larger; beyond the ends, the end bucket).

Pure functions, shared by the decode service and the client's planner (which
groups samples by bucket from the manifest's sizes, without decoding).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["Bucket", "BucketConfig", "BucketTable", "bucket_table"]

#: Limits that keep a table small and its images allocatable.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 8192


@dataclass(frozen=True)
class BucketConfig:
    """Parameters of a bucket table.

    Attributes:
        image_size: S, the side of the square bucket in pixels.
        downsampling: d; both sides of every bucket are multiples of it.
        min_aspect: smallest width/height ratio.
        max_aspect: largest width/height ratio.
    """

    image_size: int = 1024
    downsampling: int = 32
    min_aspect: float = 0.5
    max_aspect: float = 2.0

    def validate(self) -> None:
        """Raise ValueError naming the bad field and its allowed range."""
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be between {MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}, "
                             f"got {self.image_size}")
        if not 1 <= self.downsampling <= self.image_size:
            raise ValueError(f"downsampling must be between 1 and image_size "
                             f"({self.image_size}), got {self.downsampling}")
        if not (math.isfinite(self.min_aspect) and math.isfinite(self.max_aspect)
                and 0 < self.min_aspect <= 1 <= self.max_aspect <= 100):
            raise ValueError(f"aspect ratios must satisfy 0 < min_aspect <= 1 <= max_aspect "
                             f"<= 100, got {self.min_aspect} and {self.max_aspect}")


@dataclass(frozen=True)
class Bucket:
    """One output size of a table."""

    index: int
    width: int
    height: int
    #: width/height rounded to 3 decimals.
    aspect: float


class BucketTable:
    """The sorted buckets of one configuration, with nearest-ratio lookup."""

    def __init__(self, config: BucketConfig) -> None:
        config.validate()
        self.config = config
        d = config.downsampling
        p = config.image_size // d
        area = p * p
        by_ratio: dict[float, tuple[int, int]] = {}
        sizes: list[tuple[int, int]] = []
        for pw in range(math.ceil(math.sqrt(area * config.min_aspect)),
                        math.floor(math.sqrt(area * config.max_aspect)) + 1):
            sizes.append((pw * d, (area // pw) * d))
        for ph in range(math.ceil(math.sqrt(area / config.max_aspect)),
                        math.floor(math.sqrt(area / config.min_aspect)) + 1):
            sizes.append(((area // ph) * d, ph * d))
        for w, h in sizes:
            if w > 0 and h > 0:
                by_ratio[round(w / h, 3)] = (w, h)  # a later duplicate replaces an earlier one
        ratios = sorted(by_ratio)
        self.buckets: tuple[Bucket, ...] = tuple(
            Bucket(i, *by_ratio[r], aspect=r) for i, r in enumerate(ratios))
        self._ratios = ratios

    def __len__(self) -> int:
        return len(self.buckets)

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.buckets)

    def nearest(self, width: int, height: int) -> Bucket:
        """The bucket whose ratio is nearest to width/height (ties to the larger ratio)."""
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        ratio = width / height
        i = bisect.bisect_left(self._ratios, ratio)
        if i == 0:
            return self.buckets[0]
        if i == len(self._ratios):
            return self.buckets[-1]
        below, above = self._ratios[i - 1], self._ratios[i]
        return self.buckets[i] if above - ratio <= ratio - below else self.buckets[i - 1]


@lru_cache(maxsize=64)
def bucket_table(config: BucketConfig) -> BucketTable:
    """The (cached) table of a configuration."""
    return BucketTable(config)
