"""Every public objective function returns the shapes and dtypes its docstring documents.

Each case names the shape text exactly as the docstring writes it; the test checks that the
docstring still says it and that a call with known sizes returns it, so docs cannot drift.
"""

import inspect

import pytest
import torch

from dopd import (
    DOPDConfig,
    Thresholds,
    compute_thresholds,
    dopd_loss,
    merge_statistics,
    privilege_statistics,
)
from dopd.objectives.base import Objective, ObjectiveOutput, objective_loss
from dopd.objectives.divergences import generalized_jsd, sampled_token_surrogate
from dopd.objectives.dopd import DOPD, DOPDOutput
from dopd.objectives.reduction import loss_denominator, reduce_loss
from dopd.objectives.registry import build_objective
from dopd.objectives.routing import assign_regimes
from dopd.objectives.statistics import trimmed_mean
from dopd.objectives.support import restrict_to_support, topk_support
from dopd.objectives.views import TokenViews
from tests.objectives.batches import random_batch

B, T, V, M, K = 2, 4, 7, 3, 3
BATCH = random_batch(B, T, V, seed=0, lengths=[4, 1])
N = int(BATCH.mask.sum())
SIZES = {"B": B, "T": T, "V": V, "M": M, "N": N, "K'": K, "sum N_i": N}
LOGITS = torch.randn(
    M, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64
)  # [M, V]
LOGP = LOGITS.log_softmax(-1)  # [M, V]
ROWS = torch.arange(M)  # [M]


def _shape(text: str) -> tuple[int, ...]:
    """``"[M, K' + 1]"`` -> ``(3, 4)`` with the sizes above."""
    dims = []
    for dim in text.strip("`[]").split(","):
        for name in sorted(SIZES, key=len, reverse=True):
            dim = dim.replace(name, str(SIZES[name]))
        dims.append(eval(dim, {"__builtins__": {}}))
    return tuple(dims)


def _documented(obj) -> str:
    return " ".join(inspect.getdoc(obj).split())


def _views() -> TokenViews:
    logits = {
        "student": BATCH.student,
        "priv_student": BATCH.priv_student,
        "teacher": BATCH.teacher,
    }
    return TokenViews.from_batch(logits, BATCH.ids, BATCH.mask, 1.0)


def _dopd_statistics() -> dict[str, torch.Tensor]:
    return DOPD(DOPDConfig()).statistics(_views())


def _unit_thresholds() -> Thresholds:
    return Thresholds(A=torch.tensor(1.0), q_student=torch.tensor(0.5), q_teacher=torch.tensor(0.5))


def _dopd_regimes() -> torch.Tensor:
    statistics = _dopd_statistics()
    return DOPD(DOPDConfig()).assign(_views(), statistics, compute_thresholds(statistics, 0.95))


INDEX, VALID = topk_support(LOGITS, LOGITS.flip(-1), K, "student")

# (what, documented-in, documented text, call, dtype or None)
TENSOR_CASES = [
    (
        "generalized_jsd",
        generalized_jsd,
        "``[M]``",
        lambda: generalized_jsd(LOGP, LOGP.flip(-1), 0.5),
        None,
    ),
    (
        "sampled_token_surrogate",
        sampled_token_surrogate,
        "``[M]``",
        lambda: sampled_token_surrogate(LOGP[:, 0], LOGP[:, 1], 1.0),
        None,
    ),
    (
        "topk_support index",
        topk_support,
        "``index`` ``[M, K']`` long",
        lambda: topk_support(LOGITS, LOGITS, K, "teacher")[0],
        torch.long,
    ),
    (
        "topk_support valid",
        topk_support,
        "``valid`` ``[M, K']`` bool",
        lambda: topk_support(LOGITS, LOGITS, K, "student")[1],
        torch.bool,
    ),
    (
        "restrict_to_support",
        restrict_to_support,
        "``[M, K']``",
        lambda: restrict_to_support(LOGITS, INDEX, VALID, False),
        None,
    ),
    (
        "restrict_to_support tail",
        restrict_to_support,
        "``[M, K' + 1]``",
        lambda: restrict_to_support(LOGITS, INDEX, VALID, True),
        None,
    ),
    ("trimmed_mean", trimmed_mean, "0-d", lambda: trimmed_mean(LOGITS[0], 0.9), None),
    (
        "assign_regimes",
        assign_regimes,
        "``[N]`` long",
        lambda: assign_regimes(_dopd_statistics(), _unit_thresholds()),
        torch.long,
    ),
    (
        "loss_denominator",
        loss_denominator,
        "0-d long",
        lambda: loss_denominator(BATCH.mask, "sequence_mean"),
        torch.long,
    ),
    (
        "reduce_loss",
        reduce_loss,
        "0-d float",
        lambda: reduce_loss(torch.zeros(B, T), BATCH.mask, "token_mean"),
        torch.float32,
    ),
    (
        "TokenViews.sampled_logp",
        TokenViews.sampled_logp,
        "``[M]``",
        lambda: _views().sampled_logp("student", ROWS),
        None,
    ),
    (
        "TokenViews.entropy",
        TokenViews.entropy,
        "``[N]``",
        lambda: _views().entropy("teacher"),
        None,
    ),
    ("TokenViews logits", TokenViews, "``[N, V]``", lambda: _views().logits["teacher"], None),
    ("TokenViews token_ids", TokenViews, "``[N]`` long", lambda: _views().token_ids, torch.long),
    ("Objective.assign", Objective.assign, "``[N]`` long", _dopd_regimes, torch.long),
    (
        "Objective.target_logits",
        Objective.target_logits,
        "``[M, V]``",
        lambda: DOPD(DOPDConfig()).target_logits("teacher", _views(), ROWS),
        None,
    ),
]


