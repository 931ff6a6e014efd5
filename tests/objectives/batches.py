"""Random rollout batches for the objective tests: three correlated logit views and on-policy
ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dopd.objectives.base import objective_loss


@dataclass
class Batch:
    """``[B, T, V]`` logits of every view, ``[B, T]`` ids and mask (valid prefix per sequence)."""

    student: Tensor
    priv_student: Tensor
    teacher: Tensor
    reference: Tensor
    ids: Tensor
    mask: Tensor

    def numpy(self):
        """float64 numpy copies: (student, priv_student, teacher, ids, mask)."""
        return tuple(
            x.detach().double().numpy() if x.is_floating_point() else x.numpy()
            for x in (self.student, self.priv_student, self.teacher, self.ids, self.mask)
        )

    def rows(self, start: int, stop: int) -> Batch:
        """Sequences ``start:stop`` (a micro-batch), sharing storage with this batch."""
        return Batch(*(x[start:stop] for x in vars(self).values()))


def random_batch(
    batch: int,
    length: int,
    vocab: int,
    *,
    seed: int,
    dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
    lengths: list[int] | None = None,
) -> Batch:
    """A batch whose privileged student and teacher are noisy copies of the student.

    Shared structure makes the sampled-token gap vary from tiny to large, so every DOPD regime is
    populated; ids are sampled from the student (on-policy), so ``S(y) > 0``. ``lengths`` gives
    each sequence's valid prefix (default: random in ``[1, length]``).
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=torch.float64)

    student = normal(batch, length, vocab) * scale  # [B, T, V]
    noise_scale = uniform(batch, length, 1) * scale  # [B, T, 1]
    priv_student = student + noise_scale * normal(batch, length, vocab)  # [B, T, V]
    sharpness = 0.5 + 1.5 * uniform(batch, length, 1)  # [B, T, 1]
    teacher = sharpness * priv_student + noise_scale * normal(batch, length, vocab)  # [B, T, V]
    reference = student + normal(batch, length, vocab)  # [B, T, V]
    probs = student.softmax(-1).reshape(-1, vocab)
    ids = torch.multinomial(probs, 1, generator=generator).reshape(batch, length)  # [B, T]
    if lengths is None:
        lengths = torch.randint(1, length + 1, (batch,), generator=generator).tolist()
    mask = torch.arange(length).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)  # [B, T]
    views = (x.to(dtype) for x in (student, priv_student, teacher, reference))
    return Batch(*views, ids, mask)


def cyclic_classes(mask: Tensor, num_classes: int) -> Tensor:
    """``[B, T]`` long token classes ``0, 1, ..., num_classes - 1, 0, ...`` along the flattened
    positions, -1 at padding: every class shows up, deterministically."""
    classes = torch.arange(mask.numel()).reshape(mask.shape) % max(num_classes, 1)
    return classes.masked_fill(~mask.bool(), -1)


def batch_loss(objective, batch, **kwargs):
    """``objective_loss`` of ``objective`` on every view of ``batch`` (with ``cyclic_classes``
    when the objective routes on token classes and none are given)."""
    if objective.uses_token_classes:
        kwargs.setdefault(
            "token_classes", cyclic_classes(batch.mask, len(objective.token_class_names))
        )
    return objective_loss(
        objective,
        batch.student,
        batch.priv_student,
        batch.teacher,
        batch.ids,
        batch.mask,
        reference_logits=batch.reference,
        **kwargs,
    )
