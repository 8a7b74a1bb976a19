"""SillyTavern character cards V2 (`chara_card_v2`) and V3 (`chara_card_v3`): JSON, or PNG with the
card in a tEXt chunk (`chara` for V2, `ccv3` for V3), base64-encoded JSON.

A card is kept exactly as imported (every unknown field and `extensions` included) and export gives
it back as JSON, or inside a PNG: the image given to export (the original avatar) or a 1x1 placeholder,
since mlchat stores the card, not the picture.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

from core.json_numbers import UnstorableNumber, loads_finite
from core.json_shape import nesting, value_count
from core.text import printable, unstorable_in
from roleplay import png_text
from roleplay.actions import CARD_ACTIONS, card_actions, check_actions

SPECS = {"chara_card_v2": "2.0", "chara_card_v3": "3.0"}
PNG_KEYWORD = {"chara_card_v2": "chara", "chara_card_v3": "ccv3"}
PNG_SIGNATURE = png_text.SIGNATURE
CARD_KEYWORDS = ("chara", "ccv3")
_STRING_FIELDS = (
    "name",
    "description",
    "personality",
    "scenario",
    "first_mes",
    "mes_example",
    "system_prompt",
    "post_history_instructions",
)


class CardError(ValueError):
    """The file is not a usable character card; the message says why."""


@dataclass(frozen=True)
class ImportedCard:
    """A parsed card: the card object as given, and mlchat's character fields taken from it."""

    card: dict[str, Any]
    spec: str
    fields: dict[str, Any]
    lorebook: dict[str, Any] | None
    slug: str | None = None  # the slug mlchat's own export wrote (extensions.mlchat.slug), unchecked


def read_card(raw: bytes, *, max_bytes: int = 8_000_000, max_text_bytes: int = 2_000_000) -> ImportedCard:
    """Parse a card file (JSON or PNG bytes); CardError if it is not a valid V2/V3 card, or is over
    `max_bytes` (the file) or `max_text_bytes` (the card text inside a PNG, once inflated)."""
    if len(raw) > max_bytes:
        raise CardError(f"the file has {len(raw)} bytes; a card may have at most {max_bytes}")
    if raw.startswith(PNG_SIGNATURE):
        card = _card_from_png(raw, max_text_bytes)
    else:
        card = _card_from_json(raw, "the file")
    return _validate(card)


def card_json(card: dict[str, Any]) -> bytes:
    """The card as JSON bytes (UTF-8, key order as imported)."""
    return json.dumps(card, ensure_ascii=False, separators=(",", ":")).encode()


def card_png(card: dict[str, Any], image: bytes | None = None) -> bytes:
    """The card inside a PNG: `image` (the imported one) or a 1x1 placeholder, its other chunks kept."""
    payload = base64.b64encode(card_json(card)).decode("ascii")
    try:
        return png_text.write_text(
            image or png_text.placeholder(), PNG_KEYWORD[card["spec"]], payload, CARD_KEYWORDS
        )
    except png_text.PngError as exc:
        raise CardError(f"the image: {exc}") from None


def _card_from_png(raw: bytes, max_text_bytes: int) -> dict[str, Any]:
    try:
        chunks = png_text.read_text(raw, CARD_KEYWORDS, max_text_bytes)
    except png_text.PngError as exc:
        raise CardError(f"not a readable PNG card: {exc}") from None
    keyword = "ccv3" if "ccv3" in chunks else "chara" if "chara" in chunks else None
    if keyword is None:
        raise CardError("the PNG has no character card (no 'chara' or 'ccv3' text chunk)")
    # Read as SillyTavern's Node reads it: line breaks, spaces and a missing padding are no error
    # (cards wrapped at 76 columns, or written without `=`, import there); other stray bytes are.
    text = re.sub(r"\s+", "", chunks[keyword])
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CardError(f"the PNG's {keyword!r} chunk is not base64: {exc}") from exc
    return _card_from_json(decoded, f"the PNG's {keyword!r} chunk")


