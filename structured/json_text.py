"""JSON a grammar wrote, as strict JSON. xgrammar builds a string with a length bound (an NPC's `say`,
an action's argument, a schema's `maxLength`) to take raw control characters and no escape; with the
grammar's whitespace off, a control character in such a reply is inside a string, so escaping each
one where it stands, piece by piece as it streams or whole once stored, gives the same text."""

from __future__ import annotations

import re

_RAW_CONTROL = re.compile("[\\x00-\\x1f]")


def escape_raw_controls(text: str) -> str:
    """`text` with each raw control character written as its JSON escape (`\\u0009`)."""
    return _RAW_CONTROL.sub(lambda m: f"\\u{ord(m[0]):04x}", text)
