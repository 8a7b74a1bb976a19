"""Load the sample world (characters, stories, conversations with history) idempotently."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.settings import PROJECT_ROOT
from db.session import session_scope
from db.world import append_history_if_empty, upsert_character, upsert_conversation, upsert_story_events
from roleplay.lorebook import Lorebook
from worker.embedder import embed

DATA_DIR = PROJECT_ROOT / "data"


@dataclass(frozen=True)
class SeedCounts:
    characters: int
    story_events: int
    conversations: int
    history_lines_added: int


def seed_world(data_dir: Path = DATA_DIR) -> SeedCounts:
    """Upsert everything under data_dir; running it twice changes nothing."""
    characters = json.loads((data_dir / "characters.json").read_text(encoding="utf-8"))
    for c in characters:  # a lorebook in data/ is checked and normalised like one from a card
        if c.get("lorebook") is not None:
            c["lorebook"] = Lorebook.model_validate(c["lorebook"]).model_dump()
    events = json.loads((data_dir / "story_events.json").read_text(encoding="utf-8"))
    conversations = json.loads((data_dir / "conversations.json").read_text(encoding="utf-8"))
    event_vectors = embed([e["text"] for e in events])
    history = [[(role, text) for role, text in c["history"]] for c in conversations]
    history_vectors = embed([text for lines in history for _, text in lines])
    added = 0
    with session_scope() as session:
        char_ids = {
            c["slug"]: upsert_character(session=session, slug=c["slug"], fields=c) for c in characters
        }
        upsert_story_events(session=session, events=events, embeddings=event_vectors)
        offset = 0
        for conv, lines in zip(conversations, history, strict=True):
            conv_id = upsert_conversation(
                session=session,
                external_id=conv["external_id"],
                character_id=char_ids[conv["character"]],
                player_id=conv.get("player_id", ""),
                player_name=conv.get("player_name", ""),
                story=conv.get("story"),
                story_time=conv.get("story_time"),
            )
            added += append_history_if_empty(
                session=session,
                conversation_id=conv_id,
                lines=lines,
                embeddings=history_vectors[offset : offset + len(lines)],
            )
            offset += len(lines)
    return SeedCounts(len(characters), len(events), len(conversations), added)
