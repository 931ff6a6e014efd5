"""The lab task interface: procedurally generated, verifiable problems with privileged hints.

A task draws ``Problem``s from a ``random.Random``. Each problem carries the prompt ``x`` the
deployed student sees, a full target ``solution`` (scratchpad, then the answer on its last line),
the reference ``answer``, and one privileged context per *hint form* (docs/method.md §1; the
paper's Tables 4-5 compare these forms):

| hint form | what the privileged context holds |
|---|---|
| ``decomposition`` | the default: step-wise plan, no worked execution, no final answer |
| ``answer`` | the final answer |
| ``execution`` | the worked execution (the scratchpad itself) |
| ``summary`` | a short summary of the plan |
| ``none`` | no information (a fixed non-blank filler, since a privileged context is never empty) |

Adding a task, without editing dopd — write a file outside the package::

    # my_tasks.py
    import random
    from dopd.lab.task import Problem, Task

    class Reverse(Task):
        name = "reverse"
        characters = "abc>\\n :nohintreversed"   # every character prompts, hints, solutions use

        def problem(self, rng: random.Random) -> Problem:
            word = "".join(rng.choice("abc") for _ in range(4))
            hints = {form: "reversed" for form in self.hint_forms}
            hints.update(answer=word[::-1], none="no hint")
            return Problem(prompt=f"{word}>", solution=word[::-1], answer=word[::-1], hints=hints)

and name it as ``my_tasks.py:Reverse`` wherever a task is expected (``load_task``, the lab
config, ``dopd pretrain``). A task defines ``name``, ``characters`` and ``problem``; it may
override ``verify``, ``hint_forms``, ``default_hint``, ``token_roles`` (each solution token's
class) with ``token_verdicts`` (whether each token is right), and ``pretraining_problem`` with
``unsupervised_classes`` (each model's curriculum), and a problem may give a hinted view its own
target (``Problem.hinted_solutions``). Rules a task must keep:

- ``problem`` is a pure function of the generator's state, so ``examples(seed, n)`` is the same on
  every run; every hint form of ``hint_forms`` has a non-blank entry in ``Problem.hints``;
- the prompt space is large enough that ``split_of`` (a stable hash of the prompt, one in 8 to
  ``"test"``) leaves test prompts to draw: pretraining sees only ``"train"`` prompts, so held-out
  evaluations should draw ``examples(seed, n, split="test")``;
- ``characters`` covers every character of prompts, hints and solutions (the lab's character
  tokenizer maps anything else to ``<unk>``), ``"\\n"`` included;
- ``verify(completion, answer)`` decides correctness; the default is ``exact_match`` (the last
  ``\\boxed{}`` or else the last non-empty line of the completion equals the answer).
"""

from __future__ import annotations

import random
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from dopd.errors import ConfigError
from dopd.io.data import Example
from dopd.training.evaluation import exact_match

HINT_FORMS = ("decomposition", "answer", "execution", "summary", "none")
SPLITS = ("train", "test")
TEST_SPLIT_MODULUS = 8  # one prompt in 8 belongs to the test split
MAX_REDRAWS = 10_000  # a task whose prompts all hash to one side fails instead of hanging


def split_of(prompt: str) -> str:
    """``"test"`` for about one prompt in ``TEST_SPLIT_MODULUS``, else ``"train"``.

    The split is a stable hash of the prompt text, so a problem never changes sides across seeds,
    runs or consumers: pretraining draws only ``"train"`` prompts, and any evaluation that draws
    ``"test"`` prompts measures problems no pretrained model has seen.
    """
    return "test" if zlib.crc32(prompt.encode("utf-8")) % TEST_SPLIT_MODULUS == 0 else "train"


@dataclass(frozen=True)
class Problem:
    """One generated problem.

    Attributes:
        prompt: the task input ``x``.
        solution: the full target completion: scratchpad, then a last line holding the answer.
        answer: the reference answer ``verify`` compares against.
        hints: hint form -> privileged context (non-blank), one entry per ``Task.hint_forms``.
        hinted_solutions: hint form -> the target completion of a model that reads that hint,
            where it differs from ``solution`` (a hint that fixes one of several valid solution
            paths); forms not listed use ``solution``.
    """

    prompt: str
    solution: str
    answer: str
    hints: dict[str, str]
    hinted_solutions: dict[str, str] = field(default_factory=dict)

    def solution_for(self, hint_form: str | None) -> str:
        """The target completion of the plain view (``None``) or of the view with that hint."""
        if hint_form is None:
            return self.solution
        return self.hinted_solutions.get(hint_form, self.solution)


# One architecture and budget for both models, for tasks whose pair differs in curriculum only
# (``pretraining_recipes``; the shipped shiftmap and cyclesum pairs).
SAME_ARCHITECTURE = {
    role: {
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 256,
        "steps": 1500,
        "learning_rate": 2e-3,
    }
    for role in ("teacher", "student")
}


