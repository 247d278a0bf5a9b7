"""Ending a session so that the coordinator has read everything sent on it.

A client that closed its socket right after its last frames (the releases of a
worker's exit) lost them whenever the coordinator wrote to it in between (a
reclaim, a push): that write failed (EPIPE), and asyncio ended the session
without reading what was still in its buffer. The coordinator took the
released leases for those of a dead process and fenced their slots (INFO
"fence" lines on every such normal exit; 3-4 ms with ``monitor_dsn``, the
quarantine delay without). So our end is shut for writing instead: the
coordinator reads every frame up to our FIN, then closes its end, and that
EOF is waited for (bounded).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable

from . import closing

#: How long a client's close() waits at most for the coordinator to close its
#: end: one turn of its event loop, well under a millisecond here.
GOODBYE_WAIT = 1.0


def keep(sock: socket.socket) -> socket.socket | None:
    """A dup of the session's socket, taken before the session closes it (no
    FIN goes out while the dup is open); None if no fd is to be had."""
    try:
        return sock.dup()
    except OSError:
        return None


def say(kept: socket.socket, send_lock: threading.Lock, timeout: float,
        unsent: Callable[[], bytes] = bytes) -> bool:
    """Shut ``kept`` (from :func:`keep`) for writing, once no frame is half out
    and what ``unsent()`` returns (frames the coordinator had not taken yet,
    outbox.py) went out, and wait up to ``timeout`` for the coordinator's EOF;
    then close it. True if the coordinator was seen to close its end."""
    # One bound for both waits: a frame let go late in the first one left the
    # whole of ``timeout`` again for the EOF (release_process past its own).
    deadline = time.monotonic() + timeout
    try:
        # A frame another thread is sending goes out whole first; one stuck on
        # a coordinator that does not read is not waited for beyond the bound.
        if not send_lock.acquire(timeout=timeout):
            return False
        try:
            rest = unsent()
            if rest:  # a worker's last releases: not lost to the close (bounded like the rest)
                with contextlib.suppress(OSError):
                    kept.settimeout(max(deadline - time.monotonic(), 0.001))
                    kept.sendall(rest)
            with contextlib.suppress(OSError):  # reset already: nothing more to wait for
                kept.shutdown(socket.SHUT_WR)
        finally:
            send_lock.release()
        return timeout > 0 and closing._wait_eof(kept, deadline)
    finally:
        kept.close()
