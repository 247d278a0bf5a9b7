"""The client's races and bounds: a socket closed under the background thread's
poll, close() against a handshake or a request going out, a coordinator that
accepts and never answers, wake-ups lost between two threads, frames that come
in with the welcome. Each test failed before its fix."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import signal
import socket
import struct
import threading
import time
from typing import Any

import pytest
from fake_coordinator import FakeCoordinator
from proc_helpers import interrupt_once, other_sessions, resource_row

from sharedpool import ConnectionPool, Coordinator, PoolConfig, Resource, handshake, receiving
from sharedpool import protocol as p
from sharedpool.client import Client, Lease
from sharedpool.errors import (
    AcquireCancelled,
    ConfigError,
    CoordinatorUnavailable,
    PoolTimeout,
    SharedPoolError,
)
from sharedpool.testing import FakeFactory


def thread_cpu(thread: threading.Thread) -> float:
    with open(f"/proc/self/task/{thread.native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_thread(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            out["error"] = exc
        out["took"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def test_background_thread_does_not_spin_while_the_coordinator_is_away(tmp_path: Any) -> None:
    # A caller reading the socket closes it on EOF while the background thread
    # polls it; unregistering by socket object then failed (fileno() -1) and
    # every later poll() returned POLLNVAL at once: 50-99 % of a CPU. A race:
    # it showed in 2 of 3 rounds, so several rounds.
    for i in range(4):
        path = str(tmp_path / f"sp{i}.sock")
        coord = Coordinator(path, {"r": Resource(max_size=1)}).start()
        client = Client(path)
        try:
            client.acquire("r", timeout=2)  # held: the client keeps trying to reconnect
            time.sleep(0.2)  # the background thread polls the session socket
            leader, _ = in_thread(lambda c=client: c.acquire("r", timeout=2))  # reads it, past the 1 s
            time.sleep(0.05)
            coord.kill()
            time.sleep(0.2)
            assert client._thread is not None
            cpu0, t0 = thread_cpu(client._thread), time.monotonic()
            time.sleep(1.0)
            share = (thread_cpu(client._thread) - cpu0) / (time.monotonic() - t0)
            assert share < 0.1, f"round {i}: background thread used {share:.0%} of a CPU"
            leader.join(10)
        finally:
            client.close()
            coord.stop()


def test_close_during_the_handshake_ends_that_session(sock_path: str) -> None:
    # close() while the background thread reconnected (welcome still coming):
    # the new session was installed anyway and held its re-registered leases.
    fake = FakeCoordinator(sock_path, hello_delays=(0, 1.0))
    client = Client(sock_path)
    try:
        client.acquire("r", timeout=1)
        fake.drop(0)
        deadline = time.monotonic() + 5
        while len(fake.conns) < 2:
            assert time.monotonic() < deadline, "the client did not reconnect"
            time.sleep(0.01)
        time.sleep(0.2)  # the hello is out; the welcome comes in 0.8 s
        client.close()
        deadline = time.monotonic() + 5
        while fake.conns[1][1]["eof"] is None:
            assert time.monotonic() < deadline, "the session made during close() stayed open"
            time.sleep(0.02)
        assert client._sock is None
    finally:
        client.close()
        fake.stop()


class _CloseWhileSubmitting(Client):
    """close() from another thread lands between _submit's closed check and
    its registering the request (the first call in that window)."""

    race = False

    def _ensure_thread(self) -> None:
        if self.race:
            self.race = False
            closer = threading.Thread(target=self.close)
            closer.start()
            closer.join()
        super()._ensure_thread()


def test_acquire_racing_close_fails_instead_of_hanging(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=1, acquire_timeout=30)})
    holder, client = Client(sock_path), _CloseWhileSubmitting(sock_path)
    try:
        holder.acquire("r", timeout=1)  # full: the acquire would wait
        client.ensure_connected()
        client.race = True
        thread, out = in_thread(lambda: client.acquire("r"))
        thread.join(5)
        assert not thread.is_alive(), "acquire() on a client closed under it never returned"
        assert isinstance(out.get("error"), CoordinatorUnavailable), out
    finally:
        holder.close()
        client.close()


def test_connect_is_bounded_by_the_callers_deadline(sock_path: str) -> None:
    # A coordinator that accepts and never answers held acquire(timeout=0.2)
    # for connect_timeout (5 s), and a second caller for 10 s.
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(sock_path)
    silent.listen(8)
    client = Client(sock_path)
    try:
        calls = [in_thread(lambda: client.acquire("r", timeout=0.2)),
                 in_thread(lambda: client.acquire("r", timeout=0.1)),
                 in_thread(lambda: client.inspect("resources", timeout=0.2))]
        for thread, out in calls:
            thread.join(10)
            assert isinstance(out.get("error"), SharedPoolError), out
            assert out["took"] < 2.5, f"took {out['took']:.1f}s for a 0.2 s timeout (was 5-10 s)"
    finally:
        client.close()
        silent.close()


def test_acquire_with_the_default_timeout_is_bounded_locally(start_coordinator: Any, sock_path: str) -> None:
    # timeout=None ("the resource's default") had no local bound: against a
    # stopped coordinator it blocked for ever.
    coord = start_coordinator({"r": Resource(max_size=1, acquire_timeout=0.3)})
    client = Client(sock_path)
    try:
        client.ensure_connected()
        assert coord.pid is not None
        os.kill(coord.pid, signal.SIGSTOP)
        try:
            thread, out = in_thread(lambda: client.acquire("r"))
            thread.join(8)
            assert not thread.is_alive(), "acquire(timeout=None) still blocked with the coordinator stopped"
            assert isinstance(out.get("error"), PoolTimeout), out
        finally:
            os.kill(coord.pid, signal.SIGCONT)
    finally:
        client.close()


def test_wakeups_are_not_lost(tmp_path: Any) -> None:
    # _tick cleared its "woken" flag before draining the wake-up socket: a
    # notify in between left the flag set with no byte pending, and jobs
    # waited for the 1 s idle wake-up (8-10 in ~110 here).
    client = Client(str(tmp_path / "none.sock"))  # no coordinator needed
    stop = time.monotonic() + 3.0
    latencies: list[float] = []

    def notifier() -> None:
        while time.monotonic() < stop:
            client.report_soon()
            time.sleep(random.random() * 0.0005)

    def prober() -> None:
        while time.monotonic() < stop:
            done, t0 = threading.Event(), time.monotonic()
            client.call_later(0.0, done.set)
            done.wait(3)
            latencies.append(time.monotonic() - t0)
            time.sleep(random.random() * 0.002)

    threads = [threading.Thread(target=notifier) for _ in range(2)] + [threading.Thread(target=prober)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    finally:
        client.close()
    late = [x for x in latencies if x > 0.5]
    assert len(latencies) > 50 and not late, f"{len(late)} of {len(latencies)} jobs ran late: {late[:5]}"


class _WelcomeThenReclaim(FakeCoordinator):
    def welcome(self, idx: int, conn: p.Connection) -> bytes:
        # One write: the welcome, a reclaim and an admin push (a legal stream).
        return (super().welcome(idx, conn) + p.encode(p.Reclaim("r", 1, None))
                + p.encode(p.Push("pause", "r", {})))


def test_frames_behind_the_welcome_are_dispatched(sock_path: str) -> None:
    fake = _WelcomeThenReclaim(sock_path)
    client = Client(sock_path)
    reclaims: list[int] = []
    pushes: list[str] = []
    try:
        client.on_reclaim("r", lambda: reclaims.append(1))
        client.on_push(lambda verb, resource, args: pushes.append(verb))
        client.ensure_connected()
        deadline = time.monotonic() + 3
        while not (reclaims and pushes):
            assert time.monotonic() < deadline, f"lost: reclaims={reclaims} pushes={pushes}"
            time.sleep(0.02)
        assert client.owes("r") == 1 and pushes == ["pause"]
    finally:
        client.close()
        fake.stop()


def test_a_pool_replaces_a_shared_client_closed_under_it(start_coordinator: Any, sock_path: str) -> None:
    # Another pool's close_if_unused() can close the shared client between this
    # pool's for_path() and its handlers going in; the pool then failed every
    # acquire for good with "client is closed".
    start_coordinator({"r": Resource(max_size=1)})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    try:
        first = pool._get_client()
        assert first is not None
        first.close()  # what the other pool's close_if_unused() did
        with pool.connection(timeout=5):
            pass
        assert pool._client is not first and pool._client is not None and not pool._client.closed
    finally:
        pool.close()
    assert pool._client is not None and pool._client.closed  # a closed pool does not open a new one
    pool._get_client()
    assert pool._client.closed


def test_a_pool_that_registers_while_the_shared_client_closes_keeps_its_lease(
        start_coordinator: Any, sock_path: str) -> None:
    # close_if_unused() found nothing using the shared client, then closed it. A
    # pool whose handlers went in between, and whose lease was granted on that
    # client, lost the lease with the session while its connection stayed open
    # (uncounted by the cap).
    start_coordinator({"r": Resource(max_size=1)})
    client = Client.for_path(sock_path)
    assert client.ensure_connected()
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    cond, closer, got = client._cond, threading.current_thread(), []

    class Between:
        """The busy check's lock: as the closer leaves it, the pool checks out."""

        def __enter__(self) -> Any:
            return cond.__enter__()

        def __exit__(self, *exc: Any) -> Any:
            out = cond.__exit__(*exc)
            if threading.current_thread() is closer and not got:
                got.append(None)
                taker = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
                taker.start()
                taker.join(1.0)  # with the fix it waits for the decision, then takes a new client
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(cond, name)

    client._cond = Between()  # type: ignore[assignment]
    try:
        assert client.close_if_unused()
        client._cond = cond
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(got) == 2 and got[1] is not None
        assert pool._client is not client and pool._client is not None
        assert not pool._client.closed and len(pool._client.held) == 1
        pool.release(got[1])
    finally:
        client._cond = cond
        pool.close()


