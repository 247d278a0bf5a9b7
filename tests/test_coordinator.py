"""A real coordinator process and real client sessions (no PostgreSQL needed)."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import multiprocessing
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import psutil
import pytest
from proc_helpers import read_until_closed
from servers import wait_for

from sharedpool import (
    Client,
    ConfigError,
    Coordinator,
    CoordinatorRunning,
    CoordinatorUnavailable,
    PoolTimeout,
    Resource,
    SharedPoolError,
    UnknownResource,
    background,
)
from sharedpool import protocol as p
from sharedpool.program import coordinator_listening


def leased(client: Client, resource: str = "r") -> int:
    for row in client.inspect("resources")["resources"]:
        if row["name"] == resource:
            return int(row["leased"])
    raise AssertionError(f"no resource {resource}")


@contextmanager
def holder(sock_path: str, resource: str, count: int, query: str = "") -> Iterator[subprocess.Popen[str]]:
    """A separate process holding ``count`` leases until killed."""
    code = textwrap.dedent(f"""
        import sys, time
        from sharedpool import Client
        c = Client({sock_path!r})
        leases = [c.acquire({resource!r}, timeout=10) for _ in range({count})]
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_grant_release_and_inspect(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 2})
    c = Client(sock_path)
    try:
        a = c.acquire("r", timeout=2)
        b = c.acquire("r", timeout=2)
        assert a.id != b.id and b.token > a.token
        assert leased(c) == 2
        assert "token=" in repr(a) and "session=" in repr(c)
        c.release(a)
        c.release(b)
        wait_for(lambda: leased(c) == 0, what="release to land")
    finally:
        c.close()


def test_cap_timeout_and_zero_timeout(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        c.acquire("r", timeout=2)
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout):
            c.acquire("r", timeout=0)
        assert time.monotonic() - t0 < 0.5
        t0 = time.monotonic()
        with pytest.raises(PoolTimeout) as info:
            c.acquire("r", timeout=0.3)
        assert 0.25 < time.monotonic() - t0 < 3
        assert "all 1 leases" in str(info.value)
    finally:
        c.close()


def test_a_retime_of_an_acquire_given_up_on_is_not_sent_to_a_later_session(
        start_coordinator: Any, sock_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    """An acquire whose wait() gave up while the coordinator was away is not
    re-sent to the next one: a retime of it (False) must not go there either.
    Before: retime() returned True and sent it, and the new coordinator, which
    never saw that request, ended the process's session (every pool's)."""
    first = start_coordinator({"r": 1})
    holder, c = Client(sock_path), Client(sock_path)
    try:
        lease = holder.acquire("r", timeout=2)
        ticket = c.request("r", timeout=0.2)
        first.stop()
        with pytest.raises(CoordinatorUnavailable):
            ticket.wait()  # its guard ran out with no session: given up, forgotten
        start_coordinator({"r": 1})
        wait_for(c.ensure_connected, 10, "a session with the new coordinator")  # past its backoff
        session = c.session_id
        capfd.readouterr()
        assert ticket.retime(5.0) is False
        # Had it gone out, the coordinator would end the session: a round trip shows it did not.
        assert c.inspect("sessions")["sessions"]
        assert c.session_id == session
        assert "never sent" not in capfd.readouterr().err
        holder.release(lease)
    finally:
        c.close()
        holder.close()


def test_a_retimed_acquire_waits_to_its_new_deadline_at_both_ends(
        start_coordinator: Any, sock_path: str) -> None:
    """AcquireRequest.retime: the coordinator moves the queued request's deadline,
    and the client's own guard against a lost reply (the old timeout + GRACE)
    moves with it, so a grant after the old deadline still arrives. A retime
    of one already answered says so (False). Before: no retime at all."""
    start_coordinator({"r": 1})
    holder, c = Client(sock_path), Client(sock_path)
    try:
        lease = holder.acquire("r", timeout=2)
        ticket = c.request("r", timeout=0.3)
        assert ticket.retime(10.0)
        letting_go = threading.Timer(1.2, holder.release, args=(lease,))  # past 0.3 s + GRACE
        letting_go.start()
        t0 = time.monotonic()
        got = ticket.wait()
        assert time.monotonic() - t0 > 1.0
        letting_go.join()
        assert not ticket.retime(10.0)  # answered
        assert c.inspect("resources")["resources"][0]["timeouts"] == 0
        c.release(got)
        with pytest.raises(ValueError, match="timeout must be a number >= 0"):
            ticket.retime(math.nan)
    finally:
        c.close()
        holder.close()


def test_unknown_resource_is_a_clear_error(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        with pytest.raises(UnknownResource, match="no resource 'nope'") as info:
            c.acquire("nope", timeout=1)
        assert isinstance(info.value, LookupError)
        assert c.acquire("r", timeout=1)  # the session goes on
    finally:
        c.close()


def test_a_leases_listing_refuses_a_pid_that_is_not_one(start_coordinator: Any, sock_path: str) -> None:
    # Before: [] ("none held") for pid="5" or 1.5, where a bad resource is an error.
    start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        lease = c.acquire("r", timeout=1)
        for bad in ("5", 1.5, [1], True):
            with pytest.raises(SharedPoolError, match="is not a process id"):
                c.inspect("leases", pid=bad)
        assert [row["id"] for row in c.inspect("leases", pid=os.getpid())["leases"]] == [lease.id]
    finally:
        c.close()


def test_an_inspect_refuses_a_filter_it_does_not_take(start_coordinator: Any, sock_path: str) -> None:
    # Before: a misspelt filter (resourse=) listed every lease, as if it matched.
    start_coordinator({"r": 1, "s": 1})
    c = Client(sock_path)
    try:
        c.acquire("r", timeout=1)
        c.acquire("s", timeout=1)
        with pytest.raises(SharedPoolError, match="filter 'leases' by 'resourse'; filters: pid, resource"):
            c.inspect("leases", resourse="r")
        with pytest.raises(SharedPoolError, match="cannot filter 'sessions' by 'pid'; filters: none"):
            c.inspect("sessions", pid=os.getpid())
        assert [row["resource"] for row in c.inspect("leases", resource="r")["leases"]] == ["r"]
        assert len(c.inspect("resources", names=["s"])["resources"]) == 1  # the session goes on
    finally:
        c.close()


def test_an_admin_verb_given_a_resource_that_is_not_a_name_says_so(start_coordinator: Any,
                                                                  sock_path: str) -> None:
    # Before: "pause: unhashable type: 'list'" (a hand-made frame; the CLI sends names).
    start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        for bad in (["r"], {"r": 1}, 5, None):
            with pytest.raises(SharedPoolError, match=r"pause: no resource .* \(known: r\)"):
                c.admin("pause", resource=bad)
        assert c.admin("pause", resource="r") == {"resource": "r", "paused": True}
    finally:
        c.close()


def test_waiters_served_first_come_first_served(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    owner = Client(sock_path)
    lease = owner.acquire("r", timeout=2)
    order: list[int] = []
    clients = [Client(sock_path) for _ in range(4)]

    def wait(i: int) -> None:
        got = clients[i].acquire("r", timeout=10)
        order.append(i)
        clients[i].release(got)

    threads = []
    try:
        for i in range(4):
            threads.append(threading.Thread(target=wait, args=(i,)))
            threads[-1].start()
            wait_for(lambda i=i: owner.inspect("resources")["resources"][0]["waiting"] == i + 1)
        owner.release(lease)
        for t in threads:
            t.join(10)
        assert order == [0, 1, 2, 3]
    finally:
        for c in [owner, *clients]:
            c.close()


def test_clean_close_returns_leases(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=2, quarantine_delay=0)})
    a, b = Client(sock_path), Client(sock_path)
    try:
        a.acquire("r", timeout=1)
        a.acquire("r", timeout=1)
        assert leased(b) == 2
        a.close()
        wait_for(lambda: leased(b) == 0, what="leases of a closed session to return")
        assert b.acquire("r", timeout=1)
    finally:
        b.close()


def test_sigkilled_worker_slots_go_to_a_waiter(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": Resource(max_size=2, quarantine_delay=0.05)})
    c = Client(sock_path)
    try:
        with holder(sock_path, "r", 2) as proc:
            assert leased(c) == 2
            result: list[Any] = []
            t = threading.Thread(target=lambda: result.append(c.acquire("r", timeout=10)))
            t.start()
            wait_for(lambda: c.inspect("resources")["resources"][0]["waiting"] == 1)
            t0 = time.monotonic()
            os.kill(proc.pid, signal.SIGKILL)
            t.join(10)
            elapsed = time.monotonic() - t0
        assert result, "the waiter never got the dead worker's slot"
        assert elapsed < 2.0  # generous: the quarantine is 50 ms
        sessions = c.inspect("sessions")["sessions"]
        assert [s["pid"] for s in sessions] == [os.getpid()]
    finally:
        c.close()


def test_fenced_slots_count_against_the_cap(start_coordinator: Any, sock_path: str) -> None:
    # A quarantine long enough that the acquire below still meets the fence
    # when this process is descheduled a while after seeing it (1 s was not).
    start_coordinator({"r": Resource(max_size=1, quarantine_delay=4.0)})
    c = Client(sock_path)
    try:
        with holder(sock_path, "r", 1) as proc:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        wait_for(lambda: c.inspect("resources")["resources"][0]["fenced"] == 1)
        with pytest.raises(PoolTimeout):  # still fenced: the cap holds
            c.acquire("r", timeout=0)
        assert c.acquire("r", timeout=10)  # after the delay the slot is free
    finally:
        c.close()


def _raw_session(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(path)
    return s


def _read_frames(s: socket.socket) -> list[dict[str, Any]]:
    data = read_until_closed(s)
    frames = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        frames.append(msgpack.unpackb(data[4 : 4 + n]))
        data = data[4 + n :]
    return frames


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x00\x00\x05garbage",  # not msgpack
        struct.pack(">I", 1 << 30),  # oversized frame header
        p.encode(p.Acquire(1, "r", 1.0)),  # an op before hello
        struct.pack(">I", 3) + msgpack.packb([1, 2]),  # not a map
    ],
    ids=["garbage", "oversized", "before-hello", "not-a-map"],
)
def test_bad_frames_end_only_that_session(start_coordinator: Any, sock_path: str, payload: bytes) -> None:
    start_coordinator({"r": 2})
    good = Client(sock_path)
    try:
        lease = good.acquire("r", timeout=2)
        bad = _raw_session(sock_path)
        bad.sendall(payload)
        frames = _read_frames(bad)  # the coordinator answers with an error, then closes
        bad.close()
        assert frames and frames[-1]["op"] == "error" and frames[-1]["fatal"] is True
        assert frames[-1]["code"] == "protocol_error"
        good.release(lease)
        assert good.acquire("r", timeout=2)  # nobody else noticed
        assert len(good.inspect("sessions")["sessions"]) == 1
    finally:
        good.close()


def test_unknown_op_after_hello_is_an_error_reply(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    s = _raw_session(sock_path)
    try:
        s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "raw")))
        body = msgpack.packb({"op": "frobnicate", "req": 1})
        s.sendall(struct.pack(">I", len(body)) + body)
        frames = _read_frames(s)
        assert frames[0]["op"] == "welcome"
        assert frames[-1]["op"] == "error" and "unknown op" in frames[-1]["message"]
    finally:
        s.close()


