"""A live process whose session the coordinator ended (a bad frame, a half-sent
frame, not reading its replies): it still has its connections, so its slots
must not go to anyone else (I1), nor its backends be terminated under it; it
reconnects and re-registers them, and when it exits they come back (I2)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pg_helpers import pg_dsn
from servers import wait_for
from test_fence_e2e import pid_known

from sharedpool import Client, PoolTimeout, Resource

#: A process holding one pooled connection, told by lines on stdin what to do next.
_HOLDING = """
import os, signal, socket, sys, psycopg
from pg_helpers import pg_dsn
from sharedpool import Client, ConnectionPool, PoolConfig
sock, app = sys.argv[1], sys.argv[2]
pool = ConnectionPool(lambda: psycopg.connect(pg_dsn(), application_name=app, autocommit=True),
                      PoolConfig(min_size=0, max_size=1), resource="pg", coordinator=sock)
with pool.connection(timeout=30) as conn:
    print("holding", conn.info.backend_pid, flush=True)
    sys.stdin.readline()
"""

#: Told to go on: uses its connection, says whether it still works, waits to be told to end.
_THEN_USES = """
    sys.stdin.readline()
    try:
        conn.execute("SELECT 1")
        print("used", flush=True)
    except psycopg.Error as exc:
        print("broken", type(exc).__name__, flush=True)
    sys.stdin.readline()
"""

_LIVE = _HOLDING + """
    # Half a frame, then stopped: the coordinator ends the session (frame_timeout)
    # while this process lives on, its connection open.
    Client.for_path(sock)._sock.sendall(b"\\x00\\x00\\x00\\x10")
    os.kill(os.getpid(), signal.SIGSTOP)
""" + _THEN_USES


@contextlib.contextmanager
def live_process(sock: str, app: str, script: str = _LIVE) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """The process of ``script`` (one of :data:`_HOLDING`'s), holding one
    connection, and its backend pid (known at the coordinator); killed (by
    pid) on the way out."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    proc = subprocess.Popen([sys.executable, "-c", script, sock, app], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line and line[0] == "holding", line
        backend = int(line[1])
        pid_known(sock, backend)
        yield proc, backend
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def tell(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()


def session_ended(probe: Client, pid: int) -> None:
    wait_for(lambda: not any(s["pid"] == pid for s in probe.inspect("sessions")["sessions"]),
             10, "the coordinator to end the stopped process's session")


def _backend_present(backend: int) -> bool:
    with psycopg.connect(pg_dsn(), autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                            (backend,)).fetchone() == (1,)


@pytest.mark.parametrize("action", ["none", "wait", "terminate"])
def test_a_live_process_whose_session_was_ended_keeps_its_slot_and_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, action: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Fenced as a dead process's, its slot went to a waiter after
    quarantine_delay (no monitor_dsn) or fence_timeout ("wait") while PostgreSQL
    still counted its backend, or its backend was terminated under it
    ("terminate"); the log called it a dead pid."""
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    fence: dict[str, Any] = {} if action == "none" else {
        "monitor_dsn": pg_dsn(), "fence_action": action, "fence_timeout": 1.0}
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30, **fence)}, frame_timeout=0.3)
    probe = Client(sock_path, name="probe")
    if action == "none":
        # Made well after the coordinator started (process start times are known
        # to a second or so): one that predates it is not all that runs.
        time.sleep(2.5)
    try:
        with live_process(sock_path, app_name) as (live, backend):
            tell(live, "stop")
            session_ended(probe, live.pid)
            # Longer than quarantine_delay and fence_timeout: the slot stays its.
            with pytest.raises(PoolTimeout):
                lease = probe.acquire("pg", timeout=2.0)
                probe.release(lease)
            assert _backend_present(backend), "the live process's backend was terminated"
            os.kill(live.pid, signal.SIGCONT)
            wait_for(lambda: probe.inspect("leases", pid=live.pid)["leases"], 10,
                     "the process to re-register its lease")
            tell(live, "use")
            assert live.stdout is not None and live.stdout.readline().strip() == "used"
            text = capfd.readouterr().err  # while it lived: the log must not call it dead
            live.kill()
            live.wait(10)
        lease = probe.acquire("pg", timeout=10)  # its exit gives the slot back
        probe.release(lease)
    finally:
        probe.close()
    assert f"ended (frame_timeout) while pid {live.pid} still runs" in text, text
    assert f"dead pid {live.pid}" not in text, text


def test_a_live_process_that_exits_before_it_reconnects_gives_its_slot_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Its leases kept for it while it ran, then fenced when it is gone, the
    fence's log lines say how its session ended, not "dead pid"."""
    caplog.set_level(logging.INFO, logger="sharedpool")
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30, monitor_dsn=pg_dsn(),
                                      fence_action="wait", fence_timeout=1.0)}, frame_timeout=0.3)
    probe = Client(sock_path, name="probe")
    try:
        with live_process(sock_path, app_name) as (live, _):
            tell(live, "stop")
            session_ended(probe, live.pid)
            live.kill()  # stopped: it never reconnected
            live.wait(10)
        lease = probe.acquire("pg", timeout=10)
        probe.release(lease)
    finally:
        probe.close()
    text = capfd.readouterr().err
    assert f"dead pid {live.pid}" not in text, text
    assert f"pid {live.pid} (its session ended: frame_timeout; not re-registered)" in text, text


