"""A pool's opener: the thread that makes one connection for the waiters.

A lease first (I1: no connection without one), then the factory, then the
connection goes to the oldest waiter, or is closed if the pool stopped being
active meanwhile. A failed lease or connect reaches a waiter as its error,
never nowhere. The planning (how many openers, for whom) stays in the pool,
under its lock; what happens here runs outside it.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import giveback
from .config import check_not_awaitable
from .errors import (
    AcquireCancelled,
    ConnectTimeout,
    CoordinatorUnavailable,
    PoolClosed,
    PoolTimeout,
    SharedPoolError,
)
from .wrapper import ConnectionWrapper

if TYPE_CHECKING:
    from .client import AcquireRequest, Client, Lease
    from .pool import ConnectionPool
    from .timers import Timer
    from .waiting import _Waiter

log = logging.getLogger("sharedpool.pool")

#: How long before the coordinator would time it out a lease request is
#: retimed to the next waiter's deadline (or withdrawn, if no waiter is left
#: for it) when its waiter was served meanwhile while others of the pool wait:
#: that timeout was no caller's, yet counted in timeouts_total.
WITHDRAW_EARLY = 0.1


class Carry:
    """Whom an opener's lease request is for: the waiter whose deadline it
    carries, and that deadline; a retime (:class:`RetimeIfServed`) moves both
    on to the next waiter."""

    __slots__ = ("waiter", "deadline", "retimed")

    def __init__(self, waiter: _Waiter, deadline: float) -> None:
        self.waiter, self.deadline = waiter, deadline
        self.retimed = False


def run(pool: ConnectionPool[Any], waiter: _Waiter, deadline: float) -> None:
    """Opener thread: lease, then factory; deliver to the oldest waiter."""
    with pool._lock:
        if not waiter.planned:
            return  # unplanned: its starter was cut short and uncounted it
        waiter.planned = False
    lease = None
    try:
        client = pool._get_client()
        fallback = client is not None and use_fallback(pool, client)
    except BaseException as exc:  # noqa: BLE001 - a $SHAREDPOOL_SOCKET gone bad: to the waiter
        failed(pool, waiter, exc, connected=False)
        return
    waiting = False  # counted in pool._lease_waits: no connection is being made yet
    carry, first = Carry(waiter, deadline), waiter
    try:
        t0 = time.monotonic()
        while client is not None and not fallback:
            waiter.leasing = True
            if not waiting:
                with pool._lock:
                    pool._lease_waits += 1
                waiting = True
            try:
                lease = take_lease(pool, client, deadline, waiter=waiter, carry=carry)
                waiter, deadline = carry.waiter, carry.deadline
                waiter.leasing = False
                break
            except CoordinatorUnavailable:
                waiter, deadline = carry.waiter, carry.deadline
                # The coordinator went away while we waited: with "fallback",
                # open without a lease if there is room, else wait on.
                if (pool.config.coordinator_away != "fallback" or client.closed
                        or time.monotonic() >= deadline):
                    raise
                fallback = use_fallback(pool, client)
        t1 = time.monotonic()
        with pool._lock:
            pool._lease_waits -= waiting
            waiting = False
            if lease is not None:
                pool._m["leases_acquired"] += 1
                pool._m["lease_wait_ms"] += int((t1 - t0) * 1000)
            waiter.connect_deadline = t1 + pool.config.connection_timeout
            pool._m["connect_attempts"] += 1  # psycopg_pool's connections_num: failed ones too
            waiter.event.set()  # the waiter re-arms its wait with the connect deadline
        try:
            conn = pool.factory()
            check_not_awaitable("factory", conn)  # its lease goes back below, as for a failed connect
        finally:
            with pool._lock:
                waiter.connect_deadline = None  # done: nobody may give up on it any more
                if waiter.abandoned:
                    pool._stalled -= 1
                if fallback:  # made (then counted in _all) or failed: no longer under way
                    pool._fallback_opening -= 1
    except BaseException as exc:  # noqa: BLE001 - delivered to the waiter, not lost
        if lease is None and carry.retimed:
            waiter, deadline = carried_failure(pool, carry, first, exc)
        if client is not None and lease is not None:
            client.report_failure(pool.resource)
            client.release(lease)  # no connection was made: nothing to confirm
        # A lease wait that ran out with the deadline of the waiter it was
        # started for (the coordinator away): that waiter has had its
        # PoolTimeout, and the error is no one else's. Only a lease wait: a
        # standalone pool's failed connect (client None, lease None too) is
        # an error for the next waiter, however late it came.
        expired = (client is not None and lease is None and not fallback
                   and time.monotonic() >= deadline)
        failed(pool, waiter, exc, connected=lease is not None or client is None, expired=expired,
               lease_wait=waiting)
        return
    wrapper = ConnectionWrapper(conn, pool, lease)
    pool._handoff.connected(time.monotonic() - t1)
    pool._handoff.tell(client, pool.resource)
    if client is not None:
        client.report_success(pool.resource)
    if waiter.abandoned:  # the caller gave up on a slow connect: close, then release
        log.warning("pool %r: a connect finished after connection_timeout; closing it", pool.name)
        with pool._lock:
            pool._opening -= 1
            pool._closing += 1
            pool._leased += lease is not None
            pool._m["total_created"] += 1  # made, if too late: total_closed counts its close
            openers = pool._plan_growth()
        pool._close_then_open(wrapper, openers, deadline)
        return
    with pool._lock:
        pool._opening -= 1
        pool._m["total_created"] += 1
        pool._m["connections_ms"] += int((time.monotonic() - t1) * 1000)
        pool._all[wrapper.id] = wrapper
        pool._leased += lease is not None
        revoked = giveback.drop_revoked(pool, wrapper, client)
        closing = not pool._active
        # The fence must know the backend pid before any query of a caller runs
        # on it: should this process die mid-query, that backend counts.
        report_first = client is not None and wrapper.backend_pid is not None
        direct = pool.configure is None and not report_first
        if closing:
            del pool._all[wrapper.id]
            pool._closing += 1
        elif direct:
            pool._hand_over(wrapper)
        else:  # counted and reported (as busy), handed out once reported / configured
            wrapper.in_use = True
        # One held back goes to a waiter next: no opener for that waiter
        # (a failed configure plans again, in failed()).
        openers = pool._plan_growth() if closing or direct else []
    if revoked:
        giveback.warn_revoked(pool, wrapper)
    try:
        if closing:
            pool._close(wrapper)
        elif pool.configure is not None:
            error = setup(pool, wrapper, client)
            if error is None:
                pool._park(wrapper)  # handed out, or closed if the pool closed meanwhile
            else:  # reaches a waiter as a failed connect's error does
                with pool._lock:
                    pool._opening += 1  # failed() settles it as for a failed connect
                failed(pool, waiter, error, connected=True)
        elif not direct:  # held back for the report (report_first: client is set)
            if client is not None:
                client.report_now()
            pool._park(wrapper)  # handed out, or closed if the pool closed meanwhile
    finally:  # whatever failed above, the openers planned must run
        pool._start_openers(openers, deadline)


def use_fallback(pool: ConnectionPool[Any], client: Client) -> bool:
    """coordinator_away="fallback": with the coordinator unreachable, open
    up to ``fallback_max_size`` connections without a lease."""
    if pool.config.coordinator_away != "fallback" or client.ensure_connected():
        return False
    with pool._lock:
        # Counted with the fallback connects still under way: concurrent
        # openers must not each see room for one more.
        unleased = sum(1 for w in pool._all.values() if w.lease is None) + pool._fallback_opening
        if unleased >= pool.config.fallback_max_size:
            return False  # wait for the coordinator like everyone else
        pool._fallback_opening += 1
    log.warning("pool %r: coordinator %s unreachable; opening a connection without a lease "
                "(coordinator_away=fallback)", pool.name, pool.coordinator)
    return True


def carried_failure(pool: ConnectionPool[Any], carry: Carry, served: _Waiter,
                    exc: BaseException) -> tuple[_Waiter, float]:
    """The waiter and deadline a failed lease wait that was retimed reports
    to. A timeout before the new deadline is the old one's (the coordinator
    timed it out as the retime was on its way): it is not the next waiter's
    to see; that waiter gets an opener of its own again."""
    if isinstance(exc, PoolTimeout) and time.monotonic() < carry.deadline:
        with pool._lock:
            carry.waiter.has_opener = False
        return served, carry.deadline
    return carry.waiter, carry.deadline


def take_lease(pool: ConnectionPool[Any], client: Client, deadline: float,
               waiter: _Waiter | None = None, carry: Carry | None = None) -> Lease:
    """Opener thread: a lease for one more connection. Withdrawn if the pool
    closes meanwhile; one granted as it closed goes back unused (PoolClosed).
    Retimed just before its deadline if ``waiter`` was served (or left)
    meanwhile while others wait: see :class:`RetimeIfServed`, which records
    the waiter it then serves in ``carry``."""
    timeout = max(0.0, deadline - time.monotonic())
    ticket = client.request(pool.resource, timeout,
                            fail_if_lost=pool.config.coordinator_away == "fallback", _owner=pool)
    with pool._lock:
        # A close() that ran since the request went out did not see it.
        active = pool._active
        # Nor did a checkin that served the last waiter meanwhile (it withdraws
        # only the requests registered): left, it stayed queued for nobody, and
        # the coordinator asked for an idle lease that came straight back to it
        # (under load: a close and a connect for nothing, 6-7 connects for 2 slots).
        stale = waiter is not None and waiter.wrapper is not None and not pool._waiters
        if active and not stale:
            pool._lease_requests.add(ticket)
    if not active or stale:
        ticket.cancel()
    withdraw = RetimeIfServed(pool, waiter, ticket, carry) if waiter is not None else None
    try:
        if active and not stale and withdraw is not None and timeout > 2 * WITHDRAW_EARLY:
            withdraw.arm(timeout - WITHDRAW_EARLY)
        lease = ticket.wait()
    finally:
        if withdraw is not None:
            withdraw.forget()  # the timer may be due long after: cancelled, it holds nothing
        with pool._lock:
            pool._lease_requests.discard(ticket)
            active = pool._active
    if not active:
        try:
            pool.grant_unused()  # the coordinator counted it: so do we, as never used, before it goes back
        finally:
            client.release(lease)
        raise PoolClosed(f"pool {pool.name!r} is {pool.status.value}")
    return lease


class RetimeIfServed:
    """A timer's job, just before ``ticket`` times out at the coordinator: if
    ``waiter`` (whose deadline it carries) was served by a checkin, or left,
    while others wait, the request stayed for them (a checkin withdraws it only
    once nobody waits), and its timeout would be counted in timeouts_total
    with no caller's PoolTimeout. It is retimed instead to the deadline of
    the first waiter with no opener of its own, which it now serves (it
    keeps its place in the coordinator's line: asked again, it went behind
    every process queued since); with no such waiter, or a coordinator of
    protocol 2 (no retime), withdrawn (the opener fails with AcquireCancelled,
    which reaches no waiter, and the opener planned then asks again).

    Holds the pool weakly, and the waiter, ticket and carry only until the
    lease wait ends (:meth:`forget`): the waiter's wrapper and the ticket's
    owner hold the pool, and the timer may be due as late as the checkout's
    timeout; a pool dropped meanwhile must be collected, its connections
    closed and their leases released, without waiting for it. :meth:`forget`
    cancels the timer too: left in the client's heap until its deadline, one
    per connection opened piled up (acquire_timeout x connects per second)."""

    __slots__ = ("_pool", "_waiter", "_ticket", "_carry", "_timer")

    def __init__(self, pool: ConnectionPool[Any], waiter: _Waiter, ticket: AcquireRequest,
                 carry: Carry | None = None) -> None:
        self._pool = weakref.ref(pool)
        self._waiter: _Waiter | None = waiter
        self._ticket: AcquireRequest | None = ticket
        self._carry = carry
        self._timer: Timer | None = None

    def arm(self, delay: float) -> None:
        """Run on the client's thread in ``delay`` seconds (unless forgotten first)."""
        ticket = self._ticket
        if ticket is None:
            return
        self._timer = timer = ticket.client.call_later(delay, self)
        if self._ticket is None:  # forgotten meanwhile (the wait ended on another thread)
            timer.cancel()

    def forget(self) -> None:
        """The lease wait ended: nothing is left to retime or withdraw."""
        self._waiter = self._ticket = self._carry = None
        timer = self._timer
        if timer is not None:
            timer.cancel()

    def __call__(self) -> None:
        found, waiter, ticket = self._pool(), self._waiter, self._ticket
        if found is None or waiter is None or ticket is None:
            return
        left, adopted = 0.0, False
        with found._lock:
            stale = (ticket in found._lease_requests and waiter not in found._waiters
                     and bool(found._waiters))
            if not stale:
                return
            # The waiters with openers of their own have their own requests.
            after = next((w for w in found._waiters if not w.has_opener and w.deadline is not None), None)
            until = after.deadline if after is not None else None
            if until is not None:
                left = until - time.monotonic()
            # A coordinator of an older protocol has no retime: withdrawn, asked again.
            if (after is not None and until is not None and left > WITHDRAW_EARLY
                    and ticket.client.speaks("retime")):
                after.has_opener = after.leasing = adopted = True
                self._waiter = after
                if self._carry is not None:
                    self._carry.waiter, self._carry.deadline = after, until
                    self._carry.retimed = True
            else:
                found._lease_requests.discard(ticket)
        if not adopted:
            ticket.cancel()
        # Answered as it was retimed (False): the lease goes to the oldest waiter
        # all the same; the one adopted here only decides where an error goes.
        elif ticket.retime(left) and left > 2 * WITHDRAW_EARLY:
            self.arm(left - WITHDRAW_EARLY)


