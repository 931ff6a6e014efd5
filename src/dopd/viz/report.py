"""The report of one training run (``dopd report RUN_DIR``): ``curves.png`` and ``regimes.png``
from ``RUN_DIR/metrics.jsonl``, and ``tokens.html`` from ``RUN_DIR/rollout_samples.jsonl`` (the
rollouts ``dopd.training.samples`` recorded), the same views ``dopd demo`` draws.

    write_report("runs/tiny")                 # runs/tiny/report/: curves.png, regimes.png, ...
    write_report("runs/tiny", "out", step=5)  # tokens.html of the rollouts sampled at step 5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dopd.errors import DataError
from dopd.objectives.routing import REGIMES
from dopd.viz.plots import (
    FRACTION_PREFIX,
    fraction_keys,
    plot_curves,
    plot_regimes,
    read_metrics,
)
from dopd.viz.tokens import render_rollouts_html

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "rollout_samples.jsonl"
# tokens.html's per-token values; an objective without one shows it as n/a.
VALUE_FIELDS = ("q_teacher", "q_student", "gap")


@dataclass
class Report:
    """What ``write_report`` wrote (``paths``) and what it could not, with the reason
    (``notes``, one line each)."""

    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_report(
    run_dir: str | Path, out: str | Path | None = None, *, step: int | None = None
) -> Report:
    """Draw the report of the run in ``run_dir`` into ``out`` (default ``run_dir/report``).

    Args:
        step: the sampled step whose rollouts ``tokens.html`` shows (default: the last one).

    Returns:
        ``Report``. Raises ``DataError`` (one line) when ``run_dir`` is not a run with metrics.
    """
    run_dir = Path(run_dir)
    records = _read_run(run_dir)
    name = _objective_name(run_dir) or run_dir.name
    samples, report = run_dir / SAMPLES_FILE, Report()
    # Everything is read and checked before anything is written.
    sampled = read_metrics(samples) if samples.is_file() else []
    page = None
    if sampled:
        record = _pick_step(sampled, step, samples)
        page = render_rollouts_html(
            [_with_values(row) for row in record.get("rows", [])],
            title=f"{run_dir.name}: {record.get('objective', name)}, "
            f"rollouts sampled at step {record['step']}",
            legend=_legend(record.get("groups")),
        )
    elif step is not None:
        raise DataError(f"--step {step}: {samples} is missing or empty; drop --step")
    out = run_dir / "report" if out is None else Path(out)
    report.paths.append(
        plot_curves({name: records}, out / "curves.png", title=f"{run_dir.name}: {name}")
    )
    if any(key.startswith("fraction/") for record in records for key in record):
        title = f"{name}: share of completion tokens in each group"
        report.paths.append(plot_regimes(records, out / "regimes.png", title=title))
    else:
        report.notes.append(f"regimes.png not written: {run_dir / METRICS_FILE} logs no fraction/*")
    if page is not None:
        (out / "tokens.html").write_text(page, encoding="utf-8")
        report.paths.append(out / "tokens.html")
    else:
        report.notes.append(
            f"tokens.html not written: {samples} is missing or empty "
            "(the run had tracking.samples_every=0, or stopped before its first step)"
        )
    return report


def _read_run(run_dir: Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; ``DataError`` when there are none."""
    if not run_dir.is_dir():
        raise DataError(
            f"run folder {str(run_dir)!r} does not exist; pass the output_dir of a dopd train run"
        )
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise DataError(
            f"run folder {str(run_dir)!r} has no {METRICS_FILE}; pass the output_dir of a "
            "dopd train run that has logged at least one step"
        )
    records = read_metrics(metrics)
    if not records:
        raise DataError(f"{metrics} has no records; report a run that has logged at least one step")
    return records


def _pick_step(records: list[dict], step: int | None, path: Path) -> dict:
    """The record of ``step`` (None: the latest); a step written twice keeps its last line."""
    wanted = max(record["step"] for record in records) if step is None else step
    found = [record for record in records if record["step"] == wanted]
    if not found:
        steps = ", ".join(str(record["step"]) for record in records)
        raise DataError(f"{path} has no rollouts sampled at step {step}; it has steps {steps}")
    return found[-1]


def _legend(groups: Any) -> dict[str, str] | None:
    """DOPD's regime descriptions for DOPD's regimes; other groups are named without one, in
    ``regimes.png``'s order, so that each group gets the same colour on the page and the plot."""
    if not isinstance(groups, list) or groups == list(REGIMES):
        return None
    keys = fraction_keys([{f"{FRACTION_PREFIX}{group}": 0.0 for group in groups}])
    return {key.removeprefix(FRACTION_PREFIX): "" for key in keys}


def _with_values(row: Any) -> Any:
    """``row`` with every tokens.html value (``q_teacher``, ``q_student``, ``gap``) the
    objective did not record given as NaN (shown as n/a)."""
    if not isinstance(row, dict) or not isinstance(row.get("tokens"), list):
        return row  # write_rollouts_html names what is wrong
    count = len(row["tokens"])
    filled = {
        key: [math.nan if value is None else value for value in row.get(key, [None] * count)]
        for key in VALUE_FIELDS
    }
    return {**row, **filled}


def _objective_name(run_dir: Path) -> str | None:
    """``objective.name`` of the run's ``config.yaml``, or None when it cannot be read."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        name = config["objective"]["name"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) else None
