"""The PostgreSQL fence, against real backends of real client processes killed with SIGKILL.

Measured on PostgreSQL 15 (loopback TCP, 2 CPUs): an idle client's backend
left pg_stat_activity ~4 ms (median; max 6 ms) after SIGKILL; a busy one
(``pg_sleep(5)``) stayed until its query ended, 5.0 s after it started;
pg_terminate_backend() removed it in ~1.3 ms (median; max 4.4 ms), and a whole
``wait_backends_gone(action="terminate")`` call, monitor connect included,
took 8-15 ms.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator

import psycopg
import pytest
from pg_helpers import require_pg

from sharedpool.errors import ConfigError
from sharedpool.fence import (
    FenceCheck,
    MonitorConnections,
    backends_started_since,
    check_monitor_dsn,
    pg_fence_check,
    wait_backends_gone,
    warm_monitor,
)

pytestmark = pytest.mark.pg

# A client process: connect, print the backend pid, then idle or run pg_sleep(5).
CLIENT = r"""
import sys, time, psycopg
dsn, app, mode = sys.argv[1:4]
conn = psycopg.connect(dsn, application_name=app, autocommit=True)
print(conn.info.backend_pid, flush=True)
if mode == "busy":
    conn.execute("SELECT pg_sleep(5)")
