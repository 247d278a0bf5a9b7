"""What the ledger keeps: a record per lease, waiter, session, fenced lease
and resource, and how each looks in an ``inspect`` reply.

Plain data with no rules of their own beyond bookkeeping that must stay in
step (a session's per-resource counts) and the bounds of what a peer may put
in them; the rules live in :mod:`.ledger`.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .config import Resource

#: Connect failures in a row, across all sessions, before the waiters of the
#: processes whose connects failed are failed fast.
FAILURE_THRESHOLD = 5

IDLE, BUSY, NEW = "idle", "busy", "new"
#: The states a process may report for a lease (NEW is the ledger's own).
STATES = (IDLE, BUSY)
#: Upper bounds (seconds) of the lease wait histogram's buckets.
WAIT_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
#: Re-registered lease ids and tokens must stay below this, so that the ids
#: granted after them still fit a msgpack integer.
MAX_ID = 1 << 63
#: A call site is kept to this many characters: a peer's megabyte-long site
#: must not make every ``leases`` listing too large for a frame.
MAX_SITE = 4096


def is_id(value: Any, bound: int = MAX_ID) -> bool:
    """Whether a peer's ``value`` can be a lease id, token or pid (a bool is not)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < bound


def clip_site(value: Any) -> str | None:
    """A peer's call site as a lease keeps it: a string of at most MAX_SITE characters."""
    if not isinstance(value, str):
        return None
    return value if len(value) <= MAX_SITE else value[: MAX_SITE - 3] + "..."


@dataclass(eq=False, slots=True)
class Lease:
    """The right to hold one open connection to one resource."""

    id: int
    resource: str
    session: int
    token: int
    granted_at: float
    state: str = NEW
    state_since: float = 0.0
    backend_pid: int | None = None
    site: str | None = None
    suspected_leak: bool = False
    #: When ``backend_pid`` was first reported: its backend had started by then.
    pid_since: float = 0.0
    #: Its connection was opened after this: when this coordinator granted it (or
    #: a process re-registered it unknown: only a backend since is known to be
    #: its); None for one the previous coordinator handed on (restart marker).
    opened_after: float | None = None

    def __repr__(self) -> str:
        return (
            f"<Lease {self.id} {self.resource!r} session={self.session} "
            f"token={self.token} {self.state}>"
        )

    def snapshot(self, now: float, pid: int) -> dict[str, Any]:
        """A row of ``inspect leases``; ``pid``: its session's process."""
        return {
            "id": self.id,
            "resource": self.resource,
            "session": self.session,
            "pid": pid,
            "state": self.state,
            "token": self.token,
            "age_s": round(now - self.granted_at, 6),
            "state_s": round(now - self.state_since, 6),
            "backend_pid": self.backend_pid,
            "site": self.site,
            "suspected_leak": self.suspected_leak,
        }


@dataclass(eq=False, slots=True)
class Waiter:
    session: int
    req: int
    resource: str
    since: float
    deadline: float
    site: str | None = None
    active: bool = True


@dataclass(eq=False, slots=True)
class Session:
    id: int
    pid: int
    name: str
    uid: int | None
    connected_at: float
    last_report: float | None = None
    leases: dict[int, Lease] = field(default_factory=dict)
    waiting: dict[int, Waiter] = field(default_factory=dict)
    #: resource -> leases we asked this session to give back
    asked: dict[str, int] = field(default_factory=dict)
    #: resources it was asked for idle leases only (reclaim.IDLE_ONLY)
    idle_only: set[str] = field(default_factory=set)
    #: resource -> leases held (kept in step with ``leases``)
    counts: dict[str, int] = field(default_factory=dict)
    #: resource -> seconds a hand-off costs this session, as last reported
    costs: dict[str, float] = field(default_factory=dict)
    #: the highest req of an acquire it sent (None: none yet): a retime of a
    #: req up to it that no longer waits was crossed by its answer; beyond
    #: it, the request was never made
    top_req: int | None = None

    def held(self, resource: str) -> int:
        return self.counts.get(resource, 0)

    def add(self, lease: Lease) -> None:
        self.leases[lease.id] = lease
        self.counts[lease.resource] = self.counts.get(lease.resource, 0) + 1

    def remove(self, lease_id: int) -> Lease | None:
        lease = self.leases.pop(lease_id, None)
        if lease is not None:
            self.counts[lease.resource] -= 1
        return lease

    def __repr__(self) -> str:
        return (
            f"<Session {self.id} pid={self.pid} leases={len(self.leases)} "
            f"waiting={len(self.waiting)}>"
        )

    def snapshot(self, now: float) -> dict[str, Any]:
        """A row of ``inspect sessions``."""
        return {
            "session": self.id,
            "pid": self.pid,
            "name": self.name,
            "uid": self.uid,
            "leases": len(self.leases),
            "waiters": len(self.waiting),
            "connected_s": round(now - self.connected_at, 6),
            "last_report_s": None if self.last_report is None else round(now - self.last_report, 6),
        }


