"""End to end through the queue: producer → Redis → batched Celery worker (thread pool) → PostgreSQL."""

import time
import uuid

import numpy as np
from sqlalchemy import select

from core.settings import settings
from db.models import Message, TurnStatus
from db.session import session_scope
from services.producer import enqueue_turns, wait_for_reply
from tests.conftest import new_conversation, off_the_worker


def test_turns_go_through_the_queue_in_batches(celery_worker) -> None:
    convs = [new_conversation(c) for c in ("elara", "luffy", "haneul", "elara", "luffy", "haneul")]
    # Bulk turns travel batch_size to a message, so one message holds all six whatever the machine's
    # load; live turns are one to a message and share a flush only when they arrive within its interval.
    requests = [c | {"message": f"Hello, friend number {i}!"} for i, c in enumerate(convs)]
    ids = enqueue_turns(requests, lane="bulk")
    views = [wait_for_reply(i, timeout=240) for i in ids]
    assert [v.status for v in views] == [TurnStatus.DONE] * len(ids), [v.error for v in views]
    assert all(v.reply and v.usage["completion_tokens"] > 0 for v in views)
    # One batch took them all (a turn an earlier case left queued in the lane may have joined it).
    sizes = {v.timings["batch_size"] for v in views}
    assert len(sizes) == 1 and sizes.pop() >= len(ids), [v.timings["batch_size"] for v in views]
    assert all(v.attempts == 1 for v in views)
    with session_scope() as s:
        stored = s.scalars(select(Message).where(Message.turn_id.in_(ids))).all()
    assert len(stored) == 2 * len(ids)  # the player's line and the reply, once each
    assert all(np.asarray(m.embedding).shape == (384,) and np.any(np.asarray(m.embedding)) for m in stored)


def test_a_conversations_turns_are_answered_in_order(celery_worker) -> None:
    conv = new_conversation("elara") | {"player_name": "Rowan"}
    first, second = enqueue_turns(
        [
            conv | {"message": "I left my lantern by the fire."},
            conv | {"message": "Did you see where I left it?"},
        ]
    )
    a = wait_for_reply(first, timeout=240)
    b = wait_for_reply(second, timeout=240)
    assert a.status == b.status == TurnStatus.DONE
    # The second turn waited for the first, so the first exchange is in its prompt.
    assert a.message in b.prompt and a.reply in b.prompt
    assert b.created_at >= a.created_at and b.finished_at > a.finished_at


def test_a_batch_that_raises_hands_its_turns_back(celery_worker, monkeypatch) -> None:
    import worker.pipeline
    from core.settings import settings
    from tasks.generate import dispatch

    real = worker.pipeline.process_batch
    calls = []
    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Still there?"}], send=False)

    def fails_once(turn_ids, **kwargs):
        if str(turn_id) in map(str, turn_ids):  # not a batch of another test's turns meanwhile
            calls.append(list(turn_ids))
            if len(calls) == 1:
                raise ConnectionError("injected: database went away mid-batch")
        return real(turn_ids, **kwargs)

    monkeypatch.setattr(worker.pipeline, "process_batch", fails_once)
    dispatch([turn_id], model=settings.model, lane="live")
    view = wait_for_reply(turn_id, timeout=120)
    assert view.status == TurnStatus.DONE and view.reply
    assert len(calls) >= 2  # raised once, then answered


