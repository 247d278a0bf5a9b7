"""The local pool at its edges: a wait cut short by a signal, validations that
eat the timeout, close() racing checkins and openers, a hung coordinator,
misuse, and the state seen in a forked child."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from proc_helpers import (
    HoldingServer,
    alarm_raises,
    leased,
    no_thread_for_reports,
    resource_row,
    run_forked,
    start_recording,
    wait_leased,
)
from servers import wait_for

from sharedpool import (
    Client,
    ConfigError,
    ConnectionPool,
    ConnectTimeout,
    PoolClosed,
    PoolConfig,
    PoolMisuse,
    PoolStatus,
    PoolTimeout,
    checkin,
    handshake,
    shutdown,
)
from sharedpool import protocol as p
from sharedpool.testing import FakeConnection, FakeFactory


class Interrupted(BaseException):
    """What celery's soft time limit or a Ctrl-C does: raised from a signal handler.
    (A BaseException, like KeyboardInterrupt: an Exception raised inside a
    connection check counts as a failed check.)"""


@pytest.fixture
def interrupt() -> Iterator[Callable[[float], None]]:
    """``interrupt(s)``: in ``s`` seconds, a signal handler raises Interrupted in
    the main thread. SIGUSR1 from a timer thread, so that pytest-timeout's
    SIGALRM stays armed."""
    def raise_it(*_: object) -> None:
        raise Interrupted("the signal handler raised")

    main = threading.main_thread().ident
    assert main is not None
    timers: list[threading.Timer] = []

    def schedule(seconds: float) -> None:
        timers.append(threading.Timer(seconds, signal.pthread_kill, args=(main, signal.SIGUSR1)))
        timers[-1].start()

    old = signal.signal(signal.SIGUSR1, raise_it)
    yield schedule
    for t in timers:
        t.cancel()
        t.join()
    signal.signal(signal.SIGUSR1, old)


@pytest.fixture(autouse=True)
def _no_env_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)


def test_a_wait_cut_short_by_a_signal_leaves_no_connection_behind(
        interrupt: Callable[[float], None], start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    try:
        held = pool.acquire(timeout=5)
        interrupt(0.2)
        with pytest.raises(Interrupted):
            pool.acquire(timeout=5)  # waits: the only connection is out
        assert pool.get_stats()["requests_waiting"] == 0
        pool.release(held)
        # Before, the checkin went to the interrupted caller's waiter: in use for good.
        again = pool.acquire(timeout=2)
        assert again is held
        pool.release(again)
        assert pool.get_in_use() == 0
    finally:
        pool.close()


def test_a_validation_cut_short_closes_that_connection(interrupt: Callable[[float], None]) -> None:
    def slow_check(conn: FakeConnection) -> bool:
        time.sleep(5)
        return True

    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, validation_bypass=0),
                          check=slow_check, coordinator=None)
    try:
        pool.release(pool.acquire())
        time.sleep(0.01)
        interrupt(0.2)
        with pytest.raises(Interrupted):
            pool.acquire(timeout=5)
        # It may be mid-query: closed, not put back.
        assert factory.made[0].closed
        assert pool.get_size() == 0 and pool.get_in_use() == 0
    finally:
        pool.close()


def test_failing_validations_do_not_stretch_the_acquire_timeout() -> None:
    def failing_check(conn: FakeConnection) -> bool:
        time.sleep(0.3)  # a ping to a server that stopped answering
        return False

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=10, validation_bypass=0),
                          check=failing_check, coordinator=None)
    try:
        out = [pool.acquire() for _ in range(10)]
        for w in out:
            pool.release(w)
        time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout, match="failed validation"):
            pool.acquire(timeout=0.5)
        # Before, every idle connection was tried, each with a new clock: 3 s and more.
        assert time.monotonic() - t0 < 2.0
    finally:
        pool.close()


class SlowClose(FakeConnection):
    def close(self) -> None:
        time.sleep(0.3)
        super().close()


def test_close_returns_once_checked_in_connections_are_closed_and_released(
        start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 2})
    pool = ConnectionPool(SlowClose, PoolConfig(min_size=0, max_size=2), resource="r",
                          coordinator=sock_path)
    w = pool.acquire(timeout=5)
    client = pool._client
    assert client is not None
    releaser = threading.Timer(0.1, pool.release, args=(w,))
    releaser.start()
    pool.close(timeout=5)  # the checkin comes while close() waits
    releaser.join()
    assert w.conn.closed
    assert client.held == {}
    assert not client.connected  # the last pool's close ended the session


def test_close_waits_for_the_connections_being_opened(start_coordinator: Any, sock_path: str) -> None:
    # Before, close() returned while openers were inside the factory: their
    # connections were opened (and counted by the server) after it returned.
    start_coordinator({"r": 3})
    factory = FakeFactory(delay=0.4)
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=5, acquire_timeout=5),
                          resource="r", coordinator=sock_path)
    errors: list[BaseException] = []

    def use() -> None:
        try:
            with pool.connection():
                pass
        except PoolClosed as exc:
            errors.append(exc)

    users = [threading.Thread(target=use) for _ in range(4)]
    for t in users:
        t.start()
    deadline = time.monotonic() + 5
    while factory.calls < 3 and time.monotonic() < deadline:  # three openers in the factory
        time.sleep(0.01)
    assert factory.calls == 3
    client = pool._client
    assert client is not None
    pool.close(timeout=5)
    assert len(factory.made) == 3 and factory.open == []  # made while close() waited, then closed
    assert client.held == {}
    assert not client.connected  # and the session ended with the last pool
    for t in users:
        t.join(5)
    assert len(errors) == 4


def test_a_closed_pool_ends_its_session_once_its_last_connection_comes_back(
        start_coordinator: Any, sock_path: str) -> None:
    # Before, a close() that could not finish (a connection still in use) left
    # the process's session, its thread and its socket open for good.
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    w = pool.acquire(timeout=5)
    client = pool._client
    assert client is not None
    pool.close(timeout=0)  # returns at once: the connection is still out
    assert client.connected and len(client.held) == 1
    pool.release(w)
    assert w.conn.closed and client.held == {}
    assert not client.connected
    thread = client._thread
    if thread is not None:  # the session's background thread ends with it
        thread.join(5)
        assert not thread.is_alive()


def test_a_close_cut_short_still_closes_the_other_idle_connections(
        interrupt: Callable[[float], None], start_coordinator: Any, sock_path: str) -> None:
    """A signal handler's exception (Ctrl-C, a SIGTERM handler's SystemExit)
    during the close of the first idle connection left the others out of the
    pool but never closed: open, their leases held until the process exited,
    and a second close() returned at once."""
    start_coordinator({"r": 3})
    pool = ConnectionPool(SlowClose, PoolConfig(min_size=0, max_size=3), resource="r",
                          coordinator=sock_path)
    out = [pool.acquire(timeout=5) for _ in range(3)]
    for w in out:
        pool.release(w)
    client = pool._client
    assert client is not None
    interrupt(0.1)  # inside the first close's 0.3 s
    with pytest.raises(Interrupted):
        pool.close(timeout=5)
    deadline = time.monotonic() + 5
    while (client.held or client.connected) and time.monotonic() < deadline:
        time.sleep(0.02)
    # The first one's close() was cut short (a real socket's end is shut by a watcher).
    assert [w.conn.closed for w in out] == [False, True, True]
    assert client.held == {}
    assert not client.connected  # and the session ended with the last close


#: A close from a checkin that took the connection out of _all, on its way.
_CLOSE_ON_THE_WAY = [ConnectionPool._close_then_open.__code__, ConnectionPool._close.__code__,
                     shutdown.close_counted.__code__]

#: Where a signal handler may run: after a call returns (C calls) or a backward jump.
_HANDLER_POINTS = {"CALL", "CALL_FUNCTION_EX", "JUMP_BACKWARD"}


def _interrupting_at(codes: list[Any], k: int, entries: bool = False) -> tuple[Callable[..., Any], list[str]]:
    """A tracer raising Interrupted in the main thread at the ``k``-th instant a
    signal handler could run inside a frame of ``codes`` (not in their callees);
    with ``entries``, their first instructions count too."""
    import dis

    after = {c: {i.offset for i in dis.get_instructions(c) if i.opname in _HANDLER_POINTS} for c in codes}
    seen, fired, last = [0], [], {}

    def local(frame: Any, event: str, arg: Any) -> Any:
        if fired or event != "opcode":
            return None if fired else local
        prev, last[id(frame)] = last.get(id(frame)), frame.f_lasti
        if prev in after[frame.f_code]:
            if seen[0] == k:
                fired.append(f"{frame.f_code.co_name}+{frame.f_lasti}")
                raise Interrupted("the signal handler raised")
            seen[0] += 1
        return local

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if fired or frame.f_code not in after or threading.current_thread() is not threading.main_thread():
            return None
        if entries:
            if seen[0] == k:
                fired.append(f"{frame.f_code.co_name} entry")
                raise Interrupted("the signal handler raised")
            seen[0] += 1
        frame.f_trace_opcodes = True
        return local

    return tracer, fired


def run_traced(tracer: Callable[..., Any], fn: Callable[..., object], *args: Any,
               catch: tuple[type[BaseException], ...] = (Interrupted,)) -> BaseException | None:
    """``fn(*args)`` with ``tracer`` set (a signal handler's exception where it
    fires), unset after; what it raised of ``catch``, or None."""
    sys.settrace(tracer)
    try:
        fn(*args)
    except catch as exc:
        return exc
    finally:
        sys.settrace(None)
    return None


def _assert_all_let_go(pool: ConnectionPool[Any], factory: FakeFactory, client: Any,
                       fired: list[str]) -> None:
    """Within 5 s: every connection closed, every lease released, nothing
    counted as closing or held by the pool (``fired``: where the signal landed)."""
    deadline = time.monotonic() + 5
    while (factory.open or client.held or pool._closing or pool._leased) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert factory.open == [] and client.held == {}, fired
    assert (pool._closing, pool._leased, pool._giving, len(pool._all)) == (0, 0, 0, 0), fired


def _check_out_and_in(pool: ConnectionPool[Any], got: list[str]) -> None:
    try:
        pool.release(pool.acquire(timeout=5))
        got.append("served")
    except PoolClosed:
        got.append("PoolClosed")
    except Exception as exc:  # noqa: BLE001 - what the test looks at
        got.append(repr(exc))


@pytest.mark.parametrize("waiting", [False, True])
def test_a_close_cut_short_anywhere_closes_every_connection(
        start_coordinator: Any, sock_path: str, waiting: bool) -> None:
    """A signal handler's exception wherever one can land in close() (Ctrl-C,
    a SIGTERM handler's SystemExit). Before, one landing as close() took the
    idle connections out of the pool (at a call in its locked section, or
    while it withdrew the openers' lease requests, each a send) left them out
    of the pool, never closed: open, their leases held for good, a second
    close() a no-op; waiters of other threads got ValueError or
    AcquireCancelled instead of PoolClosed. One landing at the first
    instruction of a connection's _close (entries count too) left it open,
    its lease held, as close() went on in a thread with the rest."""

    start_coordinator({"r": 2})
    codes = [shutdown.shut.__code__, shutdown.evict.__code__, shutdown.let_go.__code__,
             ConnectionPool._close.__code__]
    k = 0
    while True:
        factory = FakeFactory()
        pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=3), resource="r",
                              coordinator=sock_path)
        held = [pool.acquire(timeout=5) for _ in range(2)]  # the cap
        client = pool._client
        assert client is not None
        got: list[str] = []
        thread = threading.Thread(target=_check_out_and_in, args=(pool, got))
        if waiting:  # all in use: one waits, its opener's lease request queued at the coordinator
            thread.start()
            deadline = time.monotonic() + 5
            while not (pool._waiters and pool._lease_requests) and time.monotonic() < deadline:
                time.sleep(0.005)
            assert pool._waiters and pool._lease_requests, (k, got, repr(pool))
        else:
            for w in held:
                pool.release(w)
        tracer, fired = _interrupting_at(codes, k, entries=True)
        run_traced(tracer, pool.close, 0)
        took_effect = pool.status is not PoolStatus.ACTIVE  # cut short at its first calls: still open
        if waiting:
            if took_effect:
                thread.join(5)
                assert got == ["PoolClosed"], (fired, got)
            for w in held:
                pool.release(w)  # closed at checkin, or (still open) handed to the waiter
            thread.join(5)
            assert not thread.is_alive() and got in (["PoolClosed"], ["served"]), (fired, got)
        pool.close(timeout=5)  # as a user (or release_process at exit) would: again
        _assert_all_let_go(pool, factory, client, fired)
        if not fired:
            break
        k += 1
    assert k > 5  # the points were reached


@pytest.mark.parametrize("why", ["test_on_release", "max_lifetime", "owed"])
def test_a_slow_checkin_cut_short_anywhere_leaves_no_connection_in_use(
        start_coordinator: Any, sock_path: str, why: str) -> None:
    """A signal handler's exception wherever one can land in a slow checkin.
    Before, one landing after its first misuse check (a dict lookup) or
    between its decision and its hand-over (a set() made there) left the
    connection in use for good, its lease held: a second close() waited for
    it in vain. One landing on the way to its close (the first instruction of
    _close_then_open, _close or close_counted; its time.monotonic()) left it
    out of the pool, never closed, its lease held (a give-back: counted giving)."""

    # Owed: given back at once (a quantum of 0), the close counted as a give-back.
    start_coordinator({"r": {"max_size": 1, "fairness_quantum": 0.0}} if why == "owed" else {"r": 1})
    config = PoolConfig(min_size=0, max_size=1, test_on_release=why == "test_on_release",
                        max_lifetime=0.01 if why == "max_lifetime" else 3600.0)
    k = 0
    while True:
        factory = FakeFactory()
        pool = ConnectionPool(factory, config, resource="r", coordinator=sock_path)
        w = pool.acquire(timeout=5)
        client = pool._client
        assert client is not None
        if why == "owed":
            with client._cond:
                client._owed["r"] = 1
        time.sleep(0.02)  # past max_lifetime
        tracer, fired = _interrupting_at([checkin.release_slow.__code__, *_CLOSE_ON_THE_WAY], k, entries=True)
        run_traced(tracer, pool.release, w)
        pool.close(timeout=2)
        _assert_all_let_go(pool, factory, client, fired)
        if not fired:
            break
        k += 1
    assert k > 3  # the points were reached


def test_a_checkout_cut_short_while_it_plans_an_opener_leaves_no_phantom_opening() -> None:
    """A signal handler's exception wherever one can land in _plan_growth.
    Before, it left the caller's waiter queued (the next connection was handed
    to it, a caller gone: in use for good) and, once the opening was counted,
    an opening no opener would ever settle: with max_size 1, every later
    checkout waited its whole timeout, and close() waited for it too."""

    k = 0
    while True:
        factory = FakeFactory()
        pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1), coordinator=None)
        tracer, fired = _interrupting_at([ConnectionPool._plan_growth.__code__], k)
        run_traced(tracer, lambda p=pool: p.release(p.acquire(timeout=2)))
        assert pool._opening == 0, fired
        pool.release(pool.acquire(timeout=2))  # the slot serves
        pool.close(timeout=2)
        assert factory.open == [], fired
        if not fired:
            break
        k += 1
    assert k > 3  # the points were reached


def test_a_checkin_cut_short_as_it_arms_the_give_back_recheck_lets_a_later_one_arm_it(
        monkeypatch: pytest.MonkeyPatch, start_coordinator: Any, sock_path: str) -> None:
    """A lease owed to the coordinator, its connection checked in young: the
    checkin arms a recheck. A signal handler's exception in that call left
    the pool believing one armed: no checkin armed one again, and the owed
    lease sat idle until the coordinator asked once more."""
    from proc_helpers import interrupt_once

    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    try:
        w = pool.acquire(timeout=5)
        client = pool._client
        assert client is not None
        with client._cond:
            client._owed["r"] = 1
        interrupt_once(monkeypatch, type(client), "call_later", Interrupted("the signal handler raised"))
        with pytest.raises(Interrupted):
            pool.release(w)
        assert not pool._recheck_pending
        pool.release(pool.acquire(timeout=5))  # this checkin arms it: the owed lease goes back
        deadline = time.monotonic() + 5
        while client.held and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.held == {}
    finally:
        pool.close()


def test_a_close_cut_short_while_it_waits_still_ends_the_session(
        interrupt: Callable[[float], None], start_coordinator: Any, sock_path: str) -> None:
    """A close() cut short while it waited for a connection in use left the
    pool's handlers registered: the process's session stayed open for good,
    even once that connection came back and was closed."""
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    w = pool.acquire(timeout=5)
    client = pool._client
    assert client is not None
    interrupt(0.2)
    with pytest.raises(Interrupted):
        pool.close(timeout=5)  # waits for w
    pool.release(w)
    assert w.conn.closed and client.held == {}
    assert not client.connected


def test_a_lease_release_cut_short_still_reaches_the_coordinator(
        start_coordinator: Any, sock_path: str) -> None:
    """A signal handler's exception between the client forgetting a lease and
    sending its release (the close of a connection past max_lifetime at a
    checkin, a close()) left the coordinator counting it for the rest of the
    session: a slot of the cap gone with no connection behind it."""
    start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        lease = client.acquire("r", timeout=5)

        class CutShort(dict[str, int]):
            def get(self, *args: Any) -> Any:  # what release() calls once the lease is forgotten
                raise Interrupted("the signal handler raised")

        owed, client._owed = client._owed, CutShort()
        with pytest.raises(Interrupted):
            client.release(lease)
        client._owed = owed
        assert client.held == {}
        assert wait_leased(sock_path, 0) == 0
    finally:
        client.close()


def test_a_close_cut_short_after_its_confirmation_still_gives_the_lease_back(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal handler's exception between a confirmed close and the lease's
    release (while the hand-off cost is reported) kept the lease for good."""
    from proc_helpers import interrupt_once

    from sharedpool.handoff import HandOffCost

    start_coordinator({"r": 2})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2), resource="r",
                          coordinator=sock_path)
    try:
        pool.release(pool.acquire(timeout=5))
        client = pool._client
        assert client is not None
        interrupt_once(monkeypatch, HandOffCost, "tell", Interrupted("the signal handler raised"))
        with pytest.raises(Interrupted):
            pool.close()
        assert client.held == {} and pool.get_stats()["leases_held"] == 0
        assert wait_leased(sock_path, 0) == 0
    finally:
        pool.close()


