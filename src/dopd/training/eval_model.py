"""``dopd eval``: greedy held-out accuracy of a saved student, with per-example results.

The model is a Hugging Face folder (a run's ``output_dir/model``), a hub id, or a dopd checkpoint
folder (``output_dir/checkpoints/step-N``: ``student.safetensors`` and ``trainer_state.json``, no
Hugging Face export), whose student is rebuilt from the run's ``config.yaml`` and loaded with the
checkpoint's weights. With a run config, prompts are read through its ``data.columns`` and
tokenized with its ``tokenizer.chat_template_kwargs``, exactly as in training; rows need no
privileged context. A vision-language model (a folder whose ``config.json`` has a vision config,
or a checkpoint of a VLM run) is evaluated on vision rows: each row's plain prompt (its images and
question, ``dopd.training.vlm_data.vision_eval_rows``) with its images. ``--out DIR`` writes
``DIR/eval.jsonl`` (one line per example: prompt, completion, answer, correct) and
``DIR/summary.json``.

    summary = run_eval("runs/x/checkpoints/step-000010", "data/test.jsonl", out="runs/x/eval")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model as load_safetensors_model
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

from dopd.config import TrainConfig, load_config
from dopd.errors import ConfigError, DOPDError
from dopd.io.atomic import write_text_atomically
from dopd.io.data import load_examples, tokenize_prompt
from dopd.modeling.loading import (
    load_model,
    load_pretrained,
    load_processor,
    load_tokenizer,
    pretrained_processor,
    with_eos_and_pad,
)
from dopd.modeling.peft import apply_lora
from dopd.training.checkpoint_files import STATE_FILE
from dopd.training.evaluation import EvalResult, evaluate, load_verifier
from dopd.training.vlm_data import row_images, vision_eval_rows

STUDENT_FILE = "student.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a dopd checkpoint folder (it holds ``trainer_state.json``)."""
    return (Path(path) / STATE_FILE).is_file()


