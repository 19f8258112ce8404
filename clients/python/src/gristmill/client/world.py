"""Where this process sits among the training ranks, as torchrun describes it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["World"]


@dataclass(frozen=True)
class World:
    """Rank and world size (and the same within the node).

    Attributes:
        rank: this process's global rank, 0 to ``world_size - 1``.
        world_size: number of ranks.
        local_rank: rank within the node.
        local_world_size: ranks on this node.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be 0 to {self.world_size - 1}, got {self.rank}")

    @classmethod
    def from_env(cls, rank: int | None = None, world_size: int | None = None,
                 environ: Mapping[str, str] | None = None) -> World:
        """Explicit values first, then ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``.

        With neither, this is the only rank.
        """
        env = os.environ if environ is None else environ

        def read(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer") \
                    from None

        ws = world_size if world_size is not None else read("WORLD_SIZE", 1)
        r = rank if rank is not None else read("RANK", 0)
        return cls(rank=r, world_size=ws, local_rank=read("LOCAL_RANK", r),
                   local_world_size=read("LOCAL_WORLD_SIZE", ws))
