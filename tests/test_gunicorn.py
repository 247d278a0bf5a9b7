"""The gunicorn integration, end to end: the real example app under real gunicorn,
8 workers, a global PostgreSQL cap of 3, checked from pg_stat_activity."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from pg_helpers import BackendSampler
from proc_helpers import resource_row, settled
from servers import SessionServer, die_with_parent, free_port, pid_alive, wait_for

from sharedpool import Client, ConfigError, CoordinatorConfig, SharedPoolError

pytest.importorskip("gunicorn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gunicorn_app"
CAP = 3
WORKERS = 8
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


class Gunicorn(SessionServer):
    """The example app under gunicorn, in its own session; logs under tmp_path."""

    name = "gunicorn"

    def __init__(self, tmp_path: Path, sock: str, app_name: str, worker_class: str,
                 extra: list[str] | None = None) -> None:
        self.port = free_port()
        self.sock = sock
        env = {
            **os.environ,
            "EXAMPLE_BIND": f"127.0.0.1:{self.port}",
            "EXAMPLE_WORKERS": str(WORKERS),
            "EXAMPLE_CAP": str(CAP),
            "EXAMPLE_APP_NAME": app_name,
            "EXAMPLE_SOCKET": sock,
            "EXAMPLE_PG_URL": PG_URL,
            "EXAMPLE_WORKER_CLASS": worker_class,
            "EXAMPLE_THREADS": "4" if worker_class == "gthread" else "1",
            "EXAMPLE_COORDINATOR_LOG": "info",
        }
        env.pop("SHAREDPOOL_SOCKET", None)
        super().__init__(tmp_path / "gunicorn.log",
                         [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"),
                          "--chdir", str(EXAMPLE), *(extra or []), "app:app"], env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def coordinator_pid(self) -> int:
        found = re.search(r"sharedpool: coordinator pid (\d+) serving", self.log())
        assert found, self.log()[-3000:]
        return int(found.group(1))

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.log()[-3000:]}"
            try:
                with urllib.request.urlopen(self.url, timeout=5) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout, "gunicorn to answer")
        wait_for(lambda: self.log().count("Booting worker") >= WORKERS, timeout, "8 workers")


@pytest.fixture
def gunicorn(pg: str, tmp_path: Path, sock_path: str,
             app_name: str) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(worker_class: str = "sync", extra: list[str] | None = None) -> Gunicorn:
        server = Gunicorn(tmp_path, sock_path, app_name, worker_class, extra)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.kill_group()


class Load:
    """``total`` GET requests from ``threads`` client threads; counts outcomes."""

    def __init__(self, url: str, total: int, threads: int = 8, sleep: float = 0.005) -> None:
        self.url = f"{url}?sleep={sleep}"
        self.left = total
        self.lock = threading.Lock()
        self.ok: Counter[int] = Counter()  # worker pid -> requests served
        self.answers: list[dict[str, Any]] = []  # the JSON bodies, in order of arrival
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def _run(self) -> None:
        while True:
            with self.lock:
                if self.left == 0:
                    return
                self.left -= 1
            try:
                with urllib.request.urlopen(self.url, timeout=60) as resp:
                    body = json.loads(resp.read())
                with self.lock:
                    self.ok[body["worker"]] += 1
                    self.answers.append(body)
            except Exception as exc:  # noqa: BLE001 - counted, asserted by the test
                with self.lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def join(self, timeout: float = 120.0) -> Load:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "load did not finish"
        return self

    @property
    def done(self) -> int:
        return sum(self.ok.values())


def leases(sock: str, **filters: Any) -> list[dict[str, Any]]:
    c = Client(sock)
    try:
        return list(c.inspect("leases", **filters)["leases"])
    finally:
        c.close()


def assert_shut_down_clean(server: Gunicorn, sampler: BackendSampler) -> None:
    coordinator = server.coordinator_pid()
    assert server.stop() == 0, server.log()[-3000:]
    # Every worker closed its connections (confirmed) and ended its session
    # before the master stopped the coordinator.
    assert "coordinator stopping: 0 session(s) open" in server.log(), server.log()[-3000:]
    assert sampler.count_now() == 0, "connections left after gunicorn stopped"
    wait_for(lambda: not pid_alive(coordinator), 5, "the coordinator to exit")
    assert not os.path.exists(server.sock), "the coordinator left its socket behind"


#: gevent's workers run the client's background thread as a greenlet (its idle
#: reports are what lets the coordinator reclaim a slot for another worker).
GEVENT = pytest.param("gevent", marks=pytest.mark.skipif(
    importlib.util.find_spec("gevent") is None,
    reason="gevent is not installed: pip install gevent to test gunicorn's gevent workers"))


@pytest.mark.parametrize("worker_class", ["sync", "gthread", GEVENT])
def test_eight_workers_share_a_cap_of_three(gunicorn: Callable[..., Gunicorn], app_name: str,
                                            worker_class: str) -> None:
    server = gunicorn(worker_class)
    with BackendSampler(app_name) as sampler:
        load = Load(server.url, total=400, threads=8).start().join()
        # The coordinator learns idle / busy from coalesced reports: give it a moment.
        row = wait_for(lambda: settled(server.sock), 5, "the leases to settle idle")
        assert row["leased"] <= CAP and row["waiting"] == 0, row
        assert_shut_down_clean(server, sampler)
    assert load.errors == [], load.errors[:5]
    assert load.done == 400
    assert len(load.ok) > CAP, f"only workers {sorted(load.ok)} served: the cap was not shared"
    assert sampler.samples > 50
    assert sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} connections with a cap of {CAP}"
    assert sampler.peak == CAP, "the cap was never reached: the test proves nothing"


def test_sigkilled_worker_gives_its_slots_back(gunicorn: Callable[..., Gunicorn],
                                              app_name: str) -> None:
    server = gunicorn("sync")
    with BackendSampler(app_name) as sampler:
        load = Load(server.url, total=600, threads=8, sleep=0.01).start()
        # A worker that holds a lease right now, mid-load.
        victim = wait_for(lambda: next((int(r["pid"]) for r in leases(server.sock)), None),
                          20, "a worker holding a lease")
        served_before = set(load.ok)
        os.kill(victim, signal.SIGKILL)
        # Its session ends with the socket; its slots leave the fence and are leased again.
        wait_for(lambda: not leases(server.sock, pid=victim), 10, "the dead worker's leases")
        wait_for(lambda: resource_row(server.sock)["fenced"] == 0, 10, "the fence to lift")
        load.join()
        after = wait_for(lambda: settled(server.sock), 5, "the leases to settle idle")
        assert after["leased"] <= CAP and after["waiting"] == 0, after
        assert_shut_down_clean(server, sampler)
    assert server.log().count("Booting worker") > WORKERS, "gunicorn did not replace the worker"
    replacements = set(load.ok) - served_before - {victim}
    assert replacements, "no request was served by a replacement worker"
    # Only what was in flight on the killed worker may fail (a sync worker runs one request).
    assert len(load.errors) <= 1, load.errors
    assert load.done + len(load.errors) == 600
    assert sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} connections with a cap of {CAP}"
    assert sampler.peak == CAP


def test_coordinator_outlives_recycled_workers(gunicorn: Callable[..., Gunicorn],
                                               app_name: str) -> None:
    # Workers exit and are replaced all the time (max_requests); none takes the
    # coordinator with it, and each gives its leases back on the way out. With
    # preload_app, so that the engine is made in the master and replacements boot fast.
    server = gunicorn("sync", extra=["--max-requests", "5", "--preload"])
    coordinator = server.coordinator_pid()
    with BackendSampler(app_name) as sampler:
        load = Load(server.url, total=160, threads=8).start().join()
        assert pid_alive(coordinator), "a worker's exit took the coordinator down"
        assert server.log().count("Booting worker") >= 2 * WORKERS, "workers were not recycled"
        row = wait_for(lambda: settled(server.sock), 5, "the leases to settle idle")
        assert row["leased"] <= CAP and row["fenced"] == 0, row
        assert_shut_down_clean(server, sampler)
    assert load.errors == [], load.errors[:5]
    assert sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} connections with a cap of {CAP}"


def test_worker_killed_by_gunicorn_timeout_gives_its_slots_back(
        gunicorn: Callable[..., Gunicorn], app_name: str) -> None:
    # One request outlives gunicorn's --timeout: the master aborts (SIGABRT) that
    # worker. The other requests never wait for a lease (2 threads, cap 3), so
    # none of them outlives the short timeout too.
    server = gunicorn("sync", extra=["--timeout", "2", "--graceful-timeout", "5"])
    with BackendSampler(app_name) as sampler:
        stuck = Load(server.url, total=1, threads=1, sleep=5).start()
        load = Load(server.url, total=300, threads=2, sleep=0.01).start()
        stuck.join()
        load.join()
        wait_for(lambda: "WORKER TIMEOUT" in server.log(), 10, "gunicorn's timeout")
        row = wait_for(lambda: settled(server.sock), 10, "the leases to settle idle")
        assert row["leased"] <= CAP and row["fenced"] == 0, row
        assert_shut_down_clean(server, sampler)
    assert stuck.done == 0 and len(stuck.errors) == 1, "the stuck request should have failed"
    assert load.errors == [], load.errors[:5]
    assert sampler.peak <= CAP, f"PostgreSQL saw {sampler.peak} connections with a cap of {CAP}"


def test_stop_past_graceful_timeout_leaves_no_backend_behind(gunicorn: Callable[..., Gunicorn],
                                                             app_name: str) -> None:
    # A request outlives --graceful-timeout: the stopping master SIGKILLs its worker,
    # whose backend runs on in pg_sleep(). The master must stop its coordinator only
    # once the fence saw that backend go: a gunicorn restarted at once (on a private
    # path, the default) would otherwise open the whole cap beside it.
    server = gunicorn("sync", extra=["--graceful-timeout", "1"])
    with BackendSampler(app_name) as sampler:
        stuck = Load(server.url, total=1, threads=1, sleep=4).start()
        wait_for(lambda: any(r["state"] == "busy" for r in leases(server.sock)), 10,
                 "the long request to hold its lease")
        assert server.stop() == 0, server.log()[-3000:]
        assert sampler.count_now() == 0, "gunicorn exited with a killed worker's query still running"
        stuck.join()
    assert stuck.done == 0 and len(stuck.errors) == 1, "the long request should have been cut"
    assert not os.path.exists(server.sock)


def test_external_coordinator_is_used_and_left_running(
        gunicorn: Callable[..., Gunicorn], start_coordinator: Callable[..., Any], sock_path: str,
        app_name: str) -> None:
    external = start_coordinator({"pg": CAP})
    server = gunicorn("sync")
    assert "using the coordinator already serving" in server.log()
    assert "sharedpool: the coordinator at" not in server.log()  # it serves what was declared
    with BackendSampler(app_name) as sampler:
        load = Load(server.url, total=80, threads=8).start().join()
        assert server.stop() == 0
        assert sampler.count_now() == 0
    assert load.errors == [], load.errors[:5]
    assert sampler.peak <= CAP
    # Not ours to stop: still serving, and every worker's lease came back.
    row = resource_row(sock_path)
    assert row["leased"] == 0 and row["fenced"] == 0, row
    assert external.pid is not None and pid_alive(external.pid)


def test_daemonized_master_starts_and_stops_its_coordinator(pg: str, tmp_path: Path, sock_path: str,
                                                             app_name: str) -> None:
    # --daemon forks the master away after gunicorn read its config (where the
    # hooks made the coordinator): the daemon must still be able to start it.
    port, pidfile, log_path = free_port(), tmp_path / "gunicorn.pid", tmp_path / "gunicorn.log"
    env = {**os.environ, "EXAMPLE_BIND": f"127.0.0.1:{port}", "EXAMPLE_WORKERS": "2",
           "EXAMPLE_CAP": str(CAP), "EXAMPLE_APP_NAME": app_name, "EXAMPLE_SOCKET": sock_path,
           "EXAMPLE_PG_URL": PG_URL, "EXAMPLE_COORDINATOR_LOG": "info"}
    env.pop("SHAREDPOOL_SOCKET", None)
    launcher = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(EXAMPLE / "gunicorn.conf.py"), "--chdir",
         str(EXAMPLE), "--daemon", "--pid", str(pidfile), "--log-file", str(log_path),
         "--capture-output", "app:app"], env=env, capture_output=True, text=True, timeout=30)
    assert launcher.returncode == 0, launcher.stderr
    master = 0
    try:
        master = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, "pidfile"))
        with BackendSampler(app_name) as sampler:
            load = Load(f"http://127.0.0.1:{port}/", total=40, threads=4)
            # The first requests may meet a listener whose workers are still booting.
            wait_for(lambda: "Booting worker" in log_path.read_text() or not pid_alive(master), 30,
                     "a worker")
            load.start().join()
            log = log_path.read_text(errors="replace")
            assert load.errors == [], f"{load.errors[:3]}\n{log[-3000:]}"
            found = re.search(r"sharedpool: coordinator pid (\d+) serving", log)
            assert found, log[-3000:]
            os.kill(master, signal.SIGTERM)
            wait_for(lambda: not pid_alive(master), 30, "the daemon to stop")
            assert sampler.count_now() == 0
        wait_for(lambda: not pid_alive(int(found.group(1))), 5, "the coordinator to exit")
        assert not os.path.exists(sock_path), "the coordinator left its socket behind"
        assert sampler.peak <= CAP
    finally:
        if master and pid_alive(master):  # the daemon leads its own session and group
            os.killpg(master, signal.SIGKILL)


_MASTER = """
import sys, time
from sharedpool.contrib._embedded import EmbeddedCoordinator
coordinator = EmbeddedCoordinator(sys.argv[1], {"r": 2}, log_level="info").start()
print(coordinator.pid, flush=True)
time.sleep(120)
"""


def _server_pid(client: Client) -> int | None:
    try:
        return int(client.inspect("server", timeout=1)["pid"])
    except SharedPoolError:
        return None


def test_embedded_coordinator_restarts_and_dies_with_its_master(sock_path: str) -> None:
    master = subprocess.Popen([sys.executable, "-c", _MASTER, sock_path], stdout=subprocess.PIPE,
                              text=True, start_new_session=True, preexec_fn=die_with_parent)
    try:
        assert master.stdout is not None
        first = int(master.stdout.readline())
        client = Client(sock_path)
        lease = client.acquire("r", timeout=5)
        os.kill(first, signal.SIGKILL)
        # The master's watch thread restarts it; our lease is re-registered (I4).
        second = wait_for(lambda: (_server_pid(client) or first) != first and _server_pid(client),
                          20, "a restarted coordinator")
        wait_for(lambda: [r["id"] for r in client.inspect("leases")["leases"]] == [lease.id],
                 10, "the lease to be re-registered")
        client.release(lease)
        client.close()
        # The master dies without a word: the coordinator sees its lifeline close and stops.
        os.kill(master.pid, signal.SIGKILL)
        master.wait(10)
        wait_for(lambda: not pid_alive(second), 10, "the coordinator to follow its master")
        assert not os.path.exists(sock_path)
    finally:
        if master.poll() is None:
            master.kill()
            master.wait(10)


_FORKING_MASTER = """
import os, subprocess, sys, threading, time
from sharedpool.contrib._embedded import EmbeddedCoordinator
real = subprocess._fork_exec

