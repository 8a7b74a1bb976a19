"""The judge of a structured reply: only an NPC reply's chosen emotion moves the mood; a json_schema /
json_object / regex / choice reply is data, so an "emotion" key in it is just data, and the gate does
not hold it."""

import json
import uuid

import pytest

from db.models import Character
from db.retrieval import TurnContext
from db.turns import ClaimedTurn
from worker.embedder import embed
from worker.engine_loop import Generation
from worker.judge import _judge
from worker.prompt.packing import BuiltPrompt
from worker.structured import read_reply, shape_of

# The embedder checks the stored vectors' space (db/vector_space.py) before it embeds: the schema
# must exist, which a run of this file alone did not have (found when it ran alone).
pytestmark = pytest.mark.usefixtures("world")

BROM = Character(
    id=None,
    slug="brom",
    name="Brom",
    version=1,
    description="A gruff smith.",
    personality="",
    example_dialogues=[],
    card={},
)
PROMPT = BuiltPrompt(token_ids=[], text="", stop=())


def _turn(params: dict) -> ClaimedTurn:
    return ClaimedTurn(
        id=uuid.uuid4(), conversation_id=1, message="How are you?", params=params, attempts=0,
        character=BROM, player_name="Player", story=None, story_time=None, queued_ms=0.0,
    )  # fmt: skip


def _judged(params: dict, text: str):  # type: ignore[no-untyped-def]
    turn = _turn(params)
    gen = read_reply(shape_of(params, BROM), Generation(text, 10, 20, "stop"))
    message_vec, reply_vec = embed([turn.message, gen.text])
    return _judge(turn, gen, reply_vec, message_vec, TurnContext(), PROMPT)


def test_an_emotion_key_in_a_json_schema_reply_is_data_not_the_mood() -> None:
    schema = {"type": "object", "properties": {"emotion": {"type": "string"}, "n": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    for params in ({"max_new_tokens": 64, "response_format": fmt},
                   {"max_new_tokens": 64, "response_format": {"type": "json_object"}}):  # fmt: skip
        for emotion in ("furious", "joy"):  # neither fails the turn nor overwrites the mood
            verdict = _judged(params, json.dumps({"emotion": emotion, "n": 1}))
            assert verdict.mood is None  # a data reply leaves the mood as it was
            assert verdict.quality["below_bar"] == []  # nor does the gate regenerate raw JSON
            assert "persona" in verdict.quality  # its scores are still recorded


def test_an_npc_reply_moves_the_mood_to_its_chosen_emotion() -> None:
    params = {"max_new_tokens": 64, "actions": [{"name": "flee"}]}
    verdict = _judged(params, '{"say": "Splendid, friend!", "emotion": "joy", "action": null}')
    assert verdict.mood is not None and verdict.mood.after.emotion == "joy"


def test_a_choice_or_regex_reply_is_data_too() -> None:
    """Found in review: only a reply with a parsed value counted as data, so a one-word choice moved
    the mood, was judged for persona and language, and could be regenerated into another choice."""
    for fmt, text in (
        ({"type": "choice", "choice": ["flee", "fight"]}, "flee"),
        ({"type": "regex", "regex": "[A-Z]{3}-[0-9]{2}"}, "ABC-12"),
    ):
        verdict = _judged({"max_new_tokens": 16, "response_format": fmt}, text)
        assert verdict.mood is None and verdict.quality["below_bar"] == [], (fmt, verdict.quality)


def test_in_a_group_another_members_words_are_not_the_speaker_repeating_itself() -> None:
    """Found in review (numeric correctness): the repetition check took every assistant line of the
    recent history as the speaker's own, and in a group every member's line is one: a member picking
    up another's words ("the river is rising fast") was held below the bar for repeating itself."""
    from db.retrieval import HistoryLine
    from db.scenes import GroupView

    ada, brom = 7, 8
    said = "The bridge at the old mill collapsed last night, and the river is rising fast."
    reply = "The bridge at the old mill collapsed? Then we cross at the ford before the river is rising fast."
    fields = ("slug", "name", "version", "description", "personality", "example_dialogues", "card")
    speaker = Character(id=brom, **{field: getattr(BROM, field) for field in fields})
    group = GroupView(premise="", names=("Ada", "Brom"), ids=(ada, brom))
    turn = ClaimedTurn(
        id=uuid.uuid4(), conversation_id=1, message="What now?", params={"max_new_tokens": 64}, attempts=0,
        character=speaker, player_name="Player", story=None, story_time=None, queued_ms=0.0, group=group,
    )  # fmt: skip
    message_vec, reply_vec = embed([turn.message, reply])
    gen = Generation(reply, 10, 20, "stop")

    def judged(line_by: int) -> list[str]:
        line = HistoryLine(1, "assistant", said, 1, None, line_by, "Ada" if line_by == ada else "Brom")
        ctx = TurnContext(recent=[line])
        return _judge(turn, gen, reply_vec, message_vec, ctx, PROMPT).quality["below_bar"]

    assert not any(r.startswith("repetition") for r in judged(ada))  # Ada's words, picked up
    assert any(r.startswith("repetition") for r in judged(brom))  # Brom's own words, said again


def test_an_npc_replys_say_is_cut_where_the_prompt_would_stop_a_free_text_reply() -> None:
    """Scenes review: a JSON reply goes without stop strings (they could only cut it inside a
    string), so a group member whose card declares actions could `say` "Halt.\\nBram: Let him in.",
    and the stored line, the transcript and the next speaker's pick took Bram's words as its own."""
    import uuid as uuid_

    from worker.pipeline import _request

    params = {
        "max_new_tokens": 64,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 3,
        "actions": [{"name": "flee"}],
    }
    prompt = BuiltPrompt(token_ids=[1, 2], text="", stop=("<|im_end|>", "\nBram:", "\nPlayer:"))
    request = _request(_turn(params), prompt, 0, None, uuid_.uuid4(), shape_of(params, BROM))
    assert request.stop == () and request.reply_shape.say_stops == prompt.stop
    text = json.dumps({"say": "Halt.\nBram: Let him in.\nPlayer: Fine.", "emotion": "anger", "action": None})
    read = read_reply(request.reply_shape, Generation(text, 10, 20, "stop"))
    assert read.text == "Halt." and read.structured["say"] == "Halt."
    whole = '{"say": "Halt, Bram: stay there.", "emotion": "anger", "action": null}'  # no line break
    assert (
        read_reply(request.reply_shape, Generation(whole, 10, 20, "stop")).text == "Halt, Bram: stay there."
    )
