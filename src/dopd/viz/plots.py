"""Training curves and regime fractions from ``metrics.jsonl`` files, drawn as PNGs.

``plot_curves`` puts held-out accuracy, student entropy and training loss against step side by
side, one line per method (mean with a ±std band when a method has several seeds).
``plot_regimes`` stacks the per-step token fraction of each regime of one routing run (DOPD).
matplotlib is imported inside the drawing functions and used through an Agg canvas without
pyplot (no global figure state), so importing this module does not need matplotlib.

    runs = {"dopd": [read_metrics(f"runs/dopd-{s}/metrics.jsonl") for s in (0, 1, 2)],
            "vanilla_opd": read_metrics("runs/vanilla_opd/metrics.jsonl")}
    plot_curves(runs, "curves.png", references={"teacher": 0.62, "student": 0.31})
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dopd.errors import DataError
from dopd.objectives.routing import REGIMES

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Record = dict[str, Any]
# A run is one record list, or one record list per seed.
Run = Sequence[Record] | Sequence[Sequence[Record]]

DPI = 120
CURVE_PANELS = (
    ("eval/accuracy", "held-out accuracy"),
    ("student_entropy", "student entropy (nats)"),
    ("loss", "training loss"),
)
FRACTION_PREFIX = "fraction/"
# Teacher-target regimes in blue (light LH, deep HT), self-anchors in orange (HS) and grey (the
# weak LL); the HTML token page uses the same colours so pictures and pages read alike.
REGIME_COLORS = {"LH": "#9ecae1", "LL": "#d9d9d9", "HT": "#2171b5", "HS": "#fdae6b"}
METHOD_COLORS = {
    "dopd": "#d62728",
    "vanilla_opd": "#1f77b4",
    "priv_teacher_opd": "#2ca02c",
    "self_distillation": "#9467bd",
    "opsd": "#8c564b",
    "sdpo": "#e377c2",
    "gkd": "#7f7f7f",
    "opcd": "#bcbd22",
    "eopd": "#17becf",
    "tip": "#ff7f0e",
    "exopd": "#393b79",
    "uniform": "#637939",
}
# matplotlib's tab20, for names without a fixed colour.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
    "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5",
)  # fmt: skip
# For group names beside DOPD's regimes: no blue, orange or grey, so none passes for a regime.
GROUP_PALETTE = (
    "#2ca02c", "#9467bd", "#e377c2", "#8c564b", "#bcbd22", "#17becf",
    "#98df8a", "#c5b0d5", "#f7b6d2", "#c49c94", "#dbdb8d", "#9edae5",
)  # fmt: skip
REFERENCE_COLORS = ("#000000", "#666666", "#aaaaaa")
# Sparse series (evaluation every N steps) are readable only with point markers.
MARKER_MAX_POINTS = 50


def assign_colors(
    names: Iterable[str], fixed: Mapping[str, str], palette: Sequence[str] = PALETTE
) -> dict[str, str]:
    """Each name's fixed colour, or else the next palette colour no fixed name here uses."""
    names = list(dict.fromkeys(names))
    taken = {fixed[name] for name in names if name in fixed}
    spare = itertools.cycle([color for color in palette if color not in taken] or palette)
    return {name: fixed[name] if name in fixed else next(spare) for name in names}


def read_metrics(path: str | Path) -> list[Record]:
    """Read a ``metrics.jsonl`` file: one JSON object with a numeric ``step`` per non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"metrics file {str(path)!r} does not exist; pass a run's metrics.jsonl")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{path}:{number} is not JSON ({error.msg}); fix or drop the line"
            ) from None
        if not isinstance(record, dict) or not _is_finite(record.get("step")):
            raise DataError(
                f"{path}:{number} is not an object with a numeric 'step'; fix or drop it"
            )
        records.append(record)
    return records


def metric_series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of ``key`` in the records that log it as a finite number.

    A step logged twice keeps its last value: a resumed run logs the steps after its checkpoint
    again, and the later line belongs to the run that went on.

    Returns:
        steps: ``[N]`` float64, increasing.
        values: ``[N]`` float64.
    """
    by_step = _values_by_step(records, key)
    steps = np.array(sorted(by_step), dtype=np.float64)  # [N]
    return steps, np.array([by_step[step] for step in steps], dtype=np.float64)  # [N]