def forking_meanwhile(*args):
    # Another thread of the master forks as the coordinator is spawned (a gunicorn
    # worker, a celery pool child replacing one); that child lives on.
    forked = threading.Event()

    def fork():
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        forked.set()

    threading.Thread(target=fork, daemon=True).start()
    forked.wait(0.5)
    return real(*args)

coordinator = EmbeddedCoordinator(sys.argv[1], {"r": 2}, log_level="info").start()
subprocess._fork_exec = forking_meanwhile
print(coordinator.pid, flush=True)
time.sleep(120)
"""


def test_a_restart_is_not_held_up_by_a_child_forked_meanwhile(sock_path: str) -> None:
    """The watch thread restarts the coordinator while the master's other thread
    forks a worker. That child inherited the spawn's pipes: Popen waited on its
    exec-status pipe until the child exited (the restart held up for the child's
    lifetime: 60 s here, hours for a celery child), and the coordinator would
    outlive a SIGKILLed master as long as the child kept the lifeline."""
    master = subprocess.Popen([sys.executable, "-c", _FORKING_MASTER, sock_path],
                              stdout=subprocess.PIPE, text=True, start_new_session=True,
                              preexec_fn=die_with_parent)
    try:
        assert master.stdout is not None
        first = int(master.stdout.readline())
        client = Client(sock_path)
        os.kill(first, signal.SIGKILL)
        second = wait_for(lambda: (_server_pid(client) or first) != first and _server_pid(client),
                          15, "a restarted coordinator")
        client.close()
        os.kill(master.pid, signal.SIGKILL)  # its forked child lives on
        master.wait(10)
        wait_for(lambda: not pid_alive(second), 10, "the coordinator to follow its master")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(master.pid, signal.SIGKILL)  # the forked children
        master.wait(10)


def test_bad_limits_fail_when_gunicorn_reads_its_config(monkeypatch: pytest.MonkeyPatch,
                                                         sock_path: str) -> None:
    from sharedpool.contrib.gunicorn import hooks

    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)
    with pytest.raises(ConfigError) as err:
        hooks(resources={"pg": {"max_size": 0}}, socket=sock_path)
    assert err.value.field == "resources.pg.max_size"
    with pytest.raises(ConfigError) as err:
        hooks(resources={"pg": 2}, socket=sock_path, metrics_prot=9000)
    assert err.value.field == "options"
    assert "SHAREDPOOL_SOCKET" not in os.environ


def test_no_coordinator_and_no_resources_is_one_clear_error(tmp_path: Path,
                                                            sock_path: str) -> None:
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("from sharedpool.contrib.gunicorn import hooks\n"
                    f"on_starting, post_fork, worker_exit, on_exit = hooks(socket={sock_path!r})\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{free_port()}",
         "--chdir", str(EXAMPLE), "app:app"],
        capture_output=True, text=True, timeout=60, preexec_fn=die_with_parent,
    )
    assert proc.returncode == 1
    assert "Error: sharedpool: no coordinator is listening on" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


_SLOW_BORN = """
import signal, time
import sharedpool.contrib.gunicorn
from sharedpool.contrib.gunicorn import hooks

