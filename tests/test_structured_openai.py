"""response_format through the official `openai` client: a batch file of json_schema, json_object
and text lines (each structured line's content parses and validates; a schema the grammar cannot
enforce is refused alone, naming its field), a live chat completion asking for a JSON schema, a
character with declared actions answering a plain request in text and `npc` in its JSON shape, and
a line of n choices answered with n choices or failed with its reason."""

import json
import uuid

import openai
import pytest
from jsonschema import Draft202012Validator

from services.characters import import_card
from services.producer import get_turn
from tests.conftest import INGEST_KEY
from tests.test_openai_batches import openai_line
from tests.test_openai_client import TERMINAL, _client, _jsonl, _upload, _wait

QUEST = {
    "type": "object",
    "properties": {
        "quest": {"type": "string", "maxLength": 40},
        "reward_gold": {"type": "integer", "minimum": 0, "maximum": 1000},
        "danger": {"enum": ["low", "medium", "high"]},
    },
    "required": ["quest", "reward_gold", "danger"],
    "additionalProperties": False,
}


def _schema(schema: dict, name: str = "quest") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_a_batch_of_json_schema_json_object_and_text_lines_through_the_openai_client(
    base_url, celery_worker, tmp_path
) -> None:
    client = _client(base_url)
    ask = [{"role": "user", "content": "Any work for a sellsword?"}]
    lines = [
        openai_line(f"schema-{i}", ask, response_format=_schema(QUEST), max_completion_tokens=64, seed=i)
        for i in range(4)
    ]
    lines += [
        # Seeded: unseeded, both lines ran past their budget in one clone of 2026-12-02 (the 135M
        # model may write an open object on); with these seeds both closed in it in three runs here.
        openai_line(
            f"object-{i}",
            ask,
            response_format={"type": "json_object"},
            max_completion_tokens=256,
            seed=100 + i,
        )
        for i in range(2)
    ]
    lines += [openai_line("text-0", ask, response_format={"type": "text"}, max_completion_tokens=16)]
    lines += [openai_line("plain-0", ask, max_completion_tokens=16)]
    unenforceable = {**QUEST, "properties": {**QUEST["properties"], "danger": {"not": {"const": "low"}}}}
    lines += [openai_line("refused-0", ask, response_format=_schema(unenforceable))]
    lines += [openai_line("refused-1", ask, response_format={"type": "regex", "regex": "a+"})]

    batch = client.batches.create(
        input_file_id=_upload(client, tmp_path / "structured.jsonl", lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _wait(client, batch.id, TERMINAL)
    assert done.status == "completed", done
    output = {x["custom_id"]: x for x in _jsonl(client, done.output_file_id)}
    errors = {x["custom_id"]: x for x in _jsonl(client, done.error_file_id)}
    # A bounded schema always closes in its budget; an open JSON object may not, on a 135M model:
    # such a line is answered in the error file with its code, never with content that does not parse.
    cut = {c for c in errors if c.startswith("object")}
    assert len(cut) < 2, errors  # at least one open object closes in its budget and is read
    assert all(errors[c]["response"]["body"]["error"]["code"] == "structured_reply_cut" for c in cut), errors
    expected = {"schema-0", "schema-1", "schema-2", "schema-3", "object-0", "object-1", "text-0", "plain-0"}
    assert set(output) | cut == expected and not set(output) & cut
    for custom_id, line in output.items():
        content = line["response"]["body"]["choices"][0]["message"]["content"]
        assert line["response"]["status_code"] == 200 and content
        if custom_id.startswith("schema"):
            assert not list(Draft202012Validator(QUEST).iter_errors(json.loads(content))), content
        elif custom_id.startswith("object"):
            assert isinstance(json.loads(content), dict), content

    assert set(errors) - cut == {"refused-0", "refused-1"}
    refused = errors["refused-0"]["response"]["body"]["error"]
    assert errors["refused-0"]["response"]["status_code"] == 400
    assert "body.response_format" in refused["message"]
    assert "json_schema.schema.properties.danger.not" in refused["message"]
    assert "body.response_format.type" in errors["refused-1"]["response"]["body"]["error"]["message"]


def test_a_live_chat_completion_honours_a_json_schema(base_url, celery_worker) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0, timeout=300)
    answer = client.chat.completions.create(
        model="elara",
        messages=[{"role": "user", "content": "Offer me a quest."}],
        response_format=_schema(QUEST),  # type: ignore[arg-type]
        max_tokens=64,
        seed=3,
    )
    content = answer.choices[0].message.content or ""
    assert not list(Draft202012Validator(QUEST).iter_errors(json.loads(content))), content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="elara",
            messages=[{"role": "user", "content": "Offer me a quest."}],
            response_format=_schema({"type": "array", "uniqueItems": True}),  # type: ignore[arg-type]
        )
    assert "response_format.json_schema.schema.uniqueItems" in str(refused.value)


