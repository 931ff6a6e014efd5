"""``dopd demo``, ``dopd lab`` and ``dopd pretrain``: run a suite of methods from the same
pretrained pair, then write ``results.json``, ``report.md``, plots and the token-level HTML."""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import sys
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from dopd.errors import ConfigError
from dopd.lab.catalog import load_task
from dopd.lab.gates import failed_checks
from dopd.lab.methods import Method, suite_methods
from dopd.lab.placement import placement_table, regime_placement
from dopd.lab.pretrain import lab_model_dir, main_pretrain, torch_threads
from dopd.lab.report import (
    class_rows,
    class_scores,
    format_table,
    markdown_rows,
    markdown_table,
    summarize,
)
from dopd.lab.rollout_view import rollout_records
from dopd.lab.runner import (
    DATA_SEEDS,
    LabSettings,
    RunResult,
    baseline_scores,
    run_method,
    write_data,
)
from dopd.lab.task import Task
from dopd.viz.plots import plot_curves, plot_regimes
from dopd.viz.tokens import write_rollouts_html

HTML_ROLLOUTS = 12  # rollouts shown token by token in tokens.html
PLACEMENT_ROLLOUTS = 128  # held-out rollouts behind the regime-placement table
# One seed at the lab's budget and the rate the tuned main suite chose for most methods (1e-4).
DEMO_SETTINGS = LabSettings(seeds=(0,), lr=1e-4, valid_examples=64)


def model_pair(task: Task, spec: str, output_dir: Path) -> Path:
    """The shipped pretrained pair of a built-in task, else the pair in ``output_dir/models``
    (pretrained there now unless an earlier run, or ``dopd pretrain --output``, put it there)."""
    for folder in (lab_model_dir(task.name), output_dir / "models"):
        if (folder / "teacher").is_dir() and (folder / "student").is_dir():
            return folder
    print(
        f"no pretrained models for task {task.name!r}; "
        f"pretraining them into {output_dir / 'models'}"
    )
    main_pretrain(spec, str(output_dir / "models"), 0)
    return output_dir / "models"


def pair_gates(model_dir: Path, *, allow_failed: bool) -> dict | None:
    """The gates ``dopd pretrain`` recorded for the pair in ``model_dir`` (docs/lab.md), or a
    ``ConfigError`` when they are missing or failed, unless ``allow_failed`` (then the suite runs
    and its results record the gates as they are: None when missing)."""
    report_path = model_dir / "pretrain.json"
    gates = json.loads(report_path.read_text()).get("gates") if report_path.is_file() else None
    if allow_failed:
        return gates
    if gates is None:
        raise ConfigError(
            f"{report_path}: the pair records no gates, so nothing shows it can tell the methods "
            "apart; re-pretrain it (dopd pretrain) or pass --allow-failed-gates"
        )
    if not gates["passed"]:
        raise ConfigError(
            f"{report_path}: the pair failed its gates: {'; '.join(failed_checks(gates))}; "
            "fix the task or its pretraining, or pass --allow-failed-gates"
        )
    return gates


def tune_lr(method: Method, context: dict) -> RunResult:
    """Train ``method`` on the first seed at every rate of ``settings.lr_grid``; return the run
    with the best final validation accuracy (ties: the smaller rate). Its test accuracy is never
    looked at for the choice, so it stands as that seed's result."""
    settings = context["settings"]
    runs = {}
    for lr in settings.lr_grid:
        run_dir = (
            context["output_dir"]
            / "runs"
            / _slug(method.name)
            / f"seed{settings.seeds[0]}-lr{lr:g}"
        )
        runs[lr] = run_method(
            method, seed=settings.seeds[0], lr=lr, output_dir=run_dir, **_run_args(context)
        )
    scores = {
        lr: [r["eval/accuracy"] for r in run.records if "eval/accuracy" in r][-1]
        for lr, run in runs.items()
    }
    context["tuning"][method.name] = scores
    return runs[max(scores, key=lambda lr: (scores[lr], -lr))]


def run_suite(
    suite: str, settings: LabSettings, output_dir: Path, *, tune: bool, command: str
) -> dict:
    """Train every method of ``suite`` for every seed and write the report files."""
    with torch_threads(settings.threads):
        return _run_suite(suite, settings, output_dir, tune=tune, command=command)


def _run_suite(
    suite: str, settings: LabSettings, output_dir: Path, *, tune: bool, command: str
) -> dict:
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # per-run checkpoint chatter
    task = load_task(settings.task)
    methods = suite_methods(suite, task)
    model_dir = model_pair(task, settings.task, output_dir)
    # Refused before anything is written (a pair pretrained just now stays, for reuse).
    gates = pair_gates(model_dir, allow_failed=settings.allow_failed_gates)
    output_dir.mkdir(parents=True, exist_ok=True)
    hint_forms = {method.hint_form or task.default_hint for method in methods}
    files = write_data(task, settings, output_dir / "data", hint_forms)
    baselines = baseline_scores(task, model_dir, settings, files)
    context = {
        "task": task,
        "settings": settings,
        "model_dir": model_dir,
        "files": files,
        "output_dir": output_dir,
        "tuning": {},
    }
    results: list[RunResult] = []
    for index, method in enumerate(methods, start=1):
        print(f"[{index}/{len(methods)}] {method.name}", flush=True)
        tuned = tune_lr(method, context) if tune else None
        lr = tuned.lr if tuned else settings.lr
        for seed in settings.seeds:
            if tuned is not None and seed == tuned.seed:
                results.append(tuned)
                continue
            run_dir = output_dir / "runs" / _slug(method.name) / f"seed{seed}-lr{lr:g}"
            results.append(
                run_method(method, seed=seed, lr=lr, output_dir=run_dir, **_run_args(context))
            )
    summary = summarize(results, baselines["teacher"].accuracy, baselines["student"].accuracy)
    summary.update(
        {
            **{
                f"{role}_classes": class_scores([scores.class_accuracy])
                for role, scores in baselines.items()
            },
            "suite": suite,
            "task": task.name,
            "settings": asdict(settings),
            "gates": gates,
            "lr_tuning": {
                k: {f"{lr:g}": v for lr, v in s.items()} for k, s in context["tuning"].items()
            },
        }
    )
    _write_outputs(summary, results, context, command)
    return summary


def _run_args(context: dict) -> dict:
    return {key: context[key] for key in ("settings", "model_dir", "files", "task")}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name.replace("->", "_to_"))


def _write_outputs(summary: dict, results: list[RunResult], context: dict, command: str) -> None:
    output_dir = context["output_dir"]
    runs: dict[str, list[list[dict]]] = {}
    for result in results:
        runs.setdefault(result.method, []).append(result.records)
    references = {"teacher": summary["teacher_accuracy"], "student": summary["student_accuracy"]}
    plot_curves(
        runs,
        output_dir / "curves.png",
        title=f"{summary['suite']} suite, {summary['task']} task",
        references=references,
    )
    routed = next(
        (r for r in results if any("fraction/HT" in record for record in r.records)), None
    )
    if routed is not None:
        plot_regimes(
            routed.records, output_dir / "regimes.png", title=f"{routed.method}: regime fractions"
        )
        records = _placement(summary, routed, context)
        write_rollouts_html(
            records[:HTML_ROLLOUTS],
            output_dir / "tokens.html",
            title=f"{routed.method}: held-out rollouts of the trained student",
        )
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "report.md").write_text(markdown_report(summary, command, context))
    print(format_table(summary))
    print(
        f"wrote {output_dir}/results.json, report.md, curves.png"
        + (", regimes.png, tokens.html" if routed else "")
    )


def _placement(summary: dict, routed: RunResult, context: dict) -> list[dict]:
    """Route held-out rollouts of the pretrained and of the trained student; record the regime
    placement per token role in ``summary``; return the trained student's token records."""
    task, settings, teacher = (
        context["task"],
        context["settings"],
        str(context["model_dir"] / "teacher"),
    )
    examples = task.examples(DATA_SEEDS["test"], PLACEMENT_ROLLOUTS, split="test")
    students = {
        "pretrained student": str(context["model_dir"] / "student"),
        f"trained {routed.method} student": str(Path(routed.run_dir) / "model"),
    }
    records = {
        name: rollout_records(
            path, teacher, task, examples, max_completion_length=settings.max_completion_length
        )
        for name, path in students.items()
    }
    placement = {name: regime_placement(rows, task) for name, rows in records.items()}
    if all(placement.values()):
        summary["regime_placement"] = placement
    return records[f"trained {routed.method} student"]


