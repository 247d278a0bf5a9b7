"""The fence end to end: a worker SIGKILLed in the middle of a query leaves its
backend running; other workers hammer the same resource; PostgreSQL must never
see more than the cap (I1, I2)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_helpers import BackendSampler, pg_dsn
from servers import wait_for
from test_pg_cap import finish, spawn

from sharedpool import Client, Resource

HERE = Path(__file__).parent


@contextlib.contextmanager
def child(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``python -c code *args`` with the tests' helpers importable, its stdout a
    pipe; killed (by pid) on the way out if still running."""
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def pid_known(sock: str, backend: int) -> None:
    """Wait until the coordinator shows ``backend`` as a lease's backend pid: a
    clean stop hands on only what it has read (a fixed 0.3 s was a guess)."""
    probe = Client(sock, name="pid-known")
    try:
        wait_for(lambda: any(row["backend_pid"] == backend for row in probe.inspect("leases")["leases"]),
                 20, f"backend pid {backend} at the coordinator", every=0.02)
    finally:
        probe.close()


def pid_handed_on(sock: str, backend: int) -> None:
    """Wait until the restart marker names ``backend``: what a SIGKILLed
    coordinator hands on is what it last wrote."""
    from sharedpool.marker import backends_named, marker_path, read_marker

    def named() -> bool:
        return any(backend in pids for pids in backends_named(read_marker(marker_path(sock))).values())

    wait_for(named, 20, f"backend pid {backend} in the restart marker", every=0.02)


_BUSY = """
import sys, psycopg
from pg_helpers import pg_dsn
from sharedpool import ConnectionPool, PoolConfig
sock, app, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), application_name=app, autocommit=True),
                      PoolConfig(min_size=0, max_size=1), resource="pg", coordinator=sock)
with pool.connection(timeout=30) as conn:
    print("querying", conn.info.backend_pid, flush=True)
    conn.execute("SELECT pg_sleep(%s)", (seconds,))
"""


def busy_worker(sock: str, app: str,
                seconds: float) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
    """A worker in a ``seconds``-long query; it prints ``querying BACKEND_PID`` first."""
    return child(_BUSY, sock, app, str(seconds))


@pytest.mark.parametrize("action", ["wait", "terminate"])
def test_worker_killed_mid_query_never_puts_pg_over_the_cap(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, action: str) -> None:
    cap = 3
    start_coordinator({"pg": Resource(max_size=cap, monitor_dsn=pg_dsn(), fence_action=action,
                                      fence_timeout=20, acquire_timeout=60)})
    probe = Client(sock_path)
    with BackendSampler(app_name) as sampler, busy_worker(sock_path, app_name, 3.0) as victim:
        assert victim.stdout is not None
        line = victim.stdout.readline().split()
        assert line and line[0] == "querying", line
        backend = int(line[1])
        # Others hammer the same resource: they want every slot.
        hammer = [spawn(sock_path, app_name, 100, "2", "2", "0.005") for _ in range(4)]
        time.sleep(0.3)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        results = [finish(p, timeout=120) for p in hammer]
    assert all(r["n_errors"] == 0 for r in results), [r["errors"] for r in results]
    assert sampler.peak <= cap, f"PostgreSQL saw {sampler.peak} connections with a cap of {cap}"
    assert sampler.peak == cap
    import psycopg

    # The killed worker's backend ends with its query ("wait") or at once
    # ("terminate"); until then its slot stays fenced.
    deadline = time.monotonic() + 15
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        while True:
            fenced = probe.inspect("resources")["resources"][0]["fenced"]
            present = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                   (backend,)).fetchone() != (0,)
            if not fenced:
                assert not present, "the fence was lifted while the backend still ran"
                break
            assert time.monotonic() < deadline, "the killed worker's backend never went away"
            time.sleep(0.05)
    deadline = time.monotonic() + 5
    while probe.inspect("resources")["resources"][0]["leased"]:
        assert time.monotonic() < deadline, "the fenced slot was never freed"
        time.sleep(0.05)
    probe.close()


