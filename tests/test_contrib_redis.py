"""sharedpool.contrib.redis on a real Redis: the cap seen from CLIENT LIST
across forked workers, fork safety, reclaim, errors and lazy connects."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from proc_helpers import (
    HoldingServer,
    collect_holding,
    collect_inside_a_put,
    hammer,
    held_once_confirmed,
    leased,
    other_sessions,
    reclaimed_at_release,
    run_forked,
    run_in_child,
    sharedpool_logs_queued_gc_off,
    wait_leased,
    wait_no_other_sessions,
)
from servers import wait_for

from sharedpool import Client, PoolTimeout, Resource
from sharedpool.contrib.redis import BlockingConnectionPool, LeaseTimeout

HOST, PORT = "127.0.0.1", 6379


def clients_named(name: str) -> int:
    r = redis.Redis(host=HOST, port=PORT)
    try:
        return sum(1 for c in r.client_list() if c.get("name") == name)
    finally:
        r.close()


class ClientSampler:
    """Counts this test's Redis clients (CLIENT LIST, by name) every few ms, in a thread."""

    def __init__(self, name: str) -> None:
        self.name, self.peak, self.samples = name, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        r = redis.Redis(host=HOST, port=PORT)
        while not self._stop.is_set():
            n = sum(1 for c in r.client_list() if c.get("name") == self.name)
            self.peak, self.samples = max(self.peak, n), self.samples + 1
            self._stop.wait(0.002)
        r.close()

    def __enter__(self) -> ClientSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def make_pool(sock: str, name: str, **kw: Any) -> BlockingConnectionPool:
    kw.setdefault("timeout", 20)
    return BlockingConnectionPool(host=HOST, port=PORT, client_name=name, resource="redis",
                                  coordinator=sock, **kw)


def _hammer(pool: BlockingConnectionPool, name: str, threads: int, iterations: int) -> dict[str, Any]:
    # The pool was made in the parent: redis-py resets it here, and so do the leases.
    r = redis.Redis(connection_pool=pool)
    key = f"{name}:{os.getpid()}"

    def ops() -> None:
        r.incr(key)
        with r.pipeline() as pipe:
            pipe.get(key)
            pipe.execute()

    done, errors = hammer(threads, iterations, ops)
    stats = pool.lease_stats()
    count = int(r.get(key) or 0)
    pool.disconnect()
    return {"done": done, "count": count, "errors": errors, "stats": stats,
            "held_after": held_once_confirmed(lambda: pool.lease_stats()["leases_held"])}


def test_forked_workers_never_exceed_the_cap(start_coordinator: Any, sock_path: str,
                                             redis_name: str) -> None:
    start_coordinator({"redis": Resource(max_size=3, acquire_timeout=20, fairness_quantum=0.25)})
    pool = make_pool(sock_path, redis_name, max_connections=4)  # 5 x 4 wanted, cap 3
    with ClientSampler(redis_name) as sampler:
        results = run_forked(_hammer, pool, redis_name, 4, 100, n=5)
    assert all(not r.get("error") and not r["errors"] for r in results), results
    assert sum(r["done"] for r in results) == 5 * 4 * 100
    assert all(r["count"] == 4 * 100 for r in results)
    assert all(r["held_after"] == 0 for r in results)
    assert sampler.samples > 50
    assert sampler.peak <= 3, f"Redis saw {sampler.peak} clients with a cap of 3"
    assert sampler.peak == 3, "the cap was never reached: the test proves nothing"
    assert wait_leased(sock_path, 0) == 0
    assert clients_named(redis_name) == 0


def _child_ping(pool: BlockingConnectionPool) -> dict[str, Any]:
    r = redis.Redis(connection_pool=pool)
    client_id = r.client_id()
    pool.disconnect()  # the child's own connection only
    return {"id": client_id}


