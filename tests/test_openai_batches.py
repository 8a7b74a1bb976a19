"""OpenAI Batch format and batch lifecycle on the real PostgreSQL and Redis, without a worker:
line mapping and refusals, seeded history, the OpenAI output shape, expiry, finalizing once, signed
callbacks. The round trip with the `openai` client on the real worker is in test_openai_client.py."""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import delete, func, select, update

from core.settings import queue_for_model, settings
from db.models import (
    Character,
    Conversation,
    Message,
    Run,
    RunStatus,
    StoredFile,
    Turn,
    TurnErrorCode,
    TurnStatus,
)
from db.runs import cancel_run, finalizing_runs
from db.session import get_engine, session_scope
from db.turns import Failure, claim_turns, fail_turns
from services import batches
from services.callbacks import sign, verify_signature
from services.runs import RunValidationError, export_run, submit_run
from services.runs.openai_lines import LineOptions
from services.runs.validate import file_digest
from tasks.app import app
from tests.conftest import INGEST_KEY, fake_lookups, patch_on_this_thread

MODEL = "batches-check"  # a queue no worker consumes


@pytest.fixture()
def quiet_model(world, monkeypatch, tmp_path):
    monkeypatch.setattr(settings, "model", MODEL)
    monkeypatch.setattr(settings, "served_models", [MODEL])
    monkeypatch.setattr(settings, "files_dir", tmp_path / "files")
    yield MODEL
    with app.connection_for_write() as conn:
        for lane in ("live", "bulk"):
            conn.default_channel.queue_purge(queue_for_model(MODEL, lane))


def openai_line(custom_id: str, messages: list[dict], **body) -> dict:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "elara", "messages": messages} | body,
    }


def _write(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


USER = [{"role": "user", "content": "Where is the tower?"}]


def test_a_line_no_pick_can_be_made_for_gets_one_candidate_not_the_runs_best_of_n(
    quiet_model, tmp_path
) -> None:
    """Found in review (stop 76): every bulk line without `n` got the run's candidates (2), paid for
    each, where no pick can be made: greedy sampling draws one reply for every seed, and a data reply
    is held by none of the gate's checks. An OpenAI line's `n: 1` was taken for no n at all."""
    lines = [
        openai_line("greedy", USER, temperature=0),
        openai_line("json", USER, response_format={"type": "json_object"}),
        openai_line("one", USER, n=1),
        openai_line("plain", USER),
    ]
    path = _write(tmp_path / "oa.jsonl", lines)
    options = LineOptions(default_character="haneul", candidates=2)
    sub = submit_run(path, name="picks-" + tmp_path.name, options=options)
    native = _write(
        tmp_path / "native.jsonl",
        [
            {"custom_id": "top-k", "character": "elara", "message": "Hi.", "params": {"top_k": 1}},
            {
                "custom_id": "regex",
                "character": "elara",
                "message": "Hi.",
                "params": {"response_format": {"type": "regex", "regex": "[0-9]{4}"}},
            },
            {"custom_id": "free", "character": "elara", "message": "Hi."},
            # review: a line returning 2 choices gets 2 candidates, greedy or not
            {
                "custom_id": "two",
                "character": "elara",
                "message": "Hi.",
                "choices": 2,
                "params": {"temperature": 0},
            },
        ],
    )
    other = submit_run(native, name="picks-native-" + tmp_path.name, options=LineOptions(candidates=3))
    with session_scope() as s:
        n = {
            t.custom_id: t.params["n"]
            for t in s.scalars(select(Turn).where(Turn.run_id.in_([sub.id, other.id])))
        }
    assert n == {"greedy": 1, "json": 1, "one": 1, "plain": 2, "top-k": 1, "regex": 1, "free": 3, "two": 2}, n


def test_an_npc_reply_sent_back_in_a_lines_history_is_kept_as_its_say(quiet_model, tmp_path) -> None:
    """Found in review (stop 76): an NPC reply as mlchat returns it (`content` the JSON), sent back
    by an OpenAI client in a later request's messages, was stored whole as the character's line:
    every later prompt, summary and repetition check read JSON where mlchat's own NPC lines keep
    the say. A line that asks for no NPC reply keeps its assistant messages as they are."""
    said = json.dumps({"say": "The tower is north.", "emotion": "neutral", "action": None})
    history = [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": said}, *USER]
    lines = [
        openai_line("npc", history, response_format={"type": "npc"}),
        openai_line("text", history),
    ]
    sub = submit_run(
        _write(tmp_path / "oa.jsonl", lines),
        name="said-" + tmp_path.name,
        options=LineOptions(default_character="haneul"),
    )
    with session_scope() as s:
        kept = {
            t.custom_id: s.scalars(
                select(Message.content)
                .where(Message.conversation_id == t.conversation_id, Message.role == "assistant")
                .order_by(Message.seq)
            ).first()
            for t in s.scalars(select(Turn).where(Turn.run_id == sub.id))
        }
    assert kept == {"npc": "The tower is north.", "text": said}


def test_openai_lines_map_onto_turns_with_history_and_params(quiet_model, tmp_path) -> None:
    lines = [
        openai_line(
            "a",
            [
                {"role": "user", "content": "Hello, wizard."},
                {"role": "assistant", "content": "Greetings, traveller."},
                {"role": "user", "content": [{"type": "text", "text": "Teach me a spell."}]},
            ],
            max_completion_tokens=12,
            temperature=0.3,
            top_p=0.8,
            seed=7,
            stop="END",
            frequency_penalty=0.5,
            presence_penalty=-0.25,
            user="player-9",
        ),
        openai_line("b", USER, model="gpt-4o-mini", metadata={"character": "luffy"}, max_tokens=5, n=2),
        openai_line("c", USER, model="anything"),  # the run's default character
    ]
    path = _write(tmp_path / "oa.jsonl", lines)
    sub = submit_run(path, name="oa-" + tmp_path.name, options=LineOptions(default_character="haneul"))
    assert sub.stored == 3 and sub.sent == 3
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.input_format == "openai"
        turns = {t.custom_id: t for t in s.scalars(select(Turn).where(Turn.run_id == sub.id))}
        a = turns["a"]
        assert a.message == "Teach me a spell."
        p = a.params
        assert (p["max_new_tokens"], p["temperature"], p["top_p"], p["seed"], p["stop"]) == (
            12,
            0.3,
            0.8,
            7,
            ["END"],
        )
        assert (p["frequency_penalty"], p["presence_penalty"]) == (0.5, -0.25)
        assert (turns["b"].params["n"], turns["b"].params["choices"]) == (2, 2)  # n choices: best of n
        assert "choices" not in p and turns["b"].params["max_new_tokens"] == 5
        history = s.execute(
            select(Message.seq, Message.role, Message.content)
            .where(Message.conversation_id == a.conversation_id)
            .order_by(Message.seq)
        ).all()
        assert [(seq, role.value, text) for seq, role, text in history] == [
            (1, "user", "Hello, wizard."),
            (2, "assistant", "Greetings, traveller."),
        ]
        assert len({t.conversation_id for t in turns.values()}) == 3  # each line a fresh conversation
    with session_scope() as s:
        owner = dict(
            s.execute(
                select(Turn.custom_id, Character.slug)
                .join(Conversation, Conversation.id == Turn.conversation_id)
                .join(Character, Character.id == Conversation.character_id)
                .where(Turn.run_id == sub.id)
            ).all()
        )
    assert owner == {"a": "elara", "b": "luffy", "c": "haneul"}
    # Resubmitting the same file stores nothing twice and seeds no history twice.
    again = submit_run(path, name="oa-" + tmp_path.name)
    assert again.stored == 0 and not again.created
    with session_scope() as s:
        n = s.scalar(
            select(func.count()).select_from(Message).where(Message.conversation_id == a.conversation_id)
        )
    assert n == 2


LONG = "x" * (settings.max_message_chars + 1)


def test_the_off_values_tooling_sends_by_default_are_accepted_and_any_other_refused() -> None:
    """Found in review: `top_logprobs: 0`, `logit_bias: {}`, `tools: []` and `tool_choice: "none"`,
    which wrappers send as their defaults and which ask for nothing, were refused as if set."""
    from services.runs.openai_lines import RequestRefused, to_run_line

    off = {
        "top_logprobs": 0,
        "logit_bias": {},
        "tools": [],
        "tool_choice": "none",
        "parallel_tool_calls": True,
    }
    off |= {"functions": [], "function_call": "none", "logprobs": False, "stream": False, "audio": None}
    line = to_run_line(openai_line("off", USER, **off), ["elara"], LineOptions())
    assert line["character"] == "elara"
    for name, value in [
        ("top_logprobs", 3),
        ("logit_bias", {"50256": -100}),
        ("tool_choice", "auto"),
        ("logprobs", 0),
    ]:
        with pytest.raises((ValueError, RequestRefused), match=f"body.{name}: "):
            to_run_line(openai_line("on", USER, **{name: value}), ["elara"], LineOptions())


def test_a_refused_lines_param_names_the_field_as_openai_does() -> None:
    """Found in review: the live route's error said `param: "max_tokens"`, a refused batch line's
    error file `"body.max_tokens"`: a client matching `param` missed one of them."""
    from services.runs.validate import param_of

    assert param_of("body.max_tokens: must be at most 1024") == "max_tokens"
    assert param_of("body.messages[0].content: empty") == "messages[0].content"
    assert param_of("url: '/v1/embeddings'; only /v1/chat/completions") == "url"
    assert param_of("conversation: another character's") == "conversation"
    assert param_of("not valid JSON at character 3") is None


# Well-formed requests mlchat refuses by its own policy: each is answered alone in the error file.
REFUSED = [
    (openai_line("long", [{"role": "user", "content": LONG}]), "body.messages[0].content: "),
    (openai_line("t", USER, tools=[{"type": "function"}]), "body.tools: tool calls are not supported"),
    (openai_line("st", USER, stream=True), "body.stream: streaming"),
    (openai_line("lp", USER, logprobs=True), "body.logprobs"),
    (openai_line("n", USER, n=9), "body.n: 9; between 1 and 8"),
    (openai_line("u", USER, colour="red"), "body.colour: Extra inputs"),
    # the name the line used, not the turn's own `max_new_tokens` (review)
    (openai_line("m", USER, max_tokens=999_999), "body.max_tokens: must be at most"),
    (openai_line("tp", USER, temperature=3), "body.temperature"),
    (openai_line("fp", USER, frequency_penalty=5), "body.frequency_penalty"),
    (
        openai_line("last", [*USER, {"role": "assistant", "content": "Hm."}]),
        "the last message must be the player's",
    ),
    (
        openai_line("img", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        # review: named the union's branch (`content.function-after[storable_text(), str]`) and said
        # "Input should be a valid string" of a list of parts
        "body.messages[0].content[0].type: Input should be 'text'",
    ),
    (
        openai_line("nul-part", [{"role": "user", "content": [{"type": "text", "text": "a\u0000"}]}]),
        "body.messages[0].content[0].text: contains a NUL character",
    ),
    (
        openai_line("num", [{"role": "user", "content": 5}]),
        "body.messages[0].content: must be a string or a list of text parts",
    ),
    (  # review: refused for its tool_call_id ("Extra inputs are not permitted"), not for its role
        openai_line("tcid", [{"role": "tool", "tool_call_id": "a", "content": "x"}, *USER]),
        "body.messages[0].role: 'tool'",
    ),
    (openai_line("who", USER, model="nobody"), "body.model: 'nobody' is not a character"),
    (openai_line("mc", USER, model="x", metadata={"character": "ghost"}), "body.metadata.character: unknown"),
    (  # review: the live endpoint's conversation, taken and dropped unsaid (a new conversation answered)
        openai_line("mcv", USER, metadata={"conversation": "p42-elara"}),
        "body.metadata.conversation: a batch line is answered in a conversation of its own",
    ),
    (openai_line("empty", [{"role": "user", "content": "   "}]), "body.messages[0].content: empty"),
    (openai_line("tool", [{"role": "tool", "content": "x"}, *USER]), "body.messages[0].role: 'tool'"),
    (  # a reply sent back may carry its (empty) tool calls; one that made some asked for tools
        openai_line("tc", [*USER, {"role": "assistant", "content": "Hm.", "tool_calls": [{}]}, *USER]),
        "body.messages[1].tool_calls: tool calls are not supported",
    ),
    (  # a NUL in a schema's property name would fail the JSONB insert of the whole chunk
        openai_line(
            "nul",
            USER,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "r",
                    "schema": {"type": "object", "properties": {"a\u0000": {"type": "string"}}},
                },
            },
        ),
        "body.response_format.json_schema.schema.properties (a key): contains a NUL",
    ),  # fmt: skip
    (
        openai_line(
            "sur",
            USER,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "r", "description": "\ud800", "schema": {"type": "string"}},
            },
        ),
        "body.response_format.json_schema.description: contains a lone surrogate",
    ),  # fmt: skip
]


def test_a_reply_sent_back_as_the_openai_client_sends_it_and_its_newer_hints_are_accepted() -> None:
    # Found in review: the client sends a response's message back as it came (`refusal: null` and
    # all, `model_dump(exclude_unset=True)`), and every such conversation's next request was refused.
    from openai.types.chat import ChatCompletion

    from services.runs.openai_lines import to_run_line

    reply = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "elara",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "content": "North, past the mill.",
                    "refusal": None,
                    "annotations": [],
                    "tool_calls": None,
                },
            }
        ],
    }
    sent_back = ChatCompletion.model_validate(reply).choices[0].message.model_dump(exclude_unset=True)
    assert "refusal" in sent_back  # what the client sends, as its own transform does
    hints = {"safety_identifier": "u1", "prompt_cache_key": "k", "verbosity": "low"}
    line = openai_line("back", [*USER, sent_back, {"role": "user", "content": "And then?"}], **hints)
    native = to_run_line(line, {"elara"}, LineOptions())
    assert native["message"] == "And then?"
    assert native["history"] == [
        {"role": "user", "content": "Where is the tower?"},
        {"role": "assistant", "content": "North, past the mill."},
    ]
    # review: a refusal sent back (content null) was "content: empty"; it is what the model said
    refusal = {"role": "assistant", "content": None, "refusal": "I won't say."}
    line = openai_line("refused-back", [*USER, refusal, {"role": "user", "content": "Why not?"}])
    assert to_run_line(line, {"elara"}, LineOptions())["history"][1] == {
        "role": "assistant",
        "content": "I won't say.",
    }