def test_a_fence_that_runs_out_its_fence_timeout_says_so(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        capfd: pytest.CaptureFixture[str]) -> None:
    """The log said the slots "stay fenced until fence_timeout"; when that came,
    the ledger freed them with no line at all: an operator never learned when,
    nor that the backends were never seen to go."""
    start_coordinator({"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="wait",
                                      fence_timeout=1.5, acquire_timeout=60)})
    with busy_worker(sock_path, app_name, 6.0) as victim:  # its backend outlives the fence
        assert victim.stdout is not None and victim.stdout.readline().startswith("querying")
        time.sleep(0.3)  # its backend pid has reached the coordinator
        victim.kill()
        victim.wait(10)
        seen: list[str] = []

        def said() -> bool:
            seen.append(capfd.readouterr().err)
            return "fence_timeout (1.5s) passed for dead pid" in "".join(seen)

        wait_for(said, 10, "the fence's end in the coordinator's log")
    text = "".join(seen)
    assert "not confirmed gone" in text and "1 slot(s) of pg free again" in text, text


_BARE = """
import sys, time
from sharedpool import Client
client = Client(sys.argv[1])
lease = client.acquire("pg", timeout=10)
print("held", lease.id, flush=True)
time.sleep(60)
"""


def test_a_dead_workers_lease_with_no_backend_pid_known_waits_the_quarantine_delay(
        pg: str, start_coordinator: Any, sock_path: str) -> None:
    """A lease whose connection never reported a backend pid (it was still
    connecting) cannot be checked in pg_stat_activity: its slot waits for
    quarantine_delay, not freed at once by a check that had nothing to look for."""
    start_coordinator({"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), quarantine_delay=1.5,
                                      fence_timeout=20, acquire_timeout=30)})
    probe = Client(sock_path)
    try:
        with child(_BARE, sock_path) as victim:
            assert victim.stdout is not None
            line = victim.stdout.readline().split()
            assert line and line[0] == "held", line
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            t0 = time.monotonic()
            lease = probe.acquire("pg", timeout=15)
            waited = time.monotonic() - t0
        assert waited >= 1.2, f"the slot was free after {waited:.2f}s, before quarantine_delay"
        assert waited < 10, f"the slot waited {waited:.2f}s: fence_timeout, not quarantine_delay"
        probe.release(lease)
    finally:
        probe.close()


_WRONG_PID = """
import sys, time
from sharedpool import Client
sock, pid = sys.argv[1], int(sys.argv[2])
client = Client(sock)
lease = client.acquire("pg", timeout=10)
client.add_state_provider(lambda: [[lease.id, "busy", pid, None]])  # a connection it does not own
client.report_now()
print("reported", flush=True)
time.sleep(60)
"""


