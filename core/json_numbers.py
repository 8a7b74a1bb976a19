"""JSON read with only the numbers PostgreSQL's jsonb can keep: NaN, Infinity and a float past the
double range (`1e999`, which Python reads as inf) are refused where they are read, not at the store,
where json.dumps writes `Infinity` and the statement fails for every row it carries."""

from __future__ import annotations

import json
import math
from typing import Any


class UnstorableNumber(ValueError):
    """A number jsonb cannot keep (NaN, Infinity, or a float past the double range)."""


def _no_constant(name: str) -> float:
    raise UnstorableNumber(f"{name}, which JSON has no number for")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise UnstorableNumber(f"the number {text[:40]} (too large to keep)")
    return value


def loads_finite(text: str | bytes, *, strict: bool = True) -> Any:
    """json.loads, raising UnstorableNumber (a ValueError) for a number jsonb cannot keep (`strict`:
    as json.loads's, False taking control characters inside strings)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite, strict=strict)
