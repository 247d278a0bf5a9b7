"""The coordinator's listening socket as asyncio's own loop (no uvloop) sees it.

When accept() fails for want of descriptors or memory, asyncio's accept loop
(``BaseSelectorEventLoop._accept_connection``, Python 3.11 to 3.13) removes its
reader and schedules a retry a second later, but goes on calling accept() up to
100 times in that same callback, each failure scheduling a retry of its own.
Each retry that fires on its own loop iteration runs such a burst again: at
the open-file limit the failed accepts multiplied, from ~500 a second to
~3,500 a second within a minute, the coordinator's CPU climbing with them.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Any

#: accept() errors that say the process (or the host) is out of descriptors or
#: memory: the connection stays queued, the listening socket readable (asyncio
#: pauses accepting for a second; the metrics server too).
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class RetryOnceListener(socket.socket):
    """A listening socket whose accept(), after failing for want of resources,
    reports an empty queue (asyncio's cue to stop) for the rest of that loop
    iteration: one failure, so one retry, a second, as asyncio means it to be."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        # The descriptor moves here: ``sock`` is left closed, this socket owns it.
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._loop = loop
        self._failed = False

    def accept(self) -> tuple[socket.socket, Any]:
        """socket.accept(), or BlockingIOError until the loop's next iteration
        once one has failed with EMFILE, ENFILE, ENOBUFS or ENOMEM."""
        if self._failed:
            raise BlockingIOError(errno.EAGAIN, "accepting paused: out of resources")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno in OUT_OF_RESOURCES:
                self._failed = True
                self._loop.call_soon(self._resume)  # after asyncio's accept callback returns
            raise

    def _resume(self) -> None:
        self._failed = False

    def dup(self) -> RetryOnceListener:
        """The same on a duplicate descriptor (``asyncio.Server.sockets`` hands
        out dup(); socket's own would call this class with its arguments)."""
        plain = socket.socket(self.family, self.type, self.proto, fileno=os.dup(self.fileno()))
        copy = RetryOnceListener(plain, self._loop)
        copy.settimeout(self.gettimeout())
        return copy


def listener_for(sock: socket.socket, loop: asyncio.AbstractEventLoop) -> socket.socket:
    """``sock`` as ``loop`` should accept on it: wrapped on asyncio's selector
    loop, whose accept loop multiplies its retries; as is on uvloop's, which
    turns sessions away itself at the limit."""
    if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
        return RetryOnceListener(sock, loop)
    return sock
