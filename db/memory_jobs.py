"""The memory-job claim: one row per conversation and kind ("summary", "extract"), so at most one
job of a kind per conversation is in flight. A claim is a token under a lease; a job's writes check
that its token is still the job's, so a worker whose lease lapsed and whose job another claimed
(presumed dead) writes nothing. One whose lease lapsed with nobody taking the job over still stores
its work: a generation that waited past the lease behind bulk work is not thrown away."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from core.settings import settings

logger = logging.getLogger(__name__)

SUMMARY = "summary"
EXTRACT = "extract"
_CLAIM_SQL = text(
    """
INSERT INTO memory_jobs (conversation_id, kind, token, lease_until)
SELECT :conversation_id, :kind, :token, now() + make_interval(secs => :lease_s)
-- a conversation erased since the job's message was sent: no job, not a foreign-key error logged as
-- the job's failure. No lock on it: an erasure locks the job rows before the conversation, and this
-- claim would take them the other way round; one erasing in the instant between is the old error.
WHERE EXISTS (SELECT 1 FROM conversations WHERE id = :conversation_id)
ON CONFLICT (conversation_id, kind) DO UPDATE
SET token = excluded.token, lease_until = excluded.lease_until, queued_until = NULL
WHERE (memory_jobs.lease_until IS NULL OR memory_jobs.lease_until < now())
  -- given up (until `mlchat memory retry`, or a day on): a message the broker delivers again (an
  -- unacked one, after its visibility timeout) would run, and kill, it once more
  AND NOT (memory_jobs.failures >= :max_failures AND COALESCE(memory_jobs.retry_after > now(), false))
RETURNING token
"""
)


# A job whose request was inside an engine that died runs its next step alone in the engine (as a
# turn does: the death may have been another request's); inside this many deaths, without the model
# (a stand-in summary, no facts read): a memory step is worth less than the engine and the live
# turns beside it, each of which counts the death too (db/turns.py).
MEMORY_JOB_DEATHS = 2


# Deaths a job's request was inside for, decoding already (no suspect), before it runs alone, where a
# death is its own (as a turn's: worker/pipeline.py DEATHS_SEEN_ALONE).
DEATHS_SEEN_ALONE = 3


def count_engine_death(*, session: Session, conversation_id: int, kind: str, suspect: bool = True) -> int:
    """The job's request was inside an engine that died, a suspect (joining it) or not (decoding
    already): count it; the job's count of that kind now."""
    count = session.execute(
        text(
            "UPDATE memory_jobs SET engine_deaths = engine_deaths + CASE WHEN :suspect THEN 1 ELSE 0 END,"
            " engine_deaths_seen = engine_deaths_seen + CASE WHEN :suspect THEN 0 ELSE 1 END"
            " WHERE conversation_id = :c AND kind = :k"
            " RETURNING CASE WHEN :suspect THEN engine_deaths ELSE engine_deaths_seen END"
        ),
        {"c": conversation_id, "k": kind, "suspect": suspect},
    ).scalar()
    return int(count or 0)


def engine_deaths(*, session: Session, conversation_id: int, kind: str) -> int:
    """How many engine deaths the job's request was inside as a suspect since its last stored step."""
    return _deaths(session, conversation_id, kind)[0]


def death_record(*, session: Session, conversation_id: int, kind: str) -> tuple[int, bool]:
    """(the engine deaths the job's request was inside as a suspect since its last stored step,
    whether its next request runs alone in the engine: a suspect of a death, or inside
    DEATHS_SEEN_ALONE of them), in one read."""
    deaths, seen = _deaths(session, conversation_id, kind)
    return deaths, deaths > 0 or seen >= DEATHS_SEEN_ALONE


def runs_alone(*, session: Session, conversation_id: int, kind: str) -> bool:
    """Whether the job's next request runs alone in the engine (see death_record)."""
    return death_record(session=session, conversation_id=conversation_id, kind=kind)[1]


def _deaths(session: Session, conversation_id: int, kind: str) -> tuple[int, int]:
    row = session.execute(
        text(
            "SELECT engine_deaths, engine_deaths_seen FROM memory_jobs"
            " WHERE conversation_id = :c AND kind = :k"
        ),
        {"c": conversation_id, "k": kind},
    ).one_or_none()
    return (int(row[0]), int(row[1])) if row is not None else (0, 0)


def clear_engine_deaths(*, session: Session, conversation_id: int, kind: str) -> None:
    """A step was stored: the job's next request starts with no death counted against it."""
    session.execute(
        text(
            "UPDATE memory_jobs SET engine_deaths = 0, engine_deaths_seen = 0"
            " WHERE conversation_id = :c AND kind = :k AND (engine_deaths > 0 OR engine_deaths_seen > 0)"
        ),
        {"c": conversation_id, "k": kind},
    )


