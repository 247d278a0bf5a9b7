"""What a request to the coordinator is, as a client sees it: the reply it
waits for (``_Pending``), an acquire's ticket (:class:`AcquireRequest`), and
the :class:`Lease` it yields."""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import protocol as p
from .errors import AcquireCancelled

if TYPE_CHECKING:
    from .client import Client


#: Withdrawn acquires remembered for a grant that crossed the withdrawal. Bounded:
#: one the coordinator dropped while still queued gets no reply, so its entry stays.
WITHDRAWN_KEEP = 256


def note_withdrawn(client: Client, req: int, pending: _Pending) -> None:
    """An acquire withdrawn while still out (under ``client._cond``): a grant
    that crossed the withdrawal goes back unused, and its pool is told so
    (:func:`owner_of_late_grant`); else the coordinator's grants exceed what
    the pools say they took or gave back unused, with nothing to tell why."""
    if pending.owner is None or not isinstance(pending.msg, p.Acquire):
        return
    try:
        ref = weakref.ref(pending.owner)  # a dropped pool must still be collected
    except TypeError:
        return
    withdrawn = client._withdrawn
    withdrawn[req] = ref
    if len(withdrawn) > WITHDRAWN_KEEP:
        del withdrawn[next(iter(withdrawn))]


def owner_of_late_grant(client: Client, req: int, pending: _Pending | None) -> Any:
    """Who asked for a lease that came after its acquire was given up (under ``client._cond``)."""
    ref = client._withdrawn.pop(req, None)
    if pending is not None:
        return pending.owner
    return ref() if ref is not None else None


def tell_unused(owner: Any) -> None:
    """Tell the pool that asked that a lease granted to it went straight back unused."""
    unused = getattr(owner, "grant_unused", None)
    if callable(unused):
        unused()


@dataclass(eq=False)
class Lease:
    """A granted lease, as this process sees it."""

    id: int
    resource: str
    token: int
    granted_at: float = field(default_factory=time.monotonic)

    def __repr__(self) -> str:
        age = time.monotonic() - self.granted_at
        return f"<Lease {self.id} {self.resource!r} token={self.token} age={age:.3f}s>"


@dataclass(eq=False)
class _Pending:
    msg: p.Message
    done: bool = False
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False
    taken: bool = False  # the lease was handed to the caller: too late to cancel
    fail_if_lost: bool = False  # fails when its session is lost, rather than waiting for the next
    owner: object = None  # the pool (or lease book) that asked, if one did
    since: float = field(default_factory=time.monotonic)  # when it was made, or re-sent on a new session
    #: an acquire's deadline at the coordinator as last retimed (``time.monotonic()``),
    #: which the wait for its reply follows (None: not retimed)
    retimed: float | None = None
    #: an acquire's deadline at the coordinator as asked (``time.monotonic()``; None:
    #: the resource's default, or none): a re-send on a new session asks for what is left
    ends: float | None = None


class AcquireRequest:
    """An acquire sent to the coordinator: :meth:`wait` for its lease, or
    :meth:`cancel` it from another thread."""

    __slots__ = ("client", "req", "_pending", "_deadline")

    def __init__(self, client: Client, req: int, pending: _Pending, deadline: float | None) -> None:
        self.client, self.req = client, req
        self._pending, self._deadline = pending, deadline

    def __repr__(self) -> str:
        state = "done" if self._pending.done else "waiting"
        return f"<AcquireRequest {self.req} {self._pending.msg.resource!r} {state}>"  # type: ignore[attr-defined]

    def wait(self) -> Lease:
        """The lease; raises PoolTimeout, a LeaseDenied subclass,
        CoordinatorUnavailable, or AcquireCancelled."""
        client, pending = self.client, self._pending
        client._finish(self.req, pending, self._deadline, "acquire")
        with client._cond:
            if pending.error is None:
                pending.taken = True
                lease: Lease = pending.result
                return lease
        raise pending.error

    def cancel(self) -> bool:
        """Withdraw the request. False if :meth:`wait` already returned its
        lease; otherwise :meth:`wait` raises AcquireCancelled and a lease
        granted meanwhile goes straight back to the coordinator."""
        client, pending = self.client, self._pending
        with client._cond:
            if pending.taken:
                return False
            if not pending.done and client._sock is not None:
                note_withdrawn(client, self.req, pending)
            granted = pending.result if pending.done and pending.error is None else None
            pending.result, pending.error = None, AcquireCancelled("acquire cancelled")
            pending.done = True
            # Settled: forgotten now, not at a wait() that may never come (it
            # kept the session wanted, and close_if_unused() refusing, for good).
            client._pending.pop(self.req, None)
            client._cond.notify_all()
        if granted is not None:
            # Granted, but the waiter never took it (its wait() now raises
            # AcquireCancelled, so counts nothing): counted here, as a late grant is.
            try:
                tell_unused(pending.owner)  # first: whoever sees the release sees it counted
            finally:
                client.release(granted)
        elif client._sock is not None:
            client._send_quiet(p.Cancel(self.req))
        return True

    def retime(self, timeout: float) -> bool:
        """Give the request a new deadline, ``timeout`` seconds (>= 0) from now,
        keeping its place in the coordinator's line. False if it was answered
        or withdrawn already (a grant crossing the retime still comes), or if
        the coordinator speaks a protocol without ``retime`` (then nothing changed)."""
        client, pending = self.client, self._pending
        if not timeout >= 0:  # NaN too: the coordinator would end the session
            raise ValueError(f"timeout must be a number >= 0, got {timeout!r}")
        with client._cond:
            # Out of _pending (wait() gave up on it): not re-sent to a later
            # coordinator, which would end the session at a retime of it.
            if (pending.done or pending.taken or client._pending.get(self.req) is not pending
                    or not client.speaks("retime")):
                return False
            msg = pending.msg
            assert isinstance(msg, p.Acquire)
            msg.timeout = timeout
            pending.retimed = pending.ends = time.monotonic() + timeout  # what a re-send asks for
            # On a session being made, the retime waits for the send lock, which
            # the re-send of the acquire holds: the coordinator sees the acquire first.
            sock = client._sock
        if sock is not None:
            client._send_quiet(p.Retime(self.req, timeout), sock)
        return True

    @property
    def since(self) -> float:
        """When it was sent (or sent again on a new session), ``time.monotonic()``."""
        return self._pending.since

    def _drop(self) -> None:
        """Its caller is gone (an exception): withdraw it unless it is settled
        (its lease handed over, or :meth:`wait` gave up and withdrew it)."""
        with self.client._cond:
            pending = self._pending
            settled = pending.taken or pending.abandoned or pending.error is not None
            self.client._pending.pop(self.req, None)
        if not settled:
            self.cancel()
