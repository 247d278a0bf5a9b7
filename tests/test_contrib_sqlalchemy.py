"""sharedpool.contrib.sqlalchemy on a real PostgreSQL: the cap seen from
pg_stat_activity across forked workers, pre-ping after a terminated backend,
recycle and events, fork with dispose(close=False), reclaim of idle connections."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, backend_pids, first_grant_sees, pg_dsn
from proc_helpers import (
    alarm_raises,
    exit_mid_query,
    hammer,
    held_once_confirmed,
    import_refused,
    interrupt_once,
    leased,
    no_leases_of,
    other_sessions,
    reclaimed_at_release,
    resource_row,
    run_forked,
    run_in_child,
    run_staggered,
    wait_leased,
    wait_no_other_sessions,
)
from servers import wait_for
from sqlalchemy import event, text
from sqlalchemy.engine import Engine

from sharedpool import Client, ConfigError, Resource
from sharedpool.contrib.sqlalchemy import LeasedQueuePool, attach, create_engine

pytestmark = pytest.mark.pg

URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"



def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

def engine_for(sock: str, app: str, **kw: Any) -> Engine:
    kw.setdefault("pool_timeout", 20)
    return create_engine(URL, resource="pg", coordinator=sock,
                         connect_args={"application_name": app}, **kw)


def _hammer(engine: Engine, threads: int, iterations: int) -> dict[str, Any]:
    engine.dispose(close=False)  # SQLAlchemy's advice for a forked child

    def query() -> None:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_sleep(0.002)"))

    done, errors = hammer(threads, iterations, query)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    stats = pool.lease_stats()
    engine.dispose()
    return {"done": done, "errors": errors, "stats": stats,
            "held_after": held_once_confirmed(lambda: pool.lease_stats()["leases_held"])}


def test_forked_workers_never_exceed_the_cap(pg: str, start_coordinator: Any, sock_path: str,
                                             app_name: str) -> None:
    # A quantum well above a PostgreSQL connect: leases move between busy
    # processes at most that often (each move is a close and a connect).
    start_coordinator({"pg": Resource(max_size=3, acquire_timeout=20, fairness_quantum=0.25)})
    # 5 processes x (pool_size 2 + max_overflow 1) = 15 connections wanted, cap 3.
    engine = engine_for(sock_path, app_name, pool_size=2, max_overflow=1, pool_pre_ping=True)
    with BackendSampler(app_name) as sampler:
        results = run_forked(_hammer, engine, 3, 20, n=5)
    assert all(not r.get("error") and not r["errors"] for r in results), results
    assert sum(r["done"] for r in results) == 5 * 3 * 20
    assert all(r["held_after"] == 0 for r in results)
    assert sampler.samples > 50
    assert sampler.peak <= 3, f"PostgreSQL saw {sampler.peak} connections with a cap of 3"
    assert sampler.peak == 3, "the cap was never reached: the test proves nothing"
    assert wait_leased(sock_path, 0) == 0
    assert sampler.count_now() == 0


def _busy_for(engine: Engine, threads: int, seconds: float) -> dict[str, Any]:
    engine.dispose(close=False)
    done, worst, errors = [0], [0.0], []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def work() -> None:
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                with engine.connect() as conn:
                    waited = time.monotonic() - t0
                    conn.execute(text("SELECT pg_sleep(0.005)"))
            except Exception as exc:  # noqa: BLE001 - reported to the test
                errors.append(repr(exc))
                continue
            with lock:
                done[0] += 1
                worst[0] = max(worst[0], waited)

    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    engine.dispose()
    return {"done": done[0], "worst": worst[0], "errors": errors[:3]}


def test_busy_threaded_workers_all_make_progress(pg: str, start_coordinator: Any, sock_path: str,
                                                 app_name: str) -> None:
    # gthread-style: every process always has a thread wanting one more
    # connection than it holds. Threads must be served by the connections
    # their peers check in, and stop queueing at the coordinator then, or the
    # holders are never asked to give back and the other processes starve.
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=20, fairness_quantum=0.1)})
    engine = engine_for(sock_path, app_name, pool_size=4, max_overflow=0)
    with BackendSampler(app_name) as sampler:
        results = run_forked(_busy_for, engine, 4, 2.0, n=4)
    assert all(not r.get("error") and not r["errors"] for r in results), results
    done = sorted(r["done"] for r in results)
    assert done[0] >= 10 and done[0] >= done[-1] / 5, f"queries done per process: {done}"
    assert sampler.peak <= 2
    assert wait_leased(sock_path, 0) == 0


def test_pre_ping_replaces_a_terminated_backend_without_leaking_its_lease(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0, pool_pre_ping=True,
                        pool_timeout=5)
    first = backend_pid(engine)
    with psycopg.connect(pg_dsn(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        deadline = time.monotonic() + 5
        while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (first,)).fetchone():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # Cap 1: the replacement can only connect if the dead one's lease came back.
    second = backend_pid(engine)
    assert second != first
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    stats = pool.lease_stats()
    assert (stats["leases_acquired"], stats["leases_released"], stats["leases_held"]) == (2, 1, 1)
    assert leased(sock_path) == 1
    engine.dispose()
    assert leased(sock_path) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_busy_connection_is_cancelled_and_its_lease_goes_back_after_the_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=1)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    raw = engine.raw_connection()
    waiter, seen = first_grant_sees(sock_path, app_name)
    time.sleep(0.1)  # queued behind our lease
    # Busy (a task cut short mid-query): the query is cancelled before the
    # close, else the backend reads our Terminate only when it ends and the
    # lease is held until then.
    raw.dbapi_connection.pgconn.send_query(b"SELECT pg_sleep(10)")  # type: ignore[union-attr]
    t0 = time.monotonic()
    raw.invalidate()  # the DBAPI connection is closed now
    assert time.monotonic() - t0 < 1.5, "the busy query was not cancelled"
    waiter.join(3)
    assert not waiter.is_alive(), "the lease did not come back promptly"
    assert seen == [0], f"the lease went back while PostgreSQL still had {seen} backend(s)"
    assert engine.pool.lease_stats()["closes_unconfirmed"] == 0  # type: ignore[attr-defined]
    engine.dispose()


def test_recycle_and_pool_events_still_work(pg: str, start_coordinator: Any, sock_path: str,
                                            app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0, pool_recycle=1)
    seen: list[str] = []
    event.listen(engine, "connect", lambda *a: seen.append("connect"))
    event.listen(engine, "close", lambda *a: seen.append("close"))
    event.listen(engine, "checkout", lambda *a: seen.append("checkout"))
    first = backend_pid(engine)
    time.sleep(1.1)
    second = backend_pid(engine)  # recycled on checkout: closed, then reconnected
    assert second != first
    assert seen == ["connect", "checkout", "close", "connect", "checkout"]
    assert leased(sock_path) == 1
    engine.dispose()
    assert seen[-1] == "close" and leased(sock_path) == 0


def test_a_connect_event_that_raises_leaks_no_lease(pg: str, start_coordinator: Any, sock_path: str,
                                                    app_name: str) -> None:
    # SQLAlchemy < 2.0.53 leaves a new connection whose connect event raised (a
    # failing SET) to the garbage collector, which the lease book's reference
    # kept from it: its backend and lease stayed, and the cap shrank for good.
    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_timeout=3)
    failures = [3]

    @event.listens_for(engine, "connect")
    def set_up(dbapi_connection: Any, record: Any) -> None:
        if failures[0]:
            failures[0] -= 1
            raise RuntimeError("SET failed")

    for _ in range(3):
        with pytest.raises(RuntimeError, match="SET failed"):
            engine.connect()
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0
    assert backend_pid(engine) > 0  # and the cap is whole: a connect gets a lease
    engine.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_a_thread_waiting_on_a_disposed_pool_gets_the_connection_checked_in(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The replaced pool closed the connections checked in after engine.dispose()
    # and dropped their slots: a thread already waiting on its queue waited out
    # pool_timeout, then connected anyway or raised TimeoutError. QueuePool
    # hands it the connection checked in.
    start_coordinator({"pg": Resource(max_size=3)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0, pool_timeout=20)
    held = engine.connect()
    outcome: list[object] = []

    def waiter() -> None:
        try:
            outcome.append(backend_pid(engine))
        except Exception as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        queue: Any = engine.pool._pool  # type: ignore[attr-defined]
        while not queue.not_empty._waiters and time.monotonic() < deadline:
            time.sleep(0.01)  # until the waiter waits in the exhausted pool's queue
        engine.dispose()
        held.close()
        thread.join(10)
        assert not thread.is_alive(), "the waiter still waits for a connection checked in 10s ago"
        assert isinstance(outcome[0], int), outcome
    finally:
        thread.join(20)
    engine.dispose()
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def _child_query(engine: Engine, dispose: bool) -> dict[str, Any]:
    if dispose:
        engine.dispose(close=False)
    pid = backend_pid(engine)
    engine.dispose()  # closes the child's own connection only
    return {"pid": pid}


@pytest.mark.parametrize("dispose", [True, False], ids=["dispose-close-false", "no-dispose"])
def test_fork_child_opens_its_own_and_leaves_the_parents_alone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, dispose: bool) -> None:
    start_coordinator({"pg": Resource(max_size=3)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    parent = backend_pid(engine)  # idle in the pool, leased, when we fork
    [child] = run_forked(_child_query, engine, dispose)
    assert "error" not in child, child
    assert child["pid"] != parent
    assert wait_leased(sock_path, 1) == 1  # the parent's lease, not released by the child
    assert backend_pid(engine) == parent  # the parent's connection still works
    engine.dispose()
    assert leased(sock_path) == 0


def _child_needs_one(engine: Engine) -> dict[str, Any]:
    engine.dispose(close=False)
    t0 = time.monotonic()
    backend_pid(engine)
    waited = time.monotonic() - t0
    engine.dispose()
    return {"waited": waited}


def test_idle_connections_are_reclaimed_for_a_waiting_process(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=10)})
    engine = engine_for(sock_path, app_name, pool_size=2, max_overflow=0)
    with engine.connect(), engine.connect():
        pass  # both now idle in the parent's pool, holding the whole cap
    [child] = run_forked(_child_needs_one, engine)
    assert "error" not in child, child
    assert child["waited"] < 5, "the idle connection was not reclaimed"
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    stats = pool.lease_stats()
    assert stats["leases_reclaimed"] >= 1 and stats["leases_held"] == 1
    assert pool.checkedin() == 2  # the reclaimed one's slot stays, empty
    with engine.connect(), engine.connect():  # both serve; the empty one reconnects
        pass
    engine.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_attach_refuses_what_it_cannot_lease(pg: str, sock_path: str) -> None:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    with pytest.raises(ConfigError, match="QueuePool"):
        attach(sqlalchemy.create_engine(URL, poolclass=NullPool), "pg", sock_path)
    # An async driver's engine (what create_async_engine wraps): said so, not
    # "needs a QueuePool ... has AsyncAdaptedQueuePool".
    with pytest.raises(ConfigError, match="asyncio engine"):
        create_engine(URL.replace("+psycopg:", "+psycopg_async:"), resource="pg", coordinator=sock_path)
    engine = sqlalchemy.create_engine(URL)
    with engine.connect(), pytest.raises(ConfigError, match="checked out"):
        attach(engine, "pg", sock_path)
    engine.dispose()
    attached = attach(engine, "pg", sock_path)
    with pytest.raises(ConfigError, match="already"):
        attach(attached, "pg", sock_path)


def _exit_mid_query(engine: Engine) -> dict[str, Any]:
    engine.dispose(close=False)
    out = exit_mid_query(engine.connect,
                         lambda conn: conn.execute(text("SELECT 42 FROM pg_sleep(1)")).scalar())
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    out["held"] = pool.lease_stats()["leases_held"]
    return out


def test_release_process_waits_for_a_query_in_flight(pg: str, start_coordinator: Any,
                                                      sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    [child] = run_forked(_exit_mid_query, engine)
    assert child.get("row") == 42, child  # not "the connection is closed"
    assert 0.5 < child["took"] < 4, child  # until the query ended, not the whole timeout
    assert child["held"] == 0
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_a_refused_wait_is_sqlalchemys_pool_timeout_error(pg: str, start_coordinator: Any,
                                                          sock_path: str, app_name: str) -> None:
    from sqlalchemy import exc

    from sharedpool import TooManyWaiters
    from sharedpool.contrib.sqlalchemy import LeaseRefused

    start_coordinator({"pg": Resource(max_size=1, max_waiting=0)})
    holder = engine_for(sock_path, app_name)
    other = engine_for(sock_path, app_name)
    try:
        with holder.connect() as held:
            held.execute(text("SELECT 1"))
            with pytest.raises(LeaseRefused) as caught, other.connect():
                pass
        # What `except sqlalchemy.exc.TimeoutError` (an exhausted QueuePool)
        # and `except sharedpool.TooManyWaiters` both catch.
        assert isinstance(caught.value, exc.TimeoutError)
        assert isinstance(caught.value, TooManyWaiters)
    finally:
        holder.dispose()
        other.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_an_engine_dropped_without_dispose_gives_its_leases_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """Plain SQLAlchemy closes the connections of an engine that is garbage-
    collected; so do we, and their leases come back (after the close is
    confirmed). Before, each dropped engine kept its leases for the life of
    the process: after max_size of them, every process waited at the cap."""
    import gc

    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=3)})
    for _ in range(3):  # one more engine than the cap
        engine = engine_for(sock_path, app_name, pool_timeout=3)
        assert backend_pid(engine)
        del engine
        gc.collect()
        assert wait_leased(sock_path, 0) == 0
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (app_name,)).fetchone()
    assert row is not None and row[0] == 0


def test_a_signal_while_waiting_for_a_lease_leaks_nothing(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """celery's soft time limit (or an alarm, or Ctrl-C) raises in the thread
    that waits for a lease. The acquire is withdrawn (or a lease granted at
    that moment goes back): the next checkout of this process, and the other
    processes, get the slot once it is free."""
    import signal

    class SoftLimit(Exception):
        pass

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=10)})
    other = Client(sock_path)
    held = other.acquire("pg", timeout=5)  # another process holds the only slot
    engine = engine_for(sock_path, app_name, pool_timeout=10)
    try:
        with alarm_raises(SoftLimit):
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(SoftLimit), engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        other.release(held)
        assert backend_pid(engine)  # this process gets the slot again
        pool = engine.pool
        assert isinstance(pool, LeasedQueuePool)
        engine.dispose()
        assert pool.lease_stats()["leases_held"] == 0
        assert wait_leased(sock_path, 0) == 0
        again = other.acquire("pg", timeout=5)  # and so does the other one
        other.release(again)
    finally:
        other.close()


def test_a_signal_just_after_a_checkin_handed_over_its_connection_loses_nothing(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A thread waits for a lease; a peer checks a connection in, which is
    handed straight to the waiter; the waiter is interrupted (a signal handler's
    exception) before it takes it. The connection goes back to the pool: it was
    lost, with its lease, until the process exited."""

    class SoftLimit(Exception):
        pass

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=10)})
    engine = engine_for(sock_path, app_name, pool_size=2, max_overflow=0, pool_timeout=10)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    book = pool.lease_book
    handed = threading.Event()

    class InterruptedOnWake(threading.Condition):
        def wait(self, timeout: float | None = None) -> bool:
            woken = super().wait(timeout)
            if handed.is_set():
                raise SoftLimit  # arrives as the waiter wakes for the hand-over
            return woken

    checked_out, release = threading.Event(), threading.Event()

    def peer() -> None:
        with engine.connect() as conn:  # the only lease
            conn.execute(text("SELECT 1"))
            checked_out.set()
            release.wait(10)
            handed.set()  # the checkin below hands it to the waiter

    thread = threading.Thread(target=peer)
    try:
        thread.start()
        assert checked_out.wait(10)
        book._returned = InterruptedOnWake(threading.Lock())
        threading.Timer(0.3, release.set).start()
        with pytest.raises(SoftLimit), engine.connect():
            pass
        thread.join(10)
        book._returned = threading.Condition(threading.Lock())
        assert pool.checkedin() == 1 and pool.checkedout() == 0
        start = time.monotonic()
        assert backend_pid(engine)  # the connection handed over, no new lease needed
        assert time.monotonic() - start < 5
        assert pool.lease_stats()["leases_held"] == 1
    finally:
        release.set()
        thread.join(10)
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0


