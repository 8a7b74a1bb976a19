"""Completion callbacks' bookkeeping, the same for a run's (a batch's) and a turn's: each delivery
attempt, the callbacks never attempted (their message was lost), and those due again after their
tries failed."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from db.models import RUN_FINISHED, TURN_FINISHED, Run, Turn, TurnErrorCode

Owner = type[Run] | type[Turn]

# A failed try makes its callback due again this long after it, longer than any of the Celery
# burst's own retries waits (retry_backoff_max, 600 s), so the burst's retry comes first as a rule;
# past the burst, each due time doubles this, up to RETRY_MAX_S.
RETRY_FIRST_S = 900
RETRY_MAX_S = 3600
# What a callback's error says once its window closed.
GIVEN_UP = "no more tries: its callback window closed"
_MAX_DOUBLINGS = 2  # RETRY_FIRST_S * 2**2 is RETRY_MAX_S: the exponent never grows past it
# A delivery that waits for a worker's delivery slot (sent back to the queue, its message alive)
# keeps its callback due this far on, marked again once half of it has passed, so housekeeping takes
# it neither for a lost message (never tried) nor for one due again; if its message is lost after
# all, the callback falls due when the mark runs out.
HOLD_S = 3600


def with_callbacks(*, session: Session, turn_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """The turns among `turn_ids` that have a callback URL."""
    if not turn_ids:
        return []
    return list(
        session.scalars(select(Turn.id).where(Turn.id.in_(list(turn_ids)), Turn.callback_url.is_not(None)))
    )


def record_attempt(
    *, session: Session, of: Owner, row_id: uuid.UUID, error: str | None, again: bool = True, burst: int = 1
) -> int:
    """One delivery attempt of a run's (`of` Run) or a turn's callback: delivered (error None) or
    not, with why; returns the attempts so far. A failure that may be tried again (`again`: not a
    destination refused for good) makes the callback due again (RETRY_FIRST_S on, doubling once its
    attempts pass `burst`, the tries of one Celery burst). A delivered callback is never recorded again."""
    attempts = of.callback_attempts + 1
    retry_at = None
    if error is not None and again:
        doublings = func.least(_MAX_DOUBLINGS, func.greatest(0, attempts - burst))
        wait_s = func.least(RETRY_MAX_S, RETRY_FIRST_S * func.power(2, doublings))
        retry_at = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, wait_s)
    recorded = session.scalar(
        update(of)
        .where(of.id == row_id, of.callback_delivered_at.is_(None))
        .values(
            callback_attempts=attempts,
            callback_error=error,
            callback_delivered_at=func.now() if error is None else None,
            callback_retry_at=retry_at,
        )
        .returning(of.callback_attempts)
    )
    return int(recorded or 0)


def hold_waiting(*, session: Session, of: Owner, row_id: uuid.UUID) -> float | None:
    """A callback whose delivery waits for a slot: due HOLD_S from now, unless delivered or marked
    due more than half of that on already. None when marked now (or delivered); else the seconds
    from now until it is due as marked (by another process)."""
    later = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, HOLD_S)
    fresh = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, HOLD_S / 2)
    marked = session.scalar(
        update(of)
        .where(
            of.id == row_id,
            of.callback_delivered_at.is_(None),
            or_(of.callback_retry_at.is_(None), of.callback_retry_at < fresh),
        )
        .values(callback_retry_at=later)
        .returning(of.id)
    )
    if marked is not None:
        return None
    due = session.scalar(
        select(func.extract("epoch", of.callback_retry_at - func.now())).where(
            of.id == row_id, of.callback_delivered_at.is_(None)
        )
    )
    return None if due is None else float(due)


# How long after the cutoff a callback never attempted is still queued again, whatever the retry
# window: many sweeps' worth, since nothing else sends it.
LOST_WINDOW_FLOOR_S = 3600.0


def claim_lost_callbacks(
    *,
    session: Session,
    older_than_s: float,
    of: Owner = Run,
    limit: int = 1000,
    within_s: float = 86400.0,
) -> list[uuid.UUID]:
    """Finished runs (or turns: `of`) with a callback never attempted, finished longer ago than
    `older_than_s` (its message was lost: the broker was down, or the process died, when it ended)
    and within `within_s` (the callbacks' retry window: a delivery that fails every time before its
    attempt is recorded, a bug in it, is not queued again at every pass for ever). Not a turn that
    failed unsent: its request was answered 503, and a retry of it revives it; nor one whose delivery
    waits for a slot (hold_waiting: due later, claim_retries' then).

    Each is claimed for the caller to queue: made due again RETRY_FIRST_S on, so a later pass (or
    another sweeper) does not queue it once more while its message waits for a worker (each copy
    would POST it, or start a burst of its own); the message's delivery records its attempt, and a
    message lost again makes it claim_retries' once due. Rows another sweeper holds are skipped."""
    cutoff = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, older_than_s)
    # Counted from the cutoff, never narrower than LOST_WINDOW_FLOOR_S: a window of 0, "the burst
    # only", would otherwise match nothing (these callbacks never had their burst), and this runs in
    # `mlchat sweep` alone, as often as its operator runs it (a minute apart in compose).
    span = older_than_s + max(within_s, LOST_WINDOW_FLOOR_S)
    oldest = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, span)
    finished = RUN_FINISHED if of is Run else TURN_FINISHED
    query = select(of.id).where(
        of.status.in_(finished),
        of.callback_url.is_not(None),
        of.callback_delivered_at.is_(None),
        of.callback_attempts == 0,
        of.callback_retry_at.is_(None),
        of.finished_at < cutoff,
        of.finished_at >= oldest,
        # given up (its wait for a slot outlasted the retry window): never queued again
        func.coalesce(func.strpos(of.callback_error, GIVEN_UP), 0) == 0,
    )
    if of is Turn:
        query = query.where(Turn.error_code.is_distinct_from(TurnErrorCode.BROKER_UNREACHABLE.value))
    lost = query.order_by(of.finished_at).limit(limit).with_for_update(skip_locked=True).scalar_subquery()
    later = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, RETRY_FIRST_S)
    return list(
        session.scalars(update(of).where(of.id.in_(lost)).values(callback_retry_at=later).returning(of.id))
    )