def test_a_reader_of_an_old_socket_leaves_the_new_session_alone(
        start_coordinator: Any, sock_path: str) -> None:
    # A caller still reading the socket of a session that ended (a send failed
    # elsewhere) while a new session was made: its read error ended the new
    # session too, and data it read went into the new session's parser.
    start_coordinator({"r": Resource(max_size=1)})
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        old = client._sock
        assert old is not None
        client._disconnect("a send failed elsewhere")  # closes the old socket
        assert client.ensure_connected()
        new, session = client._sock, client.session_id
        assert new is not None and new is not old
        assert receiving.read_available(client, old, block=False) is False  # the old one: read fails
        assert client._sock is new and client.session_id == session
        lease = client.acquire("r", timeout=2)  # and the new session still works
        client.release(lease)
    finally:
        client.close()


def test_a_negative_timeout_is_bad_input_not_a_timeout(start_coordinator: Any, sock_path: str) -> None:
    # Was PoolTimeout, with a slot free; the pool already said ConfigError.
    start_coordinator({"r": Resource(max_size=1)})
    client = Client(sock_path)
    try:
        for bad in (-1.0, float("nan")):
            with pytest.raises(ConfigError, match="timeout"):
                client.acquire("r", timeout=bad)
        client.release(client.acquire("r", timeout=0))  # a free slot: granted at once
    finally:
        client.close()


