"""The producer API: validation, idempotency, conversations, cancel; real PostgreSQL and Redis."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import uuid
from typing import Any

import pytest
from pydantic import ValidationError
from sqlalchemy import func, select, update

from db.models import Conversation, Turn, TurnStatus
from db.session import get_autocommit_engine, session_scope
from db.turns import IdempotencyConflict
from services.producer import cancel_turn, enqueue_turn, enqueue_turns, get_turn
from tests.conftest import new_conversation, sent_to_nobody


@pytest.fixture
def unserved_model(monkeypatch):  # type: ignore[no-untyped-def]
    """Turns for a model whose queue nobody consumes: in the whole suite the session's worker consumes
    the default model's queue, and would claim a turn a test reads as still queued."""
    from core.settings import queue_for_model, settings
    from tasks.app import app

    quiet = "unserved-producer-check"
    monkeypatch.setattr(settings, "model", quiet)
    monkeypatch.setattr(settings, "served_models", [quiet])
    yield quiet
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue_for_model(quiet, "live"))


def test_idempotency_key_dedupes_a_retried_call(world, unserved_model) -> None:
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

    def stored() -> tuple[int, int]:  # found in review: the name promised this and nothing checked it
        with session_scope() as s:
            named = Conversation.external_id == req["conversation"]
            turns = s.scalar(select(func.count()).select_from(Turn).join(Conversation).where(named))
            conversations = s.scalar(select(func.count()).where(named))
        return turns, conversations

    before = stored()
    with pytest.raises(error, match=match):
        enqueue_turns([req], send=False)
    assert stored() == before and before[1] == 0


def test_a_message_typed_with_carriage_returns_is_taken_with_line_breaks(world) -> None:
    """Found in review: a CRLF from a Windows text box was refused as a control character (U+000D),
    where OpenAI and every earlier message of a chat completion take it."""
    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Line one\r\nLine two\rthree"}], send=False)
    with session_scope() as s:
        assert s.get(Turn, turn_id).message == "Line one\nLine two\nthree"


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


def test_a_running_turn_whose_worker_is_gone_can_be_cancelled_and_one_still_leased_cannot(world) -> None:
    """Found in review: only a queued turn could be cancelled, so a turn whose worker died mid-way
    stayed running with no worker of its model left, holding back its conversation's later turns,
    while a run's cancel took such a turn already."""
    from sqlalchemy import func, text

    gone, leased = enqueue_turns([new_conversation() | {"message": "Hello?"} for _ in range(2)], send=False)
    with session_scope() as s:
        for turn_id, lease in ((gone, "-1 minute"), (leased, "2 minutes")):
            s.execute(
                update(Turn)
                .where(Turn.id == turn_id)
                .values(
                    status=TurnStatus.RUNNING,
                    attempts=1,
                    claim_token=uuid.uuid4(),
                    lease_until=func.now() + text(f"interval '{lease}'"),
                )
            )
    assert cancel_turn(gone) is True
    assert cancel_turn(leased) is False  # its worker is answering it
    with session_scope() as s:
        assert s.get_one(Turn, gone).lease_until is None
    assert get_turn(gone).status == TurnStatus.CANCELLED
    assert get_turn(leased).status == TurnStatus.RUNNING


_ENQUEUE_ONE = """
import json, sys
from services.producer import EnqueueError, enqueue_turn
try:
    enqueue_turn(json.loads(sys.argv[1]))
except EnqueueError as exc:
    print("EnqueueError:", exc)
"""


