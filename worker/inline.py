"""Answer turns in this process, no queue or worker: `mlchat chat --inline` and the serverless handler."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from core.settings import settings
from db.models import TurnStatus
from db.session import session_scope
from db.turns import claimable_before
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
    concurrent call on the same conversation took it as its own earlier turn) is waited for.
    EmbedderMismatch, with nothing stored, when the stored vectors are another embedder's.
    """
    check_space()
    ids = enqueue_turns(requests, send=False)
    with session_scope() as session:  # left by an earlier call that stopped part-way: nothing else sends them
        earlier = claimable_before(session=session, turn_ids=ids, model=settings.model)
    pending = list(dict.fromkeys([*earlier, *ids]))
    for _ in range(settings.max_attempts + len(pending)):
        if not pending:
            break
        report = process_batch(pending[: settings.batch_size])
        now = [t for t in report.retry if t not in report.retry_in]
        # Its claim stamped them sent: answered here, first (another model's wait for the sweeper).
        stalled = [t.id for t in report.stalled if t.model == settings.model]
        pending = list(dict.fromkeys([*stalled, *now, *report.deferred, *pending[settings.batch_size :]]))
    return _held_elsewhere_waited_for(ids)


# Between two looks at turns another call holds.
HELD_POLL_S = 0.5


def _held_elsewhere_waited_for(ids: Sequence[Any]) -> list[TurnView]:
    """The turns as they stand once none is running: a turn still running here is held by another
    call's claim (a concurrent call on the same conversation took it as its own earlier turn), which
    answers it; it is waited for, for at most a lease, and taken here if that claim lapses (its
    process died). It used to be returned `running`, unanswered."""
    deadline = time.monotonic() + settings.lease_seconds
    while True:
        views = [view for view in map(get_turn, ids) if view is not None]
        held = [view.id for view in views if view.status == TurnStatus.RUNNING]
        if not held or time.monotonic() >= deadline:
            return views
        time.sleep(HELD_POLL_S)
        process_batch(held)  # claims only what another call's lapsed claim left