@pytest.mark.parametrize(
    "what,documented_in,text,call,dtype", TENSOR_CASES, ids=[case[0] for case in TENSOR_CASES]
)
def test_returned_tensor_has_documented_shape(what, documented_in, text, call, dtype):
    assert text in _documented(documented_in), f"{what}: docstring no longer says {text}"
    value = call()
    expected = () if text.startswith("0-d") else _shape(text.split("``")[-2])
    assert tuple(value.shape) == expected
    if dtype is not None:
        assert value.dtype == dtype


def test_union_support_is_twice_as_wide():
    assert "``2 * min(k, V)`` for the union" in _documented(topk_support)
    index, valid = topk_support(LOGITS, LOGITS.flip(-1), 100, "union")
    assert index.shape == valid.shape == (M, 2 * V)


def test_statistics_dicts_have_documented_shapes():
    assert "dict of three ``[N]``" in _documented(privilege_statistics)
    views = _views()
    statistics = privilege_statistics(
        views.sampled_logp("priv_student"), views.sampled_logp("teacher")
    )
    assert set(statistics) == {"advantage_gap", "q_student", "q_teacher"}
    assert all(value.shape == (N,) for value in statistics.values())
    assert "dict of ``[sum N_i]``" in _documented(merge_statistics)
    merged = merge_statistics([statistics, statistics])
    assert all(value.shape == (2 * N,) for value in merged.values())
    assert "``[N]``" in _documented(Objective.statistics)
    assert all(value.shape == (N,) for value in _dopd_statistics().values())
    assert "0-d tensors" in _documented(compute_thresholds)
    thresholds = compute_thresholds(statistics, 0.95)
    assert all(getattr(thresholds, name).shape == () for name in ("A", "q_student", "q_teacher"))


def _check_output(out: ObjectiveOutput) -> None:
    documented = _documented(ObjectiveOutput)
    for text in (
        "loss: 0-d",
        "per_token_loss: ``[B, T]``",
        "groups: ``[B, T]`` long",
        "name -> ``[B, T]``",
    ):
        assert text in documented, text
    assert out.loss.shape == () and out.per_token_loss.shape == (B, T)
    assert out.groups.shape == (B, T) and out.groups.dtype == torch.long
    assert all(value.shape == (B, T) for value in out.statistics.values())
    assert all(type(value) is float for value in out.metrics.values())


def test_objective_loss_output_has_documented_shapes():
    out = objective_loss(
        build_objective("tip"), BATCH.student, None, BATCH.teacher, BATCH.ids, BATCH.mask
    )
    _check_output(out)


def test_dopd_loss_output_has_documented_shapes():
    out = dopd_loss(BATCH.student, BATCH.priv_student, BATCH.teacher, BATCH.ids, BATCH.mask)
    _check_output(out)
    documented = _documented(DOPDOutput)
    assert (
        "``regimes`` ``[B, T]`` long" in documented
        and "``advantage_gap`` ``[B, T]`` float" in documented
    )
    assert out.regimes.shape == (B, T) and out.regimes.dtype == torch.long
    assert out.advantage_gap.shape == (B, T) and out.advantage_gap.dtype == BATCH.student.dtype
    assert "``loss`` (0-d)" in _documented(dopd_loss)
