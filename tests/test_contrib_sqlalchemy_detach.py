"""sharedpool.contrib.sqlalchemy: a connection detach()ed from the pool is its
user's to close, as in plain SQLAlchemy. Closed, its lease comes back at once;
dropped unclosed, its backend goes once it is garbage-collected, and its lease
after the server let go (I1) — never while the user still holds it."""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, first_grant_sees
from proc_helpers import held_once_confirmed, leased, wait_leased
from sqlalchemy import text
from sqlalchemy.engine import Engine

from sharedpool import Client, Resource
from sharedpool.contrib.sqlalchemy import LeasedQueuePool, create_engine
from sharedpool.giveback import min_turn

pytestmark = pytest.mark.pg

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def engine_for(sock: str, app: str, **kw: Any) -> Engine:
    return create_engine(URL, resource="pg", coordinator=sock, pool_timeout=5,
                         connect_args={"application_name": app}, **kw)


def held(engine: Engine) -> int:
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    return held_once_confirmed(lambda: pool.lease_stats()["leases_held"])


def backends_settle(app: str, want: int, timeout: float = 10.0) -> int:
    """This test's backends in pg_stat_activity, once they number ``want`` (or the time is up)."""
    sampler = BackendSampler(app)
    deadline = time.monotonic() + timeout
    while (n := sampler.count_now()) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def collect_until(done: Callable[[], bool], timeout: float = 10.0) -> bool:
    """gc.collect() until ``done()`` (the close and release run in a thread)."""
    deadline = time.monotonic() + timeout
    while True:
        gc.collect()
        if done() or time.monotonic() > deadline:
            return done()
        time.sleep(0.05)


def test_a_detached_connection_dropped_unclosed_gives_its_backend_and_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """Before, the lease book's reference kept the DBAPI connection from the
    garbage collector: its backend and lease stayed until the process exited
    (with max_size 1, every other connect of every process timed out)."""
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    conn = engine.connect()
    conn.execute(text("SELECT 1"))
    conn.detach()
    assert leased(sock_path) == 1
    assert backends_settle(app_name, 1) == 1
    waiter, seen = first_grant_sees(sock_path, app_name, 15)  # queued behind our lease
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg's "deleted while still open"
        del conn
        assert collect_until(lambda: not waiter.is_alive())
    assert seen == [0], f"the lease went back while PostgreSQL still had {seen} backend(s)"
    assert backends_settle(app_name, 0) == 0
    assert held(engine) == 0
    with engine.connect() as again:  # cap 1: only with that lease back
        assert again.execute(text("SELECT 1")).scalar_one() == 1
    engine.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_a_detached_connection_of_a_reconnected_slot_dropped_unclosed_gives_its_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """As above, the connection made by a reconnect of an empty slot (the one a
    detach, a give-back or a recycle leaves): the connecting thread kept a
    reference to it (the pool's 'made', meant for a failed first connect), so
    it was never collected: backend and lease stayed until that thread
    connected again."""
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    first = engine.connect()
    first.detach()  # its record goes back to the pool empty
    first.close()
    conn = engine.connect()  # the empty slot reconnects
    conn.execute(text("SELECT 1"))
    conn.detach()
    assert leased(sock_path) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # psycopg's "deleted while still open"
        del conn
        assert collect_until(lambda: leased(sock_path) == 0), "the dropped connection was never collected"
    assert backends_settle(app_name, 0) == 0
    engine.dispose()


