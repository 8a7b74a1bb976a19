"""Many values as one statement parameter."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY


def any_of(column: Any, values: Iterable[Any], item_type: Any) -> ColumnElement[bool]:
    """`column = ANY($1)`: one array parameter, not a bind per value. A statement carries at most
    65,535 parameters (a sweep's 100,000 turns, a folder's files went past it), and its text is the
    same for any count, so the driver prepares it once."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(item_type)))  # type: ignore[no-any-return]
