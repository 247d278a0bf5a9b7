"""The lease ledger: unit tests, then a hypothesis state machine for I1–I4.

The ledger is pure: time is an argument and the results are effect objects,
so every test here runs without sockets, processes or sleeps.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sharedpool import protocol as p
from sharedpool.config import Resource
from sharedpool.effects import AskReclaim, Denied, Effect, Granted, Notify, Problem, StartFence, StillHeld
from sharedpool.errors import ConfigError
from sharedpool.handoff import AUTO_MAX, AUTO_MIN, auto_quantum
from sharedpool.ledger import Ledger
from sharedpool.reclaim import IDLE_ONLY, paced, to_send
from sharedpool.records import BUSY, IDLE, MAX_ID, MAX_SITE, NEW
from sharedpool.reports import FAILURE_BACKOFF, FAILURE_THRESHOLD
from sharedpool.restart import ALIVE_RECHECK, DROPPED, DROPPED_RECHECK, MAX_HELD_ID
from sharedpool.tables import leases_sheet

T0 = 1000.0
E = TypeVar("E")


def ledger(**resources: Any) -> Ledger:
    return Ledger({name: Resource.coerce(name, spec) for name, spec in resources.items()})


def session(lg: Ledger, pid: int = 100, name: str = "w", now: float = T0, **kw: Any) -> int:
    sid, effects = lg.open_session(pid, name, now, **kw)
    assert effects == []
    return sid


def granted(effects: list[Effect]) -> Granted:
    grants = [e for e in effects if isinstance(e, Granted)]
    assert len(grants) == 1, effects
    return grants[0]


def grant(lg: Ledger, sid: int, req: int, resource: str = "pg", now: float = T0, **kw: Any) -> int:
    """Acquire that must be granted at once; returns the lease id."""
    return granted(lg.acquire(sid, req, resource, now, **kw)).lease.id


def queued(effects: list[Effect]) -> bool:
    """Neither granted nor refused (reclaim asks may go out)."""
    return not [e for e in effects if isinstance(e, (Granted, Denied, Problem))]


def of(kind: type[E], effects: list[Effect]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


def only(kind: type[E], effects: list[Effect]) -> E:
    """The one effect there is, which must be a ``kind``."""
    assert len(effects) == 1 and isinstance(effects[0], kind), effects
    return effects[0]


def idle(lg: Ledger, sid: int, now: float = T0) -> list[Effect]:
    """Report every lease of the session idle."""
    states = [[lid, IDLE, None, None] for lid in lg.sessions[sid].leases]
    return lg.report(sid, states, now)


# ------------------------------------------------------------------- grants and waiters


def test_grant_at_once() -> None:
    lg = ledger(pg=2)
    a = session(lg, pid=7)
    g = granted(lg.acquire(a, 1, "pg", T0, site="app.py:3"))
    lease = g.lease
    assert (g.session, g.req) == (a, 1)
    assert (lease.resource, lease.session, lease.token, lease.state) == ("pg", a, lease.id, NEW)
    assert lease.granted_at == T0 and lease.site == "app.py:3"
    assert lg.resources["pg"].leased == 1
    assert "pg 1/2 w0" in repr(lg) and f"Lease {lease.id}" in repr(lease)
    assert "leases=1" in repr(lg.sessions[a])


def test_waiters_are_served_first_come_first_served() -> None:
    lg = ledger(pg=1)
    a, b, c, d = (session(lg, pid=i) for i in range(4))
    lease = grant(lg, a, 1)
    for sid in (b, c, d):
        assert queued(lg.acquire(sid, 1, "pg", T0, timeout=5))
    order = []
    for step in range(3):
        g = granted(lg.release(lg.resources["pg"].live[lease].session, lease, T0 + step))
        order.append(g.session)
        lease = g.lease.id
    assert order == [b, c, d]


def test_timeout_zero_is_denied_at_once() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    deny = only(Denied, lg.acquire(b, 1, "pg", T0, timeout=0))
    assert isinstance(deny, Denied) and (deny.session, deny.req, deny.reason) == (b, 1, "timeout")
    assert "all 1 leases of 'pg' are held" in deny.message
    assert lg.acquire(b, 2, "pg", T0, timeout=-3) == [Denied(b, 2, "timeout", deny.message)]
    # Tries that never waited (a pool's min_size top-up each round): no timeouts.
    assert not lg.resources["pg"].waiters and lg.resources["pg"].timeouts == 0


def test_default_timeout_is_the_resources_acquire_timeout() -> None:
    lg = ledger(pg=Resource(1, acquire_timeout=2.5))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0))
    assert lg.next_deadline() == T0 + 2.5
    assert lg.tick(T0 + 2.4) == []
    [deny] = of(Denied, lg.tick(T0 + 2.5))
    assert isinstance(deny, Denied) and (deny.req, deny.reason) == (1, "timeout")
    assert lg.next_deadline() is None
    assert lg.sessions[b].waiting == {}


def test_tick_expires_waiters_in_deadline_order() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    for req, timeout in ((1, 3.0), (2, 1.0), (3, 2.0), (4, 10.0)):
        assert queued(lg.acquire(b, req, "pg", T0, timeout=timeout))
    effects = lg.tick(T0 + 2.0)
    assert [(e.req, e.reason) for e in of(Denied, effects)] == [(2, "timeout"), (3, "timeout")]
    assert [w.req for w in lg.resources["pg"].waiters] == [1, 4]
    assert lg.next_deadline() == T0 + 3.0
    assert lg.tick(T0 + 2.0) == []  # nothing twice


def test_unknown_resource() -> None:
    lg = ledger(pg=1, api=2)
    a = session(lg)
    deny = only(Denied, lg.acquire(a, 1, "nope", T0))
    assert isinstance(deny, Denied) and deny.reason == "unknown_resource"
    assert "'nope'" in deny.message and "api, pg" in deny.message


def test_unknown_resource_message_stays_short() -> None:
    """A 1 MB name must not come back as a deny over the frame limit."""
    lg = ledger(pg=1)
    deny = only(Denied, lg.acquire(session(lg), 1, "x" * 1_000_000, T0))
    assert len(deny.message) < 200
    p.encode(p.Deny(deny.req, deny.reason, deny.message), 1024)


def test_duplicate_request_is_a_problem() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 9, "pg", T0, timeout=1))
    prob = only(Problem, lg.acquire(b, 9, "pg", T0, timeout=1))
    assert isinstance(prob, Problem) and (prob.code, prob.req) == ("duplicate_request", 9)
    assert len(lg.resources["pg"].waiters) == 1


def test_nan_timeout_is_refused_and_does_not_stall_other_timeouts() -> None:
    """Regression: a NaN deadline at the top of the heap stopped every waiter
    of every resource from ever timing out."""
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    prob = only(Problem, lg.acquire(b, 1, "pg", T0, timeout=math.nan))
    assert isinstance(prob, Problem) and (prob.code, prob.req) == ("bad_request", 1)
    assert queued(lg.acquire(b, 2, "pg", T0, timeout=1.0))
    assert [(e.req, e.reason) for e in of(Denied, lg.tick(T0 + 5))] == [(2, "timeout")]


def test_infinite_timeout_waits_until_served() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    lease = grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=math.inf))
    assert lg.tick(T0 + 1e9) == []
    assert granted(lg.release(a, lease, T0 + 1e9)).session == b


# ------------------------------------------------------------------- max_per_process, max_waiting


def test_max_per_process_skips_a_blocked_head_waiter() -> None:
    lg = ledger(pg=Resource(3, max_per_process=1))
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    assert lg.acquire(a, 2, "pg", T0, timeout=5) == []  # blocked by its own cap
    assert granted(lg.acquire(b, 1, "pg", T0, timeout=5)).session == b
    # Regression: with only blocked waiters queued and a slot free, timeout=0
    # was denied ("all 3 leases are held") instead of granted.
    assert granted(lg.acquire(c, 1, "pg", T0, timeout=0)).session == c
    assert [w.req for w in lg.resources["pg"].waiters] == [2]


def test_a_wait_held_back_by_max_per_process_times_out_saying_so() -> None:
    # Was "all 5 leases of 'pg' are held" with 1 of 5 held: the wrong limit to raise.
    lg = ledger(pg=Resource(5, max_per_process=1))
    a = session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=1))
    [deny] = of(Denied, lg.tick(T0 + 1))
    assert deny.reason == "timeout" and "max_per_process=1" in deny.message, deny.message
    # A wait at the global cap still says that.
    b = session(lg)
    for req in range(1, 5):
        grant(lg, session(lg), req)
    assert queued(lg.acquire(b, 1, "pg", T0 + 1, timeout=1))
    [deny] = of(Denied, lg.tick(T0 + 2))
    assert "all 5 leases of 'pg' are held" in deny.message, deny.message


def test_blocked_head_waiter_is_not_starved() -> None:
    lg = ledger(pg=Resource(2, max_per_process=1))
    a, b, c = session(lg), session(lg), session(lg)
    la = grant(lg, a, 1)
    assert lg.acquire(a, 2, "pg", T0, timeout=5) == []  # head, blocked
    lb = grant(lg, b, 1)
    assert queued(lg.acquire(c, 1, "pg", T0, timeout=5))  # behind it
    # A gives its lease back: its own queued request comes first, not C's.
    assert granted(lg.release(a, la, T0 + 1)).session == a
    # B gives back: A is at its cap again, so C is next.
    assert granted(lg.release(b, lb, T0 + 2)).session == c


def test_blocked_waiter_does_not_hold_up_others_behind_it() -> None:
    lg = ledger(pg=Resource(2, max_per_process=1))
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    lb = grant(lg, b, 1)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=5))
    assert queued(lg.acquire(c, 1, "pg", T0, timeout=5))
    assert granted(lg.release(b, lb, T0)).session == c


def test_max_waiting() -> None:
    lg = ledger(pg=Resource(1, max_waiting=2))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    assert queued(lg.acquire(b, 2, "pg", T0, timeout=5))
    deny = only(Denied, lg.acquire(b, 3, "pg", T0, timeout=5))
    assert isinstance(deny, Denied) and deny.reason == "too_many_waiters"
    assert "max_waiting" in deny.message and lg.resources["pg"].denials == 1


def test_max_waiting_zero_never_queues_but_still_grants() -> None:
    lg = ledger(pg=Resource(1, max_waiting=0))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert of(Denied, lg.acquire(b, 1, "pg", T0, timeout=5))[0].reason == "too_many_waiters"


def test_max_waiting_counts_only_acquires_a_free_slot_could_serve() -> None:
    # A process at its max_per_process queues more (a pool with more threads
    # than its share): those wait for its own leases, and must not use up
    # max_waiting so that another process is refused. They are bounded per
    # process instead (a raw client could queue thousands).
    lg = ledger(pg=Resource(3, max_per_process=1, max_waiting=2))
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=5))
    assert queued(lg.acquire(a, 3, "pg", T0, timeout=5))
    deny = only(Denied, lg.acquire(a, 4, "pg", T0, timeout=5))
    assert isinstance(deny, Denied) and deny.reason == "too_many_waiters"
    assert deny.message == ("2 acquires of 'pg' from this process already wait behind its "
                            "max_per_process=1 (max_waiting=2)")
    assert granted(lg.acquire(b, 1, "pg", T0, timeout=5)).session == b  # before: refused
    grant(lg, c, 1)  # the cap is reached: 3 held
    d, e = session(lg), session(lg)
    assert queued(lg.acquire(d, 1, "pg", T0, timeout=5))  # servable waiters: 1
    assert queued(lg.acquire(e, 1, "pg", T0, timeout=5))  # 2
    deny = only(Denied, lg.acquire(session(lg), 1, "pg", T0, timeout=5))
    assert isinstance(deny, Denied) and deny.reason == "too_many_waiters"
    assert deny.message == "2 acquires already wait for a free lease of 'pg' (max_waiting=2)"
    # D's second waits behind its first (its own cap): counted as D's, not refused.
    assert queued(lg.acquire(d, 2, "pg", T0, timeout=5))


# ------------------------------------------------------------------- cancel and release


def test_cancel_withdraws_a_waiter_without_an_answer() -> None:
    lg = ledger(pg=1)
    a, b, c = session(lg), session(lg), session(lg)
    lease = grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    lg.acquire(c, 1, "pg", T0, timeout=5)
    assert lg.cancel(b, 1, T0) == []
    assert lg.cancel(b, 1, T0) == []  # twice: nothing
    assert lg.cancel(b, 77, T0) == []  # never asked: nothing
    assert granted(lg.release(a, lease, T0)).session == c
    assert lg.tick(T0 + 10) == []  # the cancelled waiter never times out either


def test_release_of_an_unknown_lease_is_a_problem() -> None:
    lg = ledger(pg=2)
    a, b = session(lg), session(lg)
    lease = grant(lg, a, 1)
    prob = only(Problem, lg.release(a, 12345, T0))
    assert isinstance(prob, Problem) and prob.code == "unknown_lease" and prob.session == a
    assert only(Problem, lg.release(b, lease, T0)).code == "unknown_lease"  # another's lease
    assert lg.resources["pg"].leased == 1
    assert lg.release(a, lease, T0) == []
    assert only(Problem, lg.release(a, lease, T0)).code == "unknown_lease"  # twice


# ------------------------------------------------------------------- sessions and fences


def test_close_session_fences_its_leases_for_the_quarantine_delay() -> None:
    lg = ledger(pg=Resource(2, quarantine_delay=0.5))
    a, b = session(lg, pid=41), session(lg, pid=42)
    l1, l2 = grant(lg, a, 1), grant(lg, a, 2)
    lg.report(a, [[l1, BUSY, 9001, None], [l2, IDLE, None, None]], T0)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    [fence] = lg.close_session(a, T0 + 1)
    assert fence == StartFence("pg", 41, (l1, l2), (9001,))
    res = lg.resources["pg"]
    assert res.live == {} and set(res.fenced) == {l1, l2} and res.leased == 2
    assert lg.next_deadline() == T0 + 1.5
    assert lg.tick(T0 + 1.4) == []
    g = granted(lg.tick(T0 + 1.5))
    assert g.session == b and res.fenced == {}
    assert lg.close_session(a, T0 + 2) == []  # unknown session: nothing


def test_quarantine_delay_zero_frees_at_once() -> None:
    lg = ledger(pg=Resource(1, quarantine_delay=0))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    effects = lg.close_session(a, T0)
    assert of(StartFence, effects) == [] and granted(effects).session == b


def test_a_dead_holder_never_asked_to_give_back_still_frees_its_slots() -> None:
    """Its lease at the min_per_process floor, the holder was never asked (so
    not an askee) and had no waiter of its own: its death must still serve
    the waiter, not leave it queued beside a free slot until it times out."""
    lg = ledger(pg=Resource(1, min_per_process=1, quarantine_delay=0))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    assert not lg.resources["pg"].askees
    assert granted(lg.close_session(a, T0)).session == b


def test_a_wait_that_runs_out_is_a_timeout_not_a_denial() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=2))
    assert [d.reason for d in of(Denied, lg.tick(T0 + 2))] == ["timeout"]
    row = lg.snapshot_resources(T0 + 2)[0]
    assert (row["timeouts"], row["denials"]) == (1, 0)


def test_a_wait_of_exactly_a_bucket_bound_counts_in_that_bucket() -> None:
    """Prometheus buckets are "le": a wait of 0.5 s is one of those <= 0.5."""
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    lease = grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    assert granted(lg.release(a, lease, T0 + 0.5)).session == b
    buckets = dict(lg.snapshot_resources(T0 + 1)[0]["wait_histogram"]["buckets"])
    assert (buckets[0.1], buckets[0.5]) == (1, 2)


def test_monitor_dsn_fences_for_fence_timeout() -> None:
    lg = ledger(pg=Resource(1, quarantine_delay=0, monitor_dsn="postgresql:///x", fence_timeout=7))
    a = session(lg, pid=5)
    lease = grant(lg, a, 1)
    assert lg.close_session(a, T0) == [StartFence("pg", 5, (lease,), ())]
    assert lg.resources["pg"].fenced[lease].until == T0 + 7


def test_a_report_takes_only_a_backend_pid_the_wire_can_hold() -> None:
    """Before, any int went: True or 2**70 became the lease's backend pid, sent
    to PostgreSQL by the fence and shown in listings (hello's held rows already
    refused them)."""
    lg = ledger(pg=Resource(4, monitor_dsn="postgresql:///x"))
    a = session(lg, pid=5)
    lease = grant(lg, a, 1, now=T0)
    lg.report(a, [[lease, BUSY, 9001, None]], T0 + 1)
    for bad in (True, 2**70, -1, 1.5, "9002"):
        lg.report(a, [[lease, IDLE, bad, None]], T0 + 2)
        assert lg.resources["pg"].live[lease].backend_pid == 9001
    [fence] = lg.close_session(a, T0 + 3)
    assert fence.backend_pids == (9001,)


def test_a_fence_bounds_when_each_backend_can_have_started() -> None:
    """The fence terminates (fence_action="terminate") only a backend started
    between its lease's grant and the first report of its pid: a pid reported
    long ago and reused since, or a wrong pid of an older connection, belongs to
    some other connection. A lease re-registered that the ledger did not know
    has only the process's word for its backend: none that started before is ended."""
    lg = ledger(pg=Resource(4, monitor_dsn="postgresql:///x"))
    a = session(lg, pid=5)
    l1, l2 = grant(lg, a, 1, now=T0), grant(lg, a, 2, now=T0 + 1)
    lg.report(a, [[l1, BUSY, 9001, None], [l2, IDLE, 9002, None]], T0 + 2)
    lg.report(a, [[l1, IDLE, 9001, None], [l2, IDLE, 9003, None]], T0 + 3)  # l2 has a new backend
    held = session(lg, pid=6, held=[["pg", 10**9, 10**9, IDLE, 9004]], now=T0 + 4)
    [fence] = lg.close_session(a, T0 + 5)
    assert fence.started == {9001: (T0, T0 + 2), 9003: (T0 + 1, T0 + 3)}
    [fence] = lg.close_session(held, T0 + 6)
    assert fence.started == {9004: (T0 + 4, T0 + 4)}


def test_a_restart_hands_on_when_each_backend_can_have_started() -> None:
    """The next coordinator bounds a lease's backend as this one did: restored
    with no grant time and its pid as if first reported at the restart, any
    backend older than the restart fit, and a pid reused before it (or a wrong
    one, of a connection older than the grant) got someone else's connection
    terminated after the restart."""
    old = ledger(pg=Resource(4, monitor_dsn="postgresql:///x"))
    live, dead = session(old, pid=5), session(old, pid=6)
    l1, l2 = grant(old, live, 1, now=T0), grant(old, dead, 2, now=T0 + 1)
    old.report(live, [[l1, BUSY, 9001, None]], T0 + 2)
    old.report(dead, [[l2, BUSY, 9002, None]], T0 + 3)
    old.close_session(dead, T0 + 4)
    handed = json.loads(json.dumps({"held": old.held_state(), "fenced": old.fenced_state(T0 + 5),
                                    "started": old.started_state(T0 + 5)}))
    assert sorted(handed["started"]) == [[l1, 5.0, 3.0], [l2, 4.0, 2.0]]
    new = Ledger({"pg": Resource(4, monitor_dsn="postgresql:///x")}, hold_until=T0 + 7)
    bad = [["x", 1, 1], [l1, "1", 1], [l1, None, None], [l1, -1.0, 1.0], [l1, 1.0, math.nan],
           [l1, 1, 10**400]]
    new.restore_held(handed["held"], T0 + 5, handed["started"] + bad)  # malformed rows: left out
    [fence] = new.restore_fenced(handed["fenced"], T0 + 5, [], handed["started"])
    assert fence.started == {9002: (T0 + 1, T0 + 3)}
    again = session(new, pid=5, held=[["pg", l1, l1, IDLE, None]], now=T0 + 6)
    [fence] = of(StartFence, new.close_session(again, T0 + 8))
    assert fence.started == {9001: (T0, T0 + 2)}
    # An older marker (no "started"), or a malformed row: bounded by the restart only.
    third = Ledger({"pg": Resource(4, monitor_dsn="postgresql:///x")}, hold_until=T0 + 7)
    [fence] = third.restore_fenced(handed["fenced"], T0 + 5, [], [[l2, "1", 2.0]])
    assert fence.started == {9002: (None, T0 + 5)}


def test_leases_handed_on_by_a_restart_count_in_the_peak() -> None:
    # Before: peak 0 beside leased 3 (sharedpool_peak_leases below sharedpool_leases)
    # until a process re-registered, and for good for a process that died meanwhile.
    new = Ledger({"pg": Resource(4)}, hold_until=T0 + 1.5)
    new.restore_held([["pg", 10, 10, 900, None], ["pg", 11, 11, 900, None]], T0)
    new.restore_fenced([["pg", 12, 12, 901, 5.0, None]], T0)
    [row] = new.snapshot_resources(T0 + 0.1)
    assert (row["leased"], row["fenced"], row["peak"]) == (3, 3, 3)


def test_inspect_fenced_lists_the_slots_status_counts_as_fenced() -> None:
    # Before: status said fenced 3 while `sharedpool leases` listed none of them.
    lg = Ledger({"pg": Resource(4, quarantine_delay=5.0)}, hold_until=T0 + 1.5)
    lg.restore_held([["pg", 10, 10, 900, 4242]], T0)  # a live holder, not re-registered yet
    a = session(lg, pid=901)
    granted(lg.acquire(a, 1, "pg", T0 + 2))
    lg.close_session(a, T0 + 2)  # died holding it: quarantined
    rows = sorted(lg.snapshot_fenced(T0 + 3), key=lambda r: r["id"])
    [res] = lg.snapshot_resources(T0 + 3)
    assert len(rows) == res["fenced"] == 2, (rows, res)
    assert [(r["pid"], r["state"]) for r in rows] == [(900, "awaited"), (901, "fenced")]
    assert rows[0]["id"] == 10
    assert rows[1]["ends_in_s"] == pytest.approx(4.0) and rows[0]["backend_pid"] == 4242
    # Awaited: no bound while its process runs (before: the hold's end plus the
    # delay, shown as "awaited (<= 3.5s)" and then moved on a second at a time).
    assert rows[0]["ends_in_s"] is None
    assert leases_sheet([{**r, "process_name": None, "cmdline": None} for r in rows]).rows[0][5] == "awaited"
    assert lg.snapshot_fenced(T0 + 3, pid=901) == rows[1:] and lg.snapshot_fenced(T0 + 3, "pg", 7) == []
    assert lg.snapshot_leases(T0 + 3) == []  # no session holds them
    lg.tick(T0 + 10, running={900})  # past the hold, its process still runs: still counted
    [row] = lg.snapshot_fenced(T0 + 10)
    assert (row["state"], row["ends_in_s"]) == ("awaited", None), row


