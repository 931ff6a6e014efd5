"""Supervised training pieces shared by pretraining a lab pair and by its room-to-learn gate:
batches of ``[prompt | solution]`` with a loss mask, the learning-rate schedule, and the greedy
completion budget."""

from __future__ import annotations

import math

import torch

from dopd.io.data import tokenize_prompt
from dopd.lab.task import Problem, Task


def collate(
    rows: list[tuple[str, str]],
    tokenizer,
    *,
    task: Task | None = None,
    unsupervised: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (all ``[B, L]`` long) of
    ``[prompt ids | solution ids, EOS]``; labels are -100 outside the solution and EOS, and at
    solution tokens whose class (``task.token_roles``) is in ``unsupervised``."""
    sequences, label_rows = [], []
    for prompt, solution in rows:
        prompt_ids = tokenize_prompt(prompt, tokenizer)
        solution_ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
        targets = list(solution_ids)
        if unsupervised:
            roles = task.token_roles(tokenizer.convert_ids_to_tokens(solution_ids))
            targets = [-100 if role in unsupervised else i for i, role in zip(targets, roles)]
        solution_ids.append(tokenizer.eos_token_id)
        sequences.append(prompt_ids + solution_ids)
        label_rows.append([-100] * len(prompt_ids) + targets + [tokenizer.eos_token_id])
    length = max(len(sequence) for sequence in sequences)
    # Right padding keeps positions 0..n-1 per row, as generate() assigns them to left-padded
    # prompts from the attention mask.
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)  # [B, L]
    labels = torch.full((len(rows), length), -100)  # [B, L]
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, L]
    for row, (sequence, label_row) in enumerate(zip(sequences, label_rows)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, : len(sequence)] = torch.tensor(label_row)
        attention_mask[row, : len(sequence)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warmup to 1, then cosine decay to 0.1 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def completion_budget(problems: list[Problem], tokenizer) -> int:
    """Tokens a greedy completion may use: the longest solution, its EOS, and a little slack."""
    longest = max(
        len(tokenizer(p.solution, add_special_tokens=False)["input_ids"]) for p in problems
    )
    return longest + 4