# Lines that are not well-formed requests: the whole file fails, as at OpenAI.
MALFORMED = [
    ("{broken", "not valid JSON"),
    ({"method": "POST", "url": "/v1/chat/completions", "body": {}}, "custom_id: Field required"),
    (openai_line("ok", USER), "duplicate custom_id 'ok'"),
    ({**openai_line("url", USER), "url": "/v1/embeddings"}, "url: '/v1/embeddings'"),
    ({**openai_line("get", USER), "method": "GET"}, "method: 'GET'"),
]


def test_a_refused_request_fails_alone_and_the_other_lines_are_answered(quiet_model, tmp_path) -> None:
    path = _write(tmp_path / "mixed.jsonl", [openai_line("ok", USER)] + [line for line, _ in REFUSED])
    sub = submit_run(path, name="oa-mixed-" + tmp_path.name, fields={"input_file_id": "file-test"})
    assert sub.stored == 1 and sub.sent == 1 and sub.status == RunStatus.QUEUED
    with session_scope() as s:
        assert s.scalars(select(Turn.custom_id).where(Turn.run_id == sub.id)).all() == ["ok"]
        counts = batches.batch_object(s, s.get_one(Run, sub.id))["request_counts"]
    assert counts == {"total": 1 + len(REFUSED), "completed": 0, "failed": len(REFUSED)}
    _, errors, n_ok, n_err = export_run(sub.name, tmp_path / "out", "openai")
    assert (n_ok, n_err) == (0, len(REFUSED))
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in errors.read_text().splitlines()}
    for line, expected in REFUSED:
        answer = lines[line["custom_id"]]
        assert answer["error"] is None and answer["response"]["status_code"] == 400
        error = answer["response"]["body"]["error"]
        assert expected in error["message"] and error["type"] == "invalid_request_error", error
        assert "Value error" not in error["message"], error  # one place named once, no pydantic prefix
    with session_scope() as s:  # the run is not done: its one good line waits for a worker
        cancel_run(session=s, run_id=sub.id)
    assert batches.finalize_run(sub.id) == sub.name


def test_a_batch_being_stored_counts_every_request_it_validated_not_only_its_refusals(world) -> None:
    """Found in review: while a batch's file was being stored (nothing stored yet, its refusals
    recorded), request_counts read total 3, failed 3 for a batch of 60 with 3 refused."""
    from db.runs import create_run

    with session_scope() as s:
        run, _ = create_run(
            session=s, name=f"oa-storing-{time.time_ns()}", model=settings.model, file_hash="", total=57
        )
        s.execute(
            update(Run)
            .where(Run.id == run.id)
            .values(
                status=RunStatus.VALIDATING, refused=[{"custom_id": f"r{i}", "reason": "x"} for i in range(3)]
            )
        )
        s.expire_all()
        counts = batches.batch_object(s, s.get_one(Run, run.id))["request_counts"]
    assert counts == {"total": 60, "completed": 0, "failed": 3}


def test_a_file_of_endless_bad_or_refused_lines_is_named_in_part_and_counted_in_whole(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: every bad line of a file was kept (a 20 MB file of bad lines held gigabytes in
    the API's process), and every refused one stored with its batch and read at each poll."""
    from services.runs import validate

    monkeypatch.setattr(validate, "MAX_ERRORS_NAMED", 3)
    monkeypatch.setattr(validate, "MAX_REFUSED", 2)
    path = _write(tmp_path / "bad.jsonl", [openai_line("ok", USER)] + ["x"] * 7)
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="oa-many-bad-" + tmp_path.name)
    assert [e.line for e in caught.value.errors] == [2, 3, 4]
    assert str(caught.value).startswith("7 bad line(s): line 2: ")
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == "oa-many-bad-" + tmp_path.name)).one()
        assert run.error.startswith("7 bad line(s)") and len(run.line_errors) == 3
    # past MAX_REFUSED, a refused line is a bad line of the file: named, and nothing stored
    refused = [openai_line(f"lp{i}", USER, logprobs=True) for i in range(4)]
    path = _write(tmp_path / "refused.jsonl", [openai_line("ok", USER), *refused])
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="oa-many-refused-" + tmp_path.name)
    assert [e.line for e in caught.value.errors] == [4, 5]
    assert "body.logprobs" in caught.value.errors[0].reason
    assert "more than 2 lines of the file are refused" in caught.value.errors[0].reason
    # a submission that skips bad lines learns every one of them
    monkeypatch.setattr(settings, "files_dir", tmp_path / "files")
    path = _write(tmp_path / "skip.jsonl", [openai_line("ok", USER)] + ["x"] * 7)
    sub = submit_run(path, name="oa-skip-" + tmp_path.name, skip_bad_lines=True)
    assert sub.stored == 1 and [e.line for e in sub.skipped_lines] == list(range(2, 9))


def test_a_line_that_is_not_a_well_formed_request_fails_the_whole_file(quiet_model, tmp_path) -> None:
    path = _write(tmp_path / "bad.jsonl", [openai_line("ok", USER)] + [line for line, _ in MALFORMED])
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="oa-bad-" + tmp_path.name)
    reasons = {e.line: e.reason for e in caught.value.errors}
    assert sorted(reasons) == list(range(2, len(MALFORMED) + 2))
    for number, (_, expected) in enumerate(MALFORMED, start=2):
        assert expected in reasons[number], (number, reasons[number])
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == "oa-bad-" + tmp_path.name)).one()
        assert run.status == RunStatus.FAILED and run.error_code == "invalid_request"
        assert [e["line"] for e in run.line_errors] == sorted(reasons)
        assert s.scalar(select(func.count()).select_from(Turn).where(Turn.run_id == run.id)) == 0


@pytest.mark.parametrize(
    "first", ["{}", "null", "[1]", '{"custom_id": "x"}', '{"custom_id": "x", "metod": "POST"}']
)
def test_a_first_line_that_says_no_format_is_blamed_alone(quiet_model, tmp_path, first: str) -> None:
    # found in review: the file was read as native lines from such a first line, and every good
    # OpenAI line after it was blamed for its method, url and body
    path = tmp_path / "first.jsonl"
    path.write_text(first + "\n" + "".join(json.dumps(openai_line(c, USER)) + "\n" for c in "ab"))
    with pytest.raises(RunValidationError) as caught:
        submit_run(path, name="oa-first-" + tmp_path.name)
    assert [e.line for e in caught.value.errors] == [1]


def test_a_system_message_is_by_default_the_lines_direction_for_the_scene(quiet_model, tmp_path) -> None:
    line = openai_line(
        "d",
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "developer", "content": "It is raining."},
            *USER,
        ],
    )
    path = _write(tmp_path / "dir.jsonl", [line])
    sub = submit_run(path, name="oa-dir-" + tmp_path.name)
    assert sub.stored == 1  # not a failed file, and not a refused request
    with session_scope() as s:
        (params,) = s.scalars(select(Turn.params).where(Turn.run_id == sub.id)).all()
    assert params["direction"] == "You are a helpful assistant.\n\nIt is raining."
    assert "system_prompt" not in params  # the persona is not replaced


def test_a_run_that_allows_it_takes_a_lines_system_prompt(quiet_model, tmp_path) -> None:
    line = openai_line("s", [{"role": "system", "content": "You are a pirate, {{user}}'s rival."}, *USER])
    path = _write(tmp_path / "sys.jsonl", [line])
    sub = submit_run(path, name="oa-sys-" + tmp_path.name, options=LineOptions(allow_system_prompt=True))
    with session_scope() as s:
        (params,) = s.scalars(select(Turn.params).where(Turn.run_id == sub.id)).all()
    assert params["system_prompt"] == "You are a pirate, {{user}}'s rival."


def _claim(run_id, n: int):
    with session_scope() as s:
        ids = list(s.scalars(select(Turn.id).where(Turn.run_id == run_id).order_by(Turn.number).limit(n)))
        return claim_turns(session=s, turn_ids=ids, lease_s=60, max_attempts=3)


def _fail(claim, turn_ids) -> None:
    with session_scope() as s:
        fail_turns(
            session=s,
            token=claim.token,
            failures={t: Failure("engine fell over", TurnErrorCode.ENGINE_ERROR) for t in turn_ids},
        )


def _submit(tmp_path: Path, name: str, n: int, **fields):
    lines = [openai_line(f"r{i}", [{"role": "user", "content": f"Line {i}?"}]) for i in range(n)]
    path = _write(tmp_path / f"{name}.jsonl", lines)
    return submit_run(path, name=name, fields=fields)


def test_a_run_with_a_long_korean_name_exports_to_files_the_filesystem_takes(quiet_model, tmp_path) -> None:
    """Found in review: a run name holds 200 characters, but a file name 255 bytes: a run of 82 Hangul
    (246 bytes) and ".results.jsonl" could not be exported ("File name too long")."""
    from services.runs.scene_export import export_scenes

    names = ["가" * 82, "가" * 81 + "나"]  # two long names alike up to the cut
    paths = []
    for name in names:
        lines = [openai_line("r0", [{"role": "user", "content": "안녕?"}])]
        sub = submit_run(_write(tmp_path / f"{len(paths)}.jsonl", lines), name=name)
        claim = _claim(sub.id, 1)
        _fail(claim, [t.id for t in claim.claimed])
        results, errors, _, n_err = export_run(name, tmp_path / "out", "openai")
        scenes, _ = export_scenes(name, tmp_path / "out")
        assert n_err == 1 and results.exists() and errors.exists() and scenes.exists()
        assert all(
            len(p.name.encode()) <= 255 and p.name.startswith("가" * 70) for p in (results, errors, scenes)
        )
        paths.append(results)
    assert paths[0] != paths[1]
    short = _submit(tmp_path, "짧은-이름-" + tmp_path.name, 1)  # a name that fits is the stem as it is
    assert export_run(short.name, tmp_path / "out", "openai")[0].name == f"{short.name}.results.jsonl"


def test_output_and_error_lines_holding_unicode_line_ends_stay_one_line_for_splitlines_readers(
    quiet_model, tmp_path
) -> None:
    """Found in review: the files were written with U+2028, U+2029 and NEL unescaped (JSON allows
    them), and a client reading a file's lines as the openai client's iter_lines does (httpx splits on
    them, as str.splitlines does) got a line in two pieces, neither of them JSON: that request's result
    was lost to it. The SSE stream escaped them already."""
    name = "ends-" + tmp_path.name
    custom_ids = ["r\u2029one", "r\x85two", "plain"]
    lines = [openai_line(c, [{"role": "user", "content": "Hi?"}]) for c in custom_ids]
    sub = submit_run(_write(tmp_path / "in.jsonl", lines), name=name)
    claim = _claim(sub.id, 3)
    with session_scope() as s:
        fail_turns(
            session=s,
            token=claim.token,
            failures={t.id: Failure("fell\u2028over", TurnErrorCode.ENGINE_ERROR) for t in claim.claimed},
        )
    for fmt in ("openai", "native"):
        _, errors, _, n_err = export_run(name, tmp_path / fmt, fmt)
        read = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
        assert n_err == len(read) == 3, fmt
        assert sorted(r["custom_id"] for r in read) == sorted(custom_ids)
        assert "fell\u2028over" in json.dumps(read, ensure_ascii=False)


def test_a_run_past_its_window_expires_keeping_what_finished(quiet_model, tmp_path) -> None:
    sub = _submit(tmp_path, "exp-" + tmp_path.name, 4, expires_at=func.now() + timedelta(hours=1))
    first = _claim(sub.id, 1)
    _fail(first, [first.claimed[0].id])  # finished (as a failure) before the window closed
    running = _claim(sub.id, 2)  # the second is running when the window closes
    assert len(running.claimed) == 1
    assert batches.expire_due_runs() == []  # not due yet
    with session_scope() as s:
        s.execute(Run.__table__.update().where(Run.id == sub.id).values(expires_at=func.now()))
    assert batches.expire_due_runs() == [str(sub.id)]
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert (run.status, run.cancel_reason) == (RunStatus.CANCELLING, "expired")
        rows = s.execute(
            select(Turn.custom_id, Turn.status, Turn.error_code).where(Turn.run_id == sub.id)
        ).all()
    state = {c: (st, code) for c, st, code in rows}
    assert state["r0"] == (TurnStatus.FAILED, "engine_error")
    assert state["r1"][0] == TurnStatus.RUNNING
    assert state["r2"] == state["r3"] == (TurnStatus.CANCELLED, "expired")
    _fail(running, [running.claimed[0].id])  # the running turn finishes: the run ends expired
    with session_scope() as s:
        assert s.get_one(Run, sub.id).status == RunStatus.EXPIRED
    assert batches.expire_due_runs() == []  # nothing twice
    _, errors, n_ok, n_err = export_run(sub.name, tmp_path / "out", "openai")
    assert (n_ok, n_err) == (0, 4)
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in errors.read_text().splitlines()}
    for ran in ("r0", "r1"):  # ran and failed: OpenAI's response shape, the server's fault
        response = lines[ran]["response"]
        assert lines[ran]["error"] is None and response["status_code"] == 500
        assert response["body"]["error"]["code"] == "engine_error"
        assert response["body"]["error"]["message"] == "engine fell over"
    for never in ("r2", "r3"):  # never ran: response null, labelled batch_expired
        assert lines[never]["response"] is None and lines[never]["error"]["code"] == "batch_expired"


