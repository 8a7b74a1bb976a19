"""Pydantic's first error as one line: where it is (a path as the input writes it) and what it says."""

from __future__ import annotations

from pydantic import ValidationError

from core.text import printable


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
    return error_line(where, message) if where else message


def placed(where: str, msg: str) -> tuple[str, str]:
    """The place and the message, where the message of a nested check starts with the place it
    looked at under `where`'s last name (`response_format.regex: Field required` at
    `params.response_format`): that place joined to `where`, said once."""
    head, _, last = where.rpartition(".")
    if last and msg.startswith((f"{last}.", f"{last}:", f"{last}[")):
        # The place ends at the first ": " outside brackets (a property named "a: b" is quoted in one).
        depth, quote = 0, ""
        for i, char in enumerate(msg):
            if quote:
                quote = "" if char == quote else quote
                continue
            if depth and char in "'\"":
                quote = char
            depth += (char == "[") - (char == "]")
            if depth == 0 and msg.startswith(": ", i):
                inner, rest = msg[:i], msg[i + 2 :]
                return (f"{head}.{inner}" if head else inner), rest
    return where, msg


def error_line(where: str, msg: str) -> str:
    """A pydantic error at `where` as one line: without pydantic's "Value error, " and without
    naming the place twice when the message (from a nested check) already starts with it."""
    msg, where = printable(msg.removeprefix("Value error, "), 500), printable(where)  # keys are input
    return "{}: {}".format(*placed(where, msg))
