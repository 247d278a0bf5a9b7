"""Bad arguments to the public constructors and hooks fail where they are
written, as a ConfigError naming the argument, never as a TypeError from deep
inside or an error only at the first checkout (I5)."""

from __future__ import annotations

import logging
import math
import os
import pathlib
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from sharedpool import (
    Client,
    ConfigError,
    ConnectionPool,
    Coordinator,
    PoolConfig,
    PooledConnection,
    PoolStatus,
    pooled,
    release_process,
)
from sharedpool.config import MAX_SOCKET_PATH, SOCKET_ENV, CoordinatorConfig
from sharedpool.errors import LocalProtocolError, SharedPoolError
from sharedpool.testing import FakeFactory

TOO_LONG = "/tmp/" + "x" * MAX_SOCKET_PATH


@pytest.mark.parametrize(("given", "field", "says"), [
    ({"min_size": 2}, "min_size", "PoolConfig(min_size=...)"),
    ({"max_size": 8, "min_size": 2}, "max_size", "PoolConfig(max_size=...)"),
    ({"timeout": 5}, "timeout", "PoolConfig(acquire_timeout=...)"),  # psycopg_pool's names
    ({"max_idle": 60}, "max_idle", "PoolConfig(idle_timeout=...)"),
    ({"max_lifetime": 60}, "max_lifetime", "PoolConfig(max_lifetime=...)"),
    ({"open": True}, "open", "allowed: check, config, configure, coordinator, factory, name, resource"),
    ({"num_workers": 3}, "num_workers", "sharedpool.contrib.psycopg.ConnectionPool"),
])
def test_psycopg_pool_style_keywords_of_a_pool_say_where_they_go(given: dict[str, Any], field: str,
                                                                says: str) -> None:
    """ConnectionPool(factory, min_size=2), psycopg_pool's habit, was Python's
    TypeError ("unexpected keyword argument"), which did not say that sizes and
    times live in PoolConfig."""
    with pytest.raises(ConfigError) as err:
        ConnectionPool(FakeFactory(), **given)
    assert err.value.field == field and says in err.value.detail, err.value
    # The arguments it takes are taken as before, by position or keyword.
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0), resource="r", name="n") as pool:
        assert pool.name == "n" and pool.resource == "r"
    with ConnectionPool(factory=FakeFactory(), config=PoolConfig(min_size=0, max_size=2)) as pool:
        assert pool.config.max_size == 2


@pytest.mark.parametrize("bad", [5, b"/tmp/x.sock", "", "/tmp/a\0b", TOO_LONG])
def test_a_pool_coordinator_that_is_no_socket_path_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError) as err:
        ConnectionPool(FakeFactory(), PoolConfig(min_size=0), coordinator=bad)
    assert err.value.field == "coordinator"


@pytest.mark.parametrize("bad", [5, "", TOO_LONG])
def test_a_client_socket_path_that_is_no_socket_path_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError) as err:
        Client(bad)
    assert err.value.field == "socket_path"
    with pytest.raises(ConfigError):
        Client.for_path(bad)


@pytest.mark.parametrize("bad", ["5", True, 0, float("nan")])
def test_a_client_connect_timeout_that_is_no_seconds_is_refused(bad: Any) -> None:
    with pytest.raises(ConfigError) as err:  # "5" was a TypeError from a comparison
        Client("/tmp/sp-args.sock", connect_timeout=bad)
    assert err.value.field == "connect_timeout"


def test_a_bad_coordinator_leaves_no_client_ticking(caplog: pytest.LogCaptureFixture) -> None:
    """It used to fail only at acquire, with a TypeError, and leave a shared
    client behind that logged a traceback every few milliseconds."""
    with caplog.at_level(logging.ERROR), pytest.raises(ConfigError):
        ConnectionPool(FakeFactory(), PoolConfig(min_size=0), coordinator=5)  # type: ignore[arg-type]
    assert not [r for r in caplog.records if r.exc_info]


def test_an_empty_socket_variable_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set but empty (a template that left it blank) must neither run the pool
    uncapped nor guess a path: the checkout fails, naming the variable. Reading
    the pool's figures does not fail."""
    monkeypatch.setenv(SOCKET_ENV, "")
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0, acquire_timeout=1)) as pool:
        with pytest.raises(ConfigError) as err:
            pool.acquire()
        assert err.value.field == SOCKET_ENV and "empty" in str(err.value)
        assert pool.get_metrics()["current_size"] == 0 and repr(pool)


def test_a_socket_variable_too_long_for_a_socket_names_the_variable(
        monkeypatch: pytest.MonkeyPatch, sock_path: str, start_coordinator: Any) -> None:
    """In the caller, at checkout; the min_size top-up thread fails quietly and
    keeps no count of openings that never happened (the pool, once the variable
    is right, has all of its connections)."""
    start_coordinator({"default": 4})
    monkeypatch.setenv(SOCKET_ENV, TOO_LONG)
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=2, max_size=3, acquire_timeout=2))
    try:
        with pytest.raises(ConfigError) as err:
            pool.acquire()
        assert err.value.field == SOCKET_ENV and "too long" in str(err.value)
        assert pool.get_metrics()["coordinated"] is True  # figures still read
        time.sleep(0.3)  # a top-up round has run
        assert pool.get_stats()["pool_size"] == 0
        monkeypatch.setenv(SOCKET_ENV, sock_path)
        held = [pool.acquire() for _ in range(3)]
        assert pool.get_metrics()["leases_held"] == 3
        for w in held:
            pool.release(w)
    finally:
        pool.close()


