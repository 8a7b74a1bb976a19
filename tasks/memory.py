"""Memory jobs on the bulk lane: a rolling summary or a fact extraction for one conversation. The
message carries the conversation id and the kind; the job claims its row (db/memory_jobs.py), so a
duplicate or re-delivered message does nothing twice.

A message runs one step (one summary, or one stretch of lines read for facts) and sends the next
step if more is due, so a job holds a worker thread for one generation. At most
`memory_jobs_per_worker` run at once in a worker: a message finding them all taken is sent again
after `memory_job_retry_s` instead of waiting on a thread live flushes need."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from core.settings import queue_for_model, settings
from tasks.app import app, within_visibility

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.memory_job"

slots = threading.BoundedSemaphore(settings.memory_jobs_per_worker)


@app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
def memory_job(conversation_id: int, kind: str, release: str | None = None) -> None:
    """Run one step of a memory job; a failure is logged (the next stored reply schedules it again).
    `release`: the claim an earlier step left held (its release never got through), given back
    first, uncounted."""
    if not slots.acquire(blocking=False):
        delay = within_visibility(settings.memory_job_retry_s)
        send_memory_jobs([(conversation_id, kind)], countdown=delay, release=release)
        return
    from worker.engine import EngineDead

    try:
        if release is not None and not _give_back(conversation_id, kind, release):
            _send_later(conversation_id, kind, settings.memory_job_retry_s * 6, marked=False, release=release)
            return
        did = _run_step(conversation_id, kind)
    except EngineDead as exc:  # the worker's engine-death handling: hand the job on, stop the worker
        from worker.lifecycle import stop_for_dead_engine

        # Its request may be what killed it: joining the engine (a suspect), the next try goes alone,
        # then without the model; decoding already (present), after a few such deaths it goes alone.
        if exc.present:
            _count_death(conversation_id, kind, suspect=exc.in_engine)
        try:
            from memory.claim import claim_left_held

            _mark_resent(conversation_id, kind, 0.0)
            send_memory_jobs([(conversation_id, kind)], release=claim_left_held())
        except Exception:  # the broker away too: marked for the sweep to send; stop anyway
            logger.warning("could not hand memory job %s of %s on", kind, conversation_id, exc_info=True)
            _unmark_one(conversation_id, kind)
        finally:
            stop_for_dead_engine(exc)
        return
    finally:
        slots.release()
    if did:
        from memory.schedule import schedule_memory

        schedule_memory([conversation_id])  # the next step, if one is due


def _count_death(conversation_id: int, kind: str, *, suspect: bool) -> None:
    from db.memory_jobs import count_engine_death
    from db.session import session_scope

    try:
        with session_scope() as session:
            count_engine_death(session=session, conversation_id=conversation_id, kind=kind, suspect=suspect)
    except Exception:  # never in the way of the hand-off; the job may then kill one more engine
        logger.warning("could not count the engine death of memory job %s of %s", kind, conversation_id)


def _give_back(conversation_id: int, kind: str, release: str) -> bool:
    """Give back the claim an earlier step left held (a no-op once it lapsed and another took the
    job); False while the database is still away."""
    import uuid

    from db.memory_jobs import release_job
    from db.session import session_scope

    try:
        token = uuid.UUID(release)
    except (ValueError, TypeError, AttributeError):  # a malformed message: nothing of ours to give back
        logger.warning("memory job %s of %s: dropping a malformed claim to give back", kind, conversation_id)
        return True
    try:
        with session_scope() as session:
            release_job(session=session, conversation_id=conversation_id, kind=kind, token=token)
    except Exception:
        logger.warning(
            "memory job %s of %s: its held claim could not be given back yet", kind, conversation_id
        )
        return False
    return True


def _run_step(conversation_id: int, kind: str) -> bool:
    """One step of the job; whether it did any work."""
    from core.panics import fenced
    from db.memory_jobs import EXTRACT, SUMMARY
    from db.session import connection_lost, rolled_back_for_a_conflict
    from db.vector_space import EmbedderMismatch
    from memory.claim import ClaimLapsed, claim_left_held, forget_left_held
    from memory.extract import run_extract_job
    from memory.summarize import run_summary_job
    from worker.engine import EngineDead

    if kind not in (SUMMARY, EXTRACT):
        logger.warning("unknown memory job kind %r dropped", kind)
        return False
    forget_left_held()  # (review: a thread's earlier step's held claim read as this one's)
    try:
        if kind == SUMMARY:
            stored = run_summary_job(conversation_id)
            logger.info("summaries stored for conversation %s: %s", conversation_id, stored)
            did = stored > 0
        else:
            counts = run_extract_job(conversation_id)
            logger.info("facts from conversation %s: %s", conversation_id, counts)
            did = bool(counts)
    except EngineDead:
        raise
    except ClaimLapsed as exc:  # another worker holds the job now: its failures are its own to count
        logger.warning("%s; its claim had lapsed and another worker took the job: not counted", exc)
        return False
    except BaseException as exc:
        if not fenced(exc):  # the process's exit: not the job's failure
            raise
        # A reembed's swap (not its subclasses: the embedder unavailable, of another dimension): a
        # worker of the stored vectors' embedder does it, uncounted.
        if type(exc) is EmbedderMismatch:
            logger.warning(
                "memory job %s of conversation %s: this worker's embedder is not the stored vectors'; "
                "sent again for a worker whose is",
                kind,
                conversation_id,
            )
            _send_later(
                conversation_id,
                kind,
                settings.memory_job_retry_s * 12,
                marked=False,
                release=claim_left_held(),
            )
            return False
        # The database away a moment, or a deadlock run again until its tries ran out: no fault of the
        # job's, which is sent again uncounted (five in an outage of minutes gave it up for a day),
        # as a turn has its outage refunded, up to MLCHAT_MAX_OUTAGE_REFUNDS in a row; past them it
        # counts (a deadlock every time is a bug, not an outage).
        if (connection_lost(exc) or rolled_back_for_a_conflict(exc)) and _outage(conversation_id, kind):
            logger.warning(
                "memory job %s of conversation %s: %s; sent again, not counted as its failure",
                kind,
                conversation_id,
                "the database was away" if connection_lost(exc) else "a deadlock outlasted its tries",
                exc_info=True,
            )
            delay = settings.memory_job_retry_s * 6
            _send_later(conversation_id, kind, delay, marked=False, release=claim_left_held())
            return False
        logger.exception("memory job %s of conversation %s failed", kind, conversation_id)
        _failed(conversation_id, kind, exc)
        return False
    return did  # a step this worker's claim ran without raising ended the failures (release_job)


def _outage(conversation_id: int, kind: str) -> bool:
    """Whether this outage's failure is still sent again uncounted (counted apart; the database away
    still: yes, and the sweep finds the job once its claim's lease lapses)."""
    from db.memory_jobs import count_outage
    from db.session import session_scope

    try:
        with session_scope() as session:
            retries = count_outage(session=session, conversation_id=conversation_id, kind=kind)
    except Exception:
        return True
    return retries <= settings.max_outage_refunds