if not {lose!r}:  # only the hooks' catch in post_fork can save this case
    sharedpool.contrib.gunicorn.RESEND_AFTER = 60.0

on_starting, _post_fork, worker_exit, on_exit = hooks(resources={{"r": 2}}, socket={sock!r},
                                                      log_level="info")


def post_fork(server, worker):
    if {lose!r}:  # as CPython does with a signal that beats the child's after-fork code
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print("sharedpool-test: worker born", flush=True)
    # The window between fork() and gunicorn's init_signals(), held open: the
    # master's SIGTERM comes in the first part, its second one in the last.
    time.sleep(0.8)
    _post_fork(server, worker)
    time.sleep(0.8)
"""

_HELLO_APP = """
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]
"""


@contextlib.contextmanager
def _hello_under_gunicorn(tmp_path: Path, conf: Path,
                          *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """hello:app (written to tmp_path) under 2 gunicorn workers with config
    ``conf``, in its own session; yields (master, log file). What is left of
    its process group is SIGKILLed on the way out."""
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{free_port()}",
             "-w", "2", *args, "--chdir", str(tmp_path), "hello:app"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=die_with_parent,
        )
    try:
        yield proc, log_path
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize("lose", [False, True], ids=["queued-by-the-arbiter", "lost"])
def test_stop_during_worker_birth_is_not_lost(tmp_path: Path, sock_path: str, lose: bool) -> None:
    # A SIGTERM that reaches a worker before its init_signals() goes to the
    # arbiter's inherited handler (gunicorn #1910), or is dropped outright when it
    # beats CPython's after-fork code; either way gunicorn would wait its whole
    # graceful_timeout (20 s here) for the worker. The hooks deliver the first kind
    # once the worker listens, and the master sends the signal again after 1 s.
    (tmp_path / "hello.py").write_text(_HELLO_APP)
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(_SLOW_BORN.format(sock=sock_path, lose=lose))
    with _hello_under_gunicorn(tmp_path, conf, "--graceful-timeout", "20") as (proc, log_path):
        wait_for(lambda: log_path.read_text().count("sharedpool-test: worker born") == 2, 30,
                 "both workers to be forked")
        os.kill(proc.pid, signal.SIGTERM)  # the master passes it on while both are being born
        started = time.monotonic()
        try:
            status = proc.wait(15)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"gunicorn still stopping after 15 s:\n{log_path.read_text()}") from None
        text = log_path.read_text()
        assert status == 0 and time.monotonic() - started < 10, text[-3000:]
        assert "SIGKILL" not in text and "coordinator stopping: 0 session(s) open" in text, text


_SIG_DFL_WORKER = """
import signal, time
from gunicorn.workers.base import Worker
from sharedpool import ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory


class SigDflWorker(Worker):
    \"\"\"As uvicorn_worker's UvicornWorker: stop signals at their default action, caught
    while it serves, and the one it stopped for raised again once it has shut down.\"\"\"

    def init_signals(self):
        for s in self.SIGNALS:
            signal.signal(s, signal.SIG_DFL)

    def run(self):
        caught = []
        before = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
        pool = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="r")
        with pool.connection():
            pass  # one idle connection, leased, left in the pool
        print("sharedpool-test: leased", flush=True)
        while not caught:
            self.notify()
            time.sleep(0.05)
        signal.signal(signal.SIGTERM, before)
        signal.raise_signal(caught[0])
"""


def test_a_worker_class_that_dies_by_its_stop_signal_still_runs_worker_exit(
        tmp_path: Path, sock_path: str) -> None:
    # UvicornWorker re-raised SIGTERM at SIG_DFL after its shutdown: every worker
    # died by it (master: "was sent SIGTERM!"), worker_exit never ran, and each
    # session's leases went back through the fence ("quarantined"), not at once.
    (tmp_path / "hello.py").write_text(_HELLO_APP)
    (tmp_path / "sigdfl_worker.py").write_text(_SIG_DFL_WORKER)
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(f"from sharedpool.contrib.gunicorn import hooks\n"
                    f"control_socket_disable = True\n"
                    f"on_starting, post_fork, worker_exit, on_exit = hooks(resources={{'r': 2}}, "
                    f"socket={sock_path!r}, log_level='info')\n")
    with _hello_under_gunicorn(tmp_path, conf, "-k", "sigdfl_worker.SigDflWorker") as (proc, log_path):
        wait_for(lambda: log_path.read_text().count("sharedpool-test: leased") == 2, 30,
                 "both workers to hold a lease")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
        text = log_path.read_text()
        assert "was sent SIGTERM" not in text and "quarantined" not in text, text[-3000:]
        assert text.count(", 1 lease(s) returned") == 0 and "0 session(s) open" in text, text[-3000:]


class _FakeMaster:
    """What the hooks read of gunicorn's Arbiter."""

    def __init__(self) -> None:
        import logging
        import types

        self.cfg = types.SimpleNamespace(env_orig={})
        self.log = logging.getLogger("test-gunicorn-master")


