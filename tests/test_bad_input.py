"""Bad input through the command line, the safety guarantees, and the vocabulary rule.

Every bad input must end with exactly one ``dopd: error: ...`` line on stderr naming what is wrong,
where (file:line or config key) and the fix; exit status 2; no traceback (unless ``--debug``); and
nothing in ``output_dir``. Runs in-process through ``dopd.cli.main`` from the repository root
(``configs/tiny.yaml`` names its data relative to it). The case tables here are the ones
docs/reliability.md counts.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

import dopd.modeling.loading
from dopd.cli import main
from dopd.config import ModelSpec, TokenizerSpec, load_config
from dopd.errors import ConfigError
from dopd.io.data import load_examples, tokenize_views
from dopd.modeling.loading import (
    check_sources,
    common_vocabulary,
    load_model,
    load_tokenizer,
    output_size,
)
from dopd.modeling.tiny import build_char_tokenizer, build_tiny_model
from dopd.viz.tokens import render_rollouts_html

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
LAB = ROOT / "src" / "dopd" / "lab" / "checkpoints" / "arithmetic"
TINY = load_config(CONFIG)
TOKENS = len(build_char_tokenizer(TINY.tokenizer.characters))  # the tiny config's vocabulary
GOOD = '{"prompt": "1+1=", "privileged_context": "add"}'


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def train(
    capsys, output_dir: Path, *overrides: str, config: Path = CONFIG, flags=()
) -> tuple[int, str]:
    """Run ``dopd train`` on ``config`` with ``--set`` overrides; ``(exit status, stderr)``."""
    argv = ["train", "--config", str(config), *flags, "--set", f"output_dir={output_dir}"]
    for override in ("loop.eval_every=0", *overrides):
        argv += ["--set", override]
    capsys.readouterr()
    status = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return status, captured.err


def refused(status: int, stderr: str, output_dir: Path, *expected: str) -> str:
    """Assert the bad-input contract; return the error line."""
    lines = [line for line in stderr.splitlines() if line.startswith("dopd")]  # not warnings/bars
    assert status == 2, (status, stderr)
    assert len(lines) == 1 and lines[0].startswith("dopd: error: "), lines
    for part in expected:
        assert part in lines[0], (part, lines[0])
    assert not output_dir.exists() or not any(output_dir.iterdir())
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Dataset files: (file name, content or None for absent, expected parts; {path} is the file)

DATA_CASES = {
    "missing file": ("absent.jsonl", None, ["{path}: no such file", "fix"]),
    "empty file": ("empty.jsonl", b"", ["{path}: no examples found", "fix"]),
    "only blank lines": ("blank.jsonl", b"\n \n", ["{path}: no examples found"]),
    "malformed JSON": (
        "bad.jsonl",
        f"{GOOD}\n{{not json\n".encode(),
        ["{path}:2: invalid JSON", "fix"],
    ),
    "non-UTF-8": (
        "latin1.jsonl",
        f"{GOOD}\n".encode() + b'{"prompt": "caf\xe9"}\n',
        ["{path}:2: not valid UTF-8", "fix"],
    ),
    "row not an object": ("list.jsonl", b'["1+1=", "add"]\n', ["{path}:1: expected an object"]),
    "row lacks prompt": (
        "noprompt.jsonl",
        b'{"privileged_context": "add"}\n',
        ["{path}:1: missing field 'prompt'"],
    ),
    "row lacks privileged_context": (
        "nocontext.jsonl",
        b'{"prompt": "1+1="}\n',
        ["{path}:1: missing field 'privileged_context'"],
    ),
    "prompt wrong type": (
        "type.jsonl",
        b'{"prompt": 5, "privileged_context": "add"}\n',
        ["{path}:1: prompt=5"],
    ),
    "context wrong type": (
        "ctx.jsonl",
        b'{"prompt": "1+1=", "privileged_context": ["add"]}\n',
        ["{path}:1: privileged_context=['add'] has type list"],
    ),
    "answer wrong type": (
        "answer.jsonl",
        b'{"prompt": "1+1=", "privileged_context": "add", "answer": 2}\n',
        ["{path}:1: answer=2 has type int"],
    ),
    "empty prompt": (
        "emptyprompt.jsonl",
        b'{"prompt": "", "privileged_context": "add"}\n',
        ["{path}:1: prompt is empty"],
    ),
    "blank context": (
        "blankctx.jsonl",
        b'{"prompt": "1+1=", "privileged_context": "  "}\n',
        ["{path}:1: privileged_context is empty"],
    ),
    "bad chat message": (
        "chat.jsonl",
        b'{"prompt": [{"role": "user"}], "privileged_context": "add"}\n',
        ["{path}:1: prompt[0]=", "role/content"],
    ),
    "lone surrogate": (
        "surrogate.jsonl",
        b'{"prompt": "\\ud800", "privileged_context": "add"}\n',
        ["{path}:1: prompt holds the unpaired surrogate"],
    ),
    "JSON not a list": (
        "object.json",
        GOOD.encode(),
        ["{path}: top level is a dict", "list of objects"],
    ),
    "JSON nested too deeply": ("deep.json", b"[" * 100_000, ["{path}: JSON nested too deeply"]),
    "directory": ("folder.jsonl", "dir", ["{path}: is a directory"]),
    "unsupported file type": (
        "data.csv",
        b"prompt,privileged_context\n",
        ["{path}: unsupported file type '.csv'"],
    ),
    "corrupt Parquet": ("data.parquet", b"not parquet", ["{path}: not a readable Parquet file"]),
}


def make_file(directory: Path, name: str, content) -> Path:
    path = directory / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    return path


# Evaluation rows need no privileged context (tests/test_data_layouts.py): that case is bad input
# for data.train only.
BAD_DATASETS = [
    (key, case)
    for key in ("data.train", "data.eval")
    for case in DATA_CASES
    if not (key == "data.eval" and case == "row lacks privileged_context")
]


@pytest.mark.parametrize(("key", "case"), BAD_DATASETS, ids=[f"{k}-{c}" for k, c in BAD_DATASETS])
def test_bad_dataset_is_one_line_naming_file_and_line(tmp_path, capsys, case, key):
    name, content, expected = DATA_CASES[case]
    path = make_file(tmp_path, name, content)
    output_dir = tmp_path / "run"
    status, stderr = train(capsys, output_dir, f"{key}={path}")
    refused(status, stderr, output_dir, *(part.format(path=path) for part in expected))


# ---------------------------------------------------------------------------------------------
# Config: --set overrides (expected parts of the message)

CONFIG_CASES = {
    "unknown top-level key": (
        ["outptu_dir=x"],
        ["outptu_dir is not a config key", "did you mean output_dir?"],
    ),
    "unknown nested key": (["optim.lrr=1"], ["optim.lrr", "did you mean optim.lr?"]),
    "unknown objective option": (["objective.top_kk=3"], ["objective.top_kk", "'top_k'"]),
    "unknown objective": (["objective.name=dopdd"], ["objective.name='dopdd'", "'dopd'"]),
    "wrong type float": (["optim.lr=abc"], ["optim.lr: expected float, got str 'abc'"]),
    "wrong type int": (["rollout.num_generations=2.5"], ["rollout.num_generations: expected int"]),
    "wrong type bool": (
        ["student.trust_remote_code=yes"],
        ["student.trust_remote_code: expected bool"],
    ),
    "wrong type section": (["student=Qwen"], ["student: expected a mapping of ModelSpec keys"]),
    "top_k = 0": (["objective.top_k=0"], ["objective.top_k=0", ">= 1"]),
    "top_k < 0": (["objective.top_k=-3"], ["objective.top_k=-3", ">= 1"]),
    "beta_weak = beta_light": (
        ["objective.beta_weak=0.6"],
        ["objective.beta_weak=0.6", "beta_light=0.6"],
    ),
    "beta_weak > beta_light": (
        ["objective.beta_light=0.2", "objective.beta_weak=0.5"],
        ["objective.beta_weak=0.5"],
    ),
    "trim_quantile = 0": (
        ["objective.trim_quantile=0"],
        ["objective.trim_quantile=0.0", "(0.0, 1.0]"],
    ),
    "trim_quantile > 1": (
        ["objective.trim_quantile=1.5"],
        ["objective.trim_quantile=1.5", "(0.0, 1.0]"],
    ),
    "trim_quantile < 0": (["objective.trim_quantile=-0.1"], ["objective.trim_quantile=-0.1"]),
    "lr = 0": (["optim.lr=0"], ["optim.lr=0.0", "out of range"]),
    "seed < 0": (["seed=-1"], ["seed=-1"]),
    "non-finite float": (["optim.lr=.inf"], ["optim.lr", "finite"]),
    "bad choice": (
        ["data.overlong_prompts=truncate"],
        ["data.overlong_prompts='truncate'", "'skip'"],
    ),
    "template field": (
        ["data.privileged_template='{prompt}'"],
        ["data.privileged_template", "{privileged_context}"],
    ),
    "template format spec": (
        ["data.privileged_template='{prompt:>9} {privileged_context}'"],
        ["'{prompt:>9}'", "plain {prompt}"],
    ),
    "trust without path": (
        ["tokenizer.trust_remote_code=true"],
        ["tokenizer.trust_remote_code=True", "tokenizer.path"],
    ),
    "not UTF-8 text": (['output_dir="run\\ud800"'], ["output_dir=", "not valid UTF-8"]),
    "override without =": (["optim.lr"], ["override 'optim.lr' is not key=value"]),
    "override without key": (["=5"], ["override '=5' is not key=value"]),
    "override bad YAML": (["optim.betas=[0.9"], ["override optim.betas:1: invalid YAML"]),
    "override into a scalar": (["seed.value=1"], ["override seed.value: seed=0 is not a section"]),
    "unknown rollout backend": (
        ["rollout.backend=sglang"],
        ["rollout.backend='sglang'", "'hf'", "'vllm'"],
    ),
    "unknown vllm mode": (["rollout.vllm_mode=remote"], ["rollout.vllm_mode='remote'", "'server'"]),
    "tensor parallel colocated": (
        ["rollout.backend=vllm", "rollout.vllm_tensor_parallel_size=2"],
        ["vllm_tensor_parallel_size=2", "vllm_mode=server"],
    ),
    "memory fraction > 1": (
        ["rollout.vllm_gpu_memory_utilization=1.5"],
        ["rollout.vllm_gpu_memory_utilization=1.5"],
    ),
    "importance correction without sampled terms": (
        ["objective.importance_correction=truncated"],
        ["importance_correction='truncated'", "dopd"],
    ),
    "importance cap < 1": (
        ["objective.name=vanilla_opd", "objective.importance_cap=0.5"],
        ["objective.importance_cap=0.5"],
    ),
    "eval without data": (
        ["data.eval=null", "loop.eval_every=5"],
        ["loop.eval_every=5", "data.eval"],
    ),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config_value_is_one_line_naming_the_key(tmp_path, capsys, case):
    overrides, expected = CONFIG_CASES[case]
    output_dir = tmp_path / "run"
    refused(*train(capsys, output_dir, *overrides), output_dir, *expected)


CONFIG_FILES = {
    "missing file": (None, ["{config}: config file not found", "--config"]),
    "python object tag": (
        b"output_dir: x\nstudent: !!python/object/apply:os.system ['touch {marker}']\n",
        ["{config}:2: invalid YAML", "python/object/apply:os.system", "safe loader"],
    ),
    "python name tag": (
        b"seed: !!python/name:os.system\n",
        ["{config}:1: invalid YAML", "python/name:os.system"],
    ),
    "invalid YAML": (b"output_dir: x\noptim:\n\tlr: 1\n", ["{config}:3: invalid YAML", "fix"]),
    "non-UTF-8": (b"output_dir: x\nseed: \xff\n", ["{config}:2: not valid UTF-8", "fix"]),
    "not a mapping": (b"- a\n- b\n", ["{config}: expected a mapping of config sections, got list"]),
    "empty": (b"", ["student is required but missing", "--set student=..."]),
    "unknown key in the file": (
        CONFIG.read_bytes().replace(b"max_steps", b"max_step"),
        ["optim.max_step", "did you mean optim.max_steps?"],
    ),
}


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_colocate_without_vllm_is_one_line_naming_the_setup(tmp_path, capsys):
    output_dir = tmp_path / "run"
    refused(
        *train(capsys, output_dir, "rollout.backend=vllm"),
        output_dir,
        "rollout.backend='vllm': vLLM is not importable",
        "bash scripts/setup.sh --vllm",
    )


def test_vllm_server_mode_without_a_server_is_one_line(tmp_path, capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    output_dir = tmp_path / "run"
    overrides = ("rollout.backend=vllm", "rollout.vllm_mode=server")
    overrides += (f"rollout.vllm_server_port={port}", "rollout.vllm_server_timeout=0.5")
    refused(
        *train(capsys, output_dir, *overrides),
        output_dir,
        f"no vLLM server answered at http://127.0.0.1:{port} within 0.5 s",
        "dopd vllm-serve",
    )


@pytest.mark.parametrize("case", CONFIG_FILES, ids=list(CONFIG_FILES))
def test_bad_config_file_is_one_line_naming_file_and_line(tmp_path, capsys, case):
    content, expected = CONFIG_FILES[case]
    marker = tmp_path / "executed"
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_bytes(content.replace(b"{marker}", str(marker).encode()))
    output_dir = tmp_path / "run"
    status, stderr = train(capsys, output_dir, config=config)
    refused(status, stderr, output_dir, *(part.format(config=config) for part in expected))
    assert not marker.exists()  # the YAML tag built nothing and ran nothing


# ---------------------------------------------------------------------------------------------
# Models and tokenizers


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Broken and odd model folders, built from the lab's tiny checkpoints."""
    root = tmp_path_factory.mktemp("models")
    broken_tokenizer = shutil.copytree(LAB / "student", root / "broken-tokenizer")
    (broken_tokenizer / "tokenizer.json").write_text("{broken")
    broken_config = shutil.copytree(LAB / "teacher", root / "broken-config")
    (broken_config / "config.json").write_text("{broken")
    no_eos = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    )
    no_eos.save_pretrained(root / "no-eos")
    custom = root / "custom-code"
    custom.mkdir()
    (custom / "config.json").write_text(
        json.dumps(
            {
                "model_type": "dopd-custom",
                "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"},
            }
        )
    )
    (custom / "configuration_custom.py").write_text(
        f"open({str(root / 'EXECUTED')!r}, 'w').write('remote code ran')\n"
    )
    (root / "file").write_text("not a folder")
    return {path.name: path for path in root.iterdir()} | {"root": root}


