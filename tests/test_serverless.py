"""The RunPod-style handler over the same pipeline: a sample event in, answered turns out."""

from tests.conftest import new_conversation, patch_on_this_thread
from tests.outcomes import outcome_of
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
    It now waits for the other call (looking again every HELD_POLL_S), and answers the turns itself
    once the other call's claim lapses (its container died). The other call acts only once this call
    has looked, so each part takes the waiting path."""
    import threading
    import uuid

    from sqlalchemy import text

    from db.session import session_scope
    from db.turns import claim_turns, store_replies
    from services.producer import enqueue_turns, get_turn
    from worker import inline

    looked = threading.Event()
    real = inline._running_elsewhere

    def looking(ids):  # type: ignore[no-untyped-def]
        looked.set()
        return real(ids)

    monkeypatch.setattr(inline, "_running_elsewhere", looking)

    def held_by_another_call(line: dict):  # type: ignore[no-untyped-def]
        (turn_id,) = enqueue_turns([line], send=False)
        with session_scope() as s:
            claim = claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        assert [t.id for t in claim.claimed] == [turn_id]
        return claim.token, claim.claimed[0]

    def once_looked(act) -> threading.Thread:  # type: ignore[no-untyped-def]
        looked.clear()
        done: list = []

        def run() -> None:
            assert looked.wait(60), "the call never waited"
            with session_scope() as s:
                done.append(act(s))

        thread = threading.Thread(target=run)
        thread.done = done  # type: ignore[attr-defined]
        thread.start()
        return thread

    def answers(token, turn):  # type: ignore[no-untyped-def]
        reply = outcome_of(turn, reply="Answered by the other call.")
        return lambda s: store_replies(session=s, token=token, outcomes=[reply])

    def dies(turn):  # type: ignore[no-untyped-def]  # its claim lapses
        return lambda s: (
            s.execute(
                # as a lease lapses: well after the turn's message went out
                text(
                    "UPDATE turns SET lease_until = now() - interval '1 second',"
                    " dispatched_at = now() - interval '2 minutes' WHERE id = :id"
                ),
                {"id": turn.id},
            ).rowcount
        )

    def call(line: dict) -> dict:
        (view,) = handler({"input": line})["turns"]
        return view

    # 1. This call's own turn (a replay of the line: the same idempotency key), held by another call.
    line = new_conversation("elara") | {
        "message": "Is the ford passable?",
        "idempotency_key": uuid.uuid4().hex,
    }
    token, turn = held_by_another_call(line)
    other = once_looked(answers(token, turn))
    mine = call(line)
    other.join()
    assert other.done == [[turn.id]]  # type: ignore[attr-defined]
    assert mine["status"] == "done" and mine["reply"] == "Answered by the other call.", mine
    # 2. This call's turn waits behind another call's turn of the same conversation.
    conversation = new_conversation("elara")
    token, turn = held_by_another_call(conversation | {"message": "Is the inn open?"})
    other = once_looked(answers(token, turn))
    mine = call(conversation | {"message": "And the stables?"})
    other.join()
    assert other.done == [[turn.id]] and mine["status"] == "done" and mine["reply"], mine  # type: ignore[attr-defined]
    # 3. The other call dies holding this call's turn: this call answers it.
    line = new_conversation("elara") | {"message": "And the bridge?", "idempotency_key": uuid.uuid4().hex}
    _, turn = held_by_another_call(line)
    other = once_looked(dies(turn))
    mine = call(line)
    other.join()
    assert mine["status"] == "done" and mine["reply"] and mine["attempts"] == 2, mine
    # 4. The other call dies holding the turn this call's turn waits behind: this call answers both.
    conversation = new_conversation("elara")
    _, turn = held_by_another_call(conversation | {"message": "Is the mill turning?"})
    other = once_looked(dies(turn))
    mine = call(conversation | {"message": "And the well?"})
    other.join()
    blocker = get_turn(turn.id)
    assert blocker is not None and blocker.status == "done" and blocker.attempts == 2, blocker
    assert mine["status"] == "done" and mine["reply"], mine
    # 5. More turns waiting behind another call's turn than a batch holds: looked at, not spun on.
    conversation = new_conversation("elara")
    token, turn = held_by_another_call(conversation | {"message": "Is the road clear?"})
    other = once_looked(answers(token, turn))
    lines = [
        {"conversation": conversation["conversation"], "message": f"And the {i}th mile?"} for i in range(20)
    ]
    short = {"params": {"max_new_tokens": 4}}
    views = handler({"input": {"turns": [line | short for line in lines]}})["turns"]
    other.join()
    assert other.done == [[turn.id]] and [v["status"] for v in views] == ["done"] * 20, views  # type: ignore[attr-defined]
    # 6. Review of kills between commits: another call, holding a line it stored without a client's
    # key, dies mid-answer (a platform's timeout); its client sends the line again, stored anew. The
    # dead call's turn is cancelled, not answered besides: the line is answered once.
    conversation = new_conversation("elara")
    line = conversation | {"message": "Is the ferry running?"}
    (dead_turn,) = inline.store_for_call([line])
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[dead_turn], lease_s=60, max_attempts=3)
        dies(claim.claimed[0])(s)
    mine = call(line)  # the client's resend
    assert mine["status"] == "done" and mine["reply"] and mine["id"] != str(dead_turn), mine
    dead = get_turn(dead_turn)
    assert dead is not None and dead.status == "cancelled" and dead.error == inline.DIED_MID_ANSWER, dead
    # 7. Review: the dead call's claim lapses while this call waits behind it (found by the claim as a
    # stalled earlier turn), and its second line, queued behind its first, is the dead call's too:
    # both cancelled, the resent lines answered once each.
    conversation = new_conversation("elara")
    lines = [conversation | {"message": "Is the mill turning?"}, conversation | {"message": "And the well?"}]
    first, second = inline.store_for_call(lines)
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=[first], lease_s=60, max_attempts=3)
    other = once_looked(dies(claim.claimed[0]))
    views = handler({"input": {"turns": lines}})["turns"]
    other.join()
    assert [v["status"] for v in views] == ["done", "done"], [(v["status"], v.get("error")) for v in views]
    assert {v["id"] for v in views}.isdisjoint({str(first), str(second)}), views
    for turn_id in (first, second):
        dead = get_turn(turn_id)
        assert dead is not None and dead.status == "cancelled" and dead.error == inline.DIED_MID_ANSWER, dead


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
    # Found in review: JSON nested past Python's recursion was a RecursionError traceback.
    assert answer_local("[" * 200_000) == 2
    err = capsys.readouterr().err
    assert err.startswith("serverless: the event is not JSON (RecursionError") and err.count("\n") == 1


def test_local_mode_with_the_database_away_or_an_event_not_utf8_says_so_in_one_line(
    monkeypatch, capsys
) -> None:
    """Found in review: the local mode migrated with no guard (a database away was a psycopg traceback
    naming a socket) and read stdin as text outside any guard (bytes not UTF-8: a traceback)."""
    import io
    import sys

    import psycopg
    import pytest
    from sqlalchemy.exc import OperationalError

    import worker.serverless as serverless

    def away() -> None:
        raise OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused"))

    monkeypatch.setattr("db.migrate.upgrade", away)
    monkeypatch.setattr(sys, "argv", ["serverless", '{"input": {"message": "hi"}}'])
    with pytest.raises(SystemExit) as stopped:
        serverless.main()
    assert str(stopped.value).startswith("serverless: the database is unreachable (DATABASE_URL;")
    assert "connection refused" in str(stopped.value)
    monkeypatch.setattr("db.migrate.upgrade", lambda: None)
    monkeypatch.setattr(sys, "argv", ["serverless"])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"input": "\xff"}')))
    with pytest.raises(SystemExit) as refused:
        serverless.main()
    assert refused.value.code == 2
    assert capsys.readouterr().err == "serverless: the event is not UTF-8 text (byte 11)\n"


def test_a_worker_whose_engine_cannot_load_stops_with_one_line_before_taking_an_event(
    monkeypatch, capsys
) -> None:
    """Found in review: the engine was loaded by the first event, so one that could not load (a GPU
    too small for the context) answered each event as if its input were wrong (a ValueError) or with
    a traceback, charged its turns an attempt, and loaded again at the next event."""
    import sys

    import pytest

    import worker.pipeline
    import worker.serverless as serverless

    answered: list[object] = []

    def cannot_load() -> None:
        raise ValueError("max_model_len 4096 is larger than the KV cache holds")

    monkeypatch.setattr("db.migrate.upgrade", lambda: None)
    monkeypatch.setattr(worker.pipeline, "get_prompt_builder", cannot_load)
    monkeypatch.setattr(serverless, "handler", answered.append)
    monkeypatch.setattr(sys, "argv", ["serverless", '{"input": {"message": "hi"}}'])
    with pytest.raises(SystemExit) as stopped:
        serverless.main()
    why = "ValueError: max_model_len 4096 is larger than the KV cache holds"
    assert str(stopped.value) == f"serverless: the engine failed to load ({why})"
    assert answered == []
    # Review of that: an event that is not JSON is refused before any engine loads (it waited for one).
    monkeypatch.setattr(sys, "argv", ["serverless", '{"input": '])
    with pytest.raises(SystemExit) as refused:
        serverless.main()
    assert refused.value.code == 2 and "the event is not JSON" in capsys.readouterr().err


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
    # Found in review: a callback_url was accepted and never delivered (nothing sends it here).
    from pydantic import SecretStr

    from core.settings import settings

    monkeypatch.setattr(settings, "callback_secret", SecretStr("s"))
    hooked = handler({"input": {"turns": [ok, ok | {"callback_url": "https://hooks.example.test/x"}]}})
    assert hooked["error"].startswith("turns[1].callback_url: ") and "no callback" in hooked["error"], hooked
    # Review (stop 76): stream was taken, its tokens published for no reader.
    streamed = handler({"input": ok | {"stream": True}})
    assert streamed["error"].startswith("stream: ") and "streams nothing" in streamed["error"], streamed
    # Review (stop 76): a turn naming another served model was answered by this worker's weights.
    monkeypatch.setattr(settings, "served_models", [settings.model, "solar-10.7b"])
    other = handler({"input": {"turns": [ok, ok | {"model": "solar-10.7b"}]}})
    assert other["error"].startswith("turns[1].model: ") and "answers" in other["error"], other

    def database_down(requests):  # type: ignore[no-untyped-def]
        raise OperationalError("INSERT", {}, psycopg.OperationalError("connection refused"))

    monkeypatch.setattr(worker.inline, "store_for_call", database_down)
    assert handler({"input": ok}) == {
        "error": "temporarily unavailable (OperationalError); send the event again",
        "retry": True,
        "turns": [],  # nothing was stored
    }


def test_a_turn_another_claim_took_before_this_calls_write_is_waited_for_not_returned_running(
    world, monkeypatch
) -> None:
    """Found in review: a reply whose turn another claim took meanwhile (this call's lease lapsed, a
    concurrent call took the turn over) is not stored, and the call returned the turn `running`,
    unanswered, though the other claim answered it moments later. It is now waited for as a turn
    another call holds."""
    import threading

    from sqlalchemy import text

    from db.session import session_scope
    from db.turns import claim_turns, store_replies
    from worker import inline
    from worker.pipeline import BatchReport

    real = inline.process_batch
    others: list[threading.Timer] = []

    def lost_to_another_claim(batch):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(inline, "process_batch", real)
        (turn_id,) = batch
        with session_scope() as s:
            assert claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3).claimed
            s.execute(
                text("UPDATE turns SET lease_until = now() - interval '1 second' WHERE id = :id"),
                {"id": turn_id},
            )
        with session_scope() as s:  # another call takes the lapsed turn over
            other = claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        (turn,) = other.claimed

        def answer() -> None:
            with session_scope() as s:
                reply = outcome_of(turn, reply="Answered by the other claim.")
                store_replies(session=s, token=other.token, outcomes=[reply])

        others.append(threading.Timer(1.0, answer))
        others[0].start()
        return BatchReport(lost=[turn_id])

    monkeypatch.setattr(inline, "check_space", lambda: None)
    monkeypatch.setattr(inline, "process_batch", lost_to_another_claim)
    (view,) = inline.answer_now([new_conversation("elara") | {"message": "Is the ford passable?"}])
    others[0].join()
    assert view.status == "done" and view.reply == "Answered by the other claim.", view


def _keyed_and_unkeyed() -> tuple[dict, dict, dict]:
    """Two new conversations and an event of one line each, the first under a client's key."""
    keyed, unkeyed = new_conversation("elara"), new_conversation("elara")
    event = {
        "turns": [
            keyed | {"message": "Is the ford passable?", "idempotency_key": f"k-{keyed['conversation']}"},
            unkeyed | {"message": "And the bridge?"},
        ]
    }
    return keyed, unkeyed, event