def _gunicorn(**kw: Any) -> Any:
    from sharedpool.contrib.gunicorn import hooks

    saved = os.environ.get(SOCKET_ENV)
    try:
        kw.setdefault("socket", "/tmp/sp-args-never-started.sock")
        return hooks(resources={"pg": 1}, **kw)
    finally:  # hooks() sets it for the workers; a failed call must not matter here
        if saved is None:
            os.environ.pop(SOCKET_ENV, None)
        else:
            os.environ[SOCKET_ENV] = saved


def _celery(**kw: Any) -> Any:
    pytest.importorskip("celery")
    from celery import Celery

    from sharedpool.contrib.celery import setup

    state = setup(Celery("sp-test-args"), resources={"pg": 1}, **kw)
    state.disconnect()
    return state


def _sqlalchemy(**kw: Any) -> Any:
    from sharedpool.contrib.sqlalchemy import create_engine

    kw.setdefault("coordinator", "/tmp/sp-args.sock")
    return create_engine("postgresql+psycopg://postgres@127.0.0.1/test", resource="pg", **kw)


def _psycopg(**kw: Any) -> Any:
    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    kw.setdefault("coordinator", "/tmp/sp-args.sock")
    return PsycopgPool("dbname=test", resource="pg", open=False, **kw)


def _redis(**kw: Any) -> Any:
    from sharedpool.contrib.redis import BlockingConnectionPool

    kw.setdefault("coordinator", "/tmp/sp-args.sock")
    return BlockingConnectionPool(resource="redis", **kw)


@pytest.mark.parametrize(("make", "field", "bad"), [
    (_gunicorn, "close_timeout", "5"),
    (_gunicorn, "close_timeout", -1),
    (_celery, "close_timeout", "x"),
    (_celery, "close_timeout", float("nan")),
    (_sqlalchemy, "lease_timeout", -1),
    (_sqlalchemy, "lease_timeout", "1"),
    (_sqlalchemy, "pool_timeout", -1),  # was "timeout", at the first connect
    (_psycopg, "lease_timeout", -1),
    (_redis, "lease_timeout", "x"),
    (_sqlalchemy, "coordinator", 5),
    (_redis, "coordinator", ""),
    (_gunicorn, "socket", 5),
    (_gunicorn, "socket", TOO_LONG),
    (_celery, "socket", 5),
    (_celery, "socket", ""),
    (_redis, "confirm_timeout", float("nan")),  # disconnect() raised ValueError deep inside
    (_psycopg, "confirm_timeout", float("inf")),
    # The pool's own timeout is the lease wait: -1 and nan failed every connect
    # (seen as a PoolTimeout), and made the redis pool's lease wait 0.
    (_psycopg, "configure", 5),  # every connect failed: "'int' object is not callable", a PoolTimeout
    # Called in psycopg_pool's threads: every checkout failed its check unseen (a bare
    # PoolTimeout), every return failed its reset (the connection discarded).
    (_psycopg, "check", "yes"),
    (_psycopg, "reset", 5),
    (_psycopg, "reconnect_failed", "x"),
    (_psycopg, "timeout", -1),
    (_psycopg, "timeout", float("nan")),
    (_redis, "timeout", "5"),
    (_redis, "timeout", float("nan")),
    # inf: the pools' own waits (threading) raise OverflowError with it at the cap.
    (_psycopg, "timeout", math.inf),
    (_redis, "timeout", math.inf),
    (_sqlalchemy, "pool_timeout", math.inf),
    # Finite, but past threading.TIMEOUT_MAX (~292 years): the same OverflowError
    # from the host pool's wait, at the first checkout that had to wait.
    (_psycopg, "timeout", 1e300),
    (_redis, "timeout", 1e10),
    (_sqlalchemy, "pool_timeout", 1e300),
    # psycopg_pool's own arguments, by kind: a string was "'<' not supported between
    # instances of 'str' and 'int'", or failed later: max_waiting at the first
    # checkout, max_lifetime every connect unseen (a bare PoolTimeout), max_idle
    # (inf too) its scheduler thread.
    (_psycopg, "max_size", "4"),
    (_psycopg, "min_size", 1.5),
    (_psycopg, "num_workers", "3"),
    (_psycopg, "max_waiting", "x"),
    (_psycopg, "max_lifetime", "x"),
    (_psycopg, "max_lifetime", 1e300),
    (_psycopg, "max_idle", math.inf),
    (_psycopg, "reconnect_timeout", math.nan),
    # Passed create_engine(); each connect then failed with a TypeError from inside QueuePool.
    (_sqlalchemy, "pool_size", "5"),
    (_sqlalchemy, "max_overflow", "x"),
    (_sqlalchemy, "pool_recycle", "3600"),
    (_sqlalchemy, "confirm_timeout", True),
    # Before: a TypeError (EmbeddedCoordinator got multiple values for socket_path).
    (_gunicorn, "socket_path", "/tmp/sp-args.sock"),
    (_celery, "socket_path", "/tmp/sp-args.sock"),
    (_gunicorn, "config", None),  # was silently ignored
])
def test_integration_arguments_are_checked_when_made(make: Callable[..., Any], field: str,
                                                     bad: Any) -> None:
    with pytest.raises(ConfigError) as err:
        make(**{field: bad})
    assert err.value.field == field, err.value


@pytest.mark.parametrize(("make", "field"), [
    (_psycopg, "timeout"), (_redis, "timeout"), (_sqlalchemy, "pool_timeout")])
