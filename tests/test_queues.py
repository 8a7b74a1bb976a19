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


def test_dispatch_sends_the_message_apply_async_would(services) -> None:
    """dispatch builds its messages without apply_async's per-call work: what the worker receives
    must stay the same task message, field for field (only the per-message ids and times differ)."""
    import base64
    import json
    from datetime import datetime

    from tasks.generate import generate_turns

    model = "no-worker-" + uuid.uuid4().hex[:6]  # a queue nobody consumes
    queue = queue_for_model(model, "live")
    turn_id = uuid.uuid4()
    kwargs = {"turn_ids": [str(turn_id)], "model": model, "lane": "live"}
    try:
        dispatch([turn_id], model=model, lane="live", countdown=30)
        with app.producer_or_acquire() as producer:
            generate_turns.apply_async(kwargs=kwargs, queue=queue, countdown=30, producer=producer)
        with app.connection_for_read() as conn:
            sent = conn.default_channel.client.lrange(queue, 0, -1)  # newest first
        ours, celerys = (json.loads(raw) for raw in reversed(sent))
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue)

    def comparable(message: dict) -> dict:
        """The message less what is drawn per message: its ids, its delivery tag, its eta."""
        headers = {k: v for k, v in message["headers"].items() if k not in ("id", "root_id", "eta")}
        properties = {
            k: v for k, v in message["properties"].items() if k not in ("correlation_id", "delivery_tag")
        }
        body = json.loads(base64.b64decode(message["body"]))
        return message | {"headers": headers, "properties": properties, "body": body}

    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    eta = datetime.fromisoformat(ours["headers"]["eta"])
    assert abs((eta - datetime.fromisoformat(celerys["headers"]["eta"])).total_seconds()) < 5
    assert comparable(ours) == comparable(celerys)
    assert comparable(ours)["body"][1] == kwargs
