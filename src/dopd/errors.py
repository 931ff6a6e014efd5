"""The package's own exception types and the small validators every config dataclass uses.

Every message names the offending key, quotes the value that arrived, and says what would fix it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class DOPDError(Exception):
    """Base class of every error dopd raises on purpose (bad input, bad config, bad data)."""


class ConfigError(DOPDError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(DOPDError, ValueError):
    """A dataset file or row is missing, unreadable, or lacks a required field."""


def quote(value: Any, limit: int = 80) -> str:
    """``repr(value)``, shortened; never raises (ints beyond Python's digit limit cannot print)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not allowed; use one of {options}")


def require_range(
    key: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ConfigError`` unless ``value`` is a real number inside the given interval."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key}={value!r} must be a number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        interval = (
            f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        )
        raise ConfigError(f"{key}={value!r} is out of range; it must lie in {interval}")


def require_int(key: str, value: Any, *, low: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if value < low:
        raise ConfigError(f"{key}={value!r} is out of range; it must be an integer >= {low}")


def require_str(key: str, value: Any) -> None:
    """Raise ``ConfigError`` unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}={value!r} must be a non-empty string")
