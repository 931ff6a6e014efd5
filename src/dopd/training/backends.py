"""Rollout backends: the one interface the trainer samples through, whatever the engine.

A backend's ``generate(policy, prompt_ids, row_seeds)`` returns ``Rollouts`` (the completions,
their EOS mask and the engine's log-prob of every sampled token, all through
``rollout.finish_rollouts`` or the same masking), and ``weights_changed()`` tells it that the
student took an optimizer step, so it reloads the student's weights before its next generation
(``sync_seconds`` records how long that took):

* ``HFBackend``: ``generate_rollouts`` (transformers ``generate``, dopd's hash sampler) on the
  student itself; nothing to reload.
* ``VLLMColocateBackend``: a vLLM engine in this process (``vllm_engine``); the weights are
  handed over as tensors.
* ``VLLMServerBackend``: a ``dopd vllm-serve`` process over HTTP (``vllm_server``); the weights
  travel as one safetensors payload, sent by the main process only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import asdict

from safetensors.torch import save as save_safetensors
from torch import Tensor

from dopd.config import TrainConfig
from dopd.config.rollout import RolloutConfig
from dopd.errors import DOPDError
from dopd.modeling.vlm_views import RowImages
from dopd.training.rollout import Rollouts, finish_rollouts, generate_rollouts
from dopd.training.shards import is_sharded
from dopd.training.vllm_engine import (
    SamplingRequest,
    engine_for,
    engine_generate,
    engine_load_weights,
    import_vllm,
    named_weights,
)


class HFBackend:
    """Sampling with transformers ``generate`` on the student (``rollout.backend: hf``)."""

    sync_seconds = 0.0

    def __init__(self, rollout: RolloutConfig, tokenizer, vocab_size: int):
        self.rollout, self.tokenizer, self.vocab_size = rollout, tokenizer, vocab_size

    def generate(
        self,
        policy,
        prompt_ids: list[list[int]],
        row_seeds: Tensor,
        images: RowImages | None = None,
    ) -> Rollouts:
        """``images``: a vision-language run's image rows, one per prompt (generate_rollouts)."""
        rollout = self.rollout
        return generate_rollouts(
            policy,
            prompt_ids,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            max_completion_length=rollout.max_completion_length,
            num_generations=rollout.num_generations,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            row_seeds=row_seeds,
            vocab_size=self.vocab_size,
            generation_batch_size=rollout.generation_batch_size,
            record_log_probs=True,
            synced=is_sharded(policy),
            images=images,
        )

    def weights_changed(self) -> None:
        """Nothing to do: ``generate`` runs on the student itself."""


class _VLLMBackend:
    """What both vLLM backends share: the request of a batch, the rollouts of its answer, and
    reloading the weights lazily, once before the first generation after a step."""

    def __init__(self, rollout: RolloutConfig, tokenizer, vocab_size: int):
        self.rollout, self.tokenizer, self.vocab_size = rollout, tokenizer, vocab_size
        # Stale at first: a resumed run's weights are not those the engine loaded. The first sync
        # sends every weight; later ones only what a step can change (a LoRA student's adapted
        # layers; a full student's every weight).
        self.stale, self.sync_seconds, self.synced_once = True, 0.0, False

    def generate(self, policy, prompt_ids: list[list[int]], row_seeds: Tensor) -> Rollouts:
        self.sync_seconds = 0.0
        if self.stale:
            self.sync_seconds = self._load_weights(named_weights(policy, self.synced_once))
            self.stale, self.synced_once = False, True
        rollout, generations = self.rollout, self.rollout.num_generations
        request = SamplingRequest(
            prompts=[list(ids) for ids in prompt_ids for _ in range(generations)],
            seeds=row_seeds.tolist(),
            max_tokens=rollout.max_completion_length,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            eos_token_id=self.tokenizer.eos_token_id,
            vocab_size=self.vocab_size,
        )
        completions, log_probs = self._generate(request)
        return finish_rollouts(
            completions,
            len(prompt_ids),
            generations,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            log_probs=log_probs,
            device=next(policy.parameters()).device,
        )

    def weights_changed(self) -> None:
        self.stale = True

    def _generate(self, request: SamplingRequest):
        raise NotImplementedError

    def _load_weights(self, weights) -> float:
        """Send ``(name, tensor)`` pairs to the engine; returns the seconds it took."""
        raise NotImplementedError


