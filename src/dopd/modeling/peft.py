"""LoRA students (``peft.enabled``): the adapters, the student's adapter-free weights as a view,
an EMA over the adapters alone, and export.

* ``apply_lora(model, config)`` wraps a causal LM in LoRA adapters (``peft.get_peft_model``); only
  the adapters train, every weight of the model itself stays as loaded.
* ``AdapterFreeView`` is the ``base`` privileged student (and ExOPD's default reference): the same
  ``PeftModel`` run with its adapters switched off. LoRA starts from a zero update (its ``B``
  matrices are zero), so that is exactly the student's initial function, without a second copy
  of the weights.
* ``AdapterEMA`` is the ``ema`` privileged student: a moving average of the trainable (adapter)
  tensors only; its ``model`` scores with the averages copied into the student's adapters and
  the live values copied back afterwards, bit for bit.
* ``export_model`` writes the merged model (plain Hugging Face weights, each LoRA update folded
  into its layer, computed out of place so the training state is untouched) or the adapter alone.

``peft`` is an optional dependency (``pip install 'dopd[peft]'``); it is imported only here, only
when a LoRA student is built, so every other path runs without it.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from dopd.errors import ConfigError, DOPDError
from dopd.io.atomic import publishing

EXPORTS = ("merged", "adapter")
# accelerate's DistributedType values that shard parameters (a str enum: compared by value).
SHARDING_ENGINES = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def import_peft() -> Any:
    """The ``peft`` module, or a one-line ``DOPDError`` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise DOPDError(
            "peft.enabled=True needs the peft package, which is not installed; "
            "fix: pip install 'dopd[peft]' (or set peft.enabled=false)"
        ) from None
    return peft


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (False, without importing peft, when no code has
    imported it: then no such model can exist)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def peft_base(model: Any) -> torch.nn.Module | None:
    """The Hugging Face model inside a ``PeftModel`` or a view of one (``AdapterFreeView``,
    ``AdapterEMA.model``), whose ``forward`` signature and output head the loss path reads;
    None for any other model."""
    if is_peft_model(model) or isinstance(model, _StudentView):
        return model.get_base_model()
    return None


