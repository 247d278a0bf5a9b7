"""A pool dropped without ``close()``: what its garbage collection closes.

Nothing but its user keeps a :class:`~sharedpool.pool.ConnectionPool` alive:
its handlers on the process's shared client reach it through a weak reference
(:func:`weak_handlers`), its maintenance thread holds it weakly, timers and
openers only for a moment (a checked-out connection holds it, as it should).
Once it is collected, the connections it still had are closed, each close
confirmed through the socket dup kept when it was made, and only then are
their leases released (I1), in a thread: :func:`reap` itself, run by the
garbage collector in whatever thread it interrupted, takes no lock, starts no
thread and logs nothing. Nothing is done in a forked child for the parent's
connections (I7), nor at interpreter finalization (the session ends with the
process, and the coordinator fences its leases).

A pool and its connections form a garbage cycle (``pool._all`` -> wrapper ->
``wrapper.pool``). What the finalizer needs of them is held outside it, in the
pool's :class:`Left`, which never refers to the pool (else the pool would be
immortal): each connection, its lease and its kept dup. Collected with the
cycle instead, the dup's own finalizer could close it first, and the close
would have nothing to watch: the lease back before the server let go.
"""

from __future__ import annotations

import logging
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from . import giveback
from .client import Client, Lease, current_pid
from .closing import NotClosable, close_and_confirm

if TYPE_CHECKING:
    import socket

    from .pool import ConnectionPool
    from .wrapper import ConnectionWrapper

log = logging.getLogger("sharedpool.pool")

#: Connections abandoned in a forked child: the parent's, kept referenced so
#: that no destructor ever closes them from the child (I7).
INHERITED: list[Any] = []


class _Entry:
    """What closing one connection takes, without its wrapper (which refers to the pool)."""

    __slots__ = ("conn", "lease", "kept")

    def __init__(self, conn: Any, lease: Lease | None, kept: socket.socket | None) -> None:
        self.conn, self.lease, self.kept = conn, lease, kept


class Left:
    """What a pool leaves when it is garbage-collected: its connections not yet
    taken by a close, and the client and handlers it registered."""

    __slots__ = ("entries", "pid", "name", "confirm_timeout", "client", "handlers")

    def __init__(self, name: str, confirm_timeout: float) -> None:
        self.name, self.confirm_timeout = name, confirm_timeout
        self.reset()

    def reset(self) -> None:
        """Start empty (a new pool, or a forked child's reset of it)."""
        #: wrapper id -> its connection, lease and kept dup, until a close takes them
        self.entries: dict[str, _Entry] = {}
        self.client: Client | None = None
        self.handlers: tuple[Any, ...] = ()
        self.pid = current_pid()

    def track(self, wrapper: ConnectionWrapper[Any]) -> None:
        """A connection was made: closed by :func:`reap` unless a close takes it
        first (:func:`sharedpool.shutdown.close_counted`)."""
        self.entries[wrapper.id] = _Entry(wrapper.conn, wrapper.lease, wrapper.kept)

    def revoked(self, wrapper: ConnectionWrapper[Any]) -> None:
        """``wrapper``'s lease was revoked: the client forgot it, nothing to release."""
        entry = self.entries.get(wrapper.id)
        if entry is not None:
            entry.lease = None


def weak_handlers(pool: ConnectionPool[Any]) -> tuple[Callable[[], int],
                                                      Callable[[str, str | None, dict[str, Any]], None],
                                                      Callable[[], list[list[Any]]]]:
    """``pool``'s reclaim, push and state handlers for the client, each holding
    it weakly: the process's client lives as long as the process does."""
    ref = weakref.ref(pool)

    def reclaim() -> int:
        found = ref()
        return 0 if found is None else giveback.reclaim_idle(found)

    def push(verb: str, resource: str | None, args: dict[str, Any]) -> None:
        found = ref()
        if found is not None:
            giveback.on_push(found, verb, resource, args)

    def states() -> list[list[Any]]:
        found = ref()
        return [] if found is None else giveback.lease_states(found)

    return reclaim, push, states


def reap(left: Left) -> None:
    """Finalizer of a collected pool (``weakref.finalize``): hand its
    connections to the client's background thread, which starts the thread
    that closes them. Run inside the garbage collector, in any thread: it
    takes no lock (the interrupted thread may hold any), starts no thread
    (``Thread.start`` takes one, and waits) and logs nothing."""
    entries, client, handlers = list(left.entries.values()), left.client, left.handlers
    left.entries, left.client, left.handlers = {}, None, ()
    if left.pid != current_pid():
        # Made before a fork and never used here: the parent's (I7). No
        # destructor of theirs may run here; our copies of the dups go.
        INHERITED.extend(e.conn for e in entries)
        _close_kept(entries)
        return
    if sys.is_finalizing():
        return  # the process is ending, its session with it: the coordinator fences the leases
    if client is None or client.closed:
        # No session: no lease to give back (its end returned them).
        # The connections close with their objects; the dups here.
        _close_kept(entries)
        return
    client.forget_later(*handlers)
    job = (partial(in_a_thread, "sharedpool-dropped",
                   partial(close_all, entries, client, left.name, left.confirm_timeout))
           if entries else client.close_if_unused)  # nothing left to close: the session may end now
    client.run_soon(job)


def _close_kept(entries: list[_Entry]) -> None:
    for entry in entries:
        if entry.kept is not None:
            entry.kept.close()  # our dup only: no shutdown, nothing sent


def in_a_thread(name: str, job: Callable[[], object]) -> None:
    """On the client's background thread, where a finalizer handed ``job`` (a
    pool's or a lease book's closes): each close may take up to its confirm
    timeout, too long for that thread to wait. Here when no thread is to be had."""
    try:
        threading.Thread(target=job, name=name, daemon=True).start()
    except RuntimeError:  # no thread to be had: closed here, each close bounded
        job()


def close_all(entries: list[_Entry], client: Client, name: str, timeout: float) -> None:
    """Close each connection of a collected pool, confirm the server let go,
    then release its lease (late, from a watcher, if the confirmation is
    late); the last one released, end the session if nothing else uses it."""
    log.warning("pool %r was garbage-collected without close(): closing its %d connection(s), "
                "then returning their leases", name, len(entries))
    count = [len(entries)]
    lock = threading.Lock()

    def back(confirmed: bool, lease: Lease | None) -> None:
        try:
            if lease is not None:
                client.release(lease)
        finally:
            with lock:
                count[0] -= 1
                last = count[0] == 0
            if last:
                client.close_if_unused()

    for entry in entries:
        conn, lease, kept = entry.conn, entry.lease, entry.kept
        entry.conn = entry.lease = entry.kept = None
        settle = partial(back, lease=lease)
        try:
            confirmed = close_and_confirm(conn, timeout, on_late=settle, kept=kept)
        except NotClosable:  # nothing to close: give the lease back
            confirmed = True
        except Exception:  # noqa: BLE001 - on_late has been or will be called
            log.exception("pool %r: closing a connection of the collected pool failed", name)
            continue
        if confirmed:
            settle(True)
        else:
            log.warning("pool %r: server has not dropped a connection of the collected pool after "
                        "%.1fs; its lease is kept until it does", name, timeout)