class _SoftLimit(Exception):
    """What a signal handler raises (celery's soft time limit is an Exception)."""


@pytest.mark.parametrize("where", ["as the acquire is sent", "as the acquire call returns"])
def test_a_signal_around_the_acquire_leaks_no_lease(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """The exception lands inside Client.request(), once the acquire is out but
    before any ticket exists to wait for or cancel it (where random SIGALRMs
    landed in 5 runs of 6); or one instruction later, the ticket made and
    returned, before the caller holds it. Before, the lease granted next was
    held by the process and owned by nobody, for good: with a cap of 1, the
    resource was dead for every process."""
    import sharedpool.client as client_module
    from sharedpool.contrib import _acquiring

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=3)})
    engine = engine_for(sock_path, app_name, pool_timeout=3)
    if where == "as the acquire is sent":  # AcquireRequest() runs in request(), after the send
        interrupt_once(monkeypatch, client_module.AcquireRequest, "__init__", _SoftLimit())
    else:
        interrupt_once(monkeypatch, _acquiring._CancellableAcquire, "__init__", _SoftLimit(), after=True)
    try:
        with pytest.raises(_SoftLimit):
            engine.connect()
        assert wait_leased(sock_path, 0) == 0  # granted, then handed straight back
        assert backend_pid(engine)  # the next checkout is served
        client = engine.pool._sp_book._client  # type: ignore[attr-defined]
        assert client is not None and not client._pending
    finally:
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0


