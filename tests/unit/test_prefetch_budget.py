"""Prefetch budgets: per stream, per server, and a stream that holds nothing always moves."""

from __future__ import annotations

import threading
import time

from gristmill.ingest.budget import PrefetchBudget


def _acquire_in_thread(budget: object, n: int) -> tuple[threading.Thread, list[bool]]:
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(budget.acquire(n)))  # type: ignore[attr-defined]
    t.start()
    return t, got


def test_a_stream_waits_at_its_own_limit_and_the_servers() -> None:
    server = PrefetchBudget(100)
    a, b = server.stream(60), server.stream(60)
    assert a.acquire(50) and a.held == 50
    t, got = _acquire_in_thread(a, 20)  # 70 > 60: waits for a release
    time.sleep(0.05)
    assert not got
    a.release(50)
    t.join(2)
    assert got == [True] and a.held == 20
    assert b.acquire(60) and server.held == 80
    t, got = _acquire_in_thread(a, 30)  # the stream may, the server (110 > 100) may not
    time.sleep(0.05)
    assert not got
    b.release(60)
    t.join(2)
    assert got == [True] and server.held == 50


def test_a_stream_holding_nothing_takes_one_batch_whatever_the_others_hold() -> None:
    server = PrefetchBudget(100)
    a, b = server.stream(100), server.stream(100)
    assert a.acquire(100)
    assert b.acquire(250)  # larger than both limits, but b holds nothing: it progresses
    assert server.held == 350
    t, got = _acquire_in_thread(b, 1)
    time.sleep(0.05)
    assert not got
    b.close()  # a waiting acquire returns False, and the stream's bytes go back
    t.join(2)
    assert got == [False] and server.held == 100
    a.close()
    assert server.held == 0
