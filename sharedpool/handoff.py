"""What moving a slot between processes costs, and the fairness quantum it implies.

Slots move between processes as a confirmed close in the giver and a new
connection in the taker: for PostgreSQL a backend exit and a backend fork,
milliseconds of CPU and of a slot doing nothing. A busy holder gives a slot
back at checkin once its connection is older than the resource's
``fairness_quantum``; the shorter the quantum, the sooner a waiter elsewhere
is served and the more of the machine goes into hand-offs.

``fairness_quantum = "auto"`` (the default) sets the quantum from what
hand-offs cost: :data:`AUTO_FACTOR` times a connect + confirmed-close time,
within [:data:`AUTO_MIN`, :data:`AUTO_MAX`] (:func:`auto_quantum`). Each pool
keeps moving averages of its own (:class:`HandOffCost`) and reports them (the
contrib integrations too); the coordinator takes the median over the
processes and sends that quantum with its reclaim requests, and again to the
holders already asked whenever it moves by more than a fifth, so every holder
of a resource takes turns of the same length. A pool uses its own figure only
until the coordinator has one. While more processes wait than turns of that
length could serve within half their acquire timeout, the coordinator sends a
shorter one (:func:`sharedpool.reclaim.paced`, never below the floor).

A hand-off costs much more than its own connect + close time. Measured on a
2-core machine with PostgreSQL 15 on loopback (8 processes in ``SELECT 1``
loops sharing 4 connections; connect + close ~8 ms under that load): 50
hand-off times (0.4 s) lost ~28 % of the throughput of 4 direct connections,
1 s ~19 %, and turns of 1 s driven by the clock with no coordinator at all
~10 %. Much of it is the kernel's doing: a new client/backend pair often
lands split across the two CPUs, and a split pair runs far slower (every
query wakes the other CPU) until the next hand-off. Hence 120 hand-off
times: about 1-1.6 s there, before the ceiling.

The ceiling is 1 s, for what waiters see: a waiter waits about one quantum
per turn, and a process gets a fair share of a few seconds only if turns are
short against them. On a slower 2-core machine (connect + close 8-17 ms and
more under that load, so auto came to 1-2 s) turns of up to 2 s gave 0.48x
and 0.56x slowest / fastest process in 5 s windows (0.31x in one round),
against 0.68-0.71x for 1 s turns (0.64x, worst round 0.45x, in a later
10-round run), and no throughput that stood out of the noise (0.75x and
0.86x of 4 direct connections, against 0.82x twice). A cheap resource
(Redis: well under a millisecond) gets the floor; PostgreSQL under load, or
a remote database behind TLS, gets the ceiling.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("sharedpool.pool")

#: The auto quantum is this many hand-off times ...
AUTO_FACTOR = 120.0
#: ... and at least / at most this many seconds.
AUTO_MIN, AUTO_MAX = 0.05, 1.0
#: A hand-off cost above this many seconds is a bad figure: never sent, and
#: refused by the coordinator.
MAX_COST = 3600.0
#: Weight of a new measurement in the moving averages.
_ALPHA = 0.2


class HandOffCost:
    """Moving averages of one pool's connect and confirmed-close times (seconds).

    Not locked: updates are single attribute stores from whichever thread
    connected or closed, and a slightly stale average is fine.
    """

    __slots__ = ("connect", "close", "auto")

    def __init__(self) -> None:
        self.connect: float | None = None
        self.close: float | None = None
        self.auto = AUTO_MIN

    def __repr__(self) -> str:
        def ms(v: float | None) -> str:
            return "?" if v is None else f"{v * 1000:.1f}ms"

        return f"<HandOffCost connect={ms(self.connect)} close={ms(self.close)} auto={self.auto:.3f}s>"

    def connected(self, seconds: float) -> None:
        """A connect (the factory call) took ``seconds``."""
        self.connect = _average(self.connect, seconds)
        self._update()

    def closed(self, seconds: float) -> None:
        """A close, confirmed by the server, took ``seconds``."""
        self.close = _average(self.close, seconds)
        self._update()

    @property
    def cost(self) -> float | None:
        """Seconds one hand-off costs this pool (None before a connect was timed)."""
        if self.connect is None:
            return None
        # Until a close has been measured, take it to cost what a connect does.
        return self.connect + (self.connect if self.close is None else self.close)

    def _update(self) -> None:
        self.auto = auto_quantum(self.cost or 0.0)

    def tell(self, client: Client | None, resource: str) -> None:
        """Report our hand-off cost of ``resource`` to the coordinator (coalesced).
        Never raises: it is called right after a connect or a confirmed close,
        where a failed report (a thread that cannot start) must not undo the
        lease bookkeeping of a connection that exists, or no longer does."""
        cost = self.cost
        if client is None or cost is None:
            return
        try:
            client.report_cost(resource, cost)
        except Exception:  # noqa: BLE001 - a figure less for the auto quantum
            log.exception("reporting the hand-off cost of %r failed", resource)

    def quantum_for(self, client: Client, resource: str) -> float:
        """The quantum to keep to: the coordinator's (one for every holder of
        ``resource``), else the configured one, else our own auto one."""
        quantum = client.quantum(resource)
        if quantum is not None:
            return quantum
        return self.quantum(client.limits.get(resource, {}).get("fairness_quantum"))

    def quantum(self, setting: Any) -> float:
        """The fairness quantum to apply: ``setting`` if it is a number, else the auto one."""
        if isinstance(setting, int | float) and not isinstance(setting, bool):
            return float(setting)
        return self.auto


def auto_quantum(cost: float) -> float:
    """The auto fairness quantum for a hand-off costing ``cost`` seconds."""
    return min(AUTO_MAX, max(AUTO_MIN, AUTO_FACTOR * cost))


def _average(old: float | None, new: float) -> float:
    new = max(0.0, new)
    return new if old is None else old + _ALPHA * (new - old)
