"""I4: the coordinator is killed and restarted; pools keep working and nothing is lost."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from typing import Any

import pytest
from servers import wait_for

from sharedpool import (
    Client,
    ConnectionPool,
    CoordinatorUnavailable,
    PoolConfig,
    PoolTimeout,
    SharedPoolError,
)
from sharedpool.testing import FakeFactory


def leased(client: Client) -> int:
    return int(client.inspect("resources")["resources"][0]["leased"])


def wait_marker(sock_path: str, key: str, count: int) -> None:
    """Until the coordinator's restart marker lists ``count`` entries under
    ``key``: its keeper writes 20 ms after a change, on its own event loop,
    so a fixed sleep before a SIGKILL could beat it on a loaded machine."""
    from sharedpool.marker import marker_path, read_marker

    wait_for(lambda: len(read_marker(marker_path(sock_path))[key]) == count, 10,
             f"the restart marker to list {count} {key} lease(s)")


def make_pool(sock: str, factory: FakeFactory, **cfg: Any) -> ConnectionPool[Any]:
    cfg.setdefault("min_size", 0)
    cfg.setdefault("max_size", 2)
    return ConnectionPool(factory, PoolConfig(**cfg), resource="r", coordinator=sock)


def test_held_connections_work_while_the_coordinator_is_away(start_coordinator: Any,
                                                             sock_path: str) -> None:
    first = start_coordinator({"r": 2})
    factory = FakeFactory()
    pool = make_pool(sock_path, factory)
    try:
        with pool.connection() as conn:
            conn.execute()
        first.kill()
        for _ in range(100):  # the fast path needs no coordinator
            with pool.connection(timeout=1) as conn:
                assert conn.execute() == 1
        start_coordinator({"r": 2})
        probe = Client(sock_path)
        deadline = time.monotonic() + 10
        while leased(probe) != 1:
            assert time.monotonic() < deadline, "the pool's lease was not re-registered"
            time.sleep(0.02)
        probe.close()
        assert factory.calls == 1
    finally:
        pool.close()


def test_new_connections_wait_for_the_coordinator(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 2})
    pool = make_pool(sock_path, FakeFactory())
    try:
        with pool.connection():
            pass
        first.kill()
        held = pool.acquire()  # the one connection we have
        threading.Timer(0.5, lambda: start_coordinator({"r": 2})).start()
        t0 = time.monotonic()
        with pool.connection(timeout=10) as conn:  # needs a new lease: waits, then succeeds
            assert conn.execute() == 1
        assert time.monotonic() - t0 >= 0.4
        pool.release(held)
    finally:
        pool.close()


def test_rebuilt_ledger_never_grants_beyond_the_cap(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 3})
    a, b = Client(sock_path), Client(sock_path)
    try:
        a.acquire("r", timeout=10)
        a.acquire("r", timeout=10)
        b.acquire("r", timeout=10)
        first.kill()
        start_coordinator({"r": 2})  # restarted with a smaller cap: 3 re-registered > 2
        deadline = time.monotonic() + 10

        def reregistered() -> bool:
            try:  # a client may not have noticed the old coordinator's death yet
                return a.connected and b.connected and leased(a) == 3
            except CoordinatorUnavailable:
                return False

        while not reregistered():
            assert time.monotonic() < deadline, "the clients never re-registered their leases"
            time.sleep(0.02)
        with pytest.raises(PoolTimeout):
            b.acquire("r", timeout=0)
        a.release(next(iter(a.held.values())))
        with pytest.raises(PoolTimeout):  # 2 held, cap 2: still nothing to grant
            b.acquire("r", timeout=0)
        a.release(next(iter(a.held.values())))
        assert b.acquire("r", timeout=2)
    finally:
        a.close()
        b.close()


def test_wait_policy_times_out_without_a_coordinator(sock_path: str) -> None:
    pool = make_pool(sock_path, FakeFactory())
    try:
        with pytest.raises(SharedPoolError) as info:
            pool.acquire(timeout=0.3)
        assert isinstance(info.value, (TimeoutError, ConnectionError))
    finally:
        pool.close()


@pytest.mark.parametrize("coordinator", ["none", "stopped"])
def test_an_acquire_with_the_default_timeout_ends_when_no_coordinator_is_reached(
        start_coordinator: Any, sock_path: str, coordinator: str) -> None:
    """Before, Client.acquire(resource) with no timeout, from a client that
    never had a session, waited for ever: the resource's default was unknown."""
    import signal

    coord = None
    if coordinator == "stopped":  # accepts (the kernel does), never answers the hello
        coord = start_coordinator({"r": 1})
        os.kill(coord.pid, signal.SIGSTOP)
    client = Client(sock_path, connect_timeout=0.5)
    try:
        t0 = time.monotonic()
        with pytest.raises(CoordinatorUnavailable):
            client.acquire("r")
        assert time.monotonic() - t0 < 5  # connect_timeout, the grace, one more try
    finally:
        client.close()
        if coord is not None:
            os.kill(coord.pid, signal.SIGCONT)


