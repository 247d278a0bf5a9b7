"""A checkin that is not the fast path: a connection owed to the coordinator
(given back once older than the fairness quantum), expired, tested on release,
handed to a waiter, or checked in not at rest. Decided before the pool's lock
is taken; the lock only guards the hand-over; closes and sends happen after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypeVar

from . import giveback
from .client import AcquireRequest
from .closing import ACTIVE, INERROR, INTRANS, UNKNOWN
from .errors import PoolMisuse
from .status import PoolStatus
from .wrapper import ConnectionWrapper

if TYPE_CHECKING:
    from .pool import ConnectionPool
    from .waiting import _Waiter

log = logging.getLogger("sharedpool.pool")

T = TypeVar("T")

#: What a normal checkin does with a connection not at rest, by libpq transaction status.
_UNSETTLED = {
    ACTIVE: "with a query still running: closed",
    INTRANS: "inside a transaction: rolled back (commit inside the block, or use autocommit)",
    INERROR: "inside a failed transaction: rolled back",
    UNKNOWN: "closed or broken: discarded",
}


def check_in_unsettled(pool: ConnectionPool[T], wrapper: ConnectionWrapper[T], status: int) -> None:
    # Checked in without an exception, yet not at rest: the next caller must
    # not inherit an open transaction (its locks, its uncommitted rows) nor
    # a dead connection. As psycopg_pool's putconn does, and SQLAlchemy's
    # reset on return: roll back, or close.
    first = not pool._told_unsettled
    pool._told_unsettled = True
    log.log(logging.WARNING if first else logging.DEBUG,
            "pool %r: connection %s checked in %s%s", pool.name, wrapper.id[:8],
            _UNSETTLED.get(status, f"with transaction status {status}: closed"),
            " (later ones are logged at debug level)" if first else "")
    pool.release_after_error(wrapper)  # cut short (a signal here, mid-rollback): the caller closes it


def release_slow(pool: ConnectionPool[T], wrapper: ConnectionWrapper[T], now: float,
                 began: list[bool] | None = None) -> None:
    """``began``: its first item is set as this begins, with no call before (from
    then on this sees to the connection, whatever cuts it short)."""
    if began is not None:
        began[0] = True
    client = pool._client
    owed = young = sibling = False
    siblings = 0
    quantum = 0.0
    stale: Iterable[AcquireRequest] = ()  # no call (set()) between the two try blocks: it would strand it
    try:  # decided before taking the lock, which then only guards the hand-over
        if not wrapper.in_use or pool._all.get(wrapper.id) is not wrapper:
            # Before anything touches the connection: in a forked child it is
            # the parent's, and must not be used here (I7).
            raise PoolMisuse(f"{wrapper!r} was already released (or made in another process)")
        expired = now - wrapper.created_at > pool._max_lifetime
        lost = not expired and pool._test_on_release and not pool._validate(wrapper)
        keep = not expired and not lost
        if client is not None and keep:
            if wrapper.lease is None:
                # A fallback connection goes once the coordinator is back. Not
                # reconnected here: a hung coordinator would hold up a checkin
                # for its connect timeout; the client's thread tries instead.
                keep = not client.connected
                if keep:
                    client.reconnect_soon()
            elif client.owes(pool.resource):
                owed = True
                # Counted from when the connection became usable, not from the
                # grant: connecting can take a good part of a short quantum.
                quantum = pool._quantum(client)
                young = now - wrapper.created_at < quantum
                if not young and client.owes_idle_only(pool.resource):
                    # Asked for idle ones only, for this process's own waiters: a
                    # busy one goes at checkin only to another pool of it that
                    # waits, as below (to this pool's own opener it would be a
                    # close and a connect for nothing). Kept, siblings that held
                    # their slot through gaps of 10 ms waited 1.2 s, not 0.3 s.
                    young = not client.siblings_waiting(pool.resource, besides=pool)
            elif client._pending and (siblings := client.siblings_waiting(pool.resource, besides=pool)):
                # Another pool of this process waits for a lease of this
                # resource, and the coordinator cannot tell it from this one's
                # waiters (it asks a waiting process only for idle leases): as
                # to a waiter of another process, a slot goes to it once it
                # has served here for a fairness quantum, even if waiters of
                # this pool then wait for a lease in their turn.
                sibling = True
                quantum = pool._quantum(client)
                young = now - wrapper.created_at < quantum
    except BaseException:
        # Cut short before the checkin took effect (a signal handler's
        # exception; mid-validation it may be mid-query): closed, never
        # left in use for good with its lease. (Not a misuse: not ours.)
        if wrapper.in_use and pool._all.get(wrapper.id) is wrapper:
            pool._discard(wrapper, validation=False)
        raise
    recheck = arm = kept = False
    placed = to_close = False  # idle or a waiter's / out of _all, to be closed
    openers: list[_Waiter] = []
    try:
        with pool._lock:
            if not wrapper.in_use or pool._all.get(wrapper.id) is not wrapper:
                raise PoolMisuse(f"{wrapper!r} was already released (or made in another process)")
            pool._released += 1
            pool._usage += now - wrapper.checked_out_at
            wrapper.last_used = now
            wrapper.warned = False
            # Owed to the coordinator: give it back now if it is older than the
            # fairness quantum. A younger one stays; should it still be idle a
            # moment later (nobody here wanted it again), it goes then.
            if owed and young:
                owed = False
                recheck = True
            elif owed and client is not None and wrapper.lease is not None:
                # Concurrent checkins, of this pool or another of the process,
                # read the same count: only as many give back as are owed
                # beyond the give-backs already under way.
                owed = client.take_owed(wrapper.lease)
                if owed:
                    pool._giving += 1
            # One slot per waiting acquire: checkins before the first give-back
            # has served it must not each pay.
            sibling = (sibling and not young and wrapper.lease is not None
                       and client is not None and client.take_for_siblings(wrapper.lease, siblings))
            if keep and not owed and not sibling and pool.status is PoolStatus.ACTIVE:
                kept = True
                # No call between a hand-over and its flag: a signal handler's
                # exception sees either the connection placed or still ours.
                if not pool._waiters:
                    placed = True
                    wrapper.in_use = False
                    pool._idle.append(wrapper)
                    # One timer at a time per pool, only while leases are owed.
                    arm = recheck and not pool._recheck_pending
                    if arm:
                        pool._recheck_pending, pool._armed_quantum = True, quantum
                else:
                    waiter = pool._waiters[0]
                    del pool._waiters[0]
                    # The waiter's checkout from here (it sets its own time as it
                    # wakes): a guard of this checkin, cut short after, must not
                    # take it for still ours (_close_if_still_out) and close it.
                    wrapper.checked_out_at = now
                    waiter.wrapper = wrapper
                    placed = True
                    waiter.event.set()
                    if not pool._waiters and pool._lease_requests:
                        # Nobody waits any more: withdraw the openers' lease requests,
                        # or this process would stay queued at the coordinator.
                        stale, pool._lease_requests = pool._lease_requests, set()
            else:
                if owed or sibling:
                    pool._m["reclaimed"] += 1
                if lost:
                    pool._m["validation_failures"] += 1
                wrapper.in_use = False
                del pool._all[wrapper.id]
                pool._closing += 1
                to_close = True  # no call since it left _all: the guard below sees it out
                openers = pool._plan_growth()
        # Outside the lock: arming the timer wakes the client's thread (a send),
        # and a cancel sends a frame.
        if arm and client is not None:
            try:
                client.call_later(pool._recheck_delay, giveback.recheck_job(pool))
            except BaseException:  # a signal handler's: not armed after all, so let a later checkin arm it
                with pool._lock:
                    pool._recheck_pending = False
                raise
        for ticket in stale:
            ticket.cancel()
        if kept:
            return
        pool._close_then_open(wrapper, openers, now + pool.config.acquire_timeout, giving=owed)
    except BaseException:
        # Cut short (a signal handler's exception) inside the hand-over, or on
        # the way to the close (at _close_then_open's or _close's first
        # instruction...): out of _all, it must still be closed.
        if to_close:
            pool._close_cut_short(wrapper, openers, giving=owed)
        elif not placed and wrapper.in_use and pool._all.get(wrapper.id) is wrapper:
            pool._discard(wrapper, validation=False)
        raise
