"""Delivery log: what reached each rank's training loop, and the exactly-once audit.

Each rank appends to ``LOGDIR/rank-NNNNN.gmlog``: length-prefixed,
zlib-compressed JSON records — one header per Loader, one per epoch started,
one per batch handed to the training loop (epoch, position, sample ids, how
many of them are first deliveries). A record is flushed as it is written, so a
killed process loses at most the record being written, which the reader
skips.

:func:`audit` reads every rank's log and checks, per epoch, that each sample
was delivered exactly once across ranks and that no rank skipped a batch.
"""

from __future__ import annotations

import json
import struct
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["AuditReport", "DeliveryLog", "EpochAudit", "audit", "read_log"]

_LEN = struct.Struct("<I")
SUFFIX = ".gmlog"


class DeliveryLog:
    """Appends one rank's deliveries to ``directory/rank-NNNNN.gmlog``."""

    def __init__(self, directory: Path | str, rank: int, header: dict[str, Any]) -> None:
        self.path = Path(directory) / f"rank-{rank:05d}{SUFFIX}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = open(self.path, "ab")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._write({"kind": "header", "rank": rank, **header})

    def _write(self, record: dict[str, Any]) -> None:
        blob = zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 6)
        with self._lock:
            self._file.write(_LEN.pack(len(blob)) + blob)
            self._file.flush()

    def epoch(self, epoch: int, batches_per_rank: int, samples_per_epoch: int) -> None:
        """Record the start (or resumption) of an epoch and its expected totals."""
        self._write({"kind": "epoch", "epoch": epoch, "batches_per_rank": batches_per_rank,
                     "samples_per_epoch": samples_per_epoch})

    def batch(self, epoch: int, position: int, ids: Sequence[str], fresh: int,
              failed: Sequence[str]) -> None:
        """Record a batch handed to the training loop.

        ``ids`` are all planned samples of the batch, the first ``fresh`` of
        them delivered for the first time this epoch; ``failed`` are those that
        could not be decoded (delivered as errors).
        """
        self._write({"kind": "batch", "epoch": epoch, "position": position, "ids": list(ids),
                     "fresh": fresh, "failed": list(failed)})

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_log(path: Path) -> Iterator[dict[str, Any]]:
    """Records of one log file; a torn last record (process killed mid-write) is skipped."""
    data = path.read_bytes()
    pos = 0
    while pos + _LEN.size <= len(data):
        (n,) = _LEN.unpack_from(data, pos)
        blob = data[pos + _LEN.size:pos + _LEN.size + n]
        if len(blob) < n:
            return
        pos += _LEN.size + n
        try:
            yield json.loads(zlib.decompress(blob))
        except (zlib.error, ValueError):
            return


@dataclass
class EpochAudit:
    """The verdict on one epoch."""

    epoch: int
    world_size: int
    batches_per_rank: int
    expected_samples: int
    delivered_samples: int = 0
    failed_samples: int = 0
    #: True when every rank delivered its last batch.
    complete: bool = False
    #: Sample ids delivered (as first deliveries) more than once, with counts.
    duplicates: dict[str, int] = field(default_factory=dict)
    #: (rank, position) of batches never delivered although later ones were,
    #: or although the epoch is otherwise complete.
    gaps: list[tuple[int, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No duplicates, no gaps, and a complete epoch delivered every planned sample."""
        counted = not self.complete or self.delivered_samples == self.expected_samples
        return not self.duplicates and not self.gaps and counted


@dataclass
class AuditReport:
    """The verdict on every epoch found in a log directory."""

    plan_ids: list[str]
    epochs: list[EpochAudit]

    @property
    def ok(self) -> bool:
        """Every epoch passed, and all ranks followed one plan."""
        return len(self.plan_ids) == 1 and all(e.ok for e in self.epochs)

    def lines(self, max_listed: int = 20) -> list[str]:
        """A human-readable report."""
        out = []
        if len(self.plan_ids) != 1:
            out.append(f"FAIL: the logs follow {len(self.plan_ids)} different plans "
                       f"({', '.join(self.plan_ids) or 'none'}); audit one run per directory")
        for e in self.epochs:
            state = "complete" if e.complete else "in progress"
            verdict = "ok" if e.ok else "FAIL"
            out.append(f"epoch {e.epoch}: {verdict} ({state}) — {e.delivered_samples} of "
                       f"{e.expected_samples} samples delivered exactly once over "
                       f"{e.world_size} ranks x {e.batches_per_rank} batches"
                       + (f", {e.failed_samples} failed to decode" if e.failed_samples else ""))
            for sid, n in list(e.duplicates.items())[:max_listed]:
                out.append(f"  duplicate: {sid} delivered {n} times")
            for rank, pos in e.gaps[:max_listed]:
                out.append(f"  gap: rank {rank} never delivered batch {pos}")
            hidden = len(e.duplicates) + len(e.gaps) - min(len(e.duplicates), max_listed) \
                - min(len(e.gaps), max_listed)
            if hidden > 0:
                out.append(f"  ... and {hidden} more")
            if e.complete and e.delivered_samples != e.expected_samples and not e.duplicates:
                out.append(f"  missing: {e.expected_samples - e.delivered_samples} planned "
                           "samples never delivered")
        return out


def audit(directory: Path | str) -> AuditReport:
    """Check the delivery logs of every rank in ``directory``."""
    files = sorted(Path(directory).glob(f"*{SUFFIX}"))
    if not files:
        raise FileNotFoundError(f"no delivery logs (*{SUFFIX}) in {directory}; pass the "
                                "directory given to Loader(delivery_log=...)")
    plan_ids: set[str] = set()
    world_size = 0
    expected: dict[int, tuple[int, int]] = {}
    seen: dict[int, dict[int, set[int]]] = {}  # epoch -> rank -> positions
    fresh: dict[int, Counter[str]] = {}
    failed: dict[int, set[str]] = {}
    for path in files:
        rank = -1
        for rec in read_log(path):
            kind = rec.get("kind")
            if kind == "header":
                plan_ids.add(rec["plan_id"])
                rank, world_size = rec["rank"], rec["world_size"]
            elif kind == "epoch":
                expected[rec["epoch"]] = (rec["batches_per_rank"], rec["samples_per_epoch"])
            elif kind == "batch":
                e = rec["epoch"]
                seen.setdefault(e, {}).setdefault(rank, set()).add(rec["position"])
                fresh.setdefault(e, Counter()).update(rec["ids"][:rec["fresh"]])
                failed.setdefault(e, set()).update(rec["failed"])
    epochs = []
    for e in sorted(set(expected) | set(seen)):
        batches, samples = expected.get(e, (0, 0))
        result = EpochAudit(e, world_size, batches, samples)
        counts = fresh.get(e, Counter())
        result.delivered_samples = len(counts)
        result.failed_samples = len(failed.get(e, set()))
        result.duplicates = {s: n for s, n in sorted(counts.items()) if n > 1}
        by_rank = seen.get(e, {})
        result.complete = all(batches - 1 in by_rank.get(r, set()) for r in range(world_size)
                              ) if batches else True
        for r in range(world_size):
            got = by_rank.get(r, set())
            upto = batches if result.complete else (max(got) + 1 if got else 0)
            result.gaps.extend((r, p) for p in range(upto) if p not in got)
        epochs.append(result)
    return AuditReport(sorted(plan_ids), epochs)
