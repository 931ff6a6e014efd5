"""Command line: ``dopd train``, ``dopd eval``, ``dopd vllm-serve``, ``dopd objectives``,
``dopd config``, and the lab's ``demo``, ``lab`` and ``pretrain``. Parse, build, run.

    dopd train --config configs/tiny.yaml --set objective.top_k=64 --set output_dir=runs/x
    dopd vllm-serve --config configs/tiny-vllm.yaml   # then train with rollout.vllm_mode=server
    dopd eval --model runs/x/model --data configs/data/tiny.jsonl --out runs/x/eval
    dopd objectives
    dopd report runs/x                                  # runs/x/report: curves, regimes, tokens
    dopd config --list                                  # every config key: type, default, help
    dopd config --show configs/tiny.yaml --set optim.lr=1e-5   # the resolved config as YAML

Errors: a bad input (any ``DOPDError``: config, data, model source) prints one line
``dopd: error: ...`` to stderr and exits 2; bad arguments exit 2 the same way; an unexpected
exception prints one ``dopd: internal error: ...`` line and exits 1. ``--debug`` (before or after
the command) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from typing import NoReturn

from dopd.errors import DOPDError


def _train(args: argparse.Namespace) -> None:
    from dopd.config import load_config
    from dopd.modeling.loading import check_sources
    from dopd.training.trainer import Trainer

    config = load_config(args.config, args.set)
    check_sources(config)  # before any weights load or output_dir changes
    Trainer(config, resume=args.resume, overwrite=args.overwrite).train(stop_after=args.stop_after)


def _vllm_serve(args: argparse.Namespace) -> None:
    from dopd.config import load_config
    from dopd.training.vllm_server import serve_config

    serve_config(load_config(args.config, args.set))


def _eval(args: argparse.Namespace) -> None:
    from dopd.config import load_config
    from dopd.training.eval_model import run_eval

    if args.set and not args.config:
        raise DOPDError("dopd eval --set overrides a run config; fix: pass --config CONFIG too")
    config = load_config(args.config, args.set) if args.config else None
    summary = run_eval(
        args.model,
        args.data,
        config=config,
        verifier=args.verifier,
        max_new_tokens=args.max_new_tokens,
        max_examples=args.max_examples,
        out=args.out,
    )
    print(json.dumps(summary))


def _demo(args: argparse.Namespace) -> None:
    from dopd.lab.commands import demo

    demo(args.output, steps=args.steps, allow_failed_gates=args.allow_failed_gates)


def _lab(args: argparse.Namespace) -> None:
    from dopd.lab.commands import lab

    lab(
        args.output or f"runs/lab-{args.suite}",
        args.suite,
        args.seeds,
        args.task,
        tune=not args.no_tune,
        allow_failed_gates=args.allow_failed_gates,
    )


def _pretrain(args: argparse.Namespace) -> None:
    from dopd.lab.pretrain import main_pretrain

    report = main_pretrain(args.task, args.output, args.seed)
    print(json.dumps({role: report[role]["accuracy"] for role in ("teacher", "student")}, indent=2))


def _objectives(args: argparse.Namespace) -> None:
    from dopd.objectives.registry import OBJECTIVES

    width = max(len(name) for name in OBJECTIVES)
    for name, spec in OBJECTIVES.items():
        print(f"{name:<{width}}  teacher={spec.teacher_view:<10}  {spec.summary}")


def _report(args: argparse.Namespace) -> None:
    from dopd.viz.report import write_report

    report = write_report(args.run_dir, args.out, step=args.step)
    for note in report.notes:
        print(f"dopd: note: {note}", file=sys.stderr)
    print("wrote " + ", ".join(str(path) for path in report.paths))


def _config(args: argparse.Namespace) -> None:
    from dopd.config import TrainConfig, config_to_dict, load_config
    from dopd.config.listing import config_keys, format_config_keys
    from dopd.config.loading import dump_yaml
    from dopd.errors import ConfigError

    if args.show is None:
        if args.set:
            raise DOPDError(
                "dopd config --list takes no --set (it lists the defaults); "
                "fix: drop --set, or pass --show CONFIG --set KEY=VALUE"
            )
        _write(format_config_keys(config_keys(TrainConfig)) + "\n")
    else:  # what save_config writes to output_dir/config.yaml
        try:
            config = load_config(args.show, args.set)
        except ConfigError as error:  # the file's own errors say --config; here it is --show
            message = str(error)
            if message.startswith(f"{args.show}:"):
                message = message.replace("to --config", "to --show")
            raise ConfigError(message) from None
        _write(dump_yaml(config_to_dict(config)))


def _write(text: str) -> None:
    """``text`` to stdout; a reader that closes the pipe early (``| head``) is no error."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's documented pattern: point stdout at devnull so the flush at exit is silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted), repeatable; dopd config --list lists the keys",
    )