def test_a_checkin_cut_short_before_the_hand_over_closes_the_connection(
        start_coordinator: Any, sock_path: str) -> None:
    """A signal handler's exception in a slow checkin before the hand-over (a
    test_on_release check, a checkin owed to the coordinator, waiters queued)
    left the connection in use for good, its lease held: the pool one smaller
    until the process exited."""
    start_coordinator({"r": 1})
    cut = [False]

    def check(conn: FakeConnection) -> bool:
        if cut[0]:
            cut[0] = False
            raise Interrupted("the signal handler raised")  # as one landing mid-check
        return True

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, test_on_release=True),
                          resource="r", coordinator=sock_path, check=check)
    try:
        w = pool.acquire(timeout=5)
        client = pool._client
        assert client is not None
        cut[0] = True
        with pytest.raises(Interrupted):
            pool.release(w)
        assert pool.get_in_use() == 0 and w.conn.closed  # it may have been mid-query: closed
        assert client.held == {}
        with pool.connection(timeout=2):  # the slot serves again
            pass
    finally:
        pool.close()


def test_a_fallback_checkin_does_not_wait_for_a_hung_coordinator(
        start_coordinator: Any, sock_path: str) -> None:
    coord = start_coordinator({"r": 1})
    client = Client.for_path(sock_path)
    client.connect_timeout = 3.0
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, coordinator_away="fallback"),
                          resource="r", coordinator=sock_path)
    os.kill(coord.pid, signal.SIGSTOP)  # accepts (the kernel does), never answers
    try:
        w = pool.acquire(timeout=10)  # after one connect attempt timed out: a fallback connection
        assert w.lease is None
        time.sleep(0.3)  # past the reconnect backoff: a checkin could try again
        t0 = time.monotonic()
        pool.release(w)
        # Before, the checkin itself reconnected: connect_timeout (3 s here, 5 s by default).
        assert time.monotonic() - t0 < 1.5
    finally:
        os.kill(coord.pid, signal.SIGCONT)
        pool.close()


def test_a_coordinator_that_stops_reading_cannot_hold_a_sender_forever(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handshake, "SEND_TIMEOUT", 0.5)
    coord = start_coordinator({"r": 1})
    client = Client(sock_path)
    client.inspect("resources")  # a session is up
    big = p.Inspect(0, "resources", {"pad": "x" * 500_000})
    sent = threading.Event()

    def send_until_lost() -> None:  # 100 MB at most: far beyond any socket buffer
        for _ in range(200):
            client._send_quiet(big)  # what a release or a report goes through
            if not client.connected:
                break
        sent.set()

    os.kill(coord.pid, signal.SIGSTOP)
    try:
        threading.Thread(target=send_until_lost, daemon=True).start()
        # Before, the send blocked for as long as the coordinator did not read.
        assert sent.wait(10), "a send still blocks on a coordinator that does not read"
        assert not client.connected
    finally:
        os.kill(coord.pid, signal.SIGCONT)
        client.close()


def test_release_of_anything_but_a_wrapper_is_a_clear_error() -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), coordinator=None)
    with pool.connection() as conn, pytest.raises(PoolMisuse, match="ConnectionWrapper"):
        pool.release(conn)  # type: ignore[arg-type]
    with pytest.raises(PoolMisuse, match="NoneType"):
        pool.release(None)  # type: ignore[arg-type]
    pool.close()


def _hold_requests_after_send(client: Client, monkeypatch: pytest.MonkeyPatch
                              ) -> tuple[threading.Event, threading.Event]:
    """``client.request`` goes out, then its opener is held (as if descheduled)
    until the returned gate is set; ``requested`` is set once one went out."""
    request = client.request
    requested, gate = threading.Event(), threading.Event()

    def slow_request(*args: Any, **kwargs: Any) -> Any:
        ticket = request(*args, **kwargs)
        requested.set()
        gate.wait(5)  # the opener is descheduled right after the request went out
        return ticket

    monkeypatch.setattr(client, "request", slow_request)
    return requested, gate


def test_a_pool_closed_while_its_lease_request_goes_out_takes_no_grant(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    start_coordinator({"r": 1})
    holder = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=sock_path, name="holder")
    held = holder.acquire(timeout=5)
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path, name="late")
    client = Client.for_path(sock_path)
    requested, gate = _hold_requests_after_send(client, monkeypatch)
    errors: list[BaseException] = []
    taker = start_recording(lambda: pool.acquire(timeout=5), errors)
    assert requested.wait(5)
    pool.close(timeout=0.5)
    gate.set()
    taker.join(5)
    assert errors and isinstance(errors[0], PoolClosed)
    deadline = time.monotonic() + 5
    while _waiting(client, "r"):  # the closed pool's request is withdrawn
        assert time.monotonic() < deadline, "the closed pool stayed queued at the coordinator"
        time.sleep(0.02)
    holder.release(held)
    again = holder.acquire(timeout=5)  # nobody else queued: it comes back to us
    assert factory.calls == 0
    holder.release(again)
    holder.close()


