"""The client's timer heap: cancelled timers do not pile up in it.

Found by a soak run (benchmarks/soak.py): every connection a pool opens arms
a timer for its lease request's deadline (opening.RetimeIfServed), due
acquire_timeout later; it used to stay in the heap until then, long after the
request was answered, so the heap held acquire_timeout x connects per second
of them."""

from __future__ import annotations

import threading
from typing import Any

from sharedpool import ConnectionPool, PoolConfig, timers
from sharedpool.testing import FakeFactory


def test_the_heap_is_swept_of_cancelled_timers() -> None:
    heap: list[timers.Entry] = []
    limit = timers.SWEEP_MIN
    for seq in range(10_000):
        timer = timers.Timer(lambda: None)
        limit = timers.push(heap, (1e9 + seq, seq, timer), limit)
        timer.cancel()
    assert len(heap) <= 2 * timers.SWEEP_MIN + 1


def test_live_timers_are_kept_by_the_sweep_and_a_cancelled_one_does_not_run() -> None:
    heap: list[timers.Entry] = []
    limit, ran = timers.SWEEP_MIN, []
    kept = []
    for seq in range(1_000):
        timer = timers.Timer(lambda seq=seq: ran.append(seq))
        limit = timers.push(heap, (float(seq), seq, timer), limit)
        if seq % 10:
            timer.cancel()
        else:
            kept.append(timer)
    assert all(any(e[2] is t for e in heap) for t in kept)  # every live one is still there
    for _, _, timer in heap:
        timer()
    assert sorted(ran) == list(range(0, 1_000, 10))


def test_connections_opened_leave_no_timer_behind_until_their_acquire_timeout(
        start_coordinator: Any, sock_path: str) -> None:
    """200 connections opened one after the other, with acquire_timeout 300 s:
    each opener's timer stayed in the client's heap for 300 s (201 entries at
    the end, ~325 bytes each); cancelled once its lease came, the heap stays small."""
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, acquire_timeout=300,
                                                    validation_bypass=0),
                          resource="r", coordinator=sock_path)
    try:
        for _ in range(200):
            with pool.connection() as conn:
                conn.healthy = False  # fails its next check: the next checkout opens a new one
        assert pool.get_metrics()["connect_attempts"] >= 200
        client = pool._client
        assert client is not None
        with client._cond:
            left = len(client._timers)
        assert left <= 2 * timers.SWEEP_MIN + 8, left
    finally:
        pool.close()


def test_a_timer_armed_still_runs_and_a_cancelled_one_does_not(
        start_coordinator: Any, sock_path: str) -> None:
    from sharedpool import Client

    start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        ran = threading.Event()
        skipped = threading.Event()
        client.call_later(0.2, skipped.set).cancel()
        client.call_later(0.3, ran.set)
        assert ran.wait(5)
        assert not skipped.is_set()
    finally:
        client.close()
