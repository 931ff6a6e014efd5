"""What one micro-batch's loss hands back, and the sums over micro-batches and ranks behind a
step's metrics (loss, group fractions and losses, entropy, engine mismatch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate import Accelerator
from torch import Tensor

from dopd.objectives.base import Objective
from dopd.training.distributed import sum_across


@dataclass
class BatchLoss:
    """One micro-batch's loss and, at its ``N`` valid tokens, ``[N]`` groups, weighted per-token
    losses, student entropies and the student's sampled-token log-probs (detached), the
    engine's log-probs of the same tokens (None when not recorded), and the objective's ``[N]``
    per-token statistics."""

    loss: Tensor
    groups: Tensor
    per_token: Tensor
    entropy: Tensor
    student_log_probs: Tensor
    rollout_log_probs: Tensor | None
    statistics: dict[str, Tensor]


class StepTotals:
    """Sums over micro-batches (then ranks) behind the step's metrics.

    Layout: per-group token counts and loss sums, then the loss, the student entropy, the token
    count, and over tokens with engine log-probs their count, ``|delta|`` and ``k3`` sums, where
    ``delta = log pi_train(y) - log pi_rollout(y)``.
    """

    def __init__(self, num_groups: int, device):
        self.values = torch.zeros(2 * num_groups + 6, dtype=torch.float64, device=device)
        self.num_groups = num_groups

    def add(self, out: BatchLoss) -> None:
        g, groups = self.num_groups, out.groups
        self.values[:g] += torch.bincount(groups, minlength=g)[:g].double()
        self.values[g : 2 * g] += torch.zeros(
            g, dtype=torch.float64, device=groups.device
        ).index_add(0, groups, out.per_token.double())
        self.values[2 * g] += out.loss.detach().double()
        self.values[2 * g + 1] += out.entropy.double().sum()
        self.values[2 * g + 2] += groups.numel()
        if out.rollout_log_probs is not None:
            delta = out.student_log_probs.double() - out.rollout_log_probs.double()  # [N]
            self.values[2 * g + 3] += delta.numel()
            self.values[2 * g + 4] += delta.abs().sum()
            # k3 estimate of KL(rollout || train) from samples of the rollout engine.
            self.values[2 * g + 5] += (delta.exp() - 1.0 - delta).sum()

    def reduce(self, accelerator: Accelerator, objective: Objective) -> dict[str, float]:
        values = sum_across(accelerator, self.values).tolist()
        g, tokens = self.num_groups, max(values[2 * self.num_groups + 2], 1.0)
        metrics = {
            "loss": values[2 * g],
            "student_entropy": values[2 * g + 1] / tokens,
            "completion_tokens": values[2 * g + 2],
        }
        if values[2 * g + 3]:
            metrics["mismatch/abs_log_prob_diff"] = values[2 * g + 4] / values[2 * g + 3]
            metrics["mismatch/kl"] = values[2 * g + 5] / values[2 * g + 3]
        for index, name in enumerate(objective.group_names):
            count = values[index]
            metrics[f"fraction/{name}"] = count / tokens
            metrics[f"loss/{name}"] = values[g + index] / count if count else 0.0
        return metrics