def test_a_turn_queued_again_after_its_run_stopped_is_cancelled_at_its_claim_not_generated(
    quiet_model, tmp_path
) -> None:
    """Found in review: a cancel (or an expiry) cancels the turns queued at its snapshot; one queued
    again after it (a retry, an engine death's hand-back, a reopen racing the cancel) was claimed and
    generated for a stopped run, an expired batch answered past its window, and the run waited in
    cancelling for it. Only scene steps were stopped at the claim."""
    from db.turns import requeue_turns

    sub = _submit(tmp_path, "stop-" + tmp_path.name, 3)
    running = _claim(sub.id, 2)  # running when the window closes: the run waits in cancelling
    assert len(running.claimed) == 2
    with session_scope() as s:
        s.execute(Run.__table__.update().where(Run.id == sub.id).values(expires_at=func.now()))
    assert batches.expire_due_runs() == [str(sub.id)]
    with session_scope() as s:  # the engine died under them: back to queued, to be sent again
        handed = {t.id: "the engine died" for t in running.claimed}
        assert len(requeue_turns(session=s, token=running.token, reasons=handed, refund_attempt=True)) == 2
        # review of the fix: one at its attempt cap is cancelled too, not failed as out of attempts
        s.execute(Turn.__table__.update().where(Turn.id == running.claimed[0].id).values(attempts=3))
    again = _claim(sub.id, 3)
    assert again.claimed == []
    with session_scope() as s:
        rows = s.execute(select(Turn.status, Turn.error_code).where(Turn.run_id == sub.id)).all()
        assert rows == [(TurnStatus.CANCELLED, "expired")] * 3
        assert s.get_one(Run, sub.id).status == RunStatus.EXPIRED


def test_turns_stored_after_an_expiry_landed_are_labelled_expired_too(quiet_model, tmp_path) -> None:
    sub = _submit(tmp_path, "late-" + tmp_path.name, 3)
    running = _claim(sub.id, 1)  # keeps the expired run in cancelling
    with session_scope() as s:
        s.execute(Run.__table__.update().where(Run.id == sub.id).values(expires_at=func.now()))
    assert batches.expire_due_runs() == [str(sub.id)]
    with session_scope() as s:  # a chunk the submission stored after the expiry landed
        reset = s.execute(
            Turn.__table__.update()
            .where(Turn.run_id == sub.id, Turn.custom_id == "r2")
            .values(status=TurnStatus.QUEUED, error=None, error_code=None, finished_at=None)
        )
        assert reset.rowcount == 1
        assert cancel_run(session=s, run_id=sub.id).cancelled_turns == 1  # as the submission (or
        # the sweeper) finishes a cancel
        assert (
            s.scalar(select(Turn.error_code).where(Turn.run_id == sub.id, Turn.custom_id == "r2"))
            == "expired"
        )
    _fail(running, [running.claimed[0].id])
    _, errors, _, _ = export_run(sub.name, tmp_path / "out", "openai")
    codes = {json.loads(x)["custom_id"]: json.loads(x)["error"] for x in errors.read_text().splitlines()}
    assert codes["r1"]["code"] == codes["r2"]["code"] == "batch_expired"


def test_request_counts_leave_out_cancelled_requests_and_usage_counts_every_candidate(
    quiet_model, tmp_path
) -> None:
    import uuid
    from datetime import UTC, datetime

    from services.runs.export import _openai_ok

    sub = _submit(tmp_path, "counts-" + tmp_path.name, 3, input_file_id="file-test")
    claim = _claim(sub.id, 1)
    _fail(claim, [claim.claimed[0].id])
    with session_scope() as s:
        cancel_run(session=s, run_id=sub.id)
        run = s.get_one(Run, sub.id)
        counts = batches.batch_object(s, run)["request_counts"]
    assert counts == {"total": 3, "completed": 0, "failed": 1}  # the two cancelled are neither
    assert batches.finalize_run(sub.id) == sub.name
    now = datetime.now(UTC)
    turn = Turn(
        id=uuid.uuid4(),
        custom_id="best-of-3",
        reply="Kept.",
        params={},
        usage={"prompt_tokens": 50, "completion_tokens": 4, "finish_reason": "stop"},
        alternatives=[
            {"text": "Not kept.", "completion_tokens": 6},
            {"text": "Nor this.", "completion_tokens": 9},
        ],
        finished_at=now,
    )
    usage = _openai_ok(turn, Run(model=MODEL, created_at=now))["response"]["body"]["usage"]
    assert usage == {"prompt_tokens": 50, "completion_tokens": 19, "total_tokens": 69}
    # Found in review (numeric correctness): a candidate dropped as unreadable (a structured reply of
    # 500 tokens that did not parse) was paid for by the engine and counted by the metrics, not here.
    turn.usage = {**turn.usage, "generated_completion_tokens": 519}
    usage = _openai_ok(turn, Run(model=MODEL, created_at=now))["response"]["body"]["usage"]
    assert usage == {"prompt_tokens": 50, "completion_tokens": 519, "total_tokens": 569}


def test_a_request_cancelled_alone_in_a_batch_that_completes_is_its_own_failure_not_the_batchs_cancel(
    quiet_model, tmp_path
) -> None:
    """Found in review: a request cancelled by itself (DELETE /v1/turns/{id}, which a tenant's key may
    do) in a batch that then completed was written as "batch_cancelled: the batch was cancelled", and
    counted neither completed nor failed: a client reconciling the counts of a completed batch found
    a request missing."""
    from db.turns import cancel_turns

    (tmp_path / "files").mkdir()
    sub = _submit(tmp_path, "alone-" + tmp_path.name, 3, input_file_id="file-test")
    with session_scope() as s:
        (first,) = s.scalars(select(Turn.id).where(Turn.run_id == sub.id, Turn.custom_id == "r0")).all()
        assert cancel_turns(session=s, turn_ids=[first]) == [first]
    claim = _claim(sub.id, 3)
    _fail(claim, [t.id for t in claim.claimed])
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        counts = batches.batch_object(s, run)["request_counts"]
    assert counts == {"total": 3, "completed": 0, "failed": 3}
    assert batches.finalize_run(sub.id) == sub.name
    from services.files import find_file

    with session_scope() as s:
        errors = s.get_one(Run, sub.id).error_file_id
    lines = {x["custom_id"]: x for x in map(json.loads, find_file(errors).path.read_text().splitlines())}
    assert lines["r0"]["error"] == {
        "code": "request_cancelled",
        "message": "this request was cancelled before it was answered",
    }


def test_a_request_cancelled_alone_before_its_batch_expired_or_was_cancelled_says_so(
    quiet_model, tmp_path
) -> None:
    """Found in review (stop 76): a request cancelled by itself in a batch that later expired (or was
    cancelled) was written as the batch's end, `batch_cancelled: the batch was cancelled before this
    request started`, though the batch went on after it."""
    from db.runs import cancel_run
    from db.turns import cancel_turns
    from services.files import find_file

    (tmp_path / "files").mkdir()
    for reason in ("expired", "cancelled"):
        sub = _submit(tmp_path, f"alone-{reason}-" + tmp_path.name, 3, input_file_id="file-test")
        with session_scope() as s:
            (first,) = s.scalars(select(Turn.id).where(Turn.run_id == sub.id, Turn.custom_id == "r0")).all()
            assert cancel_turns(session=s, turn_ids=[first]) == [first]
        with session_scope() as s:
            cancel_run(session=s, run_id=sub.id, reason=reason)  # type: ignore[arg-type]
        assert batches.finalize_run(sub.id) == sub.name
        with session_scope() as s:
            errors = s.get_one(Run, sub.id).error_file_id
        lines = {x["custom_id"]: x for x in map(json.loads, find_file(errors).path.read_text().splitlines())}
        assert lines["r0"]["error"]["code"] == "request_cancelled", reason
        assert {lines[c]["error"]["code"] for c in ("r1", "r2")} == {f"batch_{reason}"}


def test_a_batch_run_is_finalized_once_whoever_tries(quiet_model, tmp_path) -> None:
    (tmp_path / "files").mkdir()
    sub = _submit(tmp_path, "fin-" + tmp_path.name, 2, input_file_id="file-test")
    claim = _claim(sub.id, 2)
    _fail(claim, [t.id for t in claim.claimed])
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.status == RunStatus.FINALIZING and run.finalizing_at is not None
        assert run.output_file_id is None
    # A second finalizer, in its own transaction, skips the run the first one holds.
    with session_scope() as first:
        assert finalizing_runs(session=first) == [sub.id]
        with get_engine().connect() as other:
            from sqlalchemy.orm import Session

            with Session(other) as second:
                assert finalizing_runs(session=second) == []
    assert batches.finalize_runs() == [sub.name]
    assert batches.finalize_runs() == []
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.status == RunStatus.COMPLETED and run.finished_at is not None
        output, errors = run.output_file_id, run.error_file_id
    from services.files import find_file

    assert output is None  # no request answered: no output file, as OpenAI leaves output_file_id
    assert find_file(errors).info["purpose"] == "batch_output"
    lines = [json.loads(x) for x in find_file(errors).path.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == ["r0", "r1"]


def test_a_batch_whose_files_took_long_to_write_ends_when_they_are_committed(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review (time and clocks): a finalized batch's end was now() of the transaction that
    wrote its files, that is when the writing began: minutes before the files existed (their rows
    read clock_timestamp()). Its completed_at came before its output file's created_at, and a sweep
    right after the commit took a callback queued seconds ago for one lost long ago."""
    from sqlalchemy import text

    from db.models import StoredFile

    (tmp_path / "files").mkdir()
    sub = _submit(tmp_path, "slow-fin-" + tmp_path.name, 1, input_file_id="file-test")
    claim = _claim(sub.id, 1)
    _fail(claim, [t.id for t in claim.claimed])
    real = batches._write_files

    def slow(session, run, written):  # type: ignore[no-untyped-def]
        session.execute(text("SELECT pg_sleep(1.5)"))  # a large batch's files take a while
        return real(session, run, written)

    monkeypatch.setattr(batches, "_write_files", slow)
    assert batches.finalize_run(sub.id) == sub.name
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        written = s.scalar(select(StoredFile.created_at).where(StoredFile.id == run.error_file_id))
        assert run.status == RunStatus.COMPLETED and written is not None
        assert run.finished_at >= written, (run.finished_at, written)


def test_a_cancelled_batch_is_finalized_as_cancelled_with_its_files(quiet_model, tmp_path) -> None:
    sub = _submit(tmp_path, "can-" + tmp_path.name, 3, input_file_id="file-test")
    with session_scope() as s:
        outcome = cancel_run(session=s, run_id=sub.id)
    assert outcome.after == RunStatus.FINALIZING
    assert batches.finalize_runs() == [sub.name]
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.status == RunStatus.CANCELLED and run.error_file_id is not None


def test_callback_signatures_verify_and_refuse_tampering() -> None:
    body, secret, now = b'{"id": "batch_1"}', "s3cret", int(time.time())
    header = sign(body, secret, now)
    assert verify_signature(header, body, secret)
    assert not verify_signature(header, body + b" ", secret)
    assert not verify_signature(header, body, "other")
    assert not verify_signature(sign(body, secret, now - 3600), body, secret)
    assert not verify_signature("garbage", body, secret)


# --- over HTTP, without a worker --------------------------------------------------------------------

INGEST = {"Authorization": f"Bearer {INGEST_KEY}"}


def _upload(base_url: str, content: bytes, purpose: str = "batch") -> httpx.Response:
    return httpx.post(
        f"{base_url}/v1/files",
        headers=INGEST,
        files={"file": ("b.jsonl", content)},
        data={"purpose": purpose},
    )


def test_an_upload_the_temporary_folder_cannot_hold_is_a_503_in_openais_shape(
    base_url, tmp_path, monkeypatch
) -> None:
    """Found in review: the multipart parser spools an upload's file part (past 1 MB) to the system's
    temporary folder before the route sees it, and that folder full or unwritable raised inside the
    parse: a plain-text 500, which the `openai` client retried twice, sending the whole file again
    each time. A 503 in OpenAI's shape (the deployment's to fix), nothing stored."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # as a full or unwritable folder
    big = (json.dumps(openai_line("t", USER)).encode() + b"\n") * 8000  # past the 1 MB spooled in memory
    answer = _upload(base_url, big)
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert "temporary folder" in error["message"] and error["type"] == "server_error"


def test_bad_file_and_batch_requests_get_clear_4xx_naming_the_field(
    base_url, quiet_model, monkeypatch
) -> None:
    assert _upload(base_url, b"{}\n", purpose="fine-tune").status_code == 400
    wrong_type = httpx.post(
        f"{base_url}/v1/files", headers=INGEST | {"content-type": "text/plain"}, content=b"x"
    )
    assert wrong_type.status_code == 415
    file_id = _upload(base_url, json.dumps(openai_line("a", USER)).encode() + b"\n").json()["id"]
    cases = [
        ({"input_file_id": file_id, "endpoint": "/v1/embeddings"}, "endpoint"),
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "soon"},
            "completion_window",
        ),
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "9999h"},
            "completion_window",
        ),
        # review: an empty window was read as the default, "24h\n" as 24h
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": ""},
            "completion_window",
        ),
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h\n"},
            "completion_window",
        ),
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, "input_file_id"),
        ({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "metadata": {"k": 1}}, "metadata.k"),
        # review: half an emoji a client cut was a 500 (the request's hash raised on it)
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "metadata": {"note": "\ud83d"}},
            "metadata.note",
        ),
        (
            {
                "input_file_id": file_id,
                "endpoint": "/v1/chat/completions",
                "output_expires_after": {"anchor": "\udc00", "seconds": 3600},
            },
            "output_expires_after",
        ),
        (
            {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "callback_url": "http://x/"},
            "callback_url",
        ),
    ]
    for body, field in cases:  # as JSON.stringify sends it: a lone surrogate escaped
        sent = INGEST | {"content-type": "application/json"}
        response = httpx.post(f"{base_url}/v1/batches", headers=sent, content=json.dumps(body))
        assert response.status_code == 400 and response.json()["error"]["message"].startswith(field), (
            body,
            response.text,
        )
    monkeypatch.setattr(settings, "callback_secret", SecretStr("s"))
    inward = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "callback_url": "http://127.0.0.1:9/",
    }
    response = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=inward)
    assert response.status_code == 400
    assert (
        response.json()["error"]["message"]
        == "callback_url: host '127.0.0.1' does not resolve to a public address"
    )
    assert httpx.get(f"{base_url}/v1/batches/batch_nope", headers=INGEST).status_code == 404
    assert httpx.get(f"{base_url}/v1/files/file-nope/content", headers=INGEST).status_code == 404


