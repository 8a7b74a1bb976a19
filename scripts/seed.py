"""Load the sample world (characters, stories, conversations with history) idempotently."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from core.settings import PROJECT_ROOT
from core.validation import first_error
from db.session import session_scope
from db.world import (
    ConversationTaken,
    StoryBusy,
    add_conversation,
    append_history_if_empty,
    upsert_character,
    upsert_story_events,
)
from roleplay.lorebook import Lorebook
from services.characters import INLINE_PREFIX, SLUG_PATTERN
from services.schemas import Text
from worker.embedder import embed

DATA_DIR = PROJECT_ROOT / "data"


class SeedError(ValueError):
    """A data folder's file that cannot be seeded: the file, the item and the field; nothing stored."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _not_inline(name: str | None) -> str | None:
    """A character's or story's name; refused when it starts as the inline request shape's do."""
    if name is not None and name.startswith(INLINE_PREFIX):
        raise ValueError(f"names starting with {INLINE_PREFIX!r} are kept for inline requests")
    return name


class _Character(_Open):
    # The columns' own types and limits (NOT NULL ones may be left out, not given as null), and the
    # checks every other way in makes: a slug as cards get one, text that can be stored.
    slug: str = Field(min_length=1, max_length=64, pattern=SLUG_PATTERN)
    name: Text = Field(min_length=1, max_length=200)
    description: Text = ""
    personality: Text = ""
    scenario: Text = ""
    first_message: Text = ""
    speech_style: Text = ""
    system_prompt: Text = ""
    post_history_instructions: Text = ""
    language: Text = Field(default="", max_length=16)
    example_dialogues: list[dict[str, Text]] = []

    _slug_not_inline = field_validator("slug")(_not_inline)


INT4 = {"ge": -(2**31), "le": 2**31 - 1}


class _Event(_Open):
    story: Text = Field(min_length=1, max_length=100)
    ordinal: int = Field(ge=1, le=2**31 - 1)
    text: Text = Field(min_length=1)
    scene: Text = Field(default="", max_length=200)
    time: int = Field(default=0, **INT4)

    _story_not_inline = field_validator("story")(_not_inline)


class _Conversation(_Open):
    external_id: Text = Field(min_length=1, max_length=200)
    character: str
    history: list[tuple[Literal["user", "assistant"], Text]] = []
    player_id: Text = Field(default="", max_length=200)
    player_name: Text = Field(default="", max_length=200)
    story: Text | None = Field(default=None, max_length=100)
    story_time: int | None = Field(default=None, **INT4)

    _story_not_inline = field_validator("story")(_not_inline)


def _read(path: Path, item: type[_Open]) -> list[dict[str, Any]]:
    """The file's JSON list, each item checked as `item`; SeedError naming the file, item and field."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except OSError as exc:
        raise SeedError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SeedError(f"{path}: not JSON that can be read ({exc})") from None
    try:
        checked = TypeAdapter(list[item]).validate_python(raw)  # type: ignore[valid-type]
    except ValidationError as exc:
        raise SeedError(f"{path}: {first_error(exc, 'item')}") from None
    return [one.model_dump(exclude_unset=True) for one in checked]  # nothing added that was not given


@dataclass(frozen=True)
class SeedCounts:
    characters: int
    story_events: int
    conversations: int
    history_lines_added: int


def seed_world(data_dir: Path = DATA_DIR) -> SeedCounts:
    """Upsert everything under data_dir; running it twice changes nothing."""
    characters = _read(data_dir / "characters.json", _Character)
    for i, c in enumerate(characters):  # a lorebook in data/ is checked and normalised like one from a card
        if c.get("lorebook") is not None:
            try:
                c["lorebook"] = Lorebook.model_validate(c["lorebook"]).model_dump()
            except ValidationError as exc:
                raise SeedError(
                    f"{data_dir / 'characters.json'}: {first_error(exc, f'item[{i}].lorebook')}"
                ) from None
    events = _read(data_dir / "story_events.json", _Event)
    conversations = _read(data_dir / "conversations.json", _Conversation)
    slugs = {c["slug"] for c in characters}
    for i, conv in enumerate(conversations):
        if conv["character"] not in slugs:
            raise SeedError(
                f"{data_dir / 'conversations.json'}: item[{i}].character: {conv['character']!r} is not in "
                "characters.json"
            )
    event_vectors = embed([e["text"] for e in events])
    history = [[(role, text) for role, text in c.get("history", [])] for c in conversations]
    history_vectors = embed([text for lines in history for _, text in lines])
    added = 0
    conversations_file = data_dir / "conversations.json"
    with session_scope() as session:
        char_ids = {
            # A card and lorebook not in data/ are none: an imported card's stayed over the seeded fields
            # (its export, declared actions and lore beside data/'s description).
            c["slug"]: upsert_character(
                session=session, slug=c["slug"], fields={"card": None, "lorebook": None} | c
            )
            for c in characters
        }
        upsert_story_events(session=session, events=events, embeddings=event_vectors)
        offset = 0
        for i, (conv, lines) in enumerate(zip(conversations, history, strict=True)):
            try:
                conv_id = add_conversation(
                    session=session,
                    external_id=conv["external_id"],
                    character_id=char_ids[conv["character"]],
                    player_id=conv.get("player_id", ""),
                    player_name=conv.get("player_name", ""),
                    story=conv.get("story"),
                    story_time=conv.get("story_time"),
                )
            except ConversationTaken as exc:  # the transaction rolls back: nothing stored
                raise SeedError(f"{conversations_file}: item[{i}].{exc}; nothing stored") from None
            except StoryBusy as exc:  # held for the moment: a seed to run again, not refused input
                raise StoryBusy(f"{conversations_file}: item[{i}]: {exc}; nothing stored") from None
            added += append_history_if_empty(
                session=session,
                conversation_id=conv_id,
                lines=lines,
                embeddings=history_vectors[offset : offset + len(lines)],
            )
            offset += len(lines)
    return SeedCounts(len(characters), len(events), len(conversations), added)
