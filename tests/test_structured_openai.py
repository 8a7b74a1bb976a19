"""response_format through the official `openai` client: a batch file of json_schema, json_object
and text lines (each structured line's content parses and validates; a schema the grammar cannot
enforce is refused alone, naming its field), and a live chat completion asking for a JSON schema."""

import json

import openai
import pytest
from jsonschema import Draft202012Validator

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
        openai_line(f"object-{i}", ask, response_format={"type": "json_object"}, max_completion_tokens=256)
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
