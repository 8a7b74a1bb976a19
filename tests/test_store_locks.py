"""No deadlocks between the store and producers, or the store and its own lease renewal.

Two real database sessions in two threads, interleaved so that the locks the store takes cross the
other session's in the worst order. Before the fix each case ended in DeadlockDetected (PostgreSQL's
detector fires after its 1 s deadlock_timeout); now both sessions finish.
"""

import hashlib
import threading
import uuid
from typing import Any

from sqlalchemy import select, text, update

from core.settings import settings
from db.models import Turn, TurnErrorCode, TurnStatus
from db.session import session_scope
from db.turns import (
    Failure,
    NewTurn,
    TurnOutcome,
    claim_turns,
    create_turns,
    fail_turns,
    renew_lease,
    store_replies,
)
from services.producer import enqueue_turns, get_turn
from tests.conftest import new_conversation

# Long enough for PostgreSQL's deadlock detector (deadlock_timeout 1 s) to have fired.
BLOCKED_S = 1.5
# Long enough for a renewal that never waits to have finished on a loaded machine.
RENEWAL_S = 10.0


def _claimed_pair() -> tuple[uuid.UUID, list[uuid.UUID]]:
    ids = enqueue_turns(
        [new_conversation() | {"message": f"Store lock check {i}."} for i in range(2)], send=False
    )
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
    assert sorted(t.id for t in claim.claimed) == sorted(ids)
    return claim.token, ids


def _outcome(turn_id: uuid.UUID) -> TurnOutcome:
    view = get_turn(turn_id)
    vec = [0.1] * settings.embedding_dim
    return TurnOutcome(
        turn_id=turn_id,
        conversation_id=view.conversation_id,
        user_message=view.message,
        user_embedding=vec,
        reply="Stored.",
        reply_embedding=vec,
        prompt="p",
        context={},
        usage={},
        timings={},
        params=view.params,
        state={"after": {"emotion": "happy", "affinity": 1}},  # the store updates the conversation too
    )


def _new_turn(conversation_id: int) -> NewTurn:
    key = f"lock-check-{uuid.uuid4().hex}"
    return NewTurn(
        idempotency_key=key,
        request_hash=hashlib.sha256(key.encode()).hexdigest(),
        conversation_id=conversation_id,
        message="A producer's line.",
        model=settings.model,
        params={},
    )


def _renewal(token: uuid.UUID, renewed: list[int]):  # type: ignore[no-untyped-def]
    """The lease keeper's renewal of the claim, as a thread's target; what it renewed goes in `renewed`."""

    def renew() -> None:
        with session_scope() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            renewed.append(renew_lease(session=session, token=token, lease_s=60))

    return renew


def _in_thread(target, errors: list[BaseException]) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            target()
        except BaseException as exc:  # recorded for the assertion in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_producer_naming_conversations_in_the_other_order_never_deadlocks_with_the_store(world) -> None:
    token, ids = _claimed_pair()
    outcomes = sorted((_outcome(t) for t in ids), key=lambda o: o.conversation_id)
    low, high = outcomes[0].conversation_id, outcomes[1].conversation_id
    errors: list[BaseException] = []
    stored: list[uuid.UUID] = []

    def store() -> None:
        with session_scope() as session:
            session.execute(text("SET LOCAL lock_timeout = '20s'"))
            stored.extend(store_replies(session=session, token=token, outcomes=outcomes))

    try:
        with session_scope() as producer:
            producer.execute(text("SET LOCAL lock_timeout = '20s'"))
            # A POST /v1/turns:batch naming the later conversation first: FOR KEY SHARE on it.
            create_turns(session=producer, turns=[_new_turn(high)])
            storing = _in_thread(store, errors)  # locks `low`, then `high`
            storing.join(BLOCKED_S)
            create_turns(session=producer, turns=[_new_turn(low)])  # FOR KEY SHARE on `low`
    except BaseException as exc:
        errors.append(exc)
    storing.join(30)
    assert not storing.is_alive()
    assert errors == [], f"{[type(e).__name__ for e in errors]}: {errors}"
    assert sorted(stored) == sorted(ids)
    with session_scope() as session:
        statuses = session.scalars(select(Turn.status).where(Turn.id.in_(ids))).all()
        produced = session.scalars(
            select(Turn.id).where(Turn.conversation_id.in_([low, high]), Turn.id.not_in(ids))
        ).all()
    assert set(statuses) == {TurnStatus.DONE} and len(produced) == 2


