"""A memory job's claim kept alive while the job runs: its lease renewed from a thread, as a batch's
turns' are (worker/lease.py), so a generation waiting behind live work is not taken for a dead
worker's and handed to another (whose answer would then be thrown away in turn)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from core.panics import fenced
from core.settings import settings
from db.memory_jobs import release_job, renew_job
from db.session import again_while_away, session_scope
from worker.lease import LeaseKeeper

logger = logging.getLogger(__name__)


_this_thread = threading.local()


def forget_left_held() -> None:
    """A step begins on this thread: no claim of it is left held yet."""
    _this_thread.left_held = None


def claim_left_held() -> str | None:
    """The claim token this thread's step left held, if any: its release never got through (the
    database away longer than RELEASE_WITHIN_S), whether the step raised or ran. The step's resend
    gives it back first (tasks/memory.py): a message that found the job held by it was dropped, and
    the sweep later took the claim back as its worker's death, counted (memory review)."""
    return getattr(_this_thread, "left_held", None)


@contextmanager
def claiming(token: uuid.UUID) -> Iterator[None]:
    """Around a claim's transaction under `token`: a COMMIT that raised may have committed all the
    same, its reply lost with the connection, so the claim is left held until the commit is known
    (the step's resend gives it back first). Unmarked, the resend found the job held by it and was
    dropped, and the sweep took it back twenty minutes later as a worker's death, counted (review of
    database errors)."""
    _this_thread.left_held = str(token)
    yield
    _this_thread.left_held = None


class ClaimLapsed(Exception):
    """A memory job's step raised after its claim had lapsed and another claim took the job: the
    failure is not the job's to count (the other claim's step may have run, and cleared its count)."""


@contextmanager
def released(conversation_id: int, kind: str, token: uuid.UUID) -> Iterator[None]:
    """The job given back when the block ends: as run (its failures in a row ended) when the block
    ends without raising. A step that raised after another claim took the job raises ClaimLapsed
    instead (an engine's death as it was: that is counted apart, tasks/memory.py)."""
    from worker.engine import EngineDead

    try:
        yield
    except BaseException as exc:
        if not fenced(exc):  # a shutdown: one try, no wait, and the shutdown goes on whatever it meets
            try:
                _release(conversation_id, kind, token, ran=False)
            except Exception:
                logger.warning("memory job %s of conversation %s: its claim lapses", kind, conversation_id)
            raise
        # the step's error, a native panic's too (review: one was taken for a shutdown, never counted)
        held = _release_when_back(conversation_id, kind, token, ran=False, failed=exc)
        if not held and not isinstance(exc, EngineDead):
            raise ClaimLapsed(f"memory job {kind} of conversation {conversation_id}: {exc!r}") from exc
        raise
    _release_when_back(conversation_id, kind, token, ran=True)


# A claim is given back once the database answers again (a restart takes seconds): a claim left held
# lapses, and the sweep then takes it back as its worker's death, counted as a failure of the job
# (db/memory_jobs.py), which an outage is not. Waits of 1 s doubling to 16 s, none begun past 45 s.
RELEASE_FIRST_WAIT_S = 1.0
RELEASE_WITHIN_S = 45.0


def _release_when_back(
    conversation_id: int, kind: str, token: uuid.UUID, *, ran: bool, failed: BaseException | None = None
) -> bool:
    """_release, tried again while the database is away. A step that `failed` keeps its own error: a
    release that never got through is logged (the claim lapses), and reads as still held."""
    try:
        return again_while_away(
            lambda: _release(conversation_id, kind, token, ran=ran),
            within_s=RELEASE_WITHIN_S,
            first_wait_s=RELEASE_FIRST_WAIT_S,
            max_wait_s=16 * RELEASE_FIRST_WAIT_S,
        )
    except Exception:
        _this_thread.left_held = str(token)  # the step's resend gives it back first
        if failed is None:
            raise
        logger.warning(
            "memory job %s of conversation %s: its claim could not be given back; its resend will",
            kind,
            conversation_id,
            exc_info=True,
        )
        return True


def _release(conversation_id: int, kind: str, token: uuid.UUID, *, ran: bool) -> bool:
    with session_scope() as session:
        return release_job(session=session, conversation_id=conversation_id, kind=kind, token=token, ran=ran)


def keeping(conversation_id: int, kind: str, token: uuid.UUID) -> LeaseKeeper:
    """`with keeping(conversation, kind, token): ...` renews the job's lease until the block ends, no
    longer than the broker's visibility timeout in all (a hung worker lets its job go in the end)."""
    lease_s = settings.memory_job_lease_s
    return LeaseKeeper(
        token,
        lease_s,
        settings.visibility_timeout,
        renew=lambda session: renew_job(
            session=session, conversation_id=conversation_id, kind=kind, token=token, lease_s=lease_s
        ),
    )
