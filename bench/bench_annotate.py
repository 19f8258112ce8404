"""Annotation log throughput against a raw SQLite insert loop measured in the same run.

Appends per second (batched and single, with and without Ed25519 signatures)
through a real annotate server on port 0 (this process, a real socket),
Verify throughput, the time to rebuild the state from BENCH_ANNOTATE_EVENTS
events (default 100,000), annotations fetched per second for the training
stream (GetAnnotations, 5,000 samples per call), and the baseline: the same
event rows inserted into a WAL SQLite file with synchronous=FULL, 1,000 per
transaction, without checks, hashing or gRPC. Then the training stream itself:
batches/s of a Loader on the all-in-one server with ``annotations=`` a
release (two labels per sample) against the same Loader without, epochs
alternating in one run (BENCH_STREAM_IMAGES photo-like images, default 96,
S=256, batches of 8). Aims (issue 15): >= 5,000 batched appends/s, rebuild of
100k events under 10 s, the stream with annotations within 5% of the stream
without (ratio >= 0.95).
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gristmill.client.annolog import canonical_json  # noqa: E402
from gristmill.client.annotations import Annotations  # noqa: E402
from gristmill.client.hub import Hub  # noqa: E402
from gristmill.client.loader import Loader  # noqa: E402
from scripts.sample_data import make_sample_folder  # noqa: E402
from tests.helpers import start_in_process  # noqa: E402

EVENTS = int(os.environ.get("BENCH_ANNOTATE_EVENTS", "100000"))
BATCH = 1000
DS = "bench"
STREAM_IMAGES = int(os.environ.get("BENCH_STREAM_IMAGES", "96"))
STREAM_EPOCHS = int(os.environ.get("BENCH_REPEATS", "9"))


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


def stream_rates(tmp: Path) -> tuple[float, float, float]:
    """Batches/s of one epoch without and with annotations, and their ratio.

    Epochs alternate (each pair in turn order), and the ratio is the median
    of the pairs' ratios, so a neighbour's load on a shared machine, which
    drifts slowly, weighs on both sides of each pair alike.
    """
    running = start_in_process(tmp / "stream")
    try:
        make_sample_folder(tmp / "images", count=STREAM_IMAGES, max_side=768)
        with Hub(running.address, running.admin_key, None, show_progress=False) as hub:
            hub.import_folder("stream", tmp / "images")
            hub.commit_version("stream")
            paths = [e.path for e in hub.list_manifest("stream")]
        with Annotations(running.address, running.admin_key) as ann:
            ann.init("stream")
            ann.add_schema("stream", "label", {"type": "object", "required": ["label"]})
            created = ann.append("stream", [
                ("annotation.create", {"schema": "label", "samples": [{"path": path}],
                                       "data": {"label": f"class-{i % 10}", "box": [0, 0, k, k]}})
                for i, path in enumerate(paths) for k in (1, 2)]).events
            ann.append("stream", [("review.accept", {"proposal": e.id}) for e in created])
            ann.create_release("stream", "r1")
        options: dict[str, Any] = {"batch_size": 8, "image_size": 256,
                                   "downsampling_ratio": 16, "seed": 1}
        times: dict[str, list[float]] = {"plain": [], "labels": []}
        with Loader(running.address, "stream", api_key=running.admin_key,
                    **options) as plain, \
                Loader(running.address, "stream", api_key=running.admin_key,
                       annotations="r1", **options) as labelled:
            for epoch in range(STREAM_EPOCHS + 1):  # the first is a warm-up
                pair = [("plain", plain), ("labels", labelled)]
                for name, loader in pair if epoch % 2 else pair[::-1]:  # neither always first
                    loader.set_epoch(epoch)
                    start = time.perf_counter()
                    batches = sum(1 for b in loader
                                  if name == "plain" or all(len(a) == 2 for a in b.annotations))
                    if epoch:
                        times[name].append(batches / (time.perf_counter() - start))
            assert batches == len(labelled), "a batch without its two labels per sample"
    finally:
        assert running.server is not None
        running.server.stop(0)
    ratios = [b / a for a, b in zip(times["plain"], times["labels"], strict=True)]
    return (statistics.median(times["plain"]), statistics.median(times["labels"]),
            statistics.median(ratios))


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
        plain, labelled, ratio = stream_rates(Path(tmp))
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
    print(f"{'stream with annotations':34} {labelled:>10,.1f} batches/s   {ratio:.3f}x the "
          f"stream without ({plain:,.1f}/s; {STREAM_IMAGES} images, medians of "
          f"{STREAM_EPOCHS} epoch pairs)")
    ok = (batched >= 5000 and (rebuilt.seconds < 10 or rebuilt.events_replayed < 100_000)
          and ratio >= 0.95)
    print("aims met" if ok else "aims NOT met: >= 5,000 batched appends/s, rebuild of 100k "
          "events < 10 s, stream with annotations >= 0.95x without")
    return 0


if __name__ == "__main__":
    sys.exit(main())