def run_config_of(checkpoint: str | Path) -> Path:
    """The config of the run a checkpoint folder belongs to: ``output_dir/config.yaml``."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def checkpoint_config(checkpoint: str | Path) -> TrainConfig:
    """The config of the run that wrote ``checkpoint``, from its ``output_dir/config.yaml``."""
    path = run_config_of(checkpoint)
    if not path.is_file():
        raise ConfigError(
            f"--model {str(checkpoint)!r} is a checkpoint folder but {path} does not exist; "
            "fix: pass the run's config with --config output_dir/config.yaml"
        )
    return load_config(path)


def is_vision_language(source: str, config: TrainConfig | None = None) -> bool:
    """Whether ``source`` is a vision-language model: a checkpoint of a VLM run (``config``,
    default the run's ``config.yaml``), or a folder whose ``config.json`` has a vision config."""
    if is_checkpoint(source):
        return (config or checkpoint_config(source)).is_vlm
    manifest = Path(source).expanduser() / "config.json"
    return manifest.is_file() and "vision_config" in manifest.read_text(encoding="utf-8")


def load_eval_model(source: str, config: TrainConfig | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a Hugging Face folder or hub id, or of a dopd checkpoint folder
    (its student rebuilt from ``config``, default the run's ``config.yaml``), in eval mode.

    Raises a one-line ``DOPDError`` (``ConfigError`` for a bad source) naming ``--model``.
    """
    model, tokenizer, _ = load_eval_parts(source, config)
    return model, tokenizer


def load_eval_parts(source: str, config: TrainConfig | None = None) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, processor)`` as ``load_eval_model``; the processor of a
    vision-language model (the run's for a checkpoint, the folder's own otherwise), else None."""
    processor = None
    if is_checkpoint(source):
        config = config or checkpoint_config(source)
        model, tokenizer = _checkpoint_student(Path(source), config)
        processor = load_processor(config, tokenizer) if config.is_vlm else None
    else:
        vlm = is_vision_language(source)
        tokenizer = with_eos_and_pad(
            load_pretrained(AutoTokenizer, "--model", source), f"--model={source!r}"
        )
        if vlm:
            processor = pretrained_processor("--model", source)
        loader = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
        model = load_pretrained(loader, "--model", source)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval(), tokenizer, processor


def _checkpoint_student(folder: Path, config: TrainConfig) -> tuple[Any, Any]:
    """The student of checkpoint ``folder``: built as ``config`` builds it, then its weights."""
    shards = sorted(folder.glob("student.rank*.safetensors"))
    if shards:
        raise DOPDError(
            f"--model {str(folder)!r} holds a sharded student ({len(shards)} slices, one per "
            "rank of an FSDP run), which dopd eval does not reassemble; fix: evaluate the run's "
            "final export (output_dir/model)"
        )
    weights = folder / STUDENT_FILE
    if not weights.is_file():
        raise DOPDError(
            f"--model {str(folder)!r} has no {STUDENT_FILE}; fix: give a complete checkpoint "
            "folder (output_dir/checkpoints/step-N) or a model folder"
        )
    tokenizer = load_tokenizer(config.tokenizer, config.student)
    model = load_model(config.student, tokenizer, seed=config.seed, key="student")
    if config.peft.enabled:
        model = apply_lora(model, config.peft)
    try:
        load_safetensors_model(model, str(weights))
    except (RuntimeError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DOPDError(
            f"--model {str(folder)!r}: {STUDENT_FILE} does not fit the student of the run's "
            f"config ({first[:200]}); fix: pass the config that wrote it with --config"
        ) from None
    return model, tokenizer


def run_eval(
    model: str,
    data: str | None = None,
    *,
    config: TrainConfig | None = None,
    verifier: str | None = None,
    max_new_tokens: int | None = None,
    max_examples: int | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``data`` (default ``config.data.eval``) and return the summary.

    ``verifier`` and ``max_new_tokens`` default to the config's ``eval`` section when a config is
    given, else ``exact`` and 64. Rows need an answer, not a privileged context.
    """
    # A checkpoint's own run config when none was given: its columns and chat kwargs apply.
    if config is None and is_checkpoint(model):
        config = checkpoint_config(model)
    if data is None:
        if config is None or config.data.eval is None:
            raise ConfigError(
                "dopd eval has no data; fix: pass --data FILE (or --config with data.eval set)"
            )
        data = config.data.eval
    verifier = verifier or (config.eval.verifier if config else "exact")
    max_new_tokens = max_new_tokens or (config.eval.max_new_tokens if config else 64)
    check = load_verifier(verifier)  # a bad verifier fails before any model loads
    subset = config.data.subset if config else None
    kwargs = config.tokenizer.chat_template_kwargs if config else {}
    images = None
    if is_vision_language(model, config):  # vision rows: the plain prompt with its images
        network, tokenizer, processor = load_eval_parts(model, config)
        examples, rows = vision_eval_rows(
            processor,
            data,
            key="--data" if config is None or data != config.data.eval else "data.eval",
            columns=config.data.columns.vision_mapping() if config else None,
            subset=subset,
            box_format=config.data.box_format if config else "absolute",
            chat_template_kwargs=kwargs,
        )
        examples, prompt_ids = examples[:max_examples], rows["plain"][:max_examples]
        images = row_images(processor, rows, list(range(len(prompt_ids))))
    else:
        columns = config.data.columns.mapping() if config else None
        examples = load_examples(data, columns, privileged=False, answers=True, subset=subset)
        examples = examples[:max_examples]
        network, tokenizer = load_eval_model(model, config)
        prompt_ids = [tokenize_prompt(example.prompt, tokenizer, kwargs) for example in examples]
    result = evaluate(
        network,
        tokenizer,
        prompt_ids,
        [example.answer or "" for example in examples],
        verifier=check,
        max_new_tokens=max_new_tokens,
        images=images,
    )
    summary = {
        "accuracy": result.accuracy,
        "correct": result.correct,
        "total": result.total,
        "model": model,
        "data": data,
        "verifier": verifier,
        "max_new_tokens": max_new_tokens,
    }
    if out is not None:
        write_results(Path(out), examples, prompt_ids, result, summary)
    return summary


def write_results(
    out: Path, examples: list, prompt_ids: list[list[int]], result: EvalResult, summary: dict
) -> None:
    """``out/eval.jsonl`` (one line per example) and ``out/summary.json``, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps(
            {
                "index": index,
                "prompt": example.prompt,
                "prompt_tokens": len(ids),
                "completion": sample["completion"],
                "answer": sample["answer"],
                "correct": sample["correct"],
            },
            ensure_ascii=False,
        )
        for index, (example, ids, sample) in enumerate(zip(examples, prompt_ids, result.samples))
    ]
    write_text_atomically(out / "eval.jsonl", "".join(line + "\n" for line in lines))
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
