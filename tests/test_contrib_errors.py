"""While the coordinator refuses leases because connects to a resource fail
everywhere, the integrations raise what the host library raises for a server
that is down, so that `except OperationalError` / `except redis.ConnectionError`
(and redis-py's Retry) keep working through an outage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from proc_helpers import import_refused

from sharedpool import Client, ResourceUnavailable
from sharedpool.reports import FAILURE_THRESHOLD


@pytest.fixture
def failing(start_coordinator: Any, sock_path: str) -> Iterator[Callable[[], None]]:
    """A coordinator with resources 'pg' and 'redis', and how to make them failing
    for this process: the failures are reported by the session its integrations
    share (a process whose own connects failed is refused fast). Refused for
    FAILURE_BACKOFF (1 s) only, then one acquire may probe: so called last, once
    the test's imports are done and its pool made (a first import of SQLAlchemy
    took the test past that second on a loaded machine, and its connect worked)."""
    start_coordinator({"pg": 2, "redis": 2})
    reporter = Client.for_path(sock_path)

    def fail() -> None:
        assert reporter.ensure_connected()
        for resource in ("pg", "redis"):
            for _ in range(FAILURE_THRESHOLD):
                reporter.report_failure(resource)
        deadline = time.monotonic() + 5
        while not all(r["failing"] for r in reporter.inspect("resources")["resources"]):
            assert time.monotonic() < deadline, "the failures never reached the coordinator"
            time.sleep(0.01)

    try:
        yield fail
    finally:
        reporter.close()


def test_sqlalchemy_raises_operational_error(failing: Callable[[], None], sock_path: str) -> None:
    import sqlalchemy

    from sharedpool.contrib.sqlalchemy import create_engine

    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/test", resource="pg",
                           coordinator=sock_path, pool_timeout=5)
    try:
        failing()
        with pytest.raises(sqlalchemy.exc.OperationalError) as err, engine.connect():
            pass
        assert isinstance(err.value.orig, ResourceUnavailable)
        assert "failing" in str(err.value)
        assert engine.pool.lease_stats()["leases_held"] == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()


def test_redis_raises_connection_error(failing: Callable[[], None], sock_path: str) -> None:
    import redis

    from sharedpool.contrib.redis import BlockingConnectionPool, LeaseUnavailable

    pool = BlockingConnectionPool(host="127.0.0.1", port=6379, resource="redis",
                                  coordinator=sock_path, timeout=5)
    client = redis.Redis(connection_pool=pool, retry=None)
    try:
        failing()
        with pytest.raises(redis.ConnectionError) as err:
            client.ping()
        assert isinstance(err.value, LeaseUnavailable) and isinstance(err.value, ResourceUnavailable)
        assert err.value.reason == "failing"
    finally:
        pool.disconnect()


def test_a_connect_that_works_after_failures_in_one_report_ends_the_streak(
        start_coordinator: Any, sock_path: str) -> None:
    """Connects failing, then one that works, within one report window (0.2 s:
    a recovery, a pool's threads all retrying): the report carried both, the
    coordinator cleared the streak then added the failures, so the resource was
    failing (acquires refused for a second, status 'failing' until another
    connect worked) right after it had come back."""
    start_coordinator({"r": 2})
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        with client._report_lock:  # one report window: nothing goes out meanwhile
            for _ in range(FAILURE_THRESHOLD):
                client.report_failure("r")
            client.report_success("r")
        client.report_now()
        assert not client.inspect("resources")["resources"][0]["failing"]
        client.release(client.acquire("r", timeout=2))
    finally:
        client.close()


@pytest.mark.parametrize(("module", "host", "extra"), [
    ("sqlalchemy", "sqlalchemy", "sqlalchemy"),
    ("psycopg", "psycopg_pool", "psycopg-pool"),
    ("redis", "redis", "redis"),
    ("celery", "celery", "celery"),
])
def test_without_its_host_library_an_integration_says_what_to_install(module: str, host: str,
                                                                      extra: str) -> None:
    # Before: a bare "No module named 'sqlalchemy'" from the integration's first
    # line, naming neither the integration nor the extra that installs it.
    err = import_refused(f"import sys\nsys.modules[{host!r}] = None\nimport sharedpool.contrib.{module}\n")
    assert f"sharedpool.contrib.{module} needs" in err and f"pip install 'sharedpool[{extra}]'" in err, err
    assert host in err, err  # what is missing, as Python said it
