"""Engine deaths per turn, on the real PostgreSQL: a turn that was inside the engine each time it died
is dead-lettered (engine_crash_loop) instead of being sent to worker after worker; the turns beside
it are requeued with their attempt refunded, and a turn that never reached the engine counts no death."""

import time
import uuid

from db.models import TurnErrorCode, TurnStatus
from db.session import session_scope
from db.turns import claim_turns, hand_back_after_engine_death
from services.producer import enqueue_turns, get_turn
from tests.conftest import new_conversation


def _turns(n: int) -> list[uuid.UUID]:
    return enqueue_turns(
        [new_conversation() | {"message": f"Death check {i}."} for i in range(n)], send=False
    )


def _die_once(ids: list[uuid.UUID], in_engine: list[uuid.UUID]):
    """Claim the turns (as a worker does), then hand them back as its engine dies."""
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
        assert sorted(t.id for t in claim.claimed) == sorted(ids)
    with session_scope() as session:
        return hand_back_after_engine_death(
            session=session,
            token=claim.token,
            turn_ids=ids,
            in_engine=in_engine,
            reason="engine died: injected",
            max_deaths=2,
        )


def test_a_turn_inside_the_engine_at_two_deaths_is_dead_lettered_and_its_mates_are_not(world) -> None:
    poison, inside_once, waiting = _turns(3)
    first = _die_once([poison, inside_once, waiting], in_engine=[poison, inside_once])
    assert sorted(first.requeued) == sorted([poison, inside_once, waiting]) and not first.crash_looped
    second = _die_once([poison, inside_once, waiting], in_engine=[poison])  # it ran alone, and died
    assert second.crash_looped == [poison]
    view = get_turn(poison)
    assert view.status == TurnStatus.FAILED and view.error_code == TurnErrorCode.ENGINE_CRASH_LOOP
    assert "engine died: injected" in view.error
    for turn_id in (inside_once, waiting):
        view = get_turn(turn_id)
        assert view.status == TurnStatus.QUEUED and view.attempts == 0  # refunded every time
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[inside_once, waiting], lease_s=60, max_attempts=3)
    deaths = {t.id: t.engine_deaths for t in claim.claimed}
    assert deaths == {inside_once: 1, waiting: 0}  # the pipeline runs inside_once alone next time


def test_a_turn_inside_at_deaths_it_was_no_suspect_of_runs_alone_after_a_few(world) -> None:
    # Found in review: a request that kills the engine mid-reply, on a busy worker where another
    # request nearly always joins as it dies, was never a suspect: its attempt refunded, no death
    # counted, sent to worker after worker for ever. The deaths it is inside for are counted, and after
    # DEATHS_SEEN_ALONE it runs alone, where a death is its own (and counts toward engine_crash_loop).
    from worker.pipeline import DEATHS_SEEN_ALONE, runs_alone

    decoding, joining, waiting = _turns(3)
    ids = [decoding, joining, waiting]
    for _ in range(DEATHS_SEEN_ALONE):
        with session_scope() as session:
            claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
            assert not any(runs_alone(t) for t in claim.claimed)
        with session_scope() as session:
            outcome = hand_back_after_engine_death(
                session=session,
                token=claim.token,
                turn_ids=ids,
                in_engine=[],  # a joiner that was no suspect: a request the engine rejected as it died
                present=[decoding],
                reason="engine died: injected",
                max_deaths=2,
            )
        assert sorted(outcome.requeued) == sorted(ids) and not outcome.crash_looped
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
    seen = {t.id: (t.engine_deaths_seen, runs_alone(t)) for t in claim.claimed}
    assert seen == {decoding: (DEATHS_SEEN_ALONE, True), joining: (0, False), waiting: (0, False)}
    assert get_turn(decoding).attempts == 1  # refunded each time: only this claim counts


