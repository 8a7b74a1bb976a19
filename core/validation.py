"""Pydantic's first error as one line: where it is (a path as the input writes it) and what it says."""

from __future__ import annotations

from pydantic import ValidationError


def first_error(exc: ValidationError, root: str = "") -> str:
    """`root` and the first error's place under it, then its message (without pydantic's prefix for
    a validator's own ValueError): `entries[0].keys: Input should be a valid list`; the message
    alone where neither names a place."""
    first = exc.errors()[0]
    place = "".join(
        f"[{p}]" if isinstance(p, int) else f".{p}" if str(p).isidentifier() else f"[{str(p)!r}]"
        for p in first["loc"]
    )
    where = (root + place).lstrip(".")
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
