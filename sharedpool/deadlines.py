"""When the ledger next has something to do: the waiters' deadlines and the
fences' ends, each in a heap, so that neither is found by a pass over every
waiter or fenced lease on every call (a dead process with thousands of
leases made each op cost thousands of steps).

Entries are not removed when their waiter is granted, cancelled, dropped or
retimed, or their fence lifted, taken back or replaced: they stay until they
reach the top, and the heaps are rebuilt without them once most are dead.
What is still in force is decided by the ledger's records (``Waiter.active``
and ``Waiter.deadline``, the resource's ``fenced``), never by the heaps.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from .records import Fenced, ResourceState, Waiter


class Deadlines:
    """The ledger's two expiry heaps; pure, as the ledger is: time is passed in."""

    def __init__(self) -> None:
        #: (deadline, seq, waiter) of every queued acquire
        self.waiters: list[tuple[float, int, Waiter]] = []
        #: (until, seq, resource, fenced) of every fence
        self.fences: list[tuple[float, int, str, Fenced]] = []
        #: :attr:`fences` is rebuilt once it is longer than this
        self.fences_max = 64
        self._seq = itertools.count()

    def add_waiter(self, waiter: Waiter) -> None:
        heapq.heappush(self.waiters, (waiter.deadline, next(self._seq), waiter))

    def add_fence(self, resource: str, fenced: Fenced) -> None:
        heapq.heappush(self.fences, (fenced.until, next(self._seq), resource, fenced))

    def expired_waiters(self, now: float) -> Iterator[Waiter]:
        """The waiters still queued whose deadline is ``now`` or before, earliest first."""
        while self.waiters and self.waiters[0][0] <= now:
            entry = heapq.heappop(self.waiters)
            if _in_force(entry):
                yield entry[2]

    def ended_fences(self, now: float, resources: dict[str, ResourceState]) -> Iterator[tuple[str, Fenced]]:
        """(resource, fenced) of the fences in force that end at ``now`` or
        before, earliest first. One added meanwhile is yielded too if it is due
        (a fence with no delay ends in the same pass)."""
        while self.fences and self.fences[0][0] <= now:
            entry = heapq.heappop(self.fences)
            if _current(entry, resources):
                yield entry[2], entry[3]

    def next(self, resources: dict[str, ResourceState]) -> float | None:
        """The earliest deadline of a waiter still queued or a fence in force."""
        while self.waiters and not _in_force(self.waiters[0]):
            heapq.heappop(self.waiters)
        if len(self.waiters) > 64:
            # Granted, cancelled and dropped waiters stay in the heap until
            # their deadline reaches the top; behind one long-lived waiter that
            # is never, and each holds its site string. Rebuild once most are dead.
            active = sum(len(r.waiters) for r in resources.values())
            if len(self.waiters) > 2 * active + 64:
                self.waiters = [e for e in self.waiters if _in_force(e)]
                heapq.heapify(self.waiters)
        ends = self.fences
        while ends and not _current(ends[0], resources):
            heapq.heappop(ends)
        if len(ends) > self.fences_max:
            # As for the waiters: fences lifted early (the monitor saw the
            # backends go) would stay for their whole fence_timeout. Looked
            # at once the heap has doubled, not by counting on every call.
            self.fences = ends = [e for e in ends if _current(e, resources)]
            heapq.heapify(ends)
            self.fences_max = 2 * len(ends) + 64
        times = [self.waiters[0][0]] if self.waiters else []
        if ends:
            times.append(ends[0][0])
        return min(times) if times else None


def _in_force(entry: tuple[float, int, Waiter]) -> bool:
    """Whether a :attr:`Deadlines.waiters` entry is a queued waiter's deadline
    (not one it had before a retime)."""
    waiter = entry[2]
    return waiter.active and waiter.deadline == entry[0]


def _current(entry: tuple[float, int, str, Fenced], resources: dict[str, ResourceState]) -> bool:
    """Whether a :attr:`Deadlines.fences` entry is still a fence in force."""
    fenced = entry[3]
    res = resources.get(entry[2])  # None: a resource a reload removed, forgotten since
    return res is not None and res.fenced.get(fenced.lease.id) is fenced
