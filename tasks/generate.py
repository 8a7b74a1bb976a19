"""The batched generation task: celery-batches buffers turn messages and hands them over as one list.

A live message carries one turn id; a bulk message carries up to `batch_size` of them, so a
100,000-line run is ~100,000 / batch_size messages. The worker runs flushes in threads
(`MLCHAT_WORKER_THREADS`), all feeding the one engine loop (worker/engine_loop.py): a live flush
gets a thread of its own and its turns run ahead of bulk ones inside the engine, so a player never
waits for a bulk chunk to finish. A flush's messages are acked when the task returns, after every
one of its turns was stored or handed back.

celery-batches acks every message of a flush when the task returns, whatever happened, so nothing
may escape this task: a malformed message is logged and dropped alone, a batch that raises hands its
turns back and they come back each in a batch of its own (a turn whose data breaks a batch-level
stage would otherwise take its batch-mates to their attempt cap with it), and a re-send that fails
is retried with backoff and, if it still fails, logged with the turn ids it leaves to the sweeper
(`mlchat sweep`), which is told to send them at its next run.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from tenacity import retry, stop_after_attempt, wait_exponential

from core.now_and_then import NowAndThen
from core.settings import Lane, queue_for_model, settings
from tasks.admission import BulkGatedBatches, bulk_gate, bulk_turns_in, deferred
from tasks.app import app, within_visibility
from tasks.batches import COUNTDOWN_HEADER
from tasks.events import TurnEvents

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.generate_turns"

Pending = tuple[uuid.UUID, Lane]


@dataclass
class Resend:
    """Turns to send again after this flush, and when."""

    turns: list[Pending]
    countdown: float | None = None
    model: str | None = None  # None: the flush's model
    stamp: bool = False  # record the send (dispatched_at): new scene steps, created unsent
    alone: bool = False  # each turn answered in a batch of its own: they were in a batch that raised


@dataclass
class FlushOutcome:
    resend: list[Resend] = field(default_factory=list)
    # Sends the batches' claims took on (new scene steps, stalled earlier turns): made whatever else
    # becomes of the flush, since nothing else makes them.
    claimed: list[Resend] = field(default_factory=list)
    engine_dead: BaseException | None = None
    bulk_owed: int = 0  # bulk turns this flush still counts against the worker's bulk admission
    recorded: set[uuid.UUID] = field(default_factory=set)  # turns of the chunks recorded so far


@app.task(
    base=BulkGatedBatches,
    name=TASK_NAME,
    flush_every=settings.flush_every,
    flush_interval=settings.flush_interval,
    acks_late=True,
    ignore_result=True,
)
def generate_turns(requests: list[Any]) -> None:
    """Answer the turns of the buffered messages. Messages carry only ids; the turn rows hold the rest."""
    # A deferred message was not counted on arrival (its countdown would have held the gate): it is
    # now, for as long as this flush holds its turns. In a flush of its own kind only (no counted
    # bulk message, whose flush holds a thread already), it takes a thread of its own: while the
    # gate is full it is sent again for a little later instead.
    bulk_of = [bulk_turns_in((r.args, r.kwargs)) for r in requests]
    is_due = [bool(n) and deferred(r.request_dict) for n, r in zip(bulk_of, requests, strict=True)]
    due = [n for n, d in zip(bulk_of, is_due, strict=True) if d]
    counted = any(n and not d for n, d in zip(bulk_of, is_due, strict=True))
    if due and not counted and not bulk_gate.admit_due(sum(due), len(due)):
        _postpone([r for r, d in zip(requests, is_due, strict=True) if d])
        requests = [r for r, d in zip(requests, is_due, strict=True) if not d]
        bulk_of = [n for n, d in zip(bulk_of, is_due, strict=True) if not d]
        if not requests:
            return
    elif counted:
        bulk_gate.hold(sum(due), len(due))
    # The gate counts bulk messages waiting for a flush and bulk flushes (each holds a thread until
    # it ends): this flush's messages count as one from now on.
    bulk_flushes = 1 if any(bulk_of) else 0
    bulk_gate.release(0, sum(1 for n in bulk_of if n) - bulk_flushes)
    outcome = FlushOutcome(bulk_owed=sum(bulk_of))
    try:
        pending, model_of, alone = _pending_turns(requests)
        if not pending:
            return
        model = model_of[pending[0][0]]  # the flush's own (a worker serves one model)
        with TurnEvents(requests[0].hostname) as events:
            for each in dict.fromkeys(model_of.values()):
                events.received([p for p in pending if model_of[p[0]] == each], each)
            try:
                send_owed = partial(_send_owed, outcome, model, model_of)
                _answer(pending, model, events, outcome, send_owed, alone=alone)
            except Exception:  # a bug or an outage outside a batch: hand back what no chunk recorded
                logger.exception(
                    "flush of %d turns failed outside a batch; sending them again: %s",
                    len(pending),
                    " ".join(str(turn_id) for turn_id, _ in pending),
                )
                left = [p for p in pending if p[0] not in outcome.recorded]
                outcome.resend = [*outcome.resend, *_resends(left, alone, settings.batch_retry_delay)]
        # Re-send before this flush's messages are acked on return, so a crash in between loses nothing.
        dead, outcome.engine_dead = outcome.engine_dead, None
        _send_owed(outcome, model, model_of)
        if dead is not None:
            from worker.lifecycle import stop_for_dead_engine

            stop_for_dead_engine(dead)
    except Exception:  # never let celery-batches see an exception: it would ack and forget the flush
        logger.exception(
            "unexpected error in a flush of %d messages; its turns are left to the sweeper", len(requests)
        )
    finally:
        bulk_gate.release(outcome.bulk_owed, bulk_flushes)


# How much later a due deferred bulk message is sent again while the bulk gate is full: about the
# gate's own look for room (CHECK_EVERY_S), so the turns wait no longer than new bulk messages do.
POSTPONED_S = 2.0


def _postpone(requests: Sequence[Any]) -> None:
    """Send these (deferred, now due) bulk messages' turns again, unclaimed, due POSTPONED_S later.
    They go to the back of their bulk queue, paused while the gate is full: they are taken after the
    backlog ahead of them, as a new bulk message is. Their send is recorded, or the sweeper would
    take a turn waiting behind a long backlog for one whose message was lost."""
    pending, model_of, alone = _pending_turns(requests)
    for by_itself in (False, True):
        turns = [p for p in pending if (p[0] in alone) == by_itself]
        if turns:
            _resend(Resend(turns, POSTPONED_S, alone=by_itself, stamp=True), settings.model, model_of)


def _send_owed(outcome: FlushOutcome, model: str, model_of: dict[uuid.UUID, str]) -> None:
    """Make the sends `outcome` holds so far, once each; none while the engine is dead (the worker
    stops after the flush, and would only take its own turns back meanwhile)."""
    if outcome.engine_dead is not None:
        return
    owed, outcome.resend, outcome.claimed = [*outcome.resend, *outcome.claimed], [], []
    for item in owed:
        try:
            _resend(item, model, model_of)
        except Exception:  # _resend logs what it leaves to the sweeper; the other sends still go
            logger.exception("a re-send of %d turns failed; the sweeper sends them", len(item.turns))


def _answer(
    pending: list[Pending],
    model: str,
    events: TurnEvents,
    outcome: FlushOutcome,
    send_owed: Callable[[], None],
    *,
    alone: Collection[uuid.UUID] = (),
) -> None:
    """Answer the flush's turns, `batch_size` at a time and one lane per chunk (a turn in `alone`
    in a chunk of its own), all chunks at once: each chunk's prompts join the running engine as soon
    as they are built, so the engine never waits for a chunk barrier. Records in `outcome` what to
    send again, and has `send_owed` send it as each chunk ends: a live chunk's retries, deferred
    turns and a scene's next step do not wait for a slower bulk chunk of the same flush."""
    from worker import engine as engine_module

    dead = engine_module.engine_dead()
    if dead is not None:  # messages that arrived after the engine died: straight back, untouched
        outcome.engine_dead = dead
        outcome.resend += _resends(pending, alone)
        return
    size = settings.batch_size
    chunks = []
    for lane in ("live", "bulk"):
        chunks += [[p] for p in pending if p[1] == lane and p[0] in alone]
        turns = [p for p in pending if p[1] == lane and p[0] not in alone]
        chunks += [turns[i : i + size] for i in range(0, len(turns), size)]
    with ThreadPoolExecutor(max_workers=min(len(chunks), CHUNKS_AT_ONCE), thread_name_prefix="chunk") as pool:
        for chunk in chunks:
            events.started(turn_id for turn_id, _ in chunk)
        futures = {pool.submit(_answer_chunk, chunk): chunk for chunk in chunks}
        for future in as_completed(futures):
            chunk = futures[future]
            _record(chunk, future.result(), events, outcome, alone=chunk[0][0] in alone)
            send_owed()


