"""Answer turns in this process, no queue or worker: `mlchat chat --inline` and the serverless handler."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from core.settings import settings
from db.session import session_scope
from db.turns import claimable_before, running_elsewhere
from services.producer import TurnView, enqueue_turns, get_turn
from services.schemas import TurnRequest
from worker.embedder import check_space
from worker.pipeline import process_batch


def answer_now(requests: Sequence[TurnRequest | dict[str, Any]]) -> list[TurnView]:
    """Store the turns, run them through the batch pipeline until each is finished, return them in order.

    Turns of one conversation are answered in order across rounds, exactly as a worker would; a
    turn that cannot finish within max_attempts + len(requests) rounds is returned as it stands.
    A turn whose next attempt must wait (an adapter that may load later: a worker sends it again only
    then) is returned as it stands too, queued with its reason: run again at once it would spend its
    attempts in milliseconds and fail for a cause that passes. Sending it again later runs it again.
    Earlier turns of the same conversations that an earlier call left unanswered (it raised, or its
    process was stopped) are answered first, here: with no queue, nothing else would, and every later
    turn of their conversations would wait behind them for ever. A turn another call holds (a
    concurrent call on the same conversation took it as its own earlier turn), or one waiting behind
    another call's turn, is waited for, HELD_POLL_S between looks, for at most MLCHAT_LEASE_SECONDS
    without progress, and taken over if that call's claim lapses (its process died); past that it is
    returned as it stands.
    EmbedderMismatch, with nothing stored, when the stored vectors are another embedder's.
    """
    check_space()
    ids = enqueue_turns(requests, send=False)
    with session_scope() as session:  # left by an earlier call that stopped part-way: nothing else sends them
        earlier = claimable_before(session=session, turn_ids=ids, model=settings.model)
    pending = list(dict.fromkeys([*earlier, *ids]))
    rounds = settings.max_attempts + len(pending)
    patience = time.monotonic() + settings.lease_seconds
    while pending and rounds > 0:
        batch = pending[: settings.batch_size]
        report = process_batch(batch)
        now = [t for t in report.retry if t not in report.retry_in]
        # Its claim stamped them sent: answered here, first (another model's wait for the sweeper).
        stalled = [t.id for t in report.stalled if t.model == settings.model]
        waiting = [*report.held, *report.deferred]  # another call's claim holds them, or their turn
        pending = list(dict.fromkeys([*stalled, *now, *waiting, *pending[settings.batch_size :]]))
        if set(batch) <= set(waiting):  # no progress this round: waiting on another call, or on nothing
            if time.monotonic() >= patience or not _running_elsewhere(waiting):
                break
            time.sleep(HELD_POLL_S)
        else:
            rounds -= 1
            patience = time.monotonic() + settings.lease_seconds
    return [view for view in map(get_turn, ids) if view is not None]


# Between two looks at turns another call holds.
HELD_POLL_S = 0.5


def _running_elsewhere(turn_ids: Sequence[Any]) -> bool:
    with session_scope() as session:
        return running_elsewhere(session=session, turn_ids=turn_ids)
