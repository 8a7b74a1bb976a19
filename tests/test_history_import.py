"""`mlchat history import`: SillyTavern chat JSONL, OpenAI messages and the original service's
history JSON into a conversation, embedded; a malformed log is refused with its line (or item) and
field, and nothing of it is stored."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.models import Conversation, Message, Role
from db.session import session_scope
from scripts.cli import main as cli

pytestmark = pytest.mark.usefixtures("world")


def _stored(external: str) -> list[tuple[int, str, str, bool]]:
    with session_scope() as s:
        conv = s.scalar(
            select(Conversation).where(Conversation.tenant == "", Conversation.external_id == external)
        )
        if conv is None:
            return []
        rows = s.execute(
            select(Message.seq, Message.role, Message.content, Message.embedding.is_not(None))
            .where(Message.conversation_id == conv.id)
            .order_by(Message.seq)
        )
        return [(seq, role.value, content, embedded) for seq, role, content, embedded in rows]


def _import(tmp_path: Path, body: str, fmt: str, external: str) -> int:
    log = tmp_path / f"log.{fmt}"
    log.write_text(body, encoding="utf-8")
    return cli(
        ["history", "import", str(log), "--format", fmt, "--conversation", external, "--character", "elara"]
    )


def _jsonl(*items: object) -> str:
    return "\n".join(json.dumps(x) for x in items)


SILLYTAVERN = "\n".join(
    json.dumps(x)
    for x in [
        {"user_name": "Rowan", "character_name": "Elara", "create_date": "2024-01-01"},
        {"name": "Elara", "is_user": False, "mes": "Welcome to the Gilded Stag."},
        {"name": "Rowan", "is_user": True, "mes": "My sister Mira is missing."},
        {"name": "System", "is_user": False, "is_system": True, "mes": "[note]"},
        {"name": "Elara", "is_user": False, "mes": "Ask at the mill."},
    ]
)


def test_a_sillytavern_chat_is_imported_embedded_and_appended(tmp_path, capsys, monkeypatch) -> None:
    external = f"imp-{uuid.uuid4().hex[:8]}"
    assert _import(tmp_path, SILLYTAVERN, "sillytavern", external) == 0
    assert "lines 1-3 imported" in capsys.readouterr().out
    assert _stored(external) == [
        (1, "assistant", "Welcome to the Gilded Stag.", True),
        (2, "user", "My sister Mira is missing.", True),
        (3, "assistant", "Ask at the mill.", True),
    ]
    with session_scope() as s:
        assert (
            s.scalar(select(Conversation.player_name).where(Conversation.external_id == external)) == "Rowan"
        )
    openai = json.dumps(
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "Thanks."}]}
    )
    assert _import(tmp_path, openai, "openai", external) == 0  # appended after the last line
    # review: the messages left out were counted, and the count never shown
    assert "(1 message left out: system, developer, tool and empty ones)" in capsys.readouterr().out
    assert _stored(external)[-1] == (4, "user", "Thanks.", True)
    capsys.readouterr()
    # the first log imported again, after later lines: the conversation holds it, so nothing is
    # stored, and nothing embedded
    import memory.history_import

    def never(texts):  # type: ignore[no-untyped-def]
        raise AssertionError("embedded a log the conversation holds")

    monkeypatch.setattr(memory.history_import, "embed_texts", never)
    assert _import(tmp_path, SILLYTAVERN, "sillytavern", external) == 0
    assert "holds every line of" in capsys.readouterr().out
    assert len(_stored(external)) == 4


def test_a_log_held_only_in_part_is_appended_whole() -> None:
    from memory.history_import import already_held

    a, b, c = (Role.USER, "Hi."), (Role.ASSISTANT, "Aye."), (Role.USER, "Bye.")
    assert already_held([a, b], [c, a, b, c]) and already_held([b], [a, b])
    assert not already_held([b, c], [a, b])  # only its first line ends the conversation: a new log
    assert not already_held([a, c], [a, b, c]) and not already_held([], [a])
    # review: a SillyTavern log whose narrator lines an earlier import stored as the character's is
    # held, not appended again now that they read as the narrator's
    narration = (Role.NARRATOR, "Thunder rolls.")
    assert already_held([a, narration], [a, (Role.ASSISTANT, "Thunder rolls.")])
    from memory.history_import import held_start

    assert held_start([a, b, c, a], [c, a, b]) == 2 and held_start([b, c], [a, b]) == 1
    assert held_start([a, b], [a, b, c]) == 2 and held_start([c], []) == 0


def test_a_grown_export_of_a_log_imported_before_is_refused_not_stored_twice(tmp_path, capsys) -> None:
    """Found in review: a log imported, then its export grown by the player's later lines imported
    again, was appended whole (only a log held whole was known): its first lines were stored twice,
    summarised and read for facts twice, and retrieved in pairs."""
    external = f"grown-{uuid.uuid4().hex[:8]}"
    assert _import(tmp_path, SILLYTAVERN, "sillytavern", external) == 0
    capsys.readouterr()
    later = [
        {"name": "Rowan", "is_user": True, "mes": "The mill was empty."},
        {"name": "Elara", "is_user": False, "mes": "Then try the chapel."},
    ]
    grown = SILLYTAVERN + "\n" + "\n".join(json.dumps(x) for x in later)
    assert _import(tmp_path, grown, "sillytavern", external) == 2
    err = capsys.readouterr().err
    assert "holds the log's first 3 lines already" in err and "(4-5) alone" in err, err
    assert len(_stored(external)) == 3
    rest = "\n".join(json.dumps(x) for x in later)  # the lines after them, alone: appended
    assert _import(tmp_path, rest, "sillytavern", external) == 0
    assert [line[2] for line in _stored(external)][3:] == ["The mill was empty.", "Then try the chapel."]


def test_a_sillytavern_group_chat_is_refused_naming_the_line_of_another_speaker(tmp_path, capsys) -> None:
    """Found in review: a group chat's lines (Elara, Bram, Mira) were all imported as the one
    character's: summaries and facts said Elara said Bram's lines."""
    external = f"group-{uuid.uuid4().hex[:8]}"
    group = _jsonl(
        {"user_name": "Rowan", "character_name": "Elara"},
        {"name": "Elara", "is_user": False, "mes": "Welcome."},
        {"name": "Rowan", "is_user": True, "mes": "Evening, all."},
        {"name": "Bram", "is_user": False, "mes": "Evening."},
    )
    assert _import(tmp_path, group, "sillytavern", external) == 2
    err = capsys.readouterr().err
    assert "line 4: name: 'Bram' is not the log's character ('Elara')" in err and "nothing stored" in err, err
    # SillyTavern's group chat header names no character ("unused"): the first character line does
    unnamed = group.replace('"character_name": "Elara"', '"character_name": "unused"')
    assert _import(tmp_path, unnamed, "sillytavern", external) == 2
    assert "line 4: name: 'Bram' is not the log's character ('Elara')" in capsys.readouterr().err
    assert _stored(external) == []


def test_an_openai_log_of_several_characters_is_refused_and_the_players_name_is_kept(
    tmp_path, capsys
) -> None:
    """Found in review: the OpenAI format read no `name`, so a log where Elara and Bram speak was
    imported as Elara's (Bram's confession remembered as hers), and the player's name was dropped."""
    external = f"named-{uuid.uuid4().hex[:8]}"
    said = [
        {"role": "user", "name": "Rowan", "content": "Evening, all."},
        {"role": "assistant", "name": "Elara", "content": "Welcome."},
        {"role": "assistant", "name": "Bram", "content": "I poisoned the well."},
    ]
    assert _import(tmp_path, json.dumps({"messages": said}), "openai", external) == 2
    err = capsys.readouterr().err
    assert "messages[2].name: 'Bram' is not the log's character ('Elara')" in err and "nothing stored" in err
    assert _stored(external) == []
    assert _import(tmp_path, json.dumps({"messages": said[:2]}), "openai", external) == 0
    with session_scope() as s:
        name = s.scalar(select(Conversation.player_name).where(Conversation.external_id == external))
    assert name == "Rowan" and len(_stored(external)) == 2


