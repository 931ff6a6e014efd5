"""Float comparisons whose tolerance follows from the dtype and the magnitude of the values.

Two computations of one quantity (a chunked and a whole projection, one micro-batch split and
another, a closed form and an independent reference) differ by rounding, and rounding in a sum
grows with the *largest* terms that enter it, not with each result: a gradient entry near zero
is a sum of larger terms that cancel. So every comparison here allows ``ulps`` units of rounding
of the compared tensor's largest magnitude, in the coarser of the two dtypes::

    |actual - expected| <= ulps * eps(dtype) * max(max|actual|, max|expected|)   elementwise

A real bug (a wrong sign on a regime's weight, a dropped chunk, a wrong denominator) moves values
by a sizeable fraction of that scale, orders of magnitude above the bound.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

# Units of rounding each kind of comparison allows, as multiples of eps(dtype) * scale.
# REORDERED: one computation done two ways — in another order or split (micro-batches, chunks,
# ranks) or with matmuls of other shapes, through tiny transformers' forward and backward too.
# The worst case measured in the suite is 28 units.
REORDERED = 256
# ANALYTIC: a closed form against an independently written reference (exp, log, softmax).
ANALYTIC = 1024

_EPS = {
    dtype: torch.finfo(dtype).eps
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16)
}


def _dtype(value) -> torch.dtype:
    if isinstance(value, torch.Tensor):
        return value.dtype
    if isinstance(value, numbers.Real):
        return torch.float64  # a Python float is a double
    # Arrays keep their dtype; a list of Python floats is float64 (not torch's float32 default).
    array = np.asarray(value)
    return torch.from_numpy(array.astype(np.float64) if array.dtype.kind in "iub" else array).dtype


def _as_float64(value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64)
    return torch.as_tensor(np.asarray(value, dtype=np.float64))


def tolerance(actual, expected, ulps: float, dtype=None, scale: float | None = None) -> float:
    """The absolute bound ``ulps * eps(dtype) * scale`` for comparing ``actual`` with
    ``expected`` (any shapes): ``dtype`` defaults to the coarser of the two, ``scale`` to the
    largest finite magnitude in either. Pass ``scale`` for a sum whose terms cancel (a loss that
    averages per-token values of both signs): its rounding follows the largest term, not the
    result."""
    return (
        ulps * _EPS[dtype or coarser_dtype(actual, expected)] * magnitude(actual, expected, scale)
    )


def coarser_dtype(actual, expected) -> torch.dtype:
    """The dtype of the two with the larger rounding unit."""
    return max((_dtype(actual), _dtype(expected)), key=lambda d: _EPS.get(d, 0.0))


def magnitude(actual, expected, scale: float | None = None) -> float:
    """The largest finite magnitude in either value, or ``scale`` where that is larger."""
    values = torch.cat([_as_float64(actual).flatten(), _as_float64(expected).flatten()])
    values = values[torch.isfinite(values)]
    largest = values.abs().max().item() if values.numel() else 0.0
    return max(largest, float(scale or 0.0))


def assert_close(
    actual, expected, *, ulps: float, dtype=None, scale=None, msg: str | None = None
) -> None:
    """Assert ``actual`` equals ``expected`` (tensors, arrays or floats of one shape) within
    :func:`tolerance`; infinities and NaNs must match exactly."""
    bound = tolerance(actual, expected, ulps, dtype, scale)
    torch.testing.assert_close(
        _as_float64(actual), _as_float64(expected), rtol=0.0, atol=bound, equal_nan=True, msg=msg
    )


def is_close(actual: float, expected: float, *, ulps: float, dtype=None, scale=None) -> bool:
    """Whether two scalars agree within :func:`tolerance` (for use inside ``all(...)``)."""
    return abs(actual - expected) <= tolerance(actual, expected, ulps, dtype, scale)


def log_prob_scale(*logits: torch.Tensor) -> float:
    """The largest finite log-probability magnitude of these ``[V]`` logit rows: the scale of a
    divergence's terms, whose sum may cancel to far below them."""
    logp = torch.cat([row.detach().log_softmax(-1) for row in logits])
    return logp[torch.isfinite(logp)].abs().max().item()
