"""Tests of dopd.lab.pretrain: batches, prompt mix, a tiny end-to-end pretraining run, and the
shipped checkpoints of the default task."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dopd.io.data import DEFAULT_PRIVILEGED_TEMPLATE, Example, privileged_prompt
from dopd.lab.arithmetic import PlanArithmetic
from dopd.lab.catalog import load_task
from dopd.lab.gates import GateSettings, class_nll
from dopd.lab.pretrain import (
    EVAL_SEED_OFFSET,
    ModelRecipe,
    PretrainOptions,
    lab_model_dir,
    pretrain_pair,
    training_row,
    view_accuracy,
)
from dopd.lab.supervised import collate, warmup_cosine
from dopd.lab.task import Problem, Task
from dopd.modeling.tiny import build_char_tokenizer
from tests.tolerance import REORDERED, assert_close

TASK = PlanArithmetic()
TOKENIZER = build_char_tokenizer(TASK.characters)
TINY = ModelRecipe(16, 1, 2, 1, 32, steps=3, learning_rate=1e-3)
TINY_OPTIONS = PretrainOptions(
    batch_size=4, warmup_steps=1, eval_problems=4, eval_batch_size=4, progress=False
)
MODEL_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


def test_collate_labels_only_the_solution_and_eos():
    batch = collate([("12,34,5=", "1\n2"), ("1=", "3")], TOKENIZER)
    bos, eos, pad = TOKENIZER.bos_token_id, TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
    char = {c: TOKENIZER.convert_tokens_to_ids(c) for c in "12345,=\n"}
    first = [bos, *(char[c] for c in "12,34,5="), char["1"], char["\n"], char["2"], eos]
    second = [bos, char["1"], char["="], char["3"], eos] + [pad] * 8
    assert batch["input_ids"].tolist() == [first, second]
    assert batch["attention_mask"].tolist() == [[1] * 13, [1] * 5 + [0] * 8]
    assert batch["labels"].tolist() == [
        [-100] * 9 + first[9:],
        [-100] * 3 + [char["3"], eos] + [-100] * 8,
    ]


def test_training_rows_mix_plain_and_hinted_prompts():
    rng, options = random.Random(0), PretrainOptions()
    rows = [training_row(TASK, rng, options, "student") for _ in range(4000)]
    prompts = [prompt.split("\n\n") for prompt, _ in rows]
    # Pretraining never sees a test prompt (crc32 % 8 == 0 is the test split).
    assert all(zlib.crc32(parts[0].encode()) % 8 for parts in prompts)
    assert abs(sum(len(parts) == 1 for parts in prompts) / len(rows) - 0.5) < 0.03
    hints = [parts[1] for parts in prompts if len(parts) == 2]
    decomposition = [hint for hint in hints if "then" in hint and any(c.isdigit() for c in hint)]
    assert abs(len(decomposition) / len(rows) - 0.3) < 0.03
    assert {"no hint", "mul then add"} <= set(hints)  # other forms are shown too


class Curriculum(Task):
    """Teacher problems are ``t<n>``, the student's ``s<n>``; hinted views answer in reverse."""

    name, characters = "curriculum", "st0123456789\n hinor>"

    def problem(self, rng):
        return self.pretraining_problem("teacher", rng)

    def pretraining_problem(self, role, rng):
        prompt = f"{role[0]}{rng.randrange(10**6)}>"
        hints = {form: "hint" for form in self.hint_forms}
        solved = {form: "ro" for form in self.hint_forms}
        return Problem(prompt, solution="or", answer="or", hints=hints, hinted_solutions=solved)


def test_training_rows_follow_each_role_s_curriculum_and_view_solution():
    task, options = Curriculum(), PretrainOptions()
    for role in ("teacher", "student"):
        rng = random.Random(1)
        rows = [training_row(task, rng, options, role) for _ in range(200)]
        assert all(prompt.startswith(role[0]) for prompt, _ in rows)
        # Plain rows learn ``solution``; hinted rows the hinted view's own solution.
        assert {solution for prompt, solution in rows if "\n\n" not in prompt} == {"or"}
        assert {solution for prompt, solution in rows if "\n\n" in prompt} == {"ro"}
    problem = task.problem(random.Random(0))
    assert problem.solution_for(None) == "or" and problem.solution_for("answer") == "ro"
    assert Problem("x", "y", "y", {"none": "h"}).solution_for("none") == "y"


def test_warmup_cosine_endpoints():
    assert_close(warmup_cosine(0, 10, 100), 0.1, ulps=REORDERED)
    assert_close(warmup_cosine(10, 10, 100), 1.0, ulps=REORDERED)
    assert_close(warmup_cosine(55, 10, 100), 0.55, ulps=REORDERED)
    assert_close(warmup_cosine(100, 10, 100), 0.1, ulps=REORDERED)


TINY_GATES = GateSettings(
    sft_steps=2, sft_prompts_per_step=2, sft_generations=2, sft_lr_grid=(1e-3,)
)


def run_tiny(output: Path, seed: int) -> dict:
    return pretrain_pair(
        TASK,
        output,
        seed=seed,
        teacher=TINY,
        student=TINY,
        options=TINY_OPTIONS,
        gate_settings=TINY_GATES,
    )