def test_fallback_policy_opens_a_local_cap_then_hands_back(start_coordinator: Any,
                                                           sock_path: str) -> None:
    factory = FakeFactory()
    pool = make_pool(sock_path, factory, coordinator_away="fallback", fallback_max_size=1)
    try:
        w = pool.acquire(timeout=2)  # no coordinator: one connection without a lease
        assert w.lease is None
        with pytest.raises(SharedPoolError):  # the local fallback cap is 1
            pool.acquire(timeout=0.3)
        start_coordinator({"r": 2})
        pool.release(w)
        # Once the client is reconnected (after its backoff), the unleased
        # connection is closed: at checkin, or by maintenance while idle.
        deadline = time.monotonic() + 10
        while not w.conn.closed:
            assert time.monotonic() < deadline, "the fallback connection was never handed back"
            time.sleep(0.05)
        with pool.connection(timeout=5):
            pass
        assert all(x.lease is not None for x in pool._all.values())
    finally:
        pool.close()


@pytest.mark.parametrize("when", ["backoff running at the checkin", "still away at the checkin"])
def test_a_fallback_connection_is_handed_back_whenever_the_coordinator_comes(
        start_coordinator: Any, sock_path: str, when: str) -> None:
    """The checkin asked for one reconnect. Made while a backoff ran (a failed
    attempt a moment before: under load, in CI), it was dropped; made while the
    coordinator was still away, it failed; either way nothing asked again and
    the connection without a lease stayed for good."""
    pool = make_pool(sock_path, FakeFactory(), coordinator_away="fallback", fallback_max_size=1,
                     validation_interval=0.2)
    try:
        w = pool.acquire(timeout=2)
        assert w.lease is None and pool._client is not None
        if when == "backoff running at the checkin":
            pool._client._next_attempt = time.monotonic() + 0.5
            start_coordinator({"r": 2})
            pool.release(w)
        else:
            pool.release(w)
            time.sleep(0.5)  # the reconnect it asked for has failed
            start_coordinator({"r": 2})
        deadline = time.monotonic() + 5
        while not w.conn.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w.conn.closed, "the fallback connection was never handed back"
    finally:
        pool.close()


