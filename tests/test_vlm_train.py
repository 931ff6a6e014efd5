"""Vision-language runs end to end: the config keys (``kind``, tiny ``family``, the box keys and
columns), the run's prompts and image tensors (dopd.training.vlm_data), rollouts that generate
with images, and ``dopd train --config configs/tiny-vlm.yaml`` on CPU."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

from dopd.cli import main
from dopd.config import load_config, save_config
from dopd.errors import ConfigError, DataError, DOPDError
from dopd.io.images import load_vision_examples
from dopd.modeling.loading import check_sources, load_model, load_processor
from dopd.modeling.tiny_vlm import IMAGE_PAD, ImageOnlyQwen3VLProcessor
from dopd.modeling.vlm_views import RowImages, vision_token_ids, vlm_view_prompts
from dopd.training.eval_model import load_eval_model
from dopd.training.evaluation import evaluate, exact_match
from dopd.training.rollout import generate_rollouts, rollout_seeds
from dopd.training.vlm_data import eval_prompts, row_images, vlm_prompts
from tests.tolerance import REORDERED, assert_close

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-vlm.yaml"
DATA = REPO / "configs" / "data" / "vlm" / "train.jsonl"
EVAL = REPO / "configs" / "data" / "vlm" / "eval.jsonl"


def tiny_config(*overrides: str):
    return load_config(CONFIG, list(overrides))


@pytest.fixture(scope="module")
def run_parts():
    config = tiny_config()
    tokenizer = check_sources(config)
    processor = load_processor(config, tokenizer)
    student = load_model(config.student, tokenizer, seed=0, key="student").eval()
    prompts = vlm_prompts(processor, config, print)
    return config, tokenizer, processor, student, prompts


# ---------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "teacher={tiny: {hidden_size: 64}}",
            "teacher.kind=causal_lm but student.kind=image_text_to_text",
        ),
        ("rollout.backend=vllm", "rollout.backend='vllm': not supported yet"),
        ("data.box_format=pixels", "data.box_format='pixels' is not allowed"),
        ("data.box_render=pixels", "data.box_render='pixels' is not allowed"),
        ("data.box_template='[{x1}]'", "data.box_template='[{x1}]'"),
        ("student.kind=causal_lm", "tiny.family='qwen3_vl' builds a vision-language model"),
        ("student.tiny={hidden_size: 64}", "tiny.family=None with kind=image_text_to_text"),
        ("student.kind=image", "student.kind='image' is not allowed"),
    ],
)
def test_bad_vision_language_configs_name_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        tiny_config(override)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_tiny_vlm_keys_are_checked_before_any_weight_loads():
    config = tiny_config("student.tiny={family: qwen3_vl, hidden_sise: 64}")
    with pytest.raises(
        ConfigError, match=r"student\.tiny\.hidden_sise .*student\.tiny\.hidden_size"
    ):
        check_sources(config)


def test_text_configs_keep_their_kind_and_columns():
    config = load_config(REPO / "configs" / "tiny.yaml")
    assert (config.student.kind, config.teacher.kind, config.is_vlm) == (
        "causal_lm",
        "causal_lm",
        False,
    )
    assert set(config.data.columns.mapping()) == {
        "prompt",
        "messages",
        "privileged_context",
        "answer",
        "privileged_prompt",
    }


@pytest.mark.parametrize("name", ["tiny-vlm.yaml", "qwen3-vl-8b-to-2b.yaml"])
def test_vlm_configs_round_trip(tmp_path, name):
    config = load_config(REPO / "configs" / name)
    assert config.is_vlm and config.teacher.kind == "image_text_to_text"
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


# ---------------------------------------------------------------------------------------------
# Data


def test_vlm_prompts_hold_image_tokens_and_boxes_only_in_the_privileged_view(run_parts):
    config, tokenizer, processor, _, prompts = run_parts
    examples = load_vision_examples(str(DATA))
    plain_texts, _ = vlm_view_prompts(processor, examples)
    assert len(prompts["plain"]) == len(examples) == 6
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for index, example in enumerate(examples):
        plain = tokenizer.decode(prompts["plain"][index])
        privileged = tokenizer.decode(prompts["privileged"][index])
        box = example.boxes[0]
        # 56 x 56 images: box corners scaled to the 1000 grid (data.box_render).
        corners = [round(v / 56 * 1000) for v in (box.x1, box.y1, box.x2, box.y2)]
        text = f"{box.label}: [{corners[0]}, {corners[1]}, {corners[2]}, {corners[3]}]"
        assert text in privileged and text not in plain
        assert example.prompt in plain
        # A 56 x 56 image is a 4 x 4 patch grid, 4 image tokens after the 2 x 2 merge.
        for ids in (prompts["plain"][index], prompts["privileged"][index]):
            assert ids.count(image_id) == 4
        # The step's image tensors are the processor's for the row's image (and prompt).
        together = processor(
            text=[plain_texts[index]], images=list(example.images), return_tensors="pt"
        )
        images = row_images(processor, prompts, [index, index])
        assert torch.equal(images.pixel_values, torch.cat([together["pixel_values"]] * 2))
        assert images.image_grid_thw.tolist() == [[1, 4, 4]] * 2
        assert together["input_ids"][0].tolist() == prompts["plain"][index]
    assert prompts["answer"][0] == examples[0].answer


def test_vision_rows_through_renamed_columns(tmp_path, run_parts):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    renamed = [
        {"q": row["prompt"], "media": {"img": row["images"]}, "hints": row["boxes"]} for row in rows
    ]
    for image in sorted(DATA.parent.glob("*.png")):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in renamed))
    config = tiny_config(
        f"data.train={data}",
        "data.columns={prompt: q, images: media.img, boxes: hints}",
    )
    prompts = vlm_prompts(run_parts[2], config, print)
    assert prompts["privileged"] == run_parts[4]["privileged"]
    assert prompts["answer"] == [None] * 6


def test_overlong_vision_prompts_are_skipped_or_refused(run_parts):
    processor = run_parts[2]
    longest = max(len(ids) for ids in run_parts[4]["privileged"])
    warnings = []
    kept = vlm_prompts(
        processor, tiny_config(f"data.max_prompt_length={longest - 1}"), warnings.append
    )
    assert 0 < len(kept["plain"]) < 6 and "skipped" in warnings[0]
    assert all(len(ids) < longest for ids in kept["privileged"])
    with pytest.raises(Exception, match="data.max_prompt_length=10"):
        vlm_prompts(processor, tiny_config("data.max_prompt_length=10"), print)


# ---------------------------------------------------------------------------------------------
# Rollouts


def test_rollouts_with_images_are_batch_invariant_and_never_sample_vision_tokens(run_parts):
    config, tokenizer, processor, student, prompts = run_parts
    indices = torch.tensor([0, 3, 5])
    kwargs = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=10,
        num_generations=2,
        vocab_size=len(tokenizer),
        record_log_probs=True,
    )
    seeds = rollout_seeds(0, 0, indices, 2)
    together = generate_rollouts(
        student,
        [prompts["plain"][i] for i in indices],
        row_seeds=seeds,
        images=row_images(processor, prompts, indices.tolist()),
        **kwargs,
    )
    assert together.completion_ids.shape[0] == 6
    banned = vision_token_ids(student.config)
    assert not torch.isin(together.completion_ids, torch.tensor(banned)).any()
    # Each prompt alone (no padding, its own images) samples the same completions.
    for position, index in enumerate(indices.tolist()):
        alone = generate_rollouts(
            student,
            [prompts["plain"][index]],
            row_seeds=seeds[2 * position : 2 * position + 2],
            images=row_images(processor, prompts, [index]),
            **kwargs,
        )
        rows = slice(2 * position, 2 * position + 2)
        length = alone.completion_ids.shape[1]
        assert torch.equal(together.completion_ids[rows, :length], alone.completion_ids)
        assert torch.equal(together.completion_mask[rows, :length], alone.completion_mask)


def test_generation_sees_the_image(run_parts):
    _, tokenizer, processor, student, prompts = run_parts
    greedy = dict(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_completion_length=8,
        vocab_size=len(tokenizer),
    )
    ids = prompts["plain"][0]
    own = row_images(processor, prompts, [0])
    black = RowImages(torch.zeros_like(own.pixel_values), own.image_grid_thw, own.images_per_row)
    with torch.no_grad():
        first = student(
            input_ids=torch.tensor([ids]),
            pixel_values=own.pixel_values,
            image_grid_thw=own.image_grid_thw,
            mm_token_type_ids=(torch.tensor([ids]) == student.config.image_token_id).long(),
        ).logits[0, -1]
        second = student(
            input_ids=torch.tensor([ids]),
            pixel_values=black.pixel_values,
            image_grid_thw=black.image_grid_thw,
            mm_token_type_ids=(torch.tensor([ids]) == student.config.image_token_id).long(),
        ).logits[0, -1]
    assert not torch.allclose(first, second)
    rollout = generate_rollouts(student, [ids], images=own, **greedy)
    assert torch.equal(rollout.completion_ids[0, 0], first[: len(tokenizer)].argmax())


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_vlm_eval_rows_are_plain_prompts_with_images_and_answers(run_parts):
    config, tokenizer, processor, _, _ = run_parts
    assert config.data.eval is not None and config.loop.eval_every > 0
    prompts = eval_prompts(config, tokenizer, processor, print)
    examples = load_vision_examples(str(EVAL), privileged=False)
    assert sorted(prompts) == ["answer", "images", "plain"]
    assert prompts["answer"] == [example.answer for example in examples]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for index, example in enumerate(examples):
        text = tokenizer.decode(prompts["plain"][index])
        # The plain view: the question and the image, never a box even when the row has one.
        assert example.prompt in text and "[" not in text
        assert prompts["plain"][index].count(image_id) == 4
        assert prompts["images"][index] == tuple(example.images)
    assert any(example.boxes for example in examples)
    assert any(not example.boxes for example in examples)


def test_vlm_eval_rows_need_answers_and_fit_the_prompt_length(tmp_path, run_parts):
    config, tokenizer, processor, _, _ = run_parts
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()]
    del rows[1]["answer"]
    for image in sorted(EVAL.parent.glob("*.png")):
        (tmp_path / image.name).write_bytes(image.read_bytes())
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(
        DataError, match=r"data\.eval=.*eval\.jsonl.*: row 2 has no answer"
    ) as error:
        eval_prompts(tiny_config(f"data.eval={data}"), tokenizer, processor, print)
    assert "\n" not in str(error.value)
    lengths = [len(ids) for ids in eval_prompts(config, tokenizer, processor, print)["plain"]]
    warnings = []
    limit = f"data.max_prompt_length={max(lengths) - 1}"
    # Training rows are longer (boxes): only the eval rows' limit is at stake here.
    kept = eval_prompts(tiny_config(limit), tokenizer, processor, warnings.append)
    assert len(kept["plain"]) == sum(length < max(lengths) for length in lengths)
    assert "data.eval=" in warnings[0] and "skipped" in warnings[0]
    with pytest.raises(DOPDError, match=r"data\.eval=.*data\.max_prompt_length=10"):
        eval_prompts(tiny_config("data.max_prompt_length=10"), tokenizer, processor, print)


@pytest.fixture(scope="module")
def eval_student(run_parts):
    """The tiny student with its weights spread (seeded noise, std 0.3): a random-init tiny
    model decodes one special token greedily whatever its input, this one writes text that
    depends on the image."""
    student = copy.deepcopy(run_parts[3])
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return student


def test_vlm_evaluation_in_batches_equals_each_row_alone(run_parts, eval_student):
    config, tokenizer, processor, _, _ = run_parts
    student = eval_student
    prompts = eval_prompts(config, tokenizer, processor, print)
    rows = list(range(len(prompts["plain"])))
    greedy = dict(verifier=exact_match, max_new_tokens=config.eval.max_new_tokens)

    def run(indices, batch_size, answers=None):
        return evaluate(
            student,
            tokenizer,
            [prompts["plain"][i] for i in indices],
            answers or [prompts["answer"][i] for i in indices],
            images=row_images(processor, prompts, indices),
            batch_size=batch_size,
            **greedy,
        )

    alone = [run([i], 1).samples[0] for i in rows]
    completions = [sample["completion"] for sample in alone]
    assert len(set(completions)) == len(completions)  # each row writes its own text
    # The same completions batched (one batch, or batches of 2 with per-batch image slices).
    for batch_size in (len(rows), 2):
        batched = run(rows, batch_size)
        assert [sample["completion"] for sample in batched.samples] == completions
        assert batched.correct == sum(sample["correct"] for sample in alone)
    # Answers that are the lone completions' last lines: every batched row is then correct.
    answers = [text.strip().splitlines()[-1] if text.strip() else "x" for text in completions]
    expected = sum(exact_match(text, answer) for text, answer in zip(completions, answers))
    assert expected > 0
    assert run(rows, 2, answers).correct == expected
    with pytest.raises(DOPDError, match="2 image rows for 4 prompts"):
        evaluate(
            student,
            tokenizer,
            prompts["plain"],
            prompts["answer"],
            images=row_images(processor, prompts, [0, 1]),
            **greedy,
        )


def test_vlm_evaluation_sees_each_row_s_own_image(run_parts, eval_student):
    config, tokenizer, processor, _, _ = run_parts
    student = eval_student
    prompts = eval_prompts(config, tokenizer, processor, print)
    one = [prompts["plain"][0]] * 4
    kwargs = dict(verifier=exact_match, max_new_tokens=config.eval.max_new_tokens)
    images = row_images(processor, prompts, [0, 1, 2, 3])
    result = evaluate(student, tokenizer, one, [""] * 4, images=images, batch_size=2, **kwargs)
    # One question over four images: the completions follow the images, not the first one.
    alone = [
        evaluate(
            student,
            tokenizer,
            [prompts["plain"][0]],
            [""],
            images=row_images(processor, prompts, [i]),
            **kwargs,
        ).samples[0]["completion"]
        for i in range(4)
    ]
    assert [sample["completion"] for sample in result.samples] == alone
    assert len(set(alone)) > 1


# ---------------------------------------------------------------------------------------------
# End to end


def test_tiny_vlm_config_trains_end_to_end(tmp_path):
    output = tmp_path / "run"
    status = main(
        [
            "train",
            "--config",
            str(CONFIG),
            "--set",
            f"output_dir={output}",
            "--set",
            "optim.max_steps=2",
        ]
    )
    assert status in (0, None)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # Evaluation on the vision rows at the start and the last step (loop.eval_every=3).
    assert [record["step"] for record in records] == [0, 1, 2]
    assert [record["step"] for record in records if "eval/accuracy" in record] == [0, 2]
    assert all(0.0 <= record.get("eval/accuracy", 0.0) <= 1.0 for record in records)
    fractions = [key for key in records[-1] if key.startswith("fraction/")]
    assert sorted(fractions) == ["fraction/HS", "fraction/HT", "fraction/LH", "fraction/LL"]
    assert sum(records[-1][key] for key in fractions) == pytest.approx(1.0)
    assert all(record["skipped_step"] == 0.0 for record in records[1:])
    model = AutoModelForImageTextToText.from_pretrained(output / "model")
    processor = ImageOnlyQwen3VLProcessor.from_pretrained(output / "model")
    assert type(model).__name__ == "Qwen3VLForConditionalGeneration"
    assert processor.image_token_id == model.config.image_token_id
    # dopd eval on the vision rows: the exported folder (with the run's config) and the last
    # checkpoint (its run's config.yaml) decode the same completions, and score as the run did.
    written = []
    for name, source in [("model", output / "model"), ("step", output / "checkpoints/step-000002")]:
        args = ["eval", "--model", str(source), "--out", str(tmp_path / name)]
        assert main([*args, "--config", str(CONFIG)] if name == "model" else args) in (0, None)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        lines = (tmp_path / name / "eval.jsonl").read_text().splitlines()
        assert summary["total"] == len(lines) == len(EVAL.read_text().splitlines())
        assert summary["accuracy"] == records[-1]["eval/accuracy"]
        written.append([json.loads(line) for line in lines])
    assert written[0] == written[1]
    assert [row["answer"] for row in written[0]] == [
        json.loads(line)["answer"] for line in EVAL.read_text().splitlines()
    ]
    loaded, _ = load_eval_model(str(output / "model"))
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration"
    # The saved student is the trained one, not its initialisation.
    config = tiny_config()
    initial = load_model(config.student, check_sources(config), seed=config.seed, key="student")
    assert any(
        not torch.equal(saved, initial.state_dict()[name])
        for name, saved in model.state_dict().items()
    )


def test_resumed_vlm_run_equals_the_uninterrupted_one(tmp_path):
    def train(output: Path, *extra: str) -> None:
        args = ["train", "--config", str(CONFIG), "--set", f"output_dir={output}"]
        assert main([*args, "--set", "optim.max_steps=4", *extra]) in (0, None)

    train(tmp_path / "whole")
    train(tmp_path / "parts", "--stop-after", "2")
    train(tmp_path / "parts", "--resume")

    def losses(output: Path) -> list[float]:
        records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("eval/accuracy")) for r in records]

    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")
    whole = AutoModelForImageTextToText.from_pretrained(tmp_path / "whole" / "model")
    parts = AutoModelForImageTextToText.from_pretrained(tmp_path / "parts" / "model")
    for name, value in whole.state_dict().items():
        assert torch.equal(parts.state_dict()[name], value), name


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    from tests.test_trainer import _free_port, _metric_lines, _weights

    def run(output: Path, processes: int) -> None:
        command = [sys.executable, "-m", "dopd.cli"]
        if processes > 1:
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(REPO / "configs" / "accelerate" / "ddp-cpu.yaml"),
                "--num_processes",
                str(processes),
                "--main_process_port",
                str(_free_port()),
                "-m",
                "dopd.cli",
            ]
        command += ["train", "--config", str(CONFIG), "--set", f"output_dir={output}"]
        command += ["--set", "optim.max_steps=2"]
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == 0, result.stderr[-3000:]

    run(tmp_path / "one", 1)
    run(tmp_path / "two", 2)
    one, two = _metric_lines(tmp_path / "one"), _metric_lines(tmp_path / "two")
    assert len(one) == len(two) == 3  # step 0 (evaluation alone), steps 1 and 2
    assert "eval/accuracy" in one[0] and "eval/accuracy" in two[-1]  # sharded over two ranks
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert_close(b[key], a[key], ulps=REORDERED, dtype=torch.float32, msg=key)
    first, second = _weights(tmp_path / "one" / "model"), _weights(tmp_path / "two" / "model")
    for key in first:
        assert_close(second[key], first[key], ulps=REORDERED, msg=key)


def test_a_vlm_folder_trains_as_a_path_model(tmp_path):
    first = tmp_path / "first"
    assert main(["train", "--config", str(CONFIG), "--set", f"output_dir={first}",
                 "--set", "optim.max_steps=2"]) in (0, None)  # fmt: skip
    folder = str(first / "model")
    config = tiny_config(
        f"student={{kind: image_text_to_text, path: {folder}}}",
        f"teacher={{kind: image_text_to_text, path: {folder}}}",
        "tokenizer={}",
    )
    tokenizer = check_sources(config)
    processor = load_processor(config, tokenizer)
    assert isinstance(processor, ImageOnlyQwen3VLProcessor)
    student = load_model(config.student, tokenizer, seed=0, key="student")
    saved = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(student) is type(saved)
    for name, value in saved.state_dict().items():
        assert torch.equal(student.state_dict()[name], value), name
    second = tmp_path / "second"
    assert main(["train", "--config", str(CONFIG), "--set", f"output_dir={second}",
                 "--set", "optim.max_steps=2",
                 "--set", f"student={{kind: image_text_to_text, path: {folder}}}",
                 "--set", f"teacher={{kind: image_text_to_text, path: {folder}}}",
                 "--set", "tokenizer={}"]) in (0, None)  # fmt: skip
    record = json.loads((second / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["skipped_step"] == 0.0 and record["completion_tokens"] > 0


def test_a_text_folder_is_not_a_vlm_processor(tmp_path):
    text = tmp_path / "text"
    assert main(["train", "--config", str(REPO / "configs" / "tiny.yaml"),
                 "--set", f"output_dir={text}", "--set", "optim.max_steps=2",
                 "--set", "loop.eval_every=0", "--set", "data.eval=null"]) in (0, None)  # fmt: skip
    config = tiny_config(
        f"student={{kind: image_text_to_text, path: {text / 'model'}}}", "tokenizer={}"
    )
    with pytest.raises(ConfigError, match="AutoProcessor found no image processor"):
        load_processor(config, None)
