"""Rolling upgrades: what a release point's processes put on the wire and in the
restart marker, read by this code, and the other way round.

Operators upgrade one side at a time: workers of one version talk to a
coordinator of another for a while, and a coordinator hands its marker
(``<socket>.restart``) to one of the other version. The decoder is strict (an
unknown field or op ends the session, I5) and the handshake refuses another
protocol version, so within one PROTOCOL_VERSION the frames must stay exactly
what the release spoke. The frames and the marker below were written by the
release point 4f8645c (its own venv, real processes); a mixed-version run of
that release against this code (coordinator of one, workers and CLI of the
other, kill -9 and restart across versions under PostgreSQL) found them
interchangeable. Changing a message's fields needs a new PROTOCOL_VERSION,
and then a README note: the two versions cannot share a coordinator.

Protocol 3 added one op (``retime``) and changed no other frame: the
release's frames below still decode to the same messages, and a session says
which version it speaks in its hello: a coordinator serves a version-2 worker
in version 2 (refusing ``retime`` there), and a worker whose hello a version-2
coordinator refuses says hello again in version 2 (and sends no ``retime``).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import pytest
from fake_coordinator import FakeCoordinator
from servers import wait_for

from sharedpool import Client
from sharedpool import protocol as p
from sharedpool.config import Resource
from sharedpool.effects import StartFence
from sharedpool.errors import LocalProtocolError, RemoteProtocolError
from sharedpool.ledger import Ledger
from sharedpool.marker import handed_on, read_marker, write_marker
from sharedpool.records import BUSY, IDLE

#: Each op with every field set, as 4f8645c framed it (protocol 2).
RELEASE_FRAMES: list[tuple[p.Message, str]] = [
    (p.Hello(2, 4242, "w-1", [["pg", 7, 7, "idle", 1234]]),
     "0000003785a776657273696f6e02a3706964cd1092a46e616d65a3772d31a468656c649195a2706707"
     "07a469646c65cd04d2a26f70a568656c6c6f"),
    (p.Acquire(1, "pg", 2.5, "app.py:10"),
     "0000003d85a372657101a87265736f75726365a27067a774696d656f7574cb4004000000000000a473"
     "697465a96170702e70793a3130a26f70a761637175697265"),
    (p.Cancel(1), "0000001082a372657101a26f70a663616e63656c"),
    (p.Release(7), "0000001382a56c6561736507a26f70a772656c65617365"),
    (p.Report([[7, "busy", 1234, "app.py:10", False]], {"pg": 2}, ["redis"], {"pg": 0.004}),
     "0000005385a6737461746573919507a462757379cd04d2a96170702e70793a3130c2a86661696c7572"
     "657381a2706702a26f6b91a57265646973a5636f73747381a27067cb3f70624dd2f1a9fca26f70a672"
     "65706f7274"),
    (p.Inspect(2, "leases", {"resource": "pg"}),
     "0000003284a372657102a477686174a66c6561736573a766696c7465727381a87265736f75726365a2"
     "7067a26f70a7696e7370656374"),
    (p.Admin(3, "drain", {"resource": "pg"}),
     "0000002c84a372657103a476657262a5647261696ea46172677381a87265736f75726365a27067a26f"
     "70a561646d696e"),
    (p.Welcome(2, 3, 99, {"pg": {"max_size": 4, "fairness_quantum": "auto"}}),
     "0000005985a776657273696f6e02a773657373696f6e03aa7365727665725f70696463a97265736f75"
     "7263657381a2706782a86d61785f73697a6504b0666169726e6573735f7175616e74756da46175746f"
     "a26f70a777656c636f6d65"),
    (p.Grant(1, 7, "pg", 7),
     "0000002985a372657101a56c6561736507a87265736f75726365a27067a5746f6b656e07a26f70a567"
     "72616e74"),
    (p.Deny(1, "timeout", "no lease within 2.5s"),
     "0000003a84a372657101a6726561736f6ea774696d656f7574a76d657373616765b46e6f206c656173"
     "652077697468696e20322e3573a26f70a464656e79"),
    (p.Reclaim("pg", 1, 0.25),
     "0000003084a87265736f75726365a27067a5636f756e7401a77175616e74756dcb3fd0000000000000"
     "a26f70a77265636c61696d"),
    (p.Push("drain", "pg", {}), "0000002684a476657262a5647261696ea87265736f75726365a27067a4"
     "6172677380a26f70a470757368"),
    (p.Reply(2, {"leases": []}), "0000001d83a372657102a46461746181a66c656173657390a26f70a5"
     "7265706c79"),
    (p.Error("protocol_error", "bad", 4, True),
     "0000003685a4636f6465ae70726f746f636f6c5f6572726f72a76d657373616765a3626164a3726571"
     "04a5666174616cc3a26f70a56572726f72"),
]

#: Ops protocol 3 added, as this code frames them (no release spoke them yet).
PROTOCOL_3_FRAMES: list[tuple[p.Message, str]] = [
    (p.Retime(1, 4.5), "0000002183a372657101a774696d656f7574cb4012000000000000a26f70a6726574696d65"),
]

#: A marker 4f8645c wrote while serving (then SIGKILLed): pid 3562 died in a
#: query (fenced, backend 3610), pids 3568 and 3565 held a lease each.
RELEASE_MARKER = (
    '{"pid":3552,"boot":"f56949ea-dc57-4ec9-9511-f648511ad1b1","mono":4817.855485581,'
    '"fenced":[["pg",1795984039698838,1795984039698838,3562,19.97900000000027,3610]],'
    '"held":[["pg",1795984039698839,1795984039698839,3568,3616],'
    '["pg",1795984039698840,1795984039698840,3565,3626]],"late":[],'
    '"started":[[1795984039698839,0.391,0.387],[1795984039698840,0.359,0.326],'
    '[1795984039698838,0.419,0.411]]}'
)


def test_frames_are_those_of_the_release_and_of_protocol_3() -> None:
    """Each op frames to the release's bytes (protocol 2; those protocol 3
    added, to the bytes recorded for it), and those bytes decode to the same
    message: neither side sends a field the other refuses. A failure here
    breaks every mixed-version deployment: bump PROTOCOL_VERSION (and say in
    the README that the versions cannot be mixed) instead."""
    assert p.PROTOCOL_VERSION == 3, "a new protocol: record its frames here, keep 2's and 3's history"
    frames = RELEASE_FRAMES + PROTOCOL_3_FRAMES
    assert sorted(msg.op for msg, _ in frames) == sorted(p.MESSAGE_TYPES)
    for msg, hexed in frames:
        frame = bytes.fromhex(hexed)
        assert p.encode(msg) == frame, msg.op
        assert p.decode_body(frame[4:], msg.sender) == msg


def test_a_protocol_2_worker_is_served_in_protocol_2() -> None:
    """The release's hello (version 2) is taken, and answered in version 2
    (its client refuses any other welcome); an op protocol 3 added ends that
    session as an unknown op did there."""
    [hello] = [h for m, h in RELEASE_FRAMES if m.op == "hello"]
    server = p.Connection(p.SERVER)
    server.receive_data(bytes.fromhex(hello))
    assert isinstance(server.next_event(), p.Hello) and server.version == 2
    welcome = server.send(p.Welcome(2, 1, 1, {}))
    [release_welcome] = [h for m, h in RELEASE_FRAMES if m.op == "welcome"]
    assert p.decode_body(welcome[4:], p.SERVER).version == p.decode_body(
        bytes.fromhex(release_welcome)[4:], p.SERVER).version == 2
    server.receive_data(p.encode(p.Retime(1, 1.0)))
    with pytest.raises(RemoteProtocolError, match="'retime' is not in protocol 2"):
        server.next_event()


def test_a_worker_takes_a_protocol_2_welcome_to_its_protocol_2_hello() -> None:
    client = p.Connection(p.CLIENT)
    client.send(p.Hello(2, 1, "w"))
    [welcome] = [h for m, h in RELEASE_FRAMES if m.op == "welcome"]
    client.receive_data(bytes.fromhex(welcome))
    assert isinstance(client.next_event(), p.Welcome) and client.version == 2
    with pytest.raises(LocalProtocolError, match="'retime' is not in protocol 2"):
        client.send(p.Retime(1, 1.0))


def test_a_worker_reads_the_newest_version_a_refusing_coordinator_speaks() -> None:
    # What the release (and this code, to a protocol 4 worker) says as it refuses a hello.
    assert p.spoken_by_refuser("protocol_error: protocol version 3 not supported (this side speaks 2)") == 2
    assert p.spoken_by_refuser("protocol version 4 not supported (this side speaks 2 to 3)") == 3
    assert p.spoken_by_refuser("protocol version 3 not supported (this side speaks 1)") is None
    assert p.spoken_by_refuser("access_denied: uid 5 may not use this coordinator") is None


def _restored(tmp_path: Any) -> tuple[Ledger, list[Any]]:
    path = tmp_path / "c.sock.restart"
    path.write_text(RELEASE_MARKER)
    handed = read_marker(str(path))
    lg = Ledger({"pg": Resource(3, monitor_dsn="postgresql:///x")}, hold_until=11.5)
    effects = lg.restore_held(handed["held"], 10.0, handed["started"])
    effects += lg.restore_fenced(handed["fenced"], 10.0, handed["late"], handed["started"])
    return lg, effects


def test_a_marker_of_the_release_is_restored(tmp_path: Any) -> None:
    """The release's dead worker stays fenced on its backend, its live
    workers' leases count until they re-register and then are theirs again,
    and no grant reuses a handed-on lease id."""
    lg, effects = _restored(tmp_path)
    res = lg.resources["pg"]
    assert res.leased == 3 and len(res.fenced) == 3
    [fence] = [e for e in effects if isinstance(e, StartFence)]
    assert (fence.pid, fence.backend_pids) == (3562, (3610,))
    sid, _ = lg.open_session(3568, "w", 10.5, held=[["pg", 1795984039698839, 1795984039698839, BUSY, 3616]])
    assert [x.id for x in lg.sessions[sid].leases.values()] == [1795984039698839]
    assert res.leased == 3 and len(res.fenced) == 2
    assert lg._next_id > 1795984039698840


def test_a_marker_of_this_code_has_the_release_shape(tmp_path: Any) -> None:
    """What this code hands on has the keys and row widths the release's
    reader takes (it skips rows of any other width: their leases would not
    count after a downgrade)."""
    lg = Ledger({"pg": Resource(3, monitor_dsn="postgresql:///x")})
    live, _ = lg.open_session(5, "w", 1.0)
    dead, _ = lg.open_session(6, "w", 1.0)
    for sid, req in ((live, 1), (dead, 2)):
        lg.acquire(sid, req, "pg", None, 1.0)
    for sid in (live, dead):
        [lease] = lg.sessions[sid].leases
        lg.report(sid, [[lease, IDLE, 9000 + sid, None]], 2.0)
    lg.close_session(dead, 3.0)

    class Server:
        ledger = lg

    path = str(tmp_path / "m")
    handed = handed_on(Server(), 4.0)
    assert handed is not None
    assert write_marker(path, handed)
    with open(path) as f:
        data = json.load(f)
    # "dropped" is new: the release's reader takes only the keys it knows (a
    # downgrade counts such leases as any live process's, for as long as it runs).
    assert set(data) == {"pid", "boot", "mono", "fenced", "held", "late", "started", "dropped"}
    assert data["dropped"] == []
    assert [len(row) for row in data["fenced"]] == [6]
    assert [len(row) for row in data["held"]] == [5]
    assert [len(row) for row in data["started"]] == [3, 3]
    assert data["late"] == []


def test_a_hello_older_than_the_oldest_version_spoken_is_refused_naming_both() -> None:
    server = p.Connection(p.SERVER)
    server.receive_data(p.encode(p.Hello(p.OLDEST_VERSION - 1, 1, "w")))
    speaks = f"this side speaks {p.OLDEST_VERSION} to {p.PROTOCOL_VERSION}"
    with pytest.raises(RemoteProtocolError, match=speaks):
        server.next_event()


class _Protocol2Coordinator(FakeCoordinator):
    """A coordinator of protocol 2 as the release answers: another version's
    hello gets its refusal and a hang-up; acquires wait (never answered)."""

    def __init__(self, path: str) -> None:
        self.hellos: list[int] = []
        self.ops: list[str] = []
        super().__init__(path)

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        self.ops.append(msg.op)
        if isinstance(msg, p.Hello):
            self.hellos.append(msg.version)
            if msg.version != 2:
                s.sendall(p.encode(p.Error("protocol_error", f"protocol version {msg.version} not "
                                                             "supported (this side speaks 2)")))
                s.shutdown(socket.SHUT_RDWR)
                return
            s.sendall(p.encode(p.Welcome(2, idx + 1, os.getpid(), {})))


def test_a_worker_says_hello_again_to_a_protocol_2_coordinator_and_sends_it_no_retime(
        sock_path: str) -> None:
    # Before: a protocol 3 worker was refused by a protocol 2 coordinator (and the
    # other way round) until both were upgraded: no new lease for the whole while.
    old = _Protocol2Coordinator(sock_path)
    client = Client(sock_path)
    try:
        assert client.ensure_connected()
        assert old.hellos == [p.PROTOCOL_VERSION, 2] and client.protocol_version == 2
        ticket = client.request("r", 5.0)
        wait_for(lambda: "acquire" in old.ops, 5, "the acquire")
        assert ticket.retime(2.0) is False  # not on this session: it would end it
        assert not client.speaks("retime")
        ticket.cancel()
        wait_for(lambda: "cancel" in old.ops, 5, "the cancel")
        assert "retime" not in old.ops and client.session_id is not None
    finally:
        client.close()
        old.stop()


class _SlowProtocol2Coordinator(_Protocol2Coordinator):
    """As slow to answer each hello (refusal or welcome) as a busy one can be."""

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            time.sleep(0.6)
        super().on_message(idx, s, conn, msg)


def test_saying_hello_again_stays_within_the_handshakes_bound(sock_path: str) -> None:
    # connect_timeout bounds the whole handshake, the hello said again included.
    # Before: each hello had the whole bound to itself (1.2 s here, past 1 s: connected).
    old = _SlowProtocol2Coordinator(sock_path)
    client = Client(sock_path, connect_timeout=1.0)
    try:
        assert not client.ensure_connected()
        assert client.last_error == "timed out"
        # (Recorded once answered: the scripted coordinator is still slow at it.)
        wait_for(lambda: old.hellos == [p.PROTOCOL_VERSION, 2], 5, "the hello said again in protocol 2")
    finally:
        client.close()
        old.stop()


def test_a_coordinator_serves_a_protocol_2_worker(start_coordinator: Any, sock_path: str) -> None:
    start_coordinator({"r": 1})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        conn = p.Connection(p.CLIENT)
        s.sendall(conn.send(p.Hello(2, os.getpid(), "release-worker")))
        s.sendall(p.encode(p.Acquire(1, "r", 2.0)))
        got: list[p.Message] = []
        while len(got) < 2:
            conn.receive_data(s.recv(65536))
            got += conn.events()
        welcome, grant = got[:2]
        assert isinstance(welcome, p.Welcome) and welcome.version == 2
        assert isinstance(grant, p.Grant) and grant.resource == "r"