# Chunks of one flush prepared side by side (their CPU stages overlap the engine and each other).
CHUNKS_AT_ONCE = 4


@dataclass
class ChunkRaised:
    """A batch that raised mid-way (the database dropped, say); process_batch handed its turns back."""

    error: BaseException
    report: Any  # the BatchReport as far as the batch got: turns it had written already are in it


# A database that is away fails every batch, each a second or so: said now and then, not each time.
_DATABASE_AWAY_SAID = NowAndThen(30.0)


def _answer_chunk(chunk: list[Pending]) -> Any:
    """process_batch for one chunk (one lane); the report, or ChunkRaised."""
    from core.panics import fenced
    from worker.pipeline import BatchReport, process_batch  # the engine lives on worker machines only

    lane: Lane = chunk[0][1]
    report = BatchReport(send_stalled=_send_stalled)
    try:
        return process_batch([turn_id for turn_id, _ in chunk], lane=lane, report=report)
    except BaseException as exc:  # a native panic too: its turns come back each alone, as for any error
        if not fenced(exc):
            raise
        from db.session import database_away

        away = database_away(exc)
        if away is None:
            logger.exception(
                "batch of %d turns failed; sent again in %.1f s: %s",
                len(chunk),
                settings.batch_retry_delay,
                " ".join(str(turn_id) for turn_id, _ in chunk),
            )
        elif (batches := _DATABASE_AWAY_SAID.due()) is not None:  # one line a while, no traceback
            logger.warning(
                "%s: %d batch(es) failed since the last line, their turns sent again (every %.1f s)",
                away,
                batches,
                settings.batch_retry_delay,
            )
        return ChunkRaised(exc, report)


