"""How large a user's regular expression is once compiled. The `regex` module (as xgrammar) expands a
counted repeat into that many copies of what it repeats, and nested ones multiply:
`(?:a{20000}){20000}` takes minutes and tens of gigabytes to compile, before any timeout on matching
applies. A pattern is measured here, by reading it, before anything compiles it."""

from __future__ import annotations

import regex

# Copies a pattern's counted repeats may make, multiplied along their nesting. (?:a{1000}){1000}
# (a million) took 0.46 s to compile here; this bound keeps a compile to milliseconds.
MAX_REPEAT_EXPANSION = 50_000
MAX_PATTERN_CHARS = 1000  # a lorebook key's pattern

_COUNTED = regex.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}")
_HUGE = 10**9  # a count of more digits than this is more than any limit here


def _count(digits: str | None) -> int:
    return _HUGE if len(digits or "") > 9 else int(digits or 0)


def repeat_expansion(pattern: str) -> int:
    """The copies the pattern's counted repeats ({m}, {m,n}, {m,}) make of their largest nesting,
    multiplied along it: an estimate from above of what compiling it expands."""
    largest = [1]  # per open group: the largest expansion inside it so far
    last = 1  # the expansion of the item just read (a group's, once closed), which a count multiplies
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            i, last = i + 2, 1
        elif char == "[":  # a class is one item: skip to its end (a leading ] or ^] is literal)
            j = i + 1
            j += pattern[j : j + 1] == "^"
            j += pattern[j : j + 1] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, last = j + 1, 1
        elif char == "(":
            largest.append(1)
            i, last = i + 1, 1
        elif char == ")":
            last = largest.pop() if len(largest) > 1 else 1
            largest[-1] = max(largest[-1], last)
            i += 1
        elif char == "{" and (counted := _COUNTED.match(pattern, i)) and (counted[1] or counted[3]):
            low, high = _count(counted[1]), _count(counted[3])
            last *= max(low, high) if counted[2] else low
            largest[-1] = max(largest[-1], last)
            i = counted.end()
        else:
            i, last = i + 1, 1
    return max(largest)


def size_refusal(pattern: str) -> str | None:
    """Why the pattern is too large to compile safely, or None."""
    copies = repeat_expansion(pattern)
    if copies > MAX_REPEAT_EXPANSION:
        return f"its counted repeats expand to {copies:,} copies; the limit is {MAX_REPEAT_EXPANSION:,}"
    return None
