"""Under gevent and eventlet (monkey-patched, as gunicorn's gevent worker and
celery's -P gevent / -P eventlet run): the client's background thread is a
greenlet, its socket a cooperative one and its select() the library's.

Each case runs in a child process that patches first; the test reads the
coordinator's ledger from outside. Skipped, saying so, without the library."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sharedpool import Client

PATCH = {
    "gevent": "from gevent import monkey; monkey.patch_all()",
    "eventlet": "import eventlet; eventlet.monkey_patch()",
}

#: The child: a pool of fake connections and one of socket-backed connections
#: (their close is confirmed by an EOF, as a database connection's is). It checks
#: one of each out and in, drains the socket pool, says so, and lives on.
CHILD = """
import socket, sys, time
from sharedpool import ConnectionPool, PoolConfig
from sharedpool.testing import FakeFactory

class SocketConnection:
    def __init__(self):
        self.ours, self.server = socket.socketpair()
    def fileno(self):
        return self.ours.fileno()
    def ping(self):
        pass
    def close(self):  # the server end goes with it: the EOF confirms the close
        self.ours.close()
        self.server.close()

sock = sys.argv[1]
fake = ConnectionPool(FakeFactory(), PoolConfig(min_size=0, max_size=1), resource="fake",
                      coordinator=sock)
real = ConnectionPool(SocketConnection, PoolConfig(min_size=0, max_size=1), resource="sock",
                      coordinator=sock)
with fake.connection():
    pass
with real.connection():
    pass
real.drain(5)
print("ready", flush=True)
time.sleep(60)
"""


def _library(name: str) -> Any:
    if importlib.util.find_spec(name) is None:
        return pytest.param(name, marks=pytest.mark.skip(
            reason=f"{name} is not installed: pip install {name} to test sharedpool under it"))
    return name


def _wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_patched_process_reports_and_gives_back(start_coordinator: Any, sock_path: str,
                                                  tmp_path: Path, library: str) -> None:
    """The lease of a connection checked in reaches the coordinator as idle
    (reclaim needs it: a waiter elsewhere starved for a lease held "in use"
    by an idle gevent worker), and a drained connection's lease goes back once
    its close is confirmed (eventlet: it was kept until the process exited)."""
    start_coordinator({"fake": 1, "sock": 1})
    script = tmp_path / "child.py"
    script.write_text(PATCH[library] + "\n" + textwrap.dedent(CHILD))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SHAREDPOOL_SOCKET", None)
    child = subprocess.Popen([sys.executable, str(script), sock_path], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    client = Client(sock_path)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # bounded: the child sleeps 60 s at most after it
        assert line.strip() == "ready", child.stderr.read() if child.poll() is not None else line

        def states() -> dict[str, str]:
            return {row["resource"]: row["state"] for row in client.inspect("leases")["leases"]}

        try:
            _wait_for(lambda: states() == {"fake": "idle"}, 10, "the fake lease idle, the drained one back")
        except AssertionError:
            raise AssertionError(f"the coordinator sees {states()}") from None
    finally:
        client.close()
        child.send_signal(signal.SIGKILL)
        _, err = child.communicate(timeout=10)
    assert "Traceback" not in err, err[-3000:]


#: The child: a session up, then (once the test stopped the coordinator) frames
#: sent until the socket buffer is full; a send must give up, not wait for ever.
SENDER = """
import sys
import sharedpool.handshake as handshake
from sharedpool import Client
from sharedpool import protocol as p

handshake.SEND_TIMEOUT = 0.5
client = Client(sys.argv[1])
client.inspect("resources")
print("up", flush=True)
sys.stdin.readline()
big = p.Inspect(0, "resources", {"pad": "x" * 500_000})
for _ in range(200):  # 100 MB at most: far beyond any socket buffer
    client._send_quiet(big)  # what a release or a report goes through
    if not client.connected:
        break
