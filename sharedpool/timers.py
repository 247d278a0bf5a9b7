"""The client's timers (:meth:`~sharedpool.client.Client.call_later`): one heap
of ``(when, seq, Timer)``, run by the background thread.

A timer cancelled before it is due keeps its heap entry until it reaches the
top, as the ledger's deadlines do: the entry holds nothing then, and the heap
is swept of such entries once it has doubled since the last sweep. Without
the sweep, a pool's opener left one entry per connection opened until that
acquire's deadline: acquire_timeout x connects per second of them (300 s
and 2,000 connects: 2,000 entries, ~650 KB).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

#: The heap is not swept below this many entries.
SWEEP_MIN = 64


class Timer:
    """A job armed by :meth:`~sharedpool.client.Client.call_later`."""

    __slots__ = ("_job",)

    def __init__(self, job: Callable[[], object]) -> None:
        self._job: Callable[[], object] | None = job

    def __repr__(self) -> str:
        return f"<Timer {'cancelled' if self._job is None else self._job!r}>"

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` ran."""
        return self._job is None

    def cancel(self) -> None:
        """Do not run the job; let go of it (and of what it holds) at once. From any thread."""
        self._job = None

    def __call__(self) -> None:
        job = self._job
        if job is not None:
            job()


Entry = tuple[float, int, Timer]


def push(heap: list[Entry], entry: Entry, limit: int) -> int:
    """Add ``entry`` to ``heap``, first sweeping out the cancelled entries if it
    holds ``limit`` or more; returns the next sweep's limit."""
    if len(heap) >= limit:
        heap[:] = [e for e in heap if not e[2].cancelled]
        heapq.heapify(heap)
        limit = 2 * len(heap) + SWEEP_MIN
    heapq.heappush(heap, entry)
    return limit
