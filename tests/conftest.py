"""Shared pytest setup: tests never reach the network, run one thread each, and every test can ask
for a seeded RNG, the arithmetic character tokenizer and tiny models over it."""

import os

# Set before anything imports transformers / huggingface_hub, so no test can try a download.
os.environ["HF_HUB_OFFLINE"] = "1"
# One OpenMP thread (inherited by subprocess tests): tiny models gain nothing from more, and on a
# loaded machine spinning threads that wait for a busy core made the suite several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch
from hypothesis import settings

# The same examples on every run, so CI's verdict depends on the change alone; explore new ones
# with --hypothesis-profile=explore.
settings.register_profile("deterministic", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("deterministic")

SEED = 1234


@pytest.fixture
def seed() -> int:
    """Seed torch's and numpy's global generators; return the seed for local generators."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    return SEED


@pytest.fixture(scope="module")
def tokenizer():
    """The character tokenizer over digits and ``+*=`` (``tests.tiny_models``); one per module,
    so a module that changed it could not leak the change into another."""
    from tests.tiny_models import arithmetic_tokenizer  # transformers only for tests that use it

    return arithmetic_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """Factory: ``tiny_model(seed)`` is the 1-layer Qwen3 of ``tests.tiny_models.arithmetic_model``
    over ``tokenizer``, built afresh at each call (train mode)."""
    from tests.tiny_models import arithmetic_model

    def build(seed: int):
        return arithmetic_model(tokenizer, seed)

    return build
