"""The original service's inline request shape (persona, chat history and story with the message):
the persona stored as a character matched by content, the story as events matched by content, the
history imported once; a replay stores nothing new, and a bad file is refused naming the field."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text, update

from core.settings import settings
from db.history import append_lines
from db.models import Character, Conversation, Message, Role, StoryEvent, Turn, TurnStatus
from db.session import session_scope
from db.world import StoryBusy, add_conversation, save_character_if_changed
from roleplay.cards import CardError
from scripts.cli import _store_original
from scripts.cli import main as cli
from services.characters import import_card
from services.original_request import (
    InlineRefused,
    read_request,
    store_and_enqueue,
    store_request,
    turn_request,
)
from services.producer import enqueue_turns
from worker.embedder import embed
from worker.serverless import handler

pytestmark = pytest.mark.usefixtures("world")


def _persona(name: str, personality: str = "낙천적이고 고기를 좋아한다.") -> dict[str, Any]:
    return {
        "name": name,
        "personality": personality,
        "scenario": "그랜드 라인을 항해하는 중.",
        "example_dialogues": [{"user": "배고파?", "character": "고기!!"}],
    }


HISTORY = {
    "chat_history": [
        {"role": "user", "content": "안녕, 루피!"},
        {"role": "assistant", "content": "오~ 신입이다! 시시시!"},
        {"role": "user", "content": "내 여동생 이름은 미라야."},
    ]
}
STORY = [
    {"scene": "이스트 블루", "time": 10, "text": "루피가 풍차 마을을 떠났다."},
    {"scene": "이스트 블루", "time": 20, "text": "조로가 첫 동료가 되었다."},
]


def _event(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "persona": _persona(name),
        "chat_history": HISTORY,
        "story": STORY,
        "message": "고기 먹을래?",
    } | extra


def _counts(slug: str, story: str | None, conversation: str) -> dict[str, Any]:
    with session_scope() as s:
        version = s.scalar(select(Character.version).where(Character.slug == slug))
        characters = s.scalar(select(func.count()).select_from(Character).where(Character.slug == slug))
        events = s.scalar(select(func.count()).select_from(StoryEvent).where(StoryEvent.story == story))
        conv = s.scalar(select(Conversation.id).where(Conversation.external_id == conversation))
        lines = s.execute(
            select(Message.role, Message.content).where(Message.conversation_id == conv).order_by(Message.seq)
        ).all()
        turns = s.scalar(select(func.count()).select_from(Turn).where(Turn.conversation_id == conv))
    return {
        "characters": characters,
        "version": version,
        "events": events,
        "lines": [(str(r), c) for r, c in lines],
        "turns": turns,
    }


def test_replaying_the_same_request_stores_persona_story_and_history_once_and_two_turns() -> None:
    name = f"루피-{uuid.uuid4().hex[:6]}"
    stored = []
    for _ in range(2):
        request = read_request(_event(name))
        stored.append(store_request(request))
        enqueue_turns([turn_request(request, stored[-1])], send=False)
    first, second = stored
    assert (first.character_written, second.character_written) == (True, False)
    assert (first.story_events_stored, second.story_events_stored) == (2, 0)
    assert (first.lines_imported, second.lines_imported) == (3, 0)
    assert first.story == second.story
    # Stateless like the original: each request answers in a conversation of its own.
    assert first.conversation != second.conversation
    history = [
        ("user", "안녕, 루피!"),
        ("assistant", "오~ 신입이다! 시시시!"),
        ("user", "내 여동생 이름은 미라야."),
    ]
    for one in stored:
        counts = _counts(one.character, one.story, one.conversation)
        assert counts == {"characters": 1, "version": 1, "events": 2, "lines": history, "turns": 1}
    with session_scope() as s:
        conv = s.scalars(select(Conversation).where(Conversation.external_id == first.conversation)).one()
        language = s.scalar(select(Character.language).where(Character.slug == first.character))
        assert conv.story == first.story and language == "ko"
        # The history is embedded once: the two copies carry the same vectors.
        vectors = s.scalars(
            select(Message.embedding)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .where(Conversation.external_id.in_([first.conversation, second.conversation]), Message.seq == 1)
        ).all()
        assert len(vectors) == 2 and list(vectors[0]) == list(vectors[1])


def test_a_repeated_idempotency_key_without_a_conversation_replays_the_first_turn() -> None:
    """Found in review: each attempt answered in a conversation of a random name, and the name is part
    of the request's fingerprint, so a retried event with its idempotency key was refused as "a
    different request", and every try copied the history into a new conversation."""
    name = f"루피-{uuid.uuid4().hex[:6]}"
    key = f"retry-{uuid.uuid4().hex[:8]}"
    stored, ids = [], []
    for _ in range(2):
        request = read_request(_event(name, idempotency_key=key))
        stored.append(store_request(request))
        ids += enqueue_turns([turn_request(request, stored[-1])], send=False)
    first, second = stored
    assert first.conversation == second.conversation and ids[0] == ids[1]
    counts = _counts(first.character, first.story, first.conversation)
    assert len(counts["lines"]) == 3 and counts["turns"] == 1  # the history copied once


def test_a_reused_idempotency_key_is_refused_before_the_conversation_takes_its_history_or_story() -> None:
    """Found in review: the persona, story and history were stored first and the turn's key checked
    after, so a refused request still appended its lines to the named conversation (and could switch
    its story)."""
    from db.turns import IdempotencyConflict

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"named-{uuid.uuid4().hex[:8]}"
    key = f"reused-{uuid.uuid4().hex[:8]}"
    first = read_request(_event(name, conversation=conversation, idempotency_key=key))
    stored, _ = store_and_enqueue(first, send=False)
    before = _counts(stored.character, stored.story, conversation)
    grown = {"chat_history": HISTORY["chat_history"] + [{"role": "assistant", "content": "미라? 좋은 이름!"}]}
    reused = read_request(
        _event(name, conversation=conversation, idempotency_key=key, chat_history=grown, message="또 만났네?")
    )
    with pytest.raises(IdempotencyConflict, match="already used for a different request"):
        store_and_enqueue(reused, send=False)
    assert _counts(stored.character, stored.story, conversation) == before  # no line appended
    again, _ = store_and_enqueue(first, send=False)  # the same request under its key is a replay
    assert again.lines_imported == 0 and _counts(stored.character, stored.story, conversation) == before


def test_erasing_the_conversation_a_request_answered_in_takes_the_history_it_was_copied_from() -> None:
    """Found in review: a request without a conversation keeps its history in a conversation of its
    own name (a digest of the request) and answers in a copy of it; only the copy's name is given
    back, so an erasure naming it left every history line, with its vector, in the other."""
    from services.erasure import erase
    from services.producer import cancel_turn

    name = f"루피-{uuid.uuid4().hex[:6]}"
    said = f"내 여동생 이름은 미라야 ({uuid.uuid4().hex[:6]})."
    history = [{"role": "user", "content": "안녕, 루피!"}, {"role": "user", "content": said}]
    stored, turn_id = store_and_enqueue(read_request(_event(name, chat_history=history)), send=False)
    assert cancel_turn(turn_id)  # nothing in flight

    def kept() -> int:
        with session_scope() as s:
            return int(s.scalar(select(func.count()).select_from(Message).where(Message.content == said)))

    assert kept() >= 2  # the history and its copy
    erased = erase("", "rowan", [stored.conversation])
    assert erased.conversations == 2 and kept() == 0
    # Another request of that persona and history is answered as before: its history stored again.
    again, _ = store_and_enqueue(read_request(_event(name, chat_history=history)), send=False)
    assert [c for _, c in _counts(again.character, again.story, again.conversation)["lines"]][-1] == said
    assert kept() == 2


