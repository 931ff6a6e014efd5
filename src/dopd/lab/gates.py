"""Gates: checks that a pretrained pair can answer the lab's question at all (docs/lab.md).

A lab result means something only if the pair leaves room to learn and the task's token classes
behave as designed. ``dopd pretrain`` measures three gates and records them in ``pretrain.json``;
the suites refuse a pair whose gates fail (``--allow-failed-gates`` overrides, for experiments).

- ``room_to_learn``: the teacher beats the student by at least 0.3 in held-out accuracy without
  hints, and supervised training of the student on the teacher's own samples, at the OPD budget
  of a lab run (steps x prompts x rollouts), closes at least 60% of that gap at the best rate of
  a small grid. Without both, no distillation method can move far and every ranking is noise
  around zero.
- ``separation``: with the hint, the privileged student's per-token loss on the hinted solution
  is within 0.1 nats of the teacher's on both information classes (``learnable_info``,
  ``unavailable_info``) and at least 1 nat worse on ``capability`` tokens: the separation that
  DOPD's privilege gap is meant to detect.
- ``illusion``: on ``unavailable_info`` tokens of the canonical solution (a valid choice a model
  without the hint can make), the privileged teacher's loss exceeds the plain teacher's by at least
  1 nat: a privileged teacher would push the student away from choices it can follow.
"""

from __future__ import annotations

import copy
import random
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from dopd.io.data import Example, privileged_prompt, tokenize_prompt
from dopd.lab.supervised import collate, completion_budget, warmup_cosine
from dopd.lab.task import Problem, Task
from dopd.training.rollout import generate_rollouts, rollout_seeds

CAPABILITY = "capability"
INFORMATION = ("learnable_info", "unavailable_info")
UNAVAILABLE = "unavailable_info"
GATES = ("room_to_learn", "separation", "illusion")
SFT_SEED_OFFSET = 7_919  # the gate's training prompts come from their own seed


@dataclass(frozen=True)
class GateSettings:
    """Budgets and thresholds of the gates. The supervised budget equals a lab run's
    (``LabSettings``: 120 steps x 16 prompts x 4 rollouts = 64 sequences per step)."""

    sft_steps: int = 120
    sft_prompts_per_step: int = 16
    sft_generations: int = 4
    sft_warmup_steps: int = 10
    sft_lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    min_pair_gap: float = 0.3  # teacher - student accuracy
    min_gap_closed: float = 0.6
    max_information_gap: float = 0.1  # nats per token
    min_capability_gap: float = 1.0  # nats per token
    min_illusion_gap: float = 1.0  # nats per token


DEFAULT_GATES = GateSettings()


def verdict(value: float | None, rule: str, threshold: float) -> dict:
    """One gate record: the measured ``value``, the ``rule`` (``">="`` or ``"<="``) it must keep
    against ``threshold``, and ``passed`` (False when the value could not be measured)."""
    if rule not in (">=", "<="):
        raise ValueError(f"rule={rule!r} must be '>=' or '<='")
    passed = value is not None and (value >= threshold if rule == ">=" else value <= threshold)
    return {"value": value, "rule": rule, "threshold": threshold, "passed": passed}