def test_binary_upgrade_keeps_one_coordinator(start_coordinator: Any, sock_path: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """USR2: gunicorn execs the new master with its original environment. The
    hooks put the socket path there, so the new master finds the coordinator
    the old one started (one budget, not two); once the old master stops it,
    the new master starts its own on the same path and the leases held
    meanwhile are re-registered with it (I4)."""
    from sharedpool.contrib.gunicorn import hooks

    # hooks() sets it in os.environ: set here first, so that the test's end
    # removes it again (a delenv of an absent variable records nothing).
    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)
    old_coordinator = start_coordinator({"r": 1})  # the old master's
    monkeypatch.setenv("GUNICORN_PID", "1")  # what gunicorn sets in a re-exec'd master
    new_master = _FakeMaster()
    on_starting, _, _, on_exit = hooks(resources={"r": 1}, socket=sock_path)
    client = Client(sock_path)
    try:
        on_starting(new_master)
        assert new_master.cfg.env_orig["SHAREDPOOL_SOCKET"] == sock_path  # for the next upgrade
        first = _server_pid(client)
        assert first == old_coordinator.pid  # used, not a second budget
        lease = client.acquire("r", timeout=5)  # a new worker's connection
        old_coordinator.stop()  # the old master exits
        wait_for(lambda: (_server_pid(client) or first) != first, 20, "the new master's coordinator")
        wait_for(lambda: [r["id"] for r in client.inspect("leases")["leases"]] == [lease.id],
                 10, "the lease to be re-registered")
        client.release(lease)
    finally:
        client.close()
        on_exit(new_master)
    assert not os.path.exists(sock_path)


