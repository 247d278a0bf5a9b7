"""Frames the coordinator has not taken yet: sent without blocking the caller.

A send on the session socket used to be a ``sendall`` bounded by
SO_SNDTIMEO (:data:`~sharedpool.handshake.SEND_TIMEOUT`, 10 s). Once the
coordinator stopped reading (SIGSTOP, a hung event loop) the socket's buffer
filled after a few hundred small frames, and from then on every caller that
sent anything (an ``acquire(timeout=0.01)``, a checkin releasing a lease, a
cancel) waited there, or on the send lock behind it, for up to 10 s. Now a
frame goes out as far as the socket takes it at once; the rest waits here, in
order, and the background thread sends it when the socket is writable. The
session still ends as before if the coordinator takes nothing for
``SEND_TIMEOUT``, or if more than :data:`MAX_BYTES` pile up.

Only for standard sockets: a gevent / eventlet socket's send parks its
greenlet, not the thread, and keeps its own timeout.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("sharedpool.client")

#: Unsent bytes beyond this: the coordinator is not reading, the session ends.
MAX_BYTES = 8 << 20
#: Sent from the outbox this much at a time.
CHUNK = 256 << 10


class NotReading(OSError):
    """The coordinator took nothing for SEND_TIMEOUT, or too much piled up."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.EAGAIN, why)


def _send_some(sock: socket.socket, data: memoryview) -> int:
    """Send what the socket takes now; how many bytes went. OSError only if
    none went: bytes that went and were then not counted stayed in the outbox
    and went again (close() sends its rest), two frames' bytes mixed."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if not sent:
                raise
            break  # the error comes again at the next send, which ends the session
    return sent


def _drain(sock: socket.socket, box: bytearray) -> int:
    """Send from the front of ``box`` what the socket takes now, removing it;
    how many bytes went. Copied out a chunk at a time: a view of the
    bytearray would forbid resizing it while one lives (a traceback's)."""
    total = 0
    while box:
        chunk = bytes(box[:CHUNK])
        sent = _send_some(sock, memoryview(chunk))
        del box[:sent]
        total += sent
        if sent < len(chunk):
            break
    return total


def send(client: Client, sock: socket.socket, data: bytes) -> bool:
    """Send ``data`` on ``sock`` (the session's), never waiting for the
    coordinator; called with the send lock held. True if some of it waits
    here for the background thread. OSError as from a send."""
    if client._outbox_sock is not sock:  # what waited for an ended session goes with it
        client._outbox_sock, client._outbox = sock, bytearray()
    box = client._outbox
    if box and _drain(sock, box):  # moved along by every sender too, not only the background thread
        client._outbox_since = time.monotonic()
    if not box:
        sent = _send_some(sock, memoryview(data))
        if sent == len(data):
            return False
        client._outbox_since = time.monotonic()
        data = data[sent:]
    box += data
    if len(box) > MAX_BYTES:
        raise NotReading(f"{len(box)} bytes unsent")
    return True


def waiting(client: Client) -> socket.socket | None:
    """The session socket if frames wait to go out on it."""
    sock = client._outbox_sock
    return sock if client._outbox and sock is not None and sock is client._sock else None


def deadline(client: Client, send_timeout: float) -> float | None:
    """When the session ends unless the waiting frames move (monotonic)."""
    return client._outbox_since + send_timeout if waiting(client) is not None else None


def flush(client: Client, send_timeout: float) -> None:
    """Send what waits (background thread); ends the session if the coordinator
    has taken nothing of it for ``send_timeout``."""
    if waiting(client) is None:
        return
    with client._send_lock:
        sock = waiting(client)
        if sock is None:
            return
        box = client._outbox
        try:
            sent = _drain(sock, box)
        except OSError as exc:
            client._disconnect(f"send failed: {exc}", only=sock)
            return
        if sent:
            client._outbox_since = time.monotonic()  # it reads: a slow reader is no dead one
        if box and time.monotonic() - client._outbox_since >= send_timeout:
            log.warning("coordinator %s has not read for %gs; dropping the session",
                        client.socket_path, send_timeout)
            client._disconnect(f"send failed: the coordinator has not read for {send_timeout:g}s",
                               only=sock)


def take(client: Client, sock: socket.socket | None) -> bytes:
    """What still waits to go out on ``sock`` (a closing session's), handed
    over to its goodbye; the outbox is emptied."""
    if sock is None or client._outbox_sock is not sock:
        return b""
    data = bytes(client._outbox)
    client._outbox = bytearray()
    return data
