"""The trainer's configuration: one typed, frozen dataclass per component, read from YAML.

``load_config("configs/tiny.yaml", ["objective.top_k=64", "output_dir=runs/x"])`` reads the file,
applies ``--set``-style overrides (dotted keys, YAML values), checks every key and type, and
returns a validated ``TrainConfig``. ``save_config`` writes a file that loads back to an equal
config. Each field's help text lives in its ``metadata["help"]``; ``dopd config --list`` (or
``config_help()``) lists every key with its type and default.

Loading touches neither the network nor any file but the config itself: model, data and tokenizer
paths are only checked to be non-empty strings here, so configs for models this machine cannot
hold still validate (``dopd.modeling.loading.check_sources`` checks the sources when ``dopd train``
starts). Errors are ``ConfigError``s naming the dotted key, the value and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

from dopd.config.checkpoint import CheckpointConfig
from dopd.config.data import DataColumns, DataConfig
from dopd.config.listing import config_keys
from dopd.config.loading import (
    BOOLS,
    apply_override,
    config_to_dict,
    convert,
    doc,
    dump_yaml,
    from_dict,
    read_yaml,
)
from dopd.config.models import ModelSpec, TokenizerSpec
from dopd.config.peft import PeftConfig
from dopd.config.rollout import RolloutConfig
from dopd.config.tracking import TrackingConfig
from dopd.errors import (
    ConfigError,
    require_choice,
    require_int,
    require_range,
    require_str,
)
from dopd.objectives.base import Objective
from dopd.objectives.chunked import DEFAULT_CHUNK_ROWS
from dopd.objectives.registry import ObjectiveSpec, get_spec

__all__ = [
    "CheckpointConfig",
    "DataColumns",
    "DataConfig",
    "EvalConfig",
    "LoopConfig",
    "ModelSpec",
    "ObjectiveConfig",
    "OptimConfig",
    "PeftConfig",
    "RolloutConfig",
    "TokenizerSpec",
    "TrainConfig",
    "TrackingConfig",
    "ViewsConfig",
    "config_help",
    "config_to_dict",
    "from_dict",
    "load_config",
    "save_config",
]

# Each choice is typed once; the tuple of its values is what validation and the help list.
PromptView = Literal["privileged", "plain"]
PrivStudentWeights = Literal["live", "base", "ema"]
LossPath = Literal["auto", "chunked", "reference"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Verifier = Literal["exact", "numeric", "math"]
VIEWS: tuple[PromptView, ...] = get_args(PromptView)
PRIV_STUDENT_WEIGHTS: tuple[PrivStudentWeights, ...] = get_args(PrivStudentWeights)
LOSS_PATHS: tuple[LossPath, ...] = get_args(LossPath)
MIXED_PRECISION: tuple[MixedPrecision, ...] = get_args(MixedPrecision)
VERIFIERS: tuple[Verifier, ...] = get_args(Verifier)


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """An objective of the registry by ``name``; in YAML its options sit next to the name.

    ``objective: {name: dopd, top_k: 64}`` gives ``name="dopd", options={"top_k": 64}``; only the
    options that were set are kept, the registry entry supplies the rest.
    """

    name: str = field(
        default="dopd", metadata=doc("registry name of the objective (dopd.objectives.registry)")
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={**doc("every other key: an option of that objective, e.g. top_k"), "rest": True},
    )

    def __post_init__(self) -> None:
        hints = get_type_hints(self.spec.config_class)
        # The same type rules as every other key: YAML lists become the tuples options expect.
        options = {
            key: convert(hints[key], value, key) if key in hints else value
            for key, value in self.options.items()
        }
        object.__setattr__(self, "options", options)
        objective = self.build()  # the objective's own validation, now, not at the first step
        if objective.config.importance_correction != "none" and not objective.has_sampled_terms:
            raise ConfigError(
                f"importance_correction={objective.config.importance_correction!r}: objective "
                f"{self.name!r} has no sampled-token term to correct; the correction applies to "
                "sampled-token objectives (vanilla_opd, priv_teacher_opd, uniform with "
                "granularity=sampled); set it to 'none'"
            )

    @property
    def spec(self) -> ObjectiveSpec:
        return get_spec(self.name)

    def build(self) -> Objective:
        """A fresh objective with these options."""
        return self.spec.build(**self.options)


@dataclass(frozen=True, kw_only=True)
class ViewsConfig:
    """Which input each model view sees, and which weights score the privileged student."""

    teacher: PromptView | None = field(
        default=None, metadata=doc("teacher input: privileged or plain (null: the objective's)")
    )
    priv_student: PromptView | None = field(
        default=None,
        metadata=doc("privileged-student input: privileged or plain (null: the objective's)"),
    )
    priv_student_weights: PrivStudentWeights = field(
        default="live",
        metadata=doc("weights of the privileged student: live (current), base (initial) or ema"),
    )
    ema_decay: float = field(
        default=0.99, metadata=doc("EMA decay per optimizer step when priv_student_weights=ema")
    )
    student_input: PromptView = field(
        default="plain",
        metadata=doc(
            "the student's training input: plain, or privileged (Priv.T->Priv.S diagnostic)"
        ),
    )

    def __post_init__(self) -> None:
        if self.teacher is not None:
            require_choice("teacher", self.teacher, VIEWS)
        if self.priv_student is not None:
            require_choice("priv_student", self.priv_student, VIEWS)
        require_choice("priv_student_weights", self.priv_student_weights, PRIV_STUDENT_WEIGHTS)
        require_range("ema_decay", self.ema_decay, low=0.0, high=1.0, low_open=True, high_open=True)
        require_choice("student_input", self.student_input, VIEWS)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, and gradient clipping."""

    lr: float = field(default=5e-6, metadata=doc("peak learning rate"))
    weight_decay: float = field(default=0.0, metadata=doc("AdamW weight decay"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=doc("AdamW betas"))
    warmup_steps: int = field(
        default=0, metadata=doc("optimizer steps of linear warmup before the cosine decay")
    )
    max_steps: int = field(default=200, metadata=doc("optimizer steps of the run"))
    max_grad_norm: float = field(
        default=1.0, metadata=doc("clip the gradient norm to this; 0 = off")
    )
    micro_batch_size: int = field(
        default=8, metadata=doc("sequences per forward/backward pass (memory, not maths)")
    )
    max_consecutive_skips: int = field(
        default=5,
        metadata=doc(
            "stop with a diagnosis after this many optimizer steps in a row "
            "skipped for a non-finite loss or gradient"
        ),
    )

    def __post_init__(self) -> None:
        require_range("lr", self.lr, low=0.0, low_open=True)
        require_range("weight_decay", self.weight_decay, low=0.0)
        for index, beta in enumerate(self.betas):
            require_range(f"betas[{index}]", beta, low=0.0, high=1.0, high_open=True)
        require_int("warmup_steps", self.warmup_steps, low=0)
        require_int("max_steps", self.max_steps, low=1)
        if self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}; "
                "lower warmup_steps or raise max_steps"
            )
        require_range("max_grad_norm", self.max_grad_norm, low=0.0)
        require_int("micro_batch_size", self.micro_batch_size, low=1)
        require_int("max_consecutive_skips", self.max_consecutive_skips, low=1)


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Precision, memory and the cadence of logging, checkpoints and evaluation."""

    mixed_precision: MixedPrecision = field(
        default="no", metadata=doc("accelerate mixed precision: no, bf16 or fp16")
    )
    gradient_checkpointing: bool = field(
        default=False, metadata=doc("recompute student activations in backward")
    )
    log_every: int = field(
        default=1,
        metadata=doc(
            "optimizer steps between metrics.jsonl records (evaluated steps are always recorded)"
        ),
    )
    save_every: int = field(
        default=50, metadata=doc("optimizer steps between checkpoints; 0 = only the last")
    )
    eval_every: int = field(
        default=0, metadata=doc("optimizer steps between evaluations on data.eval; 0 = off")
    )
    loss_path: LossPath = field(
        default="auto",
        metadata=doc(
            "auto: chunked hidden-state loss when the model's head allows it, else reference; "
            "chunked or reference to force one"
        ),
    )
    loss_chunk_rows: int = field(
        default=DEFAULT_CHUNK_ROWS,
        metadata=doc(
            "token rows per vocabulary projection on the chunked loss path (memory, not maths)"
        ),
    )

    def __post_init__(self) -> None:
        require_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        require_choice("gradient_checkpointing", self.gradient_checkpointing, BOOLS)
        require_int("log_every", self.log_every, low=1)
        require_int("save_every", self.save_every, low=0)
        require_int("eval_every", self.eval_every, low=0)
        require_choice("loss_path", self.loss_path, LOSS_PATHS)
        require_int("loss_chunk_rows", self.loss_chunk_rows, low=1)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Held-out accuracy, always without privileged context."""

    max_examples: int = field(
        default=64, metadata=doc("evaluate on at most this many examples of data.eval")
    )
    verifier: Verifier = field(
        default="exact",
        metadata=doc("answer check: exact, numeric, math, or path/to/file.py:function"),
    )
    max_new_tokens: int = field(default=64, metadata=doc("most new tokens per greedy answer"))

    def __post_init__(self) -> None:
        require_int("max_examples", self.max_examples, low=1)
        if ".py:" not in self.verifier:
            require_choice("verifier", self.verifier, VERIFIERS)
        require_int("max_new_tokens", self.max_new_tokens, low=1)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything ``dopd train`` needs; the sections are the dataclasses above."""

    output_dir: str = field(
        default="runs/dopd", metadata=doc("run directory: checkpoints, metrics.jsonl, config.yaml")
    )
    seed: int = field(default=0, metadata=doc("seed of sampling, initialisation and data order"))
    student: ModelSpec = field(metadata=doc("the model being trained"))
    teacher: ModelSpec = field(metadata=doc("the frozen teacher"))
    reference: ModelSpec | None = field(
        default=None, metadata=doc("ExOPD's reference model (null: the student's initial weights)")
    )
    tokenizer: TokenizerSpec = field(
        default_factory=TokenizerSpec, metadata=doc("the shared tokenizer")
    )
    data: DataConfig = field(metadata=doc("datasets and prompt building"))
    objective: ObjectiveConfig = field(
        default_factory=ObjectiveConfig, metadata=doc("the distillation objective")
    )
    views: ViewsConfig = field(
        default_factory=ViewsConfig, metadata=doc("inputs and weights of the views")
    )
    rollout: RolloutConfig = field(
        default_factory=RolloutConfig, metadata=doc("on-policy sampling")
    )
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=doc("optimizer and schedule"))
    loop: LoopConfig = field(default_factory=LoopConfig, metadata=doc("precision and cadence"))
    eval: EvalConfig = field(default_factory=EvalConfig, metadata=doc("periodic evaluation"))
    checkpoint: CheckpointConfig = field(
        default_factory=CheckpointConfig, metadata=doc("how many checkpoints to keep")
    )
    peft: PeftConfig = field(
        default_factory=PeftConfig, metadata=doc("LoRA adapters on the student (optional extra)")
    )
    tracking: TrackingConfig = field(
        default_factory=TrackingConfig, metadata=doc("experiment trackers and rollout samples")
    )

    def __post_init__(self) -> None:
        require_str("output_dir", self.output_dir)
        require_int("seed", self.seed, low=0)
        if (
            self.tokenizer.path is None
            and self.tokenizer.characters is None
            and self.student.path is None
        ):
            raise ConfigError(
                "tokenizer.path=None with a tiny student (student.path=None): "
                "set tokenizer.characters or tokenizer.path"
            )
        if self.reference is not None and not self.objective.build().uses_reference:
            raise ConfigError(
                f"reference is set but objective {self.objective.name!r} uses no reference model; "
                "remove reference or choose an objective that uses one (exopd)"
            )
        self._check_vision_language()
        if self.loop.eval_every > 0 and self.data.eval is None:
            raise ConfigError(
                f"loop.eval_every={self.loop.eval_every} needs held-out data; "
                "set data.eval or loop.eval_every=0"
            )

    @property
    def is_vlm(self) -> bool:
        """Whether this is a vision-language run (``student.kind: image_text_to_text``)."""
        return self.student.kind == "image_text_to_text"

    def _check_vision_language(self) -> None:
        """Every model of a run is of the student's kind; what VLM runs cannot do yet."""
        models = {"teacher": self.teacher, "reference": self.reference}
        for key, spec in models.items():
            if spec is not None and spec.kind != self.student.kind:
                raise ConfigError(
                    f"{key}.kind={spec.kind} but student.kind={self.student.kind}: a run's "
                    "models must all be text or all be vision-language; fix: use one kind"
                )
        if not self.is_vlm:
            return
        refused = [
            (
                "rollout.backend",
                self.rollout.backend,
                self.rollout.backend != "hf",
                "vLLM rollouts",
            ),
            ("peft.enabled", self.peft.enabled, self.peft.enabled, "a LoRA student"),
        ]
        for key, value, is_set, what in refused:
            if is_set:
                raise ConfigError(
                    f"{key}={value!r}: not supported yet in vision-language runs ({what}; "
                    f"student.kind=image_text_to_text); fix: remove {key} or set it to its "
                    "default (docs/training.md §12)"
                )

    @property
    def tokenizer_path(self) -> str | None:
        """Where to load the tokenizer from (``None``: build it from ``tokenizer.characters``)."""
        if self.tokenizer.characters is not None:
            return None
        return self.tokenizer.path or self.student.path

    @property
    def teacher_view(self) -> str:
        """The teacher's input, ``views.teacher`` or the objective's default."""
        return self.views.teacher or self.objective.spec.teacher_view

    @property
    def priv_student_view(self) -> str:
        """The privileged student's input, ``views.priv_student`` or the objective's default."""
        return self.views.priv_student or self.objective.spec.priv_student_view


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """The validated config of YAML file ``path`` (``None``: empty) after ``key=value`` overrides.

    Overrides apply in order; keys are dotted (``objective.top_k=64``), values are YAML
    (``64``, ``[LH, HT]``, ``null``). Raises ``ConfigError`` naming the file, key or override.
    """
    data = read_yaml(Path(path)) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return from_dict(TrainConfig, data)


def save_config(config: TrainConfig, path: str | Path) -> None:
    """Write ``config`` as YAML that ``load_config`` reads back to an equal config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_yaml(config_to_dict(config)), encoding="utf-8")


def config_help(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """One ``key: help (default ...)`` line per config key, sections expanded.

    ``dopd config --list`` prints the same keys as a table with their types
    (``dopd.config.listing``).
    """
    return [
        f"{k.key}: {k.help}" + (f" (default {k.default})" if k.default is not None else "")
        for k in config_keys(cls, prefix)
    ]
