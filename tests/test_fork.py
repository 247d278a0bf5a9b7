"""I7: a pool or client inherited across fork() never uses the parent's socket
or connections; the child starts its own session lazily."""

from __future__ import annotations

import os
from typing import Any

import psycopg
from pg_helpers import pg_dsn

from sharedpool import Client, ConnectionPool, PoolConfig


def _run_in_child(fn: Any) -> int:
    """Fork; run ``fn`` in the child; its return value (0 = ok) is the exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = fn()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_forked_client_starts_its_own_session(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 4})
    parent = Client(sock_path)
    lease = parent.acquire("r", timeout=2)
    parent_session = parent.session_id

    def child() -> int:
        got = parent.acquire("r", timeout=2)  # the same object, now in the child
        sessions = parent.inspect("sessions")["sessions"]
        mine = [s for s in sessions if s["pid"] == os.getpid()]
        ok = parent.session_id != parent_session and len(mine) == 1 and lease.id not in parent.held
        parent.release(got)
        return 0 if ok else 3

    try:
        assert _run_in_child(child) == 0
        # The parent's session and lease are untouched by the child's life and death.
        rows = parent.inspect("leases")["leases"]
        assert [r["id"] for r in rows] == [lease.id]
        assert parent.session_id == parent_session
    finally:
        parent.close()


def test_forked_pool_never_touches_parent_connections(pg: str, start_coordinator: Any,
                                                      sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": 4})
    pool = ConnectionPool(
        lambda: psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True),
        PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock_path,
    )
    with pool.connection() as conn:
        parent_backend = conn.info.backend_pid

    def child() -> int:
        with pool.connection() as conn:  # a new connection, its own lease
            mine = conn.info.backend_pid
        pool.close()  # closes only the child's connections
        return 0 if mine != parent_backend else 4

    try:
        assert _run_in_child(child) == 0
        with pool.connection() as conn:  # the parent's connection still works
            assert conn.info.backend_pid == parent_backend
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert pool.get_metrics()["total_created"] == 1
    finally:
        pool.close()


def test_two_threads_of_a_child_reset_the_pool_once(start_coordinator: Any, sock_path: str) -> None:
    import threading

    from sharedpool.testing import FakeFactory

    start_coordinator({"r": 4})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=4), resource="r",
                          coordinator=sock_path)
    with pool.connection():
        pass

    def child() -> int:
        barrier = threading.Barrier(2)
        got: list[Any] = []

        def take() -> None:
            barrier.wait()
            got.append(pool.acquire(timeout=5))

        threads = [threading.Thread(target=take) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        ok = len(got) == 2 and pool.get_size() == 2 and pool.get_metrics()["opening"] == 0
        for w in got:
            pool.release(w)
        pool.close()
        return 0 if ok else 5

    try:
        assert _run_in_child(child) == 0
        assert pool.get_size() == 1  # the parent's pool is untouched
    finally:
        pool.close()


def _sockets_open() -> set[int]:
    """Inodes of this process's open sockets (fd numbers get reused; inodes do not)."""
    inodes = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.stat(f"/proc/self/fd/{name}")
        except OSError:
            continue
        inodes.add(st.st_ino)
    return inodes


def test_client_fds_are_closed_in_a_child_and_at_close(start_coordinator: Any,
                                                       sock_path: str) -> None:
    # The background thread's wake-up pair is per process: a child closes the
    # parent's copies (a forking server would otherwise gather them), and
    # close() leaves no fd behind.
    start_coordinator({"r": 1})
    client = Client(sock_path)
    client.release(client.acquire("r", timeout=2))  # the background thread runs
    pair = {os.fstat(client._wake_r.fileno()).st_ino, os.fstat(client._wake_w.fileno()).st_ino}

    def child() -> int:
        return 0 if not pair & _sockets_open() else 5

    assert _run_in_child(child) == 0
    assert pair <= _sockets_open()  # the parent's own are untouched
    thread = client._thread
    client.close()
    assert thread is not None
    thread.join(5)
    assert not pair & _sockets_open()