@pytest.mark.parametrize("slot", ["new", "empty slot", "soft-invalidated"])
@pytest.mark.parametrize("where", ["as open_under returns", "as the creator returns"])
def test_a_signal_as_the_connect_returns_leaks_neither_connection_nor_lease(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch, slot: str, where: str) -> None:
    """The exception lands once the connection is made and in the book, before
    SQLAlchemy holds it: as open_under returns to leased_creator, or as the
    creator returns, before __connect stores it on the record. Before, nothing
    but the book held it: its backend open and its lease held until the
    process's exit (with a cap of 1, every process's checkouts timed out).
    A new record's connection, a reconnect of an empty slot (lease taken in
    _do_get), a soft-invalidated one's (leased in the creator: book.connect)."""
    from sharedpool.contrib._leases import LeaseBook

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=3)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0, pool_timeout=3)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    try:
        if slot != "new":
            raw = engine.raw_connection()
            soft = slot == "soft-invalidated"  # kept open until the next checkout replaces it
            raw.invalidate(soft=soft)
            raw.close()
            assert wait_leased(sock_path, int(soft)) == int(soft)
        if where == "as open_under returns":
            interrupt_once(monkeypatch, LeaseBook, "open_under", _SoftLimit(), after=True)
        else:
            creator, fire = pool._invoke_creator, [True]

            def invoke(record: Any) -> Any:
                conn = creator(record)
                if fire[0]:
                    fire[0] = False
                    raise _SoftLimit()
                return conn

            monkeypatch.setattr(pool, "_invoke_creator", invoke)
        with pytest.raises(_SoftLimit) as err:
            engine.connect()
        err.value.__traceback__ = None  # the same instance raised again: its frames would hold the connection
        del err
        deadline = time.monotonic() + 5
        while backend_pids(app_name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert backend_pids(app_name) == [], "the connection made is still open"
        assert wait_leased(sock_path, 0) == 0
        # Uncounted just after the release went out: the coordinator can show 0 first.
        wait_for(lambda: pool.lease_stats()["leases_held"] == 0, 3, "the pool's leases_held to reach 0")
        assert backend_pid(engine)  # the next checkout is served
    finally:
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0


@pytest.mark.parametrize("given_up", ["the lease wait failed", "a live one came instead",
                                      "cut short as a live one came"])
def test_a_signal_as_an_empty_slot_goes_back_loses_no_slot(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch, given_up: str) -> None:
    """_do_get puts an empty slot back when its checkout gives way (its lease wait
    failed, or a live connection checked in meanwhile went out in its place). A
    signal handler's exception at the put-back's entry lost the slot for good,
    and the live record with it: with pool_size 1 every later checkout timed out
    (tests/fuzz_signals.py sqlalchemy --threads 1 --seed 7: "stranded at
    _sp_put_back_empty"); the live one's connection stayed open and leased.
    So was the live one alone when the exception landed as the lease wait
    returned it (taken out of the queue, not yet _do_get's)."""
    from sharedpool.contrib._leases import LeaseBook

    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=3)})
    size = 1 if given_up == "the lease wait failed" else 2
    engine = engine_for(sock_path, app_name, pool_size=size, max_overflow=0, pool_timeout=3)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    hog = Client(sock_path, name="hog")
    try:
        raws = [engine.raw_connection() for _ in range(size)]
        raws[-1].invalidate()  # its slot empty, first in the queue (FIFO)
        for raw in reversed(raws):
            raw.close()
        if given_up == "cut short as a live one came":
            # The real wait, served by the live one (the spare lease held elsewhere:
            # no grant wins the race), cut short as it returns.
            hog.acquire("pg", timeout=5)
            interrupt_once(monkeypatch, LeaseBook, "acquire", _SoftLimit(), after=True)
        else:
            if given_up == "the lease wait failed":
                interrupt_once(monkeypatch, LeasedQueuePool, "_sp_lease_first", _SoftLimit())
            else:  # as its lease wait does when a peer checks one in: that one out instead
                monkeypatch.setattr(LeasedQueuePool, "_sp_lease_first",
                                    lambda self, record=None, live=None: self._sp_take_live(live))
            interrupt_once(monkeypatch, LeasedQueuePool, "_sp_put_back_empty", _SoftLimit())
        with pytest.raises(_SoftLimit):
            engine.connect()
        monkeypatch.undo()
        hog.close()
        assert pool.checkedout() == 0, "a record went out with the checkout cut short"
        conns = [engine.connect() for _ in range(size)]  # every slot serves: none timed out
        for conn in conns:
            conn.execute(text("SELECT 1"))
            conn.close()
        assert pool.lease_stats()["leases_held"] == size
    finally:
        hog.close()
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_a_signal_inside_the_put_back_loses_no_slot(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """_sp_put_back_empty took a record off its list, then asked len() whether
    the queue had room: a signal handler's exception after that call (where
    one runs) left the record on neither, and the second call parked nothing.
    The slot was lost for good: with pool_size 1 every later checkout timed out."""
    import sys

    import sharedpool.contrib.sqlalchemy as module

    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=3)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0, pool_timeout=3)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    raised: list[Any] = []

    def signalled_len(obj: Any) -> int:
        # The queue's room asked in the put-back: the handler runs as the call returns.
        if not raised and obj is pool._pool.queue and sys._getframe(1).f_code.co_name == "_sp_put_back_empty":
            raised.append(obj)
            raise _SoftLimit()
        return len(obj)

    try:
        raw = engine.raw_connection()
        raw.invalidate()  # its slot empty: the next checkout takes a lease for it
        raw.close()
        interrupt_once(monkeypatch, LeasedQueuePool, "_sp_lease_first", _SoftLimit())
        monkeypatch.setattr(module, "len", signalled_len, raising=False)
        with pytest.raises(_SoftLimit):
            engine.connect()
        monkeypatch.undo()
        assert raised, "the put-back never asked for the queue's room"
        assert pool.checkedout() == 0, "the empty slot went out with the checkout cut short"
        with engine.connect() as conn:  # the slot serves: no timeout
            conn.execute(text("SELECT 1"))
    finally:
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0