class VLLMColocateBackend(_VLLMBackend):
    """A vLLM engine in the training process (``vllm_mode: colocate``)."""

    def __init__(self, config: TrainConfig, tokenizer, vocab_size: int, student):
        super().__init__(config.rollout, tokenizer, vocab_size)
        self.llm = engine_for(config, tokenizer, student)
        self.sleeping = False

    def _generate(self, request: SamplingRequest):
        self._wake()
        out = engine_generate(self.llm, request)
        if self.rollout.vllm_enable_sleep_mode:
            self.llm.sleep(level=1)  # free the KV cache while the trainer updates
            self.sleeping = True
        return out

    def _load_weights(self, weights) -> float:
        self._wake()
        return engine_load_weights(self.llm, weights)

    def _wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False


class VLLMServerBackend(_VLLMBackend):
    """A ``dopd vllm-serve`` process reached over HTTP (``vllm_mode: server``)."""

    def __init__(self, config: TrainConfig, tokenizer, vocab_size: int, accelerator):
        super().__init__(config.rollout, tokenizer, vocab_size)
        rollout = config.rollout
        self.url = server_url(rollout)
        self.timeout, self.accelerator = rollout.vllm_server_timeout, accelerator

    def _generate(self, request: SamplingRequest):
        answer = json.loads(self._post("/generate", json.dumps(asdict(request)).encode()))
        return answer["completions"], answer["log_probs"]

    def _load_weights(self, weights) -> float:
        start = time.perf_counter()
        if self.accelerator.is_main_process:  # every rank holds the same weights
            # safetensors refuses tensors that share memory (tied embeddings): one copy each.
            tensors = {name: t.contiguous().clone() for name, t in weights}
            self._post("/update_weights", save_safetensors(tensors))
        self.accelerator.wait_for_everyone()
        return time.perf_counter() - start

    def _post(self, path: str, body: bytes) -> bytes:
        request = urllib.request.Request(self.url + path, data=body, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace").strip()
            raise DOPDError(f"vLLM server {self.url}{path}: HTTP {error.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            raise DOPDError(
                f"vLLM server {self.url}{path} did not answer ({error}); is `dopd vllm-serve` "
                "still running? (rollout.vllm_server_host/port/timeout)"
            ) from None


def wait_for_server(url: str, timeout: float) -> None:
    """Poll ``url/health`` until it answers, or raise ``DOPDError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise DOPDError(
                f"no vLLM server answered at {url} within {timeout:g} s; start it with "
                "`dopd vllm-serve --config CONFIG` (same rollout.vllm_server_host/port), or use "
                "rollout.vllm_mode=colocate"
            )
        time.sleep(1.0)


def server_url(rollout: RolloutConfig) -> str:
    return f"http://{rollout.vllm_server_host}:{rollout.vllm_server_port}"


def check_backend(rollout: RolloutConfig) -> None:
    """Fail fast, before any model loads: vLLM must be importable for ``colocate``, and the
    server must answer for ``server`` (``DOPDError`` after ``vllm_server_timeout``)."""
    if rollout.backend != "vllm":
        return
    if rollout.vllm_mode == "colocate":
        import_vllm()
    else:
        wait_for_server(server_url(rollout), rollout.vllm_server_timeout)


def make_backend(config: TrainConfig, tokenizer, vocab_size: int, student, accelerator):
    """The backend ``config.rollout`` names, for the unwrapped ``student`` (after
    ``check_backend``)."""
    rollout = config.rollout
    if rollout.backend == "hf":
        return HFBackend(rollout, tokenizer, vocab_size)
    if rollout.vllm_mode == "colocate":
        return VLLMColocateBackend(config, tokenizer, vocab_size, student)
    return VLLMServerBackend(config, tokenizer, vocab_size, accelerator)
