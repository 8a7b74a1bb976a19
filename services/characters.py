"""Characters from SillyTavern cards: import (JSON or PNG), export, and story events appended by the game."""

from __future__ import annotations

import copy
import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy.orm import Session

from core.settings import DEFAULT_TENANT, settings
from db.models import Character
from db.session import session_scope
from db.vector_space import refuse_if_moved
from db.world import (
    INLINE_PREFIX,
    append_story_event,
    character_defaults,
    character_listing,
    get_character,
    save_character,
    story_event_place,
)
from db.write_keys import record_ids, stored_ids, take_key
from roleplay.cards import CardError, card_json, card_png, mlchat_extension, read_card
from roleplay.lorebook import stored_lorebook, to_character_book
from services.schemas import StoryEvent

SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_SLUG = re.compile(SLUG_PATTERN)


@dataclass(frozen=True)
class ImportedCharacter:
    slug: str
    id: int
    created: bool


# The conversation an inline request without one is answered in: its history key (a 32-hex digest)
# and a random suffix (services/original_request.py).
INLINE_COPY = f"^{INLINE_PREFIX}[0-9a-f]{{32}}-[0-9a-f]{{12}}$"
# The conversation a chat completion that names none is answered in, seeded with its transcript
# (services/live_chat.py: `chat-` and a UUID, random or the idempotency key's): never continued.
CHAT_COPY = "^chat-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"


def slug_for(name: str) -> str:
    """A slug from a character's name: "Seraphina the Bold" → "seraphina-the-bold", "Élodie" →
    "elodie"; a name with no Latin letters or digits ("루피") gets "c-" and a digest of the name."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.casefold()).strip("-")[:64].strip("-")
    return slug or "c-" + _digest(name, 10)


def character_exists(slug: str) -> bool:
    """Whether this database holds a character of that slug (one that names no valid slug: none)."""
    from db.world import find_characters

    if not _SLUG.fullmatch(slug):
        return False
    with session_scope() as session:
        return slug in find_characters(session=session, slugs=[slug])


def as_models(slug: str | None = None, tenant: str = DEFAULT_TENANT) -> list[dict[str, Any]]:
    """The characters as OpenAI's model objects (a chat completion's `model` names a character):
    every one `tenant` may name, or the one `slug` names (none: not a character)."""
    with session_scope() as session:
        rows = character_listing(session=session, slug=slug, tenant=tenant)
    return [
        {"id": name, "object": "model", "created": int(created.timestamp()), "owned_by": "mlchat"}
        for name, created in rows
    ]


def _digest(name: str, length: int) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:length]


def import_card(raw: bytes, slug: str | None = None) -> ImportedCharacter:
    """Store a V2/V3 card (JSON or PNG bytes) as a character.

    With a slug, that character is created or updated: the caller says which character this is.
    Without one, the slug is the one mlchat's export wrote in the card (extensions.mlchat.slug), else
    comes from the card's name, and only a re-import of the same character (same name) updates it;
    another character whose name gives the same slug gets the slug with a digest of its name
    appended, so no import ever replaces a different character.
    """
    imported = read_card(raw, max_bytes=settings.card_max_bytes, max_text_bytes=settings.card_max_text_bytes)
    if slug is not None and not _SLUG.fullmatch(slug):
        raise CardError(f"slug {slug!r} must be 1-64 lowercase letters, digits, '-' or '_'")
    # A card replaces the character whole: the fields it lacks get what a new character gets (a card
    # without mlchat's speech style kept the old one in every prompt, which its export did not show).
    fields: dict[str, Any] = {
        **character_defaults("speech_style", "language"),
        **imported.fields,
        "card": imported.card,
        "lorebook": imported.lorebook,
    }
    name = imported.fields["name"]
    reserved = slug if slug is not None else slug_for(name)
    if reserved.startswith(INLINE_PREFIX):  # the inline request shape's characters, matched by content
        field = "slug" if slug is not None else "name"
        raise CardError(
            f"{field}: slug {reserved!r} starts with {INLINE_PREFIX!r}, kept for inline personas; pass a slug"
        )
    with session_scope() as session:
        if slug is not None:
            stored = save_character(session=session, slug=slug, fields=fields)
            assert stored is not None
            return ImportedCharacter(slug, *stored)
        base = slug_for(name)
        # A card mlchat exported names its character's slug: tried first, so a character whose name
        # gives another slug ("루피" is c-facc28b327, seeded as "luffy") comes back to itself, edited
        # in another tool, rather than as a second character (review, stop 75). As any slug here it
        # takes a character of the same name only.
        own = imported.slug if isinstance(imported.slug, str) and _SLUG.fullmatch(imported.slug) else None
        own = own if own is not None and not own.startswith(INLINE_PREFIX) else None
        for candidate in dict.fromkeys(c for c in (own, base, f"{base[:57]}-{_digest(name, 6)}") if c):
            stored = save_character(session=session, slug=candidate, fields=fields, same_name_only=True)
            if stored is not None:
                return ImportedCharacter(candidate, *stored)
    raise CardError(f"no free slug for {name!r}: both {base!r} and its suffixed form are taken; pass a slug")


class CharacterNotFound(KeyError):
    """No character of that slug: the caller's input, refused (the CLI's exit 2, the API's 404)."""


