"""The default lab task: two-step arithmetic whose plan is hidden in the operands.

A prompt gives three operands, ``"37,25,4="``. One of three plans applies:

| plan | result | solution for 37,25,4 | decomposition hint |
|---|---|---|---|
| 0 | ``a + b*c`` | ``25*4=100,37+100=137\\n137`` | ``mul 25 4, then add 37`` |
| 1 | ``(a+b) * c`` | ``37+25=62,62*4=248\\n248`` | ``add 37 25, then mul 4`` |
| 2 | ``a*c - b`` | ``37*4=148,148-25=123\\n123`` | ``mul 37 4, then sub 25`` |

Which plan applies is the digit sum of the operands modulo 3 (37,25,4: 3+7+2+5+4 = 21 -> plan 0).
The task holds both gaps the DOPD paper separates:

- **information gap**: the plan is a modular function of all five digits, which a tiny model
  struggles to infer from ``x``; any hint that names the plan makes it trivial;
- **capability gap**: the scratchpad multiplies a two-digit number by a digit and adds or
  subtracts multi-digit numbers, which a larger model executes more reliably even with the hint.

Operands: ``a`` in 20..49, ``b`` in 10..39, ``c`` in 2..9, so ``a*c >= 40 > b`` keeps plan 2
non-negative. The other hint forms for 37,25,4: answer ``137``; execution
``25*4=100,37+100=137``; summary ``mul then add``; none ``no hint``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from dopd.lab.task import Problem, Task

NO_HINT = "no hint"


@dataclass(frozen=True)
class Plan:
    """One operation order: its two scratchpad steps and its hints, given operands a, b, c.

    ``steps(a, b, c)`` returns ``(first, second)``, each ``(left, operator, right)`` where the
    second step's ``None`` stands for the first step's result.
    """

    steps: Callable[[int, int, int], tuple[tuple, tuple]]
    decomposition: str  # format string over a, b, c: no computed number, no answer
    summary: str


PLANS = (
    Plan(lambda a, b, c: ((b, "*", c), (a, "+", None)), "mul {b} {c}, then add {a}", "mul then add"),
    Plan(lambda a, b, c: ((a, "+", b), (None, "*", c)), "add {a} {b}, then mul {c}", "add then mul"),
    Plan(lambda a, b, c: ((a, "*", c), (None, "-", b)), "mul {a} {c}, then sub {b}", "mul then sub"),
)
OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def digit_sum(*numbers: int) -> int:
    return sum(int(digit) for number in numbers for digit in str(number))


def plan_index(a: int, b: int, c: int) -> int:
    """The rule hidden in ``x``: the digit sum of the operands modulo the number of plans."""
    return digit_sum(a, b, c) % len(PLANS)


def scratchpad(plan: Plan, a: int, b: int, c: int) -> tuple[str, int]:
    """The worked execution (``"25*4=100,37+100=137"``) and the final result."""
    lines, result = [], None
    for left, operator, right in plan.steps(a, b, c):
        left = result if left is None else left
        right = result if right is None else right
        result = OPERATIONS[operator](left, right)
        lines.append(f"{left}{operator}{right}={result}")
    return ",".join(lines), result


class PlanArithmetic(Task):
    """Two-step arithmetic; the operation order is the digit sum of the operands mod 3."""

    name = "arithmetic"
    # Digits and operators of prompts and scratchpads, then the letters of the hint words.
    characters = "0123456789,=+-*\n abdehilmnostu"

    def problem(self, rng: random.Random) -> Problem:
        a, b, c = rng.randint(20, 49), rng.randint(10, 39), rng.randint(2, 9)
        plan = PLANS[plan_index(a, b, c)]
        execution, result = scratchpad(plan, a, b, c)
        answer = str(result)
        hints = {
            "decomposition": plan.decomposition.format(a=a, b=b, c=c),
            "answer": answer,
            "execution": execution,
            "summary": plan.summary,
            "none": NO_HINT,
        }
        return Problem(
            prompt=f"{a},{b},{c}=", solution=f"{execution}\n{answer}", answer=answer, hints=hints
        )