def _resends(
    turns: list[Pending], alone: Collection[uuid.UUID], countdown: float | None = None
) -> list[Resend]:
    """`turns` sent again: those sent to be answered alone, alone again; the others as they came."""
    batched, single = [p for p in turns if p[0] not in alone], [p for p in turns if p[0] in alone]
    return [Resend(batched, countdown), *([Resend(single, countdown, alone=True)] if single else [])]


def _record(
    chunk: list[Pending], result: Any, events: TurnEvents, outcome: FlushOutcome, *, alone: bool = False
) -> None:
    """What became of a chunk, and what to send again. A turn sent to be answered alone is sent
    alone again whatever brings it back (deferred, held, its adapter looked at later): in a batch, it
    could break its batch-mates' batch once more."""
    lane_of = dict(chunk)
    if chunk[0][1] == "bulk":  # answered or handed back: the engine has room for more bulk work
        answered = min(len(chunk), outcome.bulk_owed)
        bulk_gate.release(answered)
        outcome.bulk_owed -= answered
    if isinstance(result, ChunkRaised):
        # Turns whose next attempt waits (an adapter looked at again later) keep their wait: sent
        # again with the chunk, each would be charged an attempt for a cause still passing.
        # The others come back each alone: if one of them broke the batch, it fails on its own. After
        # the database's connection was lost too: a statement that crashes its backend every time
        # looks the same as an outage, and batched, its mates would share its fate (an outage's
        # recovery costs one round of one-turn batches).
        later = result.report.retry_in
        home = {t.id for t in result.report.elsewhere}  # sent to their model's queue (_claimed_sends)
        again = [p for p in chunk if p[0] not in later and p[0] not in home]
        outcome.resend.append(Resend(again, settings.batch_retry_delay, alone=True))
        outcome.resend += _after_waits(later, lane_of, alone=alone)
        outcome.claimed += _claimed_sends(result.report)
        outcome.recorded.update(lane_of)  # only once its sends are queued: the catch-all sends the rest
        stored = set(result.report.done)  # written by its groups before it raised
        # Its failures that were written (the claim's, a group's): failed, not retried (observability
        # review); one it only noted is sent again with the rest (its hand-back may not have reached it)
        written = result.report.failed_written
        failed = {t: f.reason for t, f in result.report.failed.items() if t in written and t not in stored}
        ended = set(result.report.skipped)
        retried = [t for t, _ in chunk if t not in stored and t not in failed and t not in ended]
        events.finished(result.report.done, failed, retried, result.report.skipped)
        return
    report = result
    failed = {t: f.reason for t, f in report.failed.items()}
    events.finished(report.done, failed, [*report.send_again, *report.deferred], report.skipped)
    now = [t for t in report.send_again if t not in report.retry_in]
    outcome.resend.append(Resend([(t, lane_of[t]) for t in now], settings.flush_interval, alone=alone))
    outcome.resend += _after_waits(report.retry_in, lane_of, alone=alone)
    outcome.claimed += _claimed_sends(report)
    # Waiting for an earlier turn: looked at again later each time, not every flush_interval for ever.
    waiting: dict[float, list[Pending]] = {}
    for turn_id, deferrals in report.deferred.items():
        waiting.setdefault(deferral_delay(deferrals), []).append((turn_id, lane_of[turn_id]))
    outcome.resend += [Resend(turns, delay, alone=alone) for delay, turns in waiting.items()]
    # Another worker holds these under a live lease (a duplicate message): look again when it lapses.
    for turn_id, lease_left in report.held.items():
        outcome.resend.append(Resend([(turn_id, lane_of[turn_id])], lease_left + 1.0, alone=alone))
    if report.engine_dead is not None:
        outcome.engine_dead = report.engine_dead
    outcome.recorded.update(lane_of)  # only once its sends are queued: the catch-all sends the rest


