"""Text a model wrote, made storable: what PostgreSQL's text and jsonb and UTF-8 cannot hold goes."""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import regex

# A surrogate code point left alone: an escaped `\ud800` in JSON decodes to one, and UTF-8 cannot
# encode it (the store and the embedder would raise). A valid pair decodes to one code point.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_output(text: str) -> str:
    """Model output without NUL and with each lone surrogate as U+FFFD: never refused, since what the
    model wrote cannot be asked again (a request's own text is refused instead: services/schemas.py)."""
    return _LONE_SURROGATE.sub("\ufffd", text.replace("\x00", ""))


def cut_at_stops(text: str, stops: tuple[str, ...]) -> str:
    """`text` up to the first of `stops` it holds (all of it when none)."""
    ends = [at for at in (text.find(stop) for stop in stops if stop) if at >= 0]
    return text[: min(ends)] if ends else text


def printable(text: str, limit: int = 200) -> str:
    """Text from a request as an error message quotes it: NUL and lone surrogates escaped (the message
    is stored in text and jsonb columns and sent as UTF-8), and at most `limit` characters."""
    shown = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"


def unstorable_in(value: Any, where: str) -> tuple[str, str] | None:
    """The place of the first string of a JSON value (keys too, breadth first) that PostgreSQL
    cannot store (a NUL) or UTF-8 cannot encode (a lone surrogate), and why; None when all can be.
    Without recursion, and each place's name is made only for the string found: a copy of the
    parent's name for every child would cost the value's size times its depth (a key of 500 KB
    above 250,000 items is 125 GB)."""
    level: list[tuple[Any, _Place]] = [(value, _Place(None, where))]
    while level:
        nxt: list[tuple[Any, _Place]] = []
        for item, place in level:
            if isinstance(item, str):
                if why := _unstorable(item):
                    return place.name(), why
            elif isinstance(item, dict):
                for key, sub in item.items():
                    if why := _unstorable(str(key)):
                        return f"{place.name()} (a key)", why
                    nxt.append((sub, _Place(place, str(key))))
            elif isinstance(item, list):
                nxt += [(sub, _Place(place, i)) for i, sub in enumerate(item)]
        level = nxt
    return None


def _unstorable(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character"
    if _LONE_SURROGATE.search(text):
        return "contains a lone surrogate (not valid Unicode text)"
    return None


class _Place:
    """A place in a JSON value: its parent and its key or index (the root: its name)."""

    __slots__ = ("parent", "step")

    def __init__(self, parent: _Place | None, step: str | int) -> None:
        self.parent, self.step = parent, step

    def name(self) -> str:
        steps: list[str] = []
        node: _Place | None = self
        while node is not None:
            step = node.step
            if node.parent is None:
                steps.append(str(step))
            else:
                steps.append(f"[{step}]" if isinstance(step, int) else f".{printable(step, 80)}")
            node = node.parent
        return "".join(reversed(steps))


# Characters that show nothing (the format characters and Unicode's default-ignorable code points: zero-
# width space, word joiner, BOM, soft hyphen, bidi marks, tag characters, and the letters and marks
# that render blank: the Hangul fillers U+3164 and U+FFA0 that Korean players use as a blank name,
# variation selectors, the combining grapheme joiner) only disguise a name: "Rowan\u3164" reads as
# "Rowan". A label keeps ZWJ and ZWNJ, which spell words in Persian and Indic scripts (and emoji
# sequences); a comparison drops them.
DISGUISE = regex.compile(r"(?![\u200c\u200d])[\p{Cf}\p{Default_Ignorable_Code_Point}]")
SHOWS_NOTHING = regex.compile(r"[\p{Cf}\p{Default_Ignorable_Code_Point}]")  # neither is a superset


def caseless(text: str) -> str:
    """Text as it is matched whatever its case and form: NFKC ("Ｒｏｗａｎ" is "Rowan", a word pasted
    decomposed is composed), casefolded."""
    return unicodedata.normalize("NFKC", text).casefold()


# Korean compatibility jamo (U+3130-U+318F, halfwidth U+FFA0-U+FFDC), as players type "ㅋㅋ", "ㅠㅠ".
_NOT_JAMO = regex.compile(r"[^\u3130-\u318f\uffa0-\uffdc]+")


def nfkc_keeping_jamo(text: str) -> str:
    """NFKC, but Korean compatibility jamo stay as typed: NFKC turns them into conjoining jamo that
    then compose with their neighbours ("ㅋㅋㅠㅠ" becomes "ᄏ큐ᅲ"), a text the player never wrote
    (a label the NPC would repeat, a lore key that never matched)."""
    return _NOT_JAMO.sub(lambda run: unicodedata.normalize("NFKC", run.group()), text)


def caseless_keeping_jamo(text: str) -> str:
    """caseless, but jamo as typed (nfkc_keeping_jamo): a lore key "ㅠㅠ" typed beside other jamo
    never matched (review, stop 75); SillyTavern matches them as written."""
    return nfkc_keeping_jamo(text).casefold()


def speaker_key(name: str) -> str:
    """A speaker's name as names are compared: caseless, without the characters that show nothing,
    whitespace folded."""
    return " ".join(caseless(SHOWS_NOTHING.sub("", name)).split())
