"""A lab task with three designed token classes: letter shifts in a free order.

A prompt lists ``k`` distinct letters of a 16-letter alphabet (``a``..``p``, in alphabetical
order) and two digits; the key is their sum mod 10. The solution states the key, then maps every
letter to its image under a cyclic shift by the key (mod 16)::

    prompt    "bdkm 35="                 key = 8
    solution  "K8:b>j,d>l,k>c,m>e"       plain: pairs in the prompt's (alphabetical) order
    hint      "KEY 8 ORDER kbmd"         the default hint form, ``decomposition``
    hinted    "K8:k>c,b>j,m>e,d>l"       a hinted view's target follows the hint's order

``verify`` accepts the pairs in any order (each letter once, right images, right key), so the
order is an arbitrary but valid choice among equivalent solutions. Token classes
(``token_roles``):

- ``learnable_info``: the key digit. The hint states it, but it is a simple function of ``x``.
- ``unavailable_info``: the first letter of each freely ordered pair. The hint fixes a random
  order that nothing in ``x`` determines.
- ``order_forced``: a pair's first letter once the order is fixed (by elimination, or canonical
  after the free block).
- ``capability``: an image whose shift wraps past ``p``; the student's curriculum never shows a
  wrapping image (see below).
- ``skill``: an image whose shift does not wrap; both models learned it.
- ``format``: ``K``, ``:``, ``>``, ``,`` and anything after the first token out of place.

The pair shares one architecture and budget and differs only in what pretraining showed it
(``unsupervised_classes``): both see the same problems, but the student's loss never covers a
wrapping image, so it lacks one narrow skill it can learn from ``x`` while its inputs, keys and
letters are distributed exactly as the teacher's. (A curriculum that left out the wrapping
problems would also teach the student that large keys do not occur with late letters, and with the
hint it would then doubt the key it reads: the key digit would stop being pure information.)

Options: ``items`` (``k``, default 4) and ``free_order_share`` (default 1.0), the fraction of the
items the hint orders at random (listed first; the rest follow in canonical order). At the
defaults a solution has ``4k + 3 = 19`` tokens of which 3 are ``unavailable_info``.
"""

from __future__ import annotations

import random

from dopd.errors import ConfigError
from dopd.lab.task import SAME_ARCHITECTURE, Problem, Task, parse_pairs
from dopd.training.evaluation import extract_answer

ALPHABET = "abcdefghijklmnop"  # 16 letters; shifts are mod 16
KEYS = 10  # key = (d1 + d2) % 10
NO_HINT = "NO HINT"


def shift(letter: str, key: int) -> str:
    return ALPHABET[(ALPHABET.index(letter) + key) % len(ALPHABET)]


def wraps(letter: str, key: int) -> bool:
    return ALPHABET.index(letter) + key >= len(ALPHABET)


def render(key: int, order: str) -> str:
    """``"K8:k>c,b>j"``: the key, then each letter of ``order`` with its image."""
    return f"K{key}:" + ",".join(f"{letter}>{shift(letter, key)}" for letter in order)


def parse(line: str) -> tuple[str, list[tuple[str, str]]] | None:
    """``("8", [("k", "c"), ...])`` from ``K8:k>c,...``; None if malformed."""
    return parse_pairs(line, "K")


class ShiftMap(Task):
    """Letter shifts by a key hidden in a digit sum; the pairs' order is free and the hint fixes
    it; the student's curriculum never supervises a wrapping image."""

    name = "shiftmap"
    characters = ALPHABET + "0123456789 =>,:\nKEYORDNHIT"
    hint_forms = ("decomposition", "key", "order", "none")
    default_hint = "decomposition"
    pretraining_recipes = SAME_ARCHITECTURE  # the pair differs in curriculum only

    def __init__(self, items: int = 4, free_order_share: float = 1.0):
        if not 1 <= items <= 6:
            raise ConfigError(f"shiftmap items={items!r} must lie in 1..6")
        if not 0.0 <= free_order_share <= 1.0:
            raise ConfigError(f"shiftmap free_order_share={free_order_share!r} must lie in [0, 1]")
        self.items = items
        self.free_items = round(free_order_share * items)

    def unsupervised_classes(self, role: str) -> frozenset[str]:
        """The student never trains on a wrapping image; the teacher trains on every token."""
        return frozenset({"capability"}) if role == "student" else frozenset()

    def problem(self, rng: random.Random) -> Problem:
        first, second = rng.randrange(10), rng.randrange(10)
        key = (first + second) % KEYS
        letters = "".join(sorted(rng.sample(ALPHABET, self.items)))
        free = rng.sample(letters, self.free_items)
        order = "".join(free) + "".join(letter for letter in letters if letter not in free)
        plain, hinted = render(key, letters), render(key, order)
        return Problem(
            prompt=f"{letters} {first}{second}=",
            solution=plain,
            answer=plain,
            hints={
                "decomposition": f"KEY {key} ORDER {order}",
                "key": f"KEY {key}",
                "order": f"ORDER {order}",
                "none": NO_HINT,
            },
            hinted_solutions={"decomposition": hinted, "order": hinted},
        )

    def verify(self, completion: str, answer: str) -> bool:
        """Right key and the reference pairs in any order, each letter exactly once."""
        got, want = parse(extract_answer(completion)), parse(answer)
        if got is None or want is None:
            return False
        return got[0] == want[0] and sorted(got[1]) == sorted(want[1])

    def token_roles(self, tokens: list[str]) -> list[str]:
        """The role of each completion token (see the module docstring), read left to right from
        the tokens alone; wrapping is judged with the key the completion itself wrote. After the
        first token out of place, the rest are ``format``."""
        return [role for role, _ in self._walk(tokens, None)]

    def token_verdicts(self, tokens: list[str], answer: str) -> list[bool]:
        """Whether each completion token is right: the key digit is the true key; a pair's first
        letter is a prompt letter not yet used; an image is the letter's shift by the true key;
        a format token is in its place (everything after a token out of place is wrong)."""
        return [right for _, right in self._walk(tokens, parse(answer))]

    def _walk(self, tokens: list[str], truth) -> list[tuple[str, bool]]:
        """``(role, right)`` per token; ``right`` is judged against ``truth`` (``parse`` of the
        answer; None: not judged, always False)."""
        true_key = None if truth is None else int(truth[0])
        letters = set() if truth is None else {source for source, _ in truth[1]}
        out: list[tuple[str, bool]] = []
        key, source, used, expected = None, "", [], "K"
        for token in tokens:
            role, right, follows = "format", False, None
            if expected == "K" and token == "K":
                right, follows = True, "key"
            elif expected == "key" and token.isdigit():
                role, key, follows = "learnable_info", int(token), ":"
                right = key == true_key
            elif expected in (":", ">", ",") and token == expected:
                right, follows = True, {":": "source", ">": "image", ",": "source"}[token]
            elif expected == "source" and token in ALPHABET:
                role, source, follows = self._source_role(len(used)), token, ">"
                right = token in letters and token not in used
                used.append(token)
            elif expected == "image" and token in ALPHABET:
                role = "capability" if wraps(source, key) else "skill"
                right = true_key is not None and token == shift(source, true_key)
                follows = ","
            out.append((role, right and truth is not None))
            expected = follows
        return out

    def _source_role(self, pair: int) -> str:
        """A pair's first letter is free while the hint's random block lasts, except the last
        letter of a fully free order, which elimination fixes."""
        free = pair < self.free_items and not (self.free_items == self.items == pair + 1)
        return "unavailable_info" if free else "order_forced"
