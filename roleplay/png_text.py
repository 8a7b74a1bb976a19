"""PNG text chunks read and written at the chunk level: no pixel is ever decoded.

A character card rides in a PNG's text chunk. Reading it through an image library decodes the
image (a decompression bomb is a small file that inflates to gigabytes of pixels) and enforces that
library's own text limits with errors of its own. Here the file is walked chunk by chunk: text chunks
(`tEXt`, `zTXt`, `iTXt`) are read, compressed ones inflated up to a limit, every CRC checked, and the
image data is never touched. Writing replaces the card's chunk and keeps every other chunk as it was.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_TYPES = (b"tEXt", b"zTXt", b"iTXt")


class PngError(ValueError):
    """Not a PNG we can read, or a text chunk over its limit; the message says which."""


def _chunks(raw: bytes) -> Iterator[tuple[bytes, bytes, int, int]]:
    """(type, data, start, end) of each chunk, end included its CRC; checks lengths and CRCs."""
    if not raw.startswith(SIGNATURE):
        raise PngError("not a PNG file (bad signature)")
    pos = len(SIGNATURE)
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise PngError(f"truncated PNG: a chunk header is cut off at byte {pos}")
        (length,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > len(raw):
            raise PngError(f"truncated PNG: chunk {kind!r} at byte {pos} claims {length} bytes")
        data = raw[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", raw[end - 4 : end])
        if zlib.crc32(kind + data) != crc:
            raise PngError(f"corrupt PNG: chunk {kind!r} at byte {pos} fails its CRC")
        yield kind, data, pos, end
        if kind == b"IEND":
            return
        pos = end
    raise PngError("truncated PNG: no IEND chunk")


def _inflate(data: bytes, limit: int, keyword: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise PngError(f"the {keyword!r} chunk does not decompress: {exc}") from None
    if len(out) > limit:
        raise PngError(f"the {keyword!r} chunk inflates to more than {limit} bytes (a decompression bomb?)")
    return out


def _text(kind: bytes, data: bytes, limit: int) -> tuple[str, str]:
    keyword_raw, sep, rest = data.partition(b"\x00")
    if not sep:
        raise PngError(f"a {kind.decode()} chunk has no keyword separator")
    keyword = keyword_raw.decode("latin-1")
    if kind == b"tEXt":
        body = rest
    elif kind == b"zTXt":
        body = _inflate(rest[1:], limit, keyword)
    else:  # iTXt: flag, method, language\0, translated keyword\0, text (UTF-8)
        flag = rest[:1] == b"\x01"
        _, _, after_language = rest[2:].partition(b"\x00")
        _, _, body = after_language.partition(b"\x00")
        body = _inflate(body, limit, keyword) if flag else body
    if len(body) > limit:
        raise PngError(f"the {keyword!r} chunk holds {len(body)} bytes; the limit is {limit}")
    return keyword, body.decode("utf-8" if kind == b"iTXt" else "latin-1", errors="replace")


def read_text(raw: bytes, keywords: tuple[str, ...], limit: int) -> dict[str, str]:
    """The text of the first chunk of each of these (lowercase) keywords, matched in any case, as
    SillyTavern finds a card's chunk; a later chunk of a keyword, other text chunks and the image are
    skipped, never inflated: a file of many card chunks costs one inflation a keyword."""
    found: dict[str, str] = {}
    for kind, data, _, _ in _chunks(raw):
        if kind not in TEXT_TYPES:
            continue
        keyword = data.partition(b"\x00")[0].decode("latin-1").lower()
        if keyword in keywords and keyword not in found:
            found[keyword] = _text(kind, data, limit)[1]
    return found


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def placeholder() -> bytes:
    """A 1x1 transparent PNG."""
    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 5))
        + _chunk(b"IEND", b"")
    )


def write_text(image: bytes, keyword: str, text: str, replace: tuple[str, ...]) -> bytes:
    """`image` with its text chunks named in `replace` removed and a tEXt chunk `keyword` added before
    IEND; every other chunk is copied byte for byte."""
    out = [SIGNATURE]
    for kind, data, start, end in _chunks(image):
        if kind in TEXT_TYPES and data.partition(b"\x00")[0].decode("latin-1").lower() in replace:
            continue
        if kind == b"IEND":
            out.append(_chunk(b"tEXt", keyword.encode("latin-1") + b"\x00" + text.encode("latin-1")))
        out.append(image[start:end])
    return b"".join(out)
