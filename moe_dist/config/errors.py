"""Config errors and the small helpers their messages use."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A user-facing configuration problem: names the field, the value and the fix."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def divisors(n: int, limit: int | None = None) -> list[int]:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return divs if limit is None else [d for d in divs if d <= limit]


def round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)