def test_pool_timeout_none_at_the_cap_is_a_lease_timeout(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # pool_timeout=None (QueuePool: wait without a limit) raised TypeError
    # formatting the message; the wait is the resource's acquire_timeout.
    from sharedpool.contrib.sqlalchemy import LeaseTimeout

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=0.5)})
    other = Client(sock_path)
    held = other.acquire("pg", timeout=5)
    engine = engine_for(sock_path, app_name, pool_timeout=None)
    try:
        with pytest.raises(LeaseTimeout, match="within the resource's acquire_timeout"):
            engine.connect()
    finally:
        other.release(held)
        other.close()
        engine.dispose()


def test_engines_made_and_dropped_leave_no_handlers_behind(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Each engine's lease book added three handlers to the process's client and
    # only a psycopg pool's close() took them away: 300 dropped engines left
    # 300 of each (every reclaim and report walked them; the session never ended).
    import gc

    start_coordinator({"pg": 2})
    engines = []
    for _ in range(20):
        engine = engine_for(sock_path, app_name)
        assert backend_pid(engine)
        engine.dispose()
        engines.append(engine)
    client = engine.pool._sp_book._client  # type: ignore[attr-defined]
    assert client is not None and len(client._push_handlers) >= 20
    del engines, engine
    gc.collect()
    assert client.close_if_unused()  # the session ends: nothing of the dropped engines is left


def test_a_connection_being_opened_shows_as_connecting(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # It was reported "in use" from the lease on (status: in_use 1 while the
    # connect ran), where the core pool's shows as connecting until it is made.
    import threading

    start_coordinator({"pg": 2})
    go = threading.Event()

    def creator() -> Any:
        go.wait(10)
        return psycopg.connect(pg_dsn(), application_name=app_name)

    engine = engine_for(sock_path, app_name, creator=creator)
    try:
        opening = threading.Thread(target=backend_pid, args=(engine,))
        opening.start()
        deadline = time.monotonic() + 5
        while resource_row(sock_path)["leased"] != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)  # reports are coalesced: one would have come by now
        row = resource_row(sock_path)
        go.set()
        opening.join(10)
        assert (row["leased"], row["connecting"], row["in_use"]) == (1, 1, 0), row
    finally:
        go.set()
        engine.dispose()


def test_an_engine_disposed_then_dropped_ends_the_session(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Its book held no connection, so nothing was closed at its collection and
    # the process's session stayed open for good (a dropped ConnectionPool's
    # ends, as a dropped engine's with connections does).
    import gc

    start_coordinator({"pg": 2})
    engine = engine_for(sock_path, app_name)
    assert backend_pid(engine)
    engine.dispose()
    assert len(other_sessions(sock_path)) == 1
    del engine
    gc.collect()
    assert wait_no_other_sessions(sock_path) == []


@pytest.mark.parametrize("pause", ["book", "pool"])
def test_two_threads_of_a_child_meeting_the_fork_at_once_lose_nothing(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, pause: str) -> None:
    """Two threads of a forked child (gthread, celery threads) first use an
    inherited engine at once; the second is switched out right after reading
    the stale pid (a pause stands in for that). Before, it filed the first one's
    new connection as the parent's (never closed here: its lease held for the
    child's life), or reset the pool's checkouts away (checkedout() -1, over
    pool_size). The child's figures also start from zero, not the parent's."""
    from sharedpool.contrib import _book
    from sharedpool.contrib import sqlalchemy as sp_sqlalchemy

    start_coordinator({"pg": 5})
    engine = engine_for(sock_path, app_name, pool_size=2, max_overflow=0, pool_timeout=5)
    assert backend_pid(engine)  # the parent used it: one idle connection, counters > 0

    def child() -> int:
        module = _book if pause == "book" else sp_sqlalchemy
        real = module.current_pid
        paused: list[int] = []

        def slow_pid() -> int:
            if threading.current_thread().name == "B" and not paused:
                paused.append(1)
                time.sleep(0.3)  # B switched out here
            return real()

        pool = engine.pool
        assert isinstance(pool, LeasedQueuePool)
        fresh_counts = pool.lease_stats()["leases_acquired"] == 0  # not the parent's
        module.current_pid = slow_pid  # type: ignore[assignment]
        done_b = threading.Event()

        def use(name: str) -> None:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                if name == "A":
                    done_b.wait(5)  # holds its connection until B is done
            if name == "B":
                done_b.set()

        run_staggered(use, "BA", 0.05)  # B first: it is the one switched out
        module.current_pid = real  # type: ignore[assignment]
        if pool.checkedout() != 0:
            return 4
        engine.dispose()
        if not no_leases_of(sock_path, os.getpid()):
            return 5  # a lease of this child outlived dispose()
        return 0 if fresh_counts else 3

    try:
        assert run_in_child(child) == 0  # 3: the parent's counts, 4: checkouts lost, 5: a lease kept
    finally:
        engine.dispose()


def test_sqlalchemy_1_is_refused_at_import_with_the_version_to_get() -> None:
    # SQLAlchemy 1.4 (no ConnectionPoolEntry) failed with "cannot import name
    # 'ConnectionPoolEntry'", which does not say that an upgrade is the way out.
    err = import_refused("import sqlalchemy.pool, sqlalchemy.pool.base\n"
                         "del sqlalchemy.pool.ConnectionPoolEntry, sqlalchemy.pool.base.ConnectionPoolEntry\n"
                         "import sharedpool.contrib.sqlalchemy\n")
    assert "ImportError: sharedpool.contrib.sqlalchemy needs SQLAlchemy >= 2.0" in err, err


def test_a_checkout_after_release_process_fails_at_once(pg: str, start_coordinator: Any,
                                                       sock_path: str, app_name: str) -> None:
    # The pooled connection release_process() closed kept its QueuePool record:
    # without pool_pre_ping the next checkout handed it out closed ("the
    # connection is closed" at its first query) instead of PoolClosed, as the
    # local pool, redis-py and a pre-pinging engine say.
    from sharedpool import PoolClosed, release_process

    start_coordinator({"pg": Resource(max_size=2)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        release_process(1.0)
        with pytest.raises(PoolClosed, match="release_process"):
            engine.connect()
        assert wait_leased(sock_path, 0) == 0
        assert BackendSampler(app_name).count_now() == 0
    finally:
        engine.dispose()


def test_a_reclaim_is_counted_before_its_lease_goes(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted after the close, the lease already released: the waiter was
    # served, and could read the stats, while leases_reclaimed still said 0.
    start_coordinator({"pg": Resource(max_size=1)})
    engine = engine_for(sock_path, app_name, pool_size=1, max_overflow=0)
    pool = engine.pool
    assert isinstance(pool, LeasedQueuePool)
    with engine.connect():
        pass  # the one lease, idle
    try:
        at_release = reclaimed_at_release(sock_path, "pg", lambda: pool.lease_stats()["leases_reclaimed"],
                                          monkeypatch)
    finally:
        engine.dispose()
    assert at_release == [1], at_release