def test_a_turn_that_breaks_its_batch_fails_alone_and_its_batch_mates_are_answered(
    celery_worker, monkeypatch
) -> None:
    # Found in review: the turns of a batch that raised were sent back as one bundle, so a turn whose
    # data broke a batch-level stage took its batch-mates to their attempt cap with it.
    import worker.pipeline
    from tasks.generate import dispatch

    real = worker.pipeline.embed
    poison = "A line the embedding stage breaks on, every time."

    def embed(texts):
        if poison in texts:
            raise RuntimeError("injected: a batch-level stage that breaks on this turn's data")
        return real(texts)

    monkeypatch.setattr(worker.pipeline, "embed", embed)
    monkeypatch.setattr(settings, "batch_retry_delay", 0.5)
    lines = ["Good morning!", poison, "Any news from the harbour?"]
    ids = enqueue_turns([new_conversation() | {"message": line} for line in lines], send=False)
    dispatch(ids, model=settings.model, lane="bulk")  # one message, so one batch holds all three
    views = [wait_for_reply(i, timeout=180) for i in ids]
    assert [v.status for v in views] == [TurnStatus.DONE, TurnStatus.FAILED, TurnStatus.DONE], [
        v.error for v in views
    ]
    assert views[1].error_code == "attempts_exhausted" and views[1].attempts == settings.max_attempts
    assert views[0].attempts == views[2].attempts == 2  # the batch that raised, then their own


def test_a_malformed_message_is_dropped_alone_and_its_flush_mates_are_answered(celery_worker) -> None:
    from core.settings import queue_for_model, settings
    from tasks.app import app
    from tasks.generate import generate_turns

    (good,) = enqueue_turns([new_conversation() | {"message": "Is the ferry running?"}], send=False)
    queue = queue_for_model(settings.model, "live")
    with app.producer_or_acquire() as producer:  # back to back: one flush holds both
        for turn_ids in (["not-a-uuid"], [str(good)]):
            generate_turns.apply_async(
                kwargs={"turn_ids": turn_ids, "model": settings.model, "lane": "live"},
                queue=queue,
                producer=producer,
            )
    view = wait_for_reply(good, timeout=120)
    assert view.status == TurnStatus.DONE and view.reply


def test_a_flush_drops_its_malformed_messages_alone(caplog) -> None:
    """The test above cannot make both messages land in one flush (its timer may tick between them):
    here one flush's requests hold both, and only the malformed one is dropped, named in the log."""
    from types import SimpleNamespace

    from tasks.generate import _pending_turns

    good, other = uuid.uuid4(), uuid.uuid4()
    requests = [
        SimpleNamespace(id="m1", kwargs={"turn_ids": ["not-a-uuid"], "lane": "live"}),
        SimpleNamespace(id="m2", kwargs={"turn_ids": [str(good)], "lane": "bulk"}),
        SimpleNamespace(id="m3", kwargs={"turn_ids": [str(other)], "lane": "sideways"}),
        SimpleNamespace(id="m4", kwargs={"lane": "live"}),
    ]
    with caplog.at_level("ERROR", logger="tasks.generate"):
        pending, model_of, alone = _pending_turns(requests)
    assert pending == [(good, "bulk")] and set(model_of) == {good} and not alone
    dropped = [r.getMessage() for r in caplog.records if "dropping malformed message" in r.getMessage()]
    assert [m.split()[3].rstrip(":") for m in dropped] == ["m1", "m3", "m4"]


def test_a_resend_that_keeps_failing_is_logged_with_its_turns_and_never_raises(
    world, monkeypatch, caplog
) -> None:
    import uuid

    import tasks.generate as generate

    def broker_down(*args, **kwargs):
        raise ConnectionError("injected: broker down")

    monkeypatch.setattr(generate, "dispatch", off_the_worker(generate.dispatch, broker_down))
    monkeypatch.setattr(generate._dispatch_with_retry.retry, "sleep", lambda _: None)  # no real backoff waits
    ids = [uuid.uuid4(), uuid.uuid4()]
    generate._resend(generate.Resend([(ids[0], "live"), (ids[1], "bulk")]), "some-model")
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "the sweeper will" in logged and str(ids[0]) in logged and str(ids[1]) in logged