def _claimed_sends(report: Any) -> list[Resend]:
    """The sends a batch took on, whether it finished or raised later: nothing else makes them.
    Scenes' next steps, created with the steps stored (one message per model, so the open scenes'
    steps reach the engine together); and the earlier turns its turns wait for that lost their
    worker, if the batch did not send them as its claim committed (the claim recorded the send, so
    no other look sends them again)."""
    steps: dict[str, list[Pending]] = {}
    for step in report.next_steps:
        steps.setdefault(step.model, []).append((step.turn_id, step.lane))
    sends = [Resend(turns, model=model, stamp=True) for model, turns in steps.items()]
    return sends + _stalled_sends(report.stalled) + _stalled_sends(report.elsewhere, HOME_AFTER_S)


# Another model's turns go back to their queue after a wait: where this worker consumes that queue
# too (the queue added to it, with no worker of that model left), each would come straight back.
HOME_AFTER_S = 30.0


def _stalled_sends(stalled: list[Any], countdown: float | None = None) -> list[Resend]:
    """Earlier turns that lost their worker, each to its model's queue, so that a claim takes them
    first (and another model's turns a claim left, `countdown` s on: _sent_home)."""
    return [
        Resend([(turn.id, "bulk" if turn.run_id is not None else "live")], countdown, model=turn.model)
        for turn in stalled
    ]


def _send_stalled(stalled: list[Any]) -> None:
    """A batch's claim found these stalled and stamped them sent: sent now, before its replies."""
    for item in _stalled_sends(stalled):
        _resend(item, settings.model)


def _after_waits(
    retry_in: dict[uuid.UUID, float], lane_of: dict[uuid.UUID, Lane], *, alone: bool = False
) -> list[Resend]:
    """Turns retried once the worker looks at what failed them again (within the visibility
    timeout: a countdown message held past it would be handed out again)."""
    later: dict[float, list[Pending]] = {}
    for turn_id, wait in retry_in.items():
        delay = within_visibility(max(wait, settings.flush_interval))
        later.setdefault(delay, []).append((turn_id, lane_of[turn_id]))
    return [Resend(turns, delay, alone=alone) for delay, turns in later.items()]


def deferral_delay(deferrals: int) -> float:
    """Seconds before a deferred turn is looked at again: flush_interval, doubling with each
    deferral, at most defer_max_delay_s."""
    exponent = min(max(deferrals - 1, 0), 32)
    return min(settings.flush_interval * 2.0**exponent, settings.defer_max_delay_s)


def _pending_turns(requests: Sequence[Any]) -> tuple[list[Pending], dict[uuid.UUID, str], set[uuid.UUID]]:
    """Every turn id of the flush, once, live lane first, otherwise in arrival order; the model
    each one's message named (a worker that also consumes another model's queues, with Celery's
    add_consumer, sends that model's turns back to that model's queues); and the turns a message
    sent to be answered alone.

    A malformed message (no turn ids, an id that is not a UUID, an unknown lane) is logged and
    dropped on its own; the others go on.
    """
    seen: dict[uuid.UUID, Lane] = {}
    model_of: dict[uuid.UUID, str] = {}
    alone: set[uuid.UUID] = set()
    for request in requests:
        try:
            kwargs = request.kwargs
            lane = kwargs.get("lane", "live")
            if lane not in ("live", "bulk"):
                raise ValueError(f"unknown lane {lane!r}")
            ids = [uuid.UUID(str(turn_id)) for turn_id in kwargs["turn_ids"]]
            model = kwargs.get("model", settings.model)
            if not isinstance(model, str) or not model:
                raise ValueError(f"bad model {model!r}")
        except Exception as exc:
            logger.error("dropping malformed message %s: %r", getattr(request, "id", "?"), exc)
            continue
        for turn_id in ids:
            seen.setdefault(turn_id, lane)
            model_of.setdefault(turn_id, model)
        if kwargs.get("alone") is True:
            alone.update(ids)
    return sorted(seen.items(), key=lambda item: item[1] != "live"), model_of, alone