def test_terminate_spares_a_backend_a_dead_worker_reported_but_did_not_open(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A worker reports the backend pid of a connection that is not its own (an
    integration's bug, or a pid it recorded long ago that PostgreSQL has given
    to a newer backend since), then dies: before, the fence called
    pg_terminate_backend on that other connection. One that started before the
    lease was granted cannot be the lease's: it is waited for (fence_timeout),
    not terminated."""
    import psycopg

    start_coordinator({"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                                      fence_timeout=2, acquire_timeout=30)})
    with psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True) as other:
        time.sleep(1.3)  # it started before the worker's lease, by more than the fence's 1 s slack
        with child(_WRONG_PID, sock_path, str(other.info.backend_pid)) as worker:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "reported"
            time.sleep(0.2)  # the report has reached the coordinator
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(10)
            probe = Client(sock_path)
            try:
                t0 = time.monotonic()
                probe.release(probe.acquire("pg", timeout=20))  # the slot comes back at fence_timeout
                assert time.monotonic() - t0 < 10
            finally:
                probe.close()
        assert other.execute("SELECT 1").fetchone() == (1,), "the fence ended another connection"


def _kill_once_back(probe: Client, worker: subprocess.Popen[str]) -> None:
    """SIGKILL ``worker`` once it has a session on the restarted coordinator
    (its leases re-registered), and reap it."""
    deadline = time.monotonic() + 10
    while not any(s["pid"] == worker.pid for s in probe.inspect("sessions")["sessions"]):
        assert time.monotonic() < deadline, "the worker never re-registered"
        time.sleep(0.05)
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(10)


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_terminate_spares_a_backend_outside_its_lease_across_a_coordinator_restart(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, how: str) -> None:
    """As above, with the coordinator restarted (clean stop, or SIGKILL) while
    the worker held its lease: the new coordinator took the lease from the
    marker with no grant time and its pid as first reported at the restart, so
    any backend started before the restart fit, and the other connection was
    pg_terminate_backend'ed. The marker hands on when each lease's backend can
    have started."""
    import psycopg

    limits = {"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                             fence_timeout=2, acquire_timeout=30)}
    first = start_coordinator(limits)
    with psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True) as other:
        time.sleep(1.3)  # it started before the worker's lease, by more than the fence's 1 s slack
        with child(_WRONG_PID, sock_path, str(other.info.backend_pid)) as worker:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "reported"
            pid_handed_on(sock_path, other.info.backend_pid)  # for a SIGKILL, the marker must have it
            if how == "stop":
                first.stop()
            else:
                first.kill()
            start_coordinator(limits, restart_grace=1.5)
            probe = Client(sock_path)
            try:
                _kill_once_back(probe, worker)
                probe.release(probe.acquire("pg", timeout=20))  # the slot comes back at fence_timeout
            finally:
                probe.close()
        assert other.execute("SELECT 1").fetchone() == (1,), "the fence ended another connection"


def test_terminate_ends_a_dead_workers_backend_across_a_coordinator_restart(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """The other side of the test above: the worker's own backend, busy in a
    long query, is still terminated by the fence of a coordinator restarted
    (SIGKILL, its marker written seconds before) while the worker held it."""
    import psycopg

    limits = {"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                             fence_timeout=30, acquire_timeout=60)}
    first = start_coordinator(limits)
    with busy_worker(sock_path, app_name, 60.0) as worker:
        assert worker.stdout is not None
        line = worker.stdout.readline().split()
        assert line and line[0] == "querying", line
        backend = int(line[1])
        time.sleep(2.0)  # the marker is older than the fence's 1 s slack when the new one reads it
        first.kill()
        start_coordinator(limits, restart_grace=1.0)
        probe = Client(sock_path)
        try:
            _kill_once_back(probe, worker)
            t0 = time.monotonic()
            probe.release(probe.acquire("pg", timeout=40))
            assert time.monotonic() - t0 < 10, "the worker's backend was waited for, not terminated"
        finally:
            probe.close()
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (backend,)).fetchone() == (0,)


def test_failing_connects_fail_waiters_fast_and_recover(start_coordinator: Any, sock_path: str) -> None:
    """A burst of connect failures reported by processes makes the coordinator
    fail waiters at once instead of letting each time out; it recovers by itself."""
    from sharedpool import ConnectionPool, PoolConfig, ResourceUnavailable
    from sharedpool.testing import FakeFactory

    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=30)})
    factory = FakeFactory(fail=OSError("connection refused"))
    pool = ConnectionPool(factory, PoolConfig(min_size=0, max_size=2), resource="pg",
                          coordinator=sock_path)
    try:
        for _ in range(6):  # each caller gets the real error
            with pytest.raises(OSError, match="connection refused"):
                pool.acquire(timeout=5)
        time.sleep(0.5)  # the failures reach the coordinator in a coalesced report
        t0 = time.monotonic()
        with pytest.raises((ResourceUnavailable, OSError)):
            pool.acquire(timeout=20)
        assert time.monotonic() - t0 < 5, "waiters should fail fast while connects fail"
        factory.fail = None  # the database is back
        deadline = time.monotonic() + 10
        while True:
            try:
                with pool.connection(timeout=5) as conn:
                    assert conn.execute() == 1
                break
            except ResourceUnavailable:
                assert time.monotonic() < deadline, "never recovered"
                time.sleep(0.2)
        probe = Client(sock_path)
        try:  # no longer failing once the success is reported (a coalesced report: soon)
            deadline = time.monotonic() + 5
            while probe.inspect("resources")["resources"][0]["failing"]:
                assert time.monotonic() < deadline, "still shown failing after a connect succeeded"
                time.sleep(0.05)
        finally:
            probe.close()
    finally:
        pool.close()


_MISCONFIGURED = """
import sys, time, psycopg
from pg_helpers import pg_dsn
from sharedpool import ConnectionPool, PoolConfig
sock, app, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
dsn = pg_dsn().replace("dbname=test", "dbname=sharedpool_no_such_db")
pool = ConnectionPool(lambda: psycopg.connect(dsn, application_name=app), PoolConfig(min_size=0, max_size=1),
                      resource="pg", coordinator=sock)
failed, end = 0, time.monotonic() + seconds
print("started", flush=True)
while time.monotonic() < end and failed < 500:
    try:
        pool.acquire(timeout=5)
    except Exception as exc:
        failed += 1
        time.sleep(0.005)
pool.close()
print("failed", failed, flush=True)
"""


def test_one_misconfigured_process_does_not_fail_the_others_fast(start_coordinator: Any, sock_path: str,
                                                                 app_name: str) -> None:
    """A worker whose DSN names a database that does not exist fails connect
    after connect, while this process's connects work: its failures are its
    own. Before, the coordinator refused this process's new connections too,
    for a second at a time; now only the failing process's."""
    import psycopg

    from sharedpool import ConnectionPool, PoolConfig

    start_coordinator({"pg": Resource(max_size=4, acquire_timeout=30)})

    def connect() -> Any:
        return psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)

    good = ConnectionPool(connect, PoolConfig(min_size=0, max_size=1), resource="pg", coordinator=sock_path)
    # Closed at each checkin (older than its max_lifetime): a new lease for every checkout.
    churn = ConnectionPool(connect, PoolConfig(min_size=0, max_size=1, max_lifetime=1e-6), resource="pg",
                           coordinator=sock_path)
    try:
        with good.connection(timeout=10) as conn:
            conn.execute("SELECT 1")  # connected, and reported so: idle in the pool from here
        opened = 0
        with child(_MISCONFIGURED, sock_path, app_name + "-bad", "2.0") as bad:
            assert bad.stdout is not None and bad.stdout.readline().strip() == "started"
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                with churn.connection(timeout=10) as conn:  # refused "failing" before
                    conn.execute("SELECT 1")
                opened += 1
                time.sleep(0.01)
            line = bad.stdout.readline().split()
            assert bad.wait(15) == 0
        assert line[0] == "failed" and int(line[1]) >= 20, line  # it did fail, many times
        assert opened > 10 and churn.get_stats()["connections_num"] >= opened
    finally:
        churn.close()
        good.close()


