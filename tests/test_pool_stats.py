"""A local pool's figures: its lease counters add up to the coordinator's (the
pools' ``leases_acquired`` sum to its ``grants``, README, Metrics), also for
grants that went straight back unused; its request counters are counted as
psycopg_pool's are, and never go down."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from fake_coordinator import GrantCrossingCancel
from proc_helpers import resource_row

from sharedpool import ConnectionPool, PoolClosed, PoolConfig, PoolStatus, receiving
from sharedpool.lease import AcquireRequest
from sharedpool.testing import FakeFactory


def _until(check: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_grant_crossing_the_withdrawal_of_a_served_wait_counts_as_unused(
        sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiter served by a checkin while its opener's lease request was out: the
    request is withdrawn, and a grant that crossed the withdrawal goes back. Before:
    the pool counted it nowhere (6 processes x 4 threads, cap 4, 8 s: grants 642
    against 636 leases_acquired summed over the pools, the gap exactly such grants).
    The count is made before the release goes out (slowed here): before, a loaded
    CI saw the release and read the figures between the two."""
    told = receiving.tell_unused
    monkeypatch.setattr(receiving, "tell_unused", lambda owner: (time.sleep(0.3), told(owner)))
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


def test_requests_num_never_goes_down_when_a_checkout_fails_validation() -> None:
    """A fast-path checkout whose idle connection fails validation goes on in the
    slow path. Before: requests_num was counted at the take, taken back when the
    validation failed and counted again once served, so a pop_stats() while the
    check ran, and the next while the new connection was made, read 1 then -1
    (prometheus_client's Counter.inc(-1) raises)."""
    failing, checking, checked, connecting, connected = (threading.Event() for _ in range(5))

    def check(conn: Any) -> bool:
        if not failing.is_set():
            return True
        checking.set()
        assert checked.wait(5)
        return False

    factory = FakeFactory()

    def gated() -> Any:
        if failing.is_set():
            connecting.set()
            assert connected.wait(5)
        return factory()

    pool = ConnectionPool(gated, PoolConfig(min_size=0, max_size=2, validation_bypass=0.0),
                          check=check)
    try:
        pool.release(pool.acquire(timeout=5))
        pool.pop_stats()
        failing.set()
        checkout = threading.Thread(target=lambda: pool.release(pool.acquire(timeout=5)))
        checkout.start()
        assert checking.wait(5)
        during_check = pool.pop_stats()["requests_num"]
        checked.set()  # fails: the checkout goes on in the slow path, and a connection is made
        assert connecting.wait(5)
        while_connecting = pool.pop_stats()["requests_num"]
        connected.set()
        checkout.join(5)
        after = pool.pop_stats()
        assert (during_check, while_connecting, after["requests_num"]) == (1, 0, 0)
        assert after["requests_errors"] == 0, after
        assert pool.get_metrics()["total_acquired"] == 2  # the warm-up and the one served
    finally:
        checked.set()
        connected.set()
        pool.close()


def test_a_waiting_checkout_counts_in_requests_num_as_it_is_asked_for() -> None:
    """As psycopg_pool's requests_num (counted before the wait): requests_queued
    never exceeds it. Before: counted once served or failed, so a pool with
    checkouts waiting read requests_queued 4 against requests_num 1, and here 2
    against 1."""
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1))
    try:
        held = pool.acquire(timeout=5)
        waiter = threading.Thread(target=lambda: pool.release(pool.acquire(timeout=5)))
        waiter.start()
        _until(lambda: pool.get_stats()["requests_waiting"] == 1, "the checkout to wait")
        stats = pool.get_stats()
        # Both queued: the first found the pool empty (min_size=0) and had one made.
        assert (stats["requests_num"], stats["requests_queued"]) == (2, 2), stats
        pool.release(held)
        waiter.join(5)
        stats = pool.get_stats()
        assert (stats["requests_num"], stats["requests_queued"], stats["requests_errors"]) == (2, 2, 0)
    finally:
        pool.close()