@pytest.mark.parametrize("policy", ["fallback", "wait"])
def test_an_acquire_queued_when_the_coordinator_dies_falls_back_only_if_asked(
        start_coordinator: Any, sock_path: str, policy: str) -> None:
    """Before, an acquire already queued at the coordinator when it died waited
    out its whole timeout even with coordinator_away="fallback"."""
    coord = start_coordinator({"r": 1})
    holder = Client(sock_path)
    holder.acquire("r", timeout=2)  # someone else holds the only slot
    pool = make_pool(sock_path, FakeFactory(), max_size=1, coordinator_away=policy,
                     fallback_max_size=1)
    got: list[Any] = []

    def want() -> None:
        try:
            got.append(pool.acquire(timeout=4))
        except SharedPoolError as exc:
            got.append(exc)

    try:
        t = threading.Thread(target=want)
        t.start()
        wait_for(lambda: holder.inspect("resources")["resources"][0]["waiting"] == 1, 10,
                 "the acquire to queue at the coordinator")
        t0 = time.monotonic()
        coord.kill()
        t.join(10)
        if policy == "fallback":
            assert got and not isinstance(got[0], Exception), got
            assert got[0].lease is None and time.monotonic() - t0 < 2  # without waiting it out
            pool.release(got[0])
        else:  # it waits for the coordinator to come back, as documented
            assert got and isinstance(got[0], PoolTimeout), got
    finally:
        pool.close()
        holder.close()


def test_restart_waits_for_reregistration_before_granting(start_coordinator: Any,
                                                          sock_path: str) -> None:
    """I1 across a restart: a process that kept its connections re-registers
    them before a newcomer is granted anything, however fast the newcomer is."""
    first = start_coordinator({"r": 2})
    keeper, newcomer = Client(sock_path), Client(sock_path)
    try:
        keeper.acquire("r", timeout=1)
        keeper.acquire("r", timeout=1)
        first.kill()  # its socket file stays: the next start knows it is a restart
        start_coordinator({"r": 2})
        with pytest.raises(PoolTimeout):
            newcomer.acquire("r", timeout=2.5)  # the cap is still full: keeper re-registered
        assert leased(newcomer) == 2
        keeper.release(next(iter(keeper.held.values())))
        assert newcomer.acquire("r", timeout=2)
    finally:
        keeper.close()
        newcomer.close()


def test_an_acquire_re_sent_after_a_restart_asks_for_what_is_left_of_its_wait(
        start_coordinator: Any, sock_path: str) -> None:
    """Re-sent to the restarted coordinator with its whole timeout, an acquire
    stayed queued there past its caller's own deadline: the caller read "got no
    reply in time from the coordinator" (a coordinator that seemed hung), and
    the coordinator counted no timeout (seen with the psycopg_pool integration
    when an operator restarted the coordinator)."""
    first = start_coordinator({"r": 1})
    holder, waiter = Client(sock_path), Client(sock_path)
    try:
        holder.acquire("r", timeout=1)  # the only slot, re-registered after the restart
        ticket = waiter.request("r", 4)
        time.sleep(1.0)  # queued at the first coordinator
        first.kill()
        start_coordinator({"r": 1})
        with pytest.raises(PoolTimeout) as info:
            ticket.wait()
        # The coordinator's answer at the end of its own 4 s, counted from the first send.
        assert "no reply in time" not in str(info.value), info.value
        assert holder.inspect("resources")["resources"][0]["timeouts"] == 1
    finally:
        holder.close()
        waiter.close()


def test_an_acquire_of_the_default_wait_re_sent_after_a_restart_asks_for_what_is_left(
        start_coordinator: Any, sock_path: str) -> None:
    """An acquire given no timeout (the resource's acquire_timeout, 3 s) was
    re-sent asking for the whole default again: a coordinator away late in the
    wait, or two restarts in it, held it past the client's own bound (twice the
    default), which read "acquire got no reply in time from the coordinator"."""
    first = start_coordinator({"r": {"max_size": 1, "acquire_timeout": 3}})
    holder, waiter = Client(sock_path), Client(sock_path)
    try:
        holder.acquire("r", timeout=1)  # the only slot, re-registered after each restart
        waiter.ensure_connected()  # the default known: given no timeout, the wait is 3 s
        start = time.monotonic()
        ticket = waiter.request("r")
        time.sleep(1.0)  # queued at the first coordinator
        first.kill()
        second = start_coordinator({"r": {"max_size": 1, "acquire_timeout": 3}})
        wait_for(lambda: waiter._sock is not None, 10, "the waiter back")
        # Past its 3 s, but within the first re-send's whole 3 s: away again.
        time.sleep(max(0.0, start + 3.7 - time.monotonic()))
        second.kill()
        start_coordinator({"r": {"max_size": 1, "acquire_timeout": 3}})
        with pytest.raises(PoolTimeout) as info:
            ticket.wait()
        assert "no reply in time" not in str(info.value), info.value
    finally:
        holder.close()
        waiter.close()


