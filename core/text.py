"""Text a model wrote, made storable: what PostgreSQL's text and jsonb and UTF-8 cannot hold goes."""

from __future__ import annotations

import re

# A surrogate code point left alone: an escaped `\ud800` in JSON decodes to one, and UTF-8 cannot
# encode it (the store and the embedder would raise). A valid pair decodes to one code point.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def storable_output(text: str) -> str:
    """Model output without NUL and with each lone surrogate as U+FFFD: never refused, since what the
    model wrote cannot be asked again (a request's own text is refused instead: services/schemas.py)."""
    return _LONE_SURROGATE.sub("\ufffd", text.replace("\x00", ""))


def printable(text: str, limit: int = 200) -> str:
    """Text from a request as an error message quotes it: NUL and lone surrogates escaped (the message
    is stored in text and jsonb columns and sent as UTF-8), and at most `limit` characters."""
    shown = text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\u0000")
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"
