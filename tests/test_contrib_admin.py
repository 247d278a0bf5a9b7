"""Admin verbs reach the integrations' pools too: `drain` closes their idle
connections now and in-use ones at checkin, `resume` lets them lease again,
`end-session` ends a process's pools for good. Before, the integrations
(SQLAlchemy, redis-py, psycopg_pool) acted on no push but "revoke": the verbs
answered success and the connections lived on."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pg_helpers import pg_dsn
from proc_helpers import wait_leased

from sharedpool import Client, PoolClosed, ResourceUnavailable


@pytest.fixture
def admin(start_coordinator: Any, sock_path: str) -> Iterator[Client]:
    start_coordinator({"pg": 2, "redis": 2})
    client = Client(sock_path, name="admin")
    try:
        yield client
    finally:
        client.close()


def _backends(app_name: str) -> int:
    import psycopg

    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (app_name,)).fetchone()
    return int(row[0]) if row else -1


def _leased(admin: Client, name: str) -> int:
    return next(int(r["leased"]) for r in admin.inspect("resources")["resources"] if r["name"] == name)


def _until(check: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_drain_and_resume_reach_a_sqlalchemy_engine(admin: Client, sock_path: str, app_name: str) -> None:
    import sqlalchemy
    from sqlalchemy import text

    from sharedpool.contrib.sqlalchemy import create_engine

    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/test?application_name={app_name}",
                           resource="pg", coordinator=sock_path, pool_size=2, max_overflow=0,
                           pool_timeout=2)
    try:
        busy = engine.connect()
        busy.execute(text("SELECT 1"))
        with engine.connect() as idle:
            idle.execute(text("SELECT 1"))  # checked in: idle in the engine's pool
        assert wait_leased(sock_path, 2) == 2
        admin.admin("drain", resource="pg")
        assert _until(lambda: _backends(app_name) == 1), "the idle connection was not closed"
        assert wait_leased(sock_path, 1) == 1
        with pytest.raises(sqlalchemy.exc.OperationalError) as err, engine.connect():
            pass
        assert isinstance(err.value.orig, ResourceUnavailable) and isinstance(err.value.orig, PoolClosed)
        busy.close()  # in use during the drain: closed at its checkin
        assert _until(lambda: _backends(app_name) == 0), "the in-use connection outlived its checkin"
        assert wait_leased(sock_path, 0) == 0
        admin.admin("resume", resource="pg")
        with engine.connect() as conn:  # leases again
            assert conn.execute(text("SELECT 1")).scalar() == 1
    finally:
        engine.dispose()


def test_end_session_ends_a_redis_pool_for_good(admin: Client, sock_path: str) -> None:
    import os

    import redis

    from sharedpool.contrib.redis import BlockingConnectionPool

    pool = BlockingConnectionPool(host="127.0.0.1", port=6379, resource="redis",
                                  coordinator=sock_path, max_connections=2, timeout=2)
    client = redis.Redis(connection_pool=pool, retry=None)
    try:
        assert client.ping()
        assert _leased(admin, "redis") == 1
        admin.admin("end_session", pid=os.getpid(), timeout=5)  # this process: the admin client too
        assert _until(lambda: _leased(admin, "redis") == 0), "the redis lease was kept"
        with pytest.raises(PoolClosed):
            client.ping()
        time.sleep(0.3)  # the client reconnects; the pool still refuses
        with pytest.raises(PoolClosed):
            client.ping()
        assert _leased(admin, "redis") == 0
    finally:
        pool.disconnect()


def test_drain_and_resume_reach_a_psycopg_pool(admin: Client, sock_path: str, app_name: str) -> None:
    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    pool = PsycopgPool(f"{pg_dsn()} application_name={app_name}", resource="pg", coordinator=sock_path,
                       min_size=0, max_size=2, timeout=2, open=True)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        assert _until(lambda: _backends(app_name) == 1)
        admin.admin("drain", resource="pg")
        assert _until(lambda: _backends(app_name) == 0), "the idle connection was not closed"
        assert _until(lambda: _leased(admin, "pg") == 0)
        admin.admin("resume", resource="pg")
        with pool.connection() as conn:  # leases again
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pool.close()


@pytest.mark.parametrize("integration", ["sqlalchemy", "psycopg_pool", "redis"])
def test_a_revoked_lease_closes_an_integrations_connections(
        start_coordinator: Any, sock_path: str, app_name: str, integration: str) -> None:
    """A coordinator restarted without the resource revokes the leases it cannot
    take back: those connections count against no cap. They stayed open, in
    the host pool, for as long as it kept them; now the idle one is closed at
    once and the one in use at its checkin, like a sharedpool pool's."""
    first = start_coordinator({"pg": 2})
    dsn = f"{pg_dsn()} application_name={app_name}"
    opened = functools.partial(_backends, app_name)
    if integration == "redis":
        import redis

        from sharedpool.contrib.redis import BlockingConnectionPool

        rpool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=app_name, resource="pg",
                                       coordinator=sock_path, max_connections=2, timeout=5)
        held = rpool.get_connection()
        redis.Redis(connection_pool=rpool).ping()

        def opened() -> int:
            r = redis.Redis(host="127.0.0.1", port=6379)
            try:
                return sum(1 for c in r.client_list() if c.get("name") == app_name)
            finally:
                r.close()

        check_in, close = (lambda: rpool.release(held)), rpool.disconnect
    elif integration == "sqlalchemy":
        from sqlalchemy import text

        from sharedpool.contrib.sqlalchemy import create_engine

        engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/test?application_name={app_name}",
                               resource="pg", coordinator=sock_path, pool_size=2, max_overflow=0)
        busy = engine.connect()
        busy.execute(text("SELECT 1"))
        with engine.connect() as idle:
            idle.execute(text("SELECT 1"))
        check_in, close = busy.close, engine.dispose
    else:
        from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

        pool = PsycopgPool(dsn, resource="pg", coordinator=sock_path, min_size=0, max_size=2,
                           timeout=5, open=True)
        raw = pool.getconn()
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        check_in, close = (lambda: pool.putconn(raw)), pool.close
    try:
        assert _until(lambda: opened() == 2)
        first.kill()
        start_coordinator({"other": 2})  # "pg" is gone from the new configuration
        assert _until(lambda: opened() == 1, 10), "the idle revoked connection stayed open"
        check_in()
        assert _until(lambda: opened() == 0), "the revoked connection outlived its checkin"
    finally:
        close()