def test_socket_is_private_and_live_socket_is_not_stolen(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    with pytest.raises(CoordinatorRunning, match="already serving"):
        Coordinator(sock_path, {"r": 1}).start()
    c = Client(sock_path)  # the first one is unharmed
    try:
        assert c.acquire("r", timeout=1)
    finally:
        c.close()


def test_stale_socket_is_replaced(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 1})
    first.kill()  # SIGKILL: the socket file stays behind
    assert os.path.exists(sock_path)
    start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        assert c.acquire("r", timeout=2)
    finally:
        c.close()


def test_directory_writable_by_others_is_refused(tmp_path: Any) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by others"):
        Coordinator(str(shared / "sp.sock"), {"r": 1}).start()


def test_no_coordinator_is_a_connection_error(sock_path: str) -> None:
    c = Client(sock_path)
    try:
        with pytest.raises(CoordinatorUnavailable) as info:
            c.acquire("r", timeout=0.2)
        assert isinstance(info.value, ConnectionError)
    finally:
        c.close()


def test_restart_reregisters_held_leases(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 2})
    c = Client(sock_path)
    try:
        lease = c.acquire("r", timeout=2)
        first.kill()
        start_coordinator({"r": 2})
        # The client notices, reconnects and re-registers the lease it holds.
        wait_for(lambda: c.connected and leased(c) == 1, timeout=10, what="re-registration")
        rows = c.inspect("leases")["leases"]
        assert [r["id"] for r in rows] == [lease.id]
        second = c.acquire("r", timeout=2)
        assert second.token > lease.token  # tokens keep growing across the restart
        with pytest.raises(PoolTimeout):
            c.acquire("r", timeout=0)  # I1 across the restart
    finally:
        c.close()


def test_acquire_waits_for_a_restarting_coordinator(start_coordinator: Any, sock_path: str) -> None:
    first = start_coordinator({"r": 1})
    c = Client(sock_path)
    try:
        c.release(c.acquire("r", timeout=2))
        first.kill()
        threading.Timer(0.5, lambda: start_coordinator({"r": 1})).start()
        t0 = time.monotonic()
        assert c.acquire("r", timeout=10)
        assert time.monotonic() - t0 >= 0.4
    finally:
        c.close()