def test_a_live_holder_that_has_not_re_registered_keeps_its_leases_counted() -> None:
    """Before: when a restart's hold ended, leases handed on for a process that
    had not re-registered them were fenced as a dead process's and freed after
    quarantine_delay (or fence_timeout), though the process still ran (stopped,
    a gevent hub blocked) with their connections open: PostgreSQL saw 3 at a
    cap of 2. Now they stay counted while it runs, and are fenced once it is gone."""
    running = {900}  # what the server finds running among the awaited pids
    lg = Ledger({"pg": Resource(1, quarantine_delay=0.5)}, hold_until=T0 + 1.5)
    lg.restore_held([["pg", 10, 10, 900, 4242]], T0)
    assert lg.awaited_pids() == {900}
    b = session(lg, pid=901)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
    still = only(StillHeld, lg.tick(T0 + 1.5, running))
    assert (still.resource, still.pid, still.count) == ("pg", 900, 1)
    for t in (3.0, 10.0, 30.0):  # looked at again every second: still running
        assert lg.tick(T0 + t, running) == []
        assert lg.resources["pg"].leased == 1
    assert lg.held_state() == [["pg", 10, 10, 900, 4242]]  # a clean stop hands it on as held
    assert lg.fenced_state(T0 + 30) == []
    running.clear()  # it exits
    fence = only(StartFence, lg.tick(T0 + 31.0, running))
    assert (fence.pid, fence.leases, fence.terminate) == (900, (10,), False)
    assert lg.awaited_pids() == set()
    assert lg.tick(T0 + 31.4) == []  # its quarantine_delay, from when it was seen gone
    assert granted(lg.tick(T0 + 31.6)).session == b


def test_a_live_holder_re_registering_after_the_hold_takes_its_leases_back() -> None:
    lg = Ledger({"pg": Resource(1, quarantine_delay=0.5)}, hold_until=T0 + 1.5)
    lg.restore_held([["pg", 10, 10, 900, None]], T0)
    only(StillHeld, lg.tick(T0 + 1.5, {900}))
    a = session(lg, pid=900, now=T0 + 5, held=[["pg", 10, 10, IDLE, None]])
    assert list(lg.sessions[a].leases) == [10] and not lg.resources["pg"].fenced
    assert lg.tick(T0 + 10) == []
    assert lg.resources["pg"].leased == 1


def test_a_hello_without_the_leases_handed_on_lets_them_go_through_a_fence() -> None:
    """A process that closed its connections while no coordinator was up (the
    releases never arrived) says so by a hello without them: fenced then, not
    kept for as long as it runs."""
    lg = Ledger({"pg": Resource(1, quarantine_delay=0.5)}, hold_until=T0 + 1.5)
    lg.restore_held([["pg", 10, 10, 900, 4242]], T0)
    only(StillHeld, lg.tick(T0 + 1.5, {900}))
    sid, effects = lg.open_session(900, "w", T0 + 5)
    fence = only(StartFence, effects)
    assert (fence.pid, fence.leases) == (900, (10,))
    assert queued(lg.acquire(sid, 1, "pg", T0 + 5, timeout=60))
    assert granted(lg.tick(T0 + 5.6)).session == sid


def test_unfence_frees_early() -> None:
    lg = ledger(pg=Resource(1, quarantine_delay=30))
    a, b = session(lg), session(lg)
    lease = grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=60)
    lg.close_session(a, T0)
    assert lg.unfence("pg", [], T0) == []
    assert granted(lg.unfence("pg", (lease,), T0 + 0.01)).session == b
    assert lg.unfence("pg", (lease,), T0) == []  # again: nothing
    assert lg.unfence("nope", (lease,), T0) == []


def test_fenced_leases_about_to_come_free_spare_the_live_holders() -> None:
    # A dead process's fenced slot serves the waiter once its fence ends:
    # asking a live holder too would close a working connection for nobody.
    lg = ledger(pg=Resource(2, quarantine_delay=1.0))
    a, dead, b = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    grant(lg, a, 1)
    idle(lg, a)
    grant(lg, dead, 1)
    lg.close_session(dead, T0)
    effects = lg.acquire(b, 1, "pg", T0, timeout=5)
    assert queued(effects) and of(AskReclaim, effects) == []
    assert granted(lg.tick(T0 + 1.0)).session == b


def test_a_session_ended_while_its_process_runs_keeps_its_leases_counted() -> None:
    """The coordinator ended the session (a bad frame, not reading), not its
    process: that still has the connections. Fenced for quarantine_delay, the
    slot went to a waiter while PostgreSQL still counted the old backend."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a, b = session(lg, pid=41), session(lg, pid=42)
    lease = granted(lg.acquire(a, 1, "pg", T0)).lease
    lg.report(a, [[lease.id, BUSY, 9001, None]], T0)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
    assert of(StartFence, lg.close_session(a, T0 + 1, ended="not_reading")) == []
    res = lg.resources["pg"]
    assert res.leased == 1 and lg.snapshot_fenced(T0 + 1)[0]["state"] == "awaited"
    assert not of(Granted, lg.tick(T0 + 1 + ALIVE_RECHECK, running={41}))  # still runs: still its
    # It reconnects and re-registers the lease: its own again, the waiter still waits.
    again, effects = lg.open_session(41, "w", T0 + 3, held=[["pg", lease.id, lease.token, IDLE, 9001]])
    assert not of(Granted, effects) and res.fenced == {} and lg.sessions[again].leases
    # Ended again, then it exits: fenced as a dead process's, terminated only once gone.
    lg.close_session(again, T0 + 4, ended="protocol_error")
    [fence] = of(StartFence, lg.tick(T0 + 4 + ALIVE_RECHECK, running=()))
    assert (fence.pid, fence.backend_pids, fence.terminate, fence.ended) == (41, (9001,), False,
                                                                              "protocol_error")
    assert granted(lg.tick(T0 + 4 + ALIVE_RECHECK + 0.05)).session == b


def test_a_session_its_live_process_dropped_is_kept_for_the_grace_only() -> None:
    """Its process dropped the session to reconnect (a coordinator that had not
    read for seconds): fenced at once, its backend was terminated under it or
    its slot given to a waiter while its connection stayed open. Kept for the
    grace; a process still away past it (an exec, a hung reconnect) is fenced
    as a late live one's: not terminated, freed after the fence delay."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a, b = session(lg, pid=41), session(lg, pid=42)
    lease = granted(lg.acquire(a, 1, "pg", T0)).lease
    lg.report(a, [[lease.id, BUSY, 9001, None]], T0)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
    why = DROPPED
    assert lg.close_session(a, T0 + 1, ended=why, grace=1.5) == []
    [row] = lg.snapshot_fenced(T0 + 1.5)  # `inspect fenced`: awaited, until the grace's end
    assert (row["state"], row["ends_in_s"]) == ("awaited", 1.0)
    assert lg.next_deadline() == T0 + 1 + DROPPED_RECHECK  # looked at often within the grace
    assert lg.tick(T0 + 1 + DROPPED_RECHECK, running={41}) == []
    assert lg.next_deadline() == T0 + 1 + DROPPED_RECHECK + DROPPED_RECHECK
    # Back within it: its own again, no fence, the waiter still waits.
    again, effects = lg.open_session(41, "w", T0 + 2, held=[["pg", lease.id, lease.token, IDLE, 9001]])
    assert not of(Granted, effects) and lg.resources["pg"].fenced == {} and lg.sessions[again].leases
    # Dropped again, and not back: at the grace's end, though it runs, fenced.
    assert lg.close_session(again, T0 + 3, ended=why, grace=1.5) == []
    while (at := lg.next_deadline()) is not None and at < T0 + 4.5:
        assert lg.tick(at, running={41}) == []
    assert lg.next_deadline() == T0 + 4.5  # then at its end
    [fence] = of(StartFence, lg.tick(T0 + 4.5, running={41}))
    assert (fence.pid, fence.backend_pids, fence.terminate, fence.ended) == (41, (9001,), False, why)
    assert not of(Granted, lg.tick(T0 + 4.54))
    assert granted(lg.tick(T0 + 4.55)).session == b


def test_a_hello_leaves_another_clients_awaited_leases_of_its_process_alone_for_the_grace() -> None:
    """Two clients in one process (a Client made by hand beside the pools'
    shared one) both lost their sessions. The first one's hello brought only
    its own leases, and the other's were taken as closed: fenced, the slot
    went to a waiter while that client still had its connection. Now they
    stay counted for the grace, for that client to bring them back."""
    lg = ledger(pg=Resource(3, quarantine_delay=0.05))
    pools, mine, other = session(lg, pid=41), session(lg, pid=41), session(lg, pid=42)
    theirs = granted(lg.acquire(pools, 1, "pg", T0)).lease
    own = [granted(lg.acquire(mine, 1 + i, "pg", T0)).lease for i in range(2)]
    assert queued(lg.acquire(other, 1, "pg", T0, timeout=60))
    for sid, ended in ((pools, DROPPED), (mine, "not_reading")):  # a bound, or none
        effects = lg.close_session(sid, T0 + 1, ended=ended, grace=1.5 if ended == DROPPED else None)
        assert not of(StartFence, effects) and not of(Granted, effects)
    # The hand-made client comes back first, with one of its two (it closed the other).
    back, effects = lg.open_session(41, "w", T0 + 1.2, held=[["pg", own[0].id, own[0].token, IDLE, None]],
                                    grace=1.5)
    [closed] = of(StartFence, effects)
    assert closed.leases == (own[1].id,) and not of(Granted, effects)
    fenced = lg.resources["pg"].fenced
    assert set(fenced) == {theirs.id, own[1].id}
    # The closed one's slot goes to the waiter after its fence; the other stays counted.
    effects = lg.tick(T0 + 1.3, running={41})
    assert granted(effects).session == other and not of(StartFence, effects)
    assert set(fenced) == {theirs.id}
    # The pools' client, within the grace: its lease taken back.
    again, effects = lg.open_session(41, "w", T0 + 1.4, held=[["pg", theirs.id, theirs.token, IDLE, None]],
                                     grace=1.5)
    assert effects == [] and set(lg.sessions[again].leases) == {theirs.id} and fenced == {}


def test_leases_awaited_from_a_session_no_hello_brings_back_are_fenced_at_the_grace_end() -> None:
    """A hello that brings none of a session's awaited leases bounds them (it
    may be another client of the process): not back within the grace, they
    are fenced though the process runs, as a late live process's. With no
    grace (restart_grace = 0) they are fenced at once, as before."""
    for grace in (1.5, 0.0):
        lg = ledger(pg=Resource(1, quarantine_delay=0.05))
        a, b = session(lg, pid=41), session(lg, pid=42)
        lease = granted(lg.acquire(a, 1, "pg", T0)).lease
        assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
        assert lg.close_session(a, T0, ended="not_reading") == []  # counted while it runs
        _, effects = lg.open_session(41, "other client", T0 + 1, grace=grace)
        if grace:
            assert effects == []
            while (at := lg.next_deadline()) is not None and at < T0 + 2.5:
                assert lg.tick(at, running={41}) == []
            effects = lg.tick(T0 + 2.5, running={41})
        [fence] = of(StartFence, effects)
        assert (fence.leases, fence.terminate, fence.ended) == ((lease.id,), False, "not_reading")


def ticked(lg: Ledger, until: float, running: set[int]) -> list[Effect]:
    """Every tick the server would run up to ``until``, ``running`` the pids alive."""
    effects: list[Effect] = []
    while (at := lg.next_deadline()) is not None and at <= until:
        effects += lg.tick(at, running & lg.awaited_pids())
    return effects


def test_a_session_none_of_whose_leases_came_back_is_forgotten_after_the_grace() -> None:
    """One client, its session ended by the coordinator (counted while it
    runs), back without its leases (closed meanwhile): kept for the grace,
    then fenced and gone; nothing of it stays awaited, the slot is served."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a, b = session(lg, pid=41), session(lg, pid=42)
    lease = granted(lg.acquire(a, 1, "pg", T0)).lease
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
    assert lg.close_session(a, T0, ended="not_reading") == []
    assert lg.open_session(41, "w", T0 + 1, grace=1.5)[1] == []
    assert ticked(lg, T0 + 2.49, {41}) == []
    effects = ticked(lg, T0 + 10, {41})
    assert [f.leases for f in of(StartFence, effects)] == [(lease.id,)]
    assert granted(effects).session == b
    assert lg.awaited_pids() == set() and lg.resources["pg"].fenced == {}


def test_a_process_that_dies_with_another_client_connected_frees_both_clients_slots() -> None:
    """The hand-made client's session is open while the other client's leases
    are kept for the grace, and the process dies: that session closes as a dead
    one's, the kept leases are fenced at the next look; every slot comes back."""
    lg = ledger(pg=Resource(2, quarantine_delay=0.05))
    pools, other = session(lg, pid=41), session(lg, pid=42)
    granted(lg.acquire(pools, 1, "pg", T0))
    lg.close_session(pools, T0, ended="not_reading")
    mine, effects = lg.open_session(41, "made by hand", T0 + 1, grace=1.5)
    assert effects == []
    granted(lg.acquire(mine, 1, "pg", T0 + 1))
    assert queued(lg.acquire(other, 1, "pg", T0 + 1, timeout=60))
    effects = lg.close_session(mine, T0 + 1.1)  # died: not ended while it runs
    effects += ticked(lg, T0 + 1.2, set())
    assert len(of(StartFence, effects)) == 2 and lg.awaited_pids() == set()
    effects += ticked(lg, T0 + 5, set())
    assert [g.session for g in of(Granted, effects)] == [other] and lg.resources["pg"].fenced == {}


def test_leases_kept_for_another_client_in_a_restart_hold_wait_for_its_end() -> None:
    """A session ended in a restart's hold, another client of its process back
    without its leases: bounded by the grace, but not looked at before the hold
    ends; a clean stop meanwhile hands them on as bounded (dropped)."""
    lg = Ledger({"pg": Resource.coerce("pg", Resource(2, quarantine_delay=0.05))}, hold_until=T0 + 1.5)
    sid, _ = lg.open_session(41, "w", T0, held=[["pg", 7, 7, IDLE, None]])
    assert lg.close_session(sid, T0 + 0.1, ended="not_reading") == []
    assert lg.dropped_state() == []
    assert lg.open_session(41, "made by hand", T0 + 0.2, grace=1.5)[1] == []
    assert lg.dropped_state() == [7] and lg.resources["pg"].fenced[7].until >= T0 + 1.55
    assert not of(StartFence, ticked(lg, T0 + 1.6, {41}))
    assert 7 in lg.resources["pg"].fenced  # its bound (T0 + 1.7) not passed
    assert [f.leases for f in of(StartFence, ticked(lg, T0 + 10, {41}))] == [(7,)]
    assert lg.awaited_pids() == set() and lg.resources["pg"].fenced == {}


def test_leases_kept_for_another_client_of_a_removed_resource() -> None:
    """A reload removed the resource of leases awaited from an ended session:
    a hello that brings none of them bounds them (the resource is kept while
    they count), then it is forgotten."""
    lg = ledger(pg=Resource(2, quarantine_delay=0.05))
    a = session(lg, pid=41)
    granted(lg.acquire(a, 1, "pg", T0))
    lg.close_session(a, T0, ended="not_reading")
    lg.remove("pg", T0 + 0.5)
    assert lg.open_session(41, "made by hand", T0 + 1, grace=1.5)[1] == []
    ticked(lg, T0 + 10, {41})
    assert "pg" not in lg.resources and lg.awaited_pids() == set()


def test_a_process_that_drops_its_session_as_it_exits_gets_its_slots_back_promptly() -> None:
    """Python's finalizers close a client's socket outright at exit, before the
    kernel marks the process exiting: the coordinator reads it as a drop to
    reconnect. Looked at again only after ALIVE_RECHECK, the slot of every such
    exit came back a second late (I2)."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a, b = session(lg, pid=41), session(lg, pid=42)
    granted(lg.acquire(a, 1, "pg", T0))
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=60))
    assert lg.close_session(a, T0, ended=DROPPED, grace=1.5) == []
    # Gone at the first look, well within ALIVE_RECHECK: fenced then.
    [fence] = of(StartFence, lg.tick(T0 + 0.1, running=()))
    assert (fence.pid, fence.terminate) == (41, False)
    assert granted(lg.tick(T0 + 0.1 + 0.05)).session == b


def test_a_dropped_sessions_leases_keep_their_bound_across_a_clean_stop() -> None:
    """Handed on as plain held leases, a dropped session's were counted by the
    next coordinator for as long as their process ran: one that exec'd (its
    connections closed) kept its slot for good. Now the restart hold is its
    time to re-register them; a plain live holder's are still kept."""
    old = ledger(pg=Resource(2, quarantine_delay=0.05))
    dropper, holder = session(old, pid=41), session(old, pid=42)
    dropped = granted(old.acquire(dropper, 1, "pg", T0)).lease
    granted(old.acquire(holder, 1, "pg", T0))
    old.close_session(dropper, T0 + 1, ended=DROPPED, grace=1.5)
    assert old.dropped_state() == [dropped.id]
    new = Ledger({"pg": Resource(2, quarantine_delay=0.05)}, hold_until=T0 + 3)
    assert new.restore_held(old.held_state(), T0 + 1.5, dropped=old.dropped_state()) == []
    effects = new.tick(T0 + 3, running={41, 42})  # both still run at the hold's end
    assert [e.pid for e in of(StillHeld, effects)] == [42]
    [fence] = of(StartFence, effects)
    assert (fence.pid, fence.leases, fence.terminate) == (41, (dropped.id,), False)
    assert fence.ended == DROPPED


def test_close_session_withdraws_its_waiters() -> None:
    lg = ledger(pg=1)
    a, b, c = session(lg), session(lg), session(lg)
    lease = grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    lg.acquire(c, 1, "pg", T0, timeout=5)
    assert lg.close_session(b, T0) == []  # no answer to a dead session
    assert granted(lg.release(a, lease, T0)).session == c
    assert lg.tick(T0 + 10) == []


def test_reregistration_beyond_the_cap_blocks_grants_until_below() -> None:
    lg = ledger(pg=2)
    held = [["pg", 501, 501, IDLE, 11], ["pg", 502, 502, BUSY, None], ["pg", 503, 503, "new", None]]
    a, effects = lg.open_session(1, "w", T0, held=held)
    assert effects == [AskReclaim(a, "pg", 1, 0.0)]  # the excess is asked back at once
    b = session(lg, pid=2)
    res = lg.resources["pg"]
    assert res.leased == 3 and res.peak == 3
    leases = lg.sessions[a].leases
    assert [leases[i].state for i in (501, 502, 503)] == [IDLE, BUSY, NEW]
    assert leases[501].backend_pid == 11
    assert only(Denied, lg.acquire(b, 1, "pg", T0, timeout=0)).reason == "timeout"
    lg.acquire(b, 2, "pg", T0, timeout=10)
    assert of(Granted, lg.release(a, 501, T0)) == []  # 2 of 2: still at the cap
    g = granted(lg.release(a, 502, T0))
    assert g.session == b and g.lease.id > 503  # ids keep growing past re-registered ones


@pytest.mark.parametrize(
    "entry",
    [
        "pg",  # not a list
        ["pg", 1, 1, "idle"],  # too short
        ["nope", 1, 1, "idle", None],  # unknown resource
        [["pg"], 1, 1, "idle", None],  # unhashable resource (used to raise TypeError)
        ["pg", "1", 1, "idle", None],  # lease id not an int
        ["pg", True, 1, "idle", None],  # bool is not an id
        ["pg", 1, "x", "idle", None],  # token not an int (used to raise ValueError)
        ["pg", 1, 1.5, "idle", None],
        ["pg", -1, 1, "idle", None],
        ["pg", MAX_ID, 1, "idle", None],  # would push new ids past what msgpack holds
        ["pg", MAX_ID - 1, 1, "idle", None],  # so would this: the next grant would be MAX_ID
        ["pg", 1, MAX_ID - 1, "idle", None],
        ["pg", 1, 2**64 - 1, "idle", None],
    ],
)
def test_bad_held_entries_are_problems_not_crashes(entry: Any) -> None:
    lg = ledger(pg=2)
    sid, effects = lg.open_session(1, "w", T0, held=[entry, ["pg", 9, 9, "idle", None]])
    prob, *revoked = effects
    assert isinstance(prob, Problem) and prob.code == "bad_held" and prob.session == sid
    assert len(prob.message) < 200
    # A lease that can be named is revoked: its connection counts nowhere now.
    lease_id = entry[1] if isinstance(entry, list) and len(entry) == 5 else None
    if isinstance(lease_id, int) and not isinstance(lease_id, bool) and 0 <= lease_id < 2**64:
        [revoke] = revoked
        assert isinstance(revoke, Notify) and revoke.session == sid and revoke.verb == "revoke"
        assert revoke.args["lease"] == lease_id
        assert revoke.resource == (entry[0] if isinstance(entry[0], str) else None)
    else:
        assert revoked == []
    assert list(lg.sessions[sid].leases) == [9]  # the good entry still counts
    assert granted(lg.acquire(sid, 1, "pg", T0)).lease.id == 10


def test_re_registered_ids_leave_room_for_the_ids_granted_after_them() -> None:
    # Before, a hello could re-register 2**63 - 1: every later grant got an id
    # past MAX_ID, which the next coordinator refused to take back without a
    # revoke, so the process kept a connection no cap counted.
    lg = ledger(pg=3)
    sid, _ = lg.open_session(1, "w", T0, held=[["pg", MAX_HELD_ID - 1, 5, "idle", None]])
    assert list(lg.sessions[sid].leases) == [MAX_HELD_ID - 1]
    later = granted(lg.acquire(sid, 1, "pg", T0)).lease.id
    assert MAX_HELD_ID <= later < MAX_ID
    other = ledger(pg=1)  # the next coordinator: a lease it cannot take back is always revoked
    sid2, effects = other.open_session(1, "w", T0, held=[["pg", later, 6, "idle", None]])
    assert of(Notify, effects) and of(Notify, effects)[0].args["lease"] == later
    assert lg.sessions[sid].leases and not other.sessions[sid2].leases


def test_a_hello_entry_too_deep_to_describe_is_a_problem_not_a_crash() -> None:
    # Before, the repr() of a 1000-deep entry raised RecursionError half-way
    # through open_session, leaving a session nobody would ever close.
    deep: Any = 0
    for _ in range(1000):
        deep = [deep]
    lg = ledger(pg=2)
    sid, effects = lg.open_session(1, "w", T0, held=[["pg", 9, 9, "idle", None], deep])
    [prob] = of(Problem, effects)
    assert prob.code == "bad_held" and len(prob.message) < 200
    assert list(lg.sessions[sid].leases) == [9]


