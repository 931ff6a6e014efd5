"""The vLLM tests: they need the vLLM environment (``bash scripts/setup.sh --vllm``) and run there
with ``DOPD_REQUIRE_VLLM=1`` (``.ci/run``), where a missing vLLM fails the run instead of skipping.
Elsewhere they are skipped with the reason. One engine serves the whole session: vLLM runs in this
process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and building one takes seconds."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "tiny-vllm.yaml"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None

if not HAVE_VLLM and os.environ.get("DOPD_REQUIRE_VLLM") == "1":
    raise pytest.UsageError(
        "DOPD_REQUIRE_VLLM=1 but vLLM is not importable in this interpreter; run these tests "
        "with .venv-vllm/bin/python after `bash scripts/setup.sh --vllm`"
    )


def pytest_collection_modifyitems(config, items):
    if HAVE_VLLM:
        return
    skip = pytest.mark.skip(reason="vLLM not installed: bash scripts/setup.sh --vllm")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_config():
    """``configs/tiny-vllm.yaml`` (a student with 32-wide heads, as vLLM's CPU attention needs)."""
    from dopd.config import load_config

    return load_config(CONFIG)


@pytest.fixture(scope="session")
def run_tokenizer(run_config):
    from dopd.modeling.loading import check_sources

    return check_sources(run_config)


@pytest.fixture(scope="session")
def student(run_config, run_tokenizer):
    """The run's tiny student, as ``dopd train`` builds it (eval mode, no gradients)."""
    from dopd.modeling.loading import load_model

    model = load_model(run_config.student, run_tokenizer, seed=run_config.seed, key="student")
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def engine(run_config, run_tokenizer, student):
    """A vLLM engine over ``student``'s weights, built by ``dopd``'s own code."""
    from dopd.training.backends import VLLMColocateBackend

    backend = VLLMColocateBackend(run_config, run_tokenizer, len(run_tokenizer), student)
    return backend.llm
