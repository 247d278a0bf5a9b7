"""``sharedpool demo`` end to end: real worker processes, a real coordinator, and
(with ``--dsn``) PostgreSQL's own count of connections."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
from pg_helpers import require_pg
from test_cli import ENV, sp, table_rows


def figure(out: str, label: str) -> int:
    row = next(r for r in table_rows(out) if r and r[0].startswith(label))
    match = re.match(r"\d+", row[1])
    assert match, row
    return int(match.group())


def worker_rows(out: str) -> list[list[str]]:
    return [r for r in table_rows(out) if len(r) == 7 and r[0].isdigit()]


def check_run(out: str, workers: int, cap: int) -> None:
    assert figure(out, "cap") == cap
    assert 1 <= figure(out, "most leases ever held at once") <= cap
    assert figure(out, "most leases seen by sampling") <= cap
    rows = worker_rows(out)
    assert len(rows) == workers
    for row in rows:
        checkouts, waits, timeouts, errors = map(int, row[2:6])
        assert checkouts >= 1 and waits >= 1  # the first acquire of an empty pool queues
        assert errors == 0, row
        assert not psutil.pid_exists(int(row[1])) or psutil.Process(int(row[1])).status() == \
            psutil.STATUS_ZOMBIE, f"worker {row[1]} still running"
    assert f"cap held: never more than {cap} leases at once" in out


def test_demo_sqlite_cap_holds() -> None:
    out = sp("demo", "--workers", "4", "--max-size", "2", "--seconds", "2", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    check_run(out.stdout, workers=4, cap=2)
    assert "leases held now" in out.stdout  # progress lines, even without a terminal


def test_demo_postgresql_cap_holds_as_postgresql_counts_it() -> None:
    dsn = require_pg()
    out = sp("demo", "--workers", "6", "--max-size", "3", "--seconds", "2", "--dsn", dsn,
             timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    check_run(out.stdout, workers=6, cap=3)
    assert 1 <= figure(out.stdout, "most connections PostgreSQL saw") <= 3
    assert "(and PostgreSQL agrees)" in out.stdout


def test_demo_bad_arguments_exit_2() -> None:
    out = sp("demo", "--workers", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--workers" in out.stderr
    # As for serve and status: an empty --socket is a blank, not "a temp dir" (it ran one).
    out = sp("demo", "--socket", "", "--seconds", "0.1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "socket" in out.stderr, out
    # So is an empty --dsn (`--dsn "$DATABASE_URL"`, unset): it ran half as PostgreSQL
    # (libpq's defaults) and half as SQLite (its query, no count by PostgreSQL).
    out = sp("demo", "--dsn", "", "--seconds", "0.1", timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "--dsn" in out.stderr, out


def test_demo_with_postgresql_unreachable_fails_in_a_few_clear_lines() -> None:
    out = sp("demo", "--dsn", "host=127.0.0.1 port=1 dbname=test user=postgres", "--workers", "1",
             "--seconds", "0.5", timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout  # the sampler thread's used to escape
    assert "cap held" not in out.stdout and "PostgreSQL agrees" not in out.stdout
    assert "demo failed: PostgreSQL was never reached" in out.stdout
    sampler = [line for line in out.stdout.splitlines() if line.startswith("sampler: PostgreSQL")]
    assert len(sampler) == 1 and "Connection refused" in sampler[0], out.stdout
    assert out.stderr.count("opening a connection failed") == 0, out.stderr  # counted in the table instead


@contextlib.contextmanager
def running_demo(workers: int) -> Iterator[subprocess.Popen[str]]:
    """``sharedpool demo`` for 60 s, yielded once it prints progress (it runs);
    killed by pid on the way out if the test has not ended it."""
    proc = subprocess.Popen([sys.executable, "-m", "sharedpool", "demo", "--workers", str(workers),
                             "--max-size", "1", "--seconds", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        while "leases held now" not in proc.stdout.readline():  # a progress line: it runs
            assert time.monotonic() < deadline and proc.poll() is None
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_demo_interrupted_reports_the_run_so_far() -> None:
    # Ctrl-C used to kill the workers before they reported: "demo failed: no
    # checkout succeeded", exit 1, after thousands of checkouts.
    with running_demo(workers=2) as proc:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in err and "demo failed" not in out
    assert "interrupted: figures cover the run so far" in out
    assert sum(int(r[2]) for r in worker_rows(out)) >= 1


def test_demo_stopped_by_sigterm_cleans_up() -> None:
    """``timeout``, CI or a supervisor stop the demo with SIGTERM: it exits 143
    at once and leaves no worker behind (they used to run on for the rest of
    --seconds, or for ever if it was stopped during start-up)."""
    with running_demo(workers=3) as proc:
        workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        assert workers
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 143, out + err
    assert "Traceback" not in err
    deadline = time.monotonic() + 10
    alive = workers
    while alive := [pid for pid in alive if psutil.pid_exists(pid)
                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]:
        assert time.monotonic() < deadline, f"left behind: {alive}"
        time.sleep(0.1)


_TERM_DURING_FORK = """
import os, signal
from rich.console import Console
from sharedpool import demo

fired = []
def hook():  # runs in the demo right after it forked a worker
    if not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # room for the eval loop to run a Python-level handler here
            pass
os.register_at_fork(after_in_parent=hook)
try:
    demo.run_demo(workers=2, max_size=1, seconds=3.0, console=Console(file=open(os.devnull, "w")))
except SystemExit as exc:
    print("exit", exc.code)
else:
    print("ran to the end")
"""


def test_demo_sigterm_while_forking_workers_still_stops_it() -> None:
    """A handler run inside an at-fork hook has its SystemExit printed and
    dropped: the demo held SIGTERM back while forking, so it is not lost."""
    out = subprocess.run([sys.executable, "-c", _TERM_DURING_FORK], capture_output=True, text=True,
                         env=ENV, timeout=60)
    assert out.stdout.strip() == "exit 143", out.stdout + out.stderr


def test_demo_with_a_dsn_but_no_psycopg_says_so_in_one_line() -> None:
    # `pip install sharedpool` brings no psycopg: --dsn was a ModuleNotFoundError traceback.
    code = ("import sys; sys.modules['psycopg'] = None; from sharedpool.cli import main; "
            "main(['demo', '--dsn', 'host=127.0.0.1 dbname=test', '--workers', '1', '--seconds', '0.1'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "--dsn" in out.stderr and "sharedpool[pg]" in out.stderr, out.stderr
