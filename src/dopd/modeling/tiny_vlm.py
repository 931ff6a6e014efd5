"""Tiny random-init vision-language models (Qwen2-VL, Qwen3-VL) and their processor, offline.

The VLM counterpart of ``dopd.modeling.tiny``: a character tokenizer extended with the Qwen-VL
vision tokens, the Qwen2-VL image processor with its default settings except a small pixel range
(a 56×56 image becomes a 4×4 patch grid, i.e. 4 image tokens after the 2×2 merge), and a seeded
tiny Qwen2-VL or Qwen3-VL whose ``image_token_id`` / ``vision_start_token_id`` /
``vision_end_token_id`` are the tokenizer's ids.

    tokenizer = build_vlm_char_tokenizer("abc0123456789 :,[]?\\n")
    model = build_tiny_vlm("qwen3_vl", tokenizer)
    processor = build_tiny_vlm_processor(tokenizer, model.config)
    batch = processor(text=[text], images=[image], return_tensors="pt")
    logits = model(**batch).logits                       # [1, L, len(tokenizer)]

The processors are image-only: the Qwen-VL processors' video processor needs ``torchvision``,
which the CPU environment does not have, so ``video_processor`` is left out.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from dopd.errors import ConfigError
from dopd.modeling.tiny import build_char_tokenizer

VLMFamily = Literal["qwen2_vl", "qwen3_vl"]
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = (
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# One image placeholder per image entry of a message; the processor expands <|image_pad|> to the
# image's token count. Text entries and plain-string contents are written as they are.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Small pixel range of the tiny processor: 56×56 (a 4×4 patch grid at patch 14) up to 112×112.
TINY_MIN_PIXELS = 56 * 56
TINY_MAX_PIXELS = 112 * 112


def build_vlm_char_tokenizer(characters: str) -> PreTrainedTokenizerFast:
    """``build_char_tokenizer(characters, chat_template=True)`` plus the Qwen-VL vision tokens.

    The vision tokens (``VISION_TOKENS``) are special tokens with the ids right after the role
    tokens, and ``VLM_CHAT_TEMPLATE`` (messages whose content is text or a list of
    ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts) replaces the text template.
    Encoding still prepends one ``<bos>``.
    """
    tokenizer = build_char_tokenizer(characters, chat_template=True)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": list(VISION_TOKENS)}, replace_extra_special_tokens=False
    )
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    return tokenizer


def vision_token_ids(tokenizer: Any) -> dict[str, int]:
    """The model-config keys of the vision tokens, each with the tokenizer's id.

    Raises:
        ConfigError: the tokenizer lacks one of ``VISION_TOKENS``.
    """
    ids = {}
    for key, token in (
        ("vision_start_token_id", VISION_START),
        ("vision_end_token_id", VISION_END),
        ("image_token_id", IMAGE_PAD),
        ("video_token_id", VIDEO_PAD),
    ):
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or index == tokenizer.unk_token_id:
            raise ConfigError(
                f"the tokenizer has no {token} token (needed for {key}); fix: build it with "
                "dopd.modeling.tiny_vlm.build_vlm_char_tokenizer"
            )
        ids[key] = index
    return ids


def build_tiny_vlm(
    family: VLMFamily,
    tokenizer: Any,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    num_key_value_heads: int = 1,
    head_dim: int = 32,
    intermediate_size: int = 128,
    vision_depth: int = 1,
    vision_hidden_size: int = 32,
    vision_heads: int = 2,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    seed: int = 0,
    **text_overrides: Any,
) -> Qwen2VLForConditionalGeneration | Qwen3VLForConditionalGeneration:
    """A random-init float32 tiny Qwen2-VL or Qwen3-VL whose weights depend only on ``seed``.

    The text model has ``len(tokenizer)`` ids, tied embeddings and a multimodal RoPE whose
    sections split ``head_dim // 2`` frequencies over (time, height, width) in the family's
    proportions; the vision tower has ``vision_depth`` blocks of width ``vision_hidden_size`` and
    merges ``spatial_merge_size × spatial_merge_size`` patches into one token of width
    ``hidden_size``. ``text_overrides`` go to the text config as they are. The global RNG is left
    as it was.

    Raises:
        ConfigError: unknown family, or ``head_dim`` too small for the RoPE sections.
    """
    if family not in ("qwen2_vl", "qwen3_vl"):
        raise ConfigError(f"family={family!r} is not allowed; use one of 'qwen2_vl', 'qwen3_vl'")
    if head_dim < 16 or head_dim % 4:
        raise ConfigError(
            f"head_dim={head_dim} is too small for multimodal RoPE; fix: use a multiple of 4, >= 16"
        )
    half = head_dim // 2  # rotary frequencies, split over (t, h, w)
    if family == "qwen2_vl":
        sections = [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]  # 128: [16, 24, 24]
    else:
        sections = [
            half - 2 * (5 * half // 16),
            5 * half // 16,
            5 * half // 16,
        ]  # 128: [24, 20, 20]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": sections,
        },
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **text_overrides,
    }
    common = {"patch_size": patch_size, "spatial_merge_size": spatial_merge_size}
    if family == "qwen2_vl":
        if head_dim * num_attention_heads != hidden_size:
            raise ConfigError(
                f"qwen2_vl needs head_dim = hidden_size / num_attention_heads, got "
                f"head_dim={head_dim}, hidden_size={hidden_size}, "
                f"num_attention_heads={num_attention_heads}; fix: make them agree"
            )
        vision = {
            "depth": vision_depth,
            "embed_dim": vision_hidden_size,
            "hidden_size": hidden_size,
            "num_heads": vision_heads,
            "mlp_ratio": 2,
            **common,
        }
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    else:
        text["head_dim"] = head_dim
        vision = {
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 16,  # a 4×4 grid of learned positions, interpolated
            "deepstack_visual_indexes": [0],
            **common,
        }
        config_class, model_class = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    config = config_class(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=True,
        **vision_token_ids(tokenizer),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config)


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (which needs ``torchvision``)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent passes (image, tokenizer, video) positionally; ProcessorMixin zips them with
        # this signature's attributes, so the missing video processor is dropped, not checked.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without its video processor (which needs ``torchvision``)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def build_tiny_vlm_processor(
    tokenizer: Any,
    config: Qwen2VLConfig | Qwen3VLConfig,
    *,
    min_pixels: int = TINY_MIN_PIXELS,
    max_pixels: int = TINY_MAX_PIXELS,
) -> ImageOnlyQwen2VLProcessor | ImageOnlyQwen3VLProcessor:
    """The processor of a tiny VLM: ``tokenizer`` and a Qwen2-VL image processor (default mean,
    std and resampling) whose patch, merge and temporal sizes are the vision config's and whose
    resize keeps ``min_pixels .. max_pixels`` pixels.

    Calling it with ``text=[...]`` (each holding one ``<|image_pad|>`` per image) and
    ``images=[...]`` returns ``input_ids`` ``[B, L]``, ``attention_mask`` ``[B, L]``,
    ``mm_token_type_ids`` ``[B, L]`` (1 on image tokens), ``pixel_values``
    ``[sum of patches, 3 · temporal · patch²]`` and ``image_grid_thw`` ``[images, 3]``.
    """
    vision = config.vision_config
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size,
    )
    processor_class = (
        ImageOnlyQwen3VLProcessor if config.model_type == "qwen3_vl" else ImageOnlyQwen2VLProcessor
    )
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )
