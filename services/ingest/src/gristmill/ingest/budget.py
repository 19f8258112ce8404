"""Prefetch budgets: bytes the streams of a server hold ahead of their consumers.

A stream charges each batch before it starts reading and decoding it (its
encoded bytes plus its largest possible pixels) and gives the charge back
once the batch is sent. It waits while its own charge would pass the stream
limit or the server's total would pass the server limit, except that a
stream holding nothing may always take its next batch: every stream
progresses, and a server holds at most its limit plus one batch per open
stream (open streams are bounded by ``limits.max_streams``).
"""

from __future__ import annotations

import threading

from gristmill.ingest import metrics as ingest_metrics

__all__ = ["PrefetchBudget", "StreamBudget"]


class PrefetchBudget:
    """The prefetch bytes of one server, shared by its streams."""

    def __init__(self, server_bytes: int) -> None:
        self.limit = server_bytes
        self.held = 0
        self._cond = threading.Condition()

    def stream(self, limit: int) -> StreamBudget:
        """A new stream's share, of at most ``limit`` bytes."""
        return StreamBudget(self, limit)


class StreamBudget:
    """One stream's prefetch bytes; :meth:`close` when the stream ends."""

    def __init__(self, server: PrefetchBudget, limit: int) -> None:
        self.server = server
        self.limit = limit
        self.held = 0
        self._closed = False

    def _room(self, n: int) -> bool:
        s = self.server
        return not self.held or (self.held + n <= self.limit and s.held + n <= s.limit)

    def acquire(self, n: int) -> bool:
        """Wait until ``n`` more bytes may be held, then hold them; False once closed."""
        s = self.server
        with s._cond:
            while not self._closed and not self._room(n):
                s._cond.wait()
            if self._closed:
                return False
            self.held += n
            s.held += n
        ingest_metrics.INGEST_PREFETCH_BYTES.inc(n)
        return True

    def release(self, n: int) -> None:
        """Give back ``n`` bytes (a batch was sent)."""
        s = self.server
        with s._cond:
            n = min(n, self.held)
            self.held -= n
            s.held -= n
            s._cond.notify_all()
        ingest_metrics.INGEST_PREFETCH_BYTES.dec(n)

    def close(self) -> None:
        """Give back everything and wake a waiting acquire (it returns False)."""
        s = self.server
        with s._cond:
            self._closed = True
            n, self.held = self.held, 0
            s.held -= n
            s._cond.notify_all()
        ingest_metrics.INGEST_PREFETCH_BYTES.dec(n)
