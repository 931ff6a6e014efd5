"""Running lab methods: data files, one training run per (method, seed, lr), test accuracy.

Every run starts from the same pretrained student and teacher, trains with the ordinary
``Trainer`` on the task's training prompts, and is scored on held-out test prompts *without*
privileged context. The validation split (``eval/accuracy`` in the curves) chooses learning rates;
the test split is only read for the final numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dopd.config import TrainConfig, from_dict
from dopd.errors import ConfigError
from dopd.io.data import load_examples, tokenize_views
from dopd.lab.methods import Method
from dopd.lab.task import Task
from dopd.training.evaluation import evaluate
from dopd.training.trainer import Trainer

DATA_SEEDS = {"train": 1000, "valid": 2000, "test": 3000}


@dataclass(frozen=True, kw_only=True)
class LabSettings:
    """Sizes of a lab run. The same settings apply to every method (equal budgets)."""

    task: str = "shiftmap"
    train_examples: int = 4000
    valid_examples: int = 128
    test_examples: int = 512
    steps: int = 120
    warmup_steps: int = 10
    prompts_per_step: int = 16
    num_generations: int = 4
    max_completion_length: int = 40
    temperature: float = 1.0
    micro_batch_size: int = 64
    eval_every: int = 10
    lr: float = 1e-4
    # The supervised gate's grid (dopd.lab.gates): every method gets the rates at which training
    # on the teacher's samples closes the gap.
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    seeds: tuple[int, ...] = (0, 1, 2)
    # One torch thread: tiny models gain nothing from more, and next to any other busy process
    # two threads that wait on each other ran a tiny training step 24x slower (docs/lab.md).
    threads: int = 1
    # Run on a pair whose gates (dopd.lab.gates) failed or were never measured; the results
    # then record the gates as they are.
    allow_failed_gates: bool = False


@dataclass
class RunResult:
    """One finished run: test accuracy, its metric records and where it lives; ``correct`` holds
    one verdict per test problem, in the test file's order, for paired comparisons."""

    method: str
    seed: int
    lr: float
    accuracy: float
    records: list[dict] = field(default_factory=list)
    wall_seconds: float = 0.0
    run_dir: str = ""
    correct: list[bool] = field(default_factory=list)
    class_accuracy: dict[str, float] = field(default_factory=dict)


