"""Held-out accuracy without privileged context, through a pluggable answer verifier.

Built in: ``exact`` (the extracted answer equals the reference after whitespace stripping),
``numeric`` (the last number of the extracted answer equals the reference number) and ``math``
(symbolic equivalence through the optional ``math-verify`` package: ``\\frac{1}{2}`` equals
``0.5``, ``2x+1`` equals ``1+2x``). The extracted answer is the content of the last
``\\boxed{...}`` or ``\\fbox{...}`` (braces nested to any depth) if there is one, else the last
non-empty line. Another verifier is named as ``path/to/file.py:function`` taking
``(completion, answer) -> bool``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dopd.errors import ConfigError, DOPDError
from dopd.modeling.vlm_views import RowImages
from dopd.training.rollout import generate_rollouts

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
# A box command not followed by a letter (\boxed, not \boxedfoo), then optional spaces.
_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])[ \t]*")


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` or ``\\fbox{...}`` of ``text``, braces
    balanced (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; an escaped ``\\{`` or ``\\}`` is a
    literal brace); ``\\boxed 5`` gives ``5``. A box inside a box is part of its content, and a
    content that is one whole box is unwrapped (``\\boxed{\\boxed{7}}`` gives ``7``). ``None`` if
    there is no box, or only an unclosed one."""
    found, position = None, 0
    while (match := _BOX.search(text, position)) is not None:
        start, position = match.end(), match.end()
        if start < len(text) and text[start] == "{":
            end = _closing_brace(text, start)
            if end is not None:
                found, position = text[start + 1 : end], end + 1
        elif match.group().endswith((" ", "\t")):  # \boxed 5: the next word, up to a $ or space
            word = re.match(r"[^\s$]+", text[start:])
            if word:
                found = word.group()
    whole = found.strip() if found is not None else ""
    inner = _BOX.match(whole)
    if inner and whole[inner.end() : inner.end() + 1] == "{":
        if _closing_brace(whole, inner.end()) == len(whole) - 1:
            return last_boxed(whole)
    return found


def _closing_brace(text: str, start: int) -> int | None:
    """The index of the brace closing the one at ``start``, skipping backslash escapes."""
    depth, index = 0, start
    while index < len(text):
        character = text[index]
        if character == "\\":
            index += 2
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return index
        index += 1
    return None


def extract_answer(completion: str) -> str:
    """The final answer of a completion: the last boxed content, else the last line."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(completion: str, answer: str) -> bool:
    return extract_answer(completion) == answer.strip()


def numeric_match(completion: str, answer: str) -> bool:
    found, expected = _NUMBER.findall(extract_answer(completion)), _NUMBER.findall(answer)
    if not found or not expected:
        return False
    got, want = float(found[-1]), float(expected[-1])
    return math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)


def math_match(completion: str, answer: str) -> bool:
    """Whether the completion's answer is mathematically equal to ``answer`` (``math-verify``).

    The completion's last boxed content is compared if it has one (the last box wins, as for the
    other verifiers), else math-verify's own extraction over the whole text; the reference is
    read as LaTeX unless it holds ``$`` or a box itself.
    """
    parse, verify = _math_verify()
    # math-verify's timeouts use signal.alarm, which only the main thread may set.
    seconds = 5 if threading.current_thread() is threading.main_thread() else None
    boxed = last_boxed(completion)
    predicted = completion if boxed is None else f"\\boxed{{{boxed}}}"
    gold = answer if ("$" in answer or last_boxed(answer) is not None) else f"${answer}$"
    gold_parsed = parse(gold, parsing_timeout=seconds)
    predicted_parsed = parse(predicted, parsing_timeout=seconds)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=seconds))


def _math_verify() -> tuple[Callable, Callable]:
    """math-verify's ``parse`` and ``verify``, or a one-line error saying how to install it."""
    try:
        from math_verify import parse, verify
    except ImportError:
        raise DOPDError(
            "eval.verifier=math needs the math-verify package, which is not installed; "
            "fix: pip install 'dopd[math]'"
        ) from None
    return parse, verify


VERIFIERS: dict[str, Callable[[str, str], bool]] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "math": math_match,
}


def load_verifier(name: str) -> Callable[[str, str], bool]:
    """A built-in verifier by name, or ``file.py:function`` loaded from outside the package."""
    if name == "math":
        _math_verify()  # a missing package fails now, not at the first evaluation
    if name in VERIFIERS:
        return VERIFIERS[name]
    path, _, attribute = name.partition(":")
    if not path.endswith(".py") or not attribute:
        raise ConfigError(
            f"eval.verifier={name!r} is neither {sorted(VERIFIERS)} nor 'path/to/file.py:function'"
        )
    if not os.path.isfile(path):
        raise ConfigError(f"eval.verifier={name!r}: no file {path!r}; check the path")
    spec = importlib.util.spec_from_file_location("dopd_user_verifier", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"eval.verifier={name!r}: cannot load {path!r}; check the path")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, attribute):
        raise ConfigError(f"eval.verifier={name!r}: {path!r} has no function {attribute!r}")
    return getattr(module, attribute)


@dataclass
class EvalResult:
    """Accuracy on held-out prompts: ``correct`` of ``total``, and the decoded samples."""

    correct: int
    total: int
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def first(self, count: int) -> EvalResult:
        """The result of the first ``count`` prompts alone."""
        samples = self.samples[:count]
        return EvalResult(sum(s["correct"] for s in samples), len(samples), samples)


@torch.no_grad()
def evaluate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    answers: list[str],
    *,
    verifier,
    max_new_tokens: int,
    batch_size: int = 16,
    synced: bool = False,
    images: RowImages | None = None,
) -> EvalResult:
    """Greedy completions of ``prompt_ids`` scored against ``answers`` by ``verifier``;
    ``synced`` as in ``generate_rollouts`` (then every rank must pass as many prompts).

    ``images``: a vision-language model's image rows, one per prompt (``vlm_data.row_images``);
    each batch of prompts generates with its own rows' images, so a row's completion is the one
    it gets alone."""
    if images is not None and len(images) != len(prompt_ids):
        raise DOPDError(
            f"evaluate got {len(images)} image rows for {len(prompt_ids)} prompts; "
            "fix: pass one image row per prompt"
        )
    was_training = model.training
    model.eval()
    result = EvalResult(0, 0)
    for start in range(0, len(prompt_ids), batch_size):
        rollouts = generate_rollouts(
            model,
            prompt_ids[start : start + batch_size],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_completion_length=max_new_tokens,
            synced=synced,
            images=None if images is None else images.select(slice(start, start + batch_size)),
        )
        for row, answer in zip(rollouts.completion_ids, answers[start : start + batch_size]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct = bool(verifier(text, answer))
            result.correct += correct
            result.total += 1
            result.samples.append({"completion": text, "answer": answer, "correct": correct})
    model.train(was_training)
    return result
