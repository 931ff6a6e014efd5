"""Loss reduction (dopd.objectives.reduction): hand formulas and exactness under micro-batching."""

import pytest
import torch

from dopd.objectives.reduction import loss_denominator, reduce_loss
from tests.objectives import reference
from tests.tolerance import REORDERED, assert_close

MASK = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
PER_TOKEN = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [6.0, 0.0, 0.0]], dtype=torch.float64)


def test_loss_denominator_counts_tokens_or_non_empty_sequences():
    for reduction, count in (("token_mean", 3), ("sequence_mean", 2)):
        denominator = loss_denominator(MASK, reduction)
        assert (
            denominator.dim() == 0
            and denominator.dtype == torch.long
            and denominator.item() == count
        )


def test_reduce_loss_by_hand():
    assert_close(reduce_loss(PER_TOKEN, MASK, "token_mean"), (1 + 2 + 6) / 3, ulps=REORDERED)
    # Sequence means 1.5 and 6; the empty sequence is not counted.
    assert_close(reduce_loss(PER_TOKEN, MASK, "sequence_mean"), (1.5 + 6) / 2, ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_reduce_loss_value_and_gradient_match_reference(reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(5, 7, generator=generator) < 0.6  # [B, T]
    mask[2] = False
    per_token = torch.rand(5, 7, generator=generator, dtype=torch.float64) * mask  # [B, T]
    per_token.requires_grad_(True)
    loss = reduce_loss(per_token, mask, reduction)
    loss.backward()
    reduce = reference.sequence_mean if reduction == "sequence_mean" else reference.token_mean
    assert_close(loss, reduce(per_token.detach().numpy(), mask.numpy()), ulps=REORDERED)
    # reduce_loss's contract is a per-token loss that is already 0 at padding; compare valid
    # positions.
    expected = reference.reduction_weights(mask.numpy(), reduction)
    assert_close(per_token.grad[mask], expected[mask.numpy()], ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_micro_batch_losses_with_step_denominator_sum_to_full_loss(reduction, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(8, 6, generator=generator) < 0.5  # [B, T]
    per_token = torch.rand(8, 6, generator=generator, dtype=torch.float64) * mask  # [B, T]
    slices = [slice(0, 1), slice(1, 4), slice(4, 5), slice(5, 8)]
    denominator = sum(loss_denominator(mask[s], reduction) for s in slices)
    parts = sum(reduce_loss(per_token[s], mask[s], reduction, denominator) for s in slices)
    assert_close(parts, reduce_loss(per_token, mask, reduction), ulps=REORDERED)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_zero_denominator_gives_zero_loss_attached_to_graph(reduction):
    values = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = reduce_loss(values * mask, mask, reduction)  # 0 / 0 must not become NaN
    loss.backward()
    assert loss.item() == 0.0 and (values.grad == 0).all()