def test_a_lease_held_by_another_process_cannot_be_claimed() -> None:
    lg = ledger(pg=Resource(2, quarantine_delay=1))
    a = session(lg, pid=1)
    lease = grant(lg, a, 1)
    token = lg.sessions[a].leases[lease].token
    def claim(pid: int, token: int) -> tuple[int, Problem]:
        sid, effects = lg.open_session(pid, "claimant", T0, held=[["pg", lease, token, IDLE, None]])
        prob, revoke = effects  # refused, and the claimant told to close that connection
        assert isinstance(revoke, Notify) and (revoke.verb, revoke.resource) == ("revoke", "pg")
        assert revoke.session == sid and revoke.args["lease"] == lease
        assert isinstance(prob, Problem)
        return sid, prob

    sid, prob = claim(2, token)
    assert prob.code == "bad_held" and lg.sessions[sid].leases == {}
    lg.close_session(a, T0)  # fenced now: still not another process's
    assert claim(2, token)[1].code == "bad_held"
    assert claim(1, token + 1)[1].code == "bad_held"  # the same process, but a wrong token
    sid, effects = lg.open_session(1, "same process", T0, held=[["pg", lease, token, IDLE, None]])
    assert effects == [] and lg.resources["pg"].live[lease].session == sid  # taken back
    assert lg.resources["pg"].fenced == {}


def test_reconnect_during_the_fence_takes_the_lease_back() -> None:
    """Regression: a process whose session was dropped (e.g. it stopped
    reading) reconnects and re-registers the connection it still holds. The
    fenced lease was refused as a duplicate, then freed by the fence's end and
    granted elsewhere: one connection over the cap."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a = session(lg, pid=1)
    g = granted(lg.acquire(a, 1, "pg", T0)).lease
    lg.close_session(a, T0 + 1)
    a2 = session(lg, pid=1, now=T0 + 1.02, held=[["pg", g.id, g.token, IDLE, 77]])
    res = lg.resources["pg"]
    assert res.fenced == {} and res.live[g.id].session == a2 and res.leased == 1
    assert lg.sessions[a2].leases[g.id].backend_pid == 77
    b = session(lg, pid=2)
    assert lg.tick(T0 + 2) == []
    assert only(Denied, lg.acquire(b, 1, "pg", T0 + 2, timeout=0)).reason == "timeout"
    lg.acquire(b, 2, "pg", T0 + 2, timeout=5)
    assert granted(lg.release(a2, g.id, T0 + 2)).session == b


def test_reconnect_before_the_old_session_is_noticed_gone() -> None:
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a = session(lg, pid=1)
    g = granted(lg.acquire(a, 1, "pg", T0)).lease
    a2 = session(lg, pid=1, held=[["pg", g.id, g.token, BUSY, None]])
    assert lg.sessions[a].leases == {} and lg.sessions[a].held("pg") == 0
    assert lg.close_session(a, T0) == []  # nothing left to fence
    assert lg.resources["pg"].live[g.id].session == a2


def test_lease_ids_and_tokens_strictly_grow() -> None:
    lg = Ledger({"pg": Resource(3, quarantine_delay=0)}, id_base=5000)
    a = session(lg)
    seen = []
    for req in range(20):
        lease = granted(lg.acquire(a, req, "pg", T0)).lease
        assert lease.id == lease.token
        seen.append(lease.id)
        lg.release(a, lease.id, T0)
    assert seen[0] == 5000 and seen == sorted(set(seen))
    session(lg, pid=9, held=[["pg", 10_000, 20_000, IDLE, None]])
    assert grant(lg, a, 99) > 20_000


# ------------------------------------------------------------------- reclaim


def test_reclaim_asks_the_session_holding_idle_leases() -> None:
    lg = ledger(pg=2)
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    lc = grant(lg, c, 1)
    lg.report(a, [[lid, BUSY, None, None] for lid in lg.sessions[a].leases], T0)
    idle(lg, c)
    assert lg.acquire(b, 1, "pg", T0, timeout=5) == [AskReclaim(c, "pg", 1)]
    assert granted(lg.release(c, lc, T0)).session == b  # asked and given: no withdrawal
    assert lg.sessions[c].asked["pg"] == 0 and lg.resources["pg"].reclaims == 1


def test_a_completed_give_back_says_nothing_is_owed_any_more() -> None:
    # A count sent while some of the session's releases were still on their
    # way is too high once they arrive; the process went on owing a lease the
    # coordinator no longer asked for (and closed a connection at checkin for
    # nobody). The release that ends what was asked says 0.
    lg = ledger(pg=3)
    a = session(lg)
    la = [grant(lg, a, req) for req in range(3)]
    lg.resize("pg", 1, T0)  # two of a's leases are asked back
    assert lg.sessions[a].asked["pg"] == 2
    assert of(AskReclaim, lg.release(a, la[0], T0)) == []  # one still asked
    assert of(AskReclaim, lg.release(a, la[1], T0)) == [AskReclaim(a, "pg", 0)]
    assert lg.sessions[a].asked["pg"] == 0
    assert of(AskReclaim, lg.release(a, la[2], T0)) == []  # never asked for: nothing to say


def test_reclaim_is_withdrawn_when_the_waiter_is_served_elsewhere() -> None:
    lg = ledger(pg=2)
    a, b, c = session(lg), session(lg), session(lg)
    la = grant(lg, a, 1)
    grant(lg, c, 1)
    idle(lg, c)
    assert lg.acquire(b, 1, "pg", T0, timeout=5) == [AskReclaim(c, "pg", 1)]
    effects = lg.release(a, la, T0)
    assert granted(effects).session == b
    assert of(AskReclaim, effects) == [AskReclaim(c, "pg", 0)]


def test_reclaim_is_withdrawn_when_the_waiter_times_out() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    idle(lg, a)
    assert lg.acquire(b, 1, "pg", T0, timeout=1) == [AskReclaim(a, "pg", 1)]
    effects = lg.tick(T0 + 1)
    assert of(Denied, effects)[0].reason == "timeout"
    assert of(AskReclaim, effects) == [AskReclaim(a, "pg", 0)]


def test_reclaim_is_withdrawn_when_the_waiter_cancels_or_dies() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=9)
    assert lg.cancel(b, 1, T0) == [AskReclaim(a, "pg", 0)]
    lg.acquire(b, 2, "pg", T0, timeout=9)
    assert lg.close_session(b, T0) == [AskReclaim(a, "pg", 0)]


def test_reclaim_prefers_idle_then_bigger_holders() -> None:
    lg = ledger(pg=4)
    a, b, c, w = (session(lg) for _ in range(4))
    for sid, n in ((a, 2), (b, 1), (c, 1)):
        for req in range(n):
            grant(lg, sid, req)
    assert lg.acquire(w, 1, "pg", T0, timeout=5) == [AskReclaim(a, "pg", 1)]  # the biggest
    assert idle(lg, c) == [AskReclaim(a, "pg", 0), AskReclaim(c, "pg", 1)]  # idle wins


def test_reclaim_asks_for_one_per_servable_waiter() -> None:
    lg = ledger(pg=Resource(3, max_per_process=2))
    a, x, w = session(lg), session(lg), session(lg)
    grant(lg, a, 1), grant(lg, a, 2), grant(lg, x, 1)
    for req in (1, 2, 3):  # the third is past w's own cap: nobody is asked for it
        assert queued(lg.acquire(w, req, "pg", T0, timeout=5))
    assert {sid: s.asked.get("pg", 0) for sid, s in lg.sessions.items()} == {a: 2, x: 0, w: 0}


def test_min_per_process_is_never_asked_for() -> None:
    lg = ledger(pg=Resource(2, min_per_process=1))
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    grant(lg, c, 1)
    idle(lg, a), idle(lg, c)
    assert lg.acquire(b, 1, "pg", T0, timeout=5) == []  # each holds only its floor
    lg2 = ledger(pg=Resource(2, min_per_process=1))
    a, b = session(lg2), session(lg2)
    grant(lg2, a, 1), grant(lg2, a, 2)
    assert lg2.acquire(b, 1, "pg", T0, timeout=5) == [AskReclaim(a, "pg", 1)]


@pytest.mark.parametrize("limits", [Resource(1, min_per_process=1),
                                    Resource(3, max_per_process=1, min_per_process=1)])
def test_a_process_at_its_floor_gives_an_idle_lease_to_its_own_waiter(limits: Resource) -> None:
    """min_per_process is the process's floor, not a pool's: one pool sits on the
    floor's lease idle while another pool of the process waits (at the cap, or
    at max_per_process). It gives the idle one up for that acquire and keeps its
    floor; before, it was never asked, and the other pool's acquire timed out."""
    lg = ledger(pg=limits)
    a, b = session(lg, pid=1), session(lg, pid=2)
    lease = grant(lg, a, 1)
    idle(lg, a)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=5))
    assert asked(lg) == {a: 1, b: 0}
    if limits.max_size == 1:  # another process behind it waits; it takes no floor
        assert queued(lg.acquire(b, 1, "pg", T0 + 0.001, timeout=5))
    assert granted(lg.release(a, lease, T0 + 0.1)).session == a
    assert asked(lg) == {a: 0, b: 0}


