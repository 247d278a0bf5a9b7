"""What is left when a host-library pool goes without close(): the
connections its LeaseBook still tracks, closed (confirmed) and their leases
released in a thread, never blocking the finalizer that finds them (I1, I2);
and the same for one connection its user was given for good (detached) and
dropped unclosed.
"""

from __future__ import annotations

import functools
import gc
import logging
import queue
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..atfork import in_child
from ..client import Client, Lease, current_pid
from ..closing import close_and_confirm, keep_socket
from ..dropped import in_a_thread

if TYPE_CHECKING:
    from ._book import _Entry
    from ._leases import LeaseBook

log = logging.getLogger("sharedpool.contrib")


def closable(key: Any) -> bool:
    """A connection (not a placeholder for one being opened)."""
    return callable(getattr(key, "close", None)) or callable(getattr(key, "disconnect", None))


class Left:
    """What a book leaves behind when it is garbage-collected (its pool was
    dropped without close() / dispose()): the connections it still tracks."""

    __slots__ = ("entries", "pid", "confirm_timeout", "resource")

    def __init__(self, resource: str, confirm_timeout: float) -> None:
        self.entries: dict[int, _Entry] = {}
        self.pid = current_pid()
        self.resource, self.confirm_timeout = resource, confirm_timeout


def close_left(left: Left) -> None:
    """Finalizer of a collected book: hand its connections to the client's
    background thread, which closes them (confirmed), then releases their
    leases, in a thread of its own. As :func:`sharedpool.dropped.reap`: run
    inside the garbage collector, in whatever thread it interrupted (which may
    hold any lock: a logging handler's queue, say), it takes no lock, starts
    no thread and logs nothing."""
    if left.pid != current_pid():
        return  # the parent's (I7)
    # A connection lent out and collected unclosed is its own finalizer's (close_collected).
    entries = [e for e in left.entries.values()
               if (e.lease is not None or closable(e.key)) and not e.collected]
    left.entries = {}
    runner = next((e.client for e in entries if e.client is not None and not e.client.closed), None)
    if runner is None:
        # No session: no lease to give back (its end returned them). The
        # connections close with their objects; the dups here.
        for entry in entries:
            kept, entry.kept = entry.kept, None
            let_go(kept)
            if kept is not None:
                kept.close()  # our dup only: no shutdown, nothing sent
            finalizer = getattr(entry, "finalizer", None)  # a _Lendable's holds its idle connection
            if finalizer is not None:
                finalizer.detach()
        return
    runner.run_soon(functools.partial(
        in_a_thread, f"sharedpool-orphans-{left.resource}",
        functools.partial(_close_all, entries, left.resource, left.confirm_timeout)))


def _close_all(entries: list[_Entry], resource: str, timeout: float) -> None:
    log.warning("sharedpool: %r: a pool was garbage-collected without close()/dispose(); closing its %d "
                "connection(s) and returning their leases", resource, len(entries))
    clients = {id(e.client): e.client for e in entries if e.client is not None}
    count = [len(entries)]
    lock = threading.Lock()
    for entry in entries:
        client, lease = entry.client, entry.lease

        def back(confirmed: bool, client: Client | None = client,
                 lease: Lease | None = lease) -> None:
            try:
                if client is not None and lease is not None:
                    client.release(lease)
            finally:
                with lock:
                    count[0] -= 1
                    last = count[0] == 0
                if last:  # as for a dropped ConnectionPool: the session ends with its last user
                    for used in clients.values():
                        used.close_if_unused()
        if not closable(entry.key):  # a lease taken for a connection never opened
            back(True)
            continue
        kept, entry.kept = entry.kept, None
        let_go(kept)
        finalizer = getattr(entry, "finalizer", None)  # a _Lendable's: closed here, not once collected
        if finalizer is not None:
            finalizer.detach()
        try:
            if close_and_confirm(entry.key, timeout, on_late=back, kept=kept):
                back(True)
        except Exception:  # noqa: BLE001 - the session's end covers the rest
            log.exception("sharedpool: closing a connection of a collected %r pool failed", resource)


_orphans_warned: set[str] = set()

#: The kept dups of connections that close themselves from their own
#: ``__del__`` once their book is gone (:func:`close_orphan`), held outside any
#: garbage cycle: collected with its connection, a dup's own finalizer could
#: close it first and leave that close nothing to watch (the lease back at once).
_HELD: set[socket.socket] = set()


