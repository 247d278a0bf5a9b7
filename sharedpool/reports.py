"""What a session's coalesced report changes in the ledger: its leases' states
(idle / busy, for reclaim), backend pids (for the fence), call sites and leak
suspicions (for listings), its hand-off costs (for the "auto" fairness
quantum) and its connect outcomes: connect failures in a row, across all
sessions, put a resource in a short back-off in which acquires are denied at
once instead of queueing for a connection that cannot be made: the acquires
of the processes whose connects failed, so that one misconfigured worker's
failures do not turn the others away.

Pure, as the ledger is; :meth:`Ledger.report` calls :func:`apply`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .effects import Effect, Problem
from .handoff import MAX_COST
from .protocol import brief
from .records import FAILURE_THRESHOLD, STATES, clip_site, is_id

if TYPE_CHECKING:
    from .ledger import Ledger

#: How long a failing resource denies acquires before letting one try again.
FAILURE_BACKOFF = 1.0


def apply(
    ledger: Ledger,
    sid: int,
    states: list[Any],
    now: float,
    failures: dict[str, Any] | None = None,
    ok: list[Any] = (),  # type: ignore[assignment]
    costs: dict[str, Any] | None = None,
) -> list[Effect]:
    """Take in one report of session ``sid`` (see :meth:`Ledger.report`)."""
    session = ledger.sessions[sid]
    session.last_report = now
    effects: list[Effect] = []
    touched: set[str] = set()
    for name, cost in (costs or {}).items():
        if type(cost) not in (int, float) or not 0 <= cost <= MAX_COST:
            # The rest of the report still counts: one bad figure must not
            # blind the ledger to this session's lease states.
            why = f"hand-off cost {brief(cost)} of {brief(name)} is not seconds in [0, {MAX_COST:g}]"
            effects.append(Problem(sid, "bad_report", why))
        elif name in ledger.resources and session.costs.get(name) != cost:
            session.costs[name] = float(cost)
            ledger._quanta.pop(name, None)
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
        if is_id(backend_pid) and backend_pid != lease.backend_pid:
            lease.backend_pid, lease.pid_since = backend_pid, now
        lease.site = clip_site(site)
        lease.suspected_leak = leak
    for name in ok:
        res = ledger.resources.get(name) if isinstance(name, str) else None
        if res is not None:
            res.fail_streak, res.failing_until = 0, None
            res.fail_sessions.clear()
    for name, count in (failures or {}).items():
        res = ledger.resources.get(name)
        if res is None or not isinstance(count, int) or count <= 0:
            continue
        res.fail_streak += count
        res.fail_sessions.add(sid)
        if res.fail_streak >= FAILURE_THRESHOLD:
            if res.failing_until is None or now >= res.failing_until:
                res.failing_until = now + FAILURE_BACKOFF
            # The waiters of the processes whose connects failed: refused now,
            # not left to time out. Another process's wait goes on; its own
            # first failure (in an outage) puts it among them.
            for waiter in [w for w in res.waiters if w.session in res.fail_sessions]:
                effects.append(ledger._drop_waiter(res, waiter, "failing",
                                                   f"connections to {name!r} are failing"))
            touched.add(name)  # withdraw what was asked for the waiters gone
    for name in touched:
        effects += ledger._rebalance(ledger.resources[name])
    return effects
