"""Answer turns in this process, no queue or worker: `mlchat chat --inline` and the serverless handler."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

from core.settings import settings
from db.session import DATABASE_OUTAGES, session_scope
from db.turns import (
    cancel_dead_calls_turns,
    cancel_turns,
    claimable_before,
    inline_key,
    running_elsewhere,
)
from services.producer import TurnView, as_request, enqueue_turns, get_turn, tell_ended
from services.scenes import send_created_steps
from services.schemas import TurnRequest
from worker.embedder import check_space
from worker.engine import EngineDead
from worker.pipeline import process_batch

logger = logging.getLogger(__name__)


def answer_now(requests: Sequence[TurnRequest | dict[str, Any]]) -> list[TurnView]:
    """Store the turns, run them through the batch pipeline until each is finished, return them in order.

    Turns of one conversation are answered in order across rounds, exactly as a worker would; a
    turn that cannot finish within max_attempts + len(requests) rounds is returned as it stands.
    A turn whose next attempt must wait (an adapter that may load later: a worker sends it again only
    then) is returned as it stands too, queued with its reason: run again at once it would spend its
    attempts in milliseconds and fail for a cause that passes. Sending it again later runs it again.
    A turn returned unanswered without a client's idempotency key is cancelled (its resend is a new
    turn; left queued, the next call on its conversation would answer it too); a keyed one stays
    queued for the replay.
    Earlier turns of the same conversations that an earlier call left unanswered (it raised, or its
    process was stopped) are answered first, here: with no queue, nothing else would, and every later
    turn of their conversations would wait behind them for ever. A turn another call holds (a
    concurrent call on the same conversation took it as its own earlier turn), or one waiting behind
    another call's turn, is waited for, HELD_POLL_S between looks: while the other call's claim is
    renewed, and for at most a lease (or half the order wait limit) without progress otherwise; a turn
    whose claim lapsed (its process died) is answered here. Past that it is returned as it stands.
    EmbedderMismatch, with nothing stored, when the stored vectors are another embedder's.
    EngineDiedUnderCall once the engine dies (the process needs a fresh engine: a new process): see
    there what became of the call's turns.
    """
    return answer_stored(store_for_call(requests))


def store_for_call(requests: Sequence[Any]) -> list[uuid.UUID]:
    """answer_now's first step: the embedder checked, the call's turns stored unsent; their ids. One
    without a client's key is keyed as this call's own (INLINE_KEY_PREFIX, the call's id, its
    place): if the call dies mid-answer, the next call on its conversation cancels its turns rather
    than answering them besides the lines the client sends again."""
    check_space()
    call = uuid.uuid4()
    return enqueue_turns([inline_keyed(request, call, i) for i, request in enumerate(requests)], send=False)


def inline_keyed(request: Any, call: uuid.UUID, place: int) -> TurnRequest:
    """The request, with its call's automatic key when it carries no client's key."""
    parsed = as_request(request)
    if parsed.idempotency_key is not None:
        return parsed
    return parsed.model_copy(update={"idempotency_key": inline_key(call, place)})


def answer_stored(ids: list[uuid.UUID]) -> list[TurnView]:
    """answer_now for turns stored already (and not sent): run until each is finished, in order. A
    call that raises leaves none of its turns stored without a client's key queued (see
    EngineDiedUnderCall): the caller is told to send it again, which stores them anew."""
    try:
        views = _answer_in_order(ids)
    except EngineDiedUnderCall:
        raise  # its turns are seen to already
    except BaseException:
        _cancel_unkeyed(ids)
        raise
    if all(view.finished for view in views):
        return views
    # Returned unanswered (an adapter that may load later, a wait on another call that ran out): with
    # no queue, one without a client's key left queued would be answered by the next call on its
    # conversation as an earlier turn, besides its resend: cancelled, its reason kept. A keyed one
    # stays for the replay.
    reasons: dict[str, list[uuid.UUID]] = {}
    for view in views:
        if not view.finished:
            reasons.setdefault(NOT_ANSWERED + unanswered_reason(view), []).append(view.id)
    for reason, turns in reasons.items():
        _cancel_unkeyed(turns, reason)
    return views_of(ids)


def unanswered_reason(view: TurnView) -> str:
    """Why a call returns a turn unanswered: its retry's reason, or the wait it gave up."""
    return view.error or "it waited for an earlier turn of its conversation that another call holds"


