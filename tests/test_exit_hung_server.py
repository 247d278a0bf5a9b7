"""release_process() when the database hangs (its backends stopped: a close
the server never confirms). The exit is bounded by its timeout, however many
pools, and waits for nothing it cannot get; a lease whose close is unconfirmed
is not handed on while its backend may still be alive (I1): it keeps its
session until the server lets go."""

from __future__ import annotations

import multiprocessing
import signal
import time
from typing import Any

import psycopg
from pg_helpers import BackendSampler, first_grant_sees, pg_dsn, signal_backends
from proc_helpers import leased, wait_leased, wait_no_other_sessions

from sharedpool import ConnectionPool, PoolConfig, Resource


def _psycopg_pool(sock: str, app: str) -> Any:
    from sharedpool.contrib.psycopg import ConnectionPool as LeasedPool

    pool = LeasedPool(pg_dsn(), resource="pg", coordinator=sock, min_size=1, max_size=1,
                      open=True, confirm_timeout=2.0,
                      kwargs={"application_name": app, "autocommit": True})
    pool.wait(10)  # one idle connection
    return pool


def _own_pool(sock: str, app: str) -> ConnectionPool[Any]:
    pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), autocommit=True, application_name=app),
                          PoolConfig(min_size=0, max_size=1, close_confirm_timeout=2.0),
                          resource="pg", coordinator=sock)
    with pool.connection():
        pass  # one idle connection
    return pool


def _worker_exits(sock: str, app: str, kinds: str, timeout: float, out: Any, done: Any) -> None:
    """A worker whose pools each hold one idle connection, all of whose
    backends then hang, exits (release_process) and stays alive until ``done``."""
    from sharedpool import release_process

    made = [(_own_pool if kind == "own" else _psycopg_pool)(sock, app) for kind in kinds.split(",")]
    signal_backends(app, signal.SIGSTOP)
    t0 = time.monotonic()
    release_process(timeout)
    out.put({"took": time.monotonic() - t0, "pools": len(made)})
    done.wait(30)


def _exit_then(sock: str, app: str, kinds: str, timeout: float, look: Any) -> dict[str, Any]:
    """Run :func:`_worker_exits`; ``look()`` while it is alive, its backends
    stopped; then let them go on (always) and the worker end."""
    ctx = multiprocessing.get_context("fork")
    out, done = ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_worker_exits, args=(sock, app, kinds, timeout, out, done))
    proc.start()
    try:
        result: dict[str, Any] = out.get(timeout=60)
        result["seen"] = look()
    finally:
        signal_backends(app, signal.SIGCONT)
        done.set()
        proc.join(10)
        if proc.exitcode is None:
            proc.kill()
    return result


def test_an_exit_waits_one_confirmation_for_a_hung_idle_close_not_its_timeout(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The integrations' pools (LeaseBook) waited the exit's whole timeout (10 s
    # here, 5 s a gunicorn worker's) for a close left to a watcher: nothing was
    # in use, and the watcher does not confirm while the server hangs.
    start_coordinator({"pg": Resource(max_size=2)})
    got = _exit_then(sock_path, app_name, "psycopg", 10.0, lambda: leased(sock_path))
    assert got["took"] < 5, got  # its confirm_timeout (2 s), not 10
    assert got["seen"] == 1, got  # the lease still held while the backend may live (I1)
    assert wait_leased(sock_path, 0) == 0  # given back once the server let go
    assert wait_no_other_sessions(sock_path) == []  # and the session ended with it
    assert BackendSampler(app_name).count_now() == 0


def test_several_pools_whose_server_hangs_exit_within_one_timeout(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # Each pool's first close waited its whole confirm timeout (2 s), however
    # little was left of release_process's: 3 pools, release_process(1) took 6 s.
    start_coordinator({"pg": Resource(max_size=3)})
    got = _exit_then(sock_path, app_name, "own,own,psycopg", 1.0, lambda: leased(sock_path))
    assert got["took"] < 3, got  # 1 s and a moment per pool after it
    assert got["seen"] == 3, got
    assert wait_leased(sock_path, 0) == 0
    assert wait_no_other_sessions(sock_path) == []


def test_a_lease_whose_close_hangs_at_exit_is_not_handed_on(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    # The integration's exit ended the session with the unconfirmed lease in it:
    # freed after quarantine_delay, while PostgreSQL still counted the backend.
    start_coordinator({"pg": Resource(max_size=1)})

    def another_process_waits() -> list[int]:
        waiting, seen = first_grant_sees(sock_path, app_name, timeout=20)
        time.sleep(0.5)  # the fence's quarantine_delay is 0.05 s: granted by now if freed
        signal_backends(app_name, signal.SIGCONT)  # the server lets go; the lease follows
        waiting.join(30)
        return seen

    got = _exit_then(sock_path, app_name, "psycopg", 1.0, another_process_waits)
    assert got["seen"] == [0], got  # granted only once the backend was gone