MODEL_CASES = {
    "student path missing": (
        ["student.path=/no/such/student", "student.tiny=null", "tokenizer.characters=null"],
        ["student.path='/no/such/student': no such directory", "fix"],
    ),
    "student hub id not cached": (
        ["student.path=nobody/no-such-model", "student.tiny=null", "tokenizer.characters=null"],
        ["student.path='nobody/no-such-model'", "HF_HUB_OFFLINE=1", "fix"],
    ),
    "teacher path missing": (
        ["teacher.path=runs/no/teacher", "teacher.tiny=null"],
        ["teacher.path='runs/no/teacher': no such directory"],
    ),
    "teacher path is a file": (
        ["teacher.path={file}", "teacher.tiny=null"],
        ["teacher.path=", "is a file, not a model folder"],
    ),
    "reference path missing": (
        ["objective.name=exopd", "reference.path=/no/such/reference"],
        ["reference.path='/no/such/reference': no such directory"],
    ),
    "tokenizer path missing": (
        ["tokenizer.path=/no/such/tokenizer", "tokenizer.characters=null"],
        ["tokenizer.path='/no/such/tokenizer': no such directory"],
    ),
    "broken tokenizer": (
        ["student.path={broken-tokenizer}", "student.tiny=null", "tokenizer.characters=null"],
        ["student.path=", "cannot load this folder", "fix"],
    ),
    "broken config.json": (
        ["teacher.path={broken-config}", "teacher.tiny=null"],
        ["teacher.path=", "cannot load this folder", "config.json"],
    ),
    "tokenizer lacks eos": (
        ["tokenizer.path={no-eos}", "tokenizer.characters=null"],
        ["tokenizer.path=", "no eos_token", "fix"],
    ),
    "teacher tokenizer disagrees": (
        ["teacher.path=" + str(LAB / "teacher"), "teacher.tiny=null"],
        ["teacher.path=", "at id 4 where the shared tokenizer has", "one tokenizer family"],
    ),
    "teacher head too small": (
        ["teacher.tiny={hidden_size: 64, vocab_size: 40}"],
        [f"student output size {TOKENS}", "teacher output size 40", f"{TOKENS} ids"],
    ),
    "student head too small": (
        ["student.tiny={vocab_size: 10}"],
        ["student output size 10", f"teacher output size {TOKENS}"],
    ),
    "remote code refused": (
        ["teacher.path={custom-code}", "teacher.tiny=null"],
        ["teacher.path=", "custom code", "set teacher.trust_remote_code: true, only if you trust"],
    ),
    "tiny key typo": (
        ["student.tiny={hiden_size: 64}"],
        [
            "student.tiny.hiden_size is not a Qwen3Config key",
            "did you mean student.tiny.hidden_size?",
        ],
    ),
    "tiny reserved key": (
        ["student.tiny={eos_token_id: 3}"],
        ["student.tiny.eos_token_id is set by the tokenizer"],
    ),
    "tiny unbuildable": (
        ["teacher.tiny={hidden_size: abc}"],
        ["teacher.tiny=", "cannot build a Qwen3 model"],
    ),
}