def _card_from_json(raw: bytes, where: str) -> dict[str, Any]:
    try:
        card = loads_finite(raw.decode("utf-8").removeprefix("\ufeff"))  # a BOM from a Windows editor
    except UnicodeDecodeError as exc:
        raise CardError(f"{where} is not UTF-8: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CardError(f"{where} is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except RecursionError:
        raise CardError(f"{where} is nested too deeply to be a card") from None
    except UnstorableNumber as exc:
        raise CardError(f"{where} holds {exc}; a card cannot keep it") from None
    except ValueError as exc:  # an integer past Python's digit limit for str -> int
        raise CardError(f"{where} holds a number too long to read: {exc}") from None
    if not isinstance(card, dict):
        raise CardError(f"{where} holds a JSON {type(card).__name__}, not a card object")
    return card


def _validate(card: dict[str, Any]) -> ImportedCard:
    spec = card.get("spec")
    if not isinstance(spec, str) or spec not in SPECS:
        raise CardError(
            f"unsupported card spec {spec!r}: expected 'chara_card_v2' or 'chara_card_v3' "
            "(V1 cards have no spec field; re-save them as V2)"
        )
    data = card.get("data")
    if not isinstance(data, dict):
        raise CardError("card.data must be an object")
    for name in _STRING_FIELDS:  # null is not given, as SillyTavern reads it (name excepted, below)
        if data.get(name) is not None and not isinstance(data[name], str):
            raise CardError(f"card.data.{name} must be a string, not {type(data[name]).__name__}")
    if not (data.get("name") or "").strip():
        raise CardError("card.data.name is empty")
    if len(data["name"].strip()) > NAME_MAX_CHARS:
        raise CardError(
            f"card.data.name has {len(data['name'].strip())} characters; the limit is {NAME_MAX_CHARS}"
        )
    # Before any walk: a card nested near the recursion limit parses, then fails where the driver
    # writes it (a 500); millions of small values cost each walk hundreds of megabytes.
    if nesting(card, stop_past=CARD_MAX_DEPTH) > CARD_MAX_DEPTH:
        raise CardError(f"card: nested deeper than {CARD_MAX_DEPTH} levels")
    if value_count(card, stop_past=CARD_MAX_VALUES) > CARD_MAX_VALUES:
        raise CardError(f"card: holds more than {CARD_MAX_VALUES:,} values")
    _check_storable(card, "card")
    for name in ("alternate_greetings", "tags"):  # kept on the card, never read: as SillyTavern takes
        value = data.get(name)  # them, null, one string or a list of strings (review)
        if (
            value is not None
            and not isinstance(value, str)
            and (not isinstance(value, list) or not all(isinstance(v, str) for v in value))
        ):
            raise CardError(f"card.data.{name} must be a list of strings")
    if "extensions" in data and not isinstance(data["extensions"], dict):
        raise CardError("card.data.extensions must be an object")
    actions = card_actions(card)
    if actions is not None:
        try:
            check_actions(actions, CARD_ACTIONS)
        except ValueError as exc:
            raise CardError(str(exc)) from None
    book = data.get("character_book")
    lorebook = lorebook_from_card_book(book) if book is not None else None
    return ImportedCard(card, spec, _character_fields(data), lorebook, mlchat_extension(data).get("slug"))


NAME_MAX_CHARS = 200  # the characters table's name column
CARD_MAX_DEPTH = 64  # a card's objects and arrays, nested (its actions' schemas are held to 32)
# A lorebook at its own limits (2,000 entries of 100 keys and 100 secondary keys, with the ~45 other
# fields an editor writes per entry) is about 490,000 values: twice that, so the book's own limits
# are what refuse it, naming the entry.
CARD_MAX_VALUES = 1_000_000


def _check_storable(card: Any, where: str) -> None:
    """Every string of the card (keys too) as PostgreSQL and UTF-8 can keep it: no NUL, no lone
    surrogate (JSON escapes can make both); CardError naming the first that is not."""
    found = unstorable_in(card, where)
    if found is not None:
        raise CardError(f"{printable(found[0])} {found[1]}")


def mlchat_extension(data: dict[str, Any]) -> dict[str, Any]:
    """What mlchat's own export wrote under extensions.mlchat ({} when nothing)."""
    extensions = data.get("extensions")
    ours = extensions.get("mlchat") if isinstance(extensions, dict) else None
    return ours if isinstance(ours, dict) else {}


def _character_fields(data: dict[str, Any]) -> dict[str, Any]:
    """mlchat's character columns from a card's data (the card itself is kept as is); the speech
    style and language mlchat's own export writes under extensions.mlchat come back with it."""
    ours = mlchat_extension(data)
    own: dict[str, Any] = {}
    if isinstance(ours.get("speech_style"), str):
        own["speech_style"] = ours["speech_style"]
    language = ours.get("language")
    if isinstance(language, str) and 0 < len(language.strip()) <= LANGUAGE_MAX:
        own["language"] = language.strip()
    return own | {
        "name": data["name"].strip(),
        "description": data.get("description") or "",
        "personality": data.get("personality") or "",
        "scenario": data.get("scenario") or "",
        "first_message": data.get("first_mes") or "",
        "example_dialogues": parse_mes_example(data.get("mes_example") or "", data["name"]),
        "system_prompt": data.get("system_prompt") or "",
        "post_history_instructions": data.get("post_history_instructions") or "",
    }


LANGUAGE_MAX = 16  # characters.language


# A speaker's line: `{{user}}:`/`{{char}}:`, or TavernAI's legacy `<USER>:`/`<BOT>:`/`<CHAR>:`.
_EXAMPLE_LINE = re.compile(r"^\s*(?:\{\{(user|char)\}\}|<(user|bot|char)>)\s*:\s*(.*)$", re.IGNORECASE)


def parse_mes_example(text: str, character_name: str = "") -> list[dict[str, str]]:
    """`<START>`-separated example chats ({{user}}: … / {{char}}: … lines, the legacy `<USER>:` /
    `<BOT>:`, or the character's own name before the colon) as user/character pairs."""
    pairs: list[dict[str, str]] = []
    for block in re.split(r"<START>", text, flags=re.IGNORECASE):
        user: str | None = None
        for speaker, said in _utterances(block, character_name.strip()):
            if speaker == "user":
                user = said
            elif user is not None:
                pairs.append({"user": user, "character": said})
                user = None
            else:
                pairs.append({"user": "", "character": said})
    return pairs


def _utterances(block: str, character_name: str) -> list[tuple[str, str]]:
    """(speaker, text) of an example chat; a line with no speaker goes on the utterance before it
    (cards write a reply's action and its speech on lines of their own)."""
    said: list[tuple[str, list[str]]] = []
    by_name = f"{character_name}:" if character_name else None
    for line in block.splitlines():
        m = _EXAMPLE_LINE.match(line)
        if m:
            speaker = (m.group(1) or m.group(2)).lower()
            said.append(("user" if speaker == "user" else "char", [m.group(3)]))
        elif by_name is not None and line.lstrip().startswith(by_name):
            said.append(("char", [line.lstrip()[len(by_name) :].lstrip()]))
        elif said:
            said[-1][1].append(line)
    return [(speaker, "\n".join(lines).strip()) for speaker, lines in said]


def lorebook_from_card_book(book: Any) -> dict[str, Any]:
    """A card's `character_book` checked and normalised to mlchat's lorebook form."""
    from roleplay.lorebook import Lorebook

    if not isinstance(book, dict):
        raise CardError("card.data.character_book must be an object")
    try:
        return Lorebook.from_character_book(book).model_dump()
    except ValueError as exc:
        raise CardError(f"card.data.character_book: {exc}") from exc