def test_the_original_services_history_json_is_imported(tmp_path) -> None:
    external = f"imp-{uuid.uuid4().hex[:8]}"
    body = json.dumps(
        {
            "chat_history": [
                {"role": "user", "content": "안녕, 오늘 기분 어때?"},
                {"role": "assistant", "content": "좋아!"},
            ]
        },
        ensure_ascii=False,
    )
    assert _import(tmp_path, body, "original", external) == 0
    assert [(r, c) for _, r, c, _ in _stored(external)] == [
        ("user", "안녕, 오늘 기분 어때?"),
        ("assistant", "좋아!"),
    ]


@pytest.mark.parametrize(
    ("fmt", "body", "error"),
    [
        (
            "sillytavern",
            SILLYTAVERN.replace('"mes": "Ask at the mill."', '"mes": 42'),
            "line 5: mes: must be a string, got int",
        ),
        ("sillytavern", SILLYTAVERN.replace('{"name": "Rowan"', '{"name": Rowan', 1), "line 3: not JSON"),
        (
            "sillytavern",
            SILLYTAVERN.replace('"is_user": true', '"is_user": "yes"'),
            "line 3: is_user: must be",
        ),
        (
            "openai",
            json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}),
            "messages[1].role: must be one of",
        ),
        ("openai", json.dumps([{"role": "user"}]), "messages[0].content: missing"),
        (  # found in review: no limit, where a run line's history has one (each prompt tokenizes it)
            "openai",
            json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a" * 20_001}]),
            "messages[1].content: 20001 characters; the limit is 20000",
        ),
        ("openai", json.dumps([{"role": "wizard", "content": "x"}]), "user, assistant, character, narrator"),
        (
            "sillytavern",
            json.dumps({"user_name": "R" * 201})
            + "\n"
            + json.dumps({"name": "R", "is_user": True, "mes": "hi"}),
            "line 1: user_name: longer than 200 characters",
        ),
        ("original", '{"chat_history": [\n{"role": "user",\n "content": "hi"},,\n]}', "line 3: not JSON"),
        # A role that is not a string was a TypeError (a traceback); a NUL in the header's user_name a
        # database error after the whole log had been embedded.
        ("openai", json.dumps([{"role": ["user"], "content": "hi"}]), "messages[0].role: must be one of"),
        (
            "sillytavern",
            json.dumps({"user_name": "R\u0000w"})
            + "\n"
            + json.dumps({"name": "R", "is_user": True, "mes": "hi"}),
            "line 1: user_name: ",
        ),
        # Found in review: content parts that were not Chat Completions' text parts (the Responses
        # API's, a bare string, a text that is not one) and a null content with no tool call were
        # dropped as empty messages, and the import said it was whole.
        (
            "openai",
            json.dumps([{"role": "assistant", "content": ["Aye."]}]),
            "messages[0].content[0]: must be",
        ),
        (
            "openai",
            json.dumps([{"role": "user", "content": [{"type": "input_text", "text": 5}]}]),
            "messages[0].content[0].text: must be a string",
        ),
        (
            "openai",
            json.dumps([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "video"}]}]),
            "messages[1].content[0].type: must be one of text, input_text, output_text, refusal",
        ),
        ("openai", json.dumps([{"role": "user", "content": None}]), "messages[0].content: null"),
        (  # found in review: a bad text in a part was named as the whole content
            "openai",
            json.dumps(
                [
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\u0000"}],
                    }
                ]
            ),
            "messages[0].content[1].text: ",
        ),
        # Found in review: another format's file read as SillyTavern's (the default) was "the log
        # holds no user or assistant lines" or "line 1: not JSON", naming no format.
        (
            "sillytavern",
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            "line 1: a document of messages, not a SillyTavern chat; pass --format openai",
        ),
        (
            "sillytavern",
            json.dumps([{"role": "user", "content": "hi"}]),
            "a list of messages is --format openai or original",
        ),
        (  # found in review: a first message without `mes` was taken for the header and dropped
            "sillytavern",
            json.dumps({"name": "Alex", "is_user": True, "message": "I stole the crown."})
            + "\n"
            + json.dumps({"name": "R", "is_user": False, "mes": "You what?"}),
            "line 1: mes: missing",
        ),
    ],
)
def test_a_malformed_log_is_refused_with_line_and_field_and_nothing_is_stored(
    tmp_path, capsys, fmt: str, body: str, error: str
) -> None:
    external = f"imp-{uuid.uuid4().hex[:8]}"
    assert _import(tmp_path, body, fmt, external) == 2
    err = capsys.readouterr().err.strip()
    assert error in err and err.endswith("nothing stored") and len(err.splitlines()) == 1
    assert _stored(external) == []
    with session_scope() as s:  # not even the conversation
        assert (
            s.scalar(
                select(func.count()).select_from(Conversation).where(Conversation.external_id == external)
            )
            == 0
        )


