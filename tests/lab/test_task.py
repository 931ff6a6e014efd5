"""Tests of dopd.lab.task and dopd.lab.arithmetic: generation, hints, verifier, task loading."""

from __future__ import annotations

import random
import re
import textwrap
import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.errors import ConfigError
from dopd.io.data import DEFAULT_PRIVILEGED_TEMPLATE, Example, privileged_prompt
from dopd.lab.arithmetic import PlanArithmetic
from dopd.lab.catalog import load_task, task_names
from dopd.lab.task import HINT_FORMS, Problem, Task, split_of
from dopd.modeling.tiny import build_char_tokenizer

TASK = PlanArithmetic()
TOKENIZER = build_char_tokenizer(TASK.characters)
SEEDS = st.integers(min_value=0, max_value=2**31)
# Reference formulas, written independently of the task's step tables.
FORMULAS = ("a+b*c", "(a+b)*c", "a*c-b")


def operands(problem: Problem) -> tuple[int, int, int]:
    a, b, c = map(int, re.fullmatch(r"(\d+),(\d+),(\d+)=", problem.prompt).groups())
    return a, b, c


def reference_plan(a: int, b: int, c: int) -> int:
    return sum(map(int, f"{a}{c}")) % 3


def reference_answer(a: int, b: int, c: int) -> int:
    return eval(FORMULAS[reference_plan(a, b, c)], {}, {"a": a, "b": b, "c": c})


def numbers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text)]


# -- generation ---------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_generation_is_deterministic_by_seed(seed):
    assert TASK.problems(seed, 30) == TASK.problems(seed, 30)
    assert TASK.examples(seed, 30, "summary") == TASK.examples(seed, 30, "summary")
    assert TASK.problems(seed, 30) != TASK.problems(seed + 1, 30)


@settings(max_examples=10, deadline=None)
@given(SEEDS)
def test_splits_partition_prompts_by_a_stable_hash(seed):
    def is_test(problem: Problem) -> bool:
        return zlib.crc32(problem.prompt.encode()) % 8 == 0

    assert all(is_test(problem) for problem in TASK.problems(seed, 40, split="test"))
    assert not any(is_test(problem) for problem in TASK.problems(seed, 40, split="train"))
    assert TASK.examples(seed, 5, "answer", split="test") == TASK.examples(
        seed, 5, "answer", split="test"
    )
    assert all(
        split_of(problem.prompt) == ("test" if is_test(problem) else "train")
        for problem in TASK.problems(seed, 40)
    )


def test_test_split_is_about_one_prompt_in_eight():
    prompts = {f"{a},{b},{c}=" for a in range(20, 50) for b in range(10, 40) for c in range(2, 10)}
    share = sum(split_of(prompt) == "test" for prompt in prompts) / len(prompts)
    assert 0.10 < share < 0.15
    with pytest.raises(ConfigError, match="split='valid'"):
        TASK.problems(0, 1, split="valid")


def test_a_task_too_small_to_split_raises():
    class Constant(Task):
        name, characters = "constant", "x"

        def problem(self, rng: random.Random) -> Problem:
            return Problem("x", "x", "x", {form: "x" for form in self.hint_forms})

    other = "train" if zlib.crc32(b"x") % 8 == 0 else "test"
    with pytest.raises(ConfigError, match=f"no '{other}' prompt"):
        Constant().problems(0, 1, split=other)


def test_plans_are_balanced_and_operands_in_range():
    problems = TASK.problems(0, 3000)
    plans = Counter(reference_plan(*operands(problem)) for problem in problems)
    assert all(800 < count < 1200 for count in plans.values())
    for problem in problems:
        a, b, c = operands(problem)
        assert 20 <= a <= 49 and 10 <= b <= 39 and 2 <= c <= 9


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_answers_and_scratchpads_are_correct(seed):
    for problem in TASK.problems(seed, 20):
        answer = reference_answer(*operands(problem))
        assert answer >= 0 and problem.answer == str(answer)
        scratchpad, last_line = problem.solution.split("\n")
        assert last_line == problem.answer
        for step in scratchpad.split(","):
            left, operator, right, result = re.fullmatch(r"(\d+)([-+*])(\d+)=(\d+)", step).groups()
            assert eval(f"{left}{operator}{right}") == int(result)
        assert int(result) == answer  # the last step computes the answer


@settings(max_examples=20, deadline=None)
@given(SEEDS)
def test_every_character_is_covered_and_the_tokenizer_round_trips(seed):
    assert "\n" in TASK.characters
    for problem in TASK.problems(seed, 20):
        texts = [problem.prompt, problem.solution, *problem.hints.values()]
        texts.append(privileged_prompt(Example(problem.prompt, problem.hints["decomposition"])))
        for text in texts:
            assert set(text) <= set(TASK.characters)
            ids = TOKENIZER(text, add_special_tokens=False)["input_ids"]
            assert TOKENIZER.unk_token_id not in ids and len(ids) == len(text)
            assert TOKENIZER.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=30, deadline=None)
@given(SEEDS)
def test_decomposition_hint_names_only_operands(seed):
    for problem in TASK.problems(seed, 20):
        hint = problem.hints["decomposition"]
        a, b, c = operands(problem)
        # Every number in the hint is an operand, each operand once: no computed value can hide.
        assert sorted(numbers(hint)) == sorted((a, b, c))
        computed = set(numbers(problem.solution.split("\n")[0])[2::3]) | {int(problem.answer)}
        assert not (computed - {a, b, c}) & set(numbers(hint))
        assert "=" not in hint


