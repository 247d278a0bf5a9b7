"""Taking a lease before a connect (the LeaseBook's open side): the wait at
the coordinator, which a connection checked in locally can end first, and
the connect's outcome under the lease (a failed one gives it back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..client import AcquireRequest, Client, Lease
from ..closing import keep_socket, socket_fd
from ..errors import AcquireCancelled, PoolClosed, PoolTimeout
from ..halfmade import half_made_sockets, let_go_of, open_fds
from ._book import _Book, _Lendable, backend_pid
from ._orphans import let_go

log = logging.getLogger("sharedpool.contrib")

T = TypeVar("T")
_NOT_MADE: Any = object()  # open_under: no connection made yet


def connect_failed(exc: BaseException) -> bool:
    """Whether a connect that raised ``exc`` counts as a failed connect (fail-fast):
    not when the process or greenlet was going away (SystemExit of gunicorn's
    SIGQUIT, KeyboardInterrupt, gevent's GreenletExit); five workers stopped
    mid-connect had the coordinator refuse every process's leases as failing.
    A user's timeout (celery's soft limit, gevent.Timeout) on a connect that
    hangs still counts."""
    return not isinstance(exc, SystemExit | KeyboardInterrupt) and type(exc).__name__ != "GreenletExit"


@dataclass(eq=False)
class _Wait:
    owner: Any = None
    offered: Any = None
    #: how to put ``offered`` back where it came from, if the waiter never takes it
    back: Callable[[], object] | None = None
    lease: Lease | None = None
    error: BaseException | None = None
    done: bool = False
    abandoned: bool = False


@dataclass(frozen=True)
class _Granted:
    lease: Lease


class _CancellableAcquire:
    """``client.request()``: an acquire another thread can withdraw."""

    def __init__(self, client: Client, resource: str, timeout: float | None,
                 into: list[AcquireRequest], owner: object) -> None:
        self.ticket = client.request(resource, timeout, _into=into, _owner=owner)

    def run(self) -> Lease:
        return self.ticket.wait()

    def withdraw(self) -> None:
        """Stop waiting (from another thread); ``run()`` then raises
        AcquireCancelled, and a lease granted meanwhile goes back."""
        self.ticket.cancel()


class _Acquiring(_Book):
    """A LeaseBook's open side (see :class:`~sharedpool.contrib._leases.LeaseBook`)."""

    # ------------------------------------------------------------------ open

    def closed_reason(self) -> str | None:
        """Why no lease is taken any more (end-session, release_process), or None."""
        if self._admin_state == "ended":
            return (f"{self.resource!r}: this process's session was ended by an admin "
                    "(sharedpool end-session); restart the process")
        if self.exited:  # a new session now would hold its leases until the fence frees them
            return f"{self.resource!r}: this process released its leases for exit (release_process)"
        return None

    def acquire(self, key: Any, timeout: float | None = None,
                local: Callable[[], Any] | None = None, owner: Any = None,
                taken: list[Any] | None = None, probe: bool = False) -> Any:
        """Take a lease for ``key`` before its socket is opened (waits up to
        ``timeout``; None: the resource's default). Raises what the client
        raises (PoolTimeout, LeaseDenied, CoordinatorUnavailable).

        With ``local``, the wait also ends when ``local()`` returns something
        other than None — a connection of the same pool came back, so the
        caller needs no new one: that value is returned, and the lease, when
        it comes, goes straight back. ``local()`` is called with the book's
        condition held; the pool calls :meth:`notify_returned` at checkin, or
        hands a connection over with :meth:`offer` (same ``owner``: the pool).
        Returns None once the lease is held under ``key``.

        ``taken``: a one-item list an offer taken is put in, in the step that
        takes it (``local()`` is to put what it takes there the same way): the
        caller's to give back if it is cut short (a signal handler's exception)
        before it holds what this returns.

        ``probe``: a try (``timeout`` 0) for a slot free now that no caller
        waits for: finding none is no timeout, here as at the coordinator
        (``lease_timeouts`` counted every such miss of psycopg_pool's growth)."""
        why = self.closed_reason()
        if why is not None:
            raise PoolClosed(why)
        client = self.client
        lease = None
        if client is not None:
            if local is None:
                lease = self._acquire(client, timeout, probe)
            else:
                got = self._lease_or_local(client, timeout, local, owner, taken, probe)
                if not isinstance(got, _Granted):
                    return got
                lease = got.lease
        try:
            with self._lock:
                old = self._entries.pop(id(key), None)
                entry = self._entry_class(key, lease, client=client if lease is not None else None)
                self._entries[id(key)] = entry
                # Revoked between the grant and here: _revoke() found no entry
                # to mark (the client forgets the lease before its job runs).
                revoked = lease is not None and client is not None and lease.id not in client._held
                if revoked:
                    entry.lease, entry.revoked = None, True
                    self._revoked += 1
        except BaseException:
            # Cut short before the lease was recorded (a signal handler's exception):
            # nothing will open under it, nor release it.
            if lease is not None and client is not None and id(key) not in self._entries:
                self._release(client, lease)
            raise
        if revoked:
            log.warning("sharedpool: %r lease %s revoked by the coordinator as it was granted: the "
                        "connection counts against no cap; it is closed at its checkin", self.resource,
                        lease.id if lease is not None else None)
        if old is not None and old.collected:
            old = None  # another connection's, under a reused id: its queued close takes all
        if old is not None and old.kept is not None:  # its old socket's: no close will take it
            let_go(old.kept)
            old.kept.close()
            old.kept = None
        if old is not None and old.key is key and old.lease is not None and client is not None:
            log.warning("sharedpool: a %r connection re-opened without being closed; releasing its old "
                        "lease", self.resource)
            self._release(client, old.lease)
        return None

    def _acquire(self, client: Client, timeout: float | None, probe: bool = False) -> Lease:
        t0 = time.monotonic()
        try:
            lease = client.acquire(self.resource, timeout, _owner=self)
        except PoolTimeout:
            if not probe:
                self.count("lease_timeouts")
            raise
        except Exception:
            self.count("lease_errors")
            raise
        self.count("leases_acquired")
        self.count("lease_wait_ms", int((time.monotonic() - t0) * 1000))
        return lease

    def _lease_or_local(self, client: Client, timeout: float | None,
                        local: Callable[[], Any], owner: Any, taken: list[Any] | None = None,
                        probe: bool = False) -> Any:
        """Wait for a lease in a helper thread while watching ``local()``. When
        ``local()`` wins, the acquire is withdrawn at the coordinator: a process
        whose own connections serve it must not stay queued there (a waiting
        session is never asked to give leases back)."""
        wait = _Wait(owner=owner)
        cond = self._returned
        withdraw = False

        def helper(request: _CancellableAcquire) -> None:
            t0 = time.monotonic()
            try:
                lease = request.run()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                if isinstance(exc, PoolTimeout):
                    if not probe:
                        self.count("lease_timeouts")
                elif not isinstance(exc, AcquireCancelled):
                    self.count("lease_errors")
                with cond:
                    wait.error, wait.done = exc, True
                    cond.notify_all()
                if self._shut:
                    # Withdrawn by a pool closing meanwhile: shutdown() found this
                    # acquire pending and left the session open; it may end now.
                    client.close_if_unused()
                return
            self.count("leases_acquired")
            self.count("lease_wait_ms", int((time.monotonic() - t0) * 1000))
            with cond:
                unused = wait.abandoned
                wait.lease, wait.done = lease, True
                cond.notify_all()
            if unused:  # granted just as we withdrew: no connection was opened under it
                self._unused(client, lease)

        # A waiting session is asked for the leases it last reported idle
        # (another of its pools may sit on them). This pool's own are all out
        # now, or it would not wait: say so first. Else a report from a moment
        # ago, when they were idle, has this wait (served here a moment later)
        # answered by the close of one of ours and a reconnect for nobody.
        client.report_now()
        # Sends the acquire. From here on in the try: Thread.start() waits for the
        # thread, and signal handlers run there; a lease granted after such an
        # exception goes back.
        tickets: list[AcquireRequest] = []  # the acquire, once sent: withdrawable before we hold it
        try:
            request = _CancellableAcquire(client, self.resource, timeout, tickets, self)
            threading.Thread(target=helper, args=(request,), name=f"sharedpool-lease-{self.resource}",
                             daemon=True).start()
            return self._wait_lease_or_local(wait, local, request, client, taken)
        except BaseException:
            # Interrupted (a signal handler's exception: celery's soft time limit,
            # KeyboardInterrupt...): nobody will take a lease granted from now on,
            # nor the connection a checkin handed us a moment ago.
            lease_back = None
            with cond:
                offered, back, wait.offered = wait.offered, wait.back, None
                if not wait.abandoned:
                    wait.abandoned = True
                    if not wait.done:
                        withdraw = True
                    elif wait.lease is not None:
                        lease_back = wait.lease
            if withdraw:
                for ticket in tickets:
                    ticket._drop()  # withdrawn and forgotten: no wait() will ever pop it
            if lease_back is not None:
                self._unused(client, lease_back)
            if offered is not None and back is not None:
                try:
                    back()  # checked in again: to another waiter, or to the pool
                except Exception:  # noqa: BLE001 - the caller's exception goes on
                    log.exception("sharedpool: returning a connection handed to an interrupted wait failed")
            raise

    def _wait_lease_or_local(self, wait: _Wait, local: Callable[[], Any],
                             request: _CancellableAcquire, client: Client,
                             taken: list[Any] | None = None) -> Any:
        cond = self._returned
        withdraw = False
        with cond:
            self._waits.append(wait)
            self._waiting += 1
            try:
                while True:
                    got, wait.offered = wait.offered, None  # an offer is ours from here
                    if got is not None and taken is not None:
                        taken[0] = got  # no call since the take: the caller gives it back if cut short
                    if got is None and (not wait.done or wait.error is not None):
                        # Also after an error: the session ended by release_process(),
                        # which first made this wait not needed, is no failure.
                        got = local()
                    if got is not None:
                        # Served here: withdraw the acquire, or give back a
                        # lease that came at the same moment.
                        wait.abandoned = True
                        if wait.done:
                            lease_back = wait.lease  # None after an error
                        else:
                            # Withdrawn below, outside the lock (it sends a frame).
                            # A grant arriving meanwhile finds us abandoned and
                            # goes back from the helper.
                            lease_back, withdraw = None, True
                        self.count("lease_waits_served_locally")
                        break
                    if wait.done:
                        if wait.error is not None:
                            raise wait.error
                        assert wait.lease is not None
                        return _Granted(wait.lease)
                    cond.wait(0.25)  # notified on checkin, offers and the helper's answer
            finally:
                self._waiting -= 1
                self._waits.remove(wait)
        if withdraw:
            request.withdraw()
        if lease_back is not None:
            self._unused(client, lease_back)
        return got

    def offer(self, conn: Any, owner: Any = None, back: Callable[[], object] | None = None) -> bool:
        """Hand a connection being checked in straight to the oldest acquire
        waiting with ``local`` (it returns it). Without this, the thread that
        checks in takes its connection straight back, the waiter never gets
        one, and its process stays queued at the coordinator, never asked to
        give back. False (nearly free) when nobody waits. ``back``: checks the
        connection in again if the waiter is interrupted before it takes it."""
        if not self._waiting:
            return False
        with self._returned:
            for wait in self._waits:
                if (wait.owner is owner and not wait.done and not wait.abandoned
                        and wait.offered is None):
                    wait.offered, wait.back = conn, back
                    self._returned.notify_all()
                    return True
        return False

    def notify_returned(self) -> None:
        """A connection was checked in: wake the acquires waiting with ``local``.
        Nearly free when nobody waits (the checkin fast path calls it)."""
        if self._waiting:
            with self._returned:
                self._returned.notify_all()

    def opened(self, key: Any, failed: bool = False, stray: list[int] | None = None,
               report: bool = True) -> None:
        """``key``'s connect finished: report the outcome to the coordinator.
        A failed connect gives its lease back: at once with no socket left, else
        once the server has let go of the ``stray`` sockets it left open (a
        connect cut short, its half-made connection held by the exception's
        frames until collected), as after a close (I1). ``report`` False: not
        a failed connect (cut short by a SystemExit or KeyboardInterrupt)."""
        client = self._client
        if failed:
            record = self._entries.get(id(key))
            entry = self._pop(key)
            if isinstance(record, _Lendable) and record.key is key and record.finalizer is None:
                # A finalizer _arm made but did not record (cut short in between:
                # _pop cannot detach it) holds the record: not the connection too,
                # for good. Collected, it finds no lease there (_pop took it).
                record._strong = None
            kept = entry.kept if entry is not None else None
            if kept is not None:
                # Cut short in opened(), after it kept a dup of the socket: watched
                # with the stray ones (our FIN, the server's end seen closed), then closed.
                stray = [*(stray or []), kept.fileno()]
            try:
                if entry is not None and entry.client is not None:
                    client = entry.client
                if client is not None and entry is not None and entry.lease is not None:
                    try:
                        if report:
                            client.report_failure(self.resource)
                    finally:
                        # Even if a signal handler's exception cut the report short.
                        if stray:
                            self._release_after(client, entry.lease, stray)
                        else:
                            self._release(client, entry.lease)
                elif client is not None and entry is None and report:
                    # Closed already, its lease with it (redis-py disconnects a
                    # connect whose handshake failed before raising): still a
                    # failed connect, or a refused AUTH would never fail fast.
                    client.report_failure(self.resource)
            finally:
                if kept is not None:
                    kept.close()  # let_go_of watches a dup of its own
            return
        entry = self._entries.get(id(key))
        if entry is not None:
            entry.backend_pid = backend_pid(key)
            if entry.kept is None:
                entry.kept = keep_socket(key)
            if isinstance(entry, _Lendable):
                self._arm(key, entry)
            self._handoff.connected(time.monotonic() - entry.since)
            self._handoff.tell(client, self.resource)
        if client is not None:
            client.report_success(self.resource)
            if entry is not None and entry.backend_pid is not None:
                client.report_now()  # the fence must know it before any query runs

    def connect(self, factory: Callable[[], T], timeout: float | None = None,
                took: Callable[[T], object] | None = None) -> T:
        """Take a lease, then call ``factory``; the connection it returns is the key.
        If the factory fails, the lease goes straight back and the error propagates.
        ``took``: as for :meth:`open_under`."""
        placeholder = object()
        try:
            self.acquire(placeholder, timeout)
            return self.open_under(placeholder, factory, took)
        except BaseException:
            # A signal handler's exception between the grant and open_under's own
            # try: nothing opens under that lease (else a no-op: open_under took it).
            self.unused(placeholder)
            raise

    def open_under(self, key: Any, factory: Callable[[], T],
                   took: Callable[[T], object] | None = None) -> T:
        """Call ``factory`` under the lease taken for ``key`` (a placeholder); the
        connection it returns becomes the key. If the factory fails, the error
        propagates and the lease goes back (see :meth:`opened`). ``took(conn)``,
        called once the connection is registered and before this returns, is
        where the caller stores it for its own exception handling to find: a
        signal handler's exception as this returns, before the caller's store,
        would leave the connection to the book alone, open and leased until
        the process's exit. An exception in ``took`` undoes the connection."""
        before: frozenset[tuple[int, int, int]] | None = None
        conn: Any = _NOT_MADE
        try:
            before = open_fds()  # in the try: a signal's exception here must give the lease back
            conn = factory()
            # In the try too: cut short just before (a signal handler's exception
            # as rekey starts), the connection made is open under key's lease,
            # its socket held by this frame: the lease goes back once the server
            # let go of it (I1), not at once (connect()'s unused()).
            self.rekey(key, conn)
            # In the try as well: cut short at any step of opened(), the record was
            # left, connection and lease held until the exit. Undone below as one
            # made and cut short: popped (a finalizer opened() armed detached),
            # the kept dup watched then closed, the lease back once the server
            # let go, never reported as a failed connect.
            self.opened(conn)
            if took is not None:
                took(conn)
        except BaseException as exc:
            try:
                stray = half_made_sockets(exc, before)
                if conn is not _NOT_MADE and (fd := socket_fd(conn)) is not None and fd not in stray:
                    stray.append(fd)  # made: its socket is ours to watch even if no frame showed it
            except Exception:  # noqa: BLE001 - never in place of the connect's own error
                stray = []
            # stray: cut short, a socket left open. A connect cut short by the
            # process's exit (gunicorn's SIGQUIT: sys.exit) is no failed connect:
            # five such (workers stopped mid-connect) had the coordinator refuse
            # every process's leases as failing. Nor is one that was made.
            made = conn is not _NOT_MADE
            self.opened(key, failed=True, stray=stray, report=not made and connect_failed(exc))
            if made:  # rekeyed before the exception (as rekey's lock was let go): under conn
                self.opened(conn, failed=True, stray=stray, report=False)
            raise
        return conn

    def unused(self, key: Any) -> None:
        """Give back the lease taken under ``key`` (a placeholder) that nothing
        will open under: its caller was cut short (a signal handler's exception)
        after the grant. Not a failed connect: none is reported. Nothing if no
        lease is held under ``key`` (never granted, or open_under took it)."""
        entry = self._pop(key)
        if entry is not None and entry.client is not None and entry.lease is not None:
            self._unused(entry.client, entry.lease)

    def _unused(self, client: Client, lease: Lease) -> None:
        """Give back a lease granted to a wait given up: counted first, so that
        whoever sees it released (the coordinator's figures) sees it counted."""
        self.count("leases_unused")
        self._release(client, lease)

    def _release_after(self, client: Client, lease: Lease, fds: list[int]) -> None:
        self._count_closing(1)  # counted as closing until the server lets go

        def done(confirmed: bool) -> None:
            self._release(client, lease)
            self._count_closing(-1)

        let_go_of(fds, done)

    def rekey(self, old: Any, new: Any) -> None:
        """The lease taken under ``old`` (a placeholder) now covers ``new``."""
        with self._lock:
            entry = self._entries.get(id(old))
            if entry is not None and entry.key is old:
                old_id, new_id = id(old), id(new)
                # Before the del: a _Lendable's key is a property, its setter a
                # call where a signal handler's exception can land (at its first
                # line: the key not set). From the del on, no call: the entry
                # is always under one key or the other, its lease never lost.
                entry.key = new
                del self._entries[old_id]
                self._entries[new_id] = entry
