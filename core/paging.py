"""Cutting a page from the items read past a cursor: read `limit + 1`, show `limit`, and the extra
one says whether more are waiting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Cut(Generic[T]):
    items: list[T]
    next_after: int  # the cursor past the last item shown (the one asked from, if none)
    more: bool


def cut(found: Sequence[T], *, after: int, limit: int, cursor: Callable[[T], int]) -> Cut[T]:
    """The page of `found` (read with `limit + 1`) that a query from `after` shows."""
    shown = list(found[:limit])
    return Cut(shown, cursor(shown[-1]) if shown else after, len(found) > limit)
