"""I3 across processes: idle slots move to where they are needed, busy ones at
checkin after the fairness quantum; limits per process; no lease lost to a race."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from proc_helpers import start_recording

from sharedpool import (
    Client,
    ConnectionPool,
    PoolConfig,
    PoolTimeout,
    Resource,
    TooManyWaiters,
    giveback,
    receiving,
)
from sharedpool import protocol as p
from sharedpool.handoff import AUTO_MAX
from sharedpool.testing import FakeFactory

HOLDER = str(Path(__file__).with_name("pool_holder.py"))


@contextmanager
def holder(sock: str, size: int, count: int, mode: str,
           seconds: float = 30, connect_delay: float = 0.0) -> Iterator[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, HOLDER, sock, "r", str(size), str(count), mode, str(seconds),
                             str(connect_delay)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        word, connected_at = proc.stdout.readline().split()
        assert word == "ready"
        proc.connected_at = float(connected_at)  # type: ignore[attr-defined]  # the oldest connection's
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def held_by(client: Client, pid: int) -> int:
    return sum(s["leases"] for s in client.inspect("sessions")["sessions"] if s["pid"] == pid)


def local_pool(sock: str, size: int = 2) -> ConnectionPool[Any]:
    return ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=size), resource="r",
                          coordinator=sock)


def test_idle_slots_are_reclaimed_within_milliseconds(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 3})
    with holder(sock_path, 4, 3, "idle") as proc:
        pool = local_pool(sock_path)
        try:
            t0 = time.monotonic()
            with pool.connection(timeout=5):
                waited = time.monotonic() - t0
            client = Client.for_path(sock_path)
            assert held_by(client, proc.pid) == 2
        finally:
            pool.close()
    assert waited < 1.0, f"reclaim took {waited:.3f}s (idle_timeout is 300s)"


def test_a_pool_sitting_on_idle_slots_gives_one_to_a_sibling_pool(start_coordinator: Any,
                                                                  sock_path: str) -> None:
    """Two pools of one process on one resource (two engines, say): the second
    used to wait its whole timeout while the first held the cap idle, though a
    pool in another process would have been served in milliseconds."""
    start_coordinator({"r": 2})
    first, second = local_pool(sock_path), local_pool(sock_path)
    probe = Client(sock_path)
    try:
        held = [first.acquire(), first.acquire()]
        for w in held:
            first.release(w)
        deadline = time.monotonic() + 5
        while {r["state"] for r in probe.inspect("leases")["leases"]} != {"idle"}:
            assert time.monotonic() < deadline, "the idle states never reached the coordinator"
            time.sleep(0.02)
        t0 = time.monotonic()
        with second.connection(timeout=4):
            waited = time.monotonic() - t0
        assert first.get_size() == 1
    finally:
        second.close()
        first.close()
        probe.close()
    assert waited < 2.0, f"the sibling pool waited {waited:.2f}s"


def test_busy_process_gives_back_at_checkin(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=3, fairness_quantum=0.05)})
    with holder(sock_path, 3, 3, "busy", seconds=20) as proc:
        pool = local_pool(sock_path)
        try:
            t0 = time.monotonic()
            for _ in range(5):  # repeatedly: the busy process must not starve us
                with pool.connection(timeout=10) as conn:
                    conn.execute()
                    time.sleep(0.01)
                pool.close()  # give our lease back each time, then come again
                pool = local_pool(sock_path)
            elapsed = time.monotonic() - t0
        finally:
            pool.close()
        assert proc.poll() is None  # the busy one kept working
    assert elapsed < 10



def test_a_shrunk_cap_takes_busy_excess_back_at_its_next_checkin(start_coordinator: Any,
                                                                 sock_path: str) -> None:
    """A resize below what is leased: the busy excess goes at its next checkin,
    not once each connection is a fairness quantum old (fairness_quantum = 10,
    8 -> 2 with PostgreSQL: 7.8 s at 8 backends before)."""
    start_coordinator({"r": Resource(max_size=4, fairness_quantum=30)})
    with holder(sock_path, 4, 4, "busy", seconds=30) as proc:
        admin = Client(sock_path)
        try:
            def leased() -> int:
                return int(admin.inspect("resources")["resources"][0]["leased"])

            assert leased() == 4
            t0 = time.monotonic()
            admin.admin("resize", resource="r", max_size=1)
            while leased() > 1 and time.monotonic() - t0 < 15:
                time.sleep(0.01)
            took = time.monotonic() - t0
            assert proc.poll() is None  # it kept working, within the new cap
        finally:
            admin.close()
    assert took < 5, f"{took:.2f}s over the new cap (its connections checked in every 10 ms)"

# The holder counts its turn from when its connection was made, a little
# before "ready": the expensive holder gives its slot back that much before
# the 1 s ceiling. 0.5 s leaves room for a loaded machine on both sides.
@pytest.mark.parametrize(("connect_delay", "low", "high"), [(0.0, 0.0, 0.5), (0.05, 0.5, 6.0)])
def test_auto_quantum_follows_what_a_hand_off_costs(start_coordinator: Any, sock_path: str,
                                                     connect_delay: float, low: float, high: float) -> None:
    # fairness_quantum="auto" (the default): a holder whose connects are cheap
    # gives its busy slot back within the 0.05 s floor; one whose connects
    # take 50 ms keeps it for 120 x (connect + close), capped at 1 s.
    start_coordinator({"r": Resource(max_size=1)})
    with holder(sock_path, 1, 1, "busy", seconds=20, connect_delay=connect_delay) as proc:
        pool = local_pool(sock_path, 1)
        try:
            t0 = time.monotonic()
            with pool.connection(timeout=10):
                waited = time.monotonic() - t0
        finally:
            pool.close()
        assert proc.poll() is None
    age = t0 - proc.connected_at  # type: ignore[attr-defined]
    assert low <= waited <= high, f"waited {waited:.3f}s for the busy holder's slot ({age:.3f}s old)"


@pytest.mark.parametrize(("costs_first", "bound"), [(True, 0.5), (False, 0.6)])
def test_holders_keep_to_the_coordinators_quantum(start_coordinator: Any, sock_path: str,
                                                  costs_first: bool, bound: float) -> None:
    # The holder's own connects take 50 ms: on its own it would keep its busy
    # slot for the 1 s ceiling, counted from when it connected. Two other
    # processes report cheap hand-offs, so the median, and the one quantum
    # the coordinator sends with its reclaim, is the 0.05 s floor, and the
    # holder keeps to that. Without costs_first the reclaim goes out before
    # the costs arrive; the holder hears the quantum once they do. The holder
    # starts last, so that keeping its own quantum would show as a wait well
    # over the bound.
    start_coordinator({"r": Resource(max_size=1)})
    others = [Client(sock_path) for _ in range(2)]
    pool = local_pool(sock_path, 1)
    waited: list[float] = []

    def wait() -> None:
        t0 = time.monotonic()
        with pool.connection(timeout=10):
            waited.append(time.monotonic() - t0)

    def report_cheap_costs() -> None:
        for c in others:
            assert c.ensure_connected()
            c.report_cost("r", 0.0001)

    waiter = threading.Thread(target=wait)
    try:
        if costs_first:
            report_cheap_costs()
            deadline = time.monotonic() + 5
            while others[0].inspect("resources")["resources"][0]["fairness_quantum_s"] != 0.05:
                assert time.monotonic() < deadline, "the cheap costs never reached the coordinator"
                time.sleep(0.02)
        with holder(sock_path, 1, 1, "busy", seconds=20, connect_delay=0.05) as proc:
            age = time.monotonic() - proc.connected_at  # type: ignore[attr-defined]
            # Else this test could not tell the two quanta apart.
            assert AUTO_MAX - age > bound + 0.1, f"the holder's connection was {age:.3f}s old already"
            waiter.start()
            if not costs_first:
                time.sleep(0.1)  # queued, and the holder asked, with no cheap cost known
                report_cheap_costs()
            waiter.join(10)
            assert proc.poll() is None
    finally:
        pool.close()
        for c in others:
            c.close()
    assert waited, "the waiter got no connection"
    assert waited[0] <= bound, f"waited {waited[0]:.3f}s: the holder kept its own quantum (the 1 s ceiling)"


def test_a_senseless_quantum_or_cost_is_ignored(start_coordinator: Any, sock_path: str) -> None:
    # A quantum the pool cannot keep to (inf would starve the waiters) falls
    # back to the pool's own; a cost that is not seconds is never sent.
    start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        receiving.dispatch(client, p.Reclaim("r", 1, 0.5))
        assert client.quantum("r") == 0.5
        for bad in (math.inf, math.nan, -1.0, None):
            receiving.dispatch(client, p.Reclaim("r", 1, 0.5))
            receiving.dispatch(client, p.Reclaim("r", 1, bad))
            assert client.quantum("r") is None, bad
        for cost in (math.nan, math.inf, -0.1):
            client.report_cost("r", cost)
        assert client._costs == {}
    finally:
        client.close()


def test_the_no_quantum_of_an_excess_ends_with_what_was_owed(start_coordinator: Any, sock_path: str) -> None:
    # Over a shrunk cap the coordinator asks with a quantum of 0 (due at once).
    # Once nothing is owed, it must not stay this process's figure: a pool
    # checking in while another pool of the process waits would hand the slot
    # over at every checkin. A quantum of 0 while leases are owed is kept.
    start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        receiving.dispatch(client, p.Reclaim("r", 2, 0.0))
        assert client.quantum("r") == 0.0
        receiving.dispatch(client, p.Reclaim("r", 0, None))
        assert client.quantum("r") is None
        receiving.dispatch(client, p.Reclaim("r", 1, 0.3))
        receiving.dispatch(client, p.Reclaim("r", 0, None))
        assert client.quantum("r") == 0.3  # the figure turns are taken with stays
    finally:
        client.close()

def test_a_connection_checked_in_a_moment_ago_is_not_taken_at_once(start_coordinator: Any,
                                                                   sock_path: str) -> None:
    # A reclaim that lands in the microseconds between a busy loop's checkin
    # and its next checkout must not cut the turn short; a connection that
    # then stays idle goes a moment later.
    start_coordinator({"r": 1})
    pool = local_pool(sock_path, 1)
    try:
        with pool.connection():
            pass
        client = pool._client
        assert client is not None
        with client._cond:
            client._owed["r"] = 1  # stands in for a Reclaim frame
        assert giveback.reclaim_idle(pool) == 0
        assert pool.get_size() == 1
        deadline = time.monotonic() + 5
        while pool.get_size():
            assert time.monotonic() < deadline, "the idle connection was never given back"
            time.sleep(0.005)
        assert pool.get_metrics()["reclaimed"] == 1
    finally:
        pool.close()


def test_an_old_connection_checked_in_a_moment_ago_is_not_taken_at_once(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # As above, for a connection past its first turn (its age alone would not
    # keep it): only the moment since its checkin does. The moment is made
    # long (0.3 s) so that a loaded machine cannot stretch the test past it.
    monkeypatch.setattr(giveback, "IDLE_GIVE_BACK", 0.3)
    start_coordinator({"r": 1})
    pool = local_pool(sock_path, 1)
    try:
        with pool.connection():
            pass
        client = pool._client
        assert client is not None
        with pool._lock:
            for wrapper in pool._all.values():
                wrapper.created_at -= 60  # its turn is long over
        with client._cond:
            client._owed["r"] = 1  # stands in for a Reclaim frame
        assert giveback.reclaim_idle(pool) == 0
        assert pool.get_size() == 1
        deadline = time.monotonic() + 10
        while pool.get_size():
            assert time.monotonic() < deadline, "the idle connection was never given back"
            time.sleep(0.005)
        assert pool.get_metrics()["reclaimed"] == 1
    finally:
        pool.close()


def test_max_waiting_fails_fast(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=1, max_waiting=1)})
    a, b, c = Client(sock_path), Client(sock_path), Client(sock_path)
    try:
        a.acquire("r", timeout=1)
        t = threading.Thread(target=lambda: pytest.raises(PoolTimeout, b.acquire, "r", 1.0))
        t.start()
        deadline = time.monotonic() + 5
        while a.inspect("resources")["resources"][0]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(TooManyWaiters, match="max_waiting"):
            c.acquire("r", timeout=5)
        assert time.monotonic() - t0 < 0.5
        t.join(5)
    finally:
        for x in (a, b, c):
            x.close()


def test_max_waiting_ignores_a_pool_queued_behind_its_own_cap(start_coordinator: Any, sock_path: str) -> None:
    # A pool with more threads than max_per_process queues lease requests that
    # only its own leases can serve: they must not count against max_waiting,
    # or another process finding the resource full is refused instead of queued.
    start_coordinator({"r": Resource(max_size=2, max_per_process=1, max_waiting=3)})
    pool = local_pool(sock_path, size=4)
    holder, other = Client(sock_path), Client(sock_path)
    held = pool.acquire(timeout=2)
    errors: list[BaseException] = []
    threads = [start_recording(lambda: pool.release(pool.acquire(timeout=5)), errors) for _ in range(3)]
    try:
        deadline = time.monotonic() + 5
        while other.inspect("resources")["resources"][0]["waiting"] < 3:
            assert time.monotonic() < deadline, "the pool's lease requests never queued"
            time.sleep(0.01)
        first = holder.acquire("r", timeout=1)  # the resource is full now
        threading.Timer(0.3, holder.release, (first,)).start()
        lease = other.acquire("r", timeout=3)  # before: TooManyWaiters at once (3 waiting >= 3)
        other.release(lease)
        pool.release(held)  # the pool's own threads take turns on it
        for t in threads:
            t.join(10)
        assert errors == []
    finally:
        holder.close()
        other.close()
        pool.close()


def test_min_per_process_is_never_reclaimed(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=2, min_per_process=2)})
    with holder(sock_path, 2, 2, "idle"):
        pool = local_pool(sock_path)
        try:
            with pytest.raises(PoolTimeout):
                pool.acquire(timeout=0.5)
        finally:
            pool.close()


def test_max_per_process(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=4, max_per_process=2)})
    c, other = Client(sock_path), Client(sock_path)
    try:
        c.acquire("r", timeout=1)
        c.acquire("r", timeout=1)
        with pytest.raises(PoolTimeout, match="max_per_process"):
            c.acquire("r", timeout=0)
        assert other.acquire("r", timeout=1)  # the cap is per session, not global
    finally:
        c.close()
        other.close()


def test_timeouts_racing_grants_leak_nothing(start_coordinator: Any, sock_path: str) -> None:
    """Waiters that give up at the moment their grant arrives hand it back."""
    start_coordinator({"r": Resource(max_size=2, quarantine_delay=0)})
    clients = [Client(sock_path) for _ in range(4)]
    stop = time.monotonic() + 3
    counts = [0, 0]

    def churn(c: Client, i: int) -> None:
        while time.monotonic() < stop:
            try:
                lease = c.acquire("r", timeout=0.001 * (1 + i))
            except PoolTimeout:
                counts[1] += 1
                continue
            counts[0] += 1
            c.release(lease)

    threads = [threading.Thread(target=churn, args=(c, i)) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert counts[0] > 50 and counts[1] > 0, counts
    for c in clients:
        assert c.held == {}
    probe = Client(sock_path)
    try:
        deadline = time.monotonic() + 5
        while probe.inspect("resources")["resources"][0]["leased"]:
            assert time.monotonic() < deadline, "a lease leaked"
            time.sleep(0.02)
    finally:
        for c in [*clients, probe]:
            c.close()


def _acquire_elsewhere(sock: str, timeout: float = 20) -> subprocess.Popen[str]:
    """Another process asking for one lease; prints how long it waited."""
    code = (f"import time; from sharedpool import Client; c = Client({sock!r}); t = time.monotonic(); "
            f"c.acquire('r', timeout={timeout!r}); print(round(time.monotonic() - t, 3), flush=True)")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _asked_back_by_another(sock: str) -> subprocess.Popen[str]:
    """Another process waits for a lease of "r"; returns once the coordinator
    has asked this one for a lease back."""
    other = _acquire_elsewhere(sock)
    client = Client.for_path(sock)
    deadline = time.monotonic() + 10
    while client.owes("r") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return other


def _waited(proc: subprocess.Popen[str]) -> float:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return float(out.strip())


def test_young_lease_checked_in_idle_is_given_back_at_once(start_coordinator: Any, sock_path: str) -> None:
    """The fairness quantum protects a busy process from churn, not an idle lease."""
    start_coordinator({"r": Resource(max_size=1, fairness_quantum=5.0)})
    pool = local_pool(sock_path, size=1)
    try:
        w = pool.acquire(timeout=5)
        other = _asked_back_by_another(sock_path)
        pool.release(w)  # young (< 5 s), but nobody here needs it: it goes
        assert _waited(other) < 3.0
        assert w.conn.closed
    finally:
        pool.close()


def test_served_waiter_withdraws_its_lease_request(start_coordinator: Any, sock_path: str) -> None:
    """A thread that queued for a new lease but got a checked-in connection
    must not leave its process queued at the coordinator (it would be spared
    from reclaim while holding an idle lease)."""
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2, acquire_timeout=15),
                          resource="r", coordinator=sock_path)
    try:
        first = pool.acquire(timeout=5)
        got: list[Any] = []
        t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=15)))
        t.start()
        client = Client.for_path(sock_path)
        deadline = time.monotonic() + 5
        while client.inspect("resources")["resources"][0]["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        pool.release(first)  # handed to the waiting thread; its lease request is withdrawn
        t.join(5)
        assert got and got[0] is first
        deadline = time.monotonic() + 5
        while client.inspect("resources")["resources"][0]["waiting"]:
            assert time.monotonic() < deadline, "the stale lease request is still queued"
            time.sleep(0.01)
        pool.release(got[0])  # idle now
        other = _acquire_elsewhere(sock_path)
        assert _waited(other) < 3.0  # reclaimed from us at once, not after our 15 s timeout
    finally:
        pool.close()


def test_concurrent_checkins_give_back_only_what_is_owed(start_coordinator: Any, sock_path: str) -> None:
    # Two threads check in old connections while one lease is owed: one closes
    # (slowly), the other must see that give-back under way and keep its own.
    start_coordinator({"r": Resource(max_size=2, fairness_quantum=0)})
    gate = threading.Event()

    class SlowClose(FakeFactory):
        def __call__(self) -> Any:
            conn = super().__call__()
            real = conn.close

            def close() -> None:
                gate.wait(5)
                real()

            conn.close = close  # type: ignore[method-assign]
            return conn

    factory = SlowClose()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2), resource="r", coordinator=sock_path)
    try:
        a, b = pool.acquire(timeout=5), pool.acquire(timeout=5)
        client = Client.for_path(sock_path)
        client._owed["r"] = 1  # as if the coordinator had asked for one lease back
        first = threading.Thread(target=pool.release, args=(a,))
        first.start()
        deadline = time.monotonic() + 5
        while pool._giving != 1:
            assert time.monotonic() < deadline, "the first checkin never started giving back"
            time.sleep(0.005)
        pool.release(b)  # while the first give-back is still closing
        gate.set()
        first.join(5)
        assert len(factory.open) == 1, f"gave back {2 - len(factory.open)} with 1 owed"
        assert pool.get_stats()["leases_held"] == 1 and pool._giving == 0
        assert client.owes("r") == 0
    finally:
        gate.set()
        pool.close()


def test_a_process_owes_nothing_once_what_was_asked_is_given_back(
        start_coordinator: Any, sock_path: str) -> None:
    # A shrink asks two processes for leases; as their releases cross the
    # coordinator's new counts, one was left owing a lease nobody asked for,
    # and its next connection was closed at checkin with nobody waiting.
    start_coordinator({"r": Resource(max_size=6, fairness_quantum=0.05)})
    admin, other = Client(sock_path, name="admin"), Client(sock_path, name="other")
    factory = FakeFactory()
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=6, test_on_acquire=False),
                          resource="r", coordinator=sock_path)
    try:
        mine = [pool.acquire(timeout=5) for _ in range(3)]
        theirs = [other.acquire("r", 5) for _ in range(3)]
        admin.admin("resize", resource="r", max_size=1)
        time.sleep(0.4)  # asked, and past the quantum
        for w in mine:
            pool.release(w)
        for lease in theirs:
            other.release(lease)
        admin.admin("resize", resource="r", max_size=6)
        deadline = time.monotonic() + 5
        while pool._client is not None and pool._client.owes("r") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool._client is not None and pool._client.owes("r") == 0
        made = len(factory.made)
        pool.release(pool.acquire(timeout=5))
        time.sleep(0.1)  # an owed connection is looked at again after 10 ms
        assert pool.get_size() == 1 and not any(c.closed for c in factory.made[made:])
    finally:
        pool.close()
        other.close()
        admin.close()


@pytest.mark.parametrize("integration", ["sqlalchemy", "psycopg_pool", "redis"])
def test_young_lease_of_an_integration_checked_in_idle_is_given_back_at_once(
        request: pytest.FixtureRequest, start_coordinator: Any, sock_path: str, integration: str) -> None:
    """As the local pool's above: an integration's connection owed back but too
    young to pay at its checkin, then idle, goes once it has sat idle a moment,
    not at the quantum's end (it kept a waiting gunicorn gthread worker waiting
    up to 1 s per hand-off: 10 requests/s where one worker alone served 128)."""
    pg = "" if integration == "redis" else request.getfixturevalue("pg")
    start_coordinator({"r": Resource(max_size=1, fairness_quantum=5.0)})
    if integration == "redis":
        from sharedpool.contrib.redis import BlockingConnectionPool
        rpool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=request.getfixturevalue(
            "redis_name"), max_connections=1, timeout=10, resource="r", coordinator=sock_path)
        checkout, close = rpool.get_connection, rpool.disconnect
    elif integration == "sqlalchemy":
        from sharedpool.contrib.sqlalchemy import create_engine
        engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", resource="r",
                               coordinator=sock_path, pool_size=1, max_overflow=0)
        checkout, close = engine.raw_connection, engine.dispose
    else:
        from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool
        pool = PsycopgPool(pg, resource="r", coordinator=sock_path, min_size=0, max_size=1, open=True)
        checkout, close = pool.getconn, pool.close
    try:
        conn = checkout()
        other = _asked_back_by_another(sock_path)
        if integration == "sqlalchemy":
            conn.close()  # checked in: young (< 5 s), and nobody here wants it
        elif integration == "redis":
            rpool.release(conn)
        else:
            pool.putconn(conn)
        assert _waited(other) < 3.0
    finally:
        close()


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_a_new_round_of_asking_looks_at_a_young_idle_lease_at_once(
        request: pytest.FixtureRequest, start_coordinator: Any, sock_path: str, kind: str) -> None:
    """A round of asking that ended with a give-back at checkin (a busy holder
    past the quantum) left its look at the lease doubled up to the quantum and
    often still armed: in the next round, a lease checked in young and then
    idle sat that long while a waiter elsewhere waited (seen: 0.29-0.39 s with
    a 2 s quantum, 0.07 s in the round after). Here the last round left its
    look a quantum (5 s) away."""
    start_coordinator({"r": Resource(max_size=1, fairness_quantum=5.0)})
    if kind == "redis":
        from sharedpool.contrib.redis import BlockingConnectionPool
        rpool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=request.getfixturevalue(
            "redis_name"), max_connections=1, timeout=10, resource="r", coordinator=sock_path)
        checkout, checkin, close = rpool.get_connection, rpool.release, rpool.disconnect
        state: Any = rpool.lease_book
        state._recheck_delay = 5.0  # doubled in the last round, and no look since
    else:
        pool = local_pool(sock_path, size=1)
        checkout, checkin, close = (lambda: pool.acquire(timeout=5)), pool.release, pool.close
        pool._recheck_delay = 5.0
    try:
        conn = checkout()
        other = _asked_back_by_another(sock_path)
        checkin(conn)  # young (< 5 s), and nobody here wants it: it goes in a moment
        assert _waited(other) < 3.0
    finally:
        close()


_BURSTY = """
import sys, time
from sharedpool import ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory
kind, sock, name, t0 = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
if kind == "redis":
    from sharedpool.contrib.redis import BlockingConnectionPool
    pool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=name, max_connections=1,
                                  timeout=10, resource="r", coordinator=sock)
    def one():
        pool.release(pool.get_connection())
    leases = lambda: pool.lease_book.stats()["leases_acquired"]
