"""Seeding the sample world: real embeddings, and a second run changes nothing."""

import numpy as np
from sqlalchemy import func, select

from db.models import Character, Conversation, Message, StoryEvent
from db.session import session_scope
from scripts.seed import seed_world


def _counts() -> tuple[int, ...]:
    with session_scope() as s:
        return tuple(
            s.scalar(select(func.count()).select_from(m))
            for m in (Character, Conversation, Message, StoryEvent)
        )


def test_seeding_twice_changes_nothing(world) -> None:
    before = _counts()
    again = seed_world()
    assert again.history_lines_added == 0
    assert _counts() == before
    characters, conversations, messages, events = before
    assert characters >= 3 and events >= 30 and messages > 0


def test_sample_world_has_korean_and_english_characters_and_real_vectors(world) -> None:
    with session_scope() as s:
        langs = dict(s.execute(select(Character.slug, Character.language)).tuples().all())
        # the seeded events are the first stored (other tests add events of their own, some without vectors)
        vectors = s.scalars(select(StoryEvent.embedding).order_by(StoryEvent.id).limit(5)).all()
    assert langs["luffy"] == "ko" and "en" in langs.values()
    for vec in vectors:
        arr = np.asarray(vec)
        assert arr.shape == (384,)
        assert abs(np.linalg.norm(arr) - 1.0) < 1e-3


def test_a_bad_lorebook_in_the_data_is_refused_naming_its_place(tmp_path) -> None:
    # found in review: the message alone ("Input should be a valid list"), not where in the lorebook
    import json

    import pytest

    from scripts.seed import SeedError

    entry = {"id": 0, "keys": "a", "content": "x"}
    character = {"slug": "bram", "name": "Bram", "persona": "A smith.", "lorebook": {"entries": [entry]}}
    (tmp_path / "characters.json").write_text(json.dumps([character]))
    with pytest.raises(
        SeedError, match=r"item\[0\]\.lorebook\.entries\[0\]\.keys: Input should be a valid list"
    ):
        seed_world(tmp_path)


def test_seed_never_hands_a_conversation_to_another_character_and_checks_text_as_every_way_in(
    world, tmp_path
) -> None:
    """Found in review: seeding overwrote a stored conversation's character, player and story in one
    unconditional UPDATE (its queued turn was then answered by another character), and its text
    fields took a NUL, which failed at the INSERT after every line was embedded, naming no field."""
    import json

    import pytest

    from scripts.seed import SeedError

    character = {"slug": "seed-bram", "name": "Bram", "description": "A smith."}
    (tmp_path / "characters.json").write_text(json.dumps([character, {"slug": "seed-ida", "name": "Ida"}]))
    (tmp_path / "story_events.json").write_text("[]")
    conversation = {"external_id": "demo-luffy-1", "character": "seed-bram", "player_id": "player-1"}
    (tmp_path / "conversations.json").write_text(json.dumps([conversation]))
    before = _counts()
    with pytest.raises(
        SeedError, match=r"item\[0\]\.character: conversation 'demo-luffy-1' is another character's"
    ):
        seed_world(tmp_path)
    assert _counts() == before  # the two characters neither
    with session_scope() as s:
        luffy = s.scalar(
            select(Character.slug)
            .join(Conversation, Conversation.character_id == Character.id)
            .where(Conversation.external_id == "demo-luffy-1")
        )
    assert luffy == "luffy"
    (tmp_path / "characters.json").write_text(json.dumps([character | {"description": "A\u0000smith."}]))
    with pytest.raises(SeedError, match=r"characters.json: item\[0\]\.description: "):
        seed_world(tmp_path)
    (tmp_path / "characters.json").write_text(json.dumps([{"slug": "inline-bram", "name": "Bram"}]))
    with pytest.raises(SeedError, match=r"item\[0\]\.slug: names starting with 'inline-' are kept"):
        seed_world(tmp_path)
    (tmp_path / "characters.json").write_text(json.dumps([character]))
    (tmp_path / "story_events.json").write_text(
        json.dumps([{"story": "inline-x", "ordinal": 1, "text": "Rain."}])
    )
    with pytest.raises(
        SeedError, match=r"story_events.json: item\[0\]\.story: names starting with 'inline-'"
    ):
        seed_world(tmp_path)


def test_seeding_again_after_a_card_import_leaves_no_imported_card_or_lorebook(world, tmp_path) -> None:
    """Found in review: seed writes only the fields data/ gives, so a card imported over a seeded
    character kept its card (its export, its declared actions) and its lorebook beside the seeded
    description after seeding again."""
    import json
    import uuid

    from db.world import get_character
    from services.characters import import_card

    slug = f"seeded-{uuid.uuid4().hex[:6]}"
    for name in ("characters.json", "story_events.json", "conversations.json"):
        (tmp_path / name).write_text("[]")
    (tmp_path / "characters.json").write_text(json.dumps([{"slug": slug, "name": "Bram"}]))
    seed_world(tmp_path)
    book = {"entries": [{"keys": ["forge"], "content": "The forge is cold.", "id": 0}]}
    card = {"spec": "chara_card_v2", "data": {"name": "Bram", "character_book": book}}
    import_card(json.dumps(card).encode(), slug)
    with session_scope() as s:
        imported = get_character(session=s, slug=slug)
        assert imported.card is not None and imported.lorebook is not None
    seed_world(tmp_path)
    with session_scope() as s:
        seeded = get_character(session=s, slug=slug)
        assert seeded.card is None and seeded.lorebook is None


def test_a_seed_that_would_move_a_busy_conversations_story_exits_1_to_run_again(world, tmp_path) -> None:
    """Found in review of error texts: a conversation with a turn unanswered cannot move to the
    seed's story yet (StoryBusy), and `mlchat seed` said so as refused input, exit 2: a script that
    runs again on 1 gave up on a seed that passes a moment later."""
    import json
    import uuid

    from scripts.cli import main as cli
    from services.producer import enqueue_turns

    slug, conversation = f"seed-busy-{uuid.uuid4().hex[:6]}", f"seed-busy-{uuid.uuid4().hex[:8]}"
    (tmp_path / "characters.json").write_text(json.dumps([{"slug": slug, "name": "Bram"}]))
    (tmp_path / "story_events.json").write_text("[]")
    seeded = {"external_id": conversation, "character": slug, "player_id": "seed-busy-player"}

    def seed_with_story(story: str) -> int:
        (tmp_path / "conversations.json").write_text(json.dumps([seeded | {"story": story}]))
        return cli(["seed", "--data", str(tmp_path)])

    assert seed_with_story("first") == 0
    enqueue_turns(
        [
            {
                "conversation": conversation,
                "character": slug,
                "player_id": "seed-busy-player",
                "message": "Hi.",
            }
        ],
        send=False,
    )
    assert seed_with_story("second") == 1
    with session_scope() as s:
        assert s.scalar(select(Conversation.story).where(Conversation.external_id == conversation)) == "first"