def test_turns_a_worker_could_not_send_again_are_the_next_sweeps_not_an_hour_later(
    world, monkeypatch
) -> None:
    # Their flush's messages are acked all the same; the sweeper re-sends a queued turn only once its
    # last send is a visibility timeout old (an hour by default), and the failed re-send had just
    # stamped it sent (a deferral, an engine death's hand-back).
    import time

    import tasks.generate as generate
    from core.settings import queue_for_model
    from db.turns import claim_turns, mark_dispatched
    from services.sweeper import resend_stranded
    from tasks.app import app
    from tasks.queues import queue_depth

    model = "sweep-after-failed-resend"
    monkeypatch.setattr(settings, "served_models", [settings.model, model])
    ids = enqueue_turns(
        [new_conversation() | {"message": f"Deferred {i}.", "model": model} for i in range(2)], send=False
    )
    # A third, running under a lease that lapsed: the earlier turn a claim found stalled and re-sends.
    (stalled,) = enqueue_turns([new_conversation() | {"message": "Stalled.", "model": model}], send=False)
    with session_scope() as s:
        claim_turns(session=s, turn_ids=[stalled], lease_s=1, max_attempts=3)
    time.sleep(1.2)
    ids.append(stalled)
    with session_scope() as s:
        mark_dispatched(session=s, turn_ids=ids)  # as a deferral (or the stalled check) records its re-send
    real = generate.dispatch

    def broker_down(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("injected: broker down")

    monkeypatch.setattr(generate, "dispatch", off_the_worker(real, broker_down))
    monkeypatch.setattr(generate._dispatch_with_retry.retry, "sleep", lambda _: None)
    generate._resend(generate.Resend([(t, "live") for t in ids]), model)
    monkeypatch.setattr(generate, "dispatch", real)
    try:
        assert resend_stranded(models=[model]) == {f"{model}/live": 3}  # the default: visibility timeout
        assert queue_depth(model, "live") == 3
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "live"))


def test_a_flush_mixing_two_models_sends_each_turn_back_to_its_own_models_queue(world) -> None:
    # A worker that also consumes another model's queues (Celery's add_consumer, as a rescuer does)
    # flushes both models' messages together; every re-send went to the model of the flush's last
    # message, so the other model's turns moved to this model's queue.
    import uuid
    from types import SimpleNamespace

    import tasks.generate as generate
    from tasks.queues import queue_depth

    first, other = (f"mix-{name}-{uuid.uuid4().hex[:6]}" for name in ("a", "b"))
    turns = {first: uuid.uuid4(), other: uuid.uuid4()}
    requests = [
        SimpleNamespace(id=str(i), kwargs={"turn_ids": [str(t)], "model": m, "lane": "bulk"})
        for i, (m, t) in enumerate(turns.items())
    ]
    pending, model_of, alone = generate._pending_turns(requests)
    assert alone == set()
    assert model_of == {t: m for m, t in turns.items()}
    generate._resend(generate.Resend(pending, countdown=None), first, model_of)
    assert queue_depth(first, "bulk") == 1 and queue_depth(other, "bulk") == 1
    generate._resend(generate.Resend(pending, model=other), first, model_of)  # a Resend naming one
    assert queue_depth(first, "bulk") == 1 and queue_depth(other, "bulk") == 2


def test_a_part_sent_group_of_scene_steps_stamps_those_that_went_out(world, monkeypatch) -> None:
    # A scene step is created unsent and stamped once its message is out; a group whose second message
    # failed stamped neither, so the sweeper sent the first again after a lease (a duplicate).
    from sqlalchemy import update

    import tasks.generate as generate
    from db.models import Turn
    from db.turns import SEND_FAILED_AT

    steps = enqueue_turns([new_conversation() | {"message": f"Step {i}."} for i in range(2)], send=False)
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id.in_(steps)).values(dispatched_at=None))
    went: list[int] = []

    def first_message_only(ids, *, model, lane, countdown=None, sent=None, alone=False):  # type: ignore[no-untyped-def]
        if not went:
            went.append(1)
            sent.append(ids[0])  # its message went out; the next one's publish fails
        raise ConnectionError("injected: the broker went away")

    monkeypatch.setattr(generate, "dispatch", off_the_worker(generate.dispatch, first_message_only))
    monkeypatch.setattr(generate._dispatch_with_retry.retry, "sleep", lambda _: None)
    generate._resend(generate.Resend([(t, "live") for t in steps], stamp=True), "nobody-consumes-this")
    with session_scope() as s:
        stamped = dict(
            s.execute(select(Turn.id, Turn.dispatched_at).where(Turn.id.in_(steps))).tuples().all()
        )
    assert stamped[steps[0]] is not None and stamped[steps[0]] != SEND_FAILED_AT
    assert stamped[steps[1]] == SEND_FAILED_AT