def test_sigterm_stops_and_removes_socket(start_coordinator: Any, sock_path: str) -> None:
    coord = start_coordinator({"r": 1})
    pid = coord.pid
    assert pid is not None
    coord.stop()
    assert not os.path.exists(sock_path)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_background_thread_sleeps_while_idle_and_runs_timers(
        start_coordinator: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A busy worker must not pay for idle ticks: the client's thread wakes for
    # data, timers and reports, not every few milliseconds.
    start_coordinator({"r": 2})
    c = Client(sock_path)
    try:
        lease = c.acquire("r", timeout=5)
        ticks = 0
        real_tick = background.tick

        def counting_tick(client: Client) -> None:
            nonlocal ticks
            if client is c:
                ticks += 1
            real_tick(client)

        monkeypatch.setattr(background, "tick", counting_tick)
        time.sleep(0.6)
        assert ticks <= 3, f"{ticks} background wake-ups in 0.6 s with nothing to do"
        fired: list[float] = []
        t0 = time.monotonic()
        for delay in (0.15, 0.05, 0.1):  # out of order: the earliest runs first
            c.call_later(delay, lambda d=delay: fired.append(d))
        wait_for(lambda: len(fired) == 3, 5.0, "timers")
        assert fired == [0.05, 0.1, 0.15]
        assert time.monotonic() - t0 >= 0.15
        c.release(lease)
    finally:
        c.close()


def test_unasked_reclaim_is_seen_at_once_by_an_idle_client(start_coordinator: Any, sock_path: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # Nobody reads the socket in the idle holder: its background thread must
    # wake on the coordinator's Reclaim (poll on the socket, not a timer).
    # The idle timer pushed out of reach (1 s by default): a bound generous
    # enough for a loaded machine still fails a thread that waits for it.
    monkeypatch.setattr(background, "IDLE_WAKE", 60.0)
    start_coordinator({"r": 1})
    holder_client, waiter = Client(sock_path), Client(sock_path)
    try:
        lease = holder_client.acquire("r", timeout=5)
        asked = threading.Event()
        holder_client.on_reclaim("r", asked.set)
        t0 = time.monotonic()
        ticket = waiter.request("r", timeout=5)
        assert asked.wait(10.0), "reclaim never reached the idle holder"
        noticed = time.monotonic() - t0
        holder_client.release(lease)
        ticket.wait()
        assert noticed < 5.0, f"reclaim noticed after {noticed:.3f}s"
    finally:
        holder_client.close()
        waiter.close()


def test_start_failure_keeps_the_os_error(tmp_path: Any) -> None:
    # The child's OSError comes back as one: errno kept, still a SharedPoolError.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError) as err:
        Coordinator(str(tmp_path / "a-file" / "sp.sock"), {"r": 1}).start()
    assert isinstance(err.value, SharedPoolError)
    assert err.value.errno is not None and "a-file" in str(err.value)


_OWNER = """
import sys, time
from sharedpool import Coordinator
coordinator = Coordinator(sys.argv[1], {"r": 1}).start()
print(coordinator.pid, flush=True)
time.sleep(120)
"""


def test_coordinator_stops_when_its_owner_is_killed(sock_path: str) -> None:
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, sock_path], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        c = Client(sock_path)
        assert c.acquire("r", timeout=5)
        c.close()
        owner.kill()  # SIGKILL: no exit handler runs; the lifeline pipe closes
        owner.wait(10)
        wait_for(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == "zombie",
                 timeout=10, what="the coordinator to follow its owner")
        assert not os.path.exists(sock_path)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


_OWNER_OF = """
import sys, time
from sharedpool.program import EmbeddedCoordinator, private_socket_path
path = private_socket_path("test") if sys.argv[1] == "private" else sys.argv[2]
coordinator = EmbeddedCoordinator(path, {"r": 1}).start()
print(coordinator.pid, path, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("path", ["private", "given"])
def test_an_owner_killed_leaves_a_restart_marker_only_where_a_coordinator_may_start_again(
        tmp_path: Any, path: str) -> None:
    """A SIGKILLed celery or gunicorn master: its coordinator stops on its
    lifeline, handing on the leases still out in a restart marker. On a
    private path (made for that master, never used again) the marker stayed
    in the runtime directory for good; on a path given, the next coordinator
    started there reads it (I4)."""
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    given = str(tmp_path / "given.sock")
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_OF, path, given], stdout=subprocess.PIPE,
                             text=True, env=env)
    c = None
    try:
        assert owner.stdout is not None
        pid, sock = owner.stdout.readline().split()
        assert sock.startswith(str(tmp_path)) and (sock == given) == (path == "given")
        c = Client(sock)
        assert c.acquire("r", timeout=5)  # held: the stop hands it on
        owner.kill()
        owner.wait(10)
        wait_for(lambda: not psutil.pid_exists(int(pid)) or psutil.Process(int(pid)).status() == "zombie",
                 timeout=10, what="the coordinator to follow its owner")
        assert not os.path.exists(sock)
        assert os.path.exists(sock + ".restart") == (path == "given")
    finally:
        if c is not None:
            c.close(timeout=0)
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)


_OWNER_INTERRUPTED = """
import sys
from sharedpool import Coordinator
try:
    Coordinator(sys.argv[1], {"r": 1}).start()
except KeyboardInterrupt:
    print("interrupted")
"""


def test_a_start_interrupted_in_its_owner_leaves_no_socket(tmp_path: Any) -> None:
    """Ctrl-C in the owner while start() waits: the program was SIGKILLed, its
    socket (bound already) left behind; the next start took it for a crash."""
    interrupted = 0
    for i in range(12):  # until three were cut short in start(), not after it
        if interrupted == 3:
            break
        path = str(tmp_path / f"c{i}.sock")
        owner = subprocess.Popen([sys.executable, "-c", _OWNER_INTERRUPTED, path],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            # Polled often: the start returns a few milliseconds after the bind.
            wait_for(lambda: os.path.exists(path) or owner.poll() is not None, 15, "the bind",  # noqa: B023
                     every=0.001)
            # It may have ended meanwhile, and been reaped by poll() above: its
            # pid is free then (send_signal leaves it alone; os.kill did not).
            owner.send_signal(signal.SIGINT)
            out, _ = owner.communicate(timeout=20)
            interrupted += out == b"interrupted\n"
            assert not os.path.exists(path)
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.communicate(timeout=10)
    assert interrupted, "no SIGINT landed in start()"


_OWNER_DROPS_ITS_HANDLE = """
import gc, sys
from sharedpool import Coordinator
print(Coordinator(sys.argv[1], {"r": 1}).start().pid, flush=True)
gc.collect()
"""


def test_a_started_coordinator_whose_handle_was_dropped_stops_at_exit(tmp_path: Any) -> None:
    """``Coordinator(...).start()`` with no reference kept: the exit forgot it (a
    weak reference); it stopped only once its lifeline ended with the owner,
    warning that its owner was gone, its socket still there when the owner
    had exited."""
    path = str(tmp_path / "c.sock")
    err = tmp_path / "err"
    with open(err, "wb") as errf:
        owner = subprocess.Popen([sys.executable, "-c", _OWNER_DROPS_ITS_HANDLE, path],
                                 stdout=subprocess.PIPE, stderr=errf)
    child = psutil.Process(int(owner.stdout.readline()))  # type: ignore[union-attr]
    try:
        assert owner.wait(20) == 0
        assert not os.path.exists(path)
        assert not child.is_running()  # waited for, by the owner
        assert "gone; stopping" not in err.read_text()
    finally:
        owner.stdout.close()  # type: ignore[union-attr]
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


_OWNER_AT_EXIT = """
import sys
from sharedpool import Coordinator
coordinator = Coordinator(sys.argv[1], {"r": 1}).start()
print(coordinator.pid, flush=True)
sys.stdin.readline()
"""


def _pending(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("ShdPnd:")).split()[1], 16)


@contextmanager
def _exit_waiting(path: str) -> Iterator[tuple[subprocess.Popen[bytes], psutil.Process]]:
    """An owner at its exit, waiting for its coordinator: stopped (SIGSTOP) and
    sent the exit's SIGTERM, which it takes once let go (``child.resume()``)."""
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_AT_EXIT, path], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child = psutil.Process(int(owner.stdout.readline()))  # type: ignore[union-attr]
    try:
        child.suspend()
        # Stopped before the owner's SIGTERM is sent (both pending, SIGTERM was taken first).
        wait_for(lambda: child.status() == psutil.STATUS_STOPPED, 15, "the SIGSTOP")
        owner.stdin.close()  # type: ignore[union-attr]  # the program ends
        wait_for(lambda: _pending(child.pid) & (1 << (signal.SIGTERM - 1)), 15, "the stop")
        yield owner, child
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.resume()
            child.kill()
        for f in (owner.stdin, owner.stdout, owner.stderr):
            f.close()  # type: ignore[union-attr]


def _stopped_cleanly(owner: subprocess.Popen[bytes], child: psutil.Process, path: str) -> str:
    """Let the coordinator go; check the owner waited for it; its stderr."""
    assert owner.poll() is None, "the owner left before its coordinator"
    child.resume()
    assert owner.wait(20) == 0
    assert not os.path.exists(path)
    child.wait(15)  # the last writer of the pipe
    return owner.stderr.read().decode()  # type: ignore[union-attr]


def test_a_ctrl_c_while_the_exit_waits_for_the_coordinator_leaves_no_socket(tmp_path: Any) -> None:
    """The exit's wait for the coordinator it stopped, cut short by a
    KeyboardInterrupt (printed from sharedpool's exit hook): the owner was
    gone before its coordinator, whose socket stayed behind a while."""
    path = str(tmp_path / "c.sock")
    with _exit_waiting(path) as (owner, child):
        os.kill(owner.pid, signal.SIGINT)
        time.sleep(0.3)
        err = _stopped_cleanly(owner, child, path)
        assert "KeyboardInterrupt" not in err, err


def test_a_burst_of_ctrl_c_while_the_exit_waits_cuts_nothing_short(tmp_path: Any) -> None:
    """A KeyboardInterrupt caught around the exit's wait still landed elsewhere
    under a burst of SIGINTs (measured: 4 owners of 8): out of the exit handler,
    the owner gone before its coordinator; or inside Popen.wait, whose lock it
    left held: the exit waited out 5 s, SIGKILLed the coordinator (which had
    stopped) and waited 5 s more, printing a TimeoutExpired."""
    for i in range(6):  # each owner had about an even chance
        path = str(tmp_path / f"c{i}.sock")
        with _exit_waiting(path) as (owner, child):
            end = time.monotonic() + 0.5
            while time.monotonic() < end:  # as fast as they go: bounded, half a second
                os.kill(owner.pid, signal.SIGINT)
            err = _stopped_cleanly(owner, child, path)
            assert "Traceback" not in err and "ignored SIGTERM" not in err, err


_OWNER_OF_TWO = """
import sys
import sharedpool.program
from sharedpool import Coordinator
sharedpool.program.EXIT_WAIT = 60.0  # the test's polls and resumes fit well inside it, loaded or not
first = Coordinator(sys.argv[1], {"r": 1}).start()
second = Coordinator(sys.argv[2], {"r": 1}).start()
print(first.pid, second.pid, flush=True)
sys.stdin.readline()
"""


