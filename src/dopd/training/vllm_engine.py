"""A vLLM engine as a rollout sampler: build it, sample completions with per-row seeds, reload the
student's weights into it. Used in the training process (``vllm_mode: colocate``) and by
``dopd vllm-serve`` (``vllm_mode: server``, ``dopd.training.vllm_server``).

Seeds: each row is one request whose ``SamplingParams.seed`` is its ``rollout_seeds`` value, so
a row's completion does not depend on the batch it was sent in or its order there (vLLM draws a
seeded request's tokens from its own generator). vLLM's sampler is not dopd's hash sampler, so the
same seed gives other tokens than the ``hf`` backend: the two backends sample the same
distribution, not the same draws. Greedy decoding (temperature 0) is the same on both up to
float rounding.

Stopping: generation stops at the run's EOS id only (``ignore_eos`` with that id as the stop
token), as ``generate`` does, not at other ids a model's generation config calls EOS.

Log-probs: vLLM reports each sampled token's log-probability under the model's raw distribution
(``logprobs_mode='raw_logprobs'``: before temperature, top-k and top-p) over its whole head; when
the head is padded past the run's common vocabulary the padded ids are excluded from sampling
(``allowed_token_ids``) but not from that distribution.

vLLM is an optional dependency (``pip install 'dopd[vllm]'``, ``bash scripts/setup.sh --vllm``):
it is imported on first use, and a missing install is a ``ConfigError`` naming the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.config import TrainConfig
from dopd.errors import ConfigError
from dopd.modeling.peft import export_model, is_peft_model, merged_state_dict

CPU_MIN_HEAD_DIM = 32  # the narrowest heads vLLM's CPU attention kernels accept
_SEED_MASK = (1 << 63) - 1  # vLLM seeds are non-negative; -1 means "no seed"


def import_vllm():
    """The ``vllm`` module, imported with its engine in this process (so that weights can be
    handed to it as tensors) and its logging quiet; ``ConfigError`` when it is not installed."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as error:
        raise ConfigError(
            f"rollout.backend='vllm': vLLM is not importable ({error}); install it with "
            "`bash scripts/setup.sh --vllm` (CPU) or `pip install 'dopd[vllm]'`, or set "
            "rollout.backend=hf"
        ) from error
    # Every reload warns that the rotary embedding "failed to load weights": its cos/sin cache is
    # computed, not a checkpoint tensor, and vLLM puts it back itself. One line per step is noise.
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
        _quiet_rotary_reload
    )
    return vllm


def _quiet_rotary_reload(record: logging.LogRecord) -> bool:
    return not (record.args and record.args[0] == "RotaryEmbedding")


@dataclass(frozen=True)
class EngineSettings:
    """What building an engine needs.

    Attributes:
        model: a Hugging Face model directory or hub id (config, weights, tokenizer).
        dtype: ``float32``, ``bfloat16`` or ``float16``, the engine's compute dtype.
        max_model_len: the longest prompt plus completion the engine must hold.
        gpu_memory_utilization: fraction of device memory (CPU: of the KV-cache budget).
        tensor_parallel_size: engine tensor parallelism.
        enable_sleep_mode: allow ``sleep``/``wake_up`` around updates.
        seed: the engine's own seed (per-request seeds decide the samples).
    """

    model: str
    dtype: str
    max_model_len: int
    gpu_memory_utilization: float = 0.3
    tensor_parallel_size: int = 1
    enable_sleep_mode: bool = False
    seed: int = 0


def build_engine(settings: EngineSettings):
    """A ``vllm.LLM`` for ``settings`` (eager mode: CUDA graphs would be rebuilt after every
    weight reload for no gain at rollout batch sizes on CPU)."""
    vllm = import_vllm()
    try:
        return vllm.LLM(**_engine_arguments(settings))
    except (ValueError, RuntimeError) as error:  # pydantic's ValidationError is a ValueError
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"rollout.backend='vllm': vLLM cannot build an engine for {settings.model} "
            f"({type(error).__name__}: {reason}); fix: adjust rollout.vllm_* (on a CPU: "
            "vllm_enable_sleep_mode=false), or set rollout.backend=hf"
        ) from None


def _engine_arguments(settings: EngineSettings) -> dict:
    return dict(
        model=settings.model,
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        tensor_parallel_size=settings.tensor_parallel_size,
        enable_sleep_mode=settings.enable_sleep_mode,
        seed=settings.seed,
        enforce_eager=True,
        enable_prefix_caching=False,
    )


