"""A checkout cut short by a signal handler's exception, and its clean-up cut
short by a second one (Ctrl-C twice, gunicorn's stop signal resent): the
connection handed to it meanwhile must not stay checked out for good."""

from __future__ import annotations

import signal
import time
from typing import Any

from proc_helpers import wait_leased
from test_pool_edges import Interrupted, _interrupting_at, run_traced

from sharedpool import ConnectionPool, PoolConfig, waiting
from sharedpool.testing import FakeFactory


class SoftLimit(Exception):
    """The first signal handler's exception."""


def test_a_checkout_cleanup_cut_short_anywhere_leaves_nothing_in_use(
        start_coordinator: Any, sock_path: str) -> None:
    """The checkout waits (its opener's lease request queued: the cap is
    taken); a checkin hands it the connection and the first signal ends it;
    the second lands wherever one can in forsake(). Before, one landing while
    it withdrew the lease requests (a send each) skipped the checkin of the
    handed connection: in use for good, its lease held."""
    start_coordinator({"r": 1})
    k = 0
    while True:
        factory = FakeFactory()
        pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2, acquire_timeout=5), resource="r",
                              coordinator=sock_path)
        held = pool.acquire(timeout=5)

        def on_alarm(signum: int, frame: Any, pool: Any = pool, held: Any = held) -> None:
            pool.release(held)  # handed to the acquire waiting below...
            raise SoftLimit  # ...which is cut short before it sees it

        old = signal.signal(signal.SIGALRM, on_alarm)
        tracer, fired = _interrupting_at([waiting.forsake.__code__], k)
        try:
            deadline = time.monotonic() + 5
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            run_traced(tracer, pool.acquire, 5, catch=(SoftLimit, Interrupted))
            assert time.monotonic() < deadline
            assert pool.get_in_use() == 0, (fired, repr(pool))
            again = pool.acquire(timeout=2)
            assert again is held, fired
            pool.release(again)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
            pool.close(timeout=2)
        assert wait_leased(sock_path, 0) == 0, fired
        if not fired:
            break
        k += 1
    assert k >= 3  # the points were reached
