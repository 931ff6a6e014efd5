"""End-to-end tests of the ``dopd`` command line, run in-process through ``dopd.cli.main``.

One short tiny-config training run (module fixture) feeds the output, refusal and eval tests.
``configs/tiny.yaml`` names its data relative to the repository root, so training runs there.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dopd.cli import main
from dopd.config import load_config
from dopd.errors import ConfigError
from dopd.objectives.registry import OBJECTIVES
from tests.tolerance import REORDERED, assert_close

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny.jsonl"
STEPS = 2
METRIC_KEYS = {
    "loss",
    "fraction/LH",
    "fraction/LL",
    "fraction/HT",
    "fraction/HS",
    "threshold/A",
    "threshold/q_student",
    "threshold/q_teacher",
    "advantage_gap_mean",
    "student_entropy",
    "completion_length",
    "truncated_fraction",
    "tokens_per_second",
    "time/step",
}


def train_args(output_dir: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(CONFIG),
        "--set",
        f"output_dir={output_dir}",
        "--set",
        f"optim.max_steps={STEPS}",
        "--set",
        "loop.eval_every=0",
        *extra,
    ]


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``directory`` with its size and modification time (ns)."""
    return {
        str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("cli") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        assert main(train_args(output_dir)) == 0
    return output_dir


def test_train_writes_config_that_loads_back_equal(run_dir):
    overrides = [f"output_dir={run_dir}", f"optim.max_steps={STEPS}", "loop.eval_every=0"]
    assert load_config(run_dir / "config.yaml") == load_config(CONFIG, overrides)


def test_train_writes_one_metrics_line_per_step(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    for record in records:
        assert METRIC_KEYS <= record.keys(), METRIC_KEYS - record.keys()
        assert all(math.isfinite(record[key]) for key in METRIC_KEYS)
        fractions = [record[f"fraction/{regime}"] for regime in ("LH", "LL", "HT", "HS")]
        # float64 token counts over the step's tokens (step.py), summed over the four regimes.
        assert_close(sum(fractions), 1.0, ulps=REORDERED)
        assert 0.0 <= record["truncated_fraction"] <= 1.0
        assert 1.0 <= record["completion_length"] <= 16  # rollout.max_completion_length
        assert record["tokens_per_second"] > 0 and record["time/step"] > 0


def test_train_writes_checkpoint_and_final_model(run_dir):
    checkpoint = run_dir / "checkpoints" / f"step-{STEPS:06d}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == STEPS
    checkpoint_weights = load_file(checkpoint / "student.safetensors")
    assert not (checkpoint / "model").exists()  # the student is stored once per checkpoint
    final = sorted((run_dir / "model").glob("*.safetensors"))
    assert final, "no safetensors weights in output_dir/model"
    final_weights = {k: v for path in final for k, v in load_file(path).items()}
    # The final model is the model of the last checkpoint (the tiny config trains in float32).
    # The tied head and embedding are one tensor, kept under either name.
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    final_weights = {tied.get(k, k): v for k, v in final_weights.items()}
    checkpoint_weights = {tied.get(k, k): v for k, v in checkpoint_weights.items()}
    assert final_weights.keys() == checkpoint_weights.keys()
    assert all(torch.equal(final_weights[k], checkpoint_weights[k]) for k in final_weights)


def test_train_refuses_a_non_empty_output_dir(run_dir, capsys):
    before = snapshot(run_dir)
    capsys.readouterr()
    assert main(train_args(run_dir)) != 0
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert (
        lines[0].startswith("dopd: error:")
        and "output_dir" in lines[0]
        and str(run_dir) in lines[0]
    )
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("override", "key"),
    [("objective.top_kk=3", "objective.top_kk"), ("objective.top_k=0", "objective.top_k")],
)
def test_train_config_errors_are_one_line(tmp_path, capsys, override, key):
    output_dir = tmp_path / "run"
    assert main(train_args(output_dir, "--set", override)) != 0
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("dopd: error:") and key in lines[0]
    assert "Traceback" not in captured.err + captured.out
    assert not output_dir.exists()
    with pytest.raises(ConfigError, match=key):
        main(["--debug", *train_args(output_dir, "--set", override)])


def test_eval_prints_accuracy_json(run_dir, capsys):
    capsys.readouterr()
    assert (
        main(
            ["eval", "--model", str(run_dir / "model"), "--data", str(DATA), "--max-examples", "4"]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["total"] == 4
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == result["correct"] / 4


def test_eval_with_a_file_verifier(run_dir, tmp_path, capsys):
    verifier = tmp_path / "always.py"
    verifier.write_text("def accept(completion, answer):\n    return True\n")
    capsys.readouterr()
    args = [
        "eval",
        "--model",
        str(run_dir / "model"),
        "--data",
        str(DATA),
        "--max-examples",
        "3",
        "--max-new-tokens",
        "4",
        "--verifier",
        f"{verifier}:accept",
    ]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["accuracy"], result["correct"], result["total"]) == (1.0, 3, 3)


def test_eval_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["eval", "--model", str(missing), "--data", str(DATA)]) != 0
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("dopd: error:") and str(missing) in lines[0]
    assert "Traceback" not in captured.err


def test_objectives_lists_every_registered_name(capsys):
    assert main(["objectives"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(OBJECTIVES)
