"""The ``rollout`` section: how on-policy completions are sampled, and by which engine.

``backend: hf`` samples with Hugging Face ``generate`` in the training process
(``dopd.training.rollout``); ``backend: vllm`` with a vLLM engine, either inside the training
process (``vllm_mode: colocate``) or in a ``dopd vllm-serve`` process reached over HTTP
(``vllm_mode: server``) (``dopd.training.backends``). The ``vllm_*`` names follow TRL's where TRL
has the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from dopd.config.loading import BOOLS, doc
from dopd.errors import ConfigError, require_choice, require_int, require_range, require_str

RolloutBackend = Literal["hf", "vllm"]
VLLMMode = Literal["colocate", "server"]
ROLLOUT_BACKENDS: tuple[RolloutBackend, ...] = get_args(RolloutBackend)
VLLM_MODES: tuple[VLLMMode, ...] = get_args(VLLMMode)


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """On-policy sampling from the student (recorded in the run's config.yaml)."""

    prompts_per_step: int = field(
        default=8, metadata=doc("prompts per optimizer step, over all processes together")
    )
    num_generations: int = field(default=4, metadata=doc("completions sampled per prompt"))
    max_completion_length: int = field(default=64, metadata=doc("most new tokens per completion"))
    temperature: float = field(
        default=1.0,
        metadata=doc("sampling temperature (the loss has its own objective.temperature)"),
    )
    top_p: float = field(default=1.0, metadata=doc("nucleus sampling mass, in (0, 1]; 1 = off"))
    top_k: int = field(default=0, metadata=doc("sample among the k likeliest tokens; 0 = off"))
    backend: RolloutBackend = field(
        default="hf", metadata=doc("sampling engine: hf (transformers generate) or vllm")
    )
    generation_batch_size: int = field(
        default=0,
        metadata=doc("hf backend: rows per generate call, bounding its KV cache; 0 = all at once"),
    )
    vllm_mode: VLLMMode = field(
        default="colocate",
        metadata=doc("vllm: colocate (engine in the training process) or server (dopd vllm-serve)"),
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata=doc("vllm: fraction of device memory the engine may take")
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata=doc("vllm: tensor-parallel size of the engine (colocate: 1)")
    )
    vllm_enable_sleep_mode: bool = field(
        default=False,
        metadata=doc("vllm colocate: free the engine's memory while the trainer updates"),
    )
    vllm_max_model_len: int = field(
        default=0,
        metadata=doc("vllm: engine context length; 0 = data.max_prompt_length + completions"),
    )
    vllm_server_host: str = field(
        default="127.0.0.1", metadata=doc("vllm server: host of dopd vllm-serve")
    )
    vllm_server_port: int = field(default=8000, metadata=doc("vllm server: its port"))
    vllm_server_timeout: float = field(
        default=240.0,
        metadata=doc("vllm server: seconds to wait for it to answer (at start and per request)"),
    )

    def __post_init__(self) -> None:
        require_int("prompts_per_step", self.prompts_per_step, low=1)
        require_int("num_generations", self.num_generations, low=1)
        require_int("max_completion_length", self.max_completion_length, low=1)
        require_range("temperature", self.temperature, low=0.0, low_open=True)
        require_range("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        require_int("top_k", self.top_k, low=0)
        require_choice("backend", self.backend, ROLLOUT_BACKENDS)
        require_int("generation_batch_size", self.generation_batch_size, low=0)
        require_choice("vllm_mode", self.vllm_mode, VLLM_MODES)
        require_range(
            "vllm_gpu_memory_utilization",
            self.vllm_gpu_memory_utilization,
            low=0.0,
            high=1.0,
            low_open=True,
        )
        require_int("vllm_tensor_parallel_size", self.vllm_tensor_parallel_size, low=1)
        require_choice("vllm_enable_sleep_mode", self.vllm_enable_sleep_mode, BOOLS)
        require_int("vllm_max_model_len", self.vllm_max_model_len, low=0)
        require_str("vllm_server_host", self.vllm_server_host)
        require_int("vllm_server_port", self.vllm_server_port, low=1)
        require_range("vllm_server_timeout", self.vllm_server_timeout, low=0.0, low_open=True)
        if (
            self.backend == "vllm"
            and self.vllm_mode == "colocate"
            and self.vllm_tensor_parallel_size > 1
        ):
            raise ConfigError(
                f"vllm_tensor_parallel_size={self.vllm_tensor_parallel_size} with "
                "vllm_mode='colocate': a colocated engine runs on its own process's device; use "
                "vllm_mode=server for tensor parallelism, or vllm_tensor_parallel_size=1"
            )
