"""Pydantic's first error as one line: where it is (a path as the input writes it) and what it says."""

from __future__ import annotations

from pydantic import ValidationError


def error_place(exc: ValidationError) -> str:
    """The first error's place under the validated value, written as a path from it: `.keys`,
    `[0].content`, `['odd key']` ('' for the value itself)."""
    return "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" if str(p).isidentifier() else f"[{str(p)!r}]"
        for p in exc.errors()[0]["loc"]
    )


def error_message(exc: ValidationError) -> str:
    """The first error's message, without pydantic's prefix for a validator's own ValueError."""
    return str(exc.errors()[0]["msg"]).removeprefix("Value error, ")


def first_error(exc: ValidationError, root: str = "") -> str:
    """`root` and the first error's place, then its message: `entries[0].keys: Input should be a
    valid list` (the message alone where neither names a place)."""
    where = (root + error_place(exc)).lstrip(".")
    return f"{where}: {error_message(exc)}" if where else error_message(exc)
