"""LoRA students (peft.enabled): only the adapters train, the ``base`` privileged student is the
adapter-free model, the EMA averages the adapters alone, both exports load, resume is exact, and
every config error names its key.

References are built independently of the code under test: the student's own weights from a fresh
``load_model`` of the same seed, merged weights from peft's ``merge_and_unload``, the EMA from the
recurrence written out here.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dopd.config import load_config  # noqa: E402
from dopd.config.peft import PeftConfig  # noqa: E402
from dopd.errors import ConfigError, DOPDError  # noqa: E402
from dopd.modeling.alignment import output_head_problem, unwrapped  # noqa: E402
from dopd.modeling.loading import load_model  # noqa: E402
from dopd.modeling.peft import (  # noqa: E402
    AdapterEMA,
    AdapterFreeView,
    apply_lora,
    export_model,
)
from dopd.training.trainer import Trainer  # noqa: E402
from tests.tolerance import REORDERED, assert_close  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_LORA = str(ROOT / "configs" / "tiny-lora.yaml")
DATA = str(ROOT / "configs" / "data" / "tiny.jsonl")
# Every required key plus a LoRA student, for config checks that load nothing.
REQUIRED = ["student.path=s", "teacher.path=t", "data.train=x", "peft.enabled=true"]


def lora_config(output_dir: Path, *overrides: str):
    base = [f"output_dir={output_dir}", f"data.train={DATA}", f"data.eval={DATA}"]
    return load_config(TINY_LORA, [*base, *overrides])


def inputs(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Four training prompts, left-padded, as model inputs."""
    prompts = trainer.prompts["plain"][:4]
    width = max(len(p) for p in prompts)
    pad = trainer.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def own_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The non-LoRA entries of a LoRA model's base state dict, under the plain model's names."""
    return {
        key.replace(".base_layer.", "."): value
        for key, value in state.items()
        if ".lora_" not in key
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """configs/tiny-lora.yaml trained end to end (10 steps, evaluation every 5) with the ``base``
    privileged student; and the student as built, before training (same seed, fresh)."""
    output_dir = tmp_path_factory.mktemp("tiny-lora")
    config = lora_config(output_dir, "views.priv_student_weights=base")
    trainer = Trainer(config)
    student = trainer.accelerator.unwrap_model(trainer.student)
    # The trainer's .eval().requires_grad_(False) of its frozen models never reached the student.
    assert student.training and any(p.requires_grad for p in student.parameters())
    trainer.train()
    initial = load_model(config.student, trainer.tokenizer, seed=config.seed).eval()
    return trainer, student.eval(), initial


def test_a_lora_run_trains_the_adapters_and_leaves_every_own_weight_bit_identical(trained):
    trainer, student, initial = trained
    lines = (Path(trainer.config.output_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))
    assert all(r["skipped_step"] == 0.0 for r in records if "loss" in r)
    assert "eval/accuracy" in records[-1]
    # 2 layers x (q_proj, v_proj) x (A, B); rank 8 over hidden 64: q is 64 -> 64, v 64 -> 32.
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert len(trainable) == 8 and all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    optimized = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert len(optimized) == 8
    # LoRA's B starts at zero; every B moved.
    assert all(p.abs().max() > 0 for n, p in trainable.items() if "lora_B" in n)
    expected = initial.state_dict()
    actual = own_weights(student.get_base_model().state_dict())
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_base_privileged_student_is_the_adapter_free_model_without_a_copy(trained):
    trainer, student, initial = trained
    view = trainer.models["priv_student"]
    assert isinstance(view, AdapterFreeView) and view.student is student
    assert sum(p.numel() for p in view.parameters()) == 0  # no second copy of the weights
    # The loss path sees the Hugging Face model inside: its head, its logits_to_keep.
    assert unwrapped(view) is student.get_base_model() and output_head_problem(view) is None
    batch = inputs(trainer)
    base = logits(view, batch)
    assert torch.equal(base, logits(initial, batch))
    adapted = logits(student, batch)
    assert (adapted - base).abs().max() > 1e-4  # training moved the adapted model away
    # Frozen like every constant view: the student runs in eval mode inside, and gets its own back.
    modes = []
    layer = student.get_base_model().model.layers[0]
    handle = layer.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        student.train()
        logits(view, batch)
        assert modes == [False] and student.training and layer.training
    finally:
        handle.remove()
        student.eval()


def test_merged_export_loads_with_from_pretrained_as_the_adapted_model(trained):
    trainer, student, _ = trained
    folder = Path(trainer.config.output_dir) / "model"
    assert not (folder / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    batch = inputs(trainer)
    assert_close(logits(merged, batch), logits(student, batch), ulps=REORDERED)
    # peft's own merge of a copy gives the same weights, and the student is still unmerged.
    reference = copy.deepcopy(student).merge_and_unload().state_dict()
    saved = load_file(str(folder / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(value, reference[key]), key
    assert any(".lora_" in n for n, _ in student.named_parameters())


def test_adapter_export_loads_with_peft_onto_the_base_model(trained, tmp_path):
    trainer, student, _ = trained
    export_model(student, tmp_path / "adapter", trainer.tokenizer, "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    config = trainer.config
    base = load_model(config.student, trainer.tokenizer, seed=config.seed)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    batch = inputs(trainer)
    assert torch.equal(logits(loaded, batch), logits(student, batch))
    with pytest.raises(DOPDError, match="mode='full'"):
        export_model(student, tmp_path / "x", trainer.tokenizer, "full")


def test_ema_with_lora_averages_the_adapters_only(tmp_path):
    decay = 0.5
    config = lora_config(
        tmp_path,
        "views.priv_student_weights=ema",
        f"views.ema_decay={decay}",
        "loop.eval_every=0",
        "data.eval=null",
        "optim.max_steps=2",
    )
    trainer = Trainer(config)
    student = trainer.accelerator.unwrap_model(trainer.student)
    names = [n for n, p in student.named_parameters() if p.requires_grad]
    snapshot = {n: p.detach().clone() for n, p in student.named_parameters()}
    expected = {n: snapshot[n].clone() for n in names}
    for step in (1, 2):
        trainer.train(stop_after=step)
        for name, p in student.named_parameters():
            if name in names:  # the recurrence, written out
                expected[name] = decay * expected[name] + (1 - decay) * p.detach()
            else:
                assert torch.equal(p, snapshot[name]), name
    ema = trainer.ema
    assert isinstance(ema, AdapterEMA) and ema.names == names
    assert sum(t.numel() for t in ema.state_dict().values()) == sum(
        p.numel() for p in student.parameters() if p.requires_grad
    )
    for name, average in zip(ema.names, ema.averages()):
        assert_close(average, expected[name], ulps=REORDERED, msg=name)
    stored = load_file(str(Path(tmp_path) / "checkpoints" / "step-000002" / "ema.safetensors"))
    assert len(stored) == len(names)
    # The EMA view scores with the averages in the adapters, then puts the live values back.
    live = {n: p.detach().clone() for n, p in student.named_parameters()}
    averaged = copy.deepcopy(student).eval()
    with torch.no_grad():
        for name, p in averaged.named_parameters():
            if name in names:
                p.copy_(ema.averages()[names.index(name)])
    student.eval()
    batch = inputs(trainer)
    assert torch.equal(logits(trainer.models["priv_student"], batch), logits(averaged, batch))
    assert all(torch.equal(p, live[n]) for n, p in student.named_parameters())


@pytest.mark.slow
def test_lora_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path):
    overrides = (
        "optim.max_steps=4",
        "loop.save_every=2",
        "loop.eval_every=0",
        "data.eval=null",
        "rollout.prompts_per_step=4",
        "rollout.num_generations=2",
        "views.priv_student_weights=ema",
        "peft.dropout=0.1",  # the adapters' dropout draws from the restored generator
    )
    Trainer(lora_config(tmp_path / "full", *overrides)).train()
    Trainer(lora_config(tmp_path / "split", *overrides)).train(stop_after=2)
    Trainer(lora_config(tmp_path / "split", *overrides), resume=True).train()
    full, split = (
        load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("full", "split")
    )
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    drop = ("time/", "tokens_per_second")
    lines = [
        [
            {k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in ("full", "split")
    ]
    assert lines[0] == lines[1]


def test_gradient_checkpointing_gives_a_lora_student_the_same_gradients(tiny_model):
    batch = torch.randint(0, 17, (2, 9), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA A initialisation
        model = apply_lora(tiny_model(0), PeftConfig(r=4, target_modules=("q_proj", "down_proj")))
        with torch.no_grad():  # nonzero B, so that A's gradient is not zero either
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        model(input_ids=batch, use_cache=False).logits.square().sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name, grad in grads[0].items():
        assert grads[1][name] is not None and grad.abs().max() > 0, name
        assert_close(grads[1][name], grad, ulps=REORDERED, msg=name)


def test_target_modules_that_match_no_layer_are_named(tiny_model):
    with pytest.raises(ConfigError, match=r"^peft\.target_modules=\['qproj'\]: no layer .*q_proj"):
        apply_lora(tiny_model(0), PeftConfig(target_modules=("qproj",)))
    with pytest.warns(UserWarning, match=r"\['qproj'\] match no layer"):
        model = apply_lora(tiny_model(0), PeftConfig(target_modules=("qproj", "v_proj")))
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"v_proj"}
    with pytest.raises(ConfigError, match=r"^peft\.target_modules=\['q_norm'\]: peft cannot"):
        apply_lora(tiny_model(0), PeftConfig(target_modules=("q_norm",)))


def test_a_missing_peft_package_says_how_to_install_it(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now raises ImportError
    with pytest.raises(DOPDError, match=r"pip install 'dopd\[peft\]'") as info:
        apply_lora(tiny_model(0), PeftConfig())
    assert "\n" not in str(info.value)


def test_sharding_engines_are_refused(tiny_model):
    with pytest.raises(ConfigError, match=r"^peft\.enabled=True under FSDP.*launch with DDP"):
        apply_lora(tiny_model(0), PeftConfig(), engine="FSDP")


def test_peft_section_loads_from_yaml_and_overrides():
    config = load_config(TINY_LORA, ["peft.r=4", "peft.alpha=8", "peft.export=adapter"])
    assert config.peft == PeftConfig(
        enabled=True, r=4, alpha=8.0, target_modules=("q_proj", "v_proj"), export="adapter"
    )
    assert isinstance(config.peft.alpha, float)
    default = load_config(None, REQUIRED[:3]).peft
    assert not default.enabled and (default.r, default.alpha, default.dropout) == (16, 32.0, 0.0)
    assert default.target_modules == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    assert default.export == "merged"
    ema = load_config(None, [*REQUIRED, "views.priv_student_weights=ema"])
    assert ema.peft.enabled and ema.views.priv_student_weights == "ema"


PEFT_ERRORS = [
    (["peft.r=0"], ["peft.r=0", "integer >= 1"]),
    (["peft.r=2.5"], ["peft.r: expected int"]),
    (["peft.alpha=0"], ["peft.alpha=0.0", "out of range"]),
    (["peft.dropout=1"], ["peft.dropout=1.0", "[0.0, 1.0)"]),
    (["peft.target_modules=[]"], ["peft.target_modules=()", "non-empty list", "q_proj"]),
    (["peft.target_modules=q_proj"], ["peft.target_modules: expected tuple", "list"]),
    (["peft.target_modules=['']"], ["peft.target_modules[0]=''"]),
    (["peft.export=full"], ["peft.export='full'", "'merged', 'adapter'"]),
    (["peft.enabled=yes"], ["peft.enabled: expected bool"]),
    (["peft.rank=8"], ["peft.rank is not a config key", "enabled, r, alpha"]),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), PEFT_ERRORS, ids=[" ".join(o) for o, _ in PEFT_ERRORS]
)
def test_bad_peft_values_raise_config_error_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*REQUIRED, *overrides])
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, message
