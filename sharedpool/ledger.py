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
  every holder from the median hand-off cost the sessions report, shortened
  while the queue is too long for its tail to be served within half its timeout).

Everything that decides a grant, a denial, a reclaim or a fence is in this
module or one of its parts, each pure and called only from here:

* :mod:`.records` — what it keeps (leases, waiters, sessions, fenced leases,
  resources) and the bounds of what a peer may put in them;
* :mod:`.effects` — what it returns for the server to carry out;
* :mod:`.reclaim` — who is asked to give leases back, and how many (I3);
* :mod:`.reports` — what a session's report changes (lease states, backend
  pids, hand-off costs, the failing back-off);
* :mod:`.restart` — a coordinator restart: the hand-on to the next one, its
  restore, re-registration of kept leases, the hold's end (I4);
* :mod:`.deadlines` — when :meth:`Ledger.tick` next has a waiter or a fence to end.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from . import reports, restart
from .config import Resource
from .deadlines import Deadlines
from .effects import AskReclaim, Denied, Effect, Granted, Notify, Problem, start_fence
from .handoff import auto_quantum
from .protocol import brief
from .reclaim import paced, rebalance, servable
from .records import (
    NEW,
    WAIT_BUCKETS,
    Awaited,
    Fenced,
    Lease,
    ResourceState,
    Session,
    Waiter,
    clip_site,
)

#: A session's name is kept to this many characters: one peer's near-1 MB
#: name must not make every ``sessions`` listing too large for a frame.
MAX_NAME = 256


def removed_why(resource: str) -> str:
    """Why an acquire of a resource a reload removed is refused."""
    return (f"resource {resource!r} was removed from the configuration by a reload: no new "
            "leases (those held stay valid until released)")


