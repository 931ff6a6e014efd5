"""Vision-language rows: images, bounding boxes, and the boxes rendered as privileged text.

A vision row has a text ``prompt`` (the question), ``images`` (one image or a list: a file path,
raw bytes, a ``datasets`` Image value ``{"bytes": ..., "path": ...}``, or a decoded PIL image),
``boxes`` (a list of ``{"label": str, "box": [x1, y1, x2, y2]}``) and an optional ``answer``.

Box convention. ``box_format="absolute"`` (the default): pixel coordinates of the *original*
image (before any processor resize), ``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height``,
with (0, 0) the top-left corner; ``"normalized_1000"``: the same corners scaled to a 1000 × 1000
grid (``0 <= x1 < x2 <= 1000``). Boxes refer to the row's first image. A box's place in the
privileged text is written in ``render`` coordinates, chosen for the model family:
``normalized_1000`` (Qwen2-VL and Qwen3-VL ground boxes on a 0–1000 grid), ``absolute_resized``
(Qwen2.5-VL grounds in pixels of the image *after* the processor's resize; pass that size), or
``absolute`` (pixels of the original image).

The privileged view's context is ``box_template`` (fields ``{label}``, ``{x1}``, ``{y1}``,
``{x2}``, ``{y2}``; integers) filled once per box, the lines joined by newlines; it is then placed
into the prompt by the text pipeline's ``privileged_template`` as any privileged context.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

from dopd.errors import ConfigError, DataError, quote
from dopd.io.data import _MISSING, format_fields, lookup
from dopd.io.readers import read_rows

BoxFormat = Literal["absolute", "normalized_1000"]
BoxRender = Literal["normalized_1000", "absolute_resized", "absolute"]
BOX_FORMATS: tuple[str, ...] = ("absolute", "normalized_1000")
BOX_RENDERS: tuple[str, ...] = ("normalized_1000", "absolute_resized", "absolute")
DEFAULT_BOX_TEMPLATE = "{label}: [{x1}, {y1}, {x2}, {y2}]"
BOX_FIELDS = ("label", "x1", "y1", "x2", "y2")
# The fields of a vision row, each read from the column of the same name unless ``columns`` maps it.
VISION_FIELDS = ("prompt", "images", "boxes", "answer")
VISION_ROW_FIX = (
    'each row needs "prompt" (text), "images" (a path, bytes or {"bytes", "path"}, or a list of '
    'them) and "boxes" ([{"label": "...", "box": [x1, y1, x2, y2]}, ...])'
)


@dataclass(frozen=True)
class Box:
    """One labelled box, corners in the row's ``box_format`` (``x1 < x2``, ``y1 < y2``)."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class VisionExample:
    """One vision-language task input.

    Attributes:
        prompt: the question, text.
        images: the decoded RGB images, at least one; ``boxes`` refer to ``images[0]``.
        boxes: the privileged boxes, in ``box_format`` coordinates (empty for evaluation rows).
        box_format: ``"absolute"`` or ``"normalized_1000"``.
        answer: the reference answer, or None.
    """

    prompt: str
    images: tuple[Image.Image, ...]
    boxes: tuple[Box, ...] = ()
    box_format: BoxFormat = "absolute"
    answer: str | None = None

    @property
    def has_privilege(self) -> bool:
        """Whether the privileged view has boxes to show."""
        return bool(self.boxes)


# ---------------------------------------------------------------------------------------------
# Loading


def load_vision_examples(
    source: str,
    *,
    box_format: BoxFormat = "absolute",
    privileged: bool = True,
    subset: str | None = None,
    columns: Mapping[str, str | None] | None = None,
) -> list[VisionExample]:
    """Read vision rows from a .jsonl/.json/.parquet file or a ``datasets`` name (as
    ``dopd.io.data.load_examples``). Relative image paths are resolved against the data file's
    folder. ``privileged=False`` (evaluation data) lets rows lack boxes. ``columns`` maps the
    fields of ``VISION_FIELDS`` to column names or dotted paths (missing keys: the field's name).

    Raises ``DataError`` naming the file and line (or row) and the field of the first bad row.
    """
    check_box_format(box_format)
    rows = read_rows(source, subset)
    if not rows:
        raise DataError(
            f"{source}: no examples found; fix: add at least one row ({VISION_ROW_FIX})"
        )
    base = Path(source).parent if Path(source).is_file() else None
    paths = {name: (columns or {}).get(name) or name for name in VISION_FIELDS}
    if any(paths[name] != name for name in VISION_FIELDS):
        rows = [(where, _renamed(row, paths)) for where, row in rows]
    return [
        vision_example_from_row(
            row, where, box_format=box_format, privileged=privileged, base_dir=base
        )
        for where, row in rows
    ]