def test_master_exit_during_a_take_over_start_stops_what_it_started(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """on_exit that comes while the USR2 take-over is starting its coordinator
    (serving already, not yet registered) stops that coordinator too, instead of
    leaving it running with its socket file behind the exited master."""
    from sharedpool.contrib import gunicorn
    from sharedpool.program import EmbeddedCoordinator

    started: list[EmbeddedCoordinator] = []
    real_start = EmbeddedCoordinator.start

    def slow_start(self: EmbeddedCoordinator) -> EmbeddedCoordinator:
        real_start(self)
        started.append(self)
        time.sleep(1.0)  # the take-over thread is descheduled right here
        return self

    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)
    old_coordinator = start_coordinator({"r": 1})
    monkeypatch.setattr(EmbeddedCoordinator, "start", slow_start)
    monkeypatch.setenv("GUNICORN_PID", "1")
    new_master = _FakeMaster()
    on_starting, _, _, on_exit = gunicorn.hooks(resources={"r": 1}, socket=sock_path)
    try:
        on_starting(new_master)
        old_coordinator.stop()
        wait_for(lambda: bool(started), 20, "the take-over to start its coordinator")
        pid = started[0].pid
        assert pid is not None
        on_exit(new_master)  # the new master exits at once
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not os.path.exists(sock_path)
    finally:
        for leftover in started:
            leftover.stop()
        gunicorn._EMBEDDED.pop(sock_path, None)


def test_sighup_reread_keeps_the_coordinator_the_master_started(
        sock_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """SIGHUP: gunicorn re-reads its config in the master (hooks() runs again)
    and forks new workers, with no on_starting. Those workers must still find
    the coordinator the master started, not a path a changed socket= names with
    nothing listening there; and limits it does not apply are said, not dropped."""
    import logging

    from sharedpool.contrib import gunicorn

    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)  # hooks() sets it: restored after the test
    master = _FakeMaster()
    on_starting, _, _, _ = gunicorn.hooks(resources={"r": 1}, socket=sock_path)
    moved = str(tmp_path / "moved.sock")
    try:
        on_starting(master)
        with caplog.at_level(logging.WARNING, logger="sharedpool.gunicorn"):
            _, post_fork, _, on_exit = gunicorn.hooks(resources={"r": 2, "s": 1}, socket=moved)
        post_fork(master, object())  # a worker forked after the reload
        assert os.environ["SHAREDPOOL_SOCKET"] == sock_path
        assert f"socket {moved} not applied" in caplog.text, caplog.text
        assert "r: max_size 1 -> 2; resource 's' added" in caplog.text, caplog.text
        client = Client(sock_path)
        try:
            assert [row["max_size"] for row in client.inspect("resources")["resources"]] == [1]
        finally:
            client.close()
        on_exit(master)  # the reloaded hooks stop the coordinator the master started
        assert not os.path.exists(sock_path)
    finally:
        leftover = gunicorn._EMBEDDED.pop(sock_path, None)
        if leftover is not None:
            leftover.stop()


def test_sighup_reread_says_a_changed_config_file_is_not_applied(tmp_path: Path) -> None:
    """``hooks(resources, config_file="a.toml")`` changed to ``"b.toml"`` and SIGHUP:
    the running coordinator reloads (and restarts on) a.toml until gunicorn restarts.
    That was not said: config_file was skipped as a reload of the coordinator skips it
    (the same file there), though here code is compared with code."""
    from sharedpool.contrib import gunicorn

    def config(name: str) -> CoordinatorConfig:
        return CoordinatorConfig(socket_path=str(tmp_path / "s.sock"), resources={"r": 1},
                                 config_file=str(tmp_path / name))

    assert gunicorn._changed_settings(config("a.toml"), config("b.toml")) == [
        f"config_file {str(tmp_path / 'a.toml')!r} -> {str(tmp_path / 'b.toml')!r}"]
    assert gunicorn._changed_settings(config("a.toml"), config("a.toml")) == []


def test_sighup_reread_says_a_changed_keyword_given_beside_config_file_is_not_applied(
        sock_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """``hooks(resources, config_file=..., admin_uids=...)``, the keyword changed
    in gunicorn's config and SIGHUP: the running coordinator keeps the old
    value until gunicorn restarts. That was said; with config_file= given it
    was silent (the keywords beside the file were skipped as a reload skips
    them, though here code is compared with code)."""
    import logging

    from sharedpool.contrib import gunicorn

    config = tmp_path / "sp.toml"
    config.write_text("[resources]\nr = 1\n")
    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)  # hooks() sets it: restored after the test
    master = _FakeMaster()
    on_starting, _, _, _ = gunicorn.hooks(resources={"r": 1}, socket=sock_path, config_file=str(config),
                                          admin_uids=[os.getuid()])
    try:
        on_starting(master)
        with caplog.at_level(logging.WARNING, logger="sharedpool.gunicorn"):
            _, _, _, on_exit = gunicorn.hooks(resources={"r": 1}, socket=sock_path,
                                              config_file=str(config), admin_uids=[os.getuid(), 4242])
        assert "keeps its settings until gunicorn restarts" in caplog.text, caplog.text
        assert "admin_uids changed" in caplog.text, caplog.text
        on_exit(master)
    finally:
        leftover = gunicorn._EMBEDDED.pop(sock_path, None)
        if leftover is not None:
            leftover.stop()


