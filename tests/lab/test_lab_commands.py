"""The lab's orchestration: suites are valid configs, the report arithmetic, and a fast end-to-end
demo path that writes a valid results.json."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dopd.lab import commands
from dopd.lab.catalog import load_task
from dopd.lab.methods import SUITES, suite_methods
from dopd.lab.pretrain import lab_model_dir
from dopd.lab.report import class_rows, class_scores, summarize, table_rows
from dopd.lab.runner import DATA_SEEDS, LabSettings, RunResult, method_config, write_data
from dopd.lab.stats import paired_bootstrap
from tests.tolerance import REORDERED, assert_close


@pytest.mark.parametrize("task_name", ["shiftmap", "cyclesum", "arithmetic"])
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_every_suite_method_is_a_valid_config(tmp_path, suite, task_name):
    task = load_task(task_name)
    files = {f"train/{form}": tmp_path / "train.jsonl" for form in task.hint_forms}
    files.update({"valid": tmp_path / "valid.jsonl", "test": tmp_path / "test.jsonl"})
    methods = suite_methods(suite, task)
    assert len({method.name for method in methods}) == len(methods)
    for method in methods:
        config = method_config(
            method,
            seed=0,
            lr=1e-4,
            settings=LabSettings(),
            model_dir=tmp_path,
            files=files,
            output_dir=tmp_path / "run",
            task=task,
        )
        assert config.objective.name == method.objective
        assert config.data.train == str(files[f"train/{method.hint_form or task.default_hint}"])


def test_summary_gain_and_gap_closed_follow_their_definitions():
    runs = [
        RunResult("a", 0, 1e-4, 0.5, [{"student_entropy": 1.0, "fraction/LH": 0.25}]),
        RunResult("a", 1, 1e-4, 0.7, [{"student_entropy": 3.0, "fraction/LH": 0.75}]),
    ]
    summary = summarize(runs, teacher=0.8, student=0.4)
    method = summary["methods"]["a"]
    # Decimal literals against means and differences of decimal literals: a few roundings each.
    assert_close(method["accuracy"], 0.6, ulps=REORDERED)
    assert_close(method["accuracy_std"], 0.1, ulps=REORDERED)
    assert_close(method["gain"], 0.2, ulps=REORDERED)
    assert_close(method["gap_closed"], 0.5, ulps=REORDERED)
    assert method["regime_fractions"].keys() == {"LH"}
    assert_close(method["regime_fractions"]["LH"], 0.5, ulps=REORDERED)
    assert_close(method["final_entropy"], 2.0, ulps=REORDERED)
    assert method["ci95"] is None  # no vanilla_opd runs to compare with


def test_summary_interval_is_the_paired_bootstrap_against_vanilla_opd():
    base = [True, False, True, False] * 8  # 32 test problems
    better = [True, True, True, False] * 8
    runs = [
        RunResult("vanilla_opd", 0, 1e-4, 0.5, [{"student_entropy": 1.0}], correct=base),
        RunResult("vanilla_opd", 1, 1e-4, 0.5, [{"student_entropy": 1.0}], correct=base),
        RunResult("dopd", 0, 1e-4, 0.75, [{"student_entropy": 1.0}], correct=better),
        RunResult("dopd", 1, 1e-4, 0.5, [{"student_entropy": 1.0}], correct=base),
    ]
    methods = summarize(runs, teacher=0.9, student=0.4)["methods"]
    assert methods["vanilla_opd"]["ci95"] is None
    interval = methods["dopd"]["ci95"]
    expected = paired_bootstrap([better, base], [base, base]).to_dict()
    assert interval == {"vs": "vanilla_opd", **expected}
    assert_close(interval["diff"], 0.125, ulps=REORDERED)  # (0.75 + 0.5) / 2 - 0.5
    assert 0.0 <= interval["low"] < 0.125 < interval["high"]
    rows = table_rows(summarize(runs, teacher=0.9, student=0.4))
    assert "vs vanilla_opd [95% CI]" in rows[0]
    dopd_row = next(row for row in rows if row[0] == "dopd")
    low, high = interval["low"], interval["high"]
    assert f"+0.125 [{low:+.3f}, {high:+.3f}]" in dopd_row


def test_hints_suite_covers_the_tasks_hint_forms():
    for name in ("shiftmap", "cyclesum", "arithmetic"):
        task = load_task(name)
        forms = {method.hint_form for method in suite_methods("hints", task)}
        assert forms == set(task.hint_forms)


@pytest.mark.skipif(
    not (lab_model_dir("shiftmap") / "teacher").is_dir(), reason="shipped lab checkpoints missing"
)
def test_demo_path_writes_a_valid_results_json(tmp_path):
    settings = replace(
        commands.DEMO_SETTINGS,
        steps=2,
        train_examples=32,
        valid_examples=8,
        test_examples=16,
        eval_every=1,
        prompts_per_step=4,
        num_generations=2,
    )
    commands.run_suite("demo", settings, tmp_path, tune=False, command="test")
    results = json.loads((tmp_path / "results.json").read_text())
    for key in ("teacher_accuracy", "student_accuracy"):
        assert 0.0 <= results[key] <= 1.0
    assert {"vanilla_opd", "dopd", "priv_teacher_opd", "self_distillation", "gkd"} <= set(
        results["methods"]
    )
    for name, method in results["methods"].items():
        assert 0.0 <= method["accuracy"] <= 1.0
        assert "gap_closed" in method
        if name != "vanilla_opd":
            interval = method["ci95"]
            assert interval["vs"] == "vanilla_opd"
            assert interval["low"] <= interval["high"]
            vanilla = results["methods"]["vanilla_opd"]["accuracy"]
            assert_close(interval["diff"], method["accuracy"] - vanilla, ulps=REORDERED)
    assert set(results["methods"]["dopd"]["regime_fractions"]) == {"LH", "LL", "HT", "HS"}
    placement = results["regime_placement"]["trained dopd student"]
    assert {"capability", "learnable_info", "unavailable_info"} <= set(placement) and all(
        row["tokens"] > 0 for row in placement.values()
    )
    assert results["gates"]["passed"]
    for scores in (results["student_classes"], results["methods"]["dopd"]):
        accuracy = scores["class_accuracy"]
        assert {"learnable_info", "unavailable_info", "format"} <= set(accuracy)
        assert all(0.0 <= value <= 1.0 for value in accuracy.values())
        assert_close(scores["illusion_index"], 1.0 - accuracy["unavailable_info"], ulps=REORDERED)
    assert "Per-class token accuracy" in (tmp_path / "report.md").read_text()
    assert "Regime placement by token role" in (tmp_path / "report.md").read_text()
    for name in ("report.md", "curves.png", "regimes.png", "tokens.html"):
        assert (tmp_path / name).stat().st_size > 0
    records = [
        json.loads(line)
        for line in (tmp_path / "runs" / "dopd" / f"seed0-lr{settings.lr:g}" / "metrics.jsonl")
        .read_text()
        .splitlines()
    ]
    assert records[0]["step"] == 0 and set(records[0]) == {
        "step",
        "eval/accuracy",
    }  # curves start at the untrained student


def test_validation_never_repeats_a_test_problem(tmp_path):
    task = load_task("arithmetic")
    settings = LabSettings(train_examples=8, valid_examples=300, test_examples=300)
    files = write_data(task, settings, tmp_path, {task.default_hint})
    prompts = {
        split: [json.loads(line)["prompt"] for line in files[split].read_text().splitlines()]
        for split in ("valid", "test")
    }
    assert len(prompts["valid"]) == 300 and len(prompts["test"]) == 300
    assert not set(prompts["valid"]) & set(prompts["test"])
    assert prompts["test"] == [
        e.prompt for e in task.examples(DATA_SEEDS["test"], 300, split="test")
    ]


def test_class_scores_average_shared_classes_and_define_the_illusion_index():
    runs = [
        {"capability": 0.2, "unavailable_info": 0.9, "format": 1.0},
        {"capability": 0.4, "unavailable_info": 0.7},
    ]
    scores = class_scores(runs)
    assert scores["class_accuracy"].keys() == {"capability", "unavailable_info"}  # shared only
    assert_close(scores["class_accuracy"]["capability"], 0.3, ulps=REORDERED)
    assert_close(scores["illusion_index"], 1.0 - 0.8, ulps=REORDERED)
    assert class_scores([{"plan": 1.0}])["illusion_index"] is None
    summary = {
        "teacher_classes": class_scores([{"capability": 1.0, "unavailable_info": 1.0}]),
        "student_classes": class_scores([{}]),
        "methods": {
            "a": {"accuracy": 0.1, **class_scores([{"capability": 0.5}])},
            "b": {"accuracy": 0.9, **scores},
        },
    }
    rows = class_rows(summary)
    assert rows[0] == ["model", "capability", "unavailable_info", "illusion index"]
    # The pretrained teacher, then methods by accuracy; a model that judged no token is left out.
    assert [row[0] for row in rows[1:]] == ["teacher (pretrained)", "b", "a"]
    assert rows[3] == ["a", "0.500", "-", "-"]