def claim_job(
    *,
    session: Session,
    conversation_id: int,
    kind: str,
    lease_s: float,
    max_failures: int | None = None,
    token: uuid.UUID | None = None,
) -> uuid.UUID | None:
    """Take the conversation's memory job of this kind for `lease_s` under `token` (a new one when
    None); None while another holds it, when it is given up (`max_failures` in a row,
    MLCHAT_MEMORY_JOB_MAX_FAILURES by default), or when the conversation is gone (erased)."""
    token = uuid.uuid4() if token is None else token
    limit = settings.memory_job_max_failures if max_failures is None else max_failures
    params = {"conversation_id": conversation_id, "kind": kind, "token": token, "lease_s": lease_s}
    got = session.execute(_CLAIM_SQL, params | {"max_failures": limit}).scalar()
    return token if got is not None else None


_QUEUE_SQL = text(
    """
INSERT INTO memory_jobs (conversation_id, kind, queued_until)
SELECT c, k, now() + make_interval(secs => :stale_s)
FROM unnest(CAST(:conv AS bigint[]), CAST(:kind AS text[])) AS j(c, k)
ON CONFLICT (conversation_id, kind) DO UPDATE
SET queued_until = excluded.queued_until
WHERE (memory_jobs.queued_until IS NULL OR memory_jobs.queued_until < now())
  -- backing off (its send is made), or given up (for a day, or until `mlchat memory retry`)
  AND (memory_jobs.retry_after IS NULL OR memory_jobs.retry_after < now())
RETURNING conversation_id, kind
"""
)


def mark_queued(*, session: Session, jobs: list[tuple[int, str]], stale_s: float) -> list[tuple[int, str]]:
    """Mark these jobs as having a message on the queue; the ones marked now (send only those). A
    mark older than `stale_s` (its message lost) may be taken again; running the job clears it. A job
    backing off after a failure (its send is made, with its delay) or given up (record_failure) is
    not marked until its `retry_after`."""
    if not jobs:
        return []
    unique = sorted(set(jobs))
    rows = session.execute(
        _QUEUE_SQL,
        {"conv": [c for c, _ in unique], "kind": [k for _, k in unique], "stale_s": stale_s},
    )
    return sorted((int(c), str(k)) for c, k in rows)


def mark_resent(*, session: Session, conversation_id: int, kind: str, stale_s: float) -> None:
    """Mark a job its worker sends again (after a step, an outage, an engine's death) as having a
    message on the queue for `stale_s`: its claim cleared the scheduling's mark, and a message the
    broker lost then (a restart, a failover, a flush) left nothing for the sweep to find (review of
    Redis losing state). A later mark is kept; the claim clears it as ever."""
    session.execute(
        text(
            "UPDATE memory_jobs SET queued_until ="
            " greatest(queued_until, now() + make_interval(secs => :stale_s))"
            " WHERE conversation_id = :c AND kind = :k"
        ),
        {"c": conversation_id, "k": kind, "stale_s": stale_s},
    )


def holds_job(*, session: Session, conversation_id: int, kind: str, token: uuid.UUID) -> bool:
    """Whether the job is still this claim's: no later claim took it, whether or not its lease ran
    out (locks its row until the transaction ends)."""
    row = session.execute(
        text("SELECT 1 FROM memory_jobs WHERE conversation_id = :c AND kind = :k AND token = :t FOR UPDATE"),
        {"c": conversation_id, "k": kind, "t": token},
    ).first()
    return row is not None


def renew_job(*, session: Session, conversation_id: int, kind: str, token: uuid.UUID, lease_s: float) -> bool:
    """Extend the job's lease while this claim holds it (a generation waiting behind live work keeps
    its job: a lease that lapsed while it waited let the next reply's scheduling hand the job to
    another worker, and the answer was thrown away); False once another claim took it."""
    row = session.execute(
        text(
            "UPDATE memory_jobs SET lease_until = now() + make_interval(secs => :lease_s)"
            " WHERE conversation_id = :c AND kind = :k AND token = :t RETURNING 1"
        ),
        {"c": conversation_id, "k": kind, "t": token, "lease_s": lease_s},
    ).first()
    return row is not None