def test_a_log_of_more_lines_than_one_import_takes_is_refused_unembedded(
    tmp_path, capsys, monkeypatch
) -> None:
    """Found in review: a log was bounded in bytes alone, so 100 MB of short lines were millions of
    rows: hours of embedding, every vector held at once, then one INSERT of millions under the
    conversation's lock. MLCHAT_HISTORY_MAX_LINES bounds it, refused before a line is embedded."""
    import memory.history_import as history_import
    from core.settings import settings

    monkeypatch.setattr(settings, "history_max_lines", 3)
    embedded: list[int] = []
    monkeypatch.setattr(history_import, "embed_texts", lambda texts: embedded.append(len(texts)))
    external = f"imp-{uuid.uuid4().hex[:8]}"
    body = "\n".join(json.dumps({"name": "A", "is_user": i % 2 == 0, "mes": f"Line {i}."}) for i in range(4))
    assert _import(tmp_path, body, "sillytavern", external) == 2
    err = capsys.readouterr().err
    assert (
        "4 lines, more than MLCHAT_HISTORY_MAX_LINES (3)" in err
        and embedded == []
        and _stored(external) == []
    )


def test_leading_blank_lines_tool_and_developer_messages_are_skipped_not_refused() -> None:
    from memory.history_import import parse_history

    parsed = parse_history("\n\n" + SILLYTAVERN, "sillytavern")
    assert parsed.user_name is not None and parsed.lines  # the header found after the blank lines
    log = [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": "Where is Mira?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "1", "content": "mill"},
        {"role": "assistant", "content": "By the mill."},
    ]
    parsed = parse_history(json.dumps(log), "openai")
    assert [str(role) for role, _ in parsed.lines] == ["user", "assistant"]
    assert [text for _, text in parsed.lines] == ["Where is Mira?", "By the mill."]
    assert parsed.skipped == 3
    # OpenAI leaves `content` out of a message that only calls tools (it was "content: missing")
    del log[2]["content"]
    assert parse_history(json.dumps(log), "openai").skipped == 3


