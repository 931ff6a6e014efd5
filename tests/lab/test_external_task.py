"""A task defined in a file outside the package runs through the whole lab, end to end:
``dopd pretrain --task file.py:Class``, then a suite on the pair it wrote, in well under a
minute (tiny recipes and budgets)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace

import pytest

from dopd.cli import main
from dopd.errors import ConfigError
from dopd.lab import commands
from dopd.lab.gates import GateSettings
from dopd.lab.pretrain import pretrain_pair

TASK_FILE = '''
import random

from dopd.lab.task import Problem, Task


class SortDigits(Task):
    """Sort four distinct digits; the hint is the answer. The first output digit is the
    student's missing skill: its curriculum never trains on it."""

    name = "sort_digits"
    characters = "0123456789>\\nnoe"
    hint_forms = ("answer", "none")
    default_hint = "answer"
    pretraining_recipes = {
        role: {
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 32,
            "steps": 3,
            "learning_rate": 1e-3,
        }
        for role in ("teacher", "student")
    }

    def problem(self, rng: random.Random) -> Problem:
        digits = rng.sample("0123456789", 4)
        answer = "".join(sorted(digits))
        hints = {"answer": answer, "none": "none"}
        return Problem(prompt="".join(digits) + ">", solution=answer, answer=answer, hints=hints)

    def token_roles(self, tokens):
        return ["capability" if i == 0 else "skill" for i in range(len(tokens))]

    def token_verdicts(self, tokens, answer):
        return [i < len(answer) and token == answer[i] for i, token in enumerate(tokens)]

    def unsupervised_classes(self, role):
        return frozenset({"capability"}) if role == "student" else frozenset()
'''


def test_an_external_task_file_pretrains_and_runs_a_suite(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(textwrap.dedent(TASK_FILE))
    spec = f"{tmp_path / 'my_task.py'}:SortDigits"
    # The default gate budget, shrunk: the smoke checks the wiring, not the pair.
    tiny_gates = GateSettings(
        sft_steps=2, sft_prompts_per_step=2, sft_generations=2, sft_lr_grid=(1e-3,)
    )
    monkeypatch.setitem(pretrain_pair.__kwdefaults__, "gate_settings", tiny_gates)
    assert main(["pretrain", "--task", spec, "--output", str(tmp_path / "lab" / "models")]) == 0
    report = json.loads((tmp_path / "lab" / "models" / "pretrain.json").read_text())
    assert report["task"] == "sort_digits" and report["teacher"]["steps"] == 3
    assert not report["gates"]["passed"]  # untrained models close no gap

    settings = replace(
        commands.DEMO_SETTINGS,
        task=spec,
        steps=1,
        train_examples=8,
        valid_examples=4,
        test_examples=8,
        eval_every=1,
        prompts_per_step=2,
        num_generations=2,
        max_completion_length=6,
    )
    # Its gates failed, so a suite refuses the pair unless told otherwise.
    with pytest.raises(ConfigError, match="failed its gates.*--allow-failed-gates"):
        commands.run_suite("demo", settings, tmp_path / "lab", tune=False, command="test")
    assert sorted(path.name for path in (tmp_path / "lab").iterdir()) == ["models"]
    settings = replace(settings, allow_failed_gates=True)
    commands.run_suite("demo", settings, tmp_path / "lab", tune=False, command="test")
    results = json.loads((tmp_path / "lab" / "results.json").read_text())
    assert results["task"] == "sort_digits" and results["gates"] == report["gates"]
    assert set(results["methods"]) == {
        "vanilla_opd",
        "priv_teacher_opd",
        "self_distillation",
        "dopd",
        "gkd",
    }
    assert set(results["methods"]["dopd"]["class_accuracy"]) <= {"capability", "skill"}