def _ctid(session, turn_id: uuid.UUID) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    raw = session.execute(text("SELECT ctid::text FROM turns WHERE id = :id"), {"id": turn_id}).scalar_one()
    page, item = raw.strip("()").split(",")
    return int(page), int(item)


def test_lease_renewal_never_waits_for_a_store_holding_its_rows_in_another_order(world) -> None:
    # The store locks a claim's turns in id order. Renewal used to take them in scan order (the
    # heap's, or turn number's through the unfinished-turns index): arrange both to be the reverse.
    # It now skips the rows a writer holds, so no order of either can deadlock them.
    for _ in range(30):
        token, ids = _claimed_pair()
        with session_scope() as session:
            first, second = session.scalars(select(Turn.id).where(Turn.id.in_(ids)).order_by(Turn.number))
        if first > second:
            break
    else:
        raise AssertionError("no pair with the later turn number on the smaller id in 30 tries")
    low, high = second, first  # by id
    with session_scope() as session:
        # Move the smaller id's row after the other in the heap. Where a long-used table's free space
        # keeps it in front (the whole suite's), turn-number order alone is the reverse of id order.
        for _ in range(50):
            if _ctid(session, high) < _ctid(session, low):
                break
            session.execute(update(Turn).where(Turn.id == low).values(lease_until=Turn.lease_until))
            session.commit()

    errors: list[BaseException] = []
    renewed: list[int] = []
    renew = _renewal(token, renewed)

    outcomes = [_outcome(t) for t in ids]
    try:
        with session_scope() as store:
            store.execute(text("SET LOCAL lock_timeout = '20s'"))
            # The store has locked its conversations and the first of its turns by id...
            store.execute(select(Turn.id).where(Turn.id == low).with_for_update())
            renewing = _in_thread(renew, errors)  # ...when the lease keeper's renewal fires
            renewing.join(RENEWAL_S)  # it skips the row the store holds and returns
            assert store_replies(session=store, token=token, outcomes=outcomes)
    except BaseException as exc:
        errors.append(exc)
    renewing.join(30)
    assert not renewing.is_alive()
    assert errors == [], f"{[type(e).__name__ for e in errors]}: {errors}"
    assert renewed == [1]  # it renewed the turn the store did not hold yet, and waited for none
    with session_scope() as session:
        assert set(session.scalars(select(Turn.status).where(Turn.id.in_(ids)))) == {TurnStatus.DONE}


def test_lease_renewal_never_waits_for_a_batchs_write_that_takes_its_rows_in_several_goes(world) -> None:
    # One write transaction stores some of a claim's turns, then fails others (and hands back more),
    # each step locking its own rows in id order. A renewal waiting in between held the smaller id
    # the fail step wanted next: DeadlockDetected, and a stored batch rolled back.
    token, ids = _claimed_pair()
    low, high = sorted(ids)
    errors: list[BaseException] = []
    renewed: list[int] = []
    renew = _renewal(token, renewed)

    try:
        with session_scope() as write:
            write.execute(text("SET LOCAL lock_timeout = '20s'"))
            assert store_replies(session=write, token=token, outcomes=[_outcome(high)]) == [high]
            renewing = _in_thread(renew, errors)  # the lease keeper's renewal fires mid-write
            renewing.join(RENEWAL_S)  # it returns at once; it blocked here before (then the deadlock)
            failures = {low: Failure("the engine refused it", TurnErrorCode.ENGINE_ERROR)}
            assert fail_turns(session=write, token=token, failures=failures) == [low]
    except BaseException as exc:
        errors.append(exc)
    renewing.join(30)
    assert not renewing.is_alive()
    assert errors == [], f"{[type(e).__name__ for e in errors]}: {errors}"
    assert renewed == [1]  # `low`, renewed; `high`, which the write held, skipped
    assert get_turn(high).status == TurnStatus.DONE and get_turn(low).status == TurnStatus.FAILED