def gate_verdicts(measurements: dict, settings: GateSettings = DEFAULT_GATES) -> dict:
    """The gates from measured numbers (a pure function, so a hand-built case checks it).

    Args:
        measurements: ``pair_gap`` (teacher minus student held-out accuracy), ``gap_closed``
            (best fraction of the gap supervised training closed),
            ``class_nll`` (``{"priv_student"|"teacher"|"plain_teacher": {class: nats}}``, the
            first two on hinted solutions with the hint, ``plain_teacher`` and
            ``teacher_on_canonical`` on canonical solutions without and with the hint).

    Returns:
        ``{"room_to_learn": ..., "separation": ..., "illusion": ..., "passed": bool}``; each gate
        holds one ``verdict`` per condition.
    """
    nll = measurements["class_nll"]

    def gap(first: str, second: str, token_class: str) -> float | None:
        a, b = nll[first].get(token_class), nll[second].get(token_class)
        return None if a is None or b is None else a - b

    gates = {
        "room_to_learn": {
            "pair_gap": verdict(measurements["pair_gap"], ">=", settings.min_pair_gap),
            "gap_closed": verdict(measurements["gap_closed"], ">=", settings.min_gap_closed),
        },
        "separation": {
            **{
                f"{name}_gap": verdict(
                    gap("priv_student", "teacher", name), "<=", settings.max_information_gap
                )
                for name in INFORMATION
            },
            "capability_gap": verdict(
                gap("priv_student", "teacher", CAPABILITY), ">=", settings.min_capability_gap
            ),
        },
        "illusion": {
            "unavailable_info_gap": verdict(
                gap("teacher_on_canonical", "plain_teacher", UNAVAILABLE),
                ">=",
                settings.min_illusion_gap,
            )
        },
    }
    passed = all(check["passed"] for gate in gates.values() for check in gate.values())
    return {**gates, "passed": passed}


def failed_checks(gates: dict) -> list[str]:
    """``"gate.check (value rule threshold)"`` for every failed check of ``gate_verdicts`` (or of
    the record ``measure_gates`` writes, which holds the measurements too)."""
    return [
        f"{name}.{check} ({record['value']} {record['rule']} {record['threshold']})"
        for name in GATES
        for check, record in gates[name].items()
        if not record["passed"]
    ]


# ---------------------------------------------------------------------------------------------
# Measurements


def class_nll(
    model,
    tokenizer,
    task: Task,
    problems: list[Problem],
    *,
    hint_form: str | None,
    target_form: str | None,
    batch_size: int = 128,
) -> dict[str, float]:
    """Mean per-token negative log-likelihood (nats) of each token class, teacher-forced.

    Args:
        hint_form: the privileged context the model reads (None: the plain prompt).
        target_form: whose solution is scored: ``problem.solution_for(target_form)``.

    Returns:
        class name -> mean NLL over every token of that class in ``problems`` (the closing EOS
        is not scored); empty when the task defines no token roles.
    """
    totals: dict[str, list[float]] = defaultdict(list)
    rows = [_scored_row(problem, hint_form, target_form) for problem in problems]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = collate(chunk, tokenizer)
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        labels = batch["labels"][:, 1:]  # [B, L-1]
        logp = logits[:, :-1].float().log_softmax(-1)
        token_nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)  # [B, L-1]
        for row, (_, solution) in enumerate(chunk):
            ids = tokenizer(solution, add_special_tokens=False)["input_ids"]
            roles = task.token_roles(tokenizer.convert_ids_to_tokens(ids))
            if roles is None:
                return {}
            positions = (labels[row] != -100).nonzero().squeeze(-1)[: len(ids)]
            for role, position in zip(roles, positions.tolist()):
                totals[role].append(float(token_nll[row, position]))
    return {role: statistics.fmean(values) for role, values in sorted(totals.items())}


def _scored_row(problem: Problem, hint_form: str | None, target_form: str | None):
    if hint_form is None:
        prompt = problem.prompt
    else:
        prompt = privileged_prompt(Example(problem.prompt, problem.hints[hint_form]))
    return prompt, problem.solution_for(target_form)


