"""The local pool: this process's real connections, each covered by a lease.

Checkout and checkin of a connection already open touch one lock and one
deque, nothing else. Opening (lease round trip + factory), closing (close,
confirm the server let go, release the lease) and validation happen outside
the lock: the locked sections only decide, and return what to do.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from enum import Enum
from functools import partial
from typing import Any, Generic, TypeVar

from . import giveback, maintenance, opening, process
from .client import _PID, AcquireRequest, Client, current_pid
from .closing import (
    ACTIVE,
    INERROR,
    INTRANS,
    UNKNOWN,
    WAIT_SLICE,
    NotClosable,
    close_and_confirm,
    transaction_status,
)
from .config import MAX_INT, SOCKET_ENV, PoolConfig, check_resource_name, check_socket_path, env_socket_path
from .errors import (
    ConfigError,
    ConnectTimeout,
    PoolClosed,
    PoolMisuse,
    PoolTimeout,
)
from .giveback import IDLE_GIVE_BACK
from .handoff import HandOffCost
from .wrapper import ConnectionWrapper, _call_site, _Checkout

log = logging.getLogger("sharedpool.pool")

T = TypeVar("T")

#: Connections abandoned in a forked child: the parent's, kept referenced so
#: that no destructor ever closes them from the child (I7).
_INHERITED: list[Any] = []


def _valid_timeout(value: Any) -> bool:
    """A finite number of seconds >= 0 (NaN, inf, bools and strings are not, nor
    an integer too large for a float deadline)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value < math.inf and (isinstance(value, float) or value <= MAX_INT))