def test_send_and_end_times_are_the_databases_whatever_the_hosts_clock(world, monkeypatch) -> None:
    """Found in review (time and clocks): a turn's send time was the API host's clock, a stored
    reply's end time the worker's, while claims, leases and sweeps use the database's. With the API
    host 180 s ahead, a claimed turn whose worker died read as sent after its claim, so the sweeper's
    "lease gone and not sent again" never matched it (an hour's wait, not two minutes); with the
    worker 400 s behind, a reply ended before it started and its callback looked lost at once."""
    import datetime as dt

    from db import single_enqueue, turns
    from services.producer import enqueue_turn
    from tests.conftest import sent_to_nobody

    class Skewed(dt.datetime):
        offset = dt.timedelta(seconds=180)  # the API host's clock, ahead

        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def,override]
            return dt.datetime.now(tz) + cls.offset

    for module in (turns, single_enqueue):
        monkeypatch.setattr(module, "datetime", Skewed, raising=False)
    conv = new_conversation()
    with sent_to_nobody(
        monkeypatch, "gen.store-locks-check.live"
    ):  # review: the session's worker raced the claim
        ids = [
            enqueue_turn(conv | {"message": "First, starting it."}),
            enqueue_turn(conv | {"message": "Next."}),
        ]
    ids += enqueue_turns([new_conversation() | {"message": f"Listed {i}."} for i in range(2)], send=False)
    with session_scope() as session:
        late = session.execute(
            select(Turn.id).where(Turn.id.in_(ids), Turn.dispatched_at > text("now() + interval '5 s'"))
        ).all()
        assert late == []  # stamped sent on the database's clock
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
    claimed = [t.id for t in claim.claimed]
    assert len(claimed) == 3  # the conversation's second waits for its first
    Skewed.offset = dt.timedelta(seconds=-400)  # the worker's clock, behind
    with session_scope() as session:
        store_replies(session=session, token=claim.token, outcomes=[_outcome(t) for t in claimed])
    with session_scope() as session:
        ended = session.execute(select(Turn.started_at, Turn.finished_at).where(Turn.id.in_(claimed))).all()
    assert len(ended) == 3 and all(finished >= started for started, finished in ended), ended


def _out_of_id_order() -> tuple[uuid.UUID, uuid.UUID]:
    """Two queued turns (a, b), a before b in the heap and b's id the smaller."""
    for _ in range(20):
        ids = enqueue_turns(
            [new_conversation() | {"message": f"Lock order check {i}."} for i in range(4)], send=False
        )
        with session_scope() as session:
            heap = sorted(ids, key=lambda t: _ctid(session, t))
        pair = next(((a, b) for i, a in enumerate(heap) for b in heap[i + 1 :] if b < a), None)
        if pair is not None:
            return pair
    raise AssertionError("no pair of turns out of id order in the heap in 20 tries")


def _stamp(session: Any, turn_id: uuid.UUID) -> Any:
    """The `dispatched_at` the turn was stored with (one call's turns share it)."""
    return session.scalar(select(Turn.dispatched_at).where(Turn.id == turn_id))


def test_a_cancel_or_a_failed_send_of_given_turns_locks_them_in_id_order(world) -> None:
    """Found in a deadlock review: cancelling given turns and failing those whose message could not be
    sent locked them in their plan's order (the heap's, in a scan), while every other writer of turns
    locks in id order: a retry of a run's failed lines failing for a broker away while its run was
    cancelled could deadlock. Here the scan is forced to the heap's order, the heap's first turn of the
    two has the larger id, and another session holds the smaller: in id order the statement waits
    for it holding nothing, so the larger is free."""
    from db.turns import cancel_turns, fail_unsent

    operations = {
        "cancel": lambda s, ids: cancel_turns(session=s, turn_ids=ids),
        "fail": lambda s, ids: fail_unsent(
            session=s, turn_ids=ids, reason="the broker is away", sent_at=_stamp(s, ids[0])
        ),
    }
    for name, operation in operations.items():
        a, b = _out_of_id_order()
        errors: list[BaseException] = []
        done: list[list[uuid.UUID]] = []

        def run(operation=operation, a=a, b=b, done=done) -> None:  # type: ignore[no-untyped-def]
            with session_scope() as session:
                session.execute(text("SET LOCAL enable_indexscan = off"))
                session.execute(text("SET LOCAL enable_bitmapscan = off"))
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                done.append(operation(session, [a, b]))

        with session_scope() as holder:
            holder.execute(select(Turn.id).where(Turn.id == b).with_for_update())
            waiting = _in_thread(run, errors)
            waiting.join(BLOCKED_S)
            assert waiting.is_alive()  # waiting for b
            with session_scope() as probe:
                free = probe.execute(
                    select(Turn.id).where(Turn.id == a).with_for_update(skip_locked=True)
                ).scalar_one_or_none()
            assert free == a, f"{name}: the larger id was locked before the smaller"
        waiting.join(30)
        assert not waiting.is_alive() and errors == [], errors
        assert sorted(done[0]) == sorted([a, b])
