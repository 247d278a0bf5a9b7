"""LeaseBook: the leases of one host-library pool (shared by the contrib integrations).

Each integration keeps its host library's pool (and its behaviour: pre-ping,
recycle, events, max_lifetime, stats...) and only makes every connection it
opens ride on a lease: the lease is taken before the socket exists and given
back after the socket is closed and the server confirmed it let go (I1).
The book also answers the coordinator's reclaim requests (give idle
connections back so a waiter in another process can have one), reports idle /
busy states for them, and keeps fork safety: a child never closes nor
releases what its parent holds (I7).

Three files make the book: _book.py its state (records, fork, the client's
pushes: reclaim, admin, revoke; counters), _acquiring.py the open side (a
lease before each connect, a wait a local checkin can end), and this one the
close side: a close confirmed, then the lease released; sweeps; exit.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .. import process
from ..client import Client, current_pid
from ..closing import WAIT_SLICE, NotClosable, close_and_confirm, close_in_background, socket_fd
from ._acquiring import _Acquiring
from ._book import _Entry, _Lendable, _Loose
from ._orphans import closable, close_collected, close_orphan, hold, start_collector

__all__ = ["LeaseBook"]

log = logging.getLogger("sharedpool.contrib")


class _CloseVia:
    """What :func:`close_and_confirm` sees: the key's socket, closed by ``closer``,
    and the key's busy state, so that a query in flight is cancelled first
    (else the backend reads our Terminate only when the query ends)."""

    _FORWARDED = frozenset(("info", "cancel_safe", "cancel", "pgconn"))

    def __init__(self, key: Any, closer: Callable[[], object]) -> None:
        self._key = key
        self.close = closer

    def __getattr__(self, name: str) -> Any:
        if name in _CloseVia._FORWARDED:
            return getattr(self._key, name)
        raise AttributeError(name)

    def fileno(self) -> int:
        fd = socket_fd(self._key)
        if fd is None:
            raise OSError("no socket")
        return fd


class LeaseBook(_Acquiring):
    """The leases of one host-library pool, keyed by connection object.

    ``coordinator`` is the socket path; None falls back to ``$SHAREDPOOL_SOCKET``
    and, without either, the book only tracks connections (no leases), like a
    standalone pool. ``idle()`` returns the pool's idle connections (for the
    idle / busy reports); ``reclaim(n)`` closes up to ``n`` idle ones and
    returns how many it closed. Both are called from the client's background
    thread and must not block for long.
    """

    # ------------------------------------------------------------------ close

    def owns(self, key: Any) -> bool:
        """Whether this process opened ``key`` through this book (leased or not)."""
        self._checkpid()
        entry = self._entries.get(id(key))
        if entry is not None and entry.key is key:
            return True
        loose = self._detached.get(id(key))
        return loose is not None and loose.ref() is key

    def detached(self, key: Any) -> None:
        """The host pool let go of ``key`` for good (SQLAlchemy's ``detach()``):
        still leased, but its user's to close, and no longer kept alive here.
        Closed (:meth:`close`), its lease comes back as ever; dropped unclosed,
        once it is garbage-collected, its socket is shut and the lease released
        after the server let go (I1), in a thread (:func:`close_collected`).
        Without a kept dup of its socket to see that by, or a connection that
        cannot be held weakly, it stays tracked as before (closed at exit)."""
        self._checkpid()
        if self.inherited(key):
            return
        try:
            ref = weakref.ref(key)
        except TypeError:
            return
        if not start_collector():  # the thread the finalizer hands the close to
            return
        no_socket = socket_fd(key) is None  # nothing to confirm: none, or closed already
        with self._lock:
            entry = self._entries.get(id(key))
            if entry is None or entry.key is not key or (entry.kept is None and not no_socket):
                return
            del self._entries[id(key)]
            self._revoked -= entry.revoked
            if isinstance(entry, _Lendable) and entry.finalizer is not None:
                entry.finalizer.detach()  # the one below takes over
            entry.key = None
            # Holds the record (lease, client, kept dup), never the connection.
            finalizer = weakref.finalize(key, close_collected, weakref.ref(self), id(key), entry,
                                         self.resource, self.confirm_timeout)
            finalizer.atexit = False  # at exit: release_for_exit, or the session's end
            self._detached[id(key)] = _Loose(ref, entry, finalizer)

    def _arm(self, key: Any, entry: _Lendable) -> None:
        """``key`` just opened: from here on :meth:`lend` may hold it weakly.
        Not without a kept dup of its socket (nothing to see the server let go
        by once it is collected): then it stays held, as before."""
        if entry.kept is None or entry.finalizer is not None or not start_collector():
            return
        try:
            ref = weakref.ref(key)
        except TypeError:
            return
        # Holds the record (lease, client, kept dup), and the connection while not lent.
        finalizer = weakref.finalize(key, close_collected, weakref.ref(self), id(key), entry,
                                     self.resource, self.confirm_timeout)
        finalizer.atexit = False  # at exit: release_for_exit, or the session's end
        entry.finalizer, entry._ref = finalizer, ref

    def lend(self, key: Any) -> None:
        """``key`` is checked out, and its host pool holds it no longer: held
        weakly here until :meth:`lent_back`, so that one its user drops
        unreturned is closed once collected and its lease comes back after the
        server let go (close_collected), not at the process's exit. Cheap: the
        checkout path calls it, in the thread it hands ``key`` to (see :meth:`handed`)."""
        entry = self._entries.get(id(key))
        if type(entry) is _Lendable and entry._strong is key and entry._ref is not None:
            entry._strong = None
            entry.thread = threading.get_ident()

    def lent_back(self, key: Any) -> None:
        """``key`` comes back from its user (checkin): held again. Cheap."""
        entry = self._entries.get(id(key))
        if type(entry) is not _Lendable:
            return
        if entry._strong is None and entry._ref is not None and entry._ref() is key:
            entry._strong = key
        if entry._strong is key:
            entry.thread = None

    def handed(self, key: Any, thread: int | None) -> None:
        """The host pool hands ``key`` to a caller on ``thread`` (None: it took
        it back before the caller had it), as it leaves the pool: if that very
        thread exits the process, nobody checks it in (release_for_exit). Cheap."""
        entry = self._entries.get(id(key))
        if type(entry) is _Lendable and entry.key is key:
            entry.thread = thread

    def handed_to(self, key: Any) -> int | None:
        """The thread :meth:`handed` ``key`` to, while it is out; else None."""
        entry = self._entries.get(id(key))
        return entry.thread if type(entry) is _Lendable and entry.key is key else None

    def _forget_collected(self, key_id: int, entry: _Entry) -> None:
        """A detached or lent connection was collected: its lease counts as
        closing from here until the server lets go (close_collected releases it)."""
        with self._lock:
            loose = self._detached.get(key_id)
            if loose is not None and loose.entry is entry:  # not a later one under a reused id
                del self._detached[key_id]
            elif self._entries.get(key_id) is entry:  # lent
                del self._entries[key_id]
                self._revoked -= entry.revoked
            if entry.lease is not None:
                self._closing += 1

    def orphan_closer(self, key: Any) -> Callable[[Any], None] | None:
        """For a connection to keep (None if ``key`` is not tracked): called with
        its detached socket once this book is gone, it closes the socket and
        gives the lease back (see :func:`close_orphan`)."""
        entry = self._entries.get(id(key))
        if entry is None or entry.key is not key:
            return None
        hold(entry.kept)  # until the close takes it: it must outlive a garbage cycle
        return functools.partial(close_orphan, entry, resource=self.resource,
                                 confirm_timeout=self.confirm_timeout)

    def close(self, key: Any, closer: Callable[[], object] | None = None, *,
              reclaimed: bool = False, confirm: float | None = None) -> bool:
        """Close ``key`` (``closer()``, default ``key.close()``), confirm the
        server let go (bounded by ``confirm``, None: ``confirm_timeout``), then
        release its lease; unconfirmed by then, a watcher releases it later.

        A connection inherited across fork is never touched (returns False).
        ``closer`` must not shut the socket down (that would fake the server's
        EOF): redis-py's connections disarm their ``shutdown()`` first.
        Returns whether the close was confirmed."""
        self._checkpid()
        if self.inherited(key):
            return False
        # From taking key out of the book to the start of its close, a signal
        # handler's exception would leave its lease held by nobody: _pop puts
        # the record here as it lets go, close_and_confirm says when it began
        # (False) and whether it confirmed.
        popped: list[_Entry | None] = [None]
        begun: list[bool | None] = [None]
        released = watched = confirmed = False

        def late(confirmed: bool) -> None:
            nonlocal released
            entry, mine, left_to_watcher = popped[0], False, False
            try:
                with self._lock:  # against the watcher's own call
                    if entry is None or entry.lease is None or released:
                        return
                    # No call between: from here this call sees it through, whatever
                    # cuts it short (a later call returns above).
                    released, mine, left_to_watcher = True, True, watched
                client = entry.client if entry.client is not None else self._client
                if client is not None:
                    self._release(client, entry.lease)
            except BaseException:
                # Cut short (a signal handler's exception) before _release took the
                # lease off, at its entry: once more (else a no-op).
                if mine and entry is not None and entry.lease is not None:
                    client = entry.client if entry.client is not None else self._client
                    if client is not None:
                        client.release(entry.lease)
                raise
            finally:
                if mine:  # inline, not _count_closing: no call (no handler) before it counts
                    with self._lock:
                        self._closing -= 1
                        self._unconfirmed -= left_to_watcher
                        if self._closing <= self._unconfirmed:
                            self._none_closing.notify_all()

        try:
            entry = self._pop(key, closing=True, into=popped)  # its lease counted as closing from here
            target: Any = key if closer is None else _CloseVia(key, closer)
            client = entry.client if entry is not None and entry.client is not None else self._client
            lease = entry.lease if entry is not None else None
            if reclaimed and lease is not None:
                # Before the lease goes: counted once the waiter elsewhere can have it
                # (get_stats() read then showed 0 given back).
                self.count("leases_reclaimed")
            t0 = time.monotonic()
            # A server that left a close unconfirmed (hung) would have each close of
            # a row (dispose(), disconnect(), close()) wait confirm_timeout in turn:
            # for that long after one, the next ones do not wait here. Their
            # watchers still keep each lease until the server lets go (I1).
            wait = 0.0 if t0 < self._hung_until else self.confirm_timeout if confirm is None else confirm
            confirmed = close_and_confirm(target, wait, on_late=late if lease is not None else None,
                                          kept=entry.kept if entry is not None else None, begun=begun)
            if confirmed:
                late(True)
                self._handoff.closed(time.monotonic() - t0)
                self._handoff.tell(client, self.resource)
        except NotClosable:
            late(True)  # nothing was closed, nor will be: the lease must not leak
            raise
        except BaseException:
            # Begun, close_and_confirm left the confirmation, and late(), to a
            # watcher, unless it confirmed (then late() here). Cut short before,
            # the close goes on in the background.
            if confirmed or begun[0]:
                late(True)
            elif begun[0] is None and (entry := popped[0]) is not None:
                close_in_background(key if closer is None else _CloseVia(key, closer), entry.kept,
                                    late, self.confirm_timeout)
            raise
        if wait:
            self._hung_until = 0.0 if confirmed else time.monotonic() + wait
        if not confirmed:
            self.count("closes_unconfirmed")
            with self._lock:
                if lease is not None and not released:  # a watcher has it: no exit waits for it
                    watched = True
                    self._unconfirmed += 1
                    self._none_closing.notify_all()
            log.log(logging.WARNING if wait else logging.DEBUG,
                    "sharedpool: %r: the server has not dropped a connection after %.1fs; its "
                    "lease is kept until it does", self.resource, wait)
        return confirmed

    def sweep(self, gone: Callable[[Any], bool]) -> int:
        """Release the leases of tracked connections for which ``gone(conn)`` is
        true (dropped by the host pool without a close). Returns how many."""
        self._checkpid()
        with self._lock:
            keys = [e.key for e in self._entries.values()]
        dead = []
        for key in keys:
            try:
                if gone(key):
                    dead.append(key)
            except Exception:  # noqa: BLE001 - a probe that fails says nothing
                continue
        for key in dead:
            self.close(key)
        return len(dead)

    def sweep_until_empty(self, gone: Callable[[Any], bool], every: float = 0.5) -> None:
        """For a host pool closed with connections still out (its user's to
        return or close): sweep every ``every`` seconds, on the client's
        background thread, until none is tracked, so that one closed directly
        rather than returned gives its lease back then, not at the process's exit."""
        client = self._client
        if client is None:
            return
        ref = weakref.ref(self)

        def again(first: bool = False) -> None:
            book = ref()
            if book is None or book._pid != current_pid():
                return
            if not first:
                book.sweep(gone)
            with book._lock:
                left = bool(book._entries)
            if left:  # armed outside the book's lock: call_later takes the client's
                client.call_later(every, again)

        again(first=True)

    # ------------------------------------------------------------------ exit

    def release_for_exit(self, timeout: float, wait_in_use: bool = True, *,
                         exit_timeout: float | None = None) -> None:
        """At process exit: close every tracked connection under the host pool
        (it is exiting too), each confirmed, then its lease released.

        Idle connections are closed at once; one in use (another thread is
        mid-query) is closed once checked in, or when ``timeout`` has passed
        (at once without ``wait_in_use``). One handed to the thread calling
        this (:meth:`handed`) is closed at once: that thread is exiting (a
        sync worker's, cut short mid-request or in its ``getconn()``), and
        nobody else checks it in.
        Detached ones (SQLAlchemy's ``detach()``) never come back: closed
        last, without waiting for them. ``exit_timeout``: the whole exit's
        (release_process), of which ``timeout`` is what is left."""
        self._checkpid()  # made before fork: the parent's connections are not ours (I7)
        # Before anything closes: a host pool's own connect (psycopg_pool's top-up,
        # retried after the session ends) would open a new session and lease.
        self.exited = True
        self.notify_returned()  # lease waits with ``local`` look again: no longer needed
        deadline = time.monotonic() + max(timeout, 0.0)
        exiting = threading.get_ident()
        while True:
            in_use = self._close_idle_for_exit(deadline)
            for key in [k for k in in_use if self.handed_to(k) == exiting]:
                # Waited for, it kept the exit close_timeout long (a SystemExit in a
                # sync worker's getconn(): its connection came to nobody).
                self._close_for_exit(key, deadline)
                in_use.remove(key)
            remaining = deadline - time.monotonic()
            if not in_use or remaining <= 0 or not wait_in_use:
                break
            self._wait_returned(min(remaining, 0.05))
        if in_use and wait_in_use and (timeout > 0 or exit_timeout):
            # As sharedpool's own pool says: else an exit that waited its whole timeout
            # (a Django connection taken in a thread of the app's own, never closed:
            # every gunicorn worker's stop took close_timeout) told nothing.
            log.warning("sharedpool: %r: %d connection(s) still in use after %.1fs at exit%s: closed "
                        "under their users (a thread that never gives its connection back keeps "
                        "every exit waiting that long)", self.resource, len(in_use), timeout,
                        process.short_of(timeout, exit_timeout))
        with self._lock:
            detached = [c for c in (x.ref() for x in self._detached.values()) if closable(c)]
        for key in in_use + detached:  # out of time: their queries fail, the leases come back
            self._close_for_exit(key, deadline)
        self._wait_closed(deadline)
        self._answer_nothing()

    def _answer_nothing(self) -> None:
        """After the exit's closes: no reclaim nor state to answer any more, and
        a lease given back late (by a watcher) may end the session, as after
        :meth:`shutdown`. The session is not ended here: release_process() does
        that, within its deadline, unless :meth:`session_kept`."""
        with self._lock:
            client, handlers = self._client, self._handlers
            self._handlers, self._shut = (), True
        if client is not None:
            client.remove_handlers(*handlers)

    def session_kept(self) -> Client | None:
        """After :meth:`release_for_exit`, which closed every connection, in
        use or not: the session, while a close its server has not confirmed
        keeps its lease (watched in the background). Ended now, the slot would
        go to another process while PostgreSQL still counts the backend (I1);
        it ends once the last such lease is given back, or with the process."""
        with self._lock:
            kept = self._pid == current_pid() and self._closing > 0
        client = self._client
        return client if kept and client is not None and not client.closed else None

    def _close_idle_for_exit(self, deadline: float) -> list[Any]:
        """Close the idle connections; return those still in use."""
        with self._lock:
            keys = [e.key for e in self._entries.values() if closable(e.key)]
        idle = self._idle_ids()
        in_use = []
        for key in keys:
            if idle is None or id(key) in idle:
                self._close_for_exit(key, deadline)
            else:
                in_use.append(key)
        return in_use

    def _wait_closed(self, deadline: float) -> None:
        """Until no lease of this book is being closed, or ``deadline``. Another
        thread's close (the client's, giving a lease back on a reclaim) waits
        for its server to let go: the session ended under it took that lease
        along, and the coordinator fenced the slot of a normal exit. Closes
        left to a watcher (their server hangs) are not waited for: they keep
        their lease, and the session (:meth:`session_kept`)."""
        with self._lock:
            while (self._closing > self._unconfirmed
                   and (remaining := deadline - time.monotonic()) > 0):
                self._none_closing.wait(min(remaining, WAIT_SLICE))

    def _wait_returned(self, timeout: float) -> None:
        """Sleep until a connection is checked in (:meth:`notify_returned`) or ``timeout``."""
        with self._returned:
            self._waiting += 1  # makes notify_returned() wake us
            try:
                self._returned.wait(timeout)
            finally:
                self._waiting -= 1

    def _close_for_exit(self, key: Any, deadline: float) -> None:
        try:
            self.close(key, confirm=process.confirm_at_exit(self.confirm_timeout, deadline))
        except Exception:  # noqa: BLE001 - exiting; the fence covers the rest
            log.exception("sharedpool: closing a leased connection at exit failed")
