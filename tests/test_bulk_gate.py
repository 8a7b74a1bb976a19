"""The bulk gate's own bookkeeping (tasks/admission.py), on a stand-in for Celery's consumer: the
queues it consumes, and a timer the test ticks. The real worker's gate is tested with the session's
Celery worker in test_engine_loop.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from core.settings import settings
from tasks import admission
from tasks.admission import BulkGate

OWN = "gen.m.bulk"


class TaskConsumer:
    """What the gate uses of kombu's consumer; `failing_adds` adds raise as a broker hiccup would."""

    def __init__(self, names: list[str]) -> None:
        self.queues = [SimpleNamespace(name=n) for n in names]
        self.failing_adds = 0

    def consuming_from(self, name: str) -> bool:
        return any(q.name == name for q in self.queues)

    def cancel_by_queue(self, name: str) -> None:
        self.queues = [q for q in self.queues if q.name != name]

    def add_queue(self, queue: Any) -> None:
        if self.failing_adds:
            self.failing_adds -= 1
            raise ConnectionError("the broker went away")
        self.queues.append(queue)

    def consume(self) -> None:
        pass


def _attached(capacity: int = 8, messages: int | None = None) -> tuple[BulkGate, TaskConsumer, Any]:
    gate = BulkGate()
    task_consumer = TaskConsumer(["gen.m.live", OWN])
    ticks: list[Any] = []
    consumer = SimpleNamespace(
        task_consumer=task_consumer,
        app=SimpleNamespace(amqp=SimpleNamespace(queues={OWN: SimpleNamespace(name=OWN)})),
        timer=SimpleNamespace(call_repeatedly=lambda _s, fn: ticks.append(fn)),
    )
    gate.attach(consumer, capacity, messages)
    return gate, task_consumer, ticks[0]


def test_a_resume_that_failed_is_tried_again_at_the_next_check() -> None:
    gate, task_consumer, tick = _attached()
    gate.received(8)
    assert not task_consumer.consuming_from(OWN) and gate.paused == {OWN}
    task_consumer.failing_adds = 1
    gate.release(8)
    tick()  # the broker hiccups: the queue stays paused
    assert not task_consumer.consuming_from(OWN) and gate.paused == {OWN}
    tick()
    assert task_consumer.consuming_from(OWN) and not gate.paused


@pytest.mark.parametrize("flag", ["should_stop", "should_terminate"])
def test_a_stopping_worker_does_not_consume_its_bulk_queue_again(monkeypatch, flag: str) -> None:
    gate, task_consumer, tick = _attached()
    gate.received(8)
    gate.release(8)
    # Not Celery's own state: the session's in-process worker (tests/conftest.py) reads that one, and
    # a flag set there for even a moment shuts it down for every later test.
    state = SimpleNamespace(should_stop=None, should_terminate=None)
    setattr(state, flag, 0)  # a warm shutdown's exit code
    monkeypatch.setattr(admission, "worker_state", state)
    tick()
    assert not task_consumer.consuming_from(OWN)