def test_a_resolver_that_cannot_answer_for_now_is_a_503_to_retry_not_a_refused_callback(
    base_url, quiet_model, monkeypatch
) -> None:
    """Found in review: a batch's callback host was looked up as a refusal, and EAI_AGAIN (the
    resolver cannot answer for now) is one, so a resolver hiccup answered 400, which a client does
    not retry; a turn's callback host gets a 503 for the same."""
    import socket

    file_id = _upload(base_url, json.dumps(openai_line("a", USER)).encode() + b"\n").json()["id"]
    monkeypatch.setattr(settings, "callback_secret", SecretStr("s"))
    real = socket.getaddrinfo

    def hiccup(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "hooks.example.test":
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(name, *args, **kwargs)

    fake_lookups(monkeypatch, hiccup)
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "callback_url": "https://hooks.example.test/done",
    }
    response = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=body)
    assert response.status_code == 503 and response.headers["retry-after"], response.text
    assert response.json()["error"]["message"].startswith("callback_url: ")
    listed = httpx.get(f"{base_url}/v1/batches", headers=INGEST, params={"limit": 100}).json()["data"]
    assert all(b["input_file_id"] != file_id for b in listed)  # nothing stored


def test_a_burst_of_batch_submissions_leaves_the_api_its_threads(base_url, quiet_model, monkeypatch) -> None:
    """Found in review: a batch's submission ran after the answer on the threads every synchronous
    route runs on (40 in all): forty-one large batches created at once held every one of them, and a
    plain GET of a batch waited until a submission ended. They run on threads of their own now, at
    most MLCHAT_API_BACKGROUND_THREADS at once."""
    real_submit = batches.submit_batch_by_name
    release = threading.Event()
    lock = threading.Lock()
    at_once = {"now": 0, "peak": 0}

    def slow_submit(name: str) -> None:  # a large file's submission, held until released
        with lock:
            at_once["now"] += 1
            at_once["peak"] = max(at_once["peak"], at_once["now"])
        release.wait(60)
        with lock:
            at_once["now"] -= 1
        real_submit(name)

    monkeypatch.setattr(batches, "submit_batch_by_name", slow_submit)
    file_id = _upload(base_url, json.dumps(openai_line("a", USER)).encode() + b"\n").json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions"}
    ids = []
    try:
        for _ in range(41):
            created = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=body)
            assert created.status_code == 200, created.text
            ids.append(created.json()["id"])
        deadline = time.monotonic() + 10
        while at_once["now"] < settings.api_background_threads and time.monotonic() < deadline:
            time.sleep(0.05)
        answered = httpx.get(f"{base_url}/v1/batches/{ids[0]}", headers=INGEST, timeout=10)
        assert answered.status_code == 200 and answered.json()["status"] == "validating"
        assert at_once["peak"] == settings.api_background_threads == 4
    finally:
        release.set()
    deadline = time.monotonic() + 60  # every submission still runs, in its turn
    while time.monotonic() < deadline:
        statuses = {batches.get_batch(b, api_key=None, admin=True)["status"] for b in ids}
        if "validating" not in statuses:
            break
        time.sleep(0.2)
    assert statuses == {"in_progress"}, statuses


def test_cancelling_a_batch_that_ended_is_openais_409_and_not_retried(
    base_url, services, quiet_model, tmp_path
) -> None:
    # Found in review: a cancel of a completed batch answered 200 with the batch as it was, so a
    # client's `except openai.ConflictError` never ran; a cancelled batch is still answered as it is.
    import httpx
    import openai

    sent: list[str] = []
    counted = httpx.Client(event_hooks={"request": [lambda request: sent.append(request.url.path)]})
    admin = openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="test-key-1-abcdefgh", max_retries=2, http_client=counted
    )
    done, cancelled = _batch(tmp_path, 2), _batch(tmp_path, 1)
    with session_scope() as s:
        (run_id,) = s.scalars(select(Run.id).where(Run.name == done)).all()
        s.execute(
            update(Turn).where(Turn.run_id == run_id).values(status=TurnStatus.DONE, finished_at=func.now())
        )
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.COMPLETED))
    with pytest.raises(openai.ConflictError) as refused:
        admin.batches.cancel(done)
    assert str(refused.value).endswith("Cannot cancel a batch with status 'completed'")
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert sent == [f"/v1/batches/{done}/cancel"]  # sent once: not retried (review: a time bound was)
    assert batches.get_batch(done, api_key="k", admin=False)["status"] == "completed"
    assert admin.batches.cancel(cancelled).status in ("cancelling", "cancelled")
    # review of cancellation: a batch writing its files because every request ended has nothing left
    # to stop; its cancel was a 200, then it ended `completed`
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == run_id).values(status=RunStatus.FINALIZING))
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status 'finalizing'"):
        admin.batches.cancel(done)
    assert admin.batches.cancel(cancelled).status in ("cancelling", "cancelled")  # twice is once


def test_a_batch_created_again_under_its_idempotency_key_is_the_first_one(base_url, quiet_model) -> None:
    """Found in review: a create whose answer was lost (a reset, a proxy's timeout) was sent again by
    the client and made a second batch of the whole file, and an Idempotency-Key header was ignored
    without a word. Under a key, a retry answers with the first batch; another request under it is a
    409; a create without one is a new batch, as OpenAI's."""
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    line = openai_line("only", [{"role": "user", "content": "Hello."}], model="elara")
    uploaded = client.files.create(file=("b.jsonl", json.dumps(line).encode()), purpose="batch")
    key = {"Idempotency-Key": f"nightly-{uuid.uuid4().hex}"}

    def create(**extra: Any) -> Any:
        return client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            **extra,
        )

    first = create(extra_headers=key)
    again = create(extra_headers=key)
    assert again.id == first.id
    with pytest.raises(openai.ConflictError, match="Idempotency-Key") as other:
        create(extra_headers=key, metadata={"character": "elara"})
    assert other.value.response.headers["x-should-retry"] == "false"  # the same key, the same answer
    assert create().id != first.id
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Run).where(Run.name == first.id)) == 1
        s.execute(delete(Run).where(Run.name == first.id))  # deleted past retention: the key outlives it
    with pytest.raises(openai.ConflictError, match="deleted since"):  # review: a 500
        create(extra_headers=key)


def test_a_batch_deleted_while_it_is_cancelled_is_not_found_not_a_500(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: a cancel read the batch, then its status again in a statement of its own; the
    batch deleted between the two (retention's last chunk) was a KeyError, a 500."""
    batch_id = _batch(tmp_path, 1)
    real = batches._visible_run

    def then_deleted(session, *args, **kwargs):  # type: ignore[no-untyped-def]
        run = real(session, *args, **kwargs)
        with session_scope() as other:  # committed between the two reads
            other.execute(delete(Run).where(Run.id == run.id))
        return run

    monkeypatch.setattr(batches, "_visible_run", then_deleted)
    with pytest.raises(batches.BatchNotFound, match=batch_id):
        batches.cancel_batch(batch_id, api_key="k", admin=False)


def test_the_openai_clients_delete_while_listing_loop_deletes_every_file(base_url) -> None:
    # Found in review: the default page was 100 (OpenAI's is 10,000), so `for f in files.list():
    # files.delete(f.id)` asked for its second page after a file it had deleted: a 400.
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)
    mine = {
        _upload(base_url, json.dumps(openai_line(f"d{i}", USER)).encode() + b"\n").json()["id"]
        for i in range(101)
    }  # the key's newest: other tests' files (some read by batches still running) come after them
    deleted = {
        f.id for f in client.files.list(purpose="batch") if f.id in mine and client.files.delete(f.id).deleted
    }
    assert deleted == mine
    assert mine.isdisjoint(f.id for f in client.files.list(purpose="batch"))


def test_a_page_of_files_starts_past_a_file_deleted_since_the_last_page(base_url) -> None:
    """Found in review: a page started from its cursor file's row, so the cursor deleted between two
    pages (by the client itself, paging 3 at a time here; an admin; the expiry sweep) made the next
    page a 400, and the `openai` client's paginator stopped there. A deleted file keeps its place in
    the list a week, its owner's alone to page from."""
    import openai

    from tests.conftest import HASHED_INGEST_KEY

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=INGEST_KEY, max_retries=0)

    def uploaded(name: str) -> str:
        return _upload(base_url, json.dumps(openai_line(name, USER)).encode() + b"\n").json()["id"]

    kept = [uploaded(f"k{i}") for i in range(2)]
    mine = [uploaded(f"p{i}") for i in range(7)]  # the key's newest
    deleted = [
        f.id
        for f in client.files.list(purpose="batch", limit=3)
        if f.id in mine and client.files.delete(f.id).deleted
    ]
    assert sorted(deleted) == sorted(mine)
    # another key cannot page from a place that was not its file's: a 400, as for any id not its own
    stranger = openai.OpenAI(base_url=f"{base_url}/v1", api_key=HASHED_INGEST_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="after: no file"):
        stranger.files.list(after=mine[0], limit=3)
    # the owner still can: the page after the newest deleted file starts at the files kept, older
    assert [f.id for f in client.files.list(after=mine[-1], limit=2).data] == kept[::-1]


def test_files_are_listed_by_page_and_deleted_once_no_running_batch_reads_them(base_url, quiet_model) -> None:
    from tests.conftest import HASHED_INGEST_KEY

    ids = [
        _upload(base_url, json.dumps(openai_line(f"f{i}", USER)).encode() + b"\n").json()["id"]
        for i in range(3)
    ]
    mine = set(ids)

    def listed(**params) -> dict:
        response = httpx.get(f"{base_url}/v1/files", headers=INGEST, params=params)
        assert response.status_code == 200, response.text
        return response.json()

    newest = [f["id"] for f in listed(limit=10_000)["data"] if f["id"] in mine]
    assert newest == ids[::-1]
    page = listed(limit=1)
    assert page["has_more"] and page["data"][0]["id"] == ids[2] == page["first_id"] == page["last_id"]
    assert [f["id"] for f in listed(limit=2, after=ids[2])["data"]] == [ids[1], ids[0]]
    oldest = [f["id"] for f in listed(limit=10_000, order="asc", purpose="batch")["data"] if f["id"] in mine]
    assert oldest == ids
    outputs = listed(purpose="batch_output", limit=10_000)["data"]
    assert mine.isdisjoint(f["id"] for f in outputs) and all(f["purpose"] == "batch_output" for f in outputs)
    stranger = {"Authorization": f"Bearer {HASHED_INGEST_KEY}"}
    theirs = httpx.get(f"{base_url}/v1/files", headers=stranger, params={"limit": 10_000}).json()["data"]
    assert mine.isdisjoint(f["id"] for f in theirs)
    bad = httpx.get(f"{base_url}/v1/files", headers=INGEST, params={"after": "file-nope"})
    assert bad.status_code == 400 and bad.json()["error"] == {
        "message": "after: no file 'file-nope'",
        "type": "invalid_request_error",
        "param": "after",
        "code": None,
    }
    assert httpx.get(f"{base_url}/v1/files", headers=INGEST, params={"limit": 0}).status_code == 400

    # The input of a batch that has not ended stays; once the batch is cancelled it can go.
    body = {"input_file_id": ids[0], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=body).json()
    refused = httpx.delete(f"{base_url}/v1/files/{ids[0]}", headers=INGEST)
    assert refused.status_code == 409 and batch["id"] in refused.json()["error"]["message"]
    assert refused.headers["x-should-retry"] == "false"  # review: the openai client retried it twice
    assert httpx.delete(f"{base_url}/v1/files/{ids[0]}", headers=stranger).status_code == 404
    httpx.post(f"{base_url}/v1/batches/{batch['id']}/cancel", headers=INGEST).raise_for_status()
    deadline = time.monotonic() + 30
    while httpx.get(f"{base_url}/v1/batches/{batch['id']}", headers=INGEST).json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    on_disk = settings.batch_files_dir / f"{ids[0]}.jsonl"
    assert on_disk.is_file()
    deleted = httpx.delete(f"{base_url}/v1/files/{ids[0]}", headers=INGEST)
    assert deleted.status_code == 200 and deleted.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert not on_disk.exists()
    assert httpx.get(f"{base_url}/v1/files/{ids[0]}", headers=INGEST).status_code == 404
    assert httpx.delete(f"{base_url}/v1/files/{ids[0]}", headers=INGEST).status_code == 404
    assert ids[0] not in [f["id"] for f in listed(limit=10_000)["data"]]


def test_a_batch_whose_file_has_bad_lines_fails_listing_each(base_url, quiet_model) -> None:
    content = "\n".join(
        [
            json.dumps(openai_line("a", USER)),
            "{broken",
            json.dumps({**openai_line("c", USER), "url": "/v1/embeddings"}),
        ]
    )
    file_id = _upload(base_url, content.encode() + b"\n").json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=body).json()
    deadline = time.monotonic() + 60
    while (state := httpx.get(f"{base_url}/v1/batches/{batch['id']}", headers=INGEST).json())[
        "status"
    ] != "failed":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    errors = state["errors"]["data"]
    assert [e["line"] for e in errors] == [2, 3]
    assert "not valid JSON" in errors[0]["message"] and "url: '/v1/embeddings'" in errors[1]["message"]
    assert {e["code"] for e in errors} == {"invalid_request"}  # the file's fault
    # Found in review: `param` was null, though the message names the field (OpenAI's BatchError.param)
    assert [e["param"] for e in errors] == [None, "url"]
    assert state["request_counts"] == {"total": 0, "completed": 0, "failed": 0}