def test_a_detached_connection_closed_gives_its_lease_back_at_once(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    conn = engine.connect()
    pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    conn.detach()
    conn.close()  # no gc.collect(): the close itself gives the lease back
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    stats = pool.lease_stats()
    assert (stats["leases_held"], stats["leases_released"]) == (0, 1)
    assert wait_leased(sock_path, 0) == 0
    assert backends_settle(app_name, 0) == 0
    with engine.connect() as again:
        assert again.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    engine.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_a_detached_connection_its_user_still_holds_stays_open_and_leased(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """The SQLAlchemy wrapper dropped, the DBAPI connection kept: it is the
    user's, and works on, under its lease, until they close it."""
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    raw = engine.raw_connection()
    raw.detach()
    dbapi = raw.dbapi_connection
    assert isinstance(dbapi, psycopg.Connection)
    del raw
    gc.collect()
    time.sleep(0.2)  # a wrongful close would run in a thread
    assert dbapi.execute("SELECT 1").fetchone() == (1,)
    assert leased(sock_path) == 1
    dbapi.close()  # behind SQLAlchemy's back: the lease comes back once it is collected
    del dbapi
    assert collect_until(lambda: leased(sock_path) == 0)
    assert backends_settle(app_name, 0) == 0
    assert held(engine) == 0
    engine.dispose()


def test_a_forked_child_dropping_the_parents_detached_connection_leaves_it_alone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """I7: the child's copy of a detached connection is cut at the fork (its
    collection there sends nothing down the parent's socket), and the child
    releases nothing of the parent's."""
    from proc_helpers import run_in_child

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    held_here = [engine.connect()]
    held_here[0].detach()

    def child() -> int:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            held_here.clear()
            gc.collect()
        time.sleep(0.5)  # a wrongful close or release would run in a thread
        return 0

    assert run_in_child(child) == 0
    conn = held_here.pop()
    assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert leased(sock_path) == 1
    conn.close()
    assert wait_leased(sock_path, 0) == 0
    assert backends_settle(app_name, 0) == 0
    engine.dispose()


def test_a_live_detached_connection_does_not_hold_up_the_exit(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """release_process() at a worker's exit waits for connections in use to come
    back; a detached one never does. Before, the exit waited its whole timeout
    for it (5 s here), then closed it. Now it is closed without waiting."""
    from sharedpool import release_process

    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name)
    try:
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        conn.detach()
        assert held(engine) == 1
        t0 = time.monotonic()
        release_process(timeout=5)
        assert time.monotonic() - t0 < 3
        assert backends_settle(app_name, 0) == 0
        assert wait_leased(sock_path, 0) == 0
    finally:
        engine.dispose()


def test_a_detached_connections_revoked_lease_is_no_longer_counted_nor_reported(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A coordinator restarted without the resource revokes the leases it cannot
    take back. A detached connection is its user's: it stays open, but its lease
    is gone. Before, the book's revoke looked only at the pool's connections:
    the detached one's lease was still counted in leases_held, reported busy to
    the coordinator under an id it no longer knew, and its close counted a
    release that released nothing."""
    first = start_coordinator({"pg": 2})
    engine = engine_for(sock_path, app_name, pool_size=2, max_overflow=0)
    try:
        conn = engine.connect()
        conn.execute(text("SELECT 1"))
        conn.detach()
        pool = engine.pool
        assert isinstance(pool, LeasedQueuePool)
        assert held(engine) == 1
        first.kill()
        start_coordinator({"other": 2})  # "pg" is gone from the new configuration
        book = pool.lease_book
        deadline = time.monotonic() + 10
        while book.stats()["leases_held"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert book.stats()["leases_held"] == 0, "the revoked lease is still counted"
        assert book._states() == []  # nothing reported under the revoked id
        assert conn.execute(text("SELECT 1")).scalar_one() == 1  # its user's, still open
        conn.close()
        assert book.stats()["leases_released"] == 0
        assert backends_settle(app_name, 0) == 0
    finally:
        engine.dispose()


def _close_listener_raising_once(pool: LeasedQueuePool) -> list[int]:
    """A user's "close" listener on ``pool`` that raises the first time; the
    list returned says whether it did."""
    from sqlalchemy import event

    raised: list[int] = []

    def close(dbapi_connection: Any, record: Any) -> None:
        if not raised:
            raised.append(1)
            raise RuntimeError("a listener that fails")

    event.listen(pool, "close", close)
    return raised


def test_a_reclaim_goes_on_past_a_close_that_raises(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A user's close listener raising on one connection given back on reclaim:
    before, the rest picked with it were never closed, their leases claimed as
    given back for good (the process gave back less from then on)."""
    start_coordinator({"pg": Resource(max_size=3)})
    engine = engine_for(sock_path, app_name, pool_size=2)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    try:
        first, second = engine.connect(), engine.connect()
        first.close()
        second.close()
        raised = _close_listener_raising_once(pool)
        client = Client.for_path(sock_path)
        client._owed["pg"] = 2  # as if the coordinator had asked for both back
        time.sleep(min_turn(1.0) + 0.02)  # past their first turn: idle young leases stay that long
        pool._sp_reclaim(2)
        assert raised
        assert backends_settle(app_name, 0) <= 1  # the other one closed all the same (this one too)
    finally:
        engine.dispose()


def test_a_connection_whose_close_listener_raises_is_closed_all_the_same_when_given_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A close listener raising as a reclaim gives a connection back: SQLAlchemy
    skips the close, and the connection went back open into its slot, its lease
    claimed as on its way for good: another process's acquire waited out its
    timeout beside two idle connections. Now it is closed all the same."""
    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_size=2)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    other = Client(sock_path)
    try:
        first, second = engine.connect(), engine.connect()
        first.close()
        second.close()
        raised = _close_listener_raising_once(pool)
        lease = other.acquire("pg", timeout=5)  # the coordinator reclaims one of the idle two
        other.release(lease)
        assert raised
        assert not Client.for_path(sock_path)._giving
    finally:
        other.close()
        engine.dispose()


def test_a_connection_owed_back_at_checkin_is_closed_though_its_close_listener_raises(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """The same at a checkin that pays a lease owed: before, the connection
    stayed open in its slot and its lease claimed as given back."""
    from sqlalchemy import event

    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_size=2)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)

    def close(dbapi_connection: Any, record: Any) -> None:
        raise RuntimeError("a listener that fails")

    try:
        conn = engine.connect()
        conn.exec_driver_sql("select 1")
        event.listen(pool, "close", close)
        client = Client.for_path(sock_path)
        client._owed["pg"], client._quanta["pg"] = 1, 0.0  # as a reclaim with a quantum of 0 would
        with contextlib.suppress(RuntimeError):
            conn.close()
        assert not client._giving
        assert backends_settle(app_name, 0) == 0
        event.remove(pool, "close", close)
    finally:
        engine.dispose()