@pytest.mark.parametrize("case", MODEL_CASES, ids=list(MODEL_CASES))
def test_bad_model_source_is_one_line_naming_the_key(tmp_path, capsys, model_dirs, case):
    overrides, expected = MODEL_CASES[case]
    for name, path in model_dirs.items():
        overrides = [override.replace(f"{{{name}}}", str(path)) for override in overrides]
    output_dir = tmp_path / "run"
    refused(*train(capsys, output_dir, *overrides), output_dir, *expected)
    assert not (model_dirs["root"] / "EXECUTED").exists()


# ---------------------------------------------------------------------------------------------
# Prompts longer than the context window, output_dir, arguments, --debug, internal errors


def test_overlong_prompts_error_mode_and_all_skipped(tmp_path, capsys):
    output_dir = tmp_path / "run"
    status, stderr = train(
        capsys, output_dir, "data.max_prompt_length=5", "data.overlong_prompts=error"
    )
    refused(
        status,
        stderr,
        output_dir,
        "64 prompts exceed data.max_prompt_length=5",
        "overlong_prompts=skip",
    )
    status, stderr = train(capsys, output_dir, "data.max_prompt_length=5")
    refused(status, stderr, output_dir, "every prompt is longer than data.max_prompt_length=5")


def test_overlong_prompts_are_skipped_with_a_counted_warning(tmp_path, capsys):
    from dopd.training.trainer import Trainer

    examples = load_examples(TINY.data.train)
    plain, privileged = tokenize_views(examples, build_char_tokenizer(TINY.tokenizer.characters))
    lengths = sorted(max(len(p), len(q)) for p, q in zip(plain, privileged))
    limit = lengths[len(lengths) // 2]
    skipped = sum(length > limit for length in lengths)
    assert 0 < skipped < len(examples)
    config = load_config(
        CONFIG, [f"output_dir={tmp_path / 'run'}", f"data.max_prompt_length={limit}"]
    )
    capsys.readouterr()
    trainer = Trainer(config)
    out = capsys.readouterr().out
    # Once for data.train and once for data.eval (the same file in the tiny config).
    for key in ("data.train", "data.eval"):
        assert out.count(f"warning: {key}=") == 1
    assert (
        out.count(
            f": skipped {skipped} of {len(examples)} prompts longer than "
            f"data.max_prompt_length={limit}"
        )
        == 2
    )
    assert len(trainer.prompts["plain"]) == len(examples) - skipped


def test_non_empty_output_dir_is_refused_and_left_alone(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("an earlier run")
    status, stderr = train(capsys, output_dir)
    lines = [line for line in stderr.splitlines() if line.startswith("dopd")]
    assert status == 2 and len(lines) == 1
    assert (
        lines[0].startswith("dopd: error: output_dir")
        and "--resume" in lines[0]
        and "--overwrite" in lines[0]
    )
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]


def test_overwrite_with_a_bad_dataset_leaves_the_old_run_alone(tmp_path, capsys):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("an earlier run")
    missing = tmp_path / "missing.jsonl"
    status, stderr = train(capsys, output_dir, f"data.train={missing}", flags=["--overwrite"])
    assert status == 2 and str(missing) in stderr
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train"], "the following arguments are required: --config"),
        (
            ["train", "--config", "c.yaml", "--stop-after", "0"],
            "expected a positive integer, got '0'",
        ),
        (["trian"], "invalid choice: 'trian'"),
    ],
)
def test_bad_arguments_are_one_line(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    lines = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1
    assert "error:" in lines[0] and expected in lines[0] and "--help" in lines[0]


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, where):
    args = [
        "train",
        "--config",
        str(CONFIG),
        "--set",
        "optim.lrr=1",
        "--set",
        f"output_dir={tmp_path}",
    ]
    argv = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(ConfigError, match="did you mean optim.lr"):
        main(argv)


