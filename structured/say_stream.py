"""The spoken line of an NPC reply while the engine writes the reply's JSON.

A streamed NPC turn shows its reader the line the character says, not the JSON around it: the stored
reply is that `say` string, decoded (the action and emotion come with the stored turn). The engine
writes `{"say":"...","emotion":...}` (guided decoding puts `say` first, as the schema lists it); the
string's text is passed on as soon as it is whole, an escape (`\\n`, `\\u00e9`, a surrogate pair) once
all of it is written. A reply that does not open with `say` passes nothing on: its reader gets the
stored reply whole when the turn is done. The stored `say` is cut at the first of the prompt's stop
strings (worker/structured.py): the stream stops there too, holding back as much text as a stop
string could still be beginning, as vLLM does for a free-text reply (diff review: the reader was
shown the line a group's other member was given, then a restart).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import regex

from core.text import cut_at_stops, storable_output

_OPENING = re.compile(r'\{\s*"say"\s*:\s*"')
_HIGH_SURROGATE = re.compile(r"[dD][89abAB][0-9a-fA-F]{2}")
_LOW_SURROGATE_ESCAPE = regex.compile(r"\\u[dD][c-fC-F][0-9a-fA-F]{2}")


def _complete_end(raw: str, start: int) -> tuple[int, bool]:
    """Where the string body that starts at `start` can be decoded up to (never inside an escape),
    and whether its closing quote is there."""
    i = start
    while i < len(raw):
        char = raw[i]
        if char == '"':
            return i, True
        if char != "\\":
            i += 1
            continue
        if i + 1 >= len(raw):
            break
        if raw[i + 1] != "u":
            i += 2
            continue
        if i + 6 > len(raw):
            break
        if _HIGH_SURROGATE.fullmatch(raw, i + 2, i + 6):  # its low half, if one follows, comes with it
            follows = raw[i + 6 : i + 12]
            if _LOW_SURROGATE_ESCAPE.fullmatch(follows):
                i += 12
                continue
            if len(follows) < 6 and _LOW_SURROGATE_ESCAPE.fullmatch(follows, partial=True):
                break  # its low half may still be on its way
        i += 6  # a lone high half (JSON allows one) is an escape of its own
    return i, False


class SayText:
    """Fed the reply's JSON piece by piece; tells `emit` each new piece of its `say` string."""

    def __init__(self, emit: Callable[[str], None], stops: tuple[str, ...] = ()) -> None:
        self._emit = emit
        self._raw = ""
        self._body = -1  # where the say string's body starts in the JSON, once seen
        self._decoded = 0  # the body's characters decoded so far end here
        self._ended = False
        self._stops = tuple(stop for stop in stops if stop)
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._said = ""  # the say string decoded so far
        self._sent = 0  # of it, the characters passed on

    def __call__(self, piece: str) -> None:
        if self._ended:
            return
        self._raw += piece
        if self._body < 0:
            opening = _OPENING.match(self._raw)
            if opening is None:
                if not _could_open(self._raw):
                    self._ended = True  # another shape of JSON: nothing to stream
                return
            self._body = self._decoded = opening.end()
        end, closed = _complete_end(self._raw, self._decoded)
        self._ended = closed
        if end > self._decoded:
            try:
                text = json.loads(f'"{self._raw[self._decoded : end]}"', strict=False)
            except ValueError:
                self._ended = True  # not JSON's string syntax: the stored reply will say what it was
                return
            self._decoded = end
            self._said += storable_output(text)  # as the stored reply keeps it (worker/structured.py)
        cut = len(cut_at_stops(self._said, self._stops))  # where the stored say ends, as far as seen
        # Text a stop string could still be beginning is held back (a longer stop may open before a
        # cut found already, and end later), unless the string is closed.
        safe = len(self._said) if closed else len(self._said) - self._hold
        upto = max(min(cut, safe), self._sent)
        if cut < len(self._said) and safe >= cut:
            self._ended = True
        if upto > self._sent:
            piece, self._sent = self._said[self._sent : upto], upto
            self._emit(piece)


def _could_open(raw: str) -> bool:
    """Whether more text could still make `raw` open with the say string."""
    compact = re.sub(r"\s+", "", raw)
    return '{"say":"'.startswith(compact)
