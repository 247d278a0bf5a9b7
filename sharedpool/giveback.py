"""What the coordinator asks of a local pool, run on the client's thread: give
idle leases back (a reclaim, and the later look at a lease still owed after
its checkin), close the connection of a revoked lease, and obey an admin push
(drain, resume, end_session). Also what the client reports of the pool's
leases. Each decides under the pool's lock and closes outside it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .handoff import AUTO_MAX
from .wrapper import ConnectionWrapper

if TYPE_CHECKING:
    from .client import Client
    from .pool import ConnectionPool

log = logging.getLogger("sharedpool.pool")

#: A young lease owed to the coordinator and checked in stays this long; if
#: it is still idle then (nobody here wanted it again), it is given back. While
#: it keeps being used, the look is repeated at doubling intervals (bounded by
#: the fairness quantum, after which it goes at checkin anyway): a busy holder
#: pays a handful of wake-ups per quantum, not one per 10 ms.
IDLE_GIVE_BACK = 0.01

#: ... and one younger than this share of the fairness quantum (10 hand-off
#: times under the auto quantum's 120) stays even when idle, until it is that
#: old: each move costs a close and a connect, and without a floor two bursty
#: processes at the cap moved the slot at every idle gap of 10 ms or more
#: (cap 1, 5 ms bursts every 25 ms: 58 reconnects/s, 58 queries/s; with it
#: 9 reconnects/s, 731 queries/s; a waiter waits up to a turn more).
MIN_TURN_SHARE = 1 / 12


def min_turn(quantum: float) -> float:
    """How old a lease owed back must be before it goes for sitting idle: a
    share of the quantum, at most that of the auto quantum's ceiling (83 ms): a
    long quantum set by hand (30 s) is for busy holders, and must not keep an
    idle slot 2.5 s from a waiter. A quantum of 0 protects nothing."""
    return min(quantum, AUTO_MAX) * MIN_TURN_SHARE


def reclaim_idle(pool: ConnectionPool[Any]) -> int:
    """Background thread: the coordinator wants leases back; give idle ones
    now. Returns how many were given back."""
    return _give_idle(pool)[0]


def _give_idle(pool: ConnectionPool[Any]) -> tuple[int, bool]:
    """reclaim_idle, and whether it passed over an idle connection as too
    young for its turn to be over (a look is armed for then)."""
    client = pool._client
    if client is None:
        return 0, False
    victims: list[ConnectionWrapper[Any]] = []
    now = time.monotonic()
    arm = False
    delay = IDLE_GIVE_BACK
    with pool._lock:
        if pool._recheck_round != (asked := client.owed_round(pool.resource)):
            # A new round of asking: a look armed (and a delay doubled) in the
            # last one, up to a quantum away, must not hold this round's idle
            # lease that long while a waiter elsewhere waits (0.3-1.9 s, not 10 ms).
            pool._recheck_round, pool._recheck_pending, pool._recheck_delay = asked, False, IDLE_GIVE_BACK
        if pool._recheck_pending:  # a reclaim also brings a quantum that moved
            pool._armed_quantum = pool._quantum(client)
        turn = min_turn(pool._quantum(client))
        young = 0.0  # the soonest a connection passed over as too young is old enough
        in_turn = False
        for wrapper in list(pool._idle):  # the coldest first
            if not client.owed_left(pool.resource):  # given back, by this pool or another
                break
            if now - wrapper.last_used < IDLE_GIVE_BACK:
                # Checked in a moment ago: in a busy loop it is out again
                # in microseconds, and taking it would cut its turn short.
                # Look again once it has sat idle for a while.
                young = min(young or IDLE_GIVE_BACK, IDLE_GIVE_BACK)
                break
            if (left := turn - (now - wrapper.created_at)) > 0:
                # Young: its turn is not over, though it is idle between bursts.
                young, in_turn = min(young or left, left), True
                continue
            # A fallback connection frees no lease; each victim claims one owed
            # lease, which no other pool of this process gives back then.
            if wrapper.lease is not None and client.take_owed(wrapper.lease):
                pool._idle.remove(wrapper)
                del pool._all[wrapper.id]
                pool._closing += 1
                victims.append(wrapper)
        if young and client.owed_left(pool.resource):  # look again once it sat idle / is old enough
            arm = not pool._recheck_pending
            if arm:
                pool._recheck_pending, pool._armed_quantum = True, pool._quantum(client)
                delay = max(IDLE_GIVE_BACK, young)
        pool._m["reclaimed"] += len(victims)
        pool._giving += len(victims)
    if arm:
        client.call_later(delay, recheck_job(pool))
    for wrapper in victims:
        pool._close(wrapper, giving=True)
    return len(victims), in_turn


def on_push(pool: ConnectionPool[Any], verb: str, resource: str | None, args: dict[str, Any]) -> None:
    """An admin decision or a revoke the coordinator pushed to this process."""
    if resource not in (None, pool.resource):
        return
    if verb == "revoke":
        revoke(pool, args.get("lease"), args.get("why"))
        return
    if verb == "welcome":  # a new session: a drain it knows nothing of is over; one ordered meanwhile is on
        state = args.get("resources", {}).get(pool.resource)
        if not isinstance(state, dict):
            return
        if pool._drained_by_coordinator and state.get("draining") is False:
            log.warning("pool %r: the coordinator's drain ended with its session; resuming", pool.name)
            pool._drained_by_coordinator = False
            pool.resume()
        elif state.get("draining") is True and pool._active:
            # A drain ordered while we had no session (it was pushed to the others only).
            log.warning("pool %r: the coordinator is draining %r; draining", pool.name, pool.resource)
            pool.drain(timeout=0)
            pool._drained_by_coordinator = True
        return
    # An operator's verb, said in every worker: info, but for the end of this
    # process's pools for good.
    log.log(logging.WARNING if verb == "end_session" else logging.INFO,
            "pool %r: coordinator says %s%s", pool.name, verb, f" {args}" if args else "")
    if verb == "drain":
        was_active = pool._active
        pool.drain(timeout=0)
        if was_active:  # a drain of our own stays ours to end; a repeated push changes nothing
            pool._drained_by_coordinator = True
    elif verb == "resume":
        if pool._drained_by_coordinator:  # a drain of our own stays ours to end
            pool.resume()  # clears the mark
    elif verb == "end_session":
        pool.close(timeout=0)


def revoke(pool: ConnectionPool[Any], lease_id: Any, why: Any) -> None:
    """The coordinator did not take this lease back after a restart: its
    connection counts against no cap now. Closed at once if idle, else at
    its checkin (a connection without a lease goes while the coordinator
    is up, like a fallback one). Nothing is released: the client has
    forgotten the lease, whose id may be another process's by now."""
    with pool._lock:
        found = [w for w in pool._all.values() if w.lease is not None and w.lease.id == lease_id]
        victims = []
        for wrapper in found:
            wrapper.lease = None
            pool._leased -= 1
            pool._left.revoked(wrapper)
            if not wrapper.in_use:
                pool._idle.remove(wrapper)
                del pool._all[wrapper.id]
                pool._closing += 1
                victims.append(wrapper)
    for wrapper in found:
        log.warning("pool %r: coordinator revoked lease %s (%s); connection %s is closed %s",
                    pool.name, lease_id, why, wrapper.id[:8],
                    "now" if wrapper in victims else "when it is checked in")
    for wrapper in victims:
        pool._close(wrapper)