def test_unexpected_error_is_one_line_suggesting_debug(tmp_path, capsys, monkeypatch):
    def broken(config):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(dopd.modeling.loading, "check_sources", broken)
    status, stderr = train(capsys, tmp_path / "run")
    lines = [line for line in stderr.splitlines() if line.strip()]
    expected = (
        "dopd: internal error: RuntimeError: boom second line; "
        "rerun with --debug for the traceback and report it"
    )
    assert status == 1 and lines == [expected]
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "train", "--config", str(CONFIG)])


@pytest.mark.parametrize(
    ("model", "data", "expected"),
    [
        ("{tmp}", "configs/data/tiny.jsonl", "--model='{tmp}': cannot load this folder"),
        (str(LAB / "student"), "{tmp}/absent.jsonl", "{tmp}/absent.jsonl: no such file"),
    ],
)
def test_eval_bad_model_folder_or_data_is_one_line(tmp_path, capsys, model, data, expected):
    args = [arg.replace("{tmp}", str(tmp_path)) for arg in (model, data, expected)]
    capsys.readouterr()
    status = main(["eval", "--model", args[0], "--data", args[1]])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("dopd")]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("dopd: error: "), lines
    assert args[2] in lines[0] and "Traceback" not in captured.err


def test_multi_line_messages_print_on_one_line(tmp_path, capsys):
    status, stderr = train(
        capsys, tmp_path / "run", "data.train=" + json.dumps(str(tmp_path / "a\nb.jsonl"))
    )
    assert status == 2 and len(stderr.splitlines()) == 1 and "a b.jsonl" in stderr


