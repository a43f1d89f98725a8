"""Retry schedules: exponential backoff with full jitter, capped.

Pure: the random source is passed in, so schedules are testable with tables of cases.
"""

from __future__ import annotations

import random
from collections.abc import Callable


def backoff_ceiling(attempt: int, initial: float, maximum: float) -> float:
    """The longest delay before retry number *attempt* (1 = first retry)."""
    if attempt < 1:
        return 0.0
    # Cap the exponent so huge attempt counts cannot overflow a float.
    return min(maximum, initial * 2.0 ** min(attempt - 1, 62))


def retry_delay(
    attempt: int,
    initial: float,
    maximum: float,
    uniform: Callable[[float, float], float] = random.uniform,
) -> float:
    """Seconds to wait before retry *attempt*: uniform in [ceiling/2, ceiling].

    Half-jitter keeps retries of many items from synchronising while never retrying
    much sooner than the schedule promises.
    """
    ceiling = backoff_ceiling(attempt, initial, maximum)
    return uniform(ceiling / 2, ceiling)