def test_tiny_pretrain_writes_loadable_pair(tmp_path):
    report = run_tiny(tmp_path, seed=0)
    assert json.loads((tmp_path / "pretrain.json").read_text()) == report
    assert {"task", "seed", "options", "teacher", "student", "wall_time_s", "cpu_time_s"} <= set(
        report
    )
    # The gates are measured and recorded; arithmetic labels no information classes, so the
    # separation and illusion checks have nothing to measure and fail.
    assert report["gates"]["settings"]["sft_steps"] == 2
    assert report["gates"]["separation"]["learnable_info_gap"]["value"] is None
    assert not report["gates"]["passed"]
    for role in ("teacher", "student"):
        assert MODEL_FILES <= {path.name for path in (tmp_path / role).iterdir()}
        model = AutoModelForCausalLM.from_pretrained(tmp_path / role)
        tokenizer = AutoTokenizer.from_pretrained(tmp_path / role)
        entry = report[role]
        assert model.config.hidden_size == TINY.hidden_size and entry["steps"] == TINY.steps
        assert entry["parameters"] == sum(parameter.numel() for parameter in model.parameters())
        assert set(entry["accuracy"]) == {"no_hint", *TASK.hint_forms}
        assert all(0.0 <= value <= 1.0 for value in entry["accuracy"].values())
        text = DEFAULT_PRIVILEGED_TEMPLATE.format(prompt="37,25,5=", privileged_context="no hint")
        ids = tokenizer(text)["input_ids"]
        assert ids == TOKENIZER(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pretrain_is_deterministic_by_seed(tmp_path):
    weights = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run_tiny(tmp_path / name, seed=seed)
        weights[name] = load_file(tmp_path / name / "student" / "model.safetensors")
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert not all(torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])


# -- shipped checkpoints ------------------------------------------------------------------------

SHIPPED = lab_model_dir("arithmetic")


def test_lab_model_dir_is_inside_the_package():
    import dopd.lab

    assert SHIPPED == Path(dopd.lab.__file__).parent / "checkpoints" / "arithmetic"


@pytest.mark.parametrize("task", ["arithmetic", "shiftmap", "cyclesum"])
def test_shipped_checkpoints_are_complete_and_small(task):
    shipped = lab_model_dir(task)
    for role in ("teacher", "student"):
        assert MODEL_FILES <= {path.name for path in (shipped / role).iterdir()}
    size = sum(path.stat().st_size for path in shipped.rglob("*") if path.is_file())
    assert size <= 6 * 2**20


@pytest.mark.parametrize("task_name", ["shiftmap", "cyclesum"])
def test_shipped_pair_shares_one_architecture_differs_in_curriculum_and_passes_gates(task_name):
    shipped = lab_model_dir(task_name)
    report = json.loads((shipped / "pretrain.json").read_text())
    configs = [
        AutoModelForCausalLM.from_pretrained(shipped / role).config.to_dict()
        for role in ("teacher", "student")
    ]
    shape = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads")
    assert [{key: c[key] for key in shape} for c in configs][0] == {
        key: configs[1][key] for key in shape
    }
    assert report["teacher"]["steps"] == report["student"]["steps"]
    # Recomputed on held-out problems: the teacher solves what the curriculum kept from the
    # student, and the hint does not help the student with that skill.
    task = load_task(task_name)
    problems = task.problems(report["seed"] + EVAL_SEED_OFFSET, 64, split="test")
    hinted = [privileged_prompt(Example(p.prompt, p.hints["decomposition"])) for p in problems]
    accuracy = {}
    for role in ("teacher", "student"):
        model = AutoModelForCausalLM.from_pretrained(shipped / role)
        tokenizer = AutoTokenizer.from_pretrained(shipped / role)
        for view, prompts in (("plain", [p.prompt for p in problems]), ("hinted", hinted)):
            accuracy[role, view] = view_accuracy(
                model, tokenizer, task, prompts, problems, PretrainOptions(eval_batch_size=64)
            )
    assert accuracy["teacher", "plain"] >= 0.95 and accuracy["student", "plain"] <= 0.6
    assert accuracy["student", "hinted"] <= 0.6
    # The recorded gates passed, and the separation recomputed here agrees with them: with the
    # hint the student reads the information as well as the teacher, not the skill.
    assert report["gates"]["passed"]
    nll = {
        role: class_nll(
            AutoModelForCausalLM.from_pretrained(shipped / role),
            AutoTokenizer.from_pretrained(shipped / role),
            task,
            problems,
            hint_form="decomposition",
            target_form="decomposition",
        )
        for role in ("teacher", "student")
    }
    for name in ("learnable_info", "unavailable_info"):
        assert abs(nll["student"][name] - nll["teacher"][name]) <= 0.1
    assert nll["student"]["capability"] - nll["teacher"]["capability"] >= 1.0


def greedy_accuracy(role: str, prompts: list[str], answers: list[str]) -> float:
    model = AutoModelForCausalLM.from_pretrained(SHIPPED / role).eval()
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED / role)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(
            **batch, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    completions = tokenizer.batch_decode(
        output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    # Scored by hand, not by the task's verifier: the last line must be the answer.
    return sum(
        completion.strip().split("\n")[-1] == answer
        for completion, answer in zip(completions, answers)
    ) / len(answers)


def test_shipped_teacher_beats_shipped_student_without_hints():
    seed = json.loads((SHIPPED / "pretrain.json").read_text())["seed"]
    problems = TASK.problems(seed + EVAL_SEED_OFFSET, 64, split="test")  # never pretrained on
    prompts, answers = [p.prompt for p in problems], [p.answer for p in problems]
    assert greedy_accuracy("teacher", prompts, answers) > greedy_accuracy(
        "student", prompts, answers
    )