@pytest.mark.parametrize("bad", [1e300, 1e10, math.inf])
def test_a_host_pool_wait_past_timeout_max_is_refused_with_lease_timeout_too(
        make: Callable[..., Any], field: str, bad: float) -> None:
    """With lease_timeout given, the host pool's own timeout was not checked: its
    wait for a connection (another thread's to come back) raised OverflowError
    ("timestamp out of range for platform time_t") from inside psycopg_pool,
    redis-py's queue or QueuePool, at the first checkout that had to wait."""
    with pytest.raises(ConfigError) as err:
        make(lease_timeout=5, **{field: bad})
    assert err.value.field == field, err.value
    assert "at most" in err.value.detail or "finite" in err.value.detail


def test_psycopg_pool_waits_past_timeout_max_are_refused_before_they_start(
        pg: str, start_coordinator: Any, sock_path: str) -> None:
    """getconn(timeout=1e300) at the cap, wait(1e300) and open(wait=True,
    timeout=1e300) raised OverflowError from psycopg_pool's threading waits
    (open() after opening the pool). Refused first; the pool serves on."""
    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    start_coordinator({"pg": 2})
    pool = PsycopgPool(pg, resource="pg", coordinator=sock_path, min_size=0, max_size=1, open=False)
    try:
        with pytest.raises(ConfigError) as err:
            pool.open(wait=True, timeout=1e300)
        assert err.value.field == "timeout" and pool.closed
        pool.open(wait=True, timeout=10)
        held = pool.getconn(timeout=5)
        for call in (lambda: pool.getconn(timeout=1e300), lambda: pool.wait(1e300)):
            with pytest.raises(ConfigError) as err:
                call()
            assert err.value.field == "timeout" and "at most" in err.value.detail
        pool.putconn(held)
        with pool.connection(timeout=5) as conn:  # nothing queued by the refused getconn
            conn.execute("SELECT 1")
        assert pool.get_stats().get("requests_waiting", 0) == 0
    finally:
        pool.close()


@pytest.mark.parametrize(("given", "field", "says"), [
    ({"hots": "127.0.0.1"}, "hots", "unknown keyword for Connection"),
    ({"host": "127.0.0.1", "socket_timout": 5}, "socket_timout", "allowed: "),
    ({"ssl_certfile": "/etc/c.pem"}, "ssl_certfile", "connection_class=redis.SSLConnection"),
    ({"path": "/tmp/r.sock"}, "path", "connection_class=redis.UnixDomainSocketConnection"),
])
def test_a_redis_keyword_no_connection_takes_is_refused_when_the_pool_is_made(
        given: dict[str, Any], field: str, says: str) -> None:
    """redis-py hands every keyword it does not take itself to each connection:
    a typo (or an SSL one without SSLConnection) passed the constructor and was
    a TypeError from inside redis-py at the first command."""
    with pytest.raises(ConfigError) as err:
        _redis(**given)
    assert err.value.field == field and says in err.value.detail, err.value


@pytest.mark.parametrize(("class_name", "given", "says", "not_says"), [
    # A typo of a keyword the class given takes was told to change the class.
    ("SSLConnection", "ssl_certfiel", "", "connection_class=redis.SSLConnection"),
    ("Connection", "host_addr", "", "Unix socket"),
    ("Connection", "port_number", "", "Unix socket"),
    ("UnixDomainSocketConnection", "path_name", "", "needs connection_class"),
    # The hints where the class is the mistake stay.
    ("UnixDomainSocketConnection", "host", "takes path= instead", "needs connection_class"),
    ("SSLConnection", "ssl", "ssl=True is redis.Redis's", "need connection_class"),
])
def test_a_redis_keyword_hint_fits_the_connection_class_given(class_name: str, given: str, says: str,
                                                              not_says: str) -> None:
    import redis

    with pytest.raises(ConfigError) as err:
        _redis(connection_class=getattr(redis, class_name), **{given: 1})
    hint = err.value.detail.partition("; allowed: ")[0]
    assert err.value.field == given and says in hint and not_says not in hint, err.value


def test_a_host_pool_timeout_taken_as_a_real_is_passed_on_as_checked(pg: str, start_coordinator: Any,
                                                                    sock_path: str) -> None:
    """A numbers.Real timeout (a Fraction here), taken by check_seconds as a float,
    went on to the host pool as given: at the end of its wait the timeout's
    message (ours "within {:g}s", psycopg_pool's "after {:.2f} sec") raised
    TypeError in place of the timeout error."""
    from fractions import Fraction

    import psycopg_pool
    import sqlalchemy.exc

    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool
    from sharedpool.contrib.sqlalchemy import create_engine

    start_coordinator({"pg": 1})
    quarter = Fraction(1, 4)
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1/test", resource="pg",
                           coordinator=sock_path, pool_size=2, pool_timeout=quarter)
    try:
        with engine.connect(), pytest.raises(sqlalchemy.exc.TimeoutError, match=r"within 0\.25s"):
            engine.connect()  # no lease: the only one is held
    finally:
        engine.dispose()
    pool = PsycopgPool(pg, resource="pg", coordinator=sock_path, min_size=0, max_size=2,
                       timeout=quarter, open=True)
    try:
        held = pool.getconn()
        for call in (pool.getconn, lambda: pool.getconn(quarter)):
            with pytest.raises(psycopg_pool.PoolTimeout, match=r"after 0\.25 sec"):
                call()
        pool.putconn(held)
    finally:
        pool.close()


