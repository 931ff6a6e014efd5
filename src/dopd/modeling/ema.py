"""The ``ema`` privileged student: an exponential moving average of the student's weights
(``views.priv_student_weights: ema``; LoRA students average their adapters only,
``dopd.modeling.peft.AdapterEMA``)."""

from __future__ import annotations

import copy

import torch


class EMA(torch.nn.Module):
    """Exponential moving average of the student's weights, the ``ema`` privileged student."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__()
        self.model, self.decay = copy.deepcopy(model).requires_grad_(False), decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for average, current in zip(self.model.parameters(), model.parameters()):
            average.lerp_(current.detach().to(average.dtype), 1.0 - self.decay)
