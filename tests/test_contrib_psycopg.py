"""sharedpool.contrib.psycopg on a real PostgreSQL: the cap seen from
pg_stat_activity across forked workers whose min_size alone exceeds it, a
broken connection's lease coming back, reclaim, fork refusal, stats."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import psycopg_pool
import pytest
from pg_helpers import BackendSampler, pg_dsn, slow_exit
from proc_helpers import (
    exit_mid_query,
    hammer,
    held_once_confirmed,
    import_refused,
    leased,
    other_sessions,
    reclaimed_at_release,
    run_forked,
    wait_leased,
    wait_no_other_sessions,
)
from psycopg_pool import PoolClosed
from servers import wait_for

from sharedpool import Client, ConfigError, Resource
from sharedpool.contrib.psycopg import ConnectionPool
from sharedpool.handoff import AUTO_MAX, AUTO_MIN

pytestmark = pytest.mark.pg


def make_pool(sock: str, app: str, **kw: Any) -> ConnectionPool[Any]:
    kw.setdefault("timeout", 20)
    kw.setdefault("open", True)
    return ConnectionPool(pg_dsn(), resource="pg", coordinator=sock,
                          kwargs={"application_name": app, "autocommit": True}, **kw)


def _hammer(sock: str, app: str, threads: int, iterations: int) -> dict[str, Any]:
    with make_pool(sock, app, min_size=2, max_size=4) as pool:

        def query() -> None:
            with pool.connection() as conn:
                conn.execute("SELECT pg_sleep(0.002)")

        done, errors = hammer(threads, iterations, query)
        stats = pool.get_stats()
    return {"done": done, "errors": errors, "stats": stats,
            "held_after": held_once_confirmed(lambda: pool.get_stats()["leases_held"])}


def test_forked_workers_never_exceed_the_cap(pg: str, start_coordinator: Any, sock_path: str,
                                             app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=3, acquire_timeout=20, fairness_quantum=0.25)})
    # 5 pools with min_size 2 (10) and max_size 4 (20) under a cap of 3: they wait, not fail.
    with BackendSampler(app_name) as sampler:
        results = run_forked(_hammer, sock_path, app_name, 3, 30, n=5)
    assert all(not r.get("error") and not r["errors"] for r in results), results
    assert sum(r["done"] for r in results) == 5 * 3 * 30
    assert all(r["held_after"] == 0 for r in results)
    assert all(r["stats"]["leases_acquired"] >= 1 for r in results)
    assert sampler.samples > 50
    assert sampler.peak <= 3, f"PostgreSQL saw {sampler.peak} connections with a cap of 3"
    assert sampler.peak == 3, "the cap was never reached: the test proves nothing"
    assert wait_leased(sock_path, 0) == 0
    assert sampler.count_now() == 0


def test_broken_connection_gives_its_lease_back(pg: str, start_coordinator: Any, sock_path: str,
                                                app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    with make_pool(sock_path, app_name, min_size=1, max_size=1, timeout=10,
                   check=ConnectionPool.check_connection) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            first = conn.info.backend_pid
        with psycopg.connect(pg_dsn(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        # check= finds it broken; psycopg_pool drops it. Cap 1: the replacement
        # connects only if the broken one's lease came back.
        with pool.connection() as conn:
            second = conn.info.backend_pid
            conn.execute("SELECT 1")
        assert second != first
        stats = pool.get_stats()
        assert stats["leases_held"] == 1 and stats["leases_released"] == 1
        assert stats["connections_lost"] >= 1  # psycopg_pool's own stats still count
        assert leased(sock_path) == 1
    assert pool.get_stats()["leases_held"] == 0
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_busy_connection_is_cancelled_and_its_lease_goes_back_after_the_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=1)})
    seen: list[int] = []

    def wait() -> None:  # another session, waiting for the only lease
        c = Client(sock_path)
        try:
            lease = c.acquire("pg", 10)
            seen.append(BackendSampler(app_name).count_now())
            c.release(lease)
        finally:
            c.close()

    with make_pool(sock_path, app_name, min_size=0, max_size=1) as pool:
        conn = pool.getconn()
        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.1)
        # Returned mid-query (a task cut short), psycopg_pool closes it: the
        # query is cancelled first, else the backend reads our Terminate only
        # when it ends and the lease is held until then.
        conn.pgconn.send_query(b"SELECT pg_sleep(10)")
        t0 = time.monotonic()
        pool.putconn(conn)
        assert time.monotonic() - t0 < 1.5, "the busy query was not cancelled"
        waiter.join(3)
        assert not waiter.is_alive(), "the lease did not come back promptly"
        assert pool.get_stats()["closes_unconfirmed"] == 0
    assert seen == [0], f"the lease went back while PostgreSQL still had {seen} backend(s)"


def test_a_psycopg_pool_that_closes_connections_itself_is_refused_at_import() -> None:
    # psycopg_pool < 3.2.8 (no _close_connection) closed connections with conn.close()
    # on most paths: the busy one above gave its lease back with its query still
    # running. Refused with the version to get, rather than a cap that does not hold.
    err = import_refused("import psycopg_pool\n"
                         "del psycopg_pool.ConnectionPool._close_connection\n"
                         "import sharedpool.contrib.psycopg\n")
    assert "ImportError: sharedpool.contrib.psycopg needs psycopg_pool >= 3.2.8" in err, err


def test_a_timeout_with_the_coordinator_unreachable_says_so(tmp_path: Any) -> None:
    # The lease wait (lease_timeout: the pool's timeout) starts after getconn()'s
    # and ended after it: psycopg_pool's "error connecting ... unreachable" came
    # too late, and a short-lived process (Django's manage.py migrate with a dead
    # $SHAREDPOOL_SOCKET) saw only "couldn't get a connection after 30.00 sec".
    dead = str(tmp_path / "none.sock")
    with (ConnectionPool(pg_dsn(), resource="pg", coordinator=dead, min_size=0, max_size=1,
                         timeout=1) as pool,
          pytest.raises(psycopg_pool.PoolTimeout) as err):
        pool.getconn()
    assert str(err.value).startswith(f"couldn't get a connection after 1.00 sec; coordinator at {dead} "
                                     f"unreachable: "), err.value


def test_a_timeout_after_a_refused_lease_says_why(start_coordinator: Any, sock_path: str) -> None:
    # A misspelt resource (Django's OPTIONS["pool"]["resource"]): each lease is
    # refused at once, psycopg_pool logs "error connecting" and retries until the
    # timeout, which said only "couldn't get a connection after 1.00 sec".
    start_coordinator({"pg": Resource(max_size=1)})
    with (ConnectionPool(pg_dsn(), resource="pgg", coordinator=sock_path, min_size=0, max_size=1,
                         timeout=1) as pool,
          pytest.raises(psycopg_pool.PoolTimeout) as err):
        pool.getconn()
    assert str(err.value).startswith("couldn't get a connection after 1.00 sec; no lease: no resource "
                                     "'pgg' (known: pg)"), err.value


def test_a_timeout_at_the_cap_says_it_waited_for_a_lease(pg: str, start_coordinator: Any,
                                                         sock_path: str, app_name: str) -> None:
    # The one lease in use elsewhere: the timeout said only psycopg_pool's "couldn't
    # get a connection after 1.00 sec", as if this pool's own max_size were taken
    # (a Django view, or manage.py migrate, while gunicorn's workers held the cap).
    # 3 s: the note needs the pool's worker to have begun its lease wait by then
    # (with 1 s, a worker stalled 1.2 s on a loaded machine left psycopg_pool's words only).
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30)})
    # lease_timeout past getconn()'s: with the lease wait as long (it starts a little
    # later), a loaded machine woke the lease wait's timeout first now and then, and
    # the note was the (also true) "no lease: all 1 leases of 'pg' are held".
    with (make_pool(sock_path, app_name, min_size=0, max_size=1) as holder, holder.connection(),
          make_pool(sock_path, app_name, min_size=0, max_size=1, timeout=3, lease_timeout=30) as pool,
          pytest.raises(psycopg_pool.PoolTimeout) as err):
        pool.getconn()
    assert str(err.value).startswith(f"couldn't get a connection after 3.00 sec; still waiting for a lease "
                                     f"of 'pg' from the coordinator at {sock_path}: none granted in "
                                     f"time"), err.value


def test_a_timeout_between_lease_attempts_at_a_cap_held_on_says_why(pg: str, start_coordinator: Any,
                                                                     sock_path: str, app_name: str) -> None:
    # After a lease wait timed out, psycopg_pool retries after a backoff (1, 2, 4... s):
    # no lease wait under way then, and a getconn() timing out in it said only
    # "couldn't get a connection after ..." (10 of 20 in a row, a cap held for 30 s).
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30)})
    with (make_pool(sock_path, app_name, min_size=0, max_size=1) as holder, holder.connection(),
          make_pool(sock_path, app_name, min_size=0, max_size=1, timeout=10, lease_timeout=0.2) as pool):
        with pytest.raises(psycopg_pool.PoolTimeout):
            pool.getconn(timeout=0.5)
        deadline = time.monotonic() + 10
        while (pool._sp_lease_waits or pool._sp_lease_failed is None) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first attempt refused, its retry not started yet
        with pytest.raises(psycopg_pool.PoolTimeout) as err:
            pool.getconn(timeout=0.1)  # within psycopg_pool's first backoff (~1 s)
    assert str(err.value).startswith("couldn't get a connection after 0.10 sec; "), err.value


def test_max_lifetime_replaces_connections_under_lease(pg: str, start_coordinator: Any,
                                                       sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    with make_pool(sock_path, app_name, min_size=2, max_size=2, max_lifetime=0.5) as pool:
        pool.wait(5)
        with pool.connection() as a, pool.connection() as b:
            old = {a.info.backend_pid, b.info.backend_pid}
        time.sleep(0.6)
        for _ in range(2):  # expired: closed on return (confirmed, released), replaced
            with pool.connection() as a, pool.connection() as b:
                pass
        deadline = time.monotonic() + 5
        while pool.get_stats()["pool_available"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pool.connection() as a, pool.connection() as b:
            assert not {a.info.backend_pid, b.info.backend_pid} & old
        stats = pool.get_stats()
        assert stats["leases_held"] == 2 and stats["leases_released"] == 2
        assert leased(sock_path) == 2 and BackendSampler(app_name).count_now() == 2
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_resize_past_the_cap_waits_and_close_ends_the_wait(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=30)})
    pool = make_pool(sock_path, app_name, min_size=2, max_size=2)
    pool.wait(5)
    pool.resize(3, 3)  # the third connection waits for a lease; the pool keeps serving
    c = Client(sock_path)
    try:
        deadline = time.monotonic() + 5
        # It asks for a third lease: seen waiting, or already served by giving
        # back one of its own idle ones (the coordinator asks a waiting process
        # for the leases it reports idle, as one of its other pools may hold them).
        while (c.inspect("resources")["resources"][0]["waiting"] < 1
               and pool.get_stats()["leases_acquired"] < 3):
            assert time.monotonic() < deadline, "the pool never asked for a third lease"
            time.sleep(0.02)
        for _ in range(5):
            with pool.connection() as conn:
                conn.execute("SELECT 1")
        t0 = time.monotonic()
        pool.close()
        assert time.monotonic() - t0 < 3, "close() waited for the workers' lease wait"
        assert wait_leased(sock_path, 0) == 0
        assert BackendSampler(app_name).count_now() == 0
    finally:
        c.close()


def test_lease_waits_leave_a_worker_free_for_returns(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # min_size above the cap: the pool waits for leases it will not get soon.
    # With reset=, psycopg_pool returns connections through its workers: were
    # they all in lease waits, a connection put back would not come back.
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=30)})
    pool = make_pool(sock_path, app_name, min_size=8, max_size=8, timeout=5,
                     reset=lambda conn: None)
    try:
        wait_leased(sock_path, 2)
        time.sleep(0.5)  # every spare worker is in a lease wait by now
        for _ in range(4):
            t0 = time.monotonic()
            with pool.connection(timeout=3) as conn:
                conn.execute("SELECT 1")
            assert time.monotonic() - t0 < 1.5, "a returned connection was stuck behind lease waits"
    finally:
        pool.close()  # the last return may still be queued for a worker: closed all the same
    assert wait_leased(sock_path, 0) == 0


def _child_needs_one(sock: str, app: str) -> dict[str, Any]:
    t0 = time.monotonic()
    with make_pool(sock, app, min_size=0, max_size=1, timeout=10) as pool, pool.connection() as conn:
        conn.execute("SELECT 1")
    return {"waited": time.monotonic() - t0}


def test_idle_connections_are_reclaimed_for_a_waiting_process(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=10)})
    with make_pool(sock_path, app_name, min_size=2, max_size=2) as pool:
        pool.wait(5)  # two idle connections hold the whole cap
        [child] = run_forked(_child_needs_one, sock_path, app_name)
        assert "error" not in child, child
        assert child["waited"] < 5, "the idle connection was not reclaimed"
        stats = pool.get_stats()
        assert stats["leases_reclaimed"] >= 1 and stats["pool_size"] <= 1
        with pool.connection() as conn:  # grows back on demand
            conn.execute("SELECT 1")
    assert wait_leased(sock_path, 0) == 0


def test_a_reclaim_is_counted_before_its_lease_goes(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool counted what it gave back on a reclaim after closing it, its
    # lease released by then: the waiter was served, and read get_stats(),
    # while leases_reclaimed still said 0 (the load flake of test_multi_pool's
    # growing-for-nobody test). LeaseBook.close(reclaimed=True) counts first.
    start_coordinator({"pg": Resource(max_size=1)})
    with make_pool(sock_path, app_name, min_size=1, max_size=1) as pool:
        pool.wait(5)  # the one lease, idle
        at_release = reclaimed_at_release(sock_path, "pg", lambda: pool.get_stats()["leases_reclaimed"],
                                          monkeypatch)
    assert at_release == [1], at_release


def _child_uses_inherited(pool: ConnectionPool[Any]) -> dict[str, Any]:
    try:
        pool.getconn(timeout=1)
    except PoolClosed as exc:
        return {"refused": str(exc)}
    return {"refused": None}


def test_a_pool_opened_before_fork_refuses_to_serve_in_the_child(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    with make_pool(sock_path, app_name, min_size=1, max_size=1) as pool:
        pool.wait(5)
        with pool.connection() as conn:
            parent = conn.info.backend_pid
        [child] = run_forked(_child_uses_inherited, pool)
        assert child["refused"] and "fork" in child["refused"]
        with pool.connection() as conn:  # the parent's connection is untouched
            assert conn.info.backend_pid == parent
        assert leased(sock_path) == 1
    assert wait_leased(sock_path, 0) == 0


def test_hand_off_costs_reach_the_coordinator(pg: str, start_coordinator: Any, sock_path: str,
                                               app_name: str) -> None:
    # The integrations report what a connect + confirmed close cost them, like
    # sharedpool's own pool, so their turns follow the coordinator's quantum.
    start_coordinator({"pg": Resource(max_size=2)})
    probe = Client(sock_path)
    try:
        with make_pool(sock_path, app_name, min_size=0, max_size=1) as pool:
            with pool.connection() as conn:
                conn.execute("SELECT 1")
            deadline = time.monotonic() + 5
            while (quantum := probe.inspect("resources")["resources"][0]["fairness_quantum_s"]) is None:
                assert time.monotonic() < deadline, "no hand-off cost reached the coordinator"
                time.sleep(0.05)
        assert AUTO_MIN <= quantum <= AUTO_MAX
    finally:
        probe.close()


def _exit_mid_query(sock: str, app: str) -> dict[str, Any]:
    pool = make_pool(sock, app, min_size=1, max_size=1)
    pool.wait(5)
    out = exit_mid_query(pool.connection,
                         lambda conn: conn.execute("SELECT 42 FROM pg_sleep(1)").fetchone()[0])
    out["held"] = pool.get_stats()["leases_held"]
    return out


def test_release_process_waits_for_a_query_in_flight(pg: str, start_coordinator: Any,
                                                      sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=2)})
    [child] = run_forked(_exit_mid_query, sock_path, app_name)
    assert child.get("row") == 42, child  # not "the connection is closed"
    assert 0.5 < child["took"] < 4, child  # until the query ended, not the whole timeout
    assert child["held"] == 0
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def _exit_with_a_checkout_never_returned(sock: str, app: str, pools: int = 1) -> dict[str, Any]:
    import logging

    from sharedpool import release_process

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("sharedpool").addHandler(handler)
    made = [make_pool(sock, app, min_size=0, max_size=1) for _ in range(pools)]
    # A thread of the app's own that took a connection and ended without giving
    # it back (Django's connections in a thread the view started, never closed).
    kept: list[Any] = []  # as Django's DatabaseWrapper of that thread keeps it
    for pool in made:
        taker = threading.Thread(target=lambda pool=pool: kept.append(pool.getconn()))  # type: ignore[misc]
        taker.start()
        taker.join()
    t0 = time.monotonic()
    release_process(0.5)
    return {"said": said, "took": time.monotonic() - t0,
            "held": sum(pool.get_stats()["leases_held"] for pool in made)}


def test_an_exit_that_waits_out_its_timeout_for_a_checkout_says_so(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The exit waited its whole timeout (gunicorn's close_timeout: each worker's stop
    # took 5 s) and told nothing; sharedpool's own pool says so at warning.
    start_coordinator({"pg": Resource(max_size=1)})
    [child] = run_forked(_exit_with_a_checkout_never_returned, sock_path, app_name)
    assert child.get("took", 0) >= 0.4 and child["held"] == 0, child
    assert any(m.startswith("sharedpool: 'pg': 1 connection(s) still in use after 0.5s at exit: closed "
                            "under their users") for m in child["said"]), child
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_an_exit_whose_time_an_earlier_pool_took_says_so_for_the_next(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """One deadline for every pool: the first waited it all out for its checkout,
    and the second's, given 0 s, was closed under its user with nothing said
    (timeout 0 read as a request not to wait)."""
    start_coordinator({"pg": Resource(max_size=2)})
    [child] = run_forked(_exit_with_a_checkout_never_returned, sock_path, app_name, 2)
    assert child.get("took", 0) >= 0.4 and child["held"] == 0, child
    said = [m for m in child["said"] if "still in use" in m]
    assert len(said) == 2, child
    assert said[0].startswith("sharedpool: 'pg': 1 connection(s) still in use after 0.5s at exit: "), said
    assert said[1].startswith("sharedpool: 'pg': 1 connection(s) still in use after 0.0s at exit (the "
                              "exit's 0.5s: 0.5s spent before this pool): closed"), said
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0


def test_close_with_a_connection_checked_out_gives_its_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """App shutdown while a request still runs: close(), then the request
    returns its connection, which psycopg_pool closes; its lease goes back
    too (before, close() had dropped the client the release needed)."""
    start_coordinator({"pg": Resource(max_size=2)})
    pool = make_pool(sock_path, app_name, min_size=1, max_size=2)
    pool.wait(10)
    conn = pool.getconn()
    pool.close()
    pool.putconn(conn)
    assert conn.closed
    assert wait_leased(sock_path, 0) == 0
    _wait_none_held(pool)


def test_a_connection_closed_by_its_user_after_the_pool_closed_gives_its_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """close(), then the request closes its connection itself instead of
    returning it: nothing swept for it any more, so its lease stayed held (and
    counted against the cap everywhere) until the process exited."""
    start_coordinator({"pg": Resource(max_size=2)})
    pool = make_pool(sock_path, app_name, min_size=1, max_size=2)
    pool.wait(10)
    conn = pool.getconn()
    pool.close()
    assert leased(sock_path) == 1
    conn.close()
    assert wait_leased(sock_path, 0, timeout=3) == 0
    _wait_none_held(pool)


def _wait_none_held(pool: ConnectionPool) -> None:
    # The closing thread uncounts its lease just after the release went out: the
    # coordinator can show 0 a moment before get_stats() does (failed once in CI).
    wait_for(lambda: pool.get_stats()["leases_held"] == 0, 3, "the pool's leases_held to reach 0")


def test_closing_the_pool_ends_the_process_session(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """As sharedpool's own pools do: the last pool of a process closing ends
    its session (the coordinator counted it on, and logged it lost at a
    stop), once a connection still out at close() is back."""
    start_coordinator({"pg": Resource(max_size=2)})
    pool = make_pool(sock_path, app_name, min_size=1, max_size=2)
    pool.wait(10)
    conn = pool.getconn()
    watch = Client(sock_path, name="watch")

    def sessions() -> list[str]:
        return [s["name"] for s in watch.inspect("sessions")["sessions"] if s["name"] != "watch"]

    try:
        assert len(sessions()) == 1
        pool.close()
        assert len(sessions()) == 1  # a connection is still out: its lease is held
        pool.putconn(conn)
        deadline = time.monotonic() + 5
        while sessions() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sessions() == []
    finally:
        watch.close()
    assert pool.get_stats()["leases_held"] == 0


def test_callers_that_gave_up_are_not_kept_as_waiting_for_a_lease(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A pool starved by the cap (another process holds every lease) sees its
    getconn() calls time out. psycopg_pool forgets a timed-out caller only when
    a connection is put back, which such a pool may not see for hours: the
    callers pile up (each with its PoolTimeout and traceback), and counted as
    waiting they keep the pool asking the coordinator for a lease, which it
    takes, and opens a connection with, for nobody."""
    from psycopg_pool import PoolTimeout as PsycopgPoolTimeout

    start_coordinator({"pg": 1})
    other = Client(sock_path, name="other")
    lease = other.acquire("pg", timeout=5)
    # The pool's lease wait outlasts its callers' waits: it must end with them.
    pool = make_pool(sock_path, app_name, min_size=0, max_size=1, timeout=0.05, lease_timeout=5,
                     open=True)
    try:
        for _ in range(20):
            with pytest.raises(PsycopgPoolTimeout):
                pool.getconn(timeout=0.05)
        assert pool.get_stats().get("requests_waiting", 0) == 0
        time.sleep(0.6)  # the lease wait looks whether it is still needed every 0.25 s
        other.release(lease)
        time.sleep(1.0)  # a lease wait still going on for the callers gone would take it now
        assert leased(sock_path) == 0
        assert pool.get_stats()["leases_held"] == 0
    finally:
        pool.close()
        other.close()


