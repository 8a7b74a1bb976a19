"""The producer API: validation, idempotency, conversations, cancel; real PostgreSQL and Redis."""

import pytest
from pydantic import ValidationError

from db.models import TurnStatus
from db.turns import IdempotencyConflict
from tasks.producer import cancel_turn, enqueue_turn, enqueue_turns, get_turn
from tests.conftest import new_conversation


def test_idempotency_key_dedupes_a_retried_call(world) -> None:
    req = new_conversation() | {
        "message": "Any rooms free?",
        "idempotency_key": "k-" + new_conversation()["conversation"],
    }
    first = enqueue_turn(req)
    again = enqueue_turn(req)
    assert first == again
    view = get_turn(first)
    assert view is not None and view.status == TurnStatus.QUEUED
    assert view.params["seed"] >= 0  # a seed is drawn and recorded when none was given


def test_reused_key_with_different_content_is_refused(world) -> None:
    req = new_conversation() | {
        "message": "First",
        "idempotency_key": "dup-" + new_conversation()["conversation"],
    }
    enqueue_turns([req], send=False)
    with pytest.raises(IdempotencyConflict, match="different request"):
        enqueue_turns([req | {"message": "Second"}], send=False)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"character": "nobody"}, ValueError, "unknown character 'nobody'"),
        ({"character": None}, ValueError, "unknown conversation"),
        ({"message": "   "}, ValidationError, "message is empty"),
        ({"message": "x" * 5000}, ValidationError, "limit is 4000"),
        ({"message": "hi\x00there"}, ValidationError, "control characters"),
        ({"message": "bad \udcff"}, ValidationError, "not valid UTF-8"),
        ({"params": {"temperature": -1}}, ValidationError, "temperature"),
        ({"params": {"top_p": 1.5}}, ValidationError, "top_p"),
        ({"params": {"max_new_tokens": 0}}, ValidationError, "max_new_tokens"),
        ({"params": {"max_new_tokens": 10**6}}, ValidationError, "at most 1024"),
        ({"params": {"beam_width": 3}}, ValidationError, "beam_width"),
        ({"model": "gpt-oss-20b"}, ValueError, "unknown model 'gpt-oss-20b'"),
    ],
)
def test_bad_input_gets_a_clear_error_and_stores_nothing(world, change, error, match) -> None:
    req = new_conversation() | {"message": "Hello"} | change
    with pytest.raises(error, match=match):
        enqueue_turns([req], send=False)


def test_a_conversation_keeps_its_character(world) -> None:
    conv = new_conversation("elara")
    enqueue_turns([conv | {"message": "Hi"}], send=False)
    with pytest.raises(ValueError, match="belongs to character 'elara'"):
        enqueue_turns([conv | {"character": "luffy", "message": "Hi"}], send=False)


def test_cancel_a_queued_turn(world) -> None:
    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Never mind"}], send=False)
    assert cancel_turn(turn_id) is True
    assert get_turn(turn_id).status == TurnStatus.CANCELLED
    assert cancel_turn(turn_id) is False
