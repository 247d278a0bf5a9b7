"""A wait cut short by a BaseException that is no Exception (the SystemExit of
gunicorn's SIGQUIT handler in a sync worker, a KeyboardInterrupt), in the
integrations other than psycopg's and in the core pool: SQLAlchemy's checkout
(QueuePool's queue at the cap, the lease wait, a connect under way), redis-py's
get_connection (its queue, the lease wait), sharedpool's own acquire (its
waiters, the lease wait, a connect under way) and the Client's lease wait.

After each: no lease kept for the gone caller, no connection handed to it (the
pool's own counts), the next checkout served, and release_process() quick with
nothing left. Run in forked children: the signal must reach the main thread
(see test_psycopg_getconn_cut_short.py), and release_process() releases every
pool of the process. The waits that held (all but the lease granted as the
exit lands, and the connects cut short) were probed with KeyboardInterrupt too,
with the same results; kept with SystemExit only."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from pg_helpers import BackendSampler, pg_dsn
from proc_helpers import resource_row, run_forked, wait_leased

from sharedpool import Client, ConnectionPool, PoolConfig, Resource

pytestmark = pytest.mark.pg

EXITS: dict[str, type[BaseException]] = {"system_exit": SystemExit, "keyboard_interrupt": KeyboardInterrupt}
URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _cut_short(exit_name: str, wait: Callable[[], object],
               at_signal: Callable[[], object] | None = None, after: float = 0.3) -> bool:
    """Run ``wait()`` in this (the main) thread; ``after`` seconds in, a signal
    handler runs ``at_signal()`` and raises the exit. True if it cut the wait short."""
    exc = EXITS[exit_name]

    def stop(signum: int, frame: Any) -> None:
        if at_signal is not None:
            at_signal()
        if exc is SystemExit:
            sys.exit(0)  # as gunicorn's handle_quit()
        raise exc

    signal.signal(signal.SIGUSR1, stop)
    timer = threading.Timer(after, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    timer.start()
    try:
        wait()
    except exc:
        return True
    finally:
        timer.join()
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    return False


def _exit(out: dict[str, Any]) -> dict[str, Any]:
    from sharedpool import release_process

    t0 = time.monotonic()
    release_process(5.0)  # a worker's exit
    out["took"] = time.monotonic() - t0
    return out


def _after_the_cut(out: dict[str, Any], sock: str, lease_stats: Callable[[], dict[str, int]],
                   checkout: Callable[[], object]) -> dict[str, Any]:
    """The figures once a wait was cut short: the pool's leases and the
    coordinator's, the next checkout (its result and time), then the exit."""
    out["book_held"] = lease_stats()["leases_held"]
    row = resource_row(sock)
    out["leased"], out["waiting"] = row["leased"], row["waiting"]
    t0 = time.monotonic()
    out["next"] = checkout()
    out["next_took"] = time.monotonic() - t0
    _exit(out)
    out["held"] = lease_stats()["leases_held"]
    return out


def _assert_served_after_the_cut(child: dict[str, Any], sock: str) -> None:
    """Nobody left waiting; the next checkout and the exit quick; no lease left."""
    assert child["waiting"] == 0, child
    assert child["next"] and child["next_took"] < 2, child
    assert child["took"] < 2 and child["held"] == 0, child
    assert wait_leased(sock, 0) == 0


# ---------------------------------------------------------------- SQLAlchemy


def _sqlalchemy(sock: str, app: str, exit_name: str, where: str, handed: bool) -> dict[str, Any]:
    from sqlalchemy import event, text

    from sharedpool.contrib.sqlalchemy import create_engine

    # queue: QueuePool's own cap; lease: the coordinator's (cap 1); connect: the factory
    size = 2 if where == "lease" else 1
    engine = create_engine(URL, resource="pg", coordinator=sock, pool_size=size, max_overflow=0,
                           pool_timeout=10, connect_args={"application_name": app})
    pool: Any = engine.pool
    out: dict[str, Any] = {}
    held = None
    if where == "connect":
        slow = [True]

        @event.listens_for(engine, "do_connect")
        def _slow(*args: Any) -> None:  # the connect under way, its lease held
            if slow[0]:
                time.sleep(10)

        def after_cut() -> None:
            slow[0] = False
    else:
        held = engine.connect()
        held.execute(text("SELECT 1"))

        def after_cut() -> None:
            pass

    def give_back() -> None:
        if held is not None and not held.closed:
            held.close()

    out["cut_short"] = _cut_short(exit_name, engine.connect, give_back if handed else None)
    after_cut()
    out["leased_during"] = resource_row(sock)["leased"]
    give_back()
    out["checkedout"], out["checkedin"] = pool.checkedout(), pool.checkedin()

    def select_1() -> object:
        with engine.connect() as conn:
            return conn.execute(text("SELECT 1")).scalar_one()

    return _after_the_cut(out, sock, pool.lease_stats, select_1)


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize(("where", "handed"), [("queue", False), ("queue", True), ("lease", False),
                                               ("lease", True), ("connect", False)],
                         ids=["queue", "queue_handed", "lease", "lease_handed", "connect"])