def test_failures_reported_on_a_bare_client_reach_the_coordinator(start_coordinator: Any,
                                                                  sock_path: str) -> None:
    # A client that never made a request has no background thread yet: the
    # report must start it, or the failures wait for a request that may never come.
    from sharedpool.reports import FAILURE_THRESHOLD

    start_coordinator({"pg": 2})
    reporter, probe = Client(sock_path), Client(sock_path)
    try:
        assert reporter.ensure_connected()
        for _ in range(FAILURE_THRESHOLD):
            reporter.report_failure("pg")
        deadline = time.monotonic() + 5
        while not probe.inspect("resources")["resources"][0]["failing"]:
            assert time.monotonic() < deadline, "the failures never reached the coordinator"
            time.sleep(0.05)
        reporter.close()
        thread = reporter._thread
        reporter.report_failure("pg")  # after close(): nobody to send it to, and no thread for it
        reporter.report_cost("pg", 0.01)
        assert reporter._thread is thread, "a closed client started a thread"
    finally:
        reporter.close()
        probe.close()


def test_monitor_connection_is_open_before_anyone_dies(pg: str, start_coordinator: Any,
                                                       app_name: str) -> None:
    # The first dead worker must not also pay for the monitor's connect (that
    # was the tail of the chaos run's slot-return times).
    import psycopg

    start_coordinator({"pg": Resource(max_size=2, monitor_dsn=f"{pg_dsn()} application_name={app_name}")})
    deadline = time.monotonic() + 10
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                               (app_name,)).fetchone()
            if row == (1,):
                break
            assert time.monotonic() < deadline, f"no monitor connection yet: {row}"
            time.sleep(0.05)


