"""Turns whose message was lost are found and sent again, once, and never while messages wait.

A running turn whose lease expired is sent again once, however many sweeps follow.
"""

import time
import uuid
from collections.abc import Callable

from sqlalchemy import func, text

from core.settings import queue_for_model, settings
from services.producer import enqueue_turns
from services.sweeper import resend_stranded
from tasks.app import app
from tasks.queues import queue_depth
from tests.conftest import new_conversation

MODEL = "sweep-check"  # a queue no worker consumes, so the re-sent messages stay where they can be counted


def test_stranded_turns_are_sent_again_only_when_their_queue_is_empty(world, monkeypatch) -> None:
    monkeypatch.setattr(settings, "served_models", [settings.model, MODEL])
    # Committed but never sent: what a Redis crash before its append-only fsync leaves behind.
    ids = enqueue_turns(
        [new_conversation() | {"message": f"Lost line {i}.", "model": MODEL} for i in range(5)], send=False
    )
    try:
        assert resend_stranded(older_than_s=3600, models=[MODEL]) == {}  # too recent: may still be in flight
        time.sleep(1.1)
        assert resend_stranded(older_than_s=1, models=[MODEL]) == {f"{MODEL}/live": len(ids)}
        assert queue_depth(MODEL, "live") == len(ids)  # one message per live turn
        # Messages are waiting now, so a second sweep sends nothing more.
        assert resend_stranded(older_than_s=1, models=[MODEL]) == {}
        assert queue_depth(MODEL, "live") == len(ids)
    finally:
        _leave_nothing(ids)


def test_turns_a_worker_holds_or_was_just_sent_are_not_swept(world, monkeypatch) -> None:
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from db.turns import claim_turns, mark_dispatched

    monkeypatch.setattr(settings, "served_models", [settings.model, MODEL])
    requeued, held = enqueue_turns(
        [new_conversation() | {"message": f"Held line {i}.", "model": MODEL} for i in range(2)], send=False
    )
    with session_scope() as s:  # both were created (and first sent) an hour ago
        s.execute(
            update(Turn)
            .where(Turn.id.in_([requeued, held]))
            .values(
                created_at=func.now() - text("interval '1 hour'"),
                dispatched_at=func.now() - text("interval '1 hour'"),
            )
        )
    try:
        with session_scope() as s:
            mark_dispatched(session=s, turn_ids=[requeued])  # a worker just sent it again (a deferral)
            claim_turns(session=s, turn_ids=[held], lease_s=600, max_attempts=3)  # a worker is answering it
            s.execute(
                update(Turn).where(Turn.id == held).values(started_at=func.now() - text("interval '1 hour'"))
            )
        assert resend_stranded(older_than_s=60, models=[MODEL]) == {}
        with session_scope() as s:
            assert s.get(Turn, held).status == TurnStatus.RUNNING
    finally:
        _leave_nothing([requeued, held])


def test_a_running_turn_is_sent_again_once_its_lease_expires_not_after_the_visibility_timeout(
    world, monkeypatch
) -> None:

    from db.session import session_scope
    from db.turns import claim_turns

    monkeypatch.setattr(settings, "served_models", [settings.model, MODEL])
    (turn_id,) = enqueue_turns(
        [new_conversation() | {"message": "Crashed line.", "model": MODEL}], send=False
    )
    with session_scope() as s:
        claim_turns(session=s, turn_ids=[turn_id], lease_s=0.2, max_attempts=3)
    try:
        time.sleep(0.4)  # its worker died: nobody renews the lease
        # The default age (an hour) is for queued turns; an expired lease is enough for a running one.
        assert resend_stranded(models=[MODEL]) == {f"{MODEL}/live": 1}
        assert queue_depth(MODEL, "live") == 1
        # The re-send is recorded: the next sweeps leave it to that message, as for a queued turn.
        assert resend_stranded(models=[MODEL]) == {}
        assert resend_stranded(models=[MODEL]) == {}
        assert queue_depth(MODEL, "live") == 1
    finally:
        _leave_nothing([turn_id])


