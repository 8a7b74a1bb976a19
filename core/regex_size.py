"""How large a user's regular expression is once compiled. The `regex` module (as xgrammar) expands a
counted repeat into that many copies of what it repeats, and nested ones multiply:
`(?:a{20000}){20000}` takes minutes and tens of gigabytes to compile, before any timeout on matching
applies. A pattern is measured here, by reading it, before anything compiles it; syntax this reading
does not follow (comments, verbose mode, version 1's nested sets) is refused, not guessed at."""

from __future__ import annotations

import regex

# The items a pattern compiles to, its counted repeats expanded: side by side and across `|` they
# add up (every branch is built), and a count multiplies the item it follows (at least once: X{0,}
# is X*). 20 x a{2500} is at the limit; (?:a{1000}){1000} (a million) took 0.46 s to compile here.
MAX_REPEAT_EXPANSION = 50_000
MAX_PATTERN_CHARS = 1000  # a lorebook key's pattern

_COUNTED = regex.compile(r"\{([0-9]*)(?:(,)([0-9]*))?\}")
# Escapes that own the braces after them (\x{41}, \N{DIGIT ONE}, \p{Lu}); any other escape is one
# item, and braces after it are a count (\g{1000} is "g" a thousand times).
_BRACED_ESCAPE = regex.compile(r"\\[xNpP]\{[^}]*\}|\\.", regex.DOTALL)
# The opening of a group whose syntax is not an item: (?:  (?>  (?|  (?=  (?!  (?<=  (?<!  (?P<n>
# (?<n>  (?'n'  (?flags:  and a flag setting alone, (?flags).
_GROUP_OPEN = regex.compile(r"\(\?(?:[:>|=!]|<[=!]|P?<\w+>|'\w+'|([a-zA-Z0-9-]*):)")
_FLAGS = regex.compile(r"\(\?([a-zA-Z0-9-]+)\)")
_HUGE = 10**9  # a count of more digits than this is more than any limit here


class Unmeasured(ValueError):
    """The pattern uses syntax the reading does not follow."""


def _count(digits: str | None) -> int:
    return _HUGE if len(digits or "") > 9 else int(digits or 0)


def _check_flags(flags: str | None) -> None:
    if flags and ("x" in flags or "V" in flags):
        raise Unmeasured("the x and V1 flags are not supported")


def repeat_expansion(pattern: str) -> int:
    """The items the pattern compiles to with its counted repeats ({m}, {m,n}, {m,}) expanded: an
    estimate from above. Unmeasured for syntax it does not read (comments, the x and V1 flags)."""
    return _measure(pattern)[0]


def largest_count(pattern: str) -> int:
    """The largest number written in any of the pattern's counted repeats (0: none). Unmeasured as
    repeat_expansion."""
    return _measure(pattern)[1]


def looks_ahead(pattern: str) -> bool:
    """Whether the pattern holds a lookahead, (?=...) or (?!...) (xgrammar builds a grammar without
    it, with a warning alone). Unmeasured as repeat_expansion."""
    return _measure(pattern)[2]


def _measure(pattern: str) -> tuple[int, int, bool]:
    """(repeat_expansion, largest_count, looks_ahead) in one reading."""
    largest, ahead = 0, False
    frames = [0]  # per open group: its items so far
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
            if pattern.startswith("(?#", i):
                raise Unmeasured("comments are not supported")
            ahead = ahead or pattern.startswith(("(?=", "(?!"), i)
            if flags := _FLAGS.match(pattern, i):
                _check_flags(flags[1])
                i, last = flags.end(), 0
                continue
            opening = _GROUP_OPEN.match(pattern, i)
            if opening is not None:
                _check_flags(opening[1])
            frames.append(0)
            i, last = (opening.end() if opening else i + 1), 0
            continue
        elif char == ")" and len(frames) > 1:
            i, item = i + 1, frames.pop()
        elif char == "|":
            i, last = i + 1, 0
            continue
        elif char == "{" and (counted := _COUNTED.match(pattern, i)) and (counted[1] or counted[3]):
            low, high = _count(counted[1]), _count(counted[3])
            largest = max(largest, low, high)
            times = max(low, high if counted[2] else 0, 1)
            frames[-1] += last * times - last
            last *= times
            i = counted.end()
            continue
        else:
            i, item = i + 1, 1
        frames[-1] += item
        last = item
    # unclosed groups (the compiler refuses them anyway) count as they stand
    return sum(frames), largest, ahead


def size_refusal(pattern: str) -> str | None:
    """Why the pattern is too large to compile safely (or written in syntax not measured), or None."""
    try:
        copies = repeat_expansion(pattern)
    except Unmeasured as exc:
        return str(exc)
    if copies > MAX_REPEAT_EXPANSION:
        return f"its counted repeats expand to {copies:,} items; the limit is {MAX_REPEAT_EXPANSION:,}"
    return None
