"""The flush timer survives a broker reconnect (celery-batches 0.11 lost it: upstream #99, #107).

On a reconnect Celery builds a new consumer, with a new timer on transports whose event loop is
rebuilt, and calls the task's Strategy() again. The task here is a throwaway one on its own app (the
worker's task is left alone); the consumers are the few attributes Strategy() reads, and the timers
are kombu's real ones.
"""

from types import SimpleNamespace

import pytest
from celery import Celery
from kombu.asynchronous.timer import Timer

from tasks.batches import ReconnectSafeBatches


@pytest.fixture()
def task():  # type: ignore[no-untyped-def]
    app = Celery("reconnect-check", broker="memory://", set_as_current=False)

    @app.task(base=ReconnectSafeBatches, flush_every=8, flush_interval=0.5, shared=False)
    def batched(requests):  # type: ignore[no-untyped-def]
        return None

    real = batched._get_current_object()
    yield app, real
    if real._tref is not None:
        real._tref.cancel()


def _consumer() -> SimpleNamespace:
    return SimpleNamespace(
        pool=SimpleNamespace(apply_async=None),
        hostname="check@localhost",
        connection_errors=(),
        event_dispatcher=None,
        timer=Timer(),
    )


def test_a_reconnect_rearms_the_flush_timer_for_messages_already_buffered(task) -> None:
    app, batched = task
    before, after = _consumer(), _consumer()
    batched.Strategy(batched, app, before)
    batched._buffer.put("a message buffered before the connection dropped")
    batched._tref = before.timer.call_repeatedly(batched.flush_interval, batched._do_flush)  # old loop
    batched.Strategy(batched, app, after)  # the consumer restarts after the reconnect
    assert batched._tref is not None and len(after.timer.queue) == 1  # armed on the new loop
    assert before.timer.queue[0].entry.canceled  # and the stale one is gone


def test_with_nothing_buffered_the_next_message_arms_the_timer_as_before(task) -> None:
    app, batched = task
    before, after = _consumer(), _consumer()
    batched.Strategy(batched, app, before)
    batched._tref = before.timer.call_repeatedly(batched.flush_interval, batched._do_flush)
    batched.Strategy(batched, app, after)
    assert batched._tref is None and len(after.timer.queue) == 0
