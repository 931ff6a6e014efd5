"""Aggregating lab runs: per-method mean ± std over seeds, gain over the student, share of the
teacher-student gap closed, the paired 95% interval of the difference to vanilla OPD, regime
fractions; as ``results.json``, a terminal table and markdown."""

from __future__ import annotations

import statistics
from collections import defaultdict

from dopd.lab.runner import RunResult
from dopd.lab.stats import paired_bootstrap

BASELINE = "vanilla_opd"  # every method's paired interval is its difference to this one


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
            "ci95": _interval_to_baseline(runs, by_method.get(BASELINE)),
            **class_scores([run.class_accuracy for run in runs]),
        }
    return {"teacher_accuracy": teacher, "student_accuracy": student, "methods": methods}


def class_scores(accuracies: list[dict[str, float]]) -> dict:
    """``class_accuracy`` (each token class's accuracy, averaged over runs; classes every run
    scored) and ``illusion_index``: the error rate on ``unavailable_info`` tokens, choices only
    the hint determines, where a student that imitates a privileged teacher drifts from every
    valid choice (None when the task has no such class)."""
    shared = set.intersection(*(set(a) for a in accuracies)) if accuracies else set()
    mean = {name: statistics.fmean(a[name] for a in accuracies) for name in sorted(shared)}
    illusion = 1.0 - mean["unavailable_info"] if "unavailable_info" in mean else None
    return {"class_accuracy": mean, "illusion_index": illusion}


def _interval_to_baseline(runs: list[RunResult], baseline: list[RunResult] | None) -> dict | None:
    """The paired bootstrap interval of ``runs`` minus the baseline over the same test problems
    (each side averaged over its seeds); None without a baseline, for the baseline itself, or
    when verdicts were not recorded."""
    if not baseline or runs[0].method == BASELINE or not all(r.correct for r in runs + baseline):
        return None
    interval = paired_bootstrap([r.correct for r in runs], [r.correct for r in baseline])
    return {"vs": BASELINE, **interval.to_dict()}


def _interval_text(interval: dict | None) -> str:
    if interval is None:
        return "-"
    return f"{interval['diff']:+.3f} [{interval['low']:+.3f}, {interval['high']:+.3f}]"


def _fractions_text(fractions: dict[str, float]) -> str:
    if set(fractions) != {"LH", "LL", "HT", "HS"}:
        return "-"
    return " ".join(f"{key} {fractions[key]:.2f}" for key in ("LH", "LL", "HT", "HS"))


def table_rows(summary: dict) -> list[list[str]]:
    """Header and one row per method, best accuracy first."""
    rows = [
        [
            "method",
            "accuracy",
            "gain",
            "gap closed",
            f"vs {BASELINE} [95% CI]",
            "lr",
            "regime fractions",
        ]
    ]
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
                _interval_text(m["ci95"]),
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
    return markdown_rows(table_rows(summary))


def class_rows(summary: dict) -> list[list[str]]:
    """Header and one row per model (the pretrained pair, then each method, best accuracy
    first) of per-class token accuracy and the illusion index; only the header when the task
    judges no tokens."""
    scored = [
        ("teacher (pretrained)", summary.get("teacher_classes")),
        ("student (pretrained)", summary.get("student_classes")),
    ]
    ordered = sorted(summary["methods"].items(), key=lambda item: -item[1]["accuracy"])
    scored += ordered
    names = sorted({name for _, m in scored if m for name in m["class_accuracy"]})
    rows = [["model", *names, "illusion index"]]
    for label, m in scored:
        if not m or not m["class_accuracy"]:
            continue
        cells = [
            f"{m['class_accuracy'][n]:.3f}" if n in m["class_accuracy"] else "-" for n in names
        ]
        illusion = m["illusion_index"]
        rows.append([label, *cells, "-" if illusion is None else f"{illusion:.3f}"])
    return rows


def markdown_rows(rows: list[list[str]]) -> str:
    """Header and rows as a markdown table."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)
