"""A checkout that finds no idle connection: it queues a waiter, has
connections opened for it (sharedpool.opening) while the pool has room, and
waits for one to be handed over, for its error, or for its deadline. Every way
out, a signal handler's exception included, leaves no waiter queued and no
connection handed to a caller that is gone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .client import QUEUED_AFTER, AcquireRequest
from .closing import WAIT_SLICE
from .condition import Event
from .config import blocked_loop_note
from .errors import ConnectTimeout, PoolClosed, PoolTimeout
from .status import PoolStatus
from .wrapper import ConnectionWrapper, _call_site

if TYPE_CHECKING:
    from .pool import ConnectionPool

T = TypeVar("T")


class _Waiter:
    __slots__ = ("event", "wrapper", "error", "connect_deadline", "abandoned", "has_opener",
                 "planned", "leasing", "counted", "deadline")

    def __init__(self, deadline: float | None = None) -> None:
        self.event = Event()  # a signal handler's exception in its wait cannot leave it locked
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
        #: when its checkout gives up: what an opener planned for it asks the
        #: coordinator with, whoever planned it (None: a top-up's, no checkout)
        self.deadline = deadline


def acquire_slow(pool: ConnectionPool[T], timeout: float | None, start: float,
                 retry: bool = False) -> ConnectionWrapper[T]:
    """A checkout the fast path could not serve: queue, have connections
    opened, wait until ``start`` + the timeout (one deadline for every retry)."""
    if not retry:  # asked for now (a retry was counted by the fast path): requests_num
        with pool._lock:
            pool._slow_asked += 1
    if pool._maintenance is None:  # a forked child's first checkout
        pool._start_maintenance()
    wait = pool.config.acquire_timeout if timeout is None else timeout
    deadline = start + wait
    while True:  # one deadline for every retry (a failed validation loops)
        if retry and wait > 0 and time.monotonic() >= deadline:
            # Idle connections kept failing validation until the time was up
            # (with no time to wait, each idle one is still tried once).
            with pool._lock:
                pool._m["acquire_timeouts"] += 1
                pool._m["request_errors"] += 1
            raise PoolTimeout(f"pool {pool.name!r}: no valid connection within {wait:.3g}s "
                              "(idle connections failed validation)")
        retry = True
        waiter = _Waiter(deadline)
        openers: list[_Waiter] = []
        started = False
        wrapper = checking = None
        try:
            # In the try: a signal handler's exception as the waiter is queued
            # or its opener planned must not leave it queued for a caller that
            # is gone (the next connection would be handed to it, for good).
            with pool._lock:
                if pool.status is not PoolStatus.ACTIVE:
                    waiter.counted = True
                    pool._m["request_errors"] += 1  # a refused checkout is a failed request too
                    raise PoolClosed(f"pool {pool.name!r} is {pool.status.value}")
                if pool._idle and not pool._waiters:
                    wrapper = checking = pool._idle.pop()
                    wrapper.in_use = True
                else:
                    pool._waiters.append(waiter)
                    pool._m["requests_queued"] += 1
                    openers = pool._plan_growth()
            if wrapper is None:
                pool._start_openers(openers, deadline, replan=False)
                started = True
                wrapper = checking = wait_for(pool, waiter, deadline, start)
            now = time.monotonic()
            fresh = wrapper.last_used == wrapper.created_at  # never checked in: just connected
            valid = (not pool.config.test_on_acquire or fresh
                     or now - max(wrapper.last_used, wrapper.checked_at) <= pool.config.validation_bypass
                     or pool._validate(wrapper))
        except BaseException as exc:
            # Also what a signal handler raises while we wait (celery's soft
            # time limit, KeyboardInterrupt): no connection may stay handed
            # to a caller that is gone.
            try:  # each part even if another signal cuts the one before short
                forsake(pool, waiter, checking, withdraw=not isinstance(exc, PoolTimeout))
            finally:
                try:
                    if not started:  # cut short before its openers ran: uncount them, with our waiter gone
                        pool._unplan(openers)
                finally:
                    count_failed(pool, waiter, start)
            raise
        if not valid:
            pool._discard(wrapper)
            continue
        try:  # as in acquire(): a signal here must not strand the connection
            wrapper.checked_out_at = now  # first: a checkin cut short here counts from now
            with pool._lock:
                pool._acquired += 1
                pool._slow_served += 1  # counted in requests_num when asked for
                pool._m["requests_wait_ms"] += int((now - start) * 1000)
            if pool.config.leak_detection_threshold is not None:
                wrapper.site = _call_site()
            return wrapper
        except BaseException:
            pool.release(wrapper)
            raise


def wait_for(pool: ConnectionPool[T], waiter: _Waiter, deadline: float, start: float) -> ConnectionWrapper[T]:
    while True:
        until = deadline
        if waiter.connect_deadline is not None:
            until = min(until, waiter.connect_deadline)
        # In slices: a wait beyond threading.TIMEOUT_MAX raises OverflowError.
        waiter.event.wait(min(max(0.0, until - time.monotonic()), WAIT_SLICE))
        with pool._lock:
            if waiter.wrapper is not None:
                return waiter.wrapper
            now = time.monotonic()
            if waiter.error is not None:
                waiter.counted = True
                pool._m["request_errors"] += 1
                pool._m["requests_wait_ms"] += int((now - start) * 1000)
                if isinstance(waiter.error, PoolTimeout) and waiter.leasing:
                    # Its lease wait ran out, by the coordinator's clock a hair
                    # before ours: said as our own timeout is, with its reason.
                    pool._m["acquire_timeouts"] += 1
                    raise timed_out(pool, start, deadline, lease_wait_note(pool, waiter.error)) from None
                raise waiter.error
            connect_late = waiter.connect_deadline is not None and now >= waiter.connect_deadline
            if now < deadline and not connect_late:
                waiter.event.clear()  # every set() happens under the lock: none is lost
                continue
            pool._waiters.remove(waiter)
            waiter.counted = True
            pool._m["request_errors"] += 1
            pool._m["requests_wait_ms"] += int((now - start) * 1000)
            if connect_late:
                waiter.abandoned = True
                pool._stalled += 1  # its opener no longer serves anyone: new waiters get their own
                pool._m["connect_errors"] += 1
                raise ConnectTimeout(
                    f"pool {pool.name!r}: the connection factory did not return within "
                    f"connection_timeout={pool.config.connection_timeout:g}s")
            pool._m["acquire_timeouts"] += 1
            client = pool._client
            away = ""
            # Why no lease came: a wrong or dead socket must say so (attributes
            # only: no client lock is taken under the pool's lock).
            if client is not None and (note := client.unreachable_note()):
                away = note
            elif pool._lease_requests or waiter.leasing:
                away = lease_wait_note(pool, waited=deadline - start)
            raise timed_out(pool, start, deadline, away)


def count_failed(pool: ConnectionPool[T], waiter: _Waiter, start: float) -> None:
    """A checkout that ends in an exception :func:`wait_for` did not count (one a
    signal handler raised while it waited or validated: celery's soft time
    limit) failed too: in requests_errors, with its wait, as psycopg_pool counts it."""
    with pool._lock:
        if not waiter.counted:
            waiter.counted = True
            pool._m["request_errors"] += 1
            pool._m["requests_wait_ms"] += int((time.monotonic() - start) * 1000)


def lease_wait_note(pool: ConnectionPool[T], reason: object = None, waited: float = math.inf) -> str:
    """``reason``: the coordinator's, when its timeout came first; else what
    this process can tell by itself (under the pool's lock: attributes only)."""
    why = no_lease_why(pool, waited) if reason is None else reason
    return f"; still waiting for a lease of resource {pool.resource!r} from the coordinator ({why})"


def no_lease_why(pool: ConnectionPool[T], waited: float) -> str:
    # Not "the global cap is taken" whatever held it back: a wait too short for
    # any reply (timeout=0 with the cap free), or this process's own
    # max_per_process, sent operators to raise the wrong limit.
    now = time.monotonic()
    requests = list(pool._lease_requests)
    if waited < QUEUED_AFTER or (requests and all(now - t.since < QUEUED_AFTER for t in requests)):
        return "asked, no answer yet"
    client = pool._client
    if client is not None:
        cap = client.limits.get(pool.resource, {}).get("max_per_process")
        held = sum(1 for lease in client._held.copy().values() if lease.resource == pool.resource)
        if cap is not None and held >= cap:
            return f"this process holds max_per_process={cap} leases of {pool.resource!r}"
    return "its cap is taken, or it is paused or restarting: `sharedpool status` says which"


def timed_out(pool: ConnectionPool[T], start: float, deadline: float, note: str) -> PoolTimeout:
    """Under the lock: the PoolTimeout of a checkout that waited from ``start``."""
    # Connects under way (the factory called, not returned: top-ups, and those
    # past connection_timeout too) take their slots: said, or "0 open, 0 in use,
    # max_size=2" would not tell what was waited for.
    running = pool._opening - pool._lease_waits
    connects = f", {running} connect(s) still running" if running > 0 else ""
    # A configure= that hangs (setup SQL on a server that stopped answering) holds
    # a new connection the pool marks in use: said, or it reads as a caller's.
    setting_up = sum(1 for w in pool._all.values() if w.in_use and w.checked_out_at == math.inf)
    in_configure = f" ({setting_up} of them still in configure=)" if setting_up else ""
    return PoolTimeout(
        f"pool {pool.name!r}: no connection within {deadline - start:.3g}s "
        f"({len(pool._all)} open, {len(pool._all) - len(pool._idle)} in use{in_configure}{connects}, "
        f"max_size={pool.config.max_size}){note}{blocked_loop_note()}")


def forsake(pool: ConnectionPool[T], waiter: _Waiter, checking: ConnectionWrapper[T] | None,
            withdraw: bool = True) -> None:
    """The caller of ``waiter`` left with an exception. Dequeue it; check in
    a connection that reached it meanwhile, or close the one whose
    validation was cut short (it may be mid-query). ``withdraw``: the lease
    requests too, if nobody waits any more. Not after a timeout: a request
    of the caller's own runs out with it (the coordinator counts that
    timeout: withdrawn a moment before, it counted none), and one of a
    timeout=0 checkout opens its connection for later, as promised."""
    handed = None
    stale: Iterable[AcquireRequest] = ()  # not set(): no call before the try
    try:  # a second signal handler's exception (Ctrl-C twice) in here must not strand the connection
        with pool._lock:
            # Read first, with no call before it (a handler runs after one);
            # under the lock: once out of the queue nothing is handed to it.
            handed = waiter.wrapper if checking is None else None
            if waiter in pool._waiters:
                pool._waiters.remove(waiter)
            if handed is not None:
                # Never its caller's: no usage to count at its checkin (it holds
                # the last user's checkout time, or configure's inf).
                handed.checked_out_at = time.monotonic()
            if withdraw and not pool._waiters and pool._lease_requests:
                # Nobody waits any more: withdraw the openers' lease requests, as a
                # checkin does. Left, a wait cut short (celery's soft time limit)
                # kept the process queued at the coordinator until the deadline,
                # ahead of other processes, for a connection nobody wanted.
                stale, pool._lease_requests = pool._lease_requests, set()
        for ticket in stale:
            ticket.cancel()
    finally:
        if checking is not None:
            pool._discard(checking, validation=False)
        elif handed is not None:
            pool.release(handed)
