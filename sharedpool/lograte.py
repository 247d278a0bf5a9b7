"""A log line said at most once per interval per key, the repeats counted in
between (for lines a peer or routine load can make many times a second)."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable


class OncePer:
    """``due(key)``: None while ``key`` was said less than ``every`` seconds
    ago (counted), else ``(repeats, seconds)`` since it was last said (the
    line to say now). At most ``max_keys`` keys are remembered."""

    def __init__(self, every: float, clock: Callable[[], float], max_keys: int = 1024) -> None:
        self.every = every
        self._clock = clock
        self._max_keys = max_keys
        self._said: dict[Hashable, tuple[float, int]] = {}

    def due(self, key: Hashable) -> tuple[int, float] | None:
        now = self._clock()
        last, repeats = self._said.get(key, (-math.inf, 0))
        if now - last < self.every:
            self._said[key] = (last, repeats + 1)
            return None
        if len(self._said) >= self._max_keys and key not in self._said:  # bounded, whatever peers do
            self._said.clear()
        self._said[key] = (now, 0)
        return repeats, now - last