def test_a_lease_request_whose_waiter_was_served_as_it_went_out_is_withdrawn(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkin serves the last waiter while its opener's lease request is on
    its way (sent, not yet registered with the pool): the checkin withdraws only
    registered requests, so this one stayed queued at the coordinator for
    nobody, and the idle connection went back for it and was opened again (a
    close and a connect for nothing: test_one_busy_pool_at_max_per_process_keeps_its_connections
    saw 6-7 connects for 2 slots under load). Before: 2 connects here; now 1."""
    start_coordinator({"r": 2})
    holder = Client(sock_path)  # another session holds the other slot: the opener queues
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2, test_on_acquire=False),
                          resource="r", coordinator=sock_path)
    taker = None
    try:
        lease = holder.acquire("r", timeout=5)
        mine = pool.acquire(timeout=5)
        client = Client.for_path(sock_path)
        requested, gate = _hold_requests_after_send(client, monkeypatch)
        got: list[Any] = []
        errors: list[BaseException] = []
        taker = start_recording(lambda: got.append(pool.acquire(timeout=30)), errors)
        assert requested.wait(5)
        pool.release(mine)  # to the waiter: nobody waits any more
        taker.join(5)
        assert got and not errors, errors
        pool.release(got[0])
        gate.set()
        deadline = time.monotonic() + 5
        while _waiting(client, "r") or pool._opening:  # withdrawn, its opener done
            assert time.monotonic() < deadline, "the request stayed queued for nobody"
            time.sleep(0.02)
        assert factory.calls == 1, "the idle connection went back for the request and came back"
        assert pool.get_size() == 1
        holder.release(lease)
    finally:
        if taker is not None:
            taker.join(5)
        pool.close()
        holder.close()


def _waiting(client: Client, resource: str) -> int:
    rows = client.inspect("resources")["resources"]
    return next(r["waiting"] for r in rows if r["name"] == resource)


def test_stats_in_a_forked_child_do_not_wait_on_the_parents_lock() -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), coordinator=None)
    pool.release(pool.acquire())
    locked, done = threading.Event(), threading.Event()

    def hold_lock() -> None:
        with pool._lock:
            locked.set()
            done.wait(10)

    t = threading.Thread(target=hold_lock)
    t.start()
    locked.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: the thread holding the lock does not exist here
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # a hang here ends the child
        signal.alarm(5)
        code = 0 if pool.get_stats()["pool_size"] == 0 and pool.get_size() == 0 else 1
        os._exit(code)
    done.set()
    t.join()
    _, status = os.waitpid(pid, 0)
    pool.close()
    assert os.waitstatus_to_exitcode(status) == 0  # not -SIGALRM (hung), not 1 (parent's state)


def test_a_release_in_a_forked_child_never_touches_the_parents_connection() -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, test_on_release=True),
                          coordinator=None)
    w = pool.acquire()
    pid = os.fork()
    if pid == 0:  # a fork inside `with pool.connection()`: the child leaves the block too
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(5)
        pings = w.conn.pings
        try:
            pool.release(w)
            code = 1
        except PoolMisuse:
            code = 0 if w.conn.pings == pings else 2  # 2: it pinged the parent's connection
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    pool.release(w)
    pool.close()
    assert os.waitstatus_to_exitcode(status) == 0


def _pg_pool(pg: str, app_name: str, **cfg: Any) -> ConnectionPool[Any]:
    import psycopg

    cfg.setdefault("min_size", 0)
    cfg.setdefault("max_size", 1)
    return ConnectionPool(lambda: psycopg.connect(pg, application_name=app_name), PoolConfig(**cfg),
                          coordinator=None)


def test_a_query_cut_short_by_a_signal_does_not_come_back_busy(
        interrupt: Callable[[float], None], pg: str, app_name: str) -> None:
    pool = _pg_pool(pg, app_name)
    try:
        t0 = time.monotonic()
        with pytest.raises(Interrupted), pool.connection() as conn:
            first = conn.info.backend_pid
            interrupt(0.2)
            conn.execute("SELECT pg_sleep(10)")
        # Closed, and its query cancelled: not put back running it.
        assert time.monotonic() - t0 < 5
        with pool.connection() as conn:
            assert conn.info.backend_pid != first
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


def test_a_transaction_left_open_by_an_exception_is_rolled_back(pg: str, app_name: str) -> None:
    pool = _pg_pool(pg, app_name)
    try:
        with pytest.raises(ValueError), pool.connection() as conn:
            first = conn.info.backend_pid
            conn.execute("CREATE TEMP TABLE leftover (x int)")
            raise ValueError("the caller's own error")
        with pool.connection() as conn:
            assert conn.info.backend_pid == first  # kept: a rollback was enough
            assert conn.info.transaction_status == 0  # IDLE
            assert conn.execute("SELECT to_regclass('pg_temp.leftover')").fetchone() == (None,)
        import psycopg

        with pytest.raises(psycopg.errors.DivisionByZero), pool.connection() as conn:
            conn.execute("SELECT 1 / 0")  # INERROR: also rolled back
        with pool.connection() as conn:
            assert conn.info.transaction_status == 0
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


@pytest.mark.parametrize("left", ["open transaction", "failed transaction", "closed", "terminated"])
def test_a_connection_checked_in_not_at_rest_without_an_exception_is_reset(
        left: str, pg: str, app_name: str, caplog: pytest.LogCaptureFixture) -> None:
    # No exception left the block, yet the connection is not at rest: the next
    # caller must not inherit the transaction (its rows, its locks) or a dead
    # connection. psycopg_pool's putconn and SQLAlchemy's reset on return do the same.
    import psycopg

    pool = _pg_pool(pg, app_name, validation_bypass=60.0)  # no ping at checkout to hide it
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
            conn.commit()
        caplog.set_level(logging.DEBUG, logger="sharedpool.pool")
        with pool.connection() as conn:
            first = conn.info.backend_pid
            if left == "open transaction":
                conn.execute("CREATE TEMP TABLE leftover (x int)")
            elif left == "failed transaction":
                with contextlib.suppress(psycopg.errors.DivisionByZero):
                    conn.execute("SELECT 1 / 0")
            elif left == "closed":
                conn.close()
            else:
                with psycopg.connect(pg, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (first,))
                with contextlib.suppress(psycopg.OperationalError):
                    conn.execute("SELECT 1")
        with pool.connection() as conn:
            assert conn.info.transaction_status == 0  # IDLE
            assert conn.execute("SELECT to_regclass('pg_temp.leftover')").fetchone() == (None,)
            conn.commit()
            if left.endswith("transaction"):
                assert conn.info.backend_pid == first  # a rollback was enough
            else:
                assert conn.info.backend_pid != first
        warned = [r for r in caplog.records
                  if r.levelno == logging.WARNING and "checked in" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert {"open transaction": "rolled back", "failed transaction": "rolled back",
                "closed": "discarded", "terminated": "discarded"}[left] in warned[0].getMessage()
        assert pool.get_stats()["pool_size"] == 1
        # psycopg_pool's returns_bad: the closed or broken ones (was counted nowhere)
        assert pool.get_stats()["returns_bad"] == (left in ("closed", "terminated"))
    finally:
        pool.close()


def test_a_normal_checkin_at_rest_keeps_the_connection_and_logs_nothing(
        pg: str, app_name: str, caplog: pytest.LogCaptureFixture) -> None:
    pool = _pg_pool(pg, app_name)
    caplog.set_level(logging.DEBUG, logger="sharedpool.pool")
    try:
        with pool.connection() as conn:
            first = conn.info.backend_pid
            conn.execute("SELECT 1")
            conn.commit()
        with pool.connection() as conn:
            assert conn.info.backend_pid == first
        assert "checked in" not in caplog.text
    finally:
        pool.close()


def test_configure_runs_once_per_connection_and_a_failure_reaches_the_caller(
        start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    seen: list[FakeConnection] = []
    factory = FakeFactory()

    def configure(conn: FakeConnection) -> None:
        seen.append(conn)
        if len(seen) == 1:
            raise RuntimeError("SET search_path failed")

    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path, configure=configure)
    try:
        with pytest.raises(RuntimeError, match="search_path"):
            pool.acquire(timeout=5)
        assert factory.made[0].closed and pool.get_size() == 0
        assert pool._client is not None and pool._client.held == {}  # its lease went back
        for _ in range(3):
            with pool.connection(timeout=5) as conn:
                assert conn is factory.made[1]
        assert seen == factory.made  # once per connection, not per checkout
    finally:
        pool.close()


def test_configure_runs_on_connections_the_min_size_top_up_opens() -> None:
    configured: list[FakeConnection] = []
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=2, max_size=2), coordinator=None,
                          configure=configured.append)
    try:
        deadline = time.monotonic() + 5
        while pool.get_size() < 2:
            assert time.monotonic() < deadline, "the top-up to min_size never ran"
            time.sleep(0.02)
        assert configured == factory.made
        with pool.connection() as conn:
            assert conn in configured
    finally:
        pool.close()


def test_a_connection_being_configured_is_no_suspected_leak() -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, leak_detection_threshold=0.2),
                          coordinator=None, configure=lambda conn: time.sleep(0.8))
    try:
        with pool.connection(timeout=5):
            pass
        assert pool.get_metrics()["leaks_suspected"] == 0
    finally:
        pool.close()


def test_a_timeout_behind_a_configure_that_hangs_says_so() -> None:
    # Before: "(1 open, 1 in use, max_size=1)", as if a caller held the connection
    # that configure= was still setting up (setup SQL on a server that hangs).
    release = threading.Event()
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), coordinator=None,
                          configure=lambda conn: release.wait(10))
    try:
        with pytest.raises(PoolTimeout) as err:
            pool.acquire(timeout=0.5)
        assert "1 in use (1 of them still in configure=)" in str(err.value), err.value
    finally:
        release.set()
        pool.close()


def test_release_process_waits_one_timeout_in_all_not_one_per_pool() -> None:
    pid = os.fork()
    if pid == 0:  # a worker at exit, three pools each with a connection that never comes back
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(10)
        from sharedpool.process import release_process

        pools = [ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), coordinator=None)
                 for _ in range(3)]
        held = [p.acquire() for p in pools]
        t0 = time.monotonic()
        release_process(1.0)
        took = time.monotonic() - t0
        os._exit(0 if 0.9 < took < 2.5 and len(held) == 3 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # 1: it took a timeout per pool (3 s)


def test_release_process_runs_its_before_release_hooks_first_once_each() -> None:
    pid = os.fork()
    if pid == 0:  # a worker at exit whose host library holds a checkout (Django's request)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(10)
        from sharedpool.process import before_release, release_process

        pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), coordinator=None)
        held = [pool.acquire()]
        calls: list[str] = []

        def broken() -> None:
            calls.append("broken")
            raise RuntimeError("a hook that fails")

        def give_back() -> None:
            calls.append("give_back")
            pool.release(held.pop())

        for hook in (broken, give_back, give_back):
            before_release(hook)
        t0 = time.monotonic()
        release_process(5.0)
        took = time.monotonic() - t0
        os._exit(0 if took < 2.5 and calls == ["broken", "give_back"]
                 and pool.status is not PoolStatus.ACTIVE else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0  # 1: a hook not run, run twice, or the wait


def test_a_connection_broken_in_a_failing_block_is_not_kept() -> None:
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1), coordinator=None)
    try:
        with pytest.raises(ConnectionError), pool.connection() as conn:
            conn.close()  # the server went away under the caller
            conn.execute()
        assert pool.get_size() == 0  # not parked for the next caller to find broken
        with pool.connection() as conn:
            assert conn is factory.made[1]
    finally:
        pool.close()


def test_a_connect_stuck_past_connection_timeout_does_not_stop_growth() -> None:
    """The caller of a connect that overran connection_timeout gets a
    ConnectTimeout; that connect may hang on. The next callers get connections
    of their own (the pool has room), instead of waiting on the stuck one
    until their acquire_timeout."""
    unblock = threading.Event()
    calls = [0]

    def factory() -> FakeConnection:
        calls[0] += 1
        if calls[0] == 1:
            unblock.wait(10)  # a SYN to a dead host
        return FakeConnection()

    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=3, connection_timeout=0.3,
                                              acquire_timeout=5.0))
    try:
        with pytest.raises(ConnectTimeout):
            pool.acquire()
        t0 = time.monotonic()
        wrapper = pool.acquire()
        assert time.monotonic() - t0 < 2.5, "waited on the stuck connect"
        pool.release(wrapper)
    finally:
        unblock.set()
        pool.close()


def test_a_hanging_top_up_does_not_stall_maintenance() -> None:
    """min_size top-ups connect on a thread of their own: while one hangs,
    leak detection (and lifetime, idle and validation checks) go on."""
    unblock = threading.Event()
    calls = [0]

    def factory() -> FakeConnection:
        calls[0] += 1
        if calls[0] >= 2:
            unblock.wait(10)
        return FakeConnection()

    pool = ConnectionPool(factory, PoolConfig(min_size=2, max_size=4, connection_timeout=1.0,
                                              leak_detection_threshold=0.3))
    try:
        wrapper = pool.acquire(timeout=5)  # the one connection made; held past the threshold
        deadline = time.monotonic() + 5
        while not pool.get_metrics()["leaks_suspected"]:
            assert time.monotonic() < deadline, "leak detection stalled behind a hanging top-up"
            time.sleep(0.05)
        pool.release(wrapper)
    finally:
        unblock.set()
        pool.close()


def test_configure_opens_one_connection_per_cold_acquire() -> None:
    """The connection being configured goes to the waiter: no second connect
    (and, coordinated, no second lease) is started for that waiter."""
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=4),
                          configure=lambda conn: time.sleep(0.2))
    try:
        wrapper = pool.acquire(timeout=5)
        time.sleep(0.3)  # a second opener would have connected by now
        assert factory.calls == 1 and pool.get_size() == 1
        pool.release(wrapper)
    finally:
        pool.close()


@pytest.mark.parametrize("bad", [math.inf, math.nan, "1", True,
                                 pytest.param(10**400, id="10**400")])  # no float deadline for it
def test_bad_timeouts_are_config_errors(bad: Any) -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    held = pool.acquire()  # the only connection is in use: every call below would wait
    try:
        for call in (lambda: pool.acquire(timeout=bad), lambda: pool.drain(timeout=bad),
                     lambda: pool.close(timeout=bad)):
            t0 = time.monotonic()
            with pytest.raises(ConfigError) as info:
                call()
            assert info.value.field == "timeout" and time.monotonic() - t0 < 1
    finally:
        pool.release(held)
        pool.close()


def test_the_leak_site_names_the_line_that_checked_out() -> None:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2,
                                                    leak_detection_threshold=30))
    try:
        def handler_that_leaks() -> Any:
            return pool.acquire()

        slow = handler_that_leaks()  # no idle connection: the slow path
        pool.release(slow)
        fast = handler_that_leaks()  # the idle one: the fast path
        for wrapper in (slow, fast):
            assert wrapper.site is not None and "in handler_that_leaks" in wrapper.site, wrapper.site
        pool.release(fast)
    finally:
        pool.close()


def test_an_exception_between_checkout_and_caller_checks_the_connection_back_in(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a signal handler does when it raises at the wrong moment (celery's
    soft time limit, an alarm): here, while leak detection records the call
    site, and while a checkin is under way. The connection must not stay
    'in use' for ever, with its lease."""
    from sharedpool import pool as pool_module
    from sharedpool import waiting

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2,
                                                    leak_detection_threshold=30))
    real_site, real_clock = pool_module._call_site, pool_module._monotonic
    try:
        # The first checkout opens (the slow path's module), the second reuses.
        for path, module in (("slow", waiting), ("fast", pool_module)):
            def raising_site() -> str:
                raise Interrupted("the signal handler raised")

            monkeypatch.setattr(module, "_call_site", raising_site)
            with pytest.raises(Interrupted):
                pool.acquire()
            monkeypatch.setattr(module, "_call_site", real_site)
            assert pool.get_in_use() == 0 and pool.get_size() == 1, path
        wrapper = pool.acquire()
        calls = [0]

        def raising_clock() -> float:
            calls[0] += 1
            if calls[0] == 1:
                raise Interrupted("the signal handler raised")
            return real_clock()

        monkeypatch.setattr(pool_module, "_monotonic", raising_clock)
        with pytest.raises(Interrupted):
            pool.release(wrapper)
        monkeypatch.setattr(pool_module, "_monotonic", real_clock)
        assert pool.get_in_use() == 0
        with pytest.raises(PoolMisuse):  # it did go back: a second checkin is misuse
            pool.release(wrapper)
    finally:
        pool.close()