@pytest.mark.parametrize("second", ["answered", "queued"])
def test_a_replay_after_a_later_request_switched_the_story_leaves_the_conversation_in_it(second: str) -> None:
    """Found in review: a replay (the same request under its key) stored itself again before
    enqueue_turns found its turn: the named conversation went back to its old story (and the next
    request without a story was answered in it), or, with the later request's turn unanswered, the
    replay was refused as StoryBusy, "retry", for a turn answered long before."""
    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"named-{uuid.uuid4().hex[:8]}"
    first = read_request(
        _event(name, conversation=conversation, idempotency_key=f"k1-{uuid.uuid4().hex[:8]}")
    )
    stored, turn_id = store_and_enqueue(first, send=False)
    other_story = [{"text": f"다른 이야기 {uuid.uuid4().hex[:6]}", "time": 1}]
    later = read_request(
        _event(
            name,
            conversation=conversation,
            story=other_story,
            message="다음엔?",
            idempotency_key=f"k2-{uuid.uuid4().hex[:8]}",
        )
    )
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == turn_id).values(status=TurnStatus.DONE))
    switched, later_id = store_and_enqueue(later, send=False)
    if second == "answered":
        with session_scope() as s:
            s.execute(update(Turn).where(Turn.id == later_id).values(status=TurnStatus.DONE))
    again, replayed = store_and_enqueue(first, send=False)
    assert replayed == turn_id and again.conversation == conversation
    assert _conversation(conversation).story == switched.story != stored.story


def test_a_key_reused_with_another_story_or_history_and_the_same_message_is_refused() -> None:
    """Found in review: the fingerprint left out the story and the history, so the same key and message
    with another story replayed the first turn (answered in the first story) after storing the new
    story and moving the named conversation to it; another history appended its lines the same way."""
    from db.turns import IdempotencyConflict

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"named-{uuid.uuid4().hex[:8]}"
    key = f"reused-{uuid.uuid4().hex[:8]}"
    first = read_request(_event(name, conversation=conversation, idempotency_key=key))
    stored, turn_id = store_and_enqueue(first, send=False)
    with session_scope() as s:  # answered: a story switch would be allowed
        s.execute(update(Turn).where(Turn.id == turn_id).values(status=TurnStatus.DONE))
    before = _counts(stored.character, stored.story, conversation)
    other_story = [{"text": f"다른 이야기 {uuid.uuid4().hex[:6]}", "time": 1}]
    grown = HISTORY["chat_history"] + [{"role": "assistant", "content": "미라? 좋은 이름!"}]
    for changed in ({"story": other_story}, {"chat_history": {"chat_history": grown}}):
        reused = read_request(_event(name, conversation=conversation, idempotency_key=key, **changed))
        with pytest.raises(IdempotencyConflict, match="already used for a different request"):
            store_and_enqueue(reused, send=False)
        assert _counts(stored.character, stored.story, conversation) == before, changed
        assert _conversation(conversation).story == stored.story
    # Without a conversation too: another story under the same key is another request.
    lone = f"lone-{uuid.uuid4().hex[:8]}"
    store_and_enqueue(read_request(_event(name, idempotency_key=lone)), send=False)
    with pytest.raises(IdempotencyConflict):
        store_and_enqueue(read_request(_event(name, idempotency_key=lone, story=other_story)), send=False)
    again, replayed = store_and_enqueue(first, send=False)  # the same request is still a replay
    assert replayed == turn_id and again.lines_imported == 0
    # Review: a turn the release before stored (its fingerprint without the history and story) is the
    # same request when retried after the upgrade, not a conflict the handler answers as final.
    old_key = f"before-{uuid.uuid4().hex[:8]}"
    request = read_request(_event(name, conversation=f"old-{uuid.uuid4().hex[:8]}", idempotency_key=old_key))
    stored_then = store_request(request)
    as_then = turn_request(request, stored_then).streamed_by_transport(False)
    as_then._earlier = None  # what that release hashed
    (before_upgrade,) = enqueue_turns([as_then], send=False)
    _, after_upgrade = store_and_enqueue(request, send=False)
    assert after_upgrade == before_upgrade


def test_history_for_another_players_conversation_or_a_conversation_that_is_no_name_is_refused() -> None:
    """Found in review: a named conversation of player p1 took p2's chat_history as its own lines (a
    history import refuses it: they would become p1's memory); and "conversation": 0, [] or false was
    read as no conversation, answering statelessly a request meant to go on with one."""
    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"owned-{uuid.uuid4().hex[:8]}"
    stored = store_request(read_request(_event(name, conversation=conversation, player_id="p1")))
    before = _counts(stored.character, stored.story, conversation)
    grown = HISTORY["chat_history"] + [{"role": "user", "content": "내 여동생 이름은 미라야."}]
    request = read_request(
        _event(name, conversation=conversation, player_id="p2", chat_history={"chat_history": grown})
    )
    with pytest.raises(
        InlineRefused, match=f"^player_id: conversation '{conversation}' is player 'p1''s, not player 'p2''s"
    ):
        store_request(request)
    assert _counts(stored.character, stored.story, conversation) == before
    # The same player's grown history is taken, as before.
    same = read_request(
        _event(name, conversation=conversation, player_id="p1", chat_history={"chat_history": grown})
    )
    assert store_request(same).lines_imported == 1
    for bad in (0, False, [], {}, "", "  "):
        with pytest.raises(InlineRefused, match="^conversation: must be a non-empty string"):
            read_request(_event(name, conversation=bad))


def test_the_same_files_under_one_key_with_and_without_inline_are_one_request() -> None:
    """Found in review: the CLI streams what it sends to the workers and not what it answers inline,
    and the stream flag counted in the fingerprint, so replaying the same files with --inline was
    refused as "a different request"."""
    name, key = f"루피-{uuid.uuid4().hex[:6]}", f"inline-{uuid.uuid4().hex[:8]}"
    _, sent = store_and_enqueue(read_request(_event(name, idempotency_key=key)), send=False, stream=True)
    _, inline = store_and_enqueue(read_request(_event(name, idempotency_key=key)), send=False, stream=False)
    assert inline == sent
    # Review: a turn stored by the release before, whose fingerprint counted the flag, is still the
    # same request when retried after the upgrade (before: a 409, exit code 2).
    old_key = f"legacy-{uuid.uuid4().hex[:8]}"
    request = read_request(_event(name, idempotency_key=old_key))
    stored = store_request(request)
    (before,) = enqueue_turns([turn_request(request, stored).model_copy(update={"stream": True})], send=False)
    _, after = store_and_enqueue(read_request(_event(name, idempotency_key=old_key)), send=False, stream=True)
    _, inline_after = store_and_enqueue(
        read_request(_event(name, idempotency_key=old_key)), send=False, stream=False
    )
    assert after == before == inline_after


