"""The state of a LeaseBook (sharedpool/contrib/_leases.py): its records,
fork safety, its place in the process's client (reclaim, idle / busy
reports, admin pushes, revokes) and its counters.

Everything in this file reads or changes the book's state; taking leases
(_acquiring.py) and giving them back (_leases.py) build on it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .. import process
from ..client import Client, Lease, current_pid
from ..condition import Condition
from ..config import SOCKET_ENV, check_resource_name, check_seconds, check_socket_path, env_socket_path
from ..giveback import IDLE_GIVE_BACK, min_turn
from ..handoff import HandOffCost
from ._orphans import Left, closable, close_left, let_go

if TYPE_CHECKING:
    from ._acquiring import _Wait

log = logging.getLogger("sharedpool.contrib")

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
    #: last checked in while a lease was owed and too young to pay (owes_back)
    owed_checkin: float = 0.0

    @property
    def collected(self) -> bool:
        """Its connection was collected unclosed (see _Lendable): never here."""
        return False


class _Lendable(_Entry):
    """The record of a connection its host pool lends out and holds no longer
    (psycopg_pool keeps no hold on a connection checked out): while lent, the
    book holds it weakly too, so that one its user drops unreturned is
    collected, as with the plain pool, and its lease comes back then
    (``finalizer``: _orphans.close_collected). Armed once per connection
    (LeaseBook.opened); a checkout and a checkin only swap a reference."""

    _strong: Any = None  # the connection, held: None while lent
    #: the thread it was handed to, until checked in (see LeaseBook.handed)
    thread: int | None = None
    _ref: weakref.ref[Any] | None = None  # set once armed
    finalizer: weakref.finalize[Any, Any] | None = None

    @property  # type: ignore[override]
    def key(self) -> Any:
        held = self._strong
        if held is not None or self._ref is None:
            return held
        return self._ref()  # lent: None once collected

    @key.setter
    def key(self, value: Any) -> None:  # a new key (rekey, _pop): held, and disarmed
        self._strong, self._ref = value, None

    @property
    def collected(self) -> bool:
        """Lent and dropped: close_collected owns its lease and kept socket."""
        return self._strong is None and self._ref is not None and self._ref() is None


@dataclass(eq=False)
class _Loose:
    """A connection its host pool let go of, still leased: SQLAlchemy's
    ``detach()`` makes it its user's to close. Held weakly, so that one
    dropped unclosed is collected, as in plain SQLAlchemy; ``finalizer`` then
    gives the lease back once the server let go (_orphans.close_collected)."""

    ref: weakref.ref[Any]
    entry: _Entry  # its key None: the connection is held by ``ref`` alone
    finalizer: weakref.finalize[Any, Any]


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


class _Book:
    """What every part of a LeaseBook shares; only LeaseBook is made."""

    def __init__(self, resource: str, coordinator: str | None = None, *,
                 confirm_timeout: float = 2.0,
                 idle: Callable[[], Iterable[Any]] | None = None,
                 reclaim: Callable[[int], int] | None = None,
                 close_when_collected: bool = True, lends: bool = False) -> None:
        check_seconds("confirm_timeout", confirm_timeout)  # NaN, inf and True are no timeouts
        self.resource = check_resource_name(resource)
        self._coordinator = None if coordinator is None else check_socket_path("coordinator", coordinator)
        self.confirm_timeout = float(confirm_timeout)
        self._idle = idle
        self._reclaim = reclaim
        #: the host pool holds no checked-out connection: records are _Lendable (see lend())
        self._entry_class = _Lendable if lends else _Entry
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

    if TYPE_CHECKING:  # LeaseBook's, in _leases.py: process.register() calls it at exit
        def release_for_exit(self, timeout: float, wait_in_use: bool = True, *,
                             exit_timeout: float | None = None) -> None: ...

        def session_kept(self) -> Client | None: ...

        def _arm(self, key: Any, entry: _Lendable) -> None: ...

    @property
    def coordinator(self) -> str | None:
        """The socket given, else ``$SHAREDPOOL_SOCKET`` as it is when first needed."""
        if self._client is not None:
            return self._client.socket_path
        return self._coordinator if self._coordinator is not None else os.environ.get(SOCKET_ENV) or None

    def unreachable_note(self) -> str:
        """Why a lease wait may have timed out: :meth:`Client.unreachable_note`, or ``""``."""
        client = self._client
        return "" if client is None else client.unreachable_note()

    def _reset(self) -> None:
        # _pid is set last: a thread of a forked child that sees it current
        # (and skips _checkpid's lock) must find the child's state all made.
        pid = current_pid()
        self._lock = threading.RLock()  # an RLock: _none_closing waits on it (see condition.py)
        self._entries: dict[int, _Entry] = {}
        self._detached: dict[int, _Loose] = {}  # by id(connection); see LeaseBook.detached()
        left = getattr(self, "_left", None)
        if left is not None:  # after fork: the finalizer sees the child's entries
            left.entries, left.pid = self._entries, pid
        self._returned = Condition()
        self._waiting = 0
        self._waits: list[_Wait] = []
        self._recheck = False  # a recheck is scheduled
        self._recheck_delay = IDLE_GIVE_BACK  # doubles while an owed lease stays in use
        self._recheck_round = 0  # the round of asking _recheck and _recheck_delay are of
        self._recent = 0.0  # a reclaim passed over a young connection: when to look again
        self._in_turn = False  # ... an idle one, its first turn not over (pays_back)
        self._closing = 0  # leases of closed connections, kept until the server lets go
        #: of _closing: closes left to a watcher (not confirmed in time; the server may hang)
        self._unconfirmed = 0
        self._none_closing = Condition(self._lock)  # notified as closes end or are left to a watcher
        self._hung_until = 0.0  # a close went unconfirmed: the next ones until then do not wait
        self._revoked = 0  # tracked connections whose lease was revoked
        self._handoff = HandOffCost()
        self._client: Client | None = None
        self._handlers: tuple[Any, ...] = ()
        self._shut = False  # shutdown(): the last lease back may end the session
        #: release_for_exit() ran: the process is leaving, no lease is taken after it
        self.exited = False
        self._pid = pid

    def __repr__(self) -> str:
        return (f"<LeaseBook {self.resource!r} coordinator={self.coordinator!r} "
                f"connections={len(self._entries)}>")

    def __len__(self) -> int:
        self._checkpid()
        return len(self._entries) + len(self._detached)

    def _idle_ids(self) -> set[int] | None:
        """The ids of the pool's idle connections; None when it cannot tell."""
        if self._idle is None:
            return None
        try:
            return {id(c) for c in self._idle()}
        except Exception:  # noqa: BLE001 - exiting: treat everything as idle
            log.exception("sharedpool: listing the idle connections at exit failed")
            return None

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
                if isinstance(entry, _Lendable) and entry.finalizer is not None:
                    entry.finalizer.detach()  # it holds its idle connection; does nothing here
                if entry.collected:
                    continue  # nothing left to inherit
                try:
                    self._inherited[id(entry.key)] = weakref.ref(entry.key)
                except TypeError:
                    self._inherited[id(entry.key)] = entry.key
                if entry.kept is not None:
                    # Our copy only: no shutdown, the parent's socket goes on.
                    entry.kept.close()
                    entry.kept = None
            for key_id, loose in self._detached.items():
                self._inherited[key_id] = loose.ref  # its finalizer here does nothing (pid)
                if loose.entry.kept is not None:
                    loose.entry.kept.close()
                    loose.entry.kept = None
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
        loose = [(x.ref(), x.entry) for x in list(self._detached.values())]
        return ([e.key for e in entries if closable(e.key)]
                + [e.kept for e in entries if e.kept is not None]
                + [conn for conn, _ in loose if closable(conn)]
                + [e.kept for _, e in loose if e.kept is not None])

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
                log.warning("sharedpool: %r: no coordinator (neither coordinator= nor $%s): connections "
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
        weakref.finalize(self, _forget, client, on_reclaim, states, on_push).atexit = False

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

    def _on_reclaim(self) -> int:
        client = self._client
        if client is None or self._reclaim is None or self._pid != current_pid():
            return 0
        given = 0
        if self._recheck_round != (asked := client.owed_round(self.resource)):
            # A new round of asking: a look armed (and a delay doubled) in the last
            # one, up to a quantum away, must not hold this round's idle lease (as giveback's).
            with self._lock:
                self._recheck_round, self._recheck, self._recheck_delay = asked, False, IDLE_GIVE_BACK
        owed = client.owed_left(self.resource)  # less what checkins of any pool are giving back
        if owed > 0:
            self._recent, self._in_turn = 0.0, False
            given = self._reclaim(owed)
            if given:
                log.debug("gave back %d %r lease(s) on reclaim", given, self.resource)
            if self._recent and client.owed_left(self.resource):
                # One checked in a moment ago, or in its first turn: look again then.
                self._recheck_after(self._recent)
        return given

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
                    "sharedpool: %r: coordinator says %s; closed %d idle connection(s), in-use ones close "
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
            # A detached connection is its user's to close: it stays open,
            # neither counted, reported, nor released from here on.
            loose = [x.entry for x in self._detached.values()
                     if x.entry.lease is not None and x.entry.lease.id == lease_id]
            for entry in loose:
                entry.lease = None
        if loose:
            log.warning("sharedpool: %r lease %s revoked by the coordinator (%s): its connection, detached, "
                        "counts against no cap until its user closes it", self.resource, lease_id, why)
        if not found:
            return
        closed = 0
        if self._reclaim is not None:
            idle = self._idle_ids()
            count = len(found) if idle is None else sum(1 for e in found if id(e.key) in idle)
            closed = self._reclaim(count) if count else 0
        log.warning("sharedpool: %r lease %s revoked by the coordinator (%s): its connection counts "
                    "against no cap; %s", self.resource, lease_id, why,
                    "an idle connection was closed" if closed else "it is closed at its checkin")

    def _states(self) -> list[list[Any]]:
        if self._pid != current_pid():
            return []
        idle_ids = {id(c) for c in self._idle()} if self._idle is not None else set()
        with self._lock:
            entries = list(self._entries.values())
            entries += [x.entry for x in self._detached.values()]  # busy: their users'
        # Each lease read once: a close on another thread may take it away meanwhile.
        # A lease whose connection is still being opened (a placeholder) is left
        # out: the coordinator shows it as connecting, as our own pool's (it read
        # "in use").
        return [[lease.id, "idle" if id(e.key) in idle_ids else "busy", e.backend_pid, None]
                for e in entries if (lease := e.lease) is not None and closable(e.key)]

    # ------------------------------------------------------------------ records (both sides use)

    def _pop(self, key: Any, closing: bool = False, into: list[_Entry | None] | None = None) -> _Entry | None:
        """Stop tracking ``key``; the record returned is the only one left
        holding its lease (a connection keeping it sees it no longer does).
        ``closing``: its lease counts as closing from the same step (an exit
        looking meanwhile must see it closing, not gone: see release_for_exit).
        ``into``: its first item is set to that record in the step that stops
        tracking ``key``, with no call between (a signal handler's exception
        in here or just after leaves it tracked, or there for the caller)."""
        with self._lock:
            loose = None
            entry = self._entries.get(id(key))
            if entry is None or entry.key is not key:
                loose = self._detached.get(id(key))
                if loose is None or loose.ref() is not key:
                    return None
                entry = loose.entry
            popped = replace(entry, key=key)
            # From here to the end of the step, no call: either all of it, or none.
            if into is not None:
                into[0] = popped
            if loose is None:
                del self._entries[id(key)]
                self._revoked -= entry.revoked
            else:
                del self._detached[id(key)]
            if closing and popped.lease is not None:
                self._closing += 1
            entry.lease = entry.kept = None
            if loose is not None:
                loose.finalizer.detach()  # closed by its user: nothing left for the collector
            if isinstance(entry, _Lendable) and entry.finalizer is not None:
                entry.finalizer.detach()  # closed: never lent out again
            let_go(popped.kept)  # the caller's to close
        return popped

    def _release(self, client: Client, lease: Lease) -> None:
        try:
            client.release(lease)
        except BaseException:
            # Cut short before it took the lease off (a signal handler's exception
            # at its first instructions), it is still held: once more (else a no-op).
            client.release(lease)
            raise
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
        if client is None or self._pid != current_pid():
            return False
        owed = client.owes(self.resource)
        # Another pool of this process waits for this resource: the coordinator
        # cannot tell it from this pool's own waiters (it asks a waiting process
        # only for idle leases), so the slot goes to it as to another process's.
        siblings = 0 if owed or not client._pending else client.siblings_waiting(self.resource, besides=self)
        if not owed and not siblings:
            return False
        entry = self._entries.get(id(key))
        if entry is None or entry.key is not key or (lease := entry.lease) is None:
            return False
        quantum = self._handoff.quantum_for(client, self.resource)
        age = time.monotonic() - lease.granted_at
        if age >= quantum:
            # One give-back per lease owed, across every pool of this process:
            # concurrent checkins (of this pool or another) must not each pay.
            return client.take_owed(lease) if owed else client.take_for_siblings(lease, siblings)
        if owed:
            # Too young to pay at checkin; if it sits idle from here on it goes as
            # an idle lease does (the local pool's rule), not at the quantum's end
            # while a waiter elsewhere waits for it: look again in a moment.
            entry.owed_checkin = time.monotonic()
            self._recheck_after(self._recheck_delay)
        return False

    def pays_back(self, key: Any) -> bool:
        """For the host pool's reclaim, as it picks idle ``key`` to close: whether
        closing it now is asked for. Revoked, or an admin drain / end: yes.
        Else it must pay one of the leases the coordinator asked back, and is
        claimed for it here (Client.take_owed), so that no checkin or reclaim
        of another pool of this process pays the same lease again; its
        release settles the claim. Called by the pool under its own lock."""
        if self._pid != current_pid():
            return False
        entry = self._entries.get(id(key))
        if entry is None or entry.key is not key:
            return False
        if entry.revoked or self._admin_state is not None:
            return True
        if time.monotonic() - entry.owed_checkin < IDLE_GIVE_BACK:
            # Checked in a moment ago while owed: in a busy loop it is out again at
            # once, and taking it would cut its turn short (_on_reclaim looks again).
            self._recent = min(self._recent or IDLE_GIVE_BACK, IDLE_GIVE_BACK)
            return False
        lease, client = entry.lease, entry.client
        if lease is None or client is None:
            return False
        # Idle, but within its first turn: a slot that just moved stays a turn
        # (giveback.min_turn), or bursty processes pass it back and forth.
        turn = min_turn(self._handoff.quantum_for(client, self.resource))
        left = turn - (time.monotonic() - lease.granted_at)
        if left > 0:
            self._recent, self._in_turn = min(self._recent or left, left), True
            return False
        return client.take_owed(lease)

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
        given = 0
        try:
            given = self._on_reclaim()
        except Exception:  # noqa: BLE001 - the client's thread has nobody to raise to
            log.exception("sharedpool: giving back leases on reclaim failed")
        client = self._client
        if given or client is None or not client.owes(self.resource):
            self._recheck_delay = IDLE_GIVE_BACK
        elif not self._in_turn:  # (idle in its first turn: not in use, and looked at then)
            # still in use here: the next checkin looks again later, and less often
            quantum = self._handoff.quantum_for(client, self.resource)
            self._recheck_delay = max(IDLE_GIVE_BACK, min(self._recheck_delay * 2, quantum))

    # ------------------------------------------------------------------ stats

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the lease counters (see :meth:`stats`)."""
        with self._lock:
            self._counters[name] += n

    def grant_unused(self) -> None:
        """A lease granted to a wait given up (served here meanwhile) before
        it was taken: the client gave it straight back. Counted as any lease granted and never
        used, so that the pools' leases_acquired add up to the coordinator's grants."""
        with self._lock:
            self._counters["leases_acquired"] += 1
            self._counters["leases_unused"] += 1

    def _count_closing(self, n: int, unconfirmed: int = 0) -> None:
        with self._lock:
            self._closing += n
            self._unconfirmed += unconfirmed
            if self._closing <= self._unconfirmed:  # an exit may wait for that (LeaseBook._wait_closed)
                self._none_closing.notify_all()

    def stats(self, reset: bool = False) -> dict[str, int]:
        """Lease counters plus two measures, never reset: ``leases_held`` (as
        the coordinator counts them: including ``leases_closing``, those of
        connections closed whose server has not let go yet)."""
        self._checkpid()
        with self._lock:
            out = dict(self._counters)
            out["leases_closing"] = self._closing
            out["leases_held"] = self._closing + sum(
                1 for e in self._entries.values() if e.lease is not None) + sum(
                1 for x in self._detached.values() if x.entry.lease is not None)
            if reset:
                self._counters = dict.fromkeys(_COUNTERS, 0)
        return out


def _forget(client: Client, *handlers: Any) -> None:
    """Finalizer of a collected book: its handlers go, and, as for a dropped
    ConnectionPool, the session ends if nothing else uses it. A book with no
    connection left (an engine disposed, then dropped) kept it open for the
    life of the process. Takes no lock and starts no thread (see close_left)."""
    client.forget_later(*handlers)
    client.run_soon(client.close_if_unused)