class _ReconnectBeforeSend(Client):
    """The session is replaced between _submit's decision to send and the send
    (the new session's re-send of pending requests already carried it)."""

    race = False

    def _send_quiet(self, msg: p.Message, *args: Any) -> None:
        if self.race and isinstance(msg, p.Acquire):
            self.race = False
            self._disconnect("a send failed elsewhere")
            assert self.ensure_connected()
        super()._send_quiet(msg, *args)


def test_a_request_goes_out_once_across_a_reconnect(start_coordinator: Any, sock_path: str) -> None:
    # It went out twice (re-send on connect, then our own send on the new
    # socket): the coordinator answered duplicate_request, failing the acquire.
    start_coordinator({"r": Resource(max_size=1)})
    holder, client = Client(sock_path), _ReconnectBeforeSend(sock_path)
    try:
        held = holder.acquire("r", timeout=2)  # full: the request waits, so a copy is a duplicate
        assert client.ensure_connected()
        client.race = True
        threading.Timer(0.3, holder.release, (held,)).start()
        lease = client.acquire("r", timeout=3)
        client.release(lease)
    finally:
        holder.close()
        client.close()


def test_connect_timeout_none_means_no_bound_and_bad_values_are_refused(
        start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=1)})
    client = Client(sock_path, connect_timeout=None)  # was a TypeError in every connect
    try:
        client.release(client.acquire("r", timeout=2))
    finally:
        client.close()
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="connect_timeout"):
            Client(sock_path, connect_timeout=bad)


