"""The shiftmap task: generation, the curriculum split, the order-free verifier, token roles."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import ConfigError
from dopd.lab.catalog import load_task
from dopd.lab.shiftmap import ALPHABET, ShiftMap, parse
from dopd.lab.supervised import collate
from dopd.lab.task import split_of
from dopd.modeling.tiny import build_char_tokenizer
from tests.lab.roles import LAB_TOKEN_ROLES

TASK = ShiftMap()


def _shift(letter: str, key: int) -> str:
    """Independent of the module: position arithmetic on the alphabet string."""
    return ALPHABET[(ALPHABET.find(letter) + key) % 16]


def test_generation_is_deterministic_by_seed():
    assert TASK.problems(7, 50) == TASK.problems(7, 50)
    assert TASK.problems(7, 50) != TASK.problems(8, 50)


def test_pinned_problem_and_views():
    problem = ShiftMap().problem(random.Random(0))
    letters, digits = problem.prompt[:-1].split(" ")
    key = (int(digits[0]) + int(digits[1])) % 10
    assert letters == "".join(sorted(letters)) and len(set(letters)) == 4
    assert problem.solution == f"K{key}:" + ",".join(f"{c}>{_shift(c, key)}" for c in letters)
    order = problem.hints["decomposition"].split("ORDER ")[1]
    assert problem.hints["decomposition"] == f"KEY {key} ORDER {order}"
    assert sorted(order) == sorted(letters)
    hinted = problem.solution_for("decomposition")
    assert [pair[0] for pair in hinted[3:].split(",")] == list(order)
    assert problem.solution_for("key") == problem.solution_for("none") == problem.solution
    assert problem.solution_for("order") == hinted
    assert set(problem.prompt + "".join(problem.hints.values()) + hinted) <= set(TASK.characters)


def test_student_curriculum_masks_exactly_the_wrapping_images():
    tokenizer = build_char_tokenizer(TASK.characters)
    rows, wrapping = [], 0
    rng = random.Random(1)
    for _ in range(200):
        problem = TASK.pretraining_problem("student", rng)
        assert split_of(problem.prompt) == "train"
        rows.append((problem.prompt, problem.solution))
        _, pairs = parse(problem.solution)
        # An image wraps when it comes before its letter in the alphabet (a shift below 16).
        wrapping += sum(ALPHABET.index(b) < ALPHABET.index(a) for a, b in pairs)
    batch = collate(rows, tokenizer, task=TASK, unsupervised=TASK.unsupervised_classes("student"))
    full = collate(rows, tokenizer)
    dropped = (batch["labels"] == -100) & (full["labels"] != -100)
    masked = int(dropped.sum())
    assert masked == wrapping > 0
    # Only image letters are masked; the student's prompts are the teacher's (one distribution).
    image_ids = {tokenizer.convert_tokens_to_ids(c) for c in ALPHABET}
    assert set(full["labels"][dropped].tolist()) <= image_ids
    assert TASK.unsupervised_classes("teacher") == frozenset()
    assert TASK.pretraining_problem("teacher", random.Random(1)) == TASK.pretraining_problem(
        "student", random.Random(1)
    )


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_verifier_accepts_every_order_and_rejects_wrong_answers(seed):
    problem = TASK.problem(random.Random(seed))
    key, pairs = parse(problem.answer)
    for order in itertools.permutations(pairs):
        assert TASK.verify(f"K{key}:" + ",".join(f"{a}>{b}" for a, b in order), problem.answer)
    wrong_image = [(pairs[0][0], _shift(pairs[0][1], 1)), *pairs[1:]]
    wrong_key = str((int(key) + 1) % 10)
    rejected = [
        f"K{key}:" + ",".join(f"{a}>{b}" for a, b in wrong_image),
        f"K{wrong_key}:" + ",".join(f"{a}>{b}" for a, b in pairs),
        f"K{key}:" + ",".join(f"{a}>{b}" for a, b in pairs[:-1]),  # a letter missing
        f"K{key}:" + ",".join(f"{a}>{b}" for a, b in [*pairs[:-1], pairs[0]]),  # one twice
        f"K{key}" + ",".join(f"{a}>{b}" for a, b in pairs),  # malformed
    ]
    assert not any(TASK.verify(text, problem.answer) for text in rejected)


def test_token_roles_by_hand():
    # Key 8: d > l does not wrap, k > c wraps (10 + 8 >= 16), m > e wraps, b > j does not.
    roles = TASK.token_roles(list("K8:k>c,b>j,m>e,d>l"))
    assert roles == [
        "format", "learnable_info", "format",
        "unavailable_info", "format", "capability", "format",
        "unavailable_info", "format", "skill", "format",
        "unavailable_info", "format", "capability", "format",
        "order_forced", "format", "skill",
    ]  # fmt: skip
    # Half the items free: two free pairs, then the canonical rest.
    half = ShiftMap(free_order_share=0.5).token_roles(list("K0:b>b,a>a,c>c,d>d"))
    sources = [half[i] for i in (3, 7, 11, 15)]
    assert sources == ["unavailable_info", "unavailable_info", "order_forced", "order_forced"]
    # Out of place from the second token on: everything after is format.
    assert TASK.token_roles(list("Kx:a>b")) == ["format"] * 6


@settings(max_examples=60, deadline=None)
@given(tokens=st.lists(st.sampled_from(list(TASK.characters) + ["", "<eos>"]), max_size=30))
def test_token_roles_label_every_token_of_any_completion(tokens):
    roles = TASK.token_roles(tokens)
    assert len(roles) == len(tokens)
    assert set(roles) <= LAB_TOKEN_ROLES


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**20))
def test_token_verdicts_accept_every_valid_order(seed):
    problem = TASK.problem(random.Random(seed))
    key, pairs = parse(problem.answer)
    for order in itertools.permutations(pairs):
        text = f"K{key}:" + ",".join(f"{a}>{b}" for a, b in order)
        verdicts = TASK.token_verdicts([*text, "<eos>"], problem.answer)
        assert verdicts == [True] * len(text) + [False]  # nothing is expected after the pairs


def test_token_verdicts_by_hand():
    answer = "K8:b>j,d>l,k>c,m>e"  # letters bdkm, key 8
    # A wrong key: the key digit and every image judged against the true key are wrong.
    got = TASK.token_verdicts(list("K7:k>b,b>j"), answer)
    assert got == [True, False, True, True, True, False, True, True, True, True]
    # A letter not in the prompt, then one used twice: each source letter is wrong.
    got = TASK.token_verdicts(list("K8:a>i,b>j,b>j"), answer)
    assert [got[i] for i in (3, 7, 11)] == [False, True, False]
    assert [got[i] for i in (5, 9, 13)] == [True, True, True]  # a > i is a's shift by 8
    # Out of place: the stray token and everything after it are wrong.
    assert TASK.token_verdicts(list("K8k>c"), answer) == [True, True, False, False, False]
    # Verdicts line up with the roles.
    roles = TASK.token_roles(list("K8:k>c,b>j"))
    assert len(TASK.token_verdicts(list("K8:k>c,b>j"), answer)) == len(roles)


def test_builtin_and_options():
    assert isinstance(load_task("shiftmap"), ShiftMap)
    tokenizer = build_char_tokenizer(TASK.characters)
    text = TASK.problem(random.Random(3)).solution_for("decomposition")
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert ShiftMap(items=5, free_order_share=0.0).problem(random.Random(0)).hints["order"]
    with pytest.raises(ConfigError, match="items=9"):
        ShiftMap(items=9)
    with pytest.raises(ConfigError, match="free_order_share=1.5"):
        ShiftMap(free_order_share=1.5)
