"""Trackers, rollout samples and ``dopd report`` on tiny runs: tensorboard event files carry the
metrics.jsonl values, rollout_samples.jsonl holds bounded per-token regimes that agree with the
step's thresholds (and with the reference loss path), resume cuts it back, a missing tracker
package is a one-line error, and ``dopd report`` draws escaped, self-contained artefacts."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dopd.cli import main
from dopd.config import load_config
from dopd.errors import ConfigError
from dopd.objectives.routing import REGIMES
from dopd.training.samples import pick_rows, sample_record
from dopd.training.step import TokenRecord
from dopd.training.tracking import flat_config, quiet_progress_bars
from dopd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
DATA = ROOT / "configs" / "data" / "tiny.jsonl"
STEPS, EVERY, ROWS, MAX_TOKENS = 4, 2, 3, 16  # MAX_TOKENS: tiny.yaml's max_completion_length
SAMPLED_STEPS = [1, 2, 4]  # the first step, every EVERY steps, and the last
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCRIPT = "<script>alert(1)</script>"


def overrides(output_dir: Path, *extra: str) -> list[str]:
    return [
        f"output_dir={output_dir}",
        f"data.train={DATA}",
        "data.eval=null",
        "loop.eval_every=0",
        f"optim.max_steps={STEPS}",
        f"tracking.samples_every={EVERY}",
        f"tracking.sample_rows={ROWS}",
        *extra,
    ]


def train_args(output_dir: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(CONFIG)]
    for override in overrides(output_dir, *extra):
        args += ["--set", override]
    return args


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 4-step dopd run (chunked loss path) logging to tensorboard (read-only)."""
    output_dir = tmp_path_factory.mktemp("tracking") / "run"
    args = train_args(output_dir, "tracking.report_to=tensorboard", "loop.loss_path=chunked")
    assert main(args) == 0
    return output_dir


# -- trackers ----------------------------------------------------------------------------------
def test_tensorboard_scalars_equal_metrics_jsonl(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = run_dir / "tracking" / "dopd"  # output_dir/tracking/<tracking.project>
    assert list(folder.glob("events.out.tfevents.*")), sorted(folder.iterdir())
    events = EventAccumulator(str(folder))
    events.Reload()
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    keys = [f"fraction/{regime}" for regime in REGIMES] + ["loss", "threshold/A"]
    assert set(keys) <= set(events.Tags()["scalars"])
    for key in keys:
        logged = {event.step: event.value for event in events.Scalars(key)}
        expected = {record["step"]: record[key] for record in records}
        assert logged.keys() == expected.keys(), key
        for step, value in expected.items():  # tensorboard stores float32
            assert logged[step] == pytest.approx(value, rel=1e-6, abs=1e-7), (key, step)


def test_missing_tracker_package_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dopd.training.tracking._installed", lambda name: False)
    output_dir = tmp_path / "run"
    monkeypatch.chdir(ROOT)
    assert main(train_args(output_dir, "tracking.report_to=wandb")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert "tracking.report_to='wandb'" in lines[0] and "pip install wandb" in lines[0]
    assert not output_dir.exists()  # refused before the run folder was touched
    with pytest.raises(ConfigError, match="tracking.report_to='all': none of"):
        Trainer(load_config(CONFIG, overrides(output_dir, "tracking.report_to=all")))


def test_flat_config_has_scalar_dotted_keys():
    flat = flat_config(load_config(CONFIG, overrides(Path("runs/x"))))
    assert flat["optim.lr"] == 1.0e-3 and flat["tracking.report_to"] == "none"
    assert flat["tracking.run_name"] == "null" and flat["objective.top_k"] == 16
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())


def test_tracking_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"tracking\.report_to='comet'"):
        load_config(CONFIG, ["tracking.report_to=comet"])
    with pytest.raises(ConfigError, match=r"tracking\.sample_rows=0"):
        load_config(CONFIG, ["tracking.sample_rows=0"])


def test_saves_print_no_progress_bar_of_their_own(tmp_path, tiny_model, capfd):
    from transformers.utils import logging as hf_logging

    model = tiny_model(0)
    model.save_pretrained(tmp_path / "loud")
    assert "Writing model shards" in capfd.readouterr().err  # what the block silences
    with quiet_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
        model.save_pretrained(tmp_path / "quiet")
    assert "Writing model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # switched back on after the block


