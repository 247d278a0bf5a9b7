"""The "auto" fairness quantum against a long queue (I3): every servable waiter
gets a turn within half its timeout. Pure ledger tests, as in test_ledger.py."""

from __future__ import annotations

import math

import pytest

from sharedpool.config import Resource
from sharedpool.effects import AskReclaim, Granted
from sharedpool.handoff import AUTO_MAX, AUTO_MIN, auto_quantum
from sharedpool.ledger import Ledger
from sharedpool.reclaim import QUANTUM_STEP

T0 = 1000.0


def fleet(processes: int, resource: Resource, timeout: float = 10.0,
          cost: float = 0.01) -> tuple[Ledger, list[AskReclaim]]:
    """``processes`` sessions that all reported ``cost``, one acquire each with
    ``timeout``: the first ``max_size`` hold a lease, the rest queue. Returns
    the ledger and the reclaim asks of the last acquire."""
    lg = Ledger({"pg": resource})
    sids = [lg.open_session(100 + i, "w", T0)[0] for i in range(processes)]
    for sid in sids:
        lg.report(sid, [], T0, costs={"pg": cost})
    asks: list[AskReclaim] = []
    for sid in sids:
        effects = lg.acquire(sid, 1, "pg", T0, timeout=timeout)
        asks = [e for e in effects if isinstance(e, AskReclaim)]
    return lg, asks


def tail_wait(lg: Ledger) -> float:
    """About how long the last waiter waits: its turns times the quantum holders were sent."""
    res = lg.resources["pg"]
    assert res.quantum_sent is not None
    return math.ceil(len(res.waiters) / res.limits.max_size) * res.quantum_sent


def test_the_tail_of_a_long_queue_is_served_within_its_timeout() -> None:
    """Before: 48 processes at a cap of 4 and PostgreSQL's auto quantum (1 s):
    every holder was asked to keep its connection a second, so the 44th waiter
    waited 11 turns, 11 s, past its 10 s timeout, while slots moved every
    second to the waiters ahead of it (measured with 40 processes: 9.4 s of
    10 for every acquire at the tail)."""
    lg, _ = fleet(48, Resource(max_size=4))
    assert auto_quantum(0.01) == AUTO_MAX  # what the holders were asked for before
    # Within half the timeout, give or take the step that is worth a frame to holders.
    assert tail_wait(lg) <= 10.0 / 2 / (1 - QUANTUM_STEP)
    turns = math.ceil(44 / 4)
    assert lg.snapshot_resources(T0)[0]["fairness_quantum_s"] * turns == pytest.approx(10.0 / 2)
    assert len(lg.resources["pg"].askees) == 4  # every holder takes turns of it


def test_a_short_queue_keeps_the_auto_quantum_and_it_comes_back() -> None:
    lg, asks = fleet(6, Resource(max_size=4))
    assert {a.quantum for a in asks if a.count} <= {AUTO_MAX}
    assert lg.resources["pg"].quantum_sent == AUTO_MAX
    # Grow the queue: holders hear a shorter turn; drain it: the full one again.
    more = [lg.open_session(900 + i, "w", T0)[0] for i in range(40)]
    for sid in more:
        lg.acquire(sid, 1, "pg", T0, timeout=10.0)
    assert tail_wait(lg) <= 10.0 / 2 / (1 - QUANTUM_STEP)
    for sid in more:
        lg.cancel(sid, 1, T0)
    assert lg.resources["pg"].quantum_sent == AUTO_MAX


def test_pacing_has_a_floor_and_leaves_a_fixed_quantum_alone() -> None:
    # Timeouts too short to be served in any turn: the auto floor, no less.
    lg, _ = fleet(40, Resource(max_size=2), timeout=0.2)
    assert lg.resources["pg"].quantum_sent == pytest.approx(AUTO_MIN)
    assert lg.snapshot_resources(T0)[0]["fairness_quantum_s"] == AUTO_MIN
    # A configured number is what the operator chose: sent as it is.
    fixed, asks = fleet(48, Resource(max_size=4, fairness_quantum=0.8))
    assert fixed.resources["pg"].quantum_sent == 0.8
    assert {a.quantum for a in asks if a.count} <= {0.8}