def test_the_head_alone_in_line_is_asked_for_idle_leases_only() -> None:
    """Its give-back comes back to it whatever it gives: a busy one given at
    checkin would be a close and a connect for its own waiter (one pool with
    more threads than the cap). With another process in line it is asked with
    the quantum, as before: a give-back then goes to that one."""
    lg = ledger(pg=Resource(2, fairness_quantum=0.1))
    a, b = session(lg, pid=1), session(lg, pid=2)
    grant(lg, a, 1), grant(lg, a, 2)
    lg.report(a, [[lid, IDLE if lid == min(lg.sessions[a].leases) else BUSY, None, None]
                  for lid in lg.sessions[a].leases], T0)
    assert of(AskReclaim, lg.acquire(a, 3, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert of(AskReclaim, lg.acquire(b, 1, "pg", T0 + 0.001, timeout=5)) == [AskReclaim(a, "pg", 1, 0.1)]


def test_a_lease_let_go_under_the_floor_goes_to_its_holders_own_waiter() -> None:
    """A process under its floor that lets a lease go while a pool of it waits
    (a sibling pool's give-back at checkin, a broken connection) gets it back
    for that waiter: another process queued ahead took it from under the floor."""
    lg = ledger(pg=Resource(2, min_per_process=1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    lease = grant(lg, a, 1)
    grant(lg, c, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    assert queued(lg.acquire(a, 2, "pg", T0 + 0.001, timeout=5))
    assert granted(lg.release(a, lease, T0 + 0.1)).session == a


def test_the_head_at_its_floor_is_asked_for_idle_leases_only_whoever_waits_behind() -> None:
    """A lease it gives back under its floor comes back to its own waiter
    (the keeper), so the head at its floor is asked for idle ones only, as when
    alone in line. Asked with the quantum once another process queued behind
    it, a busy pool whose idle report was a moment old gave a busy connection
    back at its checkin and was granted the slot straight back: a close and a
    connect for nothing, the process behind served no sooner."""
    lg = ledger(pg=Resource(2, min_per_process=1, fairness_quantum=0.1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    lease = grant(lg, a, 1)
    grant(lg, b, 1)
    idle(lg, a)  # a moment old: reports are coalesced
    assert of(AskReclaim, lg.acquire(a, 2, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert of(AskReclaim, lg.acquire(c, 1, "pg", T0 + 0.001, timeout=5)) == []
    assert lg.sessions[a].idle_only == {"pg"}
    assert granted(lg.release(a, lease, T0 + 0.2)).session == a
    # Above its floor, what it gives first goes to the process behind it: the quantum.
    lg = ledger(pg=Resource(3, min_per_process=1, fairness_quantum=0.1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    grant(lg, a, 1), grant(lg, a, 2)
    grant(lg, b, 1)
    idle(lg, a)
    assert queued(lg.acquire(a, 3, "pg", T0, timeout=5))
    assert of(AskReclaim, lg.acquire(c, 1, "pg", T0 + 0.001, timeout=5)) == [AskReclaim(a, "pg", 2, 0.1)]


def test_a_process_at_its_floor_is_asked_only_for_its_own_waiters() -> None:
    """Only the head's and a blocked process's waiters take back a lease given
    under the floor: asked for the head's need, a waiter behind it would give
    back a lease that comes back to it, serving nobody ahead."""
    lg = ledger(pg=Resource(2, min_per_process=1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    grant(lg, a, 1)
    grant(lg, c, 1)
    idle(lg, c)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=5))
    assert queued(lg.acquire(b, 1, "pg", T0 + 0.001, timeout=5))
    assert queued(lg.acquire(c, 2, "pg", T0 + 0.002, timeout=5))
    assert asked(lg) == {a: 0, b: 0, c: 0}
    # Held back by its own max_per_process, one is asked for its idle lease for
    # its own waiter only (not for the head's need): it comes back to it.
    lg = ledger(pg=Resource(2, max_per_process=1, min_per_process=1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    lease = grant(lg, a, 1)
    grant(lg, c, 1)
    idle(lg, a)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=5))
    assert of(AskReclaim, lg.acquire(a, 2, "pg", T0 + 0.001, timeout=5)) == [
        AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert granted(lg.release(a, lease, T0 + 0.1)).session == a


def test_a_waiting_holder_is_asked_unless_it_is_next_in_line() -> None:
    lg = ledger(pg=2)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    grant(lg, b, 1)
    assert lg.acquire(a, 2, "pg", T0, timeout=5) == [AskReclaim(b, "pg", 1)]
    # b queues too: it is still asked (a is next in line, b is not), and a is
    # asked for b's waiter, but not for its own.
    assert of(AskReclaim, lg.acquire(b, 2, "pg", T0, timeout=5)) == []
    assert lg.sessions[a].asked.get("pg", 0) == 0 and lg.sessions[b].asked["pg"] == 1


def test_the_head_session_is_asked_for_what_it_holds_idle() -> None:
    """Two pools of one process on one resource: one sits on idle connections
    while the other waits. The process is asked for its idle leases (not its
    busy ones), idle ones only (its own waiter is alone in line: a busy one
    given at checkin would come straight back), and the lease it gives back
    goes to its own waiter."""
    lg = ledger(pg=3)
    a, b = session(lg), session(lg)
    l1, l2 = grant(lg, a, 1), grant(lg, a, 2)
    grant(lg, b, 1)
    lg.report(a, [[l1, IDLE, None, None], [l2, BUSY, None, None]], T0)
    lg.report(b, [[lid, BUSY, None, None] for lid in lg.sessions[b].leases], T0)
    assert of(AskReclaim, lg.acquire(a, 3, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert granted(lg.release(a, l1, T0 + 0.01)).session == a
    assert lg.sessions[a].asked.get("pg", 0) == 0
    # With nothing idle, the waiting session is not asked for its busy leases
    # (b, busy and not waiting, is: it gives back at checkin).
    assert of(AskReclaim, lg.acquire(a, 4, "pg", T0, timeout=5)) == [AskReclaim(b, "pg", 1)]
    assert lg.sessions[a].asked.get("pg", 0) == 0


def test_a_session_at_max_per_process_is_asked_for_what_it_holds_idle() -> None:
    """Two pools of one process, at its max_per_process: one sits on idle
    connections, the other waits (not servable: held back by its own cap). The
    process is asked for its idle leases, and what it gives back comes back to
    its waiter; a busy lease is not asked for, and the ask is for idle ones only
    (IDLE_ONLY): an idle report may be a moment old, and a busy one given back
    at its checkin would only come back to this waiter."""
    lg = ledger(pg=Resource(4, max_per_process=2))
    a = session(lg)
    l1, l2 = grant(lg, a, 1), grant(lg, a, 2)
    lg.report(a, [[l1, IDLE, None, None], [l2, BUSY, None, None]], T0)
    assert of(AskReclaim, lg.acquire(a, 3, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert of(AskReclaim, lg.acquire(a, 4, "pg", T0, timeout=5)) == []  # one idle: one asked
    assert granted(lg.release(a, l1, T0 + 0.01)).req == 3
    assert lg.sessions[a].asked.get("pg", 0) == 0
    lg.report(a, [[l2, BUSY, None, None]], T0 + 0.01)
    assert lg.sessions[a].asked.get("pg", 0) == 0


def test_the_head_session_is_asked_for_no_more_than_it_holds_idle() -> None:
    """As above, with two waiting: the head is still asked for its one idle
    lease only. Alone in line, idle ones only (a busy one given back would come
    straight back to it); with another behind it, with the quantum: what it
    gives then goes to that one."""
    lg = ledger(pg=3)
    a, b = session(lg), session(lg)
    l1, l2, l3 = grant(lg, a, 1), grant(lg, a, 2), grant(lg, a, 3)
    lg.report(a, [[l1, IDLE, None, None], [l2, BUSY, None, None], [l3, BUSY, None, None]], T0)
    assert of(AskReclaim, lg.acquire(a, 4, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    assert of(AskReclaim, lg.acquire(b, 1, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1)]
    assert lg.sessions[a].asked["pg"] == 1


def test_a_shrink_asks_the_head_session_for_its_excess_even_if_all_busy() -> None:
    """Over the cap after a resize, the process first in line, holding every
    lease busy, is asked for the excess as any holder is: spared, the cap
    would stay broken until it happened to let go."""
    lg = ledger(pg=2)
    a = session(lg)
    leases = [grant(lg, a, 1), grant(lg, a, 2)]
    lg.report(a, [[lid, BUSY, None, None] for lid in leases], T0)
    assert queued(lg.acquire(a, 3, "pg", T0, timeout=5))
    assert AskReclaim(a, "pg", 2, 0.0) in of(AskReclaim, lg.resize("pg", 1, T0))


def test_reclaim_asks_first_the_holder_of_the_oldest_idle_lease() -> None:
    """Equal holders, each with two idle leases: the one whose oldest idle lease
    is older is asked, though its newest is the newest of all (a lease in its
    first turn is kept a while; the old one goes at once)."""
    lg = ledger(pg=4)
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    for sid, times in ((a, (T0 + 2, T0 + 3)), (b, (T0, T0 + 5))):
        for req, t in enumerate(times):
            grant(lg, sid, req, now=t)
        idle(lg, sid, T0 + 5)
    assert of(AskReclaim, lg.acquire(c, 1, "pg", T0 + 6, timeout=5)) == [AskReclaim(b, "pg", 1)]


def test_an_idle_only_ask_becomes_a_plain_one_when_another_process_waits() -> None:
    """Asked for its idle lease only (its own waiter is held back by its
    max_per_process), a process is asked again, for the same count, once a
    waiter of another process needs that lease: then a busy one may go at its
    checkin, or the other waits on a report of an idle lease that never comes."""
    lg = ledger(pg=Resource(3, max_per_process=2))
    a, b = session(lg), session(lg)
    l1, l2 = grant(lg, a, 1), grant(lg, a, 2)
    grant(lg, b, 1)
    lg.report(a, [[l1, IDLE, None, None], [l2, BUSY, None, None]], T0)
    assert of(AskReclaim, lg.acquire(a, 3, "pg", T0, timeout=5)) == [AskReclaim(a, "pg", 1, IDLE_ONLY)]
    asks = of(AskReclaim, lg.acquire(b, 2, "pg", T0, timeout=5))
    assert [(e.session, e.count) for e in asks] == [(a, 1)]
    assert asks[0].quantum != IDLE_ONLY
    assert not lg.sessions[a].idle_only


def test_busy_holders_that_also_wait_cannot_starve_an_empty_session() -> None:
    """Three sessions hold a lease each and queue for more; a fourth holds none.
    Each give-back serves the head waiter, so the fourth is served in turn."""
    lg = ledger(pg=3)
    holders = [session(lg) for _ in range(3)]
    for i, s in enumerate(holders):
        grant(lg, s, i + 1)
    req = 100
    for s in holders:
        lg.acquire(s, req, "pg", T0, timeout=60)
        req += 1
    x = session(lg)
    lg.acquire(x, 1, "pg", T0, timeout=60)
    served_x = False
    for _ in range(10):  # each round: an asked session gives one lease back at checkin
        asked = [sid for sid, sess in lg.sessions.items() if sess.asked.get("pg", 0) > 0]
        assert asked, "nobody was asked to give a lease back: the waiters would starve"
        giver = lg.sessions[asked[0]]
        lease_id = next(lid for lid, lease in giver.leases.items() if lease.resource == "pg")
        effects = lg.release(giver.id, lease_id, T0)
        granted = of(Granted, effects)
        assert len(granted) == 1
        if granted[0].session == x:
            served_x = True
            break
        lg.acquire(granted[0].session, req, "pg", T0, timeout=60)  # it wants more again
        req += 1
    assert served_x


def test_resize_down_asks_for_the_excess() -> None:
    lg = ledger(pg=4)
    a, b, w = session(lg), session(lg), session(lg)
    la = [grant(lg, a, i) for i in range(3)]
    grant(lg, b, 1)
    effects = lg.resize("pg", 2, T0)
    assert {e.session for e in of(Notify, effects)} == {a, b, w}
    assert of(Notify, effects)[0].args == {"max_size": 2} and of(Notify, effects)[0].verb == "resize"
    assert of(AskReclaim, effects) == [AskReclaim(a, "pg", 2, 0.0)]
    assert lg.resources["pg"].limits.max_size == 2
    lg.acquire(w, 1, "pg", T0, timeout=5)
    assert of(Granted, lg.release(a, la[0], T0)) == []  # 3 of 2
    assert of(Granted, lg.release(a, la[1], T0)) == []  # 2 of 2
    assert granted(lg.release(a, la[2], T0)).session == w


def test_an_excess_over_a_shrunk_cap_is_asked_back_with_no_quantum() -> None:
    """Over the cap, a busy lease goes at its next checkin, not once it is a
    fairness quantum old: with fairness_quantum = 10, a resize from 8 to 2
    kept PostgreSQL at 8 backends for 7.8 s. Back under the cap, waiters'
    turns take the configured quantum again."""
    lg = ledger(pg=Resource(max_size=4, fairness_quantum=10))
    a, w = session(lg), session(lg)
    leases = [grant(lg, a, i) for i in range(4)]
    lg.report(a, [[lid, BUSY, None, None] for lid in leases], T0)
    lg.acquire(w, 1, "pg", T0, timeout=60)
    assert of(AskReclaim, lg.resize("pg", 2, T0)) == [AskReclaim(a, "pg", 3, 0.0)]
    assert lg.release(a, leases[0], T0) == []  # still over: one give-back less owed, no frame
    # At the cap: what is still owed is the waiter's turn, a quantum again.
    assert lg.release(a, leases[1], T0) == [AskReclaim(a, "pg", 1, 10.0)]
    assert of(Granted, lg.release(a, leases[2], T0))[0].session == w
    # A reload that shrinks the cap does the same.
    assert of(AskReclaim, lg.set_limits("pg", Resource(max_size=1, fairness_quantum=10), T0)) == [
        AskReclaim(a, "pg", 1, 0.0)]



def test_the_no_quantum_of_an_excess_does_not_outlive_it() -> None:
    """Back under the cap, a waiter's turn is asked with the quantum in force,
    not the 0 of the excess: none while no hand-off cost is known."""
    lg = ledger(pg=1)
    held = [["pg", 501, 501, BUSY, None], ["pg", 502, 502, BUSY, None]]
    a, effects = lg.open_session(1, "w", T0, held=held)
    assert effects == [AskReclaim(a, "pg", 1, 0.0)]
    assert lg.release(a, 501, T0) == [AskReclaim(a, "pg", 0, None)]  # at the cap: nothing owed
    w = session(lg, pid=2)
    assert only(AskReclaim, lg.acquire(w, 1, "pg", T0, timeout=5)) == AskReclaim(a, "pg", 1, None)
    assert lg.report(w, [], T0, costs={"pg": 0.004}) == [AskReclaim(a, "pg", 1, auto_quantum(0.004))]

def test_resize_up_serves_waiters_and_bad_sizes_are_config_errors() -> None:
    lg = ledger(pg=Resource(1, min_per_process=1))
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    assert granted(lg.resize("pg", 2, T0)).session == b
    with pytest.raises(ConfigError) as info:
        lg.resize("pg", 0, T0)
    assert info.value.field == "max_size"
    with pytest.raises(KeyError):
        lg.resize("nope", 3, T0)


# ------------------------------------------------------------------- admin


def test_pause_queues_and_resume_serves() -> None:
    lg = ledger(pg=2)
    a, b = session(lg), session(lg)
    effects = lg.pause("pg")
    notified = {(n.session, n.verb, n.resource) for n in of(Notify, effects)}
    assert notified == {(a, "pause", "pg"), (b, "pause", "pg")}
    assert lg.acquire(a, 1, "pg", T0, timeout=5) == []  # queued although a slot is free
    deny = only(Denied, lg.acquire(b, 1, "pg", T0, timeout=0))
    assert deny.reason == "timeout" and "paused" in deny.message
    effects = lg.resume("pg", T0)
    assert [n.verb for n in of(Notify, effects)] == ["resume", "resume"]
    assert granted(effects).session == a


def test_drain_denies_waiters_and_new_acquires() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    effects = lg.drain("pg")
    assert [(d.session, d.req, d.reason) for d in of(Denied, effects)] == [(b, 1, "draining")]
    assert {n.session for n in of(Notify, effects)} == {a, b}
    assert only(Denied, lg.acquire(b, 2, "pg", T0)).reason == "draining"
    lg.resume("pg", T0)
    assert queued(lg.acquire(b, 3, "pg", T0, timeout=5))


def test_admin_on_an_unknown_resource_is_a_key_error() -> None:
    lg = ledger(pg=1)
    for call in (lambda: lg.pause("x"), lambda: lg.resume("x", T0), lambda: lg.drain("x")):
        with pytest.raises(KeyError):
            call()


def test_end_session_notifies_every_session_of_the_pid() -> None:
    lg = ledger(pg=1)
    a1, a2, b = session(lg, pid=1), session(lg, pid=1), session(lg, pid=2)
    assert lg.end_session(1) == [Notify(a1, "end_session", None), Notify(a2, "end_session", None)]
    assert lg.end_session(3) == [] and b


def test_set_limits_adds_or_replaces() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=5)
    assert lg.set_limits("api", Resource(3), T0) == []
    assert grant(lg, a, 2, "api")
    assert granted(lg.set_limits("pg", Resource(2), T0)).session == b


def test_a_resource_a_reload_removed_grants_nothing_keeps_its_leases_then_is_gone() -> None:
    """A reload removed it: it stayed in the ledger (and status, metrics), served
    with its old limits, until a restart. Now: waiters and new acquires are
    refused naming it, the held lease and the fence count on until released or
    ended, then it is forgotten; a session's welcome no longer lists it."""
    lg = ledger(pg=2, old=2)
    a, b = session(lg), session(lg, pid=200)
    held = grant(lg, a, 1, "old")
    dead = grant(lg, b, 1, "old")
    effects = lg.remove("old", T0)
    assert of(Denied, effects) == []
    refused = only(Denied, lg.acquire(a, 4, "old", T0, timeout=5))
    assert refused.reason == "unknown_resource" and "'old'" in refused.message
    assert "removed" in refused.message and "reload" in refused.message
    assert "old" not in only(Denied, lg.acquire(a, 5, "nope", T0)).message  # not offered as known
    fence = only(StartFence, lg.close_session(b, T0))  # its lease fenced: it still counts
    assert [r["name"] for r in lg.snapshot_resources(T0)] == ["pg", "old"]
    assert lg.snapshot_resources(T0, {"old"})[0]["removed"] is True
    lg.release(a, held, T0)
    assert "old" in lg.resources  # the fence still counts
    lg.unfence("old", [dead], T0, fence.fence)
    assert "old" not in lg.resources
    assert [r["name"] for r in lg.snapshot_resources(T0)] == ["pg"]
    assert lg.next_deadline() is None or lg.tick(T0 + 60) == []  # its old fence's deadline is no error
    assert only(Denied, lg.acquire(a, 6, "old", T0)).reason == "unknown_resource"


def test_waiters_of_a_removed_resource_are_refused_and_a_reload_can_bring_it_back() -> None:
    lg = ledger(old=1)
    a, b = session(lg), session(lg, pid=200)
    held = grant(lg, a, 1, "old")
    assert queued(lg.acquire(b, 1, "old", T0, timeout=5))
    effects = lg.remove("old", T0)
    [refused] = of(Denied, effects)
    assert (refused.session, refused.req, refused.reason) == (b, 1, "unknown_resource")
    assert of(AskReclaim, effects) == [AskReclaim(a, "old", 0)]  # nobody waits for its lease now
    assert lg.set_limits("old", Resource(2), T0) == []  # added back before its last release
    assert grant(lg, b, 2, "old")
    lg.release(a, held, T0)
    assert "old" in lg.resources


def test_a_removed_resource_with_no_lease_is_gone_at_once() -> None:
    lg = ledger(pg=1, old=1)
    a = session(lg)
    lg.report(a, [], T0, costs={"old": 0.01})
    assert lg.remove("old", T0) == []
    assert "old" not in lg.resources
    assert lg.close_session(a, T0) == []  # its hand-off cost of the resource is gone too


# ------------------------------------------------------------------- failures


def test_failure_reports_past_the_threshold_fail_fast_then_recover() -> None:
    lg = ledger(pg=1)
    a, b, c = session(lg), session(lg), session(lg)
    grant(lg, a, 1)
    lg.acquire(b, 1, "pg", T0, timeout=30)
    assert lg.report(c, [], T0, failures={"pg": FAILURE_THRESHOLD - 2}) == []
    effects = lg.report(b, [], T0 + 0.1, failures={"pg": 2, "nope": 5})  # streak crosses it
    [deny] = of(Denied, effects)
    assert (deny.session, deny.reason) == (b, "failing")
    assert only(Denied, lg.acquire(c, 1, "pg", T0 + 0.5)).reason == "failing"
    assert lg.snapshot_resources(T0)[0]["failing"] is True
    # Past the backoff, with no connect succeeding since: still failing.
    assert lg.snapshot_resources(T0 + 0.1 + FAILURE_BACKOFF)[0]["failing"] is True
    # After the backoff one acquire is let through to probe.
    lg.release(a, next(iter(lg.sessions[a].leases)), T0 + 0.5)
    assert granted(lg.acquire(c, 2, "pg", T0 + 0.1 + FAILURE_BACKOFF)).session == c
    # Still failing: the next report fails fast again at once.
    lg.acquire(b, 3, "pg", T0 + 2, timeout=30)
    assert of(Denied, lg.report(c, [], T0 + 2, failures={"pg": 1}))[0].req == 3
    # A success resets the streak: acquires wait normally again.
    lg.report(c, [], T0 + 2, ok=["pg", "nope", 5])
    assert lg.resources["pg"].fail_streak == 0
    assert lg.snapshot_resources(T0 + 2)[0]["failing"] is False
    assert queued(lg.acquire(b, 4, "pg", T0 + 2, timeout=30))


def test_one_process_failing_alone_fails_nobody_else_fast() -> None:
    """One misconfigured worker (a bad DSN in its environment) failing connect
    after connect: its failures are its own. Before, they had every process's
    leases refused as "failing" for a second at a time, while their own
    connects worked. Now the back-off refuses the processes whose connects
    failed; another one may try, and joins them if its connect fails too."""
    lg = ledger(pg=2)
    good, bad, waiter = session(lg), session(lg), session(lg)
    held = grant(lg, good, 1)
    lg.report(good, [[held, IDLE, 55, None]], T0)
    grant(lg, bad, 1)
    assert queued(lg.acquire(waiter, 1, "pg", T0, timeout=30))
    assert lg.report(bad, [], T0, failures={"pg": FAILURE_THRESHOLD * 3}) == []  # waiter's wait goes on
    assert lg.snapshot_resources(T0)[0]["failing"] is True  # connects to it fail (somewhere)
    assert only(Denied, lg.acquire(bad, 2, "pg", T0)).reason == "failing"
    assert queued(lg.acquire(good, 2, "pg", T0, timeout=30))  # waits as usual, not refused
    # The waiter's own connect fails too (an outage): its waits are refused now.
    [deny] = of(Denied, lg.report(waiter, [], T0 + 0.1, failures={"pg": 1}))
    assert (deny.session, deny.reason) == (waiter, "failing")
    assert only(Denied, lg.acquire(waiter, 3, "pg", T0 + 0.2)).reason == "failing"
    assert good in {w.session for w in lg.resources["pg"].waiters}
    # A success ends it for everybody.
    lg.report(good, [], T0 + 0.3, ok=["pg"])
    assert lg.snapshot_resources(T0)[0]["failing"] is False
    assert not lg.resources["pg"].fail_sessions
    assert queued(lg.acquire(bad, 4, "pg", T0 + 0.3, timeout=30))


def test_a_failed_session_that_ends_leaves_the_streak_to_the_others() -> None:
    """A worker respawned after its predecessor failed (a new session): it may
    try; the ended one is no longer counted among those refused."""
    lg = ledger(pg=1)
    old, other = session(lg), session(lg)
    lg.report(old, [], T0, failures={"pg": FAILURE_THRESHOLD})
    assert old in lg.resources["pg"].fail_sessions
    lg.close_session(old, T0 + 0.1)
    assert old not in lg.resources["pg"].fail_sessions
    new = session(lg)
    assert granted(lg.acquire(new, 1, "pg", T0 + 0.2)).session == new  # within the back-off
    assert queued(lg.acquire(other, 1, "pg", T0 + 0.2, timeout=30))
    [deny] = of(Denied, lg.report(other, [], T0 + 0.3, failures={"pg": 1}))
    assert deny.session == other


def test_auto_quantum_is_one_figure_from_the_median_reported_cost() -> None:
    # Every holder is asked to keep to the same quantum, so turns are even:
    # the one implied by the median hand-off cost the sessions report.
    lg = ledger(pg=1)
    a, w = session(lg), session(lg)
    grant(lg, a, 1)
    assert lg.quantum("pg") is None  # nobody reported: each pool uses its own
    for cost in (0.002, 0.004, 0.006):
        assert lg.report(session(lg), [], T0, costs={"pg": cost, "elsewhere": 9.0}) == []
    assert lg.report(a, [], T0, costs={"pg": 0.5}) == []  # one costly process moves the median a step
    # Median of 2, 4, 6 and 500 ms: 5 ms (the mean, 128 ms, would give the 1 s ceiling).
    assert lg.quantum("pg") == pytest.approx(auto_quantum(0.005)) and auto_quantum(0.005) < AUTO_MAX
    ask = only(AskReclaim, lg.acquire(w, 1, "pg", T0, timeout=5))
    assert (ask.session, ask.count, ask.quantum) == (a, 1, lg.quantum("pg"))
    assert lg.snapshot_resources(T0)[0]["fairness_quantum_s"] == ask.quantum
    # A withdrawal carries no quantum; a fixed setting is sent as it is.
    assert lg.cancel(w, 1, T0) == [AskReclaim(a, "pg", 0, None)]
    fixed = Ledger({"pg": Resource(max_size=1, fairness_quantum=0.3)})
    b, v = session(fixed), session(fixed)
    grant(fixed, b, 1)
    assert only(AskReclaim, fixed.acquire(v, 1, "pg", T0, timeout=5)).quantum == 0.3
    cheap = ledger(pg=1)
    assert cheap.report(session(cheap), [], T0, costs={"pg": 0}) == []
    assert cheap.quantum("pg") == AUTO_MIN


def test_holders_already_asked_hear_a_quantum_that_moved() -> None:
    lg = ledger(pg=1)
    a, w = session(lg), session(lg)
    grant(lg, a, 1)
    assert only(AskReclaim, lg.acquire(w, 1, "pg", T0, timeout=5)) == AskReclaim(a, "pg", 1, None)
    # The first costs arrive after the ask: the holder hears the figure, same count.
    assert lg.report(w, [], T0, costs={"pg": 0.004}) == [AskReclaim(a, "pg", 1, auto_quantum(0.004))]
    # A small step of the median is not worth a frame; a large one is.
    assert lg.report(w, [], T0, costs={"pg": 0.0045}) == []
    assert lg.report(w, [], T0, costs={"pg": 0.001}) == [AskReclaim(a, "pg", 1, auto_quantum(0.001))]
    # A reload that fixes the quantum reaches the holder too.
    effects = lg.set_limits("pg", Resource(max_size=1, fairness_quantum=0.7), T0)
    assert of(AskReclaim, effects) == [AskReclaim(a, "pg", 1, 0.7)]
    # Costs leave with their session: the median moves back.
    other = session(lg)
    lg.report(other, [], T0, costs={"pg": 0.5})
    lg.set_limits("pg", Resource(max_size=1), T0)
    assert lg.quantum("pg") == pytest.approx(auto_quantum((0.001 + 0.5) / 2))
    lg.close_session(other, T0)
    assert lg.quantum("pg") == pytest.approx(auto_quantum(0.001))


@pytest.mark.parametrize("cost", [-0.1, "0.1", None, True, math.nan, math.inf, 1e9, [0.1]])
def test_bad_hand_off_costs_are_problems(cost: Any) -> None:
    lg = ledger(pg=1, db=1)
    a = session(lg)
    lease = grant(lg, a, 1)
    effects = lg.report(a, [[lease, BUSY, 77, None]], T0, costs={"db": 0.004, "pg": cost})
    prob = only(Problem, effects)
    assert prob.code == "bad_report" and "hand-off cost" in prob.message and "'pg'" in prob.message
    assert lg.quantum("pg") is None
    # The rest of the report still counts.
    assert lg.sessions[a].costs == {"db": 0.004} and lg.sessions[a].leases[lease].backend_pid == 77


def test_bad_failure_counts_are_ignored() -> None:
    lg = ledger(pg=1)
    a = session(lg)
    for failures in ({"pg": -50}, {"pg": "9"}, {"pg": 0}, {5: 9}):
        lg.report(a, [], T0, failures=failures)  # type: ignore[arg-type]
    assert lg.resources["pg"].fail_streak == 0


# ------------------------------------------------------------------- reports and snapshots


def test_a_peers_long_call_site_is_kept_bounded() -> None:
    lg = ledger(pg=3)
    a = session(lg)
    l1 = grant(lg, a, 1, site="a" * 1_000_000)
    assert len(lg.sessions[a].leases[l1].site or "") == MAX_SITE
    lg.report(a, [[l1, BUSY, None, "b" * 1_000_000]], T0)
    site = lg.sessions[a].leases[l1].site or ""
    assert len(site) == MAX_SITE and site.endswith("...")
    lg.report(a, [[l1, BUSY, None, "c" * MAX_SITE]], T0)
    assert lg.sessions[a].leases[l1].site == "c" * MAX_SITE  # one that fits is kept whole


def test_report_updates_lease_states() -> None:
    lg = ledger(pg=2)
    a = session(lg)
    l1 = grant(lg, a, 1)
    states = [[l1, BUSY, 4321, "app.py:9"], [999, IDLE, 1, None], [l1, "??", 1, None]]
    assert lg.report(a, states, T0 + 1) == []  # unknown leases and states are skipped
    lease = lg.sessions[a].leases[l1]
    assert (lease.state, lease.state_since, lease.backend_pid, lease.site) == (BUSY, T0 + 1, 4321, "app.py:9")
    assert lg.sessions[a].last_report == T0 + 1
    prob = only(Problem, lg.report(a, [[l1, IDLE, None]], T0))
    assert isinstance(prob, Problem) and prob.code == "bad_report"
    prob = only(Problem, lg.report(a, ["x" * 100_000], T0))
    assert len(prob.message) < 200
    # Entries after a malformed one are dropped; the failures and costs still count.
    prob = only(Problem, lg.report(a, [[l1, "bad"], [l1, IDLE, 1, None]], T0, {"pg": 1}, [], {"pg": 0.004}))
    assert lg.sessions[a].leases[l1].state == BUSY and lg.resources["pg"].fail_streak == 1
    assert lg.sessions[a].costs == {"pg": 0.004}


def test_snapshots() -> None:
    lg = ledger(pg=Resource(2, monitor_dsn="postgresql://u:secret@h/db"), api=1)
    a, b = session(lg, pid=11, name="web"), session(lg, pid=12, uid=1000)
    l1, l2 = grant(lg, a, 1), grant(lg, a, 2)
    lg.report(a, [[l1, IDLE, 55, "x.py:1"], [l2, BUSY, None, None]], T0 + 1)
    lg.acquire(b, 1, "pg", T0 + 1, timeout=5)
    grant(lg, b, 2, "api")
    [pg, api] = lg.snapshot_resources(T0 + 3)
    assert pg["name"] == "pg" and pg["max_size"] == 2 and pg["leased"] == 2
    assert (pg["in_use"], pg["idle"], pg["connecting"], pg["fenced"]) == (1, 1, 0, 0)
    assert pg["waiting"] == 1 and pg["longest_wait_s"] == 2.0 and pg["grants"] == 2 and pg["peak"] == 2
    assert (pg["paused"], pg["draining"], pg["failing"]) == (False, False, False)
    assert "monitor_dsn" not in pg["limits"] and "secret" not in repr(pg)
    assert api["leased"] == 1 and api["connecting"] == 1
    sessions = lg.snapshot_sessions(T0 + 3)
    summary = [(s["session"], s["pid"], s["leases"], s["waiters"]) for s in sessions]
    assert summary == [(a, 11, 2, 0), (b, 12, 1, 1)]
    assert sessions[0]["last_report_s"] == 2.0 and sessions[1]["last_report_s"] is None
    assert sessions[1]["uid"] == 1000 and sessions[0]["connected_s"] == 3.0
    leases = lg.snapshot_leases(T0 + 3)
    assert {x["id"] for x in leases} == {l1, l2, lg.snapshot_leases(T0, resource="api")[0]["id"]}
    [one] = lg.snapshot_leases(T0 + 3, resource="pg", pid=11)[:1]
    assert one["backend_pid"] == 55 and one["site"] == "x.py:1" and one["state"] == IDLE
    assert one["age_s"] == 3.0 and one["state_s"] == 2.0
    assert lg.snapshot_leases(T0, pid=99) == []
    # Every snapshot goes over the wire as a reply.
    for data in (pg, sessions, leases, {"resources": [pg, api]}):
        reply = p.Reply(1, data)
        conn = p.Connection(p.CLIENT)
        conn.send(p.Hello(p.PROTOCOL_VERSION, 1, "x"))
        conn.receive_data(p.encode(p.Welcome(p.PROTOCOL_VERSION, 1, 1)) + p.encode(reply))
        assert conn.events()[1] == reply


def test_fenced_leases_show_in_the_snapshot() -> None:
    lg = ledger(pg=Resource(2, quarantine_delay=1))
    a = session(lg)
    grant(lg, a, 1)
    lg.close_session(a, T0)
    [pg] = lg.snapshot_resources(T0)
    assert (pg["leased"], pg["fenced"]) == (1, 1)
    assert lg.snapshot_leases(T0) == [] and lg.snapshot_sessions(T0) == []


# ------------------------------------------------------------------- state machine (I1–I4)

DENY_REASONS = {"timeout", "unknown_resource", "too_many_waiters", "draining", "failing"}


@dataclass
class Req:
    resource: str
    deadline: float
    seq: int | None = None  # set once queued: the order it joined the queue


@st.composite
def resource_limits(draw: st.DrawFn) -> Resource:
    max_size = draw(st.integers(1, 4))
    per_process = draw(st.none() | st.integers(1, 3))
    floor = draw(st.integers(0, min(1, max_size, per_process or max_size)))
    monitored = draw(st.booleans())
    return Resource(
        max_size,
        max_per_process=per_process,
        min_per_process=floor,
        max_waiting=draw(st.none() | st.integers(0, 4)),
        acquire_timeout=draw(st.sampled_from([0.0, 0.5, 2.0, 2.0])),
        quarantine_delay=draw(st.sampled_from([0.0, 0.1, 1.0])),
        monitor_dsn="postgresql:///monitor" if monitored else None,
        fence_timeout=draw(st.sampled_from([0.2, 2.0])),
    )


class LedgerMachine(RuleBasedStateMachine):
    """Drives a Ledger with random calls and keeps a model of what the effects
    said: who holds which lease, which requests still wait for an answer,
    which leases are fenced until when. Every effect is checked as it is
    applied, and the ledger is checked against the model after every step.
    The model knows of restart holds, and of processes away across a restart:
    :class:`RestartMachine` adds the rules that make them."""

    def __init__(self) -> None:
        super().__init__()
        self.lg = Ledger({})
        self.now = T0
        self.pids = itertools.count(1)
        self.reqs = itertools.count(1)
        self.seqs = itertools.count()
        self.sessions: dict[int, int] = {}  # sid -> pid
        self.held: dict[int, tuple[int, str, int]] = {}  # lease -> (sid, resource, token)
        self.fenced: dict[int, tuple[str, float, int, int]] = {}  # lease -> (res, until, pid, token)
        self.outstanding: dict[tuple[int, int], Req] = {}  # (sid, req) -> request
        self.max_id = 0
        self.over: set[str] = set()  # resources a resize or re-registration pushed over the cap
        self.delays: dict[str, float] = {}  # resource -> longest fence delay before a reload
        self.giver: int | None = None  # the session whose give-back is being granted
        self.keeper: int | None = None  # one that let a lease go under its floor, its own waiting
        self.configured: set[str] = set()  # resources the config in force names
        #: resources a reload removed (and none re-added since) -> their limits then:
        #: kept by the ledger while a lease or fence of them is out, then forgotten
        self.removed: dict[str, Resource] = {}
        # -- restarts (I4)
        self.base: dict[str, Resource] = {}  # the config file's resources, as first written
        self.hold: float | None = None  # the ledger's restart hold, until a tick ends it
        self.grace_end = T0  # when the current coordinator's grace ended (or ends)
        self.away: dict[int, dict[int, tuple[str, int]]] = {}  # pid -> lease -> (resource, token)
        self.awaited: set[int] = set()  # fenced: handed on as held, awaited from their process
        self.bounds: dict[int, float] = {}  # awaited lease -> fenced then even if its process runs
        #: awaited lease -> the session it is awaited from, or ("handed", bounded)
        #: for one a restart handed on: the ledger fences by resource, pid and this
        self.origin: dict[int, Any] = {}
        self.unclaimed: set[int] = set()  # fenced when a hold ended unclaimed (the process may be late)
        self.vanished: dict[int, float] = {}  # pids that died while away (never come back) -> when
        self.settled: dict[int, float] = {}  # lease -> when a look after the hold found its holder gone

    # -- model helpers

    def limits(self, r: str) -> Resource:
        res = self.lg.resources.get(r)
        # One forgotten in this very step may still be named by an effect of it.
        return res.limits if res is not None else self.removed[r]

    def leased(self, r: str) -> int:
        return sum(1 for _, res, _ in self.held.values() if res == r) + sum(
            1 for res, *_ in self.fenced.values() if res == r
        )

    def count(self, sid: int, r: str) -> int:
        return sum(1 for s, res, _ in self.held.values() if s == sid and res == r)

    def blocked(self, sid: int, r: str) -> bool:
        cap = self.limits(r).max_per_process
        return cap is not None and self.count(sid, r) >= cap

    def queued(self, r: str) -> list[tuple[int, int]]:
        waiting = [
            (q.seq, key) for key, q in self.outstanding.items() if q.resource == r and q.seq is not None
        ]
        return [key for _, key in sorted(waiting)]

    def servable_ahead(self, sid: int, r: str) -> tuple[int, bool]:
        """Queued acquires of ``r`` a free slot could go to (each session's
        first ones, up to what its max_per_process leaves), and whether one
        more from ``sid`` would be such an acquire."""
        cap = self.limits(r).max_per_process
        seen: dict[int, int] = {}
        for s, _ in self.queued(r):
            if cap is None or self.count(s, r) + seen.get(s, 0) < cap:
                seen[s] = seen.get(s, 0) + 1
        own = cap is None or self.count(sid, r) + seen.get(sid, 0) < cap
        return sum(seen.values()), own

    @staticmethod
    def delay(limits: Resource) -> float:
        return limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay

    def awaited_groups(self, which: Callable[[tuple[str, float, int, int]], bool]
                       ) -> dict[tuple[str, int, Any], list[int]]:
        """Awaited leases by (resource, pid, origin), the groups the ledger
        fences by; only groups with a lease ``which`` picks (all of a group go
        together)."""
        groups: dict[tuple[str, int, Any], list[int]] = {}
        for lid in self.awaited:
            f = self.fenced[lid]
            groups.setdefault((f[0], f[2], self.origin[lid]), []).append(lid)
        return {key: ids for key, ids in groups.items() if any(which(self.fenced[lid]) for lid in ids)}

    def bounded_pids(self) -> set[int]:
        """Processes with bounded awaited leases (looked at by their bound):
        one may run on without them (it came back without them)."""
        return {self.fenced[lid][2] for lid in self.awaited if lid in self.bounds}

    def kept(self, ids: list[int], pid: int) -> bool:
        """Whether awaited leases stay counted for their process at a look now:
        it runs (away), and their bound (a session it dropped) has not passed."""
        return pid in self.away and all(self.now < self.bounds.get(lid, math.inf) for lid in ids)

    def recheck(self, ids: list[int]) -> float:
        bounds = [self.bounds[lid] for lid in ids if lid in self.bounds]
        return min(self.now + DROPPED_RECHECK, *bounds) if bounds else self.now + ALIVE_RECHECK

    def bound_by_grace(self, ids: list[int], grace: float) -> None:
        """A hello of their process brought none of these awaited leases (one
        group): the ledger keeps them counted for ``grace`` more at most."""
        bound = self.now + grace
        if self.bounds.get(ids[0], math.inf) <= bound:
            return  # bounded sooner already: left as it is
        self.bounds.update(dict.fromkeys(ids, bound))
        until = self.recheck(ids)
        if self.hold is not None:  # a hold lifts no awaited fence before its end
            until = max(until, self.hold + self.delay(self.limits(self.fenced[ids[0]][0])))
        self.refence(ids, until)

    def refence(self, ids: list[int], until: float) -> None:
        for lid in ids:
            r, _, pid, token = self.fenced[lid]
            self.fenced[lid] = (r, until, pid, token)

    def note_over(self, r: str) -> None:
        if self.leased(r) > self.limits(r).max_size:
            self.over.add(r)

    def apply(self, effects: list[Effect], *, problems: tuple[str, ...] = ()) -> None:
        for e in effects:
            if isinstance(e, Granted):
                self.on_grant(e)
            elif isinstance(e, Denied):
                assert (e.session, e.req) in self.outstanding, f"deny of a request not waiting: {e}"
                assert e.reason in DENY_REASONS, e
                del self.outstanding[(e.session, e.req)]
            elif isinstance(e, AskReclaim):
                event(f"reclaim asked ({'withdraw' if e.count == 0 else 'give'})")
                assert e.session in self.sessions, e
                setting = self.limits(e.resource).fairness_quantum
                if e.count == 0:
                    assert e.quantum is None, e
                elif e.quantum == IDLE_ONLY:
                    # For its own waiters held back by its max_per_process: no more
                    # than it reports idle (none of them busy), and it does wait.
                    idle = sum(1 for lease in self.lg.sessions[e.session].leases.values()
                               if lease.resource == e.resource and lease.state == IDLE)
                    assert e.count <= idle, e
                    assert any(w.session == e.session for w in self.lg.resources[e.resource].waiters), e
                elif self.leased(e.resource) > self.limits(e.resource).max_size:
                    assert e.quantum == 0.0, e  # over the cap: every give-back is due at once
                elif isinstance(setting, str):  # auto: none known yet, or within the bounds
                    assert e.quantum is None or AUTO_MIN <= e.quantum <= AUTO_MAX, e
                else:
                    assert e.quantum == setting, e
                floor = self.limits(e.resource).min_per_process
                held = self.count(e.session, e.resource)
                assert 0 <= e.count <= held, e
                if (below := e.count - max(0, held - floor)) > 0:
                    # Under its floor only for waiters of its own (another pool of
                    # the process), which take back what it gives there: as many as
                    # it has, and for the need of others only if it is the head.
                    own = [q.seq for (sid, _), q in self.outstanding.items()
                           if sid == e.session and q.resource == e.resource]
                    assert below <= len(own), e
                    cap = self.limits(e.resource).max_per_process
                    ahead = sorted((math.inf if q.seq is None else q.seq, sid)
                                   for (sid, _), q in self.outstanding.items() if q.resource == e.resource
                                   and (cap is None or self.count(sid, e.resource) < cap))
                    head = ahead[0][1] if ahead else None
                    assert e.session == head or e.quantum == IDLE_ONLY or held > floor, e
                    # Every lease it gives back comes back to it: never one busy at
                    # its checkin (a close and a connect for its own waiter).
                    assert e.quantum == IDLE_ONLY or held > floor, f"a quantum ask under the floor: {e}"
                if e.count and self.leased(e.resource) <= self.limits(e.resource).max_size:
                    # Only the head waiter's session is spared (its give-back would
                    # come straight back to it); other waiting holders may be asked.
                    cap = self.limits(e.resource).max_per_process
                    head = next((sid for sid, _ in self.queued(e.resource)
                                 if cap is None or self.count(sid, e.resource) < cap), None)
                    # ... unless nobody else could give one back: then sparing it
                    # would leave the waiters behind it stuck until it times out;
                    # and it may be asked for what it reports idle (another pool
                    # of the same process waits for it).
                    others = [sid for sid in self.sessions if sid != head
                              and self.count(sid, e.resource) > floor]
                    idle_now = sum(1 for lease in self.lg.sessions[e.session].leases.values()
                                   if lease.resource == e.resource and lease.state == IDLE)
                    assert e.session != head or e.count <= idle_now or (
                        not others and e.count == 1), f"asked the next-in-line session: {e}"
                    # The head with no other process a free slot could serve gets
                    # back whatever it gives: idle leases only, never a busy one.
                    seen: dict[int, int] = {}
                    line = sorted((math.inf if q.seq is None else q.seq, sid)  # one being queued: last
                                  for (sid, _), q in self.outstanding.items() if q.resource == e.resource)
                    for _, sid in line:
                        if cap is None or self.count(sid, e.resource) + seen.get(sid, 0) < cap:
                            seen[sid] = seen.get(sid, 0) + 1
                    assert seen.keys() != {e.session} or e.quantum == IDLE_ONLY, (
                        f"the head alone in line asked with the quantum: {e}")
            elif isinstance(e, Notify):
                assert e.session in self.sessions, e
            elif isinstance(e, Problem):
                assert e.code in problems, f"unexpected problem {e}"
            elif isinstance(e, StillHeld):
                assert e.pid in self.away, e
            else:
                assert isinstance(e, StartFence), e

    def on_grant(self, e: Granted) -> None:
        key = (e.session, e.req)
        assert key in self.outstanding, f"grant for a request that is not waiting: {e}"
        req = self.outstanding.pop(key)
        lease, r = e.lease, e.lease.resource
        assert r == req.resource and lease.session == e.session and e.session in self.sessions
        # ids and tokens only grow
        assert lease.id > self.max_id and lease.token == lease.id, (lease, self.max_id)
        self.max_id = lease.id
        # I4: nothing is granted before the processes had the grace to re-register
        assert self.hold is None, f"grant in a restart hold: {e}"
        # I1: a grant only ever fills a free slot (re-registered + granted + fenced < cap)
        assert self.leased(r) < self.limits(r).max_size, f"grant over the cap: {e}"
        assert not self.blocked(e.session, r), f"grant past max_per_process: {e}"
        assert not self.lg.resources[r].paused
        assert r in self.configured, f"grant of a resource a reload removed: {e}"
        # A lease let go under its holder's min_per_process floor goes to that
        # holder's first waiter: the floor is the process's (a sibling pool waits).
        if self.keeper is not None:
            first = min((q.seq for (sid, _), q in self.outstanding.items()
                         if sid == self.keeper and q.resource == r and q.seq is not None), default=None)
            assert e.session == self.keeper and req.seq is not None and req.seq < (
                first if first is not None else math.inf), f"{e}: the floor of {self.keeper} was taken"
        # FIFO: everyone queued ahead (or, for an immediate grant, anyone queued)
        # is blocked by their own max_per_process.
        for sid, other in [] if self.keeper is not None else self.queued(r):
            if req.seq is not None and self.outstanding[(sid, other)].seq > req.seq:  # type: ignore[operator]
                break
            if sid == self.giver:
                continue  # its own give-back does not come straight back to it
            assert self.blocked(sid, r), f"{e} overtook waiting request {(sid, other)}"
        self.giver = self.keeper = None  # only the first grant after a give-back may pass the giver
        self.held[lease.id] = (e.session, r, lease.token)
        event("grant of a queued request" if req.seq is not None else "grant at once")
        if self.away and any(r == res for ls in self.away.values() for res, _ in ls.values()):
            event("grant while a process holding leases is still away")
        if any(self.blocked(sid, r) for sid, _ in self.queued(r)):
            event("grant past a blocked waiter")

    # -- rules

    @initialize(configs=st.lists(resource_limits(), min_size=1, max_size=2), n=st.integers(2, 4))
    def setup(self, configs: list[Resource], n: int) -> None:
        self.base = {f"r{i}": r for i, r in enumerate(configs)}
        self.lg = Ledger(dict(self.base))
        self.configured = set(self.base)
        for _ in range(n):
            self.open_session()

    def names(self) -> list[str]:
        """The resources the ledger must know: those configured, and those
        removed while leases or fences of them are still out."""
        return sorted(self.configured | {r for r in self.removed if self.leased(r)})

    @rule()
    def open_session(self) -> None:
        pid = next(self.pids)
        sid, effects = self.lg.open_session(pid, f"w{pid}", self.now)
        assert effects == []
        self.sessions[sid] = pid

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def close_session(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        self.close(sid)

    def close(self, sid: int) -> None:
        pid = self.sessions.pop(sid)
        mine = sorted(lid for lid, (s, _, _) in self.held.items() if s == sid)
        fences: dict[str, list[int]] = {}
        for lid in mine:
            _, r, token = self.held.pop(lid)
            limits = self.limits(r)
            delay = limits.fence_timeout if limits.monitor_dsn else limits.quarantine_delay
            if delay > 0:
                self.fenced[lid] = (r, self.now + delay, pid, token)
                fences.setdefault(r, []).append(lid)
        for key in [k for k in self.outstanding if k[0] == sid]:
            del self.outstanding[key]
        effects = self.lg.close_session(sid, self.now)
        started = {(f.resource, f.pid, tuple(sorted(f.leases))) for f in of(StartFence, effects)}
        assert started == {(r, pid, tuple(ids)) for r, ids in fences.items()}
        self.apply(effects)
        # I2: nothing of the dead session is live any more
        for res in self.lg.resources.values():
            assert not set(mine) & set(res.live)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), early=st.booleans())
    def reconnect(self, data: st.DataObject, early: bool) -> None:
        """The same process comes back with the leases it still holds, after its
        old session was closed (then they are fenced, or freed with no delay),
        or before the coordinator noticed the old one gone (``early``)."""
        old = data.draw(st.sampled_from(sorted(self.sessions)))
        pid = self.sessions[old]
        mine = sorted(lid for lid, (s, _, _) in self.held.items() if s == old)
        entries: list[list[Any]] = [[self.held[lid][1], lid, self.held[lid][2], IDLE, None] for lid in mine]
        if not early:
            self.close(old)
        # A removed resource whose last leases the close freed (no fence delay)
        # is forgotten: what the process brings back of it is revoked.
        gone = {lid for r, lid, *_ in entries if r not in self.names()}
        # Leases awaited from another session of the process (RestartMachine:
        # a second client's): not brought, so kept for the grace at most.
        others = self.awaited_groups(lambda f: f[2] == pid)
        assert not any(isinstance(origin, tuple) for _, _, origin in others), others
        sid, effects = self.lg.open_session(pid, f"w{pid}", self.now, held=entries, grace=1.5)
        self.sessions[sid] = pid
        for ids in others.values():
            self.bound_by_grace(ids, 1.5)
        for r, lid, token, _, _ in entries:
            if lid in gone:
                event("reconnect: a lease of a forgotten resource revoked")
                continue
            if self.fenced.pop(lid, None):
                event("reconnect took a fenced lease back")
            self.held[lid] = (sid, r, token)
            self.max_id = max(self.max_id, lid)
            self.note_over(r)
        revokes = [n for n in of(Notify, effects) if n.verb == "revoke"]
        assert sorted(n.args["lease"] for n in revokes) == sorted(gone), effects
        self.apply(effects, problems=("bad_held",) if gone else ())
        if early:
            self.close(old)

    @precondition(lambda self: self.names())
    @rule(data=st.data(), n=st.integers(1, 2))
    def register_foreign(self, data: st.DataObject, n: int) -> None:
        """Leases kept across a coordinator restart: may push a resource over its cap."""
        r = data.draw(st.sampled_from(self.names()))
        pid = next(self.pids)
        ids = [self.max_id + 1000 * (i + 1) for i in range(n)]  # from an earlier life
        held = [[r, i, i, BUSY, 7] for i in ids]
        sid, effects = self.lg.open_session(pid, "restarted", self.now, held=held)
        self.sessions[sid] = pid
        for i in ids:
            self.held[i] = (sid, r, i)
            self.max_id = max(self.max_id, i)
        self.note_over(r)
        self.apply(effects)

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), n=st.integers(1, 4))
    def acquire(self, data: st.DataObject, n: int) -> None:
        """A few acquires at the same instant, from random sessions."""
        for _ in range(n):
            sid = data.draw(st.sampled_from(sorted(self.sessions)))
            r = data.draw(st.sampled_from([*sorted(self.configured) * 4, *sorted(self.removed), "nope"]))
            timeout = data.draw(st.none() | st.sampled_from([0, -1, 0.05, 0.3, 1.0, 4.0]))
            self.acquire_one(sid, r, timeout)

    def acquire_one(self, sid: int, r: str, timeout: float | None) -> None:
        req = next(self.reqs)
        # Never configured, or removed by a reload (its leases maybe still out): refused.
        unknown = r not in self.configured
        wait = (self.limits(r).acquire_timeout if timeout is None else timeout) if not unknown else 0
        self.outstanding[(sid, req)] = Req(r, self.now + wait)
        ahead, own = self.servable_ahead(sid, r) if not unknown else (0, True)
        mine = sum(1 for s, _ in self.queued(r) if s == sid) if not unknown else 0
        most = self.limits(r).max_waiting if not unknown else None
        if own and self.hold is not None and not unknown:  # those the free slots serve at the hold's end
            ahead -= max(0, self.limits(r).max_size - self.leased(r))
        full = most is not None and (ahead >= most if own else mine >= most)
        effects = self.lg.acquire(sid, req, r, self.now, timeout)
        for deny in of(Denied, effects):
            if deny.req != req:
                continue
            event(f"acquire: denied {deny.reason}")
            res = self.lg.resources.get(r)
            if deny.reason == "timeout":  # only when it really could not be granted now
                assert res is not None and wait <= 0
                assert (res.paused or self.hold is not None or res.leased >= res.limits.max_size
                        or self.blocked(sid, r)), deny
            elif deny.reason == "too_many_waiters":
                assert res is not None and res.limits.max_waiting is not None
                assert full, (ahead, own, mine)
            elif deny.reason == "unknown_resource":
                assert unknown, deny
        if unknown:
            event("acquire: of a removed resource" if r in self.removed else "acquire: of no resource")
            [refusal] = effects
            assert isinstance(refusal, Denied), effects
            assert (refusal.req, refusal.reason) == (req, "unknown_resource"), refusal
        if of(Granted, effects):
            event("acquire: granted")
        self.apply(effects)
        if (sid, req) in self.outstanding:
            event("acquire: queued")
            assert wait > 0, "a request that may not wait was queued"
            assert not full, "queued beyond max_waiting"
            self.outstanding[(sid, req)].seq = next(self.seqs)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lid = data.draw(st.sampled_from(sorted(self.held)))
        sid, r, _ = self.held.pop(lid)
        # A give-back (the session was asked) may pass the giver's own waiters.
        self.giver = sid if self.lg.sessions[sid].asked.get(r, 0) else None
        if self.count(sid, r) < self.limits(r).min_per_process and any(
                s == sid for s, _ in self.queued(r)):
            self.keeper = sid
        try:
            self.apply(self.lg.release(sid, lid, self.now))
        finally:
            self.giver = self.keeper = None

    @precondition(lambda self: self.sessions)
    @rule(data=st.data())
    def release_unknown(self, data: st.DataObject) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        away = {lid for ls in self.away.values() for lid in ls}
        lid = data.draw(st.sampled_from(sorted(set(self.held) | set(self.fenced) | away | {-5})))
        if self.held.get(lid, (None,))[0] == sid:
            return
        effects = self.lg.release(sid, lid, self.now)
        assert [type(e) for e in effects] == [Problem]
        self.apply(effects, problems=("unknown_lease",))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        sid, req = data.draw(st.sampled_from(sorted(self.outstanding)))
        del self.outstanding[(sid, req)]  # no answer may come for it now
        self.apply(self.lg.cancel(sid, req, self.now))

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), timeout=st.sampled_from([0, 0.05, 0.3, 1.0, 4.0]))
    def retime(self, data: st.DataObject, timeout: float) -> None:
        """A request gets a new deadline and keeps its place in line (its seq)."""
        sid, req = data.draw(st.sampled_from(sorted(self.outstanding)))
        q = self.outstanding[(sid, req)]
        assert q.seq is not None  # only queued ones are outstanding after a step
        q.deadline = self.now + timeout
        effects = self.lg.retime(sid, req, timeout, self.now)
        assert not of(Granted, effects) and not of(Denied, effects), effects
        self.apply(effects)

    @precondition(lambda self: self.sessions and self.names())
    @rule(
        data=st.data(),
        fail=st.sampled_from([0] * 6 + [1, FAILURE_THRESHOLD]),
        ok=st.booleans(),
    )
    def report(self, data: st.DataObject, fail: int, ok: bool) -> None:
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        mine = sorted(lid for lid, (s, _, _) in self.held.items() if s == sid)
        states = [[lid, data.draw(st.sampled_from([IDLE, BUSY])), None, None] for lid in mine]
        r = data.draw(st.sampled_from(self.names()))
        failures = {r: fail} if fail else {}
        costs = data.draw(st.dictionaries(
            st.sampled_from([*self.names(), "unknown"]),
            st.one_of(st.floats(0, 0.03), st.sampled_from([0, 0.0001, -1.0, math.nan, "1"])), max_size=2))
        bad = any(type(v) not in (int, float) or not v >= 0 for v in costs.values())
        self.apply(self.lg.report(sid, states, self.now, failures, [r] if ok else [], costs),
                   problems=("bad_report",) if bad else ())

    @rule(dt=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0, 3.0, 100.0]))
    def tick(self, dt: float) -> None:
        """Time passes; far enough ahead, every request is answered and every fence gone."""
        self.now += dt
        self.advance()
        if dt == 100.0:  # but what processes still running (away) hold, or held till this look
            assert not self.outstanding and self.hold is None
            assert all((lid in self.awaited and f[2] in self.away) or self.settled.get(lid) == self.now
                       for lid, f in self.fenced.items())

    def advance(self) -> None:
        # Before this look settles them (the ledger's look comes after the model's).
        bounded = self.bounded_pids()
        unclaimed: set[tuple[str, int, tuple[int, ...]]] = set()
        hold = self.hold
        expired = {key: q.deadline for key, q in self.outstanding.items() if q.deadline <= self.now}
        still: set[tuple[str, int, int]] = set()
        if self.hold is not None and self.now >= self.hold:
            # The hold ends: what no process took back is fenced as a dead
            # process's, for its fence delay from the hold's end at most; a
            # process still running (away) keeps its leases counted, looked
            # at again every ALIVE_RECHECK seconds.
            for (r, pid, _), ids in self.awaited_groups(lambda f: True).items():
                if self.kept(ids, pid):
                    still.add((r, pid, len(ids)))
                    self.refence(ids, self.recheck(ids))
                    event("restart hold ended: a live process's leases kept")
                else:
                    unclaimed.add((r, pid, tuple(sorted(ids))))
                    self.unclaimed |= set(ids)
                    self.awaited -= set(ids)
            self.hold = None
            event("restart hold ended")
            if any(self.away.values()):
                event("restart hold ended with a process still away")
        elif self.hold is None:
            # Live holders looked at again: still running, kept; gone, fenced from now.
            for (r, pid, _), ids in self.awaited_groups(lambda f: f[1] <= self.now).items():
                if self.kept(ids, pid):
                    self.refence(ids, self.recheck(ids))
                else:
                    event("a live holder that never came back died: fenced" if pid not in self.away
                          else "a process that dropped its session is not back in its bound: fenced")
                    self.settled.update(dict.fromkeys(ids, self.now))
                    unclaimed.add((r, pid, tuple(sorted(ids))))
                    self.refence(ids, self.now + self.delay(self.limits(r)))
                    self.unclaimed |= set(ids)
                    self.awaited -= set(ids)
        for lid in [lid for lid, f in self.fenced.items() if f[1] <= self.now]:
            event("fence expired")
            del self.fenced[lid]
            self.unclaimed.discard(lid)
        # What the server finds running among the awaited pids: the processes away
        # (alive, not reconnected); one that came back reconnected, one that vanished died.
        assert self.lg.awaited_pids() <= set(self.away) | set(self.vanished) | bounded
        effects = self.lg.tick(self.now, set(self.away) & self.lg.awaited_pids())
        fences = of(StartFence, effects)
        assert {(f.resource, f.pid, tuple(sorted(f.leases))) for f in fences} == unclaimed, effects
        assert len(fences) == len(unclaimed) and not any(f.terminate for f in fences)
        assert {(e.resource, e.pid, e.count) for e in of(StillHeld, effects)} == still, effects
        for deny in of(Denied, effects):  # a wait that ran out in a restart hold says so
            if hold is not None and expired[(deny.session, deny.req)] < hold:
                assert "restarted" in deny.message, deny
        self.apply(effects)
        late = [k for k, q in self.outstanding.items() if q.deadline <= self.now]
        assert not late, f"requests past their deadline still unanswered: {late}"
        for res in self.lg.resources.values():
            assert all(f.until > self.now for f in res.fenced.values())

    @precondition(lambda self: set(self.fenced) - self.awaited)
    @rule(data=st.data())
    def unfence(self, data: st.DataObject) -> None:
        # Leases awaited in a restart hold had no StartFence: nothing can confirm them gone yet.
        started = sorted(set(self.fenced) - self.awaited)
        r = data.draw(st.sampled_from(sorted({self.fenced[lid][0] for lid in started})))
        ids = data.draw(st.lists(st.sampled_from(started), max_size=3, unique=True))
        for lid in ids:
            if self.fenced[lid][0] == r:
                del self.fenced[lid]
                self.awaited.discard(lid)
                self.unclaimed.discard(lid)
        self.apply(self.lg.unfence(r, ids, self.now))

    @precondition(lambda self: self.fenced)
    @rule()
    def compact_fence_heap(self) -> None:
        """The fence-expiry heap is rebuilt (without its lifted and taken-back
        entries) once it has doubled: only at scale, so forced here. Every fence
        in force must stay in it (the checks after tick and of next_deadline)."""
        self.lg._deadlines.fences_max = 0
        self.lg.next_deadline()
        event("fence heap rebuilt")

    @precondition(lambda self: self.names())
    @rule(data=st.data())
    def resize(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from(self.names()))
        size = data.draw(st.integers(max(1, self.limits(r).min_per_process), 5))
        self.apply(self.lg.resize(r, size, self.now))
        self.note_over(r)

    @rule(data=st.data(), limits=resource_limits(), quantum=st.sampled_from(["auto", "auto", 0.0, 0.5]))
    def reload(self, data: st.DataObject, limits: Resource, quantum: float | str) -> None:
        """A config reload: every limit of a resource replaced at once, while
        leases are out and acquires wait, or a resource added: a new one, or
        one an earlier reload removed (still held, or forgotten), served again."""
        r = data.draw(st.sampled_from([*self.names(), *sorted(self.removed), "r9"]))
        if r in self.lg.resources:  # fences already set keep the delay they were set with
            was = self.limits(r)
            self.delays[r] = max(self.delays.get(r, 0.0), was.fence_timeout, was.quarantine_delay)
        if r in self.removed:
            event("reload: a removed resource added back" + (" while held" if self.leased(r) else ""))
        self.configured.add(r)
        self.removed.pop(r, None)
        self.apply(self.lg.set_limits(r, replace(limits, fairness_quantum=quantum), self.now))
        self.note_over(r)

    @precondition(lambda self: self.configured)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        """A reload drops a resource from the config: its waiters are refused
        (as every later acquire of it), nothing more of it is granted; the
        leases and fences out stay counted until released or ended, then the
        ledger forgets it (``removed_resources_go_when_let_go``)."""
        r = data.draw(st.sampled_from(sorted(self.configured)))
        waiting = set(self.queued(r))
        event("remove: while held" if self.leased(r) else "remove: nothing held")
        if waiting:
            event("remove: waiters refused")
        self.configured.discard(r)
        self.removed[r] = self.limits(r)
        effects = self.lg.remove(r, self.now)
        assert not of(Granted, effects), effects
        assert {(d.session, d.req) for d in of(Denied, effects) if d.reason == "unknown_resource"} == waiting
        self.apply(effects)

    @precondition(lambda self: self.names())
    @rule(data=st.data(), verb=st.sampled_from(["pause", "resume", "resume", "pause", "drain"]))
    def admin(self, data: st.DataObject, verb: str) -> None:
        r = data.draw(st.sampled_from(self.names()))
        if verb == "pause":
            self.apply(self.lg.pause(r))
        elif verb == "resume":
            self.apply(self.lg.resume(r, self.now))
        else:
            self.apply(self.lg.drain(r))
            assert not self.queued(r)

    # -- checks after every step

    @invariant()
    def ledger_matches_the_model(self) -> None:
        lg = self.lg
        assert set(lg.sessions) == set(self.sessions)
        for sid, s in lg.sessions.items():
            mine = {lid for lid, (owner, _, _) in self.held.items() if owner == sid}
            assert set(s.leases) == mine
            for r in self.names():
                assert s.held(r) == self.count(sid, r)
        for r, res in lg.resources.items():
            assert set(res.live) == {lid for lid, (_, res_, _) in self.held.items() if res_ == r}
            assert set(res.fenced) == {lid for lid, f in self.fenced.items() if f[0] == r}
            assert all(f.until == self.fenced[lid][1] for lid, f in res.fenced.items())
            assert [(w.session, w.req) for w in res.waiters] == self.queued(r)
            assert res.askees <= set(lg.sessions)
        deadlines = [q.deadline for q in self.outstanding.values() if q.seq is not None]
        deadlines += [f[1] for f in self.fenced.values()]
        deadlines += [self.hold] if self.hold is not None else []
        assert lg.hold_until == self.hold
        assert lg.next_deadline() == (min(deadlines) if deadlines else None)

    @invariant()
    def askees_know_the_quantum(self) -> None:
        # Whatever moved the quantum (costs, a session leaving, a reload, the
        # queue's length), the holders asked have been told a figure within a
        # fifth of it, or a shorter one the queue would need half a turn longer.
        for r, res in self.lg.resources.items():
            quantum = paced(res, self.lg.sessions, self.lg.quantum(r))
            if res.askees and res.leased > res.limits.max_size:
                assert res.quantum_sent == 0.0, (r, res.quantum_sent)  # over the cap: no turns
            elif res.askees and quantum is not None:
                sent = res.quantum_sent
                longer = paced(res, self.lg.sessions, self.lg.quantum(r), longer=True)
                figures = {False: quantum, True: longer}
                now = to_send(sent, figures.__getitem__)
                assert sent is not None and now is None, (r, sent, quantum, now)

    @invariant()
    def removed_resources_go_when_let_go(self) -> None:
        # Kept, marked removed, while a lease or fence of it is out (still
        # counted against its cap: I1); forgotten once the last is gone.
        assert sorted(self.lg.resources) == self.names()
        for r, res in self.lg.resources.items():
            assert res.removed == (r in self.removed), r
        self.over &= set(self.lg.resources)  # a forgotten one added back starts afresh

    @invariant()
    def cap_holds(self) -> None:  # I1
        for r, res in self.lg.resources.items():
            if res.leased <= res.limits.max_size:
                self.over.discard(r)
            else:
                event("over the cap after resize/re-registration")
                assert r in self.over, f"{r} over its cap without a resize or re-registration"

    @invariant()
    def peak_is_never_below_leased(self) -> None:
        # sharedpool_peak_leases is "most leases held at once since start".
        for res in self.lg.resources.values():
            assert res.peak >= res.leased, (res.name, res.peak, res.leased)

    @invariant()
    def waiters_are_served_when_there_is_room(self) -> None:  # I3
        for r, res in self.lg.resources.items():
            if res.draining:
                assert not res.waiters
            if res.failing_until is not None and self.now < res.failing_until:
                # Refused fast: the waits of the processes whose connects failed.
                assert not [w for w in res.waiters if w.session in res.fail_sessions]
            if res.paused or self.hold is not None or res.leased >= res.limits.max_size:
                continue
            stuck = [key for key in self.queued(r) if not self.blocked(key[0], r)]
            assert not stuck, f"{r} has {res.free} free slot(s) but {stuck} still wait"


LedgerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_ledger_state_machine = LedgerMachine.TestCase


class RestartMachine(LedgerMachine):
    """LedgerMachine with coordinator restarts (I4), in its own run so that
    the rules of I1–I3 keep their share of the steps of the first.

    ``restart`` replaces the ledger by a fresh one, built as the coordinator
    builds it (the config file's resources, ids from a clock ahead of every id
    out, a hold of ``restart_grace`` when it is a restart, and after a clean
    stop what the old one handed on). The processes keep what they hold
    (``away``) until they reconnect and re-register it (``come_back``), close
    a connection meanwhile, or die (``vanish``). Checked on top of the
    LedgerMachine's checks: nothing is granted in the hold, nor after it while
    re-registered + granted + fenced >= the cap; no lease is lost or held
    twice; leases of processes that never came back are only fenced, and not
    past the grace plus their fence delay."""

    # -- coordinator restarts (I4)

    def new_config(self, data: st.DataObject) -> dict[str, Resource]:
        """The config file the restarted coordinator reads: as first written (a
        live resize is lost), or edited meanwhile: a cap changed, a resource
        (other than the first) dropped."""
        config: dict[str, Resource] = {}
        for name, limits in self.base.items():
            edits = ["same", "same", "same", "resize"] + (["drop"] if name != "r0" else [])
            edit = data.draw(st.sampled_from(edits))
            if edit == "drop":
                event("restart: a resource dropped from the config")
                continue
            if edit == "resize":
                limits = replace(limits, max_size=data.draw(st.integers(max(1, limits.min_per_process), 5)))
            config[name] = limits
        return config

    @rule(data=st.data(), clean=st.booleans(), grace=st.sampled_from([1.5, 1.5, 0.5, 0.0]),
          gap=st.sampled_from([1, 1, 1000]))
    def restart(self, data: st.DataObject, clean: bool, grace: float, gap: int) -> None:
        """The coordinator is killed (SIGKILL: nothing handed on, its socket left
        behind) or stopped (SIGTERM: the marker hands on held and fenced leases
        if there were any), and started again as ``coordinator._serve`` and
        ``Server`` do it. Every process keeps the connections it holds."""
        old, now = self.lg, self.now
        handed: dict[str, Any] = {}
        if clean:
            fenced_now, held_now, late_now = old.fenced_state(now), old.held_state(), old.late_state()
            dropped_now = old.dropped_state()
            assert set(dropped_now) == self.awaited & set(self.bounds), (dropped_now, self.bounds)
            holding = old.hold_until is not None and now < old.hold_until
            # What a clean stop hands on: every lease a live process holds or is
            # awaited from, and every other fence with the time it has left.
            held_rows = {(r, lid, token, self.sessions[sid]) for lid, (sid, r, token) in self.held.items()}
            held_rows |= {(f[0], lid, f[3], f[2]) for lid, f in self.fenced.items() if lid in self.awaited}
            assert {tuple(row[:4]) for row in held_now} == held_rows
            assert len(held_now) == len(held_rows)
            fenced_rows = {(f[0], lid, f[3], f[2], max(0.0, f[1] - now))
                           for lid, f in self.fenced.items() if lid not in self.awaited}
            assert {tuple(row[:5]) for row in fenced_now} == fenced_rows
            assert len(fenced_now) == len(fenced_rows)
            assert set(late_now) == self.unclaimed & set(self.fenced) - self.awaited
            restarted = bool(fenced_now or holding or held_now)  # else no marker, no socket left
            if restarted:
                # Through JSON, as the restart marker carries it.
                handed = json.loads(json.dumps({"fenced": fenced_now, "held": held_now, "late": late_now,
                                                "dropped": dropped_now}))
        else:
            restarted = True  # the dead coordinator's socket is found
        event(f"restart: {'clean' if clean else 'crash'}{'' if restarted else ' (nothing out)'}")
        config = self.new_config(data)
        hold = grace if restarted else 0.0
        # Server(): ids from the wall clock in microseconds, ahead of every id out.
        self.lg = Ledger(dict(config), id_base=self.max_id + gap,
                         hold_until=now + hold if hold > 0 else None)
        # Every process keeps what it holds; its requests went with its session.
        for lid, (sid, r, token) in self.held.items():
            self.away.setdefault(self.sessions[sid], {})[lid] = (r, token)
        old_fenced, old_awaited, old_unclaimed = self.fenced, self.awaited, self.unclaimed
        old_bounds = self.bounds
        self.sessions, self.held, self.outstanding = {}, {}, {}
        self.fenced, self.awaited, self.unclaimed, self.bounds = {}, set(), set(), {}
        self.origin = {}
        self.over, self.giver = set(), None
        self.hold, self.grace_end = self.lg.hold_until, now + hold
        self.configured, self.removed = set(config), {}
        if handed.get("held"):
            assert self.lg.restore_held(handed["held"], now, dropped=handed["dropped"]) == []
            if self.hold is not None:  # counted, fenced to their process, until it re-registers
                for r, lid, token, pid, _ in handed["held"]:
                    if r in config:
                        self.fenced[lid] = (r, self.hold + self.delay(config[r]), pid, token)
                        self.awaited.add(lid)
                        if lid in old_bounds and lid in old_awaited:  # dropped: the hold is its time
                            self.bounds[lid] = self.hold
                            event("restart: a dropped session's leases handed on with their bound")
                        self.origin[lid] = ("handed", lid in self.bounds)
        if handed.get("fenced"):
            effects = self.lg.restore_fenced(handed["fenced"], now, handed.get("late", []))
            groups: dict[tuple[str, int, bool], list[int]] = {}
            for lid, (r, until, pid, token) in old_fenced.items():
                if lid in old_awaited or r not in config:
                    continue
                limits = config[r]
                longest = max(limits.fence_timeout, limits.quarantine_delay)
                self.fenced[lid] = (r, now + min(max(0.0, until - now), longest), pid, token)
                late = lid in old_unclaimed
                if late:
                    self.unclaimed.add(lid)
                groups.setdefault((r, pid, late), []).append(lid)
            fences = of(StartFence, effects)
            assert len(fences) == len(effects) == len(groups), effects
            assert {(f.resource, f.pid, tuple(sorted(f.leases)), f.terminate) for f in fences} == {
                (r, pid, tuple(sorted(ids)), not late) for (r, pid, late), ids in groups.items()}
            self.apply(effects)
        elif old_fenced.keys() - old_awaited:
            # A crash forgets the fences of processes that died before it: only
            # the grace stands between their backends and new grants.
            event("restart: fences of dead processes forgotten")
        for r in self.names():
            self.note_over(r)  # a smaller cap in the new config: nothing granted until below
        if self.hold is None and any(self.away.values()):
            event("restart with no grace while processes hold leases")

    @precondition(lambda self: set(self.fenced) - self.awaited)
    @rule(data=st.data(), grace=st.sampled_from([1.5, 0.5, 0.0]))
    def stop_with_fences(self, data: st.DataObject, grace: float) -> None:
        """A clean stop while dead processes' leases are fenced: the next
        coordinator fences them again (restore_fenced), each until its time is
        up. Rare among the ``restart`` rule's draws, so made a rule of its own."""
        event("restart: dead processes' fences handed on")
        self.restart(data, True, grace, 1)

    @precondition(lambda self: self.away)
    @rule(data=st.data(), grace=st.sampled_from([0.0, 1.5]))
    def come_back(self, data: st.DataObject, grace: float) -> None:
        """A process that kept its connections across a restart reconnects and
        re-registers them, as the client's hello does (state idle, no backend
        pid), in the grace or late. A lease of a resource the new config does
        not have is revoked: the process closes its connection. ``grace``: the
        server's restart_grace (see :meth:`second_client`)."""
        pid = data.draw(st.sampled_from(sorted(self.away)))
        self.back(data, pid, self.away.pop(pid), grace)

    @precondition(lambda self: self.two_clients_away())
    @rule(data=st.data())
    def one_client_back(self, data: st.DataObject) -> None:
        """Of a process whose leases are awaited from two of its sessions (the
        pools' client and one made by hand), one client comes back first with
        its own: the other's stay counted while the process runs, for the
        grace at most, for that client to bring them (``come_back``)."""
        pid = data.draw(st.sampled_from(self.two_clients_away()))
        origin = data.draw(st.sampled_from(sorted({self.origin[lid] for lid in self.away[pid]})))
        mine = {lid: x for lid, x in self.away[pid].items() if self.origin[lid] == origin}
        for lid in mine:
            del self.away[pid][lid]
        event("one client back: another client's leases left to it")
        self.back(data, pid, mine, 1.5)

    def two_clients_away(self) -> list[int]:
        """Processes away with leases of two sessions or more to bring back, none
        a restart handed on (``second_clients``)."""
        return [pid for pid in self.second_clients()
                if all(lid in self.origin for lid in self.away[pid])
                and len({self.origin[lid] for lid in self.away[pid]}) > 1]

    def back(self, data: st.DataObject, pid: int, mine: dict[int, tuple[str, int]], grace: float) -> None:
        entries: list[list[Any]] = data.draw(st.permutations(
            [[r, lid, token, IDLE, None] for lid, (r, token) in sorted(mine.items())]))
        event("come back: in the grace" if self.hold is not None else "come back: late")
        sid, effects = self.lg.open_session(pid, f"w{pid}", self.now, held=entries, grace=grace)
        self.sessions[sid] = pid
        # Handed on as its own, or of a session it brought some of, not brought
        # back (closed while away): fenced now. Of a session it brought none of
        # (all closed while away): bounded by the grace (another client's?).
        brought = {lid for _, lid, _, _, _ in entries}
        groups = self.awaited_groups(lambda f: f[2] == pid)
        origins = {origin for (_, _, origin), ids in groups.items() if set(ids) & brought}
        dropped = {}
        for key, ids in groups.items():
            origin = key[2]
            if grace > 0 and not isinstance(origin, tuple) and origin not in origins:
                event("come back: none of a session's leases brought: bounded by the grace")
                self.bound_by_grace(ids, grace)
            elif left := [lid for lid in ids if lid not in brought]:
                dropped[key] = left
        fences = of(StartFence, effects)
        assert {(f.resource, f.pid, tuple(sorted(f.leases))) for f in fences} == {
            (r, p_, tuple(sorted(ids))) for (r, p_, _), ids in dropped.items()}, effects
        for (r, _, _), ids in dropped.items():
            event("come back: a lease closed while away fenced at the hello")
            self.refence(ids, self.now + self.delay(self.limits(r)))
            self.unclaimed |= set(ids)
            self.awaited -= set(ids)
        revoked: set[int] = set()
        for r, lid, token, _, _ in entries:
            if r not in self.lg.resources:
                revoked.add(lid)
                continue
            fenced = self.fenced.pop(lid, None)
            if fenced is not None:  # handed on as held, or fenced unclaimed: taken back
                assert fenced[0] == r and fenced[2] == pid and fenced[3] == token, (lid, fenced, pid)
                event("come back: took back a lease the ledger kept for it")
                self.awaited.discard(lid)
                self.unclaimed.discard(lid)
            else:
                event("come back: registered a lease the ledger did not know")
            assert lid not in self.held
            self.held[lid] = (sid, r, token)
        for r in {r for _, (r, _) in mine.items() if r in self.lg.resources}:
            self.note_over(r)
            if r in self.over:
                event("come back: over the cap")
        revokes = [n for n in of(Notify, effects) if n.verb == "revoke"]
        assert sorted(n.args["lease"] for n in revokes) == sorted(revoked), effects
        assert all(pr.code == "bad_held" for pr in of(Problem, effects))
        assert len(of(Problem, effects)) == len(revoked), effects
        assert not of(Granted, effects), "a re-registration never frees a slot"
        self.apply(effects, problems=("bad_held",) if revoked else ())

    @precondition(lambda self: self.sessions)
    @rule(data=st.data(), grace=st.sampled_from([None, None, 0.0, 0.5, 1.5]))
    def end_session(self, data: st.DataObject, grace: float | None) -> None:
        """The coordinator ends a session whose process runs on (a bad frame,
        not reading), or its process drops it to reconnect (``grace``: kept
        for that long at most): it keeps its connections, so its leases stay
        counted, awaited from it as a live holder's after a restart, until it
        re-registers them (``come_back``) or exits (``vanish``: fenced then)."""
        sid = data.draw(st.sampled_from(sorted(self.sessions)))
        pid = self.sessions.pop(sid)
        mine = self.away.setdefault(pid, {})
        for lid in sorted(lid for lid, (s, _, _) in self.held.items() if s == sid):
            _, r, token = self.held.pop(lid)
            until = self.now + ALIVE_RECHECK
            self.bounds.pop(lid, None)  # an earlier time away's, if any
            if grace is not None:  # looked at often: a process at exit drops its session too
                self.bounds[lid] = self.now + grace
                until = min(self.now + DROPPED_RECHECK, self.bounds[lid])
            if self.hold is not None:  # a hold lifts no awaited fence before its end
                until = max(until, self.hold + self.delay(self.limits(r)))
            mine[lid] = (r, token)
            self.fenced[lid] = (r, until, pid, token)
            self.awaited.add(lid)
            self.origin[lid] = sid
        event("end session: leases awaited from the live process" if mine else "end session: none held")
        for key in [k for k in self.outstanding if k[0] == sid]:
            del self.outstanding[key]
        effects = self.lg.close_session(sid, self.now, ended="not reading", grace=grace)
        assert not of(StartFence, effects) and not of(Granted, effects), effects
        self.apply(effects)

    @precondition(lambda self: any(self.away.values()))
    @rule(data=st.data())
    def close_while_away(self, data: st.DataObject) -> None:
        """A process closes a connection before it reconnects: it will not
        re-register that lease (the ledger, if it was handed on, keeps it
        fenced to the process until the hold ends and its fence with it)."""
        pid = data.draw(st.sampled_from(sorted(p for p, ls in self.away.items() if ls)))
        lid = data.draw(st.sampled_from(sorted(self.away[pid])))
        del self.away[pid][lid]

    @precondition(lambda self: any(self.second_clients()))
    @rule(data=st.data())
    def second_client(self, data: st.DataObject) -> None:
        """Another ``Client`` of a process whose leases are awaited from a
        session that ended while it ran (one made by hand beside the pools'
        shared one) connects first, with none of them: they stay counted, for
        restart_grace more at most, for the client that has them to come back
        (``come_back``). (Leases a restart handed on have no session to tell
        clients apart: the first hello speaks for all of them, as the README
        says; not drawn here.)"""
        pid = data.draw(st.sampled_from(self.second_clients()))
        groups = self.awaited_groups(lambda f: f[2] == pid)
        sid, effects = self.lg.open_session(pid, f"w{pid}b", self.now, grace=1.5)
        assert effects == [], effects
        event("second client: another session's awaited leases bounded")
        for ids in groups.values():
            self.bound_by_grace(ids, 1.5)
        self.sessions[sid] = pid

    def second_clients(self) -> list[int]:
        """Processes away whose awaited leases all come from their sessions."""
        pids = {self.fenced[lid][2] for lid in self.awaited}
        return sorted(pid for pid in pids if pid in self.away and not any(
            isinstance(self.origin[lid], tuple) for lid in self.awaited if self.fenced[lid][2] == pid))

    def dying(self) -> list[int]:
        """Processes away that may die: none with a session open (a session
        closed after its process died would be fenced later than the model's
        bounds on a dead process's leases allow)."""
        live = set(self.sessions.values())
        return sorted(pid for pid in self.away if pid not in live)

    @precondition(lambda self: self.dying())
    @rule(data=st.data())
    def vanish(self, data: st.DataObject) -> None:
        """A process dies before it reconnects: it never comes back."""
        self.vanish_pid(data.draw(st.sampled_from(self.dying())))

    def vanish_pid(self, pid: int) -> None:
        del self.away[pid]
        self.vanished[pid] = self.now

    @precondition(lambda self: self.hold is None and self.awaited)
    @rule(data=st.data())
    def vanish_while_kept(self, data: st.DataObject) -> None:
        """A process whose leases the ledger kept past the hold (it ran, but
        had not re-registered) dies: at the next look they are fenced. Rare
        among ``vanish``'s draws, so made a rule of its own."""
        pid = data.draw(st.sampled_from(sorted({self.fenced[lid][2] for lid in self.awaited})))
        if pid in self.dying():
            self.vanish_pid(pid)
            self.now += ALIVE_RECHECK
            self.advance()

    @invariant()
    def no_lease_lost_or_duplicated(self) -> None:  # I4
        lg = self.lg
        where: dict[int, tuple[str, str]] = {}
        for r, res in lg.resources.items():
            for kind, ids in (("live", res.live), ("fenced", res.fenced)):
                for lid in ids:
                    assert lid not in where, f"lease {lid} both {where[lid]} and {(kind, r)}"
                    where[lid] = (kind, r)
        away = [lid for ls in self.away.values() for lid in ls]
        assert len(away) == len(set(away)) and not set(away) & set(self.held)
        for pid, ls in self.away.items():
            for lid, (r, token) in ls.items():
                # Not live in a session; at most kept fenced to its own process.
                if lid in where:
                    assert where[lid] == ("fenced", r), (lid, where[lid])
                    f = lg.resources[r].fenced[lid]
                    assert (f.pid, f.lease.token) == (pid, token)
        assert self.awaited <= set(self.fenced)
        if self.hold is None:  # after the hold, awaited only from processes running when last looked at
            assert all(self.fenced[lid][2] in self.away or self.fenced[lid][2] in self.vanished
                       or lid in self.bounds for lid in self.awaited)
        # The ledger tells a fence awaited from a running process (handed on as
        # held), one settled late, and a dead session's apart as the model does.
        fenced = {lid for res in lg.resources.values() for lid in res.fenced}
        assert {row[1] for row in lg.held_state()} & fenced == self.awaited
        assert set(lg.late_state()) == self.unclaimed & fenced
        # Once the grace is over, a process that never came back blocks nobody
        # beyond its fence: its leases are only fenced, until the grace's end
        # plus the fence delay at most.
        for res in lg.resources.values():
            longest = max(res.limits.fence_timeout, res.limits.quarantine_delay,
                          self.delays.get(res.name, 0.0))
            for lid, f in res.fenced.items():
                if f.pid not in self.vanished:
                    continue
                if lid in self.awaited:  # in the hold, as handed on; after it, looked at
                    # Fenced from the grace's end, or, alive then, from the first
                    # look after it died; till then looked at every ALIVE_RECHECK.
                    since = max(self.grace_end, self.vanished[f.pid])
                    bound = max(self.grace_end + longest, since + ALIVE_RECHECK)
                    assert f.until <= bound, (lid, f.until, bound)
                elif lid in self.unclaimed:
                    since = max(self.grace_end, self.settled.get(lid, self.grace_end))
                    assert f.until <= since + longest, (lid, f.until, since)
                else:
                    # A session of it closed before it died (a lease granted to
                    # the old session of a reconnect): that fence is its own, and
                    # neither its death nor a restart since puts its end later.
                    assert f.until <= self.vanished[f.pid] + longest, (lid, f.until)


RestartMachine.TestCase.settings = LedgerMachine.TestCase.settings
test_restart_state_machine = RestartMachine.TestCase


class _Drawn:
    """Stands in for hypothesis's ``data()`` when a rule is replayed by hand."""

    def __init__(self, *values: Any) -> None:
        self.values = list(values)

    def draw(self, strategy: Any, label: Any = None) -> Any:
        return self.values.pop(0)


def _replayed(monkeypatch: pytest.MonkeyPatch) -> tuple[RestartMachine, Callable[..., None]]:
    """A RestartMachine to replay a case by hand, and ``step``: a rule (or
    helper) called, then the machine's checks, as hypothesis runs them."""
    monkeypatch.setitem(globals(), "event", lambda *a, **k: None)  # outside a hypothesis run
    m = RestartMachine()

    def step(call: Callable[..., Any], *args: Any, **kw: Any) -> None:
        call(*args, **kw)
        for check in (m.ledger_matches_the_model, m.askees_know_the_quantum, m.cap_holds,
                      m.no_lease_lost_or_duplicated, m.peak_is_never_below_leased,
                      m.waiters_are_served_when_there_is_room):
            check()

    return m, step


def test_restart_machine_a_fence_from_before_its_process_died_is_its_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The restart state machine's shrunk case, replayed without hypothesis. A
    process reconnects before its old session is noticed gone: the re-registration
    frees the old session's max_per_process slot, its queued acquire is granted
    (into a dead socket) and fenced when it closes, a dead session's lease of a
    process that runs on. A clean stop hands it on with the time it has left;
    the process then dies, never back. That fence is neither awaited nor settled
    late, and it need not be: it ends at its own time, which the stop kept."""
    m, step = _replayed(monkeypatch)

    step(m.setup, [Resource(3, max_per_process=1, quarantine_delay=0.1, fence_timeout=0.2)], 1)
    step(m.acquire_one, 1, "r0", None)  # lease 1
    step(m.acquire_one, 1, "r0", None)  # queued: max_per_process
    step(m.reconnect, _Drawn(1), early=True)  # lease 1 moved on; lease 2 to the old session, fenced
    assert m.held == {1: (2, "r0", 1)} and m.fenced == {2: ("r0", T0 + 0.1, 1, 2)}
    step(m.restart, _Drawn("same"), clean=True, grace=1.5, gap=1)
    assert m.awaited == {1} and m.fenced[2][1] == T0 + 0.1
    step(m.vanish, _Drawn(1))
    # The ledger: the dead session's fence ends at its time, the kept lease
    # (awaited) when the hold ends plus its fence, and nothing is left.
    res = m.lg.resources["r0"]
    assert m.lg.tick(T0 + 0.1) == [] and set(res.fenced) == {1}
    [start] = m.lg.tick(T0 + 1.5)  # its process is not running: a dead one's
    assert isinstance(start, StartFence) and start.leases == (1,) and not start.terminate
    m.lg.tick(T0 + 1.6)
    assert res.leased == 0 and m.lg.next_deadline() is None


def test_restart_machine_two_clients_of_one_process_each_bring_their_own(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``one_client_back`` replayed by hand (hypothesis rarely gets a process
    two sessions' leases away): both sessions of one process ended while it
    ran; one client brings its lease back, the other's stays counted for it
    (looked at as the process runs) and is taken back within the grace."""
    m, step = _replayed(monkeypatch)

    step(m.setup, [Resource(3, quarantine_delay=0.1)], 1)
    step(m.acquire_one, 1, "r0", None)  # lease 1, the pools' client's
    step(m.end_session, _Drawn(1), grace=None)
    step(m.second_client, _Drawn(1))  # session 2, made by hand
    step(m.acquire_one, 2, "r0", None)  # lease 2
    step(m.end_session, _Drawn(2), grace=None)
    assert m.two_clients_away() == [1]
    step(m.one_client_back, _Drawn(1, 2, [["r0", 2, 2, IDLE, None]]))
    assert m.bounds == {1: T0 + 1.5}
    step(m.tick, 0.5)
    assert set(m.lg.resources["r0"].fenced) == {1}  # the process runs: still counted
    step(m.come_back, _Drawn(1, [["r0", 1, 1, IDLE, None]]), grace=1.5)
    step(m.tick, 3.0)
    assert set(m.held) == {1, 2} and m.fenced == {}


def test_restart_machine_a_process_back_without_its_leases_is_looked_at_once_more(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The restart state machine's shrunk case, replayed without hypothesis. A
    process, its session ended, closed its only lease while away and came back
    without it: bounded by the grace. The next look (the process no longer away
    in the model: taken as gone) settles it in the model before the ledger's
    tick, which was then asked about a pid neither away, vanished nor (any
    more) bounded: the model's check failed, the ledger was right."""
    m, step = _replayed(monkeypatch)

    step(m.setup, [Resource(1, acquire_timeout=0.0, quarantine_delay=0.0, fence_timeout=0.2)], 2)
    step(m.resize, _Drawn("r0", 2))
    step(m.register_foreign, _Drawn("r0"), n=1)  # pid 3, lease 1000
    step(m.end_session, _Drawn(3), grace=None)
    step(m.close_while_away, _Drawn(3, 1000))
    step(m.come_back, _Drawn(3, []), grace=1.5)
    step(m.tick, 0.1)
    assert m.lg.awaited_pids() == set() and m.fenced == {}


def test_restart_hold_grants_nothing_until_it_ends() -> None:
    """A restarted coordinator waits for re-registrations before granting (I1 across restarts)."""
    lg = Ledger({"pg": Resource(2)}, hold_until=T0 + 1.0)
    late = session(lg)
    effects = lg.acquire(late, 1, "pg", T0, timeout=5)  # queued, not granted
    assert of(Granted, effects) == []
    denied = lg.acquire(late, 2, "pg", T0, timeout=0)
    assert of(Denied, denied)[0].reason == "timeout" and "restarted" in of(Denied, denied)[0].message
    assert lg.next_deadline() == T0 + 1.0
    # Meanwhile a process that kept two connections re-registers them.
    _, problems = lg.open_session(99, "kept", T0 + 0.5, held=[["pg", 10**9, 10**9, "busy", None],
                                                                ["pg", 10**9 + 1, 10**9 + 1, "idle", None]])
    assert of(Problem, problems) == []
    # Not asked to give one back while nothing can be granted: it would close a
    # working connection for a waiter that must wait anyway (before, every
    # restart under contention closed the re-registered connections at once).
    assert of(AskReclaim, problems) == []
    effects = lg.tick(T0 + 1.0)
    assert of(Granted, effects) == []  # the hold is over, but the cap is full
    assert [a.count for a in of(AskReclaim, effects)] == [1]  # now it is asked, for the waiter
    assert lg.resources["pg"].leased == 2 and len(lg.resources["pg"].waiters) == 1


def test_a_wait_that_runs_out_in_a_restart_hold_says_so() -> None:
    # Before, its denial said "all 2 leases of 'pg' are held" with none held.
    lg = Ledger({"pg": Resource(2)}, hold_until=T0 + 1.0)
    sid = session(lg)
    assert queued(lg.acquire(sid, 1, "pg", T0, timeout=0.5))
    assert queued(lg.acquire(sid, 2, "pg", T0, timeout=0.9))
    assert queued(lg.acquire(sid, 3, "pg", T0, timeout=1.5))
    [first] = of(Denied, lg.tick(T0 + 0.5))
    assert first.reason == "timeout" and "restarted" in first.message
    effects = lg.tick(T0 + 1.2)  # a late tick: the hold and the second wait ran out together
    [second] = of(Denied, effects)
    assert second.req == 2 and "restarted" in second.message
    assert granted(effects).req == 3


def test_restart_hold_still_asks_back_what_is_over_the_cap() -> None:
    lg = Ledger({"pg": Resource(1)}, hold_until=T0 + 1.0)
    sid, effects = lg.open_session(99, "kept", T0, held=[["pg", 7, 7, "idle", None],
                                                        ["pg", 8, 8, "idle", None]])
    assert [(a.session, a.count) for a in of(AskReclaim, effects)] == [(sid, 1)]


def test_max_waiting_in_a_restart_hold_counts_only_what_free_slots_cannot_serve() -> None:
    # Before, acquires queued only by the hold counted as waiting for a free
    # lease: with 10 free slots and max_waiting=1, the second was refused.
    lg = Ledger({"pg": Resource(10, max_waiting=1)}, hold_until=T0 + 1.0)
    a = session(lg)
    for req in (1, 2, 3):
        assert of(Denied, lg.acquire(a, req, "pg", T0, timeout=5)) == []
    assert len(of(Granted, lg.tick(T0 + 1.0))) == 3
    full = Ledger({"pg": Resource(1, max_waiting=1)}, hold_until=T0 + 1.0)
    b = session(full)
    assert of(Denied, full.acquire(b, 1, "pg", T0, timeout=5)) == []  # the free slot's
    assert of(Denied, full.acquire(b, 2, "pg", T0, timeout=5)) == []  # the one waiter allowed
    [denied] = of(Denied, full.acquire(b, 3, "pg", T0, timeout=5))
    assert denied.reason == "too_many_waiters"
    none = Ledger({"pg": Resource(2, max_waiting=0)}, hold_until=T0 + 1.0)
    c = session(none)
    assert of(Denied, none.acquire(c, 1, "pg", T0, timeout=5)) == []  # max_waiting=0 too
    assert len(of(Granted, none.tick(T0 + 1.0))) == 1


def test_an_acquire_as_the_restart_hold_ends_does_not_pass_those_queued_in_it() -> None:
    # The hold is over by the clock, its tick not in yet: those queued during
    # the hold are served first (I3), not a newcomer that finds the slot free.
    lg = Ledger({"pg": Resource(1)}, hold_until=T0 + 1.0)
    early, late = session(lg, pid=1), session(lg, pid=2)
    assert queued(lg.acquire(early, 1, "pg", T0, timeout=5))
    assert granted(lg.acquire(late, 1, "pg", T0 + 1.01, timeout=5)).session == early
    assert [w.session for w in lg.resources["pg"].waiters] == [late]


def test_wait_histogram_counts_every_grant() -> None:
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    first = of(Granted, lg.acquire(a, 1, "pg", T0, timeout=5))[0]
    lg.acquire(b, 1, "pg", T0, timeout=5)
    lg.release(a, first.lease.id, T0 + 0.03)  # b waited 30 ms
    hist = lg.snapshot_resources(T0 + 0.03)[0]["wait_histogram"]
    counts = dict((bound, n) for bound, n in hist["buckets"])
    assert counts[0.0005] == 1  # a: granted at once
    assert counts[0.01] == 1 and counts[0.05] == 2 and counts[None] == 2  # cumulative
    assert abs(hist["sum"] - 0.03) < 1e-9


def test_a_retimed_request_keeps_its_place_and_times_out_at_its_new_deadline() -> None:
    """A pool carries its queued request on for its next waiter: moved to a
    later deadline, it stays ahead of requests queued after it (withdrawn and
    asked again, it went behind them) and times out at the new deadline only,
    counted once."""
    lg = ledger(pg=1)
    holder = session(lg, pid=1)
    lid = grant(lg, holder, 1)
    a, b = session(lg, pid=2), session(lg, pid=3)
    assert queued(lg.acquire(a, 1, "pg", T0, timeout=1.0))
    assert queued(lg.acquire(b, 1, "pg", T0 + 0.5, timeout=10.0))
    assert lg.retime(a, 1, 2.0, T0 + 0.9) == []
    assert lg.next_deadline() == T0 + 2.9
    assert lg.tick(T0 + 1.5) == []  # the old deadline passed: still queued
    assert [(w.session, w.req) for w in lg.resources["pg"].waiters] == [(a, 1), (b, 1)]
    assert granted(lg.release(holder, lid, T0 + 2.0)).session == a  # first in line still
    lid = next(iter(lg.sessions[a].leases))
    lg.release(a, lid, T0 + 2.1)  # to b
    assert queued(lg.acquire(a, 2, "pg", T0 + 2.2, timeout=5.0))
    lg.retime(a, 2, 0.5, T0 + 2.3)  # earlier, too
    assert lg.next_deadline() == T0 + 2.8
    [deny] = of(Denied, lg.tick(T0 + 2.8))
    assert (deny.session, deny.req, deny.reason) == (a, 2, "timeout")
    assert lg.resources["pg"].timeouts == 1
    assert lg.tick(T0 + 7.2) == [] and lg.resources["pg"].timeouts == 1  # the old entry: nothing
    assert lg.next_deadline() is None


def test_a_retime_crossed_by_its_answer_is_ignored_one_never_asked_ends_the_session() -> None:
    """A retime of a request granted, timed out or cancelled as it came (the
    client's retime and the answer crossed) changes nothing. One of a req
    the session never sent, its own or another session's, is no client's:
    the session is ended (I5), and the other session's waiter is untouched."""
    lg = ledger(pg=1)
    a, b = session(lg, pid=1), session(lg, pid=2)
    grant(lg, a, 1)
    assert queued(lg.acquire(a, 2, "pg", T0, timeout=1.0))
    lg.cancel(a, 2, T0)
    assert queued(lg.acquire(b, 7, "pg", T0, timeout=1.0))
    assert lg.retime(a, 1, 5.0, T0) == []  # granted
    assert lg.retime(a, 2, 5.0, T0) == []  # cancelled
    for sid, req in ((a, 7), (a, 3), (session(lg, pid=3), 1)):  # b's req; none of a's; a session with none
        problem = only(Problem, lg.retime(sid, req, 5.0, T0))
        assert (problem.code, problem.fatal, problem.req) == ("unknown_request", True, req)
        assert "never sent" in problem.message
    bad = only(Problem, lg.retime(b, 7, math.nan, T0))
    assert (bad.code, bad.fatal) == ("bad_request", True)
    assert only(Problem, lg.retime(b, 7, -1.0, T0)).fatal
    assert [(w.session, w.deadline) for w in lg.resources["pg"].waiters] == [(b, T0 + 1.0)]


def test_withdrawn_waiters_do_not_pile_up_in_the_deadline_heap() -> None:
    """Behind one live waiter with an early deadline, thousands queued and
    withdrawn by another process must not stay in memory until their own
    deadlines come round."""
    lg = ledger(pg=1)
    grant(lg, session(lg, pid=1), 1)
    assert queued(lg.acquire(session(lg, pid=2), 1, "pg", T0, timeout=100))
    churn = session(lg, pid=3)
    for req in range(1, 2001):
        assert queued(lg.acquire(churn, req, "pg", T0, timeout=3600))
        lg.cancel(churn, req, T0)
        lg.next_deadline()
    assert len(lg._deadlines.waiters) < 200
    assert lg.next_deadline() == T0 + 100


class _Passes(dict):  # type: ignore[type-arg]
    """A dict that counts the passes made over it."""

    passes = 0

    def __iter__(self) -> Any:
        self.passes += 1
        return super().__iter__()

    def keys(self) -> Any:
        self.passes += 1
        return super().keys()

    def values(self) -> Any:
        self.passes += 1
        return super().values()

    def items(self) -> Any:
        self.passes += 1
        return super().items()


def _churn(lg: Ledger, sid: int, resource: str, now: float, count: int = 50) -> None:
    """What the server does per frame: a call, then next_deadline() (and a tick when due)."""
    for req in range(1, count + 1):
        lease = grant(lg, sid, req, resource, now)
        lg.next_deadline()
        lg.release(sid, lease, now)
        lg.next_deadline()
        lg.tick(now)


def test_fenced_leases_are_not_passed_over_on_every_call() -> None:
    """Before: next_deadline() (after every frame) and tick() went over every
    fenced lease: while a dead process's 10,000 leases were fenced, each lease
    op of everyone else cost 22x more (893 us instead of 40)."""
    lg = ledger(pg={"max_size": 3000, "quarantine_delay": 60.0})
    dead = session(lg, pid=1)
    for req in range(1, 2001):
        grant(lg, dead, req)
    lg.close_session(dead, T0)
    res = lg.resources["pg"]
    res.fenced = fenced = _Passes(res.fenced)
    _churn(lg, session(lg, pid=2), "pg", T0 + 1)
    assert fenced.passes == 0
    assert lg.next_deadline() == T0 + 60.0
    lg.tick(T0 + 60.0)
    assert not res.fenced and lg.next_deadline() is None


def test_resources_are_not_passed_over_on_every_call() -> None:
    """Before: next_deadline() went over every resource after every frame: with
    1,000 resources configured, a lease op cost 627 us instead of 33."""
    lg = Ledger({f"r{i}": Resource(4) for i in range(200)})
    sid = session(lg)
    lg.resources = resources = _Passes(lg.resources)
    _churn(lg, sid, "r7", T0)
    assert resources.passes == 0


def test_reclaim_does_not_pass_over_every_session() -> None:
    """Before: every event of a resource with waiters went over every session
    (and over each holder's leases): 800 sessions queued at a cap of 4 cost
    the coordinator 3.4 ms a grant, serving the queue O(n^2)."""
    lg = ledger(pg={"max_size": 2, "acquire_timeout": 60})
    holders = [session(lg, pid=1), session(lg, pid=2)]
    leases = [grant(lg, sid, 1) for sid in holders]
    waiting = [session(lg, pid=10 + i) for i in range(300)]
    for sid in waiting:
        assert queued(lg.acquire(sid, 1, "pg", T0))
    lg.quantum("pg")  # computed once (it goes over the sessions' costs), then kept
    lg.sessions = sessions = _Passes(lg.sessions)
    served = []
    for i in range(100):
        effects = lg.release(holders[i % 2], leases[i % 2], T0 + 1)
        lease = granted(effects)
        holders[i % 2], leases[i % 2] = lease.session, lease.lease.id
        served.append(lease.session)
        lg.report(lease.session, [[lease.lease.id, "busy", None, None]], T0 + 1)
    assert served == waiting[:100]  # first come, first served
    assert sessions.passes == 0


def test_a_restore_does_not_search_every_resource_for_each_lease() -> None:
    """Before: each entry of a restart marker was looked for in every resource:
    with 3,000 resources and 20,000 leases the restore took 5.5 s of the new
    coordinator's loop (its restart_grace, 1.5 s, running meanwhile)."""
    names = [f"r{i}" for i in range(100)]
    lg = Ledger({name: Resource(50) for name in names}, hold_until=T0 + 1.5)
    lg.resources = resources = _Passes(lg.resources)
    held = [[names[i % 100], 1000 + i, 1000 + i, 7, None] for i in range(500)]
    fenced = [[names[i % 100], 5000 + i, 5000 + i, 8, 1.0, None] for i in range(500)]
    lg.restore_held(held + held[:3], T0)  # the same lease twice: counted once
    lg.restore_fenced(fenced + [[names[0], 1000, 1000, 9, 1.0, None]], T0)  # held already: skipped
    assert resources.passes <= 2
    assert sum(len(res.fenced) for res in resources.values()) == 1000


def test_a_lease_fenced_again_keeps_its_later_fence_end() -> None:
    """The expiry heap keeps the entry of a fence taken back (its process came
    back) until it reaches the top: due, it must not end the lease's later
    fence (its process died again), nor leave it out of next_deadline()."""
    lg = ledger(pg={"max_size": 1, "quarantine_delay": 1.0, "acquire_timeout": 10})
    first = session(lg, pid=7)
    lease = grant(lg, first, 1)
    lg.close_session(first, T0)  # fenced until T0 + 1
    again, _ = lg.open_session(7, "w", T0 + 0.5, held=[["pg", lease, lease, "idle", None]])
    assert lease in lg.resources["pg"].live and not lg.resources["pg"].fenced  # taken back
    lg.close_session(again, T0 + 0.5)  # fenced again, until T0 + 1.5
    other = session(lg, pid=8, now=T0 + 0.5)
    assert queued(lg.acquire(other, 1, "pg", T0 + 0.5))
    assert lg._deadlines.fences[0][0] == T0 + 1.0  # the first fence's entry, still on top
    assert not of(Granted, lg.tick(T0 + 1.0))  # its end is not the later fence's
    assert list(lg.resources["pg"].fenced) == [lease]
    assert lg.next_deadline() == T0 + 1.5
    assert granted(lg.tick(T0 + 1.5)).session == other


def test_lifted_fences_do_not_pile_up_in_the_expiry_heap() -> None:
    """Fences lifted early (the monitor saw the backends go) must not stay in
    memory for their whole fence_timeout behind one long fence."""
    lg = ledger(pg={"max_size": 10, "monitor_dsn": "dbname=x", "fence_timeout": 3600.0})
    grant(lg, session(lg, pid=1), 1, now=T0 - 1)
    lg.close_session(1, T0 - 1)  # one fence that stays
    for pid in range(2, 2002):
        sid = session(lg, pid=pid)
        lease = grant(lg, sid, 1)
        [fence] = of(StartFence, lg.close_session(sid, T0))
        lg.unfence("pg", [lease], T0, fence.fence)
        lg.next_deadline()
    assert len(lg._deadlines.fences) < 200
    assert lg.next_deadline() == T0 - 1 + 3600.0


def test_one_process_may_queue_only_so_many_acquires() -> None:
    from sharedpool.ledger import MAX_SESSION_WAITING

    lg = ledger(pg=1)
    grant(lg, session(lg, pid=1), 1)
    flood = session(lg, pid=2)
    for req in range(1, MAX_SESSION_WAITING + 1):
        assert queued(lg.acquire(flood, req, "pg", T0, timeout=60))
    denied = only(Denied, lg.acquire(flood, MAX_SESSION_WAITING + 1, "pg", T0, timeout=60))
    assert denied.reason == "too_many_waiters" and str(MAX_SESSION_WAITING) in denied.message
    assert queued(lg.acquire(session(lg, pid=3), 1, "pg", T0, timeout=60))  # others still queue


def test_a_long_session_name_is_cut() -> None:
    from sharedpool.ledger import MAX_NAME

    lg = ledger(pg=1)
    sid = session(lg, name="x" * 1_000_000)
    assert len(lg.sessions[sid].name) == MAX_NAME


def test_fences_survive_a_clean_restart() -> None:
    """What a stopping coordinator hands to the next one: the fenced leases of
    dead processes, re-fenced for the time they had left (bounded by the
    resource's own fence limits), counted against the cap meanwhile."""
    old = ledger(pg=Resource(1, quarantine_delay=5))
    dead = session(old, pid=7)
    lease = grant(old, dead, 1)
    old.close_session(dead, T0)
    state = old.fenced_state(T0 + 1)
    assert state == [["pg", lease, old.resources["pg"].fenced[lease].lease.token, 7, 4.0, None]]
    new = ledger(pg=Resource(1, quarantine_delay=5))
    [start] = new.restore_fenced(state + [["gone", 1, 1, 1, 1.0, None], "junk", ["pg", -1, 1, 1, 1, None]],
                                 T0 + 50)
    assert isinstance(start, StartFence) and start.leases == (lease,)
    newcomer = session(new, pid=8)
    assert queued(new.acquire(newcomer, 1, "pg", T0 + 50, timeout=60))  # still fenced
    late = granted(new.tick(T0 + 54.1))  # its 4 s are up
    assert late.session == newcomer and late.lease.id > lease  # ids are never reused
    # A time left too big for a float (a hand-written marker): the resource's own bound.
    other = ledger(pg=Resource(1, quarantine_delay=5))
    [start] = other.restore_fenced([["pg", lease, 1, 7, 10**400, None]], T0)
    assert other.resources["pg"].fenced[lease].until == T0 + 10  # max(fence_timeout, quarantine)


def asked(lg: Ledger, resource: str = "pg") -> dict[int, int]:
    return {sid: s.asked.get(resource, 0) for sid, s in lg.sessions.items()}


def test_the_only_holder_is_asked_even_when_it_is_next_in_line() -> None:
    """A pool with more threads than connections keeps an acquire queued while
    it holds every lease; a process behind it, holding nothing, must not wait
    until that acquire times out (I3). The head gives one back (it goes to its
    own waiter, first in line), then it is asked as any holder is."""
    lg = ledger(pg=2)
    a, b = session(lg, pid=1), session(lg, pid=2)
    leases = [grant(lg, a, 1), grant(lg, a, 2)]
    lg.report(a, [[lid, BUSY, None, None] for lid in leases], T0)
    lg.acquire(a, 3, "pg", T0, timeout=60)
    effects = lg.acquire(b, 1, "pg", T0 + 0.001, timeout=60)
    assert only(AskReclaim, effects) == AskReclaim(a, "pg", 1)
    # Its give-back goes to b, past its own waiter (which would only reconnect).
    assert granted(lg.release(a, leases[0], T0 + 1)).session == b
    assert asked(lg)[a] == 0


def test_the_head_is_asked_when_every_other_holder_is_at_its_floor() -> None:
    """As above, with another process holding only its min_per_process floor:
    that holder has nothing to give, and must not stand in for one asked."""
    lg = ledger(pg=Resource(3, min_per_process=1))
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    grant(lg, c, 1)
    leases = [grant(lg, a, 1), grant(lg, a, 2)]
    lg.report(a, [[lid, BUSY, None, None] for lid in leases], T0)
    lg.acquire(a, 3, "pg", T0, timeout=60)
    effects = lg.acquire(b, 1, "pg", T0 + 0.001, timeout=60)
    assert only(AskReclaim, effects) == AskReclaim(a, "pg", 1)
    assert granted(lg.release(a, leases[0], T0 + 1)).session == b


def test_the_head_gives_back_once_however_many_acquires_it_has_queued() -> None:
    lg = ledger(pg=3)
    a, b = session(lg, pid=1), session(lg, pid=2)
    leases = [grant(lg, a, req) for req in range(3)]
    lg.report(a, [[lid, BUSY, None, None] for lid in leases], T0)
    for req in range(3, 6):
        lg.acquire(a, req, "pg", T0, timeout=60)
    assert only(AskReclaim, lg.acquire(b, 1, "pg", T0 + 0.001, timeout=60)) == AskReclaim(a, "pg", 1)
    assert granted(lg.release(a, leases[0], T0 + 1)).session == b
    assert asked(lg)[a] == 0


def test_a_reconnect_that_takes_a_fenced_lease_back_asks_for_it() -> None:
    """The waiter was counting on the fence to end; the lease is live again, in
    a session that holds it idle: that session is asked to give it back."""
    lg = ledger(pg=Resource(1, quarantine_delay=0.05))
    a, b = session(lg, pid=1), session(lg, pid=2)
    lease = grant(lg, a, 1)
    lg.report(a, [[lease, IDLE, None, None]], T0)
    lg.acquire(b, 1, "pg", T0, timeout=10)
    lg.close_session(a, T0 + 0.001)  # fenced: the ask is withdrawn, the fence will free it
    a2, effects = lg.open_session(1, "w", T0 + 0.002, held=[["pg", lease, lease, IDLE, None]])
    assert effects == [AskReclaim(a2, "pg", 1)]


@pytest.mark.parametrize("verb", ["failing", "pause", "drain"])
def test_asks_are_withdrawn_when_nothing_may_be_granted(verb: str) -> None:
    """Every waiter dropped (connections failing, drain) or grants stopped
    (pause): a holder asked to give back for them is told it owes nothing."""
    lg = ledger(pg=1)
    a, b, c = session(lg, pid=1), session(lg, pid=2), session(lg, pid=3)
    lease = grant(lg, a, 1)
    lg.report(a, [[lease, BUSY, None, None]], T0)
    assert only(AskReclaim, lg.acquire(b, 1, "pg", T0, timeout=10)).count == 1
    if verb == "failing":
        assert lg.report(c, [], T0, failures={"pg": FAILURE_THRESHOLD}) == []  # a's connect works
        effects = lg.report(b, [], T0, failures={"pg": 1})  # a second process's fails too
    else:
        effects = getattr(lg, verb)("pg")
    assert AskReclaim(a, "pg", 0) in of(AskReclaim, effects)
    assert asked(lg)[a] == 0


def test_the_check_of_an_earlier_fence_does_not_end_a_later_one() -> None:
    """A process reconnected, took its fenced lease back, and was killed again
    mid-query: the first fence's late confirmation must not end the second
    (its backend may still be running), only the second's own may."""
    lg = Ledger({"pg": Resource(1, monitor_dsn="host=x", fence_timeout=10.0, quarantine_delay=0.05)})
    a, b = session(lg, pid=7), session(lg, pid=8)
    lease = grant(lg, a, 1)
    [first] = of(StartFence, lg.close_session(a, T0))
    a2, _ = lg.open_session(7, "w", T0 + 0.01, held=[["pg", lease, lease, BUSY, None]])
    lg.report(a2, [[lease, BUSY, 4242, None]], T0 + 0.02)
    lg.acquire(b, 1, "pg", T0 + 0.02, timeout=30)
    [second] = of(StartFence, lg.close_session(a2, T0 + 0.03))
    assert second.fence != first.fence
    assert of(Granted, lg.unfence("pg", first.leases, T0 + 0.05, first.fence)) == []
    assert granted(lg.unfence("pg", second.leases, T0 + 0.06, second.fence)).session == b


def test_leases_handed_on_as_held_count_until_re_registered_and_are_fenced_if_never() -> None:
    # Before, a clean stop handed on only dead processes' fences: a process that
    # died before re-registering with the next coordinator was forgotten, and
    # its slot granted after the hold while its query still ran.
    old = ledger(pg=2)
    a, b = session(old, pid=11), session(old, pid=22)
    la = grant(old, a, 1)
    lb = grant(old, b, 1)
    old.report(a, [[la, "busy", 5011, None]], T0)
    held = old.held_state()
    assert sorted(row[3] for row in held) == [11, 22] and old.fenced_state(T0) == []
    new = Ledger({"pg": Resource(2, quarantine_delay=0.5)}, hold_until=T0 + 1.5)
    assert new.restore_held(held, T0) == []
    assert new.resources["pg"].leased == 2  # both count: nothing for a newcomer
    c = session(new, pid=33)
    assert of(Granted, new.acquire(c, 1, "pg", T0 + 0.1, timeout=10)) == []
    # pid 22 comes back and re-registers; pid 11 died in the gap.
    sid22, effects = new.open_session(22, "w", T0 + 0.5, held=[["pg", lb, lb, "idle", None]])
    assert of(Problem, effects) == [] and list(new.sessions[sid22].leases) == [lb]
    assert new.held_state() and any(row[3] == 11 for row in new.held_state())  # still awaited
    effects = new.tick(T0 + 1.5)  # the hold ends
    [fence] = of(StartFence, effects)
    assert (fence.pid, fence.leases, fence.backend_pids, fence.terminate) == (11, (la,), (5011,), False)
    assert of(Granted, effects) == []  # pid 11's slot stays fenced: its query may still run
    assert of(Granted, new.unfence("pg", fence.leases, T0 + 1.6, fence.fence))  # gone: the waiter is served
    assert new.resources["pg"].leased == 2 and new.sessions[c].held("pg") == 1


def test_nothing_is_restored_as_held_outside_a_restart_hold() -> None:
    lg = ledger(pg=1)
    assert lg.restore_held([["pg", 5, 5, 11, None]], T0) == []
    assert lg.resources["pg"].leased == 0


def test_a_late_process_stays_late_across_a_second_restart() -> None:
    # Before, a lease fenced as unclaimed at the end of a grace was handed on
    # by the next clean stop like a dead process's: the coordinator after that
    # terminated the backend of a process that was alive, only late.
    b = Ledger({"pg": Resource(1)}, hold_until=T0 + 1.0)
    b.restore_held([["pg", 7, 7, 11, 5011]], T0)
    [unclaimed] = of(StartFence, b.tick(T0 + 1.0))
    assert unclaimed.terminate is False
    fenced, late = b.fenced_state(T0 + 1.1), b.late_state()
    assert [row[1] for row in fenced] == [7] and late == [7]
    c = Ledger({"pg": Resource(1)}, hold_until=T0 + 3.0)
    [again] = of(StartFence, c.restore_fenced(fenced, T0 + 2.0, late))
    assert (again.pid, again.leases, again.backend_pids, again.terminate) == (11, (7,), (5011,), False)
    d = Ledger({"pg": Resource(1)})  # a dead process's fence stays one that may terminate
    [dead] = of(StartFence, d.restore_fenced(fenced, T0 + 2.0))
    assert dead.terminate is True


def test_re_registering_a_lease_keeps_the_backend_pid_already_known() -> None:
    # The hello carries no backend pid: re-registering wiped the one the
    # previous coordinator handed on, and the fence of a death right after
    # knew no backend to wait for.
    lg = Ledger({"pg": Resource(1)}, hold_until=T0 + 1.0)
    lg.restore_held([["pg", 7, 7, 11, 5011]], T0)
    sid, effects = lg.open_session(11, "w", T0 + 0.2, held=[["pg", 7, 7, "idle", None]])
    assert of(Problem, effects) == []
    [fence] = of(StartFence, lg.close_session(sid, T0 + 0.3))
    assert fence.backend_pids == (5011,)


@settings(max_examples=150, deadline=None)
@given(
    cap=st.integers(1, 4),
    holdings=st.lists(st.integers(0, 3), min_size=1, max_size=4),  # leases per live process
    back=st.lists(st.booleans(), min_size=4, max_size=4),  # which processes re-register
    newcomers=st.integers(0, 4),
    dies_late=st.booleans(),
)
def test_a_clean_restart_never_grants_beyond_the_cap(cap: int, holdings: list[int], back: list[bool],
                                                   newcomers: int, dies_late: bool) -> None:
    """I1 across restarts, as a property: whatever the processes held at a clean
    stop, and whichever of them come back, the next coordinator (and the one
    after it) grants nothing while live and unclaimed leases fill the cap, and
    never hands out an id already taken."""
    old = Ledger({"pg": Resource(cap, max_per_process=None)})
    owned: dict[int, list[list[Any]]] = {}  # pid -> its re-registration entries
    for i, n in enumerate(holdings):
        pid = 100 + i
        sid = session(old, pid=pid)
        for req in range(n):
            effects = old.acquire(sid, req + 1, "pg", T0, timeout=0)
            for g in of(Granted, effects):
                owned.setdefault(pid, []).append(["pg", g.lease.id, g.lease.token, "idle", None])
    restored_ids = {e[1] for entries in owned.values() for e in entries}
    new = Ledger({"pg": Resource(cap)}, hold_until=T0 + 1.0)
    new.restore_held(old.held_state(), T0)
    new.restore_fenced(old.fenced_state(T0), T0, old.late_state())
    assert new.resources["pg"].leased == len(restored_ids)
    for i, pid in enumerate(sorted(owned)):
        if back[i]:
            _, effects = new.open_session(pid, "w", T0 + 0.1, held=owned[pid])
            assert of(Problem, effects) == []
    granted_ids: list[int] = []
    others = [session(new, pid=900 + k) for k in range(newcomers)]
    for k, sid in enumerate(others):
        granted_ids += [g.lease.id for g in of(Granted, new.acquire(sid, k + 1, "pg", T0 + 0.2, timeout=5))]
    assert granted_ids == []  # the hold grants nothing
    effects = new.tick(T0 + 1.0)
    granted_ids += [g.lease.id for g in of(Granted, effects)]
    unclaimed = [f for f in of(StartFence, effects)]
    assert all(f.terminate is False for f in unclaimed)
    assert {lid for f in unclaimed for lid in f.leases} == {
        e[1] for i, pid in enumerate(sorted(owned)) if not back[i] for e in owned[pid]}
    assert new.resources["pg"].leased <= max(cap, len(restored_ids))
    assert len(new.resources["pg"].live) - sum(1 for lid in new.resources["pg"].live if lid in restored_ids) \
        == len(granted_ids)
    assert not set(granted_ids) & restored_ids
    if len(restored_ids) >= cap:
        assert granted_ids == []  # the cap was full of what is still held or maybe still running
    if dies_late:  # and the coordinator after that keeps the unclaimed ones late
        third = Ledger({"pg": Resource(cap)}, hold_until=T0 + 3.0)
        third.restore_held(new.held_state(), T0 + 2.0)
        again = third.restore_fenced(new.fenced_state(T0 + 2.0), T0 + 2.0, new.late_state())
        assert all(f.terminate is False for f in of(StartFence, again))
        assert third.resources["pg"].leased == new.resources["pg"].leased


def test_acquires_refused_while_queued_count_as_denials() -> None:
    # Before: counted in denials only when refused on arrival; the queued ones
    # a drain or failing connects turned away counted nowhere.
    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=10))
    assert of(Denied, lg.drain("pg"))[0].reason == "draining"
    assert lg.resources["pg"].denials == 1
    assert of(Denied, lg.acquire(b, 2, "pg", T0, timeout=10))[0].reason == "draining"
    assert lg.resources["pg"].denials == 2

    lg = ledger(pg=1)
    a, b = session(lg), session(lg)
    grant(lg, a, 1)
    assert queued(lg.acquire(b, 1, "pg", T0, timeout=10))
    assert of(Denied, lg.report(b, [], T0, failures={"pg": 5}))[0].reason == "failing"
    assert (lg.resources["pg"].denials, lg.resources["pg"].timeouts) == (1, 0)


def test_a_reload_lowering_max_per_process_asks_the_excess_back() -> None:
    """A process over a lowered max_per_process gave nothing back: it kept 3 of
    a cap of 4 under max_per_process = 1 until it let go of them by itself.
    Its excess is asked for (at checkin, after the quantum, as for waiters),
    and once it is down to the limit nothing more is asked of it."""
    lg = ledger(pg=Resource(max_size=4, fairness_quantum=0.5))
    a, b = session(lg), session(lg)
    la = [grant(lg, a, i) for i in range(3)]
    grant(lg, b, 1)
    effects = lg.set_limits("pg", Resource(max_size=4, max_per_process=1, fairness_quantum=0.5), T0)
    assert of(AskReclaim, effects) == [AskReclaim(a, "pg", 2, 0.5)]
    assert of(AskReclaim, lg.release(a, la[0], T0)) == []  # one more owed, as it knows
    assert of(AskReclaim, lg.release(a, la[1], T0)) == [AskReclaim(a, "pg", 0, None)]
    assert of(AskReclaim, lg.release(b, 4, T0)) == []  # nobody over it any more
    assert lg.resources["pg"].over_per_process is False


def test_leases_re_registered_over_max_per_process_are_asked_back() -> None:
    lg = ledger(pg=Resource(max_size=4, max_per_process=1, fairness_quantum=0.5))
    sid, effects = lg.open_session(99, "w", T0, held=[["pg", i, i, "busy", None] for i in (1, 2, 3)])
    assert of(AskReclaim, effects) == [AskReclaim(sid, "pg", 2, 0.5)]