def test_responses_api_parts_and_a_refusal_are_read_as_the_lines_they_hold() -> None:
    """Found in review: the Responses API's parts (`input_text`, `output_text`) and an assistant's
    `refusal` (content null) were taken for empty messages and left out."""
    from memory.history_import import parse_history

    log = [
        {"role": "user", "content": [{"type": "input_text", "text": "Seen"}, {"type": "input_image"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Aye."}]},
        {"role": "user", "content": "And the ring?"},
        {"role": "assistant", "content": None, "refusal": "I won't say."},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "Nor that."}]},
    ]
    parsed = parse_history(json.dumps({"messages": log}), "openai")
    assert [text for _, text in parsed.lines] == [
        "Seen",
        "Aye.",
        "And the ring?",
        "I won't say.",
        "Nor that.",
    ]
    assert parsed.skipped == 0


def test_a_log_whose_vectors_moved_to_another_embedder_while_it_was_embedded_is_refused_whole(
    monkeypatch,
) -> None:
    """Found in review: a re-embed's swap committed between the log's embedding and its insert, and
    the lines were stored with NULL vectors (the guard trigger) while the import said they were
    imported; imported again, the log was "held already", never to be found by similarity."""
    import memory.history_import as history_import

    # What the swap's commit meanwhile leaves this connection seeing (the record moved on): stubbed,
    # not committed, so no other process of the session adopts a version that is not the stored one.
    from db.vector_space import EmbedderMismatch

    monkeypatch.setattr("db.vector_space.same_space", lambda session: False)
    external = f"imp-{uuid.uuid4().hex[:8]}"
    with pytest.raises(EmbedderMismatch, match="^the log: the stored vectors moved to another embedder"):
        history_import.import_history(SILLYTAVERN, "sillytavern", conversation=external, character="elara")
    assert _stored(external) == []