def drop_revoked(pool: ConnectionPool[Any], wrapper: ConnectionWrapper[Any], client: Client | None) -> bool:
    """Under the lock, as a new connection goes into _all: a lease revoked
    while it was connecting (the client forgot it before revoke() could find
    the connection) counts nowhere; treat it as revoked in use (closed at
    checkin). The client forgets the lease before the revoke job runs, so a
    revoke is seen either here or by revoke(). True if it was: the caller
    says so with :func:`warn_revoked`, once out of the lock."""
    lease = wrapper.lease
    if lease is not None and client is not None and lease.id not in client._held:
        wrapper.lease = None
        pool._leased -= 1
        pool._left.revoked(wrapper)
        return True
    return False


def warn_revoked(pool: ConnectionPool[Any], wrapper: ConnectionWrapper[Any]) -> None:
    """Said once out of the lock, for a connection :func:`drop_revoked` caught."""
    log.warning("pool %r: a lease was revoked while connection %s was opening; "
                "closing it at checkin", pool.name, wrapper.id[:8])


def lease_states(pool: ConnectionPool[Any]) -> list[list[Any]]:
    """What the client reports of this pool's leases: id, state, backend pid, site, leak."""
    with pool._lock:
        return [
            [w.lease.id, "busy" if w.in_use else "idle", w.backend_pid, w.site,
             w.in_use and w.warned]
            for w in pool._all.values() if w.lease is not None
        ]


def recheck_job(pool: ConnectionPool[Any]) -> Callable[[], None]:
    """:func:`recheck_owed` as a timer's job, holding ``pool`` weakly: a timer
    armed for up to a fairness quantum must not keep a dropped pool alive."""
    ref = weakref.ref(pool)

    def job() -> None:
        found = ref()
        if found is not None:
            recheck_owed(found)
    return job


def recheck_owed(pool: ConnectionPool[Any]) -> None:
    """A lease still owed after a checkin: give it back if it has sat idle since,
    else look again later, and less often."""
    with pool._lock:
        pool._recheck_pending = False
    gave, in_turn = _give_idle(pool)
    client = pool._client
    with pool._lock:
        if gave or client is None or not client.owes(pool.resource):
            pool._recheck_delay = IDLE_GIVE_BACK
        elif not in_turn:  # (idle in its first turn: not in use, and looked at then)
            # still in use here: look again later, and less often
            pool._recheck_delay = max(IDLE_GIVE_BACK, min(pool._recheck_delay * 2, pool._quantum(client)))
