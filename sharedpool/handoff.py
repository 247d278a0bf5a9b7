"""What moving a slot between processes costs, and the fairness quantum it implies.

Slots move between processes as a confirmed close in the giver and a new
connection in the taker: for PostgreSQL a backend exit and a backend fork,
milliseconds of CPU and of a slot doing nothing. A busy holder gives a slot
back at checkin once its connection is older than the resource's
``fairness_quantum``; the shorter the quantum, the sooner a waiter elsewhere
is served and the more of the machine goes into hand-offs.

``fairness_quantum = "auto"`` (the default) lets each pool pick the quantum
from what hand-offs cost it: :data:`AUTO_FACTOR` times its recent connect +
confirmed-close time, within [:data:`AUTO_MIN`, :data:`AUTO_MAX`]. Measured
on a 2-core machine with PostgreSQL 15 (8 processes in ``SELECT 1`` loops
sharing 4 connections): a hand-off costs about its own wall time in idle slot
plus twice that in CPU spread over the other slots, so throughput lost to
hand-offs is about (hand-off time x 2) / quantum — 4 % at 50 hand-off times.
A cheap resource (Redis: well under a millisecond) gets the floor; a remote
database behind TLS gets a longer quantum, as moving its slots costs more.
"""

from __future__ import annotations

from typing import Any

#: The auto quantum is this many hand-off times ...
AUTO_FACTOR = 50.0
#: ... and at least / at most this many seconds.
AUTO_MIN, AUTO_MAX = 0.05, 2.0
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

    def _update(self) -> None:
        connect = self.connect or 0.0
        # Until a close has been measured, take it to cost what a connect does.
        close = connect if self.close is None else self.close
        self.auto = min(AUTO_MAX, max(AUTO_MIN, AUTO_FACTOR * (connect + close)))

    def quantum(self, setting: Any) -> float:
        """The fairness quantum to apply: ``setting`` if it is a number, else the auto one."""
        if isinstance(setting, int | float) and not isinstance(setting, bool):
            return float(setting)
        return self.auto


def _average(old: float | None, new: float) -> float:
    new = max(0.0, new)
    return new if old is None else old + _ALPHA * (new - old)