def test_growth_that_finds_no_free_slot_is_no_lease_timeout(pg: str, start_coordinator: Any,
                                                              sock_path: str, app_name: str) -> None:
    """psycopg_pool grows on towards min_size after serving a waiter; sharedpool
    lets such a growth take only a slot free at once (timeout 0). Finding none
    timed nobody out (the coordinator counts no timeout, the caller was served),
    yet the pool's lease_timeouts counted it: 8 busy processes at a cap of 3
    showed 13 lease_timeouts against 0 failed checkouts."""
    start_coordinator({"pg": Resource(max_size=3, fairness_quantum=0.05)})
    other = Client(sock_path, name="other")
    pool = make_pool(sock_path, app_name, min_size=3, max_size=3, timeout=10)
    try:
        pool.wait(10)
        # Two of the pool's idle slots are reclaimed for the other session: 1 left.
        held = [other.acquire("pg", timeout=5) for _ in range(2)]
        first = pool.getconn()  # the pool's last connection, in use
        served: list[Any] = []
        waiter = threading.Thread(target=lambda: served.append(pool.getconn(timeout=10)))
        waiter.start()  # no connection: psycopg_pool grows for it, and waits for a lease
        deadline = time.monotonic() + 10
        while not pool._sp_waiting():  # else the release below could come before the wait it is for
            assert time.monotonic() < deadline, "the waiting getconn()'s growth never waited for a lease"
            time.sleep(0.01)
        other.release(held.pop())  # the growth's lease: the waiter is served, and
        waiter.join(10)            # psycopg_pool grows on towards min_size (3): no slot free
        assert served, "the waiting getconn() was not served"
        deadline = time.monotonic() + 5
        while pool._growing and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pool._growing
        stats = pool.get_stats()
        assert stats.get("requests_errors", 0) == 0
        assert stats.get("lease_timeouts", 0) == 0, stats
        assert other.inspect("resources")["resources"][0]["timeouts"] == 0
        pool.putconn(first)
        pool.putconn(served[0])
    finally:
        pool.close()
        other.close()