def _gates_text(gates: dict | None) -> str:
    if gates is None:
        return "not measured for this pair (run with --allow-failed-gates)"
    if not gates["passed"]:
        return "FAILED (run with --allow-failed-gates): " + "; ".join(failed_checks(gates))
    closed = gates["room_to_learn"]["gap_closed"]["value"]
    return f"passed (supervised training on teacher samples closes {closed:.2f} of the gap)"


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown_report(summary: dict, command: str, context: dict) -> str:
    """The report as markdown: provenance, settings, the table, tuning budget, per-seed numbers."""
    settings = context["settings"]
    machine = (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}"
    )
    lines = [
        f"# dopd lab: {summary['suite']} suite on the {summary['task']} task",
        "",
        f"- command: `{command}`",
        f"- commit: `{_commit()}`",
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine}",
        (
            f"- budget per run: {settings.steps} optimizer steps x "
            f"{settings.prompts_per_step} prompts x {settings.num_generations} rollouts, "
            f"completions up to {settings.max_completion_length} tokens; "
            f"seeds {list(settings.seeds)}"
        ),
        (
            f"- held-out test: {settings.test_examples} problems without privileged context; "
            f"teacher {summary['teacher_accuracy']:.3f}, "
            f"student {summary['student_accuracy']:.3f}"
        ),
        "",
        f"- gates: {_gates_text(summary['gates'])}",
        "",
        markdown_table(summary),
        "",
    ]
    classes = class_rows(summary)
    if len(classes) > 1:
        lines += [
            (
                "Per-class token accuracy of the greedy held-out completions (the share of each "
                "class's tokens that are right; illusion index: the error rate on "
                "`unavailable_info` tokens):"
            ),
            "",
            markdown_rows(classes),
            "",
        ]
    if summary["lr_tuning"]:
        lines += [
            (
                f"Learning rates: each method trained at each of {list(settings.lr_grid)} "
                f"on seed {settings.seeds[0]} (the same budget for every method); "
                "the rate with the best final validation accuracy was kept, "
                "and that run is the method's seed-0 result "
                "(test accuracy played no part in the choice):"
            ),
            "",
        ]
        lines += [
            f"- {name}: " + ", ".join(f"{lr}: {acc:.3f}" for lr, acc in scores.items())
            for name, scores in summary["lr_tuning"].items()
        ]
        lines.append("")
    lines += ["Per-seed test accuracy:", ""]
    lines += [
        f"- {name}: " + ", ".join(f"seed {s}: {a:.3f}" for s, a in m["seeds"].items())
        for name, m in summary["methods"].items()
    ]
    for name, placement in summary.get("regime_placement", {}).items():
        lines += [
            "",
            (
                f"Regime placement by token role, {PLACEMENT_ROLLOUTS} held-out rollouts "
                f"of the {name}, routed by DOPD's default rule "
                "with the privileged teacher (fraction of each role's tokens in each regime; "
                "q and A of the sampled token):"
            ),
            "",
            placement_table(placement),
        ]
    lines += [
        "",
        (
            "Plots: `curves.png` (validation accuracy, student entropy, loss vs step), "
            "`regimes.png`; token view: `tokens.html`."
        ),
        "",
    ]
    return "\n".join(lines)


def demo(output_dir: str, steps: int | None = None, *, allow_failed_gates: bool = False) -> dict:
    """The demo: the ``demo`` suite, one seed, fixed learning rate."""
    settings = replace(DEMO_SETTINGS, allow_failed_gates=allow_failed_gates)
    settings = settings if steps is None else replace(settings, steps=steps)
    return run_suite(
        "demo",
        settings,
        Path(output_dir),
        tune=False,
        command="dopd demo " + " ".join(sys.argv[2:]),
    )


def lab(
    output_dir: str,
    suite: str,
    seeds: list[int],
    task: str,
    tune: bool,
    *,
    allow_failed_gates: bool = False,
) -> dict:
    """The benchmark: ``suite`` over ``seeds`` with per-method learning-rate tuning."""
    settings = LabSettings(task=task, seeds=tuple(seeds), allow_failed_gates=allow_failed_gates)
    return run_suite(
        suite, settings, Path(output_dir), tune=tune, command="dopd lab " + " ".join(sys.argv[2:])
    )