def test_a_hello_that_re_registers_leases_is_not_cut_short(sock_path: str) -> None:
    # A caller's short deadline bounds a handshake only while the process holds
    # no leases: cut short after the hello went out, the coordinator would
    # fence leases whose connections live on.
    fake = FakeCoordinator(sock_path, hello_delays=(0.5,))
    client = Client(sock_path)
    try:
        client._held[7] = Lease(7, "r", 7)  # kept across a coordinator restart
        handshake.try_connect(client, time.monotonic() + 0.1, force=True)
        assert client._sock is not None, "the handshake was given up after the hello went out"
        assert fake.conns[0][1]["eof"] is None
    finally:
        client._held.clear()
        client.close()
        fake.stop()


def test_an_unanswered_admin_names_the_coordinator_and_what_may_have_happened(sock_path: str) -> None:
    """The scripted coordinator answers no admin or inspect: the error says
    which coordinator was silent, and that an admin verb may still be applied."""
    fake = FakeCoordinator(sock_path)
    client = Client(sock_path)
    try:
        with pytest.raises(PoolTimeout) as err:
            client.admin("pause", timeout=0.3, resource="pg")
        assert sock_path in str(err.value) and "may still be carried out" in str(err.value)
        with pytest.raises(PoolTimeout) as err:
            client.inspect("resources", timeout=0.3)
        assert sock_path in str(err.value) and "may still" not in str(err.value)
    finally:
        client.close()
        fake.stop()


class _DenyOnCancel(FakeCoordinator):
    """Queues every acquire; answers a Cancel with a late Deny of that request."""

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Cancel):
            s.sendall(p.encode(p.Deny(msg.req, "timeout", "no lease in time")))
        elif not isinstance(msg, p.Acquire):
            super().on_message(idx, s, conn, msg)


def test_a_denial_arriving_after_a_cancel_does_not_replace_it(sock_path: str) -> None:
    from sharedpool.errors import AcquireCancelled

    fake = _DenyOnCancel(sock_path)
    client = Client(sock_path)
    try:
        ticket = client.request("r", timeout=5)
        assert ticket.cancel()
        time.sleep(0.2)  # the coordinator's Deny is in
        with pytest.raises(AcquireCancelled):  # before: the late denial's PoolTimeout
            ticket.wait()
    finally:
        client.close()
        fake.stop()


