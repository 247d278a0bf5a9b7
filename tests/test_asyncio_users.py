"""What an asyncio user meets: the pools are synchronous (no asyncio API), so an
async object handed to one is refused with a ConfigError saying what to do,
never accepted silently (no cap), a TypeError from deep inside, or a lease
held for good."""

from __future__ import annotations

import asyncio
import functools
import warnings
from typing import Any

import pytest
from proc_helpers import resource_row

from sharedpool import ConfigError, ConnectionPool, PoolConfig, PoolMisuse, PoolTimeout, pooled
from sharedpool.testing import FakeConnection, FakeFactory


async def _async_connect() -> FakeConnection:
    return FakeConnection()


@pytest.mark.parametrize("field", ["factory", "check", "configure"])
@pytest.mark.parametrize("make", [lambda: _async_connect, lambda: functools.partial(_async_connect)],
                         ids=["coroutine-function", "partial"])
def test_a_coroutine_function_is_refused_where_it_is_given(field: str, make: Any) -> None:
    # It used to be taken: its coroutine was handed out as the connection.
    kwargs: dict[str, Any] = {"factory": FakeFactory(), field: make()}
    with pytest.raises(ConfigError, match="coroutine function.*asyncio.to_thread") as err:
        ConnectionPool(kwargs.pop("factory"), PoolConfig(min_size=0), **kwargs)
    assert err.value.field == field
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0), resource="pg") as pool:
        assert pool.name == "pool-pg"  # the checks leave the name alone


def test_pooled_refuses_an_async_function() -> None:
    # Its coroutine ran after the wrapper had checked the connection in: four
    # concurrent calls shared one connection, get_in_use() 0 while they used it.
    async def handler(conn: Any) -> None:
        pass

    async def rows(conn: Any) -> Any:
        yield conn

    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0)) as pool:
        for func in (handler, rows):
            with pytest.raises(ConfigError, match="checked in before its body runs") as err:
                pooled(pool)(func)
            assert err.value.field == "func"


def test_an_awaitable_from_the_factory_is_refused_and_its_lease_goes_back(
        start_coordinator: Any, sock_path: str) -> None:
    # lambda: AsyncConnection.connect(dsn) is no coroutine function: its coroutine
    # was the "connection", leased, checked out; awaited by the caller, a real
    # connection the pool never counted (and never closed: the cap broken).
    start_coordinator({"pg": 2})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine ... was never awaited"
        with ConnectionPool(lambda: _async_connect(), PoolConfig(min_size=0, max_size=2),
                            resource="pg", coordinator=sock_path) as pool:
            for _ in range(2):
                with pytest.raises(ConfigError, match="returned an awaitable") as err:
                    pool.acquire(timeout=5)
                assert err.value.field == "factory"
            assert pool.get_size() == 0 and pool.get_stats()["leases_held"] == 0
    assert resource_row(sock_path)["leased"] == 0


def test_a_timeout_inside_a_running_loop_says_the_loop_was_blocked() -> None:
    # A task holds the one connection across an await; another calls the pool
    # in the loop: the wait stops the loop, so the holder cannot give it back.
    # The PoolTimeout said only "(1 open, 1 in use, max_size=1)".
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1)) as pool:
        async def holder() -> None:
            with pool.connection(timeout=5):
                await asyncio.sleep(0.5)

        async def waiter() -> str:
            await asyncio.sleep(0.05)
            with pytest.raises(PoolTimeout) as err:
                pool.acquire(timeout=0.2)
            return str(err.value)

        async def main() -> str:
            return (await asyncio.gather(holder(), waiter()))[1]

        assert "blocked a running asyncio event loop" in asyncio.run(main())
        held = pool.acquire(timeout=5)
        with pytest.raises(PoolTimeout) as err:  # outside a loop: no such note
            pool.acquire(timeout=0.1)
        assert "event loop" not in str(err.value)
        pool.release(held)


def test_async_with_a_checkout_says_what_to_do() -> None:
    # It was "'_Checkout' object does not support the asynchronous context manager protocol".
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0)) as pool:
        async def main() -> None:
            with pytest.raises(PoolMisuse, match="sync context manager.*asyncio.to_thread"):
                async with pool.connection():
                    pass

        asyncio.run(main())
        assert pool.get_in_use() == 0


def test_the_pool_used_from_a_running_loop_through_threads_holds_the_cap(  # the README's way
        start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"pg": 2})
    factory = FakeFactory()
    with ConnectionPool(factory, PoolConfig(min_size=0, max_size=4),
                        resource="pg", coordinator=sock_path) as pool:
        def work() -> None:
            with pool.connection(timeout=30):
                pass

        async def main() -> None:
            await asyncio.gather(*(asyncio.to_thread(work) for _ in range(100)))

        asyncio.run(main())
        assert len(factory.made) <= 2 and pool.get_in_use() == 0
    assert resource_row(sock_path)["peak"] <= 2


def test_a_redis_asyncio_client_given_the_pool_is_refused_before_any_lease(
        start_coordinator: Any, sock_path: str, redis_name: str) -> None:
    import redis.asyncio

    from sharedpool.contrib.redis import BlockingConnectionPool

    start_coordinator({"redis": 2})
    pool = BlockingConnectionPool(host="127.0.0.1", resource="redis", coordinator=sock_path,
                                  max_connections=2, timeout=5, client_name=redis_name)
    try:
        async def main() -> None:
            client = redis.asyncio.Redis(connection_pool=pool)
            for _ in range(3):  # each was a TypeError from redis-py and one more lease held for good
                with pytest.raises(ConfigError, match="redis.asyncio client") as err:
                    await client.ping()
                assert err.value.field == "connection_pool"

        asyncio.run(main())
        assert pool.lease_stats()["leases_held"] == 0
        assert resource_row(sock_path)["leased"] == 0
    finally:
        pool.disconnect()


def test_redis_asyncio_connection_class_is_refused() -> None:
    import redis.asyncio

    from sharedpool.contrib.redis import BlockingConnectionPool

    # It was an AttributeError from release() at the first command.
    with pytest.raises(ConfigError, match="redis.asyncio") as err:
        BlockingConnectionPool(resource="redis", connection_class=redis.asyncio.Connection)
    assert err.value.field == "connection_class"


@pytest.mark.parametrize("field", ["connection_class", "check", "reset", "configure", "reconnect_failed"])
def test_psycopg_pool_async_arguments_are_refused(field: str) -> None:
    import psycopg

    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    async def hook(conn: Any) -> None:
        pass

    given = psycopg.AsyncConnection if field == "connection_class" else hook
    # connection_class: every connect failed, logged, then a PoolTimeout; the hooks
    # were called and their coroutines never awaited (no check, no reset, no setup;
    # reconnect_failed's alert never ran once reconnect_timeout had passed).
    with pytest.raises(ConfigError) as err:
        PsycopgPool("", resource="pg", open=False, **{field: given})
    assert err.value.field == field


def test_sqlalchemy_async_creator_is_refused() -> None:
    from sharedpool.contrib.sqlalchemy import create_engine

    # It was "'coroutine' object has no attribute 'add_notice_handler'" at the first connect.
    with pytest.raises(ConfigError, match="coroutine function") as err:
        create_engine("postgresql+psycopg://", creator=_async_connect, resource="pg")
    assert err.value.field == "creator"
