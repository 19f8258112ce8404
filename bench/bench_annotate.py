"""Annotation log throughput against a raw SQLite insert loop measured in the same run.

Appends per second (batched and single, with and without Ed25519 signatures)
through a real annotate server on port 0 (this process, a real socket),
Verify throughput, the time to rebuild the state from BENCH_ANNOTATE_EVENTS
events (default 100,000), annotations fetched per second for the training
stream (GetAnnotations, 5,000 samples per call), and the baseline: the same
event rows inserted into a WAL SQLite file with synchronous=FULL, 1,000 per
transaction, without checks, hashing or gRPC. Aims (issue 15): >= 5,000
batched appends/s, rebuild of 100k events under 10 s.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gristmill.client.annolog import canonical_json  # noqa: E402
from gristmill.client.annotations import Annotations  # noqa: E402
from tests.helpers import start_in_process  # noqa: E402

EVENTS = int(os.environ.get("BENCH_ANNOTATE_EVENTS", "100000"))
BATCH = 1000
DS = "bench"


def proposal(i: int) -> tuple[str, dict[str, object]]:
    return ("annotation.create", {"schema": "label", "samples": [{"path": f"img/{i:07d}.jpg"}],
                                  "data": {"label": f"class-{i % 100}", "score": i % 7}})


def raw_sqlite(path: Path, n: int) -> float:
    """Seconds to insert n event-shaped rows, BATCH per transaction, WAL + synchronous=FULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE events (dataset TEXT, seq INTEGER, id TEXT, type TEXT, "
                 "author TEXT, time_us INTEGER, payload TEXT, prev_hash TEXT, hash TEXT, "
                 "public_key TEXT, signature TEXT, PRIMARY KEY (dataset, seq)) WITHOUT ROWID")
    start = time.perf_counter()
    for b in range(0, n, BATCH):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?,?,?)", [
            (DS, i + 1, str(uuid.uuid4()), "annotation.create", "key:x", 0,
             canonical_json(proposal(i)[1]), "0" * 64, "0" * 64, "", "")
            for i in range(b, min(n, b + BATCH))])
        conn.execute("COMMIT")
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        running = start_in_process(Path(tmp) / "data", services=["annotate"])
        try:
            with Annotations(running.address, running.admin_key) as ann:
                ann.init(DS)
                ann.add_schema(DS, "label", {"type": "object", "required": ["label"]})
                start = time.perf_counter()
                for b in range(0, EVENTS, BATCH):
                    ann.append(DS, [proposal(i) for i in range(b, min(EVENTS, b + BATCH))])
                batched = EVENTS / (time.perf_counter() - start)
                singles = 500
                start = time.perf_counter()
                for i in range(singles):
                    ann.append(DS, [proposal(EVENTS + i)])
                single = singles / (time.perf_counter() - start)
            with Annotations(running.address, running.admin_key,
                             signing_key=bytes(32)) as signer:
                n_signed = 5000
                start = time.perf_counter()
                for b in range(0, n_signed, 500):
                    signer.append(DS, [proposal(10**6 + i) for i in range(b, b + 500)])
                signed = n_signed / (time.perf_counter() - start)
                start = time.perf_counter()
                for i in range(200):
                    signer.append(DS, [proposal(2 * 10**6 + i)])
                signed_single = 200 / (time.perf_counter() - start)
            with Annotations(running.address, running.admin_key) as ann:
                # accept every other proposal of the first part, for the label lookups
                ids = [p.id for _, p in zip(range(20000), ann.proposals(DS), strict=False)]
                for b in range(0, len(ids), 2 * BATCH):
                    ann.append(DS, [("review.accept", {"proposal": pid})
                                    for pid in ids[b:b + 2 * BATCH:2]])
                total = ann.head(DS).seq
                start = time.perf_counter()
                report = ann.verify(DS)
                verify_rate = report.events_checked / (time.perf_counter() - start)
                assert report.ok
                rebuilt = ann.rebuild(DS)
                assert rebuilt.equal, rebuilt.differences
                paths = [f"img/{i:07d}.jpg" for i in range(20000)]
                start = time.perf_counter()
                found = sum(len(a) for a in ann.annotations(DS, paths))
                lookup = len(paths) / (time.perf_counter() - start)
                assert found == 10000, found
        finally:
            assert running.server is not None
            running.server.stop(0)
        baseline = EVENTS / raw_sqlite(Path(tmp) / "raw.sqlite", EVENTS)
    print(f"log of {total} events ({EVENTS} batched proposals, {BATCH} per call)")
    print(f"{'appends, batched':34} {batched:>10,.0f} events/s   "
          f"{batched / baseline:.2f}x raw SQLite ({baseline:,.0f}/s)")
    print(f"{'appends, single':34} {single:>10,.0f} events/s   {single / batched:.3f}x batched")
    print(f"{'appends, signed, batched (500)':34} {signed:>10,.0f} events/s   "
          f"{signed / batched:.2f}x unsigned")
    print(f"{'appends, signed, single':34} {signed_single:>10,.0f} events/s")
    print(f"{'Verify':34} {verify_rate:>10,.0f} events/s   "
          f"({report.signatures_checked} signatures)")
    print(f"{'rebuild':34} {rebuilt.seconds:>10.2f} s for {rebuilt.events_replayed} events "
          f"({rebuilt.events_replayed / rebuilt.seconds:,.0f}/s)")
    print(f"{'GetAnnotations (5,000 per call)':34} {lookup:>10,.0f} samples/s")
    ok = batched >= 5000 and (rebuilt.seconds < 10 or rebuilt.events_replayed < 100_000)
    print("aims met" if ok else "aims NOT met: >= 5,000 batched appends/s, rebuild of 100k "
          "events < 10 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