def export_card(slug: str, fmt: Literal["json", "png"] = "json", image: bytes | None = None) -> bytes:
    """The character as a card: the imported card as it was, or a V2 card built from data/ fields."""
    with session_scope() as session:
        character = get_character(session=session, slug=slug)
        if character is None:
            raise CharacterNotFound(f"unknown character {slug!r}")
        card = _named(character.card, slug) if character.card else _card_from_columns(character)
    if fmt == "json":
        return card_json(card)
    png = card_png(card, image)
    try:  # what is exported imports: its text as a base64 chunk is a third longer than its JSON
        read_card(png, max_bytes=settings.card_max_bytes, max_text_bytes=settings.card_max_text_bytes)
    except CardError as exc:
        raise CardError(f"a PNG of this card would not import here ({exc}); export it as JSON") from None
    return png


def _named(card: dict[str, Any], slug: str) -> dict[str, Any]:
    """An imported card as it was; one that names a slug (extensions.mlchat.slug, written by mlchat's
    export, which an import without a slug tries first) names the one it is stored under now: a
    copy imported under another slug carried its source's, and its edit would have replaced the
    source (review, stop 75). A card that names none is given back byte for byte."""
    data = card.get("data")
    if (
        "slug" not in (ours := mlchat_extension(data) if isinstance(data, dict) else {})
        or ours["slug"] == slug
    ):
        return card
    card = copy.deepcopy(card)
    card["data"]["extensions"]["mlchat"]["slug"] = slug
    return card


def _card_from_columns(c: Character) -> dict[str, Any]:
    examples = "".join(
        f"<START>\n{{{{user}}}}: {e.get('user', '')}\n{{{{char}}}}: {e.get('character', '')}\n"
        for e in c.example_dialogues
    )
    data: dict[str, Any] = {
        "name": c.name,
        "description": c.description,
        "personality": c.personality,
        "scenario": c.scenario,
        "first_mes": c.first_message,
        "mes_example": examples,
        "creator_notes": "",
        "system_prompt": c.system_prompt,
        "post_history_instructions": c.post_history_instructions,
        "alternate_greetings": [],
        "tags": [],
        "creator": "",
        "character_version": "",
        "extensions": {"mlchat": {"slug": c.slug, "language": c.language, "speech_style": c.speech_style}},
    }
    if c.lorebook:
        data["character_book"] = to_character_book(stored_lorebook(c.lorebook))
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


class ReservedStory(ValueError):
    """A story name kept for the inline request shape's stories: events appended to one would be
    taken for an inline story's own, and that story's events never stored."""


def add_story_event(
    story: str,
    text: str,
    *,
    scene: str = "",
    time: int | None = None,
    tenant: str = "",
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Append an event to a story, embedded on write, so the next turns can retrieve it: the event
    (id, story, ordinal), and whether an earlier request under `idempotency_key` (the tenant's)
    stored it (a retry stores nothing). KeyReused when that request was another event."""
    from worker.embedder import embed  # the embedder loads on first use, in the calling process

    if story.startswith(INLINE_PREFIX):  # an inline request's story, named by its events' digest
        raise ReservedStory(f"story: {story!r} starts with {INLINE_PREFIX!r}, kept for inline requests")
    event = StoryEvent(story=story, text=text, scene=scene, time=time)  # ValidationError names the field
    digest = hashlib.sha256(event.model_dump_json().encode()).hexdigest()
    if idempotency_key is not None:
        with session_scope() as session:
            known = stored_ids(
                session=session, tenant=tenant, kind=EVENT_KEY, key=idempotency_key, request_hash=digest
            )
            if known is not None:
                return _event_of(session, known[0]), True
    (vector,) = embed([event.text])
    with session_scope() as session:
        if idempotency_key is not None:  # taken first: a second write under the key waits for this one
            earlier = take_key(
                session=session, tenant=tenant, kind=EVENT_KEY, key=idempotency_key, request_hash=digest
            )
            if earlier is not None:
                return _event_of(session, earlier[0]), True
        event_id, ordinal = append_story_event(
            session=session,
            story=event.story,
            text=event.text,
            scene=event.scene,
            time=event.time,
            embedding=vector,
        )
        refuse_if_moved(session=session, what="the story event")
        if idempotency_key is not None:
            record_ids(session=session, tenant=tenant, kind=EVENT_KEY, key=idempotency_key, ids=[event_id])
    return {"id": event_id, "story": event.story, "ordinal": ordinal}, False


EVENT_KEY = "story_event"


def _event_of(session: Session, event_id: int) -> dict[str, Any]:
    story, ordinal = story_event_place(session=session, event_id=event_id)
    return {"id": event_id, "story": story, "ordinal": ordinal}
