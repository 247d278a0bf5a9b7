"""The celery integration, end to end: the real example app under a real celery
worker (prefork, concurrency 8) on the Redis broker, a global PostgreSQL cap of
3, checked from pg_stat_activity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_helpers import BackendSampler
from proc_helpers import settled
from servers import SessionServer, die_with_parent, pid_alive, wait_for

from sharedpool import Client, ConfigError

pytest.importorskip("celery")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "celery_app"
REDIS_URL = "redis://127.0.0.1:6379/15"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
CAP = 3
CONCURRENCY = 8


def require_redis() -> None:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        problem = f"Redis ({REDIS_URL}) is not reachable ({exc}); start it"
        if os.environ.get("SHAREDPOOL_REQUIRE_REDIS") == "1":
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)


class CeleryWorker(SessionServer):
    """``celery -A tasks worker`` on a queue of its own, in its own session."""

    name = "celery"

    def __init__(self, tmp_path: Path, sock: str, app_name: str, extra: tuple[str, ...] = ()) -> None:
        self.sock = sock
        self.queue = f"sp-test-{uuid.uuid4().hex[:10]}"
        self.env = {
            **os.environ,
            "EXAMPLE_REDIS_URL": REDIS_URL,
            "EXAMPLE_PG_URL": PG_URL,
            "EXAMPLE_CAP": str(CAP),
            "EXAMPLE_QUEUE": self.queue,
            "EXAMPLE_APP_NAME": app_name,
            "EXAMPLE_SOCKET": sock,
            "EXAMPLE_COORDINATOR_LOG": "info",
        }
        self.env.pop("SHAREDPOOL_SOCKET", None)
        super().__init__(tmp_path / "celery.log",
                         [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork",
                          "-c", str(CONCURRENCY), "-n", f"{self.queue}@%h", "--without-gossip",
                          "--without-mingle", "--without-heartbeat", "--loglevel=info", *extra],
                         self.env, cwd=EXAMPLE)

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"celery exited:\n{self.log()[-3000:]}"
            return " ready." in self.log()

        wait_for(ready, timeout, "the celery worker")

    def run_tasks(self, count: int, sleep: float = 0.005) -> dict[str, Any]:
        """The example's client: send ``count`` tasks, check each result."""
        out = subprocess.run([sys.executable, "run.py", str(count), str(sleep)], cwd=EXAMPLE,
                             env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (warm shutdown) to the worker's main process, by pid, and wait."""
        return super().stop(timeout)

    def cleanup(self) -> None:
        self.kill_group()
        import redis

        r = redis.Redis.from_url(REDIS_URL)
        r.delete(self.queue, f"_kombu.binding.{self.queue}")
        r.close()


@pytest.fixture
def celery_worker(pg: str, tmp_path: Path, sock_path: str,
                  app_name: str) -> Iterator[Callable[..., CeleryWorker]]:
    require_redis()
    started: list[CeleryWorker] = []

    def start(*extra: str) -> CeleryWorker:
        worker = CeleryWorker(tmp_path, sock_path, app_name, extra)
        started.append(worker)
        worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.cleanup()


def test_prefork_children_share_a_cap_of_three(celery_worker: Callable[..., CeleryWorker],
                                               app_name: str) -> None:
    worker = celery_worker()
    probe = Client(worker.sock)
    try:
        coordinator = int(probe.inspect("server")["pid"])
    finally:
        probe.close()
    with BackendSampler(app_name) as sampler:
        summary = worker.run_tasks(300)
        # The engine was made at import, before the socket was known: it was adopted.
        row = wait_for(lambda: settled(worker.sock), 5, "the leases to settle idle")
        assert row["grants"] > 0 and row["leased"] <= CAP and row["waiting"] == 0, row
        assert worker.stop() == 0, worker.log()[-3000:]
        # Every child closed its connections and ended its session before the
        # parent stopped the coordinator: no lease was left.
        assert "coordinator stopping: 0 session(s) open" in worker.log(), worker.log()[-3000:]
        # Where it listens, for `sharedpool status --socket`: logged once celery's logging is up.
        assert f"sharedpool: coordinator pid {coordinator} serving {worker.sock}" in worker.log()
        assert sampler.count_now() == 0, "connections left after the worker stopped"
    wait_for(lambda: not pid_alive(coordinator), 5, "the coordinator to exit")
    assert not os.path.exists(worker.sock)
    assert summary["n_errors"] == 0, summary["errors"]
    assert summary["ok"] == 300 and not summary["wrong"], summary
    assert summary["workers"] > CAP, f"only {summary['workers']} children ran tasks"
    assert sampler.samples > 50
    assert sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} connections with a cap of {CAP}"
    assert sampler.peak == CAP, "the cap was never reached: the test proves nothing"