GIVE = {"name": "give_item", "description": "Hand the player an item.", "args": {"item": {"type": "string"}}}
ATTACK = {"name": "attack", "description": "Draw steel on someone.", "args": {"target": {"type": "string"}}}


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def test_a_plain_openai_request_to_a_character_with_actions_is_answered_in_text_and_npc_asks_for_json(
    base_url, celery_worker, tmp_path
) -> None:
    card = {
        "name": "Brom the Smith",
        "description": "A gruff blacksmith of the north road.",
        "personality": "gruff, honest",
        "extensions": {"mlchat": {"actions": [GIVE, ATTACK]}},
    }
    import_card(
        json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": card}).encode(),
        slug="brom-openai",
    )
    ask = [{"role": "user", "content": "Got a blade for me, smith?"}]
    live = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0, timeout=300)
    answer = live.chat.completions.create(model="brom-openai", messages=ask, max_tokens=32, seed=2)  # type: ignore[arg-type]
    content = answer.choices[0].message.content or ""
    assert content.strip() and _json_object(content) is None, (
        content
    )  # text, as a client that asked for none reads it
    turn = get_turn(uuid.UUID(answer.id.removeprefix("chatcmpl-")))
    assert turn.structured is None and turn.reply == content and "[Actions]" not in turn.prompt

    client = _client(base_url)
    lines = [
        openai_line("plain", ask, model="brom-openai", max_completion_tokens=32, seed=2),
        openai_line(
            "npc", ask, model="brom-openai", response_format={"type": "npc"}, max_completion_tokens=32
        ),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, tmp_path / "npc.jsonl", lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _wait(client, batch.id, TERMINAL)
    assert done.status == "completed", done
    output = {x["custom_id"]: x["response"]["body"] for x in _jsonl(client, done.output_file_id)}
    assert set(output) == {"plain", "npc"}, _jsonl(client, done.error_file_id)
    assert done.error_file_id is None  # no request failed: no error file, as OpenAI leaves it null
    plain = output["plain"]["choices"][0]["message"]["content"]
    assert plain.strip() and _json_object(plain) is None, plain
    npc = _json_object(output["npc"]["choices"][0]["message"]["content"])
    assert npc is not None and set(npc) == {"say", "emotion", "action"}, output["npc"]
    assert npc["action"] is None or npc["action"]["name"] in ("give_item", "attack")


LONG_YES = "yes, and I will tell you the whole tale of the northern road, every inn and every bridge of it"
YES_OR_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["no", LONG_YES]}},
    "required": ["answer"],
    "additionalProperties": False,
}


def test_a_line_asking_n_choices_gets_n_or_fails_with_the_reason_when_a_candidate_is_cut(
    base_url, celery_worker, tmp_path
) -> None:
    client = _client(base_url)
    ask = [{"role": "user", "content": "Will you tell me the tale of the road? Answer yes or no."}]
    # "no" closes in a few tokens; the long "yes" cannot close in 20: candidates of one line differ.
    lines = [
        openai_line(
            f"n-{seed}", ask, response_format=_schema(YES_OR_NO, "yes_or_no"), n=4,
            max_completion_tokens=20, temperature=1.5, seed=seed,
        )
        for seed in (0, 10, 20, 30, 40, 50)
    ]  # fmt: skip
    batch = client.batches.create(
        input_file_id=_upload(client, tmp_path / "choices.jsonl", lines),
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    done = _wait(client, batch.id, TERMINAL)
    output = {x["custom_id"]: x for x in _jsonl(client, done.output_file_id)}
    errors = {x["custom_id"]: x for x in _jsonl(client, done.error_file_id)}
    assert set(output) | set(errors) == {x["custom_id"] for x in lines} and not set(output) & set(errors)
    for line in output.values():  # every choice the client indexes is there, and reads
        choices = line["response"]["body"]["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3], choices
        for choice in choices:
            value = json.loads(choice["message"]["content"])
            assert not list(Draft202012Validator(YES_OR_NO).iter_errors(value)), choice
    # Which lines get a cut candidate depends on sampling: each line has its 4 choices (above) or
    # this error; that some candidates read while one was cut is the unit test's (test_structured_shapes).
    for line in errors.values():  # the request's fault, with the reason and the way out
        error = line["response"]["body"]["error"]
        assert line["response"]["status_code"] == 400 and error["code"] == "structured_reply_cut", error
        assert "raise it (max_tokens or max_completion_tokens in an OpenAI request" in error["message"]