def test_a_connection_its_user_closed_keeps_its_lease_until_the_backend_is_gone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """psycopg_pool discards a connection checked in closed; its socket was
    gone with the user's close(), so the lease went back at once while the
    backend was still exiting (another process could connect: over the cap).
    The book keeps a dup of the socket and confirms that close too."""
    start_coordinator({"pg": Resource(max_size=1)})
    with make_pool(sock_path, app_name, min_size=0, max_size=1) as pool, \
            psycopg.connect(pg, autocommit=True) as monitor:
        for _ in range(10):
            with pool.connection() as conn:
                pid = conn.info.backend_pid
                slow_exit(conn)
                conn.close()
            deadline = time.monotonic() + 10
            while True:
                held = pool.get_stats()["leases_held"]  # first: a lease back means the backend went before
                row = monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                      (pid,)).fetchone()
                assert not (held == 0 and row and row[0]), f"lease back while backend {pid} still runs"
                if held == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.001)
            assert held == 0, "the lease of a closed connection never went back"


def test_a_top_up_waiting_at_release_process_opens_nothing_after_it(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture) -> None:
    # A celery child exiting while its pool's min_size top-up waits for a lease:
    # the ended session failed that wait, psycopg_pool retried it a second later
    # on a new session, and the exiting process took a lease and a connection.
    from sharedpool import release_process

    start_coordinator({"pg": Resource(max_size=1)})
    holder = Client(sock_path)
    lease = holder.acquire("pg", 5)
    pool = make_pool(sock_path, app_name, min_size=1, max_size=1, open=False)
    try:
        pool.open(wait=False)
        time.sleep(0.3)  # the top-up waits for the only lease
        release_process(1.0)  # also ends the holder's session: the lease is free
        assert lease is not None
        time.sleep(2.5)  # past psycopg_pool's first retry
        assert pool.get_stats()["leases_held"] == 0
        assert leased(sock_path) == 0
        assert BackendSampler(app_name).count_now() == 0
        assert "error connecting" not in caplog.text  # the wait ended as not needed
    finally:
        pool.close()