def _enqueue_in_a_producer_process(request: dict, **env: str) -> str:
    """Enqueue from a fresh process pointed at `env`'s servers (the URLs are read once, at start)."""
    proc = subprocess.run(
        [sys.executable, "-c", _ENQUEUE_ONE, json.dumps(request)],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_database_unreachable_at_enqueue_is_an_error_and_sends_nothing(world) -> None:
    from core.services import broker_url
    from tasks.queues import queue_depth

    model = "no-db-check"  # a queue of its own, which no worker consumes
    out = _enqueue_in_a_producer_process(
        new_conversation() | {"message": "Hello?"},
        DATABASE_URL=f"postgresql://mlchat@127.0.0.1:{_closed_port()}/mlchat",
        REDIS_URL=broker_url(),
        MLCHAT_MODEL=model,
    )
    assert "EnqueueError: database unreachable at enqueue; nothing was sent" in out
    assert queue_depth(model, "live") == 0  # no orphan task


def test_broker_unreachable_at_enqueue_fails_the_turn_it_stored(world) -> None:
    from core.services import database_url

    key = "broker-down-" + new_conversation()["conversation"]
    out = _enqueue_in_a_producer_process(
        new_conversation() | {"message": "Hello?", "idempotency_key": key},
        DATABASE_URL=database_url(),
        REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0",
    )
    assert "EnqueueError: could not reach the broker; 1 turn(s) marked failed" in out
    with session_scope() as s:
        turn = s.scalars(select(Turn).where(Turn.idempotency_key == key)).one()
    # The rule: the row was committed before the send, and a failed send leaves it failed, never queued.
    assert turn.status == TurnStatus.FAILED and "broker unreachable at enqueue" in turn.error


def test_a_full_broker_at_enqueue_is_said_to_be_full_not_unreachable(world, tmp_path) -> None:
    """Found in review: Redis at its maxmemory (noeviction) answers pings and refuses writes; every
    enqueue failed as "could not reach the broker", sending the operator to the network."""
    from core.services import database_url
    from tests.conftest import a_redis_of_its_own

    key = "broker-full-" + new_conversation()["conversation"]
    with a_redis_of_its_own(tmp_path) as full:
        full.config_set("maxmemory-policy", "noeviction")
        full.config_set("maxmemory", 1)
        out = _enqueue_in_a_producer_process(
            new_conversation() | {"message": "Hello?", "idempotency_key": key},
            DATABASE_URL=database_url(),
            REDIS_URL=f"redis://127.0.0.1:{full.connection_pool.connection_kwargs['port']}/0",
        )
    assert "EnqueueError: the broker is full (its maxmemory); 1 turn(s) marked failed" in out, out
    with session_scope() as s:
        turn = s.scalars(select(Turn).where(Turn.idempotency_key == key)).one()
    assert turn.status == TurnStatus.FAILED and turn.error.startswith("broker full at enqueue")


def test_a_replay_returns_the_turn_as_it_stands(world) -> None:
    from services.producer import submit_turns

    req = new_conversation() | {
        "message": "Still open?",
        "idempotency_key": "replay-" + new_conversation()["conversation"],
    }
    (first,) = submit_turns([req], send=False)
    cancel_turn(first.id)
    (again,) = submit_turns([req], send=False)
    assert first.created and not again.created
    assert again.id == first.id and again.status == TurnStatus.CANCELLED  # not "queued"


def test_a_replay_of_a_turn_the_broker_never_got_sends_it_again(world) -> None:
    from core.services import database_url
    from services.producer import submit_turns
    from tasks.queues import queue_depth

    model = "replay-check"  # a queue of its own, which no worker consumes
    req = new_conversation() | {
        "message": "Hello?",
        "idempotency_key": "revive-" + new_conversation()["conversation"],
    }
    out = _enqueue_in_a_producer_process(
        req,
        DATABASE_URL=database_url(),
        REDIS_URL=f"redis://127.0.0.1:{_closed_port()}/0",
        MLCHAT_MODEL=model,
    )
    assert "marked failed" in out
    (replay,) = submit_turns([req])  # the client's standard retry, the broker back up
    try:
        view = get_turn(replay.id)
        assert not replay.created and replay.status == TurnStatus.QUEUED
        assert view.status == TurnStatus.QUEUED and view.error is None and view.error_code is None
        assert queue_depth(model, "live") == 1  # sent again, once, to the turn's own model
    finally:
        from core.settings import queue_for_model
        from tasks.app import app

        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "live"))


def test_a_replay_of_a_turn_committed_but_never_sent_sends_it_again(world, unserved_model) -> None:
    """Found in review: a request that died between its commit and its send (its reply lost, the API
    process killed) left a queued turn with no message; the client's retry was answered "queued" and
    sent nothing, so the turn (and every later turn of its conversation) waited an hour for the sweeper."""
    from services.producer import submit_turns
    from tasks.queues import queue_depth

    req = new_conversation() | {
        "message": "Anyone home?",
        "idempotency_key": "unsent-" + new_conversation()["conversation"],
    }
    (first,) = submit_turns([req], send=False)  # committed; the message never went
    assert queue_depth(unserved_model, "live") == 0
    (replay,) = submit_turns([req])
    assert replay.id == first.id and not replay.created and replay.status == TurnStatus.QUEUED
    assert queue_depth(unserved_model, "live") == 1
    (batch_replay, new) = submit_turns([req, new_conversation() | {"message": "And you?"}])
    assert batch_replay.id == first.id and new.created
    assert queue_depth(unserved_model, "live") == 3  # a duplicate is harmless: claims are exactly-once
    # Review: a turn claimed before (waiting on an adapter's back-off, say) keeps its message in the
    # broker; sent again, each replay would be claimed at once and charged an attempt.
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == first.id).values(attempts=1))
    submit_turns([req, req])
    assert queue_depth(unserved_model, "live") == 3


def test_a_retry_that_sent_a_turn_again_is_not_undone_by_the_first_requests_late_broker_error(
    world, unserved_model, monkeypatch
) -> None:
    """Found in review: a game's first request hung on a failing broker; its retry (another replica,
    the same key) sent the turn again and was told "queued"; then the first request's send failed and
    marked the turn failed (broker_unreachable): never answered, never called back. The turn stays
    queued now, its retry's message waiting for it."""
    import tasks.generate
    from services.producer import submit_turns
    from tasks.queues import queue_depth
    from tests.conftest import patch_on_this_thread

    req = new_conversation() | {
        "message": "Are you there?",
        "idempotency_key": "late-error-" + new_conversation()["conversation"],
    }
    retried: list[Any] = []

    def hangs_then_fails(ids: Any, **kwargs: Any) -> None:  # the first request's publish
        retry = threading.Thread(target=lambda: retried.extend(submit_turns([req])))  # the real broker
        retry.start()
        retry.join(60)
        raise ConnectionError("the broker went away")

    patch_on_this_thread(monkeypatch, tasks.generate, "dispatch", hangs_then_fails)
    (first,) = submit_turns([req])  # its error came after the retry: the turn is the retry's now
    (retry,) = retried
    assert retry.id == first.id and not retry.created and retry.status == TurnStatus.QUEUED
    view = get_turn(first.id)
    assert view.status == TurnStatus.QUEUED and view.error_code is None, view
    assert queue_depth(unserved_model, "live") == 1  # the retry's message, for a turn still to answer