@dataclass(eq=False, slots=True)
class Fenced:
    lease: Lease
    pid: int
    until: float
    #: the StartFence that fenced it: a check of an older fence must not end this one
    fence: int = 0


@dataclass(frozen=True, slots=True)
class Awaited:
    """Leases (one fence's) counted for a process that runs but has no session
    holding them: handed on by a restart, or kept after its session ended,
    until it re-registers them, connects without them, or exits."""

    resource: str
    pid: int
    #: why its session ended while it ran (for the log); None: handed on by a restart
    ended: str | None = None
    #: fenced as a dead process's at this time even if it still runs (None: not
    #: while it runs). A session its process dropped: it was reconnecting (it
    #: re-registers them well within), or it no longer has their connections.
    until: float | None = None
    #: the session they were counted for (None: handed on by a restart): a
    #: hello of the same process that brings none of that session's leases
    #: may be another ``Client`` of it (see :func:`.restart.settle_unbrought`)
    session: int | None = None


@dataclass(eq=False, slots=True)
class ResourceState:
    name: str
    limits: Resource
    live: dict[int, Lease] = field(default_factory=dict)
    fenced: dict[int, Fenced] = field(default_factory=dict)
    waiters: deque[Waiter] = field(default_factory=deque)
    paused: bool = False
    draining: bool = False
    #: dropped from the configuration by a reload: no new grants; forgotten once
    #: its last lease is released and its last fence ended
    removed: bool = False
    fail_streak: int = 0
    #: the sessions whose failures make up fail_streak (refused fast in the back-off)
    fail_sessions: set[int] = field(default_factory=set)
    failing_until: float | None = None
    grants: int = 0
    timeouts: int = 0
    denials: int = 0
    reclaims: int = 0
    peak: int = 0
    #: sessions currently asked to give leases back
    askees: set[int] = field(default_factory=set)
    #: the fairness quantum those askees were last sent
    quantum_sent: float | None = None
    #: a session may hold more than max_per_process (lowered by a reload, or
    #: leases re-registered after a restart): rebalance asks the excess back
    over_per_process: bool = False
    #: lease waits: count per WAIT_BUCKETS bound (+ one for larger), and their sum
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    wait_sum: float = 0.0

    @property
    def leased(self) -> int:
        return len(self.live) + len(self.fenced)

    @property
    def free(self) -> int:
        return max(0, self.limits.max_size - self.leased)

    def welcome_state(self) -> dict[str, Any]:
        """What a session is told of this resource: its limits, and whether it drains."""
        return {**self.limits.as_dict(), "draining": self.draining}

    def snapshot(self, now: float, quantum: float | None) -> dict[str, Any]:
        """A row of ``inspect resources``; ``quantum``: the fairness quantum in force."""
        return {
            **self.figures(now),
            "fairness_quantum_s": quantum,
            "limits": self.limits.as_dict(),
            "wait_histogram": wait_histogram(self.wait_counts, self.wait_sum),
        }

    def figures(self, now: float) -> dict[str, Any]:
        """The counts and flags of :meth:`snapshot`, without what is costly to
        build (limits, histogram, quantum): a metrics scrape copies these for
        every resource while the event loop waits."""
        states = [lease.state for lease in self.live.values()]
        return {
            "name": self.name,
            "max_size": self.limits.max_size,
            "leased": self.leased,
            "in_use": states.count(BUSY),
            "idle": states.count(IDLE),
            "connecting": states.count(NEW),
            "fenced": len(self.fenced),
            "waiting": len(self.waiters),
            "longest_wait_s": round(now - self.waiters[0].since, 6) if self.waiters else 0.0,
            "grants": self.grants,
            "timeouts": self.timeouts,
            "denials": self.denials,
            "reclaims": self.reclaims,
            "peak": self.peak,
            "paused": self.paused,
            "draining": self.draining,
            "removed": self.removed,
            # Its connects failing, none succeeding since: refused fast, or
            # past the backoff with the next acquire to probe (a rare one in a
            # long outage: shown failing all the same, until a connect succeeds).
            "failing": self.fail_streak >= FAILURE_THRESHOLD,
        }


def wait_histogram(counts: list[int] | tuple[int, ...], total: float) -> dict[str, Any]:
    """The ``wait_histogram`` of a resource row: cumulative counts per bound of
    WAIT_BUCKETS (None: +Inf), from the per-bucket ``counts``, and their sum."""
    return {
        "buckets": [[bound, count] for bound, count in zip(
            [*WAIT_BUCKETS, None], itertools.accumulate(counts), strict=True)],
        "sum": total,
    }
