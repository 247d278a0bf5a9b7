"""What the ledger returns for its server to carry out: grant or deny a
request, ask a session to give leases back, start a fence, answer with an
error, push an admin decision. Plain data, so that tests read them directly;
:func:`start_fence` makes the StartFence of a dead process's leases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .records import Lease


@dataclass(slots=True)
class Granted:
    session: int
    req: int
    lease: Lease


@dataclass(slots=True)
class Denied:
    session: int
    req: int
    reason: str
    message: str


@dataclass(slots=True)
class AskReclaim:
    """Ask ``session`` to hold ``count`` fewer leases of ``resource`` (0 withdraws);
    busy ones go at checkin once older than ``quantum`` seconds (None: the
    session's own choice, as no hand-off cost is known yet; infinity: none
    goes, only idle ones)."""

    session: int
    resource: str
    count: int
    quantum: float | None = None


@dataclass(slots=True)
class StartFence:
    """A dead session's leases were fenced; the server may confirm them gone early."""

    resource: str
    pid: int
    leases: tuple[int, ...]
    backend_pids: tuple[int, ...]
    #: pass back to :meth:`Ledger.unfence`: it ends this fence only
    fence: int = field(default=0, compare=False)
    #: False: terminate (``fence_action="terminate"``) only once no process has
    #: ``pid``; else only wait for the backends (it may be alive, just late)
    terminate: bool = field(default=True, compare=False)
    #: backend pid -> (earliest, latest) its backend can have started, on the
    #: ledger's clock: the grant (None: unknown) and the pid's first report. A
    #: backend started outside that is not the lease's (its pid was reused, or
    #: reported wrongly): the fence never terminates it.
    started: dict[int, tuple[float | None, float]] = field(default_factory=dict, compare=False)
    #: why the coordinator ended the session of ``pid`` while it still ran
    #: (None: its process went, or a restart handed the leases on), for the log
    ended: str | None = field(default=None, compare=False)


def start_fence(name: str, pid: int, leases: list[Lease], fence: int, terminate: bool = True,
                ended: str | None = None) -> StartFence:
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
                      terminate=terminate, started=started, ended=ended)


@dataclass(frozen=True, slots=True)
class StillHeld:
    """A restart's hold ended, and a process that held ``count`` leases of
    ``resource`` has not re-registered them, yet still runs: they stay counted."""

    resource: str
    pid: int
    count: int


@dataclass(slots=True)
class Problem:
    """A request that made no sense (unknown lease, duplicate req): an error reply.
    ``fatal``: one no client of ours sends (a retime of a request it never
    made): the session is ended, as for a malformed frame (I5)."""

    session: int
    code: str
    message: str
    req: int | None = None
    fatal: bool = False


@dataclass(slots=True)
class Notify:
    """Push an admin decision to a session."""

    session: int
    verb: str
    resource: str | None
    args: dict[str, Any] = field(default_factory=dict)


Effect = Granted | Denied | AskReclaim | StartFence | StillHeld | Problem | Notify
