"""The test PostgreSQL: its DSN, and skip (or fail) when it is not running.

A plain module so that conftest.py and test modules can import it. Tests skip
with a hint to start PostgreSQL, unless ``SHAREDPOOL_REQUIRE_PG=1`` (CI), where
a missing server must fail the run instead of hiding it behind skips.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import pytest

from sharedpool import Client


def pg_dsn() -> str:
    """The DSN of the test database (trust auth, no password)."""
    return "host=127.0.0.1 port=5432 dbname=test user=postgres"


@functools.cache
def _problem() -> str | None:
    """Why PostgreSQL cannot be used, or None; probed once per process."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed: pip install -e '.[test]'"
    try:
        psycopg.connect(pg_dsn(), connect_timeout=3).close()
    except psycopg.Error as exc:
        return (
            f"PostgreSQL ({pg_dsn()}) is not reachable ({str(exc).strip()}); start it "
            "(database 'test', user 'postgres', trust auth)"
        )
    return None


def require_pg() -> str:
    """Return :func:`pg_dsn`, or skip the test (fail it if SHAREDPOOL_REQUIRE_PG=1)."""
    problem = _problem()
    if problem is not None:
        if os.environ.get("SHAREDPOOL_REQUIRE_PG") == "1":
            pytest.fail(f"{problem} [SHAREDPOOL_REQUIRE_PG=1]", pytrace=False)
        pytest.skip(problem)
    return pg_dsn()


@pytest.fixture
def pg() -> str:
    """Fixture form of :func:`require_pg` (re-export it from conftest.py to use it by name)."""
    return require_pg()


class BackendSampler:
    """Counts this test's backends in ``pg_stat_activity`` every few ms, in a thread.

    ``peak`` is the most PostgreSQL itself ever showed at once: the I1 check
    from the database's side, not from our counters."""

    def __init__(self, app_name: str, interval: float = 0.002) -> None:
        import threading

        self.app_name = app_name
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self.over: list[int] = []
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(pg_dsn(), autocommit=True, application_name="sp-sampler") as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                    (self.app_name,),
                ).fetchone()
                n = int(row[0]) if row else 0
                self.peak = max(self.peak, n)
                self.samples += 1
                self._first.set()
                self._stop.wait(self.interval)

    def count_now(self) -> int:
        import psycopg

        with psycopg.connect(pg_dsn(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app_name,)
            ).fetchone()
        return int(row[0]) if row else 0

    def __enter__(self) -> BackendSampler:
        self._thread.start()
        # Sampling from the block's start: a block over before the sampler's
        # own connect was up (a busy machine) had no sample at all.
        deadline = time.monotonic() + 30
        while not self._first.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the backend sampler took no sample (its thread's error above, if any)")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def backend_pids(app_name: str) -> list[int]:
    """The pids of the backends with ``application_name`` ``app_name``: a test's own."""
    import psycopg

    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                            (app_name,)).fetchall()
    return [int(row[0]) for row in rows]


def signal_backends(app_name: str, signum: int) -> list[int]:
    """Send ``signum`` to the test's own backends (``app_name``): SIGSTOP makes a
    server that hangs (a close it never confirms), SIGCONT (always, in a finally)
    lets it go on."""
    pids = backend_pids(app_name)
    for pid in pids:
        os.kill(pid, signum)
    return pids


def slow_exit(conn: Any, tables: int = 200) -> None:
    """Make ``conn``'s backend take ~20 ms to exit (it drops its temp tables
    before it leaves ``pg_stat_activity``): a lease given back before the
    server let go then shows every time, not only when the timing says so."""
    conn.execute(f"DO $$ BEGIN FOR i IN 1..{tables} LOOP "
                 "EXECUTE format('CREATE TEMP TABLE sp_slow_exit_%s (x int)', i); END LOOP; END $$")


def first_grant_sees(sock: str, app: str, timeout: float = 10.0) -> tuple[threading.Thread, list[int]]:
    """A thread of another session waiting for the (only) lease of "pg"; once
    granted, it counts ``app``'s backends in pg_stat_activity: with the cap at
    1, it must see 0."""
    seen: list[int] = []

    def wait() -> None:
        c = Client(sock)
        try:
            lease = c.acquire("pg", timeout)
            seen.append(BackendSampler(app).count_now())
            c.release(lease)
        finally:
            c.close()

    t = threading.Thread(target=wait)
    t.start()
    return t, seen
