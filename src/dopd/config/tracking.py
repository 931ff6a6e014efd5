"""The ``tracking`` section: where a run's metrics go besides ``metrics.jsonl``, and how often it
records sampled rollouts token by token.

``report_to`` names an experiment tracker that accelerate drives (``Accelerator(log_with=...)``):
every record written to ``metrics.jsonl`` is also logged there, at its step. ``metrics.jsonl``
stays the source of truth (a resumed run cuts it back to its checkpoint; a tracker only appends).
``samples_every`` writes ``sample_rows`` rollouts with each token's group (regime) and statistics
to ``output_dir/rollout_samples.jsonl`` (``dopd.training.samples``), which ``dopd report`` draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dopd.config.loading import doc
from dopd.errors import require_choice, require_int, require_str

ReportTo = Literal["none", "tensorboard", "wandb", "trackio", "mlflow", "all"]
REPORT_TO: tuple[ReportTo, ...] = get_args(ReportTo)
# The trackers report_to can name, each with the package it needs.
TRACKER_PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """Experiment trackers and rollout samples (recorded in the run's config.yaml)."""

    report_to: ReportTo = field(
        default="none",
        metadata=doc(
            "also log metrics to: none, tensorboard, wandb, trackio, mlflow, or all "
            "(every one of those installed)"
        ),
    )
    project: str = field(
        default="dopd", metadata=doc("tracker project (wandb/trackio project, mlflow experiment)")
    )
    run_name: str | None = field(
        default=None, metadata=doc("the run's name in the tracker (null: output_dir's folder name)")
    )
    samples_every: int = field(
        default=10,
        metadata=doc(
            "optimizer steps between rollout samples in rollout_samples.jsonl "
            "(also the first and last step); 0 = off"
        ),
    )
    sample_rows: int = field(
        default=4,
        metadata=doc(
            "rollouts per sample, each with per-token regime and statistics "
            "(from the first micro-batch: at most optim.micro_batch_size)"
        ),
    )

    def __post_init__(self) -> None:
        require_choice("report_to", self.report_to, REPORT_TO)
        require_str("project", self.project)
        if self.run_name is not None:
            require_str("run_name", self.run_name)
        require_int("samples_every", self.samples_every, low=0)
        require_int("sample_rows", self.sample_rows, low=1)
