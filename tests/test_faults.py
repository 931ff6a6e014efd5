"""Numerical faults: a non-finite loss or gradient skips the optimizer step (counted, logged), and
too many skips in a row stop the run with a diagnosis naming the view or objective and the step;
non-finite numbers in a dataset are refused before training."""

from __future__ import annotations

import json

import pytest
import torch

from dopd.errors import DataError, DOPDError
from dopd.io.data import load_examples
from dopd.training.trainer import Trainer
from tests.test_trainer import tiny_config


def poison_logits(model: torch.nn.Module, value: float) -> torch.Tensor:
    """Make one vocabulary entry of ``model``'s logits non-finite through its output head (both
    scoring paths project through it); returns the head row's original values."""
    row = model.get_output_embeddings().weight[3]
    original = row.detach().clone()
    with torch.no_grad():
        row.fill_(value)
    return original


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().clone()
        for n, p in trainer.accelerator.unwrap_model(trainer.student).named_parameters()
    }


def records(trainer: Trainer) -> list[dict]:
    return [
        json.loads(line) for line in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()
    ]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_teacher_logits_stop_the_run_with_a_diagnosis_and_untouched_weights(
    tmp_path, value
):
    config = tiny_config(
        tmp_path,
        "objective.name=vanilla_opd",
        "optim.max_steps=4",
        "optim.max_consecutive_skips=2",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "loop.save_every=0",
    )
    trainer = Trainer(config)
    before = weights(trainer)
    poison_logits(trainer.models["teacher"], value)
    with pytest.raises(
        DOPDError,
        match=r"stopped at step 2 after 2 consecutive .*the teacher view's logits are non-finite",
    ):
        trainer.train()
    after = weights(trainer)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert [r["skipped_step"] for r in records(trainer)] == [1.0]  # step 1 logged, step 2 raised
    assert not (tmp_path / "model").exists()


def test_one_bad_step_is_skipped_counted_and_training_goes_on(tmp_path, capsys):
    config = tiny_config(
        tmp_path,
        "objective.name=dopd",
        "optim.max_steps=3",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "loop.save_every=0",
        "optim.warmup_steps=0",
        "views.priv_student_weights=base",
    )
    trainer = Trainer(config)
    before = weights(trainer)
    head = trainer.models["priv_student"].get_output_embeddings().weight
    trainer.train_step()
    trainer.step += 1
    after_first = weights(trainer)
    assert not all(torch.equal(before[n], after_first[n]) for n in before)
    original = poison_logits(trainer.models["priv_student"], float("nan"))  # only step 2's scores
    second = trainer.train_step()
    with torch.no_grad():
        head[3] = original
    trainer.step += 1
    assert second["skipped_step"] == 1.0 and second["skipped_steps"] == 1.0
    assert all(torch.equal(after_first[n], p) for n, p in weights(trainer).items())
    assert (
        "step 2: non-finite loss or gradient, optimizer step skipped (1 in a row, 1 in all)"
        in capsys.readouterr().out
    )
    third = trainer.train_step()
    assert third["skipped_step"] == 0.0 and third["skipped_steps"] == 1.0
    assert trainer.consecutive_skips == 0


def test_finite_logits_with_a_nonfinite_loss_blame_the_objective(tmp_path):
    config = tiny_config(
        tmp_path,
        "objective.name=gkd",
        "optim.max_steps=2",
        "optim.max_consecutive_skips=1",
        "rollout.prompts_per_step=2",
        "rollout.num_generations=2",
        "loop.save_every=0",
    )
    trainer = Trainer(config)
    # A NaN loss temperature: every view's logits stay finite, the objective's values do not.
    object.__setattr__(trainer.objective.config, "temperature", float("nan"))
    with pytest.raises(
        DOPDError, match=r"stopped at step 1 .*objective 'gkd' produced the non-finite"
    ):
        trainer.train()


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("key", ["prompt", "privileged_context", "answer"])
def test_nonfinite_numbers_in_the_data_are_refused_with_file_and_line(tmp_path, key, literal):
    row = {"prompt": '"1+1="', "privileged_context": '"add"', "answer": '"2"'}
    row[key] = literal
    path = tmp_path / "data.jsonl"
    path.write_text(
        '{"prompt": "2+2=", "privileged_context": "add", "answer": "4"}\n'
        + "{"
        + ", ".join(f'"{k}": {v}' for k, v in row.items())
        + "}\n"
    )
    with pytest.raises(DataError, match=rf"^{path}:2: {key}"):
        load_examples(str(path))
