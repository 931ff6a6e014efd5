"""Pretrain a lab task's tiny teacher and student from scratch, on CPU, in a few minutes.

Both are Qwen3 causal LMs over the task's character tokenizer, trained by supervised next-token
prediction on the task's solutions (loss on solution tokens and the closing EOS only). Half the
training prompts are plain, half carry a privileged context through ``DEFAULT_PRIVILEGED_TEMPLATE``
(mostly the default hint, the rest spread over the other hint forms), so both models answer with
and without hints. By default the teacher is wider, deeper and trained longer, so it is the
stronger of the two at equal information; a task may instead give both one recipe and a different
curriculum (``Task.pretraining_problem``, ``Task.unsupervised_classes``). Training draws only the
task's ``"train"`` split; held-out problems from the ``"test"`` split (never trained on) measure
greedy accuracy per view.

    report = main_pretrain("arithmetic", "out/pair", seed=0)   # what `dopd pretrain` runs
    teacher = AutoModelForCausalLM.from_pretrained(lab_model_dir("arithmetic") / "teacher")

Output: ``DIR/teacher`` and ``DIR/student`` (``save_pretrained`` directories with the tokenizer)
and ``DIR/pretrain.json`` (sizes, steps, seed, wall time, accuracies, and the gates of
``dopd.lab.gates``, which the suites check before they train on a pair).
"""

from __future__ import annotations

import json
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dopd.io.data import Example, privileged_prompt, tokenize_prompt
from dopd.lab.catalog import load_task
from dopd.lab.gates import DEFAULT_GATES, GateSettings, measure_gates
from dopd.lab.supervised import collate, completion_budget, warmup_cosine
from dopd.lab.task import Problem, Task
from dopd.modeling.tiny import build_char_tokenizer, build_tiny_model
from dopd.training.evaluation import evaluate

CHECKPOINTS = Path(__file__).parent / "checkpoints"
NO_HINT = "no_hint"  # the accuracy key of plain prompts (no privileged context at all)
EVAL_SEED_OFFSET = 1_000_003  # held-out problems come from their own seed


