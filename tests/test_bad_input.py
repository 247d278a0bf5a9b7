"""I5: whatever a peer sends, only its own session ends; the coordinator goes on."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from fuzz_frames import check_normal_client, fuzz
from proc_helpers import read_until_closed

from sharedpool import Client
from sharedpool import protocol as p


def test_fuzz_100k_frames_then_a_normal_client_works(start_coordinator: Any, sock_path: str) -> None:
    coord = start_coordinator({"r": 2})
    other = Client(sock_path)
    lease = other.acquire("r", timeout=2)  # a bystander session holding a lease throughout
    try:
        stats = fuzz(sock_path, 100_000, seed=7)
        assert stats["frames"] >= 100_000
        assert stats["sessions_ended"] > 100  # malformed frames did end sessions
        check_normal_client(sock_path)
        rows = other.inspect("leases")["leases"]
        assert [r["id"] for r in rows] == [lease.id]  # the bystander noticed nothing
        assert coord.pid is not None and psutil.Process(coord.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        other.close()


def test_client_that_never_speaks_is_closed(start_coordinator: Any, sock_path: str,
                                            capfd: pytest.CaptureFixture[str]) -> None:
    start_coordinator({"r": 1}, hello_timeout=0.3)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    t0 = time.monotonic()
    data = read_until_closed(s)
    s.close()
    assert 0.2 < time.monotonic() - t0 < 4
    conn = p.Connection(p.CLIENT)
    conn.receive_data(data)
    err = conn.next_event()
    assert isinstance(err, p.Error) and err.code == "hello_timeout" and err.fatal
    assert "no hello within 0.3s; ending it" in capfd.readouterr().err  # the coordinator's log
    check_normal_client(sock_path)


def test_client_that_stops_reading_is_ended(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    bystander = Client(sock_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "deaf")))
    s.sendall(p.encode(p.Acquire(1, "r", 5.0)))  # it holds the one slot
    frame = p.encode(p.Inspect(2, "resources", {}))
    s.settimeout(5)
    sent = 0
    try:
        # Ask for replies and never read them, until the coordinator gives up on us.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s.sendall(frame * 100)
            sent += 100
    except OSError:
        pass  # the coordinator cut the session (EPIPE / reset), or stopped reading us
    try:
        assert sent < 1_000_000
        # Ended by the coordinator, not by our hanging up (the socket is still
        # open here): its slot comes back, and only that session ended.
        assert bystander.acquire("r", timeout=5)
        assert len(bystander.inspect("sessions")["sessions"]) == 1
    finally:
        s.close()
        bystander.close()


def _peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_one_read_of_many_requests_does_not_build_all_their_replies(
        start_coordinator: Any, sock_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    """The replies to the frames of one read were all built before any went
    out: one write of 1,000 `inspect sessions` (45 KB) with 1,000 sessions
    listed took the coordinator from 35 to 204 MB. They go out once they pass
    the unread-reply bound, where a peer that does not read is ended."""
    coord = start_coordinator({"r": 1})
    assert coord.pid is not None
    bystander = Client(sock_path)
    peers = []
    try:
        for n in range(300):  # a listing of ~26 KB
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            peer.connect(sock_path)
            peer.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), f"listed-{n}")))
            peers.append(peer)
        deadline = time.monotonic() + 20
        while len(bystander.inspect("sessions")["sessions"]) < 301:
            assert time.monotonic() < deadline, "the listed sessions never all said hello"
            time.sleep(0.05)
        before = _peak_rss_kb(coord.pid)
        deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deaf.connect(sock_path)
        peers.append(deaf)
        deaf.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "deaf"))
                     + p.encode(p.Inspect(1, "sessions", {})) * 1300)  # ~60 KB, never read
        # Ended (not reading): said in its log once its frames were handled (the
        # listing no longer showing it may only mean they were not read yet).
        log, deadline = "", time.monotonic() + 20
        while "does not read its replies" not in log:
            assert time.monotonic() < deadline, f"the peer that does not read was never ended: {log}"
            time.sleep(0.05)
            log += capfd.readouterr().err
        while any(row["name"] == "deaf" for row in bystander.inspect("sessions")["sessions"]):
            assert time.monotonic() < deadline, "the peer that does not read was never let go"
            time.sleep(0.05)
        grown = _peak_rss_kb(coord.pid) - before
        # 1,300 listings are 34 MB: built at once, the peak grew by twice that.
        assert grown < 20_000, f"the coordinator's peak memory grew by {grown} kB: {log}"
    finally:
        for peer in peers:
            peer.close()
        bystander.close()


def test_requests_refused_in_a_loop_do_not_fill_the_log(
        start_coordinator: Any, sock_path: str, capfd: pytest.CaptureFixture[str]) -> None:
    """A request refused without ending its session was one warning each: a
    peer releasing leases it does not hold in a loop wrote 20,000 lines (2.5 MB)
    in 0.4 s. Once a minute per process and kind now, the rest counted; each
    request is still answered with its error."""
    start_coordinator({"r": 1})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.settimeout(10)
    try:
        s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "careless")))
        s.sendall(b"".join(p.encode(p.Release(10**9 + n)) for n in range(500)))
        s.sendall(p.encode(p.Inspect(1, "server", {})))  # answered after all of them
        conn = p.Connection(p.CLIENT)
        seen: list[Any] = []
        while not any(isinstance(m, p.Reply) for m in seen):
            data = s.recv(65536)
            assert data, "the session was ended"
            conn.receive_data(data)
            seen += list(conn.events())
    finally:
        s.close()
    assert sum(isinstance(m, p.Error) and m.code == "unknown_lease" for m in seen) == 500
    lines = [line for line in capfd.readouterr().err.splitlines()
             if "WARNING" in line and "unknown_lease" in line]
    assert len(lines) == 1, f"{len(lines)} lines logged for 500 refused releases"


def test_frame_timeout_is_per_frame(start_coordinator: Any, sock_path: str) -> None:
    """A peer whose frames each arrive within frame_timeout is not cut off
    because the reads, over a longer time, kept ending in the middle of one."""
    # 1.5 s: a stall of the test or coordinator on a loaded machine stays far inside it.
    start_coordinator({"r": 1}, frame_timeout=1.5)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    try:
        s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "steady")))
        report = p.encode(p.Report([], {}, ["r"], {}))
        half = len(report) // 2
        s.sendall(report[:half])
        for _ in range(70):  # 3.5 s, over 2 frame_timeouts: each frame completes in 50 ms
            time.sleep(0.05)
            s.sendall(report[half:] + report[:half])
        time.sleep(0.05)
        s.sendall(report[half:])
        s.sendall(p.encode(p.Inspect(7, "resources", {})))
        s.settimeout(5)
        conn = p.Connection(p.CLIENT)  # expects the welcome first
        seen: list[Any] = []
        while not any(isinstance(m, p.Reply) for m in seen):
            data = s.recv(65536)
            assert data, f"the session was ended: {seen}"
            conn.receive_data(data)
            seen += list(conn.events())
        assert not any(isinstance(m, p.Error) for m in seen), seen
    finally:
        s.close()


def test_fuzz_script_runs_standalone(start_coordinator: Any, sock_path: str) -> None:
    import subprocess
    import sys

    start_coordinator({"r": 1})
    script = Path(__file__).with_name("fuzz_frames.py")
    out = subprocess.run([sys.executable, str(script), sock_path, "--frames", "2000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a normal client still works" in out.stdout


def test_half_sent_frame_ends_the_session(start_coordinator: Any, sock_path: str,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    start_coordinator({"r": 1}, frame_timeout=0.3)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "slow")))
    s.sendall(p.encode(p.Inspect(1, "server", {}))[:7])  # a frame begun, never finished
    data = read_until_closed(s)
    s.close()
    conn = p.Connection(p.CLIENT)
    conn.receive_data(data)
    events = conn.events()
    assert isinstance(events[-1], p.Error) and events[-1].code == "frame_timeout"
    assert "frame not completed within 0.3s; ending it" in capfd.readouterr().err
    check_normal_client(sock_path)


#: Stands for a list nested 1000 deep in a body given to _raw_frame.
_DEEP = "\x00a list nested 1000 deep\x00"


def _raw_frame(body: dict[str, Any]) -> bytes:
    """A frame of anything msgpack can carry, checked by no encoder of ours."""
    import struct

    import msgpack

    data = msgpack.packb(body, use_bin_type=True)
    # Spliced in as bytes (a one-item array, 1000 times): msgpack < 1.2 packs no
    # list deeper than 511, though every version unpacks one.
    data = data.replace(msgpack.packb(_DEEP), b"\x91" * 1000 + b"\x00")
    return struct.pack(">I", len(data)) + data


def _nested(depth: int) -> Any:
    assert depth == 1000, "_raw_frame splices in 1000 levels only"
    return _DEEP


def test_a_hello_with_a_deeply_nested_entry_leaves_no_ghost_session(
        start_coordinator: Any, sock_path: str) -> None:
    # Before, describing the bad entry raised RecursionError half-way through
    # the hello: the ledger kept a session (and its re-registered lease) that
    # the server never learned of, so that slot was lost until a restart.
    start_coordinator({"r": 1})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    held = [["r", 4242, 4242, "idle", None], _nested(1000)]
    s.sendall(_raw_frame({"op": "hello", "version": p.PROTOCOL_VERSION, "pid": os.getpid(),
                          "name": "deep", "held": held}))
    s.settimeout(2)
    welcome = p.Connection(p.CLIENT)
    welcome.receive_data(s.recv(65536))
    assert isinstance(welcome.next_event(), p.Welcome)  # the bad entry is a problem, not a crash
    s.close()
    client = Client(sock_path)
    try:
        lease = client.acquire("r", timeout=3)  # the slot came back with the session
        client.release(lease)
        assert [x["name"] for x in client.inspect("sessions")["sessions"]] != ["deep"]
    finally:
        client.close()


def test_a_huge_name_is_not_logged_whole(start_coordinator: Any, sock_path: str,
                                          capfd: pytest.CaptureFixture[str],
                                          caplog: pytest.LogCaptureFixture) -> None:
    # Before, the "session connected" line carried the whole name: a peer's
    # 500 kB name (or one with line breaks) went into the log at every hello.
    caplog.set_level("INFO", logger="sharedpool")  # the coordinator logs at our level
    start_coordinator({"r": 1})
    name = "x" * 500_000 + "\nFORGED log line"
    client = Client(sock_path, name="x")
    client.name = name  # a peer's own hello: Client refuses such a name itself
    try:
        [row] = client.inspect("sessions")["sessions"]
        assert len(row["name"]) <= 256
    finally:
        client.close()
    time.sleep(0.2)  # the coordinator's log line is written
    err = capfd.readouterr().err
    assert "connected: pid=" in err
    assert max(len(line) for line in err.splitlines()) < 1000
    assert not any(line.startswith("FORGED") for line in err.splitlines())


def _after_hello(sock_path: str, *frames: bytes | p.Message, until: Any) -> list[Any]:
    """A session's hello, then ``frames`` (raw bytes, or messages to encode);
    what comes back until a frame for which ``until(frame)`` holds (the
    session ending before that fails the test)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.settimeout(3)
    conn = p.Connection(p.CLIENT)
    s.sendall(conn.send(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "odd")))
    for frame in frames:
        s.sendall(frame if isinstance(frame, bytes) else conn.send(frame))
    events: list[Any] = []
    while not any(until(e) for e in events):
        data = s.recv(65536)
        assert data, f"session ended; got {events}"
        conn.receive_data(data)
        events += conn.events()
    s.close()
    return events