#: Acquires one session may have queued at once (whatever max_waiting says):
#: each queued acquire makes every later one walk the queue, so a single peer
#: queueing tens of thousands would stall the coordinator for seconds.
MAX_SESSION_WAITING = 1024


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
        self._deadlines = Deadlines()
        self._fences = itertools.count(1)
        #: fence serial -> whose: leases live processes held when the previous
        #: coordinator stopped (or when their session ended, close_session),
        #: fenced to their process until it re-registers them; fenced as a dead
        #: session's once the hold has ended and their process is gone
        self._awaited: dict[int, Awaited] = {}
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
        self, pid: int, name: str, now: float, *, uid: int | None = None, held: list[Any] = (),  # type: ignore[assignment]
        grace: float = 0.0,
    ) -> tuple[int, list[Effect]]:
        """Register a process. ``held`` re-registers leases it kept across a
        coordinator restart: ``[resource, lease, token, state, backend_pid]``.
        They are accepted even beyond the cap (the connections exist); the cap
        then blocks grants until the resource is back under it. One that cannot
        be (its resource is gone, another process holds its id) is revoked: the
        process is told to close its connection. ``grace``: how long leases
        awaited from another session of this process, none of which this hello
        brought, stay counted (see :func:`.restart.settle_unbrought`)."""
        sid = next(self._session_ids)
        if len(name) > MAX_NAME:
            name = name[: MAX_NAME - 3] + "..."
        session = Session(sid, pid, name, uid, now)
        self.sessions[sid] = session
        origins = restart.awaited_origins(self, pid)
        try:
            effects = restart.register_held(self, session, held, now)
        except BaseException:
            # Half-registered (an entry that could not even be described): the
            # server never learns this sid, so no one would ever close it.
            self.close_session(sid, now)
            raise
        brought = {origins[lease] for lease in session.leases if lease in origins}
        # What was awaited from this process and it did not bring back, it no longer has.
        return sid, effects + restart.settle_unbrought(self, pid, now, brought, grace)

    def close_session(self, sid: int, now: float, ended: str | None = None,
                      grace: float | None = None) -> list[Effect]:
        """The session ended (clean exit, crash, socket closed): withdraw its
        waiters and fence its leases. ``ended``: why it ended while its
        process still runs (the coordinator ended it: a bad frame, not
        reading, a timeout; or its process dropped it to reconnect): that
        process still has the connections, so its leases stay counted for
        it, as a live holder's after a restart, until it re-registers them,
        connects without them, or exits (then fenced as a dead one's).
        ``grace``: for at most this many seconds (None: as long as it runs)."""
        session = self.sessions.pop(sid, None)
        if session is None:
            return []
        effects: list[Effect] = []
        # The median moves: askees may need the new quantum. (Costs are kept
        # only for known resources; a removed one's are dropped when it is forgotten.)
        touched = set(session.costs)
        for name in session.costs:
            self._quanta.pop(name, None)
        for res in self.resources.values():
            res.fail_sessions.discard(sid)
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
            if ended is not None:
                # Freed after a delay (or a fence_action="terminate" on them),
                # PostgreSQL would count them and their successors (I1).
                awaited = self._awaited[fence] = Awaited(name, session.pid, ended,
                                                         None if grace is None else now + grace, sid)
                until = restart.look_again_at(self, awaited, now, res)
                for lease in leases:
                    del res.live[lease.id]
                    self._fence(res, Fenced(lease, session.pid, until, fence))
                touched.add(name)
                continue
            for lease in leases:
                del res.live[lease.id]
                if delay > 0:
                    self._fence(res, Fenced(lease, session.pid, now + delay, fence))
            if delay > 0:
                effects.append(start_fence(name, session.pid, leases, fence))
            touched.add(name)
        for name in touched:
            effects += self._pump(self.resources[name], now)
        return effects

    # ------------------------------------------------------------- restart (see .restart)

    def fenced_state(self, now: float) -> list[list[Any]]:
        """Every fenced lease of a dead process as plain data, for a clean stop
        to hand to the next coordinator:
        ``[resource, lease, token, pid, seconds_left, backend_pid]``."""
        return restart.fenced_state(self, now)

    def started_state(self, now: float) -> list[list[Any]]:
        """When the backend of each lease :meth:`held_state` and
        :meth:`fenced_state` name can have started, as ages at ``now``:
        ``[lease, seconds_since_grant or None, seconds_since_pid_reported]``.
        The next coordinator's fence terminates only a backend started within
        them (a pid reused before the restart is someone else's)."""
        return restart.started_state(self, now)

    def dropped_state(self) -> list[int]:
        """Lease ids of :meth:`held_state` awaited from a session their process
        dropped (kept for a bounded time only, see :meth:`close_session`)."""
        return restart.dropped_state(self)

    def late_state(self) -> list[int]:
        """Lease ids of :meth:`fenced_state` whose process may still be alive
        (handed on as held, never re-registered): terminated only once its pid
        is gone."""
        return restart.late_state(self)

    def held_state(self) -> list[list[Any]]:
        """Every lease a live process holds, or is still awaited from after the
        previous stop, for a clean stop to hand on: ``[resource, lease, token,
        pid, backend_pid]``. A process that dies before re-registering them with
        the next coordinator may leave a query running; they are fenced then."""
        return restart.held_state(self)

    def restore_held(self, entries: list[Any], now: float, started: Any = (),
                     dropped: Any = ()) -> list[Effect]:
        """What live processes held when the previous coordinator stopped: each
        lease counts, fenced to its process, until that process re-registers it
        (:func:`.restart.register_held`). One not re-registered when the restart hold ends was a
        process that died meanwhile: its leases are fenced then as a dead
        session's (terminated only once its pid is gone: it may merely be
        late). Nothing is restored outside a hold. ``started``: the previous
        coordinator's :meth:`started_state`, its ages counted to ``now``.
        ``dropped``: its :meth:`dropped_state`: those are fenced at the hold's
        end even if their process still runs."""
        return restart.restore_held(self, entries, now, started, dropped)

    def restore_fenced(self, entries: list[Any], now: float, late: Any = (),
                       started: Any = ()) -> list[Effect]:
        """Fence again what the previous coordinator had fenced when it stopped
        (its dead processes' backends may still be there): they count against the
        cap until their time is up or a fence check confirms them gone.
        ``started``: as for :meth:`restore_held`."""
        return restart.restore_fenced(self, entries, now, late, started)

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
        if session.top_req is None or req > session.top_req:
            session.top_req = req
        res = self.resources.get(resource)
        if res is None:
            return [Denied(sid, req, "unknown_resource", self.no_such_resource(resource, removed=False))]
        if res.removed:
            res.denials += 1
            return [Denied(sid, req, "unknown_resource", removed_why(resource))]
        if req in session.waiting:
            return [Problem(sid, "duplicate_request", f"request {req} is already waiting", req)]
        if res.draining:
            res.denials += 1
            return [Denied(sid, req, "draining", f"resource {resource!r} is draining")]
        if res.failing_until is not None and sid in res.fail_sessions:
            # Only a process whose own connects failed in the streak: one that
            # has not tried may connect (a misconfigured worker's failures are
            # not the others'); in an outage its first connect fails too.
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
            return [self._grant(res, session, req, now, clip_site(site))]
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
        waiter = Waiter(sid, req, resource, now, now + timeout, clip_site(site))
        res.waiters.append(waiter)
        session.waiting[req] = waiter
        self._deadlines.add_waiter(waiter)
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

    def retime(self, sid: int, req: int, timeout: float, now: float) -> list[Effect]:
        """Move a queued acquire's deadline to ``now + timeout``; it keeps its
        place in line (a pool carrying its request on for its next waiter
        would otherwise go to the back, behind every process queued since).
        One no longer queued was answered or cancelled as the retime came:
        ignored. One of a req this session never sent ends it (I5)."""
        session = self.sessions[sid]
        waiter = session.waiting.get(req)
        if waiter is None:
            if session.top_req is not None and req <= session.top_req:
                return []
            return [Problem(sid, "unknown_request",
                            f"retime of request {brief(req)}, which this session never sent", req,
                            fatal=True)]
        if not timeout >= 0:  # the protocol refuses these; a direct caller too
            return [Problem(sid, "bad_request",
                            f"retime timeout must be a number >= 0, got {brief(timeout)}", req,
                            fatal=True)]
        waiter.deadline = now + timeout
        # Its earlier heap entry stays, and is skipped: it no longer matches.
        self._deadlines.add_waiter(waiter)
        # The queue's deadlines pace the fairness quantum (reclaim.paced).
        return self._rebalance(self.resources[waiter.resource])

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
        # But one that leaves the giver under its min_per_process floor goes to
        # a waiter of its own if it has one: the floor is the process's, not a
        # pool's. Another pool of the process waiting for the resource takes it
        # (an idle connection of one pool given up for another's acquire, see
        # reclaim.rebalance), and no other process takes it from under the floor.
        keeper = sid if session.held(lease.resource) < res.limits.min_per_process else None
        return effects + self._pump(res, now, giver=sid if asked else None, keeper=keeper)

    def report(
        self,
        sid: int,
        states: list[Any],
        now: float,
        failures: dict[str, Any] | None = None,
        ok: list[Any] = (),  # type: ignore[assignment]
        costs: dict[str, Any] | None = None,
    ) -> list[Effect]:
        """Coalesced lease states, connect outcomes and hand-off costs from one session
        (see :mod:`.reports`)."""
        return reports.apply(self, sid, states, now, failures, ok, costs)

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

    def no_such_resource(self, name: Any, removed: bool = True) -> str:
        """What a request naming ``name``, no resource here, is told: the names
        there are. A removed one, its leases still out, is marked so, or with
        ``removed`` False left out (an acquire: nothing grants it any more)."""
        known = ", ".join(n + (" (removed by a reload)" if res.removed else "")
                          for n, res in sorted(self.resources.items()) if removed or not res.removed)
        return f"no resource {brief(name)} (known: {known or 'none'})"

    def awaited_pids(self) -> set[int]:
        """The processes whose leases are awaited (handed on from the previous
        coordinator, or kept after their session ended) and not re-registered
        yet: :meth:`tick` wants to know which of them still run."""
        return {awaited.pid for awaited in self._awaited.values()}

    def tick(self, now: float, running: Collection[int] = ()) -> list[Effect]:
        """Time passed: expire waiters and fences that are due. ``running``:
        of the :meth:`awaited_pids`, those whose process still runs (as time,
        passed in: the server looks; none named are taken as gone)."""
        effects: list[Effect] = []
        touched: set[str] = set()
        # Waiters first, while the hold is still known: one whose time ran out
        # in a restart's hold is told so, not that every lease is held.
        for waiter in self._deadlines.expired_waiters(now):
            res = self.resources[waiter.resource]
            res.timeouts += 1
            # Its session: a waiter held back by its own max_per_process is told
            # so, not that every lease of the resource is held.
            why = self._why_full(res, self.sessions.get(waiter.session), waiter.deadline)
            effects.append(self._drop_waiter(res, waiter, "timeout", why))
            touched.add(res.name)
        if self.hold_until is not None and now >= self.hold_until:
            # Re-registration window over: serve the queues.
            touched.update(self.resources)
            effects += restart.end_hold(self, now, running)
        for name, fenced in self._deadlines.ended_fences(now, self.resources):
            if fenced.fence in self._awaited and self.hold_until is None:
                # A live holder's, after the hold: look again. Fenced afresh
                # either way (a fence with no delay ends in this same loop).
                effects += restart.settle_unclaimed(self, fenced.fence, self._awaited.pop(fenced.fence),
                                                    now, running)
                continue
            del self.resources[name].fenced[fenced.lease.id]
            touched.add(name)
        for name in touched:
            effects += self._pump(self.resources[name], now)
        return effects

    def next_deadline(self) -> float | None:
        """When :meth:`tick` next has something to do."""
        times = [t for t in (self._deadlines.next(self.resources), self.hold_until) if t is not None]
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
        """Add a resource or replace its limits (config reload); one removed by
        an earlier reload and still held is served again."""
        res = self.resources.get(resource)
        if res is None:
            self.resources[resource] = ResourceState(resource, limits)
            return []
        res.limits = limits
        res.removed = False
        res.over_per_process = limits.max_per_process is not None  # rebalance looks, and clears it
        self._quanta.pop(resource, None)
        return self._pump(res, now)

    def remove(self, resource: str, now: float) -> list[Effect]:
        """A reload dropped ``resource`` from the configuration. Nothing new is
        granted (its waiters are refused, as later acquires are); the leases out
        stay valid until released, the fences until they end: their connections
        exist, and a reload never cuts them. Then it is forgotten (gone from
        status and metrics)."""
        res = self._res(resource)
        res.removed = True
        why = removed_why(resource)
        effects: list[Effect] = [self._drop_waiter(res, w, "unknown_resource", why)
                                 for w in list(res.waiters)]
        return effects + self._pump(res, now)

    def end_session(self, pid: int) -> list[Effect]:
        """Tell every session of ``pid`` to close its connections and let go."""
        return [Notify(s.id, "end_session", None) for s in self.sessions.values() if s.pid == pid]

    # ------------------------------------------------------------- inspection

    def snapshot_resources(self, now: float, names: set[str] | None = None) -> list[dict[str, Any]]:
        """Rows of ``inspect resources``; ``names``: only those resources."""
        hold = self.restart_hold_s(now)
        return [{**res.snapshot(now, paced(res, self.sessions, self.quantum(res.name))),
                 "restart_hold_s": hold}
                for res in self.resources.values() if names is None or res.name in names]

    def snapshot_figures(self, now: float) -> list[dict[str, Any]]:
        """For a metrics scrape, a cheap copy per resource: the figures of its
        ``inspect resources`` row with ``restart_hold_s``, and its raw
        ``wait_counts`` and ``wait_sum`` (see :func:`.records.wait_histogram`).
        The rest of the row is left out: building it for thousands of resources
        held the event loop for tens of milliseconds."""
        hold = self.restart_hold_s(now)
        rows = []
        for res in self.resources.values():
            row = res.figures(now)
            row["restart_hold_s"] = hold
            row["wait_counts"] = tuple(res.wait_counts)
            row["wait_sum"] = res.wait_sum
            rows.append(row)
        return rows

    def restart_hold_s(self, now: float) -> float | None:
        """Inside a restart's grace nothing is granted: seconds left of it, else None."""
        return round(self.hold_until - now, 3) if self._holding(now) and self.hold_until else None

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

    def snapshot_fenced(
        self, now: float, resource: str | None = None, pid: int | None = None
    ) -> list[dict[str, Any]]:
        """Rows of ``inspect fenced``: leases whose slots count but no session
        holds: a dead process's, quarantined until its server lets go
        (``fenced``), or one the previous coordinator handed on (or kept for a
        live process whose session ended), waiting for its process to
        re-register it (``awaited``). ``ends_in_s``: the fence's bound; for an
        awaited one, that of a session its process dropped (kept for
        ``restart_grace``), else None: counted for as long as its process runs
        (its fence's time is only when the coordinator looks again)."""
        rows = []
        for res in self.resources.values():
            if resource is not None and res.name != resource:
                continue
            for f in res.fenced.values():
                if pid is None or f.pid == pid:
                    awaited = self._awaited.get(f.fence)
                    until = f.until if awaited is None else awaited.until
                    rows.append({**f.lease.snapshot(now, f.pid),
                                 "state": "fenced" if awaited is None else "awaited", "state_s": None,
                                 "ends_in_s": None if until is None else round(max(0.0, until - now), 6)})
        return rows

    # ------------------------------------------------------------- internals

    def _res(self, name: str) -> ResourceState:
        res = self.resources.get(name)
        if res is None:
            raise KeyError(name)
        return res

    def _fence(self, res: ResourceState, fenced: Fenced) -> None:
        res.fenced[fenced.lease.id] = fenced
        self._deadlines.add_fence(res.name, fenced)

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

    def _pump(self, res: ResourceState, now: float, giver: int | None = None,
              keeper: int | None = None) -> list[Effect]:
        """Serve waiters in order while there is room, then rebalance reclaims.
        ``giver``: the session that gave a lease back; the first grant skips its
        own waiters unless nobody else can take it. ``keeper``: a session that
        let a lease go under its floor; the first grant goes to its first
        waiter, if it has one."""
        effects: list[Effect] = []
        if not res.paused and not self._holding(now):
            blocked: set[int] = set()
            while res.waiters and res.leased < res.limits.max_size:
                waiter = None
                if keeper is not None:
                    waiter = next((w for w in res.waiters if w.session == keeper), None)
                    keeper = None
                if waiter is None:
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
        effects += self._rebalance(res)
        if res.removed and not res.live and not res.fenced:
            self._forget(res)
        return effects

    def _forget(self, res: ResourceState) -> None:
        """A removed resource's last lease and fence are gone: drop it, and what
        sessions and the restart bookkeeping keep by its name."""
        name = res.name
        del self.resources[name]
        self._quanta.pop(name, None)
        for session in self.sessions.values():
            session.costs.pop(name, None)
            session.asked.pop(name, None)
            session.counts.pop(name, None)
            session.idle_only.discard(name)
        # Awaited fences of it with no lease left (all re-registered, then released).
        self._awaited = {k: v for k, v in self._awaited.items() if v.resource != name}

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
        return rebalance(res, self.sessions,
                         lambda longer: paced(res, self.sessions, self.quantum(res.name), longer),
                         holding=self.hold_until is not None)

    def _notify_holders(
        self, res: ResourceState, verb: str, args: dict[str, Any] | None = None
    ) -> list[Effect]:
        return [Notify(s.id, verb, res.name, dict(args or {})) for s in self.sessions.values()]