def _leave_nothing(ids: list[uuid.UUID]) -> None:
    """No worker serves MODEL: its turns are cancelled and its queue emptied, leaving nothing for a
    later test's sweep (review: two tests left theirs queued for the rest of the session)."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope

    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id.in_(ids)).values(status=TurnStatus.CANCELLED))
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue_for_model(MODEL, "live"))


def _lost_behind_a_backlog(
    model: str, run_id: uuid.UUID, n: int, between: Callable[[], object] = lambda: None
) -> list[uuid.UUID]:
    """n bulk turns whose message was lost two hours ago, then (after `between`) a backlog of n more
    sent ten minutes ago in one message still in the queue; the lost turns' ids."""
    from sqlalchemy import update

    from db.models import Turn
    from db.session import session_scope

    def lines(tag: str) -> list[dict[str, str]]:
        return [new_conversation() | {"message": f"{tag} {i}.", "model": model} for i in range(n)]

    lost = enqueue_turns(lines("Lost"), send=False, lane="bulk", run_id=run_id)
    between()
    waiting = enqueue_turns(lines("Waiting"), lane="bulk", run_id=run_id)  # the backlog: one message
    with session_scope() as s:
        for ids, age in ((lost, "2 hours"), (waiting, "10 minutes")):
            s.execute(
                update(Turn)
                .where(Turn.id.in_(ids))
                .values(dispatched_at=func.now() - text(f"interval '{age}'"))
            )
    return lost


def test_lost_bulk_turns_are_sent_again_behind_a_queued_bulk_backlog(world, monkeypatch) -> None:
    model, run_id = _model_and_run(monkeypatch)
    lost = _lost_behind_a_backlog(model, run_id, 3)
    try:
        assert queue_depth(model, "bulk") == 1
        # Both are older than the sweep's age; only the lost ones went out before the backlog's message.
        assert resend_stranded(older_than_s=60, models=[model]) == {f"{model}/bulk": len(lost)}
        assert queue_depth(model, "bulk") == 2
        # They are stamped sent now, behind the backlog: the next sweep sends nothing.
        assert resend_stranded(older_than_s=60, models=[model]) == {}
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "bulk"))


def test_lost_bulk_turns_are_found_behind_a_memory_job_at_the_head_of_the_bulk_queue(
    world, monkeypatch
) -> None:
    """Found in review: the sweep read only the oldest bulk message's turns; a memory job there (the
    bulk lane carries them, and they name no turns) made it take no queued bulk turn for lost."""

    from tasks.memory import memory_job

    model, run_id = _model_and_run(monkeypatch)

    def a_memory_job() -> None:
        memory_job.apply_async(
            kwargs={"conversation_id": 1, "kind": "summary"}, queue=queue_for_model(model, "bulk")
        )

    lost = _lost_behind_a_backlog(model, run_id, 2, between=a_memory_job)
    try:
        assert queue_depth(model, "bulk") == 2
        assert resend_stranded(older_than_s=60, models=[model]) == {f"{model}/bulk": len(lost)}
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "bulk"))


def _model_and_run(monkeypatch):  # type: ignore[no-untyped-def]
    """A served model of the case's own (no earlier case's lost turns share its queues) and a run."""
    from db.runs import create_run
    from db.session import session_scope

    model = f"sweep-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    with session_scope() as s:
        run, _ = create_run(
            session=s, name=f"sweep-{time.time_ns()}", model=model, file_hash="0" * 64, total=5
        )
        return model, run.id


