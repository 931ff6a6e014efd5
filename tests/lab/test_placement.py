"""Regime placement per token role, against a direct count."""

from __future__ import annotations

import random

from dopd.lab.catalog import load_task
from dopd.lab.placement import placement_table, regime_placement
from dopd.objectives.routing import REGIMES
from tests.tolerance import REORDERED, assert_close


def test_placement_matches_a_direct_count():
    task, rng = load_task("arithmetic"), random.Random(0)
    records = []
    for _ in range(20):
        tokens = list(
            rng.choice(["25*5=125,37+125=162\n162", "37+25=62,62*5=310\n310", "3*", ""])
        ) + ["</s>"]
        records.append(
            {
                "tokens": tokens,
                "regimes": [rng.choice(REGIMES) for _ in tokens],
                **{
                    name: [rng.random() for _ in tokens]
                    for name in ("q_teacher", "q_student", "gap")
                },
            }
        )
    placement = regime_placement(records, task)
    pairs = [
        (role, record, i)
        for record in records
        for i, role in enumerate(task.token_roles(record["tokens"]))
    ]
    for role, row in placement.items():
        mine = [(record, i) for r, record, i in pairs if r == role]
        assert row["tokens"] == len(mine)
        for regime in REGIMES:
            expected = sum(record["regimes"][i] == regime for record, i in mine) / len(mine)
            assert_close(row[regime], expected, ulps=REORDERED)
        gap = sum(record["gap"][i] for record, i in mine) / len(mine)
        assert_close(row["gap"], gap, ulps=REORDERED)
        assert_close(sum(row[r] for r in REGIMES), 1.0, ulps=REORDERED)
    table = placement_table(placement)
    assert table.count("\n") == len(placement) + 1 and "| plan |" in table


def test_a_task_without_roles_has_no_placement():
    class NoRoles:
        def token_roles(self, tokens):
            return None

    record = {
        "tokens": ["a"],
        "regimes": ["LH"],
        "q_teacher": [0.5],
        "q_student": [0.5],
        "gap": [0.0],
    }
    assert regime_placement([record], NoRoles()) is None
