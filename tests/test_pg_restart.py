"""PostgreSQL restarted under load: broken connections are detected and replaced,
no lease leaks. Marked slow: it restarts the machine's PostgreSQL, which would
disturb every other test running at the same time (run with `pytest -m slow`)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from typing import Any

import psycopg
import pytest
from pg_helpers import pg_dsn

from sharedpool import Client, ConnectionPool, PoolConfig, Resource

pytestmark = pytest.mark.slow


def _cluster() -> list[str]:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    return ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]


def test_postgres_restart_under_load(pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    start_coordinator({"pg": Resource(max_size=3, acquire_timeout=30)})
    pool = ConnectionPool(
        lambda: psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True, connect_timeout=5),
        PoolConfig(min_size=0, max_size=3, validation_bypass=0.0, acquire_timeout=30),
        resource="pg", coordinator=sock_path,
        check=lambda conn: conn.execute("SELECT 1"),
    )
    stop = time.monotonic() + 20
    ok, errors = [0], [0]
    after_restart_errors = [0]
    restarted = threading.Event()

    def loop() -> None:
        while time.monotonic() < stop:
            try:
                with pool.connection(timeout=30) as conn:
                    conn.execute("SELECT 1")
                ok[0] += 1
            except Exception:  # noqa: BLE001 - expected while PostgreSQL restarts
                errors[0] += 1
                if restarted.is_set() and time.monotonic() > restart_done + 3:
                    after_restart_errors[0] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    subprocess.run([*_cluster(), "restart"], check=True, timeout=120)
    restart_done = time.monotonic()
    restarted.set()
    for t in threads:
        t.join(60)
    metrics = pool.get_metrics()
    pool.close()
    assert ok[0] > 100
    assert after_restart_errors[0] == 0, "connections were not replaced after the restart"
    assert metrics["validation_failures"] + metrics["total_closed"] > 0
    probe = Client(sock_path)
    try:
        assert probe.inspect("resources")["resources"][0]["leased"] == 0  # no lease leaked
    finally:
        probe.close()
