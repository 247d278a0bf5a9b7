"""A core pool dropped without close() (per-request or per-test pools, a factory
that builds one and loses it, one replaced on reconfiguration) is collected:
its idle connections are closed, confirmed, and only then their leases
released, as psycopg_pool and SQLAlchemy users expect of a dropped pool."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, pg_dsn, slow_exit
from proc_helpers import run_in_child

from sharedpool import Client, ConnectionPool, PoolConfig

WARNING = "garbage-collected without close()"


def _factory(app_name: str) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)
    return connect


def _leased(probe: Client) -> int:
    return int(probe.inspect("resources")["resources"][0]["leased"])


def _until(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Collect until ``done()`` (a pool's finalizer runs at a collection)."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        gc.collect()
        time.sleep(0.05)
    return True


def _make_pool(app_name: str, sock_path: str, use: int,
               slow: bool = False) -> weakref.ref[ConnectionPool[Any]]:
    """A pool that served ``use`` connections at once, then is lost (a factory
    function that builds a pool and drops it); only a weak reference comes back."""
    pool = ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=4), resource="r",
                          coordinator=sock_path)
    held = [pool.acquire(timeout=5) for _ in range(use)]
    for w in held:
        w.conn.execute("SELECT 1")
        if slow:
            slow_exit(w.conn)
        pool.release(w)
    return weakref.ref(pool)


def test_a_dropped_pool_closes_its_connections_then_returns_their_leases(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Before: the process's client held the pool through its handlers, so it
    was never collected; its backends and leases stayed until the process exited."""
    start_coordinator({"r": 4})
    probe = Client(sock_path)
    counter = BackendSampler(app_name)
    try:
        with caplog.at_level(logging.WARNING, logger="sharedpool.pool"):
            ref = _make_pool(app_name, sock_path, use=2)
            session = Client.for_path(sock_path)
            assert counter.count_now() == 2 and _leased(probe) == 2
            assert _until(lambda: ref() is None), "the dropped pool was never collected"
            assert _until(lambda: counter.count_now() == 0), counter.count_now()
            assert _until(lambda: _leased(probe) == 0), _leased(probe)
            assert _until(lambda: session.closed)  # nothing else used the process's session
        said = [r for r in caplog.records if WARNING in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in caplog.records]
        assert "closing its 2 connection(s)" in said[0].getMessage()
    finally:
        probe.close()


def test_a_dropped_pools_leases_go_back_only_once_its_backends_are_gone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """I1 as PostgreSQL counts it: the backends of a dropped pool take a while
    to exit; the pool already waiting for their leases never sees more than
    the cap. (Checked out when dropped, so that no reclaim takes them first.)"""
    start_coordinator({"r": 2})
    probe = Client(sock_path)
    other = ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=2, acquire_timeout=15),
                           resource="r", coordinator=sock_path)
    got: list[Any] = []

    def take() -> None:
        w = other.acquire()
        w.conn.execute("SELECT 1")
        got.append(w)

    try:
        with BackendSampler(app_name) as sampler:
            pool = ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=2), resource="r",
                                  coordinator=sock_path)
            held = [pool.acquire(timeout=5) for _ in range(2)]
            for w in held:
                slow_exit(w.conn)
            ref = weakref.ref(pool)
            threads = [threading.Thread(target=take) for _ in range(2)]
            for t in threads:
                t.start()
            assert _until(lambda: probe.inspect("resources")["resources"][0]["waiting"] == 2)
            del pool, held, w  # abandoned with its checkouts
            assert _until(lambda: ref() is None)
            for t in threads:
                t.join(15)
            assert len(got) == 2  # the leases the dropped pool gave back
        assert sampler.peak <= 2, sampler.peak
    finally:
        for w in got:
            other.release(w)
        other.close()
        probe.close()


@pytest.mark.parametrize("then", ["released", "dropped"])
def test_a_dropped_pool_lives_while_a_connection_is_checked_out(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, then: str) -> None:
    """A checked-out connection holds its pool: dropping the pool closes nothing
    under it. Once the connection is checked in (or dropped too), the pool goes."""
    start_coordinator({"r": 4})
    probe = Client(sock_path)
    counter = BackendSampler(app_name)
    try:
        pool = ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=4), resource="r",
                              coordinator=sock_path)
        idle, w = pool.acquire(timeout=5), pool.acquire(timeout=5)
        pool.release(idle)
        del idle
        ref = weakref.ref(pool)
        del pool
        for _ in range(3):
            gc.collect()
        time.sleep(0.3)
        assert ref() is not None
        assert w.conn.execute("SELECT 1").fetchone() == (1,)  # still open, under its lease
        assert counter.count_now() == 2 and _leased(probe) == 2
        if then == "released":
            w.pool.release(w)
        del w  # dropped checked out: a checkout nobody can ever return
        assert _until(lambda: ref() is None)
        assert _until(lambda: counter.count_now() == 0), counter.count_now()
        assert _until(lambda: _leased(probe) == 0), _leased(probe)
    finally:
        probe.close()


def test_a_forked_child_dropping_an_inherited_pool_closes_nothing_of_the_parents(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"r": 4})
    probe = Client(sock_path)
    counter = BackendSampler(app_name)
    # Held in a list, not a local: the child's copy of this frame must not keep it.
    holder = [ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=4), resource="r",
                             coordinator=sock_path)]
    try:
        with holder[0].connection() as conn:
            before = conn.info.backend_pid
        del conn

        def child() -> int:
            ref = weakref.ref(holder[0])
            holder.clear()
            for _ in range(3):
                gc.collect()
            time.sleep(0.5)  # as long as a close of ours would take
            return 0 if ref() is None else 5  # collected here: its finalizer ran, in the child

        assert run_in_child(child) == 0
        assert counter.count_now() == 1 and _leased(probe) == 1
        with holder[0].connection() as conn:
            assert conn.execute("SELECT pg_backend_pid()").fetchone() == (before,)
        del conn
    finally:
        for pool in holder:
            pool.close()
        probe.close()


def test_a_dropped_pool_is_collected_before_its_checkouts_deadline(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """Each lease request of an opener has a timer (opening.RetimeIfServed)
    due just before its deadline; the timer held the waiter, whose wrapper
    holds the pool: a pool dropped after a checkout with a long timeout (60 s
    here) lived, with its backend and lease, until that timer ran. Before:
    not collected within 3 s; now at once."""
    start_coordinator({"r": 4})
    probe = Client(sock_path)
    counter = BackendSampler(app_name)

    def make() -> weakref.ref[ConnectionPool[Any]]:
        pool = ConnectionPool(_factory(app_name), PoolConfig(min_size=0, max_size=4),
                              resource="r", coordinator=sock_path)
        pool.release(pool.acquire(timeout=60))
        return weakref.ref(pool)

    try:
        ref = make()
        assert counter.count_now() == 1 and _leased(probe) == 1
        assert _until(lambda: ref() is None, timeout=3), "the dropped pool was not collected"
        assert _until(lambda: counter.count_now() == 0), counter.count_now()
        assert _until(lambda: _leased(probe) == 0), _leased(probe)
    finally:
        probe.close()
