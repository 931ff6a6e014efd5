"""The ``data`` section: where the examples come from, which columns hold what, and how the
privileged prompt is built.

``columns`` maps the fields dopd reads (``prompt``, ``messages``, ``privileged_context``,
``answer``, ``privileged_prompt``) to a dataset's own column names or dotted paths into nested
records, so rows written for other trainers load unchanged (``dopd.io.data.load_examples``;
recipes in docs/training.md §2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

from dopd.config.loading import doc
from dopd.errors import ConfigError, quote, require_choice, require_int, require_str
from dopd.io.data import DEFAULT_COLUMNS, DEFAULT_PRIVILEGED_TEMPLATE, check_privileged_template
from dopd.io.images import (
    BOX_FORMATS,
    BOX_RENDERS,
    DEFAULT_BOX_TEMPLATE,
    BoxFormat,
    BoxRender,
    check_box_template,
)

OverlongPrompts = Literal["skip", "error"]
OVERLONG_PROMPTS: tuple[OverlongPrompts, ...] = get_args(OverlongPrompts)


def _check_path(key: str, path: str) -> None:
    require_str(key, path)
    if any(not part.strip() for part in path.split(".")):
        raise ConfigError(
            f"{key}={quote(path)} has an empty part; fix: write a column name or a dotted path "
            "such as reward_model.ground_truth"
        )


@dataclass(frozen=True, kw_only=True)
class DataColumns:
    """Which column (or dotted path into nested records) holds each field of a row."""

    prompt: str = field(
        default=DEFAULT_COLUMNS["prompt"],
        metadata=doc("the plain prompt: text or a chat message list, used as written"),
    )
    messages: str = field(
        default=DEFAULT_COLUMNS["messages"],
        metadata=doc(
            "a chat, read when the prompt column is absent: the prompt is its turns up to and "
            "including the last user turn"
        ),
    )
    privileged_context: str = field(
        default=DEFAULT_COLUMNS["privileged_context"],
        metadata=doc("the privileged context (text); training rows need it, eval rows do not"),
    )
    answer: str = field(
        default=DEFAULT_COLUMNS["answer"],
        metadata=doc("the reference answer for evaluation (required in every row if renamed)"),
    )
    privileged_prompt: str | None = field(
        default=DEFAULT_COLUMNS["privileged_prompt"],
        metadata=doc(
            "a column holding the whole privileged prompt, used verbatim instead of "
            "privileged_template (text replaces a chat's last user turn); null: build it"
        ),
    )

    images: str = field(
        default="images",
        metadata=doc("vision-language runs: the image(s) of a row (path, bytes or a list)"),
    )
    boxes: str = field(
        default="boxes",
        metadata=doc("vision-language runs: the privileged boxes [{label, box}] of a row"),
    )

    def __post_init__(self) -> None:
        for name in ("prompt", "messages", "privileged_context", "answer", "images", "boxes"):
            _check_path(name, getattr(self, name))
        if self.privileged_prompt is not None:
            _check_path("privileged_prompt", self.privileged_prompt)

    def mapping(self) -> dict[str, str | None]:
        """The text columns as ``dopd.io.data.load_examples`` takes them."""
        columns = asdict(self)
        return {name: columns[name] for name in DEFAULT_COLUMNS}

    def vision_mapping(self) -> dict[str, str]:
        """The columns of a vision row as ``dopd.io.images.load_vision_examples`` takes them."""
        return {name: getattr(self, name) for name in ("prompt", "images", "boxes", "answer")}


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Training and evaluation data (rows with prompt, privileged_context and optional answer)."""

    train: str = field(
        metadata=doc("training examples: .jsonl/.json/.parquet file or a datasets name[:split]")
    )
    eval: str | None = field(
        default=None,
        metadata=doc("held-out examples for periodic evaluation: file or name[:split]; null: none"),
    )
    subset: str | None = field(
        default=None,
        metadata=doc("datasets configuration name of train/eval when they name a dataset"),
    )
    columns: DataColumns = field(
        default_factory=DataColumns,
        metadata=doc("column names or dotted paths of the fields of a row"),
    )
    privileged_template: str = field(
        default=DEFAULT_PRIVILEGED_TEMPLATE,
        metadata=doc(
            "builds the privileged prompt; must use exactly {prompt} and {privileged_context}"
        ),
    )
    max_prompt_length: int = field(default=512, metadata=doc("longest prompt in tokens"))
    overlong_prompts: OverlongPrompts = field(
        default="skip", metadata=doc("what to do with a longer prompt: skip or error")
    )
    box_format: BoxFormat = field(
        default="absolute",
        metadata=doc(
            "vision-language runs: box corners in the data, absolute (pixels of the original "
            "image) or normalized_1000 (a 1000 x 1000 grid)"
        ),
    )
    box_template: str = field(
        default=DEFAULT_BOX_TEMPLATE,
        metadata=doc(
            "vision-language runs: the privileged text of one box, with {x1} {y1} {x2} {y2} "
            "and optionally {label}; boxes are joined by newlines"
        ),
    )
    box_render: BoxRender = field(
        default="normalized_1000",
        metadata=doc(
            "vision-language runs: coordinates written for the model family: normalized_1000 "
            "(Qwen2-VL, Qwen3-VL), absolute_resized (Qwen2.5-VL) or absolute"
        ),
    )

    def __post_init__(self) -> None:
        require_str("train", self.train)
        if self.eval is not None:
            require_str("eval", self.eval)
        if self.subset is not None:
            require_str("subset", self.subset)
        check_privileged_template(self.privileged_template)
        require_int("max_prompt_length", self.max_prompt_length, low=1)
        require_choice("overlong_prompts", self.overlong_prompts, OVERLONG_PROMPTS)
        require_choice("box_format", self.box_format, BOX_FORMATS)
        require_choice("box_render", self.box_render, BOX_RENDERS)
        check_box_template(self.box_template)
