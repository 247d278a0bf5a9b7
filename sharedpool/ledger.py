"""The lease ledger: a pure state machine of grants, waiters, reclaims and fences.

Rules of this module:

* No I/O and no clock: every call takes ``now`` (seconds, monotonic), and
  returns the *effects* the server must carry out — grant this request, deny
  that one, ask that session to give leases back, fence these leases. The
  server turns effects into frames; tests read them directly.
* I1: for every resource, live leases + fenced leases <= ``max_size`` after
  every call, except where a resize or re-registration has pushed it over —
  then nothing is granted until it is back under.
* I2: closing a session removes its waiters and fences its leases; fenced
  leases keep counting against the cap until :meth:`Ledger.unfence` or their
  delay passes, then waiters are served.
* I3: waiters of a resource are served first come, first served (skipping
  only those blocked by their own ``max_per_process``); when the resource is
  at its cap, sessions that hold leases (preferring reported-idle ones) are
  asked to give some back, at checkin once their connection is older than
  the resource's fairness quantum (a number, or with "auto" one quantum for
  every holder from the median hand-off cost the sessions report).

The records it keeps are in :mod:`.records`, the effects it returns in
:mod:`.effects`, and who is asked to give leases back in :mod:`.reclaim`.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import statistics
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from .config import Resource
from .effects import AskReclaim, Denied, Effect, Granted, Notify, Problem, StartFence, StillHeld
from .handoff import MAX_COST, auto_quantum
from .protocol import brief
from .reclaim import rebalance, servable
from .records import (
    NEW,
    STATES,
    WAIT_BUCKETS,
    Fenced,
    Lease,
    ResourceState,
    Session,
    Waiter,
)

#: Connect failures in a row, across all sessions, before waiters are failed fast.
FAILURE_THRESHOLD = 5
#: How long a failing resource denies acquires before letting one try again.
FAILURE_BACKOFF = 1.0
#: Re-registered lease ids and tokens must stay below this, so that the ids
#: granted after them still fit a msgpack integer.
MAX_ID = 1 << 63
#: Re-registered ids stay below this: the ids granted after them (id + 1 onwards)
#: must stay below MAX_ID, or the next restart could not take them back.
MAX_HELD_ID = 1 << 62
#: A call site is kept to this many characters: a peer's megabyte-long site
#: must not make every ``leases`` listing too large for a frame.
MAX_SITE = 4096
#: A session's name is kept to this many characters: one peer's near-1 MB
#: name must not make every ``sessions`` listing too large for a frame.
MAX_NAME = 256
#: Acquires one session may have queued at once (whatever max_waiting says):
#: each queued acquire makes every later one walk the queue, so a single peer
#: queueing tens of thousands would stall the coordinator for seconds.
MAX_SESSION_WAITING = 1024
#: How often a live process that has not re-registered its leases since a
#: restart is looked at again (are they still its, or is it gone?).
ALIVE_RECHECK = 1.0


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


def _site(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_SITE else value[: MAX_SITE - 3] + "..."


def _is_id(value: Any, bound: int = MAX_ID) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def _fence_of(name: str, pid: int, leases: list[Lease], fence: int, terminate: bool = True) -> StartFence:
    """The StartFence of a dead process's ``leases``, with when each backend can
    have started: a reused pid, or one reported wrongly, must not get some
    other connection terminated."""
    started: dict[int, tuple[float | None, float]] = {}
    for lease in leases:
        if lease.backend_pid:
            earliest, latest = lease.opened_after, lease.pid_since
            if lease.backend_pid in started:  # one pid for two leases: one is wrong; both must fit
                was_earliest, was_latest = started[lease.backend_pid]
                if earliest is None or (was_earliest is not None and was_earliest > earliest):
                    earliest = was_earliest
                latest = min(latest, was_latest)
            started[lease.backend_pid] = (earliest, latest)
    return StartFence(name, pid, tuple(x.id for x in leases),
                      tuple(x.backend_pid for x in leases if x.backend_pid), fence,
                      terminate=terminate, started=started)


def _age(value: Any) -> float | None:
    # Under 1e9 s: a hand-written int too big for a float must not stop the start.
    return float(value) if type(value) in (int, float) and 0 <= value < 1e9 else None


def _started_ages(started: Any) -> dict[int, tuple[float | None, float]]:
    """A marker's ``started`` rows (see :meth:`Ledger.started_state`) by lease;
    malformed ones left out (their lease's backend is then bounded only by the restart)."""
    out: dict[int, tuple[float | None, float]] = {}
    for row in started if isinstance(started, list | tuple) else ():
        if isinstance(row, list) and len(row) == 3 and _is_id(row[0]):
            granted, reported = _age(row[1]), _age(row[2])
            if reported is not None and (granted is not None or row[1] is None):
                out[row[0]] = (granted, reported)
    return out


def _restored(lease_id: int, name: str, token: int, backend_pid: Any, now: float,
              ages: dict[int, tuple[float | None, float]]) -> Lease:
    """A lease the previous coordinator handed on: its backend started before
    this restart, and within what that coordinator knew of it (``ages``), if anything."""
    lease = Lease(lease_id, name, 0, token, now,
                  backend_pid=backend_pid if _is_id(backend_pid) else None, pid_since=now)
    if lease.backend_pid and lease_id in ages:
        granted, reported = ages[lease_id]
        lease.opened_after = None if granted is None else now - granted
        lease.pid_since = now - reported
    return lease


class Ledger:
    """Every lease of every resource on one coordinator."""

    def __init__(self, resources: dict[str, Resource], *, id_base: int = 1,
                 hold_until: float | None = None) -> None:
        """``hold_until``: grant nothing before this time. A restarted coordinator
        uses it so that every process still holding leases re-registers them
        before anything new is handed out (I1 across a restart)."""
        self.hold_until = hold_until
        self.resources = {name: ResourceState(name, r) for name, r in resources.items()}
        self.sessions: dict[int, Session] = {}
        self._next_id = id_base
        self._session_ids = itertools.count(1)
        self._deadlines: list[tuple[float, int, Waiter]] = []
        #: (until, seq, resource, fenced) of every fence: the next one to end
        #: without a pass over all fenced leases on every call (a dead process
        #: with thousands of leases made each op cost thousands of steps).
        #: Lifted, taken back or ended entries stay until they reach the top.
        self._fence_ends: list[tuple[float, int, str, Fenced]] = []
        self._fence_ends_max = 64
        self._seq = itertools.count()
        self._fences = itertools.count(1)
        #: fence serial -> (resource, pid): leases live processes held when the
        #: previous coordinator stopped, fenced to their process until it
        #: re-registers them; fenced as a dead session's once the hold has
        #: ended and their process is gone
        self._awaited: dict[int, tuple[str, int]] = {}
        #: fence serials of such leases fenced when the hold ended: their process
        #: may be alive, only late; a clean stop hands that on (``late_state``)
        self._late: set[int] = set()
        #: resource -> quantum() as last computed; dropped when costs, sessions or limits change
        self._quanta: dict[str, float | None] = {}

    def __repr__(self) -> str:
        parts = [
            f"{r.name} {r.leased}/{r.limits.max_size} w{len(r.waiters)}"
            for r in self.resources.values()
        ]
        return f"<Ledger sessions={len(self.sessions)} | {', '.join(parts)}>"

    # ------------------------------------------------------------- sessions

    def open_session(
        self, pid: int, name: str, now: float, *, uid: int | None = None, held: list[Any] = ()  # type: ignore[assignment]
    ) -> tuple[int, list[Effect]]:
        """Register a process. ``held`` re-registers leases it kept across a
        coordinator restart: ``[resource, lease, token, state, backend_pid]``.
        They are accepted even beyond the cap (the connections exist); the cap
        then blocks grants until the resource is back under it. One that cannot
        be (its resource is gone, another process holds its id) is revoked: the
        process is told to close its connection."""
        sid = next(self._session_ids)
        if len(name) > MAX_NAME:
            name = name[: MAX_NAME - 3] + "..."
        session = Session(sid, pid, name, uid, now)
        self.sessions[sid] = session
        try:
            effects = self._register_held(session, held, now)
        except BaseException:
            # Half-registered (an entry that could not even be described): the
            # server never learns this sid, so no one would ever close it.
            self.close_session(sid, now)
            raise
        # Leases handed on from the previous coordinator as this process's that
        # it did not bring back: it no longer has them (closed while no
        # coordinator was up: that release never arrived). Fenced as a dead
        # process's would be: they count until their backends are seen gone.
        for fence, (name, holder) in list(self._awaited.items()):
            if holder == pid:
                del self._awaited[fence]
                effects += self._settle_unclaimed(fence, name, pid, now, running=())
        return sid, effects

    def _register_held(self, session: Session, held: list[Any], now: float) -> list[Effect]:
        sid = session.id
        effects: list[Effect] = []
        touched: set[str] = set()
        for entry in held:
            try:
                resource, lease_id, token, state, backend_pid = entry
            except (TypeError, ValueError):
                effects.append(Problem(sid, "bad_held", f"cannot re-register {brief(entry)}"))
                continue
            res = self.resources.get(resource) if isinstance(resource, str) else None
            if res is None or not _is_id(lease_id, MAX_HELD_ID) or not _is_id(token, MAX_HELD_ID):
                why = f"lease {brief(lease_id)} of {brief(resource)} not re-registered"
                effects += _refused(sid, resource, lease_id, why)
                continue
            lease = self._adopt(res, session, lease_id, token)
            if lease is None:
                if self._find_lease(lease_id):
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
            if _is_id(backend_pid) and backend_pid != lease.backend_pid:
                lease.backend_pid, lease.pid_since = backend_pid, now
            session.add(lease)
            res.peak = max(res.peak, res.leased)
            self._next_id = max(self._next_id, lease_id + 1, lease.token + 1)
            touched.add(res.name)
        # A fenced lease taken back no longer frees a slot, an old session's
        # lease moved here no longer counts there, leases kept across a restart
        # may push the resource over its cap: what is owed has changed.
        for name in touched:
            effects += self._pump(self.resources[name], now)
        return effects

    def _adopt(
        self, res: ResourceState, session: Session, lease_id: int, token: int
    ) -> Lease | None:
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
            owner = None if live is None else self.sessions.get(live.session)
            if live is None or live.token != token or owner is None or owner.pid != session.pid:
                return None
            owner.remove(lease_id)
            lease = live
        lease.session = session.id
        return lease

    def close_session(self, sid: int, now: float) -> list[Effect]:
        """The session ended (clean exit, crash, socket closed): withdraw its
        waiters and fence its leases."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return []
        effects: list[Effect] = []
        # The median moves: askees may need the new quantum. (Costs are kept
        # only for known resources, and resources are never removed.)
        touched = set(session.costs)
        for name in session.costs:
            self._quanta.pop(name, None)
        for res in self.resources.values():
            if sid in res.askees:
                res.askees.discard(sid)
                touched.add(res.name)
        for waiter in session.waiting.values():
            waiter.active = False
            self.resources[waiter.resource].waiters.remove(waiter)
            touched.add(waiter.resource)
        by_resource: dict[str, list[Lease]] = {}
        for lease in session.leases.values():
            by_resource.setdefault(lease.resource, []).append(lease)
        for name, leases in by_resource.items():
            res = self.resources[name]
            limits = res.limits
            delay = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
            fence = next(self._fences)
            for lease in leases:
                del res.live[lease.id]
                if delay > 0:
                    self._fence(res, Fenced(lease, session.pid, now + delay, fence))
            if delay > 0:
                effects.append(_fence_of(name, session.pid, leases, fence))
            touched.add(name)
        for name in touched:
            effects += self._pump(self.resources[name], now)
        return effects

    def fenced_state(self, now: float) -> list[list[Any]]:
        """Every fenced lease of a dead process as plain data, for a clean stop
        to hand to the next coordinator:
        ``[resource, lease, token, pid, seconds_left, backend_pid]``."""
        return [
            [res.name, f.lease.id, f.lease.token, f.pid, max(0.0, f.until - now), f.lease.backend_pid]
            for res in self.resources.values() for f in res.fenced.values() if f.fence not in self._awaited
        ]

    def started_state(self, now: float) -> list[list[Any]]:
        """When the backend of each lease :meth:`held_state` and
        :meth:`fenced_state` name can have started, as ages at ``now``:
        ``[lease, seconds_since_grant or None, seconds_since_pid_reported]``.
        The next coordinator's fence terminates only a backend started within
        them (a pid reused before the restart is someone else's)."""
        leases = [lease for res in self.resources.values()
                  for lease in (*res.live.values(), *(f.lease for f in res.fenced.values()))]
        # To the millisecond (the fence allows a second): the marker is rewritten often.
        return [[x.id, None if x.opened_after is None else round(max(0.0, now - x.opened_after), 3),
                 round(max(0.0, now - x.pid_since), 3)] for x in leases if x.backend_pid]

    def late_state(self) -> list[int]:
        """Lease ids of :meth:`fenced_state` whose process may still be alive
        (handed on as held, never re-registered): terminated only once its pid
        is gone."""
        return [f.lease.id for res in self.resources.values() for f in res.fenced.values()
                if f.fence in self._late]

    def held_state(self) -> list[list[Any]]:
        """Every lease a live process holds, or is still awaited from after the
        previous stop, for a clean stop to hand on: ``[resource, lease, token,
        pid, backend_pid]``. A process that dies before re-registering them with
        the next coordinator may leave a query running; they are fenced then."""
        out: list[list[Any]] = []
        for res in self.resources.values():
            for lease in res.live.values():
                session = self.sessions.get(lease.session)
                if session is not None:
                    out.append([res.name, lease.id, lease.token, session.pid, lease.backend_pid])
            out += [[res.name, f.lease.id, f.lease.token, f.pid, f.lease.backend_pid]
                    for f in res.fenced.values() if f.fence in self._awaited]
        return out

    def restore_held(self, entries: list[Any], now: float, started: Any = ()) -> list[Effect]:
        """What live processes held when the previous coordinator stopped: each
        lease counts, fenced to its process, until that process re-registers it
        (:meth:`_adopt`). One not re-registered when the restart hold ends was a
        process that died meanwhile: its leases are fenced then as a dead
        session's (terminated only once its pid is gone: it may merely be
        late). Nothing is restored outside a hold. ``started``: the previous
        coordinator's :meth:`started_state`, its ages counted to ``now``."""
        if self.hold_until is None:
            return []
        serials: dict[tuple[str, int], int] = {}
        ages = _started_ages(started)
        known = self._lease_ids()
        for entry in entries:
            try:
                name, lease_id, token, pid, backend_pid = entry
            except (TypeError, ValueError):
                continue
            res = self.resources.get(name) if isinstance(name, str) else None
            if (res is None or not _is_id(lease_id) or not _is_id(token) or not isinstance(pid, int)
                    or isinstance(pid, bool) or lease_id in known):
                continue
            known.add(lease_id)
            limits = res.limits
            after = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
            fence = serials.get((name, pid))
            if fence is None:
                fence = serials[(name, pid)] = next(self._fences)
                self._awaited[fence] = (name, pid)
            lease = _restored(lease_id, name, token, backend_pid, now, ages)
            self._fence(res, Fenced(lease, pid, self.hold_until + after, fence))
            res.peak = max(res.peak, res.leased)  # they count: the peak must not read below them
            self._next_id = max(self._next_id, lease_id + 1, token + 1)
        return []

    def restore_fenced(self, entries: list[Any], now: float, late: Any = (),
                       started: Any = ()) -> list[Effect]:
        """Fence again what the previous coordinator had fenced when it stopped
        (its dead processes' backends may still be there): they count against the
        cap until their time is up or a fence check confirms them gone.
        ``started``: as for :meth:`restore_held`."""
        late_ids = {x for x in late if _is_id(x)} if isinstance(late, list | tuple | set) else set()
        ages = _started_ages(started)
        groups: dict[tuple[str, int, bool], list[Lease]] = {}
        serials: dict[tuple[str, int, bool], int] = {}
        known = self._lease_ids()
        for entry in entries:
            try:
                name, lease_id, token, pid, left, backend_pid = entry
            except (TypeError, ValueError):
                continue
            res = self.resources.get(name) if isinstance(name, str) else None
            if (res is None or not _is_id(lease_id) or not _is_id(token) or not isinstance(pid, int)
                    or type(left) not in (int, float) or not left >= 0 or lease_id in known):
                continue
            known.add(lease_id)
            limits = res.limits
            longest = max(limits.fence_timeout, limits.quarantine_delay)
            lease = _restored(lease_id, name, token, backend_pid, now, ages)
            key = (name, pid, lease_id in late_ids)
            if key not in serials:
                serials[key] = next(self._fences)
                if key[2]:
                    self._late.add(serials[key])
            fence = serials[key]
            # min() before float(): an int too big for a float (a hand-written marker).
            self._fence(res, Fenced(lease, pid, now + float(min(left, longest)), fence))
            res.peak = max(res.peak, res.leased)
            self._next_id = max(self._next_id, lease_id + 1, token + 1)
            groups.setdefault(key, []).append(lease)
        return [_fence_of(name, pid, leases, serials[(name, pid, is_late)], terminate=not is_late)
                for (name, pid, is_late), leases in groups.items()]

    # ------------------------------------------------------------- leases

    def acquire(
        self,
        sid: int,
        req: int,
        resource: str,
        now: float,
        timeout: float | None = None,
        site: str | None = None,
    ) -> list[Effect]:
        """Grant at once, queue, or deny. ``timeout`` None: the resource's default;
        0: never queue."""
        session = self.sessions[sid]
        res = self.resources.get(resource)
        if res is None:
            known = ", ".join(sorted(self.resources)) or "none"
            why = f"no resource {brief(resource)} (known: {known})"
            return [Denied(sid, req, "unknown_resource", why)]
        if req in session.waiting:
            return [Problem(sid, "duplicate_request", f"request {req} is already waiting", req)]
        if res.draining:
            res.denials += 1
            return [Denied(sid, req, "draining", f"resource {resource!r} is draining")]
        if res.failing_until is not None:
            if now < res.failing_until:
                res.denials += 1
                why = f"connections to {resource!r} are failing; retry later"
                return [Denied(sid, req, "failing", why)]
            res.failing_until = None  # let this one try: it probes recovery
        if timeout is None:
            timeout = res.limits.acquire_timeout
        elif math.isnan(timeout):  # would never expire, and would stall the deadline heap
            return [Problem(sid, "bad_request", "acquire timeout must be a number, got nan", req)]
        if not res.paused and not self._holding(now) and self._can_grant(res, session) and not any(
            self._can_grant(res, self.sessions[w.session]) for w in res.waiters
        ):  # nobody queued could take the slot: only waiters blocked by max_per_process
            return [self._grant(res, session, req, now, _site(site))]
        if timeout <= 0:
            # A try that never waited is no timeout: a pool below min_size tries
            # once per maintenance round, and at a full cap that counted as one
            # timeout per process per second, for as long as the cap stayed full.
            return [Denied(sid, req, "timeout", self._why_full(res, session, now))]
        if len(session.waiting) >= MAX_SESSION_WAITING:
            res.denials += 1
            why = (f"this process already has {len(session.waiting)} acquires queued "
                   f"(at most {MAX_SESSION_WAITING})")
            return [Denied(sid, req, "too_many_waiters", why)]
        if res.limits.max_waiting is not None:
            # Only acquires that wait for a free slot count: one held back by its
            # own process's max_per_process waits for that process's own leases,
            # and a greedy process queueing many of those must not lock others out.
            # Those are bounded per process instead, by the same number.
            most = res.limits.max_waiting
            ahead, _, per_session = servable(res, self.sessions)
            cap = res.limits.max_per_process
            if cap is None or session.held(resource) + per_session.get(sid, 0) < cap:
                # In a restart's grace everything queues: those the free slots
                # will serve when it ends do not wait for a free lease.
                if self._holding(now):
                    ahead -= res.free  # below 0: a free slot serves this one too
                count, what = ahead, f"acquires already wait for a free lease of {resource!r}"
            else:
                count = sum(1 for w in session.waiting.values() if w.resource == resource)
                what = (f"acquires of {resource!r} from this process already wait behind its "
                        f"max_per_process={cap}")
            if count >= most:
                res.denials += 1
                return [Denied(sid, req, "too_many_waiters", f"{count} {what} (max_waiting={most})")]
        waiter = Waiter(sid, req, resource, now, now + timeout, _site(site))
        res.waiters.append(waiter)
        session.waiting[req] = waiter
        heapq.heappush(self._deadlines, (waiter.deadline, next(self._seq), waiter))
        return self._pump(res, now)

    def cancel(self, sid: int, req: int, now: float) -> list[Effect]:
        """The client stopped waiting. If the grant already went out, the
        client gives it back with a release."""
        session = self.sessions[sid]
        waiter = session.waiting.pop(req, None)
        if waiter is None:
            return []
        waiter.active = False
        res = self.resources[waiter.resource]
        res.waiters.remove(waiter)
        return self._pump(res, now)

    def release(self, sid: int, lease_id: int, now: float) -> list[Effect]:
        session = self.sessions[sid]
        lease = session.remove(lease_id)
        if lease is None:
            return [Problem(sid, "unknown_lease", f"lease {lease_id} is not held by this session")]
        res = self.resources[lease.resource]
        del res.live[lease_id]
        asked = session.asked.get(lease.resource, 0)
        effects: list[Effect] = []
        if asked:
            session.asked[lease.resource] = asked - 1
            res.reclaims += 1
            if asked == 1:
                # All given back: say so. A count sent earlier may have been
                # worked out before some of these releases arrived, and the
                # process would go on owing, closing a connection for nobody.
                effects.append(AskReclaim(sid, lease.resource, 0))
        # A give-back goes past the giver's own waiters: handed straight back
        # to it, it would only be a close and a reconnect in that process (the
        # head, asked because nobody else could give), and it would be asked again.
        return effects + self._pump(res, now, giver=sid if asked else None)

    def report(
        self,
        sid: int,
        states: list[Any],
        now: float,
        failures: dict[str, Any] | None = None,
        ok: list[Any] = (),  # type: ignore[assignment]
        costs: dict[str, Any] | None = None,
    ) -> list[Effect]:
        """Coalesced lease states, connect outcomes and hand-off costs from one session."""
        session = self.sessions[sid]
        session.last_report = now
        effects: list[Effect] = []
        touched: set[str] = set()
        for name, cost in (costs or {}).items():
            if type(cost) not in (int, float) or not 0 <= cost <= MAX_COST:
                # The rest of the report still counts: one bad figure must not
                # blind the ledger to this session's lease states.
                why = f"hand-off cost {brief(cost)} of {brief(name)} is not seconds in [0, {MAX_COST:g}]"
                effects.append(Problem(sid, "bad_report", why))
            elif name in self.resources and session.costs.get(name) != cost:
                session.costs[name] = float(cost)
                self._quanta.pop(name, None)
                touched.add(name)
        for entry in states:
            if not isinstance(entry, list) or len(entry) not in (4, 5):
                why = f"state entry {brief(entry)} is not [lease, state, pid, site, leak?]"
                effects.append(Problem(sid, "bad_report", why))
                break  # the entries after a malformed one are not trusted; the rest of the report is
            lease_id, state, backend_pid, site = entry[:4]
            leak = len(entry) == 5 and entry[4] is True
            lease = session.leases.get(lease_id) if isinstance(lease_id, int) else None
            if lease is None or state not in STATES:
                continue  # a release may have overtaken the report
            if lease.state != state:
                lease.state, lease.state_since = state, now
                touched.add(lease.resource)
            # As hello's held rows: a bool or a pid beyond int64 is no backend (it
            # would be sent to PostgreSQL by the fence, and shown in listings).
            if _is_id(backend_pid) and backend_pid != lease.backend_pid:
                lease.backend_pid, lease.pid_since = backend_pid, now
            lease.site = _site(site)
            lease.suspected_leak = leak
        for name in ok:
            res = self.resources.get(name) if isinstance(name, str) else None
            if res is not None:
                res.fail_streak, res.failing_until = 0, None
        for name, count in (failures or {}).items():
            res = self.resources.get(name)
            if res is None or not isinstance(count, int) or count <= 0:
                continue
            res.fail_streak += count
            if res.fail_streak >= FAILURE_THRESHOLD and res.failing_until is None:
                res.failing_until = now + FAILURE_BACKOFF
                for waiter in list(res.waiters):
                    effects.append(self._drop_waiter(res, waiter, "failing",
                                                     f"connections to {name!r} are failing"))
                touched.add(name)  # the waiters are gone: withdraw what was asked for them
        for name in touched:
            effects += self._rebalance(self.resources[name])
        return effects

    def unfence(
        self, resource: str, lease_ids: list[int] | tuple[int, ...], now: float,
        fence: int | None = None,
    ) -> list[Effect]:
        """The resource confirmed a dead session's connections are gone.
        ``fence``: the StartFence's, so that the check of an earlier fence of a
        lease (taken back by a reconnect, fenced again since) does not end the
        later one."""
        res = self.resources.get(resource)
        if res is None:
            return []
        for lease_id in lease_ids:
            fenced = res.fenced.get(lease_id)
            if fenced is not None and (fence is None or fenced.fence == fence):
                del res.fenced[lease_id]
        return self._pump(res, now)

    def awaited_pids(self) -> set[int]:
        """The processes whose leases were handed on from the previous
        coordinator and are not re-registered yet: :meth:`tick` wants to
        know which of them still run."""
        return {pid for _, pid in self._awaited.values()}

    def tick(self, now: float, running: Collection[int] = ()) -> list[Effect]:
        """Time passed: expire waiters and fences that are due. ``running``:
        of the :meth:`awaited_pids`, those whose process still runs (as time,
        passed in: the server looks; none named are taken as gone)."""
        effects: list[Effect] = []
        touched: set[str] = set()
        # Waiters first, while the hold is still known: one whose time ran out
        # in a restart's hold is told so, not that every lease is held.
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, waiter = heapq.heappop(self._deadlines)
            if not waiter.active:
                continue
            res = self.resources[waiter.resource]
            res.timeouts += 1
            why = self._why_full(res, None, waiter.deadline)
            effects.append(self._drop_waiter(res, waiter, "timeout", why))
            touched.add(res.name)
        if self.hold_until is not None and now >= self.hold_until:
            self.hold_until = None  # re-registration window over: serve the queues
            touched.update(self.resources)
            awaited, self._awaited = self._awaited, {}
            for fence, (name, pid) in awaited.items():
                effects += self._settle_unclaimed(fence, name, pid, now, running, first=True)
        ends = self._fence_ends
        while ends and ends[0][0] <= now:
            entry = heapq.heappop(ends)
            if not self._fence_current(entry):
                continue
            fenced = entry[3]
            if fenced.fence in self._awaited and self.hold_until is None:
                # A live holder's, after the hold: look again. Fenced afresh
                # either way (a fence with no delay ends in this same loop).
                name, pid = self._awaited.pop(fenced.fence)
                effects += self._settle_unclaimed(fenced.fence, name, pid, now, running)
                continue
            del self.resources[entry[2]].fenced[fenced.lease.id]
            touched.add(entry[2])
        for name in touched:
            effects += self._pump(self.resources[name], now)
        return effects

    def _settle_unclaimed(self, fence: int, name: str, pid: int, now: float,
                          running: Collection[int], first: bool = False) -> list[Effect]:
        """Leases handed on as held that their process has not re-registered,
        the hold being over. Its process gone, they are a dead process's (its
        backends may still be busy): fenced as such. Still running (stopped,
        frozen, a gevent hub blocked past the hold), it still has their
        connections: freed, they would put the resource over its cap (I1).
        They stay counted for it, looked at again every ALIVE_RECHECK seconds,
        until it re-registers them or exits. A process that said it does not
        have them (a hello without them) is passed as not running: fenced at once."""
        res = self.resources[name]
        left = [f for f in res.fenced.values() if f.fence == fence]
        if not left:
            return []  # all re-registered
        if pid in running:
            self._awaited[fence] = (name, pid)
            for f in left:
                self._fence(res, Fenced(f.lease, pid, now + ALIVE_RECHECK, fence))
            return [StillHeld(name, pid, len(left))] if first else []
        limits = res.limits
        after = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
        if not first:  # their time as a dead process's fence starts now
            for f in left:
                self._fence(res, Fenced(f.lease, pid, now + after, fence))
        self._late.add(fence)
        return [_fence_of(name, pid, [f.lease for f in left], fence, terminate=False)]

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do."""
        while self._deadlines and not self._deadlines[0][2].active:
            heapq.heappop(self._deadlines)
        if len(self._deadlines) > 64:
            # Granted, cancelled and dropped waiters stay in the heap until
            # their deadline reaches the top; behind one long-lived waiter that
            # is never, and each holds its site string. Rebuild once most are dead.
            active = sum(len(r.waiters) for r in self.resources.values())
            if len(self._deadlines) > 2 * active + 64:
                self._deadlines = [e for e in self._deadlines if e[2].active]
                heapq.heapify(self._deadlines)
        ends = self._fence_ends
        while ends and not self._fence_current(ends[0]):
            heapq.heappop(ends)
        if len(ends) > self._fence_ends_max:
            # As for the waiters: fences lifted early (the monitor saw the
            # backends go) would stay for their whole fence_timeout. Looked
            # at once the heap has doubled, not by counting on every call.
            self._fence_ends = ends = [e for e in ends if self._fence_current(e)]
            heapq.heapify(ends)
            self._fence_ends_max = 2 * len(ends) + 64
        times = [self._deadlines[0][0]] if self._deadlines else []
        if self.hold_until is not None:
            times.append(self.hold_until)
        if ends:
            times.append(ends[0][0])
        return min(times) if times else None

    # ------------------------------------------------------------- admin

    def pause(self, resource: str) -> list[Effect]:
        res = self._res(resource)
        res.paused = True
        # Nothing is granted while paused: holders asked to give back for the
        # waiters are withdrawn (only an excess over the cap is still asked for).
        return self._notify_holders(res, "pause") + self._rebalance(res)

    def resume(self, resource: str, now: float) -> list[Effect]:
        res = self._res(resource)
        res.paused = res.draining = False
        return self._notify_holders(res, "resume") + self._pump(res, now)

    def drain(self, resource: str) -> list[Effect]:
        """No new grants; waiters are denied; every pool closes its connections."""
        res = self._res(resource)
        res.draining = True
        effects: list[Effect] = [
            self._drop_waiter(res, w, "draining", f"resource {resource!r} is draining")
            for w in list(res.waiters)
        ]
        return effects + self._notify_holders(res, "drain") + self._rebalance(res)

    def resize(self, resource: str, max_size: int, now: float) -> list[Effect]:
        """Change the cap live; shrinking asks holders to give back the excess."""
        res = self._res(resource)
        res.limits = replace(res.limits, max_size=max_size)
        return self._notify_holders(res, "resize", {"max_size": max_size}) + self._pump(res, now)

    def set_limits(self, resource: str, limits: Resource, now: float) -> list[Effect]:
        """Add a resource or replace its limits (config reload)."""
        res = self.resources.get(resource)
        if res is None:
            self.resources[resource] = ResourceState(resource, limits)
            return []
        res.limits = limits
        self._quanta.pop(resource, None)
        return self._pump(res, now)

    def end_session(self, pid: int) -> list[Effect]:
        """Tell every session of ``pid`` to close its connections and let go."""
        return [Notify(s.id, "end_session", None) for s in self.sessions.values() if s.pid == pid]

    # ------------------------------------------------------------- inspection

    def snapshot_resources(self, now: float, names: set[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``inspect resources``; ``names``: only those resources."""
        # Inside a restart's grace nothing is granted: seconds left of it, else None.
        hold = round(self.hold_until - now, 3) if self._holding(now) and self.hold_until else None
        return [{**res.snapshot(now, self.quantum(res.name)), "restart_hold_s": hold}
                for res in self.resources.values() if names is None or res.name in names]

    def snapshot_sessions(self, now: float) -> list[dict[str, Any]]:
        return [s.snapshot(now) for s in self.sessions.values()]

    def snapshot_leases(
        self, now: float, resource: str | None = None, pid: int | None = None
    ) -> list[dict[str, Any]]:
        return [
            lease.snapshot(now, s.pid)
            for s in self.sessions.values() if pid is None or s.pid == pid
            for lease in s.leases.values() if resource is None or lease.resource == resource
        ]

    # ------------------------------------------------------------- internals

    def _res(self, name: str) -> ResourceState:
        res = self.resources.get(name)
        if res is None:
            raise KeyError(name)
        return res

    def _fence(self, res: ResourceState, fenced: Fenced) -> None:
        res.fenced[fenced.lease.id] = fenced
        heapq.heappush(self._fence_ends, (fenced.until, next(self._seq), res.name, fenced))

    def _fence_current(self, entry: tuple[float, int, str, Fenced]) -> bool:
        """Whether a :attr:`_fence_ends` entry is still a fence in force."""
        fenced = entry[3]
        return self.resources[entry[2]].fenced.get(fenced.lease.id) is fenced

    def _lease_ids(self) -> set[int]:
        """Every lease id in the ledger, live or fenced: one pass for a restore of
        thousands of entries, not a search of every resource for each of them."""
        return {lid for res in self.resources.values() for ids in (res.live, res.fenced) for lid in ids}

    def _find_lease(self, lease_id: int) -> Lease | None:
        for res in self.resources.values():
            if lease_id in res.live:
                return res.live[lease_id]
            if lease_id in res.fenced:
                return res.fenced[lease_id].lease
        return None

    def _holding(self, now: float) -> bool:
        return self.hold_until is not None and now < self.hold_until

    def _can_grant(self, res: ResourceState, session: Session) -> bool:
        if res.leased >= res.limits.max_size:
            return False
        cap = res.limits.max_per_process
        return cap is None or session.held(res.name) < cap

    def _why_full(self, res: ResourceState, session: Session | None, now: float | None = None) -> str:
        if now is not None and self._holding(now):
            return "the coordinator restarted; it grants nothing until processes re-register their leases"
        if res.paused:
            return f"resource {res.name!r} is paused"
        cap = res.limits.max_per_process
        if session is not None and cap is not None and session.held(res.name) >= cap:
            return f"this process holds max_per_process={cap} leases of {res.name!r}"
        return f"all {res.limits.max_size} leases of {res.name!r} are held"

    def _grant(
        self, res: ResourceState, session: Session, req: int, now: float, site: str | None,
        waited: float = 0.0,
    ) -> Granted:
        lease_id = self._next_id
        self._next_id += 1
        lease = Lease(lease_id, res.name, session.id, lease_id, now, NEW, now, None, site,
                      opened_after=now)
        session.add(lease)
        res.live[lease_id] = lease
        res.grants += 1
        res.peak = max(res.peak, res.leased)
        res.wait_counts[bisect.bisect_left(WAIT_BUCKETS, waited)] += 1
        res.wait_sum += waited
        return Granted(session.id, req, lease)

    def _drop_waiter(self, res: ResourceState, waiter: Waiter, reason: str, message: str) -> Denied:
        if reason != "timeout":  # refused while queued (drain, failing): a denial, as at acquire
            res.denials += 1
        waiter.active = False
        res.waiters.remove(waiter)
        del self.sessions[waiter.session].waiting[waiter.req]
        return Denied(waiter.session, waiter.req, reason, message)

    def _pump(self, res: ResourceState, now: float, giver: int | None = None) -> list[Effect]:
        """Serve waiters in order while there is room, then rebalance reclaims.
        ``giver``: the session that gave a lease back; the first grant skips its
        own waiters unless nobody else can take it."""
        effects: list[Effect] = []
        if not res.paused and not self._holding(now):
            blocked: set[int] = set()
            while res.waiters and res.leased < res.limits.max_size:
                waiter = next((w for w in res.waiters
                               if w.session not in blocked and w.session != giver), None)
                if waiter is None:
                    if giver is None:
                        break
                    giver = None  # nobody else can take it: its own waiter may
                    continue
                session = self.sessions[waiter.session]
                if not self._can_grant(res, session):
                    blocked.add(session.id)
                    continue
                res.waiters.remove(waiter)
                waiter.active = False
                del session.waiting[waiter.req]
                effects.append(
                    self._grant(res, session, waiter.req, now, waiter.site, now - waiter.since))
                giver = None  # only the slot given back passes the giver by
        return effects + self._rebalance(res)

    def quantum(self, resource: str) -> float | None:
        """The fairness quantum holders of ``resource`` are asked to keep to: the
        configured number, or for "auto" the one implied by the median of the
        hand-off costs sessions report (None while none has reported). One
        figure for every holder, so that turns are of equal length."""
        if resource in self._quanta:
            return self._quanta[resource]
        setting = self.resources[resource].limits.fairness_quantum
        quantum: float | None
        if not isinstance(setting, str):
            quantum = float(setting)
        elif costs := [s.costs[resource] for s in self.sessions.values() if resource in s.costs]:
            quantum = auto_quantum(statistics.median(costs))
        else:
            quantum = None
        self._quanta[resource] = quantum
        return quantum

    def _rebalance(self, res: ResourceState) -> list[Effect]:
        # While a restart's hold lasts nothing can be granted: as when paused,
        # holders are not asked to give back for waiters (only any excess).
        return rebalance(res, self.sessions, lambda: self.quantum(res.name),
                         holding=self.hold_until is not None)

    def _notify_holders(
        self, res: ResourceState, verb: str, args: dict[str, Any] | None = None
    ) -> list[Effect]:
        return [Notify(s.id, verb, res.name, dict(args or {})) for s in self.sessions.values()]