def test_the_worker_exits_with_celerys_code_when_celery_fails(monkeypatch) -> None:
    """Found in review: app.worker_main drops Celery's exit code (so does app.start: click, not
    standalone, returns it), so a worker whose consumer gave up (the broker unreachable past its
    retries) exited 0, and `Restart=on-failure` left it down."""
    import pytest

    from tasks.app import app
    from worker.__main__ import main

    started: list[dict] = []

    class GaveUp:  # the real `celery worker` command runs; only its WorkController is this one
        def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
            started.append(kwargs)
            self.exitcode = 1  # what a failed bootstep leaves

        def start(self) -> None:
            pass

    monkeypatch.setattr(app, "Worker", GaveUp)
    monkeypatch.setattr("worker.__main__.configure_logging", lambda: None)
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 1 and started and started[0]["hostname"].startswith("mlchat-")
    # review: Celery's --loglevel was INFO whatever MLCHAT_LOG_LEVEL said (Celery sets the root
    # logger's level from it), so DEBUG never reached a worker's log
    import logging

    from core.settings import settings

    monkeypatch.setattr(settings, "log_level", "DEBUG")
    with pytest.raises(SystemExit):
        main([])
    assert started[-1]["loglevel"] == logging.DEBUG
    monkeypatch.setattr(settings, "log_level", "WARN")  # a name Celery's option does not take
    with pytest.raises(SystemExit):
        main([])
    assert started[-1]["loglevel"] == logging.WARNING


def test_a_bad_worker_option_is_clicks_one_line_not_a_traceback(monkeypatch, capsys) -> None:
    """Found in review: click, not standalone, raises its usage errors, so `python -m worker
    --no-such-option` printed a traceback instead of the usage line and exit code 2."""
    import pytest

    from worker.__main__ import main

    monkeypatch.setattr("worker.__main__.configure_logging", lambda: None)
    with pytest.raises(SystemExit) as exited:
        main(["--no-such-option"])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert "No such option" in err and "--no-such-option" in err and "Traceback" not in err


def test_a_batch_that_raised_still_sends_the_scene_steps_and_stalled_turns_its_claim_took_on() -> None:
    """Found in review: a chunk that raised after its claim (the database dropped mid-way) re-sent
    its own turns only. The stalled earlier turn the claim had stamped as sent, and the scene steps
    created by groups already stored, were sent by nobody: their conversations waited for the
    sweeper (an hour for the stalled turn). A flush raising outside a batch dropped them too."""
    import uuid
    from types import SimpleNamespace

    from db.scenes import NewStep
    from db.turns import StalledTurn
    from tasks.generate import ChunkRaised, FlushOutcome, _record
    from worker.pipeline import BatchReport

    mine, step, stalled = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    report = BatchReport(
        next_steps=[NewStep(step, "smollm2-135m", "bulk")],
        stalled=[StalledTurn(stalled, "smollm2-135m", None)],
    )
    outcome = FlushOutcome()
    events = SimpleNamespace(finished=lambda *args: None)
    _record([(mine, "live")], ChunkRaised(RuntimeError("the database dropped"), report), events, outcome)  # type: ignore[arg-type]
    sent = {turn: resend for resend in [*outcome.resend, *outcome.claimed] for turn, _ in resend.turns}
    assert sent[mine].countdown == settings.batch_retry_delay
    assert sent[step].stamp and sent[step].turns == [(step, "bulk")] and sent[step].model == "smollm2-135m"
    assert sent[stalled].turns == [(stalled, "live")] and sent[stalled].countdown is None


