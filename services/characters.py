"""Characters from SillyTavern cards: import (JSON or PNG), export, and story events appended by the game."""

from __future__ import annotations

import re
from typing import Any, Literal

from db.models import Character
from db.session import session_scope
from db.world import append_story_event, get_character, upsert_character
from roleplay.cards import CardError, card_json, card_png, read_card
from roleplay.lorebook import Lorebook, to_character_book

_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def slug_for(name: str) -> str:
    """A slug from a character's name ("Seraphina the Bold" → "seraphina-the-bold")."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.casefold()).strip("-")[:64]
    return slug or "character"


def import_card(raw: bytes, slug: str | None = None) -> tuple[str, int]:
    """Store a V2/V3 card (JSON or PNG bytes) as a character; returns (slug, id). Re-importing updates."""
    imported = read_card(raw)
    slug = slug or slug_for(imported.fields["name"])
    if not _SLUG.fullmatch(slug):
        raise CardError(f"slug {slug!r} must be 1-64 lowercase letters, digits, '-' or '_'")
    fields: dict[str, Any] = {**imported.fields, "card": imported.card, "lorebook": imported.lorebook}
    with session_scope() as session:
        return slug, upsert_character(session=session, slug=slug, fields=fields)


def export_card(slug: str, fmt: Literal["json", "png"] = "json", image: bytes | None = None) -> bytes:
    """The character as a card: the imported card as it was, or a V2 card built from data/ fields."""
    with session_scope() as session:
        character = get_character(session=session, slug=slug)
        if character is None:
            raise LookupError(f"unknown character {slug!r}")
        card = character.card or _card_from_columns(character)
    return card_png(card, image) if fmt == "png" else card_json(card)


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
        data["character_book"] = to_character_book(Lorebook.model_validate(c.lorebook))
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def add_story_event(story: str, text: str, *, scene: str = "", time: int | None = None) -> dict[str, Any]:
    """Append an event to a story, embedded on write, so the next turns can retrieve it."""
    from worker.embedder import embed  # the embedder loads on first use, in the calling process

    if not story.strip() or not text.strip():
        raise ValueError("a story event needs a story and a text")
    (vector,) = embed([text])
    with session_scope() as session:
        event_id, ordinal = append_story_event(
            session=session, story=story, text=text, scene=scene, time=time, embedding=vector
        )
    return {"id": event_id, "story": story, "ordinal": ordinal}