def test_a_getconn_after_release_process_fails_at_once(pg: str, start_coordinator: Any,
                                                         sock_path: str, app_name: str) -> None:
    # After release_process() no lease is taken: each growth for a waiting caller
    # ended as not needed and started the next one (~100k tasks a second, two
    # workers busy) until the caller's getconn() timed out.
    from sharedpool import release_process

    start_coordinator({"pg": Resource(max_size=1)})
    holder = Client(sock_path)
    assert holder.acquire("pg", 5) is not None
    pool = make_pool(sock_path, app_name, min_size=0, max_size=1)
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            pool.getconn(timeout=8)
        except BaseException as exc:  # noqa: BLE001 - looked at below
            errors.append(exc)

    waiter = threading.Thread(target=caller)
    try:
        waiter.start()
        time.sleep(0.3)  # waits for the only lease
        t0 = time.monotonic()
        release_process(1.0)
        waiter.join(10)
        with pytest.raises(PoolClosed, match="release_process"):
            pool.getconn(timeout=8)  # a caller after it
        assert time.monotonic() - t0 < 5  # not its timeout
        assert len(errors) == 1 and isinstance(errors[0], PoolClosed), errors
        assert pool.get_stats()["leases_held"] == 0
        assert BackendSampler(app_name).count_now() == 0
    finally:
        pool.close()


