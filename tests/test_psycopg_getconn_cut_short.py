"""sharedpool.contrib.psycopg: a getconn() cut short by a BaseException that is
no Exception (the SystemExit of gunicorn's SIGQUIT handler in a sync worker,
a KeyboardInterrupt), and a worker's exit (release_process) with a connection
still handed to its exiting thread.

psycopg_pool's sync WaitingClient gives up only on an Exception: the caller
stayed queued, and the next connection was handed to nobody. In CI (Django
under gunicorn, test_a_quick_stop_mid_request_does_not_wait_for_djangos_connection)
the worker's exit then waited its whole close_timeout for that connection:
"gunicorn took 21.1 s to stop". Run in forked children: the signal must reach
the main thread, and release_process() releases every pool of the process."""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

import psycopg_pool
import pytest
from pg_helpers import BackendSampler, pg_dsn
from proc_helpers import run_forked, wait_leased

from sharedpool import Resource
from sharedpool.contrib.psycopg import ConnectionPool

pytestmark = pytest.mark.pg


def _pool(sock: str, app: str) -> ConnectionPool[Any]:
    return ConnectionPool(pg_dsn(), resource="pg", coordinator=sock, min_size=0, max_size=1, timeout=10,
                          kwargs={"application_name": app, "autocommit": True})


def _getconn_cut_short(sock: str, app: str, handed_meanwhile: bool) -> dict[str, Any]:
    from sharedpool import release_process

    pool = _pool(sock, app)
    held = pool.getconn()  # max_size 1: the next getconn() waits in psycopg_pool's queue

    def stop(signum: int, frame: Any) -> None:
        if handed_meanwhile:  # the connection comes to the waiter as the exit begins
            pool.putconn(held)
        sys.exit(0)  # as gunicorn's handle_quit()

    signal.signal(signal.SIGUSR1, stop)
    timer = threading.Timer(0.3, signal.pthread_kill, (threading.get_ident(), signal.SIGUSR1))
    timer.start()
    out: dict[str, Any] = {}
    try:
        pool.getconn()
    except SystemExit:
        out["cut_short"] = True
    timer.join()
    if not handed_meanwhile:
        pool.putconn(held)  # to the queue's first caller: the one gone, before
    out["available"] = pool.get_stats()["pool_available"]
    t0 = time.monotonic()
    release_process(5.0)  # gunicorn's worker_exit
    out["took"] = time.monotonic() - t0
    out["held"] = pool.get_stats()["leases_held"]
    return out


@pytest.mark.parametrize("handed_meanwhile", [False, True], ids=["queued", "handed"])
def test_a_getconn_cut_short_by_system_exit_leaves_no_connection_to_nobody(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, handed_meanwhile: bool) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    [child] = run_forked(_getconn_cut_short, sock_path, app_name, handed_meanwhile)
    assert child.get("cut_short"), child
    assert child["available"] == 1, child  # back in the pool, not with the gone caller
    assert child["took"] < 2, child  # not release_process's 5 s
    assert child["held"] == 0, child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def _exit_holding_a_checkout(sock: str, app: str, ready: bool) -> dict[str, Any]:
    from sharedpool import release_process

    pool = _pool(sock, app)
    if ready:  # taken from the pool's idle ones, not opened for this caller's wait
        pool.putconn(pool.getconn())
    conn = pool.getconn()  # this thread's, as a sync worker's request cut short after getconn()
    t0 = time.monotonic()
    release_process(5.0)
    return {"took": time.monotonic() - t0, "closed": conn.closed, "held": pool.get_stats()["leases_held"]}


@pytest.mark.parametrize("ready", [False, True], ids=["opened_for_it", "ready_in_the_pool"])
def test_release_process_closes_at_once_a_checkout_of_the_exiting_thread(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, ready: bool) -> None:
    # Nobody checks it in while this thread waits in release_process(): it
    # waited the whole timeout. Another thread's checkout is still waited for
    # (test_release_process_waits_for_a_query_in_flight).
    start_coordinator({"pg": Resource(max_size=2)})
    [child] = run_forked(_exit_holding_a_checkout, sock_path, app_name, ready)
    assert child["took"] < 2, child
    assert child["closed"] and child["held"] == 0, child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_a_pool_made_with_open_false_under_psycopg_pool_3_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg_pool 3.2 (pyproject: >= 3.2.8) makes its lock at open(), not in
    __init__ as 3.3 does; emulated here. Before: ConnectionPool(open=False)
    raised AttributeError '_lock' (the queue swapped under it), as did get_stats()
    and close() of a pool never opened."""
    init = psycopg_pool.ConnectionPool.__init__

    def lock_made_at_open(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if self._closed:
            self.__dict__.pop("_lock", None)  # as psycopg_pool 3.2.8's __init__ leaves it

    monkeypatch.setattr(psycopg_pool.ConnectionPool, "__init__", lock_made_at_open)
    pool = ConnectionPool("dbname=test", resource="pg", coordinator="/tmp/sp-no.sock", open=False)
    assert pool.get_stats()["requests_waiting"] == 0
    pool.close()


def test_a_waiter_given_up_never_marks_a_connection_as_its_threads() -> None:
    """psycopg_pool pops a waiter its caller gave up (a SystemExit in getconn())
    and tries to set it a connection, then the next caller. Before: the book was
    told the connection was the gone caller's thread's until set() failed, and
    that thread's release_for_exit(), reading the book without the pool's lock,
    could close it at once on its way to the next caller."""
    from psycopg_pool.pool import WaitingClient

    from sharedpool.contrib._leases import LeaseBook
    from sharedpool.contrib._waiters import Waiter

    book = LeaseBook("r", None, lends=True)
    conn = book.connect(object, 1.0)
    seen: list[int | None] = []

    class Watched(WaitingClient[Any]):
        def set(self, conn: Any) -> bool:
            seen.append(book.handed_to(conn))
            return super().set(conn)

    waiter = Waiter(Watched(), book)
    assert waiter.give_up(SystemExit(0)) is None
    assert not waiter.set(conn)  # psycopg_pool's _return_connection, in another thread
    assert threading.get_ident() not in seen and book.handed_to(conn) is None, seen