def test_redis_keywords_its_classes_take_are_still_taken(start_coordinator: Any, sock_path: str,
                                                        redis_name: str) -> None:
    import queue

    import redis

    from sharedpool.contrib.redis import BlockingConnectionPool

    class Custom(redis.Connection):  # takes keywords of its own through **kwargs: not second-guessed
        def __init__(self, *args: Any, flavour: str = "", **kwargs: Any) -> None:
            super().__init__(*args, **{k: v for k, v in kwargs.items() if k != "extra"})

    start_coordinator({"redis": 3})
    pools = [
        BlockingConnectionPool(resource="redis", coordinator=sock_path, host="127.0.0.1", port=6379, db=0,
                               client_name=redis_name, socket_timeout=5, socket_connect_timeout=5,
                               socket_keepalive=True, health_check_interval=30, retry_on_timeout=True,
                               decode_responses=True, encoding="utf-8", queue_class=queue.LifoQueue,
                               max_connections=1, timeout=5, lease_timeout=5, confirm_timeout=2),
        BlockingConnectionPool.from_url("redis://127.0.0.1:6379/0?socket_timeout=5", resource="redis",
                                        coordinator=sock_path, client_name=redis_name),
        BlockingConnectionPool(resource="redis", coordinator=sock_path, connection_class=Custom,
                               host="127.0.0.1", client_name=redis_name, flavour="x", extra=1),
    ]
    try:
        for pool in pools:
            assert redis.Redis(connection_pool=pool).ping()
    finally:
        for pool in pools:
            pool.disconnect()
    with pytest.raises(ConfigError) as err:  # the URL's query too
        BlockingConnectionPool.from_url("redis://127.0.0.1/0?sockettimeout=5", resource="redis",
                                        coordinator=sock_path)
    assert err.value.field == "sockettimeout"


def test_a_psycopg_pool_resize_of_the_wrong_kind_is_named() -> None:
    pool = _psycopg(min_size=0, max_size=2)
    try:
        with pytest.raises(ConfigError) as err:  # was a TypeError from psycopg_pool's comparison
            pool.resize("3")
        assert err.value.field == "min_size" and pool.max_size == 2
        pool.resize(0, 3)
        assert pool.max_size == 3
        never = _psycopg(max_lifetime=math.inf, min_size=0, max_size=1)  # psycopg_pool's "never": kept
        assert never.max_lifetime == math.inf
        never.close()
    finally:
        pool.close()


def test_host_pool_numbers_they_took_as_floats_are_still_taken(
        pg: str, start_coordinator: Any, sock_path: str) -> None:
    """psycopg_pool only compares max_size and max_waiting, QueuePool pool_size and
    max_overflow: a float (or a number that is neither int nor float, as numpy's:
    a Fraction here) served there, and was refused by the kind checks ("must be
    an integer, got 2.0"). A string still is (test above)."""
    from fractions import Fraction

    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool
    from sharedpool.contrib.sqlalchemy import create_engine

    start_coordinator({"pg": 4})
    pool = PsycopgPool(pg, resource="pg", coordinator=sock_path, min_size=1, max_size=2.0,
                       max_waiting=3.0, max_lifetime=Fraction(3600), open=True)
    try:
        with pool.connection(timeout=10) as conn:
            conn.execute("SELECT 1")
    finally:
        pool.close()
    engine = create_engine("postgresql+psycopg://postgres@127.0.0.1/test", resource="pg",
                           coordinator=sock_path, pool_size=1.0, max_overflow=1.0)
    try:
        with engine.connect() as one, engine.connect() as two:
            assert one.exec_driver_sql("SELECT 1").scalar() == two.exec_driver_sql("SELECT 1").scalar()
    finally:
        engine.dispose()


def test_numpy_like_seconds_are_taken_where_times_are_checked(start_coordinator: Any,
                                                              sock_path: str) -> None:
    """A numbers.Real that is neither int nor float (numpy's float32 and int64;
    a Fraction here) was refused: "timeout: must be a number >= 0, got
    Fraction(3, 2)". It is taken as a float, also on the wire (msgpack cannot
    pack the number itself)."""
    from fractions import Fraction

    from sharedpool.contrib.gunicorn import hooks

    half = Fraction(3, 2)
    start_coordinator({"pg": 1})
    client = Client(sock_path)
    try:
        client.release(client.acquire("pg", timeout=half))
        assert client.inspect("server", timeout=half)["pid"]
        with pytest.raises(ConfigError, match="got -1"):  # still checked, by value
            client.acquire("pg", timeout=Fraction(-1))
        release_process(half)
    finally:
        client.close(timeout=half)
    assert hooks(resources={"pg": 1}, socket=sock_path, close_timeout=half)
    pool = _redis(lease_timeout=half)
    assert pool._sp_lease_timeout == 1.5 and type(pool._sp_lease_timeout) is float
    pool.disconnect()


def test_a_lease_wait_may_be_forever_but_not_nan() -> None:
    import math

    pool = _redis(lease_timeout=math.inf)
    pool.disconnect()
    with pytest.raises(ConfigError):
        _redis(lease_timeout=math.nan)


@pytest.mark.parametrize("bad", ["5", math.inf, math.nan])
def test_a_psycopg_pool_close_with_a_bad_timeout_closes_nothing(
        bad: Any, pg: str, start_coordinator: Any, sock_path: str) -> None:
    """Before: psycopg_pool marked the pool closed, then its wait raised a
    TypeError or OverflowError, and the idle connections kept their leases for
    good (a second close() returned at once). A wait beyond threading's longest
    (1e300) is that longest."""
    from sharedpool.contrib.psycopg import ConnectionPool as PsycopgPool

    start_coordinator({"pg": 2})
    pool = PsycopgPool(pg, resource="pg", coordinator=sock_path, min_size=2, max_size=2, open=True)
    client = Client(sock_path)
    try:
        pool.wait(10)
        with pytest.raises(ConfigError) as err:
            pool.close(bad)
        assert err.value.field == "timeout" and not pool.closed
        with pool.connection(timeout=5) as conn:  # still serves
            conn.execute("SELECT 1")
        pool.close(1e300)
        assert pool.closed
        assert client.inspect("resources")["resources"][0]["leased"] == 0
    finally:
        pool.close()
        client.close()


