"""The completion-callback tasks (a batch's, a turn's): every worker consumes their queue; Celery retries
them with backoff, when the receiver failed and when the database did (the delivery reads the run and
records each try: a blip there must not drop a callback that a try was recorded for, as the sweep
looks again only at callbacks never tried). A retry after a POST that went through but could not be
recorded posts again: deliveries are at least once, and X-Mlchat-Delivery names each for the receiver
to drop a repeat.

Callbacks run in the worker threads that also run generation flushes, and their queue is read first;
a worker delivers at most MLCHAT_CALLBACK_CONCURRENCY at once (and at most half its threads), so
receivers that hang (a host that accepts and never answers, a resolver that stalls) cannot take every
thread from live turns; and a tenant one of whose deliveries was slow (failed or not) holds all those slots
but one for two minutes, so its hanging receivers cannot hold back every other tenant's callbacks;
while another tenant's delivery waits for a slot, a tenant holding all but one takes no more. A
delivery that finds no slot is sent back to the queue, its try not counted, looked at again after
2 s, doubling each time it is sent back, up to a minute: one tenant's stalled deliveries back off,
and a newcomer tries at once. One that has waited a minute marks its callback held
(db/callbacks.py::hold_waiting), so housekeeping does not take it for a lost message and queue it
again.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery.signals import worker_init
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.settings import settings
from db.callbacks import HOLD_S, Owner, hold_waiting
from db.models import Run, Turn
from db.session import DATABASE_OUTAGES, session_scope
from services.callbacks import CallbackFailed, deliver
from services.turn_callbacks import deliver_turn
from tasks.admission import callback_slots
from tasks.app import app, within_visibility

logger = logging.getLogger(__name__)

CALLBACK_QUEUE = "mlchat.callbacks"


_SLOT_COUNT = callback_slots(settings.worker_threads)
_SLOTS = threading.BoundedSemaphore(_SLOT_COUNT)


@worker_init.connect
def _slots_of_this_pool(sender: Any = None, **_: object) -> None:
    """The slots as a share of the pool the worker really has: `--concurrency` given to `mlchat
    worker` overrides MLCHAT_WORKER_THREADS, and the bulk admission counts these slots against it
    (tasks/admission.py::pool_threads). Sent before the worker takes a task."""
    global _SLOT_COUNT, _SLOTS
    threads = getattr(sender, "concurrency", None)
    if isinstance(threads, int) and threads > 0:
        _SLOT_COUNT = callback_slots(threads)
        _SLOTS = threading.BoundedSemaphore(_SLOT_COUNT)


_shares_lock = threading.Lock()
_holding: dict[str | None, int] = {}  # deliveries of each tenant in a slot now
_struggling: dict[str | None, float] = {}  # tenants a delivery of which was slow: until when
_waiting: dict[str | None, float] = {}  # tenants a delivery of which was sent back: until it comes again
SLOT_WAIT_S = 2.0  # a delivery sent back is looked at again after this (up to twice it), doubling
SLOT_WAIT_MAX_S = 60.0
HOLD_AFTER_S = 60.0  # waiting longer for a slot marks the callback held (db/callbacks.py::hold_waiting)
_held_lock = threading.Lock()
_held: dict[str, float] = {}  # callbacks this process marked held: id -> when to mark again (monotonic)
_HELD_KEPT = 10_000


def _in_a_slot(
    task: Any,
    owner: Owner,
    deliver_one: Callable[[uuid.UUID], object],
    target: str,
    waits: int,
    since: float | None,
) -> None:
    """Deliver within one of the process's slots, and within its tenant's share of them while its
    receivers struggle, or send the task back for later, its try count as it was (a full house is
    not the receiver's failure)."""
    if not _SLOTS.acquire(blocking=False):
        with contextlib.suppress(*DATABASE_OUTAGES):  # who waits, so no other tenant takes its slot
            _waiting_for_a_slot(_tenant_of(owner, target), waits)
        _send_back(task, owner, target, waits, since)
        return
    # A try now (unless sent back below, which says its waits again): its retries (Celery's, from
    # this request, a failed lookup's too) start their wait for a slot afresh.
    kwargs = task.request.kwargs or {}
    task.request.kwargs = {k: v for k, v in kwargs.items() if k not in ("waits", "since")}
    try:
        tenant = _tenant_of(owner, target)
        admitted = _admit(tenant)
    except DATABASE_OUTAGES:  # the database away (a pool timeout too), not the receiver: no try spent
        _SLOTS.release()
        logger.warning(
            "callback %s: its tenant could not be read; it waits for a slot again", target, exc_info=True
        )
        _send_back(task, owner, target, waits, since)
        return
    except BaseException:
        _SLOTS.release()
        raise
    if not admitted:
        _SLOTS.release()  # first: the slot kept for other tenants is not held while this one waits
        _waiting_for_a_slot(tenant, waits)
        _send_back(task, owner, target, waits, since)
        return
    started = time.monotonic()
    try:
        deliver_one(uuid.UUID(target))
    finally:
        # Struggling is holding a slot long, answered or not: a receiver that refuses at once (a 410
        # of a stale URL) holds none, and halved a lone tenant's slots for minutes (review).
        _release(tenant, struggled=time.monotonic() - started > settings.callback_timeout_s / 2)
        _SLOTS.release()


def _send_back(task: Any, owner: Owner, target: str, waits: int, since: float | None) -> None:
    since = time.time() if since is None else since
    # `since` is another worker's clock: the waits' own least length decides too, so a worker whose
    # clock is behind still marks a callback held once it has waited a minute
    if time.time() - since > HOLD_AFTER_S or _least_waited(waits) > HOLD_AFTER_S:
        _hold(owner, target)
    _later(task, waits + 1, since)


def _tenant_of(owner: Owner, target: str) -> str | None:
    """The tenant of the run or turn calling back (None: gone, its delivery finds nothing to send)."""
    with session_scope() as session:
        return session.scalar(select(owner.tenant).where(owner.id == uuid.UUID(target)))


# A tenant one of whose deliveries took over half its timeout (failed or not) is struggling for this
# long after it, and the struggling tenants together hold at most all the slots but one: receivers
# that never answer (10 s a try, 8 tries, then housekeeping's for a day), one tenant's or several's,
# leave a slot to every other tenant's callbacks, while tenants whose receivers answer use every
# slot (one tenant alone, the usual deployment, is not halved). No reserve with one slot.
STRUGGLING_FOR_S = 120.0


def _admit(tenant: str | None) -> bool:
    """Count a delivery of the tenant in, unless its receivers struggle and the struggling tenants
    hold their share of the slots, or another tenant's delivery waits for a slot and this tenant holds
    all but one (review, stop 76: a receiver answering in just under half the timeout never
    struggled, and its tenant's backlog took every slot as each came free, another tenant's callback
    winning one in as many as that backlog held)."""
    with _shares_lock:
        now = time.monotonic()
        share = max(1, _SLOT_COUNT - 1)
        if _holding.get(tenant, 0) >= share and any(
            until > now for waiting, until in _waiting.items() if waiting != tenant
        ):
            return False
        if _struggling.get(tenant, 0.0) > now:
            held = sum(n for t, n in _holding.items() if _struggling.get(t, 0.0) > now)
            if held >= max(1, _SLOT_COUNT - 1):
                return False
        _holding[tenant] = _holding.get(tenant, 0) + 1
        return True


def _waiting_for_a_slot(tenant: str | None, waits: int) -> None:
    """Mark the tenant as waiting for a slot until its delivery, sent back now, comes again."""
    with _shares_lock:
        _mark(_waiting, tenant, time.monotonic() + 2 * _least_wait(waits + 1) + SLOT_WAIT_S)


def _mark(marks: dict[str | None, float], tenant: str | None, until: float) -> None:
    """Mark the tenant until then (under _shares_lock), the oldest mark dropped past _HELD_KEPT."""
    if len(marks) >= _HELD_KEPT and tenant not in marks:
        del marks[next(iter(marks))]
    marks[tenant] = until


def _release(tenant: str | None, struggled: bool) -> None:
    with _shares_lock:
        left = _holding.get(tenant, 1) - 1
        if left:
            _holding[tenant] = left
        else:
            _holding.pop(tenant, None)
        if struggled:  # only the time ends it: a quick delivery of the same tenant between hung ones does not
            _mark(_struggling, tenant, time.monotonic() + STRUGGLING_FOR_S)


def _least_wait(waits: int) -> float:
    """The shortest the `waits`th wait for a slot lasts (each lasts up to twice that)."""
    return min(SLOT_WAIT_MAX_S, SLOT_WAIT_S * 2 ** min(waits - 1, 6))


def _least_waited(waits: int) -> float:
    """The least time `waits` waits for a slot took, whatever the clocks say."""
    return sum(_least_wait(i) for i in range(1, waits + 1))


def _later(task: Any, waits: int, since: float) -> None:
    wait = _least_wait(waits) * (1.0 + random.random())
    countdown = within_visibility(wait)
    kwargs = {**(task.request.kwargs or {}), "waits": waits, "since": since}
    task.signature_from_request(
        task.request, kwargs=kwargs, countdown=countdown, retries=task.request.retries
    ).apply_async()


def _hold(owner: Owner, target: str) -> None:
    """Mark the callback held, at most once per half of HOLD_S from this process; best effort (the
    database away: housekeeping may queue it again, at least once as ever)."""
    now = time.monotonic()
    with _held_lock:
        if _held.get(target, 0.0) > now:
            return
        if len(_held) >= _HELD_KEPT:
            del _held[next(iter(_held))]
        _held[target] = now + HOLD_S / 2
    try:
        with session_scope() as session:
            until = hold_waiting(session=session, of=owner, row_id=uuid.UUID(target))
        if until is not None:  # marked by another process: look again when its mark needs renewing
            with _held_lock:
                _held[target] = now + max(0.0, until - HOLD_S / 2)
    except Exception:
        logger.warning("could not mark callback %s as waiting for a delivery slot", target, exc_info=True)


@app.task(
    name="mlchat.deliver_batch_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    # A tenant's receiver failing is expected: its last try of a burst is one INFO line, not an
    # ERROR traceback at each due retry for a day (the failure is on the row, callback_error).
    throws=(CallbackFailed,),
    retry_backoff=2,  # 2 s, 4 s, 8 s … (with jitter), capped below
    retry_backoff_max=int(within_visibility(600)),  # Celery's retry countdown, held unacked too
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
    bind=True,
)
def deliver_batch_callback(self: Any, run_id: str, waits: int = 0, since: float | None = None) -> None:
    _in_a_slot(self, Run, deliver, run_id, waits, since)


@app.task(
    name="mlchat.deliver_turn_callback",
    queue=CALLBACK_QUEUE,
    autoretry_for=(CallbackFailed, DBAPIError, PoolTimeout),
    throws=(CallbackFailed,),  # as the batch's
    retry_backoff=2,
    retry_backoff_max=int(within_visibility(600)),  # Celery's retry countdown, held unacked too
    retry_jitter=True,
    max_retries=settings.callback_max_attempts - 1,
    acks_late=True,
    bind=True,
)
def deliver_turn_callback(self: Any, turn_id: str, waits: int = 0, since: float | None = None) -> None:
    _in_a_slot(self, Turn, deliver_turn, turn_id, waits, since)
