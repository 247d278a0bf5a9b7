"""What the coordinator sends a client, read by whoever waits for a reply.

Threads share one socket: a caller waiting for its reply reads the socket
itself unless another thread already does (leader/follower), so a lease round
trip costs no thread hand-off; the background thread reads what arrives while
nobody waits. Every frame read is dispatched here: grants and replies to their
pending requests (a grant nobody waits for any more goes straight back),
reclaims and pushes to the pools' handlers, errors to the log.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
import time
from typing import TYPE_CHECKING

from . import background, handshake
from . import protocol as p
from .errors import AccessDenied, CoordinatorUnavailable, RemoteProtocolError, denial_error
from .lease import Lease, _Pending, owner_of_late_grant, tell_unused
from .readable import cooperative

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("sharedpool.client")

#: How long a follower waits before looking again whether it should lead.
FOLLOW_WAIT = 0.02
#: How long a reply may lag behind the coordinator's own deadline.
GRACE = 0.5


def wait_reply(client: Client, pending: _Pending, deadline: float | None) -> None:
    """Leader/follower: read the socket ourselves unless another thread is.

    No ``deadline``: an acquire with the resource's default timeout, sent
    before any session announced it. It gets that default (doubled, as in
    :meth:`Client.request`) once a session does, and ends when no session could
    be had for ``connect_timeout`` (then CoordinatorUnavailable)."""
    resource = pending.msg.resource if deadline is None and isinstance(pending.msg, p.Acquire) else None
    since = time.monotonic()
    while True:
        with client._cond:
            if pending.done:
                return
            if pending.retimed is not None:  # its deadline at the coordinator moved
                deadline = pending.retimed + GRACE
            if client._closed:
                pending.error, pending.done = CoordinatorUnavailable("client closed"), True
                return
            if deadline is None and resource is not None:
                now = time.monotonic()
                default = client._default_timeout(resource)
                if default is not None:
                    deadline = since + 2 * default + GRACE
                elif client._sock is not None:
                    since = now  # a session is up: the unreachable clock starts afresh
                elif client.connect_timeout is not None and now - since > client.connect_timeout + GRACE:
                    return  # _finish says why: unreachable
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            sock = client._sock
            # Greenlets do not lead: the background one already waits on the
            # socket, and eventlet refuses a second reader of an fd.
            lead = (sock is not None and not cooperative(sock)
                    and client._read_lock.acquire(blocking=False))
            if not lead:
                # Not connected, or another thread reads: wait to be told.
                client._cond.wait(FOLLOW_WAIT if remaining is None else min(remaining, FOLLOW_WAIT))
                continue
        try:
            read_until(client, pending, deadline)
        finally:
            client._read_lock.release()
            client._done_reading()


def read_until(client: Client, pending: _Pending, deadline: float | None) -> None:
    sock = client._sock
    if sock is None:
        return
    while not pending.done:
        if deadline is not None and time.monotonic() >= deadline:
            return
        # A blocking recv, bounded by the socket's SO_RCVTIMEO slice (no
        # poll() first: one syscall per reply); between slices we look at
        # the deadline and at a reconnect made elsewhere.
        if not read_available(client, sock, block=True) or client._sock is not sock:
            return


def read_available(client: Client, sock: socket.socket, block: bool) -> bool:
    """Read what is there and dispatch it; False if the session died."""
    try:
        data = recv(sock, block)
    except BlockingIOError:
        return True
    except OSError as exc:
        client._disconnect(f"read failed: {exc}", only=sock)
        return False
    if not data:
        client._disconnect("coordinator closed the connection", only=sock)
        return False
    with client._cond:
        # The session may have ended, and a new one begun, while we read:
        # what the old one sent goes with it, never into the new parser.
        conn = client._conn if client._sock is sock else None
    if conn is None:
        return False
    conn.receive_data(data)
    try:
        messages = conn.events()
    except RemoteProtocolError as exc:
        client._disconnect(f"coordinator sent a bad frame: {exc}", only=sock)
        client._sick = True
        client._next_attempt = time.monotonic() + client._backoff
        client._backoff = min(client._backoff * 2, background.BACKOFF_MAX)
        return False
    if client._sick and any(not (isinstance(m, p.Error) and m.fatal) for m in messages):
        client._sick, client._backoff = False, background.BACKOFF_MIN
    for msg in messages:
        dispatch(client, msg, sock)
    return True


def dispatch(client: Client, msg: p.Message, sock: socket.socket | None = None) -> None:
    """``sock``: the socket ``msg`` was read from. The session may have ended
    since the reader looked (a send failed in another thread) and a new one
    begun, its requests re-sent: the old session's frames are dropped, looked
    at under the lock that the new session is published under."""
    if isinstance(msg, p.Grant):
        lease = Lease(msg.lease, msg.resource, msg.token)
        with client._cond:
            stale = sock is not None and client._sock is not sock
            pending = client._pending.get(msg.req)
            if not stale and pending is not None and not pending.done and not pending.abandoned:
                client._held[lease.id] = lease
                pending.result, pending.done = lease, True
                client._cond.notify_all()
                return
            owner = owner_of_late_grant(client, msg.req, pending)
        # Granted after the caller gave up: hand it straight back (no leak),
        # and count it where its pool counts leases it never used. One of an
        # ended session went with it (taken, it answered the acquire re-sent
        # on the new one with a lease no session holds: I1).
        try:
            tell_unused(owner)  # first: whoever sees the release sees it counted
        finally:
            if not stale:
                client._send_quiet(p.Release(msg.lease), sock)
    elif sock is not None and client._sock is not sock:
        return  # an ended session's reply, reclaim or push: its requests went out again
    elif isinstance(msg, p.Deny | p.Reply | p.Error) and msg.req is not None:
        with client._cond:
            if sock is not None and client._sock is not sock:
                return
            pending = client._pending.get(msg.req)
            client._withdrawn.pop(msg.req, None)  # answered: no grant will follow
            if pending is None or pending.done:  # cancelled or failed meanwhile: that stands
                return
            if isinstance(msg, p.Reply):
                pending.result = msg.data
            elif isinstance(msg, p.Deny):
                pending.error = denial_error(msg.reason, msg.message)
            else:
                pending.error = handshake.error_from(msg)
            pending.done = True
            client._cond.notify_all()
    elif isinstance(msg, p.Reclaim):
        with client._cond:
            with client._owed_lock:
                client._set_owed(msg.resource, msg.count)
            if msg.count > 0:
                # No figure (or a senseless one): the pool decides itself.
                quantum = msg.quantum
                if quantum == math.inf:  # idle ones only: the quantum known stays
                    client._idle_only.add(msg.resource)
                else:
                    client._idle_only.discard(msg.resource)
                if quantum is not None and 0 <= quantum < math.inf:
                    client._quanta[msg.resource] = float(quantum)
                else:
                    client._quanta.pop(msg.resource, None)
                client._jobs.extend(client._reclaim_handlers.get(msg.resource, ()))
        client._notify()
    elif isinstance(msg, p.Push):
        with client._cond:
            if msg.verb == "limits":  # a reload changed them: what a welcome would say now
                told = msg.args.get("resources")
                if isinstance(told, dict):
                    client.limits = {**client.limits,
                                     **{k: v for k, v in told.items() if isinstance(v, dict)}}
                return
            lease_id = msg.args.get("lease")
            if msg.verb == "revoke" and isinstance(lease_id, int):
                # Not counted by the coordinator: never re-registered nor
                # released again (its id may be another process's now).
                gone = client._held.pop(lease_id, None)
                if gone is not None:  # a give-back claimed for it will release nothing
                    client._forget_giving(gone)
            for handler in client._push_handlers:
                client._jobs.append(functools.partial(handler, msg.verb, msg.resource, msg.args))
        client._notify()
    elif isinstance(msg, p.Error):
        log.warning("coordinator error: %s: %s", msg.code, msg.message)
        if msg.fatal:
            client.last_error = f"{msg.code}: {msg.message}"
            if msg.code == "access_denied":
                client._fail_all(AccessDenied(msg.message))
            # The coordinator ends this session (a frame it could not handle,
            # out of memory): the reconnect re-sends what is pending, which
            # may end the next one too. Backed off as after a bad frame, or
            # it would be a session every millisecond, each logged there.
            client._sick = True
            client._next_attempt = time.monotonic() + client._backoff
            client._backoff = min(client._backoff * 2, background.BACKOFF_MAX)


def recv(sock: socket.socket, block: bool) -> bytes:
    """One read of the session socket; BlockingIOError when nothing came (at
    once, or with ``block`` within the SO_RCVTIMEO slice)."""
    if not cooperative(sock):
        return sock.recv(65536) if block else sock.recv(65536, socket.MSG_DONTWAIT)
    # Read by the background greenlet only, never blocking (see wait_reply). The fd is
    # non-blocking underneath and the library parks the greenlet on EAGAIN whatever
    # the flags: a "non-blocking" read waited there for the next frame, holding the
    # read lock, and no report (idle states, backend pids), timer or reclaim ran
    # meanwhile. Its own timeout 0 returns at once; set and put back with no
    # switch in between, so a send another greenlet makes keeps its bound.
    bound = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        return sock.recv(65536)
    finally:
        sock.settimeout(bound)
