"""An opt-in pytest plugin that checks the suite's tolerances are tight: every ``assert_close`` and
``is_close`` of ``tests/tolerance.py`` sees its ``actual`` value moved by ``SHIFT`` (0.1%) of the
compared scale at its largest entry, so every test that compares floats should then fail::

    .venv/bin/python -m pytest -p tests.sensitivity -m "not slow"

A test that still passes could not see an error of that size (see docs/development.md).
"""

from __future__ import annotations

import sys

import torch

from tests import tolerance

SHIFT = 1e-3
_assert_close, _is_close = tolerance.assert_close, tolerance.is_close


def _shifted(actual, expected, scale) -> torch.Tensor:
    value = tolerance._as_float64(actual).clone()
    flat = value.reshape(-1)
    finite = torch.isfinite(flat)
    if finite.any():
        largest = torch.where(finite, flat.abs(), -1.0).argmax()
        flat[largest] += SHIFT * tolerance.magnitude(actual, expected, scale)
    return value


def assert_close(actual, expected, *, ulps, dtype=None, scale=None, msg=None) -> None:
    dtype = dtype or tolerance.coarser_dtype(actual, expected)  # of the values before the shift
    shifted = _shifted(actual, expected, scale)
    _assert_close(shifted, expected, ulps=ulps, dtype=dtype, scale=scale, msg=msg)


def is_close(actual, expected, *, ulps, dtype=None, scale=None) -> bool:
    dtype = dtype or tolerance.coarser_dtype(actual, expected)
    shifted = _shifted(actual, expected, scale).item()
    return _is_close(shifted, expected, ulps=ulps, dtype=dtype, scale=scale)


def pytest_collection_modifyitems(items) -> None:
    """Test modules import the helpers by name: replace those names too."""
    tolerance.assert_close, tolerance.is_close = assert_close, is_close
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("tests."):
            if getattr(module, "assert_close", None) is _assert_close:
                module.assert_close = assert_close
            if getattr(module, "is_close", None) is _is_close:
                module.is_close = is_close