def test_sighup_after_a_coordinator_restart_says_only_what_the_config_changed(
        tmp_path: Path, sock_path: str) -> None:
    """``hooks(resources, config_file=...)``, the coordinator restarted after a crash
    (it read the file, which sets more than the code), then a SIGHUP re-read that
    changes only admin_uids: the file's settings were said to be changed too
    ("resource 'extra' removed; hello_timeout changed"), compared with what the
    restart read from the file instead of with the hooks() the master read."""
    (tmp_path / "hello.py").write_text(_HELLO_APP)
    (tmp_path / "sp.toml").write_text("[coordinator]\nhello_timeout = 5.0\n[resources]\nr = 1\nextra = 2\n")
    conf = tmp_path / "gunicorn.conf.py"
    template = ("from sharedpool.contrib.gunicorn import hooks\n"
                "control_socket_disable = True\n"
                "on_starting, post_fork, worker_exit, on_exit = hooks(resources={{'r': 1}}, "
                f"socket={sock_path!r}, config_file={str(tmp_path / 'sp.toml')!r}, "
                "log_level='info'{admin})\n")
    conf.write_text(template.format(admin=""))
    with _hello_under_gunicorn(tmp_path, conf) as (proc, log_path):
        found = wait_for(lambda: re.search(r"sharedpool: coordinator pid (\d+) serving",
                                           log_path.read_text()), 30, "the coordinator")
        os.kill(int(found.group(1)), signal.SIGKILL)
        wait_for(lambda: f"serving {sock_path}: r=1, extra=2" in log_path.read_text(), 30,
                 "the coordinator restarted from its file")
        conf.write_text(template.format(admin=f", admin_uids=[{os.getuid()}, 4242]"))
        os.kill(proc.pid, signal.SIGHUP)
        warned = wait_for(lambda: re.search(r"keeps its settings until gunicorn restarts .*",
                                            log_path.read_text()), 30, "the re-read's warning")
        text = log_path.read_text()[-3000:]
        assert warned.group(0).endswith("changes a cap live): admin_uids changed"), text


def test_sighup_reread_with_a_bad_limit_keeps_the_master(
        sock_path: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bad limit in a SIGHUP re-read is not applied (the coordinator keeps its
    settings): said, not raised. gunicorn exits the master, and with it every
    worker, on an exception from its config file."""
    import logging

    from sharedpool.contrib import gunicorn

    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)
    master = _FakeMaster()
    on_starting, _, _, _ = gunicorn.hooks(resources={"r": 1}, socket=sock_path)
    try:
        on_starting(master)
        with caplog.at_level(logging.WARNING, logger="sharedpool.gunicorn"):
            _, _, _, on_exit = gunicorn.hooks(resources={"r": 0}, socket=sock_path)
        assert "resources.r.max_size" in caplog.text, caplog.text
        on_exit(master)
        assert not os.path.exists(sock_path)
    finally:
        leftover = gunicorn._EMBEDDED.pop(sock_path, None)
        if leftover is not None:
            leftover.stop()


def test_sighup_during_a_take_over_keeps_its_path(start_coordinator: Any, sock_path: str,
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGHUP re-read in a USR2 master whose take-over is still waiting: its
    workers go to the path taken over, and on_exit stops what the take-over started."""
    from sharedpool.contrib import gunicorn

    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)
    old_coordinator = start_coordinator({"r": 1})
    monkeypatch.setenv("GUNICORN_PID", "1")
    master = _FakeMaster()
    on_starting, _, _, _ = gunicorn.hooks(resources={"r": 1}, socket=sock_path)
    client = Client(sock_path)
    try:
        on_starting(master)  # the take-over waits for the old master's coordinator
        _, post_fork, _, on_exit = gunicorn.hooks(resources={"r": 1},
                                                  socket=str(tmp_path / "moved.sock"))
        post_fork(master, object())
        assert os.environ["SHAREDPOOL_SOCKET"] == sock_path
        first = _server_pid(client)
        old_coordinator.stop()
        wait_for(lambda: (_server_pid(client) or first) != first, 20, "the take-over")
        on_exit(master)
        assert not os.path.exists(sock_path)
    finally:
        client.close()
        leftover = gunicorn._EMBEDDED.pop(sock_path, None)
        if leftover is not None:
            leftover.stop()


