"""A ``with`` on the conditions of a client, a pool and a lease book, cut
short by a signal handler's exception at any instant: the lock must not stay
held (threading.Condition's Python __enter__/__exit__ left it held at three
instants: every later lease call, checkout or checkin of the process hung)."""

from __future__ import annotations

import sys
import threading
from typing import Any

from sharedpool import Client, ConnectionPool, PoolConfig
from sharedpool.contrib._leases import LeaseBook
from sharedpool.testing import FakeFactory


def _held_after_cut(cond: Any, instant: int) -> tuple[bool, bool]:
    """Raise KeyboardInterrupt at the ``instant``-th trace event (a call, line
    or return: where a signal handler can run) under ``with cond: pass``.
    Whether it fired, and whether the lock is left held."""
    seen = [0]

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code is enter.__code__:
            return tracer  # the with statement's own frame: its instants are in the block
        seen[0] += 1
        if seen[0] == instant:
            raise KeyboardInterrupt
        return tracer

    def enter() -> None:
        with cond:
            pass

    sys.settrace(tracer)
    try:
        enter()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    free = cond.acquire(timeout=0.5)
    if free:
        cond.release()
    return seen[0] >= instant, not free


def _cut_everywhere(cond: Any) -> list[int]:
    """The instants at which a cut-short ``with cond`` leaves its lock held."""
    stuck = []
    for instant in range(1, 50):
        fired, held = _held_after_cut(cond, instant)
        if not fired:
            break
        if held:
            stuck.append(instant)
            cond.release()
    return stuck


def test_no_signal_leaves_a_condition_held(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    client = Client(sock_path)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    book = LeaseBook("r", sock_path)
    try:
        for name, cond in [("client", client._cond), ("pool", pool._returned),
                           ("book returned", book._returned), ("book closing", book._none_closing)]:
            assert _cut_everywhere(cond) == [], name
        with pool.connection(timeout=1):  # all still usable
            pass
        client.release(client.acquire("r", timeout=5))
    finally:
        pool.close()
        book.shutdown()
        client.close()