def _renamed(row: Any, paths: Mapping[str, str]) -> Any:
    """``row`` with each field of ``VISION_FIELDS`` read from its column (absent stays absent)."""
    if not isinstance(row, dict):
        return row
    values = {name: lookup(row, path) for name, path in paths.items()}
    return {name: value for name, value in values.items() if value is not _MISSING}


def vision_example_from_row(
    row: Any,
    where: str,
    *,
    box_format: BoxFormat = "absolute",
    privileged: bool = True,
    base_dir: Path | None = None,
) -> VisionExample:
    """Validate and decode one row; ``where`` (e.g. ``"data.jsonl:7"``) prefixes every error."""
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected an object, got {type(row).__name__}; fix: {VISION_ROW_FIX}"
        )
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise DataError(
            f"{where}: prompt={quote(prompt)} is not non-blank text; fix: {VISION_ROW_FIX}"
        )
    raw_images = row.get("images")
    if raw_images is None:
        raise DataError(f"{where}: missing field 'images'; fix: {VISION_ROW_FIX}")
    if not isinstance(raw_images, list):
        raw_images = [raw_images]
    if not raw_images:
        raise DataError(f"{where}: images is an empty list; fix: give at least one image")
    images = tuple(
        load_image(value, f"{where}: images[{index}]", base_dir)
        for index, value in enumerate(raw_images)
    )
    raw_boxes = row.get("boxes")
    if raw_boxes is None and privileged:
        raise DataError(
            f"{where}: missing field 'boxes' (the privileged context of a vision row); "
            f"fix: {VISION_ROW_FIX}"
        )
    boxes = parse_boxes(raw_boxes or [], where, images[0].size, box_format)
    if privileged and not boxes:
        raise DataError(
            f"{where}: boxes is empty, so the privileged view would equal the plain one; "
            "fix: give at least one box or drop the row"
        )
    answer = row.get("answer")
    if answer is not None and (not isinstance(answer, str) or not answer.strip()):
        raise DataError(
            f"{where}: answer={quote(answer)} is not non-blank text; fix: write it as text"
        )
    return VisionExample(prompt, images, boxes, box_format, answer)


