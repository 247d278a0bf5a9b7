"""Opening a session: connect to the coordinator's socket, say HELLO (with the
leases this process still holds, so that a restarted coordinator takes them
back, I4) and read up to the WELCOME.

The session's socket options are set here too: reads come in bounded slices
(a reader looks at its deadline between them) and a send that cannot go out
for :data:`SEND_TIMEOUT` fails instead of hanging.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

from . import protocol as p
from .errors import AccessDenied, CoordinatorUnavailable, SharedPoolError
from .readable import cooperative

#: SO_RCVTIMEO of the session socket: how long one blocking read may last.
_RCV_SLICE = struct.pack("ll", 0, 50_000)
#: How long one frame may take to go out. A coordinator that is alive but does
#: not read (stopped, wedged) would otherwise, once the socket buffer is full,
#: hold a checkin or a release forever; past this, the session counts as lost.
SEND_TIMEOUT = 10.0


def shake_hands(sock: socket.socket, path: str, limit: float | None, hello: Callable[[], p.Hello]
                ) -> tuple[p.Connection, p.Welcome, list[p.Message]]:
    """Connect the new Unix stream socket ``sock`` to ``path`` and run the
    handshake within ``limit`` seconds (None: no bound). ``hello()`` makes the
    HELLO once the socket is connected. The caller makes the socket, so that
    it can find it while the handshake runs (a fork must close the child's copy).

    Returns the protocol state, the WELCOME, and the frames that arrived
    behind it (the session's first: not to be lost). Raises OSError
    (TimeoutError past ``limit``), the coordinator's refusal as an error
    (AccessDenied, CoordinatorUnavailable), or CoordinatorUnavailable if it
    hung up; ``sock`` is closed then.
    """
    end = None if limit is None else time.monotonic() + limit
    try:
        sock.settimeout(limit)
        sock.connect(path)
        conn = p.Connection(p.CLIENT)
        data = conn.send(hello())
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # A refused peer gets an error frame and is hung up on at once,
            # maybe before our hello is out: read why before saying "broken pipe".
            cut: OSError | None = exc
        else:
            cut = None
        welcome = None
        early: list[p.Message] = []
        while welcome is None:
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except ConnectionResetError as exc:
                raise _hung_up(exc) from None
            if not data:
                raise _hung_up(cut)
            conn.receive_data(data)
            for msg in conn.events():
                if welcome is not None:
                    early.append(msg)
                elif isinstance(msg, p.Error):
                    raise error_from(msg)
                elif isinstance(msg, p.Welcome):
                    welcome = msg
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCV_SLICE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), int(SEND_TIMEOUT % 1 * 1_000_000)))
        if cooperative(sock):
            # gevent's or eventlet's socket: its fd is non-blocking underneath and
            # only its own timeout bounds a wait (it ignores SO_SNDTIMEO). Its reads
            # never wait (the client's _recv), so this bounds the sends.
            sock.settimeout(SEND_TIMEOUT)
    except BaseException:
        sock.close()
        raise
    return conn, welcome, early


def _hung_up(exc: OSError | None) -> CoordinatorUnavailable:
    """The coordinator closed the connection before its welcome, with no word
    why: so it does at its open-file limit (libuv accepts and closes each new
    session at once), or while it stops."""
    cause = f" ({exc.strerror})" if exc is not None and exc.strerror else ""
    return CoordinatorUnavailable(f"coordinator closed the connection during hello{cause}: it "
                                  "does so at its open-file limit (see its log), or while stopping")


def error_from(msg: p.Error) -> SharedPoolError:
    """The exception an ERROR frame from the coordinator stands for."""
    if msg.code == "access_denied":
        return AccessDenied(msg.message)
    if msg.code in ("protocol_error", "hello_timeout", "not_reading"):
        return CoordinatorUnavailable(f"{msg.code}: {msg.message}")
    return SharedPoolError(f"{msg.code}: {msg.message}")