def test_an_empty_socket_variable_is_an_error_for_the_integrations_too(
        monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """As for a pool, serve and the CLI: set but empty is a mistake naming the
    variable. Before, gunicorn's hooks() and celery's worker_init took it for
    unset and started a private coordinator (a second budget, where a template
    had meant the shared coordinator's path), or, given no resources, said
    "no coordinator is listening on /tmp/sharedpool-.../gunicorn-...sock"."""
    pytest.importorskip("celery")
    from celery import Celery

    from sharedpool.contrib.celery import setup
    from sharedpool.contrib.gunicorn import hooks

    monkeypatch.setenv(SOCKET_ENV, "")
    with pytest.raises(ConfigError) as err:
        hooks(resources={"pg": 1})
    assert err.value.field == SOCKET_ENV and "set but empty" in err.value.detail, err.value
    assert os.environ[SOCKET_ENV] == ""  # not replaced by a private path for the workers
    state = setup(Celery("sp-test-empty-env"))
    try:
        with pytest.raises(SystemExit) as stop:  # celery's worker stops, one line on stderr
            state.worker_init()
        assert f"{SOCKET_ENV}: is set but empty" in str(stop.value), stop.value
    finally:
        state.disconnect()
    given = str(tmp_path / "sp.sock")  # a socket given wins, as a pool's coordinator= does
    assert hooks(resources={"pg": 1}, socket=given) and os.environ[SOCKET_ENV] == given


def test_integration_socket_paths_may_be_path_objects(tmp_path: pathlib.Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from sharedpool.contrib.gunicorn import hooks

    path = tmp_path / "sp.sock"
    assert _celery(socket=path).socket == str(path)
    monkeypatch.setenv(SOCKET_ENV, "/tmp/elsewhere.sock")  # put back after the test
    hooks(resources={"pg": 1}, socket=path)
    assert os.environ[SOCKET_ENV] == str(path)  # what the workers will read


@pytest.mark.parametrize(("call", "field"), [
    (lambda c: c.acquire(5), "resource"),
    (lambda c: c.acquire("", 1), "resource"),
    (lambda c: c.acquire("r", "5"), "timeout"),
    (lambda c: c.acquire("r", 1, site=5), "site"),
    (lambda c: c.inspect(5), "what"),
    # Beyond what the wire carries: was a LocalProtocolError, and sent before a
    # session was up, an acquire that waited for ever for a grant never asked for.
    (lambda c: c.acquire("r", 2**64), "timeout"),
    (lambda c: c.inspect("server", timeout="5"), "timeout"),  # was a TypeError
    # Was "no coordinator at PATH: None" with the coordinator there, or a
    # PoolTimeout for an admin verb that may have been carried out.
    (lambda c: c.admin("pause", timeout=0, resource="r"), "timeout"),
    (lambda c: c.inspect("server", timeout=math.nan), "timeout"),
    # Was sent: the coordinator ended the session for it, and the call failed
    # after connect_timeout with "read failed: Connection reset by peer".
    (lambda c: c.admin(5), "verb"),
], ids=["resource-int", "resource-empty", "timeout-str", "site-int", "what-int", "timeout-2**64",
        "inspect-timeout-str", "admin-timeout-0", "inspect-timeout-nan", "admin-verb-int"])
def test_client_arguments_are_refused_before_anything_is_sent(
        start_coordinator: Any, sock_path: str, call: Callable[[Client], Any], field: str) -> None:
    # Before, the frame went out, the coordinator ended the session for it, and
    # the reconnect sent it again: thousands of sessions a second, for every
    # pool sharing the client, and acquire(5) never returned.
    start_coordinator({"r": 1})
    client = Client(sock_path)
    try:
        client.inspect("server")  # a session is up
        session = client.session_id
        with pytest.raises(ConfigError) as err:
            call(client)
        assert err.value.field == field
        time.sleep(0.2)
        assert client.session_id == session and client.reconnects == 1
    finally:
        client.close()


def test_a_resource_in_the_short_form_is_named_in_its_error(tmp_path: pathlib.Path) -> None:
    from sharedpool.config import CoordinatorConfig

    path = tmp_path / "sp.toml"
    path.write_text("[resources]\npg = 2\napi = 0\n")
    for make in (lambda: CoordinatorConfig.load(path), lambda: Coordinator(str(tmp_path / "s"), {"api": 0})):
        with pytest.raises(ConfigError) as err:
            make()
        assert err.value.field == "resources.api.max_size"  # as for a table: which resource


def test_embedded_coordinator_options_are_checked(tmp_path: pathlib.Path) -> None:
    from sharedpool.contrib.gunicorn import hooks

    for field, kw in (("restart", {"restart": "no"}), ("max_frame", {"max_frame": 1 << 33}),
                      ("start_timeout", {"start_timeout": -1})):
        with pytest.raises(ConfigError) as err:
            hooks(resources={"pg": 1}, socket=tmp_path / f"{field}.sock", **kw)
        assert err.value.field == field


def test_a_connection_string_as_factory_says_what_to_pass_and_not_the_string() -> None:
    # psycopg_pool's ConnectionPool takes a DSN; ours a factory. The error echoed
    # the DSN, password included, and said only "must be callable".
    dsn = "host=127.0.0.1 dbname=test password=hunter2"
    with pytest.raises(ConfigError) as err:
        ConnectionPool(dsn, resource="pg")  # type: ignore[arg-type]
    assert err.value.field == "factory"
    assert "lambda: psycopg.connect(dsn)" in str(err.value) and "contrib.psycopg" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_a_pool_whose_coordinator_path_is_no_socket_says_so(tmp_path: pathlib.Path) -> None:
    conf = tmp_path / "sharedpool.toml"
    conf.write_text("")
    with ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, acquire_timeout=0.2),
                        resource="pg", coordinator=str(conf)) as pool, pytest.raises(SharedPoolError) as err:
        pool.acquire()
    # Not only "Connection refused", which reads as a coordinator not running.
    assert f"coordinator at {conf} unreachable" in str(err.value), err.value
    assert "is a regular file, not a socket" in str(err.value), err.value


