"""A local pool's lease figures add up to the coordinator's: the pools'
``leases_acquired`` sum to its ``grants`` (README, Metrics), also for grants
that went straight back unused."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fake_coordinator import GrantCrossingCancel
from proc_helpers import resource_row

from sharedpool import ConnectionPool, PoolClosed, PoolConfig, PoolStatus
from sharedpool.lease import AcquireRequest
from sharedpool.testing import FakeFactory


def _until(check: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_grant_crossing_the_withdrawal_of_a_served_wait_counts_as_unused(sock_path: str) -> None:
    """A waiter served by a checkin while its opener's lease request was out: the
    request is withdrawn, and a grant that crossed the withdrawal goes back. Before:
    the pool counted it nowhere (6 processes x 4 threads, cap 4, 8 s: grants 642
    against 636 leases_acquired summed over the pools, the gap exactly such grants)."""
    fake = GrantCrossingCancel(sock_path, at_once=1)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2, test_on_acquire=False),
                          resource="r", coordinator=sock_path)
    try:
        held = pool.acquire(timeout=5)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
        waiter.start()
        _until(lambda: len(fake.acquires) == 2, "the second lease request")
        pool.release(held)  # serves the waiter: its lease request is withdrawn, and crosses a grant
        waiter.join(5)
        assert got, "the waiter was not served by the checkin"
        _until(lambda: fake.released, "the crossing grant given back")
        stats = pool.get_stats()
        assert stats["leases_acquired"] == 2, stats  # as the coordinator's grants
        assert stats["leases_unused"] == 1, stats
        assert stats["leases_held"] == 1, stats
        pool.release(got[0])
    finally:
        pool.close()
        fake.stop()


def test_failed_top_ups_count_the_leases_they_were_granted(start_coordinator: Any, sock_path: str) -> None:
    """A min_size top-up takes a lease, then its connect fails and the lease goes
    back. Before: counted only once connected, so with the database down every
    round was a grant with no leases_acquired (grants 3, leases_acquired 0)."""
    start_coordinator({"r": 4})
    factory = FakeFactory(fail=OSError("connection refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=1, max_size=1, validation_interval=0.05),
                          resource="r", coordinator=sock_path)
    try:
        _until(lambda: factory.calls >= 3, "three failed top-ups")
    finally:
        pool.close()
    row = resource_row(sock_path)
    assert row["leased"] == 0 and row["grants"] >= 3, row
    assert pool.get_stats()["leases_acquired"] == row["grants"], (pool.get_stats(), row)


def test_a_lease_granted_as_the_pool_closes_counts_as_unused(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The opener's lease came in as close() ran: given back with PoolClosed.
    Before: the coordinator counted the grant, the pool nothing."""
    start_coordinator({"r": 2})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r",
                          coordinator=sock_path)
    wait = AcquireRequest.wait
    closer: list[threading.Thread] = []

    def closing_wait(ticket: AcquireRequest) -> Any:
        lease = wait(ticket)  # taken: a close() from now on cannot withdraw it
        closer.append(threading.Thread(target=pool.close, args=(5,)))
        closer[0].start()
        _until(lambda: pool.status is PoolStatus.CLOSED, "the close")
        return lease

    monkeypatch.setattr(AcquireRequest, "wait", closing_wait)
    with pytest.raises(PoolClosed):
        pool.acquire(timeout=5)
    closer[0].join(5)
    row = resource_row(sock_path)
    assert row["leased"] == 0 and row["grants"] == 1, row
    stats = pool.get_stats()
    assert stats["leases_acquired"] == 1, stats
    assert stats["leases_unused"] == 1, stats
