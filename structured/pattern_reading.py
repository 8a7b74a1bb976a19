"""A reply pattern as the grammar reads it, for the `regex` module's re-check of the engine's reply.

xgrammar reads the shorthand classes as ASCII sets (`\\d` is [0-9], `\\w` [a-zA-Z0-9_], `\\s` the
ASCII spaces and U+00A0) and `.` as any character, a line end too; the `regex` module reads them as
Unicode classes and `.` without the line end. Read as written, a reply the grammar allowed (a
full-width space under `\\S`, an Arabic-Indic digit under `\\D`, a line end under `.`) failed its
check. `as_grammar_reads` spells the shorthands out as xgrammar's sets; DOTALL gives `.` its reading.
An escaped letter xgrammar has no meaning for (`\\A`, `\\Z`, `\\h`, `\\R`, …) is that letter to it, an
anchor or a class to the `regex` module: it is written as the letter. In a class, `[` is a character
to xgrammar (`[[:alpha:]]` is `[`, `:`, `a`… then `]`), a POSIX class to the `regex` module: escaped.
"""

from __future__ import annotations

from functools import lru_cache

import regex

FLAGS = regex.DOTALL

# xgrammar's sets (cpp/regex_converter.cc), as class bodies; the negated ones as their complements.
_SETS = {
    "d": r"0-9",
    "D": r"\x00-\x2F\x3A-\U0010FFFF",
    "w": r"a-zA-Z0-9_",
    "W": r"\x00-\x2F\x3A-\x40\x5B-\x5E\x60\x7B-\U0010FFFF",
    "s": r"\t\n\x0B\f\r\x20\xA0",
    "S": r"\x00-\x08\x0E-\x1F\x21-\x9F\xA1-\U0010FFFF",
}


# Escapes xgrammar reads as themselves in the `regex` module's reading too (controls, hex, a NUL), or
# refuses, so a pattern holding them never reaches a reply (word boundaries, backreferences, \\p).
_SAME_ESCAPES = set("afnrtv0xucbBkpP123456789")


@lru_cache(maxsize=512)
def as_grammar_reads(pattern: str) -> str:
    """The pattern with each shorthand class spelled out as xgrammar's set, in a class or out."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            if escaped in _SETS:
                out.append(_SETS[escaped] if in_class else f"[{_SETS[escaped]}]")
            elif escaped == "e":
                out.append(r"\x1b")  # xgrammar's escape character; the `regex` module has no `\e`
            elif escaped.isascii() and escaped.isalpha() and escaped not in _SAME_ESCAPES:
                out.append(escaped)  # a letter to xgrammar
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if not in_class and pattern.startswith("[^]", i):  # xgrammar: any character (`]` closes it)
            out.append(r"[\x00-\U0010FFFF]")
            i += 3
            continue
        if not in_class and char == "[":
            in_class = True
            out.append(char)
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            continue
        if in_class and char == "]":
            in_class = False
        out.append("\\[" if in_class and char == "[" else char)
        i += 1
    return "".join(out)
