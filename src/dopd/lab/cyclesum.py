"""A second lab task, built unlike ``shiftmap``: running sums around a cycle, either way round.

A prompt lists ``k`` distinct digits. The solution states the largest, then walks the digits
once around the cycle from the first one, forward or backward, writing each digit and the
running sum mod 10::

    prompt    "40712="
    solution  "M7:4>4,0>4,7>1,1>2,2>4"     plain: forward
    hint      "MAX 7 BACK"                 the default hint form, ``decomposition``
    hinted    "M7:4>4,2>6,1>7,7>4,0>4"     a hinted view walks the way the hint says

``verify`` accepts either direction (the sums right). Where ``shiftmap``'s free choice only
permutes pairs whose content stays the same, here the one free choice changes the content of
every later token: the digits, the running sums, and with them which sums carry. Token classes
(``token_roles``):

- ``learnable_info``: the largest digit, which the hint states and which is a function of ``x``.
- ``unavailable_info``: the second digit, which fixes the direction; the hint picks it at random,
  nothing in ``x`` does.
- ``order_forced``: the first digit and every digit after the second, fixed by the cycle.
- ``capability``: a running sum whose addition carries (previous sum + digit >= 10), judged
  from the digits the completion itself wrote.
- ``skill``: a running sum without a carry.
- ``format``: ``S``, ``:``, ``>``, ``,`` and everything after the first token out of place.

As in ``shiftmap``, the pair shares one architecture, budget and problem distribution, and the
student's loss never covers a ``capability`` token (``unsupervised_classes``).

Option: ``items`` (``k``, 3..8, default 5). A solution has ``4k + 2`` tokens.
"""

from __future__ import annotations

import random

from dopd.errors import ConfigError
from dopd.lab.task import SAME_ARCHITECTURE, Problem, Task, parse_pairs
from dopd.training.evaluation import extract_answer

DIGITS = "0123456789"
NO_HINT = "NO HINT"


def walk(digits: str, backward: bool) -> str:
    """The digits in cycle order from the first one: ``"40712"`` or, backward, ``"42170"``."""
    return digits[:1] + digits[:0:-1] if backward else digits


def render(digits: str, backward: bool) -> str:
    """``"M7:4>4,0>4"``: the largest digit, then the walk with running sums."""
    total, pairs = 0, []
    for digit in walk(digits, backward):
        total = (total + int(digit)) % 10
        pairs.append(f"{digit}>{total}")
    return f"M{max(digits)}:" + ",".join(pairs)


def parse(line: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``("7", [("4", "4"), ...])`` from ``M7:4>4,...``; None if malformed."""
    return parse_pairs(line, "M")


class CycleSum(Task):
    """Running sums around a cycle of digits in a direction only the hint fixes; the student's
    curriculum never supervises a carried sum."""

    name = "cyclesum"
    characters = DIGITS + "=>,:\nMAXBCKFWDNOHIT "
    hint_forms = ("decomposition", "max", "direction", "none")
    default_hint = "decomposition"
    pretraining_recipes = SAME_ARCHITECTURE  # the pair differs in curriculum only

    def __init__(self, items: int = 5):
        if not 3 <= items <= 8:
            raise ConfigError(f"cyclesum items={items!r} must lie in 3..8")
        self.items = items

    def unsupervised_classes(self, role: str) -> frozenset[str]:
        """The student never trains on a carried sum; the teacher trains on every token."""
        return frozenset({"capability"}) if role == "student" else frozenset()

    def problem(self, rng: random.Random) -> Problem:
        digits = "".join(rng.sample(DIGITS, self.items))
        backward = rng.random() < 0.5
        plain, hinted = render(digits, False), render(digits, backward)
        direction = "BACK" if backward else "FWD"
        return Problem(
            prompt=f"{digits}=",
            solution=plain,
            answer=plain,
            hints={
                "decomposition": f"MAX {max(digits)} {direction}",
                "max": f"MAX {max(digits)}",
                "direction": direction,
                "none": NO_HINT,
            },
            hinted_solutions={"decomposition": hinted, "direction": hinted},
        )

    def verify(self, completion: str, answer: str) -> bool:
        """Right largest digit and a walk either way round with the right running sums."""
        got, want = parse(extract_answer(completion)), parse(answer)
        if got is None or want is None:
            return False
        digits = "".join(digit for digit, _ in want[1])
        return got in (parse(render(digits, False)), parse(render(digits, True)))

    def token_roles(self, tokens: list[str]) -> list[str]:
        """The class of each completion token (see the module docstring), read from the tokens
        alone. After the first token out of place, the rest are ``format``."""
        return [role for role, _ in self._walk(tokens, None)]

    def token_verdicts(self, tokens: list[str], answer: str) -> list[bool]:
        """Whether each token is right: the largest digit is the true one; the first digit is the
        prompt's first, the second either neighbour of it, each later one the next in the
        direction the second chose; a running sum is the sum mod 10 of the digits written so
        far; a format token is in its place."""
        return [right for _, right in self._walk(tokens, parse(answer))]

    def _walk(self, tokens: list[str], truth) -> list[tuple[str, bool]]:
        """``(role, right)`` per token; ``right`` is judged against ``truth`` (``parse`` of the
        answer; None: not judged, always False)."""
        digits = "" if truth is None else "".join(digit for digit, _ in truth[1])
        ways = [walk(digits, backward) for backward in (False, True)]
        out: list[tuple[str, bool]] = []
        total, walked, expected = 0, "", "M"
        for token in tokens:
            role, right, follows = "format", False, None
            if expected == "M" and token == "M":
                right, follows = True, "max"
            elif expected == "max" and token in DIGITS:
                role, follows = "learnable_info", ":"
                right = truth is not None and token == truth[0]
            elif expected in (":", ">", ",") and token == expected:
                right, follows = True, {":": "digit", ">": "running", ",": "digit"}[token]
            elif expected == "digit" and token in DIGITS:
                role = "unavailable_info" if len(walked) == 1 else "order_forced"
                walked += token
                right = any(way.startswith(walked) for way in ways)
                carry, total = total + int(token) >= 10, (total + int(token)) % 10
                follows = ">"
            elif expected == "running" and token in DIGITS:
                role = "capability" if carry else "skill"
                right, follows = token == str(total), ","
            out.append((role, right and truth is not None))
            expected = follows
        return out
