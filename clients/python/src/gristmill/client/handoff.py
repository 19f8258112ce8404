"""Handing items from a producer thread to a consumer that may stop listening."""

from __future__ import annotations

import queue
import threading
from typing import TypeVar

__all__ = ["put_unless_stopped"]

T = TypeVar("T")


def put_unless_stopped(q: queue.Queue[T], item: T, stop: threading.Event) -> bool:
    """Put ``item`` on the bounded queue ``q``, waiting for room; False if ``stop`` is set first.

    A producer blocked on a full queue would otherwise outlive a consumer that
    went away.
    """
    while not stop.is_set():
        try:
            q.put(item, timeout=0.25)
            return True
        except queue.Full:
            continue
    return False
