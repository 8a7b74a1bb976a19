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

    # plus the countdown itself, which a receiver holds it no longer than from its arrival (clocks review)
    assert ours["headers"].pop("mlchat_countdown") == 30
    assert ours["headers"]["id"] == ours["headers"]["root_id"] == ours["properties"]["correlation_id"]
    eta = datetime.fromisoformat(ours["headers"]["eta"])
    assert abs((eta - datetime.fromisoformat(celerys["headers"]["eta"])).total_seconds()) < 5
    assert comparable(ours) == comparable(celerys)
    assert comparable(ours)["body"][1] == kwargs


def test_publishes_share_one_redis_client_per_channel_pool(services) -> None:
    """kombu built a new redis-py client for every publish; our channel keeps one per connection
    pool, and a channel whose pools were dropped (as after a fork) publishes on a new one."""
    from tasks.broker import Channel

    model = "no-worker-" + uuid.uuid4().hex[:6]  # a queue nobody consumes
    try:
        with app.producer_or_acquire() as producer:
            channel = producer.channel
            assert isinstance(channel, Channel)
            with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
                assert first is second and first.connection_pool is channel.pool
            dispatch([uuid.uuid4()], model=model, lane="live")
            channel._disconnect_pools()  # what kombu does after a fork
            with channel.conn_or_acquire() as after:
                assert after is not first and after.connection_pool is channel.pool
            dispatch([uuid.uuid4()], model=model, lane="live")
        assert queue_depth(model, "live") == 2
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "live"))


def test_a_publish_after_a_redis_restart_lands_once(services) -> None:
    """The shared client's pooled connections are cut by the restart: the next publish reconnects
    (the pool's, as with kombu's client per publish) and its message is on the queue once."""
    import base64
    import json

    from core import embedded

    model = "no-worker-" + uuid.uuid4().hex[:6]
    try:
        dispatch([uuid.uuid4()], model=model, lane="live")  # the channel's client holds a connection
        url = embedded.redis_status(services).url
        embedded.stop_redis(services)
        assert embedded.start_redis(services) == url  # same port, same data (the append-only file)
        after = uuid.uuid4()
        dispatch([after], model=model, lane="live")
        with app.connection_for_read() as conn:
            sent = conn.default_channel.client.lrange(queue_for_model(model, "live"), 0, -1)
        carried = [json.loads(base64.b64decode(json.loads(raw)["body"]))[1]["turn_ids"] for raw in sent]
        assert len(carried) == 2 and carried.count([str(after)]) == 1
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.queue_purge(queue_for_model(model, "live"))


def test_only_a_plain_redis_url_gets_the_shared_client_transport() -> None:
    from tasks.broker import transport_for

    assert transport_for("redis://127.0.0.1:6379/0") == "tasks.broker:Transport"
    # kombu decides these from the scheme: TLS defaults for rediss, the socket transport for +socket
    assert transport_for("rediss://cache.example:6380/0") is None
    assert transport_for("redis+socket:///tmp/redis.sock") is None


def test_a_publish_to_a_broker_that_stopped_answering_fails_instead_of_waiting_for_ever() -> None:
    """Found in review: no socket timeout was set, so a publish on a connection the broker left
    half-open (a failover, a NAT or firewall timeout) waited for the OS to give up, minutes to hours,
    holding the request (or the sweeper) that made it. Here the broker accepts the connection and
    never answers."""
    import socket
    import threading
    import time

    from kombu import Connection

    from core.settings import settings
    from tasks.broker import transport_for

    options = app.conf.broker_transport_options
    assert options["socket_timeout"] == settings.broker_socket_timeout_s
    assert options["socket_keepalive"] is True
    assert options["socket_keepalive_options"].get(socket.TCP_KEEPIDLE) == 60  # not the OS's two hours
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never reads or answers
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    outcome: list[object] = []

    def publish() -> None:
        try:
            with Connection(
                url, transport=transport_for(url), transport_options=options | {"socket_timeout": 1.0}
            ) as conn:
                conn.default_channel.client.lpush("never", "x")
            outcome.append("answered")
        except Exception as exc:  # the timeout, as redis-py raises it
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(timeout=30)
    silent.close()
    assert outcome and "imeout" in type(outcome[0]).__name__ + str(outcome[0]), outcome
    assert time.monotonic() - started < 30
