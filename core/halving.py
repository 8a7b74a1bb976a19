"""The largest count a monotone test passes, found by halving."""

from __future__ import annotations

from collections.abc import Callable


def most_passing(low: int, high: int, passes: Callable[[int], bool]) -> int:
    """The largest n in [low, high] for which `passes(n)`, given that it passes for every n up to
    that one and for `low` (which is returned when nothing above it passes)."""
    while low < high:
        mid = (low + high + 1) // 2
        if passes(mid):
            low = mid
        else:
            high = mid - 1
    return low