def test_a_daemonized_master_keeps_the_start_timeout(monkeypatch: pytest.MonkeyPatch,
                                                     sock_path: str) -> None:
    """--daemon: the coordinator is made again in the daemon, with every setting given."""
    from sharedpool.contrib import gunicorn as integration
    from sharedpool.program import EmbeddedCoordinator

    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)  # hooks() sets it: put back after
    hooks = integration.hooks({"pg": 2}, socket=sock_path, start_timeout=77)
    started: list[EmbeddedCoordinator] = []
    monkeypatch.setattr(EmbeddedCoordinator, "start", lambda self: started.append(self) or self)
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as the daemon forked from the reader

    class Server:
        log = __import__("logging").getLogger("test")
        cfg = None
        WORKERS: dict[int, Any] = {}

        def kill_workers(self, sig: int) -> None:
            pass

    try:
        hooks.on_starting(Server())
        assert [e.start_timeout for e in started] == [77]
    finally:
        integration._EMBEDDED.pop(sock_path, None)


@pytest.mark.parametrize("options, warned", [
    ({}, "pass allowed_uids=[65534]"),
    ({"allowed_uids": [os.getuid(), 65534]}, "pass group="),
    ({"allowed_uids": [os.getuid(), 65534], "group": "nogroup"}, None),
    ({"allowed_uids": [os.getuid(), 65534], "group": "daemon"}, "group 'daemon'"),  # not the workers'
    ({"allowed_uids": [os.getuid(), 65534], "group": "65534"}, None),  # nogroup by its gid
])
def test_workers_run_as_another_user_are_told_at_start(
        monkeypatch: pytest.MonkeyPatch, sock_path: str, caplog: pytest.LogCaptureFixture,
        options: dict[str, Any], warned: str | None) -> None:
    """gunicorn --user: before, nothing said at the start that the workers could
    not use the master's coordinator; each checkout failed on "Permission
    denied" (the 0600 socket) or AccessDenied."""
    import types

    from sharedpool.contrib import gunicorn as integration

    if options.get("group") and os.getuid() != 0:
        pytest.skip("giving the socket to group nogroup needs root")
    monkeypatch.setenv("SHAREDPOOL_SOCKET", sock_path)  # hooks() sets it: put back after
    master = _FakeMaster()
    master.cfg = types.SimpleNamespace(env_orig={}, uid=65534, gid=65534, initgroups=False)
    on_starting, _, _, on_exit = integration.hooks({"r": 1}, socket=sock_path, **options)
    with caplog.at_level("WARNING", logger=master.log.name):
        try:
            on_starting(master)
        finally:
            on_exit(master)
    said = [r.getMessage() for r in caplog.records if "every checkout in the workers" in r.getMessage()]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and warned in said[0], said


def test_what_a_sighup_reread_does_not_apply_is_said_in_gunicorns_error_log(
        tmp_path: Path, sock_path: str) -> None:
    # Before: hooks()'s warning at a re-read went through Python's last-resort
    # handler: bare on stderr, not in gunicorn's format nor in --error-logfile.
    (tmp_path / "hello.py").write_text(_HELLO_APP)
    conf = tmp_path / "gunicorn.conf.py"
    cap = tmp_path / "cap"
    cap.write_text("2")
    conf.write_text(f"from pathlib import Path\n"
                    f"from sharedpool.contrib.gunicorn import hooks\n"
                    f"control_socket_disable = True\n"
                    f"on_starting, post_fork, worker_exit, on_exit = hooks(\n"
                    f"    resources={{'r': int(Path({str(cap)!r}).read_text())}}, socket={sock_path!r})\n")
    errors = tmp_path / "errors.log"
    with _hello_under_gunicorn(tmp_path, conf, "--error-logfile", str(errors)) as (proc, log_path):
        wait_for(lambda: errors.exists() and errors.read_text().count("Booting worker") == 2, 30,
                 "both workers")
        cap.write_text("3")
        os.kill(proc.pid, signal.SIGHUP)
        said = wait_for(lambda: [line for line in errors.read_text().splitlines()
                                 if "keeps its settings" in line], 30, "the re-read's warning")
        assert re.search(r"\[\d+\] \[WARNING\] sharedpool: .*r: max_size 2 -> 3", said[0]), said
        assert "keeps its settings" not in log_path.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0


def test_usr2_handed_path_keeps_its_restart_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """A private path gunicorn hands on to a USR2 successor (env_orig) is no
    longer private: if this master is SIGKILLed, the successor starts its
    coordinator there and must read the restart marker, so the stopped
    coordinator must not remove it."""
    from sharedpool.contrib.gunicorn import hooks
    from sharedpool.program import _PRIVATE_PATHS

    monkeypatch.delenv("SHAREDPOOL_SOCKET", raising=False)
    monkeypatch.delenv("GUNICORN_PID", raising=False)
    master = _FakeMaster()
    on_starting, _, _, on_exit = hooks(resources={"r": 1})
    try:
        on_starting(master)
        path = master.cfg.env_orig["SHAREDPOOL_SOCKET"]
        assert path not in _PRIVATE_PATHS
    finally:
        on_exit(master)
        os.environ.pop("SHAREDPOOL_SOCKET", None)