@pytest.mark.parametrize("frame", [
    {"op": "inspect", "req": 1, "what": "leases", "filters": {"resource": [1]}},
    {"op": "inspect", "req": 1, "what": "leases", "filters": {"resource": _nested(1000)}},
    {"op": "admin", "req": 1, "verb": "resize", "args": {"resource": "r", "max_size": _nested(1000)}},
], ids=["unhashable-resource", "deep-resource", "deep-size"])
def test_odd_values_get_an_error_reply_and_the_session_goes_on(
        start_coordinator: Any, sock_path: str, frame: dict[str, Any]) -> None:
    # Before, these raised TypeError / RecursionError inside the server: the
    # session was dropped with a traceback in the log and no reply.
    start_coordinator({"r": 1})
    events = _after_hello(sock_path, _raw_frame(frame), p.Inspect(2, "server", {}),  # still served after
                          until=lambda e: isinstance(e, p.Reply) and e.req == 2)
    [error] = [e for e in events if isinstance(e, p.Error)]
    assert error.req == 1 and not error.fatal and len(error.message) < 300


def test_admin_with_a_deep_argument_is_carried_out_and_answered(
        start_coordinator: Any, sock_path: str) -> None:
    # Before, logging the arguments raised RecursionError after the pause took
    # effect: no reply, and no push to the pools.
    start_coordinator({"r": 1})
    deep = _raw_frame({"op": "admin", "req": 1, "verb": "pause",
                       "args": {"resource": "r", "note": _nested(1000)}})
    events = _after_hello(sock_path, deep, until=lambda e: getattr(e, "req", None) == 1)
    assert any(isinstance(e, p.Reply) and e.req == 1 for e in events), events
    assert any(isinstance(e, p.Push) and e.verb == "pause" for e in events), events


