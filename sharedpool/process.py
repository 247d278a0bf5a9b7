"""This process's pools, so that a worker about to exit can give everything back,
and a forked child cannot touch the parent's connections.

gunicorn's ``worker_exit``, celery's ``worker_process_shutdown`` and the work
horses of :class:`sharedpool.contrib.rq.Worker` call :func:`release_process`,
and uWSGI's processes as they exit (:mod:`sharedpool.uwsgi_exit`):
every pool closes its connections (each close confirmed, then its lease
released) and the process's coordinator sessions end. Pools register
themselves when made; the registry holds them weakly.

In a forked child, the sockets of the connections every pool held at the fork
are made dead ends (:func:`_cut_inherited`): the child's copy of such a socket
would keep the parent's database backend alive after the parent died (the
server sees no close while any copy is open: PostgreSQL over the cap once the
parent's leases are freed), and a stray use in the child (a reset on checkin)
would write into the parent's session.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol

from .atfork import in_child
from .closing import socket_fd
from .config import check_seconds
from .errors import ConfigError
from .goodbye import GOODBYE_WAIT
from .uwsgi_exit import install_uwsgi_exit

#: Guards the reset of a pool (ours, or an integration's book and pool) in a
#: forked child: two of its threads may notice the fork at once, and the second
#: must not reset away what the first did since. Re-entrant (one reset may lead
#: to another); a fresh lock in each child (a parent thread may have held it).
FORK_LOCK = [threading.RLock()]
in_child(lambda: FORK_LOCK.__setitem__(0, threading.RLock()))

log = logging.getLogger("sharedpool")


class _Releasable(Protocol):
    def release_for_exit(self, timeout: float, wait_in_use: bool = True, *,
                         exit_timeout: float | None = None) -> None: ...

    def connections_at_fork(self) -> list[Any]: ...

    def session_kept(self) -> Any: ...


_POOLS: weakref.WeakSet[Any] = weakref.WeakSet()


def register(pool: _Releasable) -> None:
    """Called by every pool (ours and the integrations' lease books) when made."""
    _POOLS.add(pool)


def held_connections() -> dict[str, int]:
    """How many connections this process's pools hold now, by resource (the
    dups of their sockets kept for closing them not counted). For a server
    that starts its coordinator after the app was imported: any held then were
    opened before it, without a lease."""
    held: dict[str, int] = {}
    for pool in list(_POOLS):
        try:
            conns = [c for c in pool.connections_at_fork() if not isinstance(c, socket.socket)]
        except Exception:  # noqa: BLE001 - a count for a warning: one pool must not fail it
            continue
        if conns:
            resource = str(getattr(pool, "resource", "?"))
            held[resource] = held.get(resource, 0) + len(conns)
    return held


#: Run first by release_process(): a host library's own hold on a checkout
#: (Django's connection of the request being cut short) let go of.
_BEFORE_RELEASE: list[Callable[[], None]] = []


def before_release(hook: Callable[[], None]) -> None:
    """Have :func:`release_process` call ``hook()`` first (once, however often
    registered): an integration whose host library holds a checkout of ours
    past its use gives it back here, or the release waits its timeout for it."""
    if hook not in _BEFORE_RELEASE:
        _BEFORE_RELEASE.append(hook)


#: The least a close at exit waits for its server to let go, once the exit's
#: own deadline has passed: a live backend exits in milliseconds (its lease is
#: then given back, not fenced), a hung one is left to a watcher, its lease held.
EXIT_CONFIRM_MIN = 0.1


def short_of(timeout: float, exit_timeout: float | None) -> str:
    """For a warning of connections still in use at exit: why ``timeout`` is
    less than the exit's (pools released before this one waited for theirs,
    or the before_release hooks took it)."""
    if exit_timeout is None or timeout >= exit_timeout - 0.05:  # a few ms of closes: nothing to explain
        return ""
    return f" (the exit's {exit_timeout:g}s: {exit_timeout - timeout:.1f}s spent before this pool)"


def confirm_at_exit(confirm_timeout: float, deadline: float) -> float:
    """How long a close made by :func:`release_process` waits for the server to
    let go: its pool's ``confirm_timeout``, within what is left until the exit's
    ``deadline`` (at least :data:`EXIT_CONFIRM_MIN`). Not confirmed by then, the
    lease stays held (I1) until a watcher sees the server let go, or the process
    ends and the coordinator's fence takes over: several pools whose server
    hangs no longer wait a ``confirm_timeout`` each past the exit's timeout."""
    return min(confirm_timeout, max(deadline - time.monotonic(), EXIT_CONFIRM_MIN))


def release_host_checkouts() -> None:
    """Run the :func:`before_release` hooks alone, the pools left open: the
    checkouts a host library holds past their use (the Django ENGINE's: this
    thread's Django connections) go back to their pools, where a reclaim can
    take them. For a process that runs job after job itself (RQ's SimpleWorker)."""
    for hook in list(_BEFORE_RELEASE):
        try:
            hook()
        except Exception:  # noqa: BLE001 - the release goes on; it waits for that checkout then
            log.exception("sharedpool: %r before the release failed", hook)


def release_process(timeout: float = 5.0, *, wait_in_use: bool = True) -> None:
    """Close this process's leased connections and end its coordinator sessions.

    Pools wait up to ``timeout`` in all (one deadline, however many pools;
    one left less by those before it says so when it warns of connections
    still in use) for connections in use and for their servers to let go of
    those closed (:func:`confirm_at_exit`): a close still unconfirmed then
    keeps its lease, and the process's session, until its server lets go. A
    session that a :class:`~sharedpool.ConnectionPool` connection still in
    use then holds (its lease) stays until that connection is closed.
    ``wait_in_use=False`` is for a caller that knows no thread will check one
    in (an RQ work horse whose job has returned): they are not waited for,
    the integrations' pools close them at once and a ``ConnectionPool``'s
    keep their leases until the process ends; ``timeout`` still bounds the
    closes and the session's end. Pools
    inherited across ``fork()`` release nothing of the parent's (I7). Hooks
    given to :func:`before_release` (the Django ENGINE's: this thread's Django
    connections) run first. Afterwards no lease is taken and a checkout raises
    ``PoolClosed``."""
    from .client import _ALL

    # Before anything is released: inf would fail each pool's close() (logged,
    # the pool left open), "5" would release nothing.
    timeout = check_seconds("timeout", timeout)
    if not isinstance(wait_in_use, bool):  # "no" is true: it would wait for them
        raise ConfigError("wait_in_use", f"must be True or False, got {wait_in_use!r}")
    deadline = time.monotonic() + timeout
    release_host_checkouts()
    kept: set[int] = set()
    for pool in list(_POOLS):
        try:
            # What is left of the one deadline: 0 once a pool before it waited it all
            # out, said in its warning (it was no request not to wait).
            pool.release_for_exit(max(0.0, deadline - time.monotonic()), wait_in_use, exit_timeout=timeout)
            if (client := pool.session_kept()) is not None:
                kept.add(id(client))
        except Exception:  # noqa: BLE001 - release the rest whatever one pool does
            log.exception("releasing %r at exit failed", pool)
    for client in list(_ALL):
        # A gthread worker past its graceful_timeout: a thread still runs its query.
        # Its session ends once that connection is closed (or with the process).
        if id(client) not in kept:
            # Its releases read by the coordinator before the session ends (see goodbye.py).
            client.close(min(GOODBYE_WAIT, max(0.0, deadline - time.monotonic())))


def _cut_inherited() -> None:
    """In a forked child, first thing: point the fd of every connection the
    pools held at the fork at a socket whose peer is closed. The parent's
    sockets lose this process's copy (no bytes sent, no shutdown: the parent's
    sessions go on), and anything here that still uses such a connection reads
    EOF, as from a server that hung up. The fd numbers stay taken, so nothing
    new is opened under a number an old connection object still holds."""
    fds: set[int] = set()
    for pool in list(_POOLS):
        try:
            conns = pool.connections_at_fork()
        except Exception:  # noqa: BLE001 - a hook must not fail the fork; the others still count
            continue
        for conn in conns:
            fd = socket_fd(conn)
            if fd is not None:
                fds.add(fd)
    if not fds:
        return
    try:
        dead, peer = socket.socketpair()
    except OSError:  # out of fds: leave them (closing would free numbers old objects still hold)
        return
    peer.close()
    with dead:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.dup2(dead.fileno(), fd, inheritable=False)


in_child(_cut_inherited)

# A uWSGI process has no exit hook of ours to call release_process() from.
install_uwsgi_exit(release_process)
