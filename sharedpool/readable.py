"""Waiting until a file descriptor has something to read, whatever ``select``
is: the standard module, or the one gevent or eventlet monkey-patched in; and
telling their sockets from the standard ones.

eventlet's green ``select`` has ``select()`` only, no ``poll()``: the client's
background thread died at start on it (no report, timer or reclaim ever ran)
and a close could never be confirmed (its lease kept until the process exits).
"""

from __future__ import annotations

import _socket  # the C socket type, which gevent and eventlet never replace
import select
import socket
from collections.abc import Sequence


def cooperative(sock: socket.socket) -> bool:
    """Whether ``sock`` is gevent's or eventlet's (``socket.socket`` monkey-patched)."""
    return not isinstance(sock, _socket.socket)


def wait_readable(fds: Sequence[int], timeout: float, writable: Sequence[int] = ()) -> bool:
    """Wait at most ``timeout`` seconds for one of ``fds`` to be readable, hung
    up or in error (or one of ``writable`` writable); True if one is. OSError /
    ValueError for a closed fd."""
    poll = getattr(select, "poll", None)
    if poll is None:
        # No FD_SETSIZE limit here: this select() waits in the library's hub.
        ready = select.select(list(fds), list(writable), [], max(timeout, 0.0))
        return bool(ready[0] or ready[1])
    poller = poll()
    for fd in fds:
        poller.register(fd, select.POLLIN | (select.POLLOUT if fd in writable else 0))
    for fd in writable:
        if fd not in fds:
            poller.register(fd, select.POLLOUT)  # POLLHUP / POLLERR come unasked
    return bool(poller.poll(max(timeout, 0.0) * 1000.0))