# -- rollout samples ---------------------------------------------------------------------------
def expected_regime(token: dict, thresholds: dict) -> str | None:
    """The regime ``assign_regimes`` gives the token's (rounded) values, or None when a value is
    too near a threshold for the recorded digits to tell."""
    gap, q_s, q_t = token["gap"], token["q_student"], token["q_teacher"]
    near = 1e-3
    sides = (
        (gap, thresholds["threshold/A"]),
        (q_s + q_t, thresholds["threshold/q_student"] + thresholds["threshold/q_teacher"]),
        (q_t, q_s),
    )
    if any(abs(a - b) <= near * max(abs(a), abs(b), 1e-6) for a, b in sides):
        return None
    if gap < thresholds["threshold/A"]:
        return "LH" if q_s + q_t >= sides[1][1] else "LL"
    return "HT" if q_t >= q_s else "HS"


def test_rollout_samples_are_bounded_and_routed_by_the_step_thresholds(run_dir):
    samples = read_jsonl(run_dir / "rollout_samples.jsonl")
    metrics = {record["step"]: record for record in read_jsonl(run_dir / "metrics.jsonl")}
    assert [record["step"] for record in samples] == SAMPLED_STEPS
    checked = 0
    for record in samples:
        assert record["objective"] == "dopd" and record["groups"] == list(REGIMES)
        assert 1 <= len(record["rows"]) <= ROWS
        for row in record["rows"]:
            count = len(row["tokens"])
            assert 1 <= count <= MAX_TOKENS
            assert row["prompt"] and isinstance(row["completion"], str)
            for key in ("regimes", "p_student", "q_teacher", "q_student", "gap"):
                assert len(row[key]) == count, key
            assert set(row["regimes"]) <= set(REGIMES)
            for index in range(count):
                token = {key: row[key][index] for key in ("gap", "q_student", "q_teacher")}
                expected = expected_regime(token, metrics[record["step"]])
                if expected is not None:
                    assert row["regimes"][index] == expected, (record["step"], index, token)
                    checked += 1
                assert 0.0 < row["p_student"][index] <= 1.0
    assert checked > 50
    # One rollout per prompt before a second of the same prompt: the tiny config's first
    # micro-batch holds 2 prompts x 4 generations, so 3 rows show both prompts.
    assert len({row["prompt"] for row in samples[0]["rows"]}) == 2


def test_reference_path_records_the_same_samples(run_dir, tmp_path):
    config = load_config(CONFIG, overrides(tmp_path / "run", "loop.loss_path=reference"))
    Trainer(config).train(stop_after=1)
    (reference,) = read_jsonl(tmp_path / "run" / "rollout_samples.jsonl")
    chunked = read_jsonl(run_dir / "rollout_samples.jsonl")[0]
    assert reference["step"] == chunked["step"] == 1
    for ours, theirs in zip(reference["rows"], chunked["rows"], strict=True):
        assert ours["tokens"] == theirs["tokens"] and ours["regimes"] == theirs["regimes"]
        for key in ("p_student", "q_teacher", "q_student", "gap"):
            assert ours[key] == pytest.approx(theirs[key], rel=2e-3, abs=1e-6), key


