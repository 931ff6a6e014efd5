"""Tiny random-init models and character tokenizers, built in place with no download.

They serve the CPU config (``configs/tiny.yaml``) and the tests: a character-level tokenizer from
the ``tokenizers`` library wrapped as a transformers fast tokenizer, and a small Qwen3 causal LM
whose weights depend only on the seed.

    tokenizer = build_char_tokenizer("0123456789+*=", chat_template=True)
    model = build_tiny_model(len(tokenizer), bos_token_id=tokenizer.bos_token_id, ...)
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from dopd.errors import ConfigError

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# The template writes BOS itself, as real chat templates do; apply_chat_template tokenizes the
# rendered text with add_special_tokens=False, so the prompt holds exactly one BOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(
    characters: str, *, chat_template: bool = False
) -> PreTrainedTokenizerFast:
    """A tokenizer with one token per character of ``characters`` plus special tokens.

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; the characters follow in order of first
    appearance. Encoding with ``add_special_tokens=True`` prepends ``<bos>``; characters outside the
    set become ``<unk>``. Decoding with ``skip_special_tokens=True`` inverts encoding for any text
    over ``characters``. With ``chat_template=True`` the role markers of ``CHAT_TEMPLATE`` are
    added as special tokens and the template is installed. Padding is on the left, as generation
    needs.
    """
    alphabet = list(dict.fromkeys(characters))
    if not alphabet:
        raise ConfigError("characters='' is empty; give the characters the tokenizer must cover")
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    # BPE with no merges splits the text into single characters without any pre-tokenizer, so
    # spaces and newlines survive unchanged; Fuse() joins them back without separators.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    backend.add_special_tokens([AddedToken(token, special=True) for token in SPECIAL_TOKENS])
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab[BOS])]
    )
    extras: dict[str, Any] = {}
    if chat_template:
        extras = {"chat_template": CHAT_TEMPLATE, "additional_special_tokens": list(ROLE_TOKENS)}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        **extras,
    )


def build_tiny_model(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    **overrides: Any,
) -> Qwen3ForCausalLM:
    """A random-init float32 Qwen3 causal LM whose weights depend only on ``seed``.

    ``overrides`` go to ``Qwen3Config`` as they are (e.g. ``bos_token_id``, ``eos_token_id``,
    ``pad_token_id``, ``initializer_range``); ``head_dim`` defaults to
    ``hidden_size // num_attention_heads`` instead of Qwen3's 128. The global RNG is left as it was.
    """
    overrides.setdefault("head_dim", hidden_size // num_attention_heads)
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **overrides,
    )
    # fork_rng keeps the caller's random stream untouched, so building a model is not a side
    # effect on data shuffling or sampling seeded elsewhere.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)
