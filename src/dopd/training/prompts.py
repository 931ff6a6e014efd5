"""The run's prompts as token ids: both views of every example, too-long ones skipped or refused."""

from __future__ import annotations

from collections.abc import Callable

from dopd.config import TrainConfig
from dopd.errors import DOPDError
from dopd.io.data import Example, tokenize_views


def tokenized_prompts(
    examples: list[Example],
    tokenizer,
    config: TrainConfig,
    split: str,
    warn: Callable[[str], None],
) -> dict[str, list]:
    """``{"plain": ids, "privileged": ids, "answer": answers}`` of the examples of ``split``
    (``train`` or ``eval``) whose prompts both fit ``data.max_prompt_length``; the others are
    skipped with a warning, or refused when ``data.overlong_prompts`` is ``error``. Evaluation
    rows may lack privileged context (evaluation decodes the plain prompt only)."""
    data = config.data
    plain, privileged = tokenize_views(
        examples,
        tokenizer,
        data.privileged_template,
        config.tokenizer.chat_template_kwargs,
        require_privileged=split == "train",
    )
    keep = [
        i
        for i in range(len(examples))
        if max(len(plain[i]), len(privileged[i])) <= data.max_prompt_length
    ]
    skipped = len(examples) - len(keep)
    where = f"data.{split}={getattr(data, split)!r}"
    if skipped and data.overlong_prompts == "error":
        raise DOPDError(
            f"{where}: {skipped} of {len(examples)} prompts exceed "
            f"data.max_prompt_length={data.max_prompt_length}; "
            "fix: raise it, or set data.overlong_prompts=skip"
        )
    if skipped:
        warn(
            f"{where}: skipped {skipped} of {len(examples)} prompts longer than "
            f"data.max_prompt_length={data.max_prompt_length}"
        )
    return {
        "plain": [plain[i] for i in keep],
        "privileged": [privileged[i] for i in keep],
        "answer": [examples[i].answer for i in keep],
    }