def supervised_gap_closed(
    teacher,
    student,
    tokenizer,
    task: Task,
    accuracies: dict[str, float],
    *,
    seed: int,
    settings: GateSettings,
    accuracy_of,
    progress: bool = True,
) -> dict:
    """Train copies of ``student`` on the teacher's samples at each rate of the grid.

    The teacher samples ``sft_generations`` completions (temperature 1, plain prompts) for each of
    ``sft_steps x sft_prompts_per_step`` fresh training prompts; each step trains on one step's
    worth of them, as a lab run would see its rollouts. ``accuracy_of(model)`` is the held-out
    greedy accuracy without hint.

    Returns:
        ``{"gap_closed": best fraction, "by_lr": {lr: fraction}}``; the fraction is
        (accuracy - student) / (teacher - student) with ``accuracies`` the pretrained pair's.
    """
    rows = teacher_samples(teacher, tokenizer, task, seed=seed, settings=settings)
    per_step = settings.sft_prompts_per_step * settings.sft_generations
    gap = accuracies["teacher"] - accuracies["student"]
    by_lr = {}
    for lr in tqdm(settings.sft_lr_grid, desc="gate: supervised", disable=not progress):
        model = copy.deepcopy(student)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: warmup_cosine(step, settings.sft_warmup_steps, settings.sft_steps),
        )
        model.train()
        for step in range(settings.sft_steps):
            batch = collate(rows[step * per_step : (step + 1) * per_step], tokenizer)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        closed = (accuracy_of(model) - accuracies["student"]) / gap if gap > 0 else None
        by_lr[f"{lr:g}"] = None if closed is None else round(closed, 4)
    measured = [value for value in by_lr.values() if value is not None]
    return {"gap_closed": max(measured) if measured else None, "by_lr": by_lr}


def teacher_samples(
    teacher, tokenizer, task: Task, *, seed: int, settings: GateSettings, batch_size: int = 256
) -> list[tuple[str, str]]:
    """``(prompt, completion)`` pairs the teacher samples on fresh ``"train"`` prompts, in the
    order the supervised gate consumes them (prompt-major, ``sft_generations`` per prompt)."""
    count = settings.sft_steps * settings.sft_prompts_per_step
    rng = random.Random(seed + SFT_SEED_OFFSET)
    prompts = [task.draw(rng, "train").prompt for _ in range(count)]
    budget = completion_budget(task.problems(seed, 64), tokenizer)
    rows = []
    for start in range(0, count, batch_size // settings.sft_generations):
        chunk = prompts[start : start + batch_size // settings.sft_generations]
        indices = torch.arange(start, start + len(chunk))
        rollouts = generate_rollouts(
            teacher,
            [tokenize_prompt(prompt, tokenizer) for prompt in chunk],
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_completion_length=budget,
            num_generations=settings.sft_generations,
            row_seeds=rollout_seeds(seed, 0, indices, settings.sft_generations),
        )
        for row, prompt_index in enumerate(rollouts.prompt_index.tolist()):
            ids = rollouts.completion_ids[row][rollouts.completion_mask[row]]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            rows.append((chunk[prompt_index], text))
    return rows


def measure_gates(
    teacher,
    student,
    tokenizer,
    task: Task,
    held_out: list[Problem],
    accuracies: dict[str, float],
    *,
    seed: int,
    accuracy_of,
    settings: GateSettings = DEFAULT_GATES,
    progress: bool = True,
) -> dict:
    """Every measurement behind the gates, and their verdicts, as ``pretrain.json`` records them:
    ``{"settings", "gap_closed_by_lr", "class_nll", ...gate_verdicts}``."""
    hint = task.default_hint
    class_nlls = {
        "priv_student": class_nll(
            student, tokenizer, task, held_out, hint_form=hint, target_form=hint
        ),
        "teacher": class_nll(teacher, tokenizer, task, held_out, hint_form=hint, target_form=hint),
        "plain_teacher": class_nll(
            teacher, tokenizer, task, held_out, hint_form=None, target_form=None
        ),
        "teacher_on_canonical": class_nll(
            teacher, tokenizer, task, held_out, hint_form=hint, target_form=None
        ),
    }
    supervised = supervised_gap_closed(
        teacher,
        student,
        tokenizer,
        task,
        accuracies,
        seed=seed,
        settings=settings,
        accuracy_of=accuracy_of,
        progress=progress,
    )
    measurements = {
        "pair_gap": round(accuracies["teacher"] - accuracies["student"], 4),
        "gap_closed": supervised["gap_closed"],
        "class_nll": class_nlls,
    }
    return {
        "settings": {**asdict(settings), "sft_lr_grid": list(settings.sft_lr_grid)},  # as JSON
        "gap_closed_by_lr": supervised["by_lr"],
        "class_nll": {
            view: {role: round(value, 4) for role, value in nlls.items()}
            for view, nlls in class_nlls.items()
        },
        **gate_verdicts(measurements, settings),
    }