def test_sqlalchemy_checkout_cut_short(pg: str, start_coordinator: Any, sock_path: str, app_name: str,
                                       exit_name: str, where: str, handed: bool) -> None:
    start_coordinator({"pg": Resource(max_size=1 if where == "lease" else 3)})
    [child] = run_forked(_sqlalchemy, sock_path, app_name, exit_name, where, handed)
    assert child["cut_short"], child
    assert child["checkedout"] == 0 and child["checkedin"] == (0 if where == "connect" else 1), child
    assert child["book_held"] == child["leased"] == (0 if where == "connect" else 1), child
    assert child["next"] == 1, child
    _assert_served_after_the_cut(child, sock_path)
    assert BackendSampler(app_name).count_now() == 0


# ---------------------------------------------------------------- redis-py


def _clients_named(name: str) -> int:
    r = redis.Redis(host="127.0.0.1", port=6379)
    try:
        return sum(1 for c in r.client_list() if c.get("name") == name)
    finally:
        r.close()


def _redis(sock: str, name: str, exit_name: str, where: str, handed: bool) -> dict[str, Any]:
    from sharedpool.contrib.redis import BlockingConnectionPool

    pool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=name, resource="redis",
                                  coordinator=sock, max_connections=2 if where == "lease" else 1,
                                  timeout=10)
    out: dict[str, Any] = {}
    held = pool.get_connection()
    given_back = [False]

    def give_back() -> None:
        if not given_back[0]:
            given_back[0] = True
            pool.release(held)

    out["cut_short"] = _cut_short(exit_name, pool.get_connection, give_back if handed else None)
    give_back()
    out["in_use"] = len(pool._get_in_use_connections())
    return _after_the_cut(out, sock, pool.lease_stats, redis.Redis(connection_pool=pool).ping)


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize(("where", "handed"), [("queue", False), ("queue", True), ("lease", False),
                                               ("lease", True)],
                         ids=["queue", "queue_handed", "lease", "lease_handed"])
def test_redis_get_connection_cut_short(start_coordinator: Any, sock_path: str, redis_name: str,
                                        exit_name: str, where: str, handed: bool) -> None:
    start_coordinator({"redis": Resource(max_size=1 if where == "lease" else 3)})
    [child] = run_forked(_redis, sock_path, redis_name, exit_name, where, handed)
    assert child["cut_short"], child
    assert child["in_use"] == 0, child
    assert child["book_held"] == child["leased"] == 1, child
    _assert_served_after_the_cut(child, sock_path)
    assert _clients_named(redis_name) == 0


# ---------------------------------------------------------------- sharedpool's own pool


def _core(sock: str, app: str, exit_name: str, where: str, handed: bool) -> dict[str, Any]:
    import psycopg

    slow = [where.startswith("connect")]

    def factory() -> Any:
        if slow[0]:  # a connect under way (in the pool's opener thread) as the wait is cut short
            time.sleep(0.6)
        return psycopg.connect(pg_dsn(), application_name=app, autocommit=True)

    cfg = PoolConfig(min_size=0, max_size=2 if where == "lease" else 1, acquire_timeout=10)
    pool: ConnectionPool[Any] = ConnectionPool(factory, cfg, resource="pg", coordinator=sock)
    out: dict[str, Any] = {}
    held = None if where.startswith("connect") else pool.acquire()

    def give_back() -> None:
        nonlocal held
        if held is not None:
            wrapper, held = held, None
            pool.release(wrapper)

    out["t0"] = time.monotonic()
    out["cut_short"] = _cut_short(exit_name, pool.acquire, give_back if handed else None)
    slow[0] = False
    give_back()
    if where == "connect_exit":  # the worker exits at once: the connect for nobody still runs
        _exit(out)
        out["held"] = pool.get_stats()["leases_held"]
        return out
    deadline = time.monotonic() + 3
    while pool.get_stats()["pool_available"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)  # the connect goes on, for the pool (as psycopg_pool's does)
    stats = pool.get_stats()
    out["available"], out["size"] = stats["pool_available"], stats["pool_size"]
    out["requests_waiting"] = stats["requests_waiting"]
    out["leased"] = wait_leased(sock, 1, timeout=2)
    out["waiting"] = resource_row(sock)["waiting"]
    t0 = time.monotonic()
    with pool.connection() as conn:
        out["next"] = conn.execute("SELECT 1").fetchone()[0]
    out["next_took"] = time.monotonic() - t0
    _exit(out)
    out["held"] = pool.get_stats()["leases_held"]
    return out


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize(("where", "handed"), [("queue", False), ("queue", True), ("lease", False),
                                               ("lease", True), ("connect", False), ("connect_exit", False)],
                         ids=["queue", "queue_handed", "lease", "lease_handed", "connect", "connect_exit"])
