"""Token-aligned views of one completion for vision-language models (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL): the plain view sees the image and the question, the privileged view the image, the
question and the boxes rendered as text; both score the identical completion ids.

Each view is ``[left-padded prompt with image tokens | the identical completion ids]``, built like
``dopd.modeling.alignment.build_view_inputs`` (the same checks, the same completion mask) plus the
image inputs: ``pixel_values`` of every row's images in row order, their ``image_grid_thw``, and
``mm_token_type_ids`` (1 on image tokens) from which the model computes multimodal RoPE itself.
No ``position_ids`` are passed: Qwen-VL's ``get_rope_index`` drops the positions the
``attention_mask`` hides before it numbers text and image tokens, so left padding shifts nothing
and each row scores as it would alone (``tests/test_vlm.py`` checks this).

    plain, privileged = vlm_view_prompts(processor, examples)
    images = [example.images for example in examples]
    student = build_vlm_view_inputs(processor, plain, images, completion_ids, mask, pad_id)
    teacher = build_vlm_view_inputs(processor, privileged, images, completion_ids, mask, pad_id)
    logits = vlm_completion_logits(model, student)        # [B, T, V]
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dopd.errors import DOPDError
from dopd.io.data import (
    DEFAULT_PRIVILEGED_TEMPLATE,
    RESERVED_CHAT_KWARGS,
    check_privileged_template,
)
from dopd.io.images import DEFAULT_BOX_TEMPLATE, BoxRender, VisionExample, render_boxes
from dopd.modeling.alignment import (
    ViewInputs,
    build_view_inputs,
    left_pad,
    unwrapped,
    vocabulary_slice,
)

# Vision token ids a completion must never hold: an image placeholder in the completion would
# ask the model for image features that do not exist (rollouts mask them, ``vision_token_ids``).
VISION_CONFIG_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id")


@dataclass(frozen=True)
class VLMViewInputs:
    """One VLM view's model inputs, ``[left-padded prompt (P) | completion (T)]``.

    Attributes:
        input_ids: ``[B, P + T]`` long; padding and invalid completion positions hold the pad id.
        attention_mask: ``[B, P + T]`` long, 1 on real prompt tokens and valid completion tokens.
        mm_token_type_ids: ``[B, P + T]`` long, 1 on image tokens, else 0.
        pixel_values: ``[N, D]`` float, the patches of every image of rows ``0 .. B-1`` in order
            (``N = sum of t·h·w`` over the images, ``D = 3 · temporal_patch · patch²``).
        image_grid_thw: ``[I, 3]`` long, ``(t, h, w)`` patch grid of each image, in row order.
        completion_length: ``T``.
    """

    input_ids: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    pixel_values: Tensor
    image_grid_thw: Tensor
    completion_length: int

    @property
    def completion_mask(self) -> Tensor:
        """``[B, T]`` bool, the valid completion positions of this view."""
        return self.attention_mask[:, -self.completion_length :].bool()

    def model_inputs(self) -> dict[str, Tensor]:
        """The keyword arguments of the model's forward (no ``position_ids``: the model derives
        multimodal RoPE from ``mm_token_type_ids``, ``image_grid_thw`` and ``attention_mask``)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "mm_token_type_ids": self.mm_token_type_ids,
            "pixel_values": self.pixel_values,
            "image_grid_thw": self.image_grid_thw,
        }