@pytest.mark.parametrize("content", [b"", b"\n  \n\r\n"])
def test_a_batch_whose_file_holds_no_requests_fails_saying_so(base_url, content: bytes) -> None:
    # found in review: it completed, with no requests and empty output and error files
    file_id = _upload(base_url, content).json()["id"]
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=body).json()
    deadline = time.monotonic() + 60
    while (state := httpx.get(f"{base_url}/v1/batches/{batch['id']}", headers=INGEST).json())[
        "status"
    ] not in ("failed", "completed"):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["status"] == "failed", state
    (error,) = state["errors"]["data"]
    assert "holds no requests" in error["message"] and error["code"] == "empty_file"


def test_a_run_of_a_file_with_no_requests_is_refused_and_nothing_stored(world, tmp_path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"\n\n")
    with pytest.raises(ValueError, match="holds no requests"):
        submit_run(path, name="empty-" + tmp_path.name)
    with session_scope() as s:
        assert s.scalars(select(Run).where(Run.name == "empty-" + tmp_path.name)).one_or_none() is None


# --- what a crash, a full disk or a race leaves behind (each failed before its fix) -----------------


def _batch(tmp_path: Path, n: int, lines: list[dict] | None = None, **extra) -> str:
    """A batch created as the API creates one, its file stored; returns its id (the run's name)."""
    default = [openai_line(f"b{i}", [{"role": "user", "content": f"Batch line {i}?"}]) for i in range(n)]
    return _create(_stored_file(lines or default, extra.get("tenant", "")), **extra)["id"]


def _stored_file(lines: list[dict], tenant: str = "") -> str:
    """The lines uploaded as the API stores a batch file (key "k"); its id."""
    import asyncio

    from services.files import save_upload

    content = "".join(json.dumps(x) + "\n" for x in lines).encode()

    async def chunks():
        yield content

    stored = asyncio.run(
        save_upload(chunks(), filename="b.jsonl", purpose="batch", api_key="k", tenant=tenant)
    )
    return stored["id"]


def _create(file_id: str, **extra) -> dict:
    """A batch over the stored file, as POST /v1/batches creates it (key "k")."""
    batch, _ = batches.create_batch(
        input_file_id=file_id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=None,
        api_key="k",
        admin=False,
        **extra,
    )
    return batch


def test_a_key_name_given_to_another_tenants_key_owns_none_of_the_first_tenants_files_or_batches(
    quiet_model, tmp_path
) -> None:
    """Found in review: files and batches belonged to a key's name alone. Settings refuse one name
    in two tenants at once, not over time: a key retired from tenant A and its name given to a key
    of tenant B read, downloaded, deleted and cancelled A's."""
    from services import files

    batch_id = _batch(tmp_path, 1, tenant="tenant-a")  # the key "k" of tenant A
    input_id = batches.get_batch(batch_id, api_key="k", admin=False, tenant="tenant-a")["input_file_id"]
    later = {"api_key": "k", "admin": False, "tenant": "tenant-b"}  # the name "k", now tenant B's
    with pytest.raises(batches.BatchNotFound):
        batches.get_batch(batch_id, **later)
    with pytest.raises(batches.BatchNotFound):
        batches.cancel_batch(batch_id, **later)
    assert batch_id not in [b["id"] for b in batches.list_batches(after=None, limit=10_000, **later)["data"]]
    assert input_id not in [
        f["id"]
        for f in files.list_files(purpose=None, after=None, limit=10_000, order="desc", **later)["data"]
    ]
    with pytest.raises(files.FileNotFound):
        files.delete_file(input_id, **later)
    found = files.find_file(input_id)
    assert found is not None and not found.owned_by("k", "tenant-b") and found.owned_by("k", "tenant-a")
    assert files._held("k", "tenant-b") == 0 < files._held("k", "tenant-a")  # nor charged for them
    with pytest.raises(batches.BatchRefused, match="^input_file_id: no file"):  # nor make a batch of it
        batches.create_batch(
            input_file_id=input_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
            **later,
        )
    # tenant A's key of that name still owns them (and cancels it: no batch left validating)
    first = {"api_key": "k", "admin": False, "tenant": "tenant-a"}
    assert batch_id in [b["id"] for b in batches.list_batches(after=None, limit=10_000, **first)["data"]]
    assert batches.cancel_batch(batch_id, **first)["status"] in ("cancelling", "cancelled")


def test_a_batch_ended_before_its_requests_were_stored_accounts_for_each_in_its_error_file(
    quiet_model, tmp_path
) -> None:
    """Found in review: a batch cancelled or expired before its submission stored its lines (before
    its first try, or part-way) wrote only its stored turns: the rest were in neither file, and its
    request counts said 0 of 0."""
    from services.files import find_file

    owner = {"api_key": "k", "admin": False, "tenant": ""}
    cancelled = _batch(tmp_path, 3)  # created, its submission not begun
    ended = batches.cancel_batch(cancelled, **owner)
    expired = _batch(tmp_path, 2)
    with session_scope() as s:
        s.execute(Run.__table__.update().where(Run.name == expired).values(expires_at=func.now()))
    assert batches.expire_due_runs()
    batches.finalize_runs()
    for batch_id, n, code in ((cancelled, 3, "batch_cancelled"), (expired, 2, "batch_expired")):
        state = batches.get_batch(batch_id, **owner)
        assert state["status"] in ("cancelled", "expired") and state["request_counts"]["total"] == n, state
        found = find_file(state["error_file_id"])
        assert found is not None
        lines = [json.loads(x) for x in found.path.read_text().splitlines()]
        assert [x["custom_id"] for x in lines] == [f"b{i}" for i in range(n)]
        assert all(x["response"] is None and x["error"]["code"] == code for x in lines)
        # review: an expired batch was stamped cancelling_at, though nobody cancelled it
        assert (state["cancelling_at"] is None) == (batch_id == expired), state
    assert ended["status"] == "cancelled"


def test_a_batch_ended_before_storing_a_custom_id_of_a_lone_surrogate_is_cancelled_not_stuck_finalizing(
    quiet_model, tmp_path
) -> None:
    """Found in review: a request whose custom_id is an escaped lone surrogate (valid JSON, valid
    UTF-8 bytes) could not be written to the error file as UTF-8, so a batch cancelled before it
    stored that line failed its finalizing at every pass and stayed `finalizing` for good."""
    from services.files import find_file

    owner = {"api_key": "k", "admin": False, "tenant": ""}
    lines = [openai_line("\ud800x", USER), openai_line("b1", USER)]
    batch_id = _batch(tmp_path, 0, lines=lines)
    batches.cancel_batch(batch_id, **owner)
    batches.finalize_runs()
    state = batches.get_batch(batch_id, **owner)
    assert state["status"] == "cancelled", state
    found = find_file(state["error_file_id"])
    assert found is not None
    named = [json.loads(x)["custom_id"] for x in found.path.read_text(encoding="utf-8").splitlines()]
    assert named == ["\ud800x", "b1"]  # the id as the client wrote it
    # Found in review: a batch cancelled before it started carried an in_progress_at (OpenAI's: when
    # the batch started processing).
    assert state["in_progress_at"] is None and state["cancelled_at"] is not None, state


