"""How large a user's regular expression is once compiled. The `regex` module (as xgrammar) expands a
counted repeat into that many copies of what it repeats, and nested ones multiply:
`(?:a{20000}){20000}` takes minutes and tens of gigabytes to compile, before any timeout on matching
applies. A pattern is measured here, by reading it, before anything compiles it; syntax this reading
does not follow (comments, verbose mode, version 1's nested sets) is refused, not guessed at."""

from __future__ import annotations

import regex

# The items a pattern compiles to, its counted repeats expanded: side by side they add up, across
# `|` the largest branch counts, and a count multiplies the item it follows. 20 x a{2500} is at the
# limit; (?:a{1000}){1000} (a million) took 0.46 s to compile here, one key of a card.
MAX_REPEAT_EXPANSION = 50_000
MAX_PATTERN_CHARS = 1000  # a lorebook key's pattern

_COUNTED = regex.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}")
# A comment, or an inline flag turning on verbose mode (x) or version 1 (V1): whitespace, `#` and
# nested sets then mean what this reading cannot follow.
_UNREAD = regex.compile(r"\(\?#|\(\?[a-zA-Z0-9-]*[xV]")
_BRACED_ESCAPE = regex.compile(r"\\[xuUNpPgk]\{[^}]*\}|\\.", regex.DOTALL)
_HUGE = 10**9  # a count of more digits than this is more than any limit here


def _count(digits: str | None) -> int:
    return _HUGE if len(digits or "") > 9 else int(digits or 0)


def repeat_expansion(pattern: str) -> int:
    """The items the pattern compiles to with its counted repeats ({m}, {m,n}, {m,}) expanded: an
    estimate from above. ValueError for syntax it does not read (see _UNREAD)."""
    if _UNREAD.search(pattern):
        raise ValueError("comments and the x and V1 flags are not supported")
    frames = [[0, 0]]  # per open group: [its largest finished branch, the branch being read]
    last = 0  # the size of the item just read, which a count multiplies
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\":
            escape = _BRACED_ESCAPE.match(pattern, i)
            i, item = (escape.end() if escape else n), 1
        elif char == "[":  # a class is one item: skip to its end (a leading ] or ^] is literal)
            j = i + 1
            j += pattern[j : j + 1] == "^"
            j += pattern[j : j + 1] == "]"
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i, item = j + 1, 1
        elif char == "(":
            frames.append([0, 0])
            i, last = i + 1, 0
            continue
        elif char == ")" and len(frames) > 1:
            best, current = frames.pop()
            i, item = i + 1, max(best, current)
        elif char == "|":
            frame = frames[-1]
            frame[0], frame[1] = max(frame[0], frame[1]), 0
            i, last = i + 1, 0
            continue
        elif char == "{" and (counted := _COUNTED.match(pattern, i)) and (counted[1] or counted[3]):
            low, high = _count(counted[1]), _count(counted[3])
            times = max(low, high) if counted[2] else low
            frames[-1][1] += last * times - last
            last *= times
            i = counted.end()
            continue
        else:
            i, item = i + 1, 1
        frames[-1][1] += item
        last = item
    while len(frames) > 1:  # unclosed groups (the compiler refuses them anyway)
        best, current = frames.pop()
        frames[-1][1] += max(best, current)
    return max(frames[0])


def size_refusal(pattern: str) -> str | None:
    """Why the pattern is too large to compile safely (or written in syntax not measured), or None."""
    try:
        copies = repeat_expansion(pattern)
    except ValueError as exc:
        return str(exc)
    if copies > MAX_REPEAT_EXPANSION:
        return f"its counted repeats expand to {copies:,} items; the limit is {MAX_REPEAT_EXPANSION:,}"
    return None