def test_a_retry_whose_own_send_fails_says_so_and_the_next_one_sends(
    world, unserved_model, monkeypatch
) -> None:
    """Found in review: a replay of a stored, never-sent turn whose own re-send failed (the broker
    still away) answered "queued"; nothing would send it but the sweeper. It is a 503 to send again."""
    import tasks.generate
    from services.producer import EnqueueError, send_new_turns, submit_turns
    from tasks.queues import queue_depth
    from tests.conftest import patch_on_this_thread

    req = new_conversation() | {
        "message": "Hello again?",
        "idempotency_key": "replay-fails-" + new_conversation()["conversation"],
    }
    (first,) = submit_turns([req], send=False)  # committed; the request died before sending

    def away(ids: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker is away")

    with monkeypatch.context() as away_now:
        patch_on_this_thread(away_now, tasks.generate, "dispatch", away)
        with pytest.raises(EnqueueError, match="retry with the same idempotency keys"):
            submit_turns([req])
        assert get_turn(first.id).status == TurnStatus.QUEUED and queue_depth(unserved_model, "live") == 0
        # The first request's own send failing late: the retry's took nothing over, so the turn fails
        # as ever (review: that request answered "queued" for a turn with no message out).
        with pytest.raises(EnqueueError, match="1 turn\\(s\\) marked failed"):
            send_new_turns({first.model: [first.id]}, lane="live", sent_at=first.sent_at)
    assert get_turn(first.id).error_code == "broker_unreachable"
    (again,) = submit_turns([req])  # revived and sent
    assert again.id == first.id and queue_depth(unserved_model, "live") == 1


def test_a_retry_whose_fast_insert_lost_its_connection_sends_the_turn_as_a_replay(
    world, unserved_model, monkeypatch
) -> None:
    """Review of the fix above: a keyed retry whose one-statement insert failed (a stale pooled
    connection, likely in the same outage) took the full path and sent the first request's turn
    without recording the send, so that request's late broker error still failed it."""
    import tasks.generate
    from services import producer
    from services.producer import send_new_turns, submit_turns
    from tests.conftest import patch_on_this_thread

    conv = new_conversation()
    enqueue_turn(conv | {"message": "Hello."})  # the conversation is known: the fast path's insert
    req = conv | {"message": "Still there?", "idempotency_key": "lost-conn-" + conv["conversation"]}
    (first,) = submit_turns([req], send=False)  # request A's commit; its publish is hanging

    def stale(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import OperationalError

        raise OperationalError("INSERT", {}, Exception("injected: the pooled connection was stale"))

    with monkeypatch.context() as retry:
        retry.setattr(producer, "create_turn_in_known_conversation", stale)
        (again,) = submit_turns([req])  # request B: the full path, which sends it
    assert again.id == first.id and not again.created

    def away(ids: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker went away")

    patch_on_this_thread(monkeypatch, tasks.generate, "dispatch", away)
    send_new_turns({first.model: [first.id]}, lane="live", sent_at=first.sent_at)  # A's late error
    assert get_turn(first.id).status == TurnStatus.QUEUED  # B's message answers it


def test_a_call_whose_replay_cannot_be_sent_fails_its_new_unkeyed_turns_as_its_own_send_would(
    world, unserved_model, monkeypatch
) -> None:
    """Review of the fix above: a call holding a keyed replay and a new unkeyed turn sent the new one,
    then answered 503 for the replay; the client's retry stored the unkeyed one again, and both were
    answered."""
    import tasks.generate
    from services.producer import EnqueueError, submit_turns
    from tests.conftest import patch_on_this_thread

    keyed = new_conversation() | {
        "message": "Hello?",
        "idempotency_key": "mixed-" + new_conversation()["conversation"],
    }
    (stored,) = submit_turns([keyed], send=False)  # committed, never sent
    real, calls = tasks.generate.dispatch, []

    def the_replays_send_fails(ids: Any, **kwargs: Any) -> Any:
        calls.append(list(ids))
        if len(calls) > 1:
            raise ConnectionError("the broker went away")
        return real(ids, **kwargs)

    patch_on_this_thread(monkeypatch, tasks.generate, "dispatch", the_replays_send_fails)
    fresh = new_conversation()
    with pytest.raises(EnqueueError):
        submit_turns([keyed, fresh | {"message": "And who are you?"}])
    with session_scope() as s:
        new_one = s.scalars(
            select(Turn)
            .join(Conversation, Conversation.id == Turn.conversation_id)
            .where(Conversation.external_id == fresh["conversation"])
        ).one()
        assert new_one.status == TurnStatus.FAILED and new_one.error_code == "broker_unreachable"
    assert get_turn(stored.id).status == TurnStatus.QUEUED  # the next retry under its key sends it


def test_a_batch_the_server_rolls_back_for_a_deadlock_is_stored_again_not_an_outage(
    world, unserved_model, caplog
) -> None:
    """Found in review: two producers creating the same new conversations in other orders deadlock;
    the victim's transaction was reported "database unreachable at enqueue" (503) though it left
    nothing behind and runs through when tried again."""
    import time

    from sqlalchemy import text
    from sqlalchemy.orm import Session

    from db.session import get_engine
    from db.world import find_characters, upsert_conversations
    from services.producer import submit_turns

    x, y = sorted(new_conversation()["conversation"] for _ in range(2))
    with session_scope() as s:
        elara = find_characters(session=s, slugs=["elara"])["elara"]
    row = {"player_id": "p", "player_name": "P", "character_id": elara}
    outcome: list = []

    def batch() -> None:
        try:
            lines = [{"conversation": c, "character": "elara", "message": "Hi"} for c in (x, y)]
            outcome.extend(submit_turns(lines))
        except Exception as exc:  # reported below
            outcome.append(exc)

    def waiting_on_a_lock(pid: int) -> bool:
        with get_engine().connect() as conn:
            return bool(
                conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> :pid"
                    ),
                    {"pid": pid},
                ).scalar()
            )

    caplog.set_level(logging.INFO, logger="db.session")
    with Session(bind=get_engine()) as theirs:  # another producer: holds y, then wants x
        theirs.execute(text("SET deadlock_timeout = '20s'"))  # so the batch is the deadlock's victim
        upsert_conversations(session=theirs, rows=[row | {"external_id": y}])
        pid = int(theirs.execute(text("SELECT pg_backend_pid()")).scalar_one())
        worker = threading.Thread(target=batch)
        worker.start()  # holds x, waits for y
        for _ in range(300):
            if waiting_on_a_lock(pid):
                break
            time.sleep(0.05)
        upsert_conversations(session=theirs, rows=[row | {"external_id": x}])  # waits for x: a deadlock
        theirs.commit()
    worker.join(timeout=30)
    # the batch was the victim of a real deadlock, and stored again
    assert "enqueue rolled back (DeadlockDetected); run again" in caplog.text
    assert len(outcome) == 2 and all(not isinstance(t, Exception) for t in outcome), outcome
    assert all(t.status == TurnStatus.QUEUED for t in outcome)


def test_a_retry_racing_another_retry_reports_the_turn_as_it_stands(
    world, unserved_model, monkeypatch
) -> None:
    """Found in review: two retries of a turn the broker never got both read it failed; the one
    whose revive found it queued already (the other's) answered "failed" for a turn that was queued."""
    from db.models import TurnErrorCode
    from db.turns import revive_unsent
    from services import producer
    from services.producer import submit_turns

    req = new_conversation() | {
        "message": "Still there?",
        "idempotency_key": "race-" + new_conversation()["conversation"],
    }
    (first,) = submit_turns([req], send=False)
    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id == first.id)
            .values(
                status=TurnStatus.FAILED,
                error_code=TurnErrorCode.BROKER_UNREACHABLE.value,
                timings={"claim_ms": 1.0},
            )
        )

    def the_other_retry_first(*, session, turn_ids):  # type: ignore[no-untyped-def]
        with session_scope() as other:
            revive_unsent(session=other, turn_ids=turn_ids)
        return revive_unsent(session=session, turn_ids=turn_ids)

    monkeypatch.setattr(producer, "revive_unsent", the_other_retry_first)
    (replay,) = submit_turns([req])
    assert replay.status == TurnStatus.QUEUED and replay.error_code is None
    with session_scope() as session:  # review: the failed attempt's stages stayed on the queued turn
        assert session.get_one(Turn, first.id).timings is None


