"""Stores of one bulk run's turns and the run's row lock (issue 28), with real database sessions.

Every transaction that finishes turns advances their run. It used to lock the run's row for the
rest of the transaction, so concurrent stores of one run's turns queued on it (88% of the sampled
statements at 8 simulated workers in the fleet simulator). Now a store that can pin (share-lock)
a queued turn of the run leaves the row alone: that turn's finisher advances the run later.
These cases check that stores no longer wait on each other, and that a run still ends exactly when
its last turn does, however the writers interleave.
"""

import hashlib
import threading
import time
import uuid
from types import SimpleNamespace

from sqlalchemy import Engine, event, select, text
from sqlalchemy.orm import Session

import db.runs
import db.turns
from core.settings import settings
from db.bulk_turns import StagedTurn, insert_run_turns
from db.models import Run, RunStatus, Turn, TurnStatus
from db.runs import cancel_run, create_run, finish_submission
from db.session import _session_factory, session_scope
from db.turns import ClaimedTurn, claim_turns, mark_dispatched, renew_lease, store_replies
from tests.lock_order import waits_on
from tests.outcomes import outcome_of


def _run_of(lines: int, *, sent: int | None = None, chunks: int = 1) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A submitted run (queued) of `lines` turns, each its own conversation, the first `sent` (all by
    default) with their messages out, inserted in `chunks` statements a few milliseconds apart (as a
    submission's chunks are): (run, turn ids)."""
    name = f"row-lock-{uuid.uuid4().hex[:10]}"
    staged = [
        StagedTurn(
            idempotency_key=f"run:{name}:c{i}",
            request_hash=hashlib.sha256(f"{name}:{i}".encode()).hexdigest(),
            conversation=f"{name}-{i}",
            character="elara",
            player_name="",
            story=None,
            story_time=None,
            message=f"Line {i}.",
            model=settings.model,
            params={"seed": i, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "stop": []},
            custom_id=f"c{i}",
        )
        for i in range(lines)
    ]
    size = -(-lines // chunks)
    with session_scope() as s:
        run, _ = create_run(session=s, name=name, model=settings.model, file_hash="h", total=lines)
        run_id = run.id
    ids: list[uuid.UUID] = []
    for start in range(0, lines, size):
        with session_scope() as s:
            ids += insert_run_turns(session=s, run_id=run_id, turns=staged[start : start + size])
        time.sleep(0.005)
    with session_scope() as s:
        assert finish_submission(session=s, run_id=run_id) == RunStatus.QUEUED
        out = ids if sent is None else ids[:sent]
        assert mark_dispatched(session=s, turn_ids=out) == len(out)
        return run_id, ids


def _claim(turn_ids: list[uuid.UUID]) -> tuple[uuid.UUID, dict[uuid.UUID, ClaimedTurn]]:
    with session_scope() as s:
        claim = claim_turns(session=s, turn_ids=turn_ids, lease_s=60, max_attempts=3)
    assert sorted(t.id for t in claim.claimed) == sorted(turn_ids)
    return claim.token, {t.id: t for t in claim.claimed}


def _store(session: Session, token: uuid.UUID, turn: ClaimedTurn) -> None:
    assert store_replies(session=session, token=token, outcomes=[outcome_of(turn)]) == [turn.id]


def _statuses(run_id: uuid.UUID) -> tuple[RunStatus, dict[uuid.UUID, TurnStatus]]:
    with session_scope() as s:
        run = RunStatus(s.execute(select(Run.status).where(Run.id == run_id)).scalar_one())
        turns = dict(s.execute(select(Turn.id, Turn.status).where(Turn.run_id == run_id)).tuples().all())
    return run, {t: TurnStatus(v) for t, v in turns.items()}


def _in_thread(target, errors: list[BaseException]) -> threading.Thread:  # type: ignore[no-untyped-def]
    def run() -> None:
        try:
            target()
        except BaseException as exc:  # recorded for the assertion in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_two_stores_of_a_busy_run_do_not_wait_on_each_other(world) -> None:
    run_id, ids = _run_of(30)
    token, turns = _claim(ids[:3])
    with session_scope() as s:  # the run's first store moves it to in_progress
        _store(s, token, turns[ids[0]])
    first = _session_factory()()
    try:
        _store(first, token, turns[ids[1]])  # its transaction stays open
        with session_scope() as second:
            # Before: the second store queued on the run row the first held, and timed out here.
            second.execute(text("SET LOCAL lock_timeout = '2s'"))
            _store(second, token, turns[ids[2]])
        first.commit()
    finally:
        first.close()
    run, statuses = _statuses(run_id)
    assert run == RunStatus.IN_PROGRESS
    assert [statuses[t] for t in ids[:3]] == [TurnStatus.DONE] * 3
    assert all(statuses[t] == TurnStatus.QUEUED for t in ids[3:])


def test_the_last_turn_finished_while_a_store_skipped_the_run_row_completes_the_run(world) -> None:
    """A store that left the run's row alone (it pinned the run's last queued turn) is still open
    when another worker claims and stores that turn: the run must end with both stored. Without the
    pin's lock the other store would complete before the first commits, see its turn running, and
    leave the run in progress for ever."""
    run_id, ids = _run_of(3)
    token, turns = _claim(ids[:2])
    with session_scope() as s:  # in_progress
        _store(s, token, turns[ids[0]])
    errors: list[BaseException] = []

    def answer_the_last_turn() -> None:
        deadline = time.monotonic() + 20
        while True:  # as a worker does: a turn another transaction holds is looked at again shortly
            with session_scope() as s:
                claim = claim_turns(session=s, turn_ids=[ids[2]], lease_s=60, max_attempts=3)
            if claim.claimed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert [t.id for t in claim.claimed] == [ids[2]]
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '20s'"))
            _store(s, claim.token, claim.claimed[0])

    store = _session_factory()()
    try:
        _store(store, token, turns[ids[1]])  # not committed yet
        with session_scope() as probe:  # the store left the run's row alone: it pinned instead
            probe.execute(text("SET LOCAL lock_timeout = '1s'"))
            probe.execute(select(Run.id).where(Run.id == run_id).with_for_update(nowait=True))
        other = _in_thread(answer_the_last_turn, errors)
        other.join(1.0)
        store.commit()
    finally:
        store.close()
    other.join(30)
    assert not other.is_alive() and errors == [], errors
    run, statuses = _statuses(run_id)
    assert set(statuses.values()) == {TurnStatus.DONE}
    assert run == RunStatus.COMPLETED


def test_a_store_never_pins_an_unsent_turn(world) -> None:
    """mark_dispatched skips rows another transaction holds: a store that pinned the run's unsent
    queued turn (a scene's next step, created in that very store) hid it from the stamp, and the
    sweeper sent it a second time. The store takes the run's row instead."""
    run_id, ids = _run_of(3, sent=2)
    token, turns = _claim(ids[:2])
    with session_scope() as s:  # in_progress
        _store(s, token, turns[ids[0]])
    store = _session_factory()()
    try:
        _store(store, token, turns[ids[1]])  # not committed yet; ids[2] is the only queued turn
        with session_scope() as sender:
            sender.execute(text("SET LOCAL lock_timeout = '2s'"))
            assert mark_dispatched(session=sender, turn_ids=[ids[2]]) == 1
        store.commit()
    finally:
        store.close()
    with session_scope() as s:
        assert s.scalar(select(Turn.dispatched_at).where(Turn.id == ids[2])) is not None
    run, statuses = _statuses(run_id)
    assert run == RunStatus.IN_PROGRESS and statuses[ids[2]] == TurnStatus.QUEUED


def test_a_store_never_holds_another_workers_running_turn(world) -> None:
    """Only queued turns are pinned: a worker's write transaction stores some turns and then fails
    or requeues others of its claim, so two writers each pinning the other's running turn would
    deadlock. Here the only other unfinished turn is another worker's, running: its lease renewal
    (which locks it) must not wait for the store."""
    run_id, ids = _run_of(3)
    first_token, first = _claim(ids[:1])
    with session_scope() as s:  # in_progress
        _store(s, first_token, first[ids[0]])
    token, turns = _claim(ids[1:2])
    other_token, _ = _claim(ids[2:])
    store = _session_factory()()
    try:
        _store(store, token, turns[ids[1]])  # not committed yet
        with session_scope() as other:
            other.execute(text("SET LOCAL lock_timeout = '2s'"))
            assert renew_lease(session=other, token=other_token, lease_s=60) == 1
        store.commit()
    finally:
        store.close()
    run, statuses = _statuses(run_id)
    assert run == RunStatus.IN_PROGRESS and statuses[ids[2]] == TurnStatus.RUNNING


def test_two_stores_of_a_runs_last_turns_at_once_complete_it(world, monkeypatch) -> None:
    """Both stores have finished their turn (each holds its row) before either advances the run:
    neither can pin the other's turn, each sees it unfinished, and only the run's row lock lets the
    one that advances second see the first's turn and complete the run."""
    run_id, ids = _run_of(3)
    token, turns = _claim(ids)
    with session_scope() as s:  # in_progress: the case a store may skip the run's row in
        _store(s, token, turns[ids[0]])
    both_finished = threading.Barrier(2, timeout=20)
    advance = db.turns.advance_runs_of_turns

    def advance_once_both_finished(*, session: Session, turn_ids) -> None:  # type: ignore[no-untyped-def]
        if set(turn_ids) & set(ids[1:]):  # this test's stores, not the session's worker's meanwhile
            both_finished.wait()
        advance(session=session, turn_ids=turn_ids)

    monkeypatch.setattr(db.turns, "advance_runs_of_turns", advance_once_both_finished)
    errors: list[BaseException] = []

    def store(turn_id: uuid.UUID) -> None:
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '20s'"))
            _store(s, token, turns[turn_id])

    threads = [_in_thread(lambda t=t: store(t), errors) for t in ids[1:]]
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == [], f"{[type(e).__name__ for e in errors]}: {errors}"
    run, statuses = _statuses(run_id)
    assert set(statuses.values()) == {TurnStatus.DONE}
    assert run == RunStatus.COMPLETED


def test_a_cancel_during_a_store_waits_for_it_and_keeps_its_reply(world) -> None:
    run_id, ids = _run_of(20)
    token, turns = _claim(ids[:2])
    with session_scope() as s:  # in_progress, with one turn answered
        _store(s, token, turns[ids[0]])
    errors: list[BaseException] = []
    outcome: list[RunStatus] = []

    def cancel() -> None:
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '20s'"))
            outcome.append(cancel_run(session=s, run_id=run_id).after)

    store = _session_factory()()
    try:
        _store(store, token, turns[ids[1]])  # the run's last running turn, not committed yet
        cancelling = _in_thread(cancel, errors)
        cancelling.join(1.0)
        assert cancelling.is_alive(), "the cancel did not wait for the store"
        store.commit()
    finally:
        store.close()
    cancelling.join(30)
    assert not cancelling.is_alive() and errors == [], errors
    # It saw the stored turn: nothing was running any more, so the run ended at once.
    assert outcome == [RunStatus.CANCELLED]
    run, statuses = _statuses(run_id)
    assert run == RunStatus.CANCELLED
    assert [statuses[t] for t in ids[:2]] == [TurnStatus.DONE] * 2
    assert all(statuses[t] == TurnStatus.CANCELLED for t in ids[2:])
    with session_scope() as s:
        assert s.scalar(select(Turn.reply).where(Turn.id == ids[1])) == f"Answer to {turns[ids[1]].message}"


def test_stores_of_one_run_pin_different_queued_turns(world, monkeypatch) -> None:
    """The pin's pivot is drawn between the run's own lowest and highest queued ids: a uuid4 pivot
    sorted above every time-ordered (uuidv7) id, so every store pinned the same lowest turn, which
    claims then kept deferring. The draws are the range's two ends and its middle (review: eight
    random draws over chunked time-ordered ids fell in one long gap between chunks now and then)."""
    run_id, ids = _run_of(40, chunks=4)
    with session_scope() as s:
        s.execute(text("UPDATE runs SET status = 'in_progress' WHERE id = :r"), {"r": run_id})
    draws = iter([0, "last", "middle"])

    def randbelow(n: int) -> int:
        draw = next(draws)
        return {"last": n - 1, "middle": n // 2}.get(draw, draw)  # type: ignore[call-overload]

    monkeypatch.setattr(db.runs, "secrets", SimpleNamespace(randbelow=randbelow))  # this module's alone
    pinned = set()
    for _ in range(3):
        holder = _session_factory()()
        try:
            assert db.runs._pin_queued_turn(holder, run_id)
            with session_scope() as probe:
                free = set(
                    probe.scalars(
                        select(Turn.id).where(Turn.run_id == run_id).with_for_update(skip_locked=True)
                    ).all()
                )
            assert len(free) == len(ids) - 1
            pinned |= set(ids) - free
        finally:
            holder.rollback()
            holder.close()
    assert {min(ids), max(ids)} <= pinned and len(pinned) > 1, f"pinned {pinned}"


def test_a_store_reads_runs_and_scenes_only_for_its_turns_that_have_one(world) -> None:
    """Issue 28 (worker time per turn): a live turn's store made two reads per transaction to find
    that its turns had no run and no scene. The run and scene come with the turns' lock now: a
    store of a live turn alone makes neither read, and a store of a live turn with a run's turn
    still completes the run."""
    from services.producer import enqueue_turns
    from tests.conftest import new_conversation

    run_id, (run_turn,) = _run_of(1)
    (live,) = enqueue_turns([new_conversation() | {"message": "Alone."}], send=False)
    (live_2,) = enqueue_turns([new_conversation() | {"message": "Beside a run."}], send=False)
    token, turns = _claim([run_turn, live, live_2])
    mine = threading.get_ident()  # the session's worker stores replies meanwhile
    statements: list[str] = []

    def seen(conn, cursor, sql, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == mine:
            statements.append(" ".join(sql.split()))

    def reads_of_runs_or_scenes() -> list[str]:
        return [s for s in statements if s.startswith("SELECT") and ("run_id" in s or "scene_id" in s)]

    event.listen(Engine, "before_cursor_execute", seen)
    try:
        with session_scope() as s:
            _store(s, token, turns[live])
        alone = reads_of_runs_or_scenes()
        statements.clear()
        with session_scope() as s:
            stored = store_replies(
                session=s, token=token, outcomes=[outcome_of(turns[run_turn]), outcome_of(turns[live_2])]
            )
    finally:
        event.remove(Engine, "before_cursor_execute", seen)
    # The lock's own read names both columns; nothing else may (before: SELECT DISTINCT turns.run_id
    # and SELECT turns.scene_id, ... on every store).
    assert [s for s in alone if "FOR UPDATE" not in s] == []
    assert set(stored) == {run_turn, live_2}
    run, statuses = _statuses(run_id)
    assert run == RunStatus.COMPLETED and statuses[run_turn] == TurnStatus.DONE
    assert any("FROM turns LEFT OUTER JOIN scenes" in s for s in reads_of_runs_or_scenes())  # the runs read


def test_a_sweep_finishing_two_cancels_never_deadlocks_with_a_store_of_both_runs(world) -> None:
    """Found in review: the sweep finished every cancelling run in one transaction, in the order the
    table gave them, keeping each run's row locked to its end; a worker storing turns of both runs
    locks their rows in id order. Sweep: B, then waits for A; worker: A, then waits for B."""
    from services.sweeper import close_abandoned_runs

    (first, _), (second, _) = _run_of(1), _run_of(1)
    low, high = sorted([first, second])
    for run_id in (high, low):  # the higher id's row version first: the order a scan returns them
        with session_scope() as s:
            s.execute(text("UPDATE runs SET status = 'cancelling' WHERE id = :id"), {"id": run_id})
    worker = _session_factory()()
    worker.execute(select(Run.id).where(Run.id == low).with_for_update())  # the worker holds A
    worker_pid = worker.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    swept: list[object] = []
    sweep = threading.Thread(target=lambda: swept.append(_capture(close_abandoned_runs, older_than_s=0)))
    sweep.start()
    try:
        deadline = time.monotonic() + 30
        while not waits_on(worker_pid):  # the sweep is at A (having finished B first, before the fix)
            assert time.monotonic() < deadline and sweep.is_alive(), swept
            time.sleep(0.05)
        worker.execute(select(Run.id).where(Run.id == high).with_for_update())  # then B, in id order
        worker.commit()
    finally:
        worker.close()
        sweep.join(timeout=60)
    assert not isinstance(swept[0], Exception), swept[0]
    with session_scope() as s:
        assert {s.get_one(Run, r).status for r in (low, high)} == {RunStatus.CANCELLED}


def _capture(fn, **kwargs):  # type: ignore[no-untyped-def]
    try:
        return fn(**kwargs)
    except Exception as exc:  # the deadlock, raised in the sweep's thread, is the test's finding
        return exc


def test_a_chunk_naming_a_conversation_a_worker_is_writing_does_not_wait_for_that_worker(world) -> None:
    """Found in review: a chunk's INSERT … ON CONFLICT of the conversations its lines name waited for
    any transaction writing such a row: a worker storing an earlier chunk's reply (it updates the
    conversation, then locks the run) and the chunk (it holds the run's row shared) deadlocked."""
    name = f"convo-wait-{uuid.uuid4().hex[:10]}"
    conversation = f"{name}-shared"
    line = StagedTurn(
        idempotency_key=f"run:{name}:c0",
        request_hash=hashlib.sha256(name.encode()).hexdigest(),
        conversation=conversation,
        character="elara",
        player_name="",
        story=None,
        story_time=None,
        message="First.",
        model=settings.model,
        params={"seed": 0, "max_new_tokens": 4, "temperature": 0.7, "top_p": 0.9, "stop": []},
        custom_id="c0",
    )
    with session_scope() as s:
        run, _ = create_run(session=s, name=name, model=settings.model, file_hash="h", total=2)
        run_id = run.id
        insert_run_turns(session=s, run_id=run_id, turns=[line])
    worker = _session_factory()()
    try:  # a worker storing the first line's reply: its conversation's row is being written
        worker.execute(
            text("UPDATE conversations SET player_name = player_name WHERE external_id = :c"),
            {"c": conversation},
        )
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '2s'"))  # before the fix: LockNotAvailable
            second = [StagedTurn(**{**line.__dict__, "idempotency_key": f"run:{name}:c1", "custom_id": "c1"})]
            assert len(insert_run_turns(session=s, run_id=run_id, turns=second)) == 1
    finally:
        worker.rollback()
        worker.close()


def test_a_groups_write_a_deadlock_ends_is_written_again_not_handed_back_charged(world, caplog) -> None:
    """Found in review: a group's write takes its runs' rows in two passes (the stored turns' runs,
    then the failed turns'). The write stores run A's last turn and fails run B's while another
    session holds B and then wants A: a real deadlock. PostgreSQL rolled the write back and the batch
    handed its turns back with an attempt charged; the write is now run again, and goes through."""
    import logging

    from db.models import TurnErrorCode
    from db.turns import Failure
    from worker.pipeline import write_group

    (run_a, (a,)), (run_b, (b,)) = _run_of(1), _run_of(1)
    token, turns = _claim([a, b])
    caplog.set_level(logging.INFO, logger="db.session")
    failure = Failure("engine error: injected", TurnErrorCode.ENGINE_ERROR)
    written: list[object] = []
    errors: list[BaseException] = []
    theirs = _session_factory()()
    try:
        theirs.execute(text("SET deadlock_timeout = '20s'"))  # so the write is the deadlock's victim
        theirs.execute(select(Run.id).where(Run.id == run_b).with_for_update())
        pid = theirs.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        writer = _in_thread(
            lambda: written.append(write_group(token, [outcome_of(turns[a])], {b: failure}, {})), errors
        )
        deadline = time.monotonic() + 30
        while not waits_on(pid):  # the write holds A and waits for B
            assert time.monotonic() < deadline and writer.is_alive(), errors
            time.sleep(0.05)
        theirs.execute(select(Run.id).where(Run.id == run_a).with_for_update())  # and B wants A
        theirs.commit()
    finally:
        theirs.close()
    writer.join(timeout=60)
    assert not errors, errors
    assert "rolled back (DeadlockDetected); run again" in caplog.text  # a real deadlock, and its victim
    assert [(w.stored, w.failed, w.next_steps) for w in written] == [([a], [b], [])]  # type: ignore[attr-defined]
    with session_scope() as s:
        rows = {t.id: t for t in s.scalars(select(Turn).where(Turn.id.in_([a, b])))}
        assert (rows[a].status, rows[b].status) == (TurnStatus.DONE, TurnStatus.FAILED)
        assert rows[b].error == "engine error: injected" and {t.attempts for t in rows.values()} == {1}
        assert {s.get_one(Run, r).status for r in (run_a, run_b)} == {RunStatus.COMPLETED}


def test_a_cancel_ends_a_running_turn_whose_worker_is_gone_and_leaves_a_live_one(world) -> None:
    """Found in review: a cancel (or an expiry) cancelled queued turns only; a running turn whose
    worker died was cancelled by the next claim of it, and with no worker of its model left the run
    stayed cancelling for ever, its files never written."""
    from sqlalchemy import func, update

    run_id, ids = _run_of(3)
    token, turns = _claim(ids[:2])
    with session_scope() as s:  # the first one's worker died: its lease lapsed
        s.execute(
            update(Turn).where(Turn.id == ids[0]).values(lease_until=func.now() - text("interval '1 minute'"))
        )
    with session_scope() as s:
        assert cancel_run(session=s, run_id=run_id).after == RunStatus.CANCELLING
    run, statuses = _statuses(run_id)
    assert [statuses[t] for t in ids] == [TurnStatus.CANCELLED, TurnStatus.RUNNING, TurnStatus.CANCELLED]
    with session_scope() as s:  # the lapsed worker, had it lived on, stores nothing
        assert store_replies(session=s, token=token, outcomes=[outcome_of(turns[ids[0]])]) == []
    with session_scope() as s:
        _store(s, token, turns[ids[1]])  # the live one finishes: the run ends
    assert _statuses(run_id)[0] == RunStatus.CANCELLED


def test_an_expiry_tells_a_started_turn_it_was_not_answered_not_that_it_never_started(world) -> None:
    """Found in review: a running turn cancelled at its run's expiry (its worker gone) was told the
    window closed "before this turn started"."""
    from sqlalchemy import func, update

    from db.runs import EXPIRED_STARTED, EXPIRED_TURN

    run_id, ids = _run_of(2)
    _claim(ids[:1])
    with session_scope() as s:
        s.execute(
            update(Turn).where(Turn.id == ids[0]).values(lease_until=func.now() - text("interval '1 minute'"))
        )
    with session_scope() as s:
        cancel_run(session=s, run_id=run_id, reason="expired")
        errors = dict(s.execute(select(Turn.id, Turn.error).where(Turn.run_id == run_id)).tuples().all())
    assert errors == {ids[0]: EXPIRED_STARTED, ids[1]: EXPIRED_TURN["error"]}