def test_a_turn_sent_alone_stays_alone_and_a_lost_connection_sends_its_batch_back_alone_too() -> None:
    """Review of the fix that sends a raised batch's turns back alone: a turn sent alone that was
    deferred or held came back into a batch, where it could break its batch-mates' once more. (A
    lost database connection sends the batch back alone too: a statement that crashes its backend
    every time looks the same as an outage.)"""
    import uuid
    from types import SimpleNamespace

    from sqlalchemy.exc import OperationalError

    from tasks.generate import ChunkRaised, FlushOutcome, _record
    from worker.pipeline import BatchReport

    events = SimpleNamespace(finished=lambda *args: None)
    lost = OperationalError("SELECT 1", {}, Exception("server closed the connection unexpectedly"))
    for error, alone in ((RuntimeError("a stage broke on this data"), True), (lost, True)):
        pair = [(uuid.uuid4(), "bulk"), (uuid.uuid4(), "bulk")]
        outcome = FlushOutcome()
        _record(pair, ChunkRaised(error, BatchReport()), events, outcome)  # type: ignore[arg-type]
        (resend,) = outcome.resend
        assert resend.turns == pair and resend.alone is alone, error
    poison = uuid.uuid4()
    outcome = FlushOutcome()
    _record([(poison, "bulk")], BatchReport(deferred={poison: 1}), events, outcome, alone=True)  # type: ignore[arg-type]
    assert [(r.turns, r.alone) for r in outcome.resend if r.turns] == [([(poison, "bulk")], True)]


def test_a_live_chunks_sends_go_out_as_it_ends_not_after_a_slower_bulk_chunk_of_its_flush(
    monkeypatch,
) -> None:
    """Found in review: a flush made every send (retries, deferred turns, a scene's next step) after
    all its chunks ended, so a live chunk's follow-ups waited for a bulk chunk sharing its flush."""
    import threading
    import uuid
    from types import SimpleNamespace

    import tasks.generate as generate
    from worker.pipeline import BatchReport

    live, bulk = uuid.uuid4(), uuid.uuid4()
    bulk_may_end = threading.Event()
    sent: list[tuple[list[uuid.UUID], bool]] = []

    def answer_chunk(chunk):  # type: ignore[no-untyped-def]
        report = BatchReport()
        if chunk[0][1] == "bulk":
            assert bulk_may_end.wait(10), "the live chunk's send did not go out while this chunk ran"
            report.done.append(bulk)
        else:
            report.retry[live] = "injected: try again"
        return report

    def resend(item, model, model_of=None):  # type: ignore[no-untyped-def]
        sent.append(([t for t, _ in item.turns], bulk_may_end.is_set()))
        if live in [t for t, _ in item.turns]:
            bulk_may_end.set()

    monkeypatch.setattr(generate, "_answer_chunk", answer_chunk)
    monkeypatch.setattr(generate, "_resend", resend)
    outcome = generate.FlushOutcome()
    events = SimpleNamespace(started=lambda ids: list(ids), finished=lambda *parts: None)  # no task events
    generate._answer(
        [(live, "live"), (bulk, "bulk")],
        "m",
        events,  # type: ignore[arg-type]
        outcome,
        lambda: generate._send_owed(outcome, "m", {}),
    )
    assert ([live], False) in sent  # sent while the bulk chunk still ran


def test_messages_sent_for_later_do_not_stop_the_worker_taking_a_live_turn(celery_worker) -> None:
    """Found in review: celery-batches keeps a message with an ETA unacked until it is due, and
    kombu counts it against the prefetch; Celery's own strategy raises the prefetch for such a
    message, celery-batches 0.11 did not. More of them than the prefetch (turns sent again after a
    back-off, or to look again when a lease lapses) stopped the worker taking anything, live turns
    included, until they came due."""
    import time
    import uuid

    from tasks.app import app
    from tasks.generate import dispatch

    prefetch = settings.worker_threads * app.conf.worker_prefetch_multiplier
    for _ in range(prefetch + 4):  # turns nobody stored: skipped once due
        dispatch([uuid.uuid4()], model=settings.model, lane="live", countdown=60)
    time.sleep(2.0)  # the worker takes them in, and holds them until due
    (turn,) = enqueue_turns([new_conversation() | {"message": "Still there, innkeeper?"}])
    assert wait_for_reply(turn, timeout=40).status == TurnStatus.DONE