def test_a_bulk_backlog_never_hides_a_lost_live_turn_and_one_queues_failure_spares_the_others(
    world, monkeypatch
) -> None:
    from sqlalchemy import update

    import services.sweeper as sweeper
    from db.models import Turn
    from db.session import session_scope

    model, run_id = _model_and_run(monkeypatch)
    # A run's backlog, still waiting in its queue, sent long ago (older turns: first by number)...
    backlog = enqueue_turns(
        [new_conversation() | {"message": f"Backlog {i}.", "model": model} for i in range(4)],
        lane="bulk",
        run_id=run_id,
    )
    # ...then a live turn whose message was lost.
    (lost,) = enqueue_turns([new_conversation() | {"message": "Lost live line.", "model": model}], send=False)
    with session_scope() as s:
        s.execute(
            update(Turn)
            .where(Turn.id.in_([*backlog, lost]))
            .values(dispatched_at=func.now() - text("interval '2 hours'"))
        )
    real_dispatch = sweeper.dispatch

    def broker_refuses_bulk(ids, *, model, lane="live", **kwargs):  # type: ignore[no-untyped-def]
        if lane == "bulk":
            raise ConnectionError("injected: the bulk queue's publish fails")
        return real_dispatch(ids, model=model, lane=lane, **kwargs)

    try:
        # The limit was shared by every queue: the backlog's four filled it, and the lost live turn
        # was never read.
        assert sweeper.resend_stranded(older_than_s=60, models=[model], limit=4) == {f"{model}/live": 1}
        assert queue_depth(model, "live") == 1
        # A queue whose re-send fails (the backlog's messages lost too, and its publish failing) no
        # longer stops the sweep of the others; the sweep says it is incomplete.
        with app.connection_for_write() as conn:  # both lost again
            for lane in ("live", "bulk"):
                conn.default_channel.queue_purge(queue_for_model(model, lane))
        with session_scope() as s:
            s.execute(
                update(Turn)
                .where(Turn.id == lost)
                .values(dispatched_at=func.now() - text("interval '2 hours'"))
            )
        monkeypatch.setattr(sweeper, "dispatch", broker_refuses_bulk)
        try:
            sweeper.resend_stranded(older_than_s=60, models=[model])
            raise AssertionError("a failed queue went unreported")
        except sweeper.SweepIncomplete as exc:
            assert exc.sent == {f"{model}/live": 1} and f"{model}/bulk" in str(exc)
    finally:
        with app.connection_for_write() as conn:
            for lane in ("live", "bulk"):
                conn.default_channel.queue_purge(queue_for_model(model, lane))


def test_a_lost_bulk_turn_is_found_behind_a_backlog_of_its_own_lane_larger_than_the_limit(
    world, monkeypatch
) -> None:
    from sqlalchemy import update

    from db.models import Turn
    from db.session import session_scope

    model, run_id = _model_and_run(monkeypatch)

    def lines(tag: str, n: int) -> list[dict[str, str]]:
        return [new_conversation() | {"message": f"{tag} {i}.", "model": model} for i in range(n)]

    backlog = enqueue_turns(lines("Waiting", 4), lane="bulk", run_id=run_id)  # one message, waiting
    lost = enqueue_turns(lines("Lost", 1), send=False, lane="bulk", run_id=run_id)  # made after it
    with session_scope() as s:  # the backlog went out ten minutes ago; the lost turn's re-send failed
        for ids, age in ((backlog, "10 minutes"), (lost, "2 hours")):
            s.execute(
                update(Turn)
                .where(Turn.id.in_(ids))
                .values(dispatched_at=func.now() - text(f"interval '{age}'"))
            )
    try:
        # The backlog's four came first by number and filled the limit; then all four were left out
        # as waiting, and the lost turn was never read.
        assert resend_stranded(older_than_s=60, models=[model], limit=4) == {f"{model}/bulk": 1}
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "bulk"))