def hold(kept: socket.socket | None) -> None:
    """Keep ``kept`` from the garbage collector until :func:`let_go`."""
    if kept is not None:
        _HELD.add(kept)


def let_go(kept: socket.socket | None) -> None:
    """``kept`` is closed or owned by a close from here on."""
    if kept is not None:
        _HELD.discard(kept)


def _close_held_in_child() -> None:
    # The parent's dups (cut by process._cut_inherited): never closed through a
    # close_orphan here (the parent's), they would stay open for good.
    for kept in list(_HELD):
        kept.close()
    _HELD.clear()


in_child(_close_held_in_child)


def close_orphan(entry: _Entry, sock: Any, resource: str, confirm_timeout: float) -> None:
    """Close ``sock``, the socket of a connection whose book is gone (its pool
    was garbage-collected with it: the connection's own ``__del__`` calls this),
    then release ``entry``'s lease once the server has let go. All of that on
    the client's background thread, which starts a thread for it: a finalizer
    must neither block, nor take a lock (the client's, a logging handler's: the
    collecting thread may hold any), nor start a thread. The caller has
    detached ``sock`` from its connection and must not shut it down for
    reading (that fakes the EOF)."""
    lease, client, kept = entry.lease, entry.client, entry.kept
    entry.lease = entry.kept = None
    let_go(kept)
    # At interpreter exit (module globals collected): a thread started now never
    # runs, and Thread.start() waited for it forever (3.11; 3.12+ refuses). The
    # process is ending: so is its session, and the coordinator fences the lease.
    # A closed client's session returned the lease already.
    live = entry.pid == current_pid() and not sys.is_finalizing()
    ours = live and lease is not None and client is not None and not client.closed
    # ``sock`` is in the garbage cycle being collected: its finalizer may close
    # it under the thread below, which then had nothing to watch and gave the
    # lease back at once. ``kept`` was held outside the cycle (hold()); without
    # one, a dup made now, in the finalizer, is no part of the cycle either.
    watched = (kept if kept is not None else keep_socket(sock)) if ours else None
    if kept is not None and watched is not kept:
        kept.close()
    sock.close()  # no shutdown: the dup holds the socket; the FIN goes out at its close
    if not ours or lease is None or client is None:
        return

    def back(confirmed: bool) -> None:
        client.release(lease)
        client.close_if_unused()  # the pool's last lease back: the session ends with its last user

    def run() -> None:
        level = logging.DEBUG if resource in _orphans_warned else logging.WARNING
        _orphans_warned.add(resource)
        log.log(level, "sharedpool: %r: a pool was garbage-collected without disconnect(); closing "
                "its connection and returning its lease", resource)
        try:
            if close_and_confirm(sock, confirm_timeout, on_late=back, kept=watched):
                back(True)
        except Exception:  # noqa: BLE001 - the session's end covers the rest
            log.exception("sharedpool: closing a connection of a collected %r pool failed", resource)

    client.run_soon(functools.partial(in_a_thread, f"sharedpool-orphan-{resource}", run))


class _Collected:
    """What close_and_confirm closes for a connection already collected:
    nothing (its own finalizer closed its fd, or the kept dup's shutdown
    stands in); the kept dup is what it watches."""

    def close(self) -> None:
        pass


#: Jobs from close_collected, run each in a thread of its own by the
#: collector thread. A finalizer may only put() here: SimpleQueue.put is
#: re-entrant, and starting a thread waits on locks the collecting thread may
#: hold (threading's own).
_jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
_collector_pid = 0  # the process the collector thread runs in
_collector_lock = threading.Lock()


class _InOrder:
    """A job :func:`put_off` from a garbage collection: run by the collector
    thread itself, in the order put (a redis connection's disconnect() before
    the release() that follows it), its failure logged (nobody to raise it to)."""

    __slots__ = ("job", "what")

    def __init__(self, job: Callable[[], object], what: str) -> None:
        self.job, self.what = job, what

    def __call__(self) -> None:
        try:
            self.job()
        except Exception:  # noqa: BLE001
            log.exception("sharedpool: a %s put off from a garbage collection failed", self.what)


