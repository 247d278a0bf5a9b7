"""Reclaim: which holders of a resource are asked to give leases back, and how
many, so that waiters elsewhere are served (I3). Pure functions over the
ledger's records; :class:`~sharedpool.ledger.Ledger` calls them after every
change that can move what is owed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .effects import AskReclaim, Effect
from .handoff import AUTO_MIN
from .records import IDLE, ResourceState, Session

#: Askees are sent a new quantum when it moves by more than this fraction
#: (costs are moving averages; every small step would be a frame to each).
QUANTUM_STEP = 0.2

#: The quantum of an ask for idle leases only: no busy one is ever old enough
#: to go at its checkin (protocol.Reclaim).
IDLE_ONLY = math.inf


def servable(res: ResourceState, sessions: dict[int, Session]) -> tuple[int, int | None, dict[int, int]]:
    """The waiters a free slot could go to, in queue order: how many, the
    first one's session, and how many per session. A waiter is not
    servable while its session's leases plus its servable waiters ahead
    reach ``max_per_process``."""
    count, head = 0, None
    seen: dict[int, int] = {}
    cap = res.limits.max_per_process
    for w in res.waiters:
        n = seen.get(w.session, 0)
        if cap is None or sessions[w.session].held(res.name) + n < cap:
            count += 1
            seen[w.session] = n + 1
            if head is None:
                head = w.session
    return count, head, seen


def paced(res: ResourceState, sessions: dict[int, Session], quantum: float | None,
          longer: bool = False) -> float | None:
    """The "auto" ``quantum``, shortened so that every servable waiter gets a
    turn within half its timeout: each quantum, about ``max_size`` leases
    change hands, so the n-th waiter in line waits ceil(n / max_size) turns.
    ``longer``: the figure for a queue half a turn longer (see :func:`to_send`).
    Turns of a second (PostgreSQL's auto quantum) and 40 processes at a cap of
    4 made each waiter wait 9.4 s of its 10; with a few more, every acquire at
    the tail timed out while slots moved ahead of it. Never below the auto
    floor (hand-offs would cost more than they serve); a configured number is
    kept as given."""
    if quantum is None or not isinstance(res.limits.fairness_quantum, str) or not res.waiters:
        return quantum
    best = quantum
    seen: dict[int, int] = {}
    cap, size = res.limits.max_per_process, res.limits.max_size
    # Rounded down: at a cap of 1, rounded up, it was a whole turn, and a turn
    # shortened for two waiters never came back, even for a lone one.
    position = size // 2 if longer else 0
    for w in res.waiters:  # in queue order, as servable() counts them
        n = seen.get(w.session, 0)
        if cap is not None and sessions[w.session].held(res.name) + n >= cap:
            continue
        seen[w.session] = n + 1
        position += 1
        turns = -(-position // size)
        best = min(best, (w.deadline - w.since) / (2 * turns))
    return max(min(AUTO_MIN, quantum), best)


def rebalance(
    res: ResourceState, sessions: dict[int, Session], current_quantum: Callable[[bool], float | None],
    holding: bool = False,
) -> list[Effect]:
    """Decide how many leases each holder should give back, and tell those
    whose share changed. Need = servable waiters + excess over the cap,
    less the free slots and the fenced leases that will free up.
    ``current_quantum(longer)``: the fairness quantum now (asked for only
    when needed), ``longer``: paced as for a queue half a turn longer."""
    if not res.waiters and not res.askees and res.leased <= res.limits.max_size and not res.over_per_process:
        return []  # the common case: nobody waits, nobody was asked
    waiting_sessions = {w.session for w in res.waiters}
    takers = 0  # waiters a free slot could go to
    head: int | None = None  # the session the next free slot goes to
    per_session: dict[int, int] = {}
    if not res.paused and not holding:
        takers, head, per_session = servable(res, sessions)
    excess = max(0, res.leased - res.limits.max_size)
    need = max(0, takers - res.free - len(res.fenced)) + excess
    # Waiters held back only by their own process's max_per_process (left out
    # of takers) wait for that process's own leases: another pool of it (two
    # engines, an engine and a psycopg pool) sitting on idle ones kept them
    # while these timed out, with slots free. That process is asked for its
    # idle ones, as the head is for another of its pools.
    blocked: dict[int, int] = {}
    if res.limits.max_per_process is not None and not res.paused and not holding:
        for w in res.waiters:
            blocked[w.session] = blocked.get(w.session, 0) + 1
        blocked = {sid: n - per_session.get(sid, 0) for sid, n in blocked.items()
                   if n > per_session.get(sid, 0)}
    if need == 0 and not res.askees and not blocked and not res.over_per_process:
        # the common case: nothing asked, nothing to ask
        return []
    # Every holder above its floor may be asked, waiting or not: a busy
    # process that also queues for more must not starve one that holds
    # nothing (it gives back at checkin, after the fairness quantum). The
    # head waiter's own session is asked only for leases it reports idle:
    # another of its pools (two engines on one resource) waits while one
    # sits on idle connections, and the give-back comes back to the waiter;
    # a busy lease of its own would only make a round trip. Without waiters
    # (shrinking), everyone is asked.
    # Holders are found from the resource's own leases, not by a pass over
    # every session: hundreds of sessions queued at a small cap made each
    # event cost a pass over all of them, and serving the queue O(n^2).
    held: dict[int, int] = {}
    idle: dict[int, int] = {}
    oldest: dict[int, float] = {}  # session -> when its oldest idle lease was granted
    for lease in res.live.values():
        if lease.session not in sessions:  # never so today; asked below, it must exist
            continue
        held[lease.session] = held.get(lease.session, 0) + 1
        if lease.state == IDLE:
            idle[lease.session] = idle.get(lease.session, 0) + 1
            oldest[lease.session] = min(oldest.get(lease.session, lease.granted_at), lease.granted_at)
    floor = res.limits.min_per_process
    # A process's floor is its own, not a pool's: a lease it gives back under
    # its floor goes to a waiter of its own (Ledger.release), so it may give as
    # many under its floor as it has waiters that take them back: another pool
    # of it waiting beside one that holds the floor idle (an engine and a
    # psycopg pool) was never asked, and timed out. For the need above, only
    # the head's give-backs serve waiters of its own (another session's would
    # come back to it, serving nobody ahead); over the cap, nothing is granted
    # back, and the floor holds.
    own = 0 if excess or head is None else per_session.get(head, 0)
    head_floor = max(0, floor - own)
    holders = [sid for sid, n in held.items()
               if n > (head_floor if sid == head else floor) and (sid != head or excess or idle.get(sid))]
    # Idle leases first (free to give), then sessions not waiting themselves
    # (no churn), then the largest holders, then the oldest idle lease: one
    # younger than its first turn (giveback.min_turn) is kept up to 83 ms, so
    # asking its holder first kept a waiter that long while a slot idle for
    # seconds sat in another process.
    holders.sort(key=lambda sid: (-idle.get(sid, 0), sid in waiting_sessions, -held[sid],
                                  oldest.get(sid, math.inf), sid))
    plan: dict[int, int] = {}
    for sid in holders:
        if need <= 0:
            break
        give = min(need, held[sid] - (head_floor if sid == head else floor))
        if sid == head and not excess:
            give = min(give, idle.get(sid, 0))
        plan[sid] = give
        need -= give
    # Nobody but the head holds what could be given: sparing it would leave
    # the waiters of other sessions behind it until its own acquire times
    # out. One give-back serves its waiter; then the next session is at the
    # head, and it is asked as any holder is.
    if (need > 0 and not plan and head is not None and len(per_session) > 1
            and sessions[head].held(res.name) > res.limits.min_per_process):
        plan[head] = 1
    # Over max_per_process (lowered by a reload, re-registered after a restart):
    # the excess goes at checkin after the quantum, as for waiters; not at once,
    # as over the cap: the global cap holds.
    over = 0
    if res.over_per_process:
        cap = res.limits.max_per_process
        for sid, n in held.items():
            if cap is not None and n > cap:
                over += 1
                plan[sid] = max(plan.get(sid, 0), n - max(cap, floor))
        res.over_per_process = over > 0
    # Asked for these alone, a blocked process gives back idle connections only
    # (IDLE_ONLY): what it reports idle may be a moment old (reports are
    # coalesced), and a busy one given back at its checkin would come straight
    # back to its own waiter: a close and a connect for nothing, at every idle
    # gap of one busy pool with more threads than max_per_process.
    idle_only: set[int] = set()
    # So is the head when the only waiters a free slot could serve are its own
    # (another pool of it, or the asking pool itself): its give-back comes
    # back to it whatever it gives. Asked with the quantum, one pool with more
    # threads than a cap of 2 closed a busy connection at a checkin after each
    # quantum, for its own opener to connect again (0.1 s: 9-16 connects in
    # 3 s instead of 2). A busy sibling gives its slot at checkin by itself
    # (checkin.release_slow, Client.siblings_waiting).
    # And so is a head at or under its floor, whoever waits behind it: each
    # lease it lets go there comes back to its own waiter (Ledger.release's
    # keeper). Asked with the quantum once another process queued, a busy one
    # went at its checkin and was granted straight back.
    if head is not None and plan.get(head) and not excess and (
            per_session.keys() == {head} or held.get(head, 0) <= floor):
        idle_only.add(head)
    for sid, n in blocked.items():
        asked = plan.get(sid, 0)
        # Under its floor as many as its own waiters (these, and the head's) take back.
        low = floor if excess else max(0, floor - n - (own if sid == head else 0))
        extra = min(n, idle.get(sid, 0) - asked, held.get(sid, 0) - low - asked)
        if extra > 0:
            plan[sid] = asked + extra
            if not asked:
                idle_only.add(sid)
    effects: list[Effect] = []
    quantum = res.quantum_sent
    # Over the cap (a resize or reload shrank it, leases re-registered after a
    # restart): what is owed goes at its next checkin, whatever its age. The
    # quantum paces turns between waiters; kept here, a busy connection stayed
    # over the new cap until it was a quantum old (fairness_quantum = 10, a
    # resize from 8 to 2: PostgreSQL at 8 backends for 7.8 s).
    if excess:
        current_quantum = _no_quantum
    moved, new = False, None
    if plan:
        new = to_send(quantum, current_quantum)
        moved = new is not None
        if not moved and quantum == 0 and not excess and (new := current_quantum(False)) != 0:
            # The excess is given back: its "at once" must not pace the waiters'
            # turns, even while no hand-off cost is known yet (then no figure).
            moved = True
    if moved:
        quantum = res.quantum_sent = new
        # Holders asked before the figure was known (or before it moved)
        # hear it again; they keep their count.
        for sid in res.askees & plan.keys():
            if sessions[sid].asked.get(res.name, 0) == plan[sid] and sid not in idle_only:
                effects.append(AskReclaim(sid, res.name, plan[sid], quantum))
    for sid in res.askees | plan.keys():
        s = sessions[sid]
        want = plan.get(sid, 0)
        only = sid in idle_only
        if s.asked.get(res.name, 0) != want or (want and only != (res.name in s.idle_only)):
            s.asked[res.name] = want
            if only:
                s.idle_only.add(res.name)
            else:
                s.idle_only.discard(res.name)
            effects.append(AskReclaim(sid, res.name, want,
                                      None if not want else IDLE_ONLY if only else quantum))
    res.askees = {sid for sid, n in plan.items() if n > 0}
    return effects


def to_send(old: float | None, current: Callable[[bool], float | None]) -> float | None:
    """The quantum askees told ``old`` should now hear, or None to leave them
    be: the current one when it is shorter by more than a fifth; when it is
    longer, the one for a queue half a turn longer (``current(True)``), if that
    is longer by more than a fifth. Paced, the figure follows the queue's
    length: at a turn boundary (cap 8, 2 s timeouts: 8 waiters 1 s, 9 waiters
    0.5 s) every arrival and every grant flipped it, and each flip was a frame
    to every askee (8.5 Reclaim frames an event instead of 1; at a cap of
    100, 100), and each one resets the count its holder owes, even if it
    crossed a give-back. A longer turn now waits for the queue to be half a
    turn shorter."""
    new = current(False)
    if old is None or new is None:
        return new
    if new <= old:
        return new if old - new > QUANTUM_STEP * old else None
    longer = current(True)
    return longer if longer is not None and longer - old > QUANTUM_STEP * old else None


def _no_quantum(longer: bool) -> float:
    """The quantum while a resource is over its cap: none, every give-back is due."""
    return 0.0