def test_a_batch_cancelled_part_way_through_storing_names_each_request_once(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Review of the fix above: a batch cancelled while its submission stored its lines, one of them
    refused: each request is in the error file once (the refused one as refused, the stored ones as
    cancelled turns, the rest as never stored) and counted once."""
    from db.runs import cancel_run
    from services.files import find_file
    from services.runs import submit

    lines = [openai_line(f"b{i}", [{"role": "user", "content": f"Batch line {i}?"}]) for i in range(6)]
    lines.insert(1, openai_line("refused", USER, logprobs=True))
    batch_id = _batch(tmp_path, 0, lines=lines)
    monkeypatch.setattr(submit, "CHUNK", 2)
    real = submit._insert_chunk

    def then_cancel(run_id, staged, tenant):  # type: ignore[no-untyped-def]
        stored = real(run_id, staged, tenant)
        with session_scope() as s:  # the cancel lands while the submission stores its lines
            cancel_run(session=s, run_id=run_id)
        return stored

    monkeypatch.setattr(submit, "_insert_chunk", then_cancel)
    batches.submit_batch_by_name(batch_id)
    batches.finalize_runs()
    state = batches.get_batch(batch_id, api_key="k", admin=False, tenant="")
    assert state["status"] == "cancelled" and state["request_counts"]["total"] == 7, state
    found = find_file(state["error_file_id"])
    assert found is not None
    named = [json.loads(x)["custom_id"] for x in found.path.read_text().splitlines()]
    assert sorted(named) == sorted(["refused", *(f"b{i}" for i in range(6))]), named


def test_a_batch_whose_file_is_deleted_while_it_is_created_is_refused_naming_the_file(
    quiet_model, tmp_path, monkeypatch
) -> None:
    # found in review: the bytes were checked, then hashed; a delete in between was a 500
    # (FileNotFoundError), and one after the hash made a batch on bytes that were gone
    from services.runs import validate

    hashed = validate.file_digest_and_lines

    def deleted_first(path: Path) -> tuple[str, int]:
        path.unlink()
        return hashed(path)

    monkeypatch.setattr(batches, "file_digest_and_lines", deleted_first)
    with pytest.raises(
        batches.BatchRefused, match=r"^input_file_id: the bytes of 'file-.*' are no longer stored"
    ):
        _batch(tmp_path, 1)


@contextmanager
def _broker_down(services: Path) -> Iterator[None]:
    """The embedded Redis really stopped (SIGTERM), and started again on the same port after."""
    from core import embedded

    embedded.stop_redis(services)
    try:
        yield
    finally:
        embedded.start_redis(services)


def _unsent(batch_id: str) -> int:
    with session_scope() as s:
        return s.scalar(
            select(func.count())
            .select_from(Turn)
            .join(Run)
            .where(Run.name == batch_id, Turn.dispatched_at.is_(None))
        )


def test_a_broker_outage_keeps_a_batch_validating_and_a_retry_completes_its_submission(
    services, quiet_model, tmp_path, monkeypatch
) -> None:
    from services.sweeper import close_abandoned_runs

    monkeypatch.setattr(settings, "batch_submission_backoff_s", 0.0)
    batch_id = _batch(tmp_path, 5)
    with _broker_down(services):
        batches.submit_batch_by_name(batch_id)
        batch = batches.get_batch(batch_id, api_key="k", admin=False)
        assert (batch["status"], batch["errors"]) == ("validating", None)  # not failed: an OpenAI
        # client would stop polling at `failed`
        assert batch_id not in close_abandoned_runs(older_than_s=0)  # the sweeper does not fail it either
        with session_scope() as s:
            run = s.scalars(select(Run).where(Run.name == batch_id)).one()
            # Found in review: each outage try was counted, so an outage of ~7.5 minutes (5 tries at
            # 30 s doubling) failed the batch for good, inside its 24 h window. Waiting for the
            # broker spends no try.
            assert (run.status, run.submission_attempts) == (RunStatus.VALIDATING, 0)
            assert run.submission_retry_at is not None and "waits for the broker" in run.error
        monkeypatch.setattr(settings, "batch_submission_attempts", 1)
        for _ in range(2):
            assert batch_id in batches.retry_batch_submissions()
        assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "validating"
    assert batches.housekeeping()["submissions"] == [batch_id]  # the retry, the broker back
    batch = batches.get_batch(batch_id, api_key="k", admin=False)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 5
    assert batch["errors"] is None and _unsent(batch_id) == 0


@pytest.mark.parametrize("stop", ["connection lost", "deadlock"])
def test_a_database_connection_lost_or_a_deadlock_under_a_submission_spends_no_try(
    quiet_model, tmp_path, monkeypatch, stop
) -> None:
    """Found in review: a broker outage spent no try, but a database connection lost mid-way (a
    failover, a restart) did: five blips over a long submission failed the batch for good, as the
    server's fault, inside its window. Review: so did a deadlock with another writer (a producer
    creating the same new conversations), which run again goes through."""
    from psycopg.errors import DeadlockDetected
    from sqlalchemy.exc import OperationalError

    from services.runs import submit

    monkeypatch.setattr(settings, "batch_submission_attempts", 1)
    monkeypatch.setattr(settings, "batch_submission_backoff_s", 0.0)
    batch_id = _batch(tmp_path, 2)
    validate = submit.validate_file

    def blip(*args, **kwargs):  # type: ignore[no-untyped-def]
        if stop == "deadlock":
            raise OperationalError("INSERT INTO conversations …", {}, DeadlockDetected("deadlock detected"))
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(submit, "validate_file", blip)
    batches.submit_batch_by_name(batch_id)
    for _ in range(2):
        assert batch_id in batches.retry_batch_submissions()
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
        assert (run.status, run.submission_attempts) == (RunStatus.VALIDATING, 0)
        assert ("waits for another writer" if stop == "deadlock" else "waits for the database") in run.error
    monkeypatch.setattr(submit, "validate_file", validate)
    assert batch_id in batches.retry_batch_submissions()
    batch = batches.get_batch(batch_id, api_key="k", admin=False)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 2


def test_a_batch_sends_no_line_before_its_whole_file_is_stored(quiet_model, tmp_path, monkeypatch) -> None:
    """Found in review: a batch sent each chunk as the next was stored; when storing a later chunk
    failed for good, the batch ended `failed` with no output file, and the lines workers had
    answered (and those still running) were never to be downloaded."""
    from services.runs import submit

    monkeypatch.setattr(settings, "batch_submission_attempts", 1)
    monkeypatch.setattr(submit, "CHUNK", 1)
    insert = submit._insert_chunk
    stored: list[int] = []

    def second_fails(run_id, chunk, tenant):  # type: ignore[no-untyped-def]
        if stored:
            raise OSError("the database's disk is full")
        stored.append(1)
        return insert(run_id, chunk, tenant)

    monkeypatch.setattr(submit, "_insert_chunk", second_fails)
    batch_id = _batch(tmp_path, 3)
    batches.submit_batch_by_name(batch_id)
    with session_scope() as s:
        turns = s.execute(select(Turn.status, Turn.dispatched_at).join(Run).where(Run.name == batch_id)).all()
    assert turns == [(TurnStatus.CANCELLED, None)]  # stored, never sent, cancelled with the batch
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "failed"
    # a whole file stored, then sent
    monkeypatch.setattr(submit, "_insert_chunk", insert)
    batch_id = _batch(tmp_path, 3)
    batches.submit_batch_by_name(batch_id)
    assert _unsent(batch_id) == 0
    assert batches.get_batch(batch_id, api_key="k", admin=False)["request_counts"]["total"] == 3


def test_a_page_of_batches_counts_their_requests_in_a_fixed_number_of_queries(quiet_model, tmp_path) -> None:
    """Found in review: each batch of a listed page counted its turns in queries of its own (two a
    batch: 200 round trips for a page of 100)."""
    from sqlalchemy import event

    tenant = "counts-" + tmp_path.name
    for n in (1, 2, 3):
        batches.submit_batch_by_name(_batch(tmp_path, n, tenant=tenant))
    statements: list[str] = []
    mine = threading.get_ident()

    def seen(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if threading.get_ident() == mine:  # not the session's housekeeper or worker meanwhile
            statements.append(statement)

    event.listen(get_engine(), "before_cursor_execute", seen)
    try:
        one = batches.list_batches(api_key="k", admin=False, after=None, limit=1, tenant=tenant)
        few, statements[:] = len(statements), []
        every = batches.list_batches(api_key="k", admin=False, after=None, limit=3, tenant=tenant)
    finally:
        event.remove(get_engine(), "before_cursor_execute", seen)
    assert len(one["data"]) == 1 and len(every["data"]) == 3
    assert len(statements) == few, statements
    assert [b["request_counts"]["total"] for b in every["data"]] == [3, 2, 1]


def test_a_batch_whose_tries_run_out_fails_as_the_servers_fault_and_stays_failed(
    services, quiet_model, tmp_path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(settings, "batch_submission_attempts", 2)
    monkeypatch.setattr(settings, "batch_submission_backoff_s", 0.0)
    batch_id = _batch(tmp_path, 3)

    def stops(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("the send's disk went away")  # transient, and not the broker (which is waited for)

    from services.runs import submit

    monkeypatch.setattr(submit, "_send", stops)  # the lines are stored, and their send stops
    batches.submit_batch_by_name(batch_id)
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "validating"
    assert batch_id in batches.retry_batch_submissions()  # try 2 of 2 fails too
    batch = batches.get_batch(batch_id, api_key="k", admin=False)
    assert batch["status"] == "failed"
    (error,) = batch["errors"]["data"]
    assert error["code"] == "server_error" and "submission failed 2 times" in error["message"]
    gave_up = [r for r in caplog.records if "giving up" in r.getMessage()]  # the log it points to
    assert gave_up and gave_up[0].exc_info is not None and "disk went away" in caplog.text
    # Found in review: the error's own text reached the tenant (a driver's names hosts and paths).
    assert "disk went away" not in error["message"] and "OSError" in error["message"], error
    assert batch_id not in batches.retry_batch_submissions()  # `failed` is final: nothing resumes it
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "failed"
    # review: the turns it had stored stayed queued (a worker would answer a batch that writes no
    # output), and a cancel then moved the failed batch on to cancelled, with files
    with session_scope() as s:
        statuses = s.scalars(select(Turn.status).join(Run).where(Run.name == batch_id)).all()
    assert statuses and set(statuses) == {TurnStatus.CANCELLED}
    with pytest.raises(batches.BatchEnded, match="status 'failed'"):  # nothing left to stop: a 409
        batches.cancel_batch(batch_id, api_key="k", admin=False)
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "failed"
    with session_scope() as s:  # a batch that failed before this fix still holds queued turns
        run_id = s.scalars(select(Run.id).where(Run.name == batch_id)).one()
        s.execute(
            update(Turn).where(Turn.run_id == run_id).values(status=TurnStatus.QUEUED, finished_at=None)
        )
    with session_scope() as s:
        outcome = cancel_run(session=s, run_id=run_id)
    assert (outcome.before, outcome.after, outcome.cancelled_turns) == (RunStatus.FAILED, RunStatus.FAILED, 3)


def test_a_batch_retry_that_finds_bad_lines_stops_what_an_earlier_try_stored(
    services, quiet_model, tmp_path, monkeypatch
) -> None:
    """Review of the fix above: a retry whose validation now fails (a character the file names was
    deleted between tries) failed the batch without cancelling the turns the earlier try stored."""
    import dataclasses

    from services.runs import submit as submit_module
    from services.runs.validate import LineError

    monkeypatch.setattr(settings, "batch_submission_backoff_s", 0.0)
    batch_id = _batch(tmp_path, 3)
    with _broker_down(services):
        batches.submit_batch_by_name(batch_id)  # stored, not sent: the batch stays validating
    real = submit_module.validate_file

    def character_deleted(*args, **kwargs):  # type: ignore[no-untyped-def]
        check = real(*args, **kwargs)
        return dataclasses.replace(check, errors=[LineError(1, "character: unknown character 'gone'")])

    monkeypatch.setattr(submit_module, "validate_file", character_deleted)
    assert batch_id in batches.retry_batch_submissions()
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "failed"
    with session_scope() as s:
        statuses = s.scalars(select(Turn.status).join(Run).where(Run.name == batch_id)).all()
    assert statuses and set(statuses) == {TurnStatus.CANCELLED}


@contextmanager
def _database_down(services: Path) -> Iterator[None]:
    """The embedded PostgreSQL really stopped, and started again after (pg_ctl's restart starts a
    stopped server with the options it last ran with: the same socket)."""
    from core import embedded

    assert embedded.stop_postgres(services)
    try:
        yield
    finally:
        embedded.restart_postgres(services)


def test_a_submission_with_the_database_down_raises_nothing_and_a_later_sweep_submits_it(
    services, quiet_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(settings, "batch_submission_backoff_s", 0.0)
    batch_id = _batch(tmp_path, 3)
    with _database_down(services):
        batches.submit_batch_by_name(batch_id)  # the sweeper's loop goes on: nothing raised
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
        assert (run.status, run.submission_attempts) == (RunStatus.VALIDATING, 0)  # nothing recorded
    # this one among them: another test's batch left waiting may be retried too (files run in any order)
    assert batch_id in batches.retry_batch_submissions(stalled_after_s=0)
    batch = batches.get_batch(batch_id, api_key="k", admin=False)
    assert batch["status"] == "in_progress" and batch["request_counts"]["total"] == 3


def test_one_housekeeping_pass_spends_a_bounded_time_on_submissions_and_finalizing(monkeypatch) -> None:
    """Review (stop 76): a pass submitted every due batch and finalized up to ten, however long they
    took: one tenant's big batches, due at once after an API restart, held the sweeper's next pass,
    and with it the re-send of another tenant's lost live turn. The rest wait for the next pass."""
    from tests.conftest import patch_on_this_thread

    # The fakes on this thread only: the session worker's housekeeping finalizes on a thread of its
    # own, and took one of the fake runs once (CI failed so, on a loaded machine).
    monkeypatch.setattr(batches, "PASS_S", 0.2)
    patch_on_this_thread(
        monkeypatch, batches, "batch_submissions_due", lambda **_: [f"b{i}" for i in range(5)]
    )
    submitted: list[str] = []

    def slow_submit(name: str) -> None:
        submitted.append(name)
        time.sleep(0.15)

    patch_on_this_thread(monkeypatch, batches, "submit_batch_by_name", slow_submit)
    assert batches.retry_batch_submissions() == submitted and 1 <= len(submitted) <= 2, submitted
    waiting = [uuid.uuid4() for _ in range(5)]
    finalized: list[uuid.UUID] = []
    patch_on_this_thread(monkeypatch, batches, "finalizing_runs", lambda **_: [waiting[len(finalized)]])

    def slow_finalize(run_id: uuid.UUID) -> str:
        finalized.append(run_id)
        time.sleep(0.15)
        return str(run_id)

    patch_on_this_thread(monkeypatch, batches, "finalize_run", slow_finalize)
    names = batches.finalize_runs()
    assert names == [str(r) for r in finalized] and 1 <= len(names) <= 2, names
    # review: one budget for a pass's steps together (housekeeping shares it): what finalizing spent
    # is not spent again on submissions, but for the one each step starts at least
    finalized.clear()
    submitted.clear()
    shared = time.monotonic() + batches.PASS_S
    assert 1 <= len(batches.finalize_runs(deadline=shared)) <= 2
    assert batches.retry_batch_submissions(deadline=shared) == ["b0"] == submitted


def test_a_sweep_that_meets_the_live_submitter_uses_up_no_try(quiet_model, tmp_path, monkeypatch) -> None:
    from db.runs import submission_lock

    monkeypatch.setattr(settings, "batch_submission_attempts", 2)
    batch_id = _batch(tmp_path, 2)
    with submission_lock(batch_id) as got:  # the background submitter, at work on its own connection
        assert got
        for _ in range(3):  # sweeps racing it, more of them than the batch has tries
            batches.submit_batch_by_name(batch_id)
        with session_scope() as s:
            run = s.scalars(select(Run).where(Run.name == batch_id)).one()
            assert (run.status, run.submission_attempts) == (RunStatus.VALIDATING, 0)
    batches.submit_batch_by_name(batch_id)  # the lock free: the first real try submits it
    batch = batches.get_batch(batch_id, api_key="k", admin=False)
    assert batch["status"] == "in_progress" and batch["errors"] is None
    with session_scope() as s:
        assert s.scalar(select(Run.submission_attempts).where(Run.name == batch_id)) == 1


def test_a_batch_with_bad_lines_calls_back_that_it_failed(quiet_model, tmp_path, monkeypatch) -> None:
    sent = []
    monkeypatch.setattr(batches, "send_callback", sent.append)
    monkeypatch.setattr(settings, "callback_secret", SecretStr("s"))
    monkeypatch.setattr("services.callbacks.callback_destinations", lambda urls, tenant="": {})  # no DNS here
    batch_id = _batch(tmp_path, 2, callback_url="https://receiver.example/hook")
    with session_scope() as s:  # the file turns bad: a line the run cannot honour
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
        from services.files import find_file

        path = find_file(run.input_file_id).path
    path.write_text(path.read_text() + json.dumps({**openai_line("x", USER), "url": "/v1/embeddings"}) + "\n")
    with session_scope() as s:  # the digest the run was created with is the old file's
        s.execute(Run.__table__.update().where(Run.name == batch_id).values(file_hash=file_digest(path)))
    batches.submit_batch_by_name(batch_id)
    assert batches.get_batch(batch_id, api_key="k", admin=False)["status"] == "failed"
    assert [str(x) for x in sent] == [str(run.id)]


def test_a_run_whose_files_cannot_be_written_waits_at_the_back_without_blocking_others(
    quiet_model, tmp_path, monkeypatch
) -> None:
    first = _submit(tmp_path, "stuck-" + tmp_path.name, 1, input_file_id="file-test")
    second = _submit(tmp_path, "next-" + tmp_path.name, 1, input_file_id="file-test")
    for sub in (first, second):
        with session_scope() as s:
            cancel_run(session=s, run_id=sub.id)
    real = batches._write_files

    def full_disk(session, run, written):
        if run.id == first.id:
            raise OSError(28, "No space left on device")
        return real(session, run, written)

    monkeypatch.setattr(batches, "_write_files", full_disk)
    assert batches.finalize_runs() == [second.name]
    with session_scope() as s:
        stuck = s.get_one(Run, first.id)
        assert stuck.status == RunStatus.FINALIZING and "No space left" in stuck.error
    monkeypatch.setattr(batches, "_write_files", real)
    assert batches.finalize_runs() == [first.name]


