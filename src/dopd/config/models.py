"""The model and tokenizer sections: ``student``, ``teacher`` and ``reference`` (``ModelSpec``) and
``tokenizer`` (``TokenizerSpec``).

Each model has its own ``dtype``, ``attn_implementation`` and ``trust_remote_code``, so a float32
student can train against a bfloat16 teacher on another attention kernel.
``dopd.modeling.loading.load_model`` passes them to ``from_pretrained`` (a ``path`` model) or to
the random-init tiny model it builds (``tiny``); ``auto`` passes nothing, leaving transformers'
default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from dopd.config.loading import BOOLS, doc
from dopd.errors import ConfigError, quote, require_choice, require_str

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# The values transformers' from_pretrained takes (besides "paged|eager" and hub kernel names);
# "auto" passes none, i.e. transformers' default: sdpa where the model supports it, else eager.
AttnImplementation = Literal[
    "auto",
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
]
ModelKind = Literal["causal_lm", "image_text_to_text"]
MODEL_KINDS: tuple[ModelKind, ...] = get_args(ModelKind)
VLM_FAMILIES = ("qwen2_vl", "qwen3_vl")
DTYPES: tuple[Dtype, ...] = get_args(Dtype)
ATTN_IMPLEMENTATIONS: tuple[AttnImplementation, ...] = get_args(AttnImplementation)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """Where a model comes from: a pretrained ``path``, or a random-init ``tiny`` Qwen3 (or, for
    ``kind: image_text_to_text``, a tiny Qwen2-VL / Qwen3-VL: ``tiny: {family: qwen3_vl, ...}``)."""

    kind: ModelKind = field(
        default="causal_lm",
        metadata=doc(
            "causal_lm (text) or image_text_to_text (a vision-language model: Qwen2-VL, "
            "Qwen2.5-VL, Qwen3-VL; a tiny one needs tiny.family qwen2_vl or qwen3_vl)"
        ),
    )
    path: str | None = field(
        default=None, metadata=doc("hub id or local directory of a pretrained model")
    )
    tiny: dict[str, Any] | None = field(
        default=None,
        metadata=doc(
            "Qwen3Config keyword overrides for a random-init tiny model, e.g. {hidden_size: 64}"
        ),
    )
    dtype: Dtype = field(
        default="auto",
        metadata=doc(
            "weight dtype of this model: auto (the checkpoint's; tiny: float32), float32, "
            "bfloat16 or float16"
        ),
    )
    attn_implementation: AttnImplementation = field(
        default="auto",
        metadata=doc(
            "attention kernel of this model: auto (transformers' default: sdpa, else eager), "
            "eager, sdpa, flash_attention_2/3/4 (need their package) or flex_attention"
        ),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=doc("let transformers run this model repository's code (this model only)"),
    )

    def __post_init__(self) -> None:
        if (self.path is None) == (self.tiny is None):
            raise ConfigError(
                f"path={quote(self.path)} and tiny={quote(self.tiny)}: set exactly one of them "
                "(path: a hub id or local directory; tiny: Qwen3Config overrides for a random "
                "initialisation)"
            )
        if self.path is not None:
            require_str("path", self.path)
        require_choice("kind", self.kind, MODEL_KINDS)
        family = (self.tiny or {}).get("family")
        if (
            self.tiny is not None
            and self.kind == "image_text_to_text"
            and family not in VLM_FAMILIES
        ):
            raise ConfigError(
                f"tiny.family={quote(family)} with kind=image_text_to_text; fix: set tiny.family "
                "to qwen2_vl or qwen3_vl"
            )
        if self.tiny is not None and self.kind == "causal_lm" and family is not None:
            raise ConfigError(
                f"tiny.family={quote(family)} builds a vision-language model; fix: set "
                "kind: image_text_to_text, or remove tiny.family for a text model"
            )
        require_choice("dtype", self.dtype, DTYPES)
        require_choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        require_choice("trust_remote_code", self.trust_remote_code, BOOLS)


@dataclass(frozen=True, kw_only=True)
class TokenizerSpec:
    """The tokenizer shared by every view: ``path``, ``characters``, or else the student's path."""

    path: str | None = field(
        default=None,
        metadata=doc("hub id or directory of the tokenizer (null: the student's path)"),
    )
    characters: str | None = field(
        default=None,
        metadata=doc("build a character tokenizer over these characters (for tiny models)"),
    )
    chat_template_kwargs: dict[str, Any] = field(
        default_factory=dict,
        metadata=doc("extra kwargs of apply_chat_template, the same for every view"),
    )
    trust_remote_code: bool = field(
        default=False,
        metadata=doc(
            "let transformers run code of the tokenizer.path repository "
            "(null path: student.trust_remote_code applies)"
        ),
    )

    def __post_init__(self) -> None:
        if self.path is not None and self.characters is not None:
            raise ConfigError(
                f"path={self.path!r} and characters={quote(self.characters)}: set at most one "
                "(characters builds a tokenizer, path loads one)"
            )
        if self.path is not None:
            require_str("path", self.path)
        if self.characters is not None:
            require_str("characters", self.characters)
        require_choice("trust_remote_code", self.trust_remote_code, BOOLS)
        if self.trust_remote_code and self.path is None:
            raise ConfigError(
                "trust_remote_code=True applies only to tokenizer.path, which is not set; "
                "fix: set tokenizer.path, or student.trust_remote_code for the student's tokenizer"
            )