class _GrantOnCancel(FakeCoordinator):
    """Answers an acquire only when it is cancelled, with a grant: the grant
    crossed the cancel of a caller that gave up."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.acquires: dict[int, p.Acquire] = {}
        self.released: list[int] = []

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Acquire):
            self.acquires[msg.req] = msg
        elif isinstance(msg, p.Cancel):
            acquire = self.acquires.pop(msg.req)
            s.sendall(p.encode(p.Grant(msg.req, 77, acquire.resource, 77)))
        elif isinstance(msg, p.Release):
            self.released.append(msg.lease)
        else:
            super().on_message(idx, s, conn, msg)


def test_a_grant_that_crosses_the_cancel_of_a_timed_out_acquire_goes_back(sock_path: str) -> None:
    fake = _GrantOnCancel(sock_path)
    client = Client(sock_path)
    try:
        with pytest.raises(PoolTimeout):
            client.acquire("r", timeout=0.2)
        deadline = time.monotonic() + 5
        while fake.released != [77]:
            assert time.monotonic() < deadline, f"the late grant was kept: {fake.released}"
            time.sleep(0.02)
        assert client.held == {}
    finally:
        client.close()
        fake.stop()


def test_report_now_never_raises(sock_path: str, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
    # The openers, the top-up and the integrations call it with a good new
    # connection in hand: a failed report must not fail (or leak) that connection.
    from sharedpool import background

    def broken(client: Client) -> None:
        raise RuntimeError("report broke")

    monkeypatch.setattr(background, "send_report", broken)
    client = Client(sock_path)
    try:
        client.report_now()
        assert "reporting to coordinator" in caplog.text and "report broke" in caplog.text
    finally:
        client.close()


class _WelcomeThenGarbage(FakeCoordinator):
    def on_message(self, idx: int, s: Any, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Acquire):  # a frame no client can read: ends the session
            s.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        else:
            super().on_message(idx, s, conn, msg)


def test_a_coordinator_that_welcomes_then_sends_bad_frames_is_not_hammered(sock_path: str) -> None:
    # Before: every connect reset the backoff, so connect, bad frame, reconnect
    # (re-sending the queued acquire) ran in a tight loop: ~40 sessions a second.
    fake = _WelcomeThenGarbage(sock_path)
    client = Client(sock_path)
    try:
        with pytest.raises(SharedPoolError):
            client.acquire("r", 2.0)
        assert len(fake.conns) <= 10, len(fake.conns)  # backoff doubling from 20 ms to 1 s
    finally:
        client.close()
        fake.stop()


def test_a_signal_as_an_acquire_starts_waiting_leaks_no_lease(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Between request() and the try inside wait(): the lease granted next was
    # held by the client and by nobody else (another process timed out at the cap).
    import sharedpool.client as client_module

    start_coordinator({"r": 1})
    # As wait() starts, 0.2 s after the acquire went out: granted meanwhile.
    interrupt_once(monkeypatch, client_module.AcquireRequest, "wait", KeyboardInterrupt(), pause=0.2)
    client, other = Client(sock_path), Client(sock_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            client.acquire("r", 5)
        other.release(other.acquire("r", 3))  # the slot is free again
        assert not client._held and not client._pending
    finally:
        client.close()
        other.close()


class _ClosesItsPool:
    """An app object that closes its pool when dropped; a cycle, so freed by the collector."""

    def __init__(self, pool: Any, done: list[str]) -> None:
        self.pool, self.done, self.me = pool, done, self

    def __del__(self) -> None:
        self.pool.close(timeout=1)
        self.done.append("closed")


def _register_as_a_finalizer_closes(client: Client, pool: Any, threshold: int, done: list[str]) -> None:
    gc.collect()
    _ClosesItsPool(pool, done)  # garbage from here on, freed at the next collection
    gc.set_threshold(threshold)
    try:
        client.add_state_provider(lambda: [])
    finally:
        gc.set_threshold(700, 10, 10)
    done.append("returned")


def test_a_finalizer_closing_a_pool_inside_a_handler_change_does_not_hang(
        start_coordinator: Any, sock_path: str) -> None:
    # The collector runs finalizers at any allocation; one that closes a pool
    # (an app object dropping its pool) inside another pool's registration
    # waited for the handler lock its own thread held: that thread hung for
    # good (the client's background thread too, when it was the one). Swept
    # over collection points; each attempt bounded.
    start_coordinator({"r": 4})
    keeper = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=sock_path)
    keeper.release(keeper.acquire(timeout=5))
    client = keeper._client
    assert client is not None
    hung = False
    try:
        for threshold in range(1, 8):
            other = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                                   coordinator=sock_path)
            other.release(other.acquire(timeout=5))
            done: list[str] = []
            thread = threading.Thread(target=_register_as_a_finalizer_closes,
                                      args=(client, other, threshold, done), daemon=True)
            thread.start()
            thread.join(5)
            hung = thread.is_alive()
            assert not hung, f"hung at threshold {threshold}"
            gc.collect()
            assert "returned" in done and "closed" in done, (threshold, done)
            assert other.status.value == "closed"
    finally:
        if not hung:  # a hung thread holds the client's lock: closing would hang too
            keeper.close()


def test_a_handler_change_cut_short_in_another_threads_applier_is_not_lost(tmp_path: Any) -> None:
    # The applier took a queued change off the queue before running it: a
    # signal handler's exception there lost another thread's registration (its
    # pool never heard reclaims or pushes), silently.
    client = Client(str(tmp_path / "none.sock"))
    handler, provider = (lambda verb, resource, args: None), (lambda: [])
    calls: list[int] = []

    def queued_by_another_thread() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # as a signal handler would, mid-change
        client._push_handlers = [*client._push_handlers, handler]

    try:
        client._handler_changes.append(queued_by_another_thread)
        with pytest.raises(KeyboardInterrupt):
            client.add_state_provider(provider)  # this thread applies the queue
        client.remove_handlers()  # the next applier
        assert client._push_handlers == [handler] and client._state_providers == [provider]
    finally:
        client.close()


def test_the_last_pools_close_inside_a_handler_change_still_ends_the_session(
        start_coordinator: Any, sock_path: str) -> None:
    # A finalizer closing the process's last pool ran inside a handler change:
    # its removal waited in the queue, close_if_unused saw a user and said no,
    # and nothing looked again: the session never ended.
    start_coordinator({"r": 1})
    client = Client(sock_path)

    def handler(verb: str, resource: str | None, args: dict[str, Any]) -> None:
        pass

    client.on_push(handler)
    client.release(client.acquire("r", 5))
    answers: list[bool] = []

    def a_finalizer_runs_here() -> None:
        client.remove_handlers(handler)  # queued: we are inside a change
        answers.append(client.close_if_unused())

    try:
        client._change_handlers(a_finalizer_runs_here)
        assert answers == [False]
        deadline = time.monotonic() + 3
        while not client.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.closed
    finally:
        client.close()


def test_a_handler_change_that_fails_fails_once(tmp_path: Any) -> None:
    # A change that raised every time (a handler whose __eq__ assumes its own
    # type, met by the duplicate check) stayed at the head of the queue: every
    # later registration raised and was lost, and the background thread failed
    # at every tick (no timer ran).
    class Picky:
        def __init__(self, name: str) -> None:
            self.name = name

        def __eq__(self, other: object) -> bool:
            return self.name == other.name  # type: ignore[attr-defined]

        __hash__ = object.__hash__

        def __call__(self, verb: str, resource: str | None, args: dict[str, Any]) -> None:
            pass

    client = Client(str(tmp_path / "none.sock"))
    try:
        client.on_push(Picky("mine"))
        client.on_push(Picky("another"))  # compared with the first by identity only
        def provider() -> list[list[Any]]:
            return []

        client.add_state_provider(provider)
        assert len(client._push_handlers) == 2 and client._state_providers == [provider]

        def broken() -> None:
            raise ValueError("a change that cannot be applied")

        with pytest.raises(ValueError):
            client._change_handlers(broken)
        client.remove_handlers(provider)  # not blocked behind it
        assert client._state_providers == [] and not client._handler_changes
    finally:
        client.close()


def test_pools_naming_one_socket_differently_share_one_session(
        start_coordinator: Any, sock_path: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a pool given the socket as "sp.sock" (relative), another through a
    symlinked directory and a third by its absolute path each had a session of
    their own. After a coordinator restart the first of them to say hello spoke
    for the process: the others' leases, not yet re-registered, were taken as
    closed while it was away and freed (PostgreSQL over the cap)."""
    start_coordinator({"r": 3})
    os.symlink(tmp_path, tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    pools = [ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                            coordinator=path)
             for path in (sock_path, "sp.sock", str(tmp_path / "link" / "sp.sock"))]
    try:
        held = [pool.acquire(timeout=5) for pool in pools]
        assert len({id(pool._client) for pool in pools}) == 1
        probe = Client(sock_path, name="probe")
        try:
            mine = [s for s in probe.inspect("sessions")["sessions"] if s.get("pid") == os.getpid()
                    and s.get("name") != "probe"]
        finally:
            probe.close()
        assert len(mine) == 1, mine
        for pool, wrapper in zip(pools, held, strict=True):
            pool.release(wrapper)
    finally:
        for pool in pools:
            pool.close()