def test_a_finalizing_that_fails_after_writing_its_files_leaves_none_behind(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: the output and error files stayed on disk when their rows were not committed
    (a database blip, a full disk at the second file), and every later try wrote two more."""
    sub = _submit(tmp_path, "orphans-" + tmp_path.name, 1, input_file_id="file-test")
    with session_scope() as s:
        cancel_run(session=s, run_id=sub.id)
    before = set(settings.batch_files_dir.iterdir()) if settings.batch_files_dir.exists() else set()
    real = batches.add_file

    def second_row_fails(**kwargs):  # type: ignore[no-untyped-def]
        if kwargs["filename"].endswith("_error.jsonl"):
            raise OSError(28, "No space left on device")
        return real(**kwargs)

    monkeypatch.setattr(batches, "add_file", second_row_fails)
    assert batches.finalize_run(sub.id) is None
    assert set(settings.batch_files_dir.iterdir()) == before
    monkeypatch.setattr(batches, "add_file", real)
    assert batches.finalize_run(sub.id) == sub.name
    kept = set(settings.batch_files_dir.iterdir()) - before
    assert len(kept) == 1  # the error file; the output file had no line, so none is kept
    # A try whose rows did commit (the COMMIT's answer lost) keeps its files: only rowless ones go.
    batches.remove_unlisted(sorted(kept))
    assert set(settings.batch_files_dir.iterdir()) - before == kept


def test_a_batch_whose_files_cannot_be_written_is_tried_once_a_pass_and_a_database_blip_raises_nothing(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: a run that failed to finalize went to the back of the line, and when it was
    the only one it came straight back: ten tries a housekeeping pass. And recording the failure with
    the database down too raised out of a cancel that had committed (a 500) and out of housekeeping."""
    from sqlalchemy.exc import OperationalError

    sub = _submit(tmp_path, "unwritable-" + tmp_path.name, 1, input_file_id="file-test")
    with session_scope() as s:
        cancel_run(session=s, run_id=sub.id)
    tries: list[object] = []

    def disk_full(session, run, written):  # type: ignore[no-untyped-def]
        tries.append(run.id)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batches, "_write_files", disk_full)
    batches.finalize_runs()
    assert tries.count(sub.id) == 1

    def database_down(**kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("UPDATE runs", {}, Exception("the database system is shutting down"))

    monkeypatch.setattr(batches, "postpone_finalizing", database_down)
    assert batches.finalize_run(sub.id) is None and tries.count(sub.id) == 2
    with session_scope() as s:
        assert s.get_one(Run, sub.id).status == RunStatus.FINALIZING  # tried again later, as it is


def test_a_batch_whose_files_keep_failing_fails_once_the_give_up_time_has_passed(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Review: a batch whose files could never be written (a fault that does not pass) was tried at
    every housekeeping pass for ever, its client never told. From its first failure in a row, after
    MLCHAT_FINALIZE_GIVE_UP_HOURS, it fails with the last reason, and its callback is queued."""
    from datetime import timedelta

    sub = _submit(tmp_path, "give-up-" + tmp_path.name, 2, input_file_id="file-test")
    with session_scope() as s:  # one line answered, then the batch cancelled: its files to write
        answered = s.scalar(select(Turn.id).where(Turn.run_id == sub.id).order_by(Turn.number).limit(1))
        s.execute(
            update(Turn)
            .where(Turn.id == answered)
            .values(status=TurnStatus.DONE, reply="Well met.", finished_at=func.now())
        )
    with session_scope() as s:
        cancel_run(session=s, run_id=sub.id)
        s.execute(update(Run).where(Run.id == sub.id).values(callback_url="https://example.com/done"))

    def never(session, run, written):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", "/srv/mlchat/files")

    called: list[uuid.UUID] = []
    monkeypatch.setattr(batches, "_write_files", never)
    monkeypatch.setattr(batches, "send_callback", called.append)
    assert batches.finalize_run(sub.id) is None
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.status == RunStatus.FINALIZING and run.finalize_failed_since is not None
        first = run.finalize_failed_since
    assert batches.finalize_run(sub.id) is None  # a second failure keeps the first one's time
    with session_scope() as s:
        assert s.get_one(Run, sub.id).finalize_failed_since == first
        hours = timedelta(hours=settings.finalize_give_up_hours, minutes=1)
        s.execute(update(Run).where(Run.id == sub.id).values(finalize_failed_since=first - hours))
    assert called == [] and batches.finalize_run(sub.id) is None
    with session_scope() as s:
        run = s.get_one(Run, sub.id)
        assert run.status == RunStatus.FAILED and run.error_code == "server_error"
        # its class, not its text: the tenant reads it, and the OS's names the server's paths (review)
        said = "finalizing: an internal error, PermissionError (Permission denied); the server's log has it"
        assert run.error == f"gave up writing its files: {said}"
    assert called == [sub.id]
    view = batches.get_batch(sub.name, api_key=None, admin=True)
    assert view["status"] == "failed" and said in view["errors"]["data"][0]["message"]
    assert "/srv/mlchat" not in view["errors"]["data"][0]["message"]
    from services.runs import export_run  # its answered line is still there for the operator (README)

    results, _, n_ok, n_err = export_run(sub.name, tmp_path / "out", "openai")
    assert (n_ok, n_err) == (1, 1) and "Well met." in results.read_text()


def test_a_completed_batch_is_not_reopened_to_write_its_files_a_second_time(quiet_model, tmp_path) -> None:
    """Found in review: `mlchat run retry-failed` on a completed batch sent it through finalizing
    again: new output and error files replaced the ids, the old rows stayed listed and counted in
    the key's quota, and no callback said so."""
    from db.runs import reopen_failed

    sub = _submit(tmp_path, "reopen-" + tmp_path.name, 1, input_file_id="file-test")
    with session_scope() as s:
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.COMPLETED))
    with session_scope() as s, pytest.raises(ValueError, match="completed batch"):
        reopen_failed(session=s, run_id=sub.id)


def test_a_cancel_waits_for_the_chunk_being_stored_and_then_sees_its_turns(quiet_model, tmp_path) -> None:
    import threading

    from db.bulk_turns import StagedTurn, insert_run_turns
    from db.runs import create_run

    with session_scope() as s:
        run, _ = create_run(session=s, name="race-" + tmp_path.name, model=MODEL, file_hash="h", total=1)
        run_id = run.id
    staged = StagedTurn(
        idempotency_key=f"race:{run_id}",
        request_hash="h",
        conversation=f"race-{run_id}",
        character="elara",
        player_name="",
        story=None,
        story_time=None,
        message="Hello?",
        model=MODEL,
        params={"seed": 1, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "stop": []},
        custom_id="r0",
    )
    import db.bulk_turns

    outcome: list = []
    real_connection = db.bulk_turns.psycopg_connection
    blocked: list[bool] = []

    def cancel() -> None:
        with session_scope() as s:
            outcome.append(cancel_run(session=s, run_id=run_id))

    def connection_after_a_cancel_lands(session):  # between the status check and the insert
        canceller = threading.Thread(target=cancel)
        canceller.start()
        canceller.join(timeout=1.0)
        blocked.append(canceller.is_alive())
        threads.append(canceller)
        return real_connection(session)

    threads: list[threading.Thread] = []
    db.bulk_turns.psycopg_connection = connection_after_a_cancel_lands
    try:
        with session_scope() as session:
            insert_run_turns(session=session, run_id=run_id, turns=[staged])
    finally:
        db.bulk_turns.psycopg_connection = real_connection
    threads[0].join(timeout=10)
    assert blocked == [True], "the cancel did not wait for the chunk being stored"
    # The cancel saw the stored turn: the run waits in cancelling for the submission to cancel it.
    assert outcome[0].after == RunStatus.CANCELLING
    with session_scope() as s:  # what the submission does next: cancel what it stored
        assert cancel_run(session=s, run_id=run_id).after == RunStatus.CANCELLED


