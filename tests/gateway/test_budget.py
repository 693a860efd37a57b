"""The latency budget: each message's stages from the marks the shell makes."""

from __future__ import annotations

import pytest

from gateway.budget import LatencyBudget


def test_a_forwarded_message_is_split_into_its_stages() -> None:
    budget = LatencyBudget()
    budget.received(7, 1.000)
    budget.committing(7, batch=3)
    budget.decided(7, 1.001)
    budget.commit_started([3], 1.004)
    budget.commit_done([3], 1.010)
    budget.released(7, 1.011)
    budget.acknowledged(7, 1.013)
    budget.returned(7, 1.014)
    table = budget.table()
    expected = {"decide": 1, "queue-to-commit": 3, "commit": 6, "release": 1, "publish": 2, "return": 1}
    assert {stage: round(row["p50_ms"]) for stage, row in table.items()} == expected
    assert all(row["messages"] == 1 for row in table.values())


def test_a_message_without_a_commit_has_no_commit_stages() -> None:
    budget = LatencyBudget()
    budget.received(1, 0.0)
    budget.decided(1, 0.001)
    budget.released(1, 0.003)
    budget.acknowledged(1, 0.004)
    budget.returned(1, 0.005)
    table = budget.table()
    assert set(table) == {"decide", "release", "publish", "return"}
    assert table["release"]["p50_ms"] == pytest.approx(2.0)


def test_a_message_held_or_failed_on_the_way_is_left_out() -> None:
    budget = LatencyBudget()
    budget.received(1, 0.0)
    budget.decided(1, 0.001)
    budget.returned(1, 0.002)  # never released: a handler that failed
    assert budget.table() == {}


def test_p99_is_the_nearest_rank_over_many_messages() -> None:
    budget = LatencyBudget()
    for ticket in range(100):
        budget.received(ticket, 0.0)
        budget.decided(ticket, (ticket + 1) / 1000)
        budget.released(ticket, 1.0)
        budget.acknowledged(ticket, 1.0)
        budget.returned(ticket, 1.0)
    decide = budget.table()["decide"]
    assert decide["p99_ms"] == pytest.approx(99.0)
    assert decide["p50_ms"] == pytest.approx(50.5)
