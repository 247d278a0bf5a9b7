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

from sharedpool import ConfigError, ConnectionPool, PoolConfig
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