@pytest.mark.parametrize(("frames", "match"), [
    ([{"op": "retime", "req": 1, "timeout": -1.0}], "retime: timeout must be a number >= 0, got -1.0"),
    ([{"op": "retime", "req": 1, "timeout": float("nan")}], "retime: timeout must be a number >= 0, got nan"),
    ([{"op": "retime", "req": 1, "timeout": "5"}], "retime: field 'timeout' has type str"),
    ([{"op": "retime", "req": 1.0, "timeout": 5}], "retime: field 'req' has type float"),
    # An acquire of its own queued (req 1), then a retime of a req it never sent:
    # the bystander's queued request has that number in its own session.
    ([{"op": "acquire", "req": 1, "resource": "r", "timeout": 30.0},
      {"op": "retime", "req": 2, "timeout": 5.0}], "retime of request 2, which this session never sent"),
], ids=["negative", "nan", "str-timeout", "float-req", "never-sent"])
def test_a_bad_retime_ends_that_session_only(start_coordinator: Any, sock_path: str,
                                             capfd: pytest.CaptureFixture[str],
                                             frames: list[dict[str, Any]], match: str) -> None:
    start_coordinator({"r": 1})
    other = Client(sock_path)
    try:
        lease = other.acquire("r", timeout=2)  # req 1
        ticket = other.request("r", timeout=30)  # req 2, queued behind its own lease
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "odd")))
        s.sendall(b"".join(_raw_frame(f) for f in frames))
        data = read_until_closed(s)
        s.close()
        conn = p.Connection(p.CLIENT)
        conn.receive_data(data)
        events = conn.events()
        assert isinstance(events[-1], p.Error) and events[-1].fatal, events
        assert match in events[-1].message
        assert match in capfd.readouterr().err  # and a log line
        # The bystander's lease and queued request are as they were, and its own retime works.
        assert [r["id"] for r in other.inspect("leases")["leases"]] == [lease.id]
        assert ticket.retime(20.0)
        [row] = other.inspect("resources")["resources"]
        assert row["waiting"] == 1
        other.release(lease)
        other.release(ticket.wait())
    finally:
        other.close()


def test_frames_behind_a_fatal_retime_are_not_carried_out(start_coordinator: Any, sock_path: str) -> None:
    """A retime of a request the session never sent ends it; the frames that
    came in the same read behind it are not carried out for a session already
    ended. Before: an acquire there was granted to it (no one told), and its
    lease fenced at the close, taking the slot for quarantine_delay."""
    start_coordinator({"r": {"max_size": 1, "quarantine_delay": 60.0}})
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "odd")))
    # One write: the coordinator reads both frames at once.
    s.sendall(p.encode(p.Retime(5, 1.0)) + p.encode(p.Acquire(6, "r", 0.0, None)))
    data = read_until_closed(s)
    s.close()
    conn = p.Connection(p.CLIENT)
    conn.receive_data(data)
    events = conn.events()
    assert not any(isinstance(e, p.Grant) for e in events), events
    assert isinstance(events[-1], p.Error) and events[-1].fatal, events
    other = Client(sock_path)
    try:
        [row] = other.inspect("resources")["resources"]
        assert (row["leased"], row["fenced"]) == (0, 0), row
        other.release(other.acquire("r", timeout=2))
    finally:
        other.close()
