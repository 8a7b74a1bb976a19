"""How deep a parsed JSON value nests and how many values it holds, measured without recursion: a
value nested near Python's recursion limit parses, then fails where anything deeper walks it (the
driver's json.dumps at the insert), and millions of small values cost memory at every walk."""

from __future__ import annotations

from typing import Any


def nesting(value: Any, *, stop_past: int) -> int:
    """How deep objects and arrays nest (a scalar: 0, `[]`: 1); counting stops past `stop_past`."""
    depth, level = 0, [value]
    while level:
        level = [
            child
            for node in level
            if isinstance(node, (dict, list))
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        depth += 1
        if depth > stop_past + 1:
            break
    return depth - 1


def value_count(value: Any, *, stop_past: int) -> int:
    """How many values (objects, arrays, scalars, object keys not counted) the value holds; counting
    stops past `stop_past`."""
    count, stack = 0, [value]
    while stack and count <= stop_past:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count
