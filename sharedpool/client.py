"""One process's session to the coordinator: leases over a Unix socket.

Threads share one socket. Whoever waits for a reply reads the socket itself
(leader/follower, :mod:`sharedpool.receiving`), so a lease round trip costs no
thread hand-off. A small background thread (:mod:`sharedpool.background`)
picks up what arrives unasked while no caller is reading, runs timers and
handler jobs, sends coalesced reports, and reconnects with backoff
(:mod:`sharedpool.handshake`) — re-registering the leases this process still
holds (I4). After ``fork()`` the child never touches the parent's socket: it
closes its copy and starts its own session lazily (I7).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import socket
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from . import background, goodbye, handshake, outbox, receiving, timers
from . import protocol as p
from .atfork import in_child, warn_thread_in_uwsgi_master
from .background import BACKOFF_MIN, PARK_RECHECK
from .condition import Condition
from .config import (
    MAX_SOCKET_PATH,
    check_resource_name,
    check_seconds,
    check_socket_path,
    default_socket_path,
)
from .errors import ConfigError, CoordinatorUnavailable, PoolTimeout
from .handoff import MAX_COST
from .handshake import SEND_TIMEOUT
from .hooks import Hooks
from .lease import AcquireRequest, Lease, _Pending, note_withdrawn
from .owed import Owed
from .readable import cooperative
from .receiving import GRACE

__all__ = ["AcquireRequest", "Client", "Lease", "current_pid"]

log = logging.getLogger("sharedpool.client")

#: An acquire pending this long is taken as queued at the coordinator (one a
#: free slot serves is answered within a round trip, well under a millisecond
#: here): only then does another pool of the process give a slot back for it.
QUEUED_AFTER = 0.01
#: The longest ``name`` a Client takes: a label, sent in the hello.
MAX_NAME = 1000
#: A hello unanswered this long (a coordinator answers in milliseconds) is
#: said to be a stopped coordinator, or something else on the socket.
HELLO_SLOW = 0.5


class Client(Owed, Hooks):
    """A session to one coordinator, shared by every pool of this process.

    Use :meth:`for_path` to get the process's shared client for a socket.
    """

    def __init__(self, socket_path: str | None = None, *, name: str | None = None,
                 connect_timeout: float | None = 5.0) -> None:
        self.socket_path = _socket_path(socket_path)
        if name is not None and not isinstance(name, str):  # sent in the hello: refused there,
            # it read as "coordinator unreachable" at the first acquire
            raise ConfigError("name", f"must be a string or None, got {name!r}")
        if name is not None and len(name) > MAX_NAME:  # else "hello frame of N bytes exceeds ..."
            raise ConfigError("name", f"must be at most {MAX_NAME} characters (a label in the "
                                      f"coordinator's log and tables), got {len(name)}")
        # A label sent in the hello: a script path that is not UTF-8 refused every session.
        self.name = p.wire_text(name or os.path.basename(sys.argv[0] or "python"))
        if connect_timeout is not None and (  # NaN fails too; "5" and True are no seconds
                isinstance(connect_timeout, bool) or not isinstance(connect_timeout, int | float)
                or not 0 < connect_timeout < math.inf):
            raise ConfigError("connect_timeout", f"must be a number of seconds > 0 or None, "
                              f"got {connect_timeout!r}")
        self.connect_timeout = connect_timeout
        self._shared_key: str | None = None  # its key in the registry of for_path(), if there
        #: the wake pair and the last session socket: what _collected closes
        self._ends: list[socket.socket | None] = []
        self._init_state()
        # Not __del__: in a garbage cycle the sockets' own finalizers may run first
        # (each a ResourceWarning); weakref callbacks run before any of them.
        weakref.finalize(self, _collected, self._ends, self.socket_path).atexit = False
        _ALL.add(self)

    def _init_state(self) -> None:
        self._sock: socket.socket | None = None
        self._connecting: socket.socket | None = None  # a session still in its handshake
        self._connecting_since = 0.0  # when that handshake began (monotonic)
        self._conn: p.Connection | None = None
        #: the lock factory these locks were made by (see _checkpid)
        self._lock_factory = threading.Lock
        self._send_lock = threading.Lock()
        #: frames the coordinator has not taken yet, for the session on that socket (outbox.py)
        self._outbox = bytearray()
        self._outbox_sock: socket.socket | None = None
        self._outbox_since = 0.0
        self._read_lock = threading.Lock()
        self._cond = Condition()
        self._pending: dict[int, _Pending] = {}
        #: acquires withdrawn while out: request -> weakref to the pool that asked (see lease.py)
        self._withdrawn: dict[int, Any] = {}
        self._reqs = itertools.count(1)
        self._held: dict[int, Lease] = {}
        self._init_owed()
        #: resource -> this process's hand-off cost (seconds), and the last sent
        self._costs: dict[str, float] = {}
        self._sent_costs: dict[str, float] = {}
        self._init_hooks()
        self._failures: dict[str, int] = {}
        self._successes: set[str] = set()
        self._last_report: Any = None
        self._jobs: list[Callable[[], object]] = []
        self._timers: list[timers.Entry] = []
        self._timers_limit = timers.SWEEP_MIN  # swept of cancelled timers at this length
        self._timer_seq = itertools.count()
        # The background thread sleeps in poll() on this pair's read end.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ends[:] = [self._wake_r, self._wake_w, None]  # the parent's are closed after a fork
        self._woken = False
        self._parked = False  # the background thread waits for a leader to finish reading
        self._parked_since = self._park_wait = 0.0
        self._reported_at = 0.0
        self._report_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._starting = False  # _ensure_thread() is in the thread's start()
        self._next_attempt = 0.0
        self._backoff = BACKOFF_MIN
        #: the last session ended on a bad frame from the coordinator: its
        #: backoff holds across the next connect, until a frame reads fine
        self._sick = False
        self._reconnect_asked = False
        self.session_id: int | None = None
        self.server_pid: int | None = None
        #: the session's protocol version (an older coordinator's, in a rolling upgrade)
        self.protocol_version: int | None = None
        #: resource name -> limits, as the coordinator announced them
        self.limits: dict[str, dict[str, Any]] = {}
        self.last_error: str | None = None
        self.reconnects = 0
        # Last: a reset after fork that fails above (no fds left for the wake
        # pair) is tried again at the next call instead of counting as done.
        self._pid = os.getpid()

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else ("closed" if self._closed else "disconnected")
        return (f"<Client {self.socket_path} {state} session={self.session_id} "
                f"leases={len(self._held)} waiting={len(self._pending)}>")

    # ---------------------------------------------------------------- public

    @classmethod
    def for_path(cls, socket_path: str | None = None) -> Client:
        """This process's shared client for ``socket_path`` (made on first use)."""
        path = _socket_path(socket_path)
        # Keyed by the file, not the spelling: pools given "run/sp.sock" and
        # "/app/run/sp.sock" (or a symlink) share one session. Two sessions of
        # one process would each say hello after a coordinator restart, and
        # the first would speak for the process: the other's leases, not yet
        # re-registered, would be taken as closed while it was away (I1).
        key = _KEYS.get(path)
        anchored = path
        if key is None:
            # Joined to the working directory once, then resolved: another
            # thread's chdir in between must not key one file's client to
            # another's socket.
            anchored = _anchored(path)
            key = os.path.realpath(anchored)
            # Resolved once per absolute spelling (for_path() is on every
            # connect's path); a relative one names another file after a chdir.
            if os.path.isabs(path):
                _KEYS[path] = key
        with _REGISTRY_LOCK:
            client = _SHARED.get(key)
            if client is None or client._closed:
                # Kept absolute: a reconnect after a chdir (a coordinator
                # restart) must reach the same coordinator, not re-register
                # this process's leases with another one.
                client = _SHARED[key] = cls(anchored)
                client._shared_key = key
            return client

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (then :meth:`for_path` makes a new client)."""
        return self._closed

    @property
    def connected(self) -> bool:
        self._checkpid()
        return self._sock is not None

    def unreachable_note(self) -> str:
        """``"; coordinator at <path> unreachable: <why>"`` while no session is up
        after a failed attempt (one not tried yet is not "unreachable"); for a
        first attempt still under way, how long it has had no answer; else
        ``""``. Attributes only: no lock taken."""
        if self._closed or self._sock is not None:
            return ""
        if self.last_error:
            return f"; coordinator at {self.socket_path} unreachable: {self.last_error}"
        since = self._connecting_since
        if self._connecting is not None and since:
            # Something that accepts and never welcomes (a stopped coordinator, another
            # program's socket) read as a cap taken: "still waiting for a lease".
            age = time.monotonic() - since
            why = (" (a coordinator that is stopped or overloaded, or no sharedpool coordinator "
                   "listening there)" if age >= HELLO_SLOW else "")
            return f"; coordinator at {self.socket_path} has not answered our hello yet ({age:.1f}s){why}"
        return ""

    @property
    def held(self) -> dict[int, Lease]:
        """Leases this process holds, by id."""
        self._checkpid()
        return dict(self._held)

    def acquire(self, resource: str, timeout: float | None = None, *, site: str | None = None,
                _owner: object = None) -> Lease:
        """Block until the coordinator grants a lease of ``resource``.

        ``timeout`` None waits the resource's default; 0 does not queue.
        Raises PoolTimeout, a LeaseDenied subclass, or CoordinatorUnavailable
        (the coordinator could not be reached before the deadline)."""
        tickets: list[AcquireRequest] = []
        try:
            return self.request(resource, timeout, site=site, _into=tickets, _owner=_owner).wait()
        except BaseException:
            # Also a signal handler's exception between request() and the end of
            # wait(): the acquire is withdrawn, or a lease granted meanwhile goes back.
            for ticket in tickets:
                ticket._drop()
            raise

    def request(self, resource: str, timeout: float | None = None, *,
                site: str | None = None, fail_if_lost: bool = False,
                _into: list[AcquireRequest] | None = None, _owner: object = None) -> AcquireRequest:
        """Send an acquire now; :meth:`AcquireRequest.wait` for the lease, or
        :meth:`AcquireRequest.cancel` it from any thread (a pool whose waiter
        was served by a checkin withdraws its request this way).

        ``fail_if_lost``: if the session it went out on is lost, :meth:`wait`
        raises CoordinatorUnavailable instead of re-sending it to the next
        coordinator (a pool with ``coordinator_away="fallback"`` then opens
        a connection without a lease).

        ``_into`` (internal): the ticket is appended to it before this returns,
        so that a caller interrupted right after (a signal handler's exception
        lands between any two instructions) can still withdraw it. ``_owner``
        (internal): the pool asking, for :meth:`siblings_waiting`."""
        self._checkpid()
        timeout = check_seconds("timeout", timeout, optional=True, forever=True)
        # Refused here: a frame the coordinator refuses ends the session, and the
        # reconnect would send it again, and again.
        check_resource_name(resource)
        if site is not None and not isinstance(site, str):
            raise ConfigError("site", f"must be a string or None, got {site!r}")
        req = next(self._reqs)
        pending = _Pending(p.Acquire(req, resource, timeout, site), fail_if_lost=fail_if_lost, owner=_owner)
        # The coordinator keeps the real deadline; ours only guards a lost reply.
        local = None if timeout is None else time.monotonic() + timeout + GRACE
        if timeout is not None and 0 < timeout < math.inf:  # a try (0) is re-sent as one
            pending.ends = time.monotonic() + timeout
        try:
            self._submit(req, pending, local, patient=True)
            if local is None:
                # "The resource's default", as the coordinator announced it (known
                # once connected): without a bound, a coordinator that stops
                # answering holds this acquire for ever. Doubled: a reload may have
                # raised the default since the welcome. Not known yet: receiving.wait_reply bounds it.
                default = self._default_timeout(resource)
                if default is not None:
                    local = time.monotonic() + 2 * default + GRACE
                    if default > 0:  # re-sent after a restart, it asks for what is left of it
                        pending.ends = time.monotonic() + default
            ticket = AcquireRequest(self, req, pending, local)
            if _into is not None:
                _into.append(ticket)
            return ticket
        except BaseException:
            # Cut short once the acquire may be out (a signal handler's exception:
            # celery's soft time limit, Ctrl-C): nobody holds a ticket to wait for
            # or cancel it. Withdrawn here: a grant already in goes back, and one
            # still to come finds no pending request, so receiving.dispatch hands it back.
            if not _into:  # not yet handed to the caller: withdrawn here
                AcquireRequest(self, req, pending, None).cancel()
                with self._cond:
                    self._pending.pop(req, None)
            raise

    def _default_timeout(self, resource: str) -> float | None:
        """The resource's acquire_timeout as the coordinator announced it (None: not known)."""
        default = self.limits.get(resource, {}).get("acquire_timeout")
        if isinstance(default, int | float) and not isinstance(default, bool) and 0 <= default < math.inf:
            return float(default)
        return None

    def release(self, lease: Lease) -> None:
        """Give a lease back. Its connection must already be closed. No reply."""
        if not isinstance(lease, Lease):  # not an AttributeError from inside
            raise ConfigError("lease", f"must be a Lease from acquire(), got {lease!r}")
        self._checkpid()
        forgotten = False
        try:
            with self._cond:
                if lease.id not in self._held:
                    self._forget_giving(lease)  # a give-back claimed for it is over all the same
                    return  # already released, or lost with a previous coordinator
                # del, not pop(): no call between forgetting the lease and
                # marking it to be sent, so no signal handler runs there.
                del self._held[lease.id]
                forgotten = True
                with self._owed_lock:
                    owed = self._owed.get(lease.resource, 0)
                    if owed:
                        self._owed[lease.resource] = owed - 1
                    self._settle_giving(lease)
        finally:
            # Also when cut short (a signal handler's exception) once forgotten:
            # unsent, the coordinator would count the lease for the rest of the session.
            if forgotten:
                self._send_quiet(p.Release(lease.id))

    def ensure_connected(self) -> bool:
        """Whether a session is up, trying to connect first (unless in a backoff)."""
        self._checkpid()
        if self._sock is None and not self._closed:
            self._ensure_thread()  # a session needs its reader: reclaims and pushes come unasked
            handshake.try_connect(self, None)
        return self._sock is not None

    def reconnect_soon(self) -> None:
        """Have the background thread try to connect (once for any number of
        asks; a running backoff is respected). For callers that must not block
        on a coordinator that accepts but does not answer."""
        self._checkpid()
        with self._cond:
            if self._reconnect_asked or self._sock is not None or self._closed:
                return
            self._reconnect_asked = True
        self.call_later(0.0, self._reconnect_job)

    def _reconnect_job(self) -> None:
        wait = self._next_attempt - time.monotonic()
        if wait > 0 and self._sock is None and not self._closed:
            # A backoff runs: try when it ends. Skipped, nothing else tried
            # where no session is wanted (a fallback connection, no lease):
            # it was never handed back, however long the coordinator was up.
            self.call_later(wait, self._reconnect_job)
            return
        with self._cond:
            self._reconnect_asked = False
        handshake.try_connect(self, None)

    def speaks(self, op: str) -> bool:
        """Whether ``op`` may be sent on this session: an older coordinator's
        (a rolling upgrade) ends a session that sends it an op it does not know.
        Before any session, assumed: the first one's version is not known yet."""
        version = self.protocol_version
        return version is None or p.ADDED_IN.get(op, 0) <= version

    def siblings_waiting(self, resource: str, besides: object = None) -> int:
        """How many acquires of ``resource`` are queued for their lease, other
        than those of ``besides`` (a pool: other pools of this process, or
        callers of :meth:`request`, wait). One that does not queue (timeout 0:
        a min_size top-up) waits for nothing."""
        # One younger than QUEUED_AFTER is most likely being granted from a free
        # slot this moment: no reason for another pool to give one back for it.
        # Without a session none is queued anywhere: a slot given back now would
        # serve nobody, and the giver could not get one again until the
        # coordinator is back (I4: held connections keep working meanwhile).
        made_before = time.monotonic() - QUEUED_AFTER
        with self._cond:
            if self._sock is None:
                return 0
            return sum(1 for pd in self._pending.values()
                       if isinstance(pd.msg, p.Acquire) and pd.msg.resource == resource
                       and pd.msg.timeout != 0 and not pd.done and pd.owner is not besides
                       and pd.since <= made_before)

    def report_cost(self, resource: str, seconds: float) -> None:
        """What moving a slot of ``resource`` costs this process (connect +
        confirmed close); sent with the next report when it has changed."""
        if not 0 <= seconds <= MAX_COST:  # NaN and inf fail too: never sent, never fatal
            return
        self._checkpid()
        cost = round(seconds, 4)  # 0.1 ms: no report for noise below that
        if self._costs.get(resource) != cost:
            self._costs[resource] = cost
            self._ensure_thread()  # the reports go out from the background thread
            self._notify()

    def inspect(self, what: str, timeout: float = 5.0, **filters: Any) -> Any:
        """Ask the coordinator for resources, sessions, leases, fenced (leases
        of dead or not yet re-registered processes, whose slots still count) or
        server info."""
        if not isinstance(what, str):
            raise ConfigError("what", f"must be resources, sessions, leases, fenced or server, got {what!r}")
        return self._call(lambda req: p.Inspect(req, what, filters), timeout)

    def admin(self, verb: str, timeout: float = 5.0, **args: Any) -> Any:
        """Run an admin verb (pause, resume, drain, resize, end_session, reload)."""
        if not isinstance(verb, str):  # refused here, as inspect's ``what``: the coordinator ends the session
            raise ConfigError("verb", f"must be pause, resume, drain, resize, end_session or reload, "
                                      f"got {verb!r}")
        return self._call(lambda req: p.Admin(req, verb, args), timeout)

    def report_failure(self, resource: str) -> None:
        """Count a failed connect; sent with the next coalesced report. Raises no
        Exception: it is called where a connect failed, before that connect's
        lease goes back and its caller hears the connect's own error."""
        self._checkpid()
        with self._cond:
            self._failures[resource] = self._failures.get(resource, 0) + 1
        try:
            self._ensure_thread()  # the reports go out from the background thread
        except Exception:  # noqa: BLE001 - counted: sent once a thread runs again
            log.exception("sharedpool: no thread to report a failed connect of %r", resource)
        self._notify()

    def report_success(self, resource: str) -> None:
        """Say a connect worked; sent with the next coalesced report. The
        failures counted before it are dropped: the coordinator clears the
        streak first, then adds a report's failures (those come after it)."""
        if resource in self._successes and resource not in self._failures:
            return
        with self._cond:
            self._successes.add(resource)
            self._failures.pop(resource, None)

    def report_now(self) -> None:
        """Send a report from the calling thread now, if a session is up (the
        fence must know a new connection's backend pid before it is used).
        Never raises: a failure is logged, and the periodic report carries it."""
        try:
            self._checkpid()
            self._reported_at = 0.0
            background.send_report(self)
        except Exception:  # noqa: BLE001 - the caller's connection is good; the report is not vital now
            log.exception("reporting to coordinator %s failed", self.socket_path)

    def report_soon(self) -> None:
        """Send the next report at once, not after the coalescing interval (a
        new connection's backend pid matters to the fence)."""
        self._reported_at = 0.0
        self._notify()

    def close_if_unused(self) -> bool:
        """Close the session if no pool uses it and it holds and awaits nothing
        (the last pool of a process closing ends the process's session).

        A pool that got this client from :meth:`for_path` a moment before, and
        has not registered its handlers yet, finds it :attr:`closed` and asks
        :meth:`for_path` again."""
        # Decided and marked closed under the lock that handler changes take:
        # a pool registering meanwhile either is seen here (busy) or finds the
        # client closed once registered, never a client about to close (its
        # lease would be lost with the session while its connection stays open).
        with self._handlers_lock:
            if not self._change_handlers():  # what finalizers queued
                # Re-entered (a finalizer inside a change on this thread): the
                # changes are applied when it returns; look again after that.
                self.call_later(0.0, self.close_if_unused)
                return False
            with self._cond:
                if (self._held or self._pending or self._push_handlers or self._state_providers
                        or any(self._reclaim_handlers.values())):
                    return False
                self._closed = True
        self.close()
        return True

    def close(self, timeout: float = goodbye.GOODBYE_WAIT) -> None:
        """End the session; the coordinator returns (fences) any lease still held.

        Waits up to ``timeout`` for the coordinator to close its end, so that it
        has read every frame sent before (a release just sent is not lost)."""
        timeout = check_seconds("timeout", timeout)
        if self._pid != os.getpid():
            self._after_fork()
        self._closed = True
        self._notify()
        # Read and dup'd under the lock _disconnect takes it out under (it closes
        # it only then): a close() on another thread (two watchers giving a closed
        # pool's last leases back, each ending the session) closed it between the
        # dup's fileno() and dup(), and the number dup'd and shut for writing was
        # by then another socket's (another client's, mid-hello: hung up on).
        with self._cond:
            sock = self._sock
            kept = None if sock is None else goodbye.keep(sock)
        try:
            self._disconnect("client closed", retry=False)
            self._fail_all(CoordinatorUnavailable("client closed"))
            thread = self._thread
            if thread is None or not thread.is_alive():
                self._close_wake()  # else the background thread does, on its way out
            with _REGISTRY_LOCK:
                key = self._shared_key
                if key is not None and _SHARED.get(key) is self:
                    del _SHARED[key]
        finally:
            if kept is not None:
                goodbye.say(kept, self._send_lock, timeout, lambda: outbox.take(self, sock))

    # ---------------------------------------------------------------- requests

    def _call(self, make: Callable[[int], p.Message], timeout: float) -> Any:
        self._checkpid()
        timeout = check_seconds("timeout", timeout, forever=True, positive=True)
        req = next(self._reqs)
        pending = _Pending(make(req))
        deadline = time.monotonic() + timeout
        if self._submit(req, pending, deadline, patient=False):
            self._finish(req, pending, deadline, "request")
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _submit(self, req: int, pending: _Pending, deadline: float | None, patient: bool) -> bool:
        """Send a request (or connect, which sends it). Impatient requests
        (inspect, admin) fail at once, returning False, when the coordinator
        cannot be reached; acquires wait for it to come back."""
        if self._closed:
            raise CoordinatorUnavailable("client is closed")
        # Framed before it is registered: one that cannot be (an argument msgpack
        # cannot carry) must fail here, not stay pending and break the re-send
        # of every request behind it at each reconnect.
        data = p.encode(pending.msg)
        self._ensure_thread()
        with self._cond:
            if self._closed:  # close() ran since the check above: its _fail_all missed us
                raise CoordinatorUnavailable("client is closed")
            self._pending[req] = pending
            # Decided under the same lock as handshake.connect's re-send snapshot, so a
            # request is sent exactly once per session: on this socket, or by
            # the re-send of a session made since (never by both).
            sock = self._sock
        if sock is not None:
            self._send_quiet(pending.msg, sock, data)
        else:
            handshake.try_connect(self, deadline, force=not patient)
            if not patient and self._sock is None:
                with self._cond:
                    self._pending.pop(req, None)
                if pending.error is None:  # else the coordinator said why (AccessDenied): keep it
                    pending.error = CoordinatorUnavailable(  # no error yet: not tried in the time given
                        f"no coordinator at {self.socket_path}: {self.last_error or 'not reached in time'}")
                return False
        return True

    def _finish(self, req: int, pending: _Pending, deadline: float | None, what: str) -> None:
        """Wait for the reply; on a lost or late one, withdraw and say why."""
        try:
            receiving.wait_reply(self, pending, deadline)
        finally:  # also when cut short (a signal handler's exception): withdrawn
            with self._cond:
                self._pending.pop(req, None)
                lost = not pending.done
                if lost:
                    pending.abandoned = True
                    if self._sock is not None:
                        note_withdrawn(self, req, pending)
            if lost and self._sock is not None and isinstance(pending.msg, p.Acquire):
                self._send_quiet(p.Cancel(req))
        if not pending.done:
            if self._sock is None:
                pending.error = CoordinatorUnavailable(
                    f"coordinator at {self.socket_path} unreachable: {self.last_error}")
            else:
                maybe = " (it may still be carried out)" if isinstance(pending.msg, p.Admin) else ""
                pending.error = PoolTimeout(
                    f"{what} got no reply in time from the coordinator at {self.socket_path}{maybe}")

    # ---------------------------------------------------------------- connection

    def _wants_session(self) -> bool:
        """Whether a lost session is to be made again by the background thread:
        leases to re-register, requests waiting, or pools that had a session
        (their pushes, and a drain ended by a restart, come through it)."""
        return not self._closed and bool(self._pending or self._held
                                         or (self._push_handlers and self.reconnects))

    def _disconnect(self, why: str, retry: bool = True, only: socket.socket | None = None) -> None:
        """End the session (``only``: if it is still the one on that socket;
        a reader that saw an old socket fail must not end its successor)."""
        with self._cond:
            if only is not None and self._sock is not only:
                with contextlib.suppress(OSError):
                    only.close()
                return
            sock, self._sock, self._conn = self._sock, None, None
            self.session_id = None
            with self._owed_lock:
                self._owed.clear()
            self._quanta.clear()
            self._idle_only.clear()
            if retry and not self._closed:
                self.last_error = why
            if sock is not None:
                for pending in self._pending.values():
                    if pending.fail_if_lost and not pending.done:
                        pending.error = CoordinatorUnavailable(f"lost coordinator {self.socket_path}: {why}")
                        pending.done = True
            self._cond.notify_all()
        if sock is not None:
            if not self._closed:
                # A coordinator this process is stopping itself (at its exit) is no loss to warn of.
                expected = self._shared_key is not None and self._shared_key in _STOPPING
                log.log(logging.DEBUG if expected else logging.WARNING,
                        "lost coordinator %s: %s; will reconnect", self.socket_path, why)
            with contextlib.suppress(OSError):
                sock.close()
            self._notify()  # the background thread may be polling the closed socket

    def _send_quiet(self, msg: p.Message, sock: socket.socket | None = None,
                    data: bytes | None = None) -> None:
        """Send one frame (on ``sock`` only, if given: not on a session made
        since); a dead socket is noticed here and by the reader. ``data``:
        ``msg`` already framed."""
        if sock is None:
            sock = self._sock
        if sock is None:
            return
        if data is None:
            data = p.encode(msg)
        queued = False
        with self._send_lock:
            if self._sock is not sock:
                return
            try:
                if cooperative(sock):
                    sock.sendall(data)
                else:  # never waits for the coordinator: what it does not take yet waits in order
                    queued = outbox.send(self, sock, data)
            except OSError as exc:  # a frame half out is a broken stream: the session ends
                # EAGAIN past SO_SNDTIMEO; a gevent / eventlet socket's own timeout
                if isinstance(exc, outbox.NotReading):
                    log.warning("coordinator %s does not read (%s); dropping the session",
                                self.socket_path, exc.strerror)
                elif exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or isinstance(exc, TimeoutError):
                    log.warning("coordinator %s has not read for %gs; dropping the session",
                                self.socket_path, SEND_TIMEOUT)
                elif exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EBADF):
                    log.warning("send to coordinator failed: %s", exc)
                self._disconnect(f"send failed: {exc}", only=sock)
        if queued:
            self._notify()  # the background thread sends it once the socket is writable

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            for pending in self._pending.values():
                if not pending.done:
                    pending.error, pending.done = error, True
            self._cond.notify_all()

    # ---------------------------------------------------------------- background

    def _ensure_thread(self) -> None:
        if self._closed:  # a report after close() has nobody to go to: no thread for it
            return
        if self._thread is None or not self._thread.is_alive():
            with _REGISTRY_LOCK:
                # Starting counts as running: under gevent start() waits for the
                # new greenlet, and another one gets here meanwhile. The lock does
                # not keep it out: made at the fork, before a gunicorn worker
                # patches (gevent leaves existing locks real), it is a real RLock,
                # which every greenlet of the thread holds at once: each started a reader.
                if self._starting or (self._thread is not None and self._thread.is_alive()):
                    return
                warn_thread_in_uwsgi_master()
                self._thread = threading.Thread(
                    target=background.run, args=(weakref.ref(self),),
                    name=f"sharedpool-client-{os.getpid()}", daemon=True)
                self._starting = True
                try:
                    self._thread.start()
                finally:
                    self._starting = False

    def call_later(self, delay: float, job: Callable[[], object]) -> timers.Timer:
        """Run ``job()`` on the background thread after ``delay`` seconds (one
        thread for every timer of the process: no thread per timer). The
        :class:`~sharedpool.timers.Timer` returned can be cancelled."""
        self._checkpid()
        when = time.monotonic() + max(0.0, delay)
        timer = timers.Timer(job)
        with self._cond:
            first = not self._timers or when < self._timers[0][0]
            self._timers_limit = timers.push(self._timers, (when, next(self._timer_seq), timer),
                                             self._timers_limit)
        self._ensure_thread()
        if first:
            self._notify()
        return timer

    def run_soon(self, job: Callable[[], object]) -> None:
        """:meth:`call_later` for a finalizer: takes no lock (the thread the
        garbage collector interrupted may hold any) and starts no thread.
        Dropped if the client closes first."""
        self._jobs.append(job)  # one step under the GIL: the background thread's swap keeps it
        with contextlib.suppress(Exception):  # a finalizer must not raise (closed, forked)
            self._notify()

    def _close_wake(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()

    def _notify(self) -> None:
        """Wake the background thread (from any thread; cheap when it is already woken)."""
        if self._woken:
            return
        self._woken = True
        with contextlib.suppress(OSError):  # full (it is awake anyway) or closed after a fork
            self._wake_w.send(b"\0")

    def _done_reading(self) -> None:
        """A leader stopped reading: followers may lead; a background thread
        that left the socket to a long read is woken to watch it again (after
        a short one, it looks again on its own within PARK_RECHECK)."""
        with self._cond:
            self._cond.notify_all()
            wake = self._parked and time.monotonic() - self._parked_since >= 2 * PARK_RECHECK
            if wake:
                self._parked = False
        if wake:
            self._notify()

    # ---------------------------------------------------------------- fork

    def _checkpid(self) -> None:
        if self._pid != _PID[0] or self._lock_factory is not threading.Lock:
            with _REGISTRY_LOCK:
                if self._pid != _PID[0]:
                    self._after_fork()
                elif self._lock_factory is not threading.Lock:
                    self._green_locks()

    def _green_locks(self) -> None:
        """gevent patched threading after our locks were made: at the fork, in a
        gunicorn worker that patches once forked, by a client the master used
        (--preload). A real lock held across a switch (the send lock, over a
        handshake or a full socket) blocked the whole hub for good once another
        greenlet waited for it. Remade at the first call since the patching: none
        is held then (what can switch holding one, a send, comes through here first)."""
        self._lock_factory = threading.Lock
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._cond = Condition()
        self._report_lock = threading.Lock()
        self._owed_lock = threading.Lock()
        self._handlers_lock = threading.RLock()

    def _after_fork(self) -> None:
        # The inherited socket is the parent's session: close our copy of the
        # fd (no shutdown, no bytes sent) so the parent's death is still seen
        # by the coordinator, then start afresh. The parent's leases stay its own.
        # Closed first: if making ours fails, the parent's session must still end
        # with the parent. A client closed before the fork stays closed.
        for sock in (self._sock, self._connecting, self._wake_r, self._wake_w):  # the parent's
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        closed = self._closed
        self._init_state()
        if closed:
            self._closed = True
            self._close_wake()


def _collected(ends: list[socket.socket | None], path: str) -> None:
    """Finalizer of a client collected without :meth:`Client.close`: close its
    sockets now (no shutdown, no goodbye: it takes no lock, waits for nothing).
    The coordinator then ends the session, its leases returned through the
    fence (I2). Closing the wake pair also ends the background thread at once.
    A session left open is the caller's leak: a ResourceWarning names it, as
    psycopg's for a connection deleted while open; nothing of ours warns."""
    session = ends[2]
    was_open = session is not None and session.fileno() != -1
    for end in (session, ends[1], ends[0]):
        if end is not None:
            with contextlib.suppress(OSError):
                end.close()
    if was_open:
        warnings.warn(f"sharedpool Client for {path} was deleted with its session open: "
                      "closed now, any lease it held goes back through the fence; call close()",
                      ResourceWarning, stacklevel=1)  # a finalizer: no caller to point at


def _socket_path(given: Any) -> str:
    """The path given (checked, as a str), else the default one."""
    return check_socket_path("socket_path", default_socket_path() if given is None else given)


def _anchored(path: str) -> str:
    """``path`` joined to the working directory if relative (unless that is
    too long for a Unix socket: then as given)."""
    if os.path.isabs(path):
        return path
    full = os.path.join(os.getcwd(), path)
    return full if len(os.fsencode(full)) <= MAX_SOCKET_PATH else path


_REGISTRY_LOCK = threading.RLock()
_SHARED: dict[str, Client] = {}
#: socket path as given -> the file's real path, the key of _SHARED
_KEYS: dict[str, str] = {}
#: real paths of coordinators this process is stopping itself (see expect_end)
_STOPPING: set[str] = set()


def expect_end(socket_path: str) -> None:
    """This process is about to stop the coordinator at ``socket_path`` (an
    embedded one, at exit): its clients' sessions ending is no loss to warn of."""
    _STOPPING.add(os.path.realpath(socket_path))
_ALL: weakref.WeakSet[Client] = weakref.WeakSet()


#: This process's pid, refreshed in the child at fork: a pid check without a syscall.
_PID = [os.getpid()]


def current_pid() -> int:
    """The pid as of the last fork (cheap; kept current by an at-fork hook)."""
    return _PID[0]


def _reset_after_fork() -> None:
    global _REGISTRY_LOCK
    _PID[0] = os.getpid()
    _REGISTRY_LOCK = threading.RLock()
    for client in list(_ALL):
        try:
            client._after_fork()
        except Exception:  # noqa: BLE001 - the others still reset; this one retries on use
            log.exception("resetting %r after fork failed", client)


in_child(_reset_after_fork)