def test_a_getconn_after_release_process_hands_out_no_closed_connection(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The pool's idle connection, closed by release_process(), stayed in
    # psycopg_pool's queue: the next getconn() returned it closed ([BAD]).
    from sharedpool import release_process

    start_coordinator({"pg": Resource(max_size=2)})
    pool = make_pool(sock_path, app_name, min_size=1, max_size=1)
    try:
        pool.wait(10)
        release_process(1.0)
        with pytest.raises(PoolClosed, match="release_process"):
            pool.getconn(timeout=2)
        assert leased(sock_path) == 0
        assert BackendSampler(app_name).count_now() == 0
    finally:
        pool.close()


def test_a_pool_dropped_without_close_ends_the_session_with_its_leases(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Its connections were closed and their leases given back, but the session
    # stayed (counted by the coordinator, a lost coordinator logged at its stop),
    # unlike a dropped ConnectionPool's or a close()d one's.
    import gc

    start_coordinator({"pg": Resource(max_size=2)})
    pool = make_pool(sock_path, app_name, min_size=1, max_size=2)
    pool.wait(10)
    assert len(other_sessions(sock_path)) == 1
    del pool
    gc.collect()
    assert wait_no_other_sessions(sock_path) == []
    assert leased(sock_path) == 0


def test_a_connection_dropped_unreturned_gives_its_backend_and_lease_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # As with plain psycopg_pool, whose getconn() keeps no hold on what it hands
    # out: a connection never put back (an exception path that forgets putconn)
    # is closed once collected. The lease book held it: its backend and its
    # lease stayed for the life of the process, pool.close() or not.
    import gc

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    sampler = BackendSampler(app_name)
    with make_pool(sock_path, app_name, min_size=0, max_size=2, timeout=5) as pool:
        def forgets_putconn() -> None:
            conn = pool.getconn()
            conn.execute("SELECT 1")
            raise RuntimeError("no putconn on this path")

        with pytest.raises(RuntimeError):
            forgets_putconn()
        gc.collect()
        assert wait_leased(sock_path, 0) == 0
        assert sampler.count_now() == 0
        assert pool.get_stats()["leases_held"] == 0
        # Returned ones are held and pooled as ever: the same backend again.
        with pool.connection() as conn:
            first = conn.info.backend_pid
        gc.collect()
        with pool.connection() as conn:
            assert conn.info.backend_pid == first
        assert leased(sock_path) == 1 and sampler.count_now() == 1
        del conn
        out = [pool.getconn()]
    # Still out at pool.close(), then dropped: it goes too, and the session with it.
    assert leased(sock_path) == 1
    out.clear()
    gc.collect()
    assert wait_leased(sock_path, 0) == 0
    assert sampler.count_now() == 0
    assert wait_no_other_sessions(sock_path) == []


def test_a_pool_without_coordinator_dropped_without_close_lets_its_backends_go(
        pg: str, app_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # No session to give leases back to: the connections close with their
    # objects, as plain psycopg_pool's. The finalizer armed for lending them
    # held each idle one (its record's strong hold): kept open for good.
    import gc

    from sharedpool.config import SOCKET_ENV

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    sampler = BackendSampler(app_name)

    def use_and_drop() -> None:
        pool = ConnectionPool(pg_dsn(), resource="pg", min_size=2, max_size=2, open=True,
                              kwargs={"application_name": app_name, "autocommit": True})
        pool.wait(10)
        with pool.connection() as conn:
            conn.execute("SELECT 1")

    use_and_drop()
    deadline = time.monotonic() + 5
    while sampler.count_now() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert sampler.count_now() == 0


def test_a_connection_out_at_close_dropped_with_its_pool_ends_the_session(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The pool closed, then collected along with a connection still out: the
    # book's finalizer left the session open (that lease was still held); the
    # lease came back once the server let go, and the session stayed, counted
    # by the coordinator for the life of the process.
    import gc

    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=5)})

    def close_then_drop() -> None:
        pool = make_pool(sock_path, app_name, min_size=0, max_size=1, timeout=5)
        conn = pool.getconn()
        slow_exit(conn)  # its server lets go well after the book is gone
        pool.close()
        assert leased(sock_path) == 1
        cycle: list[Any] = [pool, conn]
        cycle.append(cycle)  # both collected at once (as in an exception's traceback cycle)

    close_then_drop()
    gc.collect()
    assert wait_leased(sock_path, 0) == 0
    assert BackendSampler(app_name).count_now() == 0
    assert wait_no_other_sessions(sock_path, 3) == []


def test_a_forked_child_does_not_keep_its_parents_connections_alive(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The finalizer armed for lending a connection holds its record, which
    # holds the connection while idle: in a child (where it does nothing) it
    # kept every idle connection of the parent alive, the pool dropped or not.
    import gc
    import weakref

    from proc_helpers import run_in_child

    start_coordinator({"pg": Resource(max_size=2)})
    held = [make_pool(sock_path, app_name, min_size=2, max_size=2)]
    try:
        held[0].wait(10)
        refs = [weakref.ref(c) for c in held[0]._sp_idle()]
        assert len(refs) == 2

        def child() -> int:
            assert not held[0].lease_book.owns(refs[0]())  # the parent's from here on
            held.clear()
            gc.collect()
            return sum(1 for r in refs if r() is not None)

        assert run_in_child(child) == 0
    finally:
        held[0].close()


class _SoftLimit(Exception):
    """What a signal handler raises (celery's soft time limit is an Exception)."""


def test_a_lease_whose_connect_never_ran_goes_back_unused_not_as_a_failed_connect(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An AddConnection task cut short after its lease came, before psycopg_pool's
    _add_connection called _connect: the lease went back reported as a failed
    connect. No connect failed, and enough such reports have the coordinator
    fail every process's waiters fast (its connect-failure burst). It goes back
    unused now, nothing reported."""
    from proc_helpers import interrupt_once

    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    failures: list[str] = []
    real_failure = Client.report_failure
    monkeypatch.setattr(Client, "report_failure",
                        lambda client, resource: (failures.append(resource), real_failure(client, resource)))
    # psycopg_pool's own: the first statements of the task, before its _connect.
    interrupt_once(monkeypatch, psycopg_pool.ConnectionPool, "_add_connection", _SoftLimit())
    pool = make_pool(sock_path, app_name, min_size=1, max_size=1, open=False)
    try:
        pool.open(wait=False)
        deadline = time.monotonic() + 5
        while (stats := pool.lease_book.stats())["leases_released"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert failures == [], "reported as a failed connect"
        assert (stats["leases_acquired"], stats["leases_unused"], stats["leases_held"]) == (1, 1, 0), stats
        assert wait_leased(sock_path, 0) == 0
        assert BackendSampler(app_name).count_now() == 0
    finally:
        pool.close()
    assert wait_leased(sock_path, 0) == 0


@pytest.mark.parametrize(("conninfo", "kwargs", "field"), [
    (3, None, "conninfo"),
    (b"dbname=test", None, "conninfo"),
    ("dbname=test password=sEcr3t user", None, "conninfo"),  # libpq: missing "=" after "user"
    ("dbname=test", 3, "kwargs"),
    # A password's '@' or '/' not percent-encoded: libpq read a piece of it as the host
    # ("CRET@127.0.0.1") or the port ("sEcr3t"), quoted by each connect's error.
    ("postgresql://postgres:sEcr3t@CRET@127.0.0.1:5432/test", None, "conninfo"),
    ("postgresql://postgres:sEcr3t/CRET@127.0.0.1:5432/test", None, "conninfo"),
], ids=["int", "bytes", "malformed", "kwargs-int", "at-in-password", "slash-in-password"])
def test_a_conninfo_psycopg_could_never_use_is_refused_naming_it(
        conninfo: Any, kwargs: Any, field: str, caplog: pytest.LogCaptureFixture) -> None:
    """Before: taken, then every connect failed in psycopg_pool's workers, seen as
    a bare PoolTimeout at the first getconn(); the malformed one was logged with
    a piece of the string (here the password's neighbour) each attempt."""
    from sharedpool import ConfigError
    from sharedpool.contrib.psycopg import ConnectionPool

    extra = {} if kwargs is None else {"kwargs": kwargs}
    with pytest.raises(ConfigError) as err:
        pool = ConnectionPool(conninfo, resource="pg", min_size=0, max_size=1, open=False, timeout=0.5,
                              **extra)
        try:
            pool.open()
            with pool.connection():
                pass
        finally:
            pool.close()
    assert err.value.field == field, err.value
    assert "sEcr3t" not in str(err.value) and "sEcr3t" not in caplog.text
    assert "CRET" not in str(err.value) and "CRET" not in caplog.text


@pytest.mark.skipif(not hasattr(psycopg_pool.ConnectionPool, "_resolve_conninfo"),
                    reason="psycopg_pool < 3.3 takes no callable conninfo / kwargs")
def test_a_callable_conninfo_and_kwargs_are_psycopg_pools_to_call(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """psycopg_pool 3.3 calls them at each connect (a token that expires, made
    anew): refused as 'not a str' / 'not a dict' since 0f65a05."""
    start_coordinator({"pg": 2})
    calls: list[str] = []

    def conninfo() -> str:
        calls.append("conninfo")
        return pg_dsn()

    def kwargs() -> dict[str, Any]:
        calls.append("kwargs")
        return {"application_name": app_name, "autocommit": True}

    with ConnectionPool(conninfo, resource="pg", coordinator=sock_path, kwargs=kwargs, min_size=0,
                        max_size=1, timeout=20) as pool, pool.connection() as conn:
        assert conn.execute("SELECT current_setting('application_name')").fetchone() == (app_name,)
    assert calls == ["conninfo", "kwargs"]


@pytest.mark.parametrize("field", ["conninfo", "kwargs"])
def test_an_async_conninfo_or_kwargs_callable_is_refused_naming_it(field: str) -> None:
    """Its coroutine is what this sync pool would connect with."""
    from sharedpool import ConfigError

    async def made() -> Any:
        return {}

    args: dict[str, Any] = {"conninfo": "", "kwargs": None, field: made}
    with pytest.raises(ConfigError) as err:
        ConnectionPool(args.pop("conninfo"), resource="pg", min_size=0, max_size=1, open=False, **args)
    assert err.value.field == field


def test_callbacks_given_as_falsy_are_none_as_psycopg_pool_takes_them(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """psycopg_pool skips a falsy check / reset / configure / reconnect_failed
    ("if self._check:"); ours refused ``check=False`` as "must be callable", so
    a pool that worked with psycopg_pool failed when made through ours."""
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=5)})
    falsy: dict[str, Any] = {"check": False, "reset": 0, "configure": False, "reconnect_failed": ""}
    psycopg_pool.ConnectionPool(pg_dsn(), open=False, **falsy)  # what it takes, ours takes
    with make_pool(sock_path, app_name, min_size=0, max_size=1, timeout=10, **falsy) as pool:
        for _ in range(2):
            with pool.connection() as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
    assert wait_leased(sock_path, 0) == 0
    with pytest.raises(ConfigError, match="check: must be callable, got 'yes'"):
        ConnectionPool(pg_dsn(), resource="pg", coordinator=sock_path, open=False, check="yes")