def test_a_queued_turn_whose_message_was_lost_is_sent_again_a_lease_later_not_an_hour(
    world, monkeypatch
) -> None:
    """Found in review (Redis as a store): a turn whose message Redis lost (a failover's asynchronous
    replica dropped the last writes, an eviction, a flush) stayed queued until the sweeper's cutoff,
    the visibility timeout (an hour), and every later turn of its conversation waited behind it. A
    queued turn of a queue with nothing waiting, sent more than a lease ago and held by no worker
    (kombu's unacked hash: prefetched, batched, or due later), is sent again at the next sweep."""
    import json

    from sqlalchemy import select, update

    from db.models import Turn
    from db.session import session_scope

    monkeypatch.setattr(settings, "served_models", [settings.model, MODEL])
    (lost,) = enqueue_turns(
        [new_conversation() | {"message": "Lost in a failover.", "model": MODEL}], send=False
    )
    # Review: a message held by a worker that died (SIGKILL, its node lost) stays in kombu's unacked
    # hash until the visibility timeout: its turn counted as held for that hour. Held for a lease and
    # the slack after its delivery (or its countdown's end), no longer.
    from datetime import UTC, datetime, timedelta

    names = ("Prefetched.", "Its worker died holding it.", "Due later.", "Untimed.")
    taken = [enqueue_turns([new_conversation() | {"message": m, "model": MODEL}])[0] for m in names]  # sent
    held, orphaned, due, untimed = taken
    queue = queue_for_model(MODEL, "live")
    now = time.time()
    delivered = {held: now - 5, orphaned: now - 600, due: now - 600, untimed: None}
    tags = [f"sweep-check-{i}" for i in range(len(taken))]
    with app.connection_for_write() as conn:  # workers took the messages: the list to unacked
        channel = conn.default_channel
        for tag in tags:
            raw = channel.client.rpop(queue)
            assert raw is not None
            message = json.loads(raw)
            (turn_id,) = _ids_of(message)
            if turn_id == due:  # a countdown's message: held until its end
                eta = datetime.now(UTC) + timedelta(minutes=5)
                message["headers"]["eta"] = eta.isoformat()
            channel.client.hset(channel.unacked_key, tag, json.dumps([message, "", queue]))
            if delivered[turn_id] is not None:
                channel.client.zadd(channel.unacked_index_key, {tag: delivered[turn_id]})
        unacked_key, index_key = channel.unacked_key, channel.unacked_index_key
    with session_scope() as s:  # they went out four minutes ago
        s.execute(
            update(Turn)
            .where(Turn.id.in_([lost, *taken]))
            .values(dispatched_at=func.now() - text("interval '4 minutes'"))
        )
    try:
        assert queue_depth(MODEL, "live") == 0
        assert resend_stranded(models=[MODEL]) == {f"{MODEL}/live": 2}  # the default cutoff: an hour
        with session_scope() as s:
            recent = set(
                s.scalars(
                    select(Turn.id).where(
                        Turn.id.in_([lost, *taken]),
                        Turn.dispatched_at > func.now() - text("interval '1 minute'"),
                    )
                )
            )
        assert recent == {lost, orphaned}  # the others were left to their workers
        assert queue_depth(MODEL, "live") == 2
        assert resend_stranded(models=[MODEL]) == {}  # their messages wait now
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.client.hdel(unacked_key, *tags)
            conn.default_channel.client.zrem(index_key, *tags)
        _leave_nothing([lost, *taken])


def _ids_of(message):  # type: ignore[no-untyped-def]
    from tasks.queues import _message_turn_ids

    return _message_turn_ids(message)


def test_a_broker_that_may_evict_queued_messages_is_named_at_worker_start(world) -> None:
    """Found in review (Redis as a store): nothing read the broker's maxmemory-policy; under allkeys-*
    (the default of some managed Redis services) a full Redis drops a whole lane queue or kombu's
    unacked hash, silently. A worker says so in one line at start (python -m worker)."""
    from tasks.queues import eviction_risk

    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        before = client.config_get("maxmemory-policy")["maxmemory-policy"]
        try:
            assert eviction_risk() is None  # the embedded Redis: noeviction
            client.config_set("maxmemory-policy", "allkeys-lru")
            risk = eviction_risk()
            assert risk is not None and "maxmemory-policy allkeys-lru" in risk and "noeviction" in risk
            client.config_set("maxmemory-policy", "volatile-lru")  # evicts keys with a TTL only
            assert eviction_risk() is None
        finally:
            client.config_set("maxmemory-policy", before)


def test_a_lost_player_turn_is_sent_again_behind_a_bulk_backlog(world, monkeypatch) -> None:
    """Review of the quick re-send: a guard that took a turn of no run for lost only if it went out
    before a bulk backlog's oldest message (in case the Python API had sent it on the bulk lane) hid
    every lost player turn while a batch drained. Turns record no lane: the player's turn goes."""
    from sqlalchemy import select, update

    from db.models import Turn
    from db.session import session_scope

    model = "sweep-lanes"
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    (lost,) = enqueue_turns(
        [new_conversation() | {"message": "Lost in a failover.", "model": model}], send=False
    )
    (backlog,) = enqueue_turns(
        [new_conversation() | {"message": "A batch's line, waiting.", "model": model}], lane="bulk"
    )
    with session_scope() as s:
        for turn_id, minutes in ((lost, 5), (backlog, 30)):  # the backlog's oldest went out long before
            s.execute(
                update(Turn)
                .where(Turn.id == turn_id)
                .values(dispatched_at=func.now() - func.make_interval(0, 0, 0, 0, 0, minutes))
            )
    try:
        assert queue_depth(model, "live") == 0 and queue_depth(model, "bulk") == 1
        # the player's turn, not waited out; and the backlog's turn of no run, sent on the live lane
        # too (the README's caveat: answered once, from whichever copy a worker takes first)
        assert resend_stranded(models=[model]) == {f"{model}/live": 2}
        assert queue_depth(model, "live") == 2 and queue_depth(model, "bulk") == 1
        with session_scope() as s:
            recent = func.now() - func.make_interval(0, 0, 0, 0, 0, 1)
            resent = s.scalars(
                select(Turn.id).where(Turn.id.in_([lost, backlog]), Turn.dispatched_at > recent)
            )
            assert set(resent) == {lost, backlog}
    finally:
        with app.connection_for_write() as conn:
            for lane in ("live", "bulk"):
                conn.default_channel.queue_purge(queue_for_model(model, lane))