def test_files_expire_as_asked_but_never_under_a_running_batch(base_url, quiet_model, tmp_path) -> None:
    def upload(**fields) -> httpx.Response:
        return httpx.post(
            f"{base_url}/v1/files",
            headers=INGEST,
            files={"file": ("b.jsonl", json.dumps(openai_line("e", USER)).encode() + b"\n")},
            data={"purpose": "batch"} | fields,
        )

    for fields, error in (
        (
            {"expires_after[anchor]": "last_active_at", "expires_after[seconds]": "3600"},
            "expires_after.anchor",
        ),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}, "expires_after.seconds"),
        ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "soon"}, "expires_after.seconds"),
        ({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
    ):
        refused = upload(**fields)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["message"].startswith(error), refused.text
    kept = upload().json()
    assert kept["expires_at"] is None
    expiring = upload(**{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}).json()
    assert expiring["expires_at"] - expiring["created_at"] in (3600, 3601)
    bad_batch = {
        "input_file_id": kept["id"],
        "endpoint": "/v1/chat/completions",
        "output_expires_after": {"anchor": "created_at", "seconds": 10},
    }
    response = httpx.post(f"{base_url}/v1/batches", headers=INGEST, json=bad_batch)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(
        "output_expires_after.seconds"
    )

    # The input of a running batch outlives its expiry; the batch's output files get the lifetime
    # it asked for, and the housekeeping deletes what is due once nothing running reads it.
    batch_id = _batch(tmp_path, 2, output_expires_after={"anchor": "created_at", "seconds": 7200})
    batches.submit_batch_by_name(batch_id)
    input_id = batches.get_batch(batch_id, api_key="k", admin=False)["input_file_id"]
    with session_scope() as s:
        s.execute(
            StoredFile.__table__.update()
            .where(StoredFile.id.in_([expiring["id"], input_id]))
            .values(expires_at=func.now() - timedelta(seconds=1))
        )
    from services.files import find_file

    # Found in review: past its expiry, a file not yet swept (here: kept for the batch reading it)
    # was still listed, served and taken as a new batch's input.
    admin = {"Authorization": "Bearer test-key-1-abcdefgh"}  # sees every key's files
    assert httpx.get(f"{base_url}/v1/files/{input_id}", headers=admin).status_code == 404
    assert httpx.get(f"{base_url}/v1/files/{input_id}/content", headers=admin).status_code == 404
    listed = httpx.get(f"{base_url}/v1/files", params={"limit": 10_000}, headers=admin).json()["data"]
    assert listed and input_id not in {f["id"] for f in listed}
    # Found in review: DELETE still took a file past its expiry (a 409 here, its batch running). As a
    # list's cursor it still pages on: the page's last file may expire before the next is asked for.
    assert httpx.delete(f"{base_url}/v1/files/{input_id}", headers=admin).status_code == 404
    paged = httpx.get(f"{base_url}/v1/files", params={"after": input_id}, headers=admin)
    assert paged.status_code == 200 and input_id not in {f["id"] for f in paged.json()["data"]}, paged.text
    with pytest.raises(batches.BatchRefused, match="^input_file_id: "):
        batches.create_batch(
            input_file_id=input_id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata=None,
            api_key="k",
            admin=False,
        )
    # [] when the session's housekeeper (tests/conftest.py, every second) deleted it first
    assert batches.housekeeping(["nobody"])["files_deleted"] in ([expiring["id"]], [])
    assert find_file(expiring["id"]) is None and find_file(input_id) is not None
    assert not (settings.batch_files_dir / f"{expiring['id']}.jsonl").exists()
    assert httpx.get(f"{base_url}/v1/files/{expiring['id']}", headers=INGEST).status_code == 404
    batches.cancel_batch(batch_id, api_key="k", admin=False)
    ended = batches.get_batch(batch_id, api_key="k", admin=False)
    assert ended["status"] == "cancelled"
    assert ended["output_file_id"] is None  # nothing answered: no output file
    errors = find_file(ended["error_file_id"]).info
    assert errors["expires_at"] - errors["created_at"] in (7200, 7201)
    assert batches.housekeeping(["nobody"])["files_deleted"] in ([input_id], [])
    assert find_file(input_id) is None and find_file(kept["id"]) is not None
    assert batches.housekeeping(["nobody"])["files_deleted"] == []


def test_bytes_a_dead_process_left_without_a_row_are_deleted_once_old(quiet_model, tmp_path) -> None:
    """Found in review: an upload or a finalizing killed between writing its bytes and committing
    their row (and an upload's scratch file) left them on disk for ever: nothing scanned the folder."""
    import os

    from services.files import delete_orphan_files

    recorded = batches.get_batch(_batch(tmp_path, 1), api_key="k", admin=False)["input_file_id"]
    root = settings.batch_files_dir
    orphan, scratch = root / f"file-{'a' * 24}.jsonl", root / f"file-{'b' * 24}.partial"
    young, foreign = root / f"file-{'c' * 24}.jsonl", root / "notes.txt"
    for path in (orphan, scratch, young, foreign):
        path.write_text("x")
    hour_ago = time.time() - 3700
    for path in (orphan, scratch, foreign, root / f"{recorded}.jsonl"):
        os.utime(path, (hour_ago, hour_ago))
    # [] when the session's housekeeper (tests/conftest.py, every second) deleted them first
    assert delete_orphan_files() in (sorted([orphan.name, scratch.name]), [])
    assert not orphan.exists() and not scratch.exists()
    assert young.exists() and foreign.exists() and (root / f"{recorded}.jsonl").exists()


def test_a_finalizings_unrecorded_files_are_spared_by_the_orphan_sweep_however_long_it_runs(
    quiet_model, tmp_path
) -> None:
    """Found in review: the orphan sweep took an unrecorded file older than an hour for a dead
    process's; a finalizing running past the hour (a batch of millions on a busy database) writes its
    files through a buffer that may leave the mtime where it was, and records them at its end: the
    sweep unlinked them under it, and the batch stayed finalizing, or lost its error lines."""
    import os
    from datetime import UTC, datetime

    from services.files import delete_orphan_files

    (tmp_path / "files").mkdir()
    sub = _submit(tmp_path, "long-fin-" + tmp_path.name, 1, input_file_id="file-test")
    claim = _claim(sub.id, 1)
    _fail(claim, [t.id for t in claim.claimed])
    with session_scope() as s:
        assert s.get_one(Run, sub.id).status == RunStatus.FINALIZING
        s.execute(update(Run).where(Run.id == sub.id).values(finalizing_at=func.now() - timedelta(hours=2)))
    root = settings.batch_files_dir
    root.mkdir(parents=True, exist_ok=True)
    writing, dead = root / f"file-{uuid.uuid4().hex[:24]}.jsonl", root / f"file-{uuid.uuid4().hex[:24]}.jsonl"
    behind = root / f"file-{uuid.uuid4().hex[:24]}.jsonl"  # its writer's clock 2 minutes behind (review)
    for path, age_s in (
        (writing, 5400),
        (behind, 7200 + 120),
        (dead, 10 * 86400),
    ):  # made after the finalizing began, or long before
        path.write_text("x")
        then = datetime.now(UTC).timestamp() - age_s
        os.utime(path, (then, then))
    delete_orphan_files()
    assert writing.exists() and behind.exists() and not dead.exists()
    with session_scope() as s:  # finished: what is still unrecorded is no one's
        s.execute(update(Run).where(Run.id == sub.id).values(status=RunStatus.COMPLETED))
    assert writing.name in delete_orphan_files() or not writing.exists()


def test_a_batch_cancel_answers_before_its_files_are_written(
    base_url, quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: a cancel wrote the batch's output file inside the request; a large batch's
    took minutes, the client timed out and sent the cancel again while the first still wrote."""
    batch_id = _batch(tmp_path, 2)
    batches.submit_batch_by_name(batch_id)
    release, real = threading.Event(), batches.finalize_run

    def slow(run_id):  # type: ignore[no-untyped-def]
        release.wait(30)  # a large batch's files
        return real(run_id)

    monkeypatch.setattr(batches, "finalize_run", slow)
    admin = {"Authorization": "Bearer test-key-1-abcdefgh"}  # _batch's key is no HTTP key
    try:
        answer = httpx.post(f"{base_url}/v1/batches/{batch_id}/cancel", headers=admin, timeout=10)
        # OpenAI's cancelling while its files are written (it was `finalizing`, a state a client
        # that cancelled does not wait through)
        assert answer.status_code == 200 and answer.json()["status"] == "cancelling", answer.text
    finally:
        release.set()
    deadline = time.monotonic() + 30
    while batches.get_batch(batch_id, api_key="k", admin=False)["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert batches.get_batch(batch_id, api_key="k", admin=False)["error_file_id"] is not None


def test_a_batchs_stored_turns_are_sent_a_page_at_a_time_each_read_once(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: each page of a batch's turns to send was read from its first turn, passing
    over every turn sent already (a batch of a million lines: ~100M rows read to send it)."""
    from db import runs
    from services.runs import submit

    monkeypatch.setattr(submit, "CHUNK", 2)
    pages: list[tuple[int, int]] = []
    real = runs.unsent_turns

    def spied(**kwargs):  # type: ignore[no-untyped-def]
        rows = real(**kwargs)
        pages.append((kwargs["after"], len(rows)))
        return rows

    monkeypatch.setattr(submit, "unsent_turns", spied)
    batch_id = _batch(tmp_path, 5)
    batches.submit_batch_by_name(batch_id)
    assert [n for _, n in pages] == [2, 2, 1, 0]
    afters = [after for after, _ in pages]
    assert afters[0] == 0 and afters == sorted(afters) and len(set(afters)) == 4  # each page on from the last
    assert _unsent(batch_id) == 0


def test_a_batch_whose_commit_answer_was_lost_is_answered_not_created_twice(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: a batch's row committed with the COMMIT's answer lost was a 503; the client
    created the batch again, and housekeeping later submitted the first too: both answered."""
    from sqlalchemy.exc import OperationalError

    file_id = _stored_file([openai_line("lost", USER)])
    real = batches._create_run

    def committed_then_lost(*args, **kwargs):  # type: ignore[no-untyped-def]
        real(*args, **kwargs)
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(batches, "_create_run", committed_then_lost)
    created = _create(file_id)
    assert created["status"] == "validating" and created["input_file_id"] == file_id
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Run).where(Run.input_file_id == file_id)) == 1

    def never_stored(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(batches, "_create_run", never_stored)
    with pytest.raises(OperationalError):  # nothing stored: the outage it is (a 503)
        _create(file_id)


def test_a_submission_stopped_by_busy_grammar_builders_waits_for_them_spending_no_try(monkeypatch) -> None:
    """Found in review (stop 65): no grammar builder free in time for a line's schema (GrammarBusy,
    "send it again") counted as a failed try of the batch's submission; a file of a few slow schemas
    spent every try on it and the batch failed as the server's fault, its stored lines cancelled.
    Like the broker or the database away, it spends no try: the batch waits for them."""
    from services import batches
    from structured.spec import GrammarBusy

    postponed: list[dict] = []
    given_up: list[str] = []
    monkeypatch.setattr(batches, "postpone_submission", lambda **kwargs: postponed.append(kwargs))
    monkeypatch.setattr(batches, "_give_up", lambda run_id, callback, error: given_up.append(error))
    busy = RuntimeError("line 7 stopped")
    busy.__cause__ = GrammarBusy("no grammar builder free within 10 s")
    spent = settings.batch_submission_attempts
    batches._retry_later(uuid.uuid4(), "b", None, spent, busy, waited_s=30.0)
    assert given_up == []
    (later,) = postponed
    assert later["refund"] is True and "waits for the grammar builders" in later["error"]
    # Review: a file whose own slow schemas keep the builders busy would wait on itself for its whole
    # window; past an hour of waiting its stops spend tries again.
    batches._retry_later(uuid.uuid4(), "b", None, spent, busy, waited_s=3601.0)
    assert len(given_up) == 1 and "GrammarBusy" in given_up[0]


def test_a_stopped_submission_try_is_postponed_once_the_database_is_back_not_left_counted(
    monkeypatch,
) -> None:
    """Found in review (stop 65): the try a database outage stopped was postponed (its try refunded)
    in one go, at the moment the connection dropped, which the same outage failed: the try stayed
    counted, the next sweep counted another, and a flapping database failed the batch as the
    server's fault after five. The postponement waits for the database, within a bound."""
    from sqlalchemy.exc import OperationalError

    from services import batches

    postponed: list[dict] = []

    def away_twice(**kwargs: object) -> None:
        if len(postponed) < 2:
            postponed.append({})
            raise OperationalError("UPDATE runs", {}, ConnectionError("server closed the connection"))
        postponed.append(dict(kwargs))

    monkeypatch.setattr(batches, "postpone_submission", away_twice)
    dropped = OperationalError("INSERT INTO turns", {}, ConnectionError("server closed the connection"))
    batches._retry_later(uuid.uuid4(), "b", None, 1, dropped, waited_s=5.0)
    assert len(postponed) == 3
    assert postponed[2]["refund"] is True and "waits for the database" in str(postponed[2]["error"])


def test_a_batch_is_never_submitted_or_resumed_from_the_cli(quiet_model, tmp_path, capsys) -> None:
    """Found in review: `mlchat run resume batch_<id> FILE` moved a failed batch (its client called
    back `failed`) to validating and sent its file, and `run submit --name batch_<id> other.jsonl`
    replaced the file its input_file_id names; both also ran a batch waiting for its retry with its
    lines sent before the whole file was stored. The service alone submits a batch."""
    from db.runs import fail_submission
    from scripts.cli import main as cli
    from services.files import find_file

    file_id = _stored_file([openai_line("a", USER), openai_line("b", USER)])
    batch_id = _create(file_id)["id"]
    with session_scope() as s:  # as its tries running out fails it (its client is called back `failed`)
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
        failed = "submission failed 3 times"
        assert fail_submission(session=s, run_id=run.id, error=failed, error_code="server_error", final=True)
    found = find_file(file_id)
    assert found is not None
    path = found.path
    other = _write(tmp_path / "other.jsonl", [openai_line("z", USER)])
    for args in (["run", "resume", batch_id, str(path)], ["run", "submit", "--name", batch_id, str(other)]):
        assert cli(args) == 2, args
        assert "is a batch of the HTTP API (/v1/batches)" in capsys.readouterr().err
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
        assert run.status == RunStatus.FAILED and run.input_file_id == file_id and run.error == failed
        assert s.scalar(select(func.count()).select_from(Turn).where(Turn.run_id == run.id)) == 0


def test_a_database_blip_before_a_try_is_counted_refunds_no_earlier_try(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Found in review: a try stopped by the database before its count was written (taking the
    submission lock) was postponed with a refund, which gave back an earlier try counted for its own
    error: with a flapping database a batch whose file fails every try never ran out of tries."""
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    batch_id = _batch(tmp_path, 0, lines=[openai_line("a", USER)])
    with session_scope() as s:
        s.execute(update(Run).where(Run.name == batch_id).values(submission_attempts=2))

    @contextmanager
    def away(name: str, **_: object):  # type: ignore[no-untyped-def]
        raise OperationalError(
            "SELECT pg_try_advisory_lock", {}, ConnectionError("server closed the connection")
        )
        yield  # pragma: no cover

    monkeypatch.setattr(batches, "submission_lock", away)
    batches.submit_batch_by_name(batch_id)
    with session_scope() as s:
        run = s.scalars(select(Run).where(Run.name == batch_id)).one()
    assert run.status == RunStatus.VALIDATING and "waits for the database" in (run.error or "")
    assert run.submission_attempts == 2  # the earlier tries stay counted


def test_the_orphan_scan_is_due_once_in_its_interval_across_processes(tmp_path, monkeypatch) -> None:
    """Review (stop 76): the scan's last time was each process's own, and compose's sweeper is a new
    process each minute: it read the whole files folder every pass instead of every ten minutes."""
    # review: compose names a state folder that nothing makes (no embedded server there)
    monkeypatch.setattr(settings, "state_dir", tmp_path / "state")
    assert batches._orphan_sweep_due() and not batches._orphan_sweep_due()
    import os
    import subprocess
    import sys

    code = "from services import batches; print(batches._orphan_sweep_due())"
    env = os.environ | {"MLCHAT_STATE_DIR": str(tmp_path / "state"), "MLCHAT_ENV_FILE": ""}
    again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert again.stdout.strip() == "False", again.stderr  # a new process, the same host: not due
    old = time.time() - batches.ORPHAN_SWEEP_EVERY_S - 1
    os.utime(tmp_path / "state" / batches.ORPHAN_SCAN_MARKER, (old, old))
    assert batches._orphan_sweep_due()
    # a folder it cannot write: this process's own last look decides, as before
    monkeypatch.setattr(settings, "state_dir", tmp_path / "file-not-folder" / "state")
    (tmp_path / "file-not-folder").write_text("")
    monkeypatch.setattr(batches, "_orphans_swept_at", [-batches.ORPHAN_SWEEP_EVERY_S])
    assert batches._orphan_sweep_due() and not batches._orphan_sweep_due()


def test_a_finalizing_killed_mid_write_is_counted_and_goes_to_the_back_of_the_line(
    quiet_model, tmp_path, monkeypatch
) -> None:
    """Review of kills between commits: a finalizing try recorded nothing until it failed; one killed
    mid-write (a deploy's stop, out of memory) left the run first in line at every pass, never
    reaching the give-up, its files kept by the orphan sweep for good. Each try is recorded first."""
    from db.runs import finalizing_runs

    subs = [
        _submit(tmp_path, f"killed-fin-{i}-" + tmp_path.name, 1, input_file_id="file-test") for i in range(2)
    ]
    for i, sub in enumerate(subs):
        claim = _claim(sub.id, 1)
        _fail(claim, [t.id for t in claim.claimed])
        with session_scope() as s:  # the first has waited longest
            s.execute(
                update(Run).where(Run.id == sub.id).values(finalizing_at=func.now() - timedelta(hours=3 - i))
            )
    killed, waiting = subs

    def killed_mid_write(session, run, written):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # stands for the kill: no except clause of the try runs

    patch_on_this_thread(monkeypatch, batches, "_write_files", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        batches.finalize_run(killed.id)
    with session_scope() as s:
        run = s.get_one(Run, killed.id)
        assert run.status == RunStatus.FINALIZING and run.finalize_failed_since is not None
        ahead = finalizing_runs(session=s, limit=10_000)
    assert ahead.index(waiting.id) < ahead.index(killed.id)


def test_a_batch_cancelled_before_its_lines_were_stored_keeps_its_total_while_it_is_cancelled(
    quiet_model, tmp_path
) -> None:
    """Review of the numbers users read: a batch validated (5 good lines, 1 refused) whose storing had
    not begun, then cancelled, answered `total: 1, failed: 1` while cancelling and finalizing ("1 of
    1 failed"), then 6 once cancelled: its total fell and rose again."""
    batch_id = _batch(tmp_path, 1)
    with session_scope() as s:  # as a submission that validated the file, then failed to store it
        s.execute(
            update(Run)
            .where(Run.name == batch_id)
            .values(
                total=5,
                refused=[{"line": 2, "custom_id": "bad", "message": "body.messages: missing", "param": None}],
            )
        )
    # its files not written yet (review: finalized at once, it ended `cancelled`, whose total was right)
    cancelling = batches.cancel_batch(batch_id, api_key="k", admin=False, finalize=lambda run_id: None)
    assert cancelling["status"] == "cancelling", cancelling["status"]
    assert cancelling["request_counts"]["total"] == 6, cancelling["request_counts"]
    assert batches.get_batch(batch_id, api_key="k", admin=False)["request_counts"]["total"] == 6


def test_a_file_deleted_while_a_batch_is_created_over_it_waits_and_is_refused_as_in_use(world) -> None:
    """Review (deletes racing use): the batch's creation read the file, hashed it, then inserted the
    run with no lock on the file's row, and the delete's guard (no unfinished batch reads it) ran on
    a snapshot taken before that run committed: both answered 200, and the batch failed for want of
    its bytes. The creation holds the row; the delete waits, then sees the batch."""
    from db.files import add_file, delete_file, hold_input_file
    from db.runs import create_run
    from tests.conftest import another_session_waits_on_a_lock

    file_id = f"file-{uuid.uuid4().hex[:24]}"
    with session_scope() as s:
        add_file(
            session=s, file_id=file_id, purpose="batch", filename="in.jsonl", size=10,
            path=f"{file_id}.jsonl", api_key="key-a", tenant="studio-a",
        )  # fmt: skip
    deleted: list[Any] = []

    def delete_it() -> None:
        with session_scope() as other:
            deleted.append(delete_file(session=other, file_id=file_id))

    with session_scope() as s:
        assert hold_input_file(session=s, file_id=file_id)
        deleter = threading.Thread(target=delete_it)
        deleter.start()
        assert another_session_waits_on_a_lock(held_by=s)
        create_run(
            session=s, name=f"batch_{uuid.uuid4().hex}", model=settings.model, file_hash="0" * 64, total=0,
            fields={"input_file_id": file_id, "input_format": "openai", "tenant": "studio-a"},
        )  # fmt: skip
    deleter.join(30)
    assert deleted == [None]  # refused: the batch reads it
    with session_scope() as s:
        assert s.get(StoredFile, file_id) is not None
    # ... and the creation holds it (review): deleted after the request read it, no batch is made
    stored = _stored_file([openai_line("b0", [{"role": "user", "content": "Hi?"}])])
    real = batches.file_digest_and_lines

    def deleted_meanwhile(path: Any) -> Any:
        with session_scope() as other:
            other.execute(delete(StoredFile).where(StoredFile.id == stored))
        return real(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batches, "file_digest_and_lines", deleted_meanwhile)
        with pytest.raises(batches.BatchRefused, match=f"input_file_id: no file '{stored}'"):
            _create(stored)
