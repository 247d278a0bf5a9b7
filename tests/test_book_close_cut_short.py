"""A lease book's close() cut short by a signal handler's exception (celery's
soft time limit, Ctrl-C) in the main thread, where the integrations close
connections (SQLAlchemy's and redis-py's pools): the lease must come back once
the server has let go, never stay held for good."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from proc_helpers import wait_leased
from test_pool_edges import _interrupting_at, run_traced

from sharedpool import closing
from sharedpool.contrib._leases import LeaseBook

pytestmark = pytest.mark.pg


@pytest.mark.parametrize("via", [False, True])
def test_a_close_cut_short_anywhere_still_gives_the_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, via: bool) -> None:
    """Wherever a handler can run in LeaseBook.close() and close_and_confirm()
    (not in their callees), ``via``: with a closer, as SQLAlchemy's pool
    closes. Before, at the calls between taking the lease out of the book and
    the guarded close (a closer's _CloseVia, time.monotonic(), the close
    method's lookup), and at the close of the dup once confirmed, nobody held
    the lease any more: it stayed taken for the process's life."""
    start_coordinator({"pg": 60})  # room for the leases a failure leaves taken: all the points are seen
    codes = [LeaseBook.close.__code__, closing.close_and_confirm.__code__]
    dsn = f"{pg} application_name={app_name}"
    kept_taken = []
    k = 0
    while True:
        book = LeaseBook("pg", sock_path)
        try:
            conn = book.connect(lambda: psycopg.connect(dsn), timeout=5)
            tracer, fired = _interrupting_at(codes, k)
            run_traced(tracer, book.close, conn, (lambda c=conn: c.close()) if via else None)
            if any(e.key is conn for e in list(book._entries.values())):
                book.close(conn)  # cut short before it took anything: still tracked, as if not called
            del conn
            if wait_leased(sock_path, len(kept_taken), timeout=10) > len(kept_taken):
                kept_taken.append(fired)
        finally:
            book.shutdown()
        if not fired:
            break
        k += 1
    assert kept_taken == []
    assert k > 15, k  # the points were reached (23 and 25 in 3.11)


def test_a_close_cut_short_as_it_gives_the_lease_back_still_does(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A signal handler's exception at Client.release()'s first instruction,
    once the close is confirmed: the lease, still held, is released again
    (before, it stayed taken for the process's life)."""
    from test_checkin_cut_short import _interrupting_at_entry

    from sharedpool import Client

    start_coordinator({"pg": 1})
    book = LeaseBook("pg", sock_path)
    try:
        conn = book.connect(lambda: psycopg.connect(f"{pg} application_name={app_name}"), timeout=5)
        tracer, fired = _interrupting_at_entry(Client.release.__code__)
        run_traced(tracer, book.close, conn)
        assert fired
        assert wait_leased(sock_path, 0) == 0
    finally:
        book.shutdown()


def test_a_close_cut_short_as_it_counts_the_lease_given_back_leaves_none_closing(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """Wherever a handler can run in the close's late() (the confirmed close's
    lease given back and uncounted) and at _release()'s entry: the lease comes
    back and no close stays counted. Before, late() marked itself done first,
    and cut short after that, the book counted a close for good (an exit
    waited its whole timeout for it, and kept the session) and, at
    _release()'s entry, nobody gave the lease back."""
    from test_checkin_cut_short import _interrupting_at_entry

    from sharedpool.contrib._book import _Book

    start_coordinator({"pg": 60})
    late = next(c for c in LeaseBook.close.__code__.co_consts if getattr(c, "co_name", "") == "late")
    dsn = f"{pg} application_name={app_name}"
    left: list[tuple[list[str], int]] = []
    taken = 0
    k = 0
    while True:
        book = LeaseBook("pg", sock_path)
        try:
            conn = book.connect(lambda: psycopg.connect(dsn), timeout=5)
            at_entry = k == 0  # then each instant inside late()
            tracer, fired = (_interrupting_at_entry(_Book._release.__code__) if at_entry
                             else _interrupting_at([late], k - 1))
            run_traced(tracer, book.close, conn)
            if book._closing or wait_leased(sock_path, taken, timeout=10) > taken:
                left.append((fired, book._closing))
                taken = wait_leased(sock_path, taken, timeout=0)
        finally:
            book.shutdown()
        if not fired:
            break
        k += 1
    assert left == []
    assert k > 2, k  # the points were reached
