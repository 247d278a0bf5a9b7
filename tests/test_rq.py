"""sharedpool.contrib.rq end to end: two real forking ``rq worker --burst``
processes on the real Redis, jobs taking a connection from a pool made at
import of the job module (in the worker, by ``-c``), a cap of 1 checked from
pg_stat_activity, and the coordinator's log read for fences."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REDIS_HOST, REDIS_PORT
from pg_helpers import BackendSampler, pg_dsn
from proc_helpers import import_refused, resource_row, wait_leased
from redis import Redis

JOBS = 30
WORKERS = 2

# Made at import, in the worker (``-c`` imports it): every horse inherits the
# pool (with no connection) and opens a session and a connection of its own.
_JOB_MODULE = """
import os
import threading

import psycopg

from sharedpool import ConnectionPool, PoolConfig

POOL = ConnectionPool(lambda: psycopg.connect(os.environ["SP_TEST_DSN"], autocommit=True),
                      PoolConfig(min_size=0, max_size=1, acquire_timeout=60), resource="pg")


def query():
    with POOL.connection() as conn:
        conn.execute("SELECT pg_sleep(0.02)")
    return os.getpid()


_KEPT = []


def leak():
    # A checkout never given back (kept: no finalizer gives it back either).
    _KEPT.append(POOL.acquire())
    return os.getpid()


def query_in_thread():
    # Returns while a thread it started still runs its query.
    started = threading.Event()

    def run():
        with POOL.connection() as conn:
            started.set()
            conn.execute("SELECT pg_sleep(0.5)")

    threading.Thread(target=run, daemon=True).start()  # a daemon, waited for all the same
    started.wait(30)
    return os.getpid()
"""


# The Django ENGINE's pool: Django holds a thread's connection checked out until
# it closes it, at a request's end; a job is no request.
_DJANGO_JOB_MODULE = """
import os

import django
from django.conf import settings

settings.configure(DATABASES={"default": {
    "ENGINE": "sharedpool.contrib.django", "HOST": "127.0.0.1", "NAME": "test", "USER": "postgres",
    "OPTIONS": {"application_name": os.environ["SP_TEST_APP"],
                "pool": {"resource": "pg", "min_size": 0, "max_size": 1, "timeout": 5}}}})
django.setup()

from django.db import connection


def query():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return os.getpid()
"""


@pytest.fixture
def rq_queue(redis_name: str) -> Iterator[Any]:
    """An RQ queue of this test's own; every key naming it is deleted after."""
    pytest.importorskip("rq", reason="rq is not installed: pip install -e '.[test]'")
    from rq import Queue

    r = Redis(host=REDIS_HOST, port=REDIS_PORT)
    yield Queue(redis_name, connection=r)
    keys = list(r.scan_iter(f"*{redis_name}*"))
    if keys:
        r.delete(*keys)
    for index in ("rq:queues", "rq:workers"):  # sets naming our queue and workers
        stale = [m for m in r.smembers(index) if redis_name.encode() in m]
        if stale:
            r.srem(index, *stale)
    r.close()


def start_worker(tmp_path: Path, queue_name: str, name: str, sock: str, app_name: str, worker_class: str,
                 module: str = "sp_rq_jobs", burst: bool = True) -> subprocess.Popen[bytes]:
    """``rq worker -w worker_class -c module`` on ``queue_name``, logging to
    ``tmp_path/name.log``; with ``burst``, it exits once the queue is empty."""
    env = {**os.environ, "SHAREDPOOL_SOCKET": sock, "SP_TEST_APP": app_name,
           "SP_TEST_DSN": f"{pg_dsn()} application_name={app_name}"}
    with open(tmp_path / f"{name}.log", "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rq.cli", "worker", *(["--burst"] if burst else []), "-w", worker_class,
             "-c", module, "-P", str(tmp_path), "--url", f"redis://{REDIS_HOST}:{REDIS_PORT}",
             "-n", name, "-q", queue_name],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)


def run_workers(tmp_path: Path, queue: Any, sock: str, app_name: str, worker_class: str,
                func: str = "query", count: int = JOBS, workers: int = WORKERS) -> list[str]:
    """``count`` jobs calling ``func`` of the job module through ``workers``
    ``rq worker --burst -w worker_class``; what they logged."""
    from rq.job import Job, JobStatus

    (tmp_path / "sp_rq_jobs.py").write_text(_JOB_MODULE)
    jobs = [queue.enqueue(f"sp_rq_jobs.{func}", job_id=f"{queue.name}-{i}") for i in range(count)]
    procs: list[subprocess.Popen[bytes]] = []
    names = [f"{queue.name}-w{i}" for i in range(workers)]
    try:
        for name in names:
            procs.append(start_worker(tmp_path, queue.name, name, sock, app_name, worker_class))
        codes = [proc.wait(120) for proc in procs]  # burst: each exits once the queue is empty
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    texts = [(tmp_path / f"{name}.log").read_text(errors="replace") for name in names]
    assert codes == [0] * workers, texts
    statuses = [job.get_status() for job in Job.fetch_many([j.id for j in jobs], connection=queue.connection)
                if job is not None]
    assert statuses == [JobStatus.FINISHED] * count, texts
    horses = {job.return_value() for job in Job.fetch_many([j.id for j in jobs], connection=queue.connection)
              if job is not None}
    assert len(horses) == count  # a horse forked for each job
    return texts


