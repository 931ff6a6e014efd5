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
from dopd.errors import DOPDError
from dopd.io.images import load_vision_examples
from dopd.modeling.loading import load_processor
from dopd.modeling.vlm_views import RowImages, vlm_view_prompts


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
    skipped = len(examples) - len(prompts["plain"])
    where = f"data.train={data.train!r}"
    limit = f"data.max_prompt_length={data.max_prompt_length}"
    if skipped and (data.overlong_prompts == "error" or not prompts["plain"]):
        raise DOPDError(
            f"{where}: {skipped} of {len(examples)} prompts (image tokens included) exceed "
            f"{limit}; fix: raise it, use smaller images, or set data.overlong_prompts=skip"
        )
    if skipped:
        warn(f"{where}: skipped {skipped} of {len(examples)} prompts longer than {limit}")
    return prompts


def row_images(processor, prompts: dict[str, list], rows: list[int]) -> RowImages:
    """The image tensors of dataset rows ``rows`` in order (a repeated row repeats its images),
    through ``processor.image_processor`` as the processor computes them with the prompt: row
    ``b``'s ``pixel_values [N_b, D]`` and ``image_grid_thw [I_b, 3]``, concatenated."""
    done: dict[int, tuple] = {}
    for row in dict.fromkeys(rows):
        out = processor.image_processor(images=list(prompts["images"][row]), return_tensors="pt")
        done[row] = (out["pixel_values"], out["image_grid_thw"])
    return RowImages.from_rows([done[row] for row in rows])
