"""A local pool's lifecycle, and the rule for the timeouts its calls take:
shared by the pool and the modules that do its slow paths."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from .config import MAX_INT


class PoolStatus(Enum):
    ACTIVE = "active"
    DRAINING = "draining"
    CLOSED = "closed"


def valid_timeout(value: Any) -> bool:
    """A finite number of seconds >= 0 (NaN, inf, bools and strings are not, nor
    an integer too large for a float deadline)."""
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value < math.inf and (isinstance(value, float) or value <= MAX_INT))