def unmark_queued(*, session: Session, jobs: list[tuple[int, str]]) -> None:
    """Take back the queued marks of jobs whose messages could not be sent: the next scheduling
    (or `mlchat sweep`) sends them again, rather than none for a lease's length."""
    if jobs:
        session.execute(
            text(
                "UPDATE memory_jobs SET queued_until = now() FROM"
                " unnest(CAST(:conv AS bigint[]), CAST(:kind AS text[])) AS j(c, k)"
                " WHERE conversation_id = j.c AND kind = j.k"
            ),
            {"conv": [c for c, _ in jobs], "kind": [k for _, k in jobs]},
        )


# A lapsed claim is taken back only a whole lease after it lapsed: its worker renews it every third
# of a lease while it runs (for the broker's visibility timeout at most), so by then it has died,
# hung past that bound, or lost the database that long.
_TAKE_BACK_SQL = text(
    """
WITH stalled AS (
    SELECT conversation_id, kind,
           token IS NOT NULL AND lease_until < now() - make_interval(secs => :lease_s) AS dead
    FROM memory_jobs
    -- a dead claim even of a job given up: run again after its day, it died again, and is given up
    -- for another day (left held, every reply's message would find it free once its lease lapsed)
    WHERE ((queued_until < now() AND failures < :max_failures)
           OR (token IS NOT NULL AND lease_until < now() - make_interval(secs => :lease_s)))
      AND kind = ANY(CAST(:kinds AS text[]))
    ORDER BY conversation_id, kind
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
UPDATE memory_jobs j SET
    token = CASE WHEN s.dead THEN NULL ELSE j.token END,
    lease_until = CASE WHEN s.dead THEN NULL ELSE j.lease_until END,
    queued_until = CASE WHEN s.dead THEN j.queued_until ELSE now() + make_interval(secs => :lease_s) END
FROM stalled s WHERE j.conversation_id = s.conversation_id AND j.kind = s.kind
RETURNING j.conversation_id, j.kind, s.dead
"""
)

# A claim whose worker stopped holding it (the process killed, or hung past its lease): counted as a
# failure of the job, so one whose step kills its worker every time is given up, not sent for ever.
DIED = "its worker stopped while it ran (the process died, or hung past its lease)"


def take_back_stalled(
    *,
    session: Session,
    lease_s: float,
    limit: int,
    kinds: Sequence[str],
    max_failures: int,
) -> list[tuple[int, str, float]]:
    """The memory jobs whose messages went missing, marked queued afresh for the caller to send, with
    the seconds to wait first: a job marked queued longer ago than the mark lasts and never run (the
    broker lost its message, or it waits behind a bulk backlog that long: a duplicate, which its
    claim makes harmless), at once; or claimed by a worker whose lease lapsed a lease ago (it died
    holding it): its claim is freed and the death is the job's failure (record_failure: backed off,
    or given up, said in the log, and not returned). Nothing else would send them again before the
    conversation's next reply. A send that fails leaves the fresh mark to lapse, and a later sweep
    finds the job again; a job no longer due runs and finds nothing to do."""
    rows = session.execute(
        _TAKE_BACK_SQL,
        {"lease_s": lease_s, "limit": limit, "kinds": list(kinds), "max_failures": max_failures},
    ).all()
    due: list[tuple[int, str, float]] = []
    given_up: list[tuple[int, str]] = []
    for conversation_id, kind, dead in sorted(rows):
        job = (int(conversation_id), str(kind))
        if not dead:
            due.append((*job, 0.0))
            continue
        failures, backoff = record_failure(
            session=session,
            conversation_id=job[0],
            kind=job[1],
            error=DIED,
            lease_s=lease_s,
            max_failures=max_failures,
        )
        if failures >= max_failures:
            given_up.append(job)
        else:
            due.append((*job, backoff))
    if given_up:
        logger.error(
            "memory jobs given up after %d failures in a row, the last its worker dying as it ran, "
            "until `mlchat memory retry`: %s",
            max_failures,
            given_up,
        )
    return due


def release_job(
    *, session: Session, conversation_id: int, kind: str, token: uuid.UUID, ran: bool = False
) -> bool:
    """Give the job back (the next scheduling may claim it at once). Its queued mark goes too: a
    message that came while the job ran found it held and was dropped, and its mark would keep the
    job's next step from being sent for `stale_s`. `ran`: this claim's step ran without raising,
    which ends the job's failures in a row (record_failure). Whether this claim still held it (False:
    its lease lapsed and another claim took the job, which is that claim's now)."""
    released = session.execute(
        text(
            "UPDATE memory_jobs SET token = NULL, lease_until = NULL, queued_until = NULL,"
            " failures = CASE WHEN :ran THEN 0 ELSE failures END,"
            " outage_retries = CASE WHEN :ran THEN 0 ELSE outage_retries END,"
            " last_error = CASE WHEN :ran THEN NULL ELSE last_error END,"
            " retry_after = CASE WHEN :ran THEN NULL ELSE retry_after END"
            " WHERE conversation_id = :c AND kind = :k AND token = :t RETURNING 1"
        ),
        {"c": conversation_id, "k": kind, "t": token, "ran": ran},
    ).first()
    return released is not None


