"""Leak detection: a connection held past leak_detection_threshold is logged with
the stack where it was acquired, and shows as a suspected leak in `leases`."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

from sharedpool import Client, ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory


def hold_too_long(pool: ConnectionPool[Any], seconds: float) -> Any:
    w = pool.acquire()  # the acquiring call site the warning must name
    time.sleep(seconds)
    return w


def test_leak_is_logged_with_the_acquiring_stack_and_reported(
        start_coordinator: Any, sock_path: str, caplog: pytest.LogCaptureFixture) -> None:
    start_coordinator({"r": 2})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2, leak_detection_threshold=0.2),
                          resource="r", coordinator=sock_path)
    probe = Client(sock_path)
    try:
        with caplog.at_level(logging.WARNING, logger="sharedpool.pool"):
            w = hold_too_long(pool, 0.8)
        warnings = [r.getMessage() for r in caplog.records if "leak_detection_threshold" in r.getMessage()]
        assert len(warnings) == 1, warnings  # once, not at every maintenance round
        assert "hold_too_long" in warnings[0] and "test_leaks.py" in warnings[0]
        deadline = time.monotonic() + 5
        while True:  # the coalesced report reaches the coordinator
            rows = probe.inspect("leases")["leases"]
            if rows and rows[0]["suspected_leak"]:
                break
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        assert "hold_too_long" in rows[0]["site"]
        # The warning names what `sharedpool leases` shows for it.
        assert f"(pid {rows[0]['pid']}, resource 'r', lease {rows[0]['id']})" in warnings[0]
        pool.release(w)
        deadline = time.monotonic() + 5
        while probe.inspect("leases")["leases"][0]["suspected_leak"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        pool.close()
        probe.close()


def test_leak_detection_is_off_by_default() -> None:
    assert PoolConfig().leak_detection_threshold is None


def test_a_connection_handed_on_but_not_yet_stamped_is_no_leak(caplog: pytest.LogCaptureFixture) -> None:
    """A connection given to a waiting thread (or a new one from an opener)
    is in use a moment before that thread stamps its checkout time. A leak
    check in between read the last checkout's time, 0.0 for a new connection,
    and warned at once of a leak as old as the host's uptime with no call
    site ("checked out for 1319.1s ... acquired at: (unknown)": twice in
    5,200 checkouts of one run), and the lease was reported a suspected leak."""
    from sharedpool import maintenance

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, leak_detection_threshold=0.2),
                          coordinator=None)
    try:
        w = pool.acquire()
        pool.release(w)
        with pool._lock:  # what _hand_over does; the waiter's thread has not run yet
            pool._idle.remove(w)
            w.in_use = True
        later = time.monotonic() + 60

        def warned() -> list[str]:  # not what another test's pool, collected now, says
            return [r.getMessage() for r in caplog.records if "leak_detection_threshold" in r.getMessage()]

        with caplog.at_level(logging.WARNING, logger="sharedpool.pool"):
            maintenance.check_leaks(pool, later)
            assert not w.warned and not warned()
            w.checked_out_at = time.monotonic()  # the waiter's thread stamps it: now it counts
            maintenance.check_leaks(pool, later)
        assert w.warned and len(warned()) == 1
    finally:
        pool.close()
