"""Turns whose message was lost are found and sent again, once, and never while messages wait."""

import time

from core.settings import queue_for_model, settings
from tasks.app import app
from tasks.producer import enqueue_turns
from tasks.queues import queue_depth
from tasks.sweeper import resend_stranded
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
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(MODEL, "live"))