print("lost" if not client.connected else "still connected", flush=True)
"""


def _read_line(child: subprocess.Popen[str], timeout: float) -> str:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    return child.stdout.readline().strip() if ready else f"nothing within {timeout}s"


def _run_forked_script(tmp_path: Path, name: str, text: str, library: str, args: list[str],
                       timeout: float) -> tuple[str, str]:
    """Run ``text`` (PATCH replaced by ``library``'s patching, SPAWN its spawn) as a
    script in a session of its own; its first line of output (or why none came
    within ``timeout``) and its stderr. The whole group is killed after: the
    forked child too, hung or not."""
    spawn = {"gevent": "import gevent; SPAWN = gevent.spawn", "eventlet": "SPAWN = eventlet.spawn"}[library]
    script = tmp_path / name
    script.write_text(textwrap.dedent(text).replace("PATCH", PATCH[library] + "\n" + spawn))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SHAREDPOOL_SOCKET", None)
    child = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        line = _read_line(child, timeout)
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate(timeout=10)
    return line, err


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_coordinator_that_stops_reading_cannot_hold_a_patched_sender(
        start_coordinator: Any, sock_path: str, tmp_path: Path, library: str) -> None:
    """SO_SNDTIMEO bounds a plain socket's send; a cooperative socket ignores it
    and waited for as long as the coordinator did not read."""
    coord = start_coordinator({"r": 1})
    script = tmp_path / "sender.py"
    script.write_text(PATCH[library] + "\n" + textwrap.dedent(SENDER))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen([sys.executable, str(script), sock_path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        assert _read_line(child, 30) == "up"
        os.kill(coord.pid, signal.SIGSTOP)  # accepts (the kernel does), never reads
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert _read_line(child, 15) == "lost"
    finally:
        os.kill(coord.pid, signal.SIGCONT)
        child.kill()
        child.communicate(timeout=10)


#: The child: the redis integration's pool, shared by more greenlets than it has
#: connections (redis-py's LifoQueue is then the library's, with no mutex and no
#: condition); its connections left idle, holding the whole cap.
REDIS_CHILD = """
import sys, threading, time
import redis
from sharedpool.contrib.redis import BlockingConnectionPool

sock, name = sys.argv[1], sys.argv[2]
pool = BlockingConnectionPool(host="127.0.0.1", port=6379, client_name=name, resource="rd",
                              coordinator=sock, max_connections=2, timeout=10)
r = redis.Redis(connection_pool=pool)
errors = []

def work():
    for _ in range(20):
        try:
            r.incr(name + ":n")
        except Exception as exc:
            errors.append(repr(exc))

greenlets = [threading.Thread(target=work) for _ in range(6)]
for g in greenlets:
    g.start()
for g in greenlets:
    g.join(30)
print("ready", len(errors), errors[:1], flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_the_redis_pool_serves_greenlets_and_gives_back_idle_connections(
        start_coordinator: Any, sock_path: str, tmp_path: Path, redis_name: str, library: str) -> None:
    """Its checkins, its idle report and its reclaim took the standard queue's
    mutex: AttributeError on a green queue, commands failed, idle connections
    were reported as nothing and never given back to a waiter elsewhere."""
    start_coordinator({"rd": 2})
    script = tmp_path / "redis_child.py"
    script.write_text(PATCH[library] + "\n" + textwrap.dedent(REDIS_CHILD))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("SHAREDPOOL_SOCKET", None)
    child = subprocess.Popen([sys.executable, str(script), sock_path, redis_name], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    client = Client(sock_path)
    try:
        assert _read_line(child, 60) == "ready 0 []"

        def idle() -> bool:
            return [row["state"] for row in client.inspect("leases")["leases"]] == ["idle", "idle"]

        _wait_for(idle, 10, "the child's two leases reported idle")
        got = [client.acquire("rd", timeout=10) for _ in range(2)]  # only a reclaim frees them
        for lease in got:
            client.release(lease)
    finally:
        client.close()
        child.kill()
        _, err = child.communicate(timeout=10)
    assert "Traceback" not in err, err[-3000:]


#: The child: a gunicorn -k gevent --preload worker in small. The app (and with it
#: the SQLAlchemy integration) is imported, then the process forks, and only the
#: child patches; there a connection is detach()ed, then closed by its user.
DETACHER = """
import os, sys
import sharedpool.contrib.sqlalchemy as integration
from sqlalchemy import text

sock, app, url = sys.argv[1], sys.argv[2], sys.argv[3]
if os.fork():
    os.wait()
    sys.exit(0)
PATCH
engine = integration.create_engine(url, resource="pg", coordinator=sock, pool_size=1, max_overflow=0,
                                   connect_args={"application_name": app})
with engine.connect() as conn:
    conn.execute(text("SELECT 1"))
    conn.detach()
print("detached", flush=True)
os._exit(0)
"""


@pytest.mark.pg
@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_detach_in_a_worker_forked_before_the_patching_does_not_hang(
        start_coordinator: Any, sock_path: str, tmp_path: Path, pg: str, app_name: str,
        library: str) -> None:
    """The collector's queue and lock, made by the at-fork hook before the patching,
    were the C ones: the first detach() started the collector greenlet, whose get()
    blocked the hub for ever (gunicorn's timeout then killed the worker, and the
    next one hung at its first detach())."""
    start_coordinator({"pg": 2})
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"  # pg_dsn()'s database
    line, err = _run_forked_script(tmp_path, "detacher.py", DETACHER, library, [sock_path, app_name, url], 20)
    assert line == "detached"
    assert "Traceback" not in err, err[-3000:]


#: The child: sharedpool imported, then a fork, and only the child patches (a
#: gunicorn worker: its config imports the hooks). Greenlets check out at once
#: (SPAWN: the library's own spawn, which queues them all before the first runs).
FIRST_USERS = """
import os, sys
import sharedpool  # before the fork, as gunicorn.conf.py imports the hooks

sock = sys.argv[1]
if os.fork():
    os.wait()
    sys.exit(0)
PATCH
import threading
from sharedpool import Client

client = Client.for_path(sock)

def work():
    client.release(client.acquire("r", 10))

greenlets = [SPAWN(work) for _ in range(10)]  # all queued before the first runs
for g in greenlets:
    g.wait() if hasattr(g, "wait") else g.join(20)
for _ in range(3):
    work()
print("readers", sum(t.name.startswith("sharedpool-client") for t in threading.enumerate()), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_greenlets_first_using_a_client_after_a_fork_start_one_reader(
        start_coordinator: Any, sock_path: str, tmp_path: Path, library: str) -> None:
    """gevent: the registry lock, made at the fork before the patching, is a real
    RLock that every greenlet holds at once: each first checkout started a
    background reader of its own (10). eventlet greens existing locks as it
    patches: there, a check that one reader stays one."""
    start_coordinator({"r": 3})
    line, err = _run_forked_script(tmp_path, "first_users.py", FIRST_USERS, library, [sock_path], 30)
    assert line == "readers 1", line
    assert "Traceback" not in err, err[-3000:]


#: The child: gunicorn --preload with a coordinator already up (`sharedpool
#: serve`): the master checks out at import, then forks; the worker patches and
#: its greenlets make the worker's first checkouts at once.
USED_BEFORE_FORK = """
import os, sys
from sharedpool import Client

sock = sys.argv[1]
client = Client.for_path(sock)
client.release(client.acquire("r", 10))
if os.fork():
    os.wait()
    sys.exit(0)
PATCH
done = []

def work():
    client.release(client.acquire("r", 10))
    done.append(1)

greenlets = [SPAWN(work) for _ in range(10)]
for g in greenlets:
    g.wait() if hasattr(g, "wait") else g.join(20)
print("done", len(done), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_client_used_before_the_fork_does_not_block_the_patched_worker(
        start_coordinator: Any, sock_path: str, tmp_path: Path, library: str) -> None:
    """gevent: the client's locks, remade at the fork before the patching, were
    real: the first greenlet's handshake held the send lock across its switches,
    the next one waited for it on the real lock, and the whole worker hung.
    eventlet greens existing locks as it patches: there, a guard."""
    start_coordinator({"r": 3})
    line, err = _run_forked_script(tmp_path, "used_before_fork.py", USED_BEFORE_FORK, library,
                                   [sock_path], 20)
    assert line == "done 10", line
    assert "Traceback" not in err, err[-3000:]


#: The child: connects (a bare handshake) to a coordinator whose listen queue
#: the test filled, counting its connect() calls; then, told the queue has
#: room, connects again.
FULL_QUEUE_CHILD = """
import os, socket, sys, time
from sharedpool import protocol as p
from sharedpool.handshake import shake_hands

calls = [0]
sys.addaudithook(lambda event, args: event == "socket.connect" and calls.__setitem__(0, calls[0] + 1))

def hello():
    return p.Hello(p.PROTOCOL_VERSION, os.getpid(), "t", [])

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    shake_hands(sock, sys.argv[1], 1.0, hello)
    print("connected to a full queue", flush=True)
except TimeoutError as exc:
    print(calls[0], exc, flush=True)
sys.stdin.readline()
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
shake_hands(sock, sys.argv[1], 30.0, hello)
print("welcomed", flush=True)
"""


@contextlib.contextmanager
def _full_listen_queue(pid: int, path: str) -> Iterator[None]:
    """The coordinator ``pid`` stopped and its listen queue at ``path`` filled
    (513 with a backlog of 512); both undone after."""
    queued: list[socket.socket] = []
    os.kill(pid, signal.SIGSTOP)
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
        assert len(queued) < 2000, "the queue never filled"
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        for s in queued:
            s.close()


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_patched_connect_to_a_full_listen_queue_is_paced_not_spun(
        start_coordinator: Any, sock_path: str, tmp_path: Path, library: str) -> None:
    """gevent's and eventlet's connect meet a full queue (EAGAIN) by waiting
    for the socket to be writable, which an unconnected Unix socket always is:
    each reconnecting worker called connect() again and again, a core's worth,
    until its timeout, taking the CPU the stopped or busy coordinator needed."""
    coord = start_coordinator({"r": 1})
    script = tmp_path / "full_queue.py"
    script.write_text(PATCH[library] + "\n" + textwrap.dedent(FULL_QUEUE_CHILD))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    child = None
    try:
        with _full_listen_queue(coord.pid, sock_path):
            child = subprocess.Popen([sys.executable, str(script), sock_path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            line = _read_line(child, 30)
            calls, _, why = line.partition(" ")
            assert why == "timed out: the coordinator's queue of connections stayed full", line
            assert int(calls) < 100, f"{calls} connect() calls in 1 s"  # ~25 at 1 ms doubling to 50 ms
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
        assert _read_line(child, 30) == "welcomed"
    finally:
        if child is not None:
            child.kill()
            child.communicate(timeout=10)


@pytest.mark.parametrize("library", [_library("gevent"), _library("eventlet")])
def test_a_patched_probe_takes_a_full_listen_queue_for_a_live_coordinator(
        start_coordinator: Any, sock_path: str, tmp_path: Path, library: str) -> None:
    """The integrations' probe (celery -P gevent / -P eventlet runs it patched,
    at worker_init): gevent's and eventlet's connect spun on a full queue until
    the probe's timeout, which read as nothing listening there (the integration
    then sets out to start a coordinator of its own on that path)."""
    coord = start_coordinator({"r": 1})
    script = tmp_path / "probe.py"
    script.write_text(PATCH[library] + "\nimport sys\nfrom sharedpool.program import coordinator_listening\n"
                      "print(coordinator_listening(sys.argv[1], timeout=1.0), flush=True)\n")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with _full_listen_queue(coord.pid, sock_path):
        probe = subprocess.run([sys.executable, str(script), sock_path], capture_output=True, text=True,
                               env=env, timeout=60)
    assert probe.stdout.strip() == "True", probe.stdout + probe.stderr[-2000:]
