"""psycopg_pool's queue of ``getconn()`` callers, as sharedpool's psycopg pool keeps it.

psycopg_pool's sync ``WaitingClient.wait()`` gives up only on an ``Exception``:
one that is not (the ``SystemExit`` of gunicorn's SIGQUIT handler, a
``KeyboardInterrupt``, gevent's ``Timeout``) left the caller queued as if it
still waited, and the next connection to come (opened for it under a lease, or
checked in) was handed to nobody. It was never checked in: its lease was held
for the life of the process, and a sync worker's exit waited ``close_timeout``
for it. Here each queued caller knows its thread, and its own ``getconn()``
can take it out of the queue (:meth:`Waiter.give_up`).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

from ._leases import LeaseBook


class Waiter:
    """A psycopg_pool ``WaitingClient`` as queued: the same ``set()`` /
    ``fail()``, and the book told which thread a connection set goes to."""

    __slots__ = ("client", "thread", "book")

    def __init__(self, client: Any, book: LeaseBook) -> None:
        self.client = client
        self.thread = threading.get_ident()  # queued by the caller itself
        self.book = book

    @property
    def conn(self) -> Any:
        return self.client.conn

    @property
    def error(self) -> BaseException | None:
        return self.client.error  # type: ignore[no-any-return]

    def set(self, conn: Any) -> bool:
        if self.client.conn is not None or self.client.error is not None:
            # Given up (or served): not told even for a moment. Its thread, exiting,
            # reads the book without the pool's lock (release_for_exit) and would
            # close a connection on its way to the next caller.
            return False
        # Told first: once set, the caller may check it in at once (which untells it).
        self.book.handed(conn, self.thread)
        if self.client.set(conn):
            return True
        self.book.handed(conn, None)
        return False

    def fail(self, error: BaseException) -> bool:
        return bool(self.client.fail(error))

    def give_up(self, error: BaseException) -> Any:
        """The caller's ``getconn()`` ends on ``error`` (not an ``Exception``):
        no connection is set for it any more. Returns the one set meanwhile and
        never checked in (the caller's to put back), else None."""
        if self.fail(error):
            return None  # still queued: failed, dropped from the queue by the pool's next prune
        conn = self.client.conn
        # Set for it, and not put back since (psycopg_pool puts it back when its
        # check is cut short; another thread may have it by now).
        if conn is not None and self.client.error is None and self.book.handed_to(conn) == self.thread:
            return conn
        return None


class Waiters(deque[Any]):
    """The pool's ``_waiting``: each caller queued as a :class:`Waiter`, and
    the caller's own kept in ``local.waiter`` (it queues itself, in its thread)."""

    def __init__(self, book: LeaseBook, local: threading.local) -> None:
        super().__init__()
        self._book = book
        self._local = local

    def append(self, client: Any) -> None:
        waiter = Waiter(client, self._book)
        self._local.waiter = waiter
        super().append(waiter)