def test_a_dead_engine_sends_the_event_back_keeps_keyed_turns_for_the_replay_and_asks_for_a_fresh_worker(
    engine, monkeypatch
) -> None:
    """Found in a last read: the engine's death handed the batch's turns back, and the call went on
    feeding the dead engine, then returned them `queued`, unanswered, with no error: the container
    answered every later event the same way. Found in review of the fix: "send the event again" then
    stored a turn without an idempotency key a second time, besides the one left queued (answered
    twice in its conversation, or never in a conversation of its own)."""
    from sqlalchemy import select

    from db.models import Conversation, Turn, TurnStatus
    from db.session import session_scope
    from worker import inline, pipeline
    from worker.engine import EngineDead

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise EngineDead("the engine died: injected")

    monkeypatch.setattr(inline, "check_space", lambda: None)
    patch_on_this_thread(monkeypatch, pipeline, "_answer", dies)
    keyed, unkeyed, event = _keyed_and_unkeyed()
    answer = handler({"input": event})
    assert answer["error"].startswith("the engine died: injected; send the event again")
    assert answer["retry"] is True and answer["refresh_worker"] is True
    assert [t["status"] for t in answer["turns"]] == ["queued", "cancelled"]

    def turn_of(conv: dict) -> Turn:
        with session_scope() as s:
            query = select(Turn).join(Conversation).where(Conversation.external_id == conv["conversation"])
            return s.scalars(query).one()

    assert (turn_of(keyed).status, turn_of(keyed).attempts) == (TurnStatus.QUEUED, 0)  # uncharged
    assert turn_of(unkeyed).status == TurnStatus.CANCELLED
    monkeypatch.undo()  # a fresh worker: the replay answers the keyed turn, the other is stored anew
    monkeypatch.setattr(inline, "check_space", lambda: None)
    replay = handler({"input": event})
    assert "error" not in replay, replay
    assert replay["turns"][0]["id"] == answer["turns"][0]["id"]  # the same turn, answered now
    assert [t["status"] for t in replay["turns"]] == ["done", "done"]