def setup(pool: ConnectionPool[Any], wrapper: ConnectionWrapper[Any],
          client: Client | None) -> BaseException | None:
    """A new connection, counted and marked in use by the pool itself: report
    its backend pid, then run ``configure`` on it. One it fails on is closed
    (then its lease released) and the error returned."""
    assert pool.configure is not None
    # The pool's own, not a caller's: leak detection must not time it.
    wrapper.checked_out_at = math.inf
    if client is not None and wrapper.backend_pid is not None:
        client.report_now()  # before any query of ours runs on it
    try:
        pool.configure(wrapper.conn)
    except BaseException as exc:  # noqa: BLE001 - returned to the caller, not lost
        with pool._lock:
            del pool._all[wrapper.id]
            pool._closing += 1
        pool._close(wrapper)
        return exc
    return None


def failed(pool: ConnectionPool[Any], waiter: _Waiter, exc: BaseException, connected: bool,
           expired: bool = False, lease_wait: bool = False) -> None:
    """``lease_wait``: it failed waiting for its lease (counted in ``_lease_waits``)."""
    if not isinstance(exc, SharedPoolError):
        log.warning("pool %r: opening a connection failed (connect or configure): %s", pool.name, exc)
    with pool._lock:
        pool._opening -= 1
        pool._lease_waits -= lease_wait
        pool._returned.notify_all()  # a close() may be waiting for this opener
        if connected and not waiter.abandoned:  # an abandoned one was counted at its ConnectTimeout
            pool._m["connect_errors"] += 1
        target = waiter if waiter in pool._waiters else None
        # An abandoned connect's caller had its ConnectTimeout: its late
        # failure is no one else's (a waiter for a checkin would fail with
        # it); a new opener is planned below instead.
        if target is None and pool._waiters and not expired and not waiter.abandoned and not isinstance(
                exc, (AcquireCancelled, PoolTimeout, ConnectTimeout)):
            # Our waiter was served meanwhile: the error (a denial, a failed
            # connect) goes to the oldest waiter rather than nowhere, or a
            # coordinator denying at once would have us retrying in a loop.
            target = pool._waiters[0]
        if target is not None:
            pool._waiters.remove(target)
            target.error = exc
            target.event.set()
        openers = pool._plan_growth()
    pool._end_session_if_done()  # a closed pool's last opening failed: its session may end
    pool._start_openers(openers, time.monotonic() + pool.config.acquire_timeout)