def test_an_error_after_the_connect_keeps_the_lease_with_the_open_connection(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bookkeeping that fails after the factory returned (here: reporting the
    connect time) must not give the lease back while the connection is open
    (I1): the connection is used, under its lease."""
    def broken(*_: object) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(Client, "report_cost", broken)  # what a thread that cannot start does
    start_coordinator({"r": 2})
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2), resource="r",
                          coordinator=sock_path)
    probe = Client(sock_path)
    try:
        wrapper = pool.acquire(timeout=5)
        assert wrapper.lease is not None and len(factory.open) == 1
        assert probe.inspect("resources")["resources"][0]["leased"] == 1
        pool.release(wrapper)
        pool.close()  # closing reports its time too: the lease still goes back
        assert factory.open == [] and wait_leased(sock_path, 0) == 0
    finally:
        probe.close()
        pool.close()


def _expiring_pool(server: HoldingServer, sock_path: str, **config: Any) -> ConnectionPool[Any]:
    """One connection at most, closed at its checkin (past max_lifetime); the
    close waits (by default) up to 3 s for the server to let go."""
    config.setdefault("close_confirm_timeout", 3.0)
    return ConnectionPool(server.connect, PoolConfig(min_size=0, max_size=1, max_lifetime=0.1, **config),
                          resource="r", coordinator=sock_path)


@pytest.mark.parametrize("base", [KeyboardInterrupt, Exception])
def test_a_signal_during_a_close_keeps_the_lease_until_the_server_lets_go(
        start_coordinator: Any, sock_path: str, base: type[BaseException]) -> None:
    """A connection past max_lifetime is closed at checkin, and the checkin waits
    for the server to drop it; a signal handler's exception (celery's soft time
    limit is an Exception) arrives meanwhile. It reaches the caller, and the
    lease stays held until the server lets go: it leaked for good
    (KeyboardInterrupt), or went back at once with the server still holding the
    connection (an Exception, swallowed)."""

    class SoftLimit(base):  # type: ignore[misc,valid-type]
        pass

    start_coordinator({"r": 2})
    server = HoldingServer()
    pool = _expiring_pool(server, sock_path)
    try:
        with alarm_raises(SoftLimit):
            wrapper = pool.acquire()
            server.accept()
            time.sleep(0.2)  # past max_lifetime: the checkin closes it
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(SoftLimit):
                pool.release(wrapper)
        assert wait_leased(sock_path, 1, timeout=0.5) == 1  # the server has not let go
        server.let_go()
        assert wait_leased(sock_path, 0) == 0  # now it has: the watcher gives the lease back
    finally:
        server.let_go()
        pool.close()
        server.close()


@pytest.mark.parametrize("where", ["entry", "thread-start"])
def test_a_signal_before_the_opener_runs_does_not_wedge_the_pool(where: str) -> None:
    """A signal handler's exception as the caller starts the opener thread (at
    _start_openers' entry, or inside Thread.start(), which waits for the thread
    and is where handlers run) left one phantom 'opening': every later lone
    acquire waited its whole timeout for an opener that never ran."""
    import sys

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2, acquire_timeout=1))
    target = (ConnectionPool._start_openers if where == "entry" else threading.Thread.start).__code__
    fired = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call" and frame.f_code is target and not fired:
            if where == "entry" and not frame.f_locals.get("waiters"):
                return None
            fired.append(True)
            raise KeyboardInterrupt  # as a handler running at that instruction would
        return None

    try:
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                pool.acquire(timeout=1)
        finally:
            sys.settrace(None)
        assert fired and "0 opening" in repr(pool), repr(pool)
        start = time.monotonic()
        with pool.connection(timeout=3):
            pass
        assert time.monotonic() - start < 2
    finally:
        pool.close()


def test_a_close_cut_short_at_checkin_still_starts_the_waiters_opener(
        start_coordinator: Any, sock_path: str) -> None:
    """The checkin of a connection past max_lifetime closes it and plans an
    opener for a thread waiting meanwhile; a signal handler's exception during
    the close's confirmation skipped starting it, and with max_size=1 the pool
    never handed out a connection again."""

    class SoftLimit(Exception):
        pass

    start_coordinator({"r": 2})
    server = HoldingServer()
    pool = _expiring_pool(server, sock_path, acquire_timeout=5)
    served: list[float] = []
    try:
        with alarm_raises(SoftLimit):
            wrapper = pool.acquire()
            server.accept()

            def waiter() -> None:
                t0 = time.monotonic()
                with pool.connection(timeout=5):
                    served.append(time.monotonic() - t0)

            thread = threading.Thread(target=waiter)
            thread.start()
            time.sleep(0.2)  # queued behind our checkout; our connection is past max_lifetime
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(SoftLimit):
                pool.release(wrapper)
            thread.join(8)
        assert served and served[0] < 4, served
        assert "0 opening" in repr(pool), repr(pool)
    finally:
        server.let_go()
        pool.close()
        server.close()


def test_a_connection_handed_to_a_waiter_whose_caller_is_gone_is_checked_back_in(
        start_coordinator: Any, sock_path: str) -> None:
    """A checkin hands the connection to a waiting acquire, and a signal
    handler's exception ends that acquire before it returns the connection:
    it must go back to the pool, not stay checked out (with its lease) for good."""

    class SoftLimit(Exception):
        pass

    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    held = pool.acquire(timeout=5)

    def on_alarm(signum: int, frame: Any) -> None:
        pool.release(held)  # handed to the acquire waiting below...
        raise SoftLimit  # ...which is cut short before it sees it

    old = signal.signal(signal.SIGALRM, on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(SoftLimit):
            pool.acquire(timeout=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    try:
        assert pool.get_in_use() == 0
        again = pool.acquire(timeout=1)
        assert again is held
        pool.release(again)
    finally:
        pool.close()


def _exit_with_a_query_running(sock: str) -> dict[str, Any]:
    """A worker's exit hook (release_process) while one of its threads still
    uses a connection, past the hook's timeout; then whether another session
    can lease the cap's one slot, before and after that thread checks in."""
    from sharedpool import release_process

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock)
    checked_out, done = threading.Event(), threading.Event()

    def query() -> None:
        with pool.connection():
            checked_out.set()
            done.wait(10)

    thread = threading.Thread(target=query)
    thread.start()
    assert checked_out.wait(10)
    release_process(0.2)
    other = Client(sock)
    out: dict[str, Any] = {}
    try:
        try:
            other.release(other.acquire("r", timeout=0.5))
            out["while_in_use"] = "granted"
        except PoolTimeout:
            out["while_in_use"] = "timeout"
        done.set()
        thread.join(10)
        other.release(other.acquire("r", timeout=5))
        out["after_checkin"] = "granted"
    finally:
        done.set()
        other.close()
    return out