def _two_coordinators(start_coordinator: Any, tmp_path: Any) -> tuple[Any, Any]:
    """Directories one/ and two/, each with a coordinator at sp.sock (cap 1 of "r")."""
    one, two = tmp_path / "one", tmp_path / "two"
    for where in (one, two):
        where.mkdir()
        start_coordinator({"r": 1}, path=str(where / "sp.sock"))
    return one, two


def test_a_relative_socket_path_names_the_file_of_the_working_directory_of_the_time(
        start_coordinator: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: for_path() cached the key of the spelling "sp.sock", so after a chdir
    it returned the client of the first directory's coordinator (leases of the
    wrong cap); and that client kept the relative spelling, so a reconnect after
    a chdir (a coordinator restart) went to the other coordinator, re-registering
    this process's leases there."""
    one, two = _two_coordinators(start_coordinator, tmp_path)
    monkeypatch.chdir(one)
    first = Client.for_path("sp.sock")
    second = None
    try:
        lease = first.acquire("r", timeout=5)
        monkeypatch.chdir(two)
        second = Client.for_path("sp.sock")
        assert second is not first
        assert first.socket_path == str(one / "sp.sock")  # where its reconnects go
        second.release(second.acquire("r", timeout=2))  # the second coordinator's slot
        first.release(lease)
    finally:
        first.close()
        if second is not None:
            second.close()