def test_a_revived_turn_goes_after_a_turn_its_conversation_took_meanwhile_never_beside_it(
    world, unserved_model
) -> None:
    """Found in review: a turn failed unsent (the broker away) and revived by its retry kept its
    number, so a later turn of its conversation already running did not hold its claim back: the two
    were generated side by side, each prompt without the other's exchange, and the second store's
    mood overwrote the first's. Revived after that turn; two revived together keep their order."""
    from db.models import TurnErrorCode
    from db.turns import revive_unsent
    from services.producer import submit_turns

    conv = new_conversation()
    first, second = submit_turns(
        [conv | {"message": "One."}, {"conversation": conv["conversation"], "message": "Two."}], send=False
    )
    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id.in_([first.id, second.id]))
            .values(status=TurnStatus.FAILED, error_code=TurnErrorCode.BROKER_UNREACHABLE.value)
        )
    (later,) = submit_turns([{"conversation": conv["conversation"], "message": "Three."}], send=False)
    with session_scope() as session:
        assert revive_unsent(session=session, turn_ids=[second.id, first.id]) == [first.id, second.id]
    with session_scope() as session:
        rows = session.execute(
            select(Turn.id, Turn.number).where(Turn.id.in_([first.id, second.id, later.id]))
        )
        numbers = {turn_id: number for turn_id, number in rows}
    assert numbers[later.id] < numbers[first.id] < numbers[second.id]
    # Alone in its conversation, a revived turn keeps its place.
    (alone,) = submit_turns([new_conversation() | {"message": "Solo."}], send=False)
    with session_scope() as session:
        session.execute(
            update(Turn)
            .where(Turn.id == alone.id)
            .values(status=TurnStatus.FAILED, error_code=TurnErrorCode.BROKER_UNREACHABLE.value)
        )
        before = session.scalar(select(Turn.number).where(Turn.id == alone.id))
    with session_scope() as session:
        assert revive_unsent(session=session, turn_ids=[alone.id]) == [alone.id]
        assert session.scalar(select(Turn.number).where(Turn.id == alone.id)) == before


def test_one_key_twice_in_one_batch_is_one_turn_or_a_conflict(world) -> None:
    from services.producer import submit_turns

    key = "twice-" + new_conversation()["conversation"]
    same = new_conversation() | {"message": "Once.", "idempotency_key": key}
    first, second = submit_turns([same, same], send=False)
    assert first.id == second.id and first.created and not second.created
    with session_scope() as s:
        assert len(s.scalars(select(Turn).where(Turn.idempotency_key == key)).all()) == 1
    other = "clash-" + new_conversation()["conversation"]
    with pytest.raises(IdempotencyConflict, match="items 0 and 1"):
        submit_turns(
            [
                new_conversation() | {"message": "A", "idempotency_key": other},
                new_conversation() | {"message": "B", "idempotency_key": other},
            ],
            send=False,
        )


