"""Opening a session: connect to the coordinator's socket, say HELLO (with the
leases this process still holds, so that a restarted coordinator takes them
back, I4) and read up to the WELCOME; then install the session in its client
(:func:`connect`), when no backoff holds it back (:func:`try_connect`).

The session's socket options are set here too: reads come in bounded slices
(a reader looks at its deadline between them) and a send that cannot go out
for :data:`SEND_TIMEOUT` fails instead of hanging.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import background, receiving
from . import protocol as p
from .config import explain_denied, not_a_socket
from .errors import AccessDenied, CoordinatorUnavailable, RemoteProtocolError, SharedPoolError
from .readable import cooperative

if TYPE_CHECKING:
    from .client import Client
    from .lease import Lease

log = logging.getLogger("sharedpool.client")

#: SO_RCVTIMEO of the session socket: how long one blocking read may last.
_RCV_SLICE = struct.pack("ll", 0, 50_000)
#: How long one frame may take to go out. A coordinator that is alive but does
#: not read (stopped, wedged) would otherwise, once the socket buffer is full,
#: hold a checkin or a release forever; past this, the session counts as lost.
SEND_TIMEOUT = 10.0
#: A connect that found the coordinator's listen queue full is tried again
#: after this, doubling up to CONNECT_RETRY_MAX (within the handshake's limit).
CONNECT_RETRY_MIN = 0.001
CONNECT_RETRY_MAX = 0.05
#: The timeout of an acquire re-sent on a new session when its own has run out.
MIN_RESENT_WAIT = 0.001


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
        try:
            _connect(sock, path, end)
        except ConnectionRefusedError as exc:
            if (kind := not_a_socket(path)) is None:
                raise
            raise ConnectionRefusedError(exc.errno, f"the path is {kind}, not a socket") from None
        except PermissionError as exc:  # it names no path: say which directory (or socket) denied it
            raise explain_denied(exc, path) from None
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
            try:
                for msg in conn.events():
                    if welcome is not None:
                        early.append(msg)
                    elif isinstance(msg, p.Error):
                        raise error_from(msg)
                    elif isinstance(msg, p.Welcome):
                        welcome = msg
            except RemoteProtocolError as exc:
                if welcome is not None:
                    raise
                # Something else listens there (a --socket naming PostgreSQL's socket):
                # its bytes read as a huge frame, which alone said nothing useful.
                raise RemoteProtocolError("what answers there is no sharedpool coordinator "
                                          f"(its first reply is no sharedpool frame: {exc})") from None
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCV_SLICE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", int(SEND_TIMEOUT), int(SEND_TIMEOUT % 1 * 1_000_000)))
        if cooperative(sock):
            # gevent's or eventlet's socket: its fd is non-blocking underneath and
            # only its own timeout bounds a wait (it ignores SO_SNDTIMEO). Its reads
            # never wait (receiving.recv), so this bounds the sends.
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


def _connect(sock: socket.socket, path: str, end: float | None) -> None:
    """``sock.connect(path)``, tried again until ``end`` while the coordinator's
    listen queue is full: a Unix socket with a timeout fails at once then
    (EAGAIN, not TCP's EINPROGRESS), and a burst of workers starting or
    reconnecting after a restart met "Resource temporarily unavailable"."""
    green = cooperative(sock)
    timeout = sock.gettimeout()
    if green:
        # gevent's and eventlet's connect meets EAGAIN by waiting for the socket
        # to be writable, which an unconnected Unix socket always is: it called
        # connect() some 50,000 times a second, a core's worth, until its
        # timeout. Without a timeout their connect is the plain one, paced here
        # (their sleep lets the other greenlets run).
        sock.settimeout(0.0)
    pause = CONNECT_RETRY_MIN
    try:
        while True:
            try:
                sock.connect(path)
                return
            except BlockingIOError:
                if end is not None and time.monotonic() + pause >= end:
                    raise TimeoutError("timed out: the coordinator's queue of connections "
                                       "stayed full") from None
                time.sleep(pause)
                pause = min(pause * 2, CONNECT_RETRY_MAX)
    finally:
        if green:
            sock.settimeout(timeout)


def try_connect(client: Client, deadline: float | None, force: bool = False) -> None:
    """Connect now unless a backoff is running (then the thread retries);
    ``force`` tries regardless of the backoff. A caller's ``deadline``
    bounds the wait for another thread's attempt and, while this process
    holds no leases, the handshake too: a coordinator that accepts but
    does not answer must not hold an acquire(timeout=0.1) for
    connect_timeout. A hello that re-registers held leases is never cut
    short: the coordinator would fence leases whose connections live on."""
    if client._closed or (time.monotonic() < client._next_attempt and not force):
        return
    wait = bound(client.connect_timeout, deadline)
    if wait is not None and wait <= 0:
        return
    if not client._send_lock.acquire(timeout=-1 if wait is None else wait):
        return  # another thread's attempt runs on; it re-sends our request
    early: list[p.Message] = []
    try:
        if client._sock is not None or client._closed:
            return
        if time.monotonic() < client._next_attempt and not force:
            return  # the attempt we waited behind failed: its backoff holds for us too
        limit = bound(client.connect_timeout, None if client._held else deadline)
        if limit is not None and limit <= 0:
            return
        try:
            sock, early = connect(client, limit)
        except (OSError, SharedPoolError) as exc:
            client.last_error = str(exc)
            client._next_attempt = time.monotonic() + client._backoff
            client._backoff = min(client._backoff * 2, background.BACKOFF_MAX)
            if isinstance(exc, AccessDenied):
                client._fail_all(exc)
            return
    finally:
        client._send_lock.release()
    if not client._sick:  # a coordinator that welcomes, then sends garbage, is not hammered
        client._backoff = background.BACKOFF_MIN
    # Frames that came in the welcome's recv() (a reclaim, a push, an
    # error): dispatched now, outside the send lock (a dispatch may send),
    # and only while that session lasts (not into a later one).
    for msg in early:
        if client._sock is not sock:
            break
        receiving.dispatch(client, msg, sock)


def connect(client: Client, limit: float | None) -> tuple[socket.socket, list[p.Message]]:
    # Called with the send lock held: nothing is sent on a half-made session.
    # Returns the session's socket and what arrived behind the welcome, for
    # the caller to dispatch. ``limit`` bounds the whole handshake (None: no bound).
    held_ids: list[int] = []
    held: list[Any] = []
    dropped: list[Lease] = []

    def hello() -> p.Hello:
        with client._cond:
            leases = list(client._held.values())
        msg = p.Hello(version, os.getpid(), client.name,
                      [[lease.resource, lease.id, lease.token, "idle", None] for lease in leases])
        # A hello over the frame limit could never be sent: the process
        # would stay without a session for good, every lease it holds
        # uncounted. What does not fit is given up below instead.
        fits = p.held_that_fits(msg)
        msg.held[fits:] = []
        held.extend(msg.held)
        held_ids.extend(lease.id for lease in leases[:fits])
        dropped.extend(leases[fits:])
        return msg

    version = p.PROTOCOL_VERSION
    end = None if limit is None else time.monotonic() + limit  # the hello said again included
    while True:
        left = None if end is None else end - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("timed out")
        # Kept where a fork finds it: the child must close its copy of a
        # half-made session too, or the parent's death would go unseen.
        client._connecting_since = time.monotonic()
        # In _ends too: what the client's finalizer closes if it is collected unclosed.
        sock = client._connecting = client._ends[2] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn, welcome, early = shake_hands(sock, client.socket_path, left, hello)
        except CoordinatorUnavailable as exc:
            client._connecting = None
            older = p.spoken_by_refuser(str(exc))
            if older is None or older >= version:
                raise
            # An older coordinator (a rolling upgrade): hello again in its version.
            log.info("coordinator %s speaks protocol %d: saying hello in it", client.socket_path, older)
            version = older
            held.clear()
            held_ids.clear()
            dropped.clear()
            continue
        except BaseException:
            client._connecting = None
            raise
        break
    with client._cond:
        if client._closed:
            # close() ran during the handshake: it saw no session to end,
            # so this one must not start (it would hold the re-registered
            # leases until the process exits).
            client._connecting = None
            sock.close()
            raise CoordinatorUnavailable("client closed during the handshake")
        # Never in neither attribute, for the same reason.
        client._sock, client._conn, client._connecting = sock, conn, None
        client.session_id, client.server_pid = welcome.session, welcome.server_pid
        client.protocol_version = welcome.version
        client.limits = welcome.resources
        if client.reconnects:
            # A new session after a lost one: what was pushed on the old one
            # may no longer hold (a drain the restarted coordinator knows nothing of).
            for handler in client._push_handlers:
                client._jobs.append(functools.partial(handler, "welcome", None,
                                                    {"resources": welcome.resources}))
        client._last_report = None
        client._sent_costs = {}  # a new coordinator knows none of them
        # Re-send what was waiting when the old session died, and release
        # what was let go while the handshake ran (its Release was dropped:
        # there was no session to send it on).
        now = time.monotonic()
        resend: list[p.Message] = []
        for pd in client._pending.values():
            if not pd.done:
                pd.since = now  # queued at this coordinator from now on, if at all (Client.siblings_waiting)
                if isinstance(pd.msg, p.Acquire) and pd.ends is not None:
                    # What is left of its wait: with its whole timeout again, the new
                    # coordinator held it past the caller's own deadline, which read as
                    # a coordinator that never answered, and counted no timeout. Queued
                    # however briefly: it has waited, and a timeout of 0 is a mere try.
                    pd.msg.timeout = max(MIN_RESENT_WAIT, pd.ends - now)
                resend.append(pd.msg)
        resend += [p.Release(lid) for lid in held_ids if lid not in client._held]
        # Leases the hello had no room for count against no cap now: their
        # connections are closed, as those of leases the coordinator revoked.
        revoked = [lease for lease in dropped if client._held.pop(lease.id, None) is not None]
        for lease in revoked:
            client._forget_giving(lease)
        why = "the hello that re-registers held leases had no room for it"
        for lease in revoked:
            for handler in client._push_handlers:
                client._jobs.append(functools.partial(handler, "revoke", lease.resource,
                                                    {"lease": lease.id, "why": why}))
        client._cond.notify_all()
    if revoked:
        log.warning("coordinator %s: %d held lease(s) did not fit in the hello (frame limit %d "
                    "bytes) and were not re-registered; their connections are closed",
                    client.socket_path, len(revoked), p.DEFAULT_MAX_FRAME)
    if held or client.reconnects:
        log.warning("reconnected to coordinator %s (session %s), re-registered %d lease(s)",
                    client.socket_path, welcome.session, len(held))
    client.reconnects += 1
    try:
        for msg in resend:
            sock.sendall(p.encode(msg))
    except OSError as exc:  # not reading, or gone again: this session is over
        client._disconnect(f"send failed: {exc}")
        return sock, []
    client._notify()  # the background thread watches the new socket from now on
    return sock, early


def bound(timeout: float | None, deadline: float | None) -> float | None:
    """Seconds left under both ``timeout`` and ``deadline`` (None: unbounded,
    as is a wait too long for a lock or a socket timeout: they raise
    OverflowError beyond threading.TIMEOUT_MAX, some 292 years)."""
    left = timeout
    if deadline is not None:
        left = deadline - time.monotonic() if timeout is None else min(timeout, deadline - time.monotonic())
    return None if left is not None and left >= threading.TIMEOUT_MAX else left