def test_handing_back_after_a_death_takes_the_rows_in_the_lease_renewals_order(world) -> None:
    """The hand-back locks its claim's rows in id order before it writes any, as the lease keeper's
    renewal and every writer of turns do. (Review: this test let a renewal wait for the hand-back,
    and renewal has skipped rows others hold since, so it could no longer fail: the hand-back is now
    held at the smaller id, and the larger must still be free.)"""
    import threading

    from sqlalchemy import select, text

    from db.models import Turn
    from tests.conftest import another_session_waits_on_a_lock

    low, high = sorted(_turns(2))
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[low, high], lease_s=60, max_attempts=3)
    errors: list[BaseException] = []

    def hand_back() -> None:
        try:
            with session_scope() as session:
                session.execute(text("SET LOCAL lock_timeout = '20s'"))
                hand_back_after_engine_death(  # fails `high` (its last death), requeues `low`
                    session=session,
                    token=claim.token,
                    turn_ids=[low, high],
                    in_engine=[high],
                    reason="engine died: injected",
                    max_deaths=1,
                )
        except BaseException as exc:  # recorded for the assertion in the test's thread
            errors.append(exc)

    handing = threading.Thread(target=hand_back, daemon=True)
    with session_scope() as holder:  # a writer holding the smaller id (the renewal, a store)
        holder.execute(select(Turn.id).where(Turn.id == low).with_for_update())
        handing.start()
        assert another_session_waits_on_a_lock(held_by=holder)
        assert handing.is_alive()  # waiting for `low`...
        with session_scope() as probe:  # ...holding nothing of its claim yet
            free = probe.execute(select(Turn.id).where(Turn.id == high).with_for_update(skip_locked=True))
            assert free.scalar_one_or_none() == high, "the larger id was locked before the smaller"
    handing.join(30)
    assert not handing.is_alive()
    assert errors == [], f"{[type(e).__name__ for e in errors]}: {errors}"
    assert get_turn(high).error_code == TurnErrorCode.ENGINE_CRASH_LOOP
    assert get_turn(low).status == TurnStatus.QUEUED


def test_a_hand_back_tried_again_after_its_commit_went_through_still_names_every_turn_to_send(world) -> None:
    """Found in review: the hand-back is written again when the connection drops, a COMMIT whose
    reply was lost included; that second try found nothing under the claim, so nothing was sent
    again and the turns waited out the visibility timeout (an hour) unsent."""
    ids = _turns(2)
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)

    def hand_back():  # type: ignore[no-untyped-def]
        with session_scope() as session:
            return hand_back_after_engine_death(
                session=session,
                token=claim.token,
                turn_ids=ids,
                in_engine=ids[:1],
                reason="engine died: injected",
                max_deaths=3,
            )

    assert sorted(hand_back().requeued) == sorted(ids)
    again = hand_back()  # the same write, its first COMMIT's reply lost
    assert sorted(again.requeued) == sorted(ids) and again.crash_looped == []
    with session_scope() as session:  # counted once
        claim = claim_turns(session=session, turn_ids=ids, lease_s=60, max_attempts=3)
    assert {t.id: t.engine_deaths for t in claim.claimed} == {ids[0]: 1, ids[1]: 0}


def test_turns_whose_hand_back_after_a_death_was_not_written_are_sent_again(monkeypatch) -> None:
    """Found in review: the engine died while the database was away for longer than the hand-back's
    retries; the claimed turns stood running under the dead worker's lease with no message for
    them, until a sweep ran, and the ones the batch had only noted failed were announced failed."""
    from types import SimpleNamespace

    from core.settings import settings
    from db.turns import Failure
    from tasks.generate import FlushOutcome, _record
    from worker import pipeline
    from worker.engine import EngineDead

    monkeypatch.setattr(pipeline, "_best_effort_hand_back", lambda turns, write, until: None)
    stored, noted_failed, waiting, adapter_later = (SimpleNamespace(id=uuid.uuid4()) for _ in range(4))
    report = pipeline.BatchReport()
    report.done.append(stored.id)
    report.failed[noted_failed.id] = Failure("not written yet", TurnErrorCode.INVALID_STRUCTURED_REPLY)
    report.retry[adapter_later.id] = "adapter loading"
    report.retry_in[adapter_later.id] = 42.0
    turns = [stored, noted_failed, waiting, adapter_later]
    assert pipeline._hand_back_dead(uuid.uuid4(), turns, EngineDead("gone"), report, until=0.0) == []  # type: ignore[arg-type]
    assert report.send_again == [noted_failed.id, waiting.id, adapter_later.id] and report.failed == {}
    report.engine_dead = EngineDead("gone")
    outcome = FlushOutcome()
    chunk = [(t.id, "live") for t in turns]
    _record(chunk, report, SimpleNamespace(finished=lambda *args: None), outcome)  # type: ignore[arg-type]
    sent = {resend.countdown: [turn_id for turn_id, _ in resend.turns] for resend in outcome.resend}
    assert sent[settings.flush_interval] == [noted_failed.id, waiting.id]
    assert sent[42.0] == [adapter_later.id]  # a retry that waits keeps its wait (review)