time.sleep(120)
"""


Start = Callable[[str], tuple["subprocess.Popen[str]", int]]


def _app() -> str:
    return f"sp-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def dsn() -> str:
    return require_pg()


@pytest.fixture
def monitor(dsn: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(dsn, autocommit=True, application_name=_app()) as conn:
        yield conn


@pytest.fixture
def client(dsn: str, monitor: psycopg.Connection) -> Iterator[Start]:
    """Start client processes: ``start(mode) -> (Popen, backend pid)``; all killed at the end."""
    procs: list[subprocess.Popen[str]] = []
    started: list[tuple[int, str]] = []

    def start(mode: str) -> tuple[subprocess.Popen[str], int]:
        app = _app()
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, dsn, app, mode], stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout is not None
        pid = int(proc.stdout.readline())
        started.append((pid, app))
        state = "active" if mode == "busy" else "idle"
        deadline = time.monotonic() + 10
        while not _present(monitor, pid, state):
            assert time.monotonic() < deadline, f"backend {pid} never became {state}"
            time.sleep(0.002)
        return proc, pid

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    for pid, app in started:  # leave no pg_sleep behind for the other tests
        monitor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid = %s AND application_name = %s",
            (pid, app),
        )


def _present(monitor: psycopg.Connection, pid: int, state: str | None = None) -> bool:
    sql = "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND (%s::text IS NULL OR state = %s)"
    return monitor.execute(sql, (pid, state, state)).fetchone() is not None


def _kill(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_killed_idle_client_backend_leaves(dsn: str, client: Start) -> None:
    proc, pid = client("idle")
    start = time.monotonic()
    _kill(proc)
    assert asyncio.run(wait_backends_gone(dsn, [pid], timeout=5.0)) == set()
    print(f"idle backend confirmed gone {1e3 * (time.monotonic() - start):.1f} ms after SIGKILL")


def test_killed_busy_client_backend_stays_until_query_ends(
    dsn: str, monitor: psycopg.Connection, client: Start
) -> None:
    proc, pid = client("busy")
    row = monitor.execute(
        "SELECT extract(epoch FROM clock_timestamp() - query_start)::float8"
        " FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    ).fetchone()
    assert row is not None
    seen = time.monotonic() - row[0]  # when the query started, on our clock
    _kill(proc)
    assert asyncio.run(wait_backends_gone(dsn, {pid}, timeout=1.0)) == {pid}
    assert asyncio.run(wait_backends_gone(dsn, {pid}, timeout=10.0)) == set()
    lived = time.monotonic() - seen
    assert lived >= 4.8, f"backend left {lived:.2f}s into a 5 s query"
    print(f"busy backend left {lived:.3f}s after its pg_sleep(5) started")


def test_terminate_ends_killed_busy_client(dsn: str, client: Start) -> None:
    proc, pid = client("busy")
    _kill(proc)
    start = time.monotonic()
    assert asyncio.run(wait_backends_gone(dsn, {pid}, action="terminate", timeout=5.0)) == set()
    took = time.monotonic() - start
    assert took < 3.0, "the backend ended with its query, not by pg_terminate_backend"
    print(f"terminate confirmed in {1e3 * took:.1f} ms")


def test_live_backend_times_out(dsn: str) -> None:
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        start = time.monotonic()
        assert asyncio.run(wait_backends_gone(dsn, {pid}, timeout=0.2)) == {pid}
        assert time.monotonic() - start < 2.0
        conn.execute("SELECT 1")  # "wait" never touches the backend


def test_terminate_live_idle_backend(dsn: str) -> None:
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        assert asyncio.run(wait_backends_gone(dsn, [pid], action="terminate")) == set()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


async def _terminate_if_started(dsn: str, pid: int, earliest_ago: float | None,
                                latest_ago: float) -> set[int]:
    """wait_backends_gone(action="terminate") on ``pid``, told its backend
    started after ``earliest_ago`` and before ``latest_ago`` seconds ago."""
    now = asyncio.get_running_loop().time()
    window = (None if earliest_ago is None else now - earliest_ago, now - latest_ago)
    return await wait_backends_gone(dsn, {pid}, action="terminate", timeout=0.3,
                                    started={pid: window})


@pytest.mark.parametrize("earliest_ago,latest_ago", [
    (None, 5.0),  # its pid was reported 5 s ago: the backend there now came later (pid reused)
    (-1.0, -1.0),  # its lease was granted after the backend started: reported wrongly
])
def test_terminate_spares_a_backend_started_outside_its_lease(
        dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        earliest_ago: float | None, latest_ago: float) -> None:
    monkeypatch.setattr("sharedpool.fence.START_SLACK", 0.0)
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        with caplog.at_level(logging.WARNING, logger="sharedpool.fence"):
            assert asyncio.run(_terminate_if_started(dsn, pid, earliest_ago, latest_ago)) == {pid}
        conn.execute("SELECT 1")  # not terminated: another connection's backend
    assert f"backend {pid} started outside the lease" in caplog.text


def test_terminate_ends_a_backend_started_within_its_lease(dsn: str) -> None:
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        assert asyncio.run(_terminate_if_started(dsn, pid, 5.0, 0.0)) == set()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")


@pytest.mark.parametrize("earliest_ago,latest_ago", [
    (-0.5, -0.5),  # half a second outside both bounds: within START_SLACK (two clocks)
    (2000.0, 2.5),  # reported 2.5 s ago, started now: within a thousandth of a 2000 s lease
])
def test_terminate_ends_a_backend_within_the_slack_of_its_lease(
        dsn: str, caplog: pytest.LogCaptureFixture, earliest_ago: float, latest_ago: float) -> None:
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        with caplog.at_level(logging.WARNING, logger="sharedpool.fence"):
            assert asyncio.run(_terminate_if_started(dsn, pid, earliest_ago, latest_ago)) == set()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    assert "started outside" not in caplog.text


def test_the_monitor_never_terminates_its_own_backend(dsn: str) -> None:
    """A dead worker's reported pid that is now the monitor connection's own
    (reused, or reported wrongly): waited for, never terminated, and the
    monitor connection is kept."""
    async def run() -> tuple[bool, bool]:
        monitors = MonitorConnections()
        try:
            conn = await monitors.get(psycopg, dsn, application_name=_app())
            pid = conn.info.backend_pid
            # Its last poll well before the deadline: a query the deadline cut
            # would drop the monitor connection too (as a fence should).
            left = await wait_backends_gone(dsn, {pid}, action="terminate", timeout=0.5,
                                            poll_interval=0.1, monitors=monitors)
            return left == {pid}, await monitors.get(psycopg, dsn) is conn and not conn.broken
        finally:
            await monitors.aclose()

    assert asyncio.run(run()) == (True, True)


def test_a_fence_that_runs_out_its_time_keeps_the_monitor_connection(dsn: str) -> None:
    """A live backend (a query longer than fence_timeout): the wait ends on
    time without cutting a query short, and the next fence does not pay a
    reconnect (4-20 ms, most of a dead worker's slot-return time)."""
    with psycopg.connect(dsn, application_name=_app()) as other:
        pid = other.info.backend_pid

        async def run() -> tuple[bool, bool]:
            monitors = MonitorConnections()
            try:
                conn = await monitors.get(psycopg, dsn, application_name=_app())
                left = await wait_backends_gone(dsn, {pid}, timeout=0.5, poll_interval=0.1,
                                                monitors=monitors)
                return left == {pid}, await monitors.get(psycopg, dsn) is conn
            finally:
                await monitors.aclose()

        assert asyncio.run(run()) == (True, True)


def test_monitor_connections_keep_no_lock_per_dsn_once_done(dsn: str) -> None:
    """A lock per DSN was kept for the coordinator's lifetime: every
    ``monitor_dsn`` a reload ever named (a password rotated each day, another
    host) left one behind, its connection closed. Kept only while in use now,
    and two fences asking at once still share one connect."""
    async def run() -> tuple[bool, int, int]:
        monitors = MonitorConnections()
        app = _app()
        shared = True
        try:
            for n in range(20):
                each = f"{dsn} application_name={app}-{n}"
                first, second = await asyncio.gather(monitors.get(psycopg, each),
                                                     monitors.get(psycopg, each))
                shared = shared and first is second
                await monitors.close_except(lambda: ())  # a reload dropped it
            return shared, len(monitors._conns), len(monitors._locks)
        finally:
            await monitors.aclose()

    assert asyncio.run(run()) == (True, 0, 0)


def test_unknown_and_empty_pids(dsn: str) -> None:
    assert asyncio.run(wait_backends_gone(dsn, [os.getpid()], timeout=2.0)) == set()
    assert asyncio.run(wait_backends_gone(dsn, [], timeout=2.0)) == set()


def test_backends_started_since(dsn: str) -> None:
    """What a restart asks of a marker's backend pids: which were started
    since it was written (by the server's clock), i.e. are someone else's."""
    with psycopg.connect(dsn, application_name=_app()) as conn:
        pid = conn.info.backend_pid
        assert asyncio.run(backends_started_since(dsn, [pid, os.getpid()], 600.0)) == {pid}
        time.sleep(0.2)
        assert asyncio.run(backends_started_since(dsn, {pid}, 0.1)) == set()
        assert asyncio.run(backends_started_since(dsn, [], 600.0)) == set()
    # A server that cannot be asked: None, not "none of them" (the caller keeps them all).
    port = _free_port()
    assert asyncio.run(backends_started_since(f"host=127.0.0.1 port={port}", {7}, 60.0)) is None


def test_monitor_unreachable_returns_pids_and_hides_password(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = f"host=127.0.0.1 port={_free_port()} dbname=test user=postgres password=s3cr3t-pw"
    with caplog.at_level(logging.WARNING, logger="sharedpool.fence"):
        assert asyncio.run(wait_backends_gone(bad, {1, 2}, timeout=5.0)) == {1, 2}
    assert "127.0.0.1" in caplog.text
    assert "s3cr3t" not in caplog.text
    # Nothing to fence: no connection attempted, no warning.
    caplog.clear()
    assert asyncio.run(wait_backends_gone(bad, set())) == set()
    assert caplog.text == ""


@pytest.mark.parametrize("dsn", [
    "postgresql://postgres:s3cr@PIECE@127.0.0.1:5432/test",  # libpq's host: "PIECE@127.0.0.1"
    "postgresql://postgres:PIECE/s3cr@127.0.0.1:5432/test",  # host "postgres", port "PIECE"
])
def test_a_password_libpq_reads_as_host_or_port_is_refused_unquoted(
        dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """An '@' or '/' in a URL's password not percent-encoded: the DSN parsed, so it was
    taken, and the warm-up's and every fence's warning named the "host" or "port" it
    read, a piece of the password, with libpq's error quoting it again."""
    with pytest.raises(ConfigError) as info:
        check_monitor_dsn("resources.pg.monitor_dsn", dsn)
    assert info.value.field == "resources.pg.monitor_dsn" and "percent-encoded" in info.value.detail
    assert "PIECE" not in str(info.value) and "s3cr" not in str(info.value), info.value

    async def warm() -> bool:
        monitors = MonitorConnections()
        try:
            return await warm_monitor(monitors, dsn, timeout=3.0)
        finally:
            await monitors.aclose()

    with caplog.at_level(logging.WARNING, logger="sharedpool.fence"):
        assert asyncio.run(warm()) is False
        with pytest.raises(ConfigError) as info:  # as for any malformed DSN
            asyncio.run(wait_backends_gone(dsn, {1}, timeout=3.0))
    assert "PIECE" not in str(info.value)
    assert "PIECE" not in caplog.text and "s3cr" not in caplog.text, caplog.text


def test_a_monitor_dsn_with_encoded_characters_or_several_hosts_is_taken() -> None:
    check_monitor_dsn("monitor_dsn", "postgresql://u:p%40s%2Fs@127.0.0.1:5432,127.0.0.1:5433/test")
    check_monitor_dsn("monitor_dsn", "host=/run/pg@x,127.0.0.1 port=5432,5433 dbname=test")
    check_monitor_dsn("monitor_dsn", "host=@pg.abstract dbname=test")  # Linux's abstract namespace


def test_monitor_connect_timeout_returns_pids(caplog: pytest.LogCaptureFixture) -> None:
    # A listener that never answers the startup packet: the deadline covers connect.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sharedpool.fence"):
            got = asyncio.run(wait_backends_gone(f"host=127.0.0.1 port={port}", {7}, timeout=0.3))
        assert got == {7}
        assert time.monotonic() - start < 3.0
        assert f"127.0.0.1:{port}" in caplog.text


def test_bad_arguments_name_the_field() -> None:
    cases = [
        ({"action": "kill"}, "action"),
        ({"timeout": 0}, "timeout"),
        ({"poll_interval": 0}, "poll_interval"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ConfigError) as info:
            asyncio.run(wait_backends_gone("host=127.0.0.1", {1}, **kwargs))  # type: ignore[arg-type]
        assert info.value.field == field
    with pytest.raises(ConfigError) as info:
        asyncio.run(wait_backends_gone("host=x password='s3cr3t", {1}))
    assert info.value.field == "monitor_dsn"
    assert "s3cr3t" not in str(info.value)
    assert info.value.__cause__ is None


def test_without_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # makes "import psycopg" fail
    with pytest.raises(ConfigError, match="sharedpool\\[pg\\]") as info:
        asyncio.run(wait_backends_gone("host=127.0.0.1", {1}))
    assert info.value.field == "monitor_dsn"


def test_fence_check_protocol(dsn: str, client: Start) -> None:
    async def never_gone(pids: Collection[int], /) -> set[int]:
        return set(pids)

    checks: list[FenceCheck] = [never_gone, pg_fence_check(dsn, action="terminate", timeout=5.0)]
    proc, pid = client("busy")
    _kill(proc)
    assert asyncio.run(checks[0]({pid})) == {pid}
    assert asyncio.run(checks[1]({pid})) == set()
