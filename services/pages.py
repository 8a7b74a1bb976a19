"""OpenAI's list object: one page of a cursor-paged listing (files, batches)."""

from __future__ import annotations

from typing import Any


def list_object(page: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": has_more,
    }
