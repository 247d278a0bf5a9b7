"""LeaseBook (what every contrib integration leases through) on its own, with
plain TCP sockets as connections: what it reports while a close is unconfirmed."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_coordinator import FakeCoordinator, GrantCrossingCancel
from proc_helpers import (
    collect_inside_a_put,
    interrupt_once,
    leased,
    no_leases_of,
    no_thread_for_reports,
    other_sessions,
    resource_row,
    run_forked,
    run_in_child,
    run_staggered,
    sharedpool_logs_queued_gc_off,
    wait_leased,
)
from servers import wait_for

from sharedpool import Client, Resource
from sharedpool import protocol as p
from sharedpool.contrib._leases import LeaseBook


@contextlib.contextmanager
def leased_socket(book: LeaseBook) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection opened through ``book`` (under a lease) to a local
    server: yields (our end, the server's end); the server's end is closed on
    the way out, which lets a close of ours be confirmed."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn = book.connect(lambda: socket.create_connection(server.getsockname()))
        peer, _ = server.accept()
        try:
            yield conn, peer
        finally:
            peer.close()


def test_a_lease_still_closing_counts_as_held(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with leased_socket(book) as (conn, _):
        assert book.stats()["leases_held"] == 1
        # The server has not let go (a busy backend): the lease stays out,
        # and the book says so, as the coordinator does.
        assert not book.close(conn)
        stats = book.stats()
        assert stats["leases_held"] == 1 and stats["leases_closing"] == 1, stats
        assert leased(sock_path) == 1
    deadline = time.monotonic() + 5
    while book.stats()["leases_held"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = book.stats()
    assert stats["leases_held"] == 0 and stats["leases_closing"] == 0, stats
    assert stats["closes_unconfirmed"] == 1 and stats["leases_released"] == 1
    assert wait_leased(sock_path, 0) == 0
    book.shutdown()


def test_the_books_warnings_say_they_are_sharedpools(start_coordinator: Any, sock_path: str,
                                                     caplog: Any) -> None:
    """gunicorn's and celery's log formats show no logger name: the integrations'
    warnings lead with 'sharedpool: ', but a connection opened again under its
    lease, and a close the server had not confirmed, still read "a 'pg'
    connection re-opened..." and "'pg': the server has not dropped...", pointing nowhere."""
    caplog.set_level(logging.WARNING, logger="sharedpool")
    start_coordinator({"pg": Resource(max_size=2)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    key = object()
    try:
        book.acquire(key, timeout=5)
        book.acquire(key, timeout=5)  # opened again with no close: its old lease goes back
        book.unused(key)
        with leased_socket(book) as (conn, _):
            assert not book.close(conn)  # the server has not let go
        said = [r.getMessage() for r in caplog.records
                if r.name.startswith("sharedpool") and r.levelno >= logging.WARNING]
        assert any("re-opened without being closed" in m for m in said), said
        assert any("has not dropped a connection" in m for m in said), said
        assert all(m.startswith("sharedpool: ") for m in said), said
    finally:
        book.shutdown()
    assert wait_leased(sock_path, 0) == 0


def test_a_lease_the_restarted_coordinator_refuses_is_dropped(start_coordinator: Any,
                                                              sock_path: str) -> None:
    """Restarted without the resource, the coordinator cannot re-register the
    book's lease. The host library owns the connection, so the book does not
    close it, but stops counting, reporting and releasing that lease."""
    first = start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with leased_socket(book) as (conn, _):
        assert book.stats()["leases_held"] == 1
        first.kill()
        start_coordinator({"other": Resource(max_size=1)})
        deadline = time.monotonic() + 10
        while book.stats()["leases_held"]:
            assert time.monotonic() < deadline, "the refused lease is still counted as held"
            time.sleep(0.02)
        assert book._states() == [] and book.client is not None and book.client.held == {}
        book.close(conn)  # closed by its owner later: nothing to release
        stats = book.stats()
        assert stats["leases_released"] == 0 and stats["leases_closing"] == 0, stats
    book.shutdown()


def test_failing_bookkeeping_loses_no_lease(start_coordinator: Any, sock_path: str,
                                            monkeypatch: Any) -> None:
    """Reporting connect and close times can fail (a thread that cannot start):
    the connect still counts, and the close still gives the lease back."""
    def broken(*_: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Client, "report_cost", broken)  # what a thread that cannot start does
    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=2.0)
    with leased_socket(book) as (conn, peer):
        assert book.stats()["leases_held"] == 1
        peer.close()  # the server lets go as soon as we do
        assert book.close(conn)
    assert book.stats()["leases_held"] == 0
    assert wait_leased(sock_path, 0) == 0
    book.shutdown()


def _book_with_a_session(start_coordinator: Any, sock_path: str) -> LeaseBook:
    """A book of resource "pg" (cap 2) that has had a connection: its session is up."""
    start_coordinator({"pg": Resource(max_size=2)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with leased_socket(book):
        pass
    return book


def test_a_drain_heard_by_the_parent_does_not_stick_in_a_forked_child(
        start_coordinator: Any, sock_path: str) -> None:
    # Before, the child inherited the drain and, its own session opening after
    # the resume was pushed, closed every connection at checkin for good.
    book = _book_with_a_session(start_coordinator, sock_path)
    book._on_admin("drain")
    assert book._admin_state == "draining"

    def child() -> int:
        book._checkpid()
        return 0 if book._admin_state is None else 3

    assert run_in_child(child) == 0
    book._on_admin("resume")


def test_a_drain_ordered_while_an_integration_had_no_session_is_heard_at_its_welcome(
        start_coordinator: Any, sock_path: str) -> None:
    book = _book_with_a_session(start_coordinator, sock_path)
    client = book.client
    assert client is not None
    for handler in list(client._push_handlers):  # what a reconnect's welcome runs
        handler("welcome", None, {"resources": {"pg": {"draining": True}}})
    assert book._admin_state == "draining"  # before: ignored, its connections kept serving
    for handler in list(client._push_handlers):
        handler("welcome", None, {"resources": {"pg": {"draining": False}}})
    assert book._admin_state is None


def test_a_collected_books_handlers_go_even_when_collected_mid_registration(tmp_path: Any) -> None:
    # The garbage collector may run a dropped book's finalizer inside another
    # book's registration (same thread, at any allocation): its removal was
    # overwritten by the registration's copy of the list, and the dead book's
    # handlers stayed (the session could never end). Swept over collection points.
    import gc

    from sharedpool.client import Client

    path = str(tmp_path / "none.sock")  # registering handlers needs no session
    client = Client.for_path(path)
    gc.collect()
    gc.freeze()  # every collection below looks at this test's objects only: ~10x faster
    try:
        for threshold in range(1, 120):
            client = Client.for_path(path)  # the last book's shutdown() closed the one before
            gc.collect()
            gc.disable()
            try:
                dead = LeaseBook("pg", path)
                assert dead.client is client
                dead.cycle = dead  # type: ignore[attr-defined]  # only the cyclic collector frees it
                del dead
                live = LeaseBook("pg", path)
                gc.set_threshold(threshold)
                gc.enable()
                assert live.client is client  # registers its three handlers
            finally:
                gc.disable()
                gc.set_threshold(700)
                gc.enable()
            gc.collect()
            live.shutdown()
            del live
            gc.collect()
            client.remove_handlers()  # nothing named: only what finalizers queued
            assert (client._push_handlers, client._state_providers) == ([], []), threshold
            assert not any(client._reclaim_handlers.values()), threshold
    finally:
        gc.unfreeze()
        client.close()


def test_an_acquire_interrupted_as_it_returns_is_forgotten_too(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    # Withdrawn, but left in the client's pending requests (no wait() would
    # ever pop it): the client counted as busy for good, so the session could
    # not end with the last pool, and it was made again after every restart.
    import pytest

    from sharedpool.contrib import _acquiring

    start_coordinator({"r": 1})
    book = LeaseBook("r", sock_path)
    # After request() returned, before the caller holds the ticket.
    interrupt_once(monkeypatch, _acquiring._CancellableAcquire, "__init__", KeyboardInterrupt(), after=True)
    with pytest.raises(KeyboardInterrupt):
        book.acquire(object(), 3, local=lambda: None)
    client = book.client
    assert client is not None and not client._pending
    assert wait_leased(sock_path, 0) == 0
    book.shutdown()
    assert client.close_if_unused()


def test_a_collected_books_handlers_do_not_keep_the_session_wanted(
        start_coordinator: Any, sock_path: str) -> None:
    # The last book of a process collected: its handlers were only queued, and
    # nothing dropped them; the client still wanted a session (it would make
    # one again after a coordinator restart, with no pool left).
    import gc

    from sharedpool.testing import FakeConnection

    start_coordinator({"r": 2})
    book = LeaseBook("r", sock_path)
    conn = book.connect(FakeConnection, 3)
    book.close(conn, conn.close)
    client = book.client
    assert client is not None and client._push_handlers
    del book, conn
    gc.collect()
    deadline = time.monotonic() + 3
    while (client._push_handlers or client._state_providers) and time.monotonic() < deadline:
        time.sleep(0.02)  # the background thread, woken by the finalizer, drops them
    assert not client._push_handlers and not client._state_providers
    assert not client._wants_session()
    client.close()


def test_a_thread_of_a_child_arriving_mid_reset_waits_for_it(start_coordinator: Any, sock_path: str) -> None:
    # The book's reset in a forked child set the pid first: thread B, arriving
    # just after, skipped the fork lock and filed its lease in the old entries,
    # which thread A then replaced: B's lease was never released. A pause in the
    # reset (its first lock made) stands in for the thread switch.
    import threading
    import types

    from sharedpool.contrib import _book
    from sharedpool.testing import FakeConnection

    start_coordinator({"r": 5})
    book = LeaseBook("r", sock_path)
    parents = book.connect(FakeConnection, 3)

    def child() -> int:
        real_threading = _book.threading
        paused: list[int] = []

        class Slow(types.ModuleType):
            def __getattr__(self, name: str) -> Any:
                return getattr(real_threading, name)

            def Lock(self) -> Any:  # noqa: N802 - threading's name
                if threading.current_thread().name == "A" and not paused:
                    paused.append(1)
                    time.sleep(0.5)
                return real_threading.Lock()

        _book.threading = Slow("threading")  # type: ignore[assignment]
        got: dict[str, Any] = {}

        def run(name: str) -> None:
            got[name] = book.connect(FakeConnection, 3)

        run_staggered(run, "AB", 0.1)
        _book.threading = real_threading
        for conn in got.values():
            book.close(conn, conn.close)
        return 0 if no_leases_of(sock_path, os.getpid()) else 7  # 7: a lease kept after both were closed

    try:
        assert run_in_child(child) == 0
    finally:
        book.close(parents, parents.close)


class _GrantThenRevoke(FakeCoordinator):
    """Revokes each lease in the frame right after its grant: the client has
    forgotten it before the book records the connection it is for."""

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Acquire):
            with self.lock:
                self.next_lease += 1
                lease = self.next_lease
            s.sendall(p.encode(p.Grant(msg.req, lease, msg.resource, lease))
                      + p.encode(p.Push("revoke", msg.resource, {"lease": lease, "why": "test"})))
        else:
            super().on_message(idx, s, conn, msg)


def test_a_lease_revoked_as_it_is_granted_is_not_kept(sock_path: str) -> None:
    """A revoke arriving between the grant and the book's record of it found
    no entry to mark: the connection opened under it was kept at checkin and
    counted against no cap (the client had forgotten the lease)."""
    fake = _GrantThenRevoke(sock_path)
    book = LeaseBook("r", coordinator=sock_path)
    try:
        key = object()
        for _ in range(5):  # the revoke may be read before or after the record: both ways
            book.acquire(key, timeout=5)
            assert book.revoked(key) and book.owes_back(key), "a revoked lease was kept"
            book.close(key, closer=lambda: None)
        assert book._revoked == 0
    finally:
        book.shutdown()
        fake.stop()


def test_a_book_replaces_a_shared_client_closed_under_it(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    # An integration pool's shutdown() ends the shared session (close_if_unused)
    # when nothing uses it: between another book's for_path() and its handlers
    # going in, that book registered on the closed client and its acquire
    # failed with CoordinatorUnavailable("client is closed").
    start_coordinator({"r": 1})
    book = LeaseBook("r", sock_path)
    register = LeaseBook._register

    def closed_first(self: LeaseBook, client: Client) -> None:
        monkeypatch.setattr(LeaseBook, "_register", register)  # once
        client.close()  # what the other pool's close_if_unused() did
        register(self, client)

    monkeypatch.setattr(LeaseBook, "_register", closed_first)
    key = object()
    book.acquire(key, 3, local=lambda: None)
    client = book.client
    assert client is not None and not client.closed and len(client.held) == 1
    book.opened(key, failed=True)
    book.shutdown()
    assert client.closed


def _queued_lease_wait(book: LeaseBook, local: Any, got: list[object]) -> tuple[threading.Thread, Client]:
    """``book.acquire(local=local)`` in a thread, its outcome (or exception) put in
    ``got``; returned once its acquire is queued at the coordinator, with the book's client."""

    def wait() -> None:
        try:
            got.append(book.acquire(object(), 5, local=local))
        except BaseException as exc:  # noqa: BLE001 - looked at by the caller
            got.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    client = book.client
    assert client is not None
    wait_for(lambda: client._pending, 5, "the acquire to be queued")
    return waiter, client


def test_shutdown_during_a_lease_wait_still_ends_the_session(start_coordinator: Any, sock_path: str) -> None:
    # A pool closed while one of its lease waits was queued (a psycopg_pool
    # worker at close): shutdown()'s close_if_unused() found the acquire pending,
    # and when it was withdrawn nobody asked again: the session stayed for good.
    start_coordinator({"r": 1})
    other = Client(sock_path)
    held = other.acquire("r", timeout=5)
    book = LeaseBook("r", sock_path)
    closing = threading.Event()
    got: list[object] = []
    waiter, client = _queued_lease_wait(book, lambda: True if closing.is_set() else None, got)
    book.shutdown()  # the acquire is still queued: the session stays for now
    closing.set()
    book.notify_returned()
    waiter.join(5)
    deadline = time.monotonic() + 3
    while not client.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert got == [True], got
    assert client.closed, "the session outlived the book's last lease wait"
    other.release(held)
    other.close()


def test_a_wait_no_longer_needed_when_its_session_ends_is_not_an_error(
        start_coordinator: Any, sock_path: str) -> None:
    """release_process(): the book is marked exited (its lease waits are no
    longer needed), then its session is closed. A wait that woke only after
    the close's error came in raised that error: psycopg_pool logged "error
    connecting in 'pool-1': client closed" for the top-up and retried it (the
    test_contrib_psycopg flake, 1 run in 10)."""
    from threading import Condition

    start_coordinator({"r": 1})
    other = Client(sock_path)
    held = other.acquire("r", timeout=5)
    book = LeaseBook("r", sock_path)

    class WakesAfterTheError(Condition):
        # The waiter, notified by release_for_exit(), is descheduled until the
        # helper thread has recorded the session's end.
        def wait(self, timeout: float | None = None) -> bool:
            woke = super().wait(timeout)
            while book.exited and not all(w.done for w in book._waits):
                super().wait(0.05)
            return woke

    book._returned = WakesAfterTheError()
    got: list[object] = []
    waiter, client = _queued_lease_wait(book, lambda: True if book.closed_reason() else None, got)
    book.release_for_exit(1.0)
    client.close(1.0)  # as release_process() ends each session
    waiter.join(5)
    assert got == [True], got
    other.release(held)
    other.close()


class _SoftTimeLimit(Exception):
    """What a signal handler raises mid-connect (celery's SoftTimeLimitExceeded)."""


def test_a_connect_cut_short_once_its_socket_exists_keeps_the_lease_until_the_server_lets_go(
        start_coordinator: Any, sock_path: str) -> None:
    """A signal handler's exception (celery's soft time limit, Ctrl-C) lands in
    the driver's connect once its socket exists (psycopg: in wait_conn, the
    PGconn in its generator). Nobody gets the half-made connection, but it stays
    open, held by the exception's frames, until collected, and its PostgreSQL
    backend with it: the lease went back at once (seen: PostgreSQL at 2 with a
    cap of 1 under `celery worker --soft-time-limit`)."""
    import pytest

    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with socket.create_server(("127.0.0.1", 0)) as server:
        def connect() -> socket.socket:
            half_made = socket.create_connection(server.getsockname())  # noqa: F841 - in this frame
            raise _SoftTimeLimit()

        with pytest.raises(_SoftTimeLimit) as err:
            book.connect(connect, 3)
        peer, _ = server.accept()
        with peer:
            time.sleep(0.3)
            assert leased(sock_path) == 1, "the lease went back while the server still had the connection"
            peer.settimeout(5)
            assert peer.recv(1) == b"", "the server was not told the connection is over"
        assert wait_leased(sock_path, 0) == 0
        del err
    book.shutdown()


def test_a_connect_failing_on_its_own_gives_the_lease_back_at_once(
        start_coordinator: Any, sock_path: str) -> None:
    import pytest

    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        book.connect(lambda: socket.create_connection(("127.0.0.1", port)), 3)
    assert leased(sock_path) == 0
    book.shutdown()


def test_a_failed_connect_whose_report_fails_still_gives_the_lease_back(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    """The failure's report can raise (a thread that cannot start, a signal
    handler's exception at its entry): before, the lease, reported first, then
    stayed held by nothing for the life of the process."""
    import pytest

    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    no_thread_for_reports(monkeypatch)
    with pytest.raises(ConnectionRefusedError):  # the connect's own error, not the report's
        book.connect(lambda: socket.create_connection(("127.0.0.1", port)), 3)
    monkeypatch.undo()
    assert book.stats()["leases_held"] == 0
    assert wait_leased(sock_path, 0) == 0
    book.shutdown()


def test_a_postgresql_connect_cut_short_never_puts_postgresql_over_the_cap(
        start_coordinator: Any, sock_path: str, pg: str, app_name: str) -> None:
    """The same with libpq: the PGconn (what psycopg's connect generator holds
    while it waits) is connected when the exception lands. PostgreSQL must
    never show more backends than the coordinator has leases out."""
    import psycopg
    import pytest

    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.5)

    def connect() -> Any:
        pgconn = psycopg.pq.PGconn.connect(f"{pg} application_name={app_name}".encode())  # noqa: F841
        raise _SoftTimeLimit()

    def backends(mon: Any) -> int:
        row = mon.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                          (app_name,)).fetchone()
        return int(row[0])

    with psycopg.connect(pg, autocommit=True) as mon:
        with pytest.raises(_SoftTimeLimit) as err:  # err keeps the PGconn alive
            book.connect(connect, 3)
        deadline = time.monotonic() + 5
        while True:
            out = leased(sock_path)  # first: a lease goes back only after its backend is gone
            n = backends(mon)
            assert n <= out, f"PostgreSQL has {n} backend(s) of ours, {out} lease(s) out"
            if n == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert n == 0, "the half-made connection's backend was not ended"
        assert wait_leased(sock_path, 0) == 0
        del err
    book.shutdown()


def test_a_connect_error_survives_objects_that_raise_when_looked_at(
        start_coordinator: Any, sock_path: str) -> None:
    """What the failed connect's frames hold is looked into for half-made
    sockets: a plain Mock (a user's test double of the driver) or a proxy
    outside its context must not replace the connect's error, nor keep its lease."""
    from unittest import mock

    import pytest

    class Proxy:  # as werkzeug's LocalProxy outside an app context
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("working outside of application context")

    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2)
    driver = mock.Mock(side_effect=ConnectionRefusedError("refused"))
    with pytest.raises(ConnectionRefusedError):
        book.connect(lambda: driver("dbname=test"), 3)
    assert leased(sock_path) == 0

    def connect() -> Any:
        app = Proxy()  # noqa: F841 - in this frame
        raise ConnectionRefusedError("refused")

    with pytest.raises(ConnectionRefusedError):
        book.connect(connect, 3)
    assert leased(sock_path) == 0
    book.shutdown()


def test_a_half_made_socket_at_the_open_file_limit_is_not_taken_for_closed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No fd for the dup: the socket was skipped, nothing was left to watch, and
    # the lease went back at once, with no FIN sent and the server session alive
    # until the collector freed the socket (over the cap meanwhile).
    import errno

    from sharedpool import closing, halfmade

    def dup(fd: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    ours, server = socket.socketpair()
    monkeypatch.setattr(halfmade.os, "dup", dup)
    monkeypatch.setattr(halfmade, "FIN_WAIT", 0.05, raising=False)
    monkeypatch.setattr(closing, "LATE_TIMEOUT", 0.3)
    done: list[bool] = []
    at: list[float] = []

    def on_done(confirmed: bool) -> None:
        at.append(time.monotonic())
        done.append(confirmed)

    started = time.monotonic()
    halfmade.let_go_of([ours.fileno()], on_done)
    server.settimeout(5)
    assert server.recv(1) == b""  # our FIN went out on the socket's own fd
    os.fstat(ours.fileno())  # which is still its owner's
    deadline = time.monotonic() + 5
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [False]  # given back as a watcher that timed out would
    # Not before LATE_TIMEOUT, though the server end is still open (a lower
    # bound: a stall here must not read as a give-back come too early).
    assert at[0] - started >= 0.3, at[0] - started
    # A server that lets go within FIN_WAIT: confirmed, at once.
    ours2, server2 = socket.socketpair()

    def backend() -> None:
        while server2.recv(4096):
            pass
        server2.close()

    threading.Thread(target=backend, daemon=True).start()
    monkeypatch.setattr(halfmade, "FIN_WAIT", 5.0, raising=False)
    halfmade.let_go_of([ours2.fileno()], on_done)
    assert done == [False, True]
    for sock in (ours, server, ours2):
        sock.close()


def test_a_reclaim_is_counted_before_its_lease_goes(start_coordinator: Any, sock_path: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted after the release: a waiter elsewhere could be served, and read
    # get_stats(), while leases_reclaimed still said 0 (a CI flake of
    # test_a_psycopg_pool_growing_for_nobody_does_not_pay_its_own_growth).
    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=2.0)
    seen: list[int] = []
    with leased_socket(book) as (conn, peer):
        client = Client.for_path(sock_path)
        release = client.release

        def spy(lease: Any) -> None:
            seen.append(book.stats()["leases_reclaimed"])
            release(lease)

        monkeypatch.setattr(client, "release", spy)
        peer.close()  # the server lets go at once: the close is confirmed
        assert book.close(conn, reclaimed=True)
    assert seen == [1], seen
    book.shutdown()


def _exit_while_a_reclaim_closes(sock: str) -> dict[str, Any]:
    """A worker's exit (release_process) while another thread of it (the
    client's, giving a lease back on a reclaim) is closing a connection whose
    server lets go a moment later."""
    from sharedpool import release_process

    book = LeaseBook("pg", sock, confirm_timeout=5.0)
    with leased_socket(book) as (conn, peer):
        closer = threading.Thread(target=book.close, args=(conn,))
        closer.start()
        deadline = time.monotonic() + 5
        while not book.stats()["leases_closing"] and time.monotonic() < deadline:
            time.sleep(0.005)
        closing = book.stats()["leases_closing"]
        server_lets_go = threading.Timer(0.3, peer.close)
        server_lets_go.start()
        release_process(5.0)
        left = book.stats()["leases_closing"]
        server_lets_go.join(5)
        closer.join(5)
    return {"closing": closing, "closing_after_release": left}


def test_an_exit_waits_for_a_close_another_thread_has_in_flight(start_coordinator: Any,
                                                                sock_path: str) -> None:
    """A recycled gunicorn gthread worker whose client thread was closing a
    reclaimed connection as worker_exit ran: release_process() ended the session
    with that lease still closing, and the coordinator fenced its slot (a normal
    exit, logged as a dead pid's 'fence' lines; quarantine_delay without
    monitor_dsn). It now waits (within its timeout) for that close."""
    start_coordinator({"pg": Resource(max_size=1, quarantine_delay=30)})
    [child] = run_forked(_exit_while_a_reclaim_closes, sock_path)
    assert child == {"closing": 1, "closing_after_release": 0}
    deadline = time.monotonic() + 5
    while other_sessions(sock_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    row = resource_row(sock_path)
    assert row["fenced"] == 0 and row["leased"] == 0, row


def _served_locally_goes_back_unused(fake: Any, book: LeaseBook, served: Callable[[], bool]) -> None:
    """An acquire whose wait a local checkin serves once ``served()``: the one
    lease granted went back to the coordinator, counted by the book as granted
    (as the coordinator counts it) and never used. Shuts the book and ``fake`` down."""
    try:
        assert book.acquire(object(), 5, local=lambda: True if served() else None)
        deadline = time.monotonic() + 5
        while not fake.released and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fake.released, "the grant was not given back"
        stats = book.stats()
        assert stats["leases_acquired"] == 1 and stats["leases_unused"] == 1, stats
        assert stats["leases_held"] == 0, stats
    finally:
        book.shutdown()
        fake.stop()


def test_a_grant_crossing_the_withdrawal_of_a_wait_served_locally_counts_as_unused(
        sock_path: str) -> None:
    """The coordinator counts such a grant; the pool counted it nowhere: under
    contention (3 redis-py processes, cap 2) grants read 402 against 399
    leases_acquired and 0 leases_unused, the gap exactly the 3 grants that
    crossed a withdrawal."""
    fake = GrantCrossingCancel(sock_path)
    book = LeaseBook("r", coordinator=sock_path)
    served = threading.Timer(0.2, book.notify_returned)
    start = time.monotonic()
    served.start()
    try:
        _served_locally_goes_back_unused(fake, book, lambda: time.monotonic() - start > 0.2)
    finally:
        served.cancel()


class _GrantAtOnce(FakeCoordinator):
    """Grants each acquire at once; records the releases."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.released: list[int] = []

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Release):
            self.released.append(msg.lease)
        elif not isinstance(msg, p.Cancel):
            super().on_message(idx, s, conn, msg)


def test_a_grant_not_yet_taken_when_the_wait_is_served_locally_counts_as_unused(
        sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grant is in, but the helper thread has not yet taken it when a
    checkin serves the wait: cancel() gives it back and the helper sees
    AcquireCancelled. Before: leases_acquired 0, leases_unused 0 for a grant
    the coordinator counted."""
    from sharedpool import lease as lease_mod
    from sharedpool import receiving

    fake = _GrantAtOnce(sock_path)
    granted, cancelled = threading.Event(), threading.Event()
    wait_reply, cancel = receiving.wait_reply, lease_mod.AcquireRequest.cancel

    def slow_wait(client: Any, pending: Any, deadline: Any) -> None:  # descheduled after the grant
        wait_reply(client, pending, deadline)
        if pending.done and pending.error is None:
            granted.set()
            cancelled.wait(3)

    def cancel_then_go(self: Any) -> bool:
        try:
            return cancel(self)
        finally:
            cancelled.set()

    monkeypatch.setattr(receiving, "wait_reply", slow_wait)
    monkeypatch.setattr(lease_mod.AcquireRequest, "cancel", cancel_then_go)
    _served_locally_goes_back_unused(fake, LeaseBook("r", coordinator=sock_path), granted.is_set)


def test_a_grant_taken_as_the_wait_is_served_locally_is_counted_before_it_goes_back(
        sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper thread has taken the grant when a checkin serves the wait: the
    helper gives it back, counted as unused first (slowed here). Before: released
    first, so a reader that saw the release could read leases_unused 0 (CI did,
    for the core pool's counterpart)."""
    fake = _GrantAtOnce(sock_path)
    book = LeaseBook("r", coordinator=sock_path)
    taken = threading.Event()
    count = book.count

    def slow_count(name: str, n: int = 1) -> None:
        if name == "leases_acquired":  # the helper holds the lease: the wait is served meanwhile
            taken.set()
            book.notify_returned()
            time.sleep(1.0)
        elif name == "leases_unused":
            time.sleep(0.3)
        count(name, n)

    monkeypatch.setattr(book, "count", slow_count)
    _served_locally_goes_back_unused(fake, book, taken.is_set)


def _a_collected_book_with_a_lease(sock_path: str, server: socket.socket) -> socket.socket:
    """A book, in a garbage cycle (as a host pool and its connections are),
    holding one leased connection to ``server``; dropped. The server's end comes back."""
    book = LeaseBook("r", sock_path, confirm_timeout=2)
    book.connect(lambda: socket.create_connection(server.getsockname()))
    peer, _ = server.accept()
    book.cycle = book  # type: ignore[attr-defined]
    return peer


def _collect_until_leased(sock_path: str, want: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (n := leased(sock_path)) != want and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    return n


def test_a_collected_books_finalizer_logs_nothing_where_the_collection_ran(
        start_coordinator: Any, sock_path: str) -> None:
    """The finalizer runs in whatever thread the garbage collector interrupted,
    which may hold any lock: here a logging.QueueHandler's queue lock (a plain
    Lock, taken again by the warning's put). Before: that thread hung for good,
    and the lease stayed out (leased 1 after 10 s). As for a dropped
    ConnectionPool, the warning comes from another thread."""
    start_coordinator({"r": Resource(max_size=1)})
    with sharedpool_logs_queued_gc_off() as q:
        with socket.create_server(("127.0.0.1", 0)) as server:
            peer = _a_collected_book_with_a_lease(sock_path, server)
            assert leased(sock_path) == 1
            assert collect_inside_a_put(q), "the collection hung in the book's finalizer"
            peer.close()
            assert _collect_until_leased(sock_path, 0) == 0
        assert any("garbage-collected" in r.getMessage() for r in list(q.queue)), list(q.queue)


def test_a_collected_books_leases_go_back_with_no_thread_to_be_had(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No thread to be had for the closes (the process at its thread limit):
    before, the finalizer's Thread.start() raised (ignored, in a finalizer) and
    the lease stayed out for as long as the process lived (leased 1 after 10 s).
    As for a dropped ConnectionPool, the connections are closed in the
    client's own thread instead."""
    start_coordinator({"r": Resource(max_size=1)})
    start = threading.Thread.start

    def no_closing_thread(self: threading.Thread) -> None:
        if self.name.startswith(("sharedpool-orphans", "sharedpool-dropped")):
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", no_closing_thread)
    with socket.create_server(("127.0.0.1", 0)) as server:
        peer = _a_collected_book_with_a_lease(sock_path, server)
        assert leased(sock_path) == 1
        peer.close()  # the server lets go at once: the close is confirmed
        assert _collect_until_leased(sock_path, 0) == 0


def test_a_connect_cut_short_inside_rekey_of_a_lent_connection_gives_its_lease_back(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    """psycopg_pool's book (lends): rekey's ``entry.key = new`` is a property
    setter, a Python call where a signal handler's exception can land. Between
    rekey's del and its re-insert, the lease was under neither key: held for
    the life of the process."""
    from sharedpool.contrib._book import _Lendable

    real = _Lendable.key
    assert isinstance(real, property) and real.fset is not None
    fire = [True]

    def set_key(entry: Any, value: Any) -> None:
        if fire[0] and isinstance(value, socket.socket):  # rekey's: at the setter's first line
            fire[0] = False
            raise KeyboardInterrupt
        real.fset(entry, value)  # type: ignore[misc]

    monkeypatch.setattr(_Lendable, "key", property(real.fget, set_key))
    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2, lends=True)
    with socket.create_server(("127.0.0.1", 0)) as server:
        with pytest.raises(KeyboardInterrupt):
            book.connect(lambda: socket.create_connection(server.getsockname()), 3)
        peer, _ = server.accept()
        peer.settimeout(5)
        with peer:
            assert peer.recv(1) == b"", "the server was not told the connection is over"
        gc.collect()
        assert wait_leased(sock_path, 0) == 0
        # The watcher releases, then uncounts the close: the coordinator's 0 comes first.
        wait_for(lambda: book.stats()["leases_held"] == 0, 5, "the book to uncount the lease")
    book.shutdown()


def _cut_short_in_opened(monkeypatch: Any, at: str) -> None:
    """Make a step of LeaseBook.opened() (or open_under's ``took``) raise once,
    as a signal handler's exception would land there."""
    import weakref

    from sharedpool.contrib import _acquiring
    from sharedpool.contrib._orphans import close_collected
    from sharedpool.handoff import HandOffCost

    if at == "first line":  # its first call: nothing of it done
        real_pid = _acquiring.backend_pid
        fire = [True]

        def pid(conn: Any) -> Any:
            if fire[0]:
                fire[0] = False
                raise _SoftTimeLimit()
            return real_pid(conn)

        monkeypatch.setattr(_acquiring, "backend_pid", pid)
    elif at == "socket kept":  # a dup of its socket kept, armed if lent
        interrupt_once(monkeypatch, HandOffCost, "connected", _SoftTimeLimit())
    elif at == "success reported":  # all of it but report_now()
        interrupt_once(monkeypatch, Client, "report_success", _SoftTimeLimit(), after=True)
    elif at == "finalizer made":  # in _arm: made, not yet recorded on the entry
        real_finalize = weakref.finalize
        fire = [True]

        def finalize(obj: Any, func: Any, *args: Any, **kwargs: Any) -> Any:
            made = real_finalize(obj, func, *args, **kwargs)
            if fire[0] and func is close_collected:
                fire[0] = False
                raise _SoftTimeLimit()
            return made

        monkeypatch.setattr(weakref, "finalize", finalize)
    else:
        assert at == "took"


@pytest.mark.parametrize("lends", [False, True], ids=["plain", "lends"])
@pytest.mark.parametrize("at", ["first line", "socket kept", "finalizer made", "success reported", "took"])
def test_a_connect_cut_short_in_opened_gives_its_lease_back_once_the_server_let_go(
        start_coordinator: Any, sock_path: str, monkeypatch: Any, at: str, lends: bool) -> None:
    """open_under's ``opened(conn)`` ran outside its try: a signal handler's
    exception at any of its steps (celery's soft time limit, in a child that
    lives on) left the new connection and its lease in the book until the
    process's exit. Now undone as a connection made and cut short: the lease
    goes back once, after the server let go (I1), not reported as a failed
    connect; a finalizer opened() armed for a lent connection (psycopg_pool's
    book) neither releases it again nor keeps the connection from the collector."""
    import weakref

    if at == "finalizer made" and not lends:
        pytest.skip("only a lent connection's record is armed")
    start_coordinator({"pg": Resource(max_size=1)})
    book = LeaseBook("pg", sock_path, confirm_timeout=0.2, lends=lends)
    failures: list[str] = []
    real_failure = Client.report_failure
    monkeypatch.setattr(Client, "report_failure",
                        lambda client, resource: (failures.append(resource), real_failure(client, resource)))
    _cut_short_in_opened(monkeypatch, at)
    made: list[weakref.ref[socket.socket]] = []

    def took(conn: socket.socket) -> None:
        raise _SoftTimeLimit()

    with socket.create_server(("127.0.0.1", 0)) as server:
        def connect() -> socket.socket:
            conn = socket.create_connection(server.getsockname())
            made.append(weakref.ref(conn))
            return conn

        with pytest.raises(_SoftTimeLimit) as err:
            book.connect(connect, 3, **({"took": took} if at == "took" else {}))
        peer, _ = server.accept()
        peer.settimeout(5)
        with peer:
            time.sleep(0.2)
            assert leased(sock_path) == 1, "the lease went back while the server still had the connection"
            assert peer.recv(1) == b"", "the server was not told the connection is over"
        assert wait_leased(sock_path, 0) == 0
        err.value.__traceback__ = None  # interrupt_once raises the same instance: its frames hold conn
        del err
        gc.collect()
        assert made[0]() is None, "the connection cut short is kept from the collector"
        time.sleep(0.2)  # a finalizer's close_collected, if any, has run by now
        stats = book.stats()
        assert len(book) == 0
        assert (stats["leases_held"], stats["leases_closing"], stats["leases_released"]) == (0, 0, 1), stats
        assert failures == [], "reported as a failed connect"
        # The slot is free and the book serves on.
        with leased_socket(book) as (conn, _):
            assert book.owns(conn) and leased(sock_path) == 1
            book.close(conn)
        assert wait_leased(sock_path, 0) == 0
    book.shutdown()
