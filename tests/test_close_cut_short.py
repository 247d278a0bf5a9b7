"""A pool's close of one connection cut short by a signal handler's exception
(celery's soft time limit, RQ's death penalty, gunicorn's SIGTERM) on its way
from the checkin that took it out of the pool to close_counted, which takes
its lease: at the first instruction of _close_then_open, _close or
close_counted, or at a call before. The connection must still be closed and
its lease released, never left open with its lease held for good (found by
tests/fuzz_signals.py core --threads 1, seeds 47 and 41)."""

from __future__ import annotations

import functools
from typing import Any

import psycopg
import pytest
from pg_helpers import backend_pids
from proc_helpers import leased, wait_leased
from test_pool_edges import _CLOSE_ON_THE_WAY, _interrupting_at, run_traced

from sharedpool import ConnectionPool, PoolConfig, checkin

pytestmark = pytest.mark.pg

def _check_in(pool: ConnectionPool[Any], wrapper: Any, how: str) -> None:
    if how == "expired":  # release() -> release_slow(): closed, being past max_lifetime
        pool.release(wrapper)
    else:  # release_after_error() -> _discard(): closed by its user, so discarded
        pool.release_after_error(wrapper)


@pytest.mark.parametrize("how", ["expired", "closed"])
def test_a_close_cut_short_on_its_way_leaves_nothing_open_nor_leased(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, how: str) -> None:
    """At every instant a handler can run in the checkin that closes it
    (release_slow, _discard), _close_then_open, _close and close_counted (their
    first instructions too; not in callees). Before, at 5 (expired) and 9
    (closed) of them the connection was out of the pool yet never closed, or
    its lease never released: the entries of _close_then_open, _close and
    close_counted, the calls between _discard taking it out and the close,
    close_counted's time.monotonic(); and, as close_and_confirm returned a
    confirmed close (a point only this tracer sees: a Python function's return
    runs no handler in 3.11), the lease was never released."""
    start_coordinator({"pg": 100})  # room for the leases a failure leaves taken: all the points are seen
    first = checkin.release_slow.__code__ if how == "expired" else ConnectionPool._discard.__code__
    stranded = []
    pools = []  # kept: a pool collected would close what it still tracks, hiding a leak after it
    k = 0
    while True:
        app = f"{app_name}-{k}"
        before = leased(sock_path)
        connect = functools.partial(psycopg.connect, f"{pg} application_name={app}", autocommit=True)
        pool = ConnectionPool(connect,
                              PoolConfig(min_size=0, max_size=1), resource="pg", coordinator=sock_path)
        pools.append(pool)
        try:
            pool._max_lifetime = 0.0 if how == "expired" else 3600.0
            wrapper = pool.acquire(timeout=5)
            if how == "closed":
                wrapper.conn.close()
            tracer, fired = _interrupting_at([first, *_CLOSE_ON_THE_WAY], k, entries=True)
            run_traced(tracer, _check_in, pool, wrapper, how)
            del wrapper
            with pool.connection(timeout=5) as conn:  # the pool goes on
                conn.execute("SELECT 1")
        finally:
            pool.close(timeout=5)
        if wait_leased(sock_path, before, timeout=3) != before or backend_pids(app):
            stranded.append(fired)
        if not fired:
            break
        k += 1
    assert stranded == [], (len(stranded), stranded)
    assert k > 15, k  # the points were reached
