"""outbox.py on its own: what a send reports as gone is what went."""

from __future__ import annotations

import contextlib
import socket
from typing import Any

from sharedpool import outbox


class _ClosedAfterFirstSend(socket.socket):
    """A session socket another thread closes (close(), _disconnect) right
    after a send that the full buffer took only part of."""

    def send(self, data: Any, flags: int = 0) -> int:
        sent = super().send(data, flags)
        self.close()
        return sent


def test_bytes_sent_before_an_error_leave_the_outbox() -> None:
    # Found reviewing the outbox: a chunk sent in part, then an OSError on the
    # next send (the socket closed by close() meanwhile), left the part that
    # went in the outbox; close() sent it again on its dup, so the coordinator
    # read the same bytes twice and the frames behind them as garbage.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    s = _ClosedAfterFirstSend(fileno=a.detach())
    try:
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes at once
        box = bytearray(data)
        # The error may show here or at the next send: what stays behind matters.
        with contextlib.suppress(OSError):
            outbox._drain(s, box)
        got = bytearray()
        b.setblocking(False)
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            if not chunk:
                break
            got += chunk
        assert 0 < len(got) < len(data)
        assert bytes(got) + bytes(box) == data  # nothing twice, nothing lost
    finally:
        s.close()
        b.close()
