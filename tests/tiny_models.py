"""The tiny character tokenizer and Qwen3 model that the rollout and evaluation tests share.

conftest.py serves them as the ``tokenizer`` and ``tiny_model`` fixtures; import from here only
where a test needs a fresh copy to change (e.g. a tokenizer whose pad token it replaces).
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from dopd.modeling.tiny import build_char_tokenizer, build_tiny_model

ARITHMETIC_CHARACTERS = "0123456789+*="


def arithmetic_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character tokenizer over ``ARITHMETIC_CHARACTERS`` (17 ids, left padding)."""
    return build_char_tokenizer(ARITHMETIC_CHARACTERS)


def arithmetic_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> Qwen3ForCausalLM:
    """A 1-layer Qwen3 over ``tokenizer``'s ids (hidden 32, 4 query / 2 KV heads, MLP 64),
    its weights a function of ``seed`` alone, in train mode as built.

    A wide initialisation (0.2) makes greedy margins large (>= 1e-2), so greedy decoding with and
    without the KV cache or padding cannot flip on float rounding.
    """
    return build_tiny_model(
        len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
    )
