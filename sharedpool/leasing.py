"""Leases for connections that another library's pool owns.

SQLAlchemy's QueuePool, psycopg_pool and redis-py keep their own pools; the
integrations keep those pools' behaviour and only need every connection they
open to be covered by a lease, given back after the close is confirmed (I1).
:class:`LeaseKeeper` does exactly that, and nothing else.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from .client import Client, Lease, current_pid
from .closing import close_and_confirm
from .config import SOCKET_ENV, check_resource_name

T = TypeVar("T")


class LeaseKeeper:
    """Open connections under leases of ``resource``; close them and give the lease back.

    ``coordinator`` None falls back to ``$SHAREDPOOL_SOCKET``; without either
    the keeper is a pass-through (no leases), like a standalone pool.
    """

    def __init__(self, resource: str, coordinator: str | None = None, *,
                 confirm_timeout: float = 2.0) -> None:
        import os

        self.resource = check_resource_name(resource)
        self.coordinator = coordinator if coordinator is not None else os.environ.get(SOCKET_ENV)
        self.confirm_timeout = confirm_timeout
        self._lock = threading.Lock()
        self._leases: dict[int, tuple[Any, Lease]] = {}
        self._pid = current_pid()

    def __repr__(self) -> str:
        return (f"<LeaseKeeper {self.resource!r} coordinator={self.coordinator!r} "
                f"leases={len(self._leases)}>")

    @property
    def client(self) -> Client | None:
        return None if self.coordinator is None else Client.for_path(self.coordinator)

    def _checkpid(self) -> None:
        if self._pid != current_pid():
            # The parent's leases are the parent's: forget them, never release them.
            self._leases = {}
            self._lock = threading.Lock()
            self._pid = current_pid()

    def connect(self, factory: Callable[[], T], timeout: float | None = None) -> T:
        """Take a lease (waiting up to ``timeout``), then call ``factory``.
        If the factory fails, the lease goes straight back and the error propagates."""
        self._checkpid()
        client = self.client
        if client is None:
            return factory()
        lease = client.acquire(self.resource, timeout)
        try:
            conn = factory()
        except BaseException:
            client.report_failure(self.resource)
            client.release(lease)
            raise
        client.report_success(self.resource)
        with self._lock:
            self._leases[id(conn)] = (conn, lease)
        return conn

    def lease_of(self, conn: Any) -> Lease | None:
        entry = self._leases.get(id(conn))
        return entry[1] if entry is not None and entry[0] is conn else None

    def close(self, conn: Any) -> bool:
        """Close ``conn``, confirm the server let go (bounded), then release its
        lease. Returns whether the close was confirmed."""
        self._checkpid()
        with self._lock:
            entry = self._leases.get(id(conn))
            if entry is not None and entry[0] is conn:
                del self._leases[id(conn)]
            else:
                entry = None
        confirmed = close_and_confirm(conn, self.confirm_timeout)
        if entry is not None:
            client = self.client
            if client is not None:
                client.release(entry[1])
        return confirmed

    def release_all(self) -> None:
        """Forget every lease without closing (the connections are already gone)."""
        self._checkpid()
        with self._lock:
            entries, self._leases = list(self._leases.values()), {}
        client = self.client
        if client is not None:
            for _, lease in entries:
                client.release(lease)

    def __len__(self) -> int:
        return len(self._leases)
