"""Tests of dopd.lab.gates and their enforcement: verdicts on hand-built numbers, per-class NLL
against a one-sequence-at-a-time loop, the supervised gate's arithmetic, and a suite's refusal of
a pair whose gates are missing or failed."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from dopd.errors import ConfigError
from dopd.io.data import Example, privileged_prompt, tokenize_prompt
from dopd.lab.commands import pair_gates
from dopd.lab.gates import (
    GateSettings,
    class_nll,
    failed_checks,
    gate_verdicts,
    supervised_gap_closed,
    verdict,
)
from dopd.lab.pretrain import ModelRecipe, build_model
from dopd.lab.shiftmap import ShiftMap
from dopd.modeling.tiny import build_char_tokenizer

TASK = ShiftMap(items=2)
TOKENIZER = build_char_tokenizer(TASK.characters)
TINY = ModelRecipe(16, 1, 2, 1, 32, steps=1, learning_rate=1e-3)


def _measurements(**changes) -> dict:
    """Numbers that pass every gate; ``changes`` replaces ``gap_closed`` or one class NLL, given
    as ``view__class=value``."""
    nll = {
        "priv_student": {"learnable_info": 0.05, "unavailable_info": 0.02, "capability": 3.0},
        "teacher": {"learnable_info": 0.01, "unavailable_info": 0.01, "capability": 0.1},
        "plain_teacher": {"unavailable_info": 0.01},
        "teacher_on_canonical": {"unavailable_info": 4.0},
    }
    gap_closed = changes.pop("gap_closed", 0.8)
    pair_gap = changes.pop("pair_gap", 0.5)
    for key, value in changes.items():
        view, token_class = key.split("__")
        if value is None:
            nll[view].pop(token_class)
        else:
            nll[view][token_class] = value
    return {"pair_gap": pair_gap, "gap_closed": gap_closed, "class_nll": nll}


def test_gates_pass_on_a_pair_built_to_pass():
    gates = gate_verdicts(_measurements())
    assert gates["passed"] and failed_checks(gates) == []
    separation = gates["separation"]
    assert math.isclose(separation["learnable_info_gap"]["value"], 0.05 - 0.01)
    assert math.isclose(separation["capability_gap"]["value"], 3.0 - 0.1)
    assert math.isclose(gates["illusion"]["unavailable_info_gap"]["value"], 4.0 - 0.01)


@pytest.mark.parametrize(
    ("changes", "failed"),
    [
        ({"pair_gap": 0.29}, "room_to_learn.pair_gap"),
        ({"gap_closed": 0.59}, "room_to_learn.gap_closed"),
        ({"gap_closed": None}, "room_to_learn.gap_closed"),
        ({"priv_student__learnable_info": 0.2}, "separation.learnable_info_gap"),
        ({"priv_student__unavailable_info": 0.5}, "separation.unavailable_info_gap"),
        ({"priv_student__capability": 1.0}, "separation.capability_gap"),
        ({"teacher__capability": None}, "separation.capability_gap"),
        ({"teacher_on_canonical__unavailable_info": 0.5}, "illusion.unavailable_info_gap"),
    ],
)
def test_each_gate_fails_alone_when_its_number_misses(changes, failed):
    gates = gate_verdicts(_measurements(**changes))
    assert not gates["passed"]
    assert [check.split(" ")[0] for check in failed_checks(gates)] == [failed]


def test_verdict_thresholds_are_inclusive():
    assert verdict(0.6, ">=", 0.6)["passed"] and verdict(0.1, "<=", 0.1)["passed"]
    assert not verdict(0.1001, "<=", 0.1)["passed"]
    assert not verdict(None, ">=", 0.0)["passed"]
    with pytest.raises(ValueError, match="rule"):
        verdict(1.0, ">", 0.0)


def test_class_nll_matches_one_sequence_at_a_time():
    model = build_model(TINY, TOKENIZER, seed=3).eval()
    problems = TASK.problems(5, 6)
    form = TASK.default_hint
    got = class_nll(
        model, TOKENIZER, TASK, problems, hint_form=form, target_form=form, batch_size=4
    )
    losses: dict[str, list[float]] = {}
    for problem in problems:
        prompt = privileged_prompt(Example(problem.prompt, problem.hints[form]))
        prompt_ids = tokenize_prompt(prompt, TOKENIZER)
        solution = problem.solution_for(form)
        solution_ids = TOKENIZER(solution, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + solution_ids])
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
        roles = TASK.token_roles(TOKENIZER.convert_ids_to_tokens(solution_ids))
        for offset, (token, role) in enumerate(zip(solution_ids, roles)):
            position = len(prompt_ids) + offset - 1  # the logits that predict this token
            losses.setdefault(role, []).append(-float(logp[position, token]))
    assert got.keys() == losses.keys()
    for role, values in losses.items():
        assert math.isclose(got[role], statistics.fmean(values), rel_tol=1e-4, abs_tol=1e-5)


def test_supervised_gap_closed_is_the_fraction_of_the_pair_gap():
    teacher = build_model(TINY, TOKENIZER, seed=1).eval()
    student = build_model(TINY, TOKENIZER, seed=2).eval()
    before = [p.detach().clone() for p in student.parameters()]
    settings = GateSettings(
        sft_steps=2, sft_prompts_per_step=2, sft_generations=2, sft_lr_grid=(1e-3, 1e-2)
    )
    scores = iter([0.55, 0.3])  # the accuracy of each trained copy, in grid order
    out = supervised_gap_closed(
        teacher,
        student,
        TOKENIZER,
        TASK,
        {"teacher": 0.9, "student": 0.4},
        seed=0,
        settings=settings,
        accuracy_of=lambda model: next(scores),
        progress=False,
    )
    assert out["by_lr"] == {"0.001": 0.3, "0.01": -0.2}  # (0.55 - 0.4) / 0.5, (0.3 - 0.4) / 0.5
    assert out["gap_closed"] == 0.3
    # The gate trains copies: the pair itself is left as it was.
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))


def _pair_dir(tmp_path, gates):
    """A pair folder whose pretrain.json records ``gates`` as ``measure_gates`` does (with the
    measurements beside the verdicts)."""
    report = {"task": "shiftmap"}
    if gates is not None:
        report["gates"] = {"settings": {"sft_steps": 120}, "gap_closed_by_lr": {}, **gates}
    (tmp_path / "pretrain.json").write_text(json.dumps(report))
    return tmp_path


def test_a_suite_refuses_a_pair_without_gates_unless_allowed(tmp_path):
    model_dir = _pair_dir(tmp_path, None)
    with pytest.raises(ConfigError, match="records no gates.*--allow-failed-gates"):
        pair_gates(model_dir, allow_failed=False)
    assert pair_gates(model_dir, allow_failed=True) is None


def test_a_suite_refuses_a_failed_pair_naming_the_checks(tmp_path):
    gates = gate_verdicts(_measurements(priv_student__learnable_info=0.3))
    model_dir = _pair_dir(tmp_path, gates)
    with pytest.raises(ConfigError, match=r"separation\.learnable_info_gap \(0\.29"):
        pair_gates(model_dir, allow_failed=False)
    assert pair_gates(model_dir, allow_failed=True)["passed"] is False
    passing = gate_verdicts(_measurements())
    assert pair_gates(_pair_dir(tmp_path, passing), allow_failed=False)["passed"] is True