@dataclass(frozen=True)
class ModelRecipe:
    """Architecture and training length of one model of the pair."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    steps: int
    learning_rate: float


TEACHER = ModelRecipe(128, 4, 4, 2, 384, steps=1200, learning_rate=2e-3)
STUDENT = ModelRecipe(64, 2, 4, 2, 128, steps=1600, learning_rate=2e-3)


@dataclass(frozen=True)
class PretrainOptions:
    """What both models share: batch, prompt mix, schedule and evaluation size."""

    batch_size: int = 64
    plain_share: float = 0.5  # rows with no privileged context
    default_hint_share: float = 0.3  # rows with the default hint; the rest get other hint forms
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_problems: int = 256
    eval_batch_size: int = 128
    # One thread: results do not depend on the machine's core count, and a small shared CPU is
    # not oversubscribed (two threads next to other work ran 3-7x slower than one).
    threads: int = 1
    progress: bool = True


def lab_model_dir(task_name: str) -> Path:
    """The folder of the shipped pair of a built-in task: ``teacher/``, ``student/``,
    ``pretrain.json``."""
    return CHECKPOINTS / task_name


def main_pretrain(task_spec: str, output_dir: str, seed: int) -> dict:
    """Load ``task_spec`` (see ``load_task``), pretrain its pair into ``output_dir`` (with the
    task's ``pretraining_recipes`` where it has them), and return the report that is also
    written to ``output_dir/pretrain.json``."""
    task = load_task(task_spec)
    recipes = {
        role: ModelRecipe(**task.pretraining_recipes[role]) if task.pretraining_recipes else default
        for role, default in (("teacher", TEACHER), ("student", STUDENT))
    }
    return pretrain_pair(task, output_dir, seed=seed, **recipes)


def pretrain_pair(
    task: Task,
    output_dir: str | Path,
    *,
    seed: int = 0,
    teacher: ModelRecipe = TEACHER,
    student: ModelRecipe = STUDENT,
    options: PretrainOptions = PretrainOptions(),
    gate_settings: GateSettings = DEFAULT_GATES,
) -> dict:
    """Train, evaluate and save a teacher and a student for ``task``; deterministic by ``seed``.

    Returns the report written to ``output_dir/pretrain.json``: per model its recipe, parameter
    count, training time and held-out greedy accuracy per view: ``no_hint`` is the plain prompt,
    every hint form (``none`` included) the privileged prompt with that form's context; and the
    pair's gates, measured with ``gate_settings``.
    """
    with torch_threads(options.threads):
        return _pretrain_pair(
            task, Path(output_dir), seed, teacher, student, options, gate_settings
        )


@contextmanager
def torch_threads(count: int):
    """Run the block with ``count`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _pretrain_pair(
    task: Task,
    output: Path,
    seed: int,
    teacher: ModelRecipe,
    student: ModelRecipe,
    options: PretrainOptions,
    gate_settings: GateSettings,
) -> dict:
    start, cpu_start = time.perf_counter(), time.process_time()
    tokenizer = build_char_tokenizer(task.characters)
    held_out = task.problems(seed + EVAL_SEED_OFFSET, options.eval_problems, split="test")
    report = {"task": task.name, "seed": seed, "eval_split": "test", "options": asdict(options)}
    models = {}
    for role, recipe, model_seed in (("teacher", teacher, seed), ("student", student, seed + 1)):
        model = models[role] = build_model(recipe, tokenizer, model_seed)
        train_start = time.perf_counter()
        train(model, tokenizer, task, recipe, options, seed=seed, role=role)
        report[role] = {
            **asdict(recipe),
            "parameters": sum(parameter.numel() for parameter in model.parameters()),
            "train_time_s": round(time.perf_counter() - train_start, 1),
            "accuracy": accuracy_by_view(model, tokenizer, task, held_out, options),
        }
        model.save_pretrained(output / role)
        tokenizer.save_pretrained(output / role)
    report["gates"] = measure_gates(
        models["teacher"],
        models["student"],
        tokenizer,
        task,
        held_out,
        {role: report[role]["accuracy"][NO_HINT] for role in models},
        seed=seed,
        accuracy_of=lambda model: view_accuracy(
            model, tokenizer, task, [p.prompt for p in held_out], held_out, options
        ),
        settings=gate_settings,
        progress=options.progress,
    )
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    # CPU time next to wall time: on a shared machine the wall time measures the neighbours too.
    report["cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    (output / "pretrain.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_model(recipe: ModelRecipe, tokenizer, seed: int):
    """A random-init tiny Qwen3 of ``recipe``'s shape over ``tokenizer``'s vocabulary."""
    return build_tiny_model(
        len(tokenizer),
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        seed=seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# ---------------------------------------------------------------------------------------------
# Training


def train(
    model,
    tokenizer,
    task: Task,
    recipe: ModelRecipe,
    options: PretrainOptions,
    *,
    seed: int,
    role: str,
) -> None:
    """``recipe.steps`` AdamW steps of solution-token cross-entropy on ``role``'s pretraining
    problems (``Task.pretraining_problem``), warmup then cosine decay; tokens of the classes
    ``Task.unsupervised_classes(role)`` are left out of the loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.learning_rate, weight_decay=options.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, options.warmup_steps, recipe.steps)
    )
    unsupervised = task.unsupervised_classes(role)
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"pretrain {role}", disable=not options.progress)
    for _ in bar:
        rows = [training_row(task, rng, options, role) for _ in range(options.batch_size)]
        loss = model(**collate(rows, tokenizer, task=task, unsupervised=unsupervised)).loss
        loss.backward()
        # Clipping keeps the first steps of a from-scratch model at a high lr from diverging.
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()


def training_row(
    task: Task, rng: random.Random, options: PretrainOptions, role: str
) -> tuple[str, str]:
    """One ``(prompt text, solution)`` pair: a fresh pretraining problem of ``role``, shown plain
    or with one of its hints, with the solution of that view."""
    problem = task.pretraining_problem(role, rng)
    roll = rng.random()
    if roll < options.plain_share:
        return problem.prompt, problem.solution
    others = [form for form in task.hint_forms if form != task.default_hint]
    hinted_share = (roll - options.plain_share) / (1.0 - options.plain_share)
    default_share = options.default_hint_share / (1.0 - options.plain_share)
    form = task.default_hint if hinted_share < default_share or not others else rng.choice(others)
    example = Example(problem.prompt, problem.hints[form], problem.answer)
    return privileged_prompt(example), problem.solution_for(form)


# ---------------------------------------------------------------------------------------------
# Evaluation


def accuracy_by_view(
    model, tokenizer, task: Task, problems: list[Problem], options: PretrainOptions
) -> dict[str, float]:
    """Greedy held-out accuracy on plain prompts (``no_hint``) and with each hint form."""
    views = {NO_HINT: [problem.prompt for problem in problems]}
    for form in task.hint_forms:
        views[form] = [
            privileged_prompt(Example(problem.prompt, problem.hints[form])) for problem in problems
        ]
    return {
        view: round(view_accuracy(model, tokenizer, task, prompts, problems, options), 4)
        for view, prompts in views.items()
    }


def view_accuracy(
    model,
    tokenizer,
    task: Task,
    prompts: list[str],
    problems: list[Problem],
    options: PretrainOptions,
) -> float:
    """Fraction of ``prompts`` whose greedy completion ``task.verify`` accepts."""
    prompt_ids = [tokenize_prompt(prompt, tokenizer) for prompt in prompts]
    answers = [problem.answer for problem in problems]
    return evaluate(
        model,
        tokenizer,
        prompt_ids,
        answers,
        verifier=task.verify,
        max_new_tokens=completion_budget(problems, tokenizer),
        batch_size=options.eval_batch_size,
    ).accuracy
