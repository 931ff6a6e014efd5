"""dopd.training.step on tiny models: the chunked loss path against the reference path (loss,
every metric, every gradient), its fallback, its memory bound, and the trainer taking it by
default."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from types import MethodType

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import convert_outputs_to_fp32
from transformers import LlamaConfig, LlamaForCausalLM

from dopd.errors import DOPDError
from dopd.modeling.tiny import build_tiny_model
from dopd.objectives.registry import build_objective
from dopd.objectives.views import ViewHead
from dopd.training import step
from dopd.training.step import choose_path, make_micro_batches, run_step
from tests.tolerance import REORDERED, assert_close

VOCAB, PAD = 50, 0
ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def accelerator() -> Accelerator:
    return Accelerator(cpu=True)


def tiny_llama(seed: int, hidden_size: int) -> LlamaForCausalLM:
    """A random-init Llama with an untied output head (the Qwen3 models tie theirs)."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=False, initializer_range=0.2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def tiny_models(family: str, objective) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """A student and the constant-view models ``objective`` needs; the privileged student is
    the live student, the reference a frozen copy of it."""
    if family == "llama":
        student, teacher = tiny_llama(0, 32), tiny_llama(1, 48)
    else:
        build = functools.partial(build_tiny_model, VOCAB, initializer_range=0.2)
        student = build(seed=0, hidden_size=32, intermediate_size=64)
        teacher = build(seed=1, hidden_size=48, intermediate_size=96)
    models = {"teacher": teacher.eval().requires_grad_(False)}
    if objective.uses_priv_student:
        models["priv_student"] = student
    if objective.uses_reference:
        models["reference"] = copy.deepcopy(student).eval().requires_grad_(False)
    return student, models


def tiny_batches(
    models: dict,
    micro_batch_size: int = 4,
    *,
    num_classes: int = 0,
    rollout_log_probs: torch.Tensor | None = None,
) -> list[step.MicroBatch]:
    """6 rollout rows (one fully masked) of up to 10 tokens; privileged prompts add a hint.
    With ``num_classes``, each token's class is its id modulo ``num_classes`` (-1 at padding);
    ``rollout_log_probs`` (``[6, 10]``) stands for a rollout engine's log-probs."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (6, 10), generator=generator)  # [B, T]
    mask = torch.arange(10) < torch.tensor([10, 3, 7, 0, 10, 5]).unsqueeze(1)  # [B, T]
    plain = [
        torch.randint(4, VOCAB, (2 + row % 4,), generator=generator).tolist() for row in range(6)
    ]
    privileged = [p + torch.randint(4, VOCAB, (3,), generator=generator).tolist() for p in plain]
    prompts = {
        "student": plain,
        "priv_student": privileged,
        "teacher": privileged,
        "reference": plain,
    }
    prompts = {
        name: value for name, value in prompts.items() if name == "student" or name in models
    }
    classes = (ids % num_classes).masked_fill(~mask, -1) if num_classes else None
    return make_micro_batches(
        ids,
        mask,
        prompts,
        micro_batch_size,
        PAD,
        token_classes=classes,
        rollout_log_probs=rollout_log_probs,
    )


def step_results(student, models, objective, batches, **kwargs):
    """One step's output and the gradient it leaves in every student parameter."""
    student.zero_grad(set_to_none=True)
    out = run_step(accelerator(), objective, student, models, batches, **kwargs)
    return out, {name: p.grad.clone() for name, p in student.named_parameters()}


def assert_same_step(first, second, *, ulps: float, dtype: torch.dtype = torch.float32) -> None:
    """Loss, every metric and every gradient agree within ``ulps`` roundings of each tensor's
    (or metric's) largest magnitude in ``dtype``; ``ulps=0`` demands bit-identity."""
    (out, grads), (expected, expected_grads) = first, second
    assert out.metrics.keys() == expected.metrics.keys()
    for key, value in expected.metrics.items():
        if not key.startswith("time/"):
            assert_close(out.metrics[key], value, ulps=ulps, dtype=dtype, msg=key)
    assert_close(out.loss, expected.loss, ulps=ulps, dtype=dtype)
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, ulps=ulps, dtype=dtype, msg=name)


CASES = [
    ("qwen3", "dopd", {}),
    ("qwen3", "dopd", {"temperature": 0.7, "topk_tail": True, "reduction": "token_mean"}),
    ("qwen3", "vanilla_opd", {}),
    ("qwen3", "gkd", {}),
    ("qwen3", "opcd", {}),
    ("qwen3", "tip", {}),  # statistics read the student view
    ("qwen3", "exopd", {}),  # a reference model
    ("llama", "dopd", {}),
    ("llama", "exopd", {}),
]