def test_core_acquire_cut_short(pg: str, start_coordinator: Any, sock_path: str, app_name: str,
                                exit_name: str, where: str, handed: bool) -> None:
    start_coordinator({"pg": Resource(max_size=1 if where == "lease" else 3)})
    [child] = run_forked(_core, sock_path, app_name, exit_name, where, handed)
    assert child["cut_short"], child
    if where != "connect_exit":
        assert child["requests_waiting"] == 0 and child["waiting"] == 0, child
        assert (child["available"], child["size"], child["leased"]) == (1, 1, 1), child
        assert child["next"] == 1 and child["next_took"] < 2, child
    assert child["took"] < 2 and child["held"] == 0, child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


# ---------------------------------------------------------------- Client


def _client(sock: str, exit_name: str, handed: bool) -> dict[str, Any]:
    holder, client = Client(sock, name="holder"), Client(sock, name="waiter")
    lease = holder.acquire("pg", 5)
    out: dict[str, Any] = {}
    out["cut_short"] = _cut_short(exit_name, lambda: client.acquire("pg", 10),
                                  (lambda: holder.release(lease)) if handed else None)
    if not handed:
        holder.release(lease)
    out["leased"] = wait_leased(sock, 0, timeout=2)  # not granted to the wait gone
    out["waiting"] = resource_row(sock)["waiting"]
    t0 = time.monotonic()
    client.release(client.acquire("pg", 2))
    out["next_took"] = time.monotonic() - t0
    holder.close()
    client.close()
    return out


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize("handed", [False, True], ids=["queued", "granted"])
def test_client_acquire_cut_short(start_coordinator: Any, sock_path: str, exit_name: str,
                                  handed: bool) -> None:
    start_coordinator({"pg": Resource(max_size=1)})
    [child] = run_forked(_client, sock_path, exit_name, handed)
    assert child["cut_short"], child
    assert child["leased"] == 0 and child["waiting"] == 0, child
    assert child["next_took"] < 1, child
    assert wait_leased(sock_path, 0) == 0


# ---------------------------------------------------------------- a lease granted as the exit lands


def _granted_then_cut(sock: str, app: str, exit_name: str, kind: str) -> dict[str, Any]:
    """SQLAlchemy's caller takes its lease itself: the exit lands just after the
    grant (a grant and gunicorn's SIGQUIT come together when the master stops
    every worker: one's exit frees the slot another waits for), at the first
    place a signal handler runs after it: as the lease wait returns (injected
    just after LeaseBook.acquire), or in SQLAlchemy's checkout before its
    connect (just before the pool's creator)."""
    from sqlalchemy import text

    from sharedpool.contrib._leases import LeaseBook
    from sharedpool.contrib.sqlalchemy import create_engine

    exc = EXITS[exit_name]
    fire = [False]
    real = LeaseBook.acquire

    def acquire(self: LeaseBook, *args: Any, **kwargs: Any) -> Any:
        got = real(self, *args, **kwargs)
        if fire[0] and kind != "empty_slot_checkout":
            fire[0] = False
            raise exc
        return got

    LeaseBook.acquire = acquire  # type: ignore[method-assign]  # this forked child's own
    engine = create_engine(URL, resource="pg", coordinator=sock, pool_size=1, max_overflow=0,
                           pool_timeout=10, connect_args={"application_name": app},
                           pool_recycle=0.2 if kind == "reconnect" else -1)
    pool: Any = engine.pool
    creator = pool._invoke_creator

    def invoke_creator(record: Any) -> Any:
        if fire[0] and kind == "empty_slot_checkout":
            fire[0] = False
            raise exc
        return creator(record)

    pool._invoke_creator = invoke_creator
    if kind != "new":  # else the pool's first connection
        with engine.connect() as conn:
            if kind.startswith("empty_slot"):  # its connection closed (invalidate, reclaim): its slot stays
                conn.invalidate()
    if kind == "reconnect":
        time.sleep(0.3)  # past pool_recycle: the next checkout reconnects inside SQLAlchemy's
    fire[0] = True
    out: dict[str, Any] = {}
    try:
        engine.connect()
    except exc:
        out["cut_short"] = True
    out["book_held"] = pool.lease_stats()["leases_held"]
    out["leased"] = resource_row(sock)["leased"]
    out["checkedout"] = pool.checkedout()
    with engine.connect() as conn:
        out["next"] = conn.execute(text("SELECT 1")).scalar_one()
    out["after_next"] = pool.lease_stats()["leases_held"]
    _exit(out)
    out["held"] = pool.lease_stats()["leases_held"]
    return out