NOT_ANSWERED = "not answered in this call: "
# A call still alive whose turn this is (its lease lapsed in a long database outage) is told to be
# sent again, as for any turn it returns unanswered (review).
DIED_MID_ANSWER = (
    NOT_ANSWERED + "its call died before it was answered; the call sent again stores its line anew"
)


def unanswered(views: Sequence[TurnView]) -> list[TurnView]:
    """The turns a call returned for a resend to answer (answer_stored: queued, kept for the replay,
    or cancelled with that reason). Not one cancelled on purpose (a DELETE, a stopped run or a closed
    scene), which sending again would not answer; nor one still running, which another call's live
    claim holds and answers (a resend would answer it twice, or wait on it again)."""
    return [
        view
        for view in views
        if view.status.value == "queued"
        or (view.status.value == "cancelled" and (view.error or "").startswith(NOT_ANSWERED))
    ]


def views_of(ids: Sequence[uuid.UUID]) -> list[TurnView]:
    """The turns as they stand, in order (one removed meanwhile left out)."""
    return [view for view in map(get_turn, ids) if view is not None]


def _cancel_unkeyed(ids: list[uuid.UUID], reason: str | None = None) -> bool:
    """Cancel the call's claimable turns (queued, or whose lease lapsed) stored without a client's
    key (a call sent again stores them anew), `reason` their error; False if the database is away
    (they stand as handed back)."""
    try:
        with session_scope() as session:
            cancel_turns(session=session, turn_ids=ids, unkeyed_only=True, reason=reason)
    except DATABASE_OUTAGES:
        logger.warning("the call stopped and the database is away: its turns stand as handed back")
        return False
    return True


def _answer_in_order(ids: list[uuid.UUID]) -> list[TurnView]:
    earlier, _ = _lapsed_blockers(ids)  # left by an earlier call that stopped part-way: nothing sends them
    pending = list(dict.fromkeys([*earlier, *ids]))
    rounds = settings.max_attempts + len(pending)
    # Waiting on other calls: until `patience` without progress, never past `give_up` in all.
    patience, give_up = _patience(), time.monotonic() + settings.order_wait_limit_s / 2
    seen_waiting: set[Any] = set()  # turns found waiting since the last progress
    idle_looks = 0
    while pending and rounds > 0:
        batch = pending[: settings.batch_size]
        report = process_batch(batch)
        # A group's step stored here created the next one: a worker's task sends it, so this call does
        # (scenes review: it waited for the sweeper, and a later line of the group behind it failed).
        send_created_steps(report.next_steps)
        if report.engine_dead is not None:  # nothing more runs in this process
            raise _stopped_by(report.engine_dead, ids) from report.engine_dead
        now = [t for t in report.retry if t not in report.retry_in]
        # Its claim stamped them sent: answered here, first (another model's wait for the sweeper); a
        # dead call's own are cancelled (review: a lease lapsing while this call waited was found here).
        found_stalled = [t.id for t in report.stalled if t.model == settings.model]
        stalled = _not_a_dead_calls(found_stalled)
        unblocked = len(stalled) < len(found_stalled)  # the turns behind those cancelled may go on now
        # Another call's claim holds them, their turn is yet to come, or another claim took them from us.
        waiting = [*report.held, *report.deferred, *report.lost]
        # Waiting turns go last, so they never keep this call's other turns out of a batch.
        pending = list(dict.fromkeys([*stalled, *now, *pending[settings.batch_size :], *waiting]))
        if stalled or unblocked or not set(batch) <= set(waiting):
            rounds -= 1
            patience, idle_looks = _patience(), 0
            seen_waiting.clear()
            continue
        seen_waiting |= set(waiting)
        if not set(pending) <= seen_waiting:
            continue  # turns not looked at since the last progress: their batch next
        # Every turn left waits, on another call or on nothing: one look, then a pause.
        seen_waiting.clear()
        taken_over, cancelled = _lapsed_blockers(pending)  # their call died: answered here, first
        if taken_over or cancelled:
            pending = list(dict.fromkeys([*taken_over, *pending]))
            continue
        # A held turn is waited for while its holder renews its lease (its lease's end moves on).
        held_for = max(report.held.values(), default=0.0) + HELD_POLL_S
        patience = min(max(patience, time.monotonic() + held_for), give_up)
        idle_looks = 0 if _running_elsewhere(pending) else idle_looks + 1
        # Twice nothing running, a look apart: a claim committing as we looked is seen the second time.
        if time.monotonic() >= patience or idle_looks >= 2:
            break
        time.sleep(HELD_POLL_S)
    return views_of(ids)


