"""Rank information from the environment; the delivery log and its audit."""

from __future__ import annotations

from pathlib import Path

import pytest

from gristmill.client.delivery import DeliveryLog, audit, read_log
from gristmill.client.world import World


def test_world_reads_torchrun_variables_and_explicit_values_win() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert World.from_env(environ=env) == World(3, 8, 1, 4)
    assert World.from_env(rank=0, world_size=2, environ=env).rank == 0
    assert World.from_env(environ={}) == World(0, 1, 0, 1)
    with pytest.raises(ValueError, match="RANK"):
        World.from_env(environ={"RANK": "x"})
    with pytest.raises(ValueError, match="rank must be"):
        World.from_env(environ={"RANK": "4", "WORLD_SIZE": "4"})


def write(directory: Path, rank: int, batches: list[tuple[int, int, list[str], int]],
          world_size: int = 2, plan: str = "p1", per_rank: int = 2, samples: int = 4) -> Path:
    log = DeliveryLog(directory, rank, {"plan_id": plan, "world_size": world_size})
    log.epoch(0, per_rank, samples)
    for epoch, position, ids, fresh in batches:
        log.batch(epoch, position, ids, fresh, [])
    log.close()
    return log.path


def test_audit_passes_an_exact_epoch(tmp_path: Path) -> None:
    write(tmp_path, 0, [(0, 0, ["a", "b"], 2), (0, 1, ["c", "a"], 1)])
    write(tmp_path, 1, [(0, 0, ["d", "b"], 1), (0, 1, ["d", "c"], 0)])
    report = audit(tmp_path)
    assert report.ok, report.lines()
    assert report.epochs[0].delivered_samples == 4 and report.epochs[0].complete


def test_audit_lists_duplicates_gaps_and_missing(tmp_path: Path) -> None:
    write(tmp_path, 0, [(0, 0, ["a", "b"], 2), (0, 1, ["a", "c"], 2)])  # a twice as fresh
    write(tmp_path, 1, [(0, 1, ["d", "b"], 1)])                          # skipped batch 0
    report = audit(tmp_path)
    epoch = report.epochs[0]
    assert not report.ok
    assert epoch.duplicates == {"a": 2} and epoch.gaps == [(1, 0)]
    text = "\n".join(report.lines())
    assert "duplicate: a delivered 2 times" in text and "rank 1 never delivered batch 0" in text


def test_audit_refuses_mixed_plans_and_empty_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no delivery logs"):
        audit(tmp_path)
    write(tmp_path, 0, [(0, 0, ["a", "b"], 2)], plan="p1")
    write(tmp_path, 1, [(0, 0, ["c", "d"], 2)], plan="p2")
    assert not audit(tmp_path).ok


def test_a_torn_last_record_is_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, 0, [(0, 0, ["a"], 1), (0, 1, ["b"], 1)], world_size=1)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the process died mid-write
    records = list(read_log(path))
    assert [r["kind"] for r in records] == ["header", "epoch", "batch"]