def test_a_process_killed_as_its_session_ends_is_not_taken_for_alive() -> None:
    # A SIGKILLed process's sockets close before it becomes a zombie: at its
    # session's end it read as running (2 in 5 on this machine), and a session
    # the coordinator ended just then kept its slots counted for a second more.
    import socket

    from sharedpool.peers import holder_alive

    taken_for_alive = 0
    for _ in range(100):
        ours, theirs = socket.socketpair()
        with ours:
            with theirs:
                proc = subprocess.Popen(["sleep", "60"], pass_fds=[theirs.fileno()])
            try:
                ours.settimeout(10)
                os.kill(proc.pid, signal.SIGKILL)
                assert ours.recv(1) == b""  # its end closed: it is on its way out
                taken_for_alive += holder_alive(proc.pid, time.time())
            finally:
                proc.kill()
                proc.wait(10)
    assert taken_for_alive == 0


_DROPS = _HOLDING + """
    # Its session cut under it, and stopped before it reconnects: past the
    # coordinator's restart_grace its lease is fenced (not terminated: it may
    # be a late live process's); on SIGCONT it re-registers the lease its
    # connection still has.
    client = Client.for_path(sock)
    with client._send_lock:  # its reconnect (the hello goes out under it) waits for the stop
        client._sock.shutdown(socket.SHUT_RDWR)
        os.kill(os.getpid(), signal.SIGSTOP)
    sys.stdin.readline()
"""


def test_a_fence_whose_leases_were_taken_back_does_not_say_it_freed_them(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """A fence that never saw its backend go logged, at fence_timeout, "1 slot(s)
    of pg free again" although the process had re-registered the lease meanwhile
    (its slot never freed)."""
    caplog.set_level(logging.INFO, logger="sharedpool")
    start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30, monitor_dsn=pg_dsn(),
                                      fence_action="wait", fence_timeout=1.0)}, restart_grace=0.2)
    probe = Client(sock_path, name="probe")
    try:
        with live_process(sock_path, app_name, _DROPS) as (proc, _):
            tell(proc, "drop")
            wait_for(lambda: "not confirmed gone" in capfd.readouterr().err or None, 10,
                     "the fence to wait for the backend it never sees go")
            os.kill(proc.pid, signal.SIGCONT)
            wait_for(lambda: probe.inspect("leases", pid=proc.pid)["leases"], 10,
                     "the process to re-register its lease")
            time.sleep(1.5)  # past fence_timeout (1 s) and the fence's last log line
            text = capfd.readouterr().err
            with pytest.raises(PoolTimeout):  # still its: not free again
                probe.release(probe.acquire("pg", timeout=0.5))
    finally:
        probe.close()
    assert "free again" not in text, text


_FLOODS = _HOLDING + """
    # The coordinator is stopped (SIGSTOP, by the test): what this process sends
    # piles up until its client drops the session (outbox.MAX_BYTES) and
    # reconnects; each hello it sends then goes unanswered past connect_timeout
    # and is given up, to be read (hello, then end of file) once the coordinator
    # runs again, as the last attempt's is, which is answered.
    from sharedpool import protocol as p
    client = Client.for_path(sock)
    client.connect_timeout = 0.3
    report = p.Report(ok=["pg"] * 100)
    for _ in range(200_000):
        if client.session_id is None:
            break
        client._send_quiet(report)
    print("dropped" if client.session_id is None else "not dropped", flush=True)
""" + _THEN_USES