def test_an_exit_hook_keeps_the_session_of_a_connection_still_in_use(
        start_coordinator: Any, sock_path: str) -> None:
    """A gthread worker past its graceful_timeout: worker_exit's release_process
    ends after its timeout while a thread still runs its query. It ended the
    session anyway: the lease was freed (fenced for quarantine_delay only) and
    handed on with the connection still open, PostgreSQL over the cap (cap 1:
    2 backends). The session now lasts until that connection is closed."""
    start_coordinator({"r": 1})
    [child] = run_forked(_exit_with_a_query_running, sock_path)
    assert child == {"while_in_use": "timeout", "after_checkin": "granted"}


def test_a_wait_cut_short_withdraws_its_lease_request(start_coordinator: Any, sock_path: str) -> None:
    """celery's soft time limit fires while a checkout waits at the cap: the
    opener's lease request stayed queued at the coordinator until the wait's
    deadline (ahead of other processes, for a connection nobody wanted, opened
    once granted). Withdrawn as a checkin withdraws it once nobody waits."""
    start_coordinator({"r": 1})
    holder = Client(sock_path)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, acquire_timeout=30),
                          resource="r", coordinator=sock_path)
    try:
        lease = holder.acquire("r", timeout=5)
        with alarm_raises(Interrupted):
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(Interrupted):
                pool.acquire(timeout=30)
        deadline = time.monotonic() + 5
        while (waiting := resource_row(sock_path)["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waiting == 0
        holder.release(lease)
        time.sleep(0.3)
        assert pool.get_size() == 0  # nothing opened for the caller that left
    finally:
        pool.close()
        holder.close()


@contextlib.contextmanager
def _pool_beside_a_holder(start_coordinator: Any, sock_path: str, cap: int,
                          max_size: int) -> Iterator[tuple[ConnectionPool[Any], Callable[[], None]]]:
    """Resource "r" of cap ``cap``, one lease of it held by another client, and a
    pool of ``max_size`` (acquire_timeout 30) on it: (pool, let the lease go)."""
    start_coordinator({"r": cap})
    holder = Client(sock_path)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=max_size, acquire_timeout=30),
                          resource="r", coordinator=sock_path)
    try:
        lease = holder.acquire("r", timeout=5)
        yield pool, lambda: holder.release(lease)
    finally:
        pool.close()
        holder.close()


def _start_queued(sock_path: str, target: Callable[[], object],
                  errors: list[BaseException]) -> threading.Thread:
    """``target`` (a checkout) in a thread, once its opener's lease request is
    queued at the coordinator."""
    thread = start_recording(target, errors)
    deadline = time.monotonic() + 5
    while resource_row(sock_path)["waiting"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    return thread


def test_a_lease_request_planned_for_a_waiter_carries_that_waiters_deadline(
        start_coordinator: Any, sock_path: str) -> None:
    """At the cap, W1's lease request times out with W1 while W2 (a pool of one:
    no room for an opener of its own) waits on. The opener planned for W2 then
    asked with now + acquire_timeout (30 s), not W2's deadline: once W2 had its
    PoolTimeout, that request stayed queued at the coordinator for half a
    minute, ahead of other processes, for a connection nobody wanted, and the
    coordinator counted 1 timeout for 2 PoolTimeouts. Before: waiting 1,
    timeouts 1 after both PoolTimeouts; now 0 and 2."""
    errors: list[BaseException] = []
    with _pool_beside_a_holder(start_coordinator, sock_path, cap=1, max_size=1) as (pool, let_go):
        # W1's opener has its request queued: W2 gets no opener now.
        first = _start_queued(sock_path, lambda: pool.acquire(timeout=1.0), errors)
        second = start_recording(lambda: pool.acquire(timeout=2.5), errors)
        first.join(10)
        second.join(10)
        assert [type(e) for e in errors] == [PoolTimeout, PoolTimeout], errors
        deadline = time.monotonic() + 5
        while (row := resource_row(sock_path))["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (row["waiting"], row["timeouts"]) == (0, 2), row
        let_go()
        time.sleep(0.3)
        assert pool.get_size() == 0  # nothing opened for the callers that left


def test_a_lease_request_whose_waiter_a_checkin_served_does_not_time_out_at_the_coordinator(
        start_coordinator: Any, sock_path: str) -> None:
    """W1's opener asks for a lease (its deadline); W2 waits too, with no room
    for an opener of its own; a checkin serves W1. The request, kept for W2,
    timed out at the coordinator with W1's deadline: a timeout in
    timeouts_total that no caller saw (about 1 in 600 grants under load).
    Withdrawn just before, and asked again with W2's deadline. Before:
    coordinator timeouts 1, PoolTimeouts 0; now 0 and 0."""
    errors: list[BaseException] = []
    got: list[Any] = []
    with _pool_beside_a_holder(start_coordinator, sock_path, cap=2, max_size=2) as (pool, let_go):
        mine = pool.acquire(timeout=10)  # the pool's one lease: the cap is full
        # W1's opener has its request queued: W2 gets no opener now.
        first = _start_queued(sock_path, lambda: got.append(pool.acquire(timeout=1.0)), errors)
        second = start_recording(lambda: got.append(pool.acquire(timeout=10)), errors)
        deadline = time.monotonic() + 5
        while pool.get_stats()["requests_queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        pool.release(mine)  # to W1
        first.join(10)
        assert len(got) == 1 and not errors, errors
        time.sleep(1.5)  # past W1's deadline, with W2 still waiting
        assert resource_row(sock_path)["timeouts"] == 0
        let_go()  # W2's lease
        second.join(10)
        assert len(got) == 2 and not errors, errors
        assert resource_row(sock_path)["timeouts"] == 0
        for wrapper in got:
            pool.release(wrapper)


def test_a_lease_request_carried_on_for_the_next_waiter_keeps_its_place_in_line(
        start_coordinator: Any, sock_path: str) -> None:
    """As above, with another process queued behind W1's request. That request,
    withdrawn just before W1's deadline and asked again with W2's, went to the
    back of the coordinator's line: the next free slot went to the process
    that had queued later, and W2, waiting since before it, waited on (here
    until its own timeout). Now it is retimed to W2's deadline in its place.
    Before: W2 not served within 3 s of the slot coming free, the later
    process granted; now W2 served, the later process still waiting."""
    errors: list[BaseException] = []
    got: list[Any] = []
    with _pool_beside_a_holder(start_coordinator, sock_path, cap=2, max_size=2) as (pool, let_go):
        later = Client(sock_path)
        try:
            mine = pool.acquire(timeout=10)  # the pool's one lease: the cap is full
            t1 = time.monotonic()
            first = _start_queued(sock_path, lambda: got.append(pool.acquire(timeout=1.0)), errors)
            second = start_recording(lambda: got.append(pool.acquire(timeout=8)), errors)
            wait_for(lambda: pool.get_stats()["requests_queued"] >= 2, 5, "both requests queued")
            ticket = later.request("r", timeout=20)  # queued behind W1's request
            wait_for(lambda: resource_row(sock_path)["waiting"] == 2, 5, "both processes waiting")
            pool.release(mine)  # to W1; its request stays queued for W2
            first.join(10)
            assert len(got) == 1 and not errors, errors
            # Past W1's deadline (the request is carried on just before it), W2 waiting.
            time.sleep(max(0.0, t1 + 1.3 - time.monotonic()))
            assert resource_row(sock_path)["timeouts"] == 0
            let_go()  # one slot comes free: for the first in line
            wait_for(lambda: len(got) == 2, 3, "W2 to be served (not the later process first)")
            second.join(10)
            assert not errors, errors
            row = resource_row(sock_path)
            assert (row["waiting"], row["timeouts"]) == (1, 0), row  # the later process still waits
            assert ticket.cancel()
            for wrapper in got:
                pool.release(wrapper)
        finally:
            later.close()


def test_no_thread_for_the_close_watcher_still_gives_the_lease_back(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close not confirmed in time is watched in a background thread; when no
    thread can be started (a thread limit), it is watched in the caller's
    thread instead, bounded, and the lease goes back once the server lets go.
    It was held for good."""
    import socket

    server_ends: list[socket.socket] = []

    class Conn:
        def __init__(self) -> None:
            self.sock, end = socket.socketpair()
            server_ends.append(end)

        def fileno(self) -> int:
            return self.sock.fileno()

        def close(self) -> None:
            self.sock.close()

    start_coordinator({"r": 1})
    pool = ConnectionPool(Conn, PoolConfig(min_size=0, max_size=1, close_confirm_timeout=0.2),
                          resource="r", coordinator=sock_path)
    pool.release(pool.acquire())
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "sharedpool-close-confirm":
            raise RuntimeError("can't start new thread")
        real_start(self)

    letting_go = threading.Timer(0.6, lambda: [end.close() for end in server_ends])
    letting_go.start()
    monkeypatch.setattr(threading.Thread, "start", start)
    try:
        pool.close(timeout=2)
    finally:
        monkeypatch.undo()
        letting_go.join(5)
    assert wait_leased(sock_path, 0, timeout=2) == 0


def test_waits_longer_than_a_lock_can_wait_at_once_still_work() -> None:
    # threading's waits top out at ~9.2e9 s (TIMEOUT_MAX): acquire(timeout=1e10)
    # raised OverflowError as soon as it had to wait.
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, acquire_timeout=1e10))
    held = pool.acquire(timeout=5)
    threading.Timer(0.1, pool.release, args=(held,)).start()
    again = pool.acquire(timeout=1e10)
    assert again is held
    threading.Timer(0.1, pool.release, args=(again,)).start()
    assert pool.acquire() is held  # the configured default, as large
    pool.release(held)
    pool.close(timeout=1e10)


def test_a_pool_timeout_with_no_coordinator_says_so(tmp_path: Any) -> None:
    # Before: only "no connection within 0.3s (0 open, ...)": nothing said the
    # socket was wrong or its coordinator dead.
    path = str(tmp_path / "nobody.sock")
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r", coordinator=path)
    try:
        with pytest.raises(PoolTimeout, match=f"coordinator at {path} unreachable"):
            pool.acquire(timeout=0.3)
    finally:
        pool.close()


def test_a_pool_timeout_at_a_socket_that_never_answers_says_so(tmp_path: Any) -> None:
    """Before: within the client's connect_timeout (5 s), a socket that accepts
    and never says a word (a coordinator stopped with SIGSTOP, another program's
    socket) read as the global cap taken: "still waiting for a lease of resource
    'r' (its cap is taken, or it is paused or restarting)"."""
    import socket

    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(8)  # connects succeed; nobody ever answers
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r", coordinator=path)
    try:
        with pytest.raises(PoolTimeout) as err:
            pool.acquire(timeout=1)
        assert f"coordinator at {path} has not answered our hello yet" in str(err.value), err.value
        assert "or no sharedpool coordinator listening there" in str(err.value), err.value
        assert "cap is taken" not in str(err.value), err.value
    finally:
        pool.close()
        mute.close()


def test_a_hello_long_unanswered_says_its_seconds_plainly(tmp_path: Any) -> None:
    # With connect_timeout=None a handshake may go unanswered for minutes: its
    # age read "(1.5e+02s)".
    import socket

    path = str(tmp_path / "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(path)
    mute.listen(8)  # connects succeed; nobody ever answers
    client = Client(path, connect_timeout=None)
    try:
        client.reconnect_soon()
        wait_for(lambda: client._connecting is not None, 10, "the handshake under way")
        client._connecting_since -= 150  # as if it had waited that long
        assert "has not answered our hello yet (150." in client.unreachable_note(), client.unreachable_note()
    finally:
        client.close(1)
        mute.close()


def test_every_acquire_with_no_coordinator_waits_its_timeout_and_raises_pool_timeout(tmp_path: Any) -> None:
    # Before: the acquires alternated: PoolTimeout after the timeout, then
    # CoordinatorUnavailable after 0.5 s (the first one's opener, failing after
    # its waiter had gone, handed its error to the next waiter).
    path = str(tmp_path / "nobody.sock")
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r", coordinator=path)
    try:
        for _ in range(3):
            t0 = time.monotonic()
            with pytest.raises(PoolTimeout, match="unreachable"):
                pool.acquire(timeout=0.6)
            assert time.monotonic() - t0 >= 0.55
    finally:
        pool.close()


def test_a_standalone_connect_failing_after_its_waiter_left_reaches_the_next_waiter() -> None:
    # Before: the opener of a waiter that timed out counted its late connect
    # error as an expired lease wait (client and lease both None): the next
    # waiter never saw the error, the factory ran again, and it got PoolTimeout.
    calls = []

    def factory() -> Any:
        calls.append(1)
        time.sleep(0.6)
        raise ConnectionError("db down")

    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, connection_timeout=30))
    got: dict[str, Any] = {}

    def second() -> None:
        try:
            pool.acquire(timeout=3)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assert
            got["error"] = exc

    try:
        with pytest.raises(PoolTimeout):
            threading.Timer(0.05, second).start()
            pool.acquire(timeout=0.2)
        deadline = time.monotonic() + 5
        while "error" not in got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert isinstance(got.get("error"), ConnectionError), got
        assert len(calls) == 1
    finally:
        pool.close(timeout=3)


def test_a_pool_timeout_does_not_call_a_coordinator_not_yet_reached_unreachable(
        start_coordinator: Any, sock_path: str) -> None:
    # Before: a fresh pool's acquire(timeout=0) said the (running) coordinator
    # was "unreachable": its session is made lazily, by the opener.
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    try:
        with pytest.raises(PoolTimeout) as err:
            pool.acquire(timeout=0)
        assert "unreachable" not in str(err.value)
        deadline = time.monotonic() + 5
        while not pool.get_stats()["pool_available"] and time.monotonic() < deadline:
            time.sleep(0.01)  # the background opener, which timeout=0 still starts
        pool.release(pool.acquire(timeout=0))
    finally:
        pool.close()


def test_a_pool_timeout_at_the_global_cap_says_it_waited_for_a_lease(
        start_coordinator: Any, sock_path: str) -> None:
    # Before: "no connection within 0.3s (0 open, 0 in use, max_size=2)", nothing
    # about the coordinator: as if the pool itself were stuck.
    start_coordinator({"r": 2})
    holder, pool = _holder_and_pool(sock_path, max_size=2)
    try:
        # The pool's session made first: under a loaded suite, making it could take
        # longer than the timeout below, and no request would be out yet to name.
        mine = pool.acquire(timeout=10)
        _times_out_waiting_for_a_lease(holder, pool)
        pool.release(mine)
    finally:
        pool.close()
        holder.close()


def _holder_and_pool(sock_path: str, max_size: int) -> tuple[ConnectionPool[Any], ConnectionPool[Any]]:
    """A pool of one connection that takes the last lease of "r", and a pool left waiting."""
    holder = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=sock_path)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=max_size), resource="r",
                          coordinator=sock_path)
    return holder, pool