def seed_band(
    seeds: Sequence[Sequence[Mapping[str, Any]]], key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sample standard deviation (ddof=1) of ``key`` over seeds, at the steps that every
    seed logged; one seed has std 0.

    Returns:
        steps: ``[N]`` float64, increasing.
        mean: ``[N]`` float64.
        std: ``[N]`` float64.
    """
    series = [_values_by_step(records, key) for records in seeds]
    steps = sorted(set.intersection(*(set(values) for values in series))) if series else []
    values = np.array([[s[step] for step in steps] for s in series], dtype=np.float64)  # [S, N]
    values = values.reshape(len(series), len(steps))
    std = values.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(len(steps))  # [N]
    return np.array(steps, dtype=np.float64), values.mean(axis=0), std


def fraction_keys(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """The ``fraction/*`` keys the records log: DOPD's regimes in routing order, then the rest."""
    found = {key for record in records for key in record if key.startswith(FRACTION_PREFIX)}
    ordered = [FRACTION_PREFIX + regime for regime in REGIMES]
    return [key for key in ordered if key in found] + sorted(found - set(ordered))


def regime_fractions(
    records: Iterable[Mapping[str, Any]], keys: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-step fractions of ``keys`` at every step that logs any of them (a missing one is 0).

    Returns:
        steps: ``[N]`` float64, increasing.
        fractions: ``[R, N]`` float64, one row per key.
    """
    series = [_values_by_step(records, key) for key in keys]
    steps = sorted(set().union(*series))
    fractions = np.array([[s.get(step, 0.0) for step in steps] for s in series])  # [R, N]
    return np.array(steps, dtype=np.float64), fractions.reshape(len(keys), len(steps))


def curves_figure(
    runs: Mapping[str, Run], *, title: str = "", references: Mapping[str, float] | None = None
) -> Figure:
    """The figure ``plot_curves`` saves: accuracy, entropy and loss panels, one line per run."""
    figure = _new_figure((15, 4.8))
    axes = figure.subplots(1, len(CURVE_PANELS))
    colors = assign_colors(runs, METHOD_COLORS)
    for name, run in runs.items():
        seeds = _as_seeds(name, run)
        for ax, (key, _) in zip(axes, CURVE_PANELS):
            _draw_metric(ax, seeds, key, label=_run_label(name, seeds), color=colors[name])
    for ax, (key, label) in zip(axes, CURVE_PANELS):
        _style_axes(ax, key, label)
    reference_entries = _draw_references(axes[0], references or {})
    # Runs first, then the reference lines, whatever panel each entry was found in.
    run_entries = {
        label: handle
        for label, handle in _legend_entries(axes).items()
        if label not in reference_entries
    }
    _finish(figure, title, run_entries | reference_entries, reverse=False)
    return figure


def plot_curves(
    runs: Mapping[str, Run],
    path: str | Path,
    *,
    title: str = "",
    references: Mapping[str, float] | None = None,
) -> Path:
    """Save accuracy (``eval/accuracy``), entropy (``student_entropy``) and loss vs step as a PNG.

    Args:
        runs: method name -> its records, or a list of record lists (one per seed) drawn as the
            mean with a ±std band over the steps every seed logged.
        references: label -> accuracy, drawn as dashed horizontal lines (teacher, student).
    """
    return _save(curves_figure(runs, title=title, references=references), path)


def regimes_figure(records: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """The figure ``plot_regimes`` saves: stacked ``fraction/*`` areas against step."""
    keys = fraction_keys(records)
    if not keys:
        raise DataError("the records log no 'fraction/*' keys; plot a run of a routing objective")
    steps, fractions = regime_fractions(records, keys)
    names = [key.removeprefix(FRACTION_PREFIX) for key in keys]
    colors = assign_colors(names, REGIME_COLORS, GROUP_PALETTE)
    figure = _new_figure((9, 4.5))
    ax = figure.subplots()
    ax.stackplot(steps, fractions, labels=names, colors=[colors[n] for n in names], linewidth=0)
    ax.set(xlabel="step", ylabel="fraction of completion tokens", ylim=(0, 1), xlim=_span(steps))
    ax.grid(True, alpha=0.3)
    _integer_steps(ax)
    # The legend lists the top of the stack first, as the eye reads the areas.
    _finish(figure, title, _legend_entries([ax]), reverse=True)
    return figure


def plot_regimes(
    records: Sequence[Mapping[str, Any]], path: str | Path, *, title: str = ""
) -> Path:
    """Save the stacked per-step regime fractions (every ``fraction/*`` key) of one run as a PNG."""
    return _save(regimes_figure(records, title=title), path)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _values_by_step(records: Iterable[Mapping[str, Any]], key: str) -> dict[float, float]:
    return {
        float(record["step"]): float(record[key])
        for record in records
        if _is_finite(record.get(key))
    }


def _as_seeds(name: str, run: Run) -> list[list[Record]]:
    if len(run) == 0:
        raise DataError(
            f"run {name!r} has no records; drop it or point it at a non-empty metrics file"
        )
    if all(isinstance(item, Mapping) for item in run):
        return [list(run)]
    if all(isinstance(item, Sequence) and not isinstance(item, str) for item in run):
        return [list(seed) for seed in run]
    raise DataError(
        f"run {name!r} must be a list of metric records or a list of such lists (seeds)"
    )


def _run_label(name: str, seeds: list[list[Record]]) -> str:
    return name if len(seeds) == 1 else f"{name} ({len(seeds)} seeds)"


def _draw_metric(ax: Axes, seeds: list[list[Record]], key: str, *, label: str, color: str) -> None:
    steps, mean, std = seed_band(seeds, key)
    if steps.size == 0:
        return
    marker = "o" if steps.size <= MARKER_MAX_POINTS else None
    ax.plot(steps, mean, color=color, label=label, marker=marker, markersize=3, linewidth=1.5)
    if len(seeds) > 1:
        ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2, linewidth=0)


def _style_axes(ax: Axes, key: str, label: str) -> None:
    if not ax.lines:
        ax.text(0.5, 0.5, f"no {key} logged", transform=ax.transAxes, ha="center", va="center")
    ax.set(title=label, xlabel="step", ylabel=label)
    ax.grid(True, alpha=0.3)
    _integer_steps(ax)


def _integer_steps(ax: Axes) -> None:
    """Ticks at whole steps only (a short run would otherwise show steps 1.25, 1.5, ...)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _draw_references(ax: Axes, references: Mapping[str, float]) -> dict[str, Any]:
    entries = {}
    for (name, value), color in zip(references.items(), itertools.cycle(REFERENCE_COLORS)):
        label = f"{name} ({value:.3f})"
        entries[label] = ax.axhline(value, color=color, linestyle="--", linewidth=1, label=label)
    return entries


def _legend_entries(axes: Iterable[Axes]) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        entries.update(zip(labels, handles))
    return entries


def _finish(figure: Figure, title: str, entries: dict[str, Any], *, reverse: bool) -> None:
    if title:
        figure.suptitle(title)
    if entries:
        labels, handles = list(entries), list(entries.values())
        if reverse:
            labels, handles = labels[::-1], handles[::-1]
        figure.legend(handles, labels, loc="outside right upper", frameon=False)


def _span(steps: np.ndarray) -> tuple[float, float] | None:
    # One step would give a zero-width x range, which matplotlib warns about.
    return (float(steps[0]), float(steps[-1])) if steps.size > 1 else None


def _new_figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path
