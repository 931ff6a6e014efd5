"""Where routing puts its regimes: DOPD's regime fractions and mean ``q_T``, ``q_S`` and gap per
token role of the task (e.g. plan tokens vs computed results), from ``rollout_records``.

docs/method.md §3 expects the capability gap (tokens the teacher still does better with the same
hint) in HT and the information the hint gives away in LH; this table shows whether that happens.
"""

from __future__ import annotations

from collections import defaultdict

from dopd.lab.task import Task
from dopd.objectives.routing import REGIMES

STATISTICS = ("q_teacher", "q_student", "gap")


def regime_placement(records: list[dict], task: Task) -> dict[str, dict[str, float]] | None:
    """Per role: ``tokens`` (count), the fraction of its tokens in each regime, and the mean of
    each of ``q_teacher``, ``q_student`` and ``gap``; None when the task defines no roles."""
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        roles = task.token_roles(record["tokens"])
        if roles is None:
            return None
        for index, role in enumerate(roles):
            totals = sums[role]
            totals["tokens"] += 1
            totals[record["regimes"][index]] += 1
            for name in STATISTICS:
                totals[name] += record[name][index]
    return {
        role: {
            "tokens": totals["tokens"],
            **{key: totals[key] / totals["tokens"] for key in (*REGIMES, *STATISTICS)},
        }
        for role, totals in sorted(sums.items())
    }


def placement_table(placement: dict[str, dict[str, float]]) -> str:
    """The placement as a markdown table, one row per role."""
    header = ["role", "tokens", *REGIMES, "mean q_T", "mean q_S", "mean gap A"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for role, row in placement.items():
        cells = [
            role,
            f"{row['tokens']:.0f}",
            *(f"{row[r]:.2f}" for r in REGIMES),
            *(f"{row[s]:.3f}" for s in STATISTICS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
