"""A scripted coordinator speaking the real protocol, for client edge cases a
real one produces only with unlucky timing (a slow hello, frames that arrive
together with the welcome). Subclass and override ``on_message`` to script it."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

from sharedpool import protocol as p


class FakeCoordinator:
    def __init__(self, path: str, hello_delays: tuple[float, ...] = ()) -> None:
        self.path = path
        self.hello_delays = list(hello_delays)  # per connection: seconds before the welcome
        self.conns: list[tuple[socket.socket, dict[str, Any]]] = []  # (socket, {"eof": when or None})
        self.next_lease = 1000
        self.lock = threading.Lock()
        self.stopped = False
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                s, _ = self.srv.accept()
            except OSError:
                return
            idx, state = len(self.conns), {"eof": None}
            self.conns.append((s, state))
            threading.Thread(target=self._serve, args=(idx, s, state), daemon=True).start()

    def _serve(self, idx: int, s: socket.socket, state: dict[str, Any]) -> None:
        conn = p.Connection(p.SERVER)
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                state["eof"] = time.monotonic()
                with contextlib.suppress(OSError):  # our end too, as the real one closes it:
                    s.shutdown(socket.SHUT_WR)  # a client's close() waits for that
                return
            conn.receive_data(data)
            for msg in conn.events():
                with contextlib.suppress(OSError):  # the client went away: so be it
                    self.on_message(idx, s, conn, msg)

    def welcome(self, idx: int, conn: p.Connection) -> bytes:
        return conn.send(p.Welcome(conn.version or p.PROTOCOL_VERSION, idx + 1, os.getpid(), {}))

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            time.sleep(self.hello_delays[idx] if idx < len(self.hello_delays) else 0)
            s.sendall(self.welcome(idx, conn))
        elif isinstance(msg, p.Acquire):
            with self.lock:
                self.next_lease += 1
                lease = self.next_lease
            s.sendall(p.encode(p.Grant(msg.req, lease, msg.resource, lease)))

    def drop(self, idx: int) -> None:
        s, _ = self.conns[idx]
        s.shutdown(socket.SHUT_RDWR)
        s.close()

    def stop(self) -> None:
        self.stopped = True
        self.srv.close()
        for s, _ in self.conns:
            with contextlib.suppress(OSError):
                s.close()


class GrantCrossingCancel(FakeCoordinator):
    """Queues each acquire, and grants it as its cancel arrives: the grant a
    real coordinator sends when a slot frees just before the cancel reaches it.
    ``at_once``: this many acquires are granted as they come, first. Records
    the acquires and releases it got."""

    def __init__(self, path: str, at_once: int = 0) -> None:
        super().__init__(path)
        self.at_once = at_once
        self.acquires: list[int] = []
        self.released: list[int] = []

    def on_message(self, idx: int, s: socket.socket, conn: p.Connection, msg: p.Message) -> None:
        if isinstance(msg, p.Acquire):
            self.acquires.append(msg.req)
            if len(self.acquires) <= self.at_once:
                super().on_message(idx, s, conn, msg)
        elif isinstance(msg, p.Cancel):
            with self.lock:
                self.next_lease += 1
                lease = self.next_lease
            s.sendall(p.encode(p.Grant(msg.req, lease, "r", lease)))
        elif isinstance(msg, p.Release):
            self.released.append(msg.lease)
        else:
            super().on_message(idx, s, conn, msg)