def test_waiters_held_back_by_max_per_process_do_not_shorten_turns() -> None:
    # One process queueing 40 acquires past its own max_per_process waits for
    # its own leases, not for a turn: it must not shorten everyone's.
    lg = Ledger({"pg": Resource(max_size=4, max_per_process=1)})
    sids = [lg.open_session(100 + i, "w", T0)[0] for i in range(5)]
    for sid in sids:
        lg.report(sid, [], T0, costs={"pg": 0.01})
    for sid in sids[:4]:
        assert any(isinstance(e, Granted) for e in lg.acquire(sid, 1, "pg", T0, timeout=10.0))
    greedy = sids[0]
    for req in range(2, 42):
        lg.acquire(greedy, req, "pg", T0, timeout=10.0)
    lg.acquire(sids[4], 1, "pg", T0, timeout=10.0)
    assert lg.resources["pg"].quantum_sent == AUTO_MAX


def test_a_queue_at_a_turn_boundary_does_not_resend_the_quantum_at_every_event() -> None:
    """Before: with 2 s timeouts at a cap of 8, 8 waiters are one turn (1 s) and
    9 are two (0.5 s); a queue going 8, 9, 8, 9 (an acquire, a grant, ...)
    moved the paced figure by half at every event, and each move was a
    Reclaim frame to every holder asked: 8.5 frames an event instead of 1 (at
    a cap of 100 with 1 s timeouts, 100). The shorter figure stays until the
    queue is half a turn shorter."""
    cap = 8
    lg, _ = fleet(2 * cap, Resource(max_size=cap), timeout=2.0)
    res = lg.resources["pg"]
    assert len(res.waiters) == cap and len(res.askees) == cap
    holders = [(sid, lid) for sid, s in lg.sessions.items() for lid in s.leases]
    asks = events = 0
    for i in range(40):
        sid = lg.open_session(5000 + i, "w", T0)[0]
        asks += len(of_asks(lg.acquire(sid, 1, "pg", T0, timeout=2.0)))  # cap + 1 waiting
        holder, lease = holders.pop(0)
        effects = lg.release(holder, lease, T0)  # the head is granted: cap waiting
        asks += len(of_asks(effects))
        holders += [(g.session, g.lease.id) for g in effects if isinstance(g, Granted)]
        events += 2
    assert asks / events <= 1.5, f"{asks / events:.1f} Reclaim frames an event"
    assert res.quantum_sent == pytest.approx(0.5)  # what cap + 1 waiters need
    # Half a turn shorter, the queue gets the longer turn back.
    for w in list(res.waiters)[:cap // 2 - 1]:
        lg.cancel(w.session, w.req, T0)
    assert res.quantum_sent == pytest.approx(0.5)
    lg.cancel(res.waiters[0].session, res.waiters[0].req, T0)
    assert len(res.waiters) == cap // 2 and res.quantum_sent == pytest.approx(AUTO_MAX)


def of_asks(effects: list[object]) -> list[AskReclaim]:
    return [e for e in effects if isinstance(e, AskReclaim)]


def test_at_a_cap_of_one_the_full_turn_comes_back() -> None:
    """Before: half a turn, rounded up, is a whole turn at a cap of 1: a turn
    shortened for two waiters (2 s timeouts: 0.5 s) stayed shortened for a lone
    waiter, for an empty queue and every queue after it, for good."""
    lg, _ = fleet(3, Resource(max_size=1), timeout=2.0)
    res = lg.resources["pg"]
    assert len(res.waiters) == 2 and res.quantum_sent == pytest.approx(0.5)
    last = res.waiters[-1]
    lg.cancel(last.session, last.req, T0)
    assert res.quantum_sent == pytest.approx(AUTO_MAX)  # one waiter: a whole turn of 1 s is in time
    last = res.waiters[-1]
    lg.cancel(last.session, last.req, T0)
    sid = lg.open_session(7777, "w", T0)[0]
    asks = of_asks(lg.acquire(sid, 1, "pg", T0, timeout=2.0))
    assert [a.quantum for a in asks] == [pytest.approx(AUTO_MAX)]