def test_a_call_stopped_by_a_database_outage_leaves_no_unkeyed_turn_queued_to_be_answered_twice(
    world, monkeypatch
) -> None:
    """Found in review: a call stopped by anything but an engine death (the database away mid-way, a
    timeout) told the caller to send the event again and left its turns queued; the resend stored the
    line anew and answered both, the first as an earlier turn of its conversation."""
    import psycopg
    from sqlalchemy import select
    from sqlalchemy.exc import OperationalError

    from db.models import Conversation, Turn, TurnStatus
    from db.session import session_scope
    from worker import inline

    def database_away(ids):  # type: ignore[no-untyped-def]
        raise OperationalError("UPDATE", {}, psycopg.OperationalError("server closed the connection"))

    monkeypatch.setattr(inline, "check_space", lambda: None)
    monkeypatch.setattr(inline, "process_batch", database_away)
    keyed, unkeyed, event = _keyed_and_unkeyed()
    answer = handler({"input": event})
    assert answer["retry"] is True and "send the event again" in answer["error"]
    # found in review of the fix: the answer says how each line stands (one answered before the
    # outage is `done`: sent again without a key, it would be answered twice)
    assert [t["status"] for t in answer["turns"]] == ["queued", "cancelled"]
    with session_scope() as s:
        states = dict(
            s.execute(
                select(Conversation.external_id, Turn.status)
                .join(Conversation)
                .where(Conversation.external_id.in_([keyed["conversation"], unkeyed["conversation"]]))
            ).all()
        )
    # the keyed turn waits for the replay (answered first then); the other is stored anew by it
    assert states == {keyed["conversation"]: TurnStatus.QUEUED, unkeyed["conversation"]: TurnStatus.CANCELLED}