def test_the_exit_stops_its_coordinators_side_by_side(tmp_path: Any) -> None:
    """One after another, each waited for up to EXIT_WAIT (5 s): a stuck first
    one held the second's SIGTERM back by its whole wait (and a SIGKILL's). The
    owner's EXIT_WAIT is 60 s here: with 5 s, a test stalled ~4 s on a loaded
    machine failed (both SIGKILLed before it saw or resumed them)."""
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    owner = subprocess.Popen([sys.executable, "-c", _OWNER_OF_TWO, *paths], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children = [psutil.Process(int(pid)) for pid in owner.stdout.readline().split()]  # type: ignore[union-attr]
    try:
        for child in children:
            child.suspend()
        wait_for(lambda: all(c.status() == psutil.STATUS_STOPPED for c in children), 15, "the SIGSTOPs")
        owner.stdin.close()  # type: ignore[union-attr]  # the program ends
        # Well inside the exit's 60 s: both told to stop while both are stuck
        # (one after another, the second's stop came after the first's 60 s).
        wait_for(lambda: all(_pending(c.pid) & (1 << (signal.SIGTERM - 1)) for c in children), 30,
                 "both stops")
        assert owner.poll() is None
        for child in children:
            child.resume()
        assert owner.wait(20) == 0
        assert not any(os.path.exists(path) for path in paths)
        assert "ignored SIGTERM" not in owner.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.resume()
                child.kill()
        for f in (owner.stdin, owner.stdout, owner.stderr):
            f.close()  # type: ignore[union-attr]


def _coordinators_on(path: str) -> list[psutil.Process]:
    """Our coordinator programs serving ``path`` (its argv names it), whoever started them."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "sharedpool-coordinator" in cmdline and path in cmdline:
            found.append(proc)
    return found


_OWNER_EXITS_AS_IT_RESTARTS = """
import os, signal, sys, threading
from sharedpool.program import EmbeddedCoordinator
coordinator = EmbeddedCoordinator(sys.argv[1], {"r": 1}).start()
spawning = threading.Event()
spawn = coordinator._spawn
def restart():
    spawning.set()
    return spawn()
coordinator._spawn = restart
os.kill(coordinator.pid, signal.SIGKILL)
assert spawning.wait(30)
"""


def test_the_exit_waits_for_a_restart_it_caught_starting(tmp_path: Any) -> None:
    """The exit returned while its watcher started the crashed coordinator again:
    the new one outlived its owner (stopping on its lifeline, warning), or,
    cut short sooner, the dead one's socket file stayed behind."""
    path = str(tmp_path / "c.sock")
    owner = subprocess.run([sys.executable, "-c", _OWNER_EXITS_AS_IT_RESTARTS, path],
                           capture_output=True, text=True, timeout=60)
    left = _coordinators_on(path)
    try:
        assert owner.returncode == 0, owner.stderr
        assert not left
        assert not os.path.exists(path)
        assert "gone; stopping" not in owner.stderr
    finally:
        for proc in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def test_a_stop_while_a_restart_is_starting_waits_for_it(tmp_path: Any) -> None:
    """stop() returned while its watcher started the crashed coordinator again:
    that one then held the socket, and a start() right after was refused."""
    from sharedpool.program import EmbeddedCoordinator

    path = str(tmp_path / "c.sock")
    coordinator = EmbeddedCoordinator(path, {"r": 1}).start()
    spawning = threading.Event()
    spawn = coordinator._spawn

    def restart() -> Any:
        spawning.set()
        return spawn()

    coordinator._spawn = restart  # type: ignore[method-assign]
    try:
        os.kill(coordinator.pid, signal.SIGKILL)  # type: ignore[arg-type]
        assert spawning.wait(30)
        coordinator.stop()
        assert not _coordinators_on(path)
        assert not os.path.exists(path)
        again = Coordinator(path, {"r": 1}).start()
        again.stop()
    finally:
        coordinator.stop()
        for proc in _coordinators_on(path):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def test_a_stop_as_start_starts_its_watcher_stops_it(tmp_path: Any, monkeypatch: Any) -> None:
    """A stop signal whose handler calls stop() (or another thread's stop())
    landing while start() had made its restart watcher but not yet started it:
    stop()'s wait for that watcher raised "cannot join thread before it is
    started" (RuntimeError), out of the handler."""
    from sharedpool.program import EmbeddedCoordinator

    path = str(tmp_path / "c.sock")
    coordinator = EmbeddedCoordinator(path, {"r": 1})
    failed: list[BaseException] = []

    def on_signal(signum: int, frame: Any) -> None:
        try:
            coordinator.stop()
        except BaseException as exc:  # noqa: BLE001 - what the test looks at
            failed.append(exc)

    start = threading.Thread.start

    def starting(self: threading.Thread) -> None:
        if self.name == "sharedpool-coordinator-watch":
            signal.raise_signal(signal.SIGUSR1)  # its handler runs here, before the watcher does
        start(self)

    previous = signal.signal(signal.SIGUSR1, on_signal)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(threading.Thread, "start", starting)
            coordinator.start()
        assert not failed, failed
        assert coordinator.pid is None and not os.path.exists(path)
        watcher = coordinator._watcher
        assert watcher is not None
        watcher.join(15)  # it saw the stop: no restart
        assert not watcher.is_alive() and not _coordinators_on(path)
    finally:
        signal.signal(signal.SIGUSR1, previous)
        coordinator.stop()
        for proc in _coordinators_on(path):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


def test_an_owner_gone_while_its_coordinator_starts_stops_it_cleanly(tmp_path: Any) -> None:
    """Its status pipe has no reader left: the write failed (BrokenPipeError),
    the start with it, a traceback and exit 1 instead of the lifeline's clean stop."""
    import dataclasses
    import json

    from sharedpool.config import CoordinatorConfig
    from sharedpool.marker import marker_path, read_marker, write_marker
    from sharedpool.program import _CHILD_CODE, _child_env

    path = str(tmp_path / "c.sock")
    fenced = [["r", 7, 7, 2**22 + 12345, 30.0, None]]
    write_marker(marker_path(path), {"fenced": fenced})  # a restart: what it hands on matters
    config = CoordinatorConfig(socket_path=path, resources={"r": 1})
    ready_r, ready_w = os.pipe()
    life_r, life_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-P", "-c", _CHILD_CODE, str(ready_w), "x", path],
                            stdin=life_r, pass_fds=(ready_w,), start_new_session=True,
                            env=_child_env(), stderr=subprocess.PIPE)
    os.close(ready_w)
    os.close(life_r)
    try:
        os.write(life_w, json.dumps({**dataclasses.asdict(config), "log_level": "WARNING"}).encode() + b"\n")
        os.close(ready_r)  # the owner is gone: nobody reads the status ...
        wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 15, "the bind")
        os.close(life_w)  # ... and its lifeline ends
        life_w = -1
        assert proc.wait(15) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read().decode()
        assert not os.path.exists(path)
        assert read_marker(marker_path(path))["fenced"][0][:4] == fenced[0][:4]
    finally:
        if life_w >= 0:
            os.close(life_w)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_program_takes_a_config_or_its_parts_not_both(sock_path: str) -> None:
    from sharedpool.config import CoordinatorConfig
    from sharedpool.program import EmbeddedCoordinator

    config = CoordinatorConfig(socket_path=sock_path, resources={"r": 1})  # type: ignore[dict-item]
    assert EmbeddedCoordinator(config=config).config is config
    with pytest.raises(ConfigError) as err:
        EmbeddedCoordinator(sock_path, config=config)
    assert err.value.field == "config"
    with pytest.raises(ConfigError) as err:
        EmbeddedCoordinator(sock_path, {"r": 1}, max_fram=4096)
    assert err.value.field == "options"


def test_coordinator_takes_a_config_or_its_parts_and_names_bad_arguments(sock_path: str) -> None:
    from pathlib import Path

    from sharedpool.config import CoordinatorConfig

    config = CoordinatorConfig(socket_path=sock_path, resources={"r": 1})  # type: ignore[dict-item]
    assert Coordinator(config=config).config is config
    for args, kwargs in [((sock_path,), {}), ((None, {"r": 2}), {}), ((), {"hello_timeout": 1})]:
        with pytest.raises(ConfigError) as err:  # the parts used to be dropped without a word
            Coordinator(*args, config=config, **kwargs)
        assert err.value.field == "config" and "either config=" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Coordinator(config={"resources": {"r": 1}})  # type: ignore[arg-type]
    assert err.value.field == "config"
    with pytest.raises(ConfigError) as err:
        Coordinator(sock_path, "r")  # type: ignore[arg-type]
    assert err.value.field == "resources" and "mapping" in str(err.value)
    with pytest.raises(ConfigError) as err:
        Coordinator(sock_path, {"r": 1}, bogus=1)
    assert err.value.field == "options" and "'bogus'" in str(err.value)
    assert "max_frame" in str(err.value)  # what is allowed
    assert Coordinator(Path(sock_path), {"r": 1}).socket_path == sock_path


def _next_frame(s: socket.socket, buf: bytearray) -> dict[str, Any]:
    """The next whole frame from ``s`` (``buf`` keeps what came after it)."""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                frame: dict[str, Any] = msgpack.unpackb(bytes(buf[4 : 4 + n]))
                del buf[: 4 + n]
                return frame
        chunk = s.recv(65536)
        assert chunk, "the coordinator closed the session"
        buf += chunk


def test_unknown_inspect_gets_one_error_and_no_reply(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    s, buf = _raw_session(sock_path), bytearray()
    try:
        s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "raw")))
        assert _next_frame(s, buf)["op"] == "welcome"
        s.sendall(p.encode(p.Inspect(7, "bogus", {})) + p.encode(p.Inspect(8, "server", {})))
        frames = [_next_frame(s, buf)]
        while frames[-1].get("req") != 8:  # the second request's reply marks the end of the first's
            frames.append(_next_frame(s, buf))
        first = [f for f in frames if f.get("req") == 7]
        assert [f["op"] for f in first] == ["error"], first  # once, and no Reply{data: None} after it
        assert first[0]["code"] == "bad_request" and "'bogus'" in first[0]["message"]
        assert frames[-1]["op"] == "reply" and frames[-1]["data"]["pid"] > 0
    finally:
        s.close()