@dataclass(frozen=True)
class RowImages:
    """The image inputs of ``B`` rows, concatenated in row order as Qwen-VL takes them.

    Attributes:
        pixel_values: ``[N, D]`` float, the patches of every image of rows ``0 .. B-1``.
        image_grid_thw: ``[I, 3]`` long, the ``(t, h, w)`` patch grid of each image; image ``i``
            owns ``t·h·w`` consecutive rows of ``pixel_values``.
        images_per_row: ``[B]`` long, how many images each row has (``I`` in all).
    """

    pixel_values: Tensor
    image_grid_thw: Tensor
    images_per_row: Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[Tensor, Tensor]]) -> RowImages:
        """Concatenate per-row ``(pixel_values [N_b, D], image_grid_thw [I_b, 3])`` pairs."""
        if not rows:
            raise DOPDError("RowImages.from_rows needs at least one row")
        return cls(
            torch.cat([pixels for pixels, _ in rows]),  # [N, D]
            torch.cat([grid for _, grid in rows]),  # [I, 3]
            torch.tensor([grid.shape[0] for _, grid in rows], dtype=torch.long),  # [B]
        )

    def __len__(self) -> int:
        return self.images_per_row.shape[0]

    def select(self, rows: slice) -> RowImages:
        """The images of the contiguous rows ``rows`` (step 1): their images are the image
        range given by the cumulative ``images_per_row``, their patches the patch range given by
        the cumulative ``t·h·w`` of the images before them."""
        start, stop, step = rows.indices(len(self))
        if step != 1:
            raise DOPDError(f"RowImages.select takes contiguous rows, got step {step}")
        image_ends = torch.cat([torch.zeros(1, dtype=torch.long), self.images_per_row.cumsum(0)])
        first, last = int(image_ends[start]), int(image_ends[max(stop, start)])
        patch_ends = torch.cat(
            [
                torch.zeros(1, dtype=torch.long),
                self.image_grid_thw.prod(-1).long().cpu().cumsum(0),
            ]
        )  # [I + 1]
        return RowImages(
            self.pixel_values[int(patch_ends[first]) : int(patch_ends[last])],
            self.image_grid_thw[first:last],
            self.images_per_row[start:stop],
        )

    def to(self, device: torch.device | str) -> RowImages:
        """The same images with ``pixel_values`` and ``image_grid_thw`` on ``device``."""
        return RowImages(
            self.pixel_values.to(device), self.image_grid_thw.to(device), self.images_per_row
        )


def with_images(view: ViewInputs, images: RowImages, image_token_id: int) -> ViewInputs:
    """``view`` (``[B, P + T]``, from ``build_view_inputs`` on prompts holding expanded image
    tokens) with ``model_kwargs``: ``pixel_values`` ``[N, D]``, ``image_grid_thw`` ``[I, 3]`` and
    ``mm_token_type_ids`` ``[B, P + T]`` (1 where ``input_ids`` is ``image_token_id``, as the
    processor writes it for images), so that its forward takes no 1-D ``position_ids``."""
    if len(images) != view.input_ids.shape[0]:
        raise DOPDError(
            f"{len(images)} image rows for a view of {view.input_ids.shape[0]} rows; "
            "pass one image row per view row"
        )
    device = view.input_ids.device
    token_types = (view.input_ids == image_token_id).long()  # [B, P + T]
    kwargs = {
        "pixel_values": images.pixel_values.to(device),
        "image_grid_thw": images.image_grid_thw.to(device),
        "mm_token_type_ids": token_types,
    }
    return ViewInputs(
        view.input_ids, view.attention_mask, view.position_ids, view.completion_length, kwargs
    )


def vision_token_ids(config: Any) -> list[int]:
    """The ids of a VLM ``config`` (``VISION_CONFIG_KEYS``) that rollouts must not sample."""
    return sorted(
        {
            int(value)
            for key in VISION_CONFIG_KEYS
            if (value := getattr(config, key, None)) is not None
        }
    )


def vlm_prompt(
    processor: Any, question: str, image_count: int, chat_template_kwargs: dict | None = None
) -> str:
    """The rendered prompt text of one user turn holding ``image_count`` images, then the
    question, ending with the assistant header (the processor's chat template)."""
    kwargs = dict(chat_template_kwargs or {})
    reserved = sorted(set(kwargs) & set(RESERVED_CHAT_KWARGS))
    if reserved:
        raise DOPDError(f"chat_template_kwargs sets {reserved}; remove them, dopd sets them itself")
    content = [{"type": "image"} for _ in range(image_count)]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **kwargs
    )


def resized_image_size(processor: Any, image: Any) -> tuple[int, int]:
    """``(width, height)`` of ``image`` after the processor's resize: its patch grid times the
    patch size (the frame in which Qwen2.5-VL writes absolute box coordinates)."""
    grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    patch = processor.image_processor.patch_size
    return int(grid[2]) * patch, int(grid[1]) * patch