def test_a_relative_socket_path_is_resolved_once_against_a_concurrent_chdir(
        start_coordinator: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another thread's chdir between for_path()'s two readings of the working
    directory (its key, then the path the client connects to): the client of
    the first directory's file connected to the second directory's coordinator.
    The chdir is made where it would land, inside the key's resolution."""
    import sharedpool.client as client_module

    one, two = _two_coordinators(start_coordinator, tmp_path)
    monkeypatch.chdir(one)
    real = os.path.realpath

    def resolve_then_chdir(path: Any, *args: Any, **kwargs: Any) -> Any:
        resolved = real(path, *args, **kwargs)
        os.chdir(two)  # as another thread would, right after
        return resolved

    monkeypatch.setattr(client_module.os.path, "realpath", resolve_then_chdir)
    try:
        client = Client.for_path("sp.sock")
    finally:
        monkeypatch.setattr(client_module.os.path, "realpath", real)
    try:
        assert client._shared_key is not None
        assert real(client.socket_path) == client._shared_key, "keyed by one file, connects to another"
    finally:
        client.close()


class _GrantThenHoldOn(FakeCoordinator):
    """Session 1 grants lease 77 at once; later sessions grant from 2001 on.
    Records the releases."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.next_lease = 2000
        self.released: list[int] = []

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Acquire) and idx == 0:
            s.sendall(p.encode(p.Grant(msg.req, 77, msg.resource, 77)))
        elif isinstance(msg, p.Release):
            self.released.append(msg.lease)
        else:
            super().on_message(idx, s, conn, msg)


def test_a_grant_read_from_a_session_that_ended_meanwhile_is_not_taken_on_the_next(
        sock_path: str) -> None:
    # The reader checks that its socket is still the session's, parses, then
    # dispatches. A session that ended in between (a send failed in another
    # thread) and a new one made (the acquire re-sent on it): the old session's
    # grant answered the re-sent acquire. Before: the caller got lease 77,
    # which no live session holds (the coordinator freed it with session 1:
    # a connection under no cap), and the new session's grant went back.
    fake = _GrantThenHoldOn(sock_path)
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        old_sock, old_conn = client._sock, client._conn
        assert old_sock is not None and old_conn is not None
        events = old_conn.events

        def events_then_a_new_session() -> list[p.Message]:
            msgs = events()
            if any(isinstance(m, p.Grant) for m in msgs):  # as if descheduled here
                client._disconnect("a send failed elsewhere", only=old_sock)
                assert client.ensure_connected()
            return msgs

        old_conn.events = events_then_a_new_session  # type: ignore[method-assign]
        lease = client.acquire("r", timeout=5)
        assert lease.id == 2001, lease
        assert client.session_id == 2 and list(client.held) == [2001]
        client.release(lease)
        deadline = time.monotonic() + 5
        while fake.released != [2001]:
            assert time.monotonic() < deadline, fake.released
            time.sleep(0.01)
    finally:
        client.close()
        fake.stop()


def test_a_request_cancelled_and_never_waited_for_lets_the_session_end(
        start_coordinator: Any, sock_path: str) -> None:
    # cancel() says wait() then raises AcquireCancelled; a caller that withdraws
    # and never waits (it no longer wants the lease) left the request pending for
    # good: close_if_unused() refused (False) and a lost session was made again
    # for it. Now: forgotten at the cancel, the session ends (True).
    start_coordinator({"r": Resource(max_size=1)})
    client = Client(sock_path)
    try:
        first = client.acquire("r", timeout=5)
        ticket = client.request("r", 30)  # queued at the cap
        assert ticket.cancel()
        client.release(first)
        assert client._pending == {}
        assert client.close_if_unused() and client.closed
        with pytest.raises(AcquireCancelled):  # as before
            ticket.wait()
    finally:
        client.close()


def test_a_release_just_before_close_is_read_while_the_coordinator_writes(
        start_coordinator: Any, sock_path: str) -> None:
    """A worker's exit: release() then close(), while the coordinator writes to
    that session (a reclaim, a push; here the pushes of resizes asked by another
    session). The close came first, the coordinator's write failed (EPIPE), and
    asyncio ended the session without reading the release: the lease was fenced
    as a dead process's (332 of 500 sessions). close() now waits until the
    coordinator has closed its end of the session."""
    start_coordinator({"r": Resource(max_size=100, quarantine_delay=60)})
    stop = threading.Event()

    def push() -> None:
        admin, size = Client(sock_path, name="pusher"), 100
        try:
            while not stop.is_set():
                size = 201 - size
                admin.admin("resize", resource="r", max_size=size)
        finally:
            admin.close()

    pusher = threading.Thread(target=push)
    pusher.start()
    try:
        for _ in range(50):
            client = Client(sock_path, name="exiting")
            client.release(client.acquire("r", timeout=5))
            client.close()
    finally:
        stop.set()
        pusher.join(10)
    deadline = time.monotonic() + 5
    while other_sessions(sock_path) and time.monotonic() < deadline:
        time.sleep(0.02)
    row = resource_row(sock_path)
    assert row["fenced"] == 0 and row["leased"] == 0, row


def test_close_waits_its_timeout_in_all_with_a_frame_going_out(
        start_coordinator: Any, sock_path: str) -> None:
    """close(timeout) against a coordinator that does not answer (stopped),
    while another thread's frame is going out: the wait for that frame and the
    wait for the coordinator's EOF each took the whole timeout (3.5 s for a
    2 s one here; release_process(1.0) took 1.85 s), now one bound for both."""
    coord = start_coordinator({"r": Resource(max_size=1)})
    client = Client(sock_path)
    client.ensure_connected()
    assert coord.pid is not None
    held, let_go = threading.Event(), threading.Event()

    def sending() -> None:  # as a sendall() to a coordinator not reading holds it
        with client._send_lock:
            held.set()
            let_go.wait(10)

    sender = threading.Thread(target=sending)
    os.kill(coord.pid, signal.SIGSTOP)
    try:
        sender.start()
        assert held.wait(5)
        threading.Timer(1.5, let_go.set).start()  # the frame is out 1.5 s into the close
        t0 = time.monotonic()
        client.close(timeout=2.0)
        took = time.monotonic() - t0
    finally:
        let_go.set()
        os.kill(coord.pid, signal.SIGCONT)
        sender.join(10)
    assert took < 2.9, f"close(timeout=2.0) took {took:.2f}s (was 3.5 s)"


def test_two_closes_at_once_never_shut_another_socket(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads closed one client at once (two watchers each giving a closed
    pool's last lease back, then ending the session): one took the session
    socket's fd number for its goodbye's dup, the other closed that socket, and
    the number, given meanwhile to another thread's new socket (a second
    client's, mid-hello), was dup'd and shut for writing: the coordinator hung
    up on that hello. Here the first close stops inside the dup, the number
    taken, until new sockets are made; none of them may be shut."""
    start_coordinator({"r": 1})
    client = Client(sock_path)
    assert client.ensure_connected()
    assert client._sock is not None
    fd, ino = client._sock.fileno(), os.fstat(client._sock.fileno()).st_ino
    inside, go = threading.Event(), threading.Event()
    real_dup = socket.dup

    def dup(number: int) -> int:  # socket.socket.dup(): dup(self.fileno())
        if threading.current_thread().name == "first-close":
            inside.set()
            go.wait(5)
        return real_dup(number)

    monkeypatch.setattr(socket, "dup", dup)
    first = threading.Thread(target=client.close, name="first-close", daemon=True)
    second = threading.Thread(target=client.close, daemon=True)
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        first.start()
        assert inside.wait(5)
        second.start()
        deadline = time.monotonic() + 1.0  # until the second close lets the number go (it did)
        while time.monotonic() < deadline:
            try:
                if os.fstat(fd).st_ino != ino:
                    break
            except OSError:
                break
            time.sleep(0.01)
        for _ in range(32):  # new sockets, until one has the number (the lowest free)
            pairs.append(socket.socketpair())
            if fd in (pairs[-1][0].fileno(), pairs[-1][1].fileno()):
                break
        go.set()
        first.join(5)
        second.join(5)
        shut = []
        for a, b in pairs:  # nothing shut them: no end of file on either end
            for end in (a, b):
                end.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    shut += [end.fileno()] if end.recv(1) == b"" else []
        assert not shut, f"the close's goodbye shut other sockets (fd {shut}): the number was reused"
    finally:
        go.set()
        for a, b in pairs:
            a.close()
            b.close()