def _statements_sent(monkeypatch) -> list[tuple[str, bool]]:  # type: ignore[no-untyped-def]
    """Every statement psycopg sends from this thread from now on (SQLAlchemy's and the driver-level
    fast insert's), with whether its connection was in autocommit; not the session worker's threads'
    (its housekeeping tick, its batches, its reconnects after a restart)."""
    import threading

    import psycopg

    seen: list[tuple[str, bool]] = []
    execute = psycopg.Cursor.execute
    mine = threading.get_ident()

    def recorded(cursor, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        # autocommit: psycopg sends no BEGIN and no COMMIT around it (one round trip in all)
        if threading.get_ident() == mine:
            seen.append((str(query).lstrip().split("(")[0].strip(), cursor.connection.autocommit))
        return execute(cursor, query, *args, **kwargs)

    monkeypatch.setattr(psycopg.Cursor, "execute", recorded)
    return seen


def test_a_single_enqueue_into_a_known_conversation_is_one_statement(world, monkeypatch) -> None:
    conv = new_conversation()
    first = enqueue_turn(conv | {"message": "Hello."})  # starts the conversation
    seen = _statements_sent(monkeypatch)
    second = enqueue_turn(conv | {"message": "And again."})
    monkeypatch.undo()
    assert seen == [("INSERT INTO turns", True)]
    view = get_turn(second)
    assert view is not None and view.status == TurnStatus.QUEUED and view.message == "And again."
    assert view.conversation_id == get_turn(first).conversation_id  # type: ignore[union-attr]


def test_the_one_statement_path_keeps_its_checks_whichever_shape_ran_before(world) -> None:
    """Its statement is built once per shape (character named or not) and reused with new values:
    another character's conversation is still refused, another tenant's never written, a replay
    still returns the first turn."""
    from services.producer import submit_turns

    conv = new_conversation("elara")
    (started,) = enqueue_turns([conv | {"message": "Hi."}], send=False)  # starts it
    enqueue_turns([conv | {"message": "Named."}], send=False)  # one statement, the character named
    enqueue_turns([{"conversation": conv["conversation"], "message": "Unnamed."}], send=False)
    with pytest.raises(ValueError, match="belongs to character 'elara'"):
        enqueue_turns([conv | {"character": "luffy", "message": "Named wrong."}], send=False)
    keyed = conv | {"message": "Keyed.", "idempotency_key": "once-" + conv["conversation"]}
    (first,) = enqueue_turns([keyed], send=False)
    assert enqueue_turns([keyed], send=False) == [first]
    (elsewhere,) = submit_turns([conv | {"message": "Other tenant."}], send=False, tenant="other-tenant")
    ours = get_turn(started).conversation_id  # type: ignore[union-attr]
    assert get_turn(elsewhere.id).conversation_id != ours  # type: ignore[union-attr]
    with session_scope() as s:
        messages = s.scalars(select(Turn.message).where(Turn.conversation_id == ours).order_by(Turn.number))
        assert list(messages) == ["Hi.", "Named.", "Unnamed.", "Keyed."]


def _conversation_row(external_id: str, tenant: str = "") -> tuple[object, ...] | None:
    from db.models import Conversation

    with session_scope() as s:
        row = s.execute(
            select(
                Conversation.character_id,
                Conversation.player_id,
                Conversation.player_name,
                Conversation.story,
                Conversation.story_time,
                Conversation.emotion,
                Conversation.affinity,
            ).where(Conversation.tenant == tenant, Conversation.external_id == external_id)
        ).one_or_none()
    return None if row is None else tuple(row)


def test_a_conversations_first_single_enqueue_starts_it_in_one_statement_as_the_full_path_would(
    world, monkeypatch
) -> None:
    """Issue 28 (single enqueue): a conversation's first turn took the full path (pre-ping, BEGIN,
    five statements, COMMIT: ~7 ms against ~1 ms for a known conversation's). Now, after the known
    conversation's statement finds none, one more autocommitted statement starts the conversation
    with its turn, writing the conversation as the full path does (two requests in one call)."""
    from services.producer import submit_turns

    # Unsent (send=False takes the same path): the session's worker must not answer them and move
    # the conversations' mood meanwhile.
    fields = {"character": "elara", "player_id": "p-7", "player_name": "Ash", "story": "grand-line"}
    fields |= {"story_time": 30}
    fast, full = new_conversation()["conversation"], new_conversation()["conversation"]
    get_autocommit_engine().dispose()  # no connection a restart in an earlier test left stale
    enqueue_turns([new_conversation() | {"message": "Warm."}], send=False)  # and one connection made
    seen = _statements_sent(monkeypatch)
    (turn_id,) = enqueue_turns([{"conversation": fast, "message": "First.", **fields}], send=False)
    monkeypatch.undo()
    assert seen == [("INSERT INTO turns", True), ("WITH started AS", True)]
    enqueue_turns([{"conversation": full, "message": m, **fields} for m in ("First.", "Second.")], send=False)
    assert _conversation_row(fast) == _conversation_row(full) is not None
    view = get_turn(turn_id)
    assert view is not None and view.status == TurnStatus.QUEUED and view.message == "First."
    # Another tenant's conversation of that id is its own, started the same way.
    (elsewhere,) = submit_turns(
        [{"conversation": fast, "message": "Hi.", **fields}], tenant="t-first", send=False
    )
    assert elsewhere.created and _conversation_row(fast, "t-first") == _conversation_row(fast)
    assert get_turn(elsewhere.id).conversation_id != view.conversation_id  # type: ignore[union-attr]


def test_a_refused_first_turn_leaves_no_conversation_behind(world, monkeypatch) -> None:
    """The one-statement start writes nothing when the full path would refuse the request or answer
    it as a replay: an unknown character, an idempotency key used before for another request (here,
    another message, or the same message in another conversation); a replay of a first turn is
    answered with that turn."""
    seen = _statements_sent(monkeypatch)
    with pytest.raises(ValueError, match="unknown character 'nobody'"):
        enqueue_turns([{"conversation": (lost := new_conversation()["conversation"]), "character": "nobody",
                        "message": "Hi."}], send=False)  # fmt: skip
    assert ("WITH started AS", True) in seen  # the one-statement start ran, and wrote nothing
    assert _conversation_row(lost) is None
    keyed = new_conversation() | {"message": "Keyed.", "idempotency_key": f"first-{lost}"}
    first = enqueue_turns([keyed], send=False)
    assert enqueue_turns([keyed], send=False) == first
    for reused in (keyed | new_conversation(), keyed | new_conversation() | {"message": "Reused."}):
        seen.clear()
        with pytest.raises(IdempotencyConflict):
            enqueue_turns([reused], send=False)
        assert ("WITH started AS", True) in seen
        assert _conversation_row(reused["conversation"]) is None


def test_a_single_enqueue_after_a_database_restart_lands_once(world, services, unserved_model) -> None:
    from core import embedded

    conv = new_conversation()
    enqueue_turn(conv | {"message": "Before."})
    enqueue_turn(conv | {"message": "Warm."})  # the one-statement path now holds a pooled connection
    embedded.restart_postgres(services)  # cuts it: that path has no pre-ping
    turn_id = enqueue_turn(conv | {"message": "After the restart."})
    view = get_turn(turn_id)
    assert view is not None and view.status == TurnStatus.QUEUED
    with session_scope() as s:
        rows = s.scalars(
            select(Turn.id).where(
                Turn.message == "After the restart.", Turn.conversation_id == view.conversation_id
            )
        ).all()
    assert rows == [turn_id]


def test_a_pooled_connection_a_restart_broke_is_dropped_not_reused(
    world, services, monkeypatch, caplog, unserved_model
) -> None:
    """The fast insert runs on the driver's cursor: a connection its error found broken is
    invalidated there (as SQLAlchemy would), so the turn after the fall-back is one statement on a
    fresh connection again, and the pool never tries to reset the dead one."""
    import logging

    from core import embedded
    from db.session import get_autocommit_engine

    conv = new_conversation()
    enqueue_turn(conv | {"message": "Before."})
    # One pooled connection on the one-statement path, not what earlier tests left there: each stale
    # one would fail once (the pool is not recycled on a disconnect; README), and this test follows one.
    get_autocommit_engine().dispose()
    enqueue_turn(conv | {"message": "Warm."})
    embedded.restart_postgres(services)
    with caplog.at_level(logging.ERROR, logger="sqlalchemy.pool"):
        fell_back = enqueue_turn(conv | {"message": "Falls back."})
    mine = threading.get_ident()  # the session's worker and housekeeper have pooled connections too
    assert not [r for r in caplog.records if r.name.startswith("sqlalchemy.pool") and r.thread == mine]
    seen = _statements_sent(monkeypatch)
    again = enqueue_turn(conv | {"message": "Fast again."})
    monkeypatch.undo()
    # a new connection (its set-up statement), then the one autocommitted INSERT
    assert seen == [("SELECT set_config", True), ("INSERT INTO turns", True)]
    with session_scope() as s:
        rows = s.execute(
            select(Turn.message, Turn.status).where(Turn.id.in_([fell_back, again])).order_by(Turn.number)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("Falls back.", TurnStatus.QUEUED),
        ("Fast again.", TurnStatus.QUEUED),
    ]


@pytest.mark.parametrize("statement", ["INSERT INTO turns", "WITH started AS"], ids=["known", "first-turn"])
def test_a_fast_insert_whose_reply_was_lost_is_sent_and_reported_new(
    world, monkeypatch, unserved_model, statement: str
) -> None:
    """Either one-statement insert (into a known conversation, or a conversation's first turn)."""
    import base64

    import psycopg

    from core.settings import queue_for_model
    from services.producer import submit_turns
    from tasks.app import app

    conv = new_conversation()  # its turns go to unserved_model, whose message is looked for below
    if statement == "INSERT INTO turns":
        enqueue_turn(conv | {"message": "Hello."})  # starts the conversation: the next one is known

    execute = psycopg.Cursor.execute

    def lose_the_reply(cursor, query, *args, **kwargs):  # type: ignore[no-untyped-def]
        done = execute(cursor, query, *args, **kwargs)
        written = cursor.rowcount > 0  # the known statement ran first, and wrote nothing, for a new one
        if cursor.connection.autocommit and str(query).lstrip().startswith(statement) and written:
            # it ran and committed (autocommit); its reply never reaches the producer
            raise psycopg.OperationalError("injected: connection lost after the INSERT")
        return done

    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Cursor, "execute", lose_the_reply)
        [stored] = submit_turns([conv | {"message": f"Did this land? ({statement})"}])
    assert stored.created is True and stored.status == TurnStatus.QUEUED
    with session_scope() as s:
        rows = s.scalars(select(Turn.id).where(Turn.message == f"Did this land? ({statement})")).all()
    assert rows == [stored.id]
    with app.connection_for_read() as conn:
        raw = conn.default_channel.client.lrange(queue_for_model(stored.model, "live"), 0, -1)
    sent = [json.loads(base64.b64decode(json.loads(m)["body"]))[1]["turn_ids"] for m in raw]
    assert stored.model == unserved_model and [str(stored.id)] in sent