def test_reply_over_the_frame_limit_fails_that_request_not_the_session(
        start_coordinator: Any, sock_path: str) -> None:
    from sharedpool.records import MAX_SITE

    start_coordinator({"r": 10}, max_frame=16384)
    holder_s, buf = _raw_session(sock_path), bytearray()
    c = Client(sock_path)
    try:
        holder_s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "raw")))
        assert _next_frame(holder_s, buf)["op"] == "welcome"
        leases = []
        for req in range(1, 6):  # 5 leases with 5000-character sites: over 16 KiB listed
            holder_s.sendall(p.encode(p.Acquire(req, "r", 2.0)))
            grant = _next_frame(holder_s, buf)
            assert grant["op"] == "grant", grant
            leases.append(grant["lease"])
            holder_s.sendall(p.encode(p.Report([[grant["lease"], "busy", None, "s" * 5000]])))
        holder_s.sendall(p.encode(p.Inspect(99, "server", {})))  # its reply: every report is in
        assert _next_frame(holder_s, buf)["req"] == 99
        c.inspect("server")
        session = c.session_id
        with pytest.raises(SharedPoolError) as err:
            c.inspect("leases")
        assert "reply_too_large" in str(err.value) and "16384" in str(err.value)
        assert "--resource" in str(err.value) and "--pid" in str(err.value)
        assert c.session_id == session  # the session was kept: no reconnect, no re-send
        assert c.inspect("server")["sessions"] == 2
        assert c.inspect("leases", pid=1)["leases"] == []  # a filter's answer fits
        for lease in leases[:2]:
            holder_s.sendall(p.encode(p.Release(lease)))
        wait_for(lambda: leased(c) == 3, what="two releases")
        # What is stored of a site is bounded (5000 -> MAX_SITE), so 3 leases fit in 16 KiB.
        rows = c.inspect("leases")["leases"]
        assert len(rows) == 3 and all(len(row["site"]) == MAX_SITE for row in rows)
    finally:
        c.close()
        holder_s.close()


def test_a_stopping_coordinator_removes_only_its_own_socket(tmp_path: Any) -> None:
    """A successor may bind the path while the old one finishes stopping
    (gunicorn's USR2 take-over): the old one must not unlink the new socket."""
    from sharedpool import Coordinator

    path = str(tmp_path / "sp.sock")
    old = Coordinator(path, {"r": 1}).start()
    try:
        os.unlink(path)  # what a successor does: its own socket on the same path
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(path)
    finally:
        old.stop()
    try:
        assert os.path.exists(path)
    finally:
        successor.close()


def test_a_socket_directory_others_can_swap_is_refused(tmp_path: Any) -> None:
    # Before, only the last directory was checked, through symlinks: ours inside
    # a directory anyone can write could be renamed away and replaced, and
    # another user's symlink to a directory of ours was taken for ours (the
    # link's owner could later point it at its own coordinator).
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)  # not sticky: anyone may rename what is in it
    (open_dir / "ours").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="can be changed by others"):
        Coordinator(str(open_dir / "ours" / "sp.sock"), {"r": 1}).start()
    if os.getuid() == 0:  # a symlink owned by someone else needs root to make
        real = tmp_path / "real"
        real.mkdir(mode=0o700)
        link = tmp_path / "link"
        link.symlink_to(real)
        os.lchown(link, 65534, 65534)
        with pytest.raises(ConfigError, match="symlink of (nobody|uid 65534)"):
            Coordinator(str(link / "sp.sock"), {"r": 1}).start()


def test_a_refused_socket_directory_is_not_made_first(tmp_path: Any) -> None:
    # Before, the missing directories were made, then the path checked: refused,
    # but "new" was left in a directory anyone can rename things in, and a root
    # coordinator followed another user's symlink to make "planted" where it pointed.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(ConfigError, match="can be changed by others"):
        Coordinator(str(open_dir / "new" / "sp.sock"), {"r": 1}).start()
    assert not (open_dir / "new").exists()
    if os.getuid() == 0:  # a symlink owned by someone else needs root to make
        real = tmp_path / "real"
        real.mkdir(mode=0o755)
        link = tmp_path / "link"
        link.symlink_to(real)
        os.lchown(link, 65534, 65534)
        with pytest.raises(ConfigError, match="symlink of (nobody|uid 65534)"):
            Coordinator(str(link / "planted" / "sp.sock"), {"r": 1}).start()
        assert not (real / "planted").exists()


@pytest.mark.parametrize("umask", [0, 0o027])
def test_directories_made_above_the_socket_are_not_open_to_others(tmp_path: Any, umask: int) -> None:
    # Before, makedirs made them 0777 & ~umask: under umask 0 the start refused
    # the world-writable directories it had just made itself, and left them;
    # under umask 027 "a" was 0750, ours: a socket given to a group was out of
    # its members' reach (Permission denied), and the start said nothing.
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import bind_socket

    path = tmp_path / "a" / "b" / "sp.sock"
    old = os.umask(umask)
    try:
        sock, _, _ = bind_socket(CoordinatorConfig(socket_path=str(path), resources={"r": 1}))
    finally:
        os.umask(old)
    sock.close()
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700


def test_a_live_socket_with_a_full_queue_is_a_running_coordinator(tmp_path: Any) -> None:
    # Before: "cannot serve: [Errno 11] Resource temporarily unavailable", of a
    # coordinator that is stopped (SIGSTOP) or stuck with its backlog full.
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import CoordinatorRunning, bind_socket

    path = str(tmp_path / "sp.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(0)
    queued = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued.connect(path)  # the one place in its queue: never accepted
    try:
        with pytest.raises(CoordinatorRunning, match="queue of new connections is full"):
            bind_socket(CoordinatorConfig(socket_path=path, resources={"r": 1}))
        assert os.path.exists(path)
    finally:
        queued.close()
        live.close()


def test_a_start_that_fails_after_binding_leaves_no_socket(tmp_path: Any) -> None:
    # Before, the socket file stayed: the next start took it for a dead
    # coordinator's and held every grant for restart_grace.
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import bind_socket

    path = tmp_path / "sp.sock"
    config = CoordinatorConfig(socket_path=str(path), resources={"r": 1})
    real_listen = socket.socket.listen

    def failing_listen(self: socket.socket, *args: Any) -> None:
        raise OSError(errno.EPERM, "refused for the test")

    socket.socket.listen = failing_listen  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="refused for the test"):
            bind_socket(config)
    finally:
        socket.socket.listen = real_listen  # type: ignore[method-assign]
    assert not path.exists()
    sock, restarted, _ = bind_socket(config)
    sock.close()
    assert not restarted
    # But a start that found a dead coordinator's socket, then failed, hands
    # the restart on: the next start must still hold its grants for the grace.
    socket.socket.listen = failing_listen  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="refused for the test"):
            bind_socket(config)  # the socket left above is a dead coordinator's
    finally:
        socket.socket.listen = real_listen  # type: ignore[method-assign]
    sock, restarted, _ = bind_socket(config)
    sock.close()
    assert restarted


def _start_racing(config: Any, go: Any, results: Any, done: Any) -> None:
    from sharedpool.coordinator import bind_socket

    go.wait(5)
    try:
        sock, _, _ = bind_socket(config)
    except Exception as exc:  # the loser: a live coordinator found  # noqa: BLE001
        results.put(f"refused: {type(exc).__name__}")
        return
    results.put("bound")
    # Alive (listening) until the other has tried: closed after a fixed 0.3 s,
    # a loser descheduled that long on a loaded machine found a dead socket
    # and rightly took the path over ("both bound", CI flake).
    done.wait(20)
    sock.close()


def test_two_starters_on_a_dead_coordinators_socket_never_both_bind(tmp_path: Any) -> None:
    # Before, both could probe the dead socket, and the second unlink the
    # first's live socket and bind its own: two budgets behind one path.
    from sharedpool.config import CoordinatorConfig

    path = str(tmp_path / "sp.sock")
    config = CoordinatorConfig(socket_path=path, resources={"r": 1})
    ctx = multiprocessing.get_context("fork")
    both = 0
    for _ in range(30):
        dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead.bind(path)
        dead.close()  # a dead coordinator's socket file
        go, results, done = ctx.Event(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_start_racing, args=(config, go, results, done)) for _ in range(2)]
        for proc in procs:
            proc.start()
        go.set()
        try:
            outcome = [results.get(timeout=10) for _ in procs]
        finally:
            done.set()
        for proc in procs:
            proc.join(10)
        both += outcome.count("bound") == 2
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    assert both == 0, f"both starters bound in {both} of 30 tries"


