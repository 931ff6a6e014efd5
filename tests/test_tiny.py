"""Tests of dopd.modeling.tiny: the character tokenizer and the seeded tiny Qwen3 model."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dopd.modeling.tiny import (
    CHAT_TEMPLATE,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_model,
)

CHARACTERS = "0123456789+-*=() ,\nabcxyz"
TOKENIZER = build_char_tokenizer(CHARACTERS)
CHAT_TOKENIZER = build_char_tokenizer(CHARACTERS, chat_template=True)


def test_special_token_ids_and_vocabulary_size():
    ids = (
        TOKENIZER.pad_token_id,
        TOKENIZER.bos_token_id,
        TOKENIZER.eos_token_id,
        TOKENIZER.unk_token_id,
    )
    assert ids == (0, 1, 2, 3)
    assert TOKENIZER.convert_ids_to_tokens(list(ids)) == list(SPECIAL_TOKENS)
    assert len(TOKENIZER) == len(SPECIAL_TOKENS) + len(CHARACTERS)
    assert len(CHAT_TOKENIZER) == len(TOKENIZER) + len(ROLE_TOKENS)
    assert TOKENIZER.padding_side == "left"


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=CHARACTERS, min_size=1, max_size=40))
def test_encoding_is_one_token_per_character_after_one_bos(text):
    ids = TOKENIZER(text, add_special_tokens=True)["input_ids"]
    expected = [TOKENIZER.bos_token_id] + [len(SPECIAL_TOKENS) + CHARACTERS.index(c) for c in text]
    assert ids == expected
    assert TOKENIZER.decode(ids, skip_special_tokens=True) == text


def test_unknown_characters_become_unk():
    ids = TOKENIZER("1%2", add_special_tokens=False)["input_ids"]
    assert ids[1] == TOKENIZER.unk_token_id


def test_chat_template_renders_roles_as_single_tokens():
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "1+2="}]
    text = CHAT_TOKENIZER.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|system|>x<|end|><|user|>1+2=<|end|><|assistant|>"
    ids = CHAT_TOKENIZER.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert CHAT_TOKENIZER.convert_ids_to_tokens(ids) == [
        "<bos>",
        "<|system|>",
        "x",
        "<|end|>",
        "<|user|>",
        "1",
        "+",
        "2",
        "=",
        "<|end|>",
        "<|assistant|>",
    ]
    assert CHAT_TOKENIZER.chat_template == CHAT_TEMPLATE
    assert TOKENIZER.chat_template is None


def test_tiny_model_is_deterministic_by_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model(64, seed=7)
    draw = torch.rand(3)
    second = build_tiny_model(64, seed=7)
    other = build_tiny_model(64, seed=8)
    assert torch.equal(draw, expected_draw)
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_tiny_model_config_and_logits_shape():
    model = build_tiny_model(
        96, num_hidden_layers=1, bos_token_id=1, eos_token_id=2, pad_token_id=0
    )
    config = model.config
    assert (config.vocab_size, config.num_hidden_layers, config.head_dim) == (96, 1, 16)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 0)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32
    logits = model(input_ids=torch.randint(0, 96, (2, 5))).logits
    assert logits.shape == (2, 5, 96)