def _add_gates_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-failed-gates",
        action="store_true",
        help="run on a pair whose gates (docs/lab.md) failed or were never measured",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), like every other dopd error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dopd", description="Dual On-policy Distillation and its baselines")
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks instead of one-line errors"
    )
    # --debug also after the command; SUPPRESS keeps a subcommand from resetting the global flag.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_command = functools.partial(commands.add_parser, parents=[debug])

    train = add_command(
        "train",
        help="train a student with on-policy distillation",
        epilog="Every config key with its type, default and help: dopd config --list; "
        "the resolved config of CONFIG and --set: dopd config --show CONFIG --set ...",
    )
    _add_config_flags(train)
    train.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    train.add_argument(
        "--stop-after",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after N steps (the schedule keeps optim.max_steps)",
    )
    train.set_defaults(run=_train)

    serve = add_command(
        "vllm-serve",
        help="serve a config's student with vLLM for rollout.vllm_mode=server "
        "(at rollout.vllm_server_host/port)",
    )
    _add_config_flags(serve)
    serve.set_defaults(run=_vllm_serve)

    evaluation = add_command(
        "eval", help="held-out accuracy of a saved model without privileged context"
    )
    evaluation.add_argument(
        "--model",
        required=True,
        help="a model folder (output_dir/model), a hub id, or a checkpoint folder "
        "(output_dir/checkpoints/step-N, rebuilt from the run's config.yaml)",
    )
    evaluation.add_argument(
        "--data",
        default=None,
        help="examples with answers (.jsonl/.json/.parquet or a datasets name[:split]; "
        "default: the config's data.eval)",
    )
    evaluation.add_argument(
        "--config",
        default=None,
        help="a run config (e.g. output_dir/config.yaml): its data.columns, data.subset, "
        "tokenizer.chat_template_kwargs and eval defaults apply",
    )
    evaluation.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of --config (dotted), repeatable",
    )
    evaluation.add_argument(
        "--verifier",
        default=None,
        help="exact, numeric, math, or path/to/file.py:function "
        "(default: the config's eval.verifier, else exact)",
    )
    evaluation.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="default: the config's eval.max_new_tokens, else 64",
    )
    evaluation.add_argument("--max-examples", type=_positive_int, default=None)
    evaluation.add_argument(
        "--out", default=None, metavar="DIR", help="write DIR/eval.jsonl and DIR/summary.json"
    )
    evaluation.set_defaults(run=_eval)

    demo = add_command("demo", help="the privilege lab in minutes: 5 methods on tiny models, CPU")
    demo.add_argument(
        "--output",
        default="runs/demo",
        help="folder for results.json, report.md, plots, tokens.html",
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=None, help="optimizer steps per method (default 120)"
    )
    _add_gates_flag(demo)
    demo.set_defaults(run=_demo)

    from dopd.lab.methods import SUITES

    lab = add_command(
        "lab", help="the full lab benchmark: a suite of methods over seeds, with lr tuning"
    )
    lab.add_argument(
        "--suite", default="main", choices=sorted(SUITES), help="which methods (default: main)"
    )
    lab.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    lab.add_argument(
        "--task", default="shiftmap", help="a built-in task or path/to/file.py:ClassName"
    )
    lab.add_argument(
        "--no-tune", action="store_true", help="skip learning-rate tuning (use the demo's rate)"
    )
    lab.add_argument("--output", default=None, help="output folder (default runs/lab-SUITE)")
    _add_gates_flag(lab)
    lab.set_defaults(run=_lab)

    pretrain = add_command("pretrain", help="pretrain the lab's tiny teacher and student on a task")
    pretrain.add_argument(
        "--task", default="arithmetic", help="a built-in task or path/to/file.py:ClassName"
    )
    pretrain.add_argument(
        "--output", required=True, help="folder for teacher/, student/ and pretrain.json"
    )
    pretrain.add_argument("--seed", type=int, default=0)
    pretrain.set_defaults(run=_pretrain)

    listing = add_command("objectives", help="list every objective name")
    listing.set_defaults(run=_objectives)

    report = add_command(
        "report",
        help="draw a training run: curves.png, regimes.png and tokens.html from its output_dir",
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a dopd train output_dir")
    report.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    report.add_argument(
        "--step",
        type=_positive_int,
        default=None,
        help="tokens.html shows the rollouts sampled at this step (default: the last sampled)",
    )
    report.set_defaults(run=_report)

    config = add_command(
        "config",
        help="list every config key (--list), or print a config as resolved (--show CONFIG)",
    )
    action = config.add_mutually_exclusive_group(required=True)
    action.add_argument(
        "--list",
        action="store_true",
        help="every key (dotted, e.g. rollout.vllm_mode) with its type, default and help",
    )
    action.add_argument(
        "--show",
        metavar="CONFIG",
        help="CONFIG after --set, validated, as the YAML a run records in output_dir/config.yaml",
    )
    config.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --show: override a config key (dotted), repeatable",
    )
    config.set_defaults(run=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command of ``argv``; the exit status (0 done, 2 bad input, 1 internal error)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DOPDError as error:
        if args.debug:
            raise
        _print_error(f"error: {error}")
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        _print_error("interrupted")
        return 130
    except Exception as error:
        if args.debug:
            raise
        _print_error(
            f"internal error: {type(error).__name__}: {error}; "
            "rerun with --debug for the traceback and report it"
        )
        return 1
    return 0


def _print_error(message: str) -> None:
    """``dopd: <message>`` on one stderr line, however many lines the message had."""
    print("dopd: " + " ".join(line.strip() for line in message.splitlines()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
