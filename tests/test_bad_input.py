"""I5: whatever a peer sends, only its own session ends; the coordinator goes on."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

import psutil
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


def test_client_that_never_speaks_is_closed(start_coordinator: Any, sock_path: str) -> None:
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
    check_normal_client(sock_path)


def test_client_that_stops_reading_is_ended(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    bystander = Client(sock_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(p.encode(p.Hello(p.PROTOCOL_VERSION, os.getpid(), "deaf")))
    frame = p.encode(p.Inspect(1, "resources", {}))
    s.settimeout(10)
    sent = 0
    try:
        # Ask for replies and never read them, until the coordinator gives up on us.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s.sendall(frame * 100)
            sent += 100
    except OSError:
        pass  # the coordinator closed the session (EPIPE / reset)
    finally:
        s.close()
    assert sent < 1_000_000
    # Only that session ended.
    assert len(bystander.inspect("sessions")["sessions"]) == 1
    assert bystander.acquire("r", timeout=2)
    bystander.close()


def test_fuzz_script_runs_standalone(start_coordinator: Any, sock_path: str) -> None:
    import subprocess
    import sys

    start_coordinator({"r": 1})
    script = Path(__file__).with_name("fuzz_frames.py")
    out = subprocess.run([sys.executable, str(script), sock_path, "--frames", "2000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "a normal client still works" in out.stdout


def test_half_sent_frame_ends_the_session(start_coordinator: Any, sock_path: str) -> None:
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
    check_normal_client(sock_path)
