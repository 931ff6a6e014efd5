"""Tests of dopd.viz.plots: metrics reading, seed bands against numpy, and the PNGs and figures
the curve and regime plots produce."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dopd.errors import DataError
from dopd.viz.plots import (
    DPI,
    REGIME_COLORS,
    curves_figure,
    metric_series,
    plot_curves,
    plot_regimes,
    read_metrics,
    regimes_figure,
    seed_band,
)
from tests.tolerance import REORDERED, assert_close, tolerance

STEPS = [1, 2, 3, 4]
# Fractions per step, one row per regime in LH, LL, HT, HS order; columns sum to 1.
FRACTIONS = np.array(
    [[0.1, 0.2, 0.3, 0.4], [0.2, 0.2, 0.2, 0.2], [0.3, 0.4, 0.1, 0.1], [0.4, 0.2, 0.4, 0.3]]
)


def make_run(losses, *, eval_every=None, entropy=3.0):
    """Records of one run at STEPS with the given losses; eval/accuracy every ``eval_every``."""
    records = []
    for step, loss in zip(STEPS, losses):
        record = {"step": step, "loss": loss, "student_entropy": entropy - 0.1 * step}
        if eval_every and step % eval_every == 0:
            record["eval/accuracy"] = step / 10
        records.append(record)
    return records


def dopd_run():
    return [
        {
            "step": step,
            "loss": 0.1,
            **{f"fraction/{r}": FRACTIONS[i, j] for i, r in enumerate(["LH", "LL", "HT", "HS"])},
        }
        for j, step in enumerate(STEPS)
    ]


def line_labelled(ax, label):
    (line,) = [line for line in ax.lines if line.get_label() == label]
    return line


def assert_png(path, width_inches, height_inches):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(width_inches * DPI), round(height_inches * DPI))
        # A drawn figure is not one flat colour.
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 10


# -- reading ------------------------------------------------------------------------------------


def test_read_metrics_reads_each_line_and_skips_blanks(tmp_path):
    records = [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "eval/accuracy": 0.1}]
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    assert read_metrics(path) == records


@pytest.mark.parametrize("bad_line", ['{"step": 1', "[1, 2]", '{"loss": 1.0}'])
def test_read_metrics_names_the_bad_line(tmp_path, bad_line):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n' + bad_line + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl:2"):
        read_metrics(path)


def test_read_metrics_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_metrics(tmp_path / "nope.jsonl")


def test_metric_series_sorts_skips_and_keeps_the_last_repeat():
    records = [
        {"step": 3, "loss": 3.0},
        {"step": 1, "loss": 1.0},
        {"step": 2},
        {"step": 4, "loss": float("nan")},
        {"step": 3, "loss": 30.0},  # a resumed run logged step 3 again
    ]
    steps, values = metric_series(records, "loss")
    np.testing.assert_array_equal(steps, [1.0, 3.0])
    np.testing.assert_array_equal(values, [1.0, 30.0])


# -- seed bands ---------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda seeds: st.lists(
            st.lists(st.floats(-1e3, 1e3), min_size=seeds, max_size=seeds), min_size=1, max_size=6
        )
    )
)
def test_seed_band_is_the_numpy_mean_and_sample_std(columns):
    values = np.array(columns).T  # [S, N]
    seeds = [[{"step": n, "loss": v} for n, v in enumerate(row)] for row in values]
    steps, mean, std = seed_band(seeds, "loss")
    np.testing.assert_array_equal(steps, np.arange(values.shape[1]))
    # Both are sums over seeds, and the std's deviations from the mean cancel: rounding follows the
    # magnitude of the values that enter, not that of the (possibly tiny) mean or std.
    bound = tolerance(values, values, REORDERED)
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=0, atol=bound)
    expected_std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    np.testing.assert_allclose(std, expected_std, rtol=0, atol=bound)


def test_seed_band_uses_only_the_steps_every_seed_logged():
    seeds = [make_run([1.0, 2.0, 3.0, 4.0]), make_run([3.0, 4.0, 5.0, 6.0])[:3]]
    steps, mean, std = seed_band(seeds, "loss")
    np.testing.assert_array_equal(steps, [1, 2, 3])
    np.testing.assert_array_equal(mean, [2.0, 3.0, 4.0])
    assert_close(std, np.full(3, np.sqrt(2.0)), ulps=REORDERED)


# -- curves -------------------------------------------------------------------------------------


def test_plot_curves_writes_a_png_of_the_documented_size(tmp_path):
    runs = {
        "dopd": make_run([0.4, 0.3, 0.2, 0.1], eval_every=2),
        "vanilla_opd": make_run([0.5] * 4),
    }
    path = plot_curves(
        runs, tmp_path / "sub" / "curves.png", title="tiny", references={"teacher": 0.6}
    )
    assert path == tmp_path / "sub" / "curves.png"
    assert_png(path, 15, 4.8)


def test_curves_panels_hold_each_metric_of_each_run():
    runs = {
        "dopd": make_run([0.4, 0.3, 0.2, 0.1], eval_every=2),
        "vanilla_opd": make_run([0.5] * 4),
    }
    accuracy, entropy, loss = curves_figure(runs).axes
    # Accuracy only at the eval steps (2 and 4), and only for the run that evaluated.
    dopd_accuracy = line_labelled(accuracy, "dopd")
    np.testing.assert_array_equal(dopd_accuracy.get_xdata(), [2, 4])
    np.testing.assert_array_equal(dopd_accuracy.get_ydata(), [0.2, 0.4])
    assert [line.get_label() for line in accuracy.lines] == ["dopd"]
    assert_close(
        line_labelled(entropy, "vanilla_opd").get_ydata(),
        np.array([2.9, 2.8, 2.7, 2.6]),
        ulps=REORDERED,
    )
    np.testing.assert_array_equal(line_labelled(loss, "dopd").get_ydata(), [0.4, 0.3, 0.2, 0.1])
    assert line_labelled(loss, "dopd").get_color() != line_labelled(loss, "vanilla_opd").get_color()


def test_curves_without_any_eval_say_so_and_still_draw_the_references(tmp_path):
    runs = {"dopd": make_run([0.4, 0.3, 0.2, 0.1])}
    figure = curves_figure(runs, references={"teacher": 0.6, "student": 0.3})
    accuracy = figure.axes[0]
    assert any(text.get_text() == "no eval/accuracy logged" for text in accuracy.texts)
    references = {line.get_label(): line for line in accuracy.lines}
    assert set(references) == {"teacher (0.600)", "student (0.300)"}
    assert all(line.get_linestyle() == "--" for line in references.values())
    np.testing.assert_array_equal(references["teacher (0.600)"].get_ydata(), [0.6, 0.6])
    assert_png(plot_curves(runs, tmp_path / "curves.png"), 15, 4.8)


def test_seeds_draw_the_mean_line_and_a_std_band():
    seed_losses = np.array([[0.4, 0.3, 0.2, 0.1], [0.6, 0.5, 0.2, 0.3], [0.5, 0.1, 0.2, 0.2]])
    runs = {"dopd": [make_run(losses) for losses in seed_losses]}
    loss = curves_figure(runs).axes[2]
    mean_line = line_labelled(loss, "dopd (3 seeds)")
    mean = seed_losses.mean(axis=0)
    std = seed_losses.std(axis=0, ddof=1)
    np.testing.assert_array_equal(mean_line.get_xdata(), STEPS)
    assert_close(mean_line.get_ydata(), mean, ulps=REORDERED)
    (band,) = loss.collections
    vertices = np.concatenate([path.vertices for path in band.get_paths()])  # [P, 2]
    for step, low, high in zip(STEPS, mean - std, mean + std):
        at_step = vertices[vertices[:, 0] == step, 1]  # integer steps: exact in float64
        assert_close(
            np.array([at_step.min(), at_step.max()]), np.array([low, high]), ulps=REORDERED
        )


def test_curves_reject_an_empty_run():
    with pytest.raises(DataError, match="'dopd' has no records"):
        curves_figure({"dopd": []})


# -- regimes ------------------------------------------------------------------------------------


def test_plot_regimes_writes_a_png(tmp_path):
    assert_png(plot_regimes(dopd_run(), tmp_path / "regimes.png", title="dopd"), 9, 4.5)


def test_regime_areas_stack_in_routing_order_with_fixed_colours():
    ax = regimes_figure(dopd_run()).axes[0]
    areas = ax.collections
    assert [area.get_label() for area in areas] == ["LH", "LL", "HT", "HS"]
    tops = np.cumsum(FRACTIONS, axis=0)  # [R, N]: the upper edge of each stacked area
    for area, top, name in zip(areas, tops, ["LH", "LL", "HT", "HS"]):
        vertices = area.get_paths()[0].vertices
        for step, expected in zip(STEPS, top):
            # Integer steps are exact in float64; the top is a cumulative sum of fractions.
            assert_close(vertices[vertices[:, 0] == step, 1].max(), expected, ulps=REORDERED)
        assert_close(
            area.get_facecolor()[0][:3], np.array(_rgb(REGIME_COLORS[name])), ulps=REORDERED
        )


def test_regimes_of_other_groups_get_distinct_non_regime_colours():
    records = [{"step": s, "fraction/high": 0.3, "fraction/low": 0.7} for s in STEPS]
    areas = regimes_figure(records).axes[0].collections
    assert [area.get_label() for area in areas] == ["high", "low"]
    colours = [tuple(area.get_facecolor()[0][:3]) for area in areas]
    assert len(set(colours)) == 2
    assert not {tuple(_rgb(c)) for c in REGIME_COLORS.values()} & set(colours)


def test_regimes_need_fraction_keys():
    with pytest.raises(DataError, match="fraction/"):
        regimes_figure(make_run([0.1] * 4))


def test_importing_viz_does_not_import_matplotlib():
    code = (
        "import sys, dopd.viz, dopd.viz.plots, dopd.viz.tokens;"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _rgb(hex_colour):
    return [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