def vlm_view_prompts(
    processor: Any,
    examples: Sequence[VisionExample],
    *,
    template: str = DEFAULT_PRIVILEGED_TEMPLATE,
    box_template: str = DEFAULT_BOX_TEMPLATE,
    render: BoxRender = "normalized_1000",
    chat_template_kwargs: dict | None = None,
) -> tuple[list[str], list[str]]:
    """Plain and privileged prompt texts of every example, through one chat template and kwargs.

    The privileged question is ``template`` filled with ``{prompt}`` (the question) and
    ``{privileged_context}`` (the boxes, ``render_boxes`` with ``box_template`` and ``render``);
    an example without boxes gets its plain text in both lists.

    Returns:
        (plain, privileged): two lists of ``len(examples)`` prompt texts with image placeholders.
    """
    check_privileged_template(template)
    plain, privileged = [], []
    for example in examples:
        count = len(example.images)
        plain.append(vlm_prompt(processor, example.prompt, count, chat_template_kwargs))
        if not example.has_privilege:
            privileged.append(plain[-1])
            continue
        resized = (
            resized_image_size(processor, example.images[0])
            if render == "absolute_resized"
            else None
        )
        context = render_boxes(
            example.boxes,
            image_size=example.images[0].size,
            box_format=example.box_format,
            render=render,
            resized_size=resized,
            template=box_template,
        )
        question = template.format(prompt=example.prompt, privileged_context=context)
        privileged.append(vlm_prompt(processor, question, count, chat_template_kwargs))
    return plain, privileged


def build_vlm_view_inputs(
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Sequence[Any]],
    completion_ids: Tensor,
    completion_mask: Tensor,
    pad_token_id: int,
) -> VLMViewInputs:
    """Place each row's processed prompt (image tokens expanded), left-padded, before the
    identical completion ids.

    Args:
        processor: a Qwen-VL processor (``AutoProcessor`` or ``tiny_vlm.build_tiny_vlm_processor``).
        prompts: ``B`` prompt texts with one image placeholder per image (``vlm_view_prompts``).
        images: ``B`` sequences of PIL images, row ``b``'s in placeholder order.
        completion_ids: ``[B, T]`` long, the sampled completions shared by all views.
        completion_mask: ``[B, T]`` bool, a prefix of each row.
        pad_token_id: id written into padding; it never reaches attention.
    """
    if len(prompts) != len(images):
        raise DOPDError(
            f"{len(prompts)} prompts for {len(images)} image lists; pass one image list per row"
        )
    image_token_id = getattr(processor, "image_token_id", None)
    prompt_ids, token_types, pixels, grids = [], [], [], []
    for row, (text, row_images) in enumerate(zip(prompts, images)):
        if not row_images:
            raise DOPDError(f"prompt row {row} has no image; every VLM view row needs one")
        encoded = processor(text=[text], images=list(row_images), return_tensors="pt")
        ids = encoded["input_ids"][0]  # [P_b]
        types = encoded.get("mm_token_type_ids")
        types = (ids == image_token_id).long() if types is None else types[0].long()  # [P_b]
        prompt_ids.append(ids.tolist())
        token_types.append(types.tolist())
        pixels.append(encoded["pixel_values"])  # [N_b, D]
        grids.append(encoded["image_grid_thw"])  # [I_b, 3]
    # The text layout, its checks and the completion mask are exactly the text views'.
    text_view = build_view_inputs(prompt_ids, completion_ids, completion_mask, pad_token_id)
    device = completion_ids.device
    prompt_types, _ = left_pad(token_types, 0, device)  # [B, P]
    completion_types = torch.zeros_like(completion_ids, dtype=torch.long)  # [B, T]
    return VLMViewInputs(
        input_ids=text_view.input_ids,
        attention_mask=text_view.attention_mask,
        mm_token_type_ids=torch.cat([prompt_types, completion_types], dim=1),  # [B, P + T]
        pixel_values=torch.cat(pixels).to(device),  # [N, D]
        image_grid_thw=torch.cat(grids).to(device),  # [I, 3]
        completion_length=text_view.completion_length,
    )


def vlm_completion_logits(
    model: torch.nn.Module, inputs: VLMViewInputs, vocab_size: int | None = None
) -> Tensor:
    """Logits scoring each completion token, as ``alignment.completion_logits``: the outputs at
    sequence positions ``P - 1 .. P + T - 2``, cut to the first ``vocab_size`` ids.

    Returns:
        ``[B, T, V]`` in the model's dtype, ``V = vocab_size or V_model``.
    """
    length = inputs.completion_length
    forward = unwrapped(model).forward
    keep = (
        {"logits_to_keep": length + 1}
        if "logits_to_keep" in inspect.signature(forward).parameters
        else {}
    )
    outputs = model(**inputs.model_inputs(), use_cache=False, **keep)
    logits = outputs.logits[:, -(length + 1) : -1]  # [B, T, V_model]
    columns = vocabulary_slice(logits.shape[-1], vocab_size)
    return logits if columns is None else logits[..., columns]  # [B, T, V]