else:
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r", coordinator=sock)
    def one():
        pool.release(pool.acquire(timeout=10))
    leases = lambda: pool.get_stats()["connections_num"]
while time.time() < t0:
    time.sleep(0.001)
while time.time() < t0 + 1.5:  # bursts of 5 ms, 20 ms apart
    end = time.time() + 0.005
    while time.time() < end:
        one()
    time.sleep(0.02)
print(leases(), flush=True)
"""


@pytest.mark.parametrize("kind", ["local", "redis"])
def test_bursty_processes_at_the_cap_do_not_pass_the_slot_at_every_idle_gap(
        request: pytest.FixtureRequest, start_coordinator: Any, sock_path: str, kind: str) -> None:
    """Two processes at a cap of 1, each in 5 ms bursts 20 ms apart: an idle
    owed lease went after 10 ms idle however young, so the slot moved at every
    gap (with PostgreSQL: 59 reconnects/s and 59 queries/s, where 1 s turns
    gave 543 queries/s). A slot that moved now serves a first turn
    (giveback.min_turn: 0.1 s of this 1.2 s quantum) before it goes for sitting
    idle: here ~100 moves in 1.5 s before, ~15 now."""
    name = request.getfixturevalue("redis_name") if kind == "redis" else ""
    start_coordinator({"r": Resource(max_size=1, fairness_quantum=1.2)})
    t0 = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _BURSTY, kind, sock_path, name, str(t0)],
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        moves = sum(int(proc.communicate(timeout=30)[0].strip()) for proc in procs)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs)
    assert moves <= 40, f"the slot moved {moves} times in 1.5 s"


def test_a_long_quantum_set_by_hand_keeps_an_idle_slot_no_more_than_the_auto_ceilings_turn() -> None:
    # The first turn is for bursty processes; a 30 s quantum is for busy
    # holders, and must not keep an idle young slot 2.5 s from a waiter.
    from sharedpool.giveback import min_turn

    assert min_turn(0) == 0
    assert min_turn(0.6) == pytest.approx(0.05)
    assert min_turn(1.0) == min_turn(30.0) == pytest.approx(1 / 12)


_SLOT = """
import sys, time
from sharedpool import ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory
sock, late = sys.argv[1], sys.argv[2] == "late"
def pool(res):
    return ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource=res, coordinator=sock)