def apply_lora(model: torch.nn.Module, config: Any, *, engine: str = "NO") -> torch.nn.Module:
    """``model`` wrapped in LoRA adapters as ``config`` (a ``dopd.config.peft.PeftConfig``) says.

    Returns a ``peft.PeftModel`` whose trainable parameters are the adapters alone. ``engine`` is
    the run's ``accelerator.distributed_type``: engines that shard parameters are refused (the
    adapter-free view, the adapter EMA and the export read whole tensors).

    Raises:
        DOPDError: peft is not installed.
        ConfigError: no name of ``config.target_modules`` matches a layer of ``model``, or one
            matches a layer LoRA cannot adapt (the message names ``peft.target_modules``); or
            ``engine`` shards parameters.
    """
    if engine in SHARDING_ENGINES:
        raise ConfigError(
            f"peft.enabled=True under {getattr(engine, 'value', engine)}, which shards the "
            "parameters: LoRA students run unsharded (one process or DDP); fix: launch with DDP, "
            "or set peft.enabled=false"
        )
    peft = import_peft()
    targets = tuple(config.target_modules)
    names = [name for name, _ in model.named_modules()]
    matched = {t for t in targets if any(n == t or n.endswith(f".{t}") for n in names)}
    if not matched:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"peft.target_modules={list(targets)!r}: no layer of {type(model).__name__} has any "
            f"of these names; fix: name some of its linear layers, e.g. {linear}"
        )
    if unmatched := [t for t in targets if t not in matched]:
        warnings.warn(
            f"peft.target_modules: {unmatched} match no layer of {type(model).__name__}; "
            f"adapting {sorted(matched)} only",
            stacklevel=2,
        )
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft asks through an alias transformers deprecated
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            return peft.get_peft_model(model, lora)
    except ValueError as error:  # e.g. a matched layer type LoRA does not support
        raise ConfigError(
            f"peft.target_modules={list(targets)!r}: peft cannot adapt these layers ("
            f"{str(error).splitlines()[0]}); fix: name linear layers such as q_proj, v_proj"
        ) from None


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts of ``model`` (tied tensors counted once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


class _StudentView(torch.nn.Module):
    """A frozen view of a LoRA student: it holds the student without registering it as a
    submodule, so ``eval()``, ``requires_grad_(False)`` and ``to()`` of the view, which the
    trainer applies to every frozen model, never reach the student; and it exposes what the
    loss path reads of a model (``dopd.modeling.alignment``).

    A forward runs the student in the view's own mode (``train()``/``eval()`` of the view, as a
    separate copy would: it starts in the student's mode when built) and puts the student's mode
    back afterwards."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._student = (model,)  # a tuple: not a submodule
        self.train(model.training)

    @property
    def student(self) -> torch.nn.Module:
        return self._student[0]

    @property
    def config(self) -> Any:
        return self.student.config

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.student.get_output_embeddings()

    def get_base_model(self) -> torch.nn.Module:
        """The Hugging Face model inside (its ``forward`` signature, its head; never run)."""
        return self.student.get_base_model()

    @contextmanager
    def _in_own_mode(self) -> Iterator[None]:
        was_training = self.student.training
        if was_training != self.training:
            self.student.train(self.training)
        try:
            yield
        finally:
            if was_training != self.training:
                self.student.train(was_training)


class AdapterFreeView(_StudentView):
    """The LoRA student with its adapters switched off: the model's own (frozen) weights."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._in_own_mode(), self.student.disable_adapter():
            return self.student(*args, **kwargs)


def initial_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen model computing what ``model`` computes now, before any training step: the
    adapter-free view of a LoRA student (no copy of the weights), else a deep copy."""
    if is_peft_model(model):
        return AdapterFreeView(model)
    return copy.deepcopy(model)


class _AveragedView(_StudentView):
    """The LoRA student scored with its EMA's averages in place of its adapters."""

    def __init__(self, model: torch.nn.Module, ema: AdapterEMA):
        super().__init__(model)
        self._ema = (ema,)

    @torch.no_grad()  # a constant view: no gradient may see the swapped-in values
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        live = self._ema[0].tensors(self.student)
        saved = [tensor.detach().clone() for tensor in live]
        try:
            for tensor, average in zip(live, self._ema[0].averages()):
                tensor.copy_(average)
            with self._in_own_mode():
                return self.student(*args, **kwargs)
        finally:
            for tensor, value in zip(live, saved):
                tensor.copy_(value)


class AdapterEMA(torch.nn.Module):
    """Exponential moving average of a LoRA student's trainable (adapter) tensors.

    The averages are buffers (saved in checkpoints' ``ema.safetensors``, named after the
    parameters with ``/`` for ``.``); ``model`` is the ``ema`` privileged student. The same
    interface as the full-model ``dopd.modeling.ema.EMA``, at the adapters' memory cost.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(name.replace(".", "/"), p.detach().clone())
        self.model = _AveragedView(model, self)

    def averages(self) -> list[torch.Tensor]:
        """The averages, in the order of ``names``."""
        return [self.get_buffer(name.replace(".", "/")) for name in self.names]

    def tensors(self, model: torch.nn.Module) -> list[torch.Tensor]:
        """``model``'s parameters named by ``names``, in that order."""
        params = dict(model.named_parameters())
        return [params[name] for name in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.averages(), self.tensors(model)):
            average.lerp_(current.detach().to(average.dtype), 1.0 - self.decay)


def merged_state_dict(
    model: torch.nn.Module, adapted_only: bool = False
) -> dict[str, torch.Tensor]:
    """The state dict of the Hugging Face model inside the ``PeftModel`` ``model``, with each
    layer's active LoRA updates added to its weight (``weight + B @ A * alpha / r``, as peft's
    ``merge`` adds them), under the layer's own names. Nothing of ``model`` changes: only the
    adapted weights are new tensors, every other entry is the live tensor itself.
    ``adapted_only``: just the adapted weights (what a training step can change)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight.detach()
        value = weight
        for adapter in module.active_adapters:
            if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                value = value + module.get_delta_weight(adapter)
        merged[f"{name}.base_layer.weight"] = value.to(weight.dtype)
    state = {}
    for key, tensor in base.state_dict().items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue
        if key in merged or not adapted_only:
            state[key.replace(".base_layer.", ".")] = merged.get(key, tensor)
    return state


def export_model(model: torch.nn.Module, folder: str | Path, tokenizer: Any, mode: str) -> None:
    """Write the LoRA student ``model`` (a ``PeftModel``) and ``tokenizer`` to ``folder``.

    ``merged``: the model with the adapters folded in, in Hugging Face format, which
    ``AutoModelForCausalLM.from_pretrained(folder)`` loads without peft. ``adapter``: the adapter
    alone (``adapter_config.json`` + ``adapter_model.safetensors``), which
    ``peft.PeftModel.from_pretrained(base, folder)`` puts on the student's base model.
    """
    if mode not in EXPORTS:
        raise DOPDError(f"mode={mode!r} is not a LoRA export; use one of {EXPORTS}")
    folder = Path(folder)
    if mode == "merged":
        base = model.get_base_model()
        base.save_pretrained(folder, state_dict=merged_state_dict(model), safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def save_lora_model(
    accelerator: Any, model: torch.nn.Module, tokenizer: Any, target: Path, mode: str
):
    """Atomically replace ``target`` with ``export_model``'s folder of the (prepared) LoRA student
    ``model``, as ``dopd.training.checkpoint.save_final_model`` does for a full student: the main
    process writes, every rank calls."""
    if accelerator.is_main_process:
        with publishing(Path(target)) as temp:
            export_model(accelerator.unwrap_model(model), temp, tokenizer, mode)
    accelerator.wait_for_everyone()