def test_hint_forms_hold_what_they_promise():
    problem = TASK.problem(random.Random(3))
    scratchpad, answer = problem.solution.split("\n")
    assert set(problem.hints) == set(HINT_FORMS)
    assert problem.hints["answer"] == answer
    assert problem.hints["execution"] == scratchpad
    assert numbers(problem.hints["summary"]) == []
    assert numbers(problem.hints["none"]) == [] and problem.hints["none"].strip()
    # The summary alone determines the plan: one summary per reference formula.
    summaries = {}
    for candidate in TASK.problems(0, 300):
        plan = reference_plan(*operands(candidate))
        summaries.setdefault(candidate.hints["summary"], set()).add(plan)
    assert len(summaries) == 3 and all(len(plans) == 1 for plans in summaries.values())


def test_examples_carry_the_chosen_hint_and_the_answer():
    problems = TASK.problems(5, 10)
    default = TASK.examples(5, 10)
    none = TASK.examples(5, 10, "none")
    for problem, example, empty in zip(problems, default, none):
        assert example.prompt == problem.prompt and example.answer == problem.answer
        assert example.privileged_context == problem.hints["decomposition"]
        assert empty.privileged_context.strip()  # data rows reject blank privileged contexts
    with pytest.raises(ConfigError, match="'hints'.*decomposition"):
        TASK.examples(5, 10, "hints")


def test_privileged_prompt_uses_the_default_template():
    example = TASK.examples(1, 1)[0]
    assert privileged_prompt(example) == DEFAULT_PRIVILEGED_TEMPLATE.format(
        prompt=example.prompt, privileged_context=example.privileged_context
    )


# -- verifier -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("25*4=100,37+100=137\n137", "137", True),
        ("25*4=100,37+100=137\n137\n", "137", True),
        ("25*4=100,37+100=137\n136", "137", False),
        ("25*4=100,37+100=137", "137", False),  # no answer line: the last line is the scratchpad
        ("137\n25*4", "137", False),
        ("", "137", False),
    ],
)
def test_verify_hand_cases(completion, answer, expected):
    assert TASK.verify(completion, answer) is expected


# -- load_task ----------------------------------------------------------------------------------

USER_TASK = """
import random
from dopd.lab.task import Problem, Task

class Reverse(Task):
    name = "reverse"
    characters = "abc>\\n :nohintreversed"

    def problem(self, rng: random.Random) -> Problem:
        word = "".join(rng.choice("abc") for _ in range(4))
        hints = {form: "reversed" for form in self.hint_forms}
        hints.update(answer=word[::-1], none="no hint")
        return Problem(prompt=f"{word}>", solution=word[::-1], answer=word[::-1], hints=hints)

class NotATask:
    pass
"""


def test_load_builtin_task():
    assert task_names() == ["arithmetic", "cyclesum", "shiftmap"]
    task = load_task("arithmetic")
    assert isinstance(task, PlanArithmetic) and task.name == "arithmetic"


def test_load_task_from_a_file(tmp_path):
    path = tmp_path / "my_tasks.py"
    path.write_text(textwrap.dedent(USER_TASK))
    task = load_task(f"{path}:Reverse")
    assert isinstance(task, Task) and task.name == "reverse"
    example = task.examples(0, 1, "answer")[0]
    assert example.privileged_context == example.prompt[:-1][::-1] == example.answer
    assert task.verify("x\nabca", "abca")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("arithmetik", "neither a built-in task"),
        ("{dir}/my_tasks.py", "neither a built-in task"),
        ("{dir}/missing.py:Reverse", "no such file"),
        ("{dir}/my_tasks.py:Missing", "defines no 'Missing'"),
        ("{dir}/my_tasks.py:NotATask", "not a subclass"),
        ("{dir}/my_tasks.py:random", "not a subclass"),
    ],
)
def test_load_task_errors(tmp_path, spec, message):
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent(USER_TASK))
    with pytest.raises(ConfigError, match=message):
        load_task(spec.format(dir=tmp_path))


def test_arithmetic_token_roles_follow_the_scratchpad():
    task = load_task("arithmetic")
    tokens = [*"25*5=125,37+125=162\n162", "</s>"]
    roles = task.token_roles(tokens)
    expected = (
        ["plan"] * 4
        + ["format"]
        + ["result"] * 3
        + ["format"]
        + ["plan"] * 3
        + ["copy"] * 3
        + ["format"]
        + ["result"] * 3
        + ["format"]
        + ["answer"] * 3
        + ["format"]
    )
    assert roles == expected


@given(st.lists(st.sampled_from([*"0123456789+-*=,\n x", "</s>", ""]), max_size=40))
def test_arithmetic_token_roles_label_every_token_of_any_completion(tokens):
    roles = load_task("arithmetic").token_roles(tokens)
    assert len(roles) == len(tokens)
    assert set(roles) <= {"plan", "copy", "result", "answer", "format"}
    assert all(
        role == "format"
        for token, role in zip(tokens, roles)
        if token not in "0123456789+-*" or token == ""
    )
