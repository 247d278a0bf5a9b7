"""The local pool: this process's real connections, each covered by a lease.

Checkout and checkin of a connection already open touch one lock and one
deque, nothing else: their fast paths are here. Opening (lease round trip +
factory: sharedpool.opening), closing (close, confirm the server let go,
release the lease) and validation happen outside the lock: the locked sections
only decide, and return what to do. The slow paths live beside this module:
sharedpool.waiting (a checkout that waits), sharedpool.checkin (a checkin that
gives back, hands over or closes), sharedpool.shutdown (close() and drain()),
sharedpool.giveback (what the coordinator asks), sharedpool.maintenance,
sharedpool.dropped (a pool collected without close()).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, NoReturn, TypeVar

from . import checkin, dropped, maintenance, opening, process, shutdown, waiting
from .client import _PID, AcquireRequest, Client, current_pid
from .closing import ACTIVE, INERROR, INTRANS, UNKNOWN, transaction_status
from .condition import Condition
from .config import (
    SOCKET_ENV,
    PoolConfig,
    check_resource_name,
    check_socket_path,
    check_sync_callable,
    env_socket_path,
    keywords_checked,
)
from .errors import ConfigError, PoolMisuse
from .giveback import IDLE_GIVE_BACK
from .handoff import HandOffCost
from .status import PoolStatus, valid_timeout
from .waiting import _Waiter
from .wrapper import ConnectionWrapper, _call_site, _Checkout

log = logging.getLogger("sharedpool.pool")

T = TypeVar("T")

#: Connections abandoned in a forked child: the parent's, kept referenced so
#: that no destructor ever closes them from the child (I7).
_INHERITED = dropped.INHERITED


_ACTIVE = PoolStatus.ACTIVE
_monotonic = time.monotonic


def _txn_status(wrapper: ConnectionWrapper[Any]) -> int | None:
    """libpq's transaction status of the wrapper's connection (None: it has none).
    The same reading at checkin and after a rollback, so the two cannot disagree."""
    if wrapper.txn is None:
        return transaction_status(wrapper.conn)
    try:
        return wrapper.txn()
    except Exception:  # noqa: BLE001 - psycopg2 raises for a closed connection
        return UNKNOWN


#: psycopg_pool's names for what PoolConfig calls otherwise.
_PSYCOPG_NAMES = {"timeout": "acquire_timeout", "max_idle": "idle_timeout"}
_F = TypeVar("_F", bound=Callable[..., None])


def _named_keywords(init: _F) -> _F:
    """A keyword ConnectionPool does not take is a ConfigError naming it, not
    Python's TypeError: psycopg_pool's habit (``min_size=2``, ``timeout=5``, ``open=True``)
    was told "unexpected keyword argument", and not that sizes and times live in PoolConfig."""
    known = frozenset(inspect.signature(init).parameters) - {"self"}

    def refuse(name: str) -> NoReturn:
        setting = _PSYCOPG_NAMES.get(name, name)
        if setting in {f.name for f in dataclasses.fields(PoolConfig)}:
            raise ConfigError(name, f"is no argument of ConnectionPool: sizes and times live in its "
                              f"PoolConfig, e.g. ConnectionPool(factory, PoolConfig({setting}=...))")
        raise ConfigError(name, f"unknown argument of ConnectionPool; allowed: {', '.join(sorted(known))} "
                          "(sizes and times live in PoolConfig; for psycopg_pool's arguments, use "
                          "sharedpool.contrib.psycopg.ConnectionPool)")

    return keywords_checked(init, known, refuse)


class ConnectionPool(Generic[T]):
    """A pool of connections made by ``factory``, capped locally by
    ``config.max_size`` and globally by the coordinator's ``resource``.

    ``coordinator`` is the socket path; None falls back to ``$SHAREDPOOL_SOCKET``,
    and without either the pool is standalone (process-local, no leases).
    """

    @_named_keywords
    def __init__(
        self,
        factory: Callable[[], T],
        config: PoolConfig | None = None,
        *,
        resource: str = "default",
        coordinator: str | None = None,
        check: Callable[[T], Any] | None = None,
        configure: Callable[[T], Any] | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(factory, str | bytes):
            # psycopg_pool's habit: a connection string. Not echoed: it may hold a password.
            raise ConfigError("factory", "must be a callable that opens a connection, got a "
                              "connection string: pass lambda: psycopg.connect(dsn), or use "
                              "sharedpool.contrib.psycopg.ConnectionPool(dsn, ...)")
        if not callable(factory):
            raise ConfigError("factory", f"must be callable, got {factory!r}")
        if configure is not None and not callable(configure):
            raise ConfigError("configure", f"must be callable, got {configure!r}")
        if config is not None and not isinstance(config, PoolConfig):
            raise ConfigError("config", f"must be a PoolConfig, got {type(config).__name__}")
        if check is not None and not callable(check):
            raise ConfigError("check", f"must be callable, got {check!r}")
        if name is not None and not isinstance(name, str):  # as Client's: a label in logs and errors
            raise ConfigError("name", f"must be a string or None, got {name!r}")
        for field, given in (("factory", factory), ("check", check), ("configure", configure)):
            check_sync_callable(field, given)
        self.factory = factory
        self.config = config or PoolConfig()
        self.resource = check_resource_name(resource)
        self._coordinator = None if coordinator is None else check_socket_path("coordinator", coordinator)
        self.name = name or f"pool-{self.resource}"
        self._said_standalone = False
        self.check = check
        #: Run on each new connection before its first use (setup SQL): the
        #: connection's backend pid has reached the coordinator by then, so
        #: the fence covers a worker killed during it.
        self.configure = configure
        #: what the garbage collector closes if the pool is dropped without close()
        self._left = dropped.Left(self.name, self.config.close_confirm_timeout)
        self._init_state()
        weakref.finalize(self, dropped.reap, self._left).atexit = False
        process.register(self)

    @property
    def coordinator(self) -> str | None:
        """The coordinator's socket path: the one given, else ``$SHAREDPOOL_SOCKET``
        as it is when first needed (a gunicorn or celery parent may set it after
        the pool was made), else None: a standalone pool."""
        if self._client is not None:
            return self._client.socket_path
        return self._coordinator if self._coordinator is not None else os.environ.get(SOCKET_ENV) or None

    def release_for_exit(self, timeout: float, wait_in_use: bool = True, *,
                         exit_timeout: float | None = None) -> None:
        """At process exit: close every connection (see :func:`sharedpool.release_process`),
        the idle ones' server let-go waited for only within ``timeout`` (what
        is left of the whole exit's ``exit_timeout``)."""
        self._checkpid()
        confirm = process.confirm_at_exit(self.config.close_confirm_timeout, time.monotonic() + timeout)
        self._close_pool(timeout, confirm, wait_in_use, exit_timeout)

    def session_kept(self) -> Client | None:
        """After :meth:`release_for_exit`: the session, while connections of this
        pool still hold leases (in use past its timeout, a close not yet
        confirmed). Ended now, their slots would go to other processes while
        PostgreSQL still counts them (I1); they go back as those close (their
        checkin closes them), the session then, or with the process."""
        with self._lock:
            kept = self._pid == _PID[0] and self._leased > 0
        return self._client if kept else None

    def _init_state(self, status: PoolStatus = PoolStatus.ACTIVE, maintain: bool = True) -> None:
        # Config read on every checkout, kept as plain attributes.
        self._bypass = self.config.validation_bypass if self.config.test_on_acquire else None
        self._leaks = self.config.leak_detection_threshold is not None
        self._told_unsettled = False  # the first connection checked in not at rest is logged at warning
        self._told_dropped = False  # the first checkout dropped without a checkin is logged at warning
        self._top_up_failing = False  # the first failed min_size top-up is logged at warning
        self._test_on_release = self.config.test_on_release
        self._max_lifetime = self.config.max_lifetime
        self._lock = threading.RLock()  # an RLock: _returned waits on it (see condition.py)
        self._returned = Condition(self._lock)
        self._idle: deque[ConnectionWrapper[T]] = deque()
        self._all: dict[str, ConnectionWrapper[T]] = {}
        self._waiters: deque[_Waiter] = deque()
        self._recheck_pending = False
        # The quantum as of the last arming of a recheck: the checkin fast
        # path compares with it instead of asking the client each time.
        self._armed_quantum = 0.0
        self._recheck_delay = IDLE_GIVE_BACK
        self._recheck_round = 0  # the round of asking _recheck_pending and _recheck_delay are of
        self._acquired = self._released = 0  # counters of the fast paths
        #: (wrapper, checkout time) of with checkouts never checked in: see _close_dropped
        self._dropped: list[tuple[ConnectionWrapper[T], float]] = []
        # requests_num is counted as a checkout is asked for, as psycopg_pool's is, and
        # only ever goes up: checkouts taken by the fast path, plus those the slow path
        # was asked for (_slow_asked), less those it served (in _acquired too, so
        # counted once). A fast-path take that failed validation goes on in the slow
        # path as the same request (_retried: not a checkout served after all).
        self._slow_asked = self._slow_served = self._retried = 0
        self._usage = 0.0  # seconds connections spent checked out, up to their checkin
        #: get_stats()'s counters as of the last pop_stats(): reported as what came since
        self._popped: dict[str, int] = {}
        self._giving = 0  # give-backs to the coordinator closing, their leases not yet released
        self._drained_by_coordinator = False  # by a drain push (not by our own drain())
        self._handoff = HandOffCost()
        self._fallback_opening = 0
        self._opening = 0
        #: openings in _opening still waiting for their lease: no connection yet
        self._lease_waits = 0
        #: openings in _opening that no waiter may count on: connects whose
        #: caller gave up (connection_timeout) and min_size top-ups
        self._stalled = 0
        self._filling = False
        #: connections taken out of _all and not yet closed (lease not yet
        #: released, unless their close is still unconfirmed: then a watcher has it)
        self._closing = 0
        #: leases of this pool's connections, in _all or being closed (released once the server let go)
        self._leased = 0
        #: openers' lease requests still queued at the coordinator
        self._lease_requests: set[AcquireRequest] = set()
        self.status = status
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._client: Client | None = None
        self._handlers: tuple[Any, ...] = ()
        self._left.reset()
        self._m = dict.fromkeys((
            "total_created", "total_closed", "connect_attempts",
            "acquire_timeouts", "connect_errors", "request_errors", "validation_failures", "reclaimed",
            "leases_acquired", "leases_unused", "lease_wait_ms", "requests_queued", "requests_wait_ms",
            "connections_ms", "leaks_suspected", "returns_bad",
        ), 0)
        # Set last: a thread of a forked child that sees it current (and so
        # skips _after_fork's lock) must find the child's state all made.
        self._pid = current_pid()
        if maintain:
            self._start_maintenance()

    # ------------------------------------------------------------------ repr / stats

    def __repr__(self) -> str:
        self._checkpid()
        with self._lock:
            in_use = len(self._all) - len(self._idle)
            text = (f"<ConnectionPool {self.name!r} {self.status.value} resource={self.resource!r}"
                    f" | Connections: {in_use} in use, {len(self._idle)} idle, {self._opening} opening"
                    f" | Requests: {len(self._waiters)} waiting>")
        return text

    @property
    def _active(self) -> bool:
        """Handing out connections (not draining, not closed)."""
        return self.status is _ACTIVE

    def get_size(self) -> int:
        """Open connections (idle + in use)."""
        self._checkpid()
        return len(self._all)

    def get_in_use(self) -> int:
        """Connections checked out now."""
        self._checkpid()
        return len(self._all) - len(self._idle)

    def get_metrics(self) -> dict[str, Any]:
        """The seed's counters plus lease figures."""
        self._checkpid()
        with self._lock:
            m: dict[str, Any] = dict(self._m, total_acquired=self._acquired - self._retried,
                                     total_released=self._released)
            m.update(
                current_size=len(self._all),
                in_use=len(self._all) - len(self._idle),
                available=len(self._idle),
                waiting=len(self._waiters),
                opening=self._opening,
                status=self.status.value,
                leases_held=self._leased,
                leases_closing=self._leases_closing(),
                coordinated=self.coordinator is not None,
            )
        return m

    def get_stats(self) -> dict[str, int]:
        """psycopg_pool-style figures (``pool_size``, ``requests_waiting``...):
        its measures as they are now, its counters since the pool was made or
        since the last :meth:`pop_stats`."""
        self._checkpid()
        with self._lock:
            return self._stats(pop=False)

    def pop_stats(self) -> dict[str, int]:
        """:meth:`get_stats`, then its counters start again from 0 (psycopg_pool's
        ``pop_stats()``, for a metrics exporter that sends what came since its
        last call). The totals of :meth:`get_metrics` go on."""
        self._checkpid()
        with self._lock:
            return self._stats(pop=True)

    def _stats(self, pop: bool) -> dict[str, int]:
        # Under the lock.
        m = self._m
        counters = {
            "requests_num": self._acquired - self._slow_served + self._slow_asked,
            "requests_queued": m["requests_queued"],
            "requests_wait_ms": m["requests_wait_ms"],
            "requests_errors": m["request_errors"],
            "usage_ms": int(self._usage * 1000),
            "connections_num": m["connect_attempts"],
            "connections_ms": m["connections_ms"],
            "connections_errors": m["connect_errors"],
            "connections_lost": m["validation_failures"],
            "returns_bad": m["returns_bad"],
            "leases_acquired": m["leases_acquired"],
            "leases_unused": m["leases_unused"],
            "lease_wait_ms": m["lease_wait_ms"],
            "leases_reclaimed": m["reclaimed"],
        }
        since = self._popped
        if pop:
            self._popped = counters
        stats = {
            "pool_min": self.config.min_size,
            "pool_max": self.config.max_size,
            # As psycopg_pool's: connections open or being made, not the
            # openings still waiting for a lease (none exists for them yet).
            "pool_size": len(self._all) + self._opening - self._lease_waits,
            "pool_available": len(self._idle),
            "requests_waiting": len(self._waiters),
            "leases_held": self._leased,
            "leases_closing": self._leases_closing(),
        }
        stats.update((name, value - since.get(name, 0)) for name, value in counters.items())
        return stats

    def grant_unused(self) -> None:
        """A lease granted to this pool went straight back unused (it crossed the
        withdrawal of its request, or came as the pool closed): counted in
        ``leases_acquired`` as the coordinator counts it in ``grants``, and in
        ``leases_unused``. Called with no pool lock held (as the integrations' is)."""
        self._checkpid()
        with self._lock:
            self._m["leases_acquired"] += 1
            self._m["leases_unused"] += 1

    def _leases_closing(self) -> int:
        # Leases of connections out of _all, closed or being closed, whose
        # server has not let go yet (leases_held counts them, as the
        # coordinator does). Called under the lock.
        return self._leased - sum(1 for w in self._all.values() if w.lease is not None)

    # ------------------------------------------------------------------ checkout

    def acquire(self, timeout: float | None = None) -> ConnectionWrapper[T]:
        """Check a connection out. ``timeout`` None: ``config.acquire_timeout``;
        0: only if one is idle now (else PoolTimeout at once; a connection is
        still opened in the background if there is room, and stays idle)."""
        # The fast path: every statement here costs each query a little (8
        # processes in SELECT 1 loops lose ~2 % of throughput per microsecond).
        if self._pid != _PID[0]:
            self._after_fork()
        if timeout is not None and not valid_timeout(timeout):  # bad input fails whatever the pool holds
            raise ConfigError("timeout", f"must be a number of seconds >= 0 or None, got {timeout!r}")
        wrapper = None
        try:  # free unless raised: an exception from a signal handler must not strand the connection
            with self._lock:
                if self._idle and not self._waiters and self.status is _ACTIVE:
                    # Subscript and del, not pop(): no call, so no signal handler
                    # runs between taking the connection and marking it ours.
                    wrapper = self._idle[-1]
                    del self._idle[-1]
                    wrapper.in_use = True
                    self._acquired += 1
            if wrapper is not None:
                now = wrapper.checked_out_at = _monotonic()
                bypass = self._bypass
                if (bypass is not None and now - wrapper.last_used > bypass
                        and now - wrapper.checked_at > bypass):
                    try:
                        valid = self._validate(wrapper)
                    except BaseException:  # KeyboardInterrupt mid-check: it may be mid-query
                        self._discard(wrapper, validation=False)
                        wrapper = None
                        raise
                    if not valid:
                        self._discard(wrapper)
                        wrapper = None
                        with self._lock:
                            # Not "_acquired -= 1": requests_num went down with it (a
                            # pop_stats() during the validation, then -1 in the next).
                            self._retried += 1
                        return waiting.acquire_slow(self, timeout, now, retry=True)
                if self._leaks:
                    wrapper.site = _call_site()
                return wrapper
        except BaseException:
            if wrapper is not None and wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                self.release(wrapper)  # taken for a caller that is gone: check it back in
            raise
        return waiting.acquire_slow(self, timeout, _monotonic())

    def _plan_growth(self) -> list[_Waiter]:
        """Under the lock: which waiters get a new connection opened for them."""
        room = self.config.max_size - len(self._all) - self._opening
        need = len(self._waiters) - (self._opening - self._stalled)
        n = min(room, need)
        if n <= 0:
            return []
        chosen = [w for w in self._waiters if not w.has_opener][:n]
        # An opener always delivers to the oldest waiter; its own waiter only
        # decides where a connect error or timeout is reported.
        openers = chosen + [_Waiter() for _ in range(n - len(chosen))]
        for w in openers:
            w.has_opener = w.planned = True
        # Counted last, with no call after it: a signal handler's exception
        # earlier leaves no opening counted that no opener will ever settle
        # (a phantom that took a slot of max_size for good).
        self._opening += n
        return openers

    def _unplan(self, openers: list[_Waiter], replan: bool = True) -> None:
        """The caller was cut short (a signal handler's exception, no thread to be
        had) between planning ``openers`` and their threads running: those that
        never ran must not count as opening, or a lone caller would wait for
        them for ever. One that runs later finds itself unplanned and stops."""
        with self._lock:
            for w in openers:
                if w.planned:
                    w.planned = w.has_opener = False
                    self._opening -= 1
            self._returned.notify_all()  # a close() may be waiting for them
            more = self._plan_growth() if replan else []  # other waiters may have counted on them
        self._start_openers(more, time.monotonic() + self.config.acquire_timeout)

    def _start_openers(self, waiters: list[_Waiter], deadline: float, replan: bool = True) -> None:
        """``replan``: if cut short, plan again for the waiters (False: the caller
        does, once its own waiter is out of the queue). An opener planned for a
        checkout's waiter asks with that waiter's deadline, not ``deadline``
        (the planner's: a checkin's, a failed opener's now + acquire_timeout):
        else, once that waiter had its PoolTimeout, its lease request stayed
        queued at the coordinator for a connection nobody wanted, and the
        coordinator counted no timeout for it."""
        try:
            for waiter in waiters:
                until = deadline if waiter.deadline is None else waiter.deadline
                threading.Thread(target=opening.run, args=(self, waiter, until),
                                 name=f"sharedpool-open-{self.resource}", daemon=True).start()
        except BaseException:
            self._unplan(waiters, replan)
            raise

    def _hand_over(self, wrapper: ConnectionWrapper[T]) -> None:
        """Under the lock: give a free connection to the oldest waiter, or park it."""
        if self._waiters:
            waiter = self._waiters.popleft()
            wrapper.in_use = True
            waiter.wrapper = wrapper
            waiter.event.set()
        else:
            wrapper.in_use = False
            self._idle.append(wrapper)

    # ------------------------------------------------------------------ checkin

    def release(self, wrapper: ConnectionWrapper[T]) -> None:
        """Check a connection back in (closed instead if expired, invalid,
        owed to the coordinator, or the pool is draining/closed)."""
        try:
            # First, with no call before it: a checkin of this checkout began
            # (else, at a signal handler's exception here, _Checkout.__del__ closes it).
            wrapper.checkin_of = wrapper.checked_out_at
            mine = wrapper.pool is self
        except AttributeError:
            raise PoolMisuse(f"release() takes the ConnectionWrapper that acquire() returned, got "
                             f"{type(wrapper).__name__} (pool.connection() checks in by itself)") from None
        if not mine:
            raise PoolMisuse(f"{wrapper!r} does not belong to pool {self.name!r}")
        if self._pid != _PID[0]:
            self._after_fork()
        out = wrapper.checked_out_at
        at_rest = wrapper.txn is None  # else known once its transaction status is read
        done = False
        began: list[bool] | None = None  # release_slow's: set as it begins (then it sees to it)
        try:  # free unless raised: a signal before the checkin took effect must not strand it
            if not at_rest and wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                status = _txn_status(wrapper)
                if status:  # not at rest (libpq's IDLE is 0)
                    checkin.check_in_unsettled(self, wrapper, status)
                    return
            at_rest = True
            now = _monotonic()
            client = self._client
            age = now - wrapper.created_at
            # The fast path: kept, nobody waits here, nothing owed to the
            # coordinator (or owed, but still young and a recheck already armed)
            # and no request of this process pending (another pool may wait).
            if age <= self._max_lifetime and not self._test_on_release and (
                    client is None or (wrapper.lease is not None and not client._pending and (
                        not client._owed.get(self.resource)
                        or (self._recheck_pending and age < self._armed_quantum)))):
                with self._lock:
                    if (wrapper.in_use and not self._waiters and self.status is _ACTIVE
                            and self._all.get(wrapper.id) is wrapper):
                        done = True  # no call from here to the append: no signal handler runs between
                        self._released += 1
                        self._usage += now - wrapper.checked_out_at
                        wrapper.last_used = now
                        wrapper.warned = False
                        wrapper.in_use = False
                        self._idle.append(wrapper)
                        return
            # In here: a signal handler's exception at its first instruction
            # (before it began) would otherwise strand the connection.
            began = [False]
            checkin.release_slow(self, wrapper, now, began)
        except BaseException:
            if not at_rest:  # cut short in the transaction check, its warning or a rollback
                self._close_if_still_out(wrapper, out)
            elif not done and not (began and began[0]):
                # Nothing happened yet: check it in the slow way, then let the exception go on.
                checkin.release_slow(self, wrapper, _monotonic())
            raise

    def release_after_error(self, wrapper: ConnectionWrapper[T]) -> None:
        """Check in a connection whose ``with`` block ended in an exception.

        One still running a query (the exception came from a signal handler:
        a celery soft time limit, a timeout alarm) is closed, which cancels the
        query; one left in a transaction (psycopg, psycopg2) is rolled back, or
        closed if that fails. The next caller gets a connection at rest.
        """
        try:  # first, with no call before it: as in release()
            out = wrapper.checkin_of = wrapper.checked_out_at
        except AttributeError:
            out = None  # not a wrapper: release() says so
        # A signal (a second one: Ctrl-C twice, a stop signal resent) anywhere
        # from here, mid-rollback too, must not strand it.
        try:
            self._checkpid()
            if out is None or not (getattr(wrapper, "pool", None) is self and wrapper.in_use
                                   and self._all.get(wrapper.id) is wrapper):
                self.release(wrapper)  # raises PoolMisuse, touching nothing
                return
            status = _txn_status(wrapper)
            closed = getattr(wrapper.conn, "closed", False)  # psycopg: bool, psycopg2: 0/1/2
            if status == UNKNOWN or (isinstance(closed, int) and closed):
                self._discard(wrapper, validation=False, bad=True)  # broken: no use keeping it
                return
            if status in (INTRANS, INERROR):
                try:
                    wrapper.conn.rollback()  # type: ignore[attr-defined]
                    status = _txn_status(wrapper)
                except Exception as exc:  # noqa: BLE001 - then it is closed instead
                    log.info("pool %r: rollback of connection %s failed: %s", self.name, wrapper.id[:8], exc)
            if status in (ACTIVE, INTRANS, INERROR):
                self._discard(wrapper, validation=False)
            else:
                self.release(wrapper)
        except BaseException:
            if out is not None:
                self._close_if_still_out(wrapper, out)
            raise

    def _close_if_still_out(self, wrapper: ConnectionWrapper[T], out: float, unbegun: bool = False) -> bool:
        """A checkin was cut short: close ``wrapper`` (it may be mid-query or
        mid-transaction) if it is still out on the checkout that began at
        ``out``, not checked in already, nor out again to another caller.
        ``unbegun``: only if no checkin of that checkout began either. Whether it was."""
        with self._lock:
            mine = (wrapper.in_use and wrapper.checked_out_at == out and self._all.get(wrapper.id) is wrapper
                    and not (unbegun and wrapper.checkin_of == out))
        if mine:
            self._discard(wrapper, validation=False)
        return mine

    def _close_dropped(self) -> None:
        """Close the connections of ``with`` checkouts whose checkin never began
        (see ``wrapper._Checkout.__del__``): nobody can check them in."""
        while self._dropped:
            try:
                wrapper, out = self._dropped.pop()
            except IndexError:  # taken by another thread meanwhile
                return
            # Checked in after all (its generator's close ran after it was
            # finalized): it may be a waiter's now, its checkout time not yet set.
            if self._close_if_still_out(wrapper, out, unbegun=True):
                log.warning("pool %r: connection %s was never checked in (its with statement's exit "
                            "was cut short by an exception, or never run): closed", self.name, wrapper.id[:8])

    def _quantum(self, client: Client) -> float:
        return self._handoff.quantum_for(client, self.resource)

    # ------------------------------------------------------------------ context managers

    def connection(self, timeout: float | None = None) -> _Checkout[T]:
        """``with pool.connection() as conn:`` — the raw connection, returned on exit."""
        return _Checkout(self, timeout)

    def __enter__(self) -> ConnectionPool[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ closing

    def _discard(self, wrapper: ConnectionWrapper[T], validation: bool = True, bad: bool = False) -> None:
        """Forget a checked-out connection and close it (it failed validation,
        or the pool stopped being active); its slot may serve a waiter.
        ``bad``: checked in closed or broken (psycopg_pool's returns_bad)."""
        out = False
        openers: list[_Waiter] = []
        try:
            with self._lock:
                if wrapper.id in self._all:  # not pop(): no call between taking it out and out = True
                    del self._all[wrapper.id]
                self._closing += 1
                out = True
                wrapper.in_use = False
                if validation:
                    self._m["validation_failures"] += 1
                if bad:
                    self._m["returns_bad"] += 1
                openers = self._plan_growth()
            self._close_then_open(wrapper, openers, time.monotonic() + self.config.acquire_timeout)
        except BaseException:
            if out:
                self._close_cut_short(wrapper, openers)
            raise

    def _park(self, wrapper: ConnectionWrapper[T]) -> None:
        """Hand a connection made or checked by maintenance to a waiter, or idle;
        closed instead if the pool is no longer active."""
        with self._lock:
            active = self.status is PoolStatus.ACTIVE
            if active:
                self._hand_over(wrapper)
            idle = active and not wrapper.in_use
        if not active:
            self._discard(wrapper, validation=False)
        elif (idle and self._handlers and (client := self._client) is not None
              and client.owed_left(self.resource)):
            # A reclaim that came while it was out (validated, set up) found
            # nothing idle, and nothing asks again: the other process's acquire
            # timed out beside this idle lease. Looked at as a reclaim does.
            client.call_later(0.0, self._handlers[0])

    def _close(self, wrapper: ConnectionWrapper[T], giving: bool = False, wait: float | None = None) -> bool:
        """Close, confirm the server let go, then give the lease back (I1). A
        close not confirmed within ``wait`` (None: close_confirm_timeout) keeps its
        lease until it is (watched in the background, bounded): then False. ``giving``: a
        give-back to the coordinator, counted in ``_giving`` until its lease is
        released. The caller counted ``wrapper`` in ``_closing`` when it took it
        out of ``_all``."""
        took = [False]  # see close_counted: from then on, counted closed here
        try:
            # Not "return close_counted(...)": the finally's copy run on return is
            # outside the try, and an exception as it returns would skip the count.
            confirmed = shutdown.close_counted(self, wrapper, giving, wait, took)
        finally:
            if not took[0]:
                # Cut short before close_counted took it (else another close did,
                # and counts it): the close goes on in a thread, which counts it.
                shutdown.close_if_untaken(self, wrapper, giving)
            else:
                with self._lock:
                    if self._pid == _PID[0]:  # not reset by a fork meanwhile
                        self._closing -= 1
                        self._m["total_closed"] += 1
                    self._returned.notify_all()
                self._end_session_if_done()
        return confirmed

    def _end_session_if_done(self) -> None:
        """A closed pool's last connection is gone (closed and its lease given
        back): end the process's session unless something else uses it.
        close() asks too, but finds it busy while connections it waited for
        in vain (in use, still opening, a close not yet confirmed) hold leases."""
        client = self._client
        if (client is not None and self.status is PoolStatus.CLOSED and self._pid == _PID[0]
                and not self._all and not self._closing and not self._opening):
            client.close_if_unused()

    def _close_then_open(self, wrapper: ConnectionWrapper[T], openers: list[_Waiter],
                         deadline: float, giving: bool = False) -> None:
        """Close ``wrapper``, then start the ``openers`` planned with its slot, even
        if the close is cut short (a signal handler's exception goes on to the
        caller; the waiters still get their openers)."""
        try:
            self._close(wrapper, giving)
        finally:
            self._start_openers(openers, deadline)

    def _close_cut_short(self, wrapper: ConnectionWrapper[T], openers: list[_Waiter],
                         giving: bool = False) -> None:
        """The guard of a caller that took ``wrapper`` out of ``_all`` to close it,
        then planned ``openers`` with its slot, and was cut short (a signal
        handler's exception) anywhere from there, maybe at the first instruction
        of _close_then_open or _close: the close goes on in a thread unless one
        took it, and openers not yet run are uncounted (their waiters planned
        for again), or they would hold slots of max_size for good."""
        shutdown.close_if_untaken(self, wrapper, giving)
        self._unplan(openers)

    def drain(self, timeout: float = 30.0) -> None:
        """Stop handing out connections; wait (up to ``timeout``) for those in
        use to come back, and close them all. :meth:`resume` reopens."""
        self._checkpid()
        shutdown.shut(self, PoolStatus.DRAINING, timeout)

    def resume(self) -> None:
        """After :meth:`drain`: hand out connections again."""
        self._checkpid()
        with self._lock:
            self._drained_by_coordinator = False  # whoever drained it, it is resumed now
            if self.status is PoolStatus.DRAINING:
                self.status = PoolStatus.ACTIVE

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiters fail with PoolClosed, idle connections close
        now, in-use ones when they come back (waiting up to ``timeout``)."""
        self._checkpid()
        self._close_pool(timeout)

    def _close_pool(self, timeout: float, confirm: float | None = None, wait_in_use: bool = True,
                    exit_timeout: float | None = None) -> None:
        """close(); the idle connections' closes confirmed within ``confirm``
        (None: close_confirm_timeout); without ``wait_in_use``, those in use
        are not waited for (see :func:`sharedpool.release_process`)."""
        if not valid_timeout(timeout):  # before anything stops: a refused close changes nothing
            raise ConfigError("timeout", f"must be a number of seconds >= 0, got {timeout!r}")
        self._stop.set()
        try:
            shutdown.shut(self, PoolStatus.CLOSED, timeout, confirm, wait_in_use, exit_timeout)
        finally:
            # Also when the wait is cut short (a signal handler's exception) once
            # the pool is closed: a closed pool's handlers kept the process's
            # session open for good (a second close() returns at once).
            if self._client is not None and self.status is PoolStatus.CLOSED:
                self._client.remove_handlers(*self._handlers)
                self._client.close_if_unused()

    # ------------------------------------------------------------------ validation

    def _validate(self, wrapper: ConnectionWrapper[T]) -> bool:
        conn = wrapper.conn
        try:
            if self.check is not None:
                result = self.check(conn)
                ok = result is None or bool(result)
            elif callable(getattr(conn, "ping", None)):
                conn.ping()  # type: ignore[attr-defined]
                ok = True
            elif callable(getattr(conn, "is_valid", None)):
                ok = bool(conn.is_valid())  # type: ignore[attr-defined]
            else:
                ok = not getattr(conn, "closed", False)
        except Exception as exc:  # noqa: BLE001 - any failure means "not usable"
            log.info("pool %r: connection %s failed validation: %s", self.name, wrapper.id[:8], exc)
            ok = False
        if ok:
            wrapper.health_check_count += 1
            wrapper.checked_at = time.monotonic()
        return ok

    # ------------------------------------------------------------------ coordinator

    def _get_client(self) -> Client | None:
        if self._client is not None and not self._client_lost():
            return self._client
        # Checked here, not in the property: a bad $SHAREDPOOL_SOCKET fails what
        # needs the coordinator, never a metrics read or a repr.
        path = self._coordinator if self._client is None else self._client.socket_path
        if path is None and (path := env_socket_path()) is None:
            if self.resource != "default" and not self._said_standalone:
                self._said_standalone = True  # a resource named, but no cap: said once
                log.warning("pool %r: no coordinator for resource %r (neither coordinator= nor "
                            "$%s): its connections are capped only by its own max_size",
                            self.name, self.resource, SOCKET_ENV)
            return None
        if self._client is None or self._client_lost():
            with self._lock:
                # Again until registered on an open one: one closed by another
                # pool's close_if_unused() before our handlers went in is lost.
                while self._client is None or self._client_lost():
                    client = Client.for_path(path)
                    # Weak: the client lives as long as the process, and a pool
                    # dropped without close() must still be collected.
                    reclaim, push, states = dropped.weak_handlers(self)
                    client.on_reclaim(self.resource, reclaim)
                    client.on_push(push)
                    client.add_state_provider(states)
                    self._handlers = (reclaim, push, states)
                    self._client = client
                    self._left.client, self._left.handlers = client, self._handlers
        return self._client

    def _client_lost(self) -> bool:
        # Another pool's close_if_unused() closed the shared client between our
        # for_path() and our handlers going in: an open pool takes a new one.
        client = self._client
        return client is not None and client.closed and self.status is not PoolStatus.CLOSED

    # ------------------------------------------------------------------ maintenance

    def _start_maintenance(self) -> None:
        with self._lock:  # once, and never for a pool closed meanwhile
            if self._maintenance is not None or self.status is not PoolStatus.ACTIVE:
                return
            self._maintenance = thread = maintenance.thread_for(self)
        thread.start()  # outside the lock: start() waits for the new thread

    # ------------------------------------------------------------------ fork

    def _checkpid(self) -> None:
        """In a forked child, first forget the parent's state (its lock may be
        held for good by a thread that does not exist here)."""
        if self._pid != _PID[0]:
            self._after_fork()

    def _after_fork(self) -> None:
        # The parent's connections are not ours: keep them referenced so no
        # destructor closes them under the parent, and start empty (I7).
        # Serialized: two threads of the child may notice the fork at once.
        with process.FORK_LOCK[0]:
            if self._pid == _PID[0]:
                return
            # The connections, not their wrappers: a wrapper holds its pool,
            # which the child may drop like any other.
            _INHERITED.extend(w.conn for w in self._all.values())
            for wrapper in self._all.values():
                if wrapper.kept is not None:  # our copy only: no shutdown, the parent's socket goes on
                    wrapper.kept.close()
                    wrapper.kept = None
            # A pool closed before the fork stays closed. An open one starts its
            # maintenance (min_size top-ups) at its first checkout here, not now:
            # a child that only closes it (a worker's exit) must open nothing.
            closed = self.status is PoolStatus.CLOSED
            self._init_state(PoolStatus.CLOSED if closed else PoolStatus.ACTIVE, maintain=False)

    def connections_at_fork(self) -> list[Any]:
        """The connections this pool holds (in a forked child: the parent's),
        and the dups of their sockets kept for closing them."""
        wrappers = list(self._all.values())
        return [w.conn for w in wrappers] + [w.kept for w in wrappers if w.kept is not None]

