"""A Client made by hand and dropped without close() is collected (its
background thread holds it weakly): its finalizer closes its sockets at once,
so the coordinator ends the session and fences the leases it held (I2), its
thread ends, no fd is left, and nothing of ours warns but one ResourceWarning
naming the Client whose session was open (as psycopg's for a connection)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from proc_helpers import run_in_child

from sharedpool import Client

NAMED = "sharedpool Client for"


def _until(done: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _collect() -> bool:
    gc.collect()
    return True


def _same_file(fd: int, ino: int) -> bool:
    """Whether ``fd`` is still open on the file it was (not a number reused since)."""
    try:
        return os.fstat(fd).st_ino == ino
    except OSError:
        return False


def _drop_holding_a_lease(sock_path: str) -> tuple[weakref.ref[Client], threading.Thread,
                                                  int, list[tuple[int, int]]]:
    """A client that holds a lease, then is lost (not closed): a weak
    reference, its thread, the lease id and its sockets' (fd, inode) come back."""
    client = Client(sock_path, name="dropped")
    lease = client.acquire("r", timeout=5)
    thread = client._thread
    assert client._sock is not None and thread is not None
    ends = [(s.fileno(), os.fstat(s.fileno()).st_ino)
            for s in (client._sock, client._wake_r, client._wake_w)]
    return weakref.ref(client), thread, lease.id, ends


def test_a_dropped_client_ends_its_session_at_once_and_its_lease_is_fenced(
        start_coordinator: Any, sock_path: str) -> None:
    """Before: the session socket stayed open until the thread's next wake-up
    (up to a second) and was then closed by the socket's own finalizer (a
    ResourceWarning about our internals); a client never connected had its wake
    pair closed the same way."""
    # A long quarantine: the lease is seen fenced (its session ended), not yet back.
    start_coordinator({"r": {"max_size": 2, "quarantine_delay": 60}})
    probe = Client(sock_path, name="probe")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref, thread, lease_id, ends = _drop_holding_a_lease(sock_path)
            # Again until collected: a tick of its thread (woken by the acquire)
            # holds it a moment longer, and is the one to drop it then.
            assert _until(lambda: _collect() and ref() is None), "the dropped client was never collected"
            # Waited for too: collected by its thread, the finalizer may still be
            # closing them there as the reference reads None here.
            assert _until(lambda: not [fd for fd, ino in ends if _same_file(fd, ino)]), "sockets left open"
            assert _until(lambda: any(sock_path in str(w.message) for w in caught)), "no warning"
        ours = [str(w.message) for w in caught if sock_path in str(w.message)]
        assert len(ours) == 1 and NAMED in ours[0], ours
        thread.join(5)
        assert not thread.is_alive()

        def fenced() -> bool:
            return lease_id in [x["id"] for x in probe.inspect("fenced")["fenced"]]
        assert _until(fenced), probe.inspect("leases")
        assert [s["name"] for s in probe.inspect("sessions")["sessions"]] == ["probe"]
    finally:
        probe.close()


def test_a_forked_child_dropping_an_inherited_client_ends_nothing_of_the_parents(
        start_coordinator: Any, sock_path: str) -> None:
    """I7: the child's collection closes its own sockets, never the parent's session."""
    start_coordinator({"r": 2})
    probe = Client(sock_path, name="probe")
    # Held in a list, not a local: the child's copy of this frame must not keep it.
    holder = [Client(sock_path, name="parent")]
    try:
        lease = holder[0].acquire("r", timeout=5)
        session = holder[0].session_id

        def child() -> int:
            ref = weakref.ref(holder[0])
            holder.clear()
            gc.collect()
            left = ref()
            if left is None:
                return 0  # collected here: its finalizer ran, in the child
            # Forked while the parent's background thread was in a tick: that
            # thread's frame, dead here, holds the client for good. Its
            # finalizer is run as the collection would have, in the child.
            fin = [f for f in gc.get_objects() if isinstance(f, weakref.finalize)
                   and (info := f.peek()) is not None and info[0] is left]
            del left
            if len(fin) != 1:
                return 5
            fin[0]()
            return 0

        assert run_in_child(child) == 0
        time.sleep(0.2)  # a session the child ended would be seen by now
        client = holder[0]
        assert client.session_id == session and client.connected
        assert [x["id"] for x in probe.inspect("leases")["leases"]] == [lease.id]
        client.release(lease)
        client.release(client.acquire("r", timeout=5))  # the session still serves
        assert client.session_id == session
    finally:
        for client in holder:
            client.close()
        probe.close()


_SCRIPT = """
import gc, sys
from sharedpool import Client
path = sys.argv[1]
Client(path)  # never used: it has no session, only its wake pair
gc.collect()
client = Client(path)
client.release(client.acquire("r", timeout=5))
thread = client._thread
del client
gc.collect()
thread.join(5)  # what its thread dropped on its way out, finalized too
assert not thread.is_alive()
print("done")
"""


def test_a_dropped_client_warns_of_itself_not_of_its_sockets(
        start_coordinator: Any, sock_path: str) -> None:
    """Under ``python -X dev``: before, each dropped client gave "unclosed
    <socket.socket ...>" warnings (its wake pair, its session socket)."""
    start_coordinator({"r": 2})
    out = subprocess.run([sys.executable, "-X", "dev", "-c", _SCRIPT, sock_path],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "done", out.stderr
    assert "unclosed" not in out.stderr, out.stderr
    # The connected one only: a client never connected leaked nothing anyone sees.
    assert out.stderr.count(f"ResourceWarning: {NAMED}") == 1, out.stderr