@pytest.mark.parametrize("exit_name", list(EXITS))
@pytest.mark.parametrize("kind", ["new", "empty_slot", "empty_slot_checkout", "reconnect"])
def test_sqlalchemy_lease_granted_as_the_exit_lands_goes_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, exit_name: str, kind: str) -> None:
    start_coordinator({"pg": Resource(max_size=3)})
    [child] = run_forked(_granted_then_cut, sock_path, app_name, exit_name, kind)
    assert child.get("cut_short"), child
    # Before: 1 lease held by nothing until the process ended (2 after the next checkout).
    assert child["book_held"] == child["leased"] == child["checkedout"] == 0, child
    assert child["next"] == 1 and child["after_next"] == 1, child
    assert child["took"] < 2 and child["held"] == 0, child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


# ---------------------------------------------------------------- a connect cut short is no failed connect


def _connects_cut_short(sock: str, name: str, exit_name: str, kind: str) -> dict[str, Any]:
    from sharedpool.records import FAILURE_THRESHOLD

    if kind == "redis":
        from redis.connection import Connection

        from sharedpool.contrib.redis import BlockingConnectionPool

        real = Connection._connect

        def slow_connect(self: Any) -> Any:
            time.sleep(10)
            return real(self)

        Connection._connect = slow_connect  # type: ignore[method-assign]  # this forked child's own
        pool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=name, resource="redis",
                                      coordinator=sock, max_connections=2, timeout=10)
        checkout: Callable[[], object] = pool.get_connection
    else:
        from sqlalchemy import event

        from sharedpool.contrib.sqlalchemy import create_engine

        engine = create_engine(URL, resource="pg", coordinator=sock, pool_size=2, max_overflow=0,
                               pool_timeout=10, connect_args={"application_name": name})

        @event.listens_for(engine, "do_connect")
        def _slow(*args: Any) -> None:
            time.sleep(10)

        checkout = engine.connect
    out: dict[str, Any] = {"cut_short": 0}
    for _ in range(FAILURE_THRESHOLD):  # as many workers stopped mid-connect
        out["cut_short"] += _cut_short(exit_name, checkout, after=0.1)
    deadline = time.monotonic() + 1  # the failures' report goes out in the background
    while not (failing := resource_row(sock)["failing"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    out["failing"] = failing
    return out


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize("kind", ["sqlalchemy", "redis"])
def test_connects_cut_short_by_the_exit_are_no_failed_connects(
        pg: str, start_coordinator: Any, sock_path: str, redis_name: str, exit_name: str, kind: str) -> None:
    # Before: each was reported a failed connect, and five had the coordinator
    # refuse every process's leases of the resource as failing.
    resource = "redis" if kind == "redis" else "pg"
    start_coordinator({resource: Resource(max_size=3)})
    [child] = run_forked(_connects_cut_short, sock_path, redis_name, exit_name, kind)
    assert child["cut_short"] == 5 and not child["failing"], child
    client = Client(sock_path)
    try:
        client.release(client.acquire(resource, 1))
    finally:
        client.close()
    assert wait_leased(sock_path, 0) == 0


# ---------------------------------------------------------------- cut short as the book's own steps start


def _book_step_cut(sock: str, app: str, exit_name: str, step: str, kind: str) -> dict[str, Any]:
    """The exit lands as a LeaseBook step starts (its first line, where a signal
    handler runs): ``open_under`` (the lease granted, nothing opened yet) or
    ``rekey`` (the connection made, not yet under its own key). The exception
    is kept a moment, as a handler up the stack would: its frames hold the
    connection made."""
    import gc

    from sqlalchemy import text

    from sharedpool.contrib._leases import LeaseBook
    from sharedpool.contrib.sqlalchemy import create_engine

    exc = EXITS[exit_name]
    fire = [False]
    real = getattr(LeaseBook, step)

    def cut(self: LeaseBook, *args: Any, **kwargs: Any) -> Any:
        if fire[0]:
            fire[0] = False
            raise exc
        return real(self, *args, **kwargs)

    setattr(LeaseBook, step, cut)  # this forked child's own
    engine = create_engine(URL, resource="pg", coordinator=sock, pool_size=1, max_overflow=0,
                           pool_timeout=10, connect_args={"application_name": app},
                           pool_recycle=0.2 if kind == "reconnect" else -1)
    pool: Any = engine.pool
    if kind != "new":
        with engine.connect() as conn:
            if kind == "empty_slot":
                conn.invalidate()
    if kind == "reconnect":
        time.sleep(0.3)  # past pool_recycle: LeaseBook.connect, inside SQLAlchemy's checkout
    time.sleep(0.3)  # the previous connection's close confirmed, its lease back
    fire[0] = True
    out: dict[str, Any] = {}
    kept: BaseException | None = None
    try:
        engine.connect()
    except exc as e:
        kept = e
    out["cut_short"] = kept is not None
    time.sleep(0.3)  # a lease given back reaches the coordinator
    # Leases first: a close under way (its lease goes back once the backend is
    # gone, I1) can end between the two reads; read the other way round, a
    # backend seen just before it left and its lease back just after broke
    # leased >= backends with nothing wrong.
    out["leased"] = resource_row(sock)["leased"]
    out["backends"] = BackendSampler(app).count_now()
    kept = None
    gc.collect()  # the connection made (if any) closed: its lease goes back after
    out["book_held"] = pool.lease_stats()["leases_held"]
    out["leased_after"] = wait_leased(sock, 0)
    with engine.connect() as conn:
        out["next"] = conn.execute(text("SELECT 1")).scalar_one()
    _exit(out)
    out["held"] = pool.lease_stats()["leases_held"]
    return out


@pytest.mark.parametrize("exit_name", ["system_exit"])  # KeyboardInterrupt: the same paths
@pytest.mark.parametrize(("step", "kind"), [("open_under", "new"), ("open_under", "empty_slot"),
                                            ("rekey", "new"), ("rekey", "reconnect")])
def test_sqlalchemy_cut_short_as_a_book_step_starts(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, exit_name: str, step: str,
        kind: str) -> None:
    # Before: open_under, from the creator: the lease under a placeholder nobody
    # referred to, held for the life of the process. rekey, from LeaseBook.connect:
    # the lease given back at once, the connection made still open (1 backend, 0
    # leased); from the creator: held for the life of the process.
    start_coordinator({"pg": Resource(max_size=3)})
    [child] = run_forked(_book_step_cut, sock_path, app_name, exit_name, step, kind)
    assert child["cut_short"], child
    assert child["leased"] >= child["backends"], child
    assert child["book_held"] == child["leased_after"] == 0, child
    assert child["next"] == 1 and child["took"] < 2 and child["held"] == 0, child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


@pytest.mark.parametrize(("raised", "failing"), [("Timeout", True), ("GreenletExit", False)])
def test_a_gevent_timeout_on_a_connect_is_a_failed_connect_a_greenlet_killed_is_not(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, raised: str, failing: bool) -> None:
    # gevent.Timeout is a BaseException a user puts around a connect that hangs:
    # as celery's soft limit it counts for fail-fast (before the review, any
    # BaseException was left out). A greenlet killed (GreenletExit) is the
    # worker going away, as a SystemExit.
    gevent = pytest.importorskip("gevent")
    from sqlalchemy import event

    from sharedpool.contrib.sqlalchemy import create_engine
    from sharedpool.records import FAILURE_THRESHOLD

    start_coordinator({"pg": Resource(max_size=3)})
    engine = create_engine(URL, resource="pg", coordinator=sock_path, pool_size=2, max_overflow=0,
                           pool_timeout=10, connect_args={"application_name": app_name})

    @event.listens_for(engine, "do_connect")
    def _cut(*args: Any) -> None:
        raise getattr(gevent, raised)()

    try:
        for _ in range(FAILURE_THRESHOLD):
            with pytest.raises(BaseException) as err:
                engine.connect()
            assert type(err.value).__name__ == raised
        deadline = time.monotonic() + (3 if failing else 1)  # the reports go out in the background
        while not resource_row(sock_path)["failing"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert resource_row(sock_path)["failing"] is failing
    finally:
        engine.dispose()
    assert wait_leased(sock_path, 0) == 0
