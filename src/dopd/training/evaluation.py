"""Held-out accuracy without privileged context, through a pluggable answer verifier.

Built in: ``exact`` (the extracted answer equals the reference after whitespace stripping) and
``numeric`` (the last number of the extracted answer equals the reference number). The extracted
answer is the content of the last ``\\boxed{...}`` if there is one, else the last non-empty line.
Another verifier is named as ``path/to/file.py:function`` taking ``(completion, answer) -> bool``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dopd.errors import ConfigError
from dopd.training.rollout import generate_rollouts

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def extract_answer(completion: str) -> str:
    """The final answer of a completion: the last ``\\boxed{}`` content, else the last line."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
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


VERIFIERS: dict[str, Callable[[str, str], bool]] = {"exact": exact_match, "numeric": numeric_match}


def load_verifier(name: str) -> Callable[[str, str], bool]:
    """A built-in verifier by name, or ``file.py:function`` loaded from outside the package."""
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
) -> EvalResult:
    """Greedy completions of ``prompt_ids`` scored against ``answers`` by ``verifier``;
    ``synced`` as in ``generate_rollouts`` (then every rank must pass as many prompts)."""
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
        )
        for row, answer in zip(rollouts.completion_ids, answers[start : start + batch_size]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            correct = bool(verifier(text, answer))
            result.correct += correct
            result.total += 1
            result.samples.append({"completion": text, "answer": answer, "correct": correct})
    model.train(was_training)
    return result
