"""Counter-based randomness: uniforms that are a pure function of an integer key.

The splitmix64 finaliser (wrapping int64 arithmetic) turns any key into 64 well-mixed bits, on any
device, so that sampling and pseudo-random token choices never depend on how a batch was split or
on a global RNG state.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def _to_signed(value: int) -> int:
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _to_signed(0x9E3779B97F4A7C15)
_MIX1 = _to_signed(0xBF58476D1CE4E5B9)
_MIX2 = _to_signed(0x94D049BB133111EB)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    # Logical shift on int64: torch shifts arithmetically, so clear the copied sign bits.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 (wrapping arithmetic)."""
    x = x * _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def hash_uniform(keys: Tensor) -> Tensor:
    """Float64 uniforms in (0, 1), one per int64 key, same shape; a pure function of the key."""
    # 52 random bits plus a half step: every value is exact in float64 and strictly inside (0, 1).
    return (_shift_right(splitmix(keys), 12).to(torch.float64) + 0.5) / float(1 << 52)