@pytest.mark.parametrize(("family", "name", "options"), CASES)
def test_chunked_path_equals_reference_path(family, name, options):
    objective = build_objective(name, top_k=8, **options)
    student, models = tiny_models(family, objective)
    batches = tiny_batches(models)
    chunked_step = step_results(student, models, objective, batches, path="chunked", chunk_rows=5)
    reference_step = step_results(student, models, objective, batches, path="reference")
    assert (chunked_step[0].path, reference_step[0].path) == ("chunked", "reference")
    # float32 models: the two paths project with different matmul shapes, so they agree to
    # rounding (measured: at most 6 ulps of a gradient's largest entry, 21 of a loss metric).
    assert_same_step(chunked_step, reference_step, ulps=REORDERED)


def test_oracle_routing_reads_each_rows_own_token_classes_on_both_paths():
    regimes = {"a": "HT", "b": "LL", "c": "HS"}
    objective = build_objective("dopd_oracle_routing", top_k=8, oracle_regimes=regimes)
    student, models = tiny_models("qwen3", objective)
    batches = tiny_batches(models, micro_batch_size=4, num_classes=3)  # 4 + 2 rows
    chunked_step = step_results(student, models, objective, batches, path="chunked", chunk_rows=5)
    reference_step = step_results(student, models, objective, batches, path="reference")
    assert_same_step(chunked_step, reference_step, ulps=REORDERED)
    classes = torch.cat([batch.token_classes[batch.completion_mask] for batch in batches])
    for index, regime in enumerate(regimes.values()):
        share = (classes == index).sum().item() / classes.numel()
        assert chunked_step[0].metrics[f"fraction/{regime}"] == share
    assert chunked_step[0].metrics["fraction/LH"] == 0.0


def test_dopd_case_populates_every_regime():
    # Guards the test above: top-K terms and the HT rows' full-vocabulary JS both run.
    objective = build_objective("dopd", top_k=8)
    student, models = tiny_models("qwen3", objective)
    out, _ = step_results(student, models, objective, tiny_batches(models), chunk_rows=5)
    assert all(out.metrics[f"fraction/{group}"] > 0 for group in objective.group_names)