def test_fork_child_opens_its_own_and_leaves_the_parents_alone(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    start_coordinator({"redis": Resource(max_size=3)})
    pool = make_pool(sock_path, redis_name, max_connections=2)
    r = redis.Redis(connection_pool=pool)
    parent = r.client_id()  # connected and idle in the pool when we fork
    [child] = run_forked(_child_ping, pool)
    assert "error" not in child, child
    assert child["id"] != parent
    assert wait_leased(sock_path, 1) == 1  # the parent's lease, not released by the child
    assert r.client_id() == parent  # the parent's socket was not shut down
    pool.disconnect()
    assert leased(sock_path) == 0 and clients_named(redis_name) == 0


def _child_needs_one(sock: str, name: str) -> dict[str, Any]:
    pool = make_pool(sock, name, max_connections=1, timeout=10)
    t0 = time.monotonic()
    redis.Redis(connection_pool=pool).ping()
    waited = time.monotonic() - t0
    pool.disconnect()
    return {"waited": waited}


def test_idle_connections_are_reclaimed_for_a_waiting_process(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    start_coordinator({"redis": Resource(max_size=2, acquire_timeout=10)})
    pool = make_pool(sock_path, redis_name, max_connections=2)
    a, b = pool.get_connection(), pool.get_connection()
    pool.release(a)
    pool.release(b)  # two idle connections hold the whole cap
    [child] = run_forked(_child_needs_one, sock_path, redis_name)
    assert "error" not in child, child
    assert child["waited"] < 5, "the idle connection was not reclaimed"
    assert pool.lease_stats()["leases_reclaimed"] >= 1
    assert redis.Redis(connection_pool=pool).ping()  # reconnects (under a lease) when needed
    pool.disconnect()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


def test_a_process_alone_does_not_reclaim_from_itself(start_coordinator: Any, sock_path: str,
                                                     redis_name: str) -> None:
    """4 threads on a cap of 2, connections idle between commands: a thread
    that finds both out queues for a lease and is served by a checkin a moment
    later. The coordinator, going by a report from when both were idle, asked
    this process for an idle one back: a close and a reconnect for nobody, 12
    to 20 times in 3 s (nobody else waited)."""
    start_coordinator({"redis": Resource(max_size=2, acquire_timeout=20)})
    pool = make_pool(sock_path, redis_name, max_connections=4)
    r = redis.Redis(connection_pool=pool)
    end = time.monotonic() + 2.0

    def ops() -> None:
        while time.monotonic() < end:
            r.get(redis_name)
            time.sleep(0.002)  # idle in the pool meanwhile

    threads = [threading.Thread(target=ops) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = pool.lease_stats()
    pool.disconnect()
    assert stats["lease_waits_served_locally"] > 10, f"no thread ever waited: proves nothing ({stats})"
    # A report may still land in the moment a wait is queued: a rare one is no churn.
    assert stats["leases_reclaimed"] <= 3, stats
    assert wait_leased(sock_path, 0) == 0


def test_a_pool_sitting_on_idle_connections_gives_one_to_a_sibling_pool(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """Two pools of one process on one resource: the one sitting on the cap,
    idle, gives a connection back to the other's wait (the process is asked
    for its idle leases, though it waits itself)."""
    start_coordinator({"redis": Resource(max_size=2, acquire_timeout=10)})
    first = make_pool(sock_path, redis_name, max_connections=2)
    second = make_pool(sock_path, redis_name, max_connections=2)
    try:
        a, b = first.get_connection(), first.get_connection()
        first.release(a)
        first.release(b)
        t0 = time.monotonic()
        assert redis.Redis(connection_pool=second).ping()
        waited = time.monotonic() - t0
        assert waited < 5, f"the sibling pool waited {waited:.2f}s"
        assert first.lease_stats()["leases_reclaimed"] == 1
    finally:
        second.disconnect()
        first.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_no_lease_in_time_raises_and_leaks_nothing(start_coordinator: Any, sock_path: str,
                                                   redis_name: str) -> None:
    start_coordinator({"redis": Resource(max_size=1)})
    holder = make_pool(sock_path, redis_name, max_connections=1)
    held = holder.get_connection()  # in use: cannot be reclaimed
    pool = make_pool(sock_path, redis_name, max_connections=1, lease_timeout=0.3)
    with pytest.raises(LeaseTimeout) as caught:
        redis.Redis(connection_pool=pool).ping()
    # What `except redis.RedisError` (redis-py's own exhaustion error) and
    # `except sharedpool.PoolTimeout` both catch.
    assert isinstance(caught.value, redis.ConnectionError) and isinstance(caught.value, PoolTimeout)
    assert pool.lease_stats()["lease_timeouts"] == 1 and pool.lease_stats()["leases_held"] == 0
    holder.release(held)
    holder.disconnect()  # same process: its session waits, so reclaim would not ask it
    assert redis.Redis(connection_pool=pool).ping()  # the failed connect left nothing behind
    pool.disconnect()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


def test_redis_py_retries_do_not_wait_for_a_lease_again(start_coordinator: Any, sock_path: str,
                                                        redis_name: str) -> None:
    """A Retry given to the pool retries a connect that raised a ConnectionError,
    LeaseTimeout included: its attempts share one lease timeout, as redis-py's
    exhausted pool raises after its ``timeout`` whatever the Retry says."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    start_coordinator({"redis": Resource(max_size=1, acquire_timeout=0.5)})
    holder = make_pool(sock_path, redis_name, max_connections=1)
    held = holder.get_connection()
    # timeout=None: the resource's acquire_timeout; retries=-1: for ever (was a
    # loop of acquires that did not wait once the first had timed out)
    pools = [make_pool(sock_path, redis_name, max_connections=1, timeout=timeout, retry=Retry(NoBackoff(), n))
             for timeout, n in ((0.5, 3), (None, 3), (0.5, -1))]
    try:
        for pool in pools:
            t0 = time.monotonic()
            with pytest.raises(LeaseTimeout):
                redis.Redis(connection_pool=pool).ping()
            assert time.monotonic() - t0 < 1.5  # not 4 x 0.5 s
            assert pool.lease_stats()["lease_timeouts"] == 1  # the wait is spent: not asked again
        holder.release(held)
        holder.disconnect()
        assert redis.Redis(connection_pool=pools[0]).ping()  # the next connect waits in full again
    finally:
        for pool in pools:
            pool.disconnect()
        holder.disconnect()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


def _until_someone_waits(sock: str) -> None:
    """Until the coordinator shows a waiter (5 s at most)."""
    watch = Client(sock)
    try:
        deadline = time.monotonic() + 5
        while watch.inspect("resources")["resources"][0]["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watch.close()


def _kill_clients(name: str, cmd: str | None = None) -> None:
    """CLIENT KILL our connections named ``name`` (those running ``cmd``, if given)."""
    admin = redis.Redis(host=HOST, port=PORT)
    try:
        for c in admin.client_list():
            if c.get("name") == name and cmd in (None, c.get("cmd")):
                admin.client_kill_filter(_id=c["id"])
    finally:
        admin.close()


@contextlib.contextmanager
def _retrying_client_and_a_rival(sock: str, name: str, retries: int) -> Iterator[
        tuple[BlockingConnectionPool, redis.Redis, Callable[[], None], list[Any]]]:
    """A one-connection client whose pool retries ConnectionErrors ``retries``
    times with a 0.5 s lease wait, on a cap of 1 (the coordinator started by
    the caller), and ``queue()``: another pool waits for that one lease, its
    connection in the list yielded once it has it. All closed at the end."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    pool = make_pool(sock, name, max_connections=1, timeout=0.5,
                     retry=Retry(NoBackoff(), retries), retry_on_error=[redis.ConnectionError])
    other = make_pool(sock, name, max_connections=1, timeout=10)
    r = redis.Redis(connection_pool=pool, single_connection_client=True)
    got: list[Any] = []

    def queue() -> None:
        threading.Thread(target=lambda: got.append(other.get_connection()), daemon=True).start()
        _until_someone_waits(sock)

    try:
        yield pool, r, queue, got
    finally:
        r.close()
        for conn in got:
            other.release(conn)
        other.disconnect()
        pool.disconnect()


@pytest.mark.parametrize("retries", [3, -1])
def test_a_command_whose_connection_dropped_waits_for_a_lease_once(
        start_coordinator: Any, sock_path: str, redis_name: str, retries: int) -> None:
    """A command whose connection dropped reconnects inside the command's own
    retries (not through connect()): each attempt waited the whole lease
    timeout again (3 x 0.5 s with 3 retries; with retries=-1, until a lease came)."""
    start_coordinator({"redis": Resource(max_size=1, acquire_timeout=5)})
    with _retrying_client_and_a_rival(sock_path, redis_name, retries) as (pool, r, queue, got):
        assert r.ping()
        # Another process queues for the one lease, then our connection drops:
        # its lease goes back to that waiter.
        queue()
        _kill_clients(redis_name)
        t0 = time.monotonic()
        with pytest.raises(LeaseTimeout):
            r.ping()
        assert time.monotonic() - t0 < 1.2  # one 0.5 s wait, not one per attempt
        assert pool.lease_stats()["lease_timeouts"] == 1
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got, "the other pool never got the lease"
    assert wait_leased(sock_path, 0) == 0


def test_a_command_that_connected_lazily_waits_again_when_its_connection_drops(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """The wait of a command's lazy connect (its connection was closed since
    the last one) ended with that connect: a drop 1 s into the command found
    the shared wait spent and raised LeaseTimeout at once, without waiting."""
    start_coordinator({"redis": Resource(max_size=1, acquire_timeout=5)})
    killed: list[float] = []
    with _retrying_client_and_a_rival(sock_path, redis_name, 3) as (_, r, queue, _got):

        def drop_while_another_waits() -> None:
            time.sleep(1.0)  # BLPOP under way
            queue()
            _kill_clients(redis_name, "blpop")
            killed.append(time.monotonic())

        assert r.ping()
        assert r.connection is not None
        r.connection.disconnect()  # the next command connects lazily, inside its retries
        dropper = threading.Thread(target=drop_while_another_waits, daemon=True)
        dropper.start()
        with pytest.raises(LeaseTimeout):
            r.blpop([f"{redis_name}:none"], 4)
        assert killed and time.monotonic() - killed[0] > 0.4  # a whole 0.5 s wait
        dropper.join(10)
    assert wait_leased(sock_path, 0) == 0


def test_a_refused_wait_is_a_redis_connection_error(start_coordinator: Any, sock_path: str,
                                                   redis_name: str) -> None:
    from sharedpool import TooManyWaiters
    from sharedpool.contrib.redis import LeaseRefused

    start_coordinator({"redis": Resource(max_size=1, max_waiting=0)})
    holder = make_pool(sock_path, redis_name, max_connections=1)
    held = holder.get_connection()
    pool = make_pool(sock_path, redis_name, max_connections=1)
    try:
        with pytest.raises(LeaseRefused) as caught:
            redis.Redis(connection_pool=pool).ping()
        assert isinstance(caught.value, redis.ConnectionError)
        assert isinstance(caught.value, TooManyWaiters)
    finally:
        holder.release(held)
        holder.disconnect()
        pool.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_reset_gives_back_the_idle_connections_leases(start_coordinator: Any, sock_path: str,
                                                      redis_name: str) -> None:
    """redis-py's reset() forgets the pool's connections: the idle ones kept
    their sockets and leases (the lease book still tracked them), so the pool
    could not connect again until the process exited."""
    start_coordinator({"redis": 3})
    pool = make_pool(sock_path, redis_name, max_connections=3, timeout=2)
    try:
        conns = [pool.get_connection() for _ in range(3)]
        for conn in conns:
            conn.send_command("PING")
            conn.read_response()
            pool.release(conn)
        assert clients_named(redis_name) == 3
        pool.reset()
        assert clients_named(redis_name) == 0
        assert pool.lease_stats()["leases_held"] == 0
        assert redis.Redis(connection_pool=pool).ping()  # a fresh connection, a fresh lease
        # One checked out across a reset is closed when it comes back (redis-py
        # would drop it as it is, socket and lease with it).
        out = pool.get_connection()
        out.send_command("PING")
        out.read_response()
        pool.reset()
        pool.release(out)
        assert pool.lease_stats()["leases_held"] == 0 and clients_named(redis_name) == 0
        assert redis.Redis(connection_pool=pool).ping()
    finally:
        pool.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_a_signal_as_the_lease_wait_starts_leaks_no_lease(start_coordinator: Any, sock_path: str,
                                                          redis_name: str) -> None:
    """A signal handler's exception inside Thread.start() (it waits for the new
    thread: handlers run there) as a checkout starts waiting for its lease: the
    acquire already sent is withdrawn, or its lease given back. It was held for
    good, with no connection under it."""
    import sys

    from sharedpool.contrib import _acquiring

    start_coordinator({"redis": 2})
    pool = make_pool(sock_path, redis_name, max_connections=2, timeout=2)
    client = redis.Redis(connection_pool=pool)
    waiting_code = _acquiring._Acquiring._lease_or_local.__code__
    fired = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if (event == "call" and frame.f_code is threading.Thread.start.__code__ and not fired
                and frame.f_back is not None and frame.f_back.f_code is waiting_code):
            fired.append(True)
            raise KeyboardInterrupt
        return None

    try:
        sys.settrace(tracer)
        try:
            with pytest.raises(KeyboardInterrupt):
                client.ping()
        finally:
            sys.settrace(None)
        assert fired
        assert wait_leased(sock_path, 0) == 0
        assert client.ping()  # and the pool goes on
    finally:
        pool.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_a_pool_dropped_without_disconnect_gives_its_leases_back(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """A pool garbage-collected without disconnect() (made per task, say): its
    connection's lease stayed held until the process exited, so with a cap of
    1 the second such pool waited out its timeout. Each lease now goes back
    once Redis has dropped the client (CLIENT LIST never shows two)."""
    import gc

    start_coordinator({"redis": Resource(max_size=1)})
    with ClientSampler(redis_name) as sampler:
        for i in range(5):
            pool = make_pool(sock_path, redis_name, max_connections=1, timeout=3)
            r = redis.Redis(connection_pool=pool)
            assert r.incr(f"{redis_name}:n") == i + 1  # within 3 s: the last pool's lease came back
            del pool, r
            gc.collect()  # redis-py's connections refer to their pool: a cycle
    assert sampler.peak == 1
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


def test_a_pool_dropped_without_disconnect_says_it_is_sharedpools(
        start_coordinator: Any, sock_path: str, redis_name: str, caplog: Any) -> None:
    """Its warning read "'redis': a pool was garbage-collected without
    disconnect()...": in gunicorn's and celery's log formats (no logger name)
    nothing said whose; the same warning for SQLAlchemy and psycopg pools
    leads with 'sharedpool: '. (Said once per resource at warning, then at debug.)"""
    caplog.set_level(logging.DEBUG, logger="sharedpool")
    start_coordinator({"redis": Resource(max_size=1)})
    pool = make_pool(sock_path, redis_name, max_connections=1, timeout=3)
    r = redis.Redis(connection_pool=pool)
    assert r.ping()
    del pool, r
    gc.collect()  # redis-py's connections refer to their pool: a cycle

    def said() -> list[str]:
        return [m for m in (rec.getMessage() for rec in list(caplog.records))
                if "garbage-collected without disconnect()" in m]

    wait_for(lambda: said(), 10, "the collected pool's log line")
    assert said()[0].startswith("sharedpool: 'redis': a pool was garbage-collected"), said()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


def test_a_connection_kept_after_its_pool_was_dropped_keeps_its_lease(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """With RESP2 a connection does not refer to its pool: the pool can go while
    the connection is still in use. It keeps working and keeps its lease (I1)
    until it is collected too."""
    import gc

    start_coordinator({"redis": Resource(max_size=1)})
    pool = make_pool(sock_path, redis_name, max_connections=1, protocol=2)
    conn = pool.get_connection()
    del pool
    gc.collect()
    conn.send_command("PING")
    assert conn.read_response() in (b"PONG", "PONG")
    other = make_pool(sock_path, redis_name, max_connections=1, timeout=0.3)
    with pytest.raises(LeaseTimeout):
        redis.Redis(connection_pool=other).ping()
    del conn
    gc.collect()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0
    other.timeout = 5
    assert redis.Redis(connection_pool=other).ping()
    other.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_a_connection_kept_after_its_pool_was_dropped_does_not_reconnect_unleased(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """Its disconnect() (redis-py's, on an error before a retry) gives the lease
    back; a reconnect then would be a socket under no lease: with a cap of 1,
    two Redis clients. It fails instead."""
    import gc

    start_coordinator({"redis": Resource(max_size=1)})
    pool = make_pool(sock_path, redis_name, max_connections=1, protocol=2)
    conn = pool.get_connection()
    del pool
    gc.collect()
    conn.disconnect()
    assert wait_leased(sock_path, 0) == 0
    other = make_pool(sock_path, redis_name, max_connections=1, timeout=5)
    try:
        assert redis.Redis(connection_pool=other).ping()
        with pytest.raises(redis.ConnectionError, match="garbage-collected"):
            conn.send_command("PING")
        assert clients_named(redis_name) == 1
    finally:
        other.disconnect()
    assert wait_leased(sock_path, 0) == 0


@pytest.mark.parametrize("hot", ["first", "second"])
def test_revoked_idle_connections_are_the_ones_closed(start_coordinator: Any, sock_path: str,
                                                       redis_name: str, hot: str) -> None:
    """A restart without the resource revokes both leases of two idle
    connections. Each revoke closed "the coldest idle one": when that was the
    other (still leased) connection, the second revoke found nothing left to
    close and the first revoked connection stayed open, counted nowhere."""
    first = start_coordinator({"redis": 2})
    pool = make_pool(sock_path, redis_name, max_connections=2, timeout=5)
    try:
        c1, c2 = pool.get_connection(), pool.get_connection()
        for c in (c1, c2):
            c.send_command("PING")
            c.read_response()
        for c in ((c2, c1) if hot == "first" else (c1, c2)):
            pool.release(c)
        assert clients_named(redis_name) == 2
        first.kill()
        start_coordinator({"other": 2})  # "redis" left the configuration
        deadline = time.monotonic() + 10
        while clients_named(redis_name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert clients_named(redis_name) == 0, "a revoked idle connection stayed open"
        assert pool.lease_book._revoked == 0
    finally:
        pool.disconnect()


def test_a_script_that_never_disconnects_exits(start_coordinator: Any, sock_path: str,
                                               redis_name: str) -> None:
    """Most redis-py programs never call disconnect(): at interpreter exit the
    pool and its connections are collected, and the connection's __del__ gave
    its lease back from a new thread. Thread.start() then waits for a thread
    that never runs: the program hung at exit, forever (Python 3.11), after a
    warning that it had done something wrong."""
    import subprocess
    import sys
    import textwrap

    start_coordinator({"redis": 2})
    code = textwrap.dedent(f"""
        import redis
        from sharedpool.contrib.redis import BlockingConnectionPool
        pool = BlockingConnectionPool(host={HOST!r}, port={PORT}, client_name={redis_name!r},
                                      resource="redis", coordinator={sock_path!r})
        print(redis.Redis(connection_pool=pool).ping(), flush=True)
    """)
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the program hung at its exit")
    assert (out.returncode, out.stdout.strip()) == (0, "True"), out.stderr
    assert "garbage-collected" not in out.stderr, out.stderr
    assert wait_leased(sock_path, 0) == 0


class _Redis60Connection(redis.connection.Connection):
    """A connection with the API of redis-py 6.0-7.x where it differs from 8's:
    connect_check_health() takes check_health alone (< 6.3) and connect() calls
    it so; no is_connected (< 8.0). (should_reconnect(), < 7.0, cannot be taken
    away: redis-py 8's own pool calls it.)"""

    @property
    def is_connected(self) -> bool:
        raise AttributeError("is_connected")

    def connect(self) -> None:
        self.connect_check_health(check_health=True)

    def connect_check_health(self, check_health: bool = True) -> None:  # type: ignore[override]
        super().connect_check_health(check_health)


def test_a_connection_class_with_an_older_redis_py_api_is_leased(start_coordinator: Any, sock_path: str,
                                                                 redis_name: str) -> None:
    # redis>=6.0 is what the redis extra admits: its connections were called with
    # 8's arguments (TypeError at the first command) and is_connected (AttributeError).
    start_coordinator({"redis": 1})
    pool = make_pool(sock_path, redis_name, max_connections=2, connection_class=_Redis60Connection)
    r = redis.Redis(connection_pool=pool)
    try:
        for i in range(3):
            assert r.set(f"{redis_name}:k", i) and int(r.get(f"{redis_name}:k") or -1) == i
        assert pool.lease_stats()["leases_held"] == 1 and leased(sock_path) == 1
        assert clients_named(redis_name) == 1
        r.delete(f"{redis_name}:k")
    finally:
        pool.disconnect()
    assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0


class _SlowToDropProxy:
    """A TCP proxy to Redis that drops a client only ``delay`` seconds after
    the client's FIN (a server slow to let go): a lease given back before the
    server side closed shows as leased < ``open`` for that long."""

    def __init__(self, delay: float) -> None:
        import socket

        self.delay, self.open = delay, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection((HOST, PORT))
            with self._lock:
                self.open += 1
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
            threading.Thread(target=self._serve, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)

    def _serve(self, client: Any, upstream: Any) -> None:
        self._pipe(client, upstream)  # until the client's FIN
        time.sleep(self.delay)
        with self._lock:
            self.open -= 1
        client.close()
        upstream.close()

    def close(self) -> None:
        self._listener.close()


def test_pools_dropped_without_disconnect_give_leases_back_only_once_the_server_let_go(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """A connection collected with its pool is closed from its own __del__, in
    the garbage cycle that also holds its socket and the kept dup: either one's
    finalizer could close it under the orphan close's thread, which then had
    nothing to watch and gave the lease back at once (about 1 in 5 orphan
    closes), while the server still held the client. The orphan close now dups
    the socket in the finalizer itself, before any of that cycle's others run."""
    import gc

    start_coordinator({"redis": Resource(max_size=100)})
    # The proxy holds each dropped client this long: the 24 must all still be
    # held when counted, however slowly a loaded machine makes the 8 rounds.
    proxy = _SlowToDropProxy(delay=8.0)
    try:
        for _ in range(8):
            pool = BlockingConnectionPool(host="127.0.0.1", port=proxy.port, client_name=redis_name,
                                          resource="redis", coordinator=sock_path, max_connections=3)
            conns = [pool.get_connection() for _ in range(3)]
            for conn in conns:
                conn.send_command("PING")
                conn.read_response()
                pool.release(conn)
            del pool, conns, conn
            gc.collect()  # redis-py's connections refer to their pool: a cycle
        time.sleep(0.3)  # the orphan closes have sent their FINs and wait for the proxy
        held, still_open = leased(sock_path), proxy.open  # in this order: open only goes down
        assert still_open == 24, "the proxy dropped clients early: the test is not testing"
        assert held >= still_open, f"{still_open - held} lease(s) back before the server let go"
        assert wait_leased(sock_path, 0, timeout=20) == 0
    finally:
        proxy.close()


def test_a_pool_dropped_without_disconnect_ends_the_session_with_its_leases(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    # Its lease came back, but the session stayed (counted by the coordinator,
    # a lost coordinator logged at its stop), unlike a dropped ConnectionPool's.
    import gc

    start_coordinator({"redis": Resource(max_size=1)})
    pool = make_pool(sock_path, redis_name, max_connections=1)
    assert redis.Redis(connection_pool=pool).ping()
    assert len(other_sessions(sock_path)) == 1
    del pool
    gc.collect()  # redis-py's connections refer to their pool: a cycle
    assert wait_no_other_sessions(sock_path) == []
    assert wait_leased(sock_path, 0) == 0


def test_a_timed_out_connection_keeps_its_lease_while_the_server_holds_it(
        start_coordinator: Any, sock_path: str) -> None:
    """A command timing out closes its connection (read_response's disconnect),
    unconfirmed: the server does not answer. redis-py then disconnects it again
    (its connect's cleanup, its retry's): that second disconnect() shut the
    socket down both ways, faking the server's EOF to the close's watcher, so the
    lease went back at once. Three pings left the server holding 3 clients
    under a cap of 1; now each keeps its lease until the server lets go."""
    start_coordinator({"redis": Resource(max_size=1)})
    server = HoldingServer()  # a Redis stalled (a slow script, a stopped process): never answers
    server.accept_all()
    pool = BlockingConnectionPool(host="127.0.0.1", port=server.address[1], resource="redis",
                                  coordinator=sock_path, max_connections=1, timeout=0.5,
                                  socket_timeout=0.3, confirm_timeout=0.3)
    try:
        with pytest.raises(redis.TimeoutError):
            redis.Redis(connection_pool=pool).ping()
        time.sleep(0.2)  # a lease given back early is back by now
        assert len(server.ends) == 1
        assert leased(sock_path) == 1, "lease back while the server still holds the connection"
        with pytest.raises(LeaseTimeout):  # the cap is taken by the connection not let go of
            redis.Redis(connection_pool=pool).ping()
        assert len(server.ends) == 1
    finally:
        server.close()
    assert wait_leased(sock_path, 0) == 0  # the server let go: the lease is back
    pool.disconnect()


def test_connects_failing_in_the_handshake_make_the_resource_fail_fast(
        start_coordinator: Any, sock_path: str) -> None:
    """A connect whose handshake fails (a wrong username: AUTH refused) is
    disconnected by redis-py before it raises, and that close took the lease
    record: the failure was never reported, so the coordinator never failed
    waiters fast (4 processes, a bad username: 290 grants in 3 s, `failing`
    never true, 0 denials). Now it is reported as a refused TCP connect is."""
    start_coordinator({"redis": Resource(max_size=3)})
    pool = BlockingConnectionPool(host=HOST, port=PORT, username="sp-no-such-user", password="x",
                                  resource="redis", coordinator=sock_path, max_connections=1, timeout=2)
    client = Client(sock_path)
    try:
        for _ in range(5):  # FAILURE_THRESHOLD
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(connection_pool=pool, retry=None).ping()
        deadline = time.monotonic() + 5
        while (not client.inspect("resources")["resources"][0]["failing"]
               and time.monotonic() < deadline):
            time.sleep(0.05)  # reports are coalesced: one in a moment
        assert client.inspect("resources")["resources"][0]["failing"]
    finally:
        client.close()
        pool.disconnect()
    assert wait_leased(sock_path, 0) == 0


def test_disconnecting_from_a_server_slow_to_let_go_waits_once_not_per_connection(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """pool.disconnect() closed its connections in turn, each waiting the whole
    confirm_timeout for a server that does not let go: 4 connections, 4 x 0.4 s
    (SQLAlchemy's dispose() and psycopg_pool's close() alike). After one close
    went unconfirmed the next ones do not wait; each lease is still kept until
    the server lets go."""
    start_coordinator({"redis": Resource(max_size=4)})
    proxy = _SlowToDropProxy(delay=3.0)
    pool = BlockingConnectionPool(host="127.0.0.1", port=proxy.port, client_name=redis_name,
                                  resource="redis", coordinator=sock_path, max_connections=4,
                                  confirm_timeout=0.4)
    try:
        conns = [pool.get_connection() for _ in range(4)]
        for conn in conns:
            conn.send_command("PING")
            conn.read_response()
            pool.release(conn)
        t0 = time.monotonic()
        pool.disconnect()
        took = time.monotonic() - t0
        assert took < 1.0, f"disconnect() took {took:.2f}s"
        held, still_open = leased(sock_path), proxy.open  # in this order: open only goes down
        assert still_open == 4 and held >= still_open
        assert wait_leased(sock_path, 0, timeout=10) == 0
    finally:
        proxy.close()


def test_a_dropped_pools_connection_closes_itself_without_logging_where_the_collection_ran(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    """The connection's own finalizer gives its lease back (close_orphan); the
    garbage collector runs it in whatever thread it interrupted, which may hold
    any lock: here a logging.QueueHandler's queue lock (a plain Lock, taken
    again by the first such warning's put). Before: that thread hung for good
    and the lease stayed out; as for a dropped ConnectionPool, the warning now
    comes from another thread."""
    start_coordinator({redis_name: Resource(max_size=1)})  # its own name: warned once per resource
    with sharedpool_logs_queued_gc_off() as q:
        pool = BlockingConnectionPool(host=HOST, port=PORT, client_name=redis_name, resource=redis_name,
                                      coordinator=sock_path, max_connections=1, timeout=3)
        assert redis.Redis(connection_pool=pool).ping()
        assert leased(sock_path) == 1
        del pool  # redis-py's connections refer to their pool: a cycle
        assert collect_inside_a_put(q), "the collection hung in the connection's finalizer"
        assert wait_leased(sock_path, 0) == 0 and clients_named(redis_name) == 0
        assert any("garbage-collected" in r.getMessage() for r in list(q.queue)), list(q.queue)


def test_a_pubsub_collected_inside_the_books_lock_does_not_hang(start_coordinator: Any, sock_path: str,
                                                                  redis_name: str) -> None:
    # A PubSub dropped in a reference cycle is reset by its __del__ inside a
    # collection, in whatever thread the collection interrupted: its
    # disconnect() took the lease book's lock, which that very thread held (a
    # collection inside one of the book's own steps): that thread, and with it
    # every checkout and checkin of the process, waited for good. Plain redis-py
    # does not hang there.
    start_coordinator({"redis": Resource(max_size=1, acquire_timeout=10)})

    def child() -> int:
        pool = make_pool(sock_path, redis_name, max_connections=2, timeout=10)
        book = pool.lease_book
        gc.disable()
        ps = redis.Redis(connection_pool=pool).pubsub()
        ps.subscribe(f"{redis_name}-channel")
        ps.cycle = ps  # type: ignore[attr-defined]  # freed by a collection only
        del ps
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(redis.Redis(connection_pool=pool).ping()),
                                  daemon=True)
        waiter.start()  # waits at the cap for the PubSub's lease
        deadline = time.monotonic() + 5
        while not book._waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        if not book._waiting:
            return 3
        if not collect_holding(book._lock):  # as a collection inside one of the book's steps
            return 2  # hung in the PubSub's __del__
        waiter.join(10)
        gc.enable()
        pool.disconnect()
        return 0 if got == [True] else 4

    assert run_in_child(child) == 0  # 2: the collection hung, 3: no lease wait, 4: no ping
    assert wait_leased(sock_path, 0) == 0


def test_a_reclaim_is_counted_before_its_lease_goes(
        start_coordinator: Any, sock_path: str, redis_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted after the disconnect, the lease already released: the waiter was
    # served, and could read the stats, while leases_reclaimed still said 0.
    start_coordinator({"redis": Resource(max_size=1)})
    pool = make_pool(sock_path, redis_name, max_connections=1)
    redis.Redis(connection_pool=pool).ping()  # the one lease, idle
    try:
        at_release = reclaimed_at_release(sock_path, "redis", lambda: pool.lease_stats()["leases_reclaimed"],
                                          monkeypatch)
    finally:
        pool.disconnect()
    assert at_release == [1], at_release
