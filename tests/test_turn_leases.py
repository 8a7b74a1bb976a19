"""The turn state machine under races: two database sessions (two "workers") and the real PostgreSQL.

No engine and no worker process: every case here is about who may change a turn, which only the
database decides. Each case failed on the code before leases (claims took running turns whatever
their age, and storing set `done` with no condition).
"""

import threading
import time
import uuid
from dataclasses import replace

from sqlalchemy import func, select, update

from db.models import Message, Role, Turn, TurnErrorCode, TurnStatus
from db.session import session_scope
from db.turns import (
    Failure,
    TurnOutcome,
    claim_turns,
    fail_turns,
    requeue_turns,
    store_replies,
)
from services.producer import enqueue_turns, get_turn
from tests.conftest import new_conversation, patch_on_this_thread
from worker.lease import LeaseKeeper

LEASE = 60.0


def _turns(n: int = 1) -> list[uuid.UUID]:
    return enqueue_turns(
        [new_conversation() | {"message": f"Lease check {i}."} for i in range(n)], send=False
    )


def _claim(ids, *, lease_s: float = LEASE, max_attempts: int = 3):
    with session_scope() as session:
        return claim_turns(session=session, turn_ids=ids, lease_s=lease_s, max_attempts=max_attempts)


def _outcome(turn_id: uuid.UUID, reply: str) -> TurnOutcome:
    view = get_turn(turn_id)
    vec = [0.1] * 384
    return TurnOutcome(
        turn_id=turn_id,
        conversation_id=view.conversation_id,
        user_message=view.message,
        user_embedding=vec,
        reply=reply,
        reply_embedding=vec,
        prompt="p",
        context={},
        usage={},
        timings={},
        params=view.params,
    )


def _store(token, turn_id, reply: str) -> list[uuid.UUID]:
    with session_scope() as session:
        return store_replies(session=session, token=token, outcomes=[_outcome(turn_id, reply)])


def _replies(turn_id) -> list[str]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(Message.content).where(Message.turn_id == turn_id, Message.role == Role.ASSISTANT)
            )
        )


def test_a_duplicate_message_finds_the_turn_held_and_never_claims_it(world) -> None:
    (turn_id,) = _turns()
    first = _claim([turn_id])
    second = _claim([turn_id])  # a redelivery or a sweeper re-send while the first worker generates
    assert [t.id for t in first.claimed] == [turn_id]
    assert second.claimed == [] and not second.exhausted
    assert 0 < second.held[turn_id] <= LEASE
    view = get_turn(turn_id)
    assert view.status == TurnStatus.RUNNING and view.attempts == 1  # no second attempt charged


def test_a_claim_at_the_last_attempt_never_fails_a_turn_another_worker_holds(world) -> None:
    (turn_id,) = _turns()
    holder = _claim([turn_id], max_attempts=1)  # its last attempt, generating now
    duplicate = _claim([turn_id], max_attempts=1)
    assert not duplicate.exhausted and turn_id in duplicate.held
    assert _store(holder.token, turn_id, "Here you are.") == [turn_id]
    view = get_turn(turn_id)
    assert view.status == TurnStatus.DONE and view.reply == "Here you are."


def test_an_expired_lease_moves_the_turn_and_the_old_holder_can_change_nothing(world) -> None:
    (turn_id,) = _turns()
    stale = _claim([turn_id], lease_s=0.2)
    time.sleep(0.4)  # the first worker stalled past its lease
    fresh = _claim([turn_id])
    assert [t.id for t in fresh.claimed] == [turn_id] and fresh.token != stale.token
    # The stalled worker wakes up: it may not fail, requeue or store the turn any more.
    with session_scope() as session:
        assert (
            fail_turns(
                session=session,
                token=stale.token,
                failures={turn_id: Failure("late", TurnErrorCode.ENGINE_ERROR)},
            )
            == []
        )
        assert requeue_turns(session=session, token=stale.token, reasons={turn_id: "late"}) == []
    assert _store(stale.token, turn_id, "The stale reply.") == []
    assert _store(fresh.token, turn_id, "The fresh reply.") == [turn_id]
    view = get_turn(turn_id)
    assert view.status == TurnStatus.DONE and view.reply == "The fresh reply." and view.attempts == 2
    assert _replies(turn_id) == ["The fresh reply."]


def test_a_failed_turn_is_never_flipped_to_done_by_a_late_writer(world) -> None:
    (turn_id,) = _turns()
    stale = _claim([turn_id], lease_s=0.2, max_attempts=2)
    time.sleep(0.4)
    last = _claim([turn_id], max_attempts=2)
    with session_scope() as session:
        fail_turns(
            session=session, token=last.token, failures={turn_id: Failure("bad", TurnErrorCode.ENGINE_ERROR)}
        )
    assert _store(stale.token, turn_id, "Too late.") == []
    view = get_turn(turn_id)
    assert view.status == TurnStatus.FAILED and view.error == "bad" and view.reply is None
    assert _replies(turn_id) == []


def test_two_workers_claiming_the_same_turns_at_once_take_each_exactly_once(world) -> None:
    ids = _turns(40)
    results = {}
    barrier = threading.Barrier(2)

    def claim(name: str) -> None:
        barrier.wait()
        results[name] = _claim(ids)

    threads = [threading.Thread(target=claim, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a = {t.id for t in results["a"].claimed}
    b = {t.id for t in results["b"].claimed}
    print(f"concurrent claims: a took {len(a)}, b took {len(b)}")
    assert a.isdisjoint(b) and a | b == set(ids)
    for name, other in (("a", b), ("b", a)):
        # What the other took is held (or, if it was mid-claim, deferred for another look): never lost.
        assert other <= set(results[name].held) | set(results[name].deferred)


def test_the_lease_keeper_renews_while_the_batch_runs(world) -> None:
    (turn_id,) = _turns()
    # A lease long enough that a renewal thread starved for a moment on a loaded two-core machine
    # (CI runs worker threads in this process) still renews in time: 0.6 s lapsed there once (the
    # claim below found it expired and its row locked by the late renewal: deferred, not held).
    claim = _claim([turn_id], lease_s=1.5)
    with LeaseKeeper(claim.token, lease_s=1.5, max_hold_s=30):
        time.sleep(2.5)  # well past the first lease
        assert turn_id in _claim([turn_id]).held
    time.sleep(1.8)  # renewals stopped with the batch: the lease runs out
    assert [t.id for t in _claim([turn_id]).claimed] == [turn_id]


def test_a_batchs_lease_is_renewed_by_its_turns_ids_not_by_a_look_through_every_unfinished_turn(
    world, monkeypatch
) -> None:
    """Fleet review: the renewal found the claim's turns by its token alone, which no index serves:
    each renewal of each batch read every unfinished turn (a million-line backlog at every third of a
    lease). It names the batch's turns; a turn of the claim not named is not renewed."""
    from db.turns import renew_lease
    from worker import lease as lease_module

    first, second = _turns(2)
    claim = _claim([first, second])
    with session_scope() as session:
        assert renew_lease(session=session, token=claim.token, lease_s=60, turn_ids=[first]) == 1
    named: list[object] = []
    real = lease_module.renew_lease

    def recorded(**kwargs):  # type: ignore[no-untyped-def]
        if kwargs.get("token") == claim.token:  # review: the session worker's keepers renew here too
            named.append(kwargs.get("turn_ids"))
        return real(**kwargs)

    monkeypatch.setattr(lease_module, "renew_lease", recorded)
    keeper = lease_module.LeaseKeeper(claim.token, lease_s=3, max_hold_s=30, turn_ids=[first, second])
    with keeper:  # it renews a third of a lease in (review: a fixed 1.5 s pause, 0.5 s to spare)
        deadline = time.monotonic() + 15
        while not named and time.monotonic() < deadline:
            time.sleep(0.1)
    assert named and all(sorted(ids) == sorted([first, second]) for ids in named)  # type: ignore[arg-type]


def test_a_lease_renewal_that_failed_is_tried_again_soon_not_a_third_of_a_lease_later(
    world, monkeypatch, caplog
) -> None:
    """Found in review (stop 65): after a failed renewal (the database away) the keeper waited a
    third of a lease before the next; a lease that lapsed in a long outage stayed lapsed up to that
    long after the database came back, and a sweep or a later turn's claim took the turns over,
    charging them an attempt (on the last one: failed) and dropping the reply being written."""
    from worker import lease

    tried: list[float] = []
    renewed = threading.Event()

    def renew(session) -> None:  # type: ignore[no-untyped-def]
        tried.append(time.monotonic())
        if len(tried) <= 3:
            raise ConnectionError("injected: the database is away")
        renewed.set()

    monkeypatch.setattr(lease, "AGAIN_AFTER_FAILURE_S", 0.1)
    keeper = LeaseKeeper(uuid.uuid4(), lease_s=6.0, max_hold_s=30, renew=renew)
    with caplog.at_level("WARNING", logger="worker.lease"), keeper:
        assert renewed.wait(10)
    assert tried[3] - tried[0] < 4.0, tried  # 0.3 s; a third of the lease each is 6 s
    failures = [r for r in caplog.records if "could not renew" in r.getMessage()]
    assert len(failures) == 3 and [bool(r.exc_info) for r in failures] == [
        True,
        False,
        False,
    ]  # one traceback


def test_a_refunded_requeue_gives_the_attempt_back(world) -> None:
    (turn_id,) = _turns()
    claim = _claim([turn_id])
    with session_scope() as session:
        # Its send at enqueue stamped it already (found in review: this test asked only for a stamp)
        sent_before = session.scalar(select(Turn.dispatched_at).where(Turn.id == turn_id))
        asked_at = session.scalar(select(func.now()))
    with session_scope() as session:
        assert requeue_turns(
            session=session, token=claim.token, reasons={turn_id: "engine died"}, refund_attempt=True
        ) == [turn_id]
    view = get_turn(turn_id)
    assert view.status == TurnStatus.QUEUED and view.attempts == 0 and view.error == "engine died"
    with session_scope() as session:
        dispatched = session.scalar(select(Turn.dispatched_at).where(Turn.id == turn_id))
    # stamped anew by the database's clock (enqueue stamped it by this process's): the caller sends it now
    assert dispatched != sent_before and dispatched >= asked_at


def test_a_running_turn_from_before_leases_is_claimable(world) -> None:
    (turn_id,) = _turns()
    with session_scope() as session:  # what a row claimed by the previous release looks like
        session.execute(
            update(Turn)
            .where(Turn.id == turn_id)
            .values(status=TurnStatus.RUNNING, attempts=1, lease_until=None)
        )
    assert [t.id for t in _claim([turn_id]).claimed] == [turn_id]


def test_a_failure_or_retry_the_write_did_not_make_is_neither_announced_nor_sent_again(world) -> None:
    """Found in review: a group's write dropped what its fail and requeue changed, so a turn whose
    lease had lapsed and another worker now held was still announced failed, called back and sent
    again from the report (a chain of duplicate messages). The write says what it changed, and the
    report keeps only that."""
    from worker.pipeline import BatchReport, write_group

    failing, retried, ours = _turns(3)
    old = _claim([failing, retried, ours], lease_s=0.2).token
    time.sleep(0.4)  # the lease lapsed: another worker claims two of them
    assert {t.id for t in _claim([failing, retried]).claimed} == {failing, retried}
    failure = Failure("engine error: injected", TurnErrorCode.ENGINE_ERROR)
    report = BatchReport(
        failed={failing: failure, ours: failure}, retry={retried: "empty reply"}, retry_in={retried: 5.0}
    )
    written = write_group(old, [], {failing: failure, ours: failure}, {retried: "empty reply"})
    assert (written.failed, written.requeued) == ([ours], [])
    written.keep_written(report, [failing, ours], [retried])
    assert list(report.failed) == [ours] and report.retry == {} and report.retry_in == {}
    assert sorted(report.lost) == sorted([failing, retried]) and report.send_again == []
    assert get_turn(failing).status == TurnStatus.RUNNING and get_turn(retried).status == TurnStatus.RUNNING


def test_a_claim_that_takes_a_refunded_turn_over_outranks_the_claim_it_replaced(world) -> None:
    """Found in review: a streamed delta's rank (a reader follows the claim of the highest) was the
    turn's attempts, which a refund takes back (an engine death, a lost connection): the claim that
    took the turn over ranked as the one it replaced, and the dead claim's late text won. The rank is
    the turn's claims, which never go back."""
    from worker.pipeline import _request

    (turn_id,) = _turns()
    first = _claim([turn_id])
    with session_scope() as session:
        requeue_turns(
            session=session, token=first.token, reasons={turn_id: "engine died"}, refund_attempt=True
        )
    second = _claim([turn_id])
    (was,), (now,) = first.claimed, second.claimed
    assert was.attempts == now.attempts == 1  # the tie the rank had
    assert now.claims == was.claims + 1

    class Prompt:
        token_ids, stop = [1, 2], ()

    streamed = replace(now, params={**now.params, "stream": True})
    request = _request(streamed, Prompt(), 0, None, second.token)  # type: ignore[arg-type]
    assert request.stream == (turn_id, second.token, now.claims)
    # A turn claimed before the count existed (claims 0): its old claims ranked by attempts (2 here,
    # one since refunded), and the next claim outranks them (review: no backfill under the lock).
    with session_scope() as session:
        requeue_turns(
            session=session, token=second.token, reasons={turn_id: "engine died"}, refund_attempt=True
        )
        session.execute(update(Turn).where(Turn.id == turn_id).values(claims=0, attempts=1))
    (third,) = _claim([turn_id]).claimed
    assert third.claims > 2


def test_a_turn_whose_adapter_cannot_load_for_now_is_handed_back_with_its_attempt(world, monkeypatch) -> None:
    """Found in review (stop 65): a passing adapter outage (`lora register` still copying, a file
    being replaced) charged the turn an attempt at each look, a minute apart: a turn arriving then
    failed `adapter_unavailable` about two minutes later, which the README says costs its wait, not
    its life. Its attempt is handed back as for a database outage, up to MLCHAT_MAX_OUTAGE_REFUNDS
    times; then it is charged."""
    from types import SimpleNamespace

    from core.settings import settings
    from worker import engine as engine_module
    from worker import pipeline
    from worker.engine import Adapter, AdapterUnavailable

    copying = Adapter("copying@v1", 1, "/x")
    patch_on_this_thread(monkeypatch, pipeline, "adapter_of", lambda character, tenant, speaker: character)

    def load(adapter: Adapter) -> None:
        raise AdapterUnavailable("adapter copying@v1 at /x: no adapter_config.json", retry_in=60.0)

    patch_on_this_thread(monkeypatch, engine_module, "load_adapter", load)
    fresh, spent = _turns(2)
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == spent).values(outage_refunds=settings.max_outage_refunds))
    claim = _claim([fresh, spent])
    turns = [
        SimpleNamespace(id=t.id, character=copying, attempts=t.attempts, tenant="", speaker="character")
        for t in claim.claimed
    ]
    report = pipeline.BatchReport()
    pipeline._load_adapters(turns, report)  # type: ignore[arg-type]
    written = pipeline.write_group(claim.token, [], {}, report.retry, refund=report.refund)
    assert sorted(written.requeued) == sorted([fresh, spent])
    with session_scope() as s:
        rows = {
            t.id: (t.status, t.attempts, t.outage_refunds)
            for t in s.scalars(select(Turn).where(Turn.id.in_([fresh, spent])))
        }
    assert rows[fresh] == (TurnStatus.QUEUED, 0, 1)  # its attempt handed back
    assert rows[spent][:2] == (TurnStatus.QUEUED, 1)  # no refunds left: charged