# ---------------------------------------------------------------------------------------------
# Safety: trust_remote_code, YAML, shell, HTML


class Recorder:
    """Stands in for an Auto* class: records each from_pretrained call and returns ``result``."""

    def __init__(self, result):
        self.calls, self.result = [], result

    def from_pretrained(self, path, **kwargs):
        self.calls.append((path, kwargs))
        return self.result


class FakeConfig:
    vocab_size = 10_000

    def get_text_config(self):
        return self


@pytest.fixture
def recorders(monkeypatch) -> dict[str, Recorder]:
    tokenizer = build_char_tokenizer("abc")
    fakes = {
        "AutoTokenizer": Recorder(tokenizer),
        "AutoModelForCausalLM": Recorder("model"),
        "AutoConfig": Recorder(FakeConfig()),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(dopd.modeling.loading, name, fake)
    return fakes


def test_trust_remote_code_is_off_by_default_everywhere():
    config = load_config(
        None,
        [
            "student.path=s",
            "teacher.path=t",
            "data.train=d.jsonl",
            "objective.name=exopd",
            "reference.path=r",
        ],
    )
    assert not any(
        spec.trust_remote_code
        for spec in (config.student, config.teacher, config.reference, config.tokenizer)
    )
    assert (
        ModelSpec(path="x").trust_remote_code is False
        and TokenizerSpec().trust_remote_code is False
    )


def test_each_model_passes_its_own_trust_flag(recorders):
    tokenizer = build_char_tokenizer("abc")
    load_model(ModelSpec(path="trusted"), tokenizer, seed=0)
    load_model(ModelSpec(path="trusted", trust_remote_code=True), tokenizer, seed=0)
    assert [
        kwargs["trust_remote_code"] for _, kwargs in recorders["AutoModelForCausalLM"].calls
    ] == [False, True]
    # The tokenizer: its own flag with tokenizer.path, else the student's (it is the student's).
    load_tokenizer(TokenizerSpec(path="tok"), ModelSpec(path="s", trust_remote_code=True))
    load_tokenizer(TokenizerSpec(path="tok", trust_remote_code=True), ModelSpec(path="s"))
    load_tokenizer(TokenizerSpec(), ModelSpec(path="s", trust_remote_code=True))
    calls = [
        (path, kwargs["trust_remote_code"]) for path, kwargs in recorders["AutoTokenizer"].calls
    ]
    assert calls == [("tok", False), ("tok", True), ("s", True)]


def test_preflight_checks_pass_each_models_own_flag(recorders):
    config = load_config(
        None,
        [
            "student.path=s",
            "teacher.path=t",
            "teacher.trust_remote_code=true",
            "data.train=d.jsonl",
            "objective.name=exopd",
            "reference.path=r",
        ],
    )
    check_sources(config)
    flags = {path: kwargs["trust_remote_code"] for path, kwargs in recorders["AutoConfig"].calls}
    assert flags == {"s": False, "t": True, "r": False}
    tokenizer_flags = {
        path: kwargs["trust_remote_code"] for path, kwargs in recorders["AutoTokenizer"].calls
    }
    assert tokenizer_flags == {
        "s": False,
        "t": True,
        "r": False,
    }  # shared (student's), then each own


def test_remote_code_is_never_run_without_the_flag(model_dirs):
    with pytest.raises(ConfigError, match="teacher.trust_remote_code: true"):
        load_model(
            ModelSpec(path=str(model_dirs["custom-code"])),
            build_char_tokenizer("ab"),
            seed=0,
            key="teacher",
        )
    assert not (model_dirs["root"] / "EXECUTED").exists()


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path):
    tokenizer = build_char_tokenizer("ab")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(TokenizerSpec(path=str(tmp_path)), ModelSpec(path="s"))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


