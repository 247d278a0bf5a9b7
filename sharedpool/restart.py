"""A coordinator restart, as the ledger sees it (I4, with I1 across it).

* Hand-on: a stopping coordinator (and the restart marker, kept current while
  serving) writes its leases as plain data: the dead processes' fenced ones
  (:func:`fenced_state`), the live processes' held ones (:func:`held_state`),
  which fences may be a late live process's (:func:`late_state`) and when
  each backend can have started (:func:`started_state`).
* Restore: the next coordinator, inside its restart hold (nothing granted),
  fences the dead ones again (:func:`restore_fenced`) and counts the held
  ones, fenced to their process, as *awaited* (:func:`restore_held`).
* Re-registration: a process's hello brings back what it kept
  (:func:`register_held`): its own leases are moved to its new session,
  others accepted even beyond the cap; what it cannot have is revoked. What
  was awaited from it and it did not bring back is fenced as a dead
  process's, but for the leases of an ended session it brought none of
  (another client's): kept for the grace more (:func:`settle_unbrought`).
* The hold's end: awaited leases not re-registered are fenced as a dead
  process's if it is gone, or kept counted for it while it still runs
  (:func:`settle_unclaimed`; which run is passed in, as the time is).

Pure functions over a :class:`~sharedpool.ledger.Ledger`, which calls them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from .effects import Effect, Notify, Problem, StillHeld, start_fence
from .protocol import brief
from .records import NEW, STATES, Awaited, Fenced, Lease, ResourceState, Session, is_id

if TYPE_CHECKING:
    from .ledger import Ledger

#: Re-registered ids stay below this: the ids granted after them (id + 1 onwards)
#: must stay below MAX_ID, or the next restart could not take them back.
MAX_HELD_ID = 1 << 62
#: How often a live process that has not re-registered its leases since a
#: restart is looked at again (are they still its, or is it gone?).
ALIVE_RECHECK = 1.0
#: How often the leases of a session its process closed without a goodbye are
#: looked at within their bound: a process at exit closes it so too (Python's
#: finalizers close its sockets before the kernel marks it exiting), and its
#: slots came back only at the next ALIVE_RECHECK (~1 s after every such exit).
DROPPED_RECHECK = 0.05
#: Why such leases are awaited (the ``ended`` of their fence, for the log).
DROPPED = "closed by its process without a goodbye"

# ------------------------------------------------------------- hand-on


def fenced_state(ledger: Ledger, now: float) -> list[list[Any]]:
    """See :meth:`Ledger.fenced_state`."""
    return [
        [res.name, f.lease.id, f.lease.token, f.pid, max(0.0, f.until - now), f.lease.backend_pid]
        for res in ledger.resources.values() for f in res.fenced.values() if f.fence not in ledger._awaited
    ]


def started_state(ledger: Ledger, now: float) -> list[list[Any]]:
    """See :meth:`Ledger.started_state`."""
    leases = [lease for res in ledger.resources.values()
              for lease in (*res.live.values(), *(f.lease for f in res.fenced.values()))]
    # To the millisecond (the fence allows a second): the marker is rewritten often.
    return [[x.id, None if x.opened_after is None else round(max(0.0, now - x.opened_after), 3),
             round(max(0.0, now - x.pid_since), 3)] for x in leases if x.backend_pid]


def dropped_state(ledger: Ledger) -> list[int]:
    """See :meth:`Ledger.dropped_state`."""
    return [f.lease.id for res in ledger.resources.values() for f in res.fenced.values()
            if (awaited := ledger._awaited.get(f.fence)) is not None and awaited.until is not None]


def late_state(ledger: Ledger) -> list[int]:
    """See :meth:`Ledger.late_state`."""
    return [f.lease.id for res in ledger.resources.values() for f in res.fenced.values()
            if f.fence in ledger._late]


def held_state(ledger: Ledger) -> list[list[Any]]:
    """See :meth:`Ledger.held_state`."""
    out: list[list[Any]] = []
    for res in ledger.resources.values():
        for lease in res.live.values():
            session = ledger.sessions.get(lease.session)
            if session is not None:
                out.append([res.name, lease.id, lease.token, session.pid, lease.backend_pid])
        out += [[res.name, f.lease.id, f.lease.token, f.pid, f.lease.backend_pid]
                for f in res.fenced.values() if f.fence in ledger._awaited]
    return out

# ------------------------------------------------------------- restore


def restore_held(ledger: Ledger, entries: list[Any], now: float, started: Any = (),
                 dropped: Any = ()) -> list[Effect]:
    """See :meth:`Ledger.restore_held`."""
    if ledger.hold_until is None:
        return []
    dropped_ids = {x for x in dropped if is_id(x)} if isinstance(dropped, list | tuple | set) else set()
    serials: dict[tuple[str, int, bool], int] = {}
    ages = _started_ages(started)
    known = ledger._lease_ids()
    for entry in entries:
        try:
            name, lease_id, token, pid, backend_pid = entry
        except (TypeError, ValueError):
            continue
        res = ledger.resources.get(name) if isinstance(name, str) else None
        if (res is None or not is_id(lease_id) or not is_id(token) or not isinstance(pid, int)
                or isinstance(pid, bool) or lease_id in known):
            continue
        known.add(lease_id)
        limits = res.limits
        after = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
        was_dropped = lease_id in dropped_ids
        fence = serials.get((name, pid, was_dropped))
        if fence is None:
            fence = serials[(name, pid, was_dropped)] = next(ledger._fences)
            # A dropped session's keep their bound: the hold is its process's time to
            # re-register them (else one that exec'd kept its slots while it ran).
            ledger._awaited[fence] = (Awaited(name, pid, DROPPED, ledger.hold_until) if was_dropped
                                      else Awaited(name, pid))
        lease = _restored(lease_id, name, token, backend_pid, now, ages)
        ledger._fence(res, Fenced(lease, pid, ledger.hold_until + after, fence))
        res.peak = max(res.peak, res.leased)  # they count: the peak must not read below them
        ledger._next_id = max(ledger._next_id, lease_id + 1, token + 1)
    return []


def restore_fenced(ledger: Ledger, entries: list[Any], now: float, late: Any = (),
                   started: Any = ()) -> list[Effect]:
    """See :meth:`Ledger.restore_fenced`."""
    late_ids = {x for x in late if is_id(x)} if isinstance(late, list | tuple | set) else set()
    ages = _started_ages(started)
    groups: dict[tuple[str, int, bool], list[Lease]] = {}
    serials: dict[tuple[str, int, bool], int] = {}
    known = ledger._lease_ids()
    for entry in entries:
        try:
            name, lease_id, token, pid, left, backend_pid = entry
        except (TypeError, ValueError):
            continue
        res = ledger.resources.get(name) if isinstance(name, str) else None
        if (res is None or not is_id(lease_id) or not is_id(token) or not isinstance(pid, int)
                or type(left) not in (int, float) or not left >= 0 or lease_id in known):
            continue
        known.add(lease_id)
        limits = res.limits
        longest = max(limits.fence_timeout, limits.quarantine_delay)
        lease = _restored(lease_id, name, token, backend_pid, now, ages)
        key = (name, pid, lease_id in late_ids)
        if key not in serials:
            serials[key] = next(ledger._fences)
            if key[2]:
                ledger._late.add(serials[key])
        fence = serials[key]
        # min() before float(): an int too big for a float (a hand-written marker).
        ledger._fence(res, Fenced(lease, pid, now + float(min(left, longest)), fence))
        res.peak = max(res.peak, res.leased)
        ledger._next_id = max(ledger._next_id, lease_id + 1, token + 1)
        groups.setdefault(key, []).append(lease)
    return [start_fence(name, pid, leases, serials[(name, pid, is_late)], terminate=not is_late)
            for (name, pid, is_late), leases in groups.items()]


def _age(value: Any) -> float | None:
    # Under 1e9 s: a hand-written int too big for a float must not stop the start.
    return float(value) if type(value) in (int, float) and 0 <= value < 1e9 else None


def _started_ages(started: Any) -> dict[int, tuple[float | None, float]]:
    """A marker's ``started`` rows (see :meth:`Ledger.started_state`) by lease;
    malformed ones left out (their lease's backend is then bounded only by the restart)."""
    out: dict[int, tuple[float | None, float]] = {}
    for row in started if isinstance(started, list | tuple) else ():
        if isinstance(row, list) and len(row) == 3 and is_id(row[0]):
            granted, reported = _age(row[1]), _age(row[2])
            if reported is not None and (granted is not None or row[1] is None):
                out[row[0]] = (granted, reported)
    return out


def _restored(lease_id: int, name: str, token: int, backend_pid: Any, now: float,
              ages: dict[int, tuple[float | None, float]]) -> Lease:
    """A lease the previous coordinator handed on: its backend started before
    this restart, and within what that coordinator knew of it (``ages``), if anything."""
    lease = Lease(lease_id, name, 0, token, now,
                  backend_pid=backend_pid if is_id(backend_pid) else None, pid_since=now)
    if lease.backend_pid and lease_id in ages:
        granted, reported = ages[lease_id]
        lease.opened_after = None if granted is None else now - granted
        lease.pid_since = now - reported
    return lease

# ------------------------------------------------------------- re-registration


def register_held(ledger: Ledger, session: Session, held: list[Any], now: float) -> list[Effect]:
    """Re-register the leases ``session``'s process kept (see :meth:`Ledger.open_session`)."""
    sid = session.id
    effects: list[Effect] = []
    touched: set[str] = set()
    for entry in held:
        try:
            resource, lease_id, token, state, backend_pid = entry
        except (TypeError, ValueError):
            effects.append(Problem(sid, "bad_held", f"cannot re-register {brief(entry)}"))
            continue
        res = ledger.resources.get(resource) if isinstance(resource, str) else None
        if res is None or not is_id(lease_id, MAX_HELD_ID) or not is_id(token, MAX_HELD_ID):
            why = f"lease {brief(lease_id)} of {brief(resource)} not re-registered"
            effects += _refused(sid, resource, lease_id, why)
            continue
        lease = _adopt(ledger, res, session, lease_id, token)
        if lease is None:
            if ledger._find_lease(lease_id):
                why = f"lease {lease_id} of {resource!r} is held elsewhere"
                effects += _refused(sid, resource, lease_id, why)
                continue
            # Its connection is older than this, but which backend is its
            # rests on this hello alone (no grant, no predecessor's record):
            # the fence waits for a backend that started before, never ends it.
            lease = Lease(lease_id, resource, sid, token, now, opened_after=now)
            res.live[lease_id] = lease
        lease.state = state if state in STATES else NEW
        lease.state_since = now
        # No pid given: keep what was known (a marker's held row).
        if is_id(backend_pid) and backend_pid != lease.backend_pid:
            lease.backend_pid, lease.pid_since = backend_pid, now
        session.add(lease)
        res.peak = max(res.peak, res.leased)
        ledger._next_id = max(ledger._next_id, lease_id + 1, lease.token + 1)
        touched.add(res.name)
    # A fenced lease taken back no longer frees a slot, an old session's
    # lease moved here no longer counts there, leases kept across a restart
    # may push the resource over its cap: what is owed has changed.
    for name in touched:
        res = ledger.resources[name]
        res.over_per_process = res.limits.max_per_process is not None  # rebalance looks
        effects += ledger._pump(res, now)
    return effects


def _adopt(ledger: Ledger, res: ResourceState, session: Session, lease_id: int, token: int) -> Lease | None:
    """The same process reconnected (its old session was dropped, or has not
    been noticed gone yet) and still holds this lease's connection: move the
    lease to the new session. It never stopped counting against the cap, so
    handing it on after its fence would put one connection too many on the
    resource."""
    fenced = res.fenced.get(lease_id)
    if fenced is not None and fenced.pid == session.pid and fenced.lease.token == token:
        del res.fenced[lease_id]
        lease = fenced.lease
        res.live[lease_id] = lease
    else:
        live = res.live.get(lease_id)
        owner = None if live is None else ledger.sessions.get(live.session)
        if live is None or live.token != token or owner is None or owner.pid != session.pid:
            return None
        owner.remove(lease_id)
        lease = live
    lease.session = session.id
    return lease


def _refused(sid: int, resource: Any, lease_id: Any, why: str) -> list[Effect]:
    """A held lease not re-registered: an error reply and, when the lease can be
    named, a "revoke" push. Its connection counts nowhere now, so the process
    must close it rather than keep using (and re-registering) it."""
    effects: list[Effect] = [Problem(sid, "bad_held", why)]
    # Any id the wire could carry is named: a lease not taken back must be closed,
    # or it is a connection the cap no longer counts.
    if isinstance(lease_id, int) and not isinstance(lease_id, bool) and 0 <= lease_id < 1 << 64:
        name = resource if isinstance(resource, str) else None
        effects.append(Notify(sid, "revoke", name, {"lease": lease_id, "why": why}))
    return effects

# ------------------------------------------------------------- awaited leases


def awaited_origins(ledger: Ledger, pid: int) -> dict[int, int | None]:
    """Lease id -> the session it is awaited from (:attr:`Awaited.session`),
    for every lease awaited as ``pid``'s."""
    mine = {fence: awaited.session for fence, awaited in ledger._awaited.items() if awaited.pid == pid}
    if not mine:
        return {}
    return {lease_id: mine[f.fence] for res in ledger.resources.values()
            for lease_id, f in res.fenced.items() if f.fence in mine}


def settle_unbrought(ledger: Ledger, pid: int, now: float, brought: Collection[int | None] = (),
                     grace: float = 0.0) -> list[Effect]:
    """Leases awaited as ``pid``'s (handed on from the previous coordinator,
    or kept after its session ended) that its hello did not bring back: it
    no longer has them (closed while it had no session: that release never
    arrived). Fenced as a dead process's would be: they count until their
    backends are seen gone. ``brought``: the sessions (:attr:`Awaited.session`)
    the hello brought some leases of. Those of a session it brought none of
    may be another ``Client``'s of the same process (made by hand beside the
    pools' shared one) that has yet to reconnect: they stay counted for at
    most ``grace`` seconds more."""
    effects: list[Effect] = []
    for fence, awaited in list(ledger._awaited.items()):
        if awaited.pid != pid:
            continue
        if awaited.session is None or awaited.session in brought or grace <= 0:
            del ledger._awaited[fence]
            effects += settle_unclaimed(ledger, fence, awaited, now, running=())
        elif awaited.until is None or awaited.until > now + grace:
            bounded = ledger._awaited[fence] = dataclasses.replace(awaited, until=now + grace)
            res = ledger.resources[awaited.resource]
            for f in [f for f in res.fenced.values() if f.fence == fence]:
                ledger._fence(res, Fenced(f.lease, pid, look_again_at(ledger, bounded, now, res), fence))
    return effects


def end_hold(ledger: Ledger, now: float, running: Collection[int]) -> list[Effect]:
    """The restart hold is over: settle every lease still awaited."""
    ledger.hold_until = None
    awaited, ledger._awaited = ledger._awaited, {}
    effects: list[Effect] = []
    for fence, whose in awaited.items():
        effects += settle_unclaimed(ledger, fence, whose, now, running, first=True)
    return effects


def recheck_at(awaited: Awaited, now: float) -> float:
    """When awaited leases are looked at again: in ALIVE_RECHECK; bounded ones
    (a dropped session's) in DROPPED_RECHECK, or at their bound if sooner."""
    if awaited.until is None:
        return now + ALIVE_RECHECK
    return min(now + DROPPED_RECHECK, awaited.until)


def look_again_at(ledger: Ledger, awaited: Awaited, now: float, res: ResourceState) -> float:
    """When awaited leases (of ``res``) are next looked at: :func:`recheck_at`,
    but within a restart's hold not before it ends (it lifts no awaited fence)."""
    at = recheck_at(awaited, now)
    if ledger.hold_until is not None:
        limits = res.limits
        after = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
        at = max(at, ledger.hold_until + after)
    return at


def settle_unclaimed(ledger: Ledger, fence: int, awaited: Awaited, now: float,
                     running: Collection[int], first: bool = False) -> list[Effect]:
    """Awaited leases (``fence``'s) that their process has not re-registered,
    the hold being over. Its process gone, they are a dead process's (its
    backends may still be busy): fenced as such. Still running (stopped,
    frozen, a gevent hub blocked past the hold), it still has their
    connections: freed, they would put the resource over its cap (I1).
    They stay counted for it, looked at again every ALIVE_RECHECK seconds,
    until it re-registers them or exits, or their bound
    (:attr:`Awaited.until`) passes. A process that said it does not have
    them (a hello without them) is passed as not running: fenced at once."""
    name, pid = awaited.resource, awaited.pid
    res = ledger.resources.get(name)
    if res is None:  # removed by a reload, and forgotten: nothing of it is left
        return []
    left = [f for f in res.fenced.values() if f.fence == fence]
    if not left:
        return []  # all re-registered
    if pid in running and (awaited.until is None or now < awaited.until):
        ledger._awaited[fence] = awaited
        for f in left:
            ledger._fence(res, Fenced(f.lease, pid, recheck_at(awaited, now), fence))
        return [StillHeld(name, pid, len(left))] if first else []
    limits = res.limits
    after = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
    if not first:  # their time as a dead process's fence starts now
        for f in left:
            ledger._fence(res, Fenced(f.lease, pid, now + after, fence))
    ledger._late.add(fence)
    return [start_fence(name, pid, [f.lease for f in left], fence, terminate=False, ended=awaited.ended)]