def test_a_sillytavern_line_holding_a_unicode_line_separator_is_one_line() -> None:
    # JSON.stringify writes U+2028, U+2029 and U+0085 raw inside strings; splitlines() broke the
    # message in two ("line 2: not JSON") and every later line number was off by one. A BOM and
    # Windows line ends are read too.
    from memory.history_import import parse_history

    said = "Two lines\u2028in one\u2029message\u0085here."
    raw = "\ufeff" + "\r\n".join(
        [json.dumps({"user_name": "Rowan"}, ensure_ascii=False)]
        + [json.dumps({"name": "Rowan", "is_user": True, "mes": said}, ensure_ascii=False)]
    )
    parsed = parse_history(raw, "sillytavern")
    assert [text for _, text in parsed.lines] == [said] and parsed.user_name == "Rowan"
    bom_json = "\ufeff" + json.dumps([{"role": "user", "content": said}])  # the JSON formats too
    assert [text for _, text in parse_history(bom_json, "openai").lines] == [said]


def test_a_log_for_an_unknown_character_or_anothers_conversation_is_refused_before_it_is_embedded(
    monkeypatch,
) -> None:
    """Found in review: the log was embedded whole (minutes for a long one) before the character
    was looked up, only to be refused."""
    from memory import history_import

    def embedded(texts: list[str]) -> None:
        raise AssertionError("embedded before the refusal")

    external = f"imp-{uuid.uuid4().hex[:8]}"
    history_import.import_history(SILLYTAVERN, "sillytavern", conversation=external, character="elara")
    monkeypatch.setattr(history_import, "embed_texts", embedded)
    with pytest.raises(history_import.HistoryRefused, match="^character: no character 'nobody-here'$"):
        history_import.import_history(
            SILLYTAVERN, "sillytavern", conversation=f"imp-{uuid.uuid4().hex[:8]}", character="nobody-here"
        )
    other = next(slug for slug in _character_slugs() if slug != "elara")
    with pytest.raises(history_import.HistoryRefused, match=f"^conversation: '{external}' is another"):
        history_import.import_history(SILLYTAVERN, "sillytavern", conversation=external, character=other)