class PoolStatus(Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    CLOSED = "closed"


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


#: What a normal checkin does with a connection not at rest, by libpq transaction status.
_UNSETTLED = {
    ACTIVE: "with a query still running: closed",
    INTRANS: "inside a transaction: rolled back (commit inside the block, or use autocommit)",
    INERROR: "inside a failed transaction: rolled back",
    UNKNOWN: "closed or broken: discarded",
}


class _Waiter:
    __slots__ = ("event", "wrapper", "error", "connect_deadline", "abandoned", "has_opener",
                 "planned", "leasing", "counted")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.wrapper: ConnectionWrapper[Any] | None = None
        self.error: BaseException | None = None
        self.connect_deadline: float | None = None  # set while our opener runs the factory
        self.abandoned = False  # gave up on a connect that overran connection_timeout
        self.has_opener = False
        self.planned = False  # an opener for it is counted in _opening and has not run yet
        #: its opener asked the coordinator for a lease and got none (yet): what a
        #: timeout says, even when that request timed out a moment before it
        self.leasing = False
        self.counted = False  # its checkout's failure is in requests_errors already


class ConnectionPool(Generic[T]):
    """A pool of connections made by ``factory``, capped locally by
    ``config.max_size`` and globally by the coordinator's ``resource``.

    ``coordinator`` is the socket path; None falls back to ``$SHAREDPOOL_SOCKET``,
    and without either the pool is standalone (process-local, no leases).
    """

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
        if not callable(factory):
            raise ConfigError("factory", f"must be callable, got {factory!r}")
        if configure is not None and not callable(configure):
            raise ConfigError("configure", f"must be callable, got {configure!r}")
        if config is not None and not isinstance(config, PoolConfig):
            raise ConfigError("config", f"must be a PoolConfig, got {type(config).__name__}")
        if check is not None and not callable(check):
            raise ConfigError("check", f"must be callable, got {check!r}")
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
        self._init_state()
        process.register(self)

    @property
    def coordinator(self) -> str | None:
        """The coordinator's socket path: the one given, else ``$SHAREDPOOL_SOCKET``
        as it is when first needed (a gunicorn or celery parent may set it after
        the pool was made), else None: a standalone pool."""
        if self._client is not None:
            return self._client.socket_path
        return self._coordinator if self._coordinator is not None else os.environ.get(SOCKET_ENV) or None

    def release_for_exit(self, timeout: float) -> None:
        """At process exit: close every connection (see :func:`sharedpool.release_process`)."""
        self.close(timeout)

    def _init_state(self, status: PoolStatus = PoolStatus.ACTIVE, maintain: bool = True) -> None:
        # Config read on every checkout, kept as plain attributes.
        self._bypass = self.config.validation_bypass if self.config.test_on_acquire else None
        self._leaks = self.config.leak_detection_threshold is not None
        self._told_unsettled = False  # the first connection checked in not at rest is logged at warning
        self._top_up_failing = False  # the first failed min_size top-up is logged at warning
        self._test_on_release = self.config.test_on_release
        self._max_lifetime = self.config.max_lifetime
        self._lock = threading.Lock()
        self._returned = threading.Condition(self._lock)
        self._idle: deque[ConnectionWrapper[T]] = deque()
        self._all: dict[str, ConnectionWrapper[T]] = {}
        self._waiters: deque[_Waiter] = deque()
        self._recheck_pending = False
        # The quantum as of the last arming of a recheck: the checkin fast
        # path compares with it instead of asking the client each time.
        self._armed_quantum = 0.0
        self._recheck_delay = IDLE_GIVE_BACK
        self._acquired = self._released = 0  # counters of the fast paths
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
        self._m = dict.fromkeys((
            "total_created", "total_closed", "connect_attempts",
            "acquire_timeouts", "connect_errors", "request_errors", "validation_failures", "reclaimed",
            "leases_acquired", "lease_wait_ms", "requests_queued", "requests_wait_ms",
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
            m: dict[str, Any] = dict(self._m, total_acquired=self._acquired, total_released=self._released)
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
        """psycopg_pool-style figures (``pool_size``, ``requests_waiting``...)."""
        self._checkpid()
        with self._lock:
            m = self._m
            return {
                "pool_min": self.config.min_size,
                "pool_max": self.config.max_size,
                # As psycopg_pool's: connections open or being made, not the
                # openings still waiting for a lease (none exists for them yet).
                "pool_size": len(self._all) + self._opening - self._lease_waits,
                "pool_available": len(self._idle),
                "requests_waiting": len(self._waiters),
                "requests_num": self._acquired + m["request_errors"],
                "requests_queued": m["requests_queued"],
                "requests_wait_ms": m["requests_wait_ms"],
                "requests_errors": m["request_errors"],
                "connections_num": m["connect_attempts"],
                "connections_ms": m["connections_ms"],
                "connections_errors": m["connect_errors"],
                "connections_lost": m["validation_failures"],
                "returns_bad": m["returns_bad"],
                "leases_held": self._leased,
                "leases_closing": self._leases_closing(),
                "leases_acquired": m["leases_acquired"],
                "lease_wait_ms": m["lease_wait_ms"],
                "leases_reclaimed": m["reclaimed"],
            }

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
        if timeout is not None and not _valid_timeout(timeout):  # bad input fails whatever the pool holds
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
                            self._acquired -= 1  # counted again by the retry, served or not
                        return self._acquire_slow(timeout, now, retry=True)
                if self._leaks:
                    wrapper.site = _call_site()
                return wrapper
        except BaseException:
            if wrapper is not None and wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                self.release(wrapper)  # taken for a caller that is gone: check it back in
            raise
        return self._acquire_slow(timeout, _monotonic())

    def _acquire_slow(self, timeout: float | None, start: float, retry: bool = False) -> ConnectionWrapper[T]:
        if self._maintenance is None:  # a forked child's first checkout
            self._start_maintenance()
        wait = self.config.acquire_timeout if timeout is None else timeout
        deadline = start + wait
        while True:  # one deadline for every retry (a failed validation loops)
            if retry and wait > 0 and time.monotonic() >= deadline:
                # Idle connections kept failing validation until the time was up
                # (with no time to wait, each idle one is still tried once).
                with self._lock:
                    self._m["acquire_timeouts"] += 1
                    self._m["request_errors"] += 1
                raise PoolTimeout(f"pool {self.name!r}: no valid connection within {wait:.3g}s "
                                  "(idle connections failed validation)")
            retry = True
            waiter = _Waiter()
            openers: list[_Waiter] = []
            started = False
            wrapper = checking = None
            try:
                # In the try: a signal handler's exception as the waiter is queued
                # or its opener planned must not leave it queued for a caller that
                # is gone (the next connection would be handed to it, for good).
                with self._lock:
                    if self.status is not PoolStatus.ACTIVE:
                        waiter.counted = True
                        self._m["request_errors"] += 1  # a refused checkout is a failed request too
                        raise PoolClosed(f"pool {self.name!r} is {self.status.value}")
                    if self._idle and not self._waiters:
                        wrapper = checking = self._idle.pop()
                        wrapper.in_use = True
                    else:
                        self._waiters.append(waiter)
                        self._m["requests_queued"] += 1
                        openers = self._plan_growth()
                if wrapper is None:
                    self._start_openers(openers, deadline, replan=False)
                    started = True
                    wrapper = checking = self._wait(waiter, deadline, start)
                now = time.monotonic()
                fresh = wrapper.last_used == wrapper.created_at  # never checked in: just connected
                valid = (not self.config.test_on_acquire or fresh
                         or now - max(wrapper.last_used, wrapper.checked_at) <= self.config.validation_bypass
                         or self._validate(wrapper))
            except BaseException:
                # Also what a signal handler raises while we wait (celery's soft
                # time limit, KeyboardInterrupt): no connection may stay handed
                # to a caller that is gone.
                self._forsake(waiter, checking)
                self._count_failed(waiter, start)
                if not started:  # cut short before its openers ran: uncount them, with our waiter gone
                    self._unplan(openers)
                raise
            if not valid:
                self._discard(wrapper)
                continue
            try:  # as in acquire(): a signal here must not strand the connection
                with self._lock:
                    self._acquired += 1
                    self._m["requests_wait_ms"] += int((now - start) * 1000)
                wrapper.checked_out_at = now
                if self.config.leak_detection_threshold is not None:
                    wrapper.site = _call_site()
                return wrapper
            except BaseException:
                self.release(wrapper)
                raise

    def _wait(self, waiter: _Waiter, deadline: float, start: float) -> ConnectionWrapper[T]:
        while True:
            until = deadline
            if waiter.connect_deadline is not None:
                until = min(until, waiter.connect_deadline)
            # In slices: a wait beyond threading.TIMEOUT_MAX raises OverflowError.
            waiter.event.wait(min(max(0.0, until - time.monotonic()), WAIT_SLICE))
            with self._lock:
                if waiter.wrapper is not None:
                    return waiter.wrapper
                now = time.monotonic()
                if waiter.error is not None:
                    waiter.counted = True
                    self._m["request_errors"] += 1
                    self._m["requests_wait_ms"] += int((now - start) * 1000)
                    if isinstance(waiter.error, PoolTimeout) and waiter.leasing:
                        # Its lease wait ran out, by the coordinator's clock a hair
                        # before ours: said as our own timeout is, with its reason.
                        self._m["acquire_timeouts"] += 1
                        raise self._timed_out(start, deadline, self._lease_wait_note(waiter.error)) from None
                    raise waiter.error
                connect_late = waiter.connect_deadline is not None and now >= waiter.connect_deadline
                if now < deadline and not connect_late:
                    waiter.event.clear()  # every set() happens under the lock: none is lost
                    continue
                self._waiters.remove(waiter)
                waiter.counted = True
                self._m["request_errors"] += 1
                self._m["requests_wait_ms"] += int((now - start) * 1000)
                if connect_late:
                    waiter.abandoned = True
                    self._stalled += 1  # its opener no longer serves anyone: new waiters get their own
                    self._m["connect_errors"] += 1
                    raise ConnectTimeout(
                        f"pool {self.name!r}: the connection factory did not return within "
                        f"connection_timeout={self.config.connection_timeout:g}s")
                self._m["acquire_timeouts"] += 1
                client = self._client
                away = ""
                # (attributes only: no client lock is taken under the pool's lock)
                if client is not None and not client.closed and client._sock is None and client.last_error:
                    # Why no lease came: a wrong or dead socket must say so (one
                    # not tried yet, or being connected to, is not "unreachable").
                    away = f"; coordinator at {client.socket_path} unreachable: {client.last_error}"
                elif self._lease_requests or waiter.leasing:
                    away = self._lease_wait_note()
                raise self._timed_out(start, deadline, away)

    def _count_failed(self, waiter: _Waiter, start: float) -> None:
        """A checkout that ends in an exception :meth:`_wait` did not count (one a
        signal handler raised while it waited or validated: celery's soft time
        limit) failed too: in requests_errors, with its wait, as psycopg_pool counts it."""
        with self._lock:
            if not waiter.counted:
                waiter.counted = True
                self._m["request_errors"] += 1
                self._m["requests_wait_ms"] += int((time.monotonic() - start) * 1000)

    def _lease_wait_note(self, reason: object = None) -> str:
        why = "the global cap is taken" if reason is None else f"the global cap is taken: {reason}"
        return f"; still waiting for a lease of resource {self.resource!r} from the coordinator ({why})"

    def _timed_out(self, start: float, deadline: float, note: str) -> PoolTimeout:
        """Under the lock: the PoolTimeout of a checkout that waited from ``start``."""
        return PoolTimeout(
            f"pool {self.name!r}: no connection within {deadline - start:.3g}s "
            f"({len(self._all)} open, {len(self._all) - len(self._idle)} in use, "
            f"max_size={self.config.max_size}){note}")

    def _forsake(self, waiter: _Waiter, checking: ConnectionWrapper[T] | None) -> None:
        """The caller of ``waiter`` left with an exception. Dequeue it; check in
        a connection that reached it meanwhile, or close the one whose
        validation was cut short (it may be mid-query)."""
        with self._lock:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            handed = waiter.wrapper if checking is None else None
        if checking is not None:
            self._discard(checking, validation=False)
        elif handed is not None:
            self.release(handed)

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
        does, once its own waiter is out of the queue)."""
        try:
            for waiter in waiters:
                threading.Thread(target=opening.run, args=(self, waiter, deadline),
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
            mine = wrapper.pool is self
        except AttributeError:
            raise PoolMisuse(f"release() takes the ConnectionWrapper that acquire() returned, got "
                             f"{type(wrapper).__name__} (pool.connection() checks in by itself)") from None
        if not mine:
            raise PoolMisuse(f"{wrapper!r} does not belong to pool {self.name!r}")
        if self._pid != _PID[0]:
            self._after_fork()
        if wrapper.txn is not None and wrapper.in_use and self._all.get(wrapper.id) is wrapper:
            status = _txn_status(wrapper)
            if status:  # not at rest (libpq's IDLE is 0)
                self._check_in_unsettled(wrapper, status)
                return
        done = False
        try:  # free unless raised: a signal before the checkin took effect must not strand it
            now = _monotonic()
            client = self._client
            age = now - wrapper.created_at
            # The fast path: kept, nobody waits here, and nothing owed to the
            # coordinator (or owed, but still young and a recheck already armed).
            if age <= self._max_lifetime and not self._test_on_release and (
                    client is None or (wrapper.lease is not None and (
                        not client._owed.get(self.resource)
                        or (self._recheck_pending and age < self._armed_quantum)))):
                with self._lock:
                    if (wrapper.in_use and not self._waiters and self.status is _ACTIVE
                            and self._all.get(wrapper.id) is wrapper):
                        done = True  # no call from here to the append: no signal handler runs between
                        self._released += 1
                        wrapper.last_used = now
                        wrapper.warned = False
                        wrapper.in_use = False
                        self._idle.append(wrapper)
                        return
        except BaseException:
            if not done:  # nothing happened yet: check it in the slow way, then let the exception go on
                self._release_slow(wrapper, _monotonic())
            raise
        self._release_slow(wrapper, now)

    def release_after_error(self, wrapper: ConnectionWrapper[T]) -> None:
        """Check in a connection whose ``with`` block ended in an exception.

        One still running a query (the exception came from a signal handler:
        a celery soft time limit, a timeout alarm) is closed, which cancels the
        query; one left in a transaction (psycopg, psycopg2) is rolled back, or
        closed if that fails. The next caller gets a connection at rest.
        """
        self._checkpid()
        if not (getattr(wrapper, "pool", None) is self and wrapper.in_use
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

    def _check_in_unsettled(self, wrapper: ConnectionWrapper[T], status: int) -> None:
        # Checked in without an exception, yet not at rest: the next caller must
        # not inherit an open transaction (its locks, its uncommitted rows) nor
        # a dead connection. As psycopg_pool's putconn does, and SQLAlchemy's
        # reset on return: roll back, or close.
        first = not self._told_unsettled
        self._told_unsettled = True
        log.log(logging.WARNING if first else logging.DEBUG,
                "pool %r: connection %s checked in %s%s", self.name, wrapper.id[:8],
                _UNSETTLED.get(status, f"with transaction status {status}: closed"),
                " (later ones are logged at debug level)" if first else "")
        try:
            self.release_after_error(wrapper)
        except BaseException:  # cut short (a signal mid-rollback): closed, never stranded
            if wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                self._discard(wrapper, validation=False)
            raise

    def _release_slow(self, wrapper: ConnectionWrapper[T], now: float) -> None:
        client = self._client
        owed = young = False
        quantum = 0.0
        stale: Iterable[AcquireRequest] = ()  # no call (set()) between the two try blocks: it would strand it
        try:  # decided before taking the lock, which then only guards the hand-over
            if not wrapper.in_use or self._all.get(wrapper.id) is not wrapper:
                # Before anything touches the connection: in a forked child it is
                # the parent's, and must not be used here (I7).
                raise PoolMisuse(f"{wrapper!r} was already released (or made in another process)")
            expired = now - wrapper.created_at > self._max_lifetime
            lost = not expired and self._test_on_release and not self._validate(wrapper)
            keep = not expired and not lost
            if client is not None and keep:
                if wrapper.lease is None:
                    # A fallback connection goes once the coordinator is back. Not
                    # reconnected here: a hung coordinator would hold up a checkin
                    # for its connect timeout; the client's thread tries instead.
                    keep = not client.connected
                    if keep:
                        client.reconnect_soon()
                elif client.owes(self.resource):
                    owed = True
                    # Counted from when the connection became usable, not from the
                    # grant: connecting can take a good part of a short quantum.
                    quantum = self._quantum(client)
                    young = now - wrapper.created_at < quantum
        except BaseException:
            # Cut short before the checkin took effect (a signal handler's
            # exception; mid-validation it may be mid-query): closed, never
            # left in use for good with its lease. (Not a misuse: not ours.)
            if wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                self._discard(wrapper, validation=False)
            raise
        recheck = arm = kept = False
        placed = to_close = False  # idle or a waiter's / out of _all, to be closed
        openers: list[_Waiter] = []
        try:
            with self._lock:
                if not wrapper.in_use or self._all.get(wrapper.id) is not wrapper:
                    raise PoolMisuse(f"{wrapper!r} was already released (or made in another process)")
                self._released += 1
                wrapper.last_used = now
                wrapper.warned = False
                # Owed to the coordinator: give it back now if it is older than the
                # fairness quantum. A younger one stays; should it still be idle a
                # moment later (nobody here wanted it again), it goes then.
                if owed and young:
                    owed = False
                    recheck = True
                elif owed and client is not None:
                    # Concurrent checkins read the same count: only as many give
                    # back as are owed beyond the give-backs already under way.
                    owed = client.owes(self.resource) > self._giving
                    if owed:
                        self._giving += 1
                if keep and not owed and self.status is PoolStatus.ACTIVE:
                    kept = True
                    # No call between a hand-over and its flag: a signal handler's
                    # exception sees either the connection placed or still ours.
                    if not self._waiters:
                        placed = True
                        wrapper.in_use = False
                        self._idle.append(wrapper)
                        # One timer at a time per pool, only while leases are owed.
                        arm = recheck and not self._recheck_pending
                        if arm:
                            self._recheck_pending, self._armed_quantum = True, quantum
                    else:
                        waiter = self._waiters[0]
                        del self._waiters[0]
                        waiter.wrapper = wrapper
                        placed = True
                        waiter.event.set()
                        if not self._waiters and self._lease_requests:
                            # Nobody waits any more: withdraw the openers' lease requests,
                            # or this process would stay queued at the coordinator.
                            stale, self._lease_requests = self._lease_requests, set()
                else:
                    if owed:
                        self._m["reclaimed"] += 1
                    if lost:
                        self._m["validation_failures"] += 1
                    wrapper.in_use = False
                    del self._all[wrapper.id]
                    self._closing += 1
                    to_close = True
                    openers = self._plan_growth()
        except BaseException:
            # Cut short at a call inside the hand-over (a signal handler's exception).
            if to_close:
                self._close_then_open(wrapper, openers, now + self.config.acquire_timeout, giving=owed)
            elif not placed and wrapper.in_use and self._all.get(wrapper.id) is wrapper:
                self._discard(wrapper, validation=False)
            raise
        # Outside the lock: arming the timer wakes the client's thread (a send),
        # and a cancel sends a frame.
        if arm and client is not None:
            try:
                client.call_later(self._recheck_delay, partial(giveback.recheck_owed, self))
            except BaseException:  # a signal handler's: not armed after all, so let a later checkin arm it
                with self._lock:
                    self._recheck_pending = False
                raise
        for ticket in stale:
            ticket.cancel()
        if kept:
            return
        self._close_then_open(wrapper, openers, now + self.config.acquire_timeout, giving=owed)

    def _quantum(self, client: Client) -> float:
        return self._handoff.quantum_for(client, self.resource)

    def _use_fallback(self, client: Client) -> bool:
        """coordinator_away="fallback": with the coordinator unreachable, open
        up to ``fallback_max_size`` connections without a lease."""
        if self.config.coordinator_away != "fallback" or client.ensure_connected():
            return False
        with self._lock:
            # Counted with the fallback connects still under way: concurrent
            # openers must not each see room for one more.
            unleased = sum(1 for w in self._all.values() if w.lease is None) + self._fallback_opening
            if unleased >= self.config.fallback_max_size:
                return False  # wait for the coordinator like everyone else
            self._fallback_opening += 1
        log.warning("pool %r: coordinator %s unreachable; opening a connection without a lease "
                    "(coordinator_away=fallback)", self.name, self.coordinator)
        return True

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
        with self._lock:
            self._all.pop(wrapper.id, None)
            self._closing += 1
            wrapper.in_use = False
            if validation:
                self._m["validation_failures"] += 1
            if bad:
                self._m["returns_bad"] += 1
            openers = self._plan_growth()
        self._close_then_open(wrapper, openers, time.monotonic() + self.config.acquire_timeout)

    def _park(self, wrapper: ConnectionWrapper[T]) -> None:
        """Hand a connection made or checked by maintenance to a waiter, or idle;
        closed instead if the pool is no longer active."""
        with self._lock:
            active = self.status is PoolStatus.ACTIVE
            if active:
                self._hand_over(wrapper)
        if not active:
            self._discard(wrapper, validation=False)

    def _close(self, wrapper: ConnectionWrapper[T], giving: bool = False) -> None:
        """Close, confirm the server let go, then give the lease back (I1). A
        close not confirmed within close_confirm_timeout keeps its lease until
        it is (watched in the background, bounded). ``giving``: a give-back to
        the coordinator, counted in ``_giving`` until its lease is released.
        The caller counted ``wrapper`` in ``_closing`` when it took it out of ``_all``."""
        try:
            self._close_counted(wrapper, giving)
        finally:
            with self._lock:
                if self._pid == _PID[0]:  # not reset by a fork meanwhile
                    self._closing -= 1
                    self._m["total_closed"] += 1
                self._returned.notify_all()
            self._end_session_if_done()

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

    def _close_counted(self, wrapper: ConnectionWrapper[T], giving: bool) -> None:
        t0 = time.monotonic()  # before the lease is taken off: no call between that and the try
        lease, client, kept = wrapper.lease, self._client, wrapper.kept
        wrapper.lease = wrapper.kept = None
        pid = self._pid

        keep = lease is not None and client is not None

        def late(confirmed: bool) -> None:
            try:
                if client is not None and lease is not None:
                    client.release(lease)
            finally:  # released (or cut short, then sent anyway): uncounted either way
                if keep or giving:
                    with self._lock:
                        if self._pid == pid:  # not reset by a fork meanwhile
                            self._leased -= keep
                            self._giving -= giving
            if self._pid == pid:
                self._end_session_if_done()

        try:
            confirmed = close_and_confirm(wrapper.conn, self.config.close_confirm_timeout,
                                          on_late=late if keep else None, kept=kept)
        except NotClosable:  # nothing to close: give the lease back
            log.exception("pool %r: closing connection %s failed", self.name, wrapper.id[:8])
            confirmed = True
        except BaseException:
            # Cut short (a signal handler's exception): close_and_confirm left
            # the confirmation to a watcher, which calls late(); the caller
            # gets the exception.
            if not keep and giving:
                late(False)
            raise
        if confirmed:
            try:
                self._handoff.closed(time.monotonic() - t0)
                self._handoff.tell(client, self.resource)
            finally:  # a signal handler's exception here must not keep the lease for good
                late(True)
        elif keep:
            log.warning("pool %r: server has not dropped connection %s after %.1fs; its lease is "
                        "kept until it does", self.name, wrapper.id[:8], self.config.close_confirm_timeout)
        elif giving:
            late(False)  # no lease to keep: only the give-back count to settle

    def _evict(self, idle: deque[ConnectionWrapper[T]], waiters: deque[_Waiter],
               status: PoolStatus) -> None:
        """Under the lock: what a close() or drain() took out of the pool leaves
        it: the idle connections out of _all (counted in _closing until closed),
        the waiters failed. Can run again (a wrapper leaves _all once)."""
        for wrapper in idle:
            if self._all.get(wrapper.id) is wrapper:
                del self._all[wrapper.id]
                self._closing += 1
        for waiter in waiters:
            if waiter.error is None:
                waiter.error = PoolClosed(f"pool {self.name!r} is {status.value}")
            waiter.event.set()

    def _let_go(self, idle: deque[ConnectionWrapper[T]], requests: set[AcquireRequest]) -> None:
        """Withdraw the openers' lease requests, close the idle connections
        (evicted). Can run again: both are consumed as they go."""
        for ticket in list(requests):  # a closed pool must not take grants ahead of others
            ticket.cancel()
            requests.discard(ticket)
        while idle:
            # Subscript and del, not popleft(): no call between taking it
            # and the close, which settles a close cut short by itself.
            wrapper = idle[0]
            del idle[0]
            self._close(wrapper)

    def _let_go_later(self, idle: deque[ConnectionWrapper[T]], waiters: deque[_Waiter],
                      requests: set[AcquireRequest], status: PoolStatus) -> None:
        """Thread: the rest of a close() or drain() cut short by a signal handler's
        exception. Nothing else would ever close those connections (a second
        close() returns at once), and their leases would stay held."""
        with self._lock:
            self._evict(idle, waiters, status)
        self._let_go(idle, requests)

    def drain(self, timeout: float = 30.0) -> None:
        """Stop handing out connections; wait (up to ``timeout``) for those in
        use to come back, and close them all. :meth:`resume` reopens."""
        self._checkpid()
        self._shut(PoolStatus.DRAINING, timeout)

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
        if not _valid_timeout(timeout):  # before anything stops: a refused close changes nothing
            raise ConfigError("timeout", f"must be a number of seconds >= 0, got {timeout!r}")
        self._stop.set()
        try:
            self._shut(PoolStatus.CLOSED, timeout)
        finally:
            # Also when the wait is cut short (a signal handler's exception) once
            # the pool is closed: a closed pool's handlers kept the process's
            # session open for good (a second close() returns at once).
            if self._client is not None and self.status is PoolStatus.CLOSED:
                self._client.remove_handlers(*self._handlers)
                self._client.close_if_unused()

    def _shut(self, status: PoolStatus, timeout: float) -> None:
        if not _valid_timeout(timeout):  # NaN would spin below, inf overflows the wait
            raise ConfigError("timeout", f"must be a number of seconds >= 0, got {timeout!r}")
        idle: deque[ConnectionWrapper[T]] | None = None
        try:
            with self._lock:
                if self.status is PoolStatus.CLOSED:
                    return
                # Made first: a signal handler's exception in a call leaves the
                # pool as it was (still open) or all taken out at once, never half.
                fresh: tuple[deque[ConnectionWrapper[T]], deque[_Waiter], set[AcquireRequest]]
                fresh = deque(), deque(), set()
                idle, waiters, requests = self._idle, self._waiters, self._lease_requests
                self._idle, self._waiters, self._lease_requests = fresh
                self.status = status
                # Under this lock: no waiter sees itself dropped unanswered.
                self._evict(idle, waiters, status)
            self._let_go(idle, requests)
        except BaseException:
            if idle is not None:  # taken out of the pool: the rest goes on
                threading.Thread(target=self._let_go_later, args=(idle, waiters, requests, status),
                                 daemon=True, name=f"sharedpool-close-{self.resource}").start()
            raise
        deadline = time.monotonic() + timeout
        with self._lock:
            # Done once every connection is closed and its lease released,
            # not merely checked in.
            # A connection still being opened is closed once made: waited for too.
            while (self._all or self._closing or self._opening) and self.status is status:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    # timeout=0 (an admin drain or end-session pushed by the
                    # coordinator, or asked so): not waiting was the request.
                    log.log(logging.WARNING if timeout > 0 else logging.DEBUG,
                            "pool %r: %d connection(s) still in use, %d closing, %d opening, "
                            "after %.1fs", self.name, len(self._all), self._closing,
                            self._opening, timeout)
                    break
                self._returned.wait(min(remaining, WAIT_SLICE))

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
                    reclaim = partial(giveback.reclaim_idle, self)
                    push = partial(giveback.on_push, self)
                    states = partial(giveback.lease_states, self)
                    client.on_reclaim(self.resource, reclaim)
                    client.on_push(push)
                    client.add_state_provider(states)
                    self._handlers = (reclaim, push, states)
                    self._client = client
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
            _INHERITED.extend(self._all.values())
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

