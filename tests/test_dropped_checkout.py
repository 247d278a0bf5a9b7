"""A checkout its caller dropped without a checkin comes back.

An asyncio task cancelled while a thread checks out for it (``wait_for`` around
``run_in_executor(None, pool.acquire)``, or ``to_thread(pool.connection().__enter__)``)
drops the result the thread then returns. That connection stayed in use for
good, its lease held until the process exited: with a cap of 1, every later
checkout of every process timed out. The pool now checks such a checkout back
in (maintenance round, close()); one its caller can still reach is left alone.
A ``pool.connection()`` whose context manager is dropped without its exit is
closed instead (its with statement is over: see tests/test_checkin_cut_short.py).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, pg_dsn
from proc_helpers import hammer, run_in_child, wait_leased

from sharedpool import ConnectionPool, PoolConfig
from sharedpool.maintenance import maintain_once
from sharedpool.unowned import take_back

WARNING = "dropped without a checkin"
#: A pool.connection() dropped without its exit: closed (wrapper._Checkout.__del__).
NEVER_CHECKED_IN = "was never checked in"


def _pool(app_name: str, sock_path: str, autocommit: bool = True) -> ConnectionPool[Any]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(pg_dsn(), application_name=app_name, autocommit=autocommit)
    return ConnectionPool(connect, PoolConfig(min_size=0, max_size=1), resource="pg",
                          coordinator=sock_path)


def _checkouts(pool: ConnectionPool[Any]) -> dict[str, Callable[[], Any]]:
    return {"acquire": lambda: pool.acquire(timeout=10),
            "connection-enter": lambda: pool.connection(timeout=10).__enter__()}


@pytest.mark.parametrize("how", ["acquire", "connection-enter"])
def test_a_checkout_whose_executor_future_was_cancelled_comes_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, how: str,
        caplog: pytest.LogCaptureFixture) -> None:
    start_coordinator({"pg": 1})
    pool = _pool(app_name, sock_path)
    checkout = _checkouts(pool)[how]
    gate = threading.Event()

    def late_checkout() -> Any:  # the thread outlives the task that awaited it
        gate.wait(10)
        return checkout()

    def next_request() -> int:
        with pool.connection(timeout=10) as conn:
            return int(conn.execute("SELECT 1").fetchone()[0])  # type: ignore[index]

    async def main() -> int:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.run_in_executor(None, late_checkout), 0.05)
        gate.set()
        deadline = time.monotonic() + 10
        while pool.get_in_use() == 0 and time.monotonic() < deadline:  # the dropped checkout is made
            await asyncio.sleep(0.01)
        assert pool.get_in_use() == 1
        return await asyncio.to_thread(next_request)  # timed out before: the cap's only lease was lost

    def other_process() -> int:  # its lease is one the coordinator can reclaim again
        other = _pool(app_name, sock_path)
        try:
            with other.connection(timeout=10) as conn:
                conn.execute("SELECT 1")
        finally:
            other.close(timeout=5)
        return 0

    try:
        with BackendSampler(app_name) as sampler:
            assert asyncio.run(main()) == 1
            assert pool.get_in_use() == 0
            assert run_in_child(other_process) == 0
        assert sampler.peak <= 1
        assert (WARNING if how == "acquire" else NEVER_CHECKED_IN) in caplog.text
    finally:
        pool.close(timeout=5)
    assert wait_leased(sock_path, 0) == 0


def test_a_dropped_checkout_left_in_a_transaction_is_rolled_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": 1})
    pool = _pool(app_name, sock_path, autocommit=False)
    try:
        wrapper = pool.acquire(timeout=10)
        conn = wrapper.conn
        conn.execute("SELECT pg_advisory_xact_lock(4242)")
        pid = conn.info.backend_pid
        del conn, wrapper
        maintain_once(pool)
        assert pool.get_in_use() == 0
        with pool.connection(timeout=5) as again:
            assert again.info.backend_pid == pid  # checked in, not closed: kept warm
            assert again.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            held = again.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                 "AND objid = 4242 AND pid = pg_backend_pid()").fetchone()
            assert held is not None and held[0] == 0  # the transaction's lock went with its rollback
            again.commit()
    finally:
        pool.close(timeout=5)


@pytest.mark.parametrize("keep", ["wrapper", "connection", "cursor", "context-manager"])
def test_a_checkout_its_caller_can_still_reach_is_left_alone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, keep: str) -> None:
    start_coordinator({"pg": 1})
    pool = _pool(app_name, sock_path)
    try:
        held: Any
        if keep == "wrapper":
            held = pool.acquire(timeout=10)
        elif keep == "context-manager":
            held = pool.connection(timeout=10)
            held.__enter__()  # the raw connection dropped: __exit__ still checks it in
        else:
            wrapper = pool.acquire(timeout=10)
            held = wrapper.conn if keep == "connection" else wrapper.conn.cursor()
            del wrapper  # only its connection (or a cursor of it) kept
        for _ in range(2):
            maintain_once(pool)
        assert pool.get_in_use() == 1
        if keep == "wrapper":
            pool.release(held)
        elif keep == "context-manager":
            held.__exit__(None, None, None)
        else:
            held.execute("SELECT 1")  # still usable: nobody else was handed it
            del held  # now nobody's: taken back
            maintain_once(pool)
        assert pool.get_in_use() == 0
    finally:
        pool.close(timeout=5)


def test_close_does_not_wait_for_a_dropped_checkout(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # close() waited its whole timeout for it, then left its lease held.
    start_coordinator({"pg": 1})
    pool = _pool(app_name, sock_path)
    pool._stop.set()  # no maintenance round: close() alone takes it back
    pool.acquire(timeout=10)
    assert pool.get_in_use() == 1
    t0 = time.monotonic()
    pool.close(timeout=20)
    assert time.monotonic() - t0 < 15
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_busy_checkouts_are_never_taken_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Every way the pool itself holds a checkout (fast path, waiters, openers,
    # checkins under way) counts as held: a take-back spinning beside busy
    # threads takes nothing, and no connection is ever used by two at once.
    start_coordinator({"pg": 2})
    pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True),
                          PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock_path)
    using: set[int] = set()
    shared: list[int] = []
    guard = threading.Lock()
    taken: list[int] = []
    stop = threading.Event()

    def use() -> None:
        with pool.connection(timeout=30) as conn:
            with guard:
                if id(conn) in using:
                    shared.append(id(conn))
                using.add(id(conn))
            conn.execute("SELECT 1")
            with guard:
                using.discard(id(conn))

    def spin() -> None:
        while not stop.is_set():
            taken.append(take_back(pool))

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        done, errors = hammer(4, 150, use)
    finally:
        stop.set()
        spinner.join(10)
        pool.close(timeout=5)
    assert (done, errors, shared) == (600, [], [])
    assert len(taken) > 0 and sum(taken) == 0


def test_a_with_checked_in_after_its_context_manager_was_finalized_is_not_closed_later(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # A generator cycle collected: the _Checkout made before the generator is
    # finalized first (its __del__ finds no checkin begun and records it as
    # dropped), then the generator's close runs its with's exit, which checks
    # the connection in, handing it to a waiter. The maintenance round, while
    # that waiter validated it (its checkout time not yet set), closed it under it.
    start_coordinator({"pg": 1})
    handed = threading.Event()
    go_on = threading.Event()
    armed = [False]

    def check(conn: psycopg.Connection[Any]) -> None:
        if armed[0]:
            armed[0] = False
            handed.set()
            go_on.wait(10)
        conn.execute("SELECT 1")

    pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True),
                          PoolConfig(min_size=0, max_size=1, test_on_acquire=True, validation_bypass=0.0),
                          resource="pg", coordinator=sock_path, check=check)
    pids: list[int] = []
    try:
        with pool.connection(timeout=10) as conn:  # checked in once: validated when handed over
            pids.append(conn.info.backend_pid)
        gc.disable()  # the cycle goes in the one collect() below
        try:
            cm = pool.connection(timeout=10)
            box: list[Any] = []
            gen = _in_a_generator(cm, box)
            box.append(gen)
            next(gen)
            del gen, box, cm
            waiter = threading.Thread(target=lambda: _pids_of(pool, pids))
            waiter.start()
            deadline = time.monotonic() + 10
            while pool.get_stats()["requests_waiting"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            armed[0] = True
            gc.collect()
        finally:
            gc.enable()
        assert handed.wait(10)
        maintain_once(pool)  # as the maintenance thread may, while the waiter validates
        go_on.set()
        waiter.join(10)
        assert pids[1:] == pids[:1]  # the same connection, not closed and replaced
        assert NEVER_CHECKED_IN not in caplog.text
    finally:
        go_on.set()
        pool.close(timeout=5)


def _in_a_generator(cm: Any, box: list[Any]) -> Iterator[None]:
    with cm:
        yield


def _pids_of(pool: ConnectionPool[Any], pids: list[int]) -> None:
    with pool.connection(timeout=10) as conn:
        pids.append(conn.info.backend_pid)