def test_a_log_for_another_players_conversation_is_refused_naming_the_conversation(services, world) -> None:
    """Found in review: an import naming a player appended its lines to a conversation that was
    another player's (only the character was compared), so they became that player's memory."""
    from db.history import conversation_lines
    from memory import history_import

    external = f"imp-{uuid.uuid4().hex[:8]}"
    conv_id, *_ = history_import.import_history(
        SILLYTAVERN, "sillytavern", conversation=external, character="elara", player_id="u-alice"
    )
    with session_scope() as s:
        held = len(conversation_lines(session=s, conversation_id=conv_id))
    # its own opening: a log opening as the one held is a grown export of it (refused, tested above)
    other_log = SILLYTAVERN.replace("Welcome to the Gilded Stag.", "Welcome back.")
    assert other_log != SILLYTAVERN
    refusal = f"^conversation: '{external}' is player 'u-alice''s, not player 'u-bob''s$"
    with pytest.raises(history_import.HistoryRefused, match=refusal):
        history_import.import_history(
            other_log, "sillytavern", conversation=external, character="elara", player_id="u-bob"
        )
    with session_scope() as s:
        assert len(conversation_lines(session=s, conversation_id=conv_id)) == held  # nothing appended
    _, first, last, _ = history_import.import_history(
        other_log, "sillytavern", conversation=external, character="elara", player_id="u-alice"
    )
    assert last >= first  # its own player's log is taken


def _character_slugs() -> list[str]:
    from db.world import all_character_slugs

    with session_scope() as s:
        return all_character_slugs(session=s)


def test_a_sillytavern_narrator_line_is_imported_as_the_narrators(tmp_path) -> None:
    """Found in review: SillyTavern's narrator lines (/sys: not the user's, not hidden, extra.type
    "narrator") were imported as the character's own, so summaries and facts credited the NPC."""
    external = f"imp-{uuid.uuid4().hex[:8]}"
    body = _jsonl(
        {"user_name": "Rowan", "character_name": "Elara"},
        {"name": "Elara", "is_user": False, "mes": "Welcome."},
        {
            "name": "System",
            "is_user": False,
            "is_system": False,
            "mes": "Thunder rolls.",
            "extra": {"type": "narrator"},
        },
    )
    assert _import(tmp_path, body, "sillytavern", external) == 0
    assert [(role, text) for _, role, text, _ in _stored(external)] == [
        ("assistant", "Welcome."),
        ("narrator", "Thunder rolls."),
    ]


def test_an_import_under_a_tenant_no_key_can_name_is_refused(tmp_path, capsys) -> None:
    """Found in review: the import checked the tenant's length only, so `--tenant "Acme Corp"` stored
    a conversation no API key could ever reach, and said it was imported."""
    external = f"imp-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "log.sillytavern"
    log.write_text(SILLYTAVERN, encoding="utf-8")
    args = ["history", "import", str(log), "--format", "sillytavern", "--conversation", external]
    assert cli([*args, "--character", "elara", "--tenant", "Acme Corp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "tenant: may hold only letters, digits" in err and len(err.splitlines()) == 1
    with session_scope() as s:
        assert (
            s.scalar(
                select(func.count()).select_from(Conversation).where(Conversation.external_id == external)
            )
            == 0
        )


def test_a_log_is_not_added_to_a_scenes_conversation(tmp_path, capsys) -> None:
    """Found in review: an import appended a chat log to a live group's (or a run's scene's)
    conversation, whose lines name their speakers: the log's lines read "?" in its transcript and
    "Someone" in its prompts. Refused in one line naming `conversation`, nothing appended."""
    from scenes.spec import GroupSpec
    from services.scenes import start_group

    external = f"group-{uuid.uuid4().hex[:10]}"
    start_group(GroupSpec.model_validate({"conversation": external, "participants": ["elara", "luffy"]}))
    before = _stored(external)
    assert _import(tmp_path, SILLYTAVERN, "sillytavern", external) == 2
    err = capsys.readouterr().err.strip()
    assert f"conversation: {external!r} holds a scene" in err and len(err.splitlines()) == 1
    assert _stored(external) == before