def test_a_dead_engine_with_the_database_away_still_asks_for_a_fresh_worker(world, monkeypatch) -> None:
    """Found in review: the cancel after an engine death needs the database; its outage was raised in
    place of the death and answered as a passing outage, without `refresh_worker`: the container kept
    its dead engine."""
    import psycopg
    from sqlalchemy.exc import OperationalError

    from worker import inline, pipeline
    from worker.engine import EngineDead

    def dies(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise EngineDead("the engine died: injected")

    def database_away(**kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("UPDATE", {}, psycopg.OperationalError("connection refused"))

    monkeypatch.setattr(inline, "check_space", lambda: None)
    patch_on_this_thread(monkeypatch, pipeline, "_answer", dies)
    monkeypatch.setattr(inline, "cancel_turns", database_away)
    answer = handler({"input": new_conversation("elara") | {"message": "Is the ford passable?"}})
    assert answer["error"].startswith("the engine died: injected") and answer["refresh_worker"] is True
    assert answer["turns"] == []


def test_an_answer_asks_for_a_resend_only_of_turns_a_resend_would_answer(world) -> None:
    """Review of the unanswered-turn error: a turn cancelled on purpose (a DELETE, a stopped run) was
    counted as "not answered in this call", with `retry` and a made-up reason, so a client obeying it
    looped; and the resend it asked for did not say to leave out the lines answered already."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from db.turns import cancel_turns, claim_turns
    from services.producer import enqueue_turns, get_turn
    from worker.inline import NOT_ANSWERED
    from worker.serverless import _not_all_answered

    deleted, left, answered, held = enqueue_turns(
        [new_conversation() | {"message": f"Line {i}."} for i in range(4)], send=False
    )
    with session_scope() as s:
        cancel_turns(session=s, turn_ids=[deleted])  # cancelled on purpose: no reason kept
        cancel_turns(session=s, turn_ids=[left], reason=NOT_ANSWERED + "adapter a@v1 unavailable")
        s.execute(update(Turn).where(Turn.id == answered).values(status=TurnStatus.DONE))
        # review: another call's live claim answers it; a resend would answer its line twice
        assert claim_turns(session=s, turn_ids=[held], lease_s=60, max_attempts=3).claimed
    views = {turn: get_turn(turn) for turn in (deleted, left, answered, held)}
    assert _not_all_answered([views[deleted]]) == {}
    # review: another call's live claim answers it: no resend asked for, but said
    assert "still being answered by another call" in _not_all_answered([views[held]])["error"]
    assert "retry" not in _not_all_answered([views[held]])
    said = _not_all_answered([views[answered], views[left]])
    assert said["retry"] is True and "(adapter a@v1 unavailable)" in said["error"]
    assert said["error"].endswith("`done` in `turns`: leave them out)")
    assert "leave them out" not in _not_all_answered([views[left]])["error"]


def test_a_one_turn_event_whose_turn_failed_for_good_answers_a_top_level_error(world, monkeypatch) -> None:
    """Found in the review of the original shape's fix: the native one-turn event answered a failed
    turn (prompt_too_long, say) as `{"turns": [{"status": "failed", …}]}` alone: RunPod fails a job on
    a top-level error only, so it read COMPLETED. An event of several turns keeps each failure in its
    own turn, its answered ones with it."""
    import worker.inline
    from tests.conftest import failed_for_good

    monkeypatch.setattr(worker.inline, "answer_stored", failed_for_good)
    ok = new_conversation() | {"message": "Hello"}
    one = handler({"input": ok})
    assert (one["error"], one["error_code"], one["turns"][0]["status"]) == (
        "the prompt is too long",
        "prompt_too_long",
        "failed",
    )
    several = handler({"input": {"turns": [ok, new_conversation() | {"message": "Hi"}]}})
    assert "error" not in several and [t["status"] for t in several["turns"]] == ["failed", "failed"]
