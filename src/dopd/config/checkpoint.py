"""The ``checkpoint`` section: which checkpoints a run keeps on disk, and the final export's dtype.

How often one is written stays ``loop.save_every``; this section says how many stay.
``save_total_limit: 2`` keeps the two newest *valid* checkpoints (the one just written and the
newest older one that passes ``verify_checkpoint``) and deletes the older ``step-N`` folders after
each save (``dopd.training.checkpoint_files.prune_checkpoints``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dopd.config.loading import doc
from dopd.errors import require_choice, require_int

ExportDtype = Literal["auto", "float32", "bfloat16", "float16"]
EXPORT_DTYPES: tuple[ExportDtype, ...] = get_args(ExportDtype)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoint retention and export (recorded in the run's config.yaml)."""

    save_total_limit: int = field(
        default=0,
        metadata=doc(
            "keep the newest N valid checkpoints, deleting older step-N folders after each save; "
            "0 = keep all"
        ),
    )

    export_dtype: ExportDtype = field(
        default="auto",
        metadata=doc(
            "dtype of output_dir/model: auto = loop.mixed_precision's (bf16/fp16), else the "
            "student's own; checkpoints keep the master weights as trained"
        ),
    )

    def __post_init__(self) -> None:
        require_int("save_total_limit", self.save_total_limit, low=0)
        require_choice("export_dtype", self.export_dtype, EXPORT_DTYPES)