def test_an_operators_drain_is_info_in_each_worker_and_end_session_a_warning(
        admin: Client, sock_path: str, caplog: Any) -> None:
    """Every worker logs what the coordinator pushed: a drain or resume an
    operator ordered is not a fault (at warning, a fleet reporting to Sentry
    got one event per worker per verb); the end of a process's pools is."""
    import logging
    import os

    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.contrib._leases import LeaseBook
    from sharedpool.testing import FakeFactory

    caplog.set_level(logging.INFO, logger="sharedpool")
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=2), resource="pg",
                          coordinator=sock_path)
    book = LeaseBook("pg", sock_path, reclaim=lambda n: 0)
    try:
        with pool.connection():
            pass
        assert book.client is not None

        def said(verb: str) -> list[int]:
            return [r.levelno for r in caplog.records if f"coordinator says {verb}" in r.getMessage()]

        admin.admin("drain", resource="pg")
        assert _until(lambda: len(said("drain")) == 2), caplog.text
        admin.admin("resume", resource="pg")
        assert _until(lambda: len(said("resume")) == 1), caplog.text
        assert set(said("drain") + said("resume")) == {logging.INFO}
        admin.admin("end_session", pid=os.getpid(), timeout=5)
        assert _until(lambda: len(said("end_session")) == 2), caplog.text
        assert set(said("end_session")) == {logging.WARNING}
    finally:
        book.shutdown()
        pool.close()


def test_end_session_ends_a_psycopg_pool_for_good_at_once(admin: Client, sock_path: str,
                                                          app_name: str) -> None:
    # Its getconn() waited out its timeout, psycopg_pool logging "error connecting",
    # and raised PoolTimeout: the README says later checkouts raise PoolClosed.
    import os

    from psycopg_pool import PoolClosed as PsycopgPoolClosed

    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    pool = PsycopgPool(f"{pg_dsn()} application_name={app_name}", resource="pg", coordinator=sock_path,
                       min_size=0, max_size=2, timeout=3, open=True)
    try:
        with pool.connection() as conn:
            conn.execute("SELECT 1")
        admin.admin("end_session", pid=os.getpid(), timeout=5)  # this process: the admin client too
        assert _until(lambda: _leased(admin, "pg") == 0), "the lease was kept"
        t0 = time.monotonic()
        with pytest.raises(PsycopgPoolClosed, match="end-session"):
            pool.getconn()
        assert time.monotonic() - t0 < 1, "waited out its timeout"
        assert _until(lambda: _backends(app_name) == 0)
    finally:
        pool.close()


def test_end_session_ends_a_sqlalchemy_engine_for_good_at_once(admin: Client, sock_path: str,
                                                              app_name: str) -> None:
    # QueuePool keeps the records of the connections end-session closed: without
    # pool_pre_ping a checkout then got one of them closed, its first query failing.
    import os

    from sqlalchemy import text

    from sharedpool.contrib.sqlalchemy import create_engine

    engine = create_engine(f"postgresql+psycopg://root@127.0.0.1:5432/test?application_name={app_name}",
                           resource="pg", coordinator=sock_path, pool_size=2, max_overflow=0,
                           pool_timeout=3)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        admin.admin("end_session", pid=os.getpid(), timeout=5)  # this process: the admin client too
        assert _until(lambda: _leased(admin, "pg") == 0), "the lease was kept"
        t0 = time.monotonic()
        with pytest.raises(PoolClosed, match="end-session"):
            engine.connect()
        assert time.monotonic() - t0 < 1, "waited out its timeout"
        assert _until(lambda: _backends(app_name) == 0)
    finally:
        engine.dispose()
