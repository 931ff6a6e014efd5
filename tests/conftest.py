"""Shared pytest setup: tests never reach the network, and every test can ask for a seeded RNG."""

import os

# Set before anything imports transformers / huggingface_hub, so no test can try a download.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

SEED = 1234


@pytest.fixture
def seed() -> int:
    """Seed torch's and numpy's global generators; return the seed for local generators."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    return SEED