def test_a_sweeps_stamp_of_more_turns_than_a_statement_has_parameters_records_them_sent(world) -> None:
    """Found in review: a sweep re-sends up to 100,000 turns of a queue and then stamps them sent in
    one statement, a parameter per id; past 65,535 the stamp raised after the messages went, and every
    later sweep found them lost again and sent them once more."""
    from sqlalchemy import select

    from db.models import Turn
    from db.session import session_scope
    from db.turns import mark_dispatched
    from services.producer import submit_turns

    stored = submit_turns([new_conversation() | {"message": f"Lost {i}."} for i in range(3)], send=False)
    ids = [t.id for t in stored] + [uuid.uuid4() for _ in range(70_000)]  # the rest finished or gone
    with session_scope() as s:
        assert mark_dispatched(session=s, turn_ids=ids) == 3
    with session_scope() as s:
        sent = s.scalars(select(Turn.dispatched_at).where(Turn.id.in_([t.id for t in stored]))).all()
    assert all(at is not None for at in sent)


def test_two_sweeps_at_once_send_each_stranded_turn_once(world, monkeypatch, capsys) -> None:
    """Found in review: the re-send took no lock, so a second sweep (cron beside compose's loop, an
    operator's `mlchat sweep`) reading the queues and the turns while the first was sending found the
    same turns stranded and sent each twice. The second now leaves them to the first."""
    import threading

    from services import sweeper

    monkeypatch.setattr(settings, "served_models", [settings.model, MODEL])
    ids = enqueue_turns(
        [new_conversation() | {"message": f"Lost line {i}.", "model": MODEL} for i in range(3)], send=False
    )
    time.sleep(1.1)
    sending, go = threading.Event(), threading.Event()
    real = sweeper.dispatch

    def slow(turn_ids, **kw):  # type: ignore[no-untyped-def]
        sending.set()
        go.wait(5)
        real(turn_ids, **kw)

    monkeypatch.setattr(sweeper, "dispatch", slow)
    first: list[dict[str, int] | None] = []
    thread = threading.Thread(target=lambda: first.append(resend_stranded(older_than_s=1, models=[MODEL])))
    try:
        thread.start()
        assert sending.wait(10)
        second = resend_stranded(older_than_s=1, models=[MODEL])
        from scripts.cli import main as cli

        capsys.readouterr()
        cli(["sweep", "--older-than", "1"])  # says it left them to the other, not "nothing stranded"
        assert "skipped: another sweep is re-sending stranded turns" in capsys.readouterr().out
        go.set()
        thread.join(30)
        assert second is None and len(first) == 1  # earlier cases' lost turns of MODEL are sent too
        assert first[0] is not None
        sent = first[0][f"{MODEL}/live"]
        assert sent >= len(ids) and queue_depth(MODEL, "live") == sent  # each once
    finally:
        go.set()
        _leave_nothing(ids)