def fences_logged(capfd: pytest.CaptureFixture[str], coord: Any) -> list[str]:
    """The fences the coordinator logged (its stderr is ours)."""
    coord.stop()  # all written once it has exited
    err = capfd.readouterr().err
    # Its log seen (every horse's session ends in it): else "no fence" would prove nothing.
    assert " ended: pid=" in err, "the coordinator's log was not captured"
    return [line for line in err.splitlines() if "quarantined" in line]


@pytest.mark.pg
def test_horses_give_their_leases_back_before_they_exit(
        pg: str, tmp_path: Path, start_coordinator: Any, sock_path: str, app_name: str, rq_queue: Any,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    coord = start_coordinator({"pg": 1})
    with BackendSampler(app_name) as sampler:
        run_workers(tmp_path, rq_queue, sock_path, app_name, "sharedpool.contrib.rq.Worker")
    row = resource_row(sock_path)
    assert sampler.peak == 1, sampler.peak  # the cap held, as PostgreSQL saw it
    assert row["leased"] == 0 and row["grants"] >= JOBS, row
    assert sampler.count_now() == 0
    assert fences_logged(capfd, coord) == []  # every horse gave its lease back itself


@pytest.mark.pg
def test_a_plain_rq_worker_leaves_its_leases_to_the_fence(
        pg: str, tmp_path: Path, start_coordinator: Any, sock_path: str, app_name: str, rq_queue: Any,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    # The counterpart of the test above: what it would see without the release.
    caplog.set_level(logging.INFO, logger="sharedpool")
    coord = start_coordinator({"pg": 1})
    run_workers(tmp_path, rq_queue, sock_path, app_name, "rq.Worker")
    assert wait_leased(sock_path, 0, timeout=30) == 0  # the last fence may still run
    assert fences_logged(capfd, coord)


@pytest.mark.pg
def test_a_checkout_the_job_never_gave_back_does_not_hold_its_horse(
        pg: str, tmp_path: Path, start_coordinator: Any, sock_path: str, app_name: str,
        rq_queue: Any) -> None:
    # Nothing can check it in once the job has returned: release_process()
    # waited its 5 s for it in each horse, the slot held (4 jobs: 20 s and more).
    start_coordinator({"pg": 1})
    start = time.monotonic()
    with BackendSampler(app_name) as sampler:
        texts = run_workers(tmp_path, rq_queue, sock_path, app_name, "sharedpool.contrib.rq.Worker",
                            func="leak", count=4, workers=1)
    took = time.monotonic() - start
    assert sum(text.count("not waited for") for text in texts) == 4, texts
    assert took < 15, (took, texts)
    assert sampler.peak == 1, sampler.peak
    assert wait_leased(sock_path, 0, timeout=30) == 0  # each through the fence, as the horse exits


@pytest.mark.pg
def test_a_thread_the_job_left_running_is_waited_for(
        pg: str, tmp_path: Path, start_coordinator: Any, sock_path: str, app_name: str, rq_queue: Any,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    # The counterpart of the test above: that thread checks its connection in,
    # and the horse gives its lease back itself.
    caplog.set_level(logging.INFO, logger="sharedpool")
    coord = start_coordinator({"pg": 1})
    run_workers(tmp_path, rq_queue, sock_path, app_name, "sharedpool.contrib.rq.Worker",
                func="query_in_thread", count=2, workers=1)
    assert resource_row(sock_path)["leased"] == 0
    assert fences_logged(capfd, coord) == []


@pytest.mark.pg
@pytest.mark.parametrize(("worker_class", "second"), [("sharedpool.contrib.rq.SimpleWorker", "finished"),
                                                      ("rq.SimpleWorker", "failed")])
def test_a_simple_worker_gives_djangos_connection_back_after_each_job(
        pg: str, tmp_path: Path, start_coordinator: Any, sock_path: str, app_name: str, rq_queue: Any,
        worker_class: str, second: str) -> None:
    # A worker idle after its job kept Django's connection checked out, and
    # its lease: no reclaim takes a connection in use, and another worker's
    # job waited for it (the pool's timeout, 5 s) and failed.
    pytest.importorskip("django")
    from rq import Queue

    start_coordinator({"pg": 1})
    (tmp_path / "sp_rq_django.py").write_text(_DJANGO_JOB_MODULE)
    first, other = (Queue(f"{rq_queue.name}-{x}", connection=rq_queue.connection) for x in "ab")
    job = first.enqueue("sp_rq_django.query", job_id=f"{first.name}-1")  # named: the fixture deletes it
    idle = start_worker(tmp_path, first.name, f"{first.name}-w", sock_path, app_name, worker_class,
                        module="sp_rq_django", burst=False)
    try:
        deadline = time.monotonic() + 60
        while job.get_status() != "finished" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.get_status() == "finished", (tmp_path / f"{first.name}-w.log").read_text()
        later = other.enqueue("sp_rq_django.query", job_id=f"{other.name}-1")
        busy = start_worker(tmp_path, other.name, f"{other.name}-w", sock_path, app_name, worker_class,
                            module="sp_rq_django")
        assert busy.wait(60) == 0
        assert later.get_status() == second, (tmp_path / f"{other.name}-w.log").read_text()
    finally:
        idle.terminate()  # a warm shutdown
        try:
            idle.wait(30)
        except subprocess.TimeoutExpired:
            idle.kill()
            idle.wait(10)
    assert wait_leased(sock_path, 0, timeout=30) == 0


def test_without_rq_the_import_says_what_to_install() -> None:
    err = import_refused("import sys\nsys.modules['rq'] = None\nimport sharedpool.contrib.rq\n")
    assert "sharedpool.contrib.rq needs RQ" in err and "pip install rq" in err, err