def test_a_turn_of_another_model_on_this_workers_queue_goes_to_its_own_models_queue(
    celery_worker, caplog
) -> None:
    """Flower review: a worker given another model's queue (Celery's `add_consumer`, Flower's "add
    consumer", to rescue that model's backlog) answered its turns with its own weights, stored under
    the model they asked for. Its claim leaves them; they go to their own model's queue."""
    import logging

    import redis
    from sqlalchemy import update

    from core.services import broker_url
    from db.models import Turn
    from tasks.generate import dispatch
    from tasks.queues import queue_depth, queue_for_model

    other = f"other-weights-{uuid.uuid4().hex[:6]}"
    theirs, ours = enqueue_turns(
        [new_conversation() | {"message": "Whose turn is this?"}, new_conversation() | {"message": "Mine?"}],
        send=False,
    )
    with session_scope() as s:
        s.execute(update(Turn).where(Turn.id == theirs).values(model=other))
    try:
        with caplog.at_level(logging.WARNING, logger="worker.pipeline"):
            dispatch([theirs], model=settings.model, lane="live")  # on this worker's own queue
            dispatch([ours], model=settings.model, lane="live")
            assert wait_for_reply(ours, timeout=240).status == TurnStatus.DONE
            deadline = time.monotonic() + 60
            while queue_depth(other, "live") == 0:  # sent home (after a wait, as its ETA says)
                assert time.monotonic() < deadline, "never sent to its own model's queue"
                time.sleep(0.2)
        with session_scope() as s:
            turn = s.get(Turn, theirs)
            assert turn is not None
            assert (turn.status, turn.attempts, turn.reply) == (TurnStatus.QUEUED, 0, None)
            assert turn.dispatched_at is not None  # its send recorded: no sweep sends it twice
            sent_at = turn.dispatched_at
        time.sleep(1.0)  # review: it was also deferred, sent back to this worker every 0.1 s
        with session_scope() as s:
            assert s.get_one(Turn, theirs).dispatched_at == sent_at
        assert queue_depth(other, "live") == 1
        said = [r.getMessage() for r in caplog.records if r.name == "worker.pipeline"]
        assert any(f"turns of {other} reached this worker of {settings.model}" in m for m in said), said
    finally:
        redis.Redis.from_url(broker_url()).delete(queue_for_model(other, "live"))


def test_a_turn_sent_for_later_by_a_worker_whose_clock_is_ahead_is_held_its_countdown_not_the_skew(
    celery_worker,
) -> None:
    """Clocks review: Celery makes a countdown an ETA on the sender's clock, and the receiver held
    the message until then on its own: a 0.1 s deferral sent by a worker 10 minutes ahead waited 10
    minutes. Held no longer than its countdown from its arrival."""
    from datetime import UTC, datetime, timedelta

    from tasks.app import app
    from tasks.batches import COUNTDOWN_HEADER
    from tasks.generate import TASK_NAME
    from tasks.queues import queue_for_model

    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Are you there, friend?"}], send=False)
    kwargs = {"turn_ids": [str(turn_id)], "model": settings.model, "lane": "live"}
    ahead = datetime.now(UTC) + timedelta(minutes=10)  # the sending worker's clock
    message = app.amqp.create_task_message(
        str(uuid.uuid4()), TASK_NAME, (), kwargs, countdown=0.5, now=ahead, ignore_result=True
    )
    message.headers[COUNTDOWN_HEADER] = 0.5
    with app.producer_or_acquire() as producer:
        app.amqp.send_task_message(
            producer, TASK_NAME, message, queue=queue_for_model(settings.model, "live")
        )
    assert wait_for_reply(turn_id, timeout=120).status == TurnStatus.DONE  # not ten minutes
