"""Django (5.1+, psycopg 3) end to end: examples/django_app under real gunicorn,
4 workers, Django's OPTIONS["pool"] made by sharedpool.contrib.psycopg through
the ENGINE sharedpool.contrib.django, a global cap of 2 checked from pg_stat_activity."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pg_helpers import BackendSampler
from servers import SessionServer

pytest.importorskip("django")
pytest.importorskip("gunicorn")

pytestmark = pytest.mark.pg

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "django_app"
CAP = 2
WORKERS = 4


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class DjangoServer(SessionServer):
    """The example under gunicorn, in its own session, listening on a Unix socket."""

    name = "gunicorn"

    def __init__(self, tmp_path: Path, app_name: str, worker_class: str) -> None:
        self.bind = str(tmp_path / "http.sock")
        env = {**os.environ, "EXAMPLE_BIND": f"unix:{self.bind}", "EXAMPLE_WORKERS": str(WORKERS),
               "EXAMPLE_CAP": str(CAP), "EXAMPLE_APP_NAME": app_name,
               "EXAMPLE_SOCKET": str(tmp_path / "sp.sock"), "EXAMPLE_WORKER_CLASS": worker_class,
               "EXAMPLE_THREADS": "4" if worker_class == "gthread" else "1", "EXAMPLE_CLOSE_TIMEOUT": "20"}
        env.pop("SHAREDPOOL_SOCKET", None)
        super().__init__(tmp_path / "gunicorn.log",
                         [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
                          "--chdir", str(EXAMPLE), "app:application"], env)

    def get(self, sleep: float = 0.0, timeout: float = 30.0) -> dict[str, Any]:
        conn = _UnixHTTP(self.bind, timeout)
        try:
            conn.request("GET", f"/?sleep={sleep}")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, body[-2000:]
            return dict(json.loads(body))
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.log()[-3000:]}"
            try:
                self.get(timeout=5)
                if self.log().count("Booting worker") >= WORKERS:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"gunicorn did not answer:\n{self.log()[-3000:]}"
            time.sleep(0.05)


@pytest.fixture(params=["sync"])
def server(request: pytest.FixtureRequest, pg: str, tmp_path: Path, app_name: str) -> Iterator[DjangoServer]:
    srv = DjangoServer(tmp_path, app_name, request.param)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.kill_group()


def _gone(sampler: BackendSampler, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while (left := sampler.count_now()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.mark.parametrize("server", ["sync", "gthread"], indirect=True)
def test_django_pool_workers_hold_the_cap(server: DjangoServer, app_name: str) -> None:
    workers: set[int] = set()
    errors: list[str] = []
    todo = iter(range(200))
    lock = threading.Lock()

    def client() -> None:
        for _ in todo:
            try:
                out = server.get(sleep=0.005)
            except Exception as exc:  # noqa: BLE001 - counted
                with lock:
                    errors.append(repr(exc))
                continue
            with lock:
                workers.add(out["worker"])

    with BackendSampler(app_name) as sampler:
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors[:3]
    assert len(workers) >= 2, "the load reached one worker only: the cap was not contended"
    assert 1 <= sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} backends of {WORKERS} workers, cap {CAP}"
    os.kill(server.proc.pid, signal.SIGTERM)
    assert server.proc.wait(30) == 0, server.log()[-3000:]
    assert _gone(sampler, 5.0) == 0, "a worker left its backend open after gunicorn stopped"


def test_a_quick_stop_mid_request_does_not_wait_for_djangos_connection(server: DjangoServer,
                                                                      app_name: str) -> None:
    # Django checks a request's connection back in only when the request ends:
    # a sync worker stopped in the middle still holds it, and release_process()
    # (worker_exit) waited close_timeout (5 s) for it (measured: 5.6 s; now 0.6 s,
    # as gunicorn takes without sharedpool: the ENGINE closes the thread's
    # connections first, process.before_release). close_timeout is
    # raised to 20 s here, so the old wait cannot pass for a slow machine.
    def cut_short() -> None:
        with contextlib.suppress(Exception):  # the worker stops mid-request: no answer
            server.get(10.0)

    busy = [threading.Thread(target=cut_short, daemon=True) for _ in range(CAP)]
    for t in busy:
        t.start()
    sampler = BackendSampler(app_name)
    deadline = time.monotonic() + 10
    while sampler.count_now() < CAP:
        assert time.monotonic() < deadline, "the requests never reached PostgreSQL"
        time.sleep(0.05)
    t0 = time.monotonic()
    os.kill(server.proc.pid, signal.SIGQUIT)
    server.proc.wait(30)
    took = time.monotonic() - t0
    assert took < 10.0, f"gunicorn took {took:.1f} s to stop\n{server.log()[-3000:]}"
    assert _gone(sampler, 5.0) == 0, "a stopped worker's query still runs"
