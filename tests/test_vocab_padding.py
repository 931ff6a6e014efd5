"""The vocabulary padding rule end to end: a student and a teacher whose output heads have
different padded sizes train over their common vocabulary ``V_common = min(sizes)``.

A step of the trainer (both loss paths) equals ``objective_loss`` on logits sliced by hand to
``V_common``; rollouts never hold an id past it, even when the student's padded rows dominate its
logits. Heads smaller than the tokenizer are refused in tests/test_bad_input.py; equal heads are
the default of every other test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dopd.config import load_config
from dopd.errors import DOPDError
from dopd.modeling.alignment import completion_hidden_states, completion_logits, vocabulary_slice
from dopd.modeling.tiny import build_char_tokenizer
from dopd.objectives.base import objective_loss
from dopd.training.rollout import generate_rollouts, rollout_seeds
from dopd.training.step import make_micro_batches, run_step
from dopd.training.trainer import Trainer
from tests.tolerance import REORDERED, assert_close

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny.jsonl"
TOKENS = len(build_char_tokenizer(load_config(TINY).tokenizer.characters))  # len(tokenizer)
TINY_SHAPE = "hidden_size: {}, num_hidden_layers: 1, intermediate_size: {}"


def padded_trainer(
    output_dir: Path, student_rows: int, teacher_rows: int, *overrides: str
) -> Trainer:
    """A tiny-config trainer whose student and teacher heads have ``TOKENS + rows`` rows."""
    config = load_config(
        TINY,
        [
            f"output_dir={output_dir}",
            f"data.train={DATA}",
            "data.eval=null",
            "loop.eval_every=0",
            "rollout.prompts_per_step=2",
            "rollout.num_generations=4",
            "rollout.max_completion_length=8",
            "objective.top_k=8",
            "optim.micro_batch_size=4",
            f"student.tiny={{{TINY_SHAPE.format(32, 64)}, vocab_size: {TOKENS + student_rows}}}",
            f"teacher.tiny={{{TINY_SHAPE.format(48, 96)}, vocab_size: {TOKENS + teacher_rows}}}",
            *overrides,
        ],
    )
    return Trainer(config)


def trainer_rollouts(trainer: Trainer, vocab_size: int | None):
    """Step 0's sampled rollouts of ``trainer`` and the per-view prompts of their rows."""
    rollout, local = trainer.config.rollout, trainer.sampler.indices(0)
    rollouts = generate_rollouts(
        trainer.accelerator.unwrap_model(trainer.student),
        [trainer.prompts["plain"][i] for i in local],
        eos_token_id=trainer.tokenizer.eos_token_id,
        pad_token_id=trainer.tokenizer.pad_token_id,
        max_completion_length=rollout.max_completion_length,
        num_generations=rollout.num_generations,
        row_seeds=rollout_seeds(trainer.config.seed, 0, local, rollout.num_generations),
        vocab_size=vocab_size,
    )
    rows = local[rollouts.prompt_index].tolist()
    kinds = {
        name: kind
        for name, kind in trainer.prompt_kinds.items()
        if name == "student" or name in trainer.models
    }
    return rollouts, {
        name: [trainer.prompts[kind][i] for i in rows] for name, kind in kinds.items()
    }


