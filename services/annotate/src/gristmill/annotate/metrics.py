"""The annotate service's metrics (registered when the service is installed, not by the kit)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = ["APPEND_SECONDS", "CONFLICTS", "EVENTS_APPENDED", "REPLAYS", "VERIFY_FAILURES",
           "WATCH_STREAMS"]

EVENTS_APPENDED = Counter("gristmill_annotate_events_appended",
                          "Events appended to annotation logs, by type", ["type"])
APPEND_SECONDS = Histogram(
    "gristmill_annotate_append_seconds",
    "Time to append one batch (checks, state change and durable commit)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0))
CONFLICTS = Counter("gristmill_annotate_conflicts",
                    "Appends refused because the log's head was not the expected one")
REPLAYS = Counter("gristmill_annotate_replays",
                  "Appends whose events were all in the log already (idempotent retries)")
WATCH_STREAMS = Gauge("gristmill_annotate_watch_streams", "Open WatchEvents streams")
#: Integrity checks that found a log at fault, by check: ``chain`` (Verify found an
#: event whose hash, link, signature or position does not check out) or ``state``
#: (RebuildState found the live state differs from what the log replays to). Both
#: series exist from the start at 0, so the first failure is an increase the
#: GristmillAnnotateChainVerificationFailed alert sees. No dataset label: the log
#: names the dataset, and the number of datasets is not bounded.
VERIFY_FAILURES = Counter("gristmill_annotate_verify_failures",
                          "Integrity checks of an annotation log that found it at fault, by check",
                          ["check"])
for _check in ("chain", "state"):
    VERIFY_FAILURES.labels(_check)