def test_two_requests_under_one_key_at_once_store_one_history(monkeypatch) -> None:
    """Review of the key check before storing: two requests under one key with different histories,
    at once, both passed the check before either's turn was stored, and both appended their lines."""
    from db.turns import IdempotencyConflict
    from services import original_request

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"named-{uuid.uuid4().hex[:8]}"
    key = f"raced-{uuid.uuid4().hex[:8]}"
    real_store = original_request.store_request

    history_stored = threading.Event()

    def slow_store(req, **kwargs):  # type: ignore[no-untyped-def]
        stored = real_store(req, **kwargs)
        history_stored.set()
        time.sleep(1.0)  # between the history's write and the turn's: where the other one got in
        return stored

    monkeypatch.setattr(original_request, "store_request", slow_store)
    grown = {"chat_history": HISTORY["chat_history"] + [{"role": "assistant", "content": "미라? 좋은 이름!"}]}
    # No story: a story switch's lock would serialise the two already.
    same = {"conversation": conversation, "idempotency_key": key, "story": None}
    requests = [
        read_request(_event(name, **same)),
        read_request(_event(name, **same, chat_history=grown, message="또?")),
    ]
    outcomes: list[object] = [None, None]

    def send(i: int) -> None:
        try:
            outcomes[i] = store_and_enqueue(requests[i], send=False)
        except IdempotencyConflict as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    threads[0].start()
    assert history_stored.wait(30)  # the first has stored its history and not yet its turn
    threads[1].start()
    for thread in threads:
        thread.join(timeout=60)
    assert isinstance(outcomes[0], tuple) and isinstance(outcomes[1], IdempotencyConflict), outcomes
    stored = outcomes[0][0]
    lines = _counts(stored.character, stored.story, conversation)["lines"]
    assert len(lines) == len(requests[0].lines), lines  # the refused one appended nothing


def test_a_changed_persona_is_a_new_character_and_the_same_content_the_same_one() -> None:
    name = f"루피-{uuid.uuid4().hex[:6]}"
    before = store_request(read_request(_event(name)))
    changed = _event(name) | {"persona": _persona(name, "이제는 채소도 좋아한다.")}
    after = store_request(read_request(changed))
    again = store_request(read_request(changed))
    assert before.character != after.character == again.character
    assert (before.character_version, after.character_version, again.character_version) == (1, 1, 1)
    assert (after.character_written, again.character_written) == (True, False)
    with session_scope() as s:
        personality = s.scalar(select(Character.personality).where(Character.slug == after.character))
        kept = s.scalar(select(Character.personality).where(Character.slug == before.character))
    assert personality == "이제는 채소도 좋아한다." and kept == "낙천적이고 고기를 좋아한다."


def test_two_writers_of_the_same_changed_persona_make_one_new_version() -> None:
    """Two sessions: B writes the same new content while A's write is uncommitted; B waits on A's
    row, then finds nothing to change, so the version goes up once."""
    request = read_request(_event(f"루피-{uuid.uuid4().hex[:6]}"))
    slug, fields = request.slug, request.persona.character_fields()
    with session_scope() as s:
        save_character_if_changed(session=s, slug=slug, fields=fields)
    changed = fields | {"personality": "이제는 채소도 좋아한다."}
    outcome: dict[str, Any] = {}

    def writer_b() -> None:
        with session_scope() as b:
            outcome["b"] = save_character_if_changed(session=b, slug=slug, fields=changed)

    with session_scope() as a:
        outcome["a"] = save_character_if_changed(session=a, slug=slug, fields=changed)
        thread = threading.Thread(target=writer_b)
        thread.start()
        deadline = time.monotonic() + 30
        while not _an_upsert_waits():  # B is blocked on A's uncommitted row
            assert thread.is_alive() and time.monotonic() < deadline, outcome
            time.sleep(0.05)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert outcome["a"][1:] == (2, True) and outcome["b"][1:] == (2, False), outcome
    with session_scope() as s:
        assert s.scalar(select(Character.version).where(Character.slug == slug)) == 2


def _an_upsert_waits() -> bool:
    with session_scope() as s:
        return bool(
            s.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'INSERT INTO characters%'"
                )
            )
        )


def test_a_named_conversation_takes_only_the_new_lines_of_a_growing_history() -> None:
    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    stored = store_request(read_request(_event(name, conversation=conversation)))
    assert stored.conversation == conversation and stored.lines_imported == 3
    answered = [(Role.USER, "고기 먹을래?"), (Role.ASSISTANT, "좋아!! 고기!!")]
    with session_scope() as s:  # what a turn stores: the message and the reply
        conv_id = s.scalar(select(Conversation.id).where(Conversation.external_id == conversation))
        append_lines(
            session=s, conversation_id=conv_id, lines=answered, vectors=embed([t for _, t in answered])
        )
    # The client's next request carries the whole history: the answered turn and one more line.
    grown = HISTORY["chat_history"] + [
        {"role": "user", "content": "고기 먹을래?"},
        {"role": "assistant", "content": "좋아!! 고기!!"},
        {"role": "user", "content": "미라 기억해?"},
    ]
    again = store_request(read_request(_event(name, conversation=conversation, chat_history=grown)))
    assert again.lines_imported == 1
    assert [c for _, c in _counts(stored.character, None, conversation)["lines"]][-1] == "미라 기억해?"
    assert len(_counts(stored.character, None, conversation)["lines"]) == 6
    edited = [dict(grown[0], content="안녕, 조로!"), *grown[1:]]
    with pytest.raises(ValueError, match=r"chat_history\[0\]: differs from line 1"):
        store_request(read_request(_event(name, conversation=conversation, chat_history=edited)))
    assert len(_counts(stored.character, None, conversation)["lines"]) == 6
    # Found in review: the item was counted among the lines kept (a system line is none) and always
    # named under chat_history, whatever key the history came in.
    skipping = [{"role": "system", "content": "Be kind."}, grown[0], {"role": "assistant", "content": "뭐?"}]
    with pytest.raises(ValueError, match=r"^history\[2\]: differs from line 2 "):
        store_request(
            read_request(_event(name, conversation=conversation, chat_history=None, history=skipping))
        )


def test_the_cli_files_are_stored_once_on_replay(tmp_path: Path) -> None:
    name = f"Luffy {uuid.uuid4().hex[:6]}"
    files = {}
    for part, doc in (("persona", _persona(name)), ("chat_history", HISTORY), ("story", {"events": STORY})):
        files[part] = tmp_path / f"{part}.json"
        files[part].write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    others = tmp_path / "sample_request.json"
    others.write_text(
        json.dumps({"gen_config": {"temperature": 0.3, "max_new_tokens": 16}}), encoding="utf-8"
    )
    requests = [_store_original(dict(files), others, {"message": "Meat?"}, send=False)[0] for _ in range(2)]
    assert requests[0]["conversation"] != requests[1]["conversation"]  # each request its own
    assert {**requests[0], "conversation": ""} == {**requests[1], "conversation": ""}
    assert requests[0]["params"]["temperature"] == 0.3 and requests[0]["params"]["max_new_tokens"] == 16
    slug = requests[0]["character"]
    assert slug.startswith("inline-luffy-")
    with session_scope() as s:
        story = s.scalar(
            select(Conversation.story).where(Conversation.external_id == requests[0]["conversation"])
        )
    for request in requests:
        counts = _counts(slug, story, request["conversation"])
        assert (counts["characters"], counts["version"], counts["events"], len(counts["lines"])) == (
            1,
            1,
            2,
            3,
        )


def _nothing_stored(name: str) -> None:
    with session_scope() as s:
        characters = select(func.count()).select_from(Character).where(Character.name == name)
        events = select(func.count()).select_from(StoryEvent).where(StoryEvent.text == "BAD-STORY-" + name)
        lines = select(func.count()).select_from(Message).where(Message.content == "BAD-LINE-" + name)
        assert (s.scalar(characters), s.scalar(events), s.scalar(lines)) == (0, 0, 0)


def _bad(name: str, part: str) -> dict[str, Any]:
    """A request whose `part` is malformed and whose other parts would store something recognisable."""
    event = {
        "persona": _persona(name),
        "chat_history": [{"role": "user", "content": "BAD-LINE-" + name}],
        "story": [{"text": "BAD-STORY-" + name}],
        "message": "hi",
    }
    if part == "persona":
        event["persona"] = {"name": name, "example_dialogues": [{"user": "hi"}, {"user": "a"}]}
        event["persona"]["example_dialogues"][0]["character"] = "ok"
    elif part == "chat_history":
        event["chat_history"] = [*event["chat_history"], {"role": "wizard", "content": "x"}]
    else:
        event["story"] = [*event["story"], {"scene": "no text"}]
    return event