def _resend(item: Resend, model: str, model_of: dict[uuid.UUID, str] | None = None) -> None:
    """Send the turns again, per lane, each to the model its message named (`model_of`, else
    `model`) unless the item names one; after retries, log the ids left to the sweeper."""
    groups: dict[tuple[str, Lane], list[uuid.UUID]] = {}
    for turn_id, lane in item.turns:
        target = item.model or (model_of or {}).get(turn_id, model)
        groups.setdefault((target, lane), []).append(turn_id)
    for (target, lane), ids in groups.items():
        sent: list[uuid.UUID] = []  # over every try: a message that went out is not lost
        try:
            _dispatch_with_retry(ids, target, lane, item.countdown, sent, alone=item.alone)
        except Exception:
            went = set(sent)
            unsent = [t for t in ids if t not in went]
            logger.error(
                "could not send %d turns again; the sweeper will: %s",
                len(unsent),
                " ".join(str(t) for t in unsent),
                exc_info=True,
            )
            # Unsent: the next sweep sends them (else it waits a visibility timeout); the scene
            # steps whose message did go out are stamped sent.
            _record_sends(unsent, failed=True)
            if item.stamp and sent:
                _record_sends(sent, failed=False)
            continue
        if item.stamp:  # unstamped, the sweeper would send them again after a lease (harmless)
            _record_sends(ids, failed=False)


def _record_sends(ids: list[uuid.UUID], *, failed: bool) -> None:
    """Stamp these turns sent now, or (`failed`) sent long ago (db/turns.py); best effort: with the
    database away too, the sweeper finds them after the visibility timeout."""
    from db.session import session_scope  # the worker's database, only when a send is recorded
    from db.turns import mark_dispatched, mark_send_failed

    stamp = mark_send_failed if failed else mark_dispatched
    try:
        with session_scope() as session:
            stamp(session=session, turn_ids=ids)
    except Exception:
        logger.warning("could not record the sends of %d turns", len(ids), exc_info=True)


@retry(stop=stop_after_attempt(4), wait=wait_exponential(multiplier=0.5, max=4), reraise=True)
def _dispatch_with_retry(
    ids: list[uuid.UUID],
    model: str,
    lane: Lane,
    countdown: float | None,
    sent: list[uuid.UUID] | None = None,
    *,
    alone: bool = False,
) -> None:
    done = set(sent or ())
    left = [t for t in ids if t not in done]
    dispatch(left, model=model, lane=lane, countdown=countdown, sent=sent, alone=alone)


def dispatch(
    turn_ids: Iterable[uuid.UUID],
    *,
    model: str,
    lane: Lane = "live",
    countdown: float | None = None,
    sent: list[uuid.UUID] | None = None,
    alone: bool = False,
) -> None:
    """Send turns to their model's queue for that lane: one per live message, a batch per bulk one;
    `sent` gets the ids of each message as it goes (so a caller knows which went before a failure);
    `alone`: the worker answers each in a batch of its own."""
    turn_ids = list(turn_ids)
    ids = [str(turn_id) for turn_id in turn_ids]
    per_message = 1 if lane == "live" else settings.batch_size
    queue = queue_for_model(model, lane)
    parent = app.current_worker_task  # a flush sending turns again: its id goes in, as apply_async does
    root_id = parent and (parent.request.root_id or parent.request.id)
    with app.producer_or_acquire() as producer:
        for start in range(0, len(ids), per_message):
            kwargs: dict[str, Any] = {"turn_ids": ids[start : start + per_message], "model": model}
            kwargs |= {"lane": lane, "alone": True} if alone else {"lane": lane}
            # apply_async's message, built by Celery's own builder and sent by its own publisher, less
            # the per-call work this task does not need: routing (the queue is named), a safe repr of
            # the arguments (ids and names), and declaring a Redis queue (a list needs none).
            message = app.amqp.create_task_message(
                str(uuid.uuid4()),
                TASK_NAME,
                (),
                kwargs,
                countdown=countdown,
                reply_to=app.thread_oid,
                root_id=root_id,
                parent_id=parent and parent.request.id,
                ignore_result=True,
                argsrepr="()",
                kwargsrepr=repr(kwargs),
            )
            if countdown:  # what the receiver holds it at most from its arrival (tasks/batches.py)
                message.headers[COUNTDOWN_HEADER] = countdown
            app.amqp.send_task_message(producer, TASK_NAME, message, queue=queue, declare=[])
            if sent is not None:
                sent.extend(turn_ids[start : start + per_message])