SHELL_CALLS = {
    "system",
    "popen",
    "spawnl",
    "spawnlp",
    "spawnv",
    "spawnvp",
    "execv",
    "execvp",
    "execl",
    "execlp",
    "getoutput",
    "getstatusoutput",
}


def test_no_config_value_reaches_a_shell():
    """No shell and no eval/exec anywhere in the package; the one subprocess call has a fixed
    argument list (the lab's ``git rev-parse``)."""
    subprocess_calls = []
    for path in sorted((ROOT / "src" / "dopd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom):
                assert node.module not in {"subprocess", "os", "commands", "pty"}, where
            if not isinstance(node, ast.Call):
                continue
            if isinstance(node.func, ast.Name):
                assert node.func.id not in {"eval", "exec", "__import__"}, where
            owner_name = getattr(getattr(node.func, "value", None), "id", "")
            name = getattr(node.func, "attr", "")
            assert not (owner_name == "os" and name in SHELL_CALLS), f"{where}: os.{name}"
            assert not any(k.arg == "shell" for k in node.keywords), f"{where}: shell="
            if owner_name == "subprocess":
                argv = node.args[0]
                assert isinstance(argv, ast.List) and all(
                    isinstance(a, ast.Constant) for a in argv.elts
                ), f"{path}:{node.lineno}: subprocess argv must be a literal list"
                subprocess_calls.append((path.name, [a.value for a in argv.elts]))
    assert subprocess_calls == [("commands.py", ["git", "rev-parse", "--short", "HEAD"])]


def test_html_escapes_script_in_every_field():
    script = "<script>alert(1)</script>"
    page = render_rollouts_html(
        [
            {
                "prompt": script,
                "tokens": [script, "\n" + script],
                "regimes": [script, "HT"],
                "q_teacher": [0.1, 0.2],
                "q_student": [0.3, 0.4],
                "gap": [0.5, 0.6],
                "answer": script,
                "completion": script,
                "correct": True,
            }
        ],
        title=script,
        legend={script: script, "HT": script},
    )
    assert "<script" not in page and page.count("&lt;script&gt;") >= 9


# ---------------------------------------------------------------------------------------------
# The vocabulary rule


def test_vocabulary_rule_accepts_padded_heads_and_returns_the_common_size():
    assert common_vocabulary({"student": 151_936, "teacher": 151_936}, 151_669) == 151_936
    assert common_vocabulary({"student": 151_936, "teacher": 152_064}, 151_669) == 151_936
    assert common_vocabulary({"student": TOKENS}, TOKENS) == TOKENS


def test_vocabulary_rule_refuses_a_head_smaller_than_the_tokenizer():
    with pytest.raises(ConfigError) as error:
        common_vocabulary({"student": 151_936, "teacher": 151_000}, 151_669)
    message = str(error.value)
    assert "student output size 151936" in message and "teacher output size 151000" in message
    assert "151669 ids" in message and "teacher too small" in message


def test_vocabulary_rule_on_model_heads():
    tokenizer = build_char_tokenizer("abcdef")  # 10 ids
    student, padded, small = (
        build_tiny_model(size, hidden_size=8, num_hidden_layers=1) for size in (10, 16, 8)
    )
    assert (
        common_vocabulary(
            {"student": output_size(student), "teacher": output_size(padded)}, len(tokenizer)
        )
        == 10
    )
    assert (
        common_vocabulary(
            {"student": output_size(padded), "teacher": output_size(padded)}, len(tokenizer)
        )
        == 16
    )
    with pytest.raises(ConfigError, match="teacher output size 8"):
        common_vocabulary(
            {"student": output_size(student), "teacher": output_size(small)}, len(tokenizer)
        )