@dataclass(frozen=True)
class SamplingRequest:
    """One batch of rows to sample, as plain data (it crosses HTTP in server mode).

    Attributes:
        prompts: one token-id list per row (already repeated per generation).
        seeds: one int64 seed per row (``rollout_seeds``); None decodes greedily.
        max_tokens, temperature, top_p, top_k: as ``RolloutConfig``.
        eos_token_id: the only id that ends a completion.
        vocab_size: ids ``>= vocab_size`` are never sampled; None allows every id.
    """

    prompts: list[list[int]]
    seeds: list[int] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos_token_id: int
    vocab_size: int | None = None


def engine_generate(llm, request: SamplingRequest) -> tuple[list[list[int]], list[list[float]]]:
    """Per row, the completion ids (the closing EOS included) and each id's log-probability."""
    vllm = import_vllm()
    allowed = None
    engine_vocab = llm.llm_engine.model_config.get_vocab_size()
    if request.vocab_size is not None and request.vocab_size < engine_vocab:
        allowed = list(range(request.vocab_size))
    greedy = request.seeds is None
    params = [
        vllm.SamplingParams(
            n=1,
            max_tokens=request.max_tokens,
            temperature=0.0 if greedy else request.temperature,
            top_p=1.0 if greedy else request.top_p,
            top_k=0 if greedy else request.top_k,
            seed=None if greedy else int(seed) & _SEED_MASK,
            logprobs=0,
            ignore_eos=True,
            stop_token_ids=[request.eos_token_id],
            allowed_token_ids=allowed,
            detokenize=False,
        )
        for seed in (request.seeds or [None] * len(request.prompts))
    ]
    prompts = [vllm.inputs.TokensPrompt(prompt_token_ids=list(ids)) for ids in request.prompts]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    completions, log_probs = [], []
    for output in outputs:
        sample = output.outputs[0]
        ids = list(sample.token_ids)
        completions.append(ids)
        log_probs.append([entry[token].logprob for entry, token in zip(sample.logprobs, ids)])
    return completions, log_probs


def engine_load_weights(llm, weights: Iterable[tuple[str, Tensor]]) -> float:
    """Reload the engine's weights in place from Hugging Face-named tensors; returns seconds."""
    start = time.perf_counter()
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
    llm.reset_prefix_cache()
    return time.perf_counter() - start


def named_weights(
    model: torch.nn.Module, changed_only: bool = False
) -> Sequence[tuple[str, Tensor]]:
    """The student's state dict as ``(name, tensor)`` pairs, detached, in its own dtype. A LoRA
    student gives its merged weights (the engine knows no adapters); ``changed_only``: just the
    adapted layers' weights, all a training step of a LoRA student can change."""
    if is_peft_model(model):
        return list(merged_state_dict(model, adapted_only=changed_only).items())
    return [(name, tensor.detach()) for name, tensor in model.state_dict().items()]


def engine_model(config: TrainConfig, tokenizer, student) -> tuple[str | None, str]:
    """``(temporary directory or None, model)`` the engine loads: the student's own path, or a
    tiny student written (weights and tokenizer) to a temporary directory."""
    if config.student.path is not None:
        return None, config.student.path
    directory = tempfile.mkdtemp(prefix="dopd-vllm-")
    if is_peft_model(student):  # the engine loads a plain model: the adapters folded in
        export_model(student, directory, tokenizer, "merged")
    else:
        student.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory, directory


def engine_for(config: TrainConfig, tokenizer, student):
    """A ``vllm.LLM`` over ``config``'s student (``build_engine(engine_settings(...))``); a tiny
    student's temporary folder is removed once the engine holds the weights."""
    directory, model = engine_model(config, tokenizer, student)
    try:
        return build_engine(engine_settings(config, model, student))
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)


def engine_settings(config: TrainConfig, model: str, student) -> EngineSettings:
    """The engine for ``config``'s student, in the student's parameter dtype."""
    rollout = config.rollout
    parameter = next(student.parameters())
    text = student.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if parameter.device.type == "cpu" and head_dim < CPU_MIN_HEAD_DIM:
        raise ConfigError(
            f"rollout.backend='vllm': the student's heads are {head_dim} wide and vLLM's CPU "
            f"attention needs head_dim >= {CPU_MIN_HEAD_DIM}; fix: a student with wider heads "
            "(student.tiny.head_dim, see configs/tiny-vllm.yaml), or rollout.backend=hf"
        )
    dtype = parameter.dtype
    return EngineSettings(
        model=model,
        dtype=str(dtype).removeprefix("torch."),
        max_model_len=rollout.vllm_max_model_len
        or config.data.max_prompt_length + rollout.max_completion_length,
        gpu_memory_utilization=rollout.vllm_gpu_memory_utilization,
        tensor_parallel_size=rollout.vllm_tensor_parallel_size,
        enable_sleep_mode=rollout.vllm_enable_sleep_mode,
        seed=config.seed,
    )