# A failed step's next try waits this long, doubling with each failure in a row, at most the cap.
FAILURE_BACKOFF_S = 30.0
FAILURE_BACKOFF_MAX_S = 1800.0
# A job given up (MLCHAT_MEMORY_JOB_MAX_FAILURES in a row) is tried again by the conversation's next
# reply this long after (a cause that lasted hours may be gone), or at once by `mlchat memory retry`.
GIVEN_UP_S = 86400.0


def count_outage(*, session: Session, conversation_id: int, kind: str) -> int:
    """A step failed for the database away or a deadlock past its tries: counted apart from the
    job's failures; how many in a row since its last stored step."""
    return int(
        session.execute(
            text(
                "INSERT INTO memory_jobs (conversation_id, kind, outage_retries) VALUES (:c, :k, 1)"
                " ON CONFLICT (conversation_id, kind) DO UPDATE"
                " SET outage_retries = memory_jobs.outage_retries + 1 RETURNING outage_retries"
            ),
            {"c": conversation_id, "k": kind},
        ).scalar_one()
    )


def record_failure(
    *, session: Session, conversation_id: int, kind: str, error: str, lease_s: float, max_failures: int
) -> tuple[int, float]:
    """A step of the job raised: counted, its error kept, and its next try put off by a backoff
    (its queued mark held that long and a lease more, so no scheduling sends it meanwhile, and the
    sweep sends it if the delayed message is lost); (failures in a row, the backoff in seconds)."""
    failures = session.execute(
        text(
            "INSERT INTO memory_jobs (conversation_id, kind, failures, last_error) VALUES (:c, :k, 1, :e)"
            " ON CONFLICT (conversation_id, kind) DO UPDATE"
            " SET failures = memory_jobs.failures + 1, last_error = excluded.last_error"
            " RETURNING failures"
        ),
        {"c": conversation_id, "k": kind, "e": error[:2000]},
    ).scalar_one()
    if failures >= max_failures:  # given up: nothing sends it for a day (the sweep never)
        session.execute(
            text(
                "UPDATE memory_jobs SET retry_after = now() + make_interval(secs => :b), queued_until = NULL"
                " WHERE conversation_id = :c AND kind = :k"
            ),
            {"c": conversation_id, "k": kind, "b": GIVEN_UP_S},
        )
        return int(failures), GIVEN_UP_S
    # the exponent bounded: 2.0 ** 1024 overflows a float (review: past that many failures in a row
    # the failure could no longer be recorded)
    backoff = min(FAILURE_BACKOFF_S * 2 ** min(failures - 1, 32), FAILURE_BACKOFF_MAX_S)
    session.execute(
        text(
            "UPDATE memory_jobs SET retry_after = now() + make_interval(secs => :b),"
            " queued_until = now() + make_interval(secs => :b + :lease)"
            " WHERE conversation_id = :c AND kind = :k"
        ),
        {"c": conversation_id, "k": kind, "b": backoff, "lease": lease_s},
    )
    return int(failures), backoff


def retry_given_up(*, session: Session, max_failures: int) -> list[tuple[int, str, str | None]]:
    """Give every job given up (failed `max_failures` times in a row) another go: its failures are
    cleared; (conversation id, kind, last error) of each, for the caller to schedule."""
    rows = session.execute(
        text(
            "WITH given_up AS (SELECT conversation_id, kind, last_error FROM memory_jobs"
            " WHERE failures >= :n ORDER BY conversation_id, kind FOR UPDATE)"
            " UPDATE memory_jobs j SET failures = 0, outage_retries = 0, retry_after = NULL,"
            " queued_until = NULL"
            " FROM given_up g WHERE j.conversation_id = g.conversation_id AND j.kind = g.kind"
            " RETURNING j.conversation_id, j.kind, g.last_error"
        ),
        {"n": max_failures},
    ).tuples()
    return sorted((int(c), str(k), e) for c, k, e in rows)


def extracted_through(*, session: Session, conversation_id: int) -> int:
    """The last line of the conversation that fact extraction has read (0: none)."""
    done = session.scalar(
        text("SELECT done_through FROM memory_jobs WHERE conversation_id = :c AND kind = 'extract'"),
        {"c": conversation_id},
    )
    return int(done or 0)