class EngineDiedUnderCall(EngineDead):
    """The engine died during a call. Its turns not yet answered were handed back uncharged; those
    stored under a client's idempotency key stay queued (the call sent again with the same keys
    replays them, and they are answered first), the others are cancelled: a call sent again stores
    them anew, and a turn left queued would be answered besides (twice in its conversation), or
    never (a conversation of its own that nothing calls again). `views`: the call's turns as they
    stand, answered ones included."""

    def __init__(self, cause: BaseException, views: list[TurnView]) -> None:
        super().__init__(str(cause), in_engine=getattr(cause, "in_engine", False))
        self.views = views


def _stopped_by(cause: BaseException, ids: list[uuid.UUID]) -> EngineDiedUnderCall:
    """The call's end at an engine death; the database away meanwhile is no reason to hide the death
    (the container must still be replaced): then no views, and the turns are as the hand-back left
    them (a turn it could not hand back is answered once its lease lapses)."""
    views: list[TurnView] = []
    if _cancel_unkeyed(ids):
        try:
            views = views_of(ids)
        except DATABASE_OUTAGES:
            logger.warning("the engine died and the database went away: the call's turns not read")
    return EngineDiedUnderCall(cause, views)


def _patience() -> float:
    """Until when to wait for turns of another call with no progress here: a lease, and never as long
    as the claim's order wait limit, which would fail a waiting turn as blocked."""
    return time.monotonic() + min(settings.lease_seconds, settings.order_wait_limit_s / 2)


def _not_a_dead_calls(turn_ids: list[Any]) -> list[Any]:
    """These turns, less a dead call's own, which are cancelled (cancel_dead_calls_turns)."""
    if not turn_ids:
        return turn_ids
    with session_scope() as session:
        dead = cancel_dead_calls_turns(session=session, turn_ids=turn_ids, reason=DIED_MID_ANSWER)
    tell_ended(dead)
    return [turn for turn in turn_ids if turn not in dead]


def _lapsed_blockers(turn_ids: Sequence[Any]) -> tuple[list[Any], bool]:
    """The earlier turns these turns wait behind that a claim can take now (queued, or running under
    a lease that lapsed: the call that held it died), but a dead call's own, cancelled (told once
    the cancel committed); and whether any was (the turns behind it may go on now)."""
    with session_scope() as session:
        earlier = claimable_before(session=session, turn_ids=turn_ids, model=settings.model)
    kept = _not_a_dead_calls(earlier)
    return kept, len(kept) < len(earlier)


# Between two looks at turns another call holds.
HELD_POLL_S = 0.5


def _running_elsewhere(turn_ids: Sequence[Any]) -> bool:
    with session_scope() as session:
        return running_elsewhere(session=session, turn_ids=turn_ids)