def _failed(conversation_id: int, kind: str, exc: BaseException) -> None:
    """A step raised: counted, and sent again after a backoff, or given up (said in the log) after
    MLCHAT_MEMORY_JOB_MAX_FAILURES in a row. Nothing else would send it again but the conversation's
    next reply, which an idle conversation never has; and one failing every time ran at every reply."""
    import uuid

    from db.memory_jobs import record_failure, release_job
    from db.session import session_scope
    from memory.claim import claim_left_held

    error = f"{type(exc).__name__}: {exc}"
    held = claim_left_held()
    try:
        with session_scope() as session:
            if held is not None:  # a claim the step left held goes with the record (review: left held,
                # the sweep later counted it as its worker's death, over the step's own error)
                release_job(
                    session=session, conversation_id=conversation_id, kind=kind, token=uuid.UUID(held)
                )
            failures, backoff = record_failure(
                session=session,
                conversation_id=conversation_id,
                kind=kind,
                error=error,
                lease_s=settings.memory_job_lease_s,
                max_failures=settings.memory_job_max_failures,
            )
    except Exception:  # the database away too
        logger.warning(
            "could not record the failure of memory job %s of %s", kind, conversation_id, exc_info=True
        )
        if held is not None:  # its resend gives the claim back (else the sweep finds it as a death)
            _send_later(conversation_id, kind, settings.memory_job_retry_s * 6, marked=False, release=held)
        return
    if failures >= settings.memory_job_max_failures:
        logger.error(
            "memory job %s of conversation %s failed %d times in a row and is given up until "
            "`mlchat memory retry` (or, a day on, the conversation's next reply); last error: %s",
            kind,
            conversation_id,
            failures,
            error,
        )
        return
    _send_later(conversation_id, kind, backoff, marked=True)


