"""Command line: ``dopd train``, ``dopd eval``, ``dopd objectives``. Parse, build, run.

    dopd train --config configs/tiny.yaml --set objective.top_k=64 --set output_dir=runs/x
    dopd eval --model runs/x/model --data configs/data/tiny.jsonl
    dopd objectives
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dopd.errors import DOPDError


def _train(args: argparse.Namespace) -> None:
    from dopd.config import load_config
    from dopd.trainer import Trainer

    config = load_config(args.config, args.set)
    Trainer(config, resume=args.resume, overwrite=args.overwrite).train(stop_after=args.stop_after)


def _eval(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dopd.data import load_examples, tokenize_views
    from dopd.evaluation import evaluate, load_verifier

    if not os.path.isdir(args.model):
        raise DOPDError(f"--model {args.model!r} is not a directory; pass a saved model folder such as runs/x/model")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    examples = load_examples(args.data)[: args.max_examples]
    prompt_ids, _ = tokenize_views(examples, tokenizer)
    result = evaluate(
        model, tokenizer, prompt_ids, [e.answer or "" for e in examples],
        verifier=load_verifier(args.verifier), max_new_tokens=args.max_new_tokens,
    )
    print(json.dumps({"accuracy": result.accuracy, "correct": result.correct, "total": result.total}))


def _demo(args: argparse.Namespace) -> None:
    from dopd.lab.commands import demo

    demo(args.output, steps=args.steps)


def _lab(args: argparse.Namespace) -> None:
    from dopd.lab.commands import lab

    lab(args.output or f"runs/lab-{args.suite}", args.suite, args.seeds, args.task, tune=not args.no_tune)


def _pretrain(args: argparse.Namespace) -> None:
    from dopd.lab.pretrain import main_pretrain

    report = main_pretrain(args.task, args.output, args.seed)
    print(json.dumps({role: report[role]["accuracy"] for role in ("teacher", "student")}, indent=2))


def _objectives(args: argparse.Namespace) -> None:
    from dopd.objectives.registry import OBJECTIVES

    width = max(len(name) for name in OBJECTIVES)
    for name, spec in OBJECTIVES.items():
        print(f"{name:<{width}}  teacher={spec.teacher_view:<10}  {spec.summary}")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dopd", description="Dual On-policy Distillation and its baselines")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of dopd's own errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a student with on-policy distillation")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted), repeatable")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    train.add_argument("--stop-after", type=_positive_int, default=None, metavar="N", help="stop after N steps (the schedule keeps optim.max_steps)")
    train.set_defaults(run=_train)

    evaluation = commands.add_parser("eval", help="held-out accuracy of a saved model without privileged context")
    evaluation.add_argument("--model", required=True, help="a saved model folder (e.g. output_dir/model)")
    evaluation.add_argument("--data", required=True, help="examples with answers (.jsonl/.json/.parquet or a datasets name)")
    evaluation.add_argument("--verifier", default="exact", help="exact, numeric, or path/to/file.py:function")
    evaluation.add_argument("--max-new-tokens", type=_positive_int, default=64)
    evaluation.add_argument("--max-examples", type=_positive_int, default=None)
    evaluation.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="the privilege lab in minutes: 4 methods on tiny models, CPU")
    demo.add_argument("--output", default="runs/demo", help="folder for results.json, report.md, plots, tokens.html")
    demo.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps per method (default 40)")
    demo.set_defaults(run=_demo)

    from dopd.lab.methods import SUITES

    lab = commands.add_parser("lab", help="the full lab benchmark: a suite of methods over seeds, with lr tuning")
    lab.add_argument("--suite", default="main", choices=sorted(SUITES), help="which methods (default: main)")
    lab.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lab.add_argument("--task", default="arithmetic", help="a built-in task or path/to/file.py:ClassName")
    lab.add_argument("--no-tune", action="store_true", help="skip learning-rate tuning (use the demo's rate)")
    lab.add_argument("--output", default=None, help="output folder (default runs/lab-SUITE)")
    lab.set_defaults(run=_lab)

    pretrain = commands.add_parser("pretrain", help="pretrain the lab's tiny teacher and student on a task")
    pretrain.add_argument("--task", default="arithmetic", help="a built-in task or path/to/file.py:ClassName")
    pretrain.add_argument("--output", required=True, help="folder for teacher/, student/ and pretrain.json")
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(run=_pretrain)

    listing = commands.add_parser("objectives", help="list every objective name")
    listing.set_defaults(run=_objectives)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DOPDError as error:
        if args.debug:
            raise
        print(f"dopd: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