def test_a_batch_handed_back_at_a_death_counts_a_death_seen_for_each_request_inside(world) -> None:
    # The pipeline reads who was inside from its requests' futures (a review of the fix above: only
    # the database's function was tried, so a pipeline passing no one would have passed)
    from concurrent.futures import Future

    from worker.engine import EngineDead
    from worker.pipeline import BatchReport, _hand_back_dead

    decoding, joining, waiting = _turns(3)
    with session_scope() as session:
        claim = claim_turns(
            session=session, turn_ids=[decoding, joining, waiting], lease_s=60, max_attempts=3
        )
    died = {
        decoding: EngineDead("died", present=True),
        joining: EngineDead("died", in_engine=True),
        waiting: EngineDead("died"),
    }
    report = BatchReport()
    for turn_id, error in died.items():
        future: Future = Future()
        future.set_exception(error)
        report.futures[turn_id] = [future]
    _hand_back_dead(claim.token, claim.claimed, died[joining], report, until=time.monotonic() + 30)
    with session_scope() as session:
        again = claim_turns(session=session, turn_ids=list(died), lease_s=60, max_attempts=3)
    counts = {t.id: (t.engine_deaths, t.engine_deaths_seen) for t in again.claimed}
    assert counts == {decoding: (0, 1), joining: (1, 0), waiting: (0, 0)}


def test_a_turn_failed_for_crash_looping_is_a_committed_failure_in_the_batchs_count(world) -> None:
    """Review (stop 79): the failure metric counts the failures a batch committed, and the hand-back
    after an engine's death commits those at the death limit without saying so: the worst failures
    (poison turns killing engines) went missing from the failure rate."""
    from types import SimpleNamespace

    from sqlalchemy import update

    from core.settings import settings
    from db.models import Turn
    from worker.engine import EngineDead
    from worker.pipeline import BatchReport, _hand_back_dead

    (poison,) = _turns(1)
    with session_scope() as session:
        session.execute(
            update(Turn).where(Turn.id == poison).values(engine_deaths=settings.max_engine_deaths - 1)
        )
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[poison], lease_s=60, max_attempts=3)
    report = BatchReport(loading=[poison])  # inside the engine (its adapter loading) as it died
    turns = [SimpleNamespace(id=poison)]
    failed = _hand_back_dead(claim.token, turns, EngineDead("died"), report, until=time.monotonic() + 5)  # type: ignore[arg-type]
    assert failed == [poison] and report.failed_written == {poison}
    assert get_turn(poison).error_code == TurnErrorCode.ENGINE_CRASH_LOOP


def test_a_turn_failed_before_the_engine_died_stays_failed_when_the_hand_back_cannot_be_made(
    world, monkeypatch
) -> None:
    """Engine review (stop 79): with the database away at the hand-back, every turn not stored was
    taken for unsettled, one a group had already written failed (its callback and stream end sent)
    too: announced again as retried and sent again for nothing."""
    from types import SimpleNamespace

    from worker import pipeline
    from worker.engine import EngineDead
    from worker.pipeline import BatchReport, _hand_back_dead

    failed, running, lost = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    report = BatchReport(failed_written={failed}, lost=[lost])  # lost: its lease found another's
    report.failed[failed] = pipeline.Failure("empty", TurnErrorCode.EMPTY_REPLY)
    from tests.conftest import patch_on_this_thread

    patch_on_this_thread(
        monkeypatch, pipeline, "_best_effort_hand_back", lambda *args, **kwargs: None
    )  # away
    turns = [SimpleNamespace(id=failed), SimpleNamespace(id=running), SimpleNamespace(id=lost)]
    assert _hand_back_dead(uuid.uuid4(), turns, EngineDead("died"), report, until=time.monotonic()) == []  # type: ignore[arg-type]
    # review: a turn already counted lost was counted unsettled too (twice in mlchat_turns_total)
    assert report.unsettled == [running] and failed in report.failed