def _send_later(
    conversation_id: int, kind: str, delay_s: float, *, marked: bool, release: str | None = None
) -> None:
    """Send the job again after `delay_s` (`release`: a claim its step left held, given back first).
    `marked`: its queued mark holds until then and a lease more (record_failure), and the sweep sends
    it once that lapses; a job its step released has no mark, and one is put on it for the sweep (or
    the next reply) to find."""
    if not marked:
        _mark_resent(conversation_id, kind, delay_s)
    try:
        send_memory_jobs([(conversation_id, kind)], countdown=within_visibility(delay_s), release=release)
    except Exception:
        logger.warning("could not send memory job %s of %s again", kind, conversation_id, exc_info=True)
        if not marked:
            _unmark_one(conversation_id, kind)


def _mark_resent(conversation_id: int, kind: str, delay_s: float) -> None:
    """Mark the job sent for the sweep, for `delay_s` and a lease more (db/memory_jobs.py
    mark_resent); best effort: the database away, its message goes out unmarked, as before."""
    from db.memory_jobs import mark_resent
    from db.session import session_scope

    try:
        with session_scope() as session:
            stale_s = delay_s + settings.memory_job_lease_s
            mark_resent(session=session, conversation_id=conversation_id, kind=kind, stale_s=stale_s)
    except Exception:
        logger.warning("memory job %s of %s: could not mark its resend", kind, conversation_id, exc_info=True)


def _unmark_one(conversation_id: int, kind: str) -> None:
    from memory.schedule import unmark_jobs

    unmark_jobs([(conversation_id, kind)])


def send_memory_jobs(
    jobs: Sequence[tuple[int, str]], *, countdown: float | None = None, release: str | None = None
) -> None:
    """Queue memory jobs on the bulk lane of each conversation's model, its newest turn's (after
    `countdown` seconds if given); this process's model for a conversation with no turns (a history
    imported alone) or whose model is no longer served (MLCHAT_SERVED_MODELS, or this one alone).
    Sent from the API (the desk, an import) or the sweep, they went to the sender's model, and each
    step went on there (memory review). `release`: a claim to give back first (one job's resend)."""
    from db.memory_jobs import conversation_models
    from db.session import session_scope

    try:
        with session_scope() as session:
            model_of = conversation_models(session=session, conversation_ids=[c for c, _ in jobs])
    except Exception:  # the database away (a step's outage path sends it later): this model's lane
        logger.warning(
            "could not read the models of %d memory jobs; sending on %s", len(jobs), settings.model
        )
        model_of = {}
    extra = {} if release is None else {"release": release}
    for conversation_id, kind in jobs:
        model = model_of.get(conversation_id, settings.model)
        if model not in settings.models:  # no longer served (review: its queue has no worker)
            model = settings.model
        queue = queue_for_model(model, "bulk")
        memory_job.apply_async(
            kwargs={"conversation_id": conversation_id, "kind": kind, **extra},
            queue=queue,
            countdown=countdown,
        )