def test_a_broker_failing_part_way_fails_every_turn_but_those_a_key_or_a_worker_keeps(
    world, monkeypatch
) -> None:
    """Found in review: every turn of the call was marked failed, the ones already sent too (a worker
    may have answered them), and the 503 and each turn's error carried the broker's own text. A later
    review: one sent without a key, still queued, was left to be answered while the client, told
    503, sent its line again without a key (answered twice); it fails with the rest, a keyed one
    stays for its replay."""
    from services.producer import EnqueueError, submit_turns
    from tasks.app import app

    published: list[int] = []
    mine, real_send = threading.get_ident(), app.amqp.send_task_message

    def send_task_message(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.get_ident() != mine:  # the session's worker sending meanwhile: not this test's
            return real_send(*args, **kwargs)
        published.append(1)
        if len(published) >= 2:
            raise ConnectionError("Error 111 connecting to redis-internal.example:6379")

    monkeypatch.setattr(app.amqp, "send_task_message", send_task_message)
    tag = new_conversation()["conversation"]
    for keyed in (False, True):
        published.clear()
        requests = [new_conversation() | {"message": f"Hello {i} from {tag}, {keyed}?"} for i in range(3)]
        if keyed:
            requests[0]["idempotency_key"] = f"hello-{tag}"
        # The one message that goes out is nobody's (review: the session's worker could take it first).
        with pytest.raises(EnqueueError) as failed, sent_to_nobody(monkeypatch, f"gen.{tag}.live"):
            submit_turns(requests)  # live: one message per turn
        if keyed:
            assert "2 turn(s) marked failed, 1 sent before it failed and kept" in str(failed.value)
        else:
            assert "3 turn(s) marked failed (retry" in str(failed.value)
        assert "redis-internal" not in str(failed.value)
        with session_scope() as s:
            turns = {
                t.message: (t.status, t.error)
                for t in s.scalars(select(Turn).where(Turn.message.in_([r["message"] for r in requests])))
            }
        first, second, third = (turns[r["message"]] for r in requests)
        if keyed:
            assert first == (TurnStatus.QUEUED, None)  # its replay answers it
            with session_scope() as s:  # and the 503 names it
                kept = s.scalar(select(Turn.id).where(Turn.message == requests[0]["message"]))
            assert f"and kept (keyed, or taken by a worker): {kept}" in str(failed.value)
        else:
            assert first == (TurnStatus.FAILED, "broker unreachable at enqueue (for the call's other turns)")
        assert second == third == (TurnStatus.FAILED, "broker unreachable at enqueue")


def test_a_message_that_went_through_its_send_raised_is_not_reported_failed_once_claimed(
    world, monkeypatch
) -> None:
    """Found in review: a publish that reached Redis but whose reply was lost raised; a worker claimed
    the turn meanwhile, so nothing was marked failed, yet the call answered 503 "1 turn(s) marked
    failed", and a client retrying without a key stored the line twice."""
    from db.turns import claim_turns
    from services.producer import submit_turns
    from tasks.app import app

    mine, real_send = threading.get_ident(), app.amqp.send_task_message
    message = f"Hello from {new_conversation()['conversation']}?"

    def lands_then_raises(*args, **kwargs):  # type: ignore[no-untyped-def]
        if threading.get_ident() != mine:  # the session's worker sending meanwhile: not this test's
            return real_send(*args, **kwargs)
        with session_scope() as s:  # a worker takes the message before the reply is lost
            turn_id = s.scalar(select(Turn.id).where(Turn.message == message))
            claim_turns(session=s, turn_ids=[turn_id], lease_s=60, max_attempts=3)
        raise ConnectionError("Error 110 reading from redis: timed out")

    monkeypatch.setattr(app.amqp, "send_task_message", lands_then_raises)
    (stored,) = submit_turns([new_conversation() | {"message": message}])
    with session_scope() as s:
        assert s.get(Turn, stored.id).status == TurnStatus.RUNNING


def test_a_turn_failed_unsent_gets_no_failure_callback_and_once_revived_its_answer_is_owed(world) -> None:
    """Found in review: housekeeping POSTed a "failed" callback for a turn the broker never got (its
    request was answered 503), and marked it delivered; a retry that revived it then never called
    back with the answer, since a delivered callback is never sent again."""
    from db.callbacks import claim_lost_callbacks, record_attempt
    from db.models import TurnErrorCode
    from db.turns import fail_unsent, revive_unsent
    from services.producer import submit_turns

    (turn,) = submit_turns([new_conversation() | {"message": "Still there?"}], send=False)
    with session_scope() as session:
        session.execute(
            update(Turn).where(Turn.id == turn.id).values(callback_url="https://game.example/hook")
        )
        failed = fail_unsent(
            session=session, turn_ids=[turn.id], reason="the broker was away", sent_at=turn.sent_at
        )
        assert failed == [turn.id]
    with session_scope() as session:
        assert turn.id not in claim_lost_callbacks(session=session, older_than_s=0, of=Turn, limit=100_000)
        # A failure's callback sent before this rule (or by a worker that saw the failure) ...
        record_attempt(session=session, of=Turn, row_id=turn.id, error=None)
    with session_scope() as session:
        assert revive_unsent(session=session, turn_ids=[turn.id]) == [turn.id]
    with session_scope() as session:
        revived = session.get(Turn, turn.id)
        assert revived is not None and revived.error_code is None
        # ... does not stand for the answer: its callback is owed again.
        assert revived.callback_delivered_at is None and revived.callback_attempts == 0
        assert revived.error_code != TurnErrorCode.BROKER_UNREACHABLE.value


def test_a_replay_whose_turn_is_erased_between_the_insert_and_the_read_back_is_stored_anew(world) -> None:
    """Found in review: a key the insert found taken was read back in a second statement; a player's
    erasure deleting that turn between the two left the key out of the read, and the request was a
    500 (a KeyError). The transaction is run again (IdempotencyRace): the key is free then."""
    from sqlalchemy import delete, event

    from db.session import get_autocommit_engine, get_engine
    from services.producer import submit_turns

    req = new_conversation() | {"message": "Still there?", "idempotency_key": f"erased-{uuid.uuid4().hex}"}
    (first,) = submit_turns([req], send=False)
    erased: list[int] = []

    def erase_before_the_read_back(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if not erased and "turns.request_hash" in statement and "turns.idempotency_key) IN" in statement:
            with get_autocommit_engine().connect() as other:
                erased.append(other.execute(delete(Turn).where(Turn.id == first.id)).rowcount)

    event.listen(get_engine(), "before_cursor_execute", erase_before_the_read_back)
    try:
        (again,) = submit_turns([req], send=False)
    finally:
        event.remove(get_engine(), "before_cursor_execute", erase_before_the_read_back)
    assert erased == [1]  # the turn was gone between the insert and the read
    assert again.created and again.id != first.id  # run again: stored anew, no 500


def test_a_turn_seeding_its_history_whose_commit_reply_was_lost_is_stored_once_and_sent(
    world, monkeypatch, unserved_model
) -> None:
    """Review: a chat completion's turn with its earlier messages takes the full path (the
    one-statement insert cannot seed them), and its commit's lost reply was a 503 with no key fixed:
    the client's retry without a key stored a second turn behind the first, both answered. Its
    automatic key is fixed first and a second try finds the turn under it."""
    import psycopg

    from db.models import Message
    from services.producer import submit_turns

    commit, lost, mine = psycopg.Connection.commit, [], threading.get_ident()

    def commit_then_lose_the_reply(connection):  # type: ignore[no-untyped-def]
        done = commit(connection)
        if threading.get_ident() == mine and not lost:
            lost.append(True)
            raise psycopg.OperationalError("injected: connection lost after the COMMIT")
        return done

    conv = new_conversation()
    history = [("user", "Evening."), ("assistant", "Evening, traveller.")]
    with monkeypatch.context() as patch:
        patch.setattr(psycopg.Connection, "commit", commit_then_lose_the_reply)
        [stored] = submit_turns([conv | {"message": "Is the ferry running?"}], history=history)
    assert lost and stored.created is True and stored.status == TurnStatus.QUEUED
    with session_scope() as s:
        rows = s.scalars(
            select(Turn.id).where(
                Turn.message == "Is the ferry running?",
                Turn.conversation_id == s.scalar(select(Turn.conversation_id).where(Turn.id == stored.id)),
            )
        ).all()
        lines = s.scalars(
            select(Message.content).where(
                Message.conversation_id
                == select(Turn.conversation_id).where(Turn.id == stored.id).scalar_subquery()
            )
        ).all()
    assert rows == [stored.id] and sorted(lines) == sorted(text for _, text in history)  # once


def test_a_turn_naming_another_player_is_refused_from_a_players_conversation(world) -> None:
    """Found in review (privacy between players): a turn naming a player was stored into a known
    conversation started for another player, on both paths: its line became that player's memory
    (facts extracted under their id, their summaries), the prompt read their facts as the speaker's,
    and the speaker's erasure never found it."""
    from services.producer import TurnRejected

    def turns_of(conversation: str) -> list[str]:
        with session_scope() as s:
            return list(
                s.scalars(
                    select(Turn.message)
                    .join(Conversation, Conversation.id == Turn.conversation_id)
                    .where(Conversation.tenant == "", Conversation.external_id == conversation)
                    .order_by(Turn.number)
                )
            )

    rowan, mallory = f"rowan-{uuid.uuid4().hex[:8]}", f"mallory-{uuid.uuid4().hex[:8]}"
    conv = new_conversation()
    enqueue_turns([conv | {"player_id": rowan, "message": "I took the ring."}], send=False)
    # One statement (a known conversation) and the full path (a batch of two) alike.
    alone = [conv | {"player_id": mallory, "message": "What of me?"}]
    batch = [conv | {"message": "Fine."}, conv | {"player_id": mallory, "message": "And me?"}]
    for requests in (alone, batch):
        with pytest.raises(TurnRejected) as refused:
            enqueue_turns(requests, send=False)
        (error,) = refused.value.errors
        assert (error.index, error.field) == (len(requests) - 1, "player_id")
        assert f"is player {rowan!r}'s, not player {mallory!r}'s" in error.reason
    assert turns_of(conv["conversation"]) == ["I took the ring."]
    # Two players starting one conversation in one call: the second is refused.
    fresh = new_conversation()
    with pytest.raises(TurnRejected, match=rf"item 1: player_id: .* is player {rowan!r}'s"):
        enqueue_turns([fresh | {"player_id": rowan, "message": "A."}, fresh | {"player_id": mallory,
                       "message": "B."}], send=False)  # fmt: skip
    assert turns_of(fresh["conversation"]) == []
    # The same player, a turn naming none, and a conversation started for no player take the line.
    enqueue_turns([conv | {"player_id": rowan, "message": "Again."}], send=False)
    enqueue_turns([conv | {"message": "Unnamed."}], send=False)
    anonymous = new_conversation()
    enqueue_turns([anonymous | {"message": "Hello."}], send=False)
    enqueue_turns([anonymous | {"player_id": mallory, "message": "It is me."}], send=False)
    assert turns_of(conv["conversation"]) == ["I took the ring.", "Again.", "Unnamed."]
    assert turns_of(anonymous["conversation"]) == ["Hello.", "It is me."]
