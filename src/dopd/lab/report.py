"""Aggregating lab runs: per-method mean ± std over seeds, gain over the student, share of the
teacher-student gap closed, regime fractions; as ``results.json``, a terminal table and markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict

from dopd.lab.runner import RunResult


def _mean_fractions(results: list[RunResult]) -> dict[str, float]:
    sums, counts = defaultdict(float), defaultdict(int)
    for result in results:
        for record in result.records:
            for key, value in record.items():
                if key.startswith("fraction/"):
                    sums[key.removeprefix("fraction/")] += value
                    counts[key.removeprefix("fraction/")] += 1
    return {key: sums[key] / counts[key] for key in sums}


def summarize(results: list[RunResult], teacher: float, student: float) -> dict:
    """The ``results.json`` content: baselines and one entry per method."""
    by_method: dict[str, list[RunResult]] = defaultdict(list)
    for result in results:
        by_method[result.method].append(result)
    methods = {}
    for name, runs in by_method.items():
        accuracies = [run.accuracy for run in runs]
        mean = statistics.fmean(accuracies)
        methods[name] = {
            "accuracy": mean,
            "accuracy_std": statistics.pstdev(accuracies) if len(accuracies) > 1 else 0.0,
            "seeds": {str(run.seed): run.accuracy for run in runs},
            "gain": mean - student,
            "gap_closed": (mean - student) / (teacher - student) if teacher != student else None,
            "lr": runs[0].lr,
            "regime_fractions": _mean_fractions(runs),
            "final_entropy": statistics.fmean(run.records[-1]["student_entropy"] for run in runs),
            "wall_seconds": statistics.fmean(run.wall_seconds for run in runs),
        }
    return {"teacher_accuracy": teacher, "student_accuracy": student, "methods": methods}


def _fractions_text(fractions: dict[str, float]) -> str:
    if set(fractions) != {"LH", "LL", "HT", "HS"}:
        return "-"
    return " ".join(f"{key} {fractions[key]:.2f}" for key in ("LH", "LL", "HT", "HS"))


def table_rows(summary: dict) -> list[list[str]]:
    """Header and one row per method, best accuracy first."""
    rows = [["method", "accuracy", "gain", "gap closed", "lr", "regime fractions"]]
    ordered = sorted(summary["methods"].items(), key=lambda item: -item[1]["accuracy"])
    for name, m in ordered:
        spread = f" ± {m['accuracy_std']:.3f}" if len(m["seeds"]) > 1 else ""
        closed = "-" if m["gap_closed"] is None else f"{100 * m['gap_closed']:.1f}%"
        rows.append(
            [
                name,
                f"{m['accuracy']:.3f}{spread}",
                f"{m['gain']:+.3f}",
                closed,
                f"{m['lr']:g}",
                _fractions_text(m["regime_fractions"]),
            ]
        )
    return rows


def format_table(summary: dict) -> str:
    """Plain-text table for the terminal, with the baselines above it."""
    rows = table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        f"teacher accuracy {summary['teacher_accuracy']:.3f}   "
        f"student accuracy {summary['student_accuracy']:.3f}   (held-out, no hints)"
    ]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def markdown_table(summary: dict) -> str:
    """The same table in markdown."""
    rows = table_rows(summary)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
