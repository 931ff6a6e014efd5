"""Tests of the vision-language foundation: tiny Qwen-VL models and processor built offline
(dopd.modeling.tiny_vlm), vision rows with boxes (dopd.io.images) and the aligned VLM views
(dopd.modeling.vlm_views)."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from dopd.errors import ConfigError, DataError, DOPDError
from dopd.io.images import (
    Box,
    VisionExample,
    check_box_template,
    load_vision_examples,
    render_boxes,
    vision_example_from_row,
)
from dopd.modeling.alignment import check_aligned, output_head_problem
from dopd.modeling.tiny_vlm import (
    IMAGE_PAD,
    build_tiny_vlm,
    build_tiny_vlm_processor,
    build_vlm_char_tokenizer,
)
from dopd.modeling.vlm_views import build_vlm_view_inputs, vlm_completion_logits, vlm_view_prompts

CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789 :,[]?.\n"
TOKENIZER = build_vlm_char_tokenizer(CHARACTERS)
FAMILIES = ("qwen2_vl", "qwen3_vl")


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    model = build_tiny_vlm(request.param, TOKENIZER, seed=1).eval()
    return model, build_tiny_vlm_processor(TOKENIZER, model.config)


def _image(width: int, height: int, color: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    image.paste(color, (width // 4, height // 4, width // 2, height // 2))
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


EXAMPLES = [
    VisionExample("what is red?", (_image(56, 56, (220, 0, 0)),), (Box("red", 14, 14, 28, 28),)),
    VisionExample(
        "which shape is blue and where is it?",
        (_image(84, 56, (0, 0, 220)),),
        (Box("blue", 21, 14, 42, 28), Box("cup", 0, 0, 10, 10)),
    ),
    VisionExample("is it green?", (_image(112, 84, (0, 200, 0)),), (Box("green", 28, 21, 56, 42),)),
]
COMPLETIONS = torch.tensor([[5, 6, 7, 8, 2], [9, 10, 2, 0, 0], [11, 12, 13, 14, 15]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)


def _views(processor):
    plain, privileged = vlm_view_prompts(processor, EXAMPLES)
    images = [example.images for example in EXAMPLES]
    pad = TOKENIZER.pad_token_id
    return (
        build_vlm_view_inputs(processor, plain, images, COMPLETIONS, MASK, pad),
        build_vlm_view_inputs(processor, privileged, images, COMPLETIONS, MASK, pad),
    )


# ---------------------------------------------------------------------------------------------
# Tiny models and processor


def test_tiny_vlm_forward_with_pixels(vlm):
    model, processor = vlm
    image_id = TOKENIZER.convert_tokens_to_ids(IMAGE_PAD)
    assert model.config.image_token_id == processor.image_token_id == image_id
    text = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>what?"
    batch = processor(text=[text], images=[_image(56, 56, (1, 2, 3))], return_tensors="pt")
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 at patch 14: 16 patches
    assert int((batch["input_ids"] == image_id).sum()) == 4  # after the 2x2 merge
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(TOKENIZER))
    assert torch.isfinite(logits).all()
    assert output_head_problem(model) is None  # the chunked path's head check accepts it


def test_tiny_vlm_is_seeded():
    first, second = (build_tiny_vlm("qwen3_vl", TOKENIZER, seed=3) for _ in range(2))
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)


def test_tiny_vlm_refuses_bad_shapes():
    with pytest.raises(ConfigError, match="family='llava'"):
        build_tiny_vlm("llava", TOKENIZER)
    with pytest.raises(ConfigError, match="head_dim=8"):
        build_tiny_vlm("qwen3_vl", TOKENIZER, head_dim=8)


# ---------------------------------------------------------------------------------------------
# Views


def test_boxes_appear_only_in_privileged_views(vlm):
    _, processor = vlm
    plain, privileged = _views(processor)
    for row, example in enumerate(EXAMPLES):
        plain_text = TOKENIZER.decode(plain.input_ids[row][plain.attention_mask[row].bool()])
        priv_text = TOKENIZER.decode(
            privileged.input_ids[row][privileged.attention_mask[row].bool()]
        )
        assert example.prompt in plain_text and example.prompt in priv_text
        for box in example.boxes:
            assert f"{box.label}: [" in priv_text
            assert f"{box.label}: [" not in plain_text
        # The same image tokens in both views.
        assert plain.mm_token_type_ids[row].sum() == privileged.mm_token_type_ids[row].sum() > 0
    assert torch.equal(plain.pixel_values, privileged.pixel_values)
    assert torch.equal(plain.image_grid_thw, privileged.image_grid_thw)


def test_views_share_the_completion(vlm):
    _, processor = vlm
    plain, privileged = _views(processor)
    length = COMPLETIONS.shape[1]
    expected = COMPLETIONS.masked_fill(~MASK, TOKENIZER.pad_token_id)
    for view in (plain, privileged):
        assert torch.equal(view.input_ids[:, -length:], expected)
        assert torch.equal(view.completion_mask, MASK)
        assert not view.mm_token_type_ids[:, -length:].any()
    check_aligned(plain.completion_mask, privileged.completion_mask)


def test_padded_batch_scores_each_row_as_alone(vlm):
    model, processor = vlm
    plain, privileged = _views(processor)
    plain_texts, priv_texts = vlm_view_prompts(processor, EXAMPLES)
    for view, texts in ((plain, plain_texts), (privileged, priv_texts)):
        assert (view.attention_mask[:, 0] == 0).any()  # some row really is left-padded
        with torch.no_grad():
            batch = vlm_completion_logits(model, view)  # [B, T, V]
            assert batch.shape == (*COMPLETIONS.shape, len(TOKENIZER))
            for row, example in enumerate(EXAMPLES):
                alone = build_vlm_view_inputs(
                    processor,
                    texts[row : row + 1],
                    [example.images],
                    COMPLETIONS[row : row + 1],
                    MASK[row : row + 1],
                    TOKENIZER.pad_token_id,
                )
                single = vlm_completion_logits(model, alone)[0]  # [T, V]
                valid = MASK[row]
                torch.testing.assert_close(batch[row][valid], single[valid], atol=1e-5, rtol=1e-4)


def test_privileged_view_changes_the_logits(vlm):
    model, processor = vlm
    plain, privileged = _views(processor)
    with torch.no_grad():
        difference = vlm_completion_logits(model, plain) - vlm_completion_logits(model, privileged)
    assert difference[MASK].abs().max() > 1e-4


def test_vocab_size_cuts_the_logits(vlm):
    model, processor = vlm
    plain, _ = _views(processor)
    with torch.no_grad():
        full = vlm_completion_logits(model, plain)
        cut = vlm_completion_logits(model, plain, vocab_size=len(TOKENIZER) - 4)
    assert torch.equal(cut, full[..., : len(TOKENIZER) - 4])


def test_view_rows_need_images(vlm):
    _, processor = vlm
    plain, _ = vlm_view_prompts(processor, EXAMPLES[:1])
    with pytest.raises(DOPDError, match="row 0 has no image"):
        build_vlm_view_inputs(processor, plain, [()], COMPLETIONS[:1], MASK[:1], 0)


# ---------------------------------------------------------------------------------------------
# Box rendering


def test_render_boxes_conventions():
    boxes = (Box("cat", 10, 20, 30, 40),)
    size = (100, 200)
    assert render_boxes(boxes, image_size=size) == "cat: [100, 100, 300, 200]"
    assert render_boxes(boxes, image_size=size, render="absolute") == "cat: [10, 20, 30, 40]"
    resized = render_boxes(
        boxes, image_size=size, render="absolute_resized", resized_size=(200, 100)
    )
    assert resized == "cat: [20, 10, 60, 20]"
    normalized = (Box("cat", 100, 100, 300, 200),)
    assert (
        render_boxes(normalized, image_size=size, box_format="normalized_1000", render="absolute")
        == "cat: [10, 20, 30, 40]"
    )
    two = (*boxes, Box("dog", 0, 0, 1, 2))
    template = "<ref>{label}</ref>({x1},{y1}),({x2},{y2})"
    text = render_boxes(two, image_size=size, render="absolute", template=template)
    assert text == "<ref>cat</ref>(10,20),(30,40)\n<ref>dog</ref>(0,0),(1,2)"


@pytest.mark.parametrize(
    "template", ["{label} {x1} {y1} {x2}", "{x1} {y1} {x2} {y2} {score}", "{x1:.1f}{y1}{x2}{y2}"]
)
def test_bad_box_template(template):
    with pytest.raises(ConfigError, match="data.box_template"):
        check_box_template(template)


def test_absolute_resized_needs_the_size():
    with pytest.raises(ConfigError, match="absolute_resized"):
        render_boxes((Box("a", 0, 0, 1, 1),), image_size=(2, 2), render="absolute_resized")


# ---------------------------------------------------------------------------------------------
# Rows and bad image input


def _write(tmp_path, rows):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_loads_paths_bytes_and_dataset_dicts(tmp_path):
    picture = _image(60, 40, (9, 9, 9))
    (tmp_path / "img").mkdir()
    picture.save(tmp_path / "img" / "a.png")
    boxes = [{"label": "thing", "box": [1, 2, 30, 40]}]
    rows = [
        {"prompt": "q1", "images": "img/a.png", "boxes": boxes, "answer": "x"},
        {
            "prompt": "q2",
            "images": [{"bytes": None, "path": str(tmp_path / "img" / "a.png")}],
            "boxes": boxes,
        },
        {"prompt": "q3", "images": [str(tmp_path / "img" / "a.png")] * 2, "boxes": boxes},
    ]
    examples = load_vision_examples(_write(tmp_path, rows))
    assert [example.images[0].size for example in examples] == [(60, 40)] * 3
    assert len(examples[2].images) == 2
    assert examples[0].boxes == (Box("thing", 1, 2, 30, 40),)
    assert examples[0].answer == "x"
    # Bytes (how a parquet or datasets Image column holds them) decode the same.
    for value in (_png(picture), {"bytes": _png(picture), "path": None}, picture):
        row = {"prompt": "q", "images": value, "boxes": boxes}
        assert vision_example_from_row(row, "mem:1").images[0].tobytes() == picture.tobytes()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"images": "missing.png"},
            r"train.jsonl:2: images\[0\]: image file .*missing.png.* does ",
        ),
        (
            {"images": {"bytes": "bm90IGFuIGltYWdl"}},
            r"train.jsonl:2: images\[0\]: 'bytes' holds a str",
        ),
        ({"images": 7}, r"train.jsonl:2: images\[0\]: 7 \(int\) is not an image"),
        (
            {"boxes": [{"label": "a", "box": [0, 0, 61, 10]}]},
            r"train.jsonl:2: boxes\[0\].box=.*"
            "outside the 60x40 image",
        ),
        (
            {"boxes": [{"label": "a", "box": [5, 0, 5, 10]}]},
            r"train.jsonl:2: boxes\[0\].box=.*"
            "x2 <= x1",
        ),
        ({"boxes": [{"label": "", "box": [0, 0, 5, 10]}]}, r"train.jsonl:2: boxes\[0\].label"),
        (
            {"boxes": [{"label": "a", "box": [0, 0, 5]}]},
            r"train.jsonl:2: boxes\[0\].box=.*4 finite",
        ),
        ({"boxes": []}, r"train.jsonl:2: boxes is empty"),
        ({"images": []}, r"train.jsonl:2: images is an empty list"),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path, row, message):
    _image(60, 40, (1, 1, 1)).save(tmp_path / "ok.png")
    good = {"prompt": "q", "images": "ok.png", "boxes": [{"label": "a", "box": [0, 0, 5, 5]}]}
    path = _write(tmp_path, [good, {**good, **row}])
    with pytest.raises(DataError, match=message) as caught:
        load_vision_examples(path)
    assert "\n" not in str(caught.value) and "fix:" in str(caught.value)


def test_corrupt_image_bytes(tmp_path):
    truncated = _png(_image(60, 40, (1, 1, 1)))[:60]
    (tmp_path / "broken.png").write_bytes(truncated)
    path = _write(
        tmp_path,
        [{"prompt": "q", "images": "broken.png", "boxes": [{"label": "a", "box": [0, 0, 5, 5]}]}],
    )
    with pytest.raises(DataError, match=r"train.jsonl:1: images\[0\]: file .* not a readable"):
        load_vision_examples(path)
    row = {
        "prompt": "q",
        "images": [b"not an image"],
        "boxes": [{"label": "a", "box": [0, 0, 1, 1]}],
    }
    with pytest.raises(
        DataError, match=r"^rows.parquet: row 4: images\[0\]: bytes is not a readable"
    ):
        vision_example_from_row(row, "rows.parquet: row 4")


def test_normalized_boxes_and_unprivileged_rows(tmp_path):
    _image(60, 40, (1, 1, 1)).save(tmp_path / "ok.png")
    rows = [
        {"prompt": "q", "images": "ok.png", "boxes": [{"label": "a", "box": [0, 0, 900, 1000]}]}
    ]
    examples = load_vision_examples(_write(tmp_path, rows), box_format="normalized_1000")
    assert examples[0].box_format == "normalized_1000"
    with pytest.raises(DataError, match="outside the 60x40 image"):
        load_vision_examples(_write(tmp_path, rows))
    bare = load_vision_examples(
        _write(tmp_path, [{"prompt": "q", "images": "ok.png"}]), privileged=False
    )
    assert not bare[0].has_privilege
    with pytest.raises(ConfigError, match="data.box_format='pixels'"):
        load_vision_examples(_write(tmp_path, rows), box_format="pixels")


def test_text_position_ids_would_misplace_the_image_rows(vlm):
    # The control behind not passing position_ids: 1-D text positions (the text views' rule)
    # score differently from the model's own multimodal RoPE once an image spans a 2-D grid.
    model, processor = vlm
    plain, _ = _views(processor)
    positions = (plain.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # [B, P + T]
    length = plain.completion_length
    with torch.no_grad():
        own = vlm_completion_logits(model, plain)
        text = model(**plain.model_inputs(), position_ids=positions, use_cache=False).logits
    assert (own - text[:, -(length + 1) : -1])[MASK].abs().max() > 1e-4
