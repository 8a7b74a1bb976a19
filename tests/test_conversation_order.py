"""Order within a conversation, both ways, at the claim: two database sessions, no worker.

An earlier turn whose worker died still holds its conversation back (and is reported stalled, once,
so it is sent again and claimed first); a run's line sent but not yet stamped sent holds it back too;
one whose submission failed before sending it does not hold it back for ever; a turn that waits
backs off, is never failed while the turn it waits for progresses, and fails naming that turn once
it stayed stalled past the limit.
"""

import time
import uuid

import pytest
from sqlalchemy import update

from core.settings import settings
from db.models import Turn, TurnErrorCode, TurnStatus
from db.runs import create_run, fail_submission
from db.session import session_scope
from db.turns import claim_turns
from services.producer import enqueue_turns, get_turn
from tasks.generate import deferral_delay
from tests.conftest import new_conversation, patch_on_this_thread


def _conversation_turns(n: int = 2) -> list[uuid.UUID]:
    conversation = new_conversation()
    return enqueue_turns([conversation | {"message": f"Order check {i}."} for i in range(n)], send=False)


def _run_lines(conversation: dict[str, str], n: int) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A run still submitting (validating) with `n` lines of one conversation, stored and not yet
    stamped sent: what a chunk is between insert_run_turns and _send's mark_dispatched."""
    with session_scope() as session:
        run, _ = create_run(
            session=session,
            name=f"order-{uuid.uuid4().hex[:10]}",
            model=settings.model,
            file_hash="0" * 64,
            total=n,
        )
        run_id = run.id
    ids = enqueue_turns(
        [conversation | {"message": f"Run line {i}."} for i in range(n)],
        send=False,
        lane="bulk",
        run_id=run_id,
    )
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id.in_(ids)).values(dispatched_at=None))
    return run_id, ids


def _claim(ids, *, lease_s: float = 60.0, wait_limit_s: float | None = None):  # type: ignore[no-untyped-def]
    with session_scope() as session:
        return claim_turns(
            session=session, turn_ids=ids, lease_s=lease_s, max_attempts=3, wait_limit_s=wait_limit_s
        )


def test_an_earlier_turn_whose_lease_expired_still_blocks_and_is_claimed_first(world) -> None:
    earlier, later = _conversation_turns()
    assert [t.id for t in _claim([earlier], lease_s=0.2).claimed] == [earlier]
    time.sleep(0.4)  # its worker died: the lease ran out
    claim = _claim([later])
    assert claim.claimed == [] and set(claim.deferred) == {later}
    assert [s.id for s in claim.stalled] == [earlier]  # sent again now, so that a claim takes it first
    assert get_turn(later).status == TurnStatus.QUEUED
    assert [t.id for t in _claim([earlier]).claimed] == [earlier]


def test_run_lines_sent_but_not_yet_stamped_sent_are_answered_in_order(world) -> None:
    # _send puts a chunk's message out before it stamps the chunk sent: a worker can claim the
    # message in between, and lines 1 and 2 of a conversation must not be generated side by side.
    _, (first, second) = _run_lines(new_conversation(), 2)
    claim = _claim([first, second])
    assert [t.id for t in claim.claimed] == [first] and set(claim.deferred) == {second}
    assert get_turn(second).status == TurnStatus.QUEUED


def test_an_earlier_run_line_whose_submission_failed_unsent_does_not_hold_later_turns_back(world) -> None:
    conversation = new_conversation()
    run_id, (earlier,) = _run_lines(conversation, 1)
    (later,) = enqueue_turns([conversation | {"message": "A live line after the run's."}], send=False)
    assert _claim([later]).deferred == {later: 1}  # its submission may still send it
    with session_scope() as session:  # the submission died before sending it, and says so
        assert fail_submission(
            session=session, run_id=run_id, error="submitter killed", error_code="server_error"
        )
    claim = _claim([later])
    assert [t.id for t in claim.claimed] == [later] and not claim.deferred
    assert get_turn(earlier).status == TurnStatus.QUEUED


def test_a_deferred_turn_backs_off_and_fails_once_its_blocker_stalled_past_the_limit(world) -> None:
    conversation = new_conversation()
    _, (earlier,) = _run_lines(conversation, 1)  # its submitter died; nothing has closed the run yet
    (later,) = enqueue_turns([conversation | {"message": "Waiting for the run's line."}], send=False)
    # Limits of seconds, not tenths: a claim held up on a loaded CI machine must not outlive them.
    assert _claim([later], wait_limit_s=2).deferred == {later: 1}
    assert _claim([later], wait_limit_s=2).deferred == {later: 2}
    delays = [deferral_delay(n) for n in (1, 2, 3, 40)]
    assert delays[:3] == [settings.flush_interval, 2 * settings.flush_interval, 4 * settings.flush_interval]
    assert delays[3] == settings.defer_max_delay_s
    time.sleep(2.2)
    claim = _claim([later], wait_limit_s=2)
    assert claim.claimed == [] and not claim.deferred and set(claim.blocked) == {later}
    view = get_turn(later)
    assert view.status == TurnStatus.FAILED
    assert view.error_code == TurnErrorCode.BLOCKED_BY_EARLIER_TURN
    assert str(earlier) in view.error and "never sent" in view.error
    assert get_turn(earlier).status == TurnStatus.QUEUED  # the earlier turn is untouched