def test_a_lost_monitor_connection_is_replaced_at_the_next_death(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """The coordinator's cached monitoring connection died while idle (a server
    restart, idle_session_timeout, pg_terminate_backend): the next dead
    worker's fence makes a new one at once instead of running out its
    fence_timeout with PostgreSQL up and the backend long gone."""
    import psycopg

    monitor_app = f"{app_name}-monitor"
    start_coordinator({"pg": Resource(max_size=1, fence_timeout=8, acquire_timeout=30,
                                      monitor_dsn=f"{pg_dsn()} application_name={monitor_app}")})
    with psycopg.connect(pg_dsn(), autocommit=True) as admin:
        deadline = time.monotonic() + 10
        while admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = %s", (monitor_app,)).fetchone() != (1,):
            assert time.monotonic() < deadline, "the monitor connection never showed up"
            time.sleep(0.05)
    code = textwrap.dedent(f"""
        import time
        import psycopg
        from pg_helpers import pg_dsn
        from sharedpool import ConnectionPool, PoolConfig
        pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), application_name={app_name!r},
                                                      autocommit=True),
                              PoolConfig(min_size=0, max_size=1), resource="pg",
                              coordinator={sock_path!r})
        with pool.connection(timeout=30) as conn:
            conn.execute("SELECT 1")
        print("idle", flush=True)  # its lease held, its backend idle: gone at once with it
        time.sleep(60)
    """)
    with child(code) as victim:
        assert victim.stdout is not None
        assert victim.stdout.readline().startswith("idle")
        waiter = Client(sock_path)
        try:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            t0 = time.monotonic()
            waiter.release(waiter.acquire("pg", timeout=20))
            assert time.monotonic() - t0 < 4, "the fence waited on its dead monitor connection"
        finally:
            waiter.close()


_REPORTS_ONLY_NOW = """
import os, signal, sys, time
import psycopg
from pg_helpers import pg_dsn
from sharedpool import ConnectionPool, PoolConfig, background
from sharedpool.client import Client

# Only report_now() may tell the coordinator a backend pid here: the background
# thread's own (coalesced, up to 0.2 s late) reports are switched off.
send_report, report_now, now = background.send_report, Client.report_now, [False]
background.send_report = lambda client: send_report(client) if now[0] else None
def only_now(self):
    now[0] = True
    try:
        report_now(self)
    finally:
        now[0] = False
Client.report_now = only_now
sock, app, kind = sys.argv[1:4]

def busy_then_die(conns):
    for conn in conns:
        conn.pgconn.send_query(b"SELECT pg_sleep(4)")  # busy, then gone mid-query
        conn.pgconn.flush()
    print("busy", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

connect = lambda: psycopg.connect(pg_dsn(), application_name=app, autocommit=True)
if kind == "configure":  # setup SQL in configure= (it runs once the pid is reported)
    pool = ConnectionPool(connect, PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock,
                          configure=lambda conn: busy_then_die([conn]))
    pool.acquire(timeout=30)
elif kind == "opener":  # a connection an opener thread made for the caller
    pool = ConnectionPool(connect, PoolConfig(min_size=0, max_size=2), resource="pg", coordinator=sock)
    busy_then_die([pool.acquire(timeout=30).conn, pool.acquire(timeout=30).conn])
elif kind == "topup":  # one maintenance made to reach min_size
    pool = ConnectionPool(connect, PoolConfig(min_size=2, max_size=2), resource="pg", coordinator=sock)
    first = pool.acquire(timeout=30)
    deadline = time.monotonic() + 20
    while pool.get_size() < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    busy_then_die([first.conn, pool.acquire(timeout=30).conn])
else:  # an integration's: SQLAlchemy
    from sharedpool.contrib.sqlalchemy import create_engine
    engine = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/test?application_name={app}",
                           resource="pg", coordinator=sock, pool_size=2, max_overflow=0)
    held = [engine.raw_connection() for _ in range(2)]  # kept: a dropped one goes back to the pool
    busy_then_die([fairy.driver_connection for fairy in held])
"""


@pytest.mark.parametrize("kind", ["configure", "opener", "topup", "sqlalchemy"])
def test_a_new_connections_backend_is_known_before_it_is_used(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, kind: str) -> None:
    # Before, the backend pid went out with a later, coalesced report (or, for
    # the integrations, not at all): a worker killed mid-query on a new
    # connection left a backend the fence never knew, and its slot was handed
    # on while the query ran on (PostgreSQL over the cap).
    start_coordinator({"pg": Resource(max_size=2, monitor_dsn=pg_dsn(), fence_action="terminate",
                                      fence_timeout=20, acquire_timeout=60)})
    with BackendSampler(app_name) as sampler, child(_REPORTS_ONLY_NOW, sock_path, app_name, kind) as victim:
        assert victim.stdout is not None
        assert victim.stdout.readline().strip() == "busy"
        assert victim.wait(10) == -signal.SIGKILL
        result = finish(spawn(sock_path, app_name, 10, "2", "2", "0.1"), timeout=60)
    assert result["n_errors"] == 0, result["errors"]
    assert sampler.peak <= 2, f"PostgreSQL saw {sampler.peak} connections with a cap of 2"


def test_a_worker_that_dies_while_the_coordinator_restarts_is_fenced(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """Before, a clean stop handed on only dead processes' fences: a worker
    killed between the stop and its re-registration was forgotten, and the new
    coordinator granted its slot while its query still ran."""
    limits = {"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                             fence_timeout=20, acquire_timeout=60)}
    first = start_coordinator(limits)
    # A query longer than fence_timeout: waited out, the slot would come back
    # after 20 s, well apart from a terminate's seconds even on a loaded machine
    # (a 5 s query ended 4.2 s after t0: inside the old 4.5 s bound, so a fence
    # that waited passed, and a spawn slow to start failed one that did not).
    with BackendSampler(app_name) as sampler, busy_worker(sock_path, app_name, 30.0) as victim:
        assert victim.stdout is not None
        line = victim.stdout.readline().split()
        assert line and line[0] == "querying", line
        pid_known(sock_path, int(line[1]))
        first.stop()  # a clean stop: a deploy, a config change
        victim.kill()  # and the worker dies meanwhile
        victim.wait(10)
        start_coordinator(limits)
        t0 = time.monotonic()
        result = finish(spawn(sock_path, app_name, 3, "1", "1", "0"), timeout=60)
    assert result["n_errors"] == 0, result["errors"]
    assert sampler.peak <= 1, f"PostgreSQL saw {sampler.peak} connections with a cap of 1"
    # Ended, not waited out (20 s): a generous bound, the spawned worker's start included.
    assert time.monotonic() - t0 < 10, "the dead worker's backend was waited out, not ended"


def test_a_late_process_that_dies_after_the_restart_grace_is_terminated(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A process alive but late when the grace ended keeps its backend; once
    it is gone the fence ends its query (before, only at the end of the grace
    was it checked, then the whole fence_timeout waited out and the slot
    handed on beside the still-running query)."""
    limits = {"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                             fence_timeout=20, acquire_timeout=60)}
    first = start_coordinator(limits)
    # A query longer than fence_timeout.
    with BackendSampler(app_name) as sampler, busy_worker(sock_path, app_name, 30.0) as victim:
        assert victim.stdout is not None
        line = victim.stdout.readline().split()
        assert line and line[0] == "querying", line
        pid_known(sock_path, int(line[1]))
        os.kill(victim.pid, signal.SIGSTOP)  # late: it will not re-register in time
        first.stop()
        start_coordinator(limits, restart_grace=0.5)
        time.sleep(0.8)  # the grace is over; the process is alive
        victim.kill()
        victim.wait(10)
        t0 = time.monotonic()
        result = finish(spawn(sock_path, app_name, 3, "1", "1", "0"), timeout=60)
    assert result["n_errors"] == 0, result["errors"]
    assert sampler.peak <= 1, f"PostgreSQL saw {sampler.peak} connections with a cap of 1"
    # Ended when the process went, not at fence_timeout (20 s): a generous bound, as
    # the spawned worker's own start takes seconds on a loaded machine (5.4 s seen).
    assert time.monotonic() - t0 < 10


def _restart_from_marker(start_coordinator: Any, sock: str, resource: str = "pg",
                         limits: Resource | None = None, grace: float = 1.5,
                         timeout: float = 30) -> float:
    """Start a coordinator on ``sock`` (a marker written there: a restart) and
    time one acquire of ``resource`` there; by default a PostgreSQL resource
    of 1 whose fence terminates. Returns the seconds waited."""
    if limits is None:
        limits = Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                          fence_timeout=20, acquire_timeout=60)
    start_coordinator({resource: limits}, restart_grace=grace)
    client = Client(sock, name="after-the-marker")
    try:
        t0 = time.monotonic()
        client.release(client.acquire(resource, timeout=timeout))
        return time.monotonic() - t0
    finally:
        client.close()


@pytest.mark.parametrize("key", ["held", "fenced"])
def test_a_marker_from_before_a_reboot_fences_no_one_elses_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, key: str) -> None:
    """The marker is kept while serving, so a power loss leaves it behind; in a
    socket directory that outlives a reboot, the next boot's coordinator
    fenced the pids it names, by then maybe someone else's: it terminated
    an unrelated backend that had the recorded pid (and, with "wait", held
    the slot for fence_timeout). A marker from another boot names no one."""
    import psycopg

    from sharedpool.marker import marker_path, write_marker

    innocent = psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)
    try:
        backend, gone_pid, lease_id = innocent.info.backend_pid, 4_194_000, 1_700_000_000_000_000
        rows = {"held": [["pg", lease_id, lease_id, gone_pid, backend]],
                "fenced": [["pg", lease_id, lease_id, gone_pid, 20.0, backend]]}
        write_marker(marker_path(sock_path), {key: rows[key], "boot": "a-boot-before-this-one"})
        waited = _restart_from_marker(start_coordinator, sock_path)
        assert innocent.execute("SELECT 1").fetchone() == (1,)  # not terminated
        assert waited < 1.5 + 5, f"the slot stayed fenced {waited:.1f}s"
    finally:
        innocent.close()


@pytest.mark.parametrize("key", ["held", "fenced"])
def test_a_marker_older_than_a_backend_fences_only_its_own_backends(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, key: str) -> None:
    """On the same boot, a coordinator down long enough for PostgreSQL to give
    a recorded backend pid to a new backend terminated that newcomer (someone
    else's). The marker says when it was written: a backend started since is
    not one it names; one older than the marker still is, and is ended."""
    import psycopg

    from sharedpool.marker import marker_path, write_marker

    ours = psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)
    time.sleep(2.5)
    # Written 0.1 s after ours started: `newer` (started 2.4 s after the
    # marker, whose backend pid stands for a pid come round) is not its.
    written = time.monotonic() - 2.4
    newer = psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)
    try:
        gone_pid, rows = 4_194_000, []
        for n, conn in enumerate((ours, newer)):
            lease_id = 1_700_000_000_000_000 + n
            rows.append({"held": ["pg", lease_id, lease_id, gone_pid, conn.info.backend_pid],
                         "fenced": ["pg", lease_id, lease_id, gone_pid, 20.0,
                                    conn.info.backend_pid]}[key])
        write_marker(marker_path(sock_path), {key: rows, "mono": written})
        waited = _restart_from_marker(start_coordinator, sock_path)
        assert newer.execute("SELECT 1").fetchone() == (1,)  # not terminated
        with pytest.raises(psycopg.OperationalError):
            ours.execute("SELECT 1")  # terminated, as any fenced backend of a dead process
        assert waited < 1.5 + 5, f"the slot stayed fenced {waited:.1f}s"
    finally:
        ours.close()
        newer.close()


def test_a_restored_fence_lasts_only_the_time_it_had_left(
        start_coordinator: Any, sock_path: str) -> None:
    """The marker keeps a fence's time left as of its last write (rewritten
    only on real changes): a coordinator restarted from it fenced for all of
    that again, however long ago it was written."""
    from sharedpool.marker import marker_path, write_marker

    lease_id = 1_700_000_000_000_000
    write_marker(marker_path(sock_path), {"fenced": [["r", lease_id, lease_id, 4_194_000, 20.0, None]],
                                          "mono": time.monotonic() - 18.5})
    waited = _restart_from_marker(start_coordinator, sock_path, "r", Resource(max_size=1, acquire_timeout=60),
                                  grace=0.5, timeout=15)
    assert waited < 1.5 + 3, f"the fence lasted {waited:.1f}s of a marker with 1.5 s left"


def test_the_marker_says_which_boot_wrote_it(tmp_path: Any) -> None:
    from sharedpool.marker import (
        backends_named,
        boot_id,
        forget_backends,
        from_another_boot,
        marker_age,
        read_marker,
        time_left_now,
        write_marker,
    )

    path = str(tmp_path / "c.sock.restart")
    write_marker(path, {"held": [["r", 7, 7, 123, 456]]})
    handed = read_marker(path)
    assert handed["boot"] == boot_id() and not from_another_boot(handed)
    # A failed start writes back what it read: the boot it was written in stays.
    write_marker(path, {**handed, "boot": "another"})
    handed = read_marker(path)
    assert from_another_boot(handed) == (boot_id() is not None)
    assert forget_backends(handed)["held"] == [["r", 7, 7, 123, None]]
    assert marker_age(handed) is None  # another boot's clock
    # When it was written, on this boot's monotonic clock; a write-back keeps it.
    write_marker(path, {**handed, "boot": boot_id()})
    age = marker_age(read_marker(path))
    assert age is not None and 0 <= age < 60
    write_marker(path, {**handed, "boot": boot_id(), "mono": handed["mono"] - 100})
    age = marker_age(read_marker(path))
    assert age is not None and age >= 100
    two = {"fenced": [["r", 1, 1, 5, 2.0, 10], ["s", 2, 2, 5, 2.0, 10]],
           "held": [["r", 3, 3, 6, 11], ["r", 4, 4, 6, None]]}
    assert backends_named(two) == {"r": {10, 11}, "s": {10}}
    assert time_left_now({**two, "mono": time.monotonic() - 1.5, "boot": boot_id()})["fenced"] == [
        ["r", 1, 1, 5, pytest.approx(0.5, abs=0.2), 10], ["s", 2, 2, 5, pytest.approx(0.5, abs=0.2), 10]]
    assert time_left_now({**two, "mono": time.monotonic() - 9})["fenced"][0][4] == 0.0
    # Stamped as of its new time left: written back by a failed start, not counted down twice.
    once = time_left_now({**two, "mono": time.monotonic() - 1.5, "boot": boot_id()})
    assert time_left_now(once)["fenced"][0][4] == pytest.approx(0.5, abs=0.2)
    assert time_left_now({**two, "mono": None}) == {**two, "mono": None}  # unknown age: all of it
    huge = [["r", 1, 1, 5, 10**400, None]]  # hand-written: was an OverflowError at each start
    assert time_left_now({"fenced": huge, "mono": time.monotonic() - 1})["fenced"] == huge
    # When each backend can have started, as ages: counted on like the time left.
    started = {**two, "started": [[1, 3.0, 2.0], [3, None, 2.0], ["junk"]]}
    assert time_left_now({**started, "mono": time.monotonic() - 1.5})["started"] == [
        [1, pytest.approx(4.5, abs=0.2), pytest.approx(3.5, abs=0.2)],
        [3, None, pytest.approx(3.5, abs=0.2)], ["junk"]]
    assert time_left_now({**started, "mono": None})["started"] == []  # as of when? not used
    assert forget_backends(two, {"r": {10, 11}}) == {
        "fenced": [["r", 1, 1, 5, 2.0, None], ["s", 2, 2, 5, 2.0, 10]],
        "held": [["r", 3, 3, 6, None], ["r", 4, 4, 6, None]]}


def test_a_malformed_marker_or_monitor_does_not_stop_a_restart(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A restart with an old marker asks each monitor_dsn about its pids: a
    hand-written huge "mono", a malformed DSN (or no psycopg) made the start
    fail - every start, the marker being handed back - and a hung server held
    it a second per resource (12 resources: past Coordinator.start's 10 s)."""
    import asyncio
    import logging
    import socket

    from sharedpool.fence import MonitorConnections
    from sharedpool.marker import forget_reused, read_marker

    path = str(tmp_path / "c.sock.restart")
    with open(path, "w") as f:
        f.write('{"held":[["r",7,7,123,456]],"mono":1' + "0" * 400 + "}")
    handed = read_marker(path)
    assert handed["mono"] is None and handed["held"] == [["r", 7, 7, 123, 456]]

    old = {"held": [["r", 7, 7, 123, 456]], "mono": time.monotonic() - 5}
    bad = {"r": Resource(max_size=1, monitor_dsn="host=x password='s3cr3t")}
    with caplog.at_level(logging.WARNING):
        assert asyncio.run(forget_reused(old, bad, MonitorConnections())) == old
    assert "monitor_dsn" in caplog.text and "s3cr3t" not in caplog.text

    with socket.socket() as srv:  # a server that never answers
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        dsn = f"host=127.0.0.1 port={srv.getsockname()[1]}"
        many = {"held": [[f"r{i}", i, i, 123, 456] for i in range(8)], "mono": time.monotonic() - 5}
        hung = {f"r{i}": Resource(max_size=1, monitor_dsn=dsn) for i in range(8)}
        t0 = time.monotonic()
        assert asyncio.run(forget_reused(many, hung, MonitorConnections(), timeout=0.3)) == many
        assert time.monotonic() - t0 < 1.2  # 0.3 s for all, not 8 x 0.3 s


def test_a_late_process_handed_on_alive_keeps_its_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str) -> None:
    """A fence handed on as late (its process alive but late to re-register
    when the previous coordinator stopped) ends its backends only once the
    process is gone: while it runs it may still be using them. Terminated at
    once, a live process's connection was ended under it."""
    from sharedpool.marker import marker_path, write_marker

    ours = psycopg.connect(pg_dsn(), application_name=app_name, autocommit=True)
    try:
        lease_id = 1_700_000_000_000_000
        # This test's own process stands for the late one: alive throughout.
        write_marker(marker_path(sock_path),
                     {"fenced": [["pg", lease_id, lease_id, os.getpid(), 20.0, ours.info.backend_pid]],
                      "late": [lease_id], "mono": time.monotonic()})
        start_coordinator({"pg": Resource(max_size=1, monitor_dsn=pg_dsn(), fence_action="terminate",
                                          fence_timeout=20)}, restart_grace=0.2)
        probe = Client(sock_path, name="probe")
        try:  # the fence is in place, and its check running
            wait_for(lambda: len(probe.inspect("fenced")["fenced"]) == 1, 20, "the restored fence")
        finally:
            probe.close()
        time.sleep(1.5)
        assert ours.execute("SELECT 1").fetchone() == (1,)  # not terminated
    finally:
        ours.close()
