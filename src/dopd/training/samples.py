"""Rollout samples: a few of a step's rollouts, token by token, with the group (regime) the loss
routed each token to and the statistics it routed on, appended to
``output_dir/rollout_samples.jsonl`` every ``tracking.samples_every`` steps (and at the first and
last step) by the main process. ``dopd report`` draws them as ``tokens.html``.

One JSON line per sampled step::

    {"step": 10, "objective": "dopd", "groups": ["LH", "LL", "HT", "HS"],
     "rows": [{"prompt": "...", "completion": "...", "tokens": ["4", "2", ...],
               "regimes": ["LH", "HT", ...], "p_student": [...],
               "q_teacher": [...], "q_student": [...], "gap": [...]}, ...]}

Every per-token list has one entry per completion token. ``regimes`` are the objective's group
names (DOPD's regimes; ``all`` for a uniform objective). ``p_student`` is the student's
probability of the token on the plain prompt (every objective). The objective's own per-token
statistics follow under their names, ``advantage_gap`` as ``gap`` (DOPD: ``q_teacher``,
``q_student`` of the privileged student, ``gap`` = A); an objective without statistics records
none and says so in ``note``. The values come from the step's own loss pass
(``run_step(record_tokens=True)``): sampling costs no forward pass. A record holds at most
``tracking.sample_rows`` rollouts of at most ``rollout.max_completion_length`` tokens, from this
rank's first micro-batch, one rollout per prompt before a second of the same prompt.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate import Accelerator

from dopd.config import TrainConfig
from dopd.training.step import TokenRecord

SAMPLES_FILE = "rollout_samples.jsonl"
# The name each statistic takes in a sample row (the token view's hover reads ``gap`` as A).
RENAMED = {"advantage_gap": "gap"}
SIGNIFICANT_DIGITS = 4


class RolloutSamples:
    """Decides which steps are sampled and appends their records (main process only)."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, tokenizer):
        self.enabled = accelerator.is_main_process and config.tracking.samples_every > 0
        self.every, self.rows = config.tracking.samples_every, config.tracking.sample_rows
        self.max_steps = config.optim.max_steps
        self.path = Path(config.output_dir) / SAMPLES_FILE
        self.tokenizer, self.name = tokenizer, config.objective.name
        self.groups = config.objective.build().group_names

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (numbered from 1, as in metrics.jsonl) is sampled."""
        return self.enabled and (step % self.every == 0 or step in (1, self.max_steps))

    def write(
        self, step: int, tokens: TokenRecord, prompts: list[list[int]], prompt_index: list[int]
    ) -> None:
        """Append step ``step``'s record: rows of ``tokens`` with their prompt ids ``prompts`` and
        prompt numbers ``prompt_index`` (row-aligned with the step's rollouts)."""
        record = {
            "step": step,
            "objective": self.name,
            **sample_record(
                step, tokens, prompts, prompt_index, self.tokenizer, self.groups, self.rows
            ),
        }
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def sample_record(
    step: int,
    tokens: TokenRecord,
    prompts: list[list[int]],
    prompt_index: list[int],
    tokenizer,
    groups: tuple[str, ...],
    max_rows: int,
) -> dict:
    """The JSON record of one sampled step (module docstring), at most ``max_rows`` rollouts."""
    mask = tokens.completion_mask  # [b, T]
    # Where each row's valid tokens start in the [N] per-token tensors.
    starts = [0, *mask.sum(dim=1).cumsum(0).tolist()]
    record: dict = {"step": step, "groups": list(groups), "rows": []}
    if not tokens.statistics:
        record["note"] = (
            "this objective routes on no per-token statistics: only groups and p_student"
        )
    for row in pick_rows(prompt_index[: mask.shape[0]], max_rows):
        valid = slice(starts[row], starts[row + 1])
        ids = tokens.completion_ids[row][mask[row]].tolist()
        entry = {
            "prompt": tokenizer.decode(prompts[row]),
            "completion": tokenizer.decode(ids, skip_special_tokens=True),
            "tokens": [tokenizer.decode([token]) for token in ids],
            "regimes": [groups[g] for g in tokens.groups[valid].tolist()],
            "p_student": _numbers(tokens.student_log_probs[valid].exp()),
        }
        for name, values in tokens.statistics.items():
            entry[RENAMED.get(name, name)] = _numbers(values[valid])
        record["rows"].append(entry)
    return record


def pick_rows(prompt_index: list[int], count: int) -> list[int]:
    """Up to ``count`` row numbers: the first rollout of each prompt, then the second, ..."""
    seen: dict[int, int] = {}
    order = []
    for row, prompt in enumerate(prompt_index):
        order.append((seen.get(prompt, 0), row))
        seen[prompt] = seen.get(prompt, 0) + 1
    return sorted(row for _, row in sorted(order)[:count])


def _numbers(values) -> list[float | None]:
    """Floats rounded to a few significant digits; NaN and infinities as null (valid JSON)."""
    return [
        float(f"{value:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(value) else None
        for value in values.tolist()
    ]
