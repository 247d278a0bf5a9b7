"""LeaseBook: the leases of one host-library pool (shared by the contrib integrations).

Each integration keeps its host library's pool (and its behaviour: pre-ping,
recycle, events, max_lifetime, stats...) and only makes every connection it
opens ride on a lease: the lease is taken before the socket exists and given
back after the socket is closed and the server confirmed it let go (I1).
The book also answers the coordinator's reclaim requests (give idle
connections back so a waiter in another process can have one), reports idle /
busy states for them, and keeps fork safety: a child never closes nor
releases what its parent holds (I7).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .. import process
from ..client import AcquireRequest, Client, Lease, current_pid
from ..closing import NotClosable, close_and_confirm, keep_socket, socket_fd
from ..config import SOCKET_ENV, check_resource_name, check_seconds, check_socket_path, env_socket_path
from ..errors import AcquireCancelled, PoolClosed, PoolTimeout
from ..halfmade import half_made_sockets, let_go_of, open_fds
from ..handoff import HandOffCost
from ._orphans import Left, closable, close_left, close_orphan, hold, let_go

__all__ = ["LeaseBook"]

log = logging.getLogger("sharedpool.contrib")

T = TypeVar("T")

_COUNTERS = ("leases_acquired", "lease_wait_ms", "lease_timeouts", "lease_errors",
             "leases_released", "leases_reclaimed", "leases_unused", "lease_waits_served_locally",
             "closes_unconfirmed")


@dataclass(eq=False)
class _Entry:
    key: Any
    lease: Lease | None
    backend_pid: int | None = None
    #: the client the lease came from: it goes back there even after shutdown()
    client: Client | None = None
    since: float = field(default_factory=time.monotonic)  # leased (before the connect)
    pid: int = field(default_factory=current_pid)
    #: the coordinator did not take the lease back after a restart: close at checkin
    revoked: bool = False
    #: a dup of the connection's socket (closing.keep_socket): its close is
    #: confirmed even after its user closed it
    kept: socket.socket | None = None


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
                 into: list[AcquireRequest]) -> None:
        self.ticket = client.request(resource, timeout, _into=into)

    def run(self) -> Lease:
        return self.ticket.wait()

    def withdraw(self) -> None:
        """Stop waiting (from another thread); ``run()`` then raises
        AcquireCancelled, and a lease granted meanwhile goes back."""
        self.ticket.cancel()


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


class _DisconnectVia:
    """Like :class:`_CloseVia`, for closers that shut the socket down both ways
    (redis-py's ``disconnect()``): close_and_confirm half-closes and waits first."""

    def __init__(self, key: Any, closer: Callable[[], object]) -> None:
        self._sock = getattr(key, "_sock", None)
        self.disconnect = closer


def backend_pid(conn: Any) -> int | None:
    """The PostgreSQL backend pid of a psycopg 3 / psycopg2 connection, else None."""
    pid = getattr(getattr(conn, "info", None), "backend_pid", None)
    if isinstance(pid, int):
        return pid
    getter = getattr(conn, "get_backend_pid", None)
    if callable(getter):
        try:
            value = getter()
        except Exception:  # noqa: BLE001 - a closed connection has none
            return None
        return value if isinstance(value, int) else None
    return None


class LeaseBook:
    """The leases of one host-library pool, keyed by connection object.

    ``coordinator`` is the socket path; None falls back to ``$SHAREDPOOL_SOCKET``
    and, without either, the book only tracks connections (no leases), like a
    standalone pool. ``idle()`` returns the pool's idle connections (for the
    idle / busy reports); ``reclaim(n)`` closes up to ``n`` idle ones and
    returns how many it closed. Both are called from the client's background
    thread and must not block for long.
    """

    def __init__(self, resource: str, coordinator: str | None = None, *,
                 confirm_timeout: float = 2.0,
                 idle: Callable[[], Iterable[Any]] | None = None,
                 reclaim: Callable[[int], int] | None = None,
                 close_when_collected: bool = True) -> None:
        check_seconds("confirm_timeout", confirm_timeout)  # NaN, inf and True are no timeouts
        self.resource = check_resource_name(resource)
        self._coordinator = None if coordinator is None else check_socket_path("coordinator", coordinator)
        self.confirm_timeout = float(confirm_timeout)
        self._idle = idle
        self._reclaim = reclaim
        #: What an admin push said: "draining" (until resume) or "ended" (for good).
        self._admin_state: str | None = None
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._inherited: dict[int, Any] = {}
        self._said_standalone = False
        self._left = Left(self.resource, self.confirm_timeout)
        self._reset()
        if close_when_collected:
            # Holds the tracked connections: only for pools whose connections do
            # not refer back to the pool (else the pool is never collected).
            weakref.finalize(self, close_left, self._left).atexit = False
        process.register(self)

    @property
    def coordinator(self) -> str | None:
        """The socket given, else ``$SHAREDPOOL_SOCKET`` as it is when first needed."""
        if self._client is not None:
            return self._client.socket_path
        return self._coordinator if self._coordinator is not None else os.environ.get(SOCKET_ENV) or None

    def release_for_exit(self, timeout: float) -> None:
        """At process exit: close every tracked connection under the host pool
        (it is exiting too), each confirmed, then its lease released.

        Idle connections are closed at once; one in use (another thread is
        mid-query) is closed once checked in, or when ``timeout`` has passed."""
        self._checkpid()  # made before fork: the parent's connections are not ours (I7)
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            in_use = self._close_idle_for_exit()
            remaining = deadline - time.monotonic()
            if not in_use or remaining <= 0:
                break
            self._wait_returned(min(remaining, 0.05))
        for key in in_use:  # out of time: their queries fail, the leases come back
            self._close_for_exit(key)

    def _close_idle_for_exit(self) -> list[Any]:
        """Close the idle connections; return those still in use."""
        with self._lock:
            keys = [e.key for e in self._entries.values() if closable(e.key)]
        idle = self._idle_ids()
        in_use = []
        for key in keys:
            if idle is None or id(key) in idle:
                self._close_for_exit(key)
            else:
                in_use.append(key)
        return in_use

    def _idle_ids(self) -> set[int] | None:
        """The ids of the pool's idle connections; None when it cannot tell."""
        if self._idle is None:
            return None
        try:
            return {id(c) for c in self._idle()}
        except Exception:  # noqa: BLE001 - exiting: treat everything as idle
            log.exception("listing the idle connections at exit failed")
            return None

    def _wait_returned(self, timeout: float) -> None:
        """Sleep until a connection is checked in (:meth:`notify_returned`) or ``timeout``."""
        with self._returned:
            self._waiting += 1  # makes notify_returned() wake us
            try:
                self._returned.wait(timeout)
            finally:
                self._waiting -= 1

    def _close_for_exit(self, key: Any) -> None:
        try:
            self.close(key)
        except Exception:  # noqa: BLE001 - exiting; the fence covers the rest
            log.exception("closing a leased connection at exit failed")

    def _reset(self) -> None:
        # _pid is set last: a thread of a forked child that sees it current
        # (and skips _checkpid's lock) must find the child's state all made.
        pid = current_pid()
        self._lock = threading.Lock()
        self._entries: dict[int, _Entry] = {}
        left = getattr(self, "_left", None)
        if left is not None:  # after fork: the finalizer sees the child's entries
            left.entries, left.pid = self._entries, pid
        self._returned = threading.Condition(threading.Lock())
        self._waiting = 0
        self._waits: list[_Wait] = []
        self._recheck = False  # a recheck is scheduled
        self._closing = 0  # leases of closed connections, kept until the server lets go
        self._revoked = 0  # tracked connections whose lease was revoked
        self._handoff = HandOffCost()
        self._client: Client | None = None
        self._handlers: tuple[Any, ...] = ()
        self._shut = False  # shutdown(): the last lease back may end the session
        self._pid = pid

    def __repr__(self) -> str:
        return (f"<LeaseBook {self.resource!r} coordinator={self.coordinator!r} "
                f"connections={len(self._entries)}>")

    def __len__(self) -> int:
        self._checkpid()
        return len(self._entries)

    # ------------------------------------------------------------------ fork

    def _checkpid(self) -> None:
        if self._pid == current_pid():
            return
        # Serialized: a second thread that noticed the fork too must not file
        # the first one's new connections as the parent's, nor reset them away.
        with process.FORK_LOCK[0]:
            if self._pid == current_pid():
                return
            # Everything we tracked is the parent's: never close it, never
            # release its lease. Weak references where possible, so that the
            # child does not keep the parent's connections alive.
            for entry in self._entries.values():
                try:
                    self._inherited[id(entry.key)] = weakref.ref(entry.key)
                except TypeError:
                    self._inherited[id(entry.key)] = entry.key
                if entry.kept is not None:
                    # Our copy only: no shutdown, the parent's socket goes on.
                    entry.kept.close()
                    entry.kept = None
            if self._admin_state == "draining":
                # The parent's session heard the drain; the child's may never
                # hear its end (a resume pushed before it connected).
                self._admin_state = None
            self._counters = dict.fromkeys(_COUNTERS, 0)  # the parent's counts are not ours
            self._reset()

    def connections_at_fork(self) -> list[Any]:
        """The connections tracked here (in a forked child: the parent's), and
        the dups of their sockets kept for closing them."""
        entries = list(self._entries.values())
        return ([e.key for e in entries if closable(e.key)]
                + [e.kept for e in entries if e.kept is not None])

    def inherited(self, key: Any) -> bool:
        """Whether ``key`` was opened by a parent process before a fork (I7)."""
        self._checkpid()
        ref = self._inherited.get(id(key))
        if ref is None:
            return False
        obj = ref() if isinstance(ref, weakref.ref) else ref
        return obj is key

    # ------------------------------------------------------------------ coordinator

    @property
    def client(self) -> Client | None:
        """This process's client for the coordinator (None without one)."""
        self._checkpid()
        # Checked here (a bad $SHAREDPOOL_SOCKET names itself), not in the property.
        path = self._coordinator if self._client is None else self._client.socket_path
        if path is None and (path := env_socket_path()) is None:
            if not self._said_standalone:
                self._said_standalone = True
                log.warning("%r: no coordinator (neither coordinator= nor $%s): connections "
                            "are opened without leases, capped only by the pool's own size",
                            self.resource, SOCKET_ENV)
            return None
        client = Client.for_path(path)
        while client is not self._client or client.closed:
            self._register(client)
            if not client.closed:
                break
            # Another pool's shutdown() ended the shared session (close_if_unused)
            # between for_path() and our handlers going in: take a new one.
            client = Client.for_path(path)
        return client

    def bind(self, idle: Callable[[], Iterable[Any]] | None,
             reclaim: Callable[[int], int] | None) -> None:
        """Point the idle / reclaim callbacks at a (new) pool."""
        self._idle, self._reclaim = idle, reclaim

    def _register(self, client: Client) -> None:
        ref = weakref.ref(self)

        def on_reclaim() -> None:
            book = ref()
            if book is not None:
                book._on_reclaim()

        def states() -> list[list[Any]]:
            book = ref()
            return [] if book is None else book._states()

        def on_push(verb: str, resource: str | None, args: dict[str, Any]) -> None:
            book = ref()
            if book is None or resource not in (None, book.resource):
                return
            if verb == "revoke":
                book._revoke(args.get("lease"), args.get("why"))
            elif verb in ("drain", "end_session", "resume"):
                book._on_admin(verb)
            elif verb == "welcome":  # a new session: a drain the coordinator no longer knows is over
                state = args.get("resources", {}).get(book.resource)
                if isinstance(state, dict) and state.get("draining") is False:
                    book._on_admin("resume")
                elif isinstance(state, dict) and state.get("draining") is True and book._admin_state is None:
                    book._on_admin("drain")  # ordered while we had no session

        with self._lock:
            if self._client is client:
                return
            if self._client is not None:
                self._client.remove_handlers(*self._handlers)
            client.on_reclaim(self.resource, on_reclaim)
            client.add_state_provider(states)
            client.on_push(on_push)
            self._client, self._handlers = client, (on_reclaim, states, on_push)
        # A book collected with its pool (engines made and dropped by the hundred)
        # must not leave its handlers behind in the process's client: every
        # reclaim and report would walk them, and the session would never end.
        weakref.finalize(self, client.forget_later, on_reclaim, states, on_push).atexit = False

    def shutdown(self) -> None:
        """Stop answering reclaims and reporting states (the pool is closed)."""
        self._checkpid()
        with self._lock:
            client, handlers = self._client, self._handlers
            self._client, self._handlers = None, ()
            self._shut = True
        if client is not None:
            client.remove_handlers(*handlers)
            # As our own pools do: the process's session ends with its last
            # user (else the coordinator counts it, and logs it lost at a stop).
            client.close_if_unused()

    def _on_reclaim(self) -> None:
        client = self._client
        if client is None or self._reclaim is None or self._pid != current_pid():
            return
        owed = client.owes(self.resource)
        if owed > 0:
            given = self._reclaim(owed)
            if given:
                log.debug("gave back %d %r lease(s) on reclaim", given, self.resource)

    def _on_admin(self, verb: str) -> None:
        """drain / end_session: idle connections close now (leases back), in-use
        ones at checkin (owes_back); after end_session no new lease is taken."""
        if self._pid != current_pid():
            return
        if verb == "resume":
            if self._admin_state == "draining":
                self._admin_state = None
            return
        if self._admin_state != "ended":
            self._admin_state = "ended" if verb == "end_session" else "draining"
        if self._reclaim is not None:
            with self._lock:
                count = len(self._entries)
            given = self._reclaim(count) if count else 0
            log.log(logging.WARNING if verb == "end_session" else logging.INFO,
                    "%r: coordinator says %s; closed %d idle connection(s), in-use ones close "
                    "at checkin", self.resource, verb, given)

    def revoked(self, key: Any) -> bool:
        """Whether ``key``'s lease was revoked: the host pool's reclaim closes
        such idle connections before any other (see :meth:`_revoke`)."""
        if not self._revoked or self._pid != current_pid():
            return False
        entry = self._entries.get(id(key))
        return entry is not None and entry.key is key and entry.revoked

    def _revoke(self, lease_id: Any, why: Any) -> None:
        """The coordinator did not take this lease back after a restart: its
        connection counts against no cap now. It is tracked without a lease
        (not reported, never released) and closed at its checkin
        (:meth:`owes_back`); if idle, it is closed now, through the host
        pool's reclaim, which takes revoked connections first (a count alone
        would close the coldest idle one: another, still leased connection,
        leaving the revoked one open, idle, counted nowhere)."""
        if self._pid != current_pid():
            return
        with self._lock:
            found = [e for e in self._entries.values() if e.lease is not None and e.lease.id == lease_id]
            for entry in found:
                entry.lease, entry.revoked = None, True
            self._revoked += len(found)
        if not found:
            return
        closed = 0
        if self._reclaim is not None:
            idle = self._idle_ids()
            count = len(found) if idle is None else sum(1 for e in found if id(e.key) in idle)
            closed = self._reclaim(count) if count else 0
        log.warning("%r lease %s revoked by the coordinator (%s): its connection counts against no "
                    "cap; %s", self.resource, lease_id, why,
                    "an idle connection was closed" if closed else "it is closed at its checkin")

    def _states(self) -> list[list[Any]]:
        if self._pid != current_pid():
            return []
        idle_ids = {id(c) for c in self._idle()} if self._idle is not None else set()
        with self._lock:
            entries = list(self._entries.values())
        return [[e.lease.id, "idle" if id(e.key) in idle_ids else "busy", e.backend_pid, None]
                for e in entries if e.lease is not None]

    # ------------------------------------------------------------------ open

    def acquire(self, key: Any, timeout: float | None = None,
                local: Callable[[], Any] | None = None, owner: Any = None) -> Any:
        """Take a lease for ``key`` before its socket is opened (waits up to
        ``timeout``; None: the resource's default). Raises what the client
        raises (PoolTimeout, LeaseDenied, CoordinatorUnavailable).

        With ``local``, the wait also ends when ``local()`` returns something
        other than None — a connection of the same pool came back, so the
        caller needs no new one: that value is returned, and the lease, when
        it comes, goes straight back. ``local()`` is called with the book's
        condition held; the pool calls :meth:`notify_returned` at checkin, or
        hands a connection over with :meth:`offer` (same ``owner``: the pool).
        Returns None once the lease is held under ``key``."""
        if self._admin_state == "ended":
            raise PoolClosed(f"{self.resource!r}: this process's session was ended by an admin "
                             "(sharedpool end-session); restart the process")
        client = self.client
        lease = None
        if client is not None:
            if local is None:
                lease = self._acquire(client, timeout)
            else:
                got = self._lease_or_local(client, timeout, local, owner)
                if not isinstance(got, _Granted):
                    return got
                lease = got.lease
        try:
            with self._lock:
                old = self._entries.pop(id(key), None)
                entry = _Entry(key, lease, client=client if lease is not None else None)
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
            log.warning("%r lease %s revoked by the coordinator as it was granted: the connection "
                        "counts against no cap; it is closed at its checkin", self.resource,
                        lease.id if lease is not None else None)
        if old is not None and old.kept is not None:  # its old socket's: no close will take it
            let_go(old.kept)
            old.kept.close()
            old.kept = None
        if old is not None and old.key is key and old.lease is not None and client is not None:
            log.warning("a %r connection re-opened without being closed; releasing its old lease",
                        self.resource)
            self._release(client, old.lease)
        return None

    def _acquire(self, client: Client, timeout: float | None) -> Lease:
        t0 = time.monotonic()
        try:
            lease = client.acquire(self.resource, timeout)
        except PoolTimeout:
            self.count("lease_timeouts")
            raise
        except Exception:
            self.count("lease_errors")
            raise
        self.count("leases_acquired")
        self.count("lease_wait_ms", int((time.monotonic() - t0) * 1000))
        return lease

    def _lease_or_local(self, client: Client, timeout: float | None,
                        local: Callable[[], Any], owner: Any) -> Any:
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
                self._release(client, lease)
                self.count("leases_unused")

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
            request = _CancellableAcquire(client, self.resource, timeout, tickets)
            threading.Thread(target=helper, args=(request,), name=f"sharedpool-lease-{self.resource}",
                             daemon=True).start()
            return self._wait_lease_or_local(wait, local, request, client)
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
                self._release(client, lease_back)
                self.count("leases_unused")
            if offered is not None and back is not None:
                try:
                    back()  # checked in again: to another waiter, or to the pool
                except Exception:  # noqa: BLE001 - the caller's exception goes on
                    log.exception("returning a connection handed to an interrupted wait failed")
            raise

    def _wait_lease_or_local(self, wait: _Wait, local: Callable[[], Any],
                             request: _CancellableAcquire, client: Client) -> Any:
        cond = self._returned
        withdraw = False
        with cond:
            self._waits.append(wait)
            self._waiting += 1
            try:
                while True:
                    got, wait.offered = wait.offered, None  # an offer is ours from here
                    if got is None and not wait.done:
                        got = local()
                    if got is not None:
                        # Served here: withdraw the acquire, or give back a
                        # lease that came at the same moment.
                        wait.abandoned = True
                        if wait.done and wait.lease is not None:
                            lease_back = wait.lease
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
            self._release(client, lease_back)
            self.count("leases_unused")
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

    def opened(self, key: Any, failed: bool = False, stray: list[int] | None = None) -> None:
        """``key``'s connect finished: report the outcome to the coordinator.
        A failed connect gives its lease back: at once with no socket left, else
        once the server has let go of the ``stray`` sockets it left open (a
        connect cut short, its half-made connection held by the exception's
        frames until collected), as after a close (I1)."""
        client = self._client
        if failed:
            entry = self._pop(key)
            if entry is not None and entry.client is not None:
                client = entry.client
            if client is not None and entry is not None and entry.lease is not None:
                client.report_failure(self.resource)
                if stray:
                    self._release_after(client, entry.lease, stray)
                else:
                    self._release(client, entry.lease)
            return
        entry = self._entries.get(id(key))
        if entry is not None:
            entry.backend_pid = backend_pid(key)
            if entry.kept is None:
                entry.kept = keep_socket(key)
            self._handoff.connected(time.monotonic() - entry.since)
            self._handoff.tell(client, self.resource)
        if client is not None:
            client.report_success(self.resource)
            if entry is not None and entry.backend_pid is not None:
                client.report_now()  # the fence must know it before any query runs

    def connect(self, factory: Callable[[], T], timeout: float | None = None) -> T:
        """Take a lease, then call ``factory``; the connection it returns is the key.
        If the factory fails, the lease goes straight back and the error propagates."""
        placeholder = object()
        self.acquire(placeholder, timeout)
        return self.open_under(placeholder, factory)

    def open_under(self, key: Any, factory: Callable[[], T]) -> T:
        """Call ``factory`` under the lease taken for ``key`` (a placeholder); the
        connection it returns becomes the key. If the factory fails, the error
        propagates and the lease goes back (see :meth:`opened`)."""
        before: frozenset[tuple[int, int, int]] | None = None
        try:
            before = open_fds()  # in the try: a signal's exception here must give the lease back
            conn = factory()
        except BaseException as exc:
            try:
                stray = half_made_sockets(exc, before)
            except Exception:  # noqa: BLE001 - never in place of the connect's own error
                stray = []
            self.opened(key, failed=True, stray=stray)  # stray: cut short, a socket left open
            raise
        self.rekey(key, conn)
        self.opened(conn)
        return conn

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
                del self._entries[id(old)]
                entry.key = new
                self._entries[id(new)] = entry

    # ------------------------------------------------------------------ close

    def owns(self, key: Any) -> bool:
        """Whether this process opened ``key`` through this book (leased or not)."""
        self._checkpid()
        entry = self._entries.get(id(key))
        return entry is not None and entry.key is key

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

    def _pop(self, key: Any) -> _Entry | None:
        """Stop tracking ``key``; the record returned is the only one left
        holding its lease (a connection keeping it sees it no longer does)."""
        with self._lock:
            entry = self._entries.get(id(key))
            if entry is None or entry.key is not key:
                return None
            del self._entries[id(key)]
            self._revoked -= entry.revoked
            popped = replace(entry)
            let_go(entry.kept)  # the caller's to close
            entry.lease = entry.kept = None
        return popped

    def close(self, key: Any, closer: Callable[[], object] | None = None, *,
              half_close_first: bool = False, reclaimed: bool = False) -> bool:
        """Close ``key`` (``closer()``, default ``key.close()``), confirm the
        server let go (bounded by ``confirm_timeout``), then release its lease.

        A connection inherited across fork is never touched (returns False).
        ``half_close_first`` is for closers that shut the socket down both ways
        (redis-py): we send our FIN and wait for the server's before calling it.
        Returns whether the close was confirmed."""
        self._checkpid()
        if self.inherited(key):
            return False
        entry = self._pop(key)
        if closer is None:
            target: Any = key
        elif half_close_first:
            target = _DisconnectVia(key, closer)
        else:
            target = _CloseVia(key, closer)
        client = entry.client if entry is not None and entry.client is not None else self._client
        lease = entry.lease if entry is not None else None
        kept = entry.kept if entry is not None else None
        if lease is not None:
            self._count_closing(1)
        released = False

        def late(confirmed: bool) -> None:
            nonlocal released
            if lease is None or released:
                return
            released = True
            if client is not None:
                self._release(client, lease)
            self._count_closing(-1)

        t0 = time.monotonic()
        try:
            confirmed = close_and_confirm(target, self.confirm_timeout,
                                          on_late=late if lease is not None else None, kept=kept)
        except NotClosable:
            late(True)  # nothing was closed, nor will be: the lease must not leak
            raise
        # Anything else cut the close short (a signal handler's exception):
        # close_and_confirm left the confirmation, and late(), to a watcher.
        if confirmed:
            self._handoff.closed(time.monotonic() - t0)
            self._handoff.tell(client, self.resource)
            late(True)
        if reclaimed and lease is not None:
            self.count("leases_reclaimed")
        if not confirmed:
            self.count("closes_unconfirmed")
            log.warning("%r: the server has not dropped a connection after %.1fs; its lease is "
                        "kept until it does", self.resource, self.confirm_timeout)
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

    def _release(self, client: Client, lease: Lease) -> None:
        client.release(lease)
        self.count("leases_released")
        if self._shut:  # a connection still out at shutdown() came back: maybe the last
            client.close_if_unused()

    # ------------------------------------------------------------------ reclaim

    def owes_back(self, key: Any) -> bool:
        """Whether ``key`` should be closed at checkin instead of pooled: the
        coordinator asked for leases back and this one is older than the
        resource's fairness quantum. Cheap: the checkin fast path calls it."""
        client = self._client
        if self._revoked and self._pid == current_pid():
            entry = self._entries.get(id(key))
            if entry is not None and entry.key is key and entry.revoked:
                return True
        if self._admin_state is not None and self._pid == current_pid():
            entry = self._entries.get(id(key))
            return entry is not None and entry.key is key and entry.lease is not None
        if client is None or not client.owes(self.resource) or self._pid != current_pid():
            return False
        entry = self._entries.get(id(key))
        if entry is None or entry.key is not key or entry.lease is None:
            return False
        quantum = self._handoff.quantum_for(client, self.resource)
        age = time.monotonic() - entry.lease.granted_at
        if age >= quantum:
            return True
        # Too young to pay now; it may sit idle from here on, and the reclaim
        # request came once: look again when the quantum has passed.
        self._recheck_after(quantum - age)
        return False

    def _recheck_after(self, delay: float) -> None:
        client = self._client
        with self._lock:
            if self._recheck or client is None:
                return
            self._recheck = True
        client.call_later(delay + 0.001, self._recheck_now)  # on the client's thread

    def _recheck_now(self) -> None:
        with self._lock:
            self._recheck = False
        try:
            self._on_reclaim()
        except Exception:  # noqa: BLE001 - the client's thread has nobody to raise to
            log.exception("sharedpool: giving back leases on reclaim failed")

    # ------------------------------------------------------------------ stats

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the lease counters (see :meth:`stats`)."""
        with self._lock:
            self._counters[name] += n

    def _count_closing(self, n: int) -> None:
        with self._lock:
            self._closing += n

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Lease counters plus two measures, never reset: ``leases_held`` (as
        the coordinator counts them: including ``leases_closing``, those of
        connections closed whose server has not let go yet)."""
        self._checkpid()
        with self._lock:
            out = dict(self._counters)
            out["leases_closing"] = self._closing
            out["leases_held"] = self._closing + sum(
                1 for e in self._entries.values() if e.lease is not None)
            if reset:
                self._counters = dict.fromkeys(_COUNTERS, 0)
        return out
