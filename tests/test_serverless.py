"""The RunPod-style handler over the same pipeline: a sample event in, answered turns out."""

from tests.conftest import new_conversation
from worker.serverless import handler


def test_a_sample_event_is_answered_in_conversation_order(engine) -> None:
    conv = new_conversation("elara")
    event = {
        "input": {
            "turns": [
                conv | {"message": "Is the north road safe?", "player_name": "Rowan"},
                {"conversation": conv["conversation"], "message": "And the Thornwood?"},
            ]
        }
    }
    result = handler(event)
    first, second = result["turns"]
    assert first["status"] == second["status"] == "done", result
    assert first["reply"] and second["reply"] and second["usage"]["completion_tokens"] > 0
    assert first["context"]["prompt_tokens"] == first["usage"]["prompt_tokens"]
    assert second["context"]["history"], "the second turn saw the first exchange"


def test_an_earlier_turn_a_stopped_call_left_unanswered_is_answered_first_not_waited_on(engine) -> None:
    """Found in review: with no queue, a turn an earlier call left unanswered (it raised mid-batch
    and handed the turn back, or its container was stopped) was sent by nothing, and every later
    turn of its conversation came back queued behind it, for ever, with no error."""
    from services.producer import enqueue_turns, get_turn

    conv = new_conversation("elara")
    (left,) = enqueue_turns([conv | {"message": "Is the ford passable?"}], send=False)
    result = handler({"input": {"conversation": conv["conversation"], "message": "And the bridge?"}})
    (later,) = result["turns"]
    assert later["status"] == "done", result
    first = get_turn(left)
    assert first is not None and first.status == "done" and first.reply


def test_a_turn_another_call_holds_or_waits_behind_is_waited_for_and_returned_answered(
    engine, monkeypatch
) -> None:
    """Found in review: two calls on one conversation at once. The later took the earlier's turn as
    its own earlier turn and answered it, and the earlier call, finding its turn claimed, returned it
    `running`, unanswered; and a call whose turn waited behind another call's returned it `queued`.
    It now waits for the other call (looking again every HELD_POLL_S); and answers the turn itself
    once the other call's claim lapses (its container died)."""
    import threading
    import time
    import uuid

    from db.session import session_scope
    from db.turns import TurnOutcome, claim_turns, store_replies
    from services.producer import enqueue_turns
    from worker import inline

    looks: list[int] = []
    real = inline._running_elsewhere
    monkeypatch.setattr(inline, "_running_elsewhere", lambda ids: looks.append(1) or real(ids))

    def held_by_another_call(line: dict, lease_s: float):  # type: ignore[no-untyped-def]
        (turn_id,) = enqueue_turns([line], send=False)
        with session_scope() as s:
            claim = claim_turns(session=s, turn_ids=[turn_id], lease_s=lease_s, max_attempts=3)
        assert [t.id for t in claim.claimed] == [turn_id]
        return claim.token, claim.claimed[0]

    def answered_by_the_other_call_in(seconds: float, token, turn) -> threading.Thread:  # type: ignore[no-untyped-def]
        outcome = TurnOutcome(
            turn_id=turn.id,
            conversation_id=turn.conversation_id,
            user_message=turn.message,
            user_embedding=None,
            reply="Answered by the other call.",
            reply_embedding=None,
            prompt="",
            context={},
            usage={},
            timings={},
            params=turn.params,
        )

        def answer() -> None:
            time.sleep(seconds)
            with session_scope() as s:
                stored.extend(store_replies(session=s, token=token, outcomes=[outcome]))

        stored: list = []
        thread = threading.Thread(target=answer)
        thread.stored = stored  # type: ignore[attr-defined]
        thread.start()
        return thread

    # This call's own turn (a replay of the line: the same idempotency key), held by another call.
    key = uuid.uuid4().hex
    line = new_conversation("elara") | {"message": "Is the ford passable?", "idempotency_key": key}
    token, turn = held_by_another_call(line, lease_s=60)
    other = answered_by_the_other_call_in(1.5, token, turn)
    (mine,) = handler({"input": line})["turns"]
    other.join()
    assert other.stored == [turn.id] and looks  # type: ignore[attr-defined]
    assert mine["status"] == "done" and mine["reply"] == "Answered by the other call.", mine
    # This call's turn waits behind another call's turn of the same conversation.
    conversation = new_conversation("elara")
    token, turn = held_by_another_call(conversation | {"message": "Is the inn open?"}, lease_s=60)
    looks.clear()
    other = answered_by_the_other_call_in(1.5, token, turn)
    (mine,) = handler({"input": conversation | {"message": "And the stables?"}})["turns"]
    other.join()
    assert other.stored == [turn.id] and looks  # type: ignore[attr-defined]
    assert mine["status"] == "done" and mine["reply"], mine
    # The other call died holding this call's turn: once its claim lapses, this call answers it.
    line = new_conversation("elara") | {"message": "And the bridge?", "idempotency_key": uuid.uuid4().hex}
    held_by_another_call(line, lease_s=3)
    looks.clear()
    (mine,) = handler({"input": line})["turns"]
    assert looks and mine["status"] == "done" and mine["reply"] and mine["attempts"] == 2, mine


def test_bad_events_get_a_clear_error_and_no_exception(world) -> None:
    assert "input" in handler({"nope": 1})["error"]
    assert "non-empty list" in handler({"input": {"turns": []}})["error"]
    assert "unknown character" in handler({"input": new_conversation("nobody") | {"message": "hi"}})["error"]
    assert "message is empty" in handler({"input": new_conversation() | {"message": "  "}})["error"]
    # Found in review: any number of turns ran through one inline answer (the HTTP batch takes 1,000).
    many = [new_conversation() | {"message": "hi"}] * 1001
    assert handler({"input": {"turns": many}})["error"] == '"turns": 1001 items; the limit is 1000 a request'


def test_local_mode_says_when_an_event_is_not_json_and_exits_non_zero_on_an_error(capsys) -> None:
    # Before: a JSONDecodeError traceback, and an {"error": ...} answer exited 0.
    from worker.serverless import answer_local

    assert answer_local('{"input": ') == 2
    err = capsys.readouterr().err
    assert err.startswith("serverless: the event is not JSON (") and err.count("\n") == 1
    assert answer_local('{"nope": 1}') == 1
    assert '"error"' in capsys.readouterr().out


def test_a_bad_item_is_named_by_its_place_and_an_outage_says_send_again(world, monkeypatch) -> None:
    """Found in review: a bad turn came back as pydantic's dump (the input echoed, a link, no item),
    and a database or broker outage escaped the handler as an exception."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    import worker.inline

    ok = new_conversation() | {"message": "Hello"}
    answer = handler({"input": {"turns": [ok, ok | {"message": "   ", "params": {"top_p": 3}}]}})
    error = answer["error"]
    assert error.startswith("turns[1].message: ") and "turns[1].params.top_p: " in error, error
    assert "input_value" not in error and "pydantic.dev" not in error
    assert handler({"input": ok | {"message": ""}})["error"].startswith("message: ")

    def database_down(requests):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, psycopg.OperationalError("connection refused"))

    monkeypatch.setattr(worker.inline, "answer_now", database_down)
    assert handler({"input": ok}) == {
        "error": "temporarily unavailable (OperationalError); send the event again",
        "retry": True,
    }
