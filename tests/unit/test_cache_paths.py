"""``gristmill.client.cache.child_paths`` names files exactly as ``joinpath`` does."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from gristmill.client.cache import child_paths


@pytest.mark.parametrize("base", [Path("/cache/store/datasets/d"), Path("relative/base"),
                                  Path("/"), Path(".")])
def test_child_paths_equal_joinpath(base: Path) -> None:
    relatives = ["top.bin", "a/b.jpg", "a/b/c/d.png", "ü/名前.webp", "x" * 200]
    made = child_paths(base, relatives)
    plain = [base.joinpath(r) for r in relatives]
    assert made == plain
    for m, p in zip(made, plain, strict=True):
        assert type(m) is type(p)
        assert (str(m), m.parts, m.name, m.parent, hash(m)) == (str(p), p.parts, p.name,
                                                              p.parent, hash(p))
        assert PurePosixPath(m) == PurePosixPath(p)
    assert child_paths(base, []) == []