keep, r = pool("k"), pool("r")
keep.release(keep.acquire(timeout=5))  # the session starts here (the late one's first)
if not late:
    r.release(r.acquire(timeout=5))  # idle from now on: old when A takes its own
print("ready", flush=True)
if late:
    sys.stdin.readline()
    r.release(r.acquire(timeout=5))  # idle, and young (in its first turn) from here on
time.sleep(20)
"""


def test_an_old_idle_slot_goes_before_one_in_its_first_turn(start_coordinator: Any, sock_path: str) -> None:
    """Cap 2: process A (the older session) took its slot a moment ago (both
    reported idle, A's 30-50 ms old), C a second ago. The coordinator asked the first session with an
    idle lease, A, which keeps a slot in its first turn: the waiter waited
    35-50 ms for it while C's idle slot sat (3-6 ms before the first turn,
    and now). The holder of the oldest idle lease is asked first."""
    start_coordinator({"r": Resource(max_size=2, fairness_quantum=1.0), "k": 2})
    procs: list[subprocess.Popen[str]] = []
    try:
        for late in ("late", "early"):
            procs.append(subprocess.Popen([sys.executable, "-c", _SLOT, sock_path, late],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
            assert procs[-1].stdout is not None and procs[-1].stdout.readline().strip() == "ready"
        assert procs[0].stdin is not None
        procs[0].stdin.write("go\n")
        procs[0].stdin.flush()
        client = Client.for_path(sock_path)
        deadline = time.time() + 5
        while time.time() < deadline and not (
                (rows := client.inspect("leases", resource="r")["leases"])
                and len(rows) == 2 and all(row["state"] == "idle" and row["age_s"] > 0.01 for row in rows)):
            time.sleep(0.002)  # until A's lease is reported idle (and past 10 ms), well within its 83 ms
        pool = local_pool(sock_path, size=1)
        try:
            pool.release(pool.acquire(timeout=5))
            held = [held_by(client, proc.pid) for proc in procs]
            # A: k and r; C: k. Failed once (cause not found): the listings say what went otherwise.
            assert held == [2, 1], (held, rows, client.inspect("leases", resource="r")["leases"])
        finally:
            pool.close()
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


def test_an_idle_slot_being_validated_when_asked_for_goes_once_checked(start_coordinator: Any,
                                                                      sock_path: str) -> None:
    # Before: the reclaim found nothing idle (maintenance had the one idle
    # connection out for validation); parked back, it stayed, owed, and the
    # other process's acquire timed out beside it (nothing asks again; a fixed
    # quantum: under "auto", its first figure re-sent the ask by chance).
    start_coordinator({"r": Resource(max_size=1, fairness_quantum=0.05)})
    hold, checking, go = threading.Event(), threading.Event(), threading.Event()

    def check(conn: Any) -> bool:
        if hold.is_set():
            checking.set()
            go.wait(10)
        return True

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, validation_interval=0.05),
                          resource="r", coordinator=sock_path, check=check)
    other = Client(sock_path)
    got: list[Any] = []
    errors: list[BaseException] = []
    try:
        pool.release(pool.acquire(timeout=5))
        hold.set()
        assert checking.wait(5), "maintenance never validated the idle connection"
        waiter = start_recording(lambda: got.append(other.acquire("r", timeout=5)), errors)
        client = pool._client
        assert client is not None
        deadline = time.monotonic() + 5
        while not client.owes("r"):  # asked while the connection is out
            assert time.monotonic() < deadline, "the pool was never asked"
            time.sleep(0.01)
        hold.clear()
        go.set()
        waiter.join(10)
        assert not errors and len(got) == 1, errors
        other.release(got[0])
    finally:
        go.set()
        pool.close()
        other.close()