def write_data(
    task: Task, settings: LabSettings, data_dir: Path, hint_forms: set[str]
) -> dict[str, Path]:
    """JSONL files of the splits: ``train/<hint_form>``, ``valid`` and ``test``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    splits = {f"train/{form}": ("train", settings.train_examples, form) for form in hint_forms}
    splits.update(
        {
            "valid": ("valid", settings.valid_examples, None),
            "test": ("test", settings.test_examples, None),
        }
    )
    test_prompts = {
        e.prompt for e in task.examples(DATA_SEEDS["test"], settings.test_examples, split="test")
    }
    for key, (split, count, form) in splits.items():
        path = data_dir / f"{key.replace('/', '_')}.jsonl"
        # Pretraining only saw "train"-side prompts: validation and test come from the held-out
        # side, and validation (which picks learning rates) never repeats a test problem.
        side = "train" if split == "train" else "test"
        exclude = test_prompts if split == "valid" else set()
        rows = [
            asdict(example)
            for example in _examples_excluding(task, DATA_SEEDS[split], count, form, side, exclude)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[key] = path
    return files


def _examples_excluding(
    task: Task, seed: int, count: int, hint_form: str | None, split: str, exclude: set[str]
) -> list:
    """The first ``count`` examples of ``task.examples(seed, ..., split=split)`` whose prompt is
    not in ``exclude``."""
    drawn = count
    while True:
        kept = [
            e for e in task.examples(seed, drawn, hint_form, split=split) if e.prompt not in exclude
        ]
        if len(kept) >= count:
            return kept[:count]
        if drawn > 8 * (count + len(exclude)):
            raise ConfigError(
                f"task {task.name!r} has too few distinct {split!r} prompts for {count} examples "
                "outside the test split"
            )
        drawn *= 2


def method_config(
    method: Method,
    *,
    seed: int,
    lr: float,
    settings: LabSettings,
    model_dir: Path,
    files: dict[str, Path],
    output_dir: Path,
    task: Task,
) -> TrainConfig:
    """The ``TrainConfig`` of one lab run."""
    hint_form = method.hint_form or task.default_hint
    return from_dict(
        TrainConfig,
        {
            "output_dir": str(output_dir),
            "seed": seed,
            "student": {"path": str(model_dir / "student")},
            "teacher": {"path": str(model_dir / "teacher")},
            "tokenizer": {"path": str(model_dir / "student")},
            "data": {
                "train": str(files[f"train/{hint_form}"]),
                "eval": str(files["valid"]),
                "max_prompt_length": 256,
            },
            "objective": {"name": method.objective, **method.options},
            "views": dict(method.views),
            "rollout": {
                "prompts_per_step": settings.prompts_per_step,
                "num_generations": settings.num_generations,
                "max_completion_length": settings.max_completion_length,
                "temperature": settings.temperature,
            },
            "optim": {
                "lr": lr,
                "max_steps": settings.steps,
                "warmup_steps": min(settings.warmup_steps, settings.steps),
                "micro_batch_size": settings.micro_batch_size,
            },
            "loop": {"save_every": 0, "eval_every": settings.eval_every},
            "eval": {
                "max_examples": settings.valid_examples,
                "max_new_tokens": settings.max_completion_length,
            },
        },
    )


@dataclass
class HeldOut:
    """Greedy decoding of the test split without privileged context: ``correct`` holds one
    verdict per problem (in the file's order), ``class_accuracy`` the share of right tokens per
    token class over every completion (``Task.token_verdicts``; empty when the task judges no
    tokens)."""

    correct: list[bool]
    class_accuracy: dict[str, float]

    @property
    def accuracy(self) -> float:
        return statistics.fmean(self.correct)


def held_out(model, tokenizer, task: Task, test_file: Path, settings: LabSettings) -> HeldOut:
    """Score ``model`` on the test split, decoding greedily without privileged context."""
    examples = load_examples(str(test_file))
    prompts, _ = tokenize_views(examples, tokenizer)
    result = evaluate(
        model,
        tokenizer,
        prompts,
        [e.answer for e in examples],
        verifier=task.verify,
        max_new_tokens=settings.max_completion_length,
        batch_size=64,
    )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # class -> [right, total]
    for sample in result.samples:
        ids = tokenizer(sample["completion"], add_special_tokens=False)["input_ids"]
        tokens = tokenizer.convert_ids_to_tokens(ids)
        roles, verdicts = task.token_roles(tokens), task.token_verdicts(tokens, sample["answer"])
        if roles is None or verdicts is None:
            break
        for role, right in zip(roles, verdicts):
            counts[role][0] += right
            counts[role][1] += 1
    class_accuracy = {role: right / total for role, (right, total) in sorted(counts.items())}
    return HeldOut([sample["correct"] for sample in result.samples], class_accuracy)


def baseline_scores(
    task: Task, model_dir: Path, settings: LabSettings, files: dict[str, Path]
) -> dict[str, HeldOut]:
    """The pretrained teacher's and student's scores on the test split, without privileged
    context."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "student")
    return {
        role: held_out(
            AutoModelForCausalLM.from_pretrained(model_dir / role),
            tokenizer,
            task,
            files["test"],
            settings,
        )
        for role in ("teacher", "student")
    }


def run_method(
    method: Method,
    *,
    seed: int,
    lr: float,
    settings: LabSettings,
    model_dir: Path,
    files: dict[str, Path],
    output_dir: Path,
    task: Task,
) -> RunResult:
    """Train one method from the pretrained student and score it on the test split."""
    config = method_config(
        method,
        seed=seed,
        lr=lr,
        settings=settings,
        model_dir=model_dir,
        files=files,
        output_dir=output_dir,
        task=task,
    )
    start = time.perf_counter()
    trainer = Trainer(config, overwrite=True, verifier=task.verify, token_roles=task.token_roles)
    trainer.train()
    student = trainer.accelerator.unwrap_model(trainer.student)
    with torch.no_grad():
        scores = held_out(student, trainer.tokenizer, task, files["test"], settings)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    wall_seconds = time.perf_counter() - start
    return RunResult(
        method.name,
        seed,
        lr,
        scores.accuracy,
        records,
        wall_seconds,
        str(output_dir),
        scores.correct,
        scores.class_accuracy,
    )
