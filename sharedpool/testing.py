"""Helpers for testing code that uses sharedpool (and for sharedpool's own tests).

* :func:`running_coordinator` — a real coordinator in a child process on a
  private socket, stopped on exit.
* :class:`FakeConnection` / :class:`FakeFactory` — connections with no server,
  whose health, connect delay and failures a test controls.
* :func:`memory_session_pair` — a client and a server protocol connection,
  already past the handshake, for protocol-level tests with no socket.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from . import protocol as p
from .config import Resource
from .coordinator import Coordinator


@contextmanager
def running_coordinator(
    resources: dict[str, int | Resource | dict[str, Any]],
    socket_path: str | os.PathLike[str] | None = None,
    **options: Any,
) -> Iterator[Coordinator]:
    """Start a coordinator in a child process; yield it; stop it.

    Without ``socket_path`` the socket goes in a fresh private temp directory,
    removed at the end (with what the coordinator left there: nothing reuses it)."""
    made = None if socket_path else tempfile.mkdtemp(prefix="sharedpool-")
    path = str(socket_path) if made is None else os.path.join(made, "sharedpool.sock")
    try:
        coordinator = Coordinator(path, resources, **options).start()
        try:
            yield coordinator
        finally:
            coordinator.stop()
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


class FakeConnection:
    """A connection to nowhere. ``healthy=False`` makes ``ping()`` fail."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self.closed = False
        self.healthy = True
        self.pings = 0
        self.queries = 0

    def ping(self) -> None:
        self.pings += 1
        if self.closed or not self.healthy:
            raise ConnectionError(f"fake connection {self.id} is broken")

    def execute(self, query: str = "SELECT 1") -> int:
        if self.closed:
            raise ConnectionError(f"fake connection {self.id} is closed")
        self.queries += 1
        return 1

    def close(self) -> None:
        self.closed = True

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("healthy" if self.healthy else "broken")
        return f"<FakeConnection {self.id} {state}>"


class FakeFactory:
    """A connection factory a test can slow down or break.

    ``delay``: seconds each connect takes; ``fail``: exception to raise (or
    None); ``made``: every connection it returned."""

    def __init__(self, delay: float = 0.0, fail: BaseException | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.made: list[FakeConnection] = []
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> FakeConnection:
        with self._lock:
            self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        conn = FakeConnection()
        with self._lock:
            self.made.append(conn)
        return conn

    @property
    def open(self) -> list[FakeConnection]:
        """Connections made and not closed."""
        with self._lock:
            return [c for c in self.made if not c.closed]


def memory_session_pair(
    name: str = "test", max_frame: int = p.DEFAULT_MAX_FRAME
) -> tuple[p.Connection, p.Connection]:
    """A (client, server) pair of protocol connections past hello/welcome."""
    client = p.Connection(p.CLIENT, max_frame)
    server = p.Connection(p.SERVER, max_frame)
    server.receive_data(client.send(p.Hello(p.PROTOCOL_VERSION, os.getpid(), name)))
    hello = server.next_event()
    assert isinstance(hello, p.Hello)
    client.receive_data(server.send(p.Welcome(p.PROTOCOL_VERSION, 1, os.getpid(), {})))
    welcome = client.next_event()
    assert isinstance(welcome, p.Welcome)
    return client, server