def test_a_running_coordinator_is_compared_with_what_a_server_declares(
        start_coordinator: Any, sock_path: str) -> None:
    """gunicorn's hooks and celery's setup() use a coordinator already
    listening as it is: a resource it lacks (every checkout fails) or a
    different cap was not said (new-user walkthrough)."""
    from sharedpool import Resource
    from sharedpool.contrib._embedded import compare_served

    start_coordinator({"pg": 3, "other": 1})
    assert compare_served(sock_path, {"pg": Resource(max_size=3)}) == []
    lines = compare_served(sock_path, {"pg": Resource(max_size=4), "redis": Resource(max_size=2)})
    assert lines == ["its cap for 'pg' is 3, not the 4 declared here: its own configuration is in force",
                     "it does not serve 'redis' (declared here with max_size=2): every checkout of "
                     "'redis' fails"]



def test_a_bind_that_fails_names_the_socket_path(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: "cannot serve: [Errno 13] Permission denied", naming nothing (a
    # directory of ours without write permission, a read-only mount).
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import bind_socket

    path = tmp_path / "sp.sock"

    def failing_bind(self: socket.socket, *args: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", failing_bind)
    with pytest.raises(PermissionError) as err:
        bind_socket(CoordinatorConfig(socket_path=str(path), resources={"r": 1}))
    assert err.value.filename == str(path) and str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_running_coordinator_leaves_no_temp_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: every call left a /tmp/sharedpool-XXXX directory (with a restart
    # marker when leases were out), a bad limit one too.
    import shutil
    import tempfile

    from sharedpool.testing import running_coordinator

    # Not under tmp_path: with xdist's longer paths the socket's would not fit AF_UNIX.
    top = tempfile.mkdtemp(prefix="sp-t-", dir="/tmp")
    try:
        monkeypatch.setattr(tempfile, "tempdir", top)
        with running_coordinator({"r": 1}) as coord:
            client = Client(coord.socket_path)
            client.acquire("r", timeout=5)  # still out at the stop: a marker is written
        client.close()
        with pytest.raises(ConfigError), running_coordinator({"r": 0}):
            pass
        assert os.listdir(top) == []
    finally:
        shutil.rmtree(top, ignore_errors=True)


#: ``sharedpool serve`` with one MemoryError where argv[1] says (a Ledger method's first call).
_SERVE_SHORT_OF_MEMORY = """
import sys
from sharedpool import ledger
name = sys.argv.pop(1)
real = getattr(ledger.Ledger, name)
calls = []
def short(*args, **kwargs):
    calls.append(1)
    if len(calls) == 1:
        raise MemoryError
    return real(*args, **kwargs)
setattr(ledger.Ledger, name, short)
from sharedpool.cli import main
main()
"""


@contextlib.contextmanager
def _serving(sock_path: str, script: str | None = None, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``sharedpool serve --resource r=2`` on ``sock_path`` in a child, through
    ``script`` (given ``args`` first) if any; yielded once its socket is there
    (or it has exited), killed if still running at the end."""
    head = ["-m", "sharedpool"] if script is None else ["-c", script, *args]
    proc = subprocess.Popen([sys.executable, *head, "serve", "--socket", sock_path, "--resource", "r=2"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.path.exists(sock_path) or proc.poll() is not None, what="the socket")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.parametrize("where", ["close_session", "release"])
def test_out_of_memory_mid_change_stops_the_coordinator(sock_path: str, where: str) -> None:
    # Out of memory in the middle of a ledger change (a session's end: a
    # callback of the loop; a release: a frame being handled) left the
    # coordinator serving on half-alive: the ended session's lease was never
    # returned (a slot lost for good) with only asyncio's "Exception in callback"
    # in the log. It stops now (exit 1, said why), for a restart to rebuild the
    # ledger from what the processes re-register.
    with _serving(sock_path, _SERVE_SHORT_OF_MEMORY, where) as proc:
        client = Client(sock_path, connect_timeout=2.0)
        lease = client.acquire("r", 2.0)
        if where == "release":
            client.release(lease)
        client.close()
        assert proc.wait(10) == 1
        err = proc.communicate(timeout=10)[1]
        assert "CRITICAL" in err and "out of memory" in err, err
        assert "coordinator stopped: out of memory" in err.splitlines()[-1]
        assert not os.path.exists(sock_path)  # a clean stop: its socket removed


_SERVE_NO_MEMORY_FOR_ONE_FRAME = """
import msgpack
from sharedpool import protocol
real = msgpack.unpackb
def unpackb(body, **kwargs):
    if b"short-of-memory" in body:
        raise MemoryError
    return real(body, **kwargs)
protocol.msgpack = type("m", (), {"unpackb": staticmethod(unpackb), "packb": staticmethod(msgpack.packb)})
from sharedpool.cli import main
main()
"""


def test_out_of_memory_decoding_a_frame_ends_that_session_only(sock_path: str) -> None:
    # Decoding changes nothing: the session whose frame could not be read ends
    # (as before), the coordinator serves on; but its log no longer blames the
    # peer's frame ("bad frame: frame is not valid msgpack: ").
    with _serving(sock_path, _SERVE_NO_MEMORY_FOR_ONE_FRAME) as proc:
        victim, other = Client(sock_path, connect_timeout=2.0), Client(sock_path, connect_timeout=2.0)
        other.release(other.acquire("r", 2.0))
        with pytest.raises(SharedPoolError):
            victim.acquire("r", 0.5, site="short-of-memory")  # waits 1 s (GRACE)
        other.release(other.acquire("r", 2.0))  # the others go on
        victim.close()
        other.close()
        proc.terminate()
        assert proc.wait(10) == 0
        err = proc.communicate(timeout=10)[1]
        assert "out of memory decoding a frame; ending the session" in err, err
        assert "bad frame" not in err
        # The victim's reconnects re-sent that frame, and were not backed off:
        # ~2,000 sessions (4 log lines each) in its 1 s of waiting. Now 20 ms,
        # 40 ms, ... between them, as after a bad frame from the coordinator.
        sessions = err.count("ending the session")
        assert 1 <= sessions <= 12, sessions


#: ``sharedpool serve`` with its open-file limits set to argv[1] (soft) and argv[2] (hard).
_SERVE_WITH_FILE_LIMIT = """
import resource, sys
soft, hard = int(sys.argv.pop(1)), int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from sharedpool.cli import main
main()
"""


def test_at_its_open_file_limit_the_refused_clients_are_told_why(sock_path: str) -> None:
    # At the limit uvloop (libuv) accepts each new session and closes it at
    # once: no spin, and the sessions in hand go on; but the refused saw
    # "[Errno 32] Broken pipe" (or "Connection reset by peer"), after their timeout.
    from sharedpool.handshake import shake_hands

    sessions: list[socket.socket] = []
    with _serving(sock_path, _SERVE_WITH_FILE_LIMIT, "48", "48") as proc:
        try:
            refused = None
            for _ in range(60):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    shake_hands(sock, sock_path, 10.0,  # the refused are told at once; slow CI is not refused
                                lambda: p.Hello(p.PROTOCOL_VERSION, os.getpid(), "t", []))
                except CoordinatorUnavailable as exc:
                    refused = exc
                    break
                sessions.append(sock)
            assert refused is not None and "open-file limit" in str(refused), refused
            for sock in sessions[-5:]:  # room again: served at once
                sock.close()
            client = Client(sock_path, connect_timeout=10.0)
            client.release(client.acquire("r", 10.0))
            client.close()
            proc.terminate()
            assert proc.wait(10) == 0
            err = proc.communicate(timeout=10)[1]
            assert err.count("near the open-files limit") == 1, err
        finally:
            for sock in sessions:
                sock.close()


@contextmanager
def _asyncio_serve_at_the_limit(tmp_path: Any, *flags: str) -> Iterator[Any]:
    """``sharedpool serve`` on asyncio's own loop at an open-file limit of 40,
    sessions connected until one is left waiting to be accepted: the log's
    path. On leaving, three are let go, a client is served (within asyncio's
    1 s retry), and the coordinator stops cleanly."""
    from sharedpool.handshake import shake_hands

    sock_path, log_path = str(tmp_path / "sp.sock"), tmp_path / "serve.log"
    script = "import sys\nsys.modules['uvloop'] = None  # asyncio's loop\n" + _SERVE_WITH_FILE_LIMIT
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", script, "40", "40", "serve", "--socket", sock_path,
                                 "--resource", "r=2", *flags], stdout=log, stderr=subprocess.STDOUT)
    sessions: list[socket.socket] = []
    try:
        wait_for(lambda: proc.poll() is not None or coordinator_listening(sock_path), 15, "the coordinator")
        coordinator = psutil.Process(proc.pid)
        for _ in range(60):  # until one is left waiting: the limit
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sessions.append(sock)
            try:
                shake_hands(sock, sock_path, 1.0, lambda: p.Hello(p.PROTOCOL_VERSION, os.getpid(), "t", []))
            except TimeoutError:
                # Left waiting at the limit, not only slow (a loaded machine):
                # else the tests would look for the limit's lines in vain.
                if coordinator.num_fds() >= 40:
                    break
        else:
            raise AssertionError("every session was accepted at an open-file limit of 40")
        wait_for(lambda: "cannot accept sessions: Too many open files" in log_path.read_text(), 15,
                 "the limit's warning")
        yield log_path
        for sock in sessions[:3]:  # room again: served
            sock.close()
        client = Client(sock_path, connect_timeout=10.0)
        client.release(client.acquire("r", 10.0))
        client.close()
    finally:
        for sock in sessions:
            sock.close()
        proc.terminate()
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:  # not left behind when its stop failed
                proc.kill()
                proc.wait(10)


def test_on_asyncios_loop_sessions_over_the_open_file_limit_are_one_warning_not_a_log_storm(
        tmp_path: Any) -> None:
    # Without uvloop (asyncio's own loop), each accept() that failed with EMFILE
    # was logged with its traceback by asyncio: ~1,200 errors (3,700 lines) in
    # the first second with one session waiting, more each second (13,000
    # lines, 25% CPU, by the 8th).
    with _asyncio_serve_at_the_limit(tmp_path) as log_path:
        time.sleep(2.0)  # asyncio tries again every second
        text = log_path.read_text()
        assert text.count("cannot accept sessions: Too many open files") == 1, text[-3000:]
        assert "raise the open-file limit (40:" in text, text[-3000:]
        assert "out of system resource" not in text and "Traceback" not in text, text[-3000:]


def test_on_asyncios_loop_a_failed_accept_is_retried_once_a_second_not_multiplied(tmp_path: Any) -> None:
    # asyncio's accept loop (3.11-3.13) goes on calling accept() after EMFILE,
    # each failure scheduling a retry of its own: the failed accepts multiplied
    # at the limit (~500 a second, ~3,500 a minute later, CPU climbing). Each
    # is one debug line: their count is that of the failed accepts.
    with _asyncio_serve_at_the_limit(tmp_path, "--log-level", "debug") as log_path:
        time.sleep(4.0)  # four of asyncio's retries
        failed = log_path.read_text().count("cannot accept a session: [Errno 24]")
        assert failed <= 12, f"{failed} failed accept()s in ~5s with one session waiting"


def test_asyncios_listening_socket_dup_is_a_working_socket(tmp_path: Any) -> None:
    # asyncio.Server.sockets hands out dup(); socket.dup() calls the class with
    # socket's own arguments, which the wrapper's constructor does not take.
    import asyncio

    from sharedpool.listener import RetryOnceListener

    loop = asyncio.new_event_loop()
    plain = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    plain.bind(str(tmp_path / "l.sock"))
    plain.listen(1)
    listener = RetryOnceListener(plain, loop)
    listener.setblocking(False)
    try:
        copy = listener.dup()
        try:
            assert copy.fileno() != listener.fileno()
            assert copy.getsockname() == listener.getsockname()
            assert copy.gettimeout() == 0.0
        finally:
            copy.close()
        assert listener.fileno() >= 0  # its own descriptor still open
    finally:
        listener.close()
        loop.close()


_SERVE_ON_A_DISK_GONE_READ_ONLY = """
import errno, os, signal, sys
real = os.unlink
def unlink(path, *args, **kwargs):
    if str(path) == sys.argv[-3]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real(path, *args, **kwargs)
os.unlink = unlink
from sharedpool.cli import main
main()
"""


def test_a_stop_that_cannot_remove_its_socket_is_still_a_clean_stop(sock_path: str) -> None:
    # A disk gone read-only: the stop went fine but ended with "sharedpool
    # serve: error: cannot serve: [Errno 30] Read-only file system" and exit 1.
    try:
        with _serving(sock_path, _SERVE_ON_A_DISK_GONE_READ_ONLY) as proc:
            proc.terminate()
            assert proc.wait(10) == 0
            err = proc.communicate(timeout=10)[1]
            assert "cannot remove the socket" in err and "cannot serve" not in err, err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)


def test_out_of_memory_with_nothing_leased_still_hands_on_a_restart(sock_path: str) -> None:
    # A stop by fail_hard() with a ledger that shows no lease (it may be the
    # one that lost it) removed the marker with the socket: the next start
    # was a fresh one, granting at once while processes re-registered what
    # they hold. A crash (the socket left behind) would have held its grants.
    with _serving(sock_path, _SERVE_SHORT_OF_MEMORY, "acquire") as proc:
        client = Client(sock_path, connect_timeout=2.0)
        with contextlib.suppress(SharedPoolError):
            client.acquire("r", 0.2)
        client.close()
        assert proc.wait(10) == 1
        proc.communicate(timeout=10)
        assert not os.path.exists(sock_path)
        assert os.path.exists(sock_path + ".restart")  # the next start is a restart
    with _serving(sock_path) as proc:
        proc.terminate()
        assert proc.wait(10) == 0
        assert "coordinator restarted: granting nothing" in proc.communicate(timeout=10)[1]


#: ``sharedpool serve --config CONFIG`` sending itself SIGNUM once, where argv says:
#: "config" as it reads its flags, before anything is bound; "bound" between the
#: bind and the event loop's signal handlers (uvloop already listening); "end"
#: as it ends, once its stop is done (a second stop signal, a late SIGHUP).
_SERVE_SIGNALLED = """
import os, sys
where, signum, config = sys.argv.pop(1), int(sys.argv.pop(1)), sys.argv.pop(1)
sys.argv += ["--config", config]
import sharedpool.cli, sharedpool.coordinator, sharedpool.server
def signalled(real, before):
    def call(*args, **kwargs):
        if before:
            os.kill(os.getpid(), signum)
        try:
            return real(*args, **kwargs)
        finally:
            if not before:
                os.kill(os.getpid(), signum)
    return call
if where == "config":
    sharedpool.cli.parse_resource_flags = signalled(sharedpool.cli.parse_resource_flags, True)
elif where == "bound":
    sharedpool.server.Server.warm_monitors = signalled(sharedpool.server.Server.warm_monitors, True)
else:
    sharedpool.coordinator.run = signalled(sharedpool.coordinator.run, False)
sharedpool.cli.main()
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"])
@pytest.mark.parametrize("where", ["config", "bound", "end"])
def test_a_signal_while_serve_starts_or_ends_is_handled_once(sock_path: str, tmp_path: Any,
                                                            where: str, sig: int) -> None:
    # Each was its default action or handled twice: SIGQUIT killed serve (its
    # socket left: the next start held its grants as after a crash), and so did
    # any of them before serve's handlers were in (SIGHUP, a reload, killed it;
    # SIGINT was a KeyboardInterrupt) or once its stop was done (a second SIGTERM:
    # exit -15; a second Ctrl-C: a KeyboardInterrupt traceback at exit). A SIGHUP
    # between the bind and the loop's handlers reloaded twice: caught by the
    # early handler, and seen by uvloop too. Now a stop signal stops it cleanly
    # (before the bind: not started at all), exit 0; a SIGHUP reloads once.
    config = tmp_path / "sp.toml"
    config.write_text("[resources]\nr = 2\n")
    with _serving(sock_path, _SERVE_SIGNALLED, where, str(int(sig)), str(config)) as proc:
        if sig == signal.SIGHUP or where == "end":
            wait_for(lambda: coordinator_listening(sock_path) or proc.poll() is not None,
                     15, "it to serve")
            time.sleep(1.0)  # a second reload came at once
            assert proc.poll() is None, proc.communicate(timeout=10)[1]
            proc.terminate()
        code = proc.wait(15)
        err = proc.communicate(timeout=10)[1]
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not os.path.exists(sock_path)
    assert err.count("reloaded") == (1 if sig == signal.SIGHUP and where != "end" else 0), err
    if sig != signal.SIGHUP and where == "config":
        assert "not started" in err and "serving" not in err, err
    if sig != signal.SIGHUP and where == "bound":
        assert "coordinator stopping" in err, err
    assert not os.path.exists(sock_path + ".restart")  # nothing held: the next start is a fresh one


#: An owner that starts a Coordinator, keeps a pool open (a connection idle, its
#: lease held) and exits normally; "killed": its coordinator dies first, on its own.
_OWNER_WITH_A_POOL_OPEN = """
import logging, os, signal, sqlite3, sys, threading
from sharedpool import ConnectionPool, Coordinator, PoolConfig
path, how = sys.argv[1], sys.argv[2]
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
lost = threading.Event()
class Seen(logging.Handler):
    def emit(self, record):
        if "lost coordinator" in record.getMessage():
            lost.set()
logging.getLogger("sharedpool.client").addHandler(Seen())
coordinator = Coordinator(path, {"r": 2}).start()
pool = ConnectionPool(lambda: sqlite3.connect(":memory:", check_same_thread=False),
                      PoolConfig(min_size=0, max_size=2, test_on_acquire=False),
                      resource="r", coordinator=path)
pool.release(pool.acquire(timeout=10))
if how == "killed":
    os.kill(coordinator.pid, signal.SIGKILL)
    assert lost.wait(10), "the loss was not seen"
print("exiting", flush=True)
"""


@pytest.mark.parametrize("how", ["normal", "killed"])
def test_a_normal_exit_with_a_pool_open_does_not_tell_of_a_lost_coordinator(
        sock_path: str, how: str) -> None:
    # The exit handler stops the coordinator while the pool is still open (its
    # client's thread runs on through the exit handlers): the client saw its
    # session end and logged "lost coordinator ...; will reconnect" at warning,
    # at every normal exit. A coordinator that dies on its own is still told of.
    out = subprocess.run([sys.executable, "-c", _OWNER_WITH_A_POOL_OPEN, sock_path, how],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == "exiting\n", out
    assert "Traceback" not in out.stderr, out.stderr
    if how == "normal":
        assert "lost coordinator" not in out.stderr, out.stderr
        assert not os.path.exists(sock_path)  # it was stopped, cleanly
    else:
        assert "WARNING sharedpool.client: lost coordinator" in out.stderr, out.stderr


def test_a_reclaim_is_logged_at_info_when_first_asked_not_at_every_change(
        caplog: pytest.LogCaptureFixture, sock_path: str) -> None:
    """Under contention a holder's asked count moves 2, 1, 2... within
    milliseconds; each change was an info line (a 12-minute soak: ~90 lines/s,
    95 % of the coordinator's log, ~0.9 GB a day). Then info when a session was
    first asked: still ~30 lines/s with gunicorn gthread workers at the cap, where
    slots move all the time. Now at most one info line a minute per resource,
    saying how many asks went to debug since."""
    import asyncio

    from sharedpool.config import CoordinatorConfig
    from sharedpool.effects import AskReclaim
    from sharedpool.server import Server, SessionProtocol

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        clock = [1000.0]
        loop.time = lambda: clock[0]  # type: ignore[method-assign]
        server = Server(CoordinatorConfig(socket_path=sock_path, resources={"r": 2}))  # type: ignore[dict-item]
        session = SessionProtocol(server)
        session.sid, session.pid = 1, 4242
        server.sessions[1] = session
        caplog.set_level(logging.INFO, logger="sharedpool.coordinator")

        def infos() -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.levelno == logging.INFO and "reclaim" in r.getMessage()]

        for count in (2, 1, 2, 1, 0, 1, 0, 2):
            server.apply([AskReclaim(1, "r", count, 1.0)])
        assert len(infos()) == 1, infos()  # asked (2); asked again twice, within the minute
        clock[0] += 61
        server.apply([AskReclaim(1, "r", 0, 1.0)])
        server.apply([AskReclaim(1, "r", 1, 1.0)])
        assert len(infos()) == 2 and infos()[1].endswith("(2 more in the last 61s, at debug)"), infos()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_run_refused_outside_the_main_thread_leaves_that_threads_signal_mask_alone(
        sock_path: str) -> None:
    """run() blocks the signals it handles before installing its handlers, which
    signal.signal() refuses outside the main thread. Before, the ValueError left
    SIGTERM, SIGINT, SIGQUIT and SIGHUP blocked in the caller's thread, and every
    process it started from then on (the mask is inherited across fork and
    exec) ignored a SIGTERM. Nothing is bound either."""
    from sharedpool.config import CoordinatorConfig
    from sharedpool.coordinator import HANDLED_SIGNALS, run

    config = CoordinatorConfig(socket_path=sock_path, resources={"r": 1})
    seen: dict[str, Any] = {}
    handlers = [signal.getsignal(sig) for sig in HANDLED_SIGNALS]

    def in_thread() -> None:
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            run(config)
        except ValueError as exc:
            seen["error"] = exc
        seen["mask"] = (before, signal.pthread_sigmask(signal.SIG_BLOCK, []))
        child = subprocess.run(["grep", "SigBlk", "/proc/self/status"], capture_output=True,
                               text=True, timeout=30, check=True)
        seen["child"] = int(child.stdout.split()[1], 16)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join(30)
    assert isinstance(seen.get("error"), ValueError)
    before, after = seen["mask"]
    assert after == before
    assert not any(seen["child"] & (1 << (sig - 1)) for sig in HANDLED_SIGNALS), \
        f"a process started by that thread blocks {seen['child']:#x}"
    assert not os.path.exists(sock_path)
    assert [signal.getsignal(sig) for sig in HANDLED_SIGNALS] == handlers


def test_once_per_says_a_line_once_per_interval_and_counts_the_rest() -> None:
    from sharedpool.lograte import OncePer

    clock = [0.0]
    once = OncePer(60.0, lambda: clock[0], max_keys=2)
    assert once.due("a") == (0, math.inf)
    assert once.due("a") is None and once.due("a") is None
    clock[0] = 59.9
    assert once.due("a") is None
    clock[0] = 60.0
    assert once.due("a") == (3, 60.0)
    assert once.due("b") == (0, math.inf)
    assert once.due("c") == (0, math.inf)  # a third key: the others forgotten (bounded, whatever peers do)
    assert once.due("a") == (0, math.inf)


def _queue_connects(path: str, most: int) -> list[socket.socket]:
    """Connections queued on ``path``'s listen queue (not accepted: its
    coordinator is stopped), as many as fit, up to ``most``."""
    queued = []
    try:
        for _ in range(most):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:  # full: a Unix socket says so at once
                s.close()
                break
            queued.append(s)
    except BaseException:
        for s in queued:
            s.close()
        raise
    return queued


def test_the_listen_queue_holds_a_fleet_connecting_at_once(start_coordinator: Any, sock_path: str) -> None:
    """The event loop listened again with its default backlog of 100 (bind
    asked for 512): a fleet of workers connecting while the coordinator was
    busy got EAGAIN past the 101st."""
    coord = start_coordinator({"r": 1})
    proc = psutil.Process(coord.pid)
    proc.suspend()
    queued: list[socket.socket] = []
    try:
        queued = _queue_connects(sock_path, 300)
        assert len(queued) == 300
    finally:
        proc.resume()
        for s in queued:
            s.close()


def test_a_client_waits_for_room_in_a_full_listen_queue(start_coordinator: Any, sock_path: str) -> None:
    """A connect with a timeout to a Unix socket whose queue is full fails at
    once (EAGAIN), where TCP's waits: a client met "[Errno 11] Resource
    temporarily unavailable" as a coordinator unreachable, the CLI's probe said
    it could not use the socket, and the integrations' probe took a busy
    coordinator for none."""
    coord = start_coordinator({"r": 1})
    proc = psutil.Process(coord.pid)
    client = Client(sock_path)
    got: list[Any] = []
    asking = threading.Thread(target=lambda: got.append(client.inspect("server", timeout=20)))
    status: subprocess.Popen[str] | None = None
    queued: list[socket.socket] = []
    proc.suspend()
    try:
        queued = _queue_connects(sock_path, 1000)
        assert len(queued) < 1000, "the queue never filled"
        assert coordinator_listening(sock_path)  # alive, if not accepting
        asking.start()
        status = subprocess.Popen([sys.executable, "-m", "sharedpool", "status", "--socket", sock_path],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: status.poll() is not None or _has_unix_socket(status.pid), 30,  # type: ignore[union-attr]
                 "the CLI's probe")
        time.sleep(0.5)  # both try meanwhile
        assert not got
        proc.resume()
        asking.join(30)
        assert got and got[0]["pid"] == coord.pid, got
        _, err = status.communicate(timeout=30)
        assert status.returncode == 0, err
    finally:
        proc.resume()
        for s in queued:
            s.close()
        client.close()
        if status is not None and status.poll() is None:
            status.kill()
            status.communicate(timeout=10)


def _has_unix_socket(pid: int) -> bool:
    """Whether process ``pid`` holds a Unix socket (the CLI's first is its probe)."""
    try:
        return bool(psutil.Process(pid).net_connections(kind="unix"))
    except psutil.NoSuchProcess:
        return False
