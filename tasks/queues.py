"""Queue depth on the broker, read without consuming (for the sweeper and for metrics)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from kombu.exceptions import ChannelError

from core.settings import Lane, queue_for_model
from tasks.app import app

# A probe's wait for the broker (connect, and each command): a health check or a metrics scrape
# answers within a few seconds of a broker that hangs (a paused host, a long script), not after the
# broker's socket timeout (MLCHAT_BROKER_SOCKET_TIMEOUT_S, 30 s by default) twice over.
PROBE_TIMEOUT_S = 2.0


def probe_connection(url: str | None = None) -> Any:
    """A broker connection for a probe (to the broker, or `url`): its own, waiting at most
    PROBE_TIMEOUT_S for anything."""
    wait = PROBE_TIMEOUT_S
    return app.connection_for_read(
        url, connect_timeout=wait, transport_options={"socket_timeout": wait, "socket_connect_timeout": wait}
    )


def queue_depth(model: str, lane: Lane = "live") -> int:
    """Messages waiting in a model's lane queue; 0 when the queue does not exist (Redis drops empty lists)."""
    # Its own short connection: the producer pool can be fully checked out by a busy worker, and a
    # metrics scrape must never wait on it.
    with app.connection_for_read() as conn:
        return _depth(conn, queue_for_model(model, lane))


def _depth(conn: Any, name: str) -> int:
    """Messages waiting in queue `name`, read over `conn`."""
    try:
        return int(conn.default_channel.queue_declare(queue=name, passive=True).message_count)
    except ChannelError:  # Redis drops an empty list: no queue is an empty one
        return 0


def queue_depths(lanes: Sequence[tuple[str, Lane]]) -> dict[str, int]:
    """Messages waiting in each (model, lane) queue, by queue name, over one probe connection tried
    once: a metrics scrape must not wait out the broker's connection retries (seconds a queue) or
    its socket timeout while it is away or hangs. Raises kombu's OperationalError (or redis-py's
    TimeoutError) then."""
    depths: dict[str, int] = {}
    with probe_connection() as conn:
        conn.ensure_connection(max_retries=0)
        for model, lane in lanes:
            name = queue_for_model(model, lane)
            depths[name] = _depth(conn, name)
    return depths


def eviction_risk() -> str | None:
    """One line saying that the broker may evict queued messages, or None. Under a maxmemory policy
    of `allkeys-*` (the default of some managed Redis services) a full Redis drops whole keys: a lane
    queue's list, kombu's unacked hash. `volatile-*` evicts only keys with a TTL (the turn streams,
    which readers can do without; queue lists have none). A Redis that refuses CONFIG says nothing."""
    try:
        with app.connection_for_read() as conn:
            answer = conn.default_channel.client.config_get("maxmemory-policy")
    except Exception:
        return None
    policy = answer.get("maxmemory-policy") or answer.get(b"maxmemory-policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if not policy or not str(policy).startswith("allkeys"):
        return None
    return (
        f"the broker's Redis has maxmemory-policy {policy}: once full it may evict queued messages"
        " (their turns then wait for `mlchat sweep`); set noeviction, or a volatile-* policy"
    )


OLDEST_SCANNED = 64  # messages looked at from the oldest for one that carries turns


def oldest_waiting_turn_ids(model: str, lane: Lane = "live") -> list[uuid.UUID]:
    """The turn ids of the oldest message waiting in a lane queue that carries turns (the bulk lane
    also carries memory jobs, which name none), read without consuming; [] when the queue is empty or
    none of its oldest OLDEST_SCANNED messages can be read as one."""
    # kombu's Redis transport pushes on the left and pops on the right: the oldest is at index -1.
    with app.connection_for_read() as conn:
        raws = conn.default_channel.client.lrange(queue_for_model(model, lane), -OLDEST_SCANNED, -1)
    for raw in reversed(raws):
        ids = _turn_ids(raw)
        if ids is not None:
            return ids
    return []


def held_and_empty(
    lanes: Sequence[tuple[str, Lane]], *, held_for_s: float
) -> tuple[set[uuid.UUID], set[tuple[str, Lane]]]:
    """The turns whose messages workers hold (prefetched, waiting in a batch, or due later with a
    countdown: kombu's Redis transport keeps each in its unacked hash, as [message, exchange, routing
    key], until the worker acks it), and which of these lanes' queues hold no message, read in one
    MULTI: a message a worker re-sends (the new one queued, the old one acked after) is seen in one
    place or the other. Not closed: kombu's own step between popping a message and recording it
    unacked (a sweep that falls in it sends that turn a second time, which costs a claim).

    `held_for_s`: a message counts as held for that long after its delivery (kombu's unacked index)
    or after its countdown's end, no longer: past it, its worker died holding it (killed, its node
    lost) and kombu gives it back only after the visibility timeout, an hour by default, its
    conversation stalled behind it meanwhile. A message with no delivery time counts as held."""
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        client = channel.client
        with client.pipeline(transaction=True) as pipe:
            for model, lane in lanes:
                for priority in channel.priority_steps:  # as kombu counts a queue: each priority's list
                    pipe.llen(channel._q_for_pri(queue_for_model(model, lane), priority))
            # HGETALL and TIME are not among the commands kombu's client prefixes (ZRANGE is): the
            # prefix is added here
            pipe.hgetall(getattr(channel, "global_keyprefix", "") + channel.unacked_key)
            pipe.zrange(channel.unacked_index_key, 0, -1, withscores=True)
            pipe.time()
            answers = pipe.execute()
    steps = len(channel.priority_steps)
    empty = {
        lanes[i]
        for i in range(len(lanes))
        if not any(n for n in answers[i * steps : (i + 1) * steps] if isinstance(n, int))
    }
    unacked, delivered_at, (seconds, micros) = answers[-3], dict(answers[-2]), answers[-1]
    cutoff = seconds + micros / 1e6 - held_for_s
    held: set[uuid.UUID] = set()
    for tag, raw in unacked.items():
        try:
            message = json.loads(raw)[0]
        except (ValueError, IndexError, TypeError, KeyError):
            continue
        if _let_go(message, delivered_at.get(tag), cutoff):
            continue
        held.update(_message_turn_ids(message) or ())
    return held, empty


def _let_go(message: Any, delivered_at: float | None, cutoff: float) -> bool:
    """Whether a held message was delivered, and due, before `cutoff` (Unix seconds)."""
    if delivered_at is None or delivered_at >= cutoff:
        return False
    try:
        eta = (message.get("headers") or {}).get("eta")
        due = datetime.fromisoformat(eta).timestamp() if eta else None
    except (AttributeError, TypeError, ValueError):
        return False  # a countdown that cannot be read: held, as before
    return due is None or due < cutoff


def _turn_ids(raw: bytes) -> list[uuid.UUID] | None:
    try:
        return _message_turn_ids(json.loads(raw))
    except ValueError:
        return None


def _message_turn_ids(message: Any) -> list[uuid.UUID] | None:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return [uuid.UUID(str(turn_id)) for turn_id in kwargs["turn_ids"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