def _times_out_waiting_for_a_lease(holder: ConnectionPool[Any], pool: ConnectionPool[Any]) -> None:
    held = holder.acquire(timeout=10)
    with pytest.raises(PoolTimeout, match="still waiting for a lease of resource 'r' from the"):
        pool.acquire(timeout=1.0)
    holder.release(held)


def test_a_lease_wait_denied_before_the_waiters_deadline_says_it_waited_for_a_lease(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    # The coordinator times the lease request out by its own clock, a hair
    # before the waiter's deadline on a loaded machine (once in a CI run): the
    # waiter then raised the coordinator's bare "all 1 leases of 'r' are held",
    # with nothing of the pool. Made deterministic: the denial comes 0.3 s early.
    from sharedpool import opening

    take_lease = opening.take_lease
    monkeypatch.setattr(opening, "take_lease",
                        lambda pool, client, deadline, **kw: take_lease(pool, client, deadline - 0.3, **kw))
    start_coordinator({"r": 1})
    holder, pool = _holder_and_pool(sock_path, max_size=1)
    try:
        _times_out_waiting_for_a_lease(holder, pool)
        assert pool.get_stats()["requests_errors"] == 1
    finally:
        pool.close()
        holder.close()


def test_a_timeout_as_the_lease_request_ends_still_says_it_waited_for_a_lease(
        start_coordinator: Any, sock_path: str, monkeypatch: Any) -> None:
    # The opener's lease request times out at the same deadline as its waiter:
    # when the opener had dropped it first (a loaded machine; once in a full
    # run), the waiter's PoolTimeout said nothing about the coordinator.
    from sharedpool import opening

    take_lease = opening.take_lease

    def ended_first(pool: Any, client: Any, deadline: float, **kw: Any) -> Any:
        try:
            return take_lease(pool, client, deadline - 0.3, **kw)
        except PoolTimeout:
            time.sleep(max(0.0, deadline - time.monotonic()) + 0.1)  # the waiter looks meanwhile
            raise

    monkeypatch.setattr(opening, "take_lease", ended_first)
    start_coordinator({"r": 1})
    holder, pool = _holder_and_pool(sock_path, max_size=1)
    try:
        _times_out_waiting_for_a_lease(holder, pool)
    finally:
        pool.close()
        holder.close()


def test_close_does_not_wait_out_its_timeout_for_a_failed_top_up() -> None:
    # Before, a min_size top-up whose connect failed never woke close(), which
    # waits for connections being opened: it slept its whole timeout.
    factory = FakeFactory(delay=0.3, fail=OSError("refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=1, max_size=1))
    deadline = time.monotonic() + 5
    while factory.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # the top-up is inside the factory
    t0 = time.monotonic()
    pool.close(timeout=8)
    assert time.monotonic() - t0 < 3


def test_a_closed_pool_ends_its_session_when_its_last_opening_fails(
        start_coordinator: Any, sock_path: str) -> None:
    # Before, only a connection closed after close() ended the session: one
    # whose connect failed left the session, its thread and socket for good.
    start_coordinator({"r": 2})
    factory = FakeFactory(delay=0.5, fail=OSError("refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, acquire_timeout=5), resource="r",
                          coordinator=sock_path)
    errors: list[BaseException] = []

    def want() -> None:
        try:
            pool.acquire()
        except (OSError, PoolClosed) as exc:  # the connect's error, or the close
            errors.append(exc)

    t = threading.Thread(target=want, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while factory.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    client = pool._client
    assert client is not None
    pool.close(timeout=0.1)  # returns while the opener is still inside the factory
    deadline = time.monotonic() + 5
    while not client.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.closed, "the closed pool's session outlived its last (failed) opening"
    t.join(5)
    assert len(errors) == 1


def test_stats_count_failed_requests_and_their_wait_as_psycopg_pool_does() -> None:
    # Before: requests_num counted successes only and requests_wait_ms only their
    # waits: 1 served + 3 timed out gave requests_num 1, requests_wait_ms 0.
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    try:
        held = pool.acquire(timeout=5)
        for _ in range(3):
            with pytest.raises(PoolTimeout):
                pool.acquire(timeout=0.1)
        pool.release(held)
        stats = pool.get_stats()
        assert stats["requests_num"] == 4
        assert stats["requests_errors"] == 3
        assert stats["requests_queued"] == 4  # the first one waited for its connect
        assert stats["requests_wait_ms"] >= 3 * 90
    finally:
        pool.close()


def test_stats_count_usage_and_pop_stats_starts_the_counters_again() -> None:
    # Before: get_stats() had no usage_ms and the pool no pop_stats(), both
    # psycopg_pool's (an exporter sending what came since its last call).
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2))
    try:
        with pool.connection(timeout=5):  # the slow path: opened for it
            time.sleep(0.2)
        wrapper = pool.acquire(timeout=5)  # the fast path: the idle one
        time.sleep(0.1)
        pool.release(wrapper)
        stats = pool.get_stats()
        assert 300 <= stats["usage_ms"] < 5000, stats
        assert stats["requests_num"] == 2 and stats["connections_num"] == 1
        popped = pool.pop_stats()
        assert popped["usage_ms"] == stats["usage_ms"] and popped["requests_num"] == 2
        after = pool.get_stats()
        assert (after["usage_ms"], after["requests_num"], after["connections_num"]) == (0, 0, 0)
        assert (after["pool_size"], after["pool_available"], after["pool_max"]) == (1, 1, 2)  # measures stay
        with pool.connection(timeout=5):
            pass
        assert pool.get_stats()["requests_num"] == 1
        assert pool.get_metrics()["total_acquired"] == 3  # the totals go on
    finally:
        pool.close()


@pytest.mark.parametrize("configured", [True, False])
def test_stats_usage_of_a_connection_handed_to_a_checkout_cut_short(configured: bool) -> None:
    # A new connection is handed to a waiting checkout, whose caller is gone
    # (a signal handler's exception): forsake() checks it back in. Before: its
    # checked_out_at was configure's mark (inf), so usage_ms became -inf and
    # get_stats() raised OverflowError for good; without configure, 0.0: usage_ms
    # jumped by the monotonic clock's value. The caller never had it: no usage.
    main = threading.main_thread().ident
    assert main is not None
    pool: ConnectionPool[Any] | None = None

    def handed() -> bool:
        assert pool is not None
        with pool._lock:
            return not pool._waiters and bool(pool._all)

    def raise_once_handed(*_: object) -> None:
        deadline = time.monotonic() + 5
        while not handed() and time.monotonic() < deadline:
            time.sleep(0.001)
        raise Interrupted("the signal handler raised")

    factory = FakeFactory()

    def connect() -> Any:
        conn = factory()
        if not configured:
            signal.pthread_kill(main, signal.SIGUSR1)
        return conn

    def configure(conn: Any) -> None:
        signal.pthread_kill(main, signal.SIGUSR1)

    old = signal.signal(signal.SIGUSR1, raise_once_handed)
    try:
        pool = ConnectionPool(connect, PoolConfig(min_size=0, max_size=1),
                              configure=configure if configured else None)
        with pytest.raises(Interrupted):
            pool.acquire(timeout=5)
        assert handed()
        stats = pool.get_stats()
        assert 0 <= stats["usage_ms"] < 1000, stats
        assert (stats["pool_size"], stats["pool_available"]) == (1, 1)
    finally:
        signal.signal(signal.SIGUSR1, old)
        if pool is not None:
            pool.close()


def test_stats_count_a_checkout_refused_by_a_draining_or_closed_pool() -> None:
    # Before: a checkout that raised PoolClosed (drained, or `sharedpool drain`)
    # was counted in neither requests_num nor requests_errors.
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    try:
        with pool.connection(timeout=5):
            pass
        pool.drain(timeout=5)
        with pytest.raises(PoolClosed):
            pool.acquire(timeout=0)
        pool.resume()
        with pool.connection(timeout=5):
            pass
        stats = pool.get_stats()
        assert (stats["requests_num"], stats["requests_errors"]) == (3, 1)
    finally:
        pool.close()


def test_a_connect_that_overran_its_timeout_is_counted_created_and_closed() -> None:
    # Before: total_created 0, total_closed 1 once the late connection was closed.
    factory = FakeFactory(delay=0.4)
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, connection_timeout=0.1))
    try:
        with pytest.raises(ConnectTimeout):
            pool.acquire(timeout=5)
        deadline = time.monotonic() + 5
        while pool.get_metrics()["total_closed"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        m, stats = pool.get_metrics(), pool.get_stats()
        assert (m["total_created"], m["total_closed"]) == (1, 1)
        assert (stats["connections_errors"], stats["requests_errors"], stats["requests_num"]) == (1, 1, 1)
    finally:
        pool.close()


def test_connections_num_counts_every_connect_attempt_as_psycopg_pool_does() -> None:
    # Before: connections_num counted connections made only: 3 failed connects
    # gave connections_num 0 beside connections_errors 3 (psycopg_pool: 3 and 3).
    factory = FakeFactory(fail=OSError("connection refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1))
    try:
        for _ in range(3):
            with pytest.raises(OSError):
                pool.acquire(timeout=5)
        factory.fail = None
        with pool.connection(timeout=5):
            pass
        stats = pool.get_stats()
        assert factory.calls == 4
        assert (stats["connections_num"], stats["connections_errors"]) == (4, 3)
    finally:
        pool.close()


def test_a_failed_top_up_counts_as_an_attempt() -> None:
    factory = FakeFactory(fail=OSError("connection refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=1, max_size=1, validation_interval=0.05))
    try:
        deadline = time.monotonic() + 5
        while pool.get_stats()["connections_errors"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        pool.close()  # no more rounds
        # The last round's error is counted a moment after its opening ends.
        while (pool.get_stats()["connections_errors"] != factory.calls
               and time.monotonic() < deadline):
            time.sleep(0.02)
        stats = pool.get_stats()
        assert stats["connections_errors"] >= 2
        assert stats["connections_num"] == stats["connections_errors"] == factory.calls
    finally:
        pool.close()


def test_a_connect_that_overran_its_timeout_then_failed_is_one_error() -> None:
    # Before: connections_errors 2 for one factory call, counted at the caller's
    # ConnectTimeout and again when the abandoned connect raised.
    factory = FakeFactory(delay=0.4, fail=OSError("connection refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, connection_timeout=0.1))
    try:
        with pytest.raises(ConnectTimeout):
            pool.acquire(timeout=5)
        deadline = time.monotonic() + 5
        while pool.get_stats()["pool_size"] and time.monotonic() < deadline:
            time.sleep(0.02)  # the abandoned connect has raised by then
        stats = pool.get_stats()
        assert factory.calls == 1 and stats["pool_size"] == 0
        assert (stats["connections_num"], stats["connections_errors"]) == (1, 1)
    finally:
        pool.close()


def test_an_abandoned_connects_late_failure_is_no_other_waiters_error() -> None:
    # Before: A's connect overran connection_timeout (A had its ConnectTimeout),
    # then failed 1 s later; that failure went to C, queued for B's checkin, at
    # 2.0 s ("connect to db failed late"). Now C gets a connect of its own.
    calls = []

    def factory() -> FakeConnection:
        calls.append(time.monotonic())
        if len(calls) == 1:
            time.sleep(1.0)
            raise OSError("connect to db failed late")
        return FakeConnection()

    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2, connection_timeout=0.2))
    try:
        with pytest.raises(ConnectTimeout):
            pool.acquire(timeout=5)
        b = pool.acquire(timeout=5)  # the stalled connect's slot is not B's to wait for
        threading.Timer(3.0, pool.release, args=(b,)).start()
        c = pool.acquire(timeout=5)  # served when the stalled connect ends, by a connect of its own
        assert len(calls) == 3
        pool.release(c)
    finally:
        pool.close()


@pytest.mark.parametrize("overran", [True, False])
def test_a_timeout_behind_running_connects_says_so(overran: bool) -> None:
    # Before: "no connection within 0.3s (0 open, 0 in use, max_size=1)", with
    # the one slot taken by a connect still running (past connection_timeout,
    # or merely slower than the acquire timeout).
    release = threading.Event()
    pool = ConnectionPool(lambda: release.wait(10) and FakeConnection(),
                          PoolConfig(min_size=0, max_size=1, connection_timeout=0.1 if overran else 30))
    try:
        if overran:
            with pytest.raises(ConnectTimeout):
                pool.acquire(timeout=5)
        said = r"\(0 open, 0 in use, 1 connect\(s\) still running, max_size=1\)$"
        with pytest.raises(PoolTimeout, match=said):
            pool.acquire(timeout=0.3)
    finally:
        release.set()
        pool.close()


@contextlib.contextmanager
def _four_idle_to_a_holding_server(start_coordinator: Any, sock_path: str) -> Iterator[
        tuple[ConnectionPool[Any], HoldingServer]]:
    """A pool of 4 idle connections (close_confirm_timeout 0.4 s) to a server
    that does not let go; on the way out, the server held all 4 leases until it
    let go (I1), and then none is left."""
    start_coordinator({"r": 4})
    server = HoldingServer()
    pool = ConnectionPool(server.connect, PoolConfig(min_size=0, max_size=4, close_confirm_timeout=0.4),
                          resource="r", coordinator=sock_path)
    try:
        held = [pool.acquire(timeout=5) for _ in range(4)]
        for _ in held:
            server.accept()
        for wrapper in held:
            pool.release(wrapper)
        yield pool, server
        assert leased(sock_path) == 4  # the server holds all 4: no lease back yet
        server.let_go()
        assert wait_leased(sock_path, 0) == 0
    finally:
        server.let_go()
        pool.close()
        server.close()


@pytest.mark.parametrize("how", ["close", "drain"])
def test_closing_idle_connections_to_a_server_that_hangs_keeps_to_the_timeout(
        start_coordinator: Any, sock_path: str, how: str) -> None:
    """Each idle connection's close waited its own close_confirm_timeout in
    turn: 4 of them to a server that does not let go made close(timeout=0.5)
    take 4 x 0.4 s (and an admin drain, timeout=0, hold the session's thread
    as long). After the first unconfirmed one the rest are closed in a thread;
    every lease is still kept until the server lets go (I1)."""
    with _four_idle_to_a_holding_server(start_coordinator, sock_path) as (pool, server):
        t0 = time.monotonic()
        getattr(pool, how)(timeout=0.5)
        took = time.monotonic() - t0
        assert took < 1.0, f"{how}(timeout=0.5) took {took:.2f}s"


@pytest.mark.parametrize("how", ["close", "drain"])
def test_after_one_unconfirmed_close_the_rest_close_at_once(
        start_coordinator: Any, sock_path: str, how: str) -> None:
    """The thread that took over after the first unconfirmed close still waited
    close_confirm_timeout on each of the rest in turn: 4 idle connections to a
    server that does not let go made close(timeout=5) take 4 x 0.4 s, and the
    last connection was only closed 1.2 s after the call. The rest are closed
    at once now, each lease still kept until its server lets go (I1)."""
    with _four_idle_to_a_holding_server(start_coordinator, sock_path) as (pool, server):
        t0 = time.monotonic()
        getattr(pool, how)(timeout=5)
        took = time.monotonic() - t0
        assert took < 1.0, f"{how}(timeout=5) took {took:.2f}s"
        for end in server.ends:  # every connection closed (our FIN is there), not queued behind a wait
            end.settimeout(0.5)
            assert end.recv(1) == b""


@pytest.mark.parametrize("how", ["checkout", "top-up"])
def test_a_failed_connect_whose_report_fails_still_gives_its_lease_back(
        start_coordinator: Any, sock_path: str, monkeypatch: Any, how: str) -> None:
    """The report of a failed connect raised (no thread to be had): the opener
    died before giving the lease back and telling the waiter, who waited its
    whole timeout for a PoolTimeout; a top-up's lease stayed held for good."""
    start_coordinator({"r": 2})
    factory = FakeFactory(fail=OSError("connection refused"))
    no_thread_for_reports(monkeypatch)
    config = PoolConfig(min_size=1 if how == "top-up" else 0, max_size=1, validation_interval=0.05)
    pool = ConnectionPool(factory, config, resource="r", coordinator=sock_path)
    try:
        if how == "checkout":
            t0 = time.monotonic()
            with pytest.raises(OSError, match="connection refused"):
                pool.acquire(timeout=10)
            assert time.monotonic() - t0 < 5, "the caller waited out its timeout"
        else:
            wait_for(lambda: factory.calls >= 2, 5, "no top-up tried twice")
        assert wait_leased(sock_path, 0) == 0
        assert pool.get_stats()["leases_acquired"] >= 1
    finally:
        pool.close()


def test_top_up_connects_tell_the_coordinator_how_they_went(start_coordinator: Any, sock_path: str) -> None:
    """A min_size top-up reported neither outcome: a pool filled by top-ups
    left a resource "failing" after the database was back (a streak at the
    threshold: the next single failure denied every waiter at once), and its
    failing top-ups never counted. Now reported as a checkout's connect is."""
    from sharedpool.reports import FAILURE_THRESHOLD

    start_coordinator({"r": 2})
    reporter = Client(sock_path)
    factory = FakeFactory(fail=OSError("connection refused"))
    pool = None
    try:
        assert reporter.ensure_connected()
        for _ in range(FAILURE_THRESHOLD):
            reporter.report_failure("r")

        def failing() -> bool:
            return bool(reporter.inspect("resources")["resources"][0]["failing"])

        deadline = time.monotonic() + 5
        while not failing() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert failing()
        pool = ConnectionPool(factory, PoolConfig(min_size=1, max_size=1, validation_interval=0.05),
                              resource="r", coordinator=sock_path)
        deadline = time.monotonic() + 5
        while factory.calls < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # the back-off over, a top-up probes: it fails
        factory.fail = None
        while (pool.get_stats()["pool_size"] < 1 or failing()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.get_stats()["pool_size"] == 1 and not failing()
    finally:
        if pool is not None:
            pool.close()
        reporter.close()


def test_top_ups_at_a_full_cap_are_no_coordinator_timeouts(start_coordinator: Any, sock_path: str) -> None:
    # Before: each maintenance round's top-up try (a lease with timeout 0, at the
    # cap) was one more `timeouts` / sharedpool_timeouts_total, once a second per
    # process for as long as the cap stayed full, with nobody waiting.
    start_coordinator({"r": 2})
    holder = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2), resource="r",
                            coordinator=sock_path)
    tries: list[float] = []
    filler = None
    try:
        held = [holder.acquire(timeout=5) for _ in range(2)]
        filler = ConnectionPool(FakeFactory(), PoolConfig(min_size=1, max_size=1, validation_interval=0.05),
                                resource="r", coordinator=sock_path)
        client = filler._get_client()
        assert client is not None
        real = client.acquire

        def counted(resource: str, timeout: float | None = None, **kw: Any) -> Any:
            tries.append(time.monotonic())
            return real(resource, timeout, **kw)

        client.acquire = counted  # type: ignore[method-assign]
        deadline = time.monotonic() + 5
        while len(tries) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(tries) >= 3  # refused at the cap, each
        [row] = client.inspect("resources")["resources"]
        assert (row["timeouts"], row["denials"], row["grants"], row["waiting"]) == (0, 0, 2, 0)
        for wrapper in held:
            holder.release(wrapper)
    finally:
        if filler is not None:
            filler.close()
        holder.close()


def test_a_checkout_a_signal_cuts_short_while_it_waits_is_a_failed_request() -> None:
    # Before: counted in requests_queued only (requests_num 1 beside requests_queued 2,
    # requests_errors 0, requests_wait_ms 0): a celery soft time limit in the queue
    # vanished from the stats. psycopg_pool counts it in all four.
    class SoftLimit(Exception):
        pass

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    try:
        held = pool.acquire(timeout=5)
        with alarm_raises(SoftLimit):
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(SoftLimit):
                pool.acquire(timeout=5)
        stats = pool.get_stats()
        assert (stats["requests_num"], stats["requests_errors"], stats["requests_queued"]) == (2, 1, 2)
        assert stats["requests_wait_ms"] >= 150 and stats["requests_waiting"] == 0
        pool.release(held)
    finally:
        pool.close()


def test_a_connection_returned_broken_counts_in_returns_bad() -> None:
    # Before: discarded and counted nowhere (psycopg_pool: returns_bad).
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    try:
        with pytest.raises(ConnectionError), pool.connection(timeout=5) as conn:
            conn.close()
            conn.execute()
        with pool.connection(timeout=5) as conn:
            conn.execute()  # a new one
        stats = pool.get_stats()
        assert (stats["returns_bad"], stats["connections_lost"], stats["connections_num"]) == (1, 0, 2)
    finally:
        pool.close()


def test_pool_size_leaves_out_openings_still_waiting_for_a_lease(start_coordinator: Any,
                                                                 sock_path: str) -> None:
    # Before: pool_size 2 for a pool with no connection at all, its two checkouts
    # queued at the coordinator behind another pool's lease (cap 1): summed over
    # processes, pool_size read above the cap that PostgreSQL saw held.
    start_coordinator({"r": 1})
    holder = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=sock_path)
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2), resource="r", coordinator=sock_path)
    client = Client(sock_path)
    threads: list[threading.Thread] = []
    try:
        held = holder.acquire(timeout=5)  # in use: not reclaimed while the test looks
        threads = [threading.Thread(target=lambda: pool.release(pool.acquire(timeout=10)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while _waiting(client, "r") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = pool.get_stats()
        assert _waiting(client, "r") == 2 and stats["requests_waiting"] == 2
        assert (stats["pool_size"], pool.get_size(), factory.calls) == (0, 0, 0)
        holder.release(held)
        holder.close()  # its lease goes to the waiters: one connection, made, serves both
        for t in threads:
            t.join(10)
        stats = pool.get_stats()
        assert (stats["pool_size"], pool.get_size(), factory.calls, stats["requests_num"]) == (1, 1, 1, 2)
    finally:
        client.close()
        pool.close()
        holder.close()


def _leases_held_settles(pool: ConnectionPool[Any], timeout: float = 3.0) -> tuple[int, int]:
    """(leases_held, leases_closing) once they stop changing (at most ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.get_stats()
        figures = (stats["leases_held"], stats["leases_closing"])
        if figures == (0, 0) or time.monotonic() > deadline:
            return figures
        time.sleep(0.02)


def test_leases_held_counts_a_close_the_server_has_not_confirmed(
        start_coordinator: Any, sock_path: str) -> None:
    # Before: leases_held 0 while the coordinator counted the lease (kept until
    # the server lets go); the integrations' figures already counted it.
    start_coordinator({"r": 2})
    server = HoldingServer()
    pool = _expiring_pool(server, sock_path, close_confirm_timeout=0.2)
    try:
        wrapper = pool.acquire(timeout=5)
        server.accept()
        time.sleep(0.2)  # past max_lifetime: the checkin closes it, unconfirmed after 0.2 s
        pool.release(wrapper)
        assert wait_leased(sock_path, 1, timeout=0.5) == 1
        assert (pool.get_stats()["leases_held"], pool.get_stats()["leases_closing"]) == (1, 1)
        assert pool.get_metrics()["leases_held"] == 1
        server.let_go()
        assert wait_leased(sock_path, 0) == 0
        assert _leases_held_settles(pool) == (0, 0)  # the watcher releases, then counts
    finally:
        server.let_go()
        pool.close()
        server.close()


@pytest.mark.parametrize("fails", ["connect", "configure"])
def test_failed_top_ups_are_counted_and_the_first_is_a_warning(
        caplog: pytest.LogCaptureFixture, fails: str) -> None:
    # Before: min_size top-ups that failed counted nowhere and logged at debug
    # only (a failed connect: with nobody acquiring, a database that was down did
    # not show at all) or at warning every round (a failed configure).
    caplog.set_level(logging.DEBUG, logger="sharedpool.pool")
    factory = FakeFactory()
    broken = [True]

    def configure(conn: FakeConnection) -> None:
        if broken[0]:
            raise OSError("connection refused")

    if fails == "connect":
        factory.fail = OSError("connection refused")
    pool = ConnectionPool(factory, PoolConfig(min_size=1, max_size=1, validation_interval=0.05),
                          configure=configure if fails == "configure" else None)
    try:
        deadline = time.monotonic() + 5
        while factory.calls < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.get_stats()["connections_errors"] >= 2
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "top-up" in r.getMessage()]
        assert len(warned) == 1 and "connection refused" in warned[0].getMessage(), caplog.text
        factory.fail, broken[0] = None, False  # recovers by itself
        while not pool.get_stats()["pool_available"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.get_stats()["pool_available"] == 1
    finally:
        pool.close()


def test_top_up_leases_count_in_leases_acquired(start_coordinator: Any, sock_path: str) -> None:
    # Before: a pool filled to min_size showed leases_held 2 but leases_acquired 0
    # (and connections_ms 0): only an opener's leases were counted.
    start_coordinator({"r": 4})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=2, max_size=2), resource="r",
                          coordinator=sock_path)
    try:
        deadline = time.monotonic() + 5
        while pool.get_stats()["pool_available"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = pool.get_stats()
        assert stats["leases_held"] == 2 and stats["leases_acquired"] == 2, stats
    finally:
        pool.close()


def test_a_connection_failing_its_test_on_release_is_counted_lost() -> None:
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, test_on_release=True),
                          check=lambda conn: False)
    try:
        wrapper = pool.acquire(timeout=5)
        pool.release(wrapper)
        assert pool.get_stats()["connections_lost"] == 1
        assert pool.get_stats()["pool_size"] == 0
    finally:
        pool.close()


def test_a_checkout_retried_after_a_failed_validation_counts_once() -> None:
    # The idle connection counted as a request, failed its ping, and the retry
    # counted the same request again: 2 requests gave requests_num 3.
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, validation_bypass=0))
    try:
        pool.release(pool.acquire(timeout=5))
        factory.made[0].healthy = False  # its next ping fails
        pool.release(pool.acquire(timeout=5))  # a new connection, after one failed validation
        stats = pool.get_stats()
        assert (stats["requests_num"], stats["requests_errors"], stats["connections_lost"]) == (2, 0, 1)
    finally:
        pool.close()


def test_leases_held_counts_every_connection_a_close_is_working_through(
        start_coordinator: Any, sock_path: str) -> None:
    # close() closes idle connections one after the other, each waiting for the
    # server; those still waiting their turn had left the pool's count (1 held
    # while the coordinator counted 3).
    start_coordinator({"r": 3})
    server = HoldingServer()
    pool = ConnectionPool(server.connect, PoolConfig(min_size=0, max_size=3, close_confirm_timeout=0.3,
                                                     test_on_acquire=False),
                          resource="r", coordinator=sock_path)
    try:
        held = [pool.acquire(timeout=5) for _ in range(3)]
        for _ in held:
            server.accept()
        for w in held:
            pool.release(w)
        closer = threading.Thread(target=pool.close, kwargs={"timeout": 5})
        closer.start()
        time.sleep(0.15)  # the first close is waiting for the server
        assert pool.get_stats()["leases_held"] == 3
        closer.join(10)
        assert pool.get_stats()["leases_held"] == 3  # none confirmed: all kept
        server.let_go()
        assert wait_leased(sock_path, 0) == 0
        assert _leases_held_settles(pool) == (0, 0)  # the watcher releases, then counts
    finally:
        server.let_go()
        pool.close()
        server.close()


def test_a_named_resource_with_no_coordinator_is_said_once(caplog: Any, monkeypatch: Any) -> None:
    """resource= names a cap, but with neither coordinator= nor $SHAREDPOOL_SOCKET
    the pool is process-local: said once per pool (a user who started
    `sharedpool serve` at its default path expected a cap); an unnamed one
    (resource "default") is a plain local pool, said nothing."""
    from sharedpool.config import SOCKET_ENV
    from sharedpool.contrib._leases import LeaseBook

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    caplog.set_level(logging.WARNING, logger="sharedpool")
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2), resource="pg") as pool:
        for _ in range(3):
            with pool.connection():
                pass
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2)) as plain, plain.connection():
        pass
    book = LeaseBook("pg")
    assert book.client is None and book.client is None
    said = [r.getMessage() for r in caplog.records if "no coordinator" in r.getMessage()]
    assert len(said) == 2, said
    assert "pool 'pool-pg'" in said[0] and "capped only by its own max_size" in said[0]
    assert said[1].startswith("sharedpool: 'pg': no coordinator")


def test_a_min_size_top_up_refused_an_unknown_resource_is_said_once(
        start_coordinator: Any, sock_path: str, caplog: Any) -> None:
    """resource='pgg' (a typo) with min_size=2: the top-up's lease was refused
    every round with no word above debug; a checkout fails at once and says
    why, but an app warming its pool at start heard nothing."""
    start_coordinator({"pg": 2})
    caplog.set_level(logging.DEBUG, logger="sharedpool")
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=2, max_size=2), resource="pgg",
                          coordinator=sock_path)
    try:
        deadline = time.monotonic() + 10
        while sum("top-up to min_size" in r.getMessage() for r in caplog.records) < 2:
            assert time.monotonic() < deadline, "fewer than two top-up rounds ran"
            time.sleep(0.05)
        said = [r for r in caplog.records if "top-up to min_size" in r.getMessage()]
        assert [r.levelno for r in said[:2]] == [logging.WARNING, logging.DEBUG]
        assert "pgg" in said[0].getMessage()
        assert pool.get_size() == 0
    finally:
        pool.close()


def test_a_lease_wait_timeout_names_what_held_it_back(start_coordinator: Any, sock_path: str) -> None:
    # Every timeout said "the global cap is taken", even with 1 of 5 leases
    # held (this process at its max_per_process) or none (timeout=0, no reply
    # possible yet): the wrong limit for an operator to raise.
    start_coordinator({"r": {"max_size": 5, "max_per_process": 1}, "free": 5})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=3), resource="r",
                          coordinator=sock_path)
    try:
        held = pool.acquire(timeout=10)
        with pytest.raises(PoolTimeout) as info:
            pool.acquire(timeout=0.5)
        assert "max_per_process=1" in str(info.value), info.value
        assert "cap is taken" not in str(info.value) and "all 5 leases" not in str(info.value)
        pool.release(held)
    finally:
        pool.close()
    timeouts = 0
    for _ in range(5):  # timeout=0 may still be served, by an opener faster than its caller
        free = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=3), resource="free",
                              coordinator=sock_path)
        try:
            free.release(free.acquire(timeout=0))
        except PoolTimeout as exc:
            timeouts += 1
            assert "cap is taken" not in str(exc) and "held" not in str(exc), exc
        finally:
            free.close()
    assert timeouts


def _two_pools_exit_with_checkouts_out(sock: str) -> dict[str, Any]:
    from sharedpool import release_process

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sharedpool").addHandler(handler)
    pools = [ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=sock, name=f"p{i}") for i in range(2)]
    out = [pool.acquire(timeout=5) for pool in pools]  # in use by a thread that never checks in
    release_process(0.4)
    return {"said": [m for m in said if "still in use" in m], "out": len(out)}


def test_an_exit_whose_time_an_earlier_pool_took_warns_for_the_next(
        start_coordinator: Any, sock_path: str) -> None:
    """The second pool of an exit got the 0 s the first left it, and logged its
    connection still in use at debug: timeout 0 read as a request not to wait."""
    start_coordinator({"r": 2})
    [child] = run_forked(_two_pools_exit_with_checkouts_out, sock_path)
    said = child["said"]
    assert len(said) == 2, child
    assert "after 0.4s" in said[0] and "(of the exit" not in said[0], said
    assert said[1].endswith("after 0.0s (the exit's 0.4s: 0.4s spent before this pool)"), said