def release_lost_claims(*, session: Session, of: Owner, row_ids: Sequence[uuid.UUID]) -> None:
    """Give back claim_lost_callbacks' claims of these callbacks (their message could not be queued):
    never attempted, they are lost callbacks again for the next pass."""
    session.execute(
        update(of)
        .where(
            of.id.in_(list(row_ids)),
            of.callback_attempts == 0,
            of.callback_delivered_at.is_(None),
            # the claim's own mark, not a later one: a worker holding the callback's first message
            # may have marked it due an hour on while it waits for a slot (hold_waiting)
            of.callback_retry_at <= func.now() + func.make_interval(0, 0, 0, 0, 0, 0, RETRY_FIRST_S),
        )
        .values(callback_retry_at=None)
    )


def claim_retries(*, session: Session, of: Owner, window_s: float, limit: int = 100) -> list[uuid.UUID]:
    """Callbacks due again of finished runs (or turns: `of`) that finished within `window_s`: their
    due time is moved RETRY_FIRST_S on (so that another housekeeper does not take them too) and their
    ids returned, for one more try each. One past the window is given up: its due time cleared, and
    its error says so. Rows another housekeeper holds are skipped, never waited for."""
    finished = RUN_FINISHED if of is Run else TURN_FINISHED
    due: tuple[Any, ...] = (of.callback_retry_at <= func.now(), of.callback_delivered_at.is_(None))
    # One never tried whose claim lapsed (the sweep that claimed it as lost died before queuing it,
    # or its message was lost again; a worker's hold for a slot ran out) goes back among the lost
    # ones, for a whole burst, while their own window holds it (review, stop 76: it was sent as a
    # burst's last try, or, under a window of 0, given up never tried).
    lost_since = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, max(window_s, LOST_WINDOW_FLOOR_S))
    untried = (of.callback_attempts == 0, of.finished_at >= lost_since)
    handed_back = select(of.id).where(*due, *untried).order_by(of.id).limit(limit)
    session.execute(
        update(of)
        .where(of.id.in_(handed_back.with_for_update(skip_locked=True).scalar_subquery()))
        .values(callback_retry_at=None)
    )
    due = (*due, ~and_(*untried))  # past this call's page of them: a later call's, never given up
    since = func.now() - func.make_interval(0, 0, 0, 0, 0, 0, window_s)
    late = select(of.id).where(*due, of.finished_at < since)
    session.execute(
        update(of)
        .where(
            of.id.in_(late.order_by(of.id).limit(limit).with_for_update(skip_locked=True).scalar_subquery())
        )
        .values(
            callback_retry_at=None,
            callback_error=func.concat_ws("; ", of.callback_error, GIVEN_UP),
        )
    )
    ready = (
        select(of.id)
        .where(*due, of.status.in_(finished), of.callback_url.is_not(None), of.finished_at >= since)
        .order_by(of.callback_retry_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    later = func.now() + func.make_interval(0, 0, 0, 0, 0, 0, RETRY_FIRST_S)
    return list(
        session.scalars(
            update(of)
            .where(of.id.in_(ready.scalar_subquery()))
            .values(callback_retry_at=later)
            .returning(of.id)
        )
    )
