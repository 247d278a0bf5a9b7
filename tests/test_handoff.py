"""The auto fairness quantum follows what moving a slot costs (pure, no I/O)."""

from __future__ import annotations

import pytest

from sharedpool.handoff import AUTO_FACTOR, AUTO_MAX, AUTO_MIN, HandOffCost


def test_a_number_is_used_as_given_and_auto_starts_at_the_floor() -> None:
    cost = HandOffCost()
    assert cost.quantum(0.3) == 0.3 and cost.quantum(0) == 0.0
    assert cost.quantum("auto") == AUTO_MIN
    assert cost.quantum(None) == AUTO_MIN  # a coordinator that does not say: auto


def test_auto_is_a_multiple_of_connect_plus_close() -> None:
    cost = HandOffCost()
    cost.connected(0.004)
    # No close measured yet: it is taken to cost what a connect does.
    assert cost.quantum("auto") == pytest.approx(AUTO_FACTOR * 0.008)
    cost.closed(0.002)
    assert cost.quantum("auto") == pytest.approx(AUTO_FACTOR * 0.006)


def test_auto_is_bounded_and_moves_gradually() -> None:
    cost = HandOffCost()
    cost.connected(0.0001)
    cost.closed(0.0001)
    assert cost.quantum("auto") == AUTO_MIN  # Redis-cheap: the floor
    for _ in range(50):
        cost.connected(1.0)  # a database that takes a second to connect
    assert cost.quantum("auto") == AUTO_MAX
    before = cost.connect
    cost.connected(0.001)  # one fast connect does not undo the history
    assert cost.connect is not None and before is not None and cost.connect > 0.5 * before
    cost.connected(-1.0)  # a clock oddity is not a negative cost
    assert cost.connect is not None and cost.connect >= 0
    assert "auto=" in repr(cost)