def test_a_lost_message_is_found_past_65535_held_ids_and_for_a_lapsed_turn_sent_again(
    world, monkeypatch
) -> None:
    """Review: the quick path for a lost message (its queue empty, no worker holding it) bound one
    parameter per held message, and a bulk run's deferred lines held by workers took it past the
    protocol's 65,535: every sweep failed and nothing lost was sent again. And it took queued turns
    alone: a running turn whose lease lapsed, sent again since and that message lost, waited for
    the hour's cutoff while its conversation stalled behind it."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from services.sweeper import find_stranded

    model = f"sweep-held-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    queued, lapsed, held = enqueue_turns(
        [new_conversation() | {"message": f"Lost line {i}.", "model": model} for i in range(3)], send=False
    )
    went_out = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.lease_seconds + 120)
    lapsed_at = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.lease_seconds + 300)
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id.in_([queued, lapsed, held])).values(dispatched_at=went_out))
        s.execute(
            update(Turn)
            .where(Turn.id == lapsed)
            .values(status=TurnStatus.RUNNING, started_at=lapsed_at, lease_until=lapsed_at)
        )  # its lease lapsed, then it was sent again (went_out): not "lapsed and unsent"
    others = {uuid.uuid4() for _ in range(70_000)}  # messages held for other turns
    try:
        found = find_stranded(
            older_than_s=3600, models=[model], limit=10, held=(others | {held}, {(model, "live")})
        )
        assert {t.id for t in found[(model, "live")]} == {queued, lapsed}  # the held one is a worker's
    finally:  # no worker serves the model: nothing left for a later test's sweep
        with session_scope() as s:
            s.execute(
                update(Turn).where(Turn.id.in_([queued, lapsed, held])).values(status=TurnStatus.CANCELLED)
            )


def test_a_lost_message_behind_a_queue_never_empty_is_found_a_lease_later_not_an_hour(
    world, monkeypatch
) -> None:
    """Review (Redis losing state): a failover that dropped a player's turn's message, under a fleet
    whose live queue always held a few messages, left it for the hour's cutoff (the unacked hash was
    read for empty queues only), its conversation's later turns deferred behind it meanwhile. Sent
    before the oldest message waiting and held by no worker, its message is lost."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from services.sweeper import find_stranded

    model = f"sweep-behind-{uuid.uuid4().hex[:6]}"
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    lost, held, in_queue = enqueue_turns(
        [new_conversation() | {"message": f"Line {i}.", "model": model} for i in range(3)], send=False
    )
    long_ago = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, settings.lease_seconds + 600)
    oldest_waiting = datetime.now(UTC) - timedelta(seconds=300)
    try:
        with session_scope() as s:
            s.execute(update(Turn).where(Turn.id.in_([lost, held])).values(dispatched_at=long_ago))
            s.execute(update(Turn).where(Turn.id == in_queue).values(dispatched_at=func.now()))
        found = find_stranded(
            older_than_s=3600,
            models=[model],
            limit=10,
            waiting={(model, "live"): oldest_waiting},
            held=({held}, set()),  # nothing empty: the queue holds messages
        )
        assert {t.id for t in found[(model, "live")]} == {lost}  # the held one is a worker's, one waits
    finally:  # no worker serves the model: nothing left for a later test's sweep
        with session_scope() as s:
            s.execute(
                update(Turn).where(Turn.id.in_([lost, held, in_queue])).values(status=TurnStatus.CANCELLED)
            )