def test_the_wait_limit_never_fails_a_turn_whose_earlier_turns_are_progressing(world) -> None:
    t1, t2, t3 = _conversation_turns(3)
    claim = _claim([t1, t2, t3], wait_limit_s=0.5)  # one bulk message: t1 taken, t2 and t3 wait
    assert [t.id for t in claim.claimed] == [t1] and set(claim.deferred) == {t2, t3}
    time.sleep(0.6)  # t1 takes its time under a live lease: progress, not a stall
    assert set(_claim([t2, t3], wait_limit_s=0.5).deferred) == {t2, t3}
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == t1).values(status=TurnStatus.DONE))
    claim = _claim([t2, t3], wait_limit_s=0.5)
    assert [t.id for t in claim.claimed] == [t2] and set(claim.deferred) == {t3}
    # t2 is handed back (queued, its message out) behind a backlog longer than the limit: still progress.
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == t2).values(status=TurnStatus.QUEUED, lease_until=None))
    time.sleep(0.6)
    claim = _claim([t3], wait_limit_s=0.5)
    assert not claim.blocked and set(claim.deferred) == {t3}
    assert get_turn(t3).status == TurnStatus.QUEUED


def test_an_earlier_turn_whose_lease_expired_is_reported_stalled_once(world) -> None:
    t1, t2, t3 = _conversation_turns(3)
    _claim([t1], lease_s=0.2)
    time.sleep(0.4)  # its worker died
    # Two later turns, each looked at twice (two workers, their back-off): one message for t1 in all.
    looks = [_claim([t2]), _claim([t3]), _claim([t2]), _claim([t3])]
    assert [[s.id for s in look.stalled] for look in looks] == [[t1], [], [], []]
    assert all(not look.claimed and not look.blocked for look in looks)
    assert [t.id for t in _claim([t1]).claimed] == [t1]


def test_a_claimed_turn_starts_its_wait_afresh(world) -> None:
    earlier, later = _conversation_turns()
    held = _claim([earlier], lease_s=2)
    assert _claim([later], wait_limit_s=5).deferred == {later: 1}
    time.sleep(2.3)
    # The earlier turn's worker is gone: the later one waits on, and the earlier is claimed first.
    assert [s.id for s in _claim([later], wait_limit_s=30).stalled] == [earlier]
    again = _claim([earlier])
    assert [t.id for t in again.claimed] == [earlier] and again.token != held.token
    with session_scope() as session:
        session.execute(update(Turn).where(Turn.id == earlier).values(status=TurnStatus.DONE))
    claim = _claim([later], wait_limit_s=0.5)
    assert [t.id for t in claim.claimed] == [later]
    with session_scope() as session:
        row = session.get_one(Turn, later)
        assert row.deferrals == 0 and row.deferred_since is None


def test_a_stalled_earlier_turn_is_sent_as_the_claim_commits_not_after_the_batchs_replies(
    world, monkeypatch
) -> None:
    """Found in review: the claim stamps a stalled earlier turn sent, but its message went out only
    once the whole chunk was answered (seconds live, minutes bulk): a worker killed meanwhile left it
    stamped and unsent, its conversation held back for a visibility timeout (an hour). It is sent
    as the claim commits, before the batch's turns are answered."""
    from worker import pipeline

    earlier, later = _conversation_turns()
    _claim([earlier], lease_s=0.2)
    time.sleep(0.4)  # its worker died
    (other,) = _conversation_turns(1)  # another conversation's turn in the same batch, claimed
    happened: list[str] = []

    def answering(*args, **kwargs):  # type: ignore[no-untyped-def]
        happened.append("answering")
        raise RuntimeError("the worker dies here")

    patch_on_this_thread(monkeypatch, pipeline, "_answer", answering)
    sent: list[list[uuid.UUID]] = []
    report = pipeline.BatchReport(
        send_stalled=lambda stalled: (sent.append([s.id for s in stalled]), happened.append("sent"))
    )
    with pytest.raises(RuntimeError, match="the worker dies here"):
        pipeline.process_batch([later, other], report=report)
    assert happened == ["sent", "answering"] and sent == [[earlier]]
    assert report.stalled == []  # sent: the batch's end does not send it again
    # and through a flush's chunk: its report sends them, to their model's queue, as its claim commits
    from tasks import generate

    earlier, later = _conversation_turns()
    _claim([earlier], lease_s=0.2)
    time.sleep(0.4)
    (other,) = _conversation_turns(1)
    happened.clear()

    def resend(item, model, model_of=None):  # type: ignore[no-untyped-def]
        happened.append(f"sent {[t for t, _ in item.turns]} to {item.model}")

    patch_on_this_thread(monkeypatch, generate, "_resend", resend)
    raised = generate._answer_chunk([(later, "live"), (other, "live")])
    assert isinstance(raised, generate.ChunkRaised) and raised.report.stalled == []
    assert happened == [f"sent {[earlier]} to {settings.model}", "answering"]
    assert generate._claimed_sends(raised.report) == []  # not sent a second time at the chunk's end


def test_a_stalled_earlier_turn_is_sent_when_the_claims_commit_reply_is_lost(world, monkeypatch) -> None:
    # The claim stamps the stalled turn sent in its own transaction: if that commit went through but
    # its reply was lost (the connection dropped), nothing else would send the turn for a visibility
    # timeout. The batch's report must hold it whatever the commit's fate.
    from contextlib import contextmanager

    from sqlalchemy.exc import OperationalError

    from worker import pipeline

    earlier, later = _conversation_turns()
    _claim([earlier], lease_s=0.2)
    time.sleep(0.4)  # its worker died

    @contextmanager
    def commit_then_lose_the_reply():  # type: ignore[no-untyped-def]
        with session_scope() as session:
            yield session
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    patch_on_this_thread(monkeypatch, pipeline, "session_scope", commit_then_lose_the_reply)
    report = pipeline.BatchReport()
    try:
        pipeline.process_batch([later], report=report)
    except OperationalError:
        pass
    else:
        raise AssertionError("the lost commit reply did not reach the batch")
    assert [s.id for s in report.stalled] == [earlier]
    assert not _claim([later]).stalled  # the stamp committed: no later look sends it again
