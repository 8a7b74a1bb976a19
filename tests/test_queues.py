"""Messages on the broker: one turn per live message, a batch of turns per bulk message."""

import math
import uuid

from core.settings import queue_for_model, settings
from tasks.app import app
from tasks.generate import dispatch
from tasks.queues import queue_depth


def test_bulk_messages_carry_a_batch_of_turns_and_live_ones_a_single_turn(services) -> None:
    model = "no-worker-" + uuid.uuid4().hex[:6]  # a queue nobody consumes
    ids = [uuid.uuid4() for _ in range(3 * settings.batch_size + 1)]
    assert queue_depth(model, "bulk") == 0 and queue_depth(model, "live") == 0
    try:
        dispatch(ids, model=model, lane="bulk")
        dispatch(ids[:5], model=model, lane="live")
        assert queue_depth(model, "bulk") == math.ceil(len(ids) / settings.batch_size) == 4
        assert queue_depth(model, "live") == 5
        with app.connection_for_read() as conn:
            message = conn.SimpleQueue(queue_for_model(model, "bulk")).get(timeout=5)
            assert message.payload[1]["turn_ids"] == [str(i) for i in ids[: settings.batch_size]]
            assert message.payload[1]["lane"] == "bulk"
            message.ack()
    finally:
        with app.connection_for_write() as conn:
            for lane in ("live", "bulk"):
                conn.default_channel.queue_purge(queue_for_model(model, lane))
