"""Token-level records of sampled rollouts for the HTML view: each completion token with its DOPD
regime, ``q_T``, ``q_S`` and gap ``A``, from a trained student and the pretrained teacher."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dopd.io.data import Example, tokenize_views
from dopd.lab.task import Task
from dopd.modeling.alignment import build_view_inputs, completion_logits
from dopd.objectives.dopd import DOPDConfig, dopd_loss
from dopd.objectives.routing import REGIMES
from dopd.training.rollout import generate_rollouts, rollout_seeds


@torch.no_grad()
def rollout_records(
    student_dir: str,
    teacher_dir: str,
    task: Task,
    examples: list[Example],
    *,
    max_completion_length: int,
    seed: int = 0,
) -> list[dict]:
    """One sampled completion per example, routed by DOPD with thresholds from these tokens.

    Returns:
        dicts with ``prompt``, ``answer``, ``completion``, ``correct`` and per-token ``tokens``,
        ``regimes``, ``q_teacher``, ``q_student``, ``gap`` (the format of ``dopd.viz.tokens``).
    """
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    plain, privileged = tokenize_views(examples, tokenizer)
    rollouts = generate_rollouts(
        student,
        plain,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=max_completion_length,
        row_seeds=rollout_seeds(seed, 0, torch.arange(len(plain)), 1),
    )
    ids, mask, pad = rollouts.completion_ids, rollouts.completion_mask, tokenizer.pad_token_id
    student_logits = completion_logits(student, build_view_inputs(plain, ids, mask, pad))
    priv_student_logits = completion_logits(student, build_view_inputs(privileged, ids, mask, pad))
    teacher_logits = completion_logits(teacher, build_view_inputs(privileged, ids, mask, pad))
    out = dopd_loss(student_logits, priv_student_logits, teacher_logits, ids, mask, DOPDConfig())
    return [
        _record(tokenizer, task, example, ids[row], mask[row], out, row)
        for row, example in enumerate(examples)
    ]


def _record(tokenizer, task: Task, example: Example, ids, mask, out, row: int) -> dict:
    valid = ids[mask].tolist()
    completion = tokenizer.decode(valid, skip_special_tokens=True)
    return {
        "prompt": example.prompt,
        "answer": example.answer,
        "completion": completion,
        "correct": bool(task.verify(completion, example.answer or "")),
        "tokens": [tokenizer.decode([token]) for token in valid],
        "regimes": [REGIMES[r] for r in out.regimes[row][mask].tolist()],
        "q_teacher": out.statistics["q_teacher"][row][mask].tolist(),
        "q_student": out.statistics["q_student"][row][mask].tolist(),
        "gap": out.advantage_gap[row][mask].tolist(),
    }
