"""A page of a list that grows without end (a live group's transcript, a player's facts): the items
after a cursor, at most a limit. Each answer gives the cursor past its last item (`next_after`), for
the next page, and says whether more are waiting (`more`). A transcript's cursor also finds the lines
written since (a conversation's lines are numbered under its lock); a fact's id comes from a sequence,
so two writes committing out of order can put a fact behind a cursor already passed: poll facts with
a page from the start, not from the cursor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Query

PAGE_LIMIT = 200
MAX_PAGE_LIMIT = 1000


@dataclass(frozen=True)
class Page:
    after: int
    limit: int


def page(
    after: Annotated[int, Query(ge=0, le=2**63 - 1, description="the cursor: items after this one")] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_LIMIT, description="items at most")] = PAGE_LIMIT,
) -> Page:
    """The page the query asks for."""
    return Page(after, limit)
