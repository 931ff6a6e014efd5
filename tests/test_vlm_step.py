"""One optimizer step on tiny vision-language models: views carry their image inputs
(``ViewInputs.model_kwargs``), micro-batches slice the concatenated patches per row, and the
chunked loss path equals the reference path."""

from __future__ import annotations

import pytest
import torch

from dopd.modeling.alignment import build_view_inputs, completion_logits
from dopd.modeling.tiny_vlm import build_tiny_vlm, build_tiny_vlm_processor
from dopd.modeling.vlm_views import (
    RowImages,
    build_vlm_view_inputs,
    vlm_completion_logits,
    vlm_view_prompts,
    with_images,
)
from dopd.objectives.registry import build_objective
from dopd.training.step import make_micro_batches
from tests.test_step import assert_same_step, step_results
from tests.test_vlm import EXAMPLES, TOKENIZER
from tests.tolerance import REORDERED

FAMILIES = ("qwen2_vl", "qwen3_vl")
PAD = TOKENIZER.pad_token_id


def _setup(family: str):
    student = build_tiny_vlm(family, TOKENIZER, seed=0)
    teacher = build_tiny_vlm(family, TOKENIZER, seed=1, hidden_size=96, head_dim=48)
    processor = build_tiny_vlm_processor(TOKENIZER, student.config)
    plain, privileged = vlm_view_prompts(processor, EXAMPLES)
    # Six rows: the three examples twice, so rows repeat images as rollouts do.
    order = [0, 1, 2, 2, 0, 1]
    prompts, rows = {"plain": [], "privileged": []}, []
    for index in order:
        example = EXAMPLES[index]
        for kind, texts in (("plain", plain), ("privileged", privileged)):
            encoded = processor(
                text=[texts[index]], images=list(example.images), return_tensors="pt"
            )
            prompts[kind].append(encoded["input_ids"][0].tolist())
        rows.append((encoded["pixel_values"], encoded["image_grid_thw"]))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 40, (6, 7), generator=generator)  # [B, T]
    mask = torch.arange(7) < torch.tensor([7, 3, 5, 1, 7, 4]).unsqueeze(1)  # [B, T]
    return student, teacher, processor, prompts, RowImages.from_rows(rows), ids, mask


def _batches(prompts, images, ids, mask, micro_batch_size, image_token_id):
    view_prompts = {
        "student": prompts["plain"],
        "priv_student": prompts["privileged"],
        "teacher": prompts["privileged"],
    }
    return make_micro_batches(
        ids,
        mask,
        view_prompts,
        micro_batch_size,
        PAD,
        images=images,
        image_token_id=image_token_id,
    )


def test_row_images_select_by_cumulative_patches():
    model = build_tiny_vlm("qwen2_vl", TOKENIZER, seed=0)
    processor = build_tiny_vlm_processor(TOKENIZER, model.config)
    plain, _ = vlm_view_prompts(processor, EXAMPLES)
    rows = [
        processor(text=[text], images=list(example.images), return_tensors="pt")
        for text, example in zip(plain, EXAMPLES)
    ]
    images = RowImages.from_rows([(row["pixel_values"], row["image_grid_thw"]) for row in rows])
    # The three images have different sizes (56x56, 84x56, 112x84): different patch counts.
    assert len({row["pixel_values"].shape[0] for row in rows}) == 3
    for start, stop in ((0, 1), (1, 3), (2, 3), (0, 3)):
        part = images.select(slice(start, stop))
        expected = torch.cat([row["pixel_values"] for row in rows[start:stop]])
        assert torch.equal(part.pixel_values, expected)
        assert torch.equal(
            part.image_grid_thw, torch.cat([row["image_grid_thw"] for row in rows[start:stop]])
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_view_inputs_with_images_match_the_processor_views(family):
    student, _, processor, prompts, images, ids, mask = _setup(family)
    plain, _ = vlm_view_prompts(processor, EXAMPLES)
    reference = build_vlm_view_inputs(
        processor, plain, [e.images for e in EXAMPLES], ids[:3], mask[:3], PAD
    )
    text_view = build_view_inputs(prompts["plain"][:3], ids[:3], mask[:3], PAD)
    view = with_images(text_view, images.select(slice(0, 3)), processor.image_token_id)
    assert "position_ids" not in view.forward_inputs()
    # mm_token_type_ids computed from the ids equal the processor's.
    assert torch.equal(view.model_kwargs["mm_token_type_ids"], reference.mm_token_type_ids)
    assert torch.equal(view.input_ids, reference.input_ids)
    with torch.no_grad():
        assert torch.equal(
            completion_logits(student.eval(), view), vlm_completion_logits(student, reference)
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_chunked_path_equals_reference_path(family):
    student, teacher, processor, prompts, images, ids, mask = _setup(family)
    objective = build_objective("dopd", top_k=8)
    models = {"teacher": teacher.eval().requires_grad_(False), "priv_student": student}
    batches = _batches(prompts, images, ids, mask, 4, processor.image_token_id)
    chunked = step_results(student, models, objective, batches, path="chunked", chunk_rows=5)
    reference = step_results(student, models, objective, batches, path="reference")
    assert (chunked[0].path, reference[0].path) == ("chunked", "reference")
    assert_same_step(chunked, reference, ulps=REORDERED)
    # The vision tower learns too: the loss reaches it through the image features.
    grads = chunked[1]
    assert any(
        name.startswith("model.visual") and grad.abs().sum() > 0 for name, grad in grads.items()
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_vlm_micro_batch_split_equals_the_whole_batch(family):
    student, teacher, processor, prompts, images, ids, mask = _setup(family)
    objective = build_objective("dopd", top_k=8)
    models = {"teacher": teacher.eval().requires_grad_(False), "priv_student": student}
    whole = _batches(prompts, images, ids, mask, 6, processor.image_token_id)
    split = _batches(prompts, images, ids, mask, 4, processor.image_token_id)  # 4 + 2 rows
    assert [len(batch.completion_ids) for batch in split] == [4, 2]
    for path in ("chunked", "reference"):
        one = step_results(student, models, objective, whole, path=path, chunk_rows=5)
        two = step_results(student, models, objective, split, path=path, chunk_rows=5)
        assert_same_step(two, one, ulps=REORDERED)