@pytest.mark.parametrize("integration", ["gunicorn", "celery"])
def test_a_misspelt_integration_option_is_refused_without_resources_too(
        integration: str, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without resources= (a `sharedpool serve` already listening) the options were
    # never looked at: resorces= or allowed_uid= passed without a word.
    if integration == "gunicorn":
        from sharedpool.contrib.gunicorn import hooks as make
    else:
        pytest.importorskip("celery")
        from celery import Celery

        from sharedpool.contrib.celery import setup

        def make(**kw: Any) -> Any:
            return setup(Celery("sp-test-typo"), **kw)
    monkeypatch.setenv(SOCKET_ENV, "unset")  # so that the hooks' own setting is undone too
    monkeypatch.delenv(SOCKET_ENV)
    for typo in ("resorces", "allowed_uid"):
        with pytest.raises(ConfigError) as err:
            make(socket=tmp_path / "sp.sock", **{typo: {"pg": 1}})
        assert err.value.field == "options" and repr(typo) in str(err.value), err.value
        assert "resources" in str(err.value) and "allowed_uids" in str(err.value)  # what is allowed
    state = make(socket=tmp_path / "sp.sock", allowed_uids=[os.getuid()], start_timeout=5.0)
    if integration == "celery":
        state.disconnect()


def test_a_request_that_cannot_be_framed_fails_alone(sock_path: str) -> None:
    """It used to stay pending: at the next session the re-send stopped at it,
    and the requests behind it were never sent (an inspect timed out with the
    coordinator up)."""
    coord = Coordinator(sock_path, {"r": 1}).start()
    client = Client(sock_path)
    try:
        client.inspect("server")
        with pytest.raises(LocalProtocolError):
            client.admin("resize", resource="r", max_size=2**64)  # no msgpack integer
        coord.kill()
        coord = Coordinator(sock_path, {"r": 1}).start()  # the client re-sends what is pending
        assert client.inspect("server", timeout=5)["pid"] == coord.pid
    finally:
        client.close()
        coord.stop()


@pytest.mark.parametrize(("connect_timeout", "timeout"), [(1e10, None), (None, math.inf), (None, 1e308)])
def test_waits_longer_than_a_lock_can_take_are_no_overflow(
        start_coordinator: Any, sock_path: str, connect_timeout: float | None, timeout: float | None) -> None:
    # Both are accepted; they were an OverflowError from a lock or socket
    # timeout beyond threading.TIMEOUT_MAX at every acquire.
    start_coordinator({"r": 1})
    client = Client(sock_path, connect_timeout=connect_timeout)
    try:
        client.release(client.acquire("r", timeout))
    finally:
        client.close()


def test_a_tiny_leak_threshold_or_validation_interval_is_no_busy_loop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from sharedpool import maintenance

    rounds: list[int] = []
    real = maintenance.maintain_once
    monkeypatch.setattr(maintenance, "maintain_once", lambda pool: (rounds.append(1), real(pool)))
    for kwargs in ({"leak_detection_threshold": 5e-324}, {"validation_interval": 1e-300}):
        rounds.clear()
        pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, **kwargs))
        try:
            pool.release(pool.acquire())
            time.sleep(0.5)
        finally:
            pool.close()
        assert len(rounds) < 150, (kwargs, len(rounds))  # a busy loop made tens of thousands


def test_a_start_timeout_of_centuries_starts(sock_path: str) -> None:
    coord = Coordinator(sock_path, {"r": 1}).start(1e10)  # select() raised OverflowError
    try:
        assert coord.pid is not None
    finally:
        coord.stop()


def test_a_bad_stop_timeout_stops_nothing(start_coordinator: Any, sock_path: str) -> None:
    # "5" was a TypeError once the child had been sent SIGTERM and let go of (a zombie).
    coord = start_coordinator({"r": 1})
    with pytest.raises(ConfigError) as err:
        coord.stop("5")
    assert err.value.field == "timeout" and coord.pid is not None
    client = Client(sock_path)
    try:
        assert client.inspect("server")["pid"] == coord.pid
    finally:
        client.close()


def test_a_stop_timeout_of_none_waits_without_limit(sock_path: str) -> None:
    # None (Popen.wait's "no limit") stopped the coordinator before timeouts were checked.
    coord = Coordinator(sock_path, {"r": 1}).start()
    proc = coord._program._proc  # type: ignore[union-attr]
    try:
        coord.stop(None)
    finally:
        coord.stop()  # a no-op once stopped
    assert proc.poll() is not None and not os.path.exists(sock_path)


@pytest.mark.parametrize("bad", ["5", math.inf])
def test_release_process_refuses_a_bad_timeout_before_releasing_anything(bad: Any) -> None:
    # "5" was a TypeError; inf failed each pool's close() (logged) and left it open.
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0))
    held = pool.acquire()
    try:
        with pytest.raises(ConfigError) as err:
            release_process(bad)
        assert err.value.field == "timeout" and pool.status is PoolStatus.ACTIVE
    finally:
        pool.release(held)
        pool.close()


@pytest.mark.parametrize("bad", [0, 6, True, 3.5, ["x.toml"], "", "a\0b"])
def test_a_config_file_that_is_no_path_is_refused_when_made(tmp_path: pathlib.Path, bad: Any) -> None:
    """Before: accepted, and each reload gave it to open(), which took an int for
    a file descriptor of the coordinator and closed it (its listening socket:
    `sharedpool status` refused; another fd: a coordinator that ignored SIGTERM)."""
    from sharedpool.config import CoordinatorConfig

    with pytest.raises(ConfigError) as err:
        Coordinator(str(tmp_path / "s.sock"), {"pg": 1}, config_file=bad)
    assert err.value.field == "config_file"
    with pytest.raises(ConfigError) as err:
        CoordinatorConfig.load(bad)
    assert err.value.field == "config"


def test_loading_a_config_by_fd_number_closes_no_fd_of_ours() -> None:
    from sharedpool.config import CoordinatorConfig

    r, w = os.pipe()
    os.close(w)  # the old code read it to its end: no hang, just the fd gone
    try:
        with pytest.raises(ConfigError):
            CoordinatorConfig.load(r)  # type: ignore[arg-type]
        os.fstat(r)  # still ours (was closed by the failed load)
    finally:
        os.close(r)


def test_a_config_file_path_object_is_kept_as_a_str(tmp_path: pathlib.Path) -> None:
    from sharedpool.config import CoordinatorConfig

    cfg = CoordinatorConfig(str(tmp_path / "s.sock"), {"pg": 1}, config_file=tmp_path / "x.toml")
    assert cfg.config_file == str(tmp_path / "x.toml")


def _attach(bad: Any) -> Any:
    from sharedpool.contrib.sqlalchemy import attach

    return attach(bad, "pg", "/tmp/sp-args.sock")


def test_attach_given_a_url_hides_its_password() -> None:
    # attach(url) for create_engine(url): quoted whole, password and all.
    with pytest.raises(ConfigError) as err:
        _attach("postgresql+psycopg://postgres:hunter2@127.0.0.1:5432/test")
    assert err.value.field == "engine" and "hunter2" not in str(err.value), err.value
    assert "'postgresql+psycopg://postgres:***@127.0.0.1:5432/test'" in str(err.value)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: Client("/tmp/sp-args.sock", name=5), "name"),  # was "coordinator unreachable" at acquire
    (lambda: Client("/tmp/sp-args.sock", name=["w"]), "name"),
    (lambda: Client("/tmp/sp-args.sock").release(5), "lease"),  # an AttributeError: no .id
    (lambda: pooled(5), "pool"),  # an AttributeError at each call
    (lambda: pooled(SimpleNamespace(connection=lambda timeout: None), timeout="5"), "timeout"),
    (lambda: _attach(5), "engine"),  # an AttributeError: no .pool
    (lambda: _redis(connection_class=5), "connection_class"),  # an AttributeError: no __name__
    # An AttributeError ('int' object has no attribute 'conn') at the with statement.
    (lambda: PooledConnection(SimpleNamespace(release=lambda w: None), 5), "wrapper"),
    (lambda: PooledConnection(5, 5), "pool"),  # was accepted
    # A TypeError at each call, after a checkout.
    (lambda: pooled(SimpleNamespace(connection=lambda timeout: None))(5), "func"),
    (lambda: release_process(1, wait_in_use="no"), "wait_in_use"),  # was taken as True
    (lambda: ConnectionPool(FakeFactory(), name=5), "name"),  # was kept as the pool's name
    # Each hello refused: "hello frame of 2097194 bytes exceeds 1048576", naming no argument.
    (lambda: Client("/tmp/sp-args.sock", name="w" * 2_000_000), "name"),
], ids=["client-name-int", "client-name-list", "release-int", "pooled-int", "pooled-timeout-str",
        "attach-int", "redis-connection-class-int", "pooled-connection-wrapper-int",
        "pooled-connection-pool-int", "pooled-func-int", "release-process-wait-in-use-str",
        "pool-name-int", "client-name-huge"])
def test_arguments_of_the_wrong_kind_are_named_where_written(call: Callable[[], Any], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    assert err.value.field == field, err.value


def test_a_config_that_is_a_pipe_nobody_writes_is_an_error_not_a_hang(tmp_path: pathlib.Path) -> None:
    """Before: open() waited for a writer for ever; in `serve` with its stop
    signals blocked (only SIGKILL ended it), in a running coordinator's reload
    with every session hung."""
    import threading

    from sharedpool.config import CoordinatorConfig

    fifo = tmp_path / "sp.toml"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def load() -> None:
        try:
            CoordinatorConfig.load(fifo)
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5)
    if thread.is_alive():  # let the old code's open() go, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        thread.join(5)
        pytest.fail("loading a config from a pipe with no writer blocked")
    assert isinstance(raised[0], ConfigError) and "named pipe" in str(raised[0]), raised


def test_a_config_from_a_pipe_with_a_writer_is_read(tmp_path: pathlib.Path) -> None:
    from sharedpool.config import CoordinatorConfig

    r, w = os.pipe()  # as `serve --config <(...)` gives it: /dev/fd/N
    os.write(w, f'[coordinator]\nsocket = "{tmp_path}/s.sock"\n[resources]\npg = 2\n'.encode())
    os.close(w)
    try:
        assert CoordinatorConfig.load(f"/dev/fd/{r}").resources["pg"].max_size == 2
    finally:
        os.close(r)


def test_a_config_that_never_ends_is_refused_by_its_size(tmp_path: pathlib.Path) -> None:
    """Before: `serve --config /dev/zero` read until memory ran out (here capped
    at 2 GiB, a MemoryError); now it stops past 16 MiB and says so."""
    import resource
    import subprocess
    import sys

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    proc = subprocess.run([sys.executable, "-m", "sharedpool", "serve", "--config", "/dev/zero",
                           "--socket", str(tmp_path / "s.sock")], capture_output=True, text=True,
                          timeout=60, preexec_fn=cap_memory)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().endswith("config: /dev/zero is larger than 16 MiB; is it the config file?"), \
        proc.stderr


