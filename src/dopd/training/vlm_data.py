"""The prompts of a vision-language run (``student.kind: image_text_to_text``): both views of
every vision row as token ids with their image placeholders expanded, and the row's image
images, computed once when the run starts; each step's image tensors are computed from its rows'
images (``row_images``), so a large dataset holds its decoded images, not their float patches
(eight times their size at Qwen-VL's temporal patch 2).

The plain prompt shows the images and the question; the privileged prompt the images, the question
and the boxes as text (``data.box_template``, ``data.box_render``, placed by
``data.privileged_template``; ``dopd.modeling.vlm_views.vlm_view_prompts``). Both views see the
same images, so one ``(pixel_values, image_grid_thw)`` pair per row serves every view.
"""

from __future__ import annotations

from collections.abc import Callable

from dopd.config import TrainConfig
from dopd.errors import DataError, DOPDError
from dopd.io.data import load_examples
from dopd.io.images import VisionExample, load_vision_examples
from dopd.modeling.loading import load_processor
from dopd.modeling.vlm_views import RowImages, vlm_prompt, vlm_view_prompts
from dopd.training.prompts import tokenized_prompts


def vlm_processor(config: TrainConfig, tokenizer):
    """A vision-language run's processor (``load_processor``: image inputs and prompts with
    image tokens); None for a text run."""
    return load_processor(config, tokenizer) if config.is_vlm else None


def vlm_prompts(processor, config: TrainConfig, warn: Callable[[str], None]) -> dict[str, list]:
    """``{"plain": ids, "privileged": ids, "answer": answers, "images": images}`` of the
    training rows whose prompts both fit ``data.max_prompt_length`` (tokens, image tokens
    included); the others are skipped with a warning, or refused when ``data.overlong_prompts``
    is ``error``.

    ``images[i]`` is row ``i``'s tuple of decoded images, in placeholder order.
    """
    data = config.data
    examples = load_vision_examples(
        data.train,
        box_format=data.box_format,
        subset=data.subset,
        columns=data.columns.vision_mapping(),
    )
    plain_texts, privileged_texts = vlm_view_prompts(
        processor,
        examples,
        template=data.privileged_template,
        box_template=data.box_template,
        render=data.box_render,
        chat_template_kwargs=config.tokenizer.chat_template_kwargs,
    )
    prompts: dict[str, list] = {"plain": [], "privileged": [], "answer": [], "images": []}
    for example, plain, privileged in zip(examples, plain_texts, privileged_texts):
        images = list(example.images)
        ids = [
            processor(text=[text], images=images, return_tensors="pt")["input_ids"][0].tolist()
            for text in (plain, privileged)
        ]
        if max(len(row) for row in ids) > data.max_prompt_length:
            continue
        prompts["plain"].append(ids[0])
        prompts["privileged"].append(ids[1])
        prompts["answer"].append(example.answer)
        prompts["images"].append(tuple(images))
    _check_skipped(config, "train", len(examples), len(prompts["plain"]), warn)
    return prompts


def _check_skipped(config: TrainConfig, split: str, total: int, kept: int, warn) -> None:
    """Warn about the ``total - kept`` overlong prompts of ``data.<split>``, or refuse them
    (``data.overlong_prompts: error``, or none left)."""
    data, skipped = config.data, total - kept
    where = f"data.{split}={getattr(data, split)!r}"
    limit = f"data.max_prompt_length={data.max_prompt_length}"
    if skipped and (data.overlong_prompts == "error" or not kept):
        raise DOPDError(
            f"{where}: {skipped} of {total} prompts (image tokens included) exceed "
            f"{limit}; fix: raise it, use smaller images, or set data.overlong_prompts=skip"
        )
    if skipped:
        warn(f"{where}: skipped {skipped} of {total} prompts longer than {limit}")


def vision_eval_rows(
    processor,
    source: str,
    *,
    key: str = "data.eval",
    columns=None,
    subset: str | None = None,
    box_format: str = "absolute",
    chat_template_kwargs: dict | None = None,
) -> tuple[list[VisionExample], dict[str, list]]:
    """The vision evaluation rows of ``source`` and ``{"plain": ids, "answer": answers,
    "images": images}``: each row's plain prompt (its images and question, as in training) as
    token ids with the image placeholders expanded, its answer and its decoded images.

    Rows may lack boxes (they are not used); a row without an answer raises a one-line
    ``DataError`` naming ``key``, the source and the row.
    """
    examples = load_vision_examples(
        source, box_format=box_format, privileged=False, subset=subset, columns=columns
    )
    missing = next((i for i, example in enumerate(examples) if example.answer is None), None)
    if missing is not None:
        raise DataError(
            f"{key}={source!r}: row {missing + 1} has no answer, which evaluation scores "
            "against; fix: give every evaluation row an answer"
        )
    prompts: dict[str, list] = {"plain": [], "answer": [], "images": []}
    for example in examples:
        images = list(example.images)
        text = vlm_prompt(processor, example.prompt, len(images), chat_template_kwargs)
        ids = processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]
        prompts["plain"].append(ids.tolist())
        prompts["answer"].append(example.answer)
        prompts["images"].append(tuple(images))
    return examples, prompts


def eval_prompts(config: TrainConfig, tokenizer, processor, warn) -> dict[str, list] | None:
    """The prompts of ``data.eval`` (None without it) that fit ``data.max_prompt_length``:
    ``tokenized_prompts`` for a text run, ``vision_eval_rows`` for a vision-language run
    (``processor`` set), whose rows also keep their ``images``."""
    data = config.data
    if data.eval is None:
        return None
    if processor is None:  # text: the plain prompt only, so rows may lack privileged context
        examples = load_examples(
            data.eval, data.columns.mapping(), privileged=False, subset=data.subset
        )
        return tokenized_prompts(examples, tokenizer, config, "eval", warn)
    _, rows = vision_eval_rows(
        processor,
        data.eval,
        columns=data.columns.vision_mapping(),
        subset=data.subset,
        box_format=data.box_format,
        chat_template_kwargs=config.tokenizer.chat_template_kwargs,
    )
    keep = [i for i, ids in enumerate(rows["plain"]) if len(ids) <= data.max_prompt_length]
    _check_skipped(config, "eval", len(rows["plain"]), len(keep), warn)
    return {name: [values[i] for i in keep] for name, values in rows.items()}


def row_images(processor, prompts: dict[str, list], rows: list[int]) -> RowImages:
    """The image tensors of dataset rows ``rows`` in order (a repeated row repeats its images),
    through ``processor.image_processor`` as the processor computes them with the prompt: row
    ``b``'s ``pixel_values [N_b, D]`` and ``image_grid_thw [I_b, 3]``, concatenated."""
    done: dict[int, tuple] = {}
    for row in dict.fromkeys(rows):
        out = processor.image_processor(images=list(prompts["images"][row]), return_tensors="pt")
        done[row] = (out["pixel_values"], out["image_grid_thw"])
    return RowImages.from_rows([done[row] for row in rows])


def eval_images(processor, prompts: dict[str, list], rows: list[int]) -> RowImages | None:
    """``row_images`` of evaluation rows ``rows``; None for a text run or no rows."""
    return row_images(processor, prompts, rows) if processor is not None and rows else None