def make_padded_rows_dominate(model: torch.nn.Module, vocab_size: int, scale: float = 1e3) -> None:
    """Point the head rows past ``vocab_size`` along +-the first hidden axes, so that the largest
    logit of (almost) every position is a padded id: one of ``+-e_i`` scores ``scale * |h_i|``."""
    with torch.no_grad():
        weight = model.get_output_embeddings().weight  # [V_model, H]
        for offset, row in enumerate(range(vocab_size, weight.shape[0])):
            weight[row] = 0.0
            weight[row, offset // 2] = scale * (1.0 if offset % 2 == 0 else -1.0)


@pytest.mark.parametrize("path", ["chunked", "reference"])
@pytest.mark.parametrize("student_rows, teacher_rows", [(3, 7), (7, 3)])
def test_step_equals_the_objective_on_logits_sliced_to_the_common_vocabulary(
    tmp_path, path, student_rows, teacher_rows
):
    trainer = padded_trainer(tmp_path, student_rows, teacher_rows, f"loop.loss_path={path}")
    common = TOKENS + min(student_rows, teacher_rows)
    assert trainer.vocab_size == common
    rollouts, prompts = trainer_rollouts(trainer, common)
    pad, student = trainer.tokenizer.pad_token_id, trainer.student
    loop = trainer.config.loop

    # The trainer's step, as train_step calls it: 8 rows in 2 micro-batches.
    batches = make_micro_batches(rollouts.completion_ids, rollouts.completion_mask, prompts, 4, pad)
    student.zero_grad(set_to_none=True)
    out = run_step(
        trainer.accelerator,
        trainer.objective,
        student,
        trainer.models,
        batches,
        path=loop.loss_path,
        chunk_rows=loop.loss_chunk_rows,
        vocab_size=trainer.vocab_size,
    )
    assert out.path == path
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}

    # By hand: every view's whole logits, sliced here, one batch, the objective's own reduction.
    (whole,) = make_micro_batches(
        rollouts.completion_ids, rollouts.completion_mask, prompts, 8, pad
    )
    with torch.no_grad():
        constant = {
            name: completion_logits(model, whole.inputs[name])[..., :common]
            for name, model in trainer.models.items()
        }
    student.zero_grad(set_to_none=True)
    student_logits = completion_logits(student, whole.inputs["student"])  # [B, T, V_student]
    assert student_logits.shape[-1] == TOKENS + student_rows
    expected = objective_loss(
        trainer.objective,
        student_logits[..., :common],
        constant.get("priv_student"),
        constant["teacher"],
        whole.completion_ids,
        whole.completion_mask,
    )
    expected.loss.backward()

    # float32 models scored by a differently shaped computation agree to rounding.
    assert_close(out.loss, expected.loss, ulps=REORDERED)
    for name, p in student.named_parameters():
        assert_close(grads[name], p.grad, ulps=REORDERED, msg=name)
    # The padded rows of the (tied) student head are never scored, so never pushed.
    head = student.get_output_embeddings().weight
    head_grad = next(grads[name] for name, p in student.named_parameters() if p is head)
    assert not head_grad[common:].any()


def test_rollouts_never_hold_an_id_past_the_common_vocabulary(tmp_path):
    trainer = padded_trainer(tmp_path, 7, 3)
    common = trainer.vocab_size
    make_padded_rows_dominate(trainer.accelerator.unwrap_model(trainer.student), common)
    unmasked, _ = trainer_rollouts(trainer, None)
    # The padded rows do dominate: without the mask every sampled token is a padded id.
    assert (unmasked.completion_ids[unmasked.completion_mask] >= common).all()
    masked, _ = trainer_rollouts(trainer, common)
    assert masked.completion_ids.max() < common and masked.completion_mask.any()
    greedy = generate_rollouts(
        trainer.accelerator.unwrap_model(trainer.student),
        trainer.prompts["plain"][:3],
        eos_token_id=trainer.tokenizer.eos_token_id,
        pad_token_id=trainer.tokenizer.pad_token_id,
        max_completion_length=8,
        vocab_size=common,
    )
    assert greedy.completion_ids.max() < common


@pytest.mark.parametrize("path", ["chunked", "reference"])
def test_train_step_with_dominant_padded_rows(tmp_path, path):
    # Without the trainer's mask its rollouts would hold ids the teacher's head lacks.
    trainer = padded_trainer(tmp_path, 7, 3, f"loop.loss_path={path}")
    make_padded_rows_dominate(trainer.accelerator.unwrap_model(trainer.student), trainer.vocab_size)
    metrics = trainer.train_step()
    assert metrics["skipped_step"] == 0.0 and metrics["completion_tokens"] > 0
    assert torch.isfinite(torch.tensor(metrics["loss"]))


def test_equal_heads_score_their_own_size_without_slicing(tmp_path):
    trainer = padded_trainer(tmp_path, 5, 5)
    model = trainer.models["teacher"]
    assert (
        trainer.vocab_size == TOKENS + 5
        and vocabulary_slice(TOKENS + 5, trainer.vocab_size) is None
    )
    rollouts, prompts = trainer_rollouts(trainer, trainer.vocab_size)
    (batch,) = make_micro_batches(
        rollouts.completion_ids,
        rollouts.completion_mask,
        prompts,
        8,
        trainer.tokenizer.pad_token_id,
    )
    inputs = batch.inputs["teacher"]
    # The head's own parameter, not a slice of it: no autograd node, nothing changes.
    assert (
        completion_hidden_states(model, inputs, trainer.vocab_size).weight
        is model.get_output_embeddings().weight
    )
    cut = completion_hidden_states(model, inputs, TOKENS)
    assert (
        cut.weight.shape[0] == TOKENS
        and cut.weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    )
    with torch.no_grad():
        torch.testing.assert_close(
            completion_logits(model, inputs, TOKENS),
            completion_logits(model, inputs)[..., :TOKENS],
            rtol=0,
            atol=0,
        )
    with pytest.raises(DOPDError, match="vocab_size=99 cannot cut an output head of 56 rows"):
        vocabulary_slice(TOKENS + 5, 99)