def test_a_stop_waits_for_a_child_killed_mid_query(celery_worker: Callable[..., CeleryWorker],
                                                   app_name: str) -> None:
    # The hard time limit SIGKILLs a child inside pg_sleep(5): its backend runs on.
    # A worker stopped meanwhile stopped its coordinator at once, with that slot
    # fenced; a celery restarted at once on a new private path would open the whole
    # cap beside the running query. The stop now waits for the fence (bounded).
    worker = celery_worker("--time-limit", "1")
    sender = subprocess.Popen([sys.executable, "run.py", "1", "5"], cwd=EXAMPLE, env=worker.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with BackendSampler(app_name) as sampler:
            wait_for(lambda: sampler.count_now() == 1, 30, "the task's query to start")
            wait_for(lambda: "Hard time limit" in worker.log(), 30, "the hard time limit")
            assert worker.stop() == 0, worker.log()[-3000:]
            assert sampler.count_now() == 0, "the worker stopped with a killed child's query running"
    finally:
        sender.kill()
        sender.wait(10)


def test_setup_checks_limits_when_the_app_is_made() -> None:
    from celery import Celery

    from sharedpool.contrib.celery import setup

    app = Celery("sp-test-config")
    with pytest.raises(ConfigError) as err:
        setup(app, resources={"pg": {"max_size": 2, "max_waitng": 3}})
    assert err.value.field == "resources.pg.max_waitng"
    with pytest.raises(ConfigError) as err:
        setup(object(), resources={"pg": 2})  # type: ignore[arg-type]
    assert err.value.field == "app"
    # A process that only sends tasks: setup() connects signals and starts nothing.
    state = setup(app, resources={"pg": 2})
    try:
        assert state.coordinator is None
    finally:
        state.disconnect()


def test_a_second_setup_of_an_app_replaces_the_first(caplog: pytest.LogCaptureFixture) -> None:
    # A celery module imported twice ran setup() twice: both states' handlers
    # were connected, and at worker start each ran (two coordinators tried).
    from celery import Celery, signals

    from sharedpool.contrib.celery import setup

    app = Celery("sp-test-twice")
    first = setup(app, resources={"pg": 2})
    second = setup(app, resources={"pg": 2})
    try:
        receivers = [r for _, r in signals.worker_init.receivers]
        assert not any(getattr(r, "__self__", None) is first for r in receivers)
        assert any(getattr(r, "__self__", None) is second for r in receivers)
        assert "setup() called again" in caplog.text
    finally:
        first.disconnect()
        second.disconnect()


def test_worker_without_resources_or_coordinator_fails_clearly(sock_path: str) -> None:
    from celery import Celery

    from sharedpool.contrib.celery import setup

    app = Celery("sp-test-none")
    state = setup(app, socket=sock_path)
    try:
        # SystemExit: celery would log any Exception from a signal handler and
        # start the worker anyway, every child without a cap.
        with pytest.raises(SystemExit, match="no coordinator is listening"):
            state.worker_init(sender=type("Worker", (), {"app": app})())
    finally:
        state.disconnect()


def test_a_query_at_import_in_the_worker_parent_is_said_to_be_outside_the_cap(
        sock_path: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tasks module that queries at import (create_all(), reflection) opens a
    # connection in the worker's main process before worker_init starts the
    # coordinator: unleased, kept idle for the worker's whole life, and counted by
    # PostgreSQL beside the children's cap (a trial: 4 backends at a cap of 3).
    # The only line about it was the import's "no coordinator" warning.
    import logging
    import sqlite3

    from celery import Celery

    from sharedpool import ConnectionPool, PoolConfig
    from sharedpool.config import SOCKET_ENV
    from sharedpool.contrib.celery import setup

    monkeypatch.delenv(SOCKET_ENV, raising=False)
    resource = f"imp-{uuid.uuid4().hex[:8]}"  # other tests' pools in this process: not counted
    app = Celery("sp-test-import-query")
    state = setup(app, resources={resource: 2, "idle": 1}, socket=sock_path)
    worker = type("Worker", (), {"app": app})()
    pool = ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False),
                          PoolConfig(min_size=0, max_size=2), resource=resource)
    unused = ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False),
                            PoolConfig(min_size=0, max_size=2), resource="idle")
    try:
        with pool.connection() as conn:  # the query at import: no coordinator yet
            conn.execute("SELECT 1")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sharedpool"):
            state.worker_init(sender=worker)
            state.worker_ready(sender=worker)
        warned = [r for r in caplog.records
                  if r.levelno == logging.WARNING and "opened before its coordinator" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        said = warned[0].getMessage()
        assert f"1 of {resource!r}" in said and "'idle'" not in said and "engine.dispose()" in said, said
    finally:
        unused.close()
        pool.close()
        state.worker_shutdown(sender=worker)
        state.disconnect()


_FAILING_APP = """
from celery import Celery
from sharedpool.contrib.celery import setup

app = Celery("sp_failing", broker="{broker}")
setup(app, resources={{"pg": 1}}, socket={sock!r}, metrics_port={port})
"""


def test_a_worker_whose_coordinator_cannot_start_does_not_start(tmp_path: Path,
                                                                 sock_path: str) -> None:
    """The real worker: a coordinator that fails to start (here its metrics port
    is taken) stops the worker with one line, instead of children running with
    no cap (celery swallows an Exception raised from worker_init)."""
    require_redis()
    import socket as sockets

    with sockets.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        (tmp_path / "failing_app.py").write_text(
            _FAILING_APP.format(broker=REDIS_URL, sock=sock_path, port=port))
        env = {k: v for k, v in os.environ.items() if k != "SHAREDPOOL_SOCKET"}
        out = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "failing_app", "worker", "-P", "prefork",
             "-c", "2", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
            preexec_fn=die_with_parent)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "cannot start the coordinator" in text and f"metrics_port {port}" in text, text[-3000:]
    assert " ready." not in text
    assert not os.path.exists(sock_path)