def parse_pairs(line: str, head: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``("8", [("k", "c"), ...])`` from ``"K8:k>c,..."`` with ``head="K"``: the character after
    the head and the one-character pairs after the colon; None if malformed."""
    line = line.strip()
    if not line.startswith(head) or ":" not in line:
        return None
    value, _, body = line[len(head) :].partition(":")
    pairs = [tuple(item.split(">")) for item in body.split(",")]
    if not all(len(pair) == 2 and all(len(part) == 1 for part in pair) for pair in pairs):
        return None
    return value, pairs


class Task(ABC):
    """A family of problems. Subclasses set ``name`` and ``characters`` and define ``problem``."""

    name: str
    characters: str
    hint_forms: tuple[str, ...] = HINT_FORMS
    default_hint: str = "decomposition"
    # Role -> keyword arguments of ``dopd.lab.pretrain.ModelRecipe`` (architecture and training
    # length) for ``dopd pretrain``; None: the lab's default wider teacher and smaller student.
    pretraining_recipes: dict[str, dict] | None = None

    @abstractmethod
    def problem(self, rng: random.Random) -> Problem:
        """Draw one problem, using only ``rng`` for randomness."""

    def verify(self, completion: str, answer: str) -> bool:
        """Whether ``completion`` solves the problem whose reference answer is ``answer``."""
        return exact_match(completion, answer)

    def pretraining_problem(self, role: str, rng: random.Random) -> Problem:
        """One pretraining problem for ``role`` (``"teacher"`` or ``"student"``): each model's
        pretraining distribution, or curriculum. The default shows both models the same
        ``"train"`` problems (a pair that differs in one skill is better made with
        ``unsupervised_classes``, which keeps the inputs alike). Must draw only ``"train"``
        prompts (``draw(rng, "train")`` or a filter of the same kind)."""
        return self.draw(rng, "train")

    def unsupervised_classes(self, role: str) -> frozenset[str]:
        """Token classes (of ``token_roles``) that ``role``'s pretraining never trains on: their
        labels are masked, so the model reads every prompt and solution of its curriculum but
        never learns to produce those tokens. A curriculum that hides one skill this way leaves
        the inputs' distribution unchanged, where leaving problems out would also teach the model
        that their inputs do not occur. Default: none."""
        return frozenset()

    def problems(self, seed: int, count: int, *, split: str | None = None) -> list[Problem]:
        """``count`` problems, the same for the same ``seed``; with ``split``, only problems whose
        prompt ``split_of`` puts on that side (None: any problem)."""
        if split is not None and split not in SPLITS:
            raise ConfigError(f"split={split!r} is not a split; use one of {SPLITS} or None")
        rng = random.Random(seed)
        return [self.draw(rng, split) for _ in range(count)]

    def draw(self, rng: random.Random, split: str | None = None) -> Problem:
        """One problem from ``rng``, redrawn until its prompt lies in ``split`` (None: any)."""
        for _ in range(MAX_REDRAWS):
            problem = self.problem(rng)
            if split is None or split_of(problem.prompt) == split:
                return problem
        raise ConfigError(
            f"task {self.name!r} drew no {split!r} prompt in {MAX_REDRAWS} tries; "
            "its prompt space is too small to split, make it larger"
        )

    def examples(
        self, seed: int, count: int, hint_form: str | None = None, *, split: str | None = None
    ) -> list[Example]:
        """``problems(seed, count, split=split)`` as training/evaluation examples whose
        privileged context is the ``hint_form`` hint (``default_hint`` when None)."""
        form = self.check_hint_form(hint_form or self.default_hint)
        return [
            Example(
                prompt=problem.prompt, privileged_context=problem.hints[form], answer=problem.answer
            )
            for problem in self.problems(seed, count, split=split)
        ]

    def token_roles(self, tokens: list[str]) -> list[str] | None:
        """The role of each completion token in the solution (e.g. ``plan`` vs ``result``), for
        checking where routing puts its regimes; None (the default) when the task has no roles."""
        return None

    def token_verdicts(self, tokens: list[str], answer: str) -> list[bool] | None:
        """Whether each completion token is right given the reference ``answer`` (one verdict per
        token, aligned with ``token_roles``), for per-class accuracy; None (the default) when the
        task does not judge tokens."""
        return None

    def check_hint_form(self, hint_form: str) -> str:
        """``hint_form`` itself, or a ``ConfigError`` naming the forms this task has."""
        if hint_form not in self.hint_forms:
            raise ConfigError(
                f"hint_form={hint_form!r} is not a hint form of task {self.name!r}; "
                f"use one of {', '.join(map(repr, self.hint_forms))}"
            )
        return hint_form