BAD = [
    ("persona", "persona.example_dialogues[1].character: Field required"),
    ("chat_history", "chat_history[1].role: must be one of"),
    ("story", "story[1].text: Field required"),
]


@pytest.mark.parametrize(("part", "error"), BAD)
def test_a_malformed_event_is_refused_naming_the_field_and_nothing_is_stored(part: str, error: str) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    result = handler({"input": _bad(name, part)})
    assert set(result) == {"error"} and error in result["error"], result
    _nothing_stored(name)


@pytest.mark.parametrize(("part", "error"), BAD)
def test_a_malformed_file_is_refused_naming_the_file_and_field_and_nothing_is_stored(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], part: str, error: str
) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    args = ["chat", "--message", "hi"]
    for key, doc in _bad(name, part).items():
        if key != "message":
            path = tmp_path / f"{key}.json"
            path.write_text(json.dumps(doc), encoding="utf-8")
            args += [f"--{key}", str(path)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert f"{tmp_path / (part + '.json')}: {error}" in err and err.endswith("nothing stored"), err
    assert len(err.splitlines()) == 1
    _nothing_stored(name)


def test_a_history_sent_as_history_is_named_so_in_its_refusal(tmp_path: Path, capsys) -> None:
    """Found in review: a history sent under `history` (the original's other name for it) was refused
    as `chat_history[0]...`, a field the caller never sent, and `mlchat chat --others` named no file;
    `chat_history: null` beside a `history` dropped the history without a word."""
    name = f"bad-{uuid.uuid4().hex[:8]}"
    bad = [{"role": "bot", "content": "x"}]
    event = {"persona": _persona(name), "history": bad, "message": "hi"}
    result = handler({"input": event})
    assert result["error"].startswith("history[0].role: must be one of"), result
    result = handler({"input": event | {"chat_history": None}})
    assert result["error"].startswith("history[0].role: must be one of"), result
    others = tmp_path / "others.json"
    others.write_text(json.dumps({"history": bad}), encoding="utf-8")
    args = ["chat", "--message", "hi", "--persona", str(_persona_file(tmp_path)), "--others", str(others)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mlchat: {others}: history[0].role: must be one of"), err
    _nothing_stored(name)


def test_a_refusal_after_the_files_are_read_stores_none_of_them() -> None:
    name, conversation = f"bad-{uuid.uuid4().hex[:8]}", f"elaras-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:  # another character's conversation, found only inside the transaction
        elara = s.scalar(select(Character.id).where(Character.slug == "elara"))
        add_conversation(session=s, external_id=conversation, character_id=elara)
    event = {
        "persona": _persona(name),
        "chat_history": [{"role": "user", "content": "BAD-LINE-" + name}],
        "story": [{"text": "BAD-STORY-" + name}],
        "message": "hi",
        "conversation": conversation,
    }
    result = handler({"input": event})
    error = f"conversation: {conversation!r} is another character's (a changed persona is a new character)"
    assert result == {"error": error}
    _nothing_stored(name)


def test_bad_request_fields_are_refused_by_name() -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    cases = [
        ({"gen_config": [0.3]}, "gen_config: must be a JSON object"),
        ({"gen_config": []}, "gen_config: must be a JSON object"),  # found in review: empty ones passed
        (  # found in review: "input: params.actions: …", naming the wrong object
            {"speaker": "narrator", "gen_config": {"actions": [{"name": "wave"}]}},
            "gen_config.actions: the narrator does not act; actions are for the character",
        ),
        (
            {"gen_config": {"temperature": 9}},
            "gen_config.temperature: Input should be less than or equal to 2",
        ),
        ({"message": None}, "message: Input should be a valid string"),
        ({"persona": None}, "persona: must be a JSON object with at least a name"),
    ]
    for fields, error in cases:
        event = {"persona": _persona(name), "story": [{"text": "BAD-STORY-" + name}], "message": "hi"}
        assert handler({"input": event | fields}) == {"error": error}
    _nothing_stored(name)


def test_the_request_picks_its_model_as_the_original_did() -> None:
    """Review (stop 75): the original chose the model per request (`model_config.name`, its
    `--others sample_request_gpt_oss.json`); it was dropped, so another model answered. A served
    model is the turn's model; another is refused naming the field, and a worker answering the turn
    itself (serverless, --inline) serves its own model only."""
    served = [settings.model, "solar-10.7b"]
    assert read_request(
        _event("m1", model_config={"name": "solar-10.7b", "gpus": [0]}), served
    ).turn.model == ("solar-10.7b")
    assert read_request(_event("m1", model="solar-10.7b"), served).turn.model == "solar-10.7b"
    assert read_request(_event("m1"), served).turn.model is None  # the deployment's default
    for fields, error in (
        ({"model_config": {"name": "eeve-10.8b"}}, "model_config.name: 'eeve-10.8b' is not served here"),
        ({"model": 7}, "model: must be a string, a model's name"),
        ({"model_config": "solar"}, "model_config: must be a JSON object"),
        (
            {"model": settings.model, "model_config": {"name": "solar-10.7b"}},
            f"model_config.name: 'solar-10.7b', but model names {settings.model!r}",
        ),
    ):
        with pytest.raises(InlineRefused, match=re.escape(error)):
            read_request(_event("m1", **fields), served)
    name = f"model-{uuid.uuid4().hex[:8]}"
    event = {"persona": _persona(name), "story": [{"text": "BAD-STORY-" + name}], "message": "hi"}
    refused = handler({"input": event | {"model_config": {"name": "solar-10.7b"}}})
    assert refused == {
        "error": f"model_config.name: 'solar-10.7b' is not served here; served: {settings.model}"
    }
    _nothing_stored(name)


def test_a_file_that_is_not_json_is_refused_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = tmp_path / "persona.json"
    persona.write_text('{"name": "Luffy",\n "personality": }', encoding="utf-8")
    assert cli(["chat", "--message", "hi", "--persona", str(persona)]) == 2
    assert f"{persona}: line 2: not JSON" in capsys.readouterr().err


def test_the_original_event_is_answered_in_its_chat_response_shape(engine) -> None:
    event = {"input": _event(f"Luffy {uuid.uuid4().hex[:6]}", gen_config={"max_new_tokens": 8})}
    first, second = handler(event), handler(event)
    for result in (first, second):
        assert result["mlchat"]["status"] == "done", result
        assert result["reply"]["text"] and len(result["reply"]["embedding"]) == 384
        assert result["usage"]["completion_tokens"] <= 8 and result["timing"]["total_ms"] > 0
        assert {c["source"] for c in result["retrieved"]} <= {"chat_history", "story"}
    assert any(c["source"] == "story" and c["text"] for c in first["retrieved"])
    assert first["mlchat"]["history_lines_imported"] == 3 and second["mlchat"]["history_lines_imported"] == 0
    for result in (first, second):
        meta = result["mlchat"]
        counts = _counts(meta["character"], meta["story"], meta["conversation"])
        # Stateless like the original: the history, then this request's own message and reply only.
        assert (counts["version"], counts["events"], counts["turns"], len(counts["lines"])) == (1, 2, 1, 5)
    assert first["mlchat"]["conversation"] != second["mlchat"]["conversation"]
    assert first["reply"]["text"] not in [c["text"] for c in second["retrieved"]]


def _conversation(external_id: str) -> Conversation:
    with session_scope() as s:
        conv = s.scalars(select(Conversation).where(Conversation.external_id == external_id)).one()
        s.expunge(conv)
        return conv


def test_two_players_first_messages_to_one_persona_share_nothing() -> None:
    """Empty history, one persona, two players: each answers in its own conversation, so B's prompt
    holds none of A's lines (nor A's conversation's facts) and addresses B; A's replay neither."""
    event = {"persona": _persona(f"루피-{uuid.uuid4().hex[:6]}"), "message": "안녕!"}
    a_request = read_request(event | {"player_id": "pa", "player_name": "Alice"})
    a = store_request(a_request)
    enqueue_turns([turn_request(a_request, a)], send=False)
    answered = [(Role.USER, "안녕! 나는 앨리스, 비밀번호는 7421이야."), (Role.ASSISTANT, "반가워 앨리스!")]
    with session_scope() as s:  # what A's turn stores: the message and the reply
        append_lines(
            session=s,
            conversation_id=_conversation(a.conversation).id,
            lines=answered,
            vectors=embed([t for _, t in answered]),
        )
    b = store_request(read_request(event | {"player_id": "pb", "player_name": "Bob"}))
    replay = store_request(a_request)
    assert len({a.conversation, b.conversation, replay.conversation}) == 3
    for one in (b, replay):
        assert _counts(one.character, None, one.conversation)["lines"] == []
        assert _counts(one.character, None, one.conversation)["turns"] == 0
    assert _conversation(b.conversation).player_name == "Bob"
    assert _conversation(b.conversation).player_id == "pb"


def test_two_personas_with_one_name_are_two_characters_and_the_prefix_is_reserved() -> None:
    name = f"Luffy {uuid.uuid4().hex[:6]}"
    a_request = read_request(_event(name))
    b_request = read_request(_event(name) | {"persona": _persona(name, "Likes vegetables now.")})
    a, b = store_request(a_request), store_request(b_request)
    assert a.character != b.character and a.character.startswith("inline-luffy-")
    assert turn_request(a_request, a).character == a.character
    assert turn_request(b_request, b).character == b.character
    with session_scope() as s:
        slugs = Character.slug.in_([a.character, b.character])
        personalities = dict(
            s.execute(select(Character.slug, Character.personality).where(slugs)).tuples().all()
        )
        versions = s.scalars(select(Character.version).where(Character.slug.in_([a.character, b.character])))
        assert set(versions) == {1}
    assert personalities == {a.character: "낙천적이고 고기를 좋아한다.", b.character: "Likes vegetables now."}

    def card(card_name: str) -> bytes:
        return json.dumps({"spec": "chara_card_v2", "data": {"name": card_name, "description": "x"}}).encode()

    with pytest.raises(CardError, match=r"^name: slug 'inline-x-.*' starts with 'inline-'"):
        import_card(card(f"Inline X {uuid.uuid4().hex[:6]}"))
    with pytest.raises(CardError, match=r"^slug: slug 'inline-luffy' starts with 'inline-'"):
        import_card(card("Luffy"), slug="inline-luffy")
    with pytest.raises(CardError, match="starts with 'inline-'"):
        import_card(card("Luffy"), slug=a.character)
    with session_scope() as s:
        assert s.scalar(select(Character.description).where(Character.slug == a.character)) == ""


def test_a_named_conversation_changes_its_story_only_when_no_turn_of_it_is_unanswered() -> None:
    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    first_request = read_request(_event(name, conversation=conversation, story_time=15))
    first = store_request(first_request)
    (turn_id,) = enqueue_turns([turn_request(first_request, first)], send=False)
    other_story = [{"text": f"다른 이야기 {uuid.uuid4().hex[:6]}", "time": 1}]
    # Review: answered as a final error before; the turn in the way passes, so it is StoryBusy (the
    # serverless handler's {"retry": true}, as the conversation's own story switch answers it).
    with pytest.raises(StoryBusy, match=r"^story: conversation 'orig-.*' has unanswered turns"):
        store_request(read_request(_event(name, conversation=conversation, story=other_story)))
    conv = _conversation(conversation)
    assert (conv.story, conv.story_time) == (first.story, 15)
    # The same story without a story time keeps the one the conversation has.
    again = store_request(read_request(_event(name, conversation=conversation)))
    conv = _conversation(conversation)
    assert again.story == first.story and (conv.story, conv.story_time) == (first.story, 15)
    with session_scope() as s:  # the turn is answered: the story may change now
        s.execute(update(Turn).where(Turn.id == turn_id).values(status=TurnStatus.DONE))
    changed = store_request(read_request(_event(name, conversation=conversation, story=other_story)))
    conv = _conversation(conversation)
    assert changed.story != first.story and (conv.story, conv.story_time) == (changed.story, None)


def _seen_waiting(query: str, timeout: float = 15.0, **params: Any) -> bool:
    """Whether a backend shows up waiting on a lock, by `query` (a count), within `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            if s.scalar(text(query), params):
                return True
        time.sleep(0.05)
    return False


def test_a_story_switch_waits_for_the_turn_of_the_request_that_set_the_story_before_it(monkeypatch) -> None:
    """Found in review: a request's story is written in one transaction and its turn stored in the
    next. A second request switching the named conversation to another story in between found no
    unanswered turn, switched it, and the first request's turn was answered in the second's story."""
    from db import world
    from services import original_request

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    first = read_request(_event(name, conversation=conversation, story_time=15))
    other_story = [{"text": f"다른 이야기 {uuid.uuid4().hex[:6]}", "time": 1}]
    second = read_request(_event(name, conversation=conversation, story=other_story))
    real, first_stored, go = original_request.store_request, threading.Event(), threading.Event()

    def store_request_then_pause(req, **kwargs):  # type: ignore[no-untyped-def]
        stored = real(req, **kwargs)
        if req is first:  # its turn is stored once the second request has come
            first_stored.set()
            go.wait(30)
        return stored

    monkeypatch.setattr(original_request, "store_request", store_request_then_pause)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(store_and_enqueue(first, send=False)))
    thread.start()
    assert first_stored.wait(60)
    refused: list[Exception] = []

    def switch() -> None:
        try:
            store_and_enqueue(second, send=False)
        except StoryBusy as exc:
            refused.append(exc)

    switching = threading.Thread(target=switch)
    switching.start()
    blocked = _seen_waiting(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND classid = :ns",
        ns=world._STORY_LOCK_NAMESPACE,
    )
    go.set()
    thread.join(60)
    switching.join(60)
    assert blocked, "the second request did not wait for the first's story lock"
    assert [str(e) for e in refused] and str(refused[0]).startswith("story: conversation 'orig-")
    ((stored, turn_id),) = results
    conv = _conversation(conversation)
    assert (conv.story, conv.story_time) == (stored.story, 15)
    with session_scope() as s:
        assert s.scalar(select(Turn.status).where(Turn.id == turn_id)) == TurnStatus.QUEUED


def test_a_story_switch_waits_for_a_turn_being_stored_and_then_sees_it() -> None:
    """Found in review: the switch's update did not see a turn stored by a transaction still open
    (its snapshot was taken first), and switched the story under it."""
    from sqlalchemy import insert

    from db.world import set_conversation_story

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    request = read_request(_event(name, conversation=conversation))
    stored, turn_id = store_and_enqueue(request, send=False)
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == turn_id).values(status=TurnStatus.DONE))
        done = s.get_one(Turn, turn_id)
        skipped = {"id", "number", "idempotency_key", "user_message_id", "reply_message_id"}
        copy = {c.key: getattr(done, c.key) for c in Turn.__table__.columns if c.key not in skipped}
        conv_id = done.conversation_id
    switched: list[bool] = []

    def switch() -> None:
        with session_scope() as s2:
            switched.append(
                set_conversation_story(session=s2, conversation_id=conv_id, story="other", story_time=None)
            )

    thread = threading.Thread(target=switch)
    with session_scope() as storing:
        fresh = {"status": TurnStatus.QUEUED, "idempotency_key": uuid.uuid4().hex}
        storing.execute(insert(Turn).values(copy | fresh))  # not committed yet
        thread.start()
        waited = _seen_waiting(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%FROM conversations%FOR UPDATE%'"
        )  # the turn commits as this block ends
    thread.join(30)
    assert waited, "the switch did not wait for the turn being stored"
    assert switched == [False]
    assert _conversation(conversation).story == stored.story


def test_a_story_switch_that_waits_out_the_lock_is_sent_back_naming_the_conversation(monkeypatch) -> None:
    """Found in a last read: a wait for the story lock that ran out was a lock timeout, answered as
    "temporarily unavailable (OperationalError)", as if the database were away."""
    from sqlalchemy import func

    from core.settings import DEFAULT_TENANT
    from db import world
    from db.advisory_locks import advisory_lock

    monkeypatch.setattr(world, "STORY_LOCK_WAIT_S", 0.3)
    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    key = func.hashtext(f"{DEFAULT_TENANT}\n{conversation}")
    with advisory_lock(world._STORY_LOCK_NAMESPACE, key) as other_request:  # mid-switch
        assert other_request is not None
        result = handler({"input": _event(name, conversation=conversation)})
    busy = f"conversation {conversation!r}: another request is switching its story; send the request again"
    assert result == {"error": busy, "retry": True}
    assert _conversation_id(conversation) is None  # nothing stored


def _conversation_id(external_id: str) -> int | None:
    with session_scope() as s:
        return s.scalar(select(Conversation.id).where(Conversation.external_id == external_id))


def test_another_characters_conversation_is_refused_before_its_lines_are_compared() -> None:
    conversation = f"elaras-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        elara = s.scalar(select(Character.id).where(Character.slug == "elara"))
        conv_id = add_conversation(session=s, external_id=conversation, character_id=elara)
        line = [(Role.USER, "Elara's own first line")]
        append_lines(session=s, conversation_id=conv_id, lines=line, vectors=embed([line[0][1]]))
    event = _event(f"루피-{uuid.uuid4().hex[:6]}", conversation=conversation)
    with pytest.raises(InlineRefused, match=r"^conversation: 'elaras-.*' is another character's"):
        store_request(read_request(event))


def test_a_lone_surrogate_or_too_long_a_history_is_refused_naming_the_item(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    history = [{"role": "user", "content": "BAD-LINE-" + name}, {"role": "user", "content": "\ud800"}]
    event = {"persona": _persona(name), "chat_history": history, "message": "hi"}
    error = "chat_history[1].content: contains a lone surrogate (not valid Unicode text)"
    assert handler({"input": event}) == {"error": error}
    path = tmp_path / "chat_history.json"
    path.write_text(json.dumps(history), encoding="utf-8")  # "\ud800" escaped: valid JSON
    persona = tmp_path / "persona.json"
    persona.write_text(json.dumps(_persona(name)), encoding="utf-8")
    args = ["chat", "--message", "hi", "--persona", str(persona), "--chat_history", str(path)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mlchat: {path}: {error}; nothing stored", err
    _nothing_stored(name)
    too_long = [{"role": "system", "content": "x"}] * 10_001
    with pytest.raises(InlineRefused, match=r"^chat_history: more than 10000 messages$"):
        read_request({"persona": _persona(name), "chat_history": too_long, "message": "hi"})


def test_a_file_nested_too_deeply_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    assert (
        cli(
            [
                "chat",
                "--message",
                "hi",
                "--persona",
                str(_persona_file(tmp_path)),
                "--chat_history",
                str(deep),
            ]
        )
        == 2
    )
    assert (
        capsys.readouterr().err.strip()
        == f"mlchat: {deep}: not JSON that can be read (nested too deeply); nothing stored"
    )
    args = [
        "history",
        "import",
        str(deep),
        "--conversation",
        "c-deep",
        "--character",
        "elara",
        "--format",
        "original",
    ]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mlchat: {deep}: line 1: not JSON that can be read (nested too deeply); nothing stored", (
        err
    )


def _persona_file(tmp_path: Path) -> Path:
    path = tmp_path / "persona.json"
    path.write_text(json.dumps(_persona(f"p-{uuid.uuid4().hex[:6]}")), encoding="utf-8")
    return path


def test_params_errors_name_params_and_a_lost_turn_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"bad-{uuid.uuid4().hex[:8]}"
    event = {"persona": _persona(name), "message": "hi", "gen_config": {"top_p": 0.5}}
    result = handler({"input": event | {"params": {"temperature": 9}}})
    assert result == {"error": "params.temperature: Input should be less than or equal to 2"}
    result = handler({"input": event | {"gen_config": {"temperature": 9}, "params": {"top_p": 0.5}}})
    assert result == {"error": "gen_config.temperature: Input should be less than or equal to 2"}
    monkeypatch.setattr("worker.inline.answer_stored", lambda ids: [])  # the turn gone before its read
    assert handler({"input": event}) == {
        "error": "the turn ran but could not be read back; send the request again"
    }

    from tests.conftest import failed_for_good

    # review: a turn failed for good answered a null reply and no top-level error: RunPod's job read
    # COMPLETED, where the original raised
    monkeypatch.setattr("worker.inline.answer_stored", failed_for_good)
    result = handler({"input": event})
    assert (result["error"], result["error_code"], result["reply"]) == (
        "the prompt is too long",
        "prompt_too_long",
        None,
    )


def test_a_conversation_of_the_inline_prefix_is_refused() -> None:
    event = _event(f"루피-{uuid.uuid4().hex[:6]}", conversation="inline-0123")
    with pytest.raises(InlineRefused, match=r"^conversation: 'inline-0123' starts with 'inline-'"):
        read_request(event)


def test_chat_with_best_of_n_in_the_others_file_is_sent_unstreamed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `--others` may carry gen_config.n = 2; the CLI streamed according to --params alone, so the
    # producer refused the turn ("a streamed turn generates one candidate") after the files were stored.
    import services.producer as producer

    sent: list[dict[str, Any]] = []
    real = producer.enqueue_turns

    def enqueue_unsent(requests, **kwargs):  # type: ignore[no-untyped-def]
        sent.extend(dict(r) for r in requests)
        return real(requests, **kwargs | {"send": False})  # stored, never sent: nothing answers it

    monkeypatch.setattr(producer, "enqueue_turns", enqueue_unsent)
    others = tmp_path / "others.json"
    others.write_text(json.dumps({"gen_config": {"n": 2}}), encoding="utf-8")
    persona = _persona_file(tmp_path)
    code = cli(
        ["chat", "--message", "hi", "--persona", str(persona), "--others", str(others), "--timeout", "1"]
    )
    err = capsys.readouterr().err
    assert "stream" not in err, err
    assert code == 1 and sent and sent[0]["stream"] is False  # queued, unanswered within a second


def test_chat_says_what_it_stored_when_the_turn_then_cannot_be_queued(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with the turn stored after the files (under the story lock), an enqueue that
    failed printed only its own error, not that the persona and history were stored."""
    import services.producer as producer

    def broker_away(requests, **kwargs):  # type: ignore[no-untyped-def]
        raise producer.EnqueueError("the broker is unreachable; nothing queued")

    monkeypatch.setattr(producer, "enqueue_turns", broker_away)
    code = cli(["chat", "--message", "hi", "--persona", str(_persona_file(tmp_path))])
    err = capsys.readouterr().err
    assert code == 1 and "mlchat: the broker is unreachable; nothing queued" in err, err
    assert "persona: character 'inline-" in err and "(stored)" in err, err


def test_chat_keeps_the_others_files_speaker_and_names_params_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the CLI always sent speaker "character", overriding an --others file's
    "speaker": "narrator"; and --params nested too deeply was not named (a RecursionError)."""
    import services.producer as producer

    sent: list[dict[str, Any]] = []
    real = producer.enqueue_turns

    def enqueue_unsent(requests, **kwargs):  # type: ignore[no-untyped-def]
        sent.extend(dict(r) for r in requests)
        return real(requests, **kwargs | {"send": False})

    monkeypatch.setattr(producer, "enqueue_turns", enqueue_unsent)
    others = tmp_path / "others.json"
    others.write_text(json.dumps({"speaker": "narrator"}), encoding="utf-8")
    persona = _persona_file(tmp_path)
    story = tmp_path / "story.json"
    story.write_text(json.dumps(STORY, ensure_ascii=False), encoding="utf-8")
    args = [
        "chat",
        "--message",
        "hi",
        "--persona",
        str(persona),
        "--story",
        str(story),
        "--others",
        str(others),
    ]
    cli([*args, "--timeout", "1"])
    said = capsys.readouterr().err
    assert sent and sent[0]["speaker"] == "narrator", said
    assert cli(["chat", "--message", "hi", "--character", "elara", "--params", "[" * 100_000]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--params: cannot be read (RecursionError" in err, err


def test_a_bad_field_in_the_others_file_names_that_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A "request" error ("gen_config.temperature: ...") named no file, though the field came from --others.
    others = tmp_path / "others.json"
    others.write_text(json.dumps({"gen_config": {"temperature": "hot"}}), encoding="utf-8")
    args = ["chat", "--message", "hi", "--persona", str(_persona_file(tmp_path)), "--others", str(others)]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mlchat: {others}: gen_config.temperature: "), err
    assert err.endswith("nothing stored")


def test_an_answered_turn_whose_extras_cannot_be_read_is_returned_not_sent_again(world, monkeypatch) -> None:
    """Found in review: the reply's embedding and the retrieved texts are read after the turn is
    answered; a database blip there answered "send the event again", and an unkeyed event sent again
    was answered a second time in its conversation."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    import db.history
    from services.original_request import chat_response, store_and_enqueue
    from services.producer import get_turn

    request = read_request(_event(f"Luffy {uuid.uuid4().hex[:6]}"))
    stored, turn_id = store_and_enqueue(request, send=False)
    view = get_turn(turn_id)
    assert view is not None
    view = view.model_copy(update={"reply": "Meat!", "status": TurnStatus.DONE})

    def blip(**_: Any) -> Any:
        raise OperationalError("SELECT", {}, psycopg.OperationalError("the server closed the connection"))

    monkeypatch.setattr(db.history, "reply_embedding", blip)
    answer = chat_response(view, stored)
    assert answer["reply"] == {"text": "Meat!", "embedding": None}
    assert answer["mlchat"]["status"] == "done" and "database was away" in answer["mlchat"]["partial"]


def test_an_npc_replys_action_and_emotion_reach_the_answer_and_the_printed_turn(world) -> None:
    """Found in review (stop 76): `params.actions` made the worker generate and store an NPC's
    {say, emotion, action}, and the original's answer (and `mlchat chat`'s printout) gave the say only:
    the action the game was to execute was lost."""
    from scripts.render import render_turn
    from services.original_request import chat_response, store_and_enqueue
    from services.producer import get_turn

    actions = [{"name": "give_item", "args": {"item": {"type": "string"}}}]
    request = read_request(_event(f"Luffy {uuid.uuid4().hex[:6]}", params={"actions": actions}))
    stored, turn_id = store_and_enqueue(request, send=False)
    view = get_turn(turn_id)
    assert view is not None
    npc = {"say": "Take it.", "emotion": "happy", "action": {"name": "give_item", "args": {"item": "key"}}}
    view = view.model_copy(update={"reply": "Take it.", "structured": npc, "status": TurnStatus.DONE})
    answer = chat_response(view, stored)
    assert answer["reply"]["text"] == "Take it." and answer["reply"]["structured"] == npc
    assert '"give_item"' in render_turn(view).split("[Structured]\n", 1)[1]


def test_an_event_whose_turn_was_answered_before_an_outage_is_returned_not_sent_again(
    world, monkeypatch
) -> None:
    """Found in review of the fix above: a blip after the turn was answered (reading it back) still
    answered "send the event again"; the turn is read once more and, answered, returned."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    import worker.inline
    from worker.serverless import handler

    monkeypatch.setattr(worker.inline, "check_space", lambda: None)

    def answered_then_blip(ids):  # type: ignore[no-untyped-def]
        with session_scope() as s:
            s.execute(update(Turn).where(Turn.id.in_(ids)).values(status=TurnStatus.DONE, reply="Meat!"))
        raise OperationalError("SELECT", {}, psycopg.OperationalError("the server closed the connection"))

    monkeypatch.setattr(worker.inline, "answer_stored", answered_then_blip)
    answer = handler({"input": _event(f"Luffy {uuid.uuid4().hex[:6]}")})
    assert "retry" not in answer and answer["reply"]["text"] == "Meat!", answer
    assert answer["mlchat"]["status"] == "done"


def test_a_request_whose_vectors_moved_while_it_was_embedded_stores_nothing(monkeypatch) -> None:
    """Found in review of the history import's fix: the original shape's history and story, and a
    story event written alone, were stored with NULL vectors (the guard trigger) when a re-embed's
    swap committed while they were embedded, and the request said it was stored."""
    from db.vector_space import EmbedderMismatch
    from services.characters import add_story_event

    monkeypatch.setattr("db.vector_space.same_space", lambda session: False)  # the swap committed meanwhile
    name = f"moved-{uuid.uuid4().hex[:8]}"
    event = {
        "persona": _persona(name),
        "chat_history": [{"role": "user", "content": "BAD-LINE-" + name}],
        "story": [{"text": "BAD-STORY-" + name}],
        "message": "hi",
    }
    with pytest.raises(EmbedderMismatch, match="^the request's history and story: the stored vectors moved"):
        store_request(read_request(event))
    _nothing_stored(name)
    answer = handler({"input": event})  # review: a serverless caller is told to send it again
    assert answer["retry"] is True and "the stored vectors moved" in answer["error"], answer
    _nothing_stored(name)
    story = f"moved-{uuid.uuid4().hex[:8]}"
    with pytest.raises(EmbedderMismatch, match="^the story event: the stored vectors moved"):
        add_story_event(story, "BAD-STORY-" + name)
    _nothing_stored(name)
    from db.models import Fact
    from services.facts import FactIn, write_facts

    with pytest.raises(EmbedderMismatch, match="^the facts: the stored vectors moved"):  # review: facts too
        write_facts("", f"p-{name}", [FactIn(text="BAD-FACT-" + name)])
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Fact).where(Fact.text == "BAD-FACT-" + name)) == 0


def test_a_history_an_erasure_takes_between_the_requests_two_reads_is_a_retry_not_a_refusal(
    monkeypatch,
) -> None:
    """Review of the erasure of an inline request's history: an erasure committing between the
    request's read of the held lines and its write found the conversation emptied, answered as bad
    input ("changed meanwhile; try again" without `retry`), though the same event sent again goes through."""
    from db import history

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"named-{uuid.uuid4().hex[:8]}"
    event = _event(name, conversation=conversation)
    store_request(read_request(event))  # the conversation holds the history
    real, reads = history.conversation_lines, []

    def erased_after_the_first_read(**kwargs):  # type: ignore[no-untyped-def]
        reads.append(kwargs)
        return real(**kwargs) if len(reads) == 1 else []

    monkeypatch.setattr(history, "conversation_lines", erased_after_the_first_read)
    answer = handler({"input": event})
    assert answer.get("retry") is True and "changed meanwhile; try again" in answer["error"], answer


def test_a_request_past_its_models_live_queue_limit_stores_nothing(monkeypatch) -> None:
    """Review of the live queue's limit (stop 79): an original-shape request was refused only at its
    turn, after its persona, story and history were stored (and, without a conversation, a copy of
    the history made at each try): "nothing was stored" said over what was."""
    from core.settings import settings
    from services import producer
    from services.original_request import read_request, store_and_enqueue

    name = f"Full-{uuid.uuid4().hex[:6]}"
    request = read_request(
        {
            "persona": _persona(name),
            "chat_history": [{"role": "user", "content": "BAD-LINE-" + name}],
            "message": "hi",
        }
    )
    monkeypatch.setattr(settings, "live_queue_max", 2)
    monkeypatch.setitem(producer._live_depths, settings.model, (time.monotonic() + 60, 10))
    with pytest.raises(producer.LiveQueueFull):
        store_and_enqueue(request, send=True)
    _nothing_stored(name)


def test_a_history_moved_meanwhile_exits_1_to_send_again(tmp_path: Path, capsys, monkeypatch) -> None:
    """CLI review: an erasure committed between an inline request's two reads (HistoryMoved, "try
    again"; the serverless handler answers it `retry: true`) exited 2, refused input, so a script
    that sends again on 1 gave up on a request that goes through the next time."""
    import services.original_request as original_request
    from services.original_request import HistoryMoved

    def moved(*_: object, **__: object) -> None:
        raise HistoryMoved("chat_history", "conversation 'x': its history changed meanwhile; try again")

    monkeypatch.setattr(original_request, "store_and_enqueue", moved)
    assert cli(["chat", "--message", "hi", "--persona", str(_persona_file(tmp_path))]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "mlchat: conversation 'x': its history changed meanwhile; try again", err


def test_a_request_naming_another_player_is_refused_before_its_story_switch_is_stored() -> None:
    """Found in review of this stop's player check: the original shape stored the request's persona
    and moved the named conversation to its story in a committed transaction, then had its turn
    refused for naming another player: the first player's later turns ran in the second's story."""
    from services.original_request import InlineRefused, store_and_enqueue

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    rowan, mallory = f"rowan-{uuid.uuid4().hex[:6]}", f"mallory-{uuid.uuid4().hex[:6]}"
    first = store_request(read_request(_event(name, conversation=conversation, player_id=rowan)))
    other_story = [{"text": f"다른 이야기 {uuid.uuid4().hex[:6]}", "time": 1}]
    event = _event(name, conversation=conversation, player_id=mallory, story=other_story)
    with pytest.raises(
        InlineRefused, match=rf"^player_id: conversation '{conversation}' is player '{rowan}''s"
    ):
        store_and_enqueue(read_request(event), send=False)
    conv = _conversation(conversation)
    assert (conv.story, conv.player_id) == (first.story, rowan)


def test_a_named_conversation_erased_between_its_reads_is_a_request_to_send_again(monkeypatch) -> None:
    """Review of this stop's player check: a conversation erased between the upsert that found it and
    the read of its player raised a bare KeyError (a 500, `{"error"}` to the serverless caller);
    it is HistoryMoved, "try again", as the history's own check says it."""
    import db.world
    from services.original_request import HistoryMoved

    name, conversation = f"루피-{uuid.uuid4().hex[:6]}", f"orig-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(db.world, "conversation_players", lambda **_: {})
    with pytest.raises(HistoryMoved, match=rf"conversation '{conversation}' changed meanwhile; try again"):
        store_request(read_request(_event(name, conversation=conversation, player_id="p-erased")))


def test_a_request_in_the_originals_own_schema_is_read_whole_and_what_is_not_read_is_said() -> None:
    """Found in review: the original service's own request files (its `src/schemas/request.py`:
    `persona.persona`, `speaking_style`, `constraints`, `example_dialogue` as role turns, `gen`,
    `model` as its ModelConfig, later `character_name`, `model_cfg.model_name`, `user_name`) were
    refused for a missing `name`, or lost the sheet, the sampling settings and the model unsaid: the
    deployment's default model answered another model's request."""
    from services.original_request import chat_response

    name = f"루피-{uuid.uuid4().hex[:6]}"
    event = {
        "message": "고기 먹을래?",
        "session_id": "s-1",
        "user_id": f"u-{uuid.uuid4().hex[:6]}",
        "user_name": "나미",
        "persona": {
            "persona_id": str(uuid.uuid4()),
            "character_name": name,
            "persona": "낙천적이고 고기를 좋아한다.",
            "scenario": "그랜드 라인을 항해하는 중.",
            "speaking_style": ["반말을 쓴다.", "시시시! 하고 웃는다."],
            "constraints": ["해적왕이 되겠다는 꿈을 잊지 않는다."],
            "example_dialogue": [
                {"role": "user", "content": "배고파?"},
                {"role": "assistant", "content": "고기!!"},
            ],
        },
        "history": [{"role": "user", "content": "안녕, 루피!"}],
        "chat_rag_config": {"top_k_history": 6},
        "story": [{"content": "루피가 풍차 마을을 떠났다.", "story_type": "event"}],
        "model": {"name": settings.model, "context_length": 4096},
        "gen": {
            "temperature": 0.3,
            "top_p": 0.9,
            "max_new_tokens": 40,
            "repetition_penalty": 1.05,
            "stop": ["\n\n"],
        },
    }
    request = read_request(event)
    persona = request.persona
    assert (persona.name, persona.personality) == (name, "낙천적이고 고기를 좋아한다.")
    assert persona.speech_style == "반말을 쓴다.\n시시시! 하고 웃는다."
    assert [d.model_dump() for d in persona.example_dialogues] == [{"user": "배고파?", "character": "고기!!"}]
    assert persona.character_fields()["post_history_instructions"] == "- 해적왕이 되겠다는 꿈을 잊지 않는다."
    params = request.turn.params
    assert (params.temperature, params.max_new_tokens, params.repetition_penalty) == (0.3, 40, 1.05)
    assert params.stop == ["\n\n"] and request.turn.model == settings.model
    assert (request.turn.player_id, request.turn.player_name) == (event["user_id"], "나미")
    assert request.ignored == ("chat_rag_config", "session_id")
    stored, turn_id = store_and_enqueue(request, send=False)
    from services.producer import cancel_turn, get_turn

    assert cancel_turn(turn_id)
    view = get_turn(turn_id)
    assert view is not None and chat_response(view, stored)["mlchat"]["ignored"] == [
        "chat_rag_config",
        "session_id",
    ]
    # its later ModelConfig names: another model than this deployment's is refused, never answered
    for config in (
        {"model_cfg": {"model_name": "solar-10.7b"}},
        {"model_config": {"model_name": "solar-10.7b"}},
    ):
        with pytest.raises(
            InlineRefused, match=r"model_c(fg|onfig)\.model_name: 'solar-10.7b' is not served"
        ):
            read_request(_event(name) | config)
    with pytest.raises(InlineRefused, match=r"gen\.temperature"):
        read_request(_event(name, gen={"temperature": 9}))
