"""A checkin cut short by a signal handler's exception (KeyboardInterrupt,
celery's soft time limit, gunicorn's SystemExit) in its transaction check,
its unsettled-connection warning or its rollback: the connection must not stay
checked out for good, its lease held (found by tests/fuzz_signals.py)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import psycopg
import pytest
from proc_helpers import wait_leased
from test_pool_edges import Interrupted as Traced
from test_pool_edges import _interrupting_at, run_traced

from sharedpool import Client, ConnectionPool, PoolConfig, checkin, closing, shutdown
from sharedpool import pool as pool_module

pytestmark = pytest.mark.pg


class Interrupted(Exception):
    """What a signal handler raises."""


def _pool(pg: str, app: str, sock: str) -> ConnectionPool[Any]:
    dsn = f"{pg} application_name={app}"
    return ConnectionPool(lambda: psycopg.connect(dsn, autocommit=False), PoolConfig(min_size=0, max_size=1),
                          resource="pg", coordinator=sock)


def _raise_once(monkeypatch: Any, owner: Any, name: str, exc: BaseException) -> list[bool]:
    """``owner.name`` (a module function or a bound method) raises ``exc`` at its next call."""
    real = getattr(owner, name)
    fired: list[bool] = []

    def once(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, once)
    return fired


@pytest.mark.parametrize("where", ["status-at-checkin", "status-after-error", "warning", "rollback"])
def test_a_checkin_cut_short_does_not_strand_the_connection(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, monkeypatch: Any, where: str) -> None:
    start_coordinator({"pg": 1})
    pool = _pool(pg, app_name, sock_path)
    try:
        with pool.connection() as conn:  # a connection to interrupt the checkin of
            conn.execute("SELECT 1")
            conn.commit()
        if where.startswith("status"):
            fired = _raise_once(monkeypatch, pool_module, "_txn_status", Interrupted())
        elif where == "warning":
            fired = _raise_once(monkeypatch, checkin.log, "log", KeyboardInterrupt())
        else:
            fired = _raise_once(monkeypatch, psycopg.Connection, "rollback", KeyboardInterrupt())
        with pytest.raises((Interrupted, KeyboardInterrupt)), pool.connection() as conn:
            if where != "status-at-checkin":
                conn.execute("SELECT 1")  # in a transaction: checked in unsettled
            if where in ("status-after-error", "rollback"):
                raise ValueError("the with block failed")
        assert fired
        assert pool.get_in_use() == 0, repr(pool)
        with pool.connection(timeout=5) as conn:  # max_size 1: only if it came back
            conn.execute("SELECT 1")
            conn.commit()
    finally:
        pool.close()
    assert wait_leased(sock_path, 0) == 0


def test_the_warning_is_still_said(pg: str, start_coordinator: Any, sock_path: str, app_name: str,
                                   caplog: Any) -> None:
    """The unsettled checkin's warning, moved under the guard, is still logged once."""
    start_coordinator({"pg": 1})
    pool = _pool(pg, app_name, sock_path)
    try:
        with caplog.at_level(logging.WARNING, logger="sharedpool"), pool.connection() as conn:
            conn.execute("SELECT 1")
        assert "checked in" in caplog.text
        assert pool.get_in_use() == 0
    finally:
        pool.close()


@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_checkin_cut_short_anywhere_in_release_leaves_nothing_in_use(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, in_transaction: bool) -> None:
    """Wherever a signal handler can run in release() and check_in_unsettled()
    (not in their callees): before, at the dict lookup and the status read
    ahead of the guarded part, the connection stayed in use for good."""
    start_coordinator({"pg": 1})
    codes = [ConnectionPool.release.__code__, checkin.check_in_unsettled.__code__]
    k = 0
    while True:
        pool = _pool(pg, app_name, sock_path)
        try:
            wrapper = pool.acquire(timeout=5)
            wrapper.conn.execute("SELECT 1")
            if not in_transaction:
                wrapper.conn.commit()
            tracer, fired = _interrupting_at(codes, k)
            run_traced(tracer, pool.release, wrapper)
            assert pool.get_in_use() == 0, (fired, repr(pool))
        finally:
            pool.close(timeout=2)
        assert wait_leased(sock_path, 0) == 0, fired
        if not fired:
            break
        k += 1
    assert k > 3  # the points were reached


def _nested(func: Any, name: str) -> Any:
    """The code of the function ``name`` defined in ``func``."""
    return next(c for c in func.__code__.co_consts if getattr(c, "co_name", None) == name)


