"""The run's records: ``metrics.jsonl``, the experiment trackers accelerate drives
(``tracking.report_to``), and rollout samples (``dopd.training.samples``); and a quiet console.

``accelerator_options(config)`` gives the ``Accelerator`` its trackers (``log_with``) and their
local folder, ``output_dir/tracking``; it checks first that each named tracker's package is
installed (a ``ConfigError`` naming ``tracking.report_to`` and the ``pip install`` otherwise).
``RunRecords`` cuts ``metrics.jsonl`` and ``rollout_samples.jsonl`` back to the step a run
resumes from, starts the trackers on the main process (``init_trackers`` with the flattened
config and the run's name), writes each metrics record to ``metrics.jsonl`` and logs it to the
trackers at its step, appends rollout samples, and finishes the trackers. ``metrics.jsonl`` stays
the source of truth: a resumed run cuts it back to its checkpoint, while a tracker only appends
(wandb, trackio and mlflow start a new run).

Offline: tensorboard writes event files under ``output_dir/tracking/<project>``; mlflow, unless
``MLFLOW_TRACKING_URI`` says otherwise, a file store at ``output_dir/tracking/mlruns``; wandb
keeps its files in ``output_dir/tracking/wandb`` and syncs unless ``WANDB_MODE=offline``; trackio
stores runs locally unless told to sync.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from dopd.config import TrainConfig, config_to_dict
from dopd.config.tracking import TRACKER_PACKAGES
from dopd.errors import ConfigError
from dopd.training.run_dir import truncate_metrics
from dopd.training.samples import SAMPLES_FILE, RolloutSamples
from dopd.training.step import TokenRecord

METRICS_FILE = "metrics.jsonl"
TRACKING_DIR = "tracking"


def tracker_names(config: TrainConfig) -> list[str]:
    """The trackers ``tracking.report_to`` asks for, each checked to be installed (``all``: the
    installed ones among tensorboard, wandb, trackio and mlflow)."""
    report_to = config.tracking.report_to
    if report_to == "none":
        return []
    if report_to == "all":
        names = [name for name in TRACKER_PACKAGES if _installed(name)]
        if not names:
            raise ConfigError(
                "tracking.report_to='all': none of tensorboard, wandb, trackio, mlflow is "
                "installed; fix: pip install tensorboard (or 'dopd[tracking]'), "
                "or set tracking.report_to=none"
            )
        return names
    if not _installed(report_to):
        raise ConfigError(
            f"tracking.report_to={report_to!r} needs the {TRACKER_PACKAGES[report_to]} package, "
            f"which is not installed; fix: pip install {TRACKER_PACKAGES[report_to]}, "
            "or set tracking.report_to=none"
        )
    return [report_to]


def accelerator_options(config: TrainConfig) -> dict[str, Any]:
    """``Accelerator`` keyword arguments for the run's trackers (none: ``{}``)."""
    names = tracker_names(config)
    if not names:
        return {}
    output_dir = Path(config.output_dir)
    return {
        "log_with": names,
        "project_config": ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / TRACKING_DIR)
        ),
    }


class RunRecords:
    """What a run records as it trains: ``start`` the trackers (idempotent), ``log`` each metrics
    record, ``write_samples`` on the steps ``sample_due`` names, ``finish`` the trackers."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, tokenizer, step: int):
        """``step``: the step the run starts from; records after it (left by a run that died
        after its last checkpoint) are dropped."""
        self.accelerator, self.config = accelerator, config
        self.output_dir = Path(config.output_dir)
        self.samples = RolloutSamples(accelerator, config, tokenizer)
        self.started = False
        if accelerator.is_main_process:
            truncate_metrics(self.output_dir / METRICS_FILE, step)
            truncate_metrics(self.output_dir / SAMPLES_FILE, step)

    def start(self) -> None:
        """Start the trackers ``Accelerator(log_with=...)`` names (main process; none: no-op)."""
        if not self.accelerator.log_with or self.started:
            return
        self.started = True
        if not self.accelerator.is_main_process:
            return
        tracking, output_dir = self.config.tracking, self.output_dir.resolve()
        folder = output_dir / TRACKING_DIR
        folder.mkdir(parents=True, exist_ok=True)
        run_name = tracking.run_name or output_dir.name
        names = {str(tracker) for tracker in self.accelerator.log_with}
        if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((folder / "mlruns").as_uri())
        init_kwargs = {
            "wandb": {"name": run_name, "dir": str(folder)},
            "trackio": {"name": run_name},
            "mlflow": {"run_name": run_name, "logging_dir": str(folder / "mlruns")},
        }
        self.accelerator.init_trackers(
            tracking.project,
            config=flat_config(self.config),
            init_kwargs={name: kwargs for name, kwargs in init_kwargs.items() if name in names},
        )

    def log(self, step: int, record: dict[str, float]) -> None:
        """Append ``{"step": step, **record}`` to ``metrics.jsonl`` and log ``record`` to the
        trackers at ``step`` (main process)."""
        if not self.accelerator.is_main_process:
            return
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps({"step": step, **record}) + "\n")
        if self.started:
            self.accelerator.log(record, step=step)

    def sample_due(self, step: int) -> bool:
        """Whether step ``step`` (numbered from 1) records rollout samples on this process."""
        return self.samples.due(step)

    def write_samples(
        self, step: int, tokens: TokenRecord | None, prompts: list[list[int]], rows: list[int]
    ) -> None:
        """Append step ``step``'s rollout samples (``RolloutSamples.write``); None: nothing."""
        if tokens is not None:
            self.samples.write(step, tokens, prompts, rows)

    def finish(self) -> None:
        """Close every tracker (what ``Accelerator.end_training`` does, without also tearing
        down the process group, which the caller may still use); idempotent."""
        if not self.started:
            return
        self.started = False
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def flat_config(config: TrainConfig) -> dict[str, Any]:
    """The run's config as ``{"section.key": value}`` with scalar values (lists, mappings and
    null as JSON text), the form every tracker's hyperparameter table accepts."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:
            flat[prefix] = json.dumps(value)

    visit("", config_to_dict(config))
    return flat


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's own progress bars (e.g. ``save_pretrained``'s
    "Writing model shards") inside the block, so the run's one tqdm bar stays the only one."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hub_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' bars and the hub's
    try:
        yield
    finally:  # each switch back as it was
        if enabled:
            hf_logging.enable_progress_bar()
        if hub_disabled:
            hub_utils.disable_progress_bars()
        else:
            hub_utils.enable_progress_bars()


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKER_PACKAGES[name]) is not None