def load_image(value: Any, where: str, base_dir: Path | None = None) -> Image.Image:
    """Decode one image value into an RGB PIL image (fully loaded, no open file left behind).

    ``value``: a path (relative paths against ``base_dir``, else the working directory), bytes,
    a ``datasets`` Image dict ``{"bytes": bytes | None, "path": str | None}`` (bytes win), or a
    PIL image. ``where`` names the row and field in errors.
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, Mapping):
        data, path = value.get("bytes"), value.get("path")
        if data is None and path is None:
            raise DataError(
                f"{where}: an image dict needs 'bytes' or 'path', got keys "
                f"{quote(sorted(value))}; fix: give the file path or its bytes"
            )
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise DataError(
                f"{where}: 'bytes' holds a {type(data).__name__}, not raw bytes; fix: store the "
                "encoded image file's bytes (JSON cannot: give a 'path' there)"
            )
        value = data if data is not None else path
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(value)), where, "bytes")
    if isinstance(value, str) and value.strip():
        file = Path(value)
        if not file.is_absolute() and base_dir is not None:
            file = base_dir / file
        if not file.is_file():
            raise DataError(
                f"{where}: image file {str(file)!r} does not exist; fix: check the path "
                "(relative paths are read from the data file's folder)"
            )
        try:
            raw = file.read_bytes()
        except OSError as error:
            raise DataError(
                f"{where}: cannot read image file {str(file)!r} ({error.strerror or error}); "
                "fix: check its permissions"
            ) from None
        return _decode(io.BytesIO(raw), where, f"file {str(file)!r}")
    raise DataError(
        f"{where}: {quote(value)} ({type(value).__name__}) is not an image; fix: give a file "
        'path, bytes, or {"bytes": ..., "path": ...}'
    )


def _decode(stream: io.BytesIO, where: str, what: str) -> Image.Image:
    try:
        with Image.open(stream) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        # PIL raises OSError for truncated data and SyntaxError for some broken headers.
        raise DataError(
            f"{where}: {what} is not a readable image ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); "
            "fix: re-encode it as PNG or JPEG"
        ) from None


def parse_boxes(
    value: Any, where: str, image_size: tuple[int, int], box_format: BoxFormat = "absolute"
) -> tuple[Box, ...]:
    """Validate a row's ``boxes`` against its first image's ``(width, height)``.

    Each box is ``{"label": non-blank text, "box": [x1, y1, x2, y2]}`` with finite numbers,
    ``x1 < x2``, ``y1 < y2``, inside the image (``absolute``) or the 1000 grid
    (``normalized_1000``).
    """
    check_box_format(box_format)
    fix = 'write boxes as [{"label": "...", "box": [x1, y1, x2, y2]}, ...]'
    if not isinstance(value, list):
        raise DataError(f"{where}: boxes={quote(value)} is not a list; fix: {fix}")
    width, height = (1000, 1000) if box_format == "normalized_1000" else image_size
    frame = (
        "the 1000 x 1000 grid"
        if box_format == "normalized_1000"
        else (f"the {width}x{height} image")
    )
    boxes = []
    for index, item in enumerate(value):
        field = f"boxes[{index}]"
        if not isinstance(item, dict) or set(item) != {"label", "box"}:
            raise DataError(f"{where}: {field}={quote(item)} is not {{label, box}}; fix: {fix}")
        label, corners = item["label"], item["box"]
        if not isinstance(label, str) or not label.strip():
            raise DataError(
                f"{where}: {field}.label={quote(label)} is not non-blank text; fix: {fix}"
            )
        if (
            not isinstance(corners, list)
            or len(corners) != 4
            or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c)
                for c in corners
            )
        ):
            raise DataError(
                f"{where}: {field}.box={quote(corners)} is not 4 finite numbers; fix: {fix}"
            )
        x1, y1, x2, y2 = (float(c) for c in corners)
        if not (x1 < x2 and y1 < y2):
            raise DataError(
                f"{where}: {field}.box={quote(corners)} has x2 <= x1 or y2 <= y1; fix: write "
                "[x1, y1, x2, y2] with (x1, y1) the top-left and (x2, y2) the bottom-right corner"
            )
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
            raise DataError(
                f"{where}: {field}.box={quote(corners)} lies outside {frame} "
                f"(data.box_format={box_format}); fix: clip it to the image or set the right "
                "box_format"
            )
        boxes.append(Box(label, x1, y1, x2, y2))
    return tuple(boxes)


def check_box_format(box_format: str) -> None:
    """Raise ``ConfigError`` unless ``box_format`` is one of ``BOX_FORMATS``."""
    if box_format not in BOX_FORMATS:
        raise ConfigError(
            f"data.box_format={box_format!r} is not allowed; use one of "
            + ", ".join(repr(name) for name in BOX_FORMATS)
        )


# ---------------------------------------------------------------------------------------------
# Rendering


def check_box_template(template: str) -> None:
    """Raise ``ConfigError`` unless ``template`` is a format string whose fields are plain
    ``{x1}``, ``{y1}``, ``{x2}``, ``{y2}`` (all four) and optionally ``{label}``."""
    parsed = format_fields("data.box_template", template)
    names = [name for _, name, _, _ in parsed]
    unknown = sorted(set(names) - set(BOX_FIELDS))
    missing = [name for name in ("x1", "y1", "x2", "y2") if name not in names]
    odd = [name for _, name, spec, conversion in parsed if spec or conversion]
    if unknown or missing or odd:
        raise ConfigError(
            f"data.box_template={quote(template)} has unknown fields {unknown}, lacks "
            f"{missing}, or formats {odd}; fix: use plain {{label}}, {{x1}}, {{y1}}, {{x2}}, "
            "{y2} (all four corners)"
        )


def render_boxes(
    boxes: Sequence[Box],
    *,
    image_size: tuple[int, int],
    box_format: BoxFormat = "absolute",
    render: BoxRender = "normalized_1000",
    resized_size: tuple[int, int] | None = None,
    template: str = DEFAULT_BOX_TEMPLATE,
) -> str:
    """The privileged context of a vision row: ``template`` filled per box, joined by newlines.

    Args:
        boxes: in ``box_format`` coordinates of an image of ``image_size`` ``(width, height)``.
        render: the coordinates written into the text (module docstring); rounded to integers.
        resized_size: ``(width, height)`` after the processor's resize; required by
            ``absolute_resized`` (Qwen2.5-VL), e.g. ``grid_w * patch, grid_h * patch`` from
            ``image_grid_thw``.
    """
    check_box_template(template)
    check_box_format(box_format)
    if render not in BOX_RENDERS:
        raise ConfigError(
            f"data.box_render={render!r} is not allowed; use one of "
            + ", ".join(repr(name) for name in BOX_RENDERS)
        )
    if render == "absolute_resized" and resized_size is None:
        raise ConfigError(
            "data.box_render='absolute_resized' needs the processor's resized image size; "
            "fix: pass resized_size, or render normalized_1000 / absolute"
        )
    width, height = image_size
    # Corner fractions of the image first, then the target frame.
    scale_x, scale_y = (1000, 1000) if box_format == "normalized_1000" else (width, height)
    target = {
        "normalized_1000": (1000, 1000),
        "absolute": (width, height),
        "absolute_resized": resized_size,
    }[render]
    lines = []
    for box in boxes:
        x1, x2 = (round(x / scale_x * target[0]) for x in (box.x1, box.x2))
        y1, y2 = (round(y / scale_y * target[1]) for y in (box.y1, box.y2))
        lines.append(template.format(label=box.label, x1=x1, y1=y1, x2=x2, y2=y2))
    return "\n".join(lines)
