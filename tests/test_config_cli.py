"""``dopd config --list`` / ``--show`` and the per-model ``attn_implementation``.

The listing is checked against an independent walk of ``TrainConfig``'s dataclasses, so a section
or key added anywhere in the config must show up in ``--list`` with its default and help.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_args, get_type_hints

import pytest
import torch

from dopd.cli import main
from dopd.config import ModelSpec, TokenizerSpec, TrainConfig, load_config, save_config
from dopd.config.listing import config_keys, format_config_keys
from dopd.config.loading import doc, from_dict, parse_yaml
from dopd.errors import ConfigError
from dopd.modeling.loading import build_tiny, check_sources, load_model
from tests.tolerance import REORDERED, assert_close

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_SPEC = {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64}


def leaf_fields(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> field of every non-section field of ``cls``, sections walked."""
    found = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.metadata.get("rest"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        nested = [h for h in (hints[f.name], *get_args(hints[f.name])) if is_dataclass(h)]
        if nested:
            found.update(leaf_fields(nested[0], key))
        else:
            found[key] = f
    return found


def plain(value: Any) -> Any:
    """YAML's view of a default: tuples are lists."""
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        status = main(list(argv))
    except SystemExit as exit_:  # argparse's own exits (--help, bad arguments)
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def listed(capsys) -> dict[str, str]:
    status, out, err = run(capsys, "config", "--list")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["key", "type", "=", "default", "help"]
    return {line.split()[0]: line for line in lines[1:]}


# ---------------------------------------------------------------------------------------------
# --list


def test_list_names_every_leaf_key_with_its_default_and_help(capsys):
    lines = listed(capsys)
    leaves = leaf_fields(TrainConfig)
    assert "rollout.vllm_mode" in leaves and "student.attn_implementation" in leaves
    for key, f in leaves.items():
        assert key in lines, f"{key} missing from dopd config --list"
        rest = lines[key][len(key) :].strip()
        help_text = " ".join(f.metadata["help"].split())
        assert rest.endswith(help_text), (key, rest)
        if f.default is MISSING and f.default_factory is MISSING:
            assert ", required  " in rest, (key, rest)
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        # "TYPE = DEFAULT  HELP": the default is the one-line YAML between " = " and the help.
        shown = re.split(r"\s{2,}", rest.split(" = ", 1)[1], maxsplit=1)[0]
        assert parse_yaml(shown, key) == plain(default), (key, shown)


def test_list_names_sections_and_the_objective_options(capsys):
    lines = listed(capsys)
    for section in ("student", "teacher", "data", "rollout", "optim", "loop", "peft"):
        assert lines[section][len(section) :].strip().startswith("section"), section
    assert "required" in lines["student"] and "required" not in lines["rollout"]
    assert "section | null = null" in lines["reference"]
    assert "objective.<option>" in lines


@dataclass(frozen=True, kw_only=True)
class Inner:
    rate: float = field(default=0.5, metadata=doc("a rate"))


@dataclass(frozen=True, kw_only=True)
class Outer:
    name: str = field(metadata=doc("a required name"))
    inner: Inner = field(default_factory=Inner, metadata=doc("a new section"))


def test_list_picks_up_a_new_section_without_a_hand_written_list():
    keys = {k.key: k for k in config_keys(Outer)}
    assert list(keys) == ["name", "inner", "inner.rate"]
    assert keys["name"].required and keys["inner"].section
    assert (keys["inner.rate"].type, keys["inner.rate"].default) == ("float", "0.5")
    table = format_config_keys(list(keys.values())).splitlines()
    assert re.fullmatch(r"inner\.rate\s+float = 0\.5\s+a rate", table[-1])


def test_list_refuses_set_in_one_line(capsys):
    status, out, err = run(capsys, "config", "--list", "--set", "optim.lr=1")
    assert (status, out) == (2, "")
    assert err.startswith("dopd: error: ") and err.count("\n") == 1 and "--show" in err


def test_train_help_points_to_the_listing(capsys):
    status, out, _ = run(capsys, "train", "--help")
    assert status == 0 and "dopd config --list" in " ".join(out.split())


# ---------------------------------------------------------------------------------------------
# --show


SETS = ("optim.lr=1e-5", "student.attn_implementation=eager", "teacher.dtype=bfloat16")


def test_show_prints_the_resolved_config_that_loads_back_equal(capsys, tmp_path):
    args = [item for override in SETS for item in ("--set", override)]
    status, out, err = run(capsys, "config", "--show", str(TINY), *args)
    assert (status, err) == (0, "")
    expected = load_config(TINY, SETS)
    assert from_dict(TrainConfig, parse_yaml(out, "stdout")) == expected
    assert expected.student.attn_implementation == "eager" and expected.optim.lr == 1e-5
    save_config(expected, tmp_path / "config.yaml")  # what a run records in output_dir
    assert out == (tmp_path / "config.yaml").read_text(encoding="utf-8")


def test_show_of_a_real_config_is_offline(capsys):
    status, out, _ = run(
        capsys, "config", "--show", str(ROOT / "configs" / "qwen3-8b-to-1.7b.yaml")
    )
    assert status == 0 and "path: Qwen/Qwen3-8B" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--show", "missing.yaml"], "missing.yaml: config file not found; check the path given "),
        (["--show", str(TINY), "--set", "optim.lrr=1"], "optim.lrr is not a config key"),
        (
            ["--show", str(TINY), "--set", "teacher.attn_implementation=flash"],
            "teacher.attn_implementation='flash' is not allowed",
        ),
        (["--show", "BAD"], "BAD:2: invalid YAML"),
        ([], "one of the arguments --list --show is required"),
        (["--list", "--show", str(TINY)], "not allowed with argument --list"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(capsys, tmp_path, argv, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [\n", encoding="utf-8")
    argv = [str(bad) if item == "BAD" else item for item in argv]
    status, out, err = run(capsys, "config", *argv)
    assert (status, out) == (2, "")
    assert err.count("\n") == 1 and err.startswith("dopd"), err
    assert needle.replace("BAD", str(bad)) in err, err


def test_show_names_its_own_flag_for_a_missing_file(capsys):
    _, _, err = run(capsys, "config", "--show", "missing.yaml")
    assert err.rstrip().endswith("check the path given to --show")


# ---------------------------------------------------------------------------------------------
# attn_implementation and dtype, per model


def test_attn_implementation_validation_names_the_key():
    with pytest.raises(
        ConfigError, match=r"^attn_implementation='fast' is not allowed; use one of"
    ):
        ModelSpec(path="x", attn_implementation="fast")
    for role in ("student", "teacher", "reference"):
        with pytest.raises(ConfigError, match=rf"^{role}\.attn_implementation='fast' is not"):
            load_config(
                TINY, [f"{role}.path=x", f"{role}.tiny=null", f"{role}.attn_implementation=fast"]
            )
    with pytest.raises(ConfigError, match=r"^student\.tiny\.attn_implementation is set by "):
        build_tiny({"attn_implementation": "eager"}, None, seed=0, key="student.tiny")
    assert TokenizerSpec().path is None  # still importable from dopd.config


@pytest.mark.skipif(
    any(importlib.util.find_spec(name) for name in ("flash_attn", "kernels")),
    reason="a flash-attention package is installed here",
)
def test_a_missing_attention_kernel_names_the_key_before_training(tmp_path):
    config = load_config(TINY, ["student.attn_implementation=flash_attention_2"])
    with pytest.raises(ConfigError, match=r"^student\.attn_implementation='flash_attention_2': "):
        check_sources(config)  # the fail-fast check, before any weights or output_dir


def tiny_logits(model: torch.nn.Module, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    batch = tokenizer(["12+3=", "7*8=15"], padding=True, return_tensors="pt")
    mask = batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model.eval()(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=positions
        ).logits
    return logits, mask.bool()


def test_eager_and_sdpa_give_the_same_logits(tokenizer):
    logits = {}
    for attention in ("eager", "sdpa"):
        spec = ModelSpec(tiny=TINY_SPEC, attn_implementation=attention)
        model = load_model(spec, tokenizer, seed=3, key="student")
        assert model.config._attn_implementation == attention
        logits[attention], valid = tiny_logits(model, tokenizer)
    assert not valid.all()  # left padding: the masks matter
    assert_close(logits["sdpa"][valid], logits["eager"][valid], ulps=REORDERED)


def test_a_path_model_gets_its_own_attention_and_dtype(tokenizer, tmp_path):
    source = load_model(ModelSpec(tiny=TINY_SPEC), tokenizer, seed=3)
    source.save_pretrained(tmp_path / "model")
    path = str(tmp_path / "model")
    eager = load_model(ModelSpec(path=path, attn_implementation="eager"), tokenizer, seed=0)
    sdpa = load_model(ModelSpec(path=path, attn_implementation="sdpa"), tokenizer, seed=0)
    half = load_model(ModelSpec(path=path, dtype="bfloat16"), tokenizer, seed=0)
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == (
        "eager",
        "sdpa",
    )
    assert (eager.dtype, half.dtype) == (torch.float32, torch.bfloat16)
    first, valid = tiny_logits(eager, tokenizer)
    second, _ = tiny_logits(sdpa, tokenizer)
    assert_close(second[valid], first[valid], ulps=REORDERED)
    assert_close(first[valid], tiny_logits(source, tokenizer)[0][valid], ulps=REORDERED)


def test_a_tiny_model_gets_its_dtype(tokenizer):
    spec = ModelSpec(tiny=TINY_SPEC, dtype="bfloat16")
    assert load_model(spec, tokenizer, seed=0).dtype == torch.bfloat16
    assert load_model(ModelSpec(tiny=TINY_SPEC), tokenizer, seed=0).dtype == torch.float32