def _interrupting_at_entry(code: Any) -> tuple[Any, list[str]]:
    """A tracer raising Interrupted at the entry of ``code`` in the main thread
    (a signal handler runs at every function's first instruction)."""
    import threading

    fired: list[str] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if (not fired and event == "call" and frame.f_code is code
                and threading.current_thread() is threading.main_thread()):
            fired.append(f"{code.co_name} entry")
            raise Traced("the signal handler raised")
        return None

    return tracer, fired


_WITH_EXITS = [
    ("clean", "__exit__"), ("clean", "release"), ("error", "__exit__"), ("error", "release_after_error"),
    ("clean", "release_slow"),  # release() hands an expired connection to it, past its own guard
    ("clean", "close_and_confirm"),  # ... which closes it, then gives its lease back
    ("clean", "Client.release"),
    ("clean", "close_counted.late"),  # ... which gives the lease back once confirmed
    *(("error", k) for k in range(4)),  # the calls ahead of release_after_error's guarded part
]


@pytest.mark.parametrize(("how", "where"), _WITH_EXITS)
def test_a_with_exit_cut_short_at_its_entry_leaves_nothing_in_use(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, how: str, where: Any) -> None:
    """``with pool.connection()``'s exit cut short where no guard can be: at the
    first instruction of its __exit__, or of the release()/release_after_error()
    it calls (and at the calls ahead of release_after_error's guard). Before,
    the connection stayed checked out for good, its lease held (max_size 1:
    every later checkout timed out). Now it is closed (it may be mid-query)
    and its lease released once the context manager is dropped."""
    from sharedpool.wrapper import _Checkout

    start_coordinator({"pg": 1})
    pool = _pool(pg, app_name, sock_path)
    slow = where in ("release_slow", "close_and_confirm", "Client.release", "close_counted.late")
    if slow:
        pool._max_lifetime = 0.05  # expired at its checkin: the slow way, closed
    try:
        if isinstance(where, int):
            tracer, fired = _interrupting_at([ConnectionPool.release_after_error.__code__], where)
        elif where == "close_counted.late":
            tracer, fired = _interrupting_at_entry(_nested(shutdown.close_counted, "late"))
        else:
            owner = {"__exit__": _Checkout, "release_slow": checkin, "close_and_confirm": closing,
                     "Client.release": Client}.get(where, ConnectionPool)
            tracer, fired = _interrupting_at_entry(getattr(owner, where.split(".")[-1]).__code__)
        try:
            with pool.connection(timeout=5) as conn:
                conn.execute("SELECT 1")
                if slow:
                    conn.commit()
                    time.sleep(0.1)
                sys.settrace(tracer)
                if how == "error":
                    raise ValueError("the with block failed")
        except (Traced, ValueError):
            pass
        finally:
            sys.settrace(None)
        assert fired, where
        with pool.connection(timeout=5) as conn:  # max_size 1: only if it came back
            conn.execute("SELECT 1")
            conn.commit()
    finally:
        pool.close(timeout=2)
    assert wait_leased(sock_path, 0) == 0


def test_a_checkin_cut_short_once_it_handed_the_connection_over_leaves_it_to_the_waiter(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A with block's exit after an error (release_after_error), cut short by a
    signal handler's exception once its checkin handed the connection to a
    waiting thread (at the waiter's wake-up call): before, the checkin's guard
    found the connection still in use on its own checkout (the waiter had not
    set its checkout time yet) and closed it, the waiter's connection."""
    import threading

    start_coordinator({"pg": 1})
    pool = _pool(pg, app_name, sock_path)
    got: list[Any] = []

    def waiter() -> None:
        try:
            # Woken at its deadline at the latest (the wake-up call was cut short).
            with pool.connection(timeout=3) as conn:
                got.append(conn.execute("SELECT 1").fetchone())
                conn.commit()
        except Exception as exc:  # noqa: BLE001 - reported below
            got.append(exc)

    thread = threading.Thread(target=waiter)
    try:
        tracer, fired = _interrupting_at_entry(threading.Event.set.__code__)
        try:
            with pool.connection(timeout=5) as conn:
                conn.execute("SELECT 1")
                thread.start()
                deadline = time.monotonic() + 10
                while pool.get_stats()["requests_waiting"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                sys.settrace(tracer)
                raise ValueError("the with block failed")
        except (Traced, ValueError):
            pass
        finally:
            sys.settrace(None)
        assert fired
        thread.join(15)
        assert got == [(1,)]
    finally:
        pool.close(timeout=2)
    assert wait_leased(sock_path, 0) == 0
