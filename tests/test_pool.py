"""The local pool on its own (no coordinator): the seed's contract, without its defects."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from proc_helpers import start_recording

from sharedpool import (
    ConfigError,
    ConnectionPool,
    ConnectTimeout,
    PoolClosed,
    PoolConfig,
    PooledConnection,
    PoolMisuse,
    PoolStatus,
    PoolTimeout,
    SharedPoolError,
    pooled,
)
from sharedpool.testing import FakeFactory


def make_pool(factory: FakeFactory | None = None, **cfg: object) -> ConnectionPool:
    cfg.setdefault("min_size", 0)
    cfg.setdefault("max_size", 2)
    return ConnectionPool(factory or FakeFactory(), PoolConfig(**cfg), coordinator=None)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_env_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)


def test_seed_defaults_kept() -> None:
    c = PoolConfig()
    assert (c.min_size, c.max_size, c.connection_timeout, c.acquire_timeout) == (5, 20, 30.0, 10.0)
    assert (c.idle_timeout, c.max_lifetime, c.validation_interval) == (300.0, 3600.0, 30.0)
    assert c.test_on_acquire is True and c.test_on_release is False


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_size", 0), ("min_size", -1), ("acquire_timeout", -1), ("connection_timeout", 0),
     ("test_on_acquire", "yes"), ("max_size", 2.5), ("idle_timeout", float("nan"))],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        PoolConfig(**{field: value})  # type: ignore[arg-type]
    assert info.value.field == field
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)


def test_min_size_above_max_size() -> None:
    with pytest.raises(ConfigError, match="min_size"):
        PoolConfig(min_size=5, max_size=2)


def test_acquire_on_empty_pool_creates_a_connection() -> None:
    factory = FakeFactory()
    with make_pool(factory) as pool:
        w = pool.acquire(timeout=1)
        assert w.in_use and factory.calls == 1
        assert w.conn.execute() == 1
        pool.release(w)
        assert pool.get_metrics()["available"] == 1


def test_checkout_reuses_the_connection() -> None:
    factory = FakeFactory()
    with make_pool(factory) as pool:
        for _ in range(100):
            with pool.connection() as conn:
                conn.execute()
        assert factory.calls == 1
        m = pool.get_metrics()
        assert m["total_acquired"] == m["total_released"] == 100


def test_timeout_zero_means_do_not_wait() -> None:
    with make_pool(max_size=1) as pool:
        w = pool.acquire()
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            pool.acquire(timeout=0)
        assert time.monotonic() - t0 < 0.5
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, SharedPoolError)
        assert pool.get_metrics()["acquire_timeouts"] == 1
        pool.release(w)


def test_waiter_gets_the_released_connection() -> None:
    with make_pool(max_size=1) as pool:
        w = pool.acquire()
        got: list[object] = []
        t = threading.Thread(target=lambda: got.append(pool.acquire(timeout=5)))
        t.start()
        time.sleep(0.1)
        assert not got
        pool.release(w)
        t.join(5)
        assert got and got[0] is w


def test_waiters_are_served_in_order() -> None:
    with make_pool(max_size=1) as pool:
        w = pool.acquire()
        order: list[int] = []

        def take(i: int) -> None:
            x = pool.acquire(timeout=5)
            order.append(i)
            pool.release(x)

        threads = []
        for i in range(4):
            threads.append(threading.Thread(target=take, args=(i,)))
            threads[-1].start()
            time.sleep(0.05)  # enqueue in a known order
        pool.release(w)
        for t in threads:
            t.join(5)
        assert order == [0, 1, 2, 3]


def test_release_twice_and_foreign_wrapper_are_clear_errors() -> None:
    with make_pool() as a, make_pool() as b:
        w = a.acquire()
        a.release(w)
        with pytest.raises(PoolMisuse, match="already released"):
            a.release(w)
        w2 = a.acquire()
        with pytest.raises(PoolMisuse, match="does not belong"):
            b.release(w2)
        a.release(w2)


def test_broken_connection_replaced_on_acquire() -> None:
    factory = FakeFactory()
    with make_pool(factory, validation_bypass=0.0) as pool:
        w = pool.acquire()
        pool.release(w)
        w.conn.healthy = False
        w2 = pool.acquire()
        assert w2.conn is not w.conn and w.conn.closed
        assert pool.get_metrics()["validation_failures"] == 1
        pool.release(w2)


def test_recently_used_connection_is_not_revalidated() -> None:
    factory = FakeFactory()
    with make_pool(factory, validation_bypass=60.0) as pool:
        for _ in range(50):
            with pool.connection():
                pass
        assert factory.made[0].pings == 0


def test_test_on_acquire_off_never_pings() -> None:
    factory = FakeFactory()
    with make_pool(factory, validation_bypass=0.0, test_on_acquire=False) as pool:
        for _ in range(5):
            with pool.connection():
                pass
        assert factory.made[0].pings == 0


def test_test_on_release_closes_broken_connection() -> None:
    factory = FakeFactory()
    with make_pool(factory, test_on_release=True) as pool:
        w = pool.acquire()
        w.conn.healthy = False
        pool.release(w)
        assert w.conn.closed and pool.get_size() == 0


def test_check_callable_is_used() -> None:
    seen: list[object] = []

    def check(conn: object) -> bool:
        seen.append(conn)
        return len(seen) > 1  # the first check fails

    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, validation_bypass=0.0),
                          check=check)
    with pool:
        w = pool.acquire()
        pool.release(w)
        w2 = pool.acquire()  # the check fails: w is closed and replaced
        assert seen and seen[0] is w.conn and w2.conn is not w.conn
        pool.release(w2)


def test_max_lifetime_closes_at_release() -> None:
    with make_pool(max_lifetime=0.05) as pool:
        w = pool.acquire()
        time.sleep(0.1)
        pool.release(w)
        assert w.conn.closed and pool.get_size() == 0


def test_maintenance_fills_min_size_and_expires_idle() -> None:
    factory = FakeFactory()
    pool = make_pool(factory, min_size=2, max_size=4, idle_timeout=0.2, validation_interval=0.1)
    with pool:
        deadline = time.monotonic() + 5
        while pool.get_size() < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pool.get_size() == 2
        ws = [pool.acquire() for _ in range(4)]
        for w in ws:
            pool.release(w)
        assert pool.get_size() == 4
        while pool.get_size() > 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.get_size() == 2  # idle ones beyond min_size expired, min_size kept


def test_factory_error_reaches_the_caller() -> None:
    factory = FakeFactory(fail=OSError("database is down"))
    with make_pool(factory) as pool:
        with pytest.raises(OSError, match="database is down"):
            pool.acquire(timeout=2)
        assert pool.get_metrics()["connect_errors"] == 1
        assert pool.get_size() == 0
        factory.fail = None
        with pool.connection(timeout=2) as conn:
            assert conn.execute() == 1


def test_slow_factory_times_out_and_late_connection_is_closed() -> None:
    # The connect takes 1 s: a caller that waited for it took >= 1 s, one that
    # kept to connection_timeout (0.1 s) well under, even on a loaded machine.
    factory = FakeFactory(delay=1.0)
    with make_pool(factory, connection_timeout=0.1) as pool:
        t0 = time.monotonic()
        with pytest.raises(ConnectTimeout, match="connection_timeout"):
            pool.acquire(timeout=5)
        assert time.monotonic() - t0 < 0.9
        # It appears late, then the opener closes it: in its own thread, so
        # waited for (a fixed 50 ms after it appeared was a guess).
        deadline = time.monotonic() + 5
        while not (factory.made and factory.made[0].closed) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert factory.made and factory.made[0].closed  # it appeared late, and was closed
        assert pool.get_size() == 0


def test_close_fails_waiters_and_closes_connections() -> None:
    factory = FakeFactory()
    pool = make_pool(factory, max_size=1)
    w = pool.acquire()
    errors: list[BaseException] = []
    t = start_recording(lambda: pool.acquire(timeout=5), errors)
    time.sleep(0.1)
    closer = threading.Thread(target=pool.close, kwargs={"timeout": 2})
    closer.start()
    t.join(2)
    assert errors and isinstance(errors[0], PoolClosed)
    pool.release(w)  # an in-use connection is closed when it comes back
    closer.join(2)
    assert w.conn.closed and pool.status is PoolStatus.CLOSED
    with pytest.raises(PoolClosed):
        pool.acquire()
    assert not pool._maintenance or not pool._maintenance.is_alive() or pool._stop.is_set()


def test_maintenance_thread_stops_on_close() -> None:
    pool = make_pool(validation_interval=0.05)
    thread = pool._maintenance
    assert thread is not None and thread.is_alive()
    pool.close()
    thread.join(3)
    assert not thread.is_alive()


def test_drain_and_resume() -> None:
    with make_pool() as pool:
        w = pool.acquire()
        idle = pool.acquire()
        pool.release(idle)
        threading.Timer(0.1, pool.release, args=(w,)).start()
        pool.drain(timeout=2)
        assert pool.status is PoolStatus.DRAINING
        assert idle.conn.closed and w.conn.closed and pool.get_size() == 0
        with pytest.raises(PoolClosed, match="draining"):
            pool.acquire()
        pool.resume()
        with pool.connection() as conn:
            assert conn.execute() == 1


def test_pooled_decorator_and_pooled_connection() -> None:
    with make_pool() as pool:

        @pooled(pool)
        def query(conn: object, x: int) -> int:
            """Doc kept."""
            return conn.execute() + x  # type: ignore[attr-defined]

        assert query(41) == 42
        assert query.__name__ == "query" and query.__doc__ == "Doc kept."
        w = pool.acquire()
        with PooledConnection(pool, w) as conn:
            assert conn is w.conn
        assert pool.get_in_use() == 0
        w = pool.acquire()
        pc = PooledConnection(pool, w)
        assert pc.execute() == 1  # attribute access goes to the connection
        pool.release(w)


def test_a_pooled_connection_is_made_with_no_import(monkeypatch: pytest.MonkeyPatch) -> None:
    # `with PooledConnection(pool, pool.acquire())` is a checkout's fast path: an
    # import in its __init__ (for the error of a wrong argument) tripled its cost.
    import builtins

    with make_pool() as pool:
        w = pool.acquire()
        imported: list[str] = []
        real = builtins.__import__

        def counting(name: str, *args: Any, **kwargs: Any) -> Any:
            imported.append(name)
            return real(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", counting)
        with PooledConnection(pool, w):
            pass
        monkeypatch.undo()
        assert imported == []
        assert pool.get_in_use() == 0


def test_exception_inside_connection_block_still_returns_it() -> None:
    with make_pool() as pool:
        with pytest.raises(RuntimeError), pool.connection():
            raise RuntimeError("boom")
        assert pool.get_in_use() == 0 and pool.get_metrics()["available"] == 1


def test_metrics_and_repr() -> None:
    with make_pool() as pool:
        w = pool.acquire()
        m = pool.get_metrics()
        for key in ("total_created", "total_acquired", "total_released", "total_closed",
                    "acquire_timeouts", "current_size", "in_use", "available", "status"):
            assert key in m
        assert m["in_use"] == 1 and m["status"] == "active"
        assert "1 in use, 0 idle" in repr(pool)
        assert "in use" in repr(w)
        stats = pool.get_stats()
        assert stats["pool_max"] == 2 and stats["pool_size"] == 1
        pool.release(w)


def test_threads_never_exceed_max_size_and_counters_add_up() -> None:
    factory = FakeFactory(delay=0.001)
    peak = 0
    lock = threading.Lock()
    n_threads, n_iter = 8, 200

    def work() -> None:
        nonlocal peak
        for _ in range(n_iter):
            with pool.connection(timeout=10) as conn:
                conn.execute()
                with lock:
                    peak = max(peak, len(factory.open))

    with make_pool(factory, max_size=3) as pool:
        threads = [threading.Thread(target=work) for _ in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        m = pool.get_metrics()
    assert peak <= 3
    assert m["total_acquired"] == m["total_released"] == n_threads * n_iter
    assert m["total_created"] <= 3 + m["total_closed"]


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="factory"):
        ConnectionPool(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="config"):
        ConnectionPool(FakeFactory(), {"max_size": 3})  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resource"):
        ConnectionPool(FakeFactory(), resource="")
    with make_pool() as pool, pytest.raises(ConfigError, match="timeout"):
        pool.acquire(timeout=-1)
    with make_pool() as pool:
        pool.release(pool.acquire())  # an idle connection: the fast path checks it too
        with pytest.raises(ConfigError, match="timeout"):
            pool.acquire(timeout=-1)