@pytest.mark.parametrize(("call", "field", "says"), [
    # Was "must be a non-empty name, got 'nnn...'" for a name that is not empty.
    (lambda: Coordinator("/tmp/sp-args.sock", {"n" * 201: 1}), "resource", "at most 200 characters"),
    # Was accepted: a uid past 32 bits admits no peer.
    (lambda: Coordinator("/tmp/sp-args.sock", {"pg": 1}, allowed_uids=[2**32]), "allowed_uids", "4294967295"),
    (lambda: Coordinator("/tmp/sp-args.sock", {"pg": 1}, admin_uids=[10**20]), "admin_uids", "4294967295"),
], ids=["name-201", "uid-2**32", "admin-uid-10**20"])
def test_values_out_of_range_say_the_range(call: Callable[[], Any], field: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    assert err.value.field == field and says in str(err.value), err.value


def test_a_resource_flag_with_an_empty_key_says_key_value() -> None:
    from sharedpool.config import parse_resource_flags

    with pytest.raises(ConfigError) as err:  # was "resources.pg.: unknown setting"
        parse_resource_flags(["pg=3,=4"])
    assert err.value.field == "--resource pg" and "key=value" in str(err.value), err.value


def test_a_script_path_that_is_not_utf8_still_gets_a_session(start_coordinator: Any, sock_path: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The default session name is argv[0]'s basename; not UTF-8, Python keeps
    # its bytes as surrogates, and every hello failed: "coordinator unreachable".
    start_coordinator({"r": 1})
    monkeypatch.setattr("sys.argv", ["/srv/w\udcff.py"])
    client = Client(sock_path)
    try:
        client.release(client.acquire("r", 5))
        assert client.inspect("server")["pid"] > 0
    finally:
        client.close()


def test_a_socket_path_that_is_not_utf8_can_be_inspected(tmp_path: pathlib.Path) -> None:
    # The "server" reply carries the path: "reply_unencodable" made `status` fail.
    path = str(tmp_path / "\udcff.sock")
    with Coordinator(path, {"r": 1}):
        client = Client(path)
        try:
            assert client.inspect("server")["socket"] == str(tmp_path / "\\udcff.sock")
        finally:
            client.close()


def test_a_resource_name_that_is_not_utf8_is_named_not_a_traceback() -> None:
    with pytest.raises(ConfigError) as err:  # was a LocalProtocolError from encoding the welcome
        Coordinator("/tmp/sp-args.sock", {"\udcff": 1})
    assert err.value.field == "resource" and "UTF-8" in str(err.value)


def test_a_leak_site_in_a_file_whose_path_is_not_utf8_is_reported(start_coordinator: Any,
                                                                   sock_path: str) -> None:
    # The call site goes into the client's reports: one that cannot be encoded
    # lost the report (the lease's site and state never reached the coordinator).
    start_coordinator({"r": 1})
    pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1, leak_detection_threshold=0.05),
                          resource="r", coordinator=sock_path)
    try:
        scope: dict[str, Any] = {"pool": pool}
        exec(compile("conn = pool.acquire()", "/srv/w\udcff.py", "exec"), scope)
        client = Client(sock_path)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                rows = client.inspect("leases")["leases"]
                if rows and rows[0].get("site"):
                    break
                time.sleep(0.05)
            assert rows and "w\\udcff.py" in (rows[0].get("site") or ""), rows
        finally:
            client.close()
        pool.release(scope["conn"])
    finally:
        pool.close()


def test_a_reload_of_a_config_whose_path_is_not_utf8_is_answered(tmp_path: pathlib.Path) -> None:
    # The reply names the file, and so does a failed reload's error: before, both
    # were "reply_unencodable" (a reload that had taken effect read as failed).
    conf = str(tmp_path / "c\udcff.toml")
    with open(conf, "w") as f:
        f.write("[resources.r]\nmax_size = 1\n")
    with Coordinator(config=CoordinatorConfig.load(conf, socket_path=str(tmp_path / "sp.sock"))):
        client = Client(str(tmp_path / "sp.sock"))
        try:
            assert client.admin("reload")["reloaded"] == str(tmp_path / "c\\udcff.toml")
            os.unlink(conf)
            with pytest.raises(SharedPoolError, match=r"cannot read .*c\\udcff\.toml") as err:
                client.admin("reload")
            assert "unencodable" not in str(err.value)
        finally:
            client.close()


def test_a_redis_class_whose_init_a_decorator_hides_is_not_second_guessed() -> None:
    from sharedpool.contrib.redis import _keywords

    def hide(init: Any) -> Any:  # a decorator without functools.wraps
        def wrapper(*args: Any, **kwargs: Any) -> None:
            init(*args, **kwargs)
        return wrapper

    class Base:
        def __init__(self, db: int = 0) -> None:
            pass

    class Middle(Base):
        @hide
        def __init__(self, password: str = "", **kwargs: Any) -> None:  # takes password=: unseen
            super().__init__(**kwargs)

    class Top(Middle):
        def __init__(self, host: str = "", **kwargs: Any) -> None:
            super().__init__(**kwargs)

    for cls in (Base, Middle, Top):
        cls.__module__ = "redis.connection"  # as if redis-py's own
    names, complete = _keywords(Top)
    assert "host" in names and not complete  # Base's fixed signature would refuse password=
    assert _keywords(Base) == (frozenset({"db"}), True)