@pytest.mark.parametrize("action", ["none", "terminate"])
def test_a_process_that_dropped_its_session_to_reconnect_keeps_its_slot_and_backend(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str, action: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """A coordinator that did not run for seconds: the process dropped its session
    and the hellos it gave up on were read only afterwards, each followed by its
    end of file. Each end was taken for a dead process's: the leases its hello
    had just re-registered were fenced, its backend terminated under it
    ("terminate"), or its slot free to others after quarantine_delay while its
    connection stayed open (I1)."""
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    fence: dict[str, Any] = {} if action == "none" else {
        "monitor_dsn": pg_dsn(), "fence_action": action, "fence_timeout": 1.0}
    coord = start_coordinator({"pg": Resource(max_size=1, acquire_timeout=30, **fence)})
    assert coord.pid is not None
    probe = Client(sock_path, name="probe")
    probe.inspect("server")  # its session up before the stop
    stopped = False
    try:
        with live_process(sock_path, app_name, _FLOODS) as (live, backend):
            os.kill(coord.pid, signal.SIGSTOP)
            stopped = True
            tell(live, "flood")
            assert live.stdout is not None
            assert live.stdout.readline().strip() == "dropped"
            time.sleep(1.0)  # hellos given up on at connect_timeout (0.3 s)
            os.kill(coord.pid, signal.SIGCONT)
            stopped = False
            wait_for(lambda: probe.inspect("leases", pid=live.pid)["leases"], 10,
                     "the process to re-register its lease")
            # Past restart_grace (1.5 s) and quarantine_delay / fence_timeout: still its.
            with pytest.raises(PoolTimeout):
                probe.release(probe.acquire("pg", timeout=3.0))
            assert _backend_present(backend), "the live process's backend was terminated"
            tell(live, "use")
            assert live.stdout.readline().split() == ["used"]
            tell(live, "exit")
            live.wait(10)
            # Gone, its slot comes back.
            probe.release(probe.acquire("pg", timeout=10))
    finally:
        if stopped:
            os.kill(coord.pid, signal.SIGCONT)
        probe.close()
    text = capfd.readouterr().err
    assert "closed by its process without a goodbye" in text, text


_EXITS = """
import gc, sys, time
from sharedpool import Client
client = Client(sys.argv[1])
lease = client.acquire("r", timeout=10)
# Dropped unclosed, as Python's finalizers drop it at exit: its socket closed
# outright while the process still runs (not yet exiting to the kernel).
del client, lease
gc.collect()
time.sleep(0.1)  # the coordinator reads that end before the exit
"""


def test_a_process_that_exits_after_dropping_its_session_gets_its_slot_back_promptly(
        start_coordinator: Any, sock_path: str) -> None:
    """A session closed outright by a process that runs is kept for it to
    reconnect; one closed so at exit (a client still open when the interpreter
    shuts down) is the same to the coordinator. Looked at again only after
    ALIVE_RECHECK (1 s), the slot of every such exit came back that late (I2)."""
    start_coordinator({"r": Resource(max_size=1, quarantine_delay=0.01, acquire_timeout=30)})
    probe = Client(sock_path, name="probe")
    try:
        subprocess.run([sys.executable, "-W", "ignore::ResourceWarning", "-c", _EXITS, sock_path],
                       timeout=30, check=True)
        started = time.monotonic()
        probe.release(probe.acquire("r", timeout=10))
        took = time.monotonic() - started
    finally:
        probe.close()
    # The old code: ALIVE_RECHECK after the drop, ~0.9 s after the exit.
    assert took < 0.6, f"the exited process's slot came back only after {took:.2f}s"


_TWO_CLIENTS = _HOLDING + """
    # A Client made by hand beside the pool's shared one, holding a lease too.
    mine = Client(sock, name="made by hand")
    lease = mine.acquire("pg", timeout=30)
    print("both", flush=True)
    sys.stdin.readline()
    # Half a frame on each session, then stopped: the coordinator ends both.
    for client in (Client.for_path(sock), mine):
        client._sock.sendall(b"\\x00\\x00\\x00\\x10")
    os.kill(os.getpid(), signal.SIGSTOP)
""" + _THEN_USES


def test_two_clients_of_one_process_each_take_their_own_leases_back(
        pg: str, start_coordinator: Any, sock_path: str, app_name: str,
        caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    """Both sessions of a process ended while it ran; the first client to say
    hello again brought only its own lease, and the other one's was taken as
    closed: fenced, its slot was handed on once the fence ended even if that
    client still had its connection. Now each client takes its own back."""
    caplog.set_level(logging.INFO, logger="sharedpool")  # the coordinator logs at this level
    start_coordinator({"pg": Resource(max_size=2, acquire_timeout=30)}, frame_timeout=0.3)
    probe = Client(sock_path, name="probe")
    try:
        with live_process(sock_path, app_name, _TWO_CLIENTS) as (live, _):
            tell(live, "go")
            assert live.stdout is not None and live.stdout.readline().strip() == "both"
            tell(live, "stop")
            session_ended(probe, live.pid)
            os.kill(live.pid, signal.SIGCONT)
            wait_for(lambda: len(probe.inspect("leases", pid=live.pid)["leases"]) == 2, 10,
                     "both clients to re-register their leases")
            tell(live, "use")
            assert live.stdout.readline().strip() == "used"
            text = capfd.readouterr().err
    finally:
        probe.close()
    assert f"ended (frame_timeout) while pid {live.pid} still runs" in text, text
    assert "fence:" not in text, text