def _run_jobs(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
    while True:
        job = jobs.get()
        if isinstance(job, _InOrder):
            job()
            continue
        try:
            threading.Thread(target=job, name="sharedpool-collected", daemon=True).start()
        except RuntimeError:  # no thread to be had: here, then (bounded by the confirm)
            job()


def start_collector() -> bool:
    """Make sure this process's collector thread runs, before a finalizer may
    need it (LeaseBook.detached calls this). False when no thread is to be had."""
    global _collector_pid, _jobs, _collector_lock
    pid = current_pid()
    if _collector_pid == pid:
        return True
    if not (isinstance(_jobs, queue.SimpleQueue) and isinstance(_collector_lock, type(threading.Lock()))):
        # Made before gevent / eventlet patched queue and threading (at import, or
        # by the at-fork hook in a gunicorn worker, which patches after the fork):
        # the C queue's get() and the real lock would block the whole hub for ever.
        # Remade here, with no switch in between (nothing else runs meanwhile).
        _jobs, _collector_lock = queue.SimpleQueue(), threading.Lock()
    with _collector_lock:
        if _collector_pid != pid:
            try:
                threading.Thread(target=_run_jobs, args=(_jobs,), name="sharedpool-collector",
                                 daemon=True).start()
            except RuntimeError:
                return False
            _collector_pid = pid
    return True


#: The thread running a garbage collection (its finalizers), else 0.
_collecting = 0


def _track_collection(phase: str, info: dict[str, int]) -> None:
    global _collecting
    _collecting = threading.get_ident() if phase == "start" else 0


gc.callbacks.append(_track_collection)


def collecting() -> bool:
    """Whether this thread runs a garbage collection (a host library's
    finalizer called us: SQLAlchemy checks in a connection dropped unclosed),
    and the collector thread runs (start_collector()) to take the work: here,
    it may wait for good on a lock the interrupted thread holds, the book's."""
    # Every checkin of SQLAlchemy's and redis's pools asks: 0 (no collection) first, no call.
    return _collecting != 0 and _collecting == threading.get_ident() and _collector_pid == current_pid() \
        and not sys.is_finalizing()


def put_off(job: Callable[[], object], what: str) -> None:
    """Have the collector thread run ``job`` (``what`` names it in a log line if
    it fails), after the jobs put off before it (see :func:`collecting`)."""
    _jobs.put(_InOrder(job, what))


def _collector_in_child() -> None:
    # The parent's thread is not here, its lock may have been held at the fork,
    # and its queued jobs are the parent's.
    global _jobs, _collector_pid, _collector_lock, _collecting
    _jobs, _collector_pid, _collector_lock, _collecting = queue.SimpleQueue(), 0, threading.Lock(), 0


in_child(_collector_in_child)


def close_collected(book: weakref.ref[LeaseBook], key_id: int, entry: _Entry,
                    resource: str, confirm_timeout: float) -> None:
    """Finalizer of a detached connection (LeaseBook.detached), or of one lent
    out (LeaseBook.lend) and never returned, collected unclosed. Queues the
    close for the collector thread, no more: a finalizer must neither block
    nor take a lock the collecting thread may hold (the book's, the client's).
    There the kept dup of its socket is shut for writing (the server sees EOF
    even if the connection's own finalizer sent no Terminate), the server's
    end is seen closed, then the lease released."""
    # The parent's (I7); or at interpreter exit, when a thread started now never
    # runs: the process is ending, so is its session, and the coordinator fences.
    if entry.pid != current_pid() or sys.is_finalizing():
        return

    def run() -> None:
        owner = book()
        if owner is not None:
            owner._forget_collected(key_id, entry)  # counted as closing until released
        lease, client, kept = entry.lease, entry.client, entry.kept
        entry.lease = entry.kept = None
        done = False

        def back(confirmed: bool) -> None:
            nonlocal done
            if done:
                return
            done = True
            if lease is not None and client is not None:
                if owner is not None:
                    owner._release(client, lease)
                else:
                    client.release(lease)
                    # Its book went first (the pool dropped with it): its session
                    # ended only if unused then, and this lease was still held.
                    client.close_if_unused()
            if owner is not None and lease is not None:
                owner._count_closing(-1)

        try:
            if close_and_confirm(_Collected(), confirm_timeout, on_late=back, kept=kept):
                back(True)
        except Exception:  # noqa: BLE001 - the session's end covers the rest
            log.exception("sharedpool: closing a %r connection collected unclosed failed", resource)

    _jobs.put(run)
