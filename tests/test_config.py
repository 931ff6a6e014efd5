"""Tests of dopd.config: defaults, the shipped configs, overrides, round trips and every error path.

Expected values are written out here from the config schema and docs/method.md §6, never
recomputed with the code under test.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dopd.config import (
    DataConfig,
    ModelSpec,
    TrainConfig,
    config_help,
    config_to_dict,
    load_config,
    save_config,
)
from dopd.errors import ConfigError
from dopd.objectives.dopd import DOPDConfig
from dopd.objectives.registry import OBJECTIVES

REPO = Path(__file__).resolve().parents[1]
# The smallest valid config: the three keys without a default.
REQUIRED = ["student.path=student-model", "teacher.path=teacher-model", "data.train=train.jsonl"]
# docs/method.md §6: the paper's teacher -> student pairs.
REAL_CONFIGS = {
    "qwen3-8b-to-1.7b.yaml": ("Qwen/Qwen3-8B", "Qwen/Qwen3-1.7B"),
    "qwen3-8b-to-0.6b.yaml": ("Qwen/Qwen3-8B", "Qwen/Qwen3-0.6B"),
    "qwen3-4b-to-0.6b.yaml": ("Qwen/Qwen3-4B", "Qwen/Qwen3-0.6B"),
    "qwen3-4b-to-1.7b.yaml": ("Qwen/Qwen3-4B", "Qwen/Qwen3-1.7B"),
    "qwen3-1.7b-to-0.6b.yaml": ("Qwen/Qwen3-1.7B", "Qwen/Qwen3-0.6B"),
}


def load(*overrides: str) -> TrainConfig:
    return load_config(None, [*REQUIRED, *overrides])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_follow_the_documented_schema():
    model = {
        "kind": "causal_lm",
        "tiny": None,
        "dtype": "auto",
        "attn_implementation": "auto",
        "trust_remote_code": False,
    }
    expected = {
        "output_dir": "runs/dopd",
        "seed": 0,
        "student": {"path": "student-model", **model},
        "teacher": {"path": "teacher-model", **model},
        "reference": None,
        "tokenizer": {
            "path": None,
            "characters": None,
            "chat_template_kwargs": {},
            "trust_remote_code": False,
        },
        "data": {
            "train": "train.jsonl",
            "eval": None,
            "subset": None,
            "columns": {
                "prompt": "prompt",
                "messages": "messages",
                "privileged_context": "privileged_context",
                "answer": "answer",
                "privileged_prompt": None,
                "images": "images",
                "boxes": "boxes",
            },
            "privileged_template": "{prompt}\n\n{privileged_context}",
            "max_prompt_length": 512,
            "overlong_prompts": "skip",
            "box_format": "absolute",
            "box_template": "{label}: [{x1}, {y1}, {x2}, {y2}]",
            "box_render": "normalized_1000",
        },
        "objective": {"name": "dopd"},
        "views": {
            "teacher": None,
            "priv_student": None,
            "priv_student_weights": "live",
            "ema_decay": 0.99,
            "student_input": "plain",
        },
        "rollout": {
            "prompts_per_step": 8,
            "num_generations": 4,
            "max_completion_length": 64,
            "temperature": 1.0,
            "top_p": 1.0,
            "top_k": 0,
            "backend": "hf",
            "generation_batch_size": 0,
            "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": 0.3,
            "vllm_tensor_parallel_size": 1,
            "vllm_enable_sleep_mode": False,
            "vllm_max_model_len": 0,
            "vllm_server_host": "127.0.0.1",
            "vllm_server_port": 8000,
            "vllm_server_timeout": 240.0,
        },
        "optim": {
            "lr": 5e-6,
            "weight_decay": 0.0,
            "betas": [0.9, 0.999],
            "warmup_steps": 0,
            "max_steps": 200,
            "max_grad_norm": 1.0,
            "micro_batch_size": 8,
            "max_consecutive_skips": 5,
        },
        "loop": {
            "mixed_precision": "no",
            "gradient_checkpointing": False,
            "log_every": 1,
            "save_every": 50,
            "eval_every": 0,
            "loss_path": "auto",
            "loss_chunk_rows": 1024,
        },
        "eval": {"max_examples": 64, "verifier": "exact", "max_new_tokens": 64},
        "checkpoint": {"save_total_limit": 0, "export_dtype": "auto"},
        "peft": {
            "enabled": False,
            "r": 16,
            "alpha": 32.0,
            "dropout": 0.0,
            "target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            "export": "merged",
        },
        "tracking": {
            "report_to": "none",
            "project": "dopd",
            "run_name": None,
            "samples_every": 10,
            "sample_rows": 4,
        },
    }
    config = load()
    assert config_to_dict(config) == expected
    assert config.optim.betas == (0.9, 0.999)  # a tuple in Python, a list in YAML
    assert config.tokenizer_path == "student-model"
    assert (config.teacher_view, config.priv_student_view) == ("privileged", "privileged")


def test_python_construction_equals_loading():
    built = TrainConfig(
        student=ModelSpec(path="student-model"),
        teacher=ModelSpec(path="teacher-model"),
        data=DataConfig(train="train.jsonl"),
    )
    assert built == load()
    with pytest.raises(ConfigError, match=r"^path=None and tiny=None"):  # its own field names
        ModelSpec()


def section_classes(cls: type = TrainConfig) -> list[type]:
    found = [cls]
    for hint in get_type_hints(cls).values():
        for candidate in (hint, *get_args(hint)):
            if is_dataclass(candidate) and candidate not in found:
                found += [c for c in section_classes(candidate) if c not in found]
    return found


def test_every_field_has_help_and_sections_are_frozen_and_keyword_only():
    classes = section_classes()
    assert len(classes) == 14  # TrainConfig, ModelSpec, the 11 other sections, data.columns
    for cls in classes:
        assert cls.__dataclass_params__.frozen, cls
        assert all(f.kw_only for f in fields(cls)), cls
        assert all(f.metadata.get("help") for f in fields(cls)), cls
    assert any(line.startswith("optim.lr: ") for line in config_help())


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_load_with_the_paper_recipe(name):
    config = load_config(REPO / "configs" / name)
    assert (config.teacher.path, config.student.path) == REAL_CONFIGS[name]
    assert config.objective.name == "dopd" and config.objective.options == {}
    assert (config.optim.lr, config.optim.max_steps) == (5e-6, 200)
    assert (config.rollout.prompts_per_step, config.rollout.num_generations) == (128, 4)
    assert config.rollout.max_completion_length == 4096
    assert (config.optim.warmup_steps, config.optim.max_grad_norm) == (10, 1.0)
    assert (config.loop.mixed_precision, config.loop.gradient_checkpointing) == ("bf16", True)
    assert config.tokenizer.chat_template_kwargs == {"enable_thinking": False}
    assert config.tokenizer_path == REAL_CONFIGS[name][1]
    assert not (REPO / config.data.train).exists()  # a placeholder: loading checks no files


def test_vision_language_config_loads_with_the_paper_recipe():
    config = load_config(REPO / "configs" / "qwen3-vl-8b-to-2b.yaml")
    assert (config.teacher.path, config.student.path) == (
        "Qwen/Qwen3-VL-8B-Instruct",
        "Qwen/Qwen3-VL-2B-Instruct",
    )
    assert config.is_vlm and config.teacher.kind == "image_text_to_text"
    assert config.objective.name == "dopd" and config.objective.options == {}
    assert config.optim.lr == 5e-6 and config.optim.max_steps <= 300
    assert (config.rollout.prompts_per_step, config.rollout.num_generations) == (64, 4)
    assert (config.data.box_render, config.data.eval) == ("normalized_1000", None)
    assert config.tokenizer_path == "Qwen/Qwen3-VL-2B-Instruct"
    assert not (REPO / config.data.train).exists()  # a placeholder: loading checks no files


def test_real_configs_load_without_transformers_or_the_hub():
    # Offline by construction: loading imports neither transformers nor huggingface_hub.
    script = (
        "import sys, glob\n"
        "from dopd.config import load_config\n"
        "for path in sorted(glob.glob('configs/qwen3-*.yaml')): load_config(path)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('transformers', 'huggingface_hub', 'datasets')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_tiny_config_loads_with_tiny_models_and_a_character_tokenizer():
    config = load_config(REPO / "configs" / "tiny.yaml")
    assert config.student.path is None and config.student.tiny
    assert config.teacher.path is None and config.teacher.tiny
    assert config.tokenizer.characters and config.tokenizer_path is None
    assert config.data.train == "configs/data/tiny.jsonl"


ROUND_TRIP_OVERRIDES = [
    [],
    ["objective.name=exopd", "objective.extrapolation=1.5", "reference.path=base-model"],
    ["objective.regimes=[LH, HT]", "objective.top_k=64", "views.priv_student_weights=ema"],
    ["objective.name=gkd", "objective.jsd_beta=0.25", "views.teacher=privileged"],
    [
        "student.path=null",
        "student.tiny={hidden_size: 32, layers: [1, 2]}",
        "tokenizer.characters=ab",
    ],
    ['tokenizer.characters="no 1e5 {}\'\\""', "output_dir='1e5'", "data.eval=no"],
    ["data.privileged_template='Hint: {privileged_context}\n{prompt} {{x}}'"],
    ["loop.mixed_precision=no", "optim.betas=[0, 0.5]", "seed=7"],
]


@pytest.mark.parametrize("overrides", ROUND_TRIP_OVERRIDES)
def test_saved_config_loads_back_equal(tmp_path, overrides):
    config = load(*overrides)
    path = tmp_path / "run" / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert yaml.safe_load(path.read_text()) == config_to_dict(config)  # plain YAML for any reader


@pytest.mark.parametrize("name", ["tiny.yaml", "tiny-lora.yaml", *sorted(REAL_CONFIGS)])
def test_shipped_configs_round_trip(tmp_path, name):
    config = load_config(REPO / "configs" / name)
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_overrides_set_nested_keys_with_yaml_values():
    config = load(
        "objective.top_k=64",
        "objective.regimes=[LH, HT]",
        "optim.lr=1e-5",
        "optim.betas=[0.8, 0.95]",
        "student.path=null",
        "student.tiny={hidden_size: 64}",
        "student.tiny.num_hidden_layers=2",
        "tokenizer.characters=abc",
        "tokenizer.chat_template_kwargs.enable_thinking=false",
        "data.eval=eval.jsonl",
        "data.eval=null",
        "output_dir=runs/x",
        "rollout.temperature=2",
    )
    assert config.objective.options == {"top_k": 64, "regimes": ("LH", "HT")}
    built = config.objective.build().config
    assert isinstance(built, DOPDConfig)
    assert (built.top_k, built.regimes, built.beta_light) == (64, ("LH", "HT"), 0.6)
    assert config.optim.lr == 1e-5 and config.optim.betas == (0.8, 0.95)
    assert config.student == ModelSpec(tiny={"hidden_size": 64, "num_hidden_layers": 2})
    assert config.tokenizer.chat_template_kwargs == {"enable_thinking": False}
    assert config.data.eval is None  # the later override wins
    assert config.output_dir == "runs/x"
    assert config.rollout.temperature == 2.0 and isinstance(config.rollout.temperature, float)


def test_yaml_reads_no_as_a_string_and_exponents_as_floats(tmp_path):
    # YAML 1.1 would read `no` as False and `5e-6` as a string.
    text = "loop: {mixed_precision: no}\noptim: {lr: 5e-6, max_grad_norm: 1E0}\n"
    config = load_config(write(tmp_path, text), REQUIRED)
    assert config.loop.mixed_precision == "no"
    assert (config.optim.lr, config.optim.max_grad_norm) == (5e-6, 1.0)


def test_views_default_to_the_objective_and_can_be_overridden():
    plain = load("objective.name=vanilla_opd")
    assert (plain.teacher_view, plain.priv_student_view) == ("plain", "privileged")
    assert (
        load("objective.name=vanilla_opd", "views.teacher=privileged").teacher_view == "privileged"
    )
    assert load("objective.name=dopd_no_privilege").priv_student_view == "plain"


ERRORS = [
    # (overrides, substrings the message must contain)
    (["optim.lrr=1"], ["optim.lrr", "did you mean optim.lr"]),
    (["rollout.temprature=0.5"], ["rollout.temprature", "rollout.temperature"]),
    (["student.pth=x"], ["student.pth", "student.path"]),
    (["nonsense=1"], ["nonsense", "valid keys"]),
    (["objective.top_kk=64"], ["objective.top_kk", "'top_k'"]),
    (["objective.name=dopdd"], ["objective.name='dopdd'", "'dopd'"]),
    (["objective.name=gkd", "objective.regimes=[LH]"], ["objective.regimes"]),
    (["optim.lr=abc"], ["optim.lr: expected float, got str 'abc'"]),
    (["optim.lr=.nan"], ["optim.lr", "finite"]),
    (["optim.lr=0"], ["optim.lr=0.0", "out of range"]),
    (["optim.betas=[0.9]"], ["optim.betas", "expected 2"]),
    (["optim.betas=[0.9, 1.0]"], ["optim.betas[1]=1.0"]),
    (["optim.warmup_steps=300"], ["optim.warmup_steps=300", "max_steps=200"]),
    (["rollout.num_generations=2.5"], ["rollout.num_generations: expected int, got float 2.5"]),
    (["rollout.num_generations=0"], ["rollout.num_generations=0"]),
    (["rollout.top_p=1.5"], ["rollout.top_p=1.5", "(0.0, 1.0]"]),
    (["rollout.temperature=0"], ["rollout.temperature=0.0"]),
    (["seed=9223372036854775808"], ["seed", "64-bit"]),
    (["loop.gradient_checkpointing=yes"], ["loop.gradient_checkpointing: expected bool"]),
    (["loop.mixed_precision=fp8"], ["loop.mixed_precision='fp8'", "'bf16'"]),
    (["loop.eval_every=5"], ["loop.eval_every=5", "data.eval"]),
    (["views.ema_decay=1.0"], ["views.ema_decay=1.0"]),
    (["views.teacher=both"], ["views.teacher='both'", "'plain'"]),
    (["views.priv_student_weights=frozen"], ["views.priv_student_weights='frozen'"]),
    (["objective.beta_weak=0.7"], ["objective.beta_weak=0.7", "beta_light"]),
    (["objective.beta_light=0.2", "objective.beta_weak=0.25"], ["objective.beta_weak=0.25"]),
    (["objective.top_k=abc"], ["objective.top_k: expected int, got str 'abc'"]),
    (["objective.regimes=LH"], ["objective.regimes: expected tuple[str, ...]"]),
    (["objective.regimes=[LH, XX]"], ["objective.regimes"]),
    (["student.path=null"], ["student.path=None and tiny=None"]),
    (["student.tiny={hidden_size: 8}"], ["student.path='student-model' and tiny="]),
    (["student.dtype=float8"], ["student.dtype='float8'"]),
    (["student=Qwen"], ["student: expected a mapping of ModelSpec keys, got str 'Qwen'"]),
    (["student.path=null", "student.tiny={}"], ["tokenizer.characters"]),
    (["tokenizer.path=t", "tokenizer.characters=ab"], ["tokenizer.path='t' and characters"]),
    (["reference.path=base"], ["reference", "exopd"]),
    (["data.privileged_template='{prompt}'"], ["data.privileged_template", "{privileged_context}"]),
    (["data.privileged_template={prompt}"], ["data.privileged_template: expected str, got dict"]),
    (["data.privileged_template='{prompt} {privileged_context'"], ["data.privileged_template"]),
    (["data.overlong_prompts=truncate"], ["data.overlong_prompts='truncate'"]),
    (["data.train="], ["data.train: expected str, got NoneType None"]),
    (["output_dir=''"], ["output_dir=''"]),
    (["optim.lr"], ["'optim.lr'", "key=value"]),
    (["=5"], ["'=5'", "key=value"]),
    (["optim..lr=1"], ["'optim..lr=1'"]),
    (["optim.betas=[0.9"], ["override optim.betas", "invalid YAML"]),
    (["student.path.x=1"], ["override student.path.x", "student.path='student-model'"]),
    (["seed.value=1"], ["seed: expected int, got dict"]),
]


@pytest.mark.parametrize(("overrides", "expected"), ERRORS, ids=[" ".join(o) for o, _ in ERRORS])
def test_bad_values_raise_config_error_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load(*overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message


def test_missing_data_train_is_named(tmp_path):
    path = write(tmp_path, "student: {path: s}\nteacher: {path: t}\ndata: {eval: e.jsonl}\n")
    with pytest.raises(ConfigError, match=r"^data\.train is required.*--set data\.train="):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^data is required"):
        load_config(None, REQUIRED[:2])


def test_unknown_nested_key_in_the_file_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, "rollout:\n  num_generation: 4\n")
    with pytest.raises(ConfigError, match=r"rollout\.num_generation .*rollout\.num_generations\?"):
        load_config(path, REQUIRED)


@pytest.mark.parametrize(
    ("text", "line"),
    [("output_dir: x\noptim:\n\tlr: 1\n", 3), ("a: 1\nb: [1, 2\nc: 3\n", 3), ("x: '\n", 2)],
)
def test_bad_yaml_names_the_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: invalid YAML"):
        load_config(path)


def test_missing_file_and_non_mapping_file_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"config\.yaml: expected a mapping.*list"):
        load_config(write(tmp_path, "- a\n- b\n"))


def dotted_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        keys.append(key)
        for hint in (get_type_hints(cls)[f.name], *get_args(get_type_hints(cls)[f.name])):
            if is_dataclass(hint):
                keys += dotted_keys(hint, key + ".")
    return keys


OPTION_KEYS = sorted({f"objective.{k}" for s in OBJECTIVES.values() for k in s.config_keys()})
PRINTABLE = st.characters(codec="utf-8", exclude_categories=("Cc", "Cs"))
KEYS = st.one_of(st.sampled_from(dotted_keys() + OPTION_KEYS), st.text(max_size=20))
PLAIN_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
VALUES = st.one_of(
    st.sampled_from(
        ["null", "0", "1", "0.5", "-1", "1e-3", "[LH, HT]", "true", "plain", "ema", "{}"]
    ),
    st.text(max_size=30),
    st.text(PRINTABLE, max_size=30),
    PLAIN_VALUES.map(lambda value: yaml.safe_dump(value, default_flow_style=True).strip()),
)
OVERRIDES = st.one_of(
    st.tuples(KEYS, VALUES).map(lambda pair: f"{pair[0]}={pair[1]}"), st.text(max_size=40)
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(OVERRIDES, min_size=1, max_size=3))
def test_random_overrides_raise_only_config_error(overrides):
    """Whatever arrives on the command line, the only exception is a ConfigError."""
    try:
        config = load_config(None, [*REQUIRED, *overrides])
    except ConfigError:
        return
    # Whatever loads also serialises to plain YAML.
    assert isinstance(yaml.safe_dump(config_to_dict(config)), str)
