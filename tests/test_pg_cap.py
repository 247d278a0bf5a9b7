"""I1 seen from PostgreSQL's side: many processes, one cap, pg_stat_activity never over it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pg_helpers import BackendSampler, pg_dsn, slow_exit

from sharedpool import Client, Resource

WORKER = str(Path(__file__).with_name("pg_worker.py"))


def spawn(sock: str, app: str, iterations: int, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.Popen(
        [sys.executable, WORKER, sock, "pg", app, str(iterations), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_eight_processes_never_exceed_the_cap(pg: str, start_coordinator: Any, sock_path: str,
                                              app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=3, acquire_timeout=60)})
    with BackendSampler(app_name) as sampler:
        # Each checkout holds its connection 2 ms: however staggered the eight
        # start-ups, their work overlaps and the cap is reached.
        procs = [spawn(sock_path, app_name, 150, "4", "2", "0.002") for _ in range(8)]
        try:
            results = [finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        time.sleep(0.05)
    assert all(r["n_errors"] == 0 for r in results), [r["errors"] for r in results]
    assert sum(r["done"] for r in results) == 8 * 2 * 150
    assert sampler.samples > 100
    assert sampler.peak <= 3, f"PostgreSQL saw {sampler.peak} connections with a cap of 3"
    assert sampler.peak == 3, "the cap was never reached: the test proves nothing"
    assert sampler.count_now() == 0  # every connection closed after the workers stopped
    c = Client(sock_path)
    try:
        row = c.inspect("resources")["resources"][0]
        assert row["leased"] == 0 and row["peak"] == 3
    finally:
        c.close()


def test_sigkilled_worker_slot_goes_to_a_waiting_worker(pg: str, start_coordinator: Any,
                                                        sock_path: str, app_name: str) -> None:
    # The fence asks PostgreSQL whether the dead worker's backend is gone.
    start_coordinator({"pg": Resource(max_size=2, monitor_dsn=pg_dsn(), acquire_timeout=60)})
    c = Client(sock_path)
    with BackendSampler(app_name) as sampler:
        # Two workers hold both slots for longer than the test; a third waits. The
        # killed one's slot is the only one that can serve it (held 30 s, the
        # other holder's came free within the waiter's time, and it passed with
        # a coordinator that never returned a dead session's leases).
        holders = [spawn(sock_path, app_name, 1, "1", "1", "300") for _ in range(2)]
        waiter = None
        try:
            deadline = time.monotonic() + 20
            while c.inspect("resources")["resources"][0]["leased"] < 2:
                assert time.monotonic() < deadline, "holders never got their leases"
                time.sleep(0.02)
            waiter = spawn(sock_path, app_name, 5, "1", "1")
            while c.inspect("resources")["resources"][0]["waiting"] < 1:
                assert time.monotonic() < deadline, "the third worker never queued"
                time.sleep(0.02)
            os.kill(holders[0].pid, signal.SIGKILL)
            result = finish(waiter, timeout=30)
        finally:
            for p in [*holders, *([waiter] if waiter else [])]:
                if p.poll() is None:
                    p.kill()
                p.wait(10)
    assert result["done"] == 5 and result["n_errors"] == 0
    assert sampler.peak <= 2, f"PostgreSQL saw {sampler.peak} connections with a cap of 2"
    c.close()


def test_a_connection_its_user_closed_goes_back_only_once_its_backend_is_gone(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """``conn.close()`` inside the block (a user's habit with psycopg) left the
    pool no socket to watch: the lease went back at once while the backend was
    still exiting, and the next connect put PostgreSQL over the cap. The pool
    keeps a dup of each connection's socket, so the checkin waits for the
    server to let go as for any other close."""
    import psycopg

    from sharedpool import ConnectionPool, PoolConfig

    start_coordinator({"pg": Resource(max_size=1)})
    dsn = f"{pg} application_name={app_name}"
    with psycopg.connect(pg, autocommit=True) as monitor, \
            ConnectionPool(lambda: psycopg.connect(dsn, autocommit=True), PoolConfig(min_size=0, max_size=1),
                           resource="pg", coordinator=sock_path) as pool:
        seen = []
        for _ in range(10):
            with pool.connection() as conn:
                pid = conn.info.backend_pid
                slow_exit(conn)
                conn.close()
            # The lease is back: the backend must be gone from PostgreSQL's view.
            row = monitor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            seen.append(row[0] if row else None)
        assert seen == [0] * 10, f"backends still there after their lease went back: {seen}"
        assert pool.get_stats()["leases_held"] == 0
