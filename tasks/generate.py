"""The batched generation task: celery-batches buffers turn messages and hands them over as one list.

A live message carries one turn id; a bulk message carries up to a batch of them, so a 100,000-line
run is ~100,000 / batch_size messages. The task answers what it was handed in chunks of
`batch_size` turns and, between chunks, hands the rest back to the queue if a live turn is waiting,
so a live turn waits at most for the chunk in hand.

celery-batches acks every message of a flush when the task returns, whatever happened, so nothing
may escape this task: a malformed message is logged and dropped alone, a broker hiccup while
peeking at the live queue counts as "no live turn", a batch that raises hands its turns back, and a
re-send that fails is retried with backoff and, if it still fails, logged with the turn ids it
leaves to the sweeper (`mlchat sweep`).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import retry, stop_after_attempt, wait_exponential

from core.settings import Lane, queue_for_model, settings
from tasks.app import app
from tasks.batches import ReconnectSafeBatches
from tasks.events import TurnEvents
from tasks.queues import queue_depth

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.generate_turns"

Pending = tuple[uuid.UUID, Lane]


@dataclass
class Resend:
    """Turns to send again after this flush, and when."""

    turns: list[Pending]
    countdown: float | None = None


@dataclass
class FlushOutcome:
    resend: list[Resend] = field(default_factory=list)
    engine_dead: BaseException | None = None


@app.task(
    base=ReconnectSafeBatches,
    name=TASK_NAME,
    flush_every=settings.batch_size,
    flush_interval=settings.flush_interval,
    acks_late=True,
    ignore_result=True,
)
def generate_turns(requests: list[Any]) -> None:
    """Answer the turns of the buffered messages. Messages carry only ids; the turn rows hold the rest."""
    try:
        pending, model = _pending_turns(requests)
        if not pending:
            return
        outcome = FlushOutcome()
        with TurnEvents(requests[0].hostname) as events:
            events.received(pending, model)
            try:
                _answer(pending, model, events, outcome)
            except Exception:  # a bug or an outage outside a batch: hand everything back
                logger.exception("flush of %d turns failed outside a batch; sending them again", len(pending))
                outcome.resend = [Resend(pending, settings.batch_retry_delay)]
        # Re-send before this flush's messages are acked on return, so a crash in between loses nothing.
        for item in outcome.resend:
            _resend(item, model)
        if outcome.engine_dead is not None:
            from worker.lifecycle import stop_for_dead_engine

            stop_for_dead_engine(outcome.engine_dead)
    except Exception:  # never let celery-batches see an exception: it would ack and forget the flush
        logger.exception(
            "unexpected error in a flush of %d messages; its turns are left to the sweeper", len(requests)
        )


def _answer(pending: list[Pending], model: str, events: TurnEvents, outcome: FlushOutcome) -> None:
    """Answer the flush's turns a batch at a time; records in `outcome` what to send again."""
    from worker import engine as engine_module
    from worker.pipeline import process_batch  # the engine lives on worker machines only

    for start in range(0, len(pending), settings.batch_size):
        chunk, rest = pending[start : start + settings.batch_size], pending[start:]
        dead = engine_module.engine_dead()
        if dead is not None:  # messages that arrived after the engine died: straight back, untouched
            outcome.engine_dead = dead
            outcome.resend.append(Resend(rest))
            return
        if start and _live_waiting(model):
            outcome.resend.append(Resend(rest))
            return
        lane_of = dict(chunk)
        events.started(turn_id for turn_id, _ in chunk)
        try:
            report = process_batch([turn_id for turn_id, _ in chunk])
        except Exception:
            # The batch died mid-way (the database dropped, say); process_batch handed its turns back.
            logger.exception(
                "batch of %d turns failed; sending %d turns again in %.1f s",
                len(chunk),
                len(rest),
                settings.batch_retry_delay,
            )
            outcome.resend.append(Resend(rest, settings.batch_retry_delay))
            events.finished([], {}, (turn_id for turn_id, _ in rest))
            return
        events.finished(report.done, {t: f.reason for t, f in report.failed.items()}, report.send_again)
        outcome.resend.append(Resend([(t, lane_of[t]) for t in report.send_again], settings.flush_interval))
        # Another worker holds these under a live lease (a duplicate message): look again when it lapses.
        for turn_id, lease_left in report.held.items():
            outcome.resend.append(Resend([(turn_id, lane_of[turn_id])], lease_left + 1.0))
        if report.engine_dead is not None:
            outcome.engine_dead = report.engine_dead
            outcome.resend.append(Resend(pending[start + len(chunk) :]))
            return


def _live_waiting(model: str) -> bool:
    try:
        return bool(queue_depth(model, "live"))
    except Exception:  # the broker is briefly away: carry on with the bulk chunk rather than fail
        logger.warning("could not read the live queue's depth; carrying on", exc_info=True)
        return False


def _pending_turns(requests: Sequence[Any]) -> tuple[list[Pending], str]:
    """Every turn id of the flush, once, live lane first, otherwise in arrival order; and the model.

    A malformed message (no turn ids, an id that is not a UUID, an unknown lane) is logged and
    dropped on its own; the others go on.
    """
    seen: dict[uuid.UUID, Lane] = {}
    model = settings.model
    for request in requests:
        try:
            kwargs = request.kwargs
            lane = kwargs.get("lane", "live")
            if lane not in ("live", "bulk"):
                raise ValueError(f"unknown lane {lane!r}")
            ids = [uuid.UUID(str(turn_id)) for turn_id in kwargs["turn_ids"]]
            model = kwargs.get("model", model)
        except Exception as exc:
            logger.error("dropping malformed message %s: %r", getattr(request, "id", "?"), exc)
            continue
        for turn_id in ids:
            seen.setdefault(turn_id, lane)
    return sorted(seen.items(), key=lambda item: item[1] != "live"), model


def _resend(item: Resend, model: str) -> None:
    """Send the turns again, per lane; after retries, log the ids left to the sweeper."""
    for lane in ("live", "bulk"):
        ids = [t for t, t_lane in item.turns if t_lane == lane]
        if not ids:
            continue
        try:
            _dispatch_with_retry(ids, model, lane, item.countdown)
        except Exception:
            logger.error(
                "could not send %d turns again; the sweeper will: %s",
                len(ids),
                " ".join(str(t) for t in ids),
                exc_info=True,
            )


@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=4), reraise=True)
def _dispatch_with_retry(ids: list[uuid.UUID], model: str, lane: Lane, countdown: float | None) -> None:
    dispatch(ids, model=model, lane=lane, countdown=countdown)


def dispatch(
    turn_ids: Iterable[uuid.UUID], *, model: str, lane: Lane = "live", countdown: float | None = None
) -> None:
    """Send turns to their model's queue for that lane: one per live message, a batch per bulk one."""
    ids = [str(turn_id) for turn_id in turn_ids]
    per_message = 1 if lane == "live" else settings.batch_size
    queue = queue_for_model(model, lane)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(ids), per_message):
            generate_turns.apply_async(
                kwargs={"turn_ids": ids[start : start + per_message], "model": model, "lane": lane},
                queue=queue,
                countdown=countdown,
                producer=producer,
            )
