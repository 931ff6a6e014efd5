"""Loading the student, teacher and reference models and the shared tokenizer from config.

A model comes from a local path or hub name (``path``), or is a random-init tiny Qwen3 built in
place (``tiny``: Qwen3Config overrides) for tests and laptop runs. ``trust_remote_code`` is off
unless a model's own config turns it on.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dopd.errors import ConfigError
from dopd.tiny import build_char_tokenizer, build_tiny_model

_DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(tokenizer_spec, student_spec) -> PreTrainedTokenizerBase:
    """The tokenizer every view shares: a char tokenizer, ``tokenizer.path`` or the student's.

    Raises:
        ConfigError: the tokenizer lacks an EOS or pad token, or no source is configured.
    """
    if tokenizer_spec.characters is not None:
        tokenizer = build_char_tokenizer(tokenizer_spec.characters)
    else:
        path = tokenizer_spec.path or student_spec.path
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=student_spec.trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ConfigError("tokenizer has no eos_token; set one in the tokenizer's config (tokenizer.path)")
    if tokenizer.pad_token_id is None:
        # The EOS id is a safe pad: validity comes from the first EOS, never from "!= pad".
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec, tokenizer: PreTrainedTokenizerBase, *, seed: int) -> PreTrainedModel:
    """A causal LM from ``spec.path`` or a tiny random-init Qwen3 from ``spec.tiny``."""
    if spec.tiny is not None:
        return build_tiny_model(
            len(tokenizer),
            seed=seed,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec.tiny,
        )
    return AutoModelForCausalLM.from_pretrained(
        spec.path, dtype=_DTYPES[spec.dtype], trust_remote_code=spec.trust_remote_code
    )


def check_vocabularies(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    """Refuse a teacher whose output vocabulary differs from the student's, naming both sizes."""
    student_vocab = student.get_output_embeddings().weight.shape[0]
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    if student_vocab != teacher_vocab:
        raise ConfigError(
            f"teacher vocabulary size {teacher_vocab} differs from student vocabulary size {student_vocab}; "
            "use a teacher and student that share one tokenizer and output head size"
        )
