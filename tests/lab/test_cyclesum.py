"""The cyclesum task: generation, the start-free verifier, token roles and verdicts, curriculum."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import ConfigError
from dopd.lab.catalog import load_task
from dopd.lab.cyclesum import CycleSum, parse
from dopd.lab.supervised import collate
from dopd.lab.task import split_of
from dopd.modeling.tiny import build_char_tokenizer
from tests.lab.roles import LAB_TOKEN_ROLES

TASK = CycleSum()


def _solution(digits: str, backward: bool) -> str:
    """Independent of the module: the solution text from the definition."""
    n = len(digits)
    order = [digits[(-i if backward else i) % n] for i in range(n)]
    sums = [sum(int(d) for d in order[: i + 1]) % 10 for i in range(n)]
    return f"M{max(digits)}:" + ",".join(f"{d}>{s}" for d, s in zip(order, sums))


def test_generation_is_deterministic_by_seed():
    assert TASK.problems(7, 50) == TASK.problems(7, 50)
    assert TASK.problems(7, 50) != TASK.problems(8, 50)


def test_pinned_problem_and_views():
    problem = TASK.problem(random.Random(0))
    digits = problem.prompt[:-1]
    assert problem.prompt == "69024=" and problem.hints["decomposition"] == "MAX 9 BACK"
    assert (
        problem.solution == problem.answer == _solution(digits, False) == "M9:6>6,9>5,0>5,2>7,4>1"
    )
    assert problem.solution_for("decomposition") == _solution(digits, True)
    assert problem.solution_for("direction") == _solution(digits, True)
    assert problem.solution_for("max") == problem.solution
    text = problem.prompt + "".join(problem.hints.values()) + problem.solution_for("direction")
    assert set(text) <= set(TASK.characters)
    directions = [TASK.problem(random.Random(i)).hints["direction"] for i in range(400)]
    assert 0.4 < directions.count("BACK") / len(directions) < 0.6


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_verifier_accepts_both_directions_and_rejects_wrong_walks(seed):
    problem = TASK.problem(random.Random(seed))
    digits = problem.prompt[:-1]
    for backward in (False, True):
        assert TASK.verify(_solution(digits, backward), problem.answer)
    good = _solution(digits, True)
    wrong_max = good[:1] + str((int(good[1]) + 1) % 10) + good[2:]
    wrong_running = good[:-1] + str((int(good[-1]) + 1) % 10)
    rotated = _solution(digits[1:] + digits[0], False)  # a valid cycle from the wrong start
    rejected = [
        wrong_max,
        wrong_running,
        good[: good.rindex(",")],  # a digit missing
        f"M{max(digits)}" + rotated[2:],
        good.replace(":", ""),  # malformed
    ]
    assert not any(TASK.verify(text, problem.answer) for text in rejected)


def test_token_roles_and_verdicts_by_hand():
    # 40712 walked backward: 4>4, 2>6, 1>7, 7>4 (7 + 7 carries), 0>4.
    tokens = list("M7:4>4,2>6,1>7,7>4,0>4")
    assert TASK.token_roles(tokens) == [
        "format", "learnable_info", "format",
        "order_forced", "format", "skill", "format",
        "unavailable_info", "format", "skill", "format",
        "order_forced", "format", "skill", "format",
        "order_forced", "format", "capability", "format",
        "order_forced", "format", "skill",
    ]  # fmt: skip
    answer = "M7:4>4,0>4,7>1,1>2,2>4"
    assert TASK.token_verdicts(tokens, answer) == [True] * len(tokens)
    # A second digit that is neither neighbour: wrong, and every later digit with it; the running
    # sum is still judged on the digits written.
    got = TASK.token_verdicts(list("M7:4>4,7>1,1>2"), answer)
    assert got == [True] * 7 + [False, True, True, True, False, True, True]
    # A wrong largest digit, a wrong first digit, and a token out of place.
    assert TASK.token_verdicts(list("M5:4>4"), answer)[1] is False
    assert TASK.token_verdicts(list("M7:0>0"), answer)[3] is False
    assert TASK.token_verdicts(list("M7>4"), answer) == [True, True, False, False]


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.sampled_from(list(TASK.characters) + ["<eos>"]), max_size=30))
def test_token_roles_and_verdicts_label_every_token(tokens):
    roles = TASK.token_roles(tokens)
    verdicts = TASK.token_verdicts(tokens, "M7:4>4,0>4,7>1,1>2,2>4")
    assert len(roles) == len(verdicts) == len(tokens)
    assert set(roles) <= LAB_TOKEN_ROLES


def test_student_curriculum_masks_exactly_the_carried_sums():
    tokenizer = build_char_tokenizer(TASK.characters)
    rng, rows, carries = random.Random(3), [], 0
    for _ in range(200):
        problem = TASK.pretraining_problem("student", rng)
        assert split_of(problem.prompt) == "train"
        rows.append((problem.prompt, problem.solution))
        running = 0
        for digit, _ in parse(problem.solution)[1]:
            carries += running + int(digit) >= 10
            running = (running + int(digit)) % 10
    masked = collate(rows, tokenizer, task=TASK, unsupervised=TASK.unsupervised_classes("student"))
    full = collate(rows, tokenizer)
    assert int(((masked["labels"] == -100) & (full["labels"] != -100)).sum()) == carries > 0
    assert TASK.unsupervised_classes("teacher") == frozenset()


def test_builtin_and_options():
    assert isinstance(load_task("cyclesum"), CycleSum)
    assert len(CycleSum(items=3).problem(random.Random(0)).prompt) == 4
    with pytest.raises(ConfigError, match="items"):
        CycleSum(items=9)
