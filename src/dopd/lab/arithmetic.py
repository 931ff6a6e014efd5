"""The default lab task: two-step arithmetic whose plan is hidden in the operands.

A prompt gives three operands ``a,b,c=``. One of three plans applies; on ``37,25,5=``:

| plan | result | solution | decomposition hint |
|---|---|---|---|
| 0 | ``a + b*c`` | ``25*5=125,37+125=162\\n162`` | ``mul 25 5, then add 37`` |
| 1 | ``(a+b) * c`` | ``37+25=62,62*5=310\\n310`` | ``add 37 25, then mul 5`` |
| 2 | ``a*c - b`` | ``37*5=185,185-25=160\\n160`` | ``mul 37 5, then sub 25`` |

Which plan applies is the digit sum of ``a`` and ``c`` modulo 3 (``37,25,5``: 3+7+5 = 15 ->
plan 0); ``b`` plays no part. The task holds both gaps the DOPD paper separates:

- **information gap**: the plan is a modular function of three digits (240 operand pairs), which
  the teacher learns from ``x`` in its pretraining budget and the smaller student mostly does not;
  any hint that names the plan makes it trivial;
- **capability gap**: the scratchpad multiplies a two-digit number by a digit and adds or
  subtracts multi-digit numbers, which a larger model executes more reliably even with the hint.

Operands: ``a`` in 20..49, ``b`` in 10..39, ``c`` in 2..9, so ``a*c >= 40 > b`` keeps plan 2
non-negative. The other hint forms for ``37,25,5=``: answer ``162``; execution
``25*5=125,37+125=162``; summary ``mul then add``; none ``no hint``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from dopd.lab.task import Problem, Task

NO_HINT = "no hint"


@dataclass(frozen=True)
class Plan:
    """One operation order: two scratchpad steps and the plan's hints.

    A step is three characters, ``left operator right``, over the operands ``a``, ``b``, ``c``
    and ``r``, the result of the first step.
    """

    first: str
    second: str
    decomposition: str  # format string over a, b, c: operands only, no computed number
    summary: str


PLANS = (
    Plan("b*c", "a+r", "mul {b} {c}, then add {a}", "mul then add"),
    Plan("a+b", "r*c", "add {a} {b}, then mul {c}", "add then mul"),
    Plan("a*c", "r-b", "mul {a} {c}, then sub {b}", "mul then sub"),
)
OPERATIONS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def digit_sum(*numbers: int) -> int:
    return sum(int(digit) for number in numbers for digit in str(number))


def plan_index(a: int, c: int) -> int:
    """The rule hidden in ``x``: the digit sum of ``a`` and ``c`` modulo the number of plans.

    ``b`` is left out so that a model can learn the rule as a 240-entry table: the teacher does
    within its pretraining budget, the student mostly does not (all five digits proved beyond both).
    """
    return digit_sum(a, c) % len(PLANS)


def scratchpad(plan: Plan, a: int, b: int, c: int) -> tuple[str, int]:
    """The worked execution (``"25*5=125,37+125=162"``) and the final result."""
    values, lines = {"a": a, "b": b, "c": c}, []
    for left, operator, right in (plan.first, plan.second):
        result = OPERATIONS[operator](values[left], values[right])
        lines.append(f"{values[left]}{operator}{values[right]}={result}")
        values["r"] = result
    return ",".join(lines), result


class PlanArithmetic(Task):
    """Two-step arithmetic; the operation order is the digit sum of ``a`` and ``c`` mod 3."""

    name = "arithmetic"
    # Digits and operators of prompts and scratchpads, then the letters of the hint words.
    characters = "0123456789,=+-*\n abdehilmnostu"

    def problem(self, rng: random.Random) -> Problem:
        a, b, c = rng.randint(20, 49), rng.randint(10, 39), rng.randint(2, 9)
        plan = PLANS[plan_index(a, c)]
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

    def token_roles(self, tokens: list[str]) -> list[str]:
        """Roles of a (possibly malformed) scratchpad's tokens, read left to right:

        - ``plan``: operands and operators left of each ``=`` (what the decomposition hint names,
          the information gap);
        - ``copy``: an operand that repeats the previous step's result (neither gap);
        - ``result``: the computed number right of each ``=`` (the capability gap);
        - ``answer``: the final line; ``format``: ``=``, ``,``, newline and anything else.
        """
        roles: list[str] = []
        part, operand, previous_result, result = "plan", [], "", ""
        for token in tokens:
            if part == "plan" and token and token in "0123456789":
                operand.append(len(roles))
            elif operand:  # an operand just ended: does it copy the last result?
                if previous_result and "".join(tokens[i] for i in operand) == previous_result:
                    roles[operand[0] : operand[-1] + 1] = ["copy"] * len(operand)
                operand = []
            if token == "\n":
                roles.append("format")
                part = "answer"
            elif token in ("=", ",") and part != "answer":
                roles.append("format")
                if token == "," and result:
                    previous_result, result = result, ""
                part = "result" if token == "=" else "plan"
            elif token and token in "0123456789+-*":
                roles.append(part)
                result += token if part == "result" else ""
            else:
                roles.append("format")
        return roles