def advance_extract(*, session: Session, conversation_id: int, token: uuid.UUID, through: int) -> bool:
    """Record that extraction read the lines up to `through`, if this claim still holds the job."""
    done = session.execute(
        text(
            "UPDATE memory_jobs SET done_through = GREATEST(done_through, :through)"
            " WHERE conversation_id = :c AND kind = 'extract' AND token = :t"
        ),
        {"c": conversation_id, "t": token, "through": through},
    )
    return bool(done.rowcount)  # type: ignore[attr-defined]


def keeps_memory(*, session: Session, conversation_id: int) -> bool:
    """Whether the conversation keeps a memory (a job of it was ever scheduled: a live conversation's;
    a batch run's lines schedule none)."""
    return bool(
        session.scalar(
            text("SELECT EXISTS (SELECT 1 FROM memory_jobs WHERE conversation_id = :c)"),
            {"c": conversation_id},
        )
    )


def conversation_models(*, session: Session, conversation_ids: Sequence[int]) -> dict[int, str]:
    """The model of each conversation's newest turn, for those that have turns: its memory jobs run
    on that model's workers (a conversation may have moved to another model since its first turn)."""
    if not conversation_ids:
        return {}
    rows = session.execute(
        text(
            "SELECT c.id, (SELECT t.model FROM turns t WHERE t.conversation_id = c.id"
            " ORDER BY t.number DESC LIMIT 1)"
            " FROM unnest(CAST(:ids AS bigint[])) AS c(id)"
        ),
        {"ids": sorted(set(conversation_ids))},
    ).all()
    return {int(c): str(model) for c, model in rows if model is not None}


def interrupt_jobs(*, session: Session, conversation_id: int, seq: int) -> None:
    """A line's text changed: the conversation's memory jobs are taken back from any claim (a job in
    flight read the old text: its writes then find their claim gone and store nothing) and fact
    extraction reads again from the line (db/facts.py forget_read_facts drops what was read from it
    and after it; `reread_from` then goes back to the start of the stretch that held it)."""
    session.execute(
        text(
            # its mark lapsed, not cleared: the caller schedules the jobs once this commits, and if
            # that never happens (its process killed, the database lost) the sweep still finds them
            # (memory review: a cleared mark and no claim left them for the conversation's next reply)
            "UPDATE memory_jobs SET token = NULL, lease_until = NULL, queued_until = now(),"
            " failures = 0, outage_retries = 0, retry_after = NULL,"  # the text it failed on changed
            # a line extraction had read: due at once, however few lines follow it, until it has read
            # as far as it had (the edit dropped the facts of every line after it too)
            " reread_through = CASE WHEN kind = 'extract' AND done_through > :before"
            " THEN GREATEST(reread_through, done_through) ELSE reread_through END,"
            " done_through = CASE WHEN kind = 'extract' THEN LEAST(done_through, :before)"
            " ELSE done_through END"
            " WHERE conversation_id = :c AND kind IN ("  # its rows locked in kind order, as mark_queued's
            "   SELECT kind FROM memory_jobs WHERE conversation_id = :c ORDER BY kind FOR UPDATE)"
        ),
        {"c": conversation_id, "before": seq - 1},
    )


def reread_from(*, session: Session, conversation_id: int, seq: int) -> None:
    """Fact extraction reads the conversation's lines again from `seq` (its job row is the caller's
    already: interrupt_jobs locked it)."""
    session.execute(
        text(
            "UPDATE memory_jobs SET done_through = LEAST(done_through, :before)"
            " WHERE conversation_id = :c AND kind = 'extract'"
        ),
        {"c": conversation_id, "before": seq - 1},
    )


def extract_due(*, session: Session, conversation_ids: list[int], every_lines: int) -> list[int]:
    """The conversations with at least `every_lines` lines extraction has not read, or not yet read as
    far as it had before an edit of a line it had read (`reread_through`), not in flight."""
    if not conversation_ids or every_lines <= 0:
        return []
    return list(
        session.scalars(
            text(
                """
SELECT c.id FROM unnest(CAST(:conv AS bigint[])) AS c(id)
LEFT JOIN memory_jobs j ON j.conversation_id = c.id AND j.kind = 'extract'
WHERE (j.lease_until IS NULL OR j.lease_until < now())
  AND (j.done_through < j.reread_through  -- an edited line it had read: due until read that far again
       OR (SELECT count(*) FROM (  -- counted only as far as `every`: never a long backlog at each reply
           SELECT 1 FROM messages m
           WHERE m.conversation_id = c.id AND m.seq > COALESCE(j.done_through, 0) LIMIT :every) x) >= :every)
"""
            ),
            {"conv": sorted(set(conversation_ids)), "every": every_lines},
        )
    )