def test_resume_cuts_rollout_samples_back_to_the_checkpoint(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    samples = copy / "rollout_samples.jsonl"
    kept = samples.read_text(encoding="utf-8")
    with open(samples, "a", encoding="utf-8") as handle:  # a later step, then a torn line
        handle.write(json.dumps({"step": STEPS + 3, "rows": []}) + '\n{"step": 9, "ro')
    # tracking.report_to=none: no tracker is started by a trainer that never trains.
    Trainer(load_config(CONFIG, overrides(copy)), resume=True).close()
    assert samples.read_text(encoding="utf-8") == kept


def test_samples_every_zero_writes_no_samples(tmp_path):
    config = load_config(CONFIG, overrides(tmp_path / "run", "tracking.samples_every=0"))
    Trainer(config).train(stop_after=1)
    assert not (tmp_path / "run" / "rollout_samples.jsonl").exists()


def test_an_objective_without_statistics_records_groups_and_p_student(tokenizer):
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    tokens = TokenRecord(ids, mask, torch.zeros(5, dtype=torch.long), {}, torch.zeros(5).log())
    record = sample_record(7, tokens, [[1, 2], [3]], [0, 1], tokenizer, ("all",), max_rows=4)
    assert "note" in record and record["groups"] == ["all"]
    assert [len(row["tokens"]) for row in record["rows"]] == [3, 2]
    row = record["rows"][1]
    assert row["regimes"] == ["all", "all"] and row["p_student"] == [0.0, 0.0]
    assert not {"q_teacher", "q_student", "gap"} & row.keys()


def test_pick_rows_spreads_over_prompts_first():
    assert pick_rows([4, 4, 4, 9, 9, 9], 3) == [0, 1, 3]
    assert pick_rows([4, 4, 9, 9], 10) == [0, 1, 2, 3]
    assert pick_rows([1, 2, 3], 2) == [0, 1]


# -- dopd report -------------------------------------------------------------------------------
def test_report_writes_curves_regimes_and_tokens(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["report", str(copy)]) == 0
    out = copy / "report"
    assert capsys.readouterr().out.startswith("wrote ")
    for name in ("curves.png", "regimes.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    html = (out / "tokens.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "rollouts sampled at step 4" in html
    assert html.count('class="rollout"') == len(
        read_jsonl(copy / "rollout_samples.jsonl")[-1]["rows"]
    )
    assert "http://" not in html and "https://" not in html and "<script" not in html


def test_report_escapes_token_text_and_picks_a_step(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", copy)
    records = read_jsonl(run_dir / "rollout_samples.jsonl")
    records[0]["rows"][0]["tokens"][0] = SCRIPT
    records[0]["rows"][0]["prompt"] = f"{SCRIPT}<img src=x onerror=alert(1)>"
    (copy / "rollout_samples.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in records), encoding="utf-8"
    )
    out = tmp_path / "elsewhere"
    assert main(["report", str(copy), "--out", str(out), "--step", "1"]) == 0
    html = (out / "tokens.html").read_text(encoding="utf-8")
    assert "<script" not in html and "<img" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not (copy / "report").exists()


def test_report_of_a_run_without_samples_notes_the_missing_page(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", copy)
    assert main(["report", str(copy)]) == 0
    captured = capsys.readouterr()
    assert (copy / "report" / "curves.png").is_file() and (
        copy / "report" / "regimes.png"
    ).is_file()
    assert not (copy / "report" / "tokens.html").exists()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "tokens.html not written" in lines[0]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "has no metrics.jsonl"),
        ("blank", "has no records"),
        ("step", "has no rollouts sampled at step 3"),
    ],
)
def test_report_errors_are_one_line(run_dir, tmp_path, capsys, layout, message):
    folder = tmp_path / "run"
    args = ["report", str(folder)]
    if layout != "missing":
        folder.mkdir()
    if layout == "blank":
        (folder / "metrics.jsonl").write_text("\n")
    if layout == "step":
        for name in ("metrics.jsonl", "rollout_samples.jsonl"):
            shutil.copy(run_dir / name, folder)
        args += ["--step", "3"]
    assert main(args) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("dopd: error:") and message in lines[0], lines
    assert not (folder / "report").exists()


def test_report_numbers_are_finite_json(run_dir):
    # NaN is not JSON: a non-finite statistic would be written as null.
    for record in read_jsonl(run_dir / "rollout_samples.jsonl"):
        for row in record["rows"]:
            assert all(v is None or math.isfinite(v) for v in row["gap"])


def test_report_gives_each_group_its_regimes_png_colour(tmp_path):
    import re

    from dopd.viz.plots import GROUP_PALETTE, REGIME_COLORS, assign_colors, fraction_keys
    from dopd.viz.report import write_report

    groups = ["low_entropy", "high_entropy"]  # EOPD's, in the objective's order
    metrics = [{"step": 1, "loss": 0.5, "fraction/low_entropy": 0.7, "fraction/high_entropy": 0.3}]
    row = {"prompt": "1+1=", "tokens": ["2", "<eos>"], "regimes": ["high_entropy", "low_entropy"]}
    sample = {"step": 1, "objective": "eopd", "groups": groups, "rows": [row]}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(metrics[0]) + "\n")
    (tmp_path / "rollout_samples.jsonl").write_text(json.dumps(sample) + "\n")
    write_report(tmp_path)
    html = (tmp_path / "report" / "tokens.html").read_text(encoding="utf-8")
    swatches = re.findall(r'<span class="swatch ([^"]+)">([^<]+)</span>', html)
    styles = dict(re.findall(r"\.(regime-\S+) \{ background: (#[0-9a-f]{6});", html))
    page = {name: styles[class_name] for class_name, name in swatches}
    names = [key.removeprefix("fraction/") for key in fraction_keys(metrics)]
    assert page == assign_colors(names, REGIME_COLORS, GROUP_PALETTE)
    assert 'title="regime=high_entropy q_T=n/a q_S=n/a A=n/a"' in html  # nothing recorded