def test_a_live_turn_of_a_model_no_worker_serves_fails_once_it_went_unserved_long_enough(
    celery_worker, monkeypatch
) -> None:
    """Found in review: a live turn of a served model whose workers were never started (or were all
    stopped) waited queued for ever, without a word, and its conversation's later turns behind it.
    The sweep asks the workers which queues they consume and marks when it first found a model with
    live turns waiting unserved; past the setting, its live turns queued that long fail
    (model_unavailable); a served model's, and a younger turn, are left; a model served again, or
    with nothing waiting, loses its mark (review: a mark left from an old outage failed turns at
    once)."""
    from sqlalchemy import update

    from db.models import Turn, TurnStatus
    from db.session import session_scope
    from services.producer import cancel_turn, get_turn
    from services.sweeper import fail_unserved_live_turns
    from tasks.presence import UNSERVED_SINCE, served_models, unserved_for

    unserved = f"unserved-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(settings, "served_models", [settings.model, unserved])  # taken at the enqueue
    monkeypatch.setattr(settings, "unserved_model_fail_s", 300.0)
    lost, young, kept, revived = enqueue_turns(
        [
            new_conversation() | {"message": "Anyone serving?", "model": unserved},
            new_conversation() | {"message": "Just asked.", "model": unserved},
            new_conversation() | {"message": "Served, only unsent."},  # the session worker's model
            new_conversation() | {"message": "Sent again just now.", "model": unserved},
        ],
        send=False,
    )
    an_hour_ago = func.now() - text("interval '1 hour'")
    with session_scope() as s:  # queued an hour
        s.execute(
            update(Turn)
            .where(Turn.id.in_([lost, kept]))
            .values(created_at=an_hour_ago, queued_at=an_hour_ago)
        )
        # review: made an hour ago, put in line again a moment ago (a keyed retry of a turn failed
        # unsent): its wait counts from then, not from its insert
        s.execute(update(Turn).where(Turn.id == revived).values(created_at=an_hour_ago))

    def mark() -> bytes | None:
        with app.connection_for_write() as conn:
            return conn.default_channel.client.hget(UNSERVED_SINCE, unserved)  # type: ignore[no-any-return]

    # the session's worker answered (within the sweep's second: one busy with a flush may miss one ask)
    deadline = time.monotonic() + 20
    while settings.model not in (served_models() or set()):
        assert time.monotonic() < deadline, "the session's worker never said which queues it consumes"
    try:
        assert unserved not in fail_unserved_live_turns()  # found unserved just now: not yet
        assert get_turn(lost).status == TurnStatus.QUEUED and mark() is not None
        assert unserved_for([unserved], [unserved], renewed_within_s=300) == {} and mark() is None  # served
        fail_unserved_live_turns()

        def marked(since_s: int, renewed_s: int) -> None:  # as the sweeps would have left it
            now = int(time.time())
            with app.connection_for_write() as conn:
                conn.default_channel.client.hset(
                    UNSERVED_SINCE, unserved, f"{now - since_s},{now - renewed_s}"
                )

        marked(3600, 3000)  # an hour, but no sweep renewed it for 50 minutes: the count starts afresh
        assert unserved not in fail_unserved_live_turns() and get_turn(lost).status == TurnStatus.QUEUED
        # every sweep for an hour found it unserved, ten minutes apart: further apart than the
        # setting, within a sweep's usual gap (review: a count tied to the setting never failed)
        marked(3600, 600)
        assert fail_unserved_live_turns()[unserved] == 1
        failed = get_turn(lost)
        assert failed.status == TurnStatus.FAILED and failed.error_code == "model_unavailable"
        assert unserved in (failed.error or "") and "MLCHAT_UNSERVED_MODEL_FAIL_S" in (failed.error or "")
        assert get_turn(young).status == TurnStatus.QUEUED  # queued less than the setting
        assert get_turn(revived).status == TurnStatus.QUEUED  # in line again for less than it
        cancel_turn(revived)
        assert get_turn(kept).status == TurnStatus.QUEUED  # its model is served
        # 0: never, though a turn has waited past any limit on a model long marked (review: checked
        # once nothing was left to fail, it could not fail)
        with session_scope() as s:
            s.execute(
                update(Turn).where(Turn.id == young).values(created_at=an_hour_ago, queued_at=an_hour_ago)
            )
        marked(3600, 600)
        monkeypatch.setattr(settings, "unserved_model_fail_s", 0.0)
        assert fail_unserved_live_turns() == {} and get_turn(young).status == TurnStatus.QUEUED
        cancel_turn(young)
        assert unserved_for([], [], renewed_within_s=300) == {} and mark() is None  # nothing waits: no mark
    finally:
        cancel_turn(kept)
        with app.connection_for_write() as conn:
            conn.default_channel.client.hdel(UNSERVED_SINCE, unserved)


def test_the_unserved_marks_carry_no_ttl_that_an_eviction_policy_could_take(world) -> None:
    """Review (Redis losing state): the marks' hash carried a TTL, so a full Redis under a volatile-*
    policy (the README's advice) could evict it, and each eviction restarted a model's count: the
    turns of a model never served again were never failed."""
    from tasks.app import app
    from tasks.presence import UNSERVED_SINCE, unserved_for

    model = f"unserved-ttl-{uuid.uuid4().hex[:6]}"
    assert unserved_for({model}, set(), renewed_within_s=900) == {model: 0.0}
    with app.connection_for_write() as conn:
        client = conn.default_channel.client
        try:
            assert client.ttl(UNSERVED_SINCE) == -1  # a key with no expiry
        finally:
            client.hdel(UNSERVED_SINCE, model)