def autocast_forward(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its forward under bf16 autocast, outputs cast to float32, as
    ``Accelerator(mixed_precision="bf16").prepare`` patches it."""
    forward = torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward)
    model.forward = MethodType(convert_outputs_to_fp32(forward), model)
    return model


def test_bf16_autocast_student_projects_like_its_head():
    objective = build_objective("dopd", top_k=8)
    student, models = tiny_models("qwen3", objective)
    models["priv_student"] = autocast_forward(student)
    batches = tiny_batches(models)
    chunked_step = step_results(student, models, objective, batches, path="chunked", chunk_rows=5)
    reference_step = step_results(student, models, objective, batches, path="reference")
    # Both paths compute the autocast view's bf16 logits alike and upcast them before any
    # softmax; that view is a constant, so what remains is float32 rounding (measured: 1 ulp).
    assert_same_step(chunked_step, reference_step, ulps=REORDERED)


def test_auto_falls_back_to_the_reference_path():
    objective = build_objective("dopd", top_k=8)
    student, models = tiny_models("qwen3", objective)
    batches = tiny_batches(models)
    expected = step_results(student, models, objective, batches, path="reference")
    student.get_output_embeddings = lambda: None  # a model that does not expose its head
    fallback = step_results(student, models, objective, batches)
    assert fallback[0].path == "reference"
    assert_same_step(fallback, expected, ulps=0)
    with pytest.raises(
        DOPDError, match=r"student model: Qwen3ForCausalLM.get_output_embeddings\(\) is NoneType"
    ):
        run_step(accelerator(), objective, student, models, batches, path="chunked")


def test_logit_softcapping_or_scaling_selects_the_reference_path():
    objective = build_objective("vanilla_opd")
    student, models = tiny_models("qwen3", objective)
    assert choose_path(accelerator(), student, models) == "chunked"
    models["teacher"].config.final_logit_softcapping = 30.0
    assert choose_path(accelerator(), student, models) == "reference"
    with pytest.raises(DOPDError, match="teacher model: .*final_logit_softcapping=30.0"):
        choose_path(accelerator(), student, models, "chunked")


def test_path_and_chunk_rows_are_validated():
    objective = build_objective("vanilla_opd")
    student, models = tiny_models("qwen3", objective)
    with pytest.raises(DOPDError, match="path='fast' is not allowed"):
        run_step(accelerator(), objective, student, models, tiny_batches(models), path="fast")
    with pytest.raises(DOPDError, match="chunk_rows=0"):
        run_step(accelerator(), objective, student, models, tiny_batches(models), chunk_rows=0)


def test_chunked_path_never_projects_more_than_a_chunk(monkeypatch):
    objective = build_objective("dopd", top_k=8)
    student, models = tiny_models("llama", objective)
    head_outputs, projected = [], []
    for model in (student, models["teacher"]):
        model.lm_head.register_forward_hook(lambda m, args, out: head_outputs.append(out.shape))
    original = ViewHead.logits

    def recording(self, rows):
        logits = original(self, rows)  # [C, V]
        projected.append(logits.shape)
        return logits

    monkeypatch.setattr(ViewHead, "logits", recording)
    step_results(student, models, objective, tiny_batches(models), chunk_rows=3)
    # The models' own heads see the last position only (the projection check), never [b, T].
    assert head_outputs and all(shape[1] == 1 for shape in head_outputs)
    assert projected and max(shape[0] for shape in projected) == 3


def test_trainer_takes_the_chunked_path_by_default(tmp_path, monkeypatch):
    from dopd.config import load_config
    from dopd.training.trainer import Trainer

    calls = []
    original = step.chunked_objective_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(step, "chunked_objective_loss", counting)
    config = load_config(str(ROOT / "configs" / "tiny.yaml"), [
        f"output_dir={tmp_path}", f"data.train={ROOT / 'configs' / 'data' / 'tiny.jsonl'}",
        "data.eval=null", "loop.eval_every=0", "rollout.prompts_per_step=2",
        "rollout.num_generations=2", "rollout.max_completion_length=6",
    ])  # fmt: skip
    metrics = Trainer(config).train_step()
    assert calls and torch.isfinite(torch.tensor(metrics["loss"]))


def sampled_log_probs_by_hand(student, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Each valid completion token's log-prob under ``student``, from one unpadded forward per
    row of the plain view; returns ``[6, 10]`` log-probs (0 at padding) and the ``[6, 10]`` mask."""
    rows, masks = [], []
    for batch in batches:
        inputs = batch.inputs["student"]
        for row in range(inputs.input_ids.shape[0]):
            real = inputs.input_ids[row][inputs.attention_mask[row].bool()]  # [P_r + T_r]
            valid = batch.completion_mask[row]
            length = int(valid.sum())
            log_probs = torch.zeros(valid.shape[0])
            if length:
                with torch.no_grad():
                    logits = student(input_ids=real.unsqueeze(0)).logits[0].float()
                scores = logits[-length - 1 : -1].log_softmax(-1)  # [T_r, V]
                log_probs[:length] = scores.gather(-1, real[-length:, None]).squeeze(-1)
            rows.append(log_probs)
            masks.append(valid)
    return torch.stack(rows), torch.stack(masks)


@pytest.mark.parametrize("path", ["reference", "chunked"])
def test_mismatch_metrics_measure_the_engine_log_prob_gap(path):
    """``mismatch/abs_log_prob_diff`` is the mean ``|log pi_train - log pi_engine|`` and
    ``mismatch/kl`` the mean ``k3 = e^d - 1 - d`` over valid tokens: an engine whose log-probs
    are the trainer's shifted by known offsets gives those offsets' statistics."""
    objective = build_objective("vanilla_opd")
    student, models = tiny_models("qwen3", objective)
    train, mask = sampled_log_probs_by_hand(student, tiny_batches(models))
    offsets = torch.linspace(-0.5, 0.7, train.numel()).reshape(train.shape)
    engine = (train - offsets).masked_fill(~mask, 0.0)
    batches = tiny_batches(models, rollout_log_probs=engine)
    out = run_step(accelerator(), objective, student, models, batches, path=path)
    delta = offsets[mask].double()
    # The trainer's log-probs come from padded batches, rounded at their own magnitude.
    bound = {"ulps": REORDERED, "dtype": torch.float32, "scale": train.abs().max().item()}
    assert_close(out.metrics["mismatch/abs_log_prob_diff"], delta.abs().mean().item(), **bound)
    assert_close(out.metrics["mismatch/kl"], (delta.exp() - 1 - delta).mean().item(), **bound)
    without = run_step(accelerator(), objective, student, models, tiny_batches(models), path=path)
    assert not any(key.startswith("mismatch/") for key in without.metrics)