def test_clean_stop_with_leases_out_is_a_restart_too(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 1})
    keeper, newcomer = Client(sock_path), Client(sock_path)
    try:
        keeper.acquire("r", timeout=1)
        first.stop()  # SIGTERM: clean, but a process still holds a connection
        start_coordinator({"r": 1})
        with pytest.raises(PoolTimeout):
            newcomer.acquire("r", timeout=2.5)
    finally:
        keeper.close()
        newcomer.close()


_KEEPER = """
import sys
from sharedpool import Client
client = Client(sys.argv[1])
client.acquire("r", timeout=5)
client.acquire("r", timeout=5)
print("holding", flush=True)
sys.stdin.readline()
client.close()
"""


def test_a_coordinator_stopped_in_its_restart_grace_hands_the_grace_on(
        start_coordinator: Any, sock_path: str) -> None:
    """Before, a coordinator stopped (SIGTERM) before the survivors had
    re-registered wrote no restart marker (its own ledger held no lease), so
    the next one granted at once what they still held: over the cap."""
    import signal
    import subprocess
    import sys

    first = start_coordinator({"r": 2})
    keeper = subprocess.Popen([sys.executable, "-c", _KEEPER, sock_path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert keeper.stdout is not None and keeper.stdout.readline().strip() == "holding"
        os.kill(keeper.pid, signal.SIGSTOP)  # it cannot re-register while we look
        first.kill()
        start_coordinator({"r": 2}, restart_grace=5.0).stop()  # stopped inside its grace
        start_coordinator({"r": 2}, restart_grace=1.0)
        newcomer = Client(sock_path)
        try:
            with pytest.raises(PoolTimeout):
                newcomer.acquire("r", timeout=0.5)  # the grace was handed on: nothing granted yet
        finally:
            newcomer.close()
    finally:
        os.kill(keeper.pid, signal.SIGCONT)
        keeper.communicate("stop\n", timeout=10)


def test_a_lease_the_restarted_coordinator_refuses_is_closed_not_kept(start_coordinator: Any,
                                                                      sock_path: str) -> None:
    """Restarted without the resource, the coordinator cannot re-register the
    pool's leases: their connections count against no cap, so the pool closes
    them (an idle one at once, one in use at its checkin) instead of keeping
    them, and re-registering them, for ever."""
    first = start_coordinator({"r": 2})
    factory = FakeFactory()
    pool = make_pool(sock_path, factory)
    try:
        idle_one, busy_one = pool.acquire(timeout=5), pool.acquire(timeout=5)
        pool.release(idle_one)
        first.kill()
        start_coordinator({"other": 2})  # "r" is gone from the new config
        client = pool._client
        assert client is not None
        deadline = time.monotonic() + 10
        while not idle_one.conn.closed:
            assert time.monotonic() < deadline, "the idle connection of a refused lease stayed open"
            time.sleep(0.02)
        assert client.held == {}  # forgotten: neither re-registered again nor released
        assert busy_one.conn.execute() == 1  # a query under way is not cut short
        assert not busy_one.conn.closed
        pool.release(busy_one)
        assert busy_one.conn.closed
        assert factory.open == [] and pool.get_size() == 0
        assert pool.get_stats()["leases_held"] == 0
    finally:
        pool.close()


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_restart_keeps_the_fence_of_a_dead_process(start_coordinator: Any, sock_path: str,
                                                     how: str) -> None:
    """A dead process's slot is fenced (its backend may still run a query) when
    the coordinator is stopped and started again: the new one fences it for
    the time that was left, instead of handing it out at once (I1). Killed
    with SIGKILL too (the marker is kept current while serving): before, such
    a coordinator handed nothing on, and the slot was free once the restart
    grace had passed (over the cap as the server counts)."""
    from sharedpool import Resource

    first = start_coordinator({"r": Resource(max_size=1, quarantine_delay=6)})
    dead, newcomer = Client(sock_path), Client(sock_path)
    try:
        dead.acquire("r", timeout=5)
        dead.close()  # gone with its lease: fenced for quarantine_delay
        if how == "stop":
            first.stop()  # SIGTERM: a clean stop, no session holds a lease
        else:
            wait_marker(sock_path, "fenced", 1)
            first.kill()
        t0 = time.monotonic()
        start_coordinator({"r": Resource(max_size=1, quarantine_delay=6)}, restart_grace=0.5)
        with pytest.raises(PoolTimeout):  # past the restart grace, still fenced
            newcomer.acquire("r", timeout=2.0)
        lease = newcomer.acquire("r", timeout=10)  # once the fence's time is up
        assert time.monotonic() - t0 < 9
        newcomer.release(lease)
    finally:
        newcomer.close()


def test_leases_a_live_process_let_go_of_across_a_restart_are_not_logged_as_a_dead_ones(
        start_coordinator: Any, sock_path: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    """A process that closed its connection while no coordinator ran says hello
    to the new one without its lease: the lease is fenced, rightly, but the log
    said "from dead pid N" of a process serving on (seen with gunicorn workers
    after a `sharedpool serve` was SIGKILLed and started again)."""
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    first = start_coordinator({"r": 1})
    holder = Client(sock_path)
    holder.acquire("r", timeout=5)
    wait_marker(sock_path, "held", 1)
    first.kill()
    holder.close()  # its connection closed while the coordinator is away
    second = start_coordinator({"r": 1}, restart_grace=0.5)
    again = Client(sock_path)
    try:
        again.inspect("server")  # this pid's hello, without the lease
        wait_for(lambda: again.inspect("resources")["resources"][0]["fenced"] == 0, 10,
                 "the lease not re-registered to be fenced and freed")
    finally:
        again.close()
    second.stop()  # its log is ours once it has exited
    mine = [line for line in capfd.readouterr().err.splitlines()
            if "quarantined" in line and f"pid {os.getpid()} " in line]
    assert mine, "the lease was not fenced"
    assert all("dead" not in line for line in mine), mine


def test_a_sigkilled_coordinator_hands_on_the_leases_of_a_process_dying_meanwhile(
        start_coordinator: Any, sock_path: str) -> None:
    """A process holding a lease dies while the coordinator is down (killed
    with SIGKILL): it never re-registers, and its backend may still run a
    query. Its lease was on the marker: fenced once the grace ends, not free."""
    from sharedpool import Resource

    limits = Resource(max_size=1, quarantine_delay=4)
    first = start_coordinator({"r": limits})
    holder, newcomer = Client(sock_path), Client(sock_path)
    try:
        holder.acquire("r", timeout=5)
        wait_marker(sock_path, "held", 1)
        first.kill()
        holder.close()  # dies while no coordinator is up
        t0 = time.monotonic()
        start_coordinator({"r": limits}, restart_grace=0.5)
        with pytest.raises(PoolTimeout):  # the grace, then the fence
            newcomer.acquire("r", timeout=2.5)
        lease = newcomer.acquire("r", timeout=10)
        assert time.monotonic() - t0 < 8
        newcomer.release(lease)
    finally:
        holder.close()
        newcomer.close()


def test_a_clean_stop_with_nothing_out_leaves_no_marker(start_coordinator: Any, sock_path: str) -> None:
    """The marker kept while serving goes when nothing is left to hand on: the
    next start is a fresh one, granting at once."""
    first = start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        lease = client.acquire("r", timeout=5)
        wait_for(lambda: os.path.exists(sock_path + ".restart"), 10, "the marker of the lease")
        client.release(lease)
        wait_for(lambda: not os.path.exists(sock_path + ".restart"), 10,
                 "the marker to go with the last lease")
        first.stop()
        assert not os.path.exists(sock_path + ".restart")
        start_coordinator({"r": 1}, restart_grace=30)
        t0 = time.monotonic()
        client.release(client.acquire("r", timeout=5))
        assert time.monotonic() - t0 < 5  # no restart grace held it
    finally:
        client.close()


def test_a_lease_refused_while_its_connection_opens_is_not_kept(start_coordinator: Any,
                                                                sock_path: str) -> None:
    """The revoke can come while the factory still runs under the lease: the
    connection it then returns counts nowhere either, and is closed at its
    checkin instead of being kept as a leased one."""
    connecting, go_on = threading.Event(), threading.Event()
    factory = FakeFactory()

    def slow() -> Any:
        connecting.set()
        go_on.wait(20)
        return factory()

    first = start_coordinator({"r": 2})
    pool = ConnectionPool(slow, PoolConfig(min_size=0, max_size=2, acquire_timeout=30,
                                           connection_timeout=30), resource="r", coordinator=sock_path)
    got: list[Any] = []
    opener = threading.Thread(target=lambda: got.append(pool.acquire(timeout=25)))
    try:
        opener.start()
        assert connecting.wait(10)
        client = pool._client
        assert client is not None and len(client.held) == 1
        first.kill()
        start_coordinator({"other": 2})  # "r" is gone from the new config
        deadline = time.monotonic() + 10
        while client.held:
            assert time.monotonic() < deadline, "the revoke never reached the client"
            time.sleep(0.02)
        time.sleep(0.2)  # the pool's revoke job has run, and found nothing yet
        go_on.set()
        opener.join(10)
        [wrapper] = got
        assert wrapper.lease is None
        pool.release(wrapper)
        assert wrapper.conn.closed and pool.get_stats()["leases_held"] == 0
    finally:
        go_on.set()
        opener.join(10)
        pool.close()


def test_a_refused_close_leaves_the_pool_maintained() -> None:
    """close(timeout=nan) is a ConfigError that changes nothing: maintenance
    (here: max_lifetime) goes on."""
    import math

    from sharedpool import ConfigError

    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=1, max_lifetime=0.5))
    try:
        pool.release(pool.acquire())
        with pytest.raises(ConfigError):
            pool.close(timeout=math.nan)
        deadline = time.monotonic() + 5
        while factory.open:
            assert time.monotonic() < deadline, "maintenance stopped: an expired connection stayed"
            time.sleep(0.05)
    finally:
        pool.close()


def test_a_drain_ends_with_the_coordinator_that_ordered_it(start_coordinator: Any, sock_path: str) -> None:
    """Before, after a drain and a coordinator restart, the pools stayed drained
    for good while the new coordinator (and `status`) knew of no drain."""
    first = start_coordinator({"r": 2})
    pool = make_pool(sock_path, FakeFactory())
    admin = Client(sock_path)
    try:
        pool.release(pool.acquire(timeout=2))
        admin.admin("drain", resource="r")
        deadline = time.monotonic() + 5
        while pool.status.value != "draining":
            assert time.monotonic() < deadline, "the drain never reached the pool"
            time.sleep(0.02)
        first.stop()
        start_coordinator({"r": 2}, restart_grace=0.2)
        deadline = time.monotonic() + 10
        while pool.status.value != "active":  # at the reconnect
            assert time.monotonic() < deadline, "the pool stayed drained after the restart"
            time.sleep(0.05)
        with pool.connection(timeout=5):
            pass
    finally:
        pool.close()
        admin.close()


def test_a_resume_push_does_not_end_a_drain_of_the_pools_own() -> None:
    """``sharedpool resume`` ends the coordinator's drain, never one the
    application ordered itself (it may be shutting down)."""
    from sharedpool import giveback

    pool = make_pool("/nonexistent/sp.sock", FakeFactory())
    try:
        pool.drain(timeout=0)  # the application's own
        giveback.on_push(pool, "resume", "r", {})
        assert pool.status.value == "draining"
        giveback.on_push(pool, "drain", "r", {})  # the coordinator's on top of it
        giveback.on_push(pool, "resume", "r", {})
        assert pool.status.value == "draining"
        pool.resume()
        giveback.on_push(pool, "drain", "r", {})  # the coordinator's alone
        giveback.on_push(pool, "resume", "r", {})
        assert pool.status.value == "active"
    finally:
        pool.close()


def test_a_drain_of_the_pools_own_is_not_ended_by_a_new_session() -> None:
    from sharedpool import giveback

    pool = make_pool("/nonexistent/sp.sock", FakeFactory())
    try:
        pool.drain(timeout=0)  # the application's own
        giveback.on_push(pool, "drain", "r", {})  # and then the coordinator's
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": False}}})
        assert pool.status.value == "draining"
        pool.resume()
        giveback.on_push(pool, "drain", "r", {})  # the coordinator's alone
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": True}}})
        assert pool.status.value == "draining"  # the new session says it goes on
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": False}}})
        assert pool.status.value == "active"
        giveback.on_push(pool, "drain", "r", {})
        giveback.on_push(pool, "drain", "r", {})  # an operator who drained twice
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": False}}})
        assert pool.status.value == "active"
        giveback.on_push(pool, "drain", "r", {})
        pool.resume()  # the owner resumed it, and later drains it again, itself
        pool.drain(timeout=0)
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": False}}})
        assert pool.status.value == "draining"
        pool.resume()
        # A drain ordered while this process had no session (pushed to the others
        # only): the welcome of its next session says so (before, it kept serving).
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": True}}})
        assert pool.status.value == "draining"
        giveback.on_push(pool, "welcome", None, {"resources": {"r": {"draining": False}}})
        assert pool.status.value == "active"
        pool.drain(timeout=0)  # the application's own drain: an admin resume does not end it
        giveback.on_push(pool, "resume", "r", {})
        assert pool.status.value == "draining"
    finally:
        pool.close()


def test_a_start_leaves_the_marker_until_its_keeper_replaces_it(tmp_path: Any) -> None:
    """bind_socket took the marker away, and the keeper wrote it again only
    later in _serve (40-60 ms of imports and set-up): a coordinator SIGKILLed
    (or SIGTERMed before its handlers were in) right after binding handed
    nothing on, not even that the next start is a restart."""
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import bind_socket
    from sharedpool.marker import marker_path, read_marker, write_marker

    path = str(tmp_path / "c.sock")
    fenced = [["r", 7, 7, 12345, 30.0, None]]
    write_marker(marker_path(path), {"fenced": fenced})
    sock, restarted, handed = bind_socket(CoordinatorConfig(socket_path=path, resources={"r": 1}))
    try:
        assert restarted and handed["fenced"] == fenced
        assert read_marker(marker_path(path))["fenced"] == fenced  # still there for the next start
    finally:
        sock.close()
        os.unlink(path)


def test_a_marker_write_that_failed_is_tried_again(tmp_path: Any) -> None:
    """The keeper remembered what it meant to write before writing it: after a
    failed write the same state was never written (the marker stayed stale)."""
    import asyncio

    from sharedpool.marker import MarkerKeeper, read_marker

    path = str(tmp_path / "missing" / "c.sock.restart")
    loop = asyncio.new_event_loop()
    try:
        keeper = MarkerKeeper(path, loop)
        handed = {"fenced": [], "held": [["r", 7, 7, 12345, None]], "late": []}
        keeper.write(handed)  # no such directory: logged, not written
        os.mkdir(tmp_path / "missing")
        keeper.write(handed, only_if_changed=True)
        assert read_marker(path)["held"] == handed["held"]
    finally:
        loop.close()


def test_a_marker_that_cannot_be_written_is_said_once_and_tried_again(
        tmp_path: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full or read-only disk under load: every change logged an error (one
    every 20 ms for as long as the disk stayed full), and once it came back a
    marker left stale was written only at the next change of the ledger."""
    import asyncio
    import logging
    import types

    from sharedpool import marker

    monkeypatch.setattr(marker, "RETRY_EVERY", 0.05, raising=False)
    path = str(tmp_path / "missing" / "c.sock.restart")
    held: list[list[Any]] = []
    ledger = types.SimpleNamespace(fenced_state=lambda now: [], held_state=lambda: list(held),
                                   late_state=lambda: [], dropped_state=lambda: [],
                                   started_state=lambda now: [], hold_until=None)
    server = types.SimpleNamespace(ledger=ledger)
    loop = asyncio.new_event_loop()
    try:
        keeper = marker.MarkerKeeper(path, loop, every=0.002)
        with caplog.at_level(logging.DEBUG, logger="sharedpool.coordinator"):
            for i in range(20):  # a lease granted every few ms, none written
                held.append(["r", 100 + i, 100 + i, 12345, None])
                keeper.changed(server)
                loop.run_until_complete(asyncio.sleep(0.01))
            errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "trying again" in errors[0], errors
            os.mkdir(tmp_path / "missing")  # the disk is back; the ledger changes no more
            loop.run_until_complete(asyncio.sleep(0.3))
        assert marker.read_marker(path)["held"] == held
        assert "current again" in caplog.text
    finally:
        loop.close()


def test_a_marker_write_that_fails_leaves_no_part_behind(tmp_path: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from sharedpool import marker

    def full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(marker.os, "replace", full)
    path = str(tmp_path / "c.sock.restart")
    assert not marker.write_marker(path, {"held": [["r", 7, 7, 12345, None]]})
    assert os.listdir(tmp_path) == []  # the .tmp's blocks are not kept on a full disk


def test_a_process_stopped_across_a_restart_keeps_its_leases_counted(
        start_coordinator: Any, sock_path: str) -> None:
    """A process holding a lease is stopped (SIGSTOP: a debugger, a frozen
    container, a gevent hub blocked) while the coordinator is killed and
    restarted: it cannot re-register within the grace, yet its connection is
    open. Its lease was fenced as a dead process's and handed on after
    quarantine_delay: two connections at a cap of 1. Now it stays counted while
    the process runs; resumed, the process re-registers it and gives it back
    to the waiter when asked (it sits idle)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from sharedpool import Resource

    limits = Resource(max_size=1, quarantine_delay=0.3)
    first = start_coordinator({"r": limits})
    holder_py = str(Path(__file__).with_name("pool_holder.py"))
    holder = subprocess.Popen([sys.executable, holder_py, sock_path, "r", "1", "1", "idle", "60"],
                              stdout=subprocess.PIPE, text=True)
    newcomer = Client(sock_path)
    try:
        assert holder.stdout is not None and holder.stdout.readline().startswith("ready")
        os.kill(holder.pid, signal.SIGSTOP)
        wait_marker(sock_path, "held", 1)
        first.kill()
        start_coordinator({"r": limits}, restart_grace=0.5)
        with pytest.raises(PoolTimeout):  # the grace, then as long as the holder runs
            newcomer.acquire("r", timeout=3)
        os.kill(holder.pid, signal.SIGCONT)
        lease = newcomer.acquire("r", timeout=10)  # re-registered, then given back (idle)
        assert leased(newcomer) == 1
        newcomer.release(lease)
    finally:
        newcomer.close()
        os.kill(holder.pid, signal.SIGCONT)
        holder.kill()
        holder.wait(10)


def test_the_marker_is_for_the_owner_only(tmp_path: Any) -> None:
    # Before, 0644 under the usual umask: in a socket directory made for a group
    # (0750), every member read which processes held which leases.
    from sharedpool import marker

    path = str(tmp_path / "c.sock.restart")
    old = os.umask(0o022)
    try:
        assert marker.write_marker(path, {"held": [["r", 7, 7, 12345, None]]})
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