def test_a_bulk_message_the_handler_refuses_gives_its_count_back() -> None:
    # celery-batches raises for a message it cannot take (InvalidTaskError for a malformed header;
    # Celery then rejects it): it never reaches a flush, which is what releases the count, so each
    # such message kept the gate that much closer to closed for the worker's life.
    gate, _, _ = _attached(capacity=8)

    def refuses(message: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        raise ValueError("injected: a malformed message")

    def takes(message: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        pass

    bulk = ((), {"turn_ids": ["a", "b", "c"], "lane": "bulk"}, {})
    message = SimpleNamespace(headers={})
    with pytest.raises(ValueError):
        admission.gated(refuses, gate)(message, bulk)
    assert gate.held == 0 and gate.messages == 0
    admission.gated(takes, gate)(message, bulk)
    assert gate.held == 3 and gate.messages == 1  # a message the handler took waits for its flush


def test_a_deferred_bulk_message_does_not_hold_the_gate_through_its_countdown(world, monkeypatch) -> None:
    """Found in review: a bulk turn sent again after a back-off (an eta up to half the visibility
    timeout) was counted from its arrival, and celery-batches holds it until its eta: enough of them
    closed the gate for as long, with the engine idle."""
    import uuid

    from celery_batches import SimpleRequest

    import tasks.generate

    gate, _, _ = _attached(capacity=8)
    monkeypatch.setattr(tasks.generate, "bulk_gate", gate)

    def takes(message: Any, body: Any, *args: Any, **kwargs: Any) -> None:
        pass

    eta = {"eta": "2026-12-03T05:00:00+00:00"}
    later, now, other = ([str(uuid.uuid4()) for _ in range(n)] for n in (3, 3, 2))

    def body(ids: list[str]) -> tuple:
        return ((), {"turn_ids": ids, "lane": "bulk"}, {})

    admission.gated(takes, gate)(SimpleNamespace(headers=eta), body(later))
    assert gate.held == 0  # deferred: not held while it waits
    admission.gated(takes, gate)(SimpleNamespace(headers={}), body(now))
    admission.gated(takes, gate)(SimpleNamespace(headers={}), body(other))
    assert gate.held == 5

    def request(ids: list[str], headers: dict) -> SimpleRequest:
        return SimpleRequest(
            str(uuid.uuid4()), tasks.generate.TASK_NAME, (), {"turn_ids": ids, "lane": "bulk"}, {}, "h", True,
            None, None, headers,
        )  # fmt: skip

    # The deferred message, once due, and one counted message flush together (the turns are unknown
    # here, so nothing is answered): the deferred turns count while the flush holds them, and the
    # flush gives back what it counted, no more.
    held_during: list[int] = []
    real = tasks.generate._pending_turns

    def pending(requests):  # type: ignore[no-untyped-def]
        held_during.append(gate.held)
        return real(requests)

    monkeypatch.setattr(tasks.generate, "_pending_turns", pending)
    tasks.generate.generate_turns([request(later, eta), request(now, {})])
    assert held_during == [8] and gate.held == 2  # the other message's turns are still held


def test_bulk_messages_of_a_few_turns_each_close_the_gate_before_they_take_every_thread() -> None:
    """Found in review: only turns were counted, so with an engine admitting hundreds of bulk turns,
    bulk messages arriving one per flush could each take a worker thread until every thread was
    bulk's, and a live flush waited for one to finish. Messages are counted too now."""
    gate, task_consumer, tick = _attached(capacity=1000, messages=3)
    for _ in range(3):
        gate.received(1)  # three single-turn messages: far under the turns' capacity
    assert not task_consumer.consuming_from(OWN) and gate.paused == {OWN}
    gate.release(1)  # a turn answered, its flush still running: still three messages held
    tick()
    assert not task_consumer.consuming_from(OWN)
    gate.release(0, 1)  # that flush ended
    tick()
    assert task_consumer.consuming_from(OWN) and not gate.paused and gate.messages == 2
    gate.hold(2, 2)  # two deferred messages, due now, joined a flush: counted as they join
    gate.received(1)
    assert not task_consumer.consuming_from(OWN) and gate.messages == 5
    gate.release(0, 3 - 1)  # a flush took three of them: they count as one flush from now on
    tick()
    assert not task_consumer.consuming_from(OWN) and gate.messages == 3  # two flushes and one waiting
    gate.release(0, 1)  # a flush ended
    tick()
    assert task_consumer.consuming_from(OWN) and gate.messages == 2
    # A quarter of the threads kept for live flushes, and those memory jobs and callback deliveries
    # may hold besides (found in review: with 8 threads, 6 bulk flushes, a memory job and two hung
    # callbacks left a live flush none).
    for threads in (8, 16, 32):
        others = settings.memory_jobs_per_worker + admission.callback_slots(threads)
        assert admission.bulk_message_capacity(threads) + others <= threads - max(1, threads // 4)
    assert admission.bulk_message_capacity(16) == 9
    assert admission.bulk_message_capacity(2) == 1


def test_the_gate_counts_against_the_pools_threads_not_the_setting(monkeypatch) -> None:
    """Found in review: the message cap was read from MLCHAT_WORKER_THREADS, so a worker started
    with `--concurrency=4` (it overrides the setting) let bulk messages take all four threads."""
    from celery import Celery
    from kombu.asynchronous.timer import Timer

    app = Celery("gate-check", broker="memory://", set_as_current=False)

    @app.task(base=admission.BulkGatedBatches, flush_every=8, flush_interval=0.5, shared=False)
    def batched(requests):  # type: ignore[no-untyped-def]
        return None

    gate = BulkGate()
    monkeypatch.setattr(admission, "bulk_gate", gate)
    monkeypatch.setattr(admission.settings, "worker_threads", 16)
    real = batched._get_current_object()
    # no pool limit read: the setting's 16 threads (9 for bulk); the pool's 4 leave bulk one
    for limit, expected in ((4, 1), (None, 9)):
        timer = Timer()
        consumer = SimpleNamespace(
            pool=SimpleNamespace(apply_async=None, limit=limit),
            hostname="check@localhost",
            connection_errors=(),
            event_dispatcher=None,
            timer=timer,
            task_consumer=TaskConsumer(["gen.m.live", OWN]),
        )
        try:
            real.Strategy(real, app, consumer)
            assert gate.message_capacity == expected
        finally:
            timer.stop()
            if real._tref is not None:
                real._tref.cancel()


def test_a_due_deferred_bulk_message_waits_for_room_instead_of_taking_a_thread(monkeypatch) -> None:
    """Found in review: deferred bulk messages (a conversation's later lines, sent again after a
    back-off) were counted only once due, and never refused: each due one flushed in a thread of its
    own to wait for the engine, past a full gate, until bulk flushes held every thread of the pool
    and a live flush queued behind them. While the gate is full one is sent again a little later,
    unclaimed; with room it is counted and answered."""
    import uuid

    from celery_batches import SimpleRequest

    import tasks.generate

    gate, _, _ = _attached(capacity=8, messages=1)
    monkeypatch.setattr(tasks.generate, "bulk_gate", gate)
    resent: list[Any] = []
    answered: list[list[Any]] = []
    monkeypatch.setattr(tasks.generate, "_resend", lambda item, model, model_of=None: resent.append(item))
    monkeypatch.setattr(
        tasks.generate, "_answer", lambda pending, *args, **kwargs: answered.append(list(pending))
    )
    eta = {"eta": "2026-12-07T05:00:00+00:00"}
    ids = [str(uuid.uuid4()) for _ in range(3)]
    due = SimpleRequest(
        str(uuid.uuid4()), tasks.generate.TASK_NAME, (), {"turn_ids": ids, "lane": "bulk"}, {}, "h", True,
        None, None, eta,
    )  # fmt: skip
    admission.gated(lambda *a, **k: None, gate)(
        SimpleNamespace(headers={}), ((), {"turn_ids": ["x"], "lane": "bulk"}, {})
    )
    assert gate.messages == 1 and gate.closed  # one bulk message fills it
    tasks.generate.generate_turns([due])
    assert answered == [] and gate.held == 1 and gate.messages == 1  # not claimed, not counted
    (again,) = resent
    assert [str(t) for t, _ in again.turns] == ids and again.countdown == tasks.generate.POSTPONED_S
    assert again.stamp  # its send recorded: the sweeper must not take it for a lost one meanwhile
    gate.release(1, 1)  # the other flush ended: room
    tasks.generate.generate_turns([due])
    assert [str(t) for t, _ in answered[0]] == ids and len(resent) == 1
    assert gate.held == 0 and gate.messages == 0  # counted while it ran, given back after
