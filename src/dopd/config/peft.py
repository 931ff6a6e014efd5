"""The ``peft`` section: train LoRA adapters on the student instead of all its weights.

``enabled: true`` wraps the student in LoRA adapters of rank ``r`` on the linear layers named by
``target_modules`` (``dopd.modeling.peft.apply_lora``); only the adapters train, the student's own
weights stay bit-identical. ``export`` says what ``output_dir/model`` holds at the end: the
``merged`` model (plain Hugging Face weights, no peft needed to load them) or the ``adapter``
alone. Needs the ``peft`` extra (``pip install 'dopd[peft]'``), imported only when enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dopd.config.loading import BOOLS, doc
from dopd.errors import ConfigError, require_choice, require_int, require_range, require_str

PeftExport = Literal["merged", "adapter"]
PEFT_EXPORTS: tuple[PeftExport, ...] = get_args(PeftExport)
# The attention and MLP projections of Llama-style decoders (Qwen3, Llama, Mistral, ...).
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """LoRA adapters on the student (recorded in the run's config.yaml)."""

    enabled: bool = field(
        default=False, metadata=doc("train LoRA adapters instead of the student's weights")
    )
    r: int = field(default=16, metadata=doc("LoRA rank of each adapted layer"))
    alpha: float = field(
        default=32.0, metadata=doc("LoRA alpha; the adapter's update is scaled by alpha / r")
    )
    dropout: float = field(
        default=0.0, metadata=doc("dropout on the adapters' input while training, in [0, 1)")
    )
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata=doc("names of the linear layers that get adapters (a name matches its suffix)"),
    )
    export: PeftExport = field(
        default="merged",
        metadata=doc(
            "output_dir/model at the end: merged (plain weights, loads without peft) or adapter"
        ),
    )

    def __post_init__(self) -> None:
        require_choice("enabled", self.enabled, BOOLS)
        require_int("r", self.r, low=1)
        require_range("alpha", self.alpha, low=0.0, low_open=True)
        require_range("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        if not isinstance(self.target_modules, tuple) or not self.target_modules:
            raise ConfigError(
                f"target_modules={self.target_modules!r} must be a non-empty list of layer "
                "names; fix: e.g. target_modules: [q_proj, v_proj]"
            )
        for index, name in enumerate(self.target_modules):
            require_str(f"target_modules[{index}]", name)
        require_choice("export", self.export, PEFT_EXPORTS)
