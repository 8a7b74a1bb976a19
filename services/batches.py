"""OpenAI-style batches: a run created from an uploaded file, with a completion window, metadata,
output and error files written while `finalizing`, and an optional signed completion callback.

A batch is a run (db/runs.py owns its states) whose `input_file_id` is set. Its submission goes on
in the background after `create_batch` answers. A transient database or broker error keeps it
`validating` and it is tried again with backoff (`retry_batch_submissions`, from the sweeper's
housekeeping), up to batch_submission_attempts tries: `failed` is final, and its error code says
whose fault it was (`invalid_request`: the file; `server_error`: the server gave up).
`housekeeping` expires runs whose window closed and finalizes finished ones (the worker's timer,
the sweeper and a cancel all call it).
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import event, func, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

from core.settings import DEFAULT_TENANT, settings, window_seconds
from db.callbacks import claim_lost_callbacks, claim_retries, release_lost_claims
from db.files import add_file, get_file, hold_input_file, latest_rewrite, set_file_size
from db.models import Run, RunStatus, Turn
from db.runs import (
    RunCounts,
    batch_submissions_due,
    begin_finalizing_try,
    begin_submission_attempt,
    cancel_run,
    create_run,
    due_to_expire,
    fail_submission,
    finalizing_runs,
    finish_finalizing,
    lock_run_of_output_file,
    postpone_finalizing,
    postpone_submission,
    run_counts,
    run_refusals,
    runs_counts,
    submission_lock,
)
from db.session import (
    DATABASE_OUTAGES,
    connection_lost,
    get_lock_engine,
    rolled_back_for_a_conflict,
    session_scope,
)
from db.world import all_character_slugs
from db.write_keys import KeyReused as KeyReused  # a create under a key another request took: 409
from db.write_keys import fingerprint, record_ids, stored_ids, take_key
from services.files import (
    REWRITE_SCRATCH,
    BadExpiry,
    batch_reservation,
    batch_room_refusal,
    check_expiry,
    delete_expired_files,
    delete_orphan_files,
    find_file,
    new_file_id,
    remove_unlisted,
)
from services.pages import list_object
from services.runs.export import cancelled_alone, write_never_stored, write_outputs
from services.runs.openai_lines import ENDPOINT, LineOptions
from services.runs.submit import RunBusy, RunConflict, one_line, submit_run
from services.runs.validate import EmptyFile, RunValidationError, file_digest_and_lines, param_of
from services.schemas import storable_text
from services.turn_callbacks import send_turn_callbacks

logger = logging.getLogger(__name__)

# OpenAI's metadata limits: 16 pairs, keys up to 64 characters, values up to 512.
_META_PAIRS, _META_KEY, _META_VALUE = 16, 64, 512


class BatchRefused(ValueError):
    """A batch request that cannot be accepted; the message names the field."""


class BatchNotFound(LookupError):
    """No batch (or file) of that id that the caller may see."""


class BatchEnded(ValueError):
    """A cancel of a batch that ended completed, failed or expired (OpenAI's 409)."""


def parse_window(text: str) -> timedelta:
    """`24h`, `90m`, `30s`: up to batch_max_window_hours."""
    seconds = window_seconds(text)
    if seconds is None:
        raise BatchRefused(f"completion_window: {text!r}; give a number and a unit, e.g. '24h', '90m'")
    window = timedelta(seconds=seconds)
    if window > timedelta(hours=settings.batch_max_window_hours):
        raise BatchRefused(f"completion_window: at most {settings.batch_max_window_hours}h")
    return window


def check_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    if len(metadata) > _META_PAIRS:
        raise BatchRefused(f"metadata: at most {_META_PAIRS} pairs")
    for key, value in metadata.items():
        if len(key) > _META_KEY:
            raise BatchRefused(f"metadata: key {key[:20]!r}… is over {_META_KEY} characters")
        if not isinstance(value, str) or len(value) > _META_VALUE:
            raise BatchRefused(f"metadata.{key}: must be a string of at most {_META_VALUE} characters")
        try:
            storable_text(value)
        except ValueError as exc:
            raise BatchRefused(f"metadata.{key}: {exc}") from None
    return dict(metadata)


def check_callback(url: str | None, tenant: str = DEFAULT_TENANT) -> str | None:
    """The batch's callback URL if accepted; BatchRefused naming it if not, EnqueueError (a 503: try
    again) when the resolver cannot answer for now, as for a turn's."""
    if url is None:
        return None
    from services.callbacks import ResolverTooSlow, callback_destinations, callback_refusal
    from services.producer import EnqueueError

    refused = callback_refusal(url, resolve=False)
    if refused is None:
        try:
            refused = callback_destinations({0: url}, tenant).get(0)
        except ResolverTooSlow as exc:
            raise EnqueueError(f"callback_url: {exc}; nothing was stored") from None
    if refused is not None:
        raise BatchRefused(f"callback_url: {refused}")
    return url


def create_batch(
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str | None,
    metadata: dict[str, Any] | None,
    api_key: str | None,
    admin: bool,
    tenant: str = DEFAULT_TENANT,
    callback_url: str | None = None,
    allow_system_prompt: bool = False,
    candidates: int | None = None,
    output_expires_after: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """Create the run of a batch in `validating`: the batch object, and whether this call made it;
    the caller then runs `submit_batch` for one it made (its lines are
    validated, stored and sent there). Raises BatchRefused, or QuotaReached when the key's files and
    its batches not ended (each reserving an allowance for its output) would pass its files quota.
    Under `idempotency_key` (the tenant's, a week: MLCHAT_WRITE_KEY_TTL_S) a retry of the same request
    by the same key answers with the batch the first made (review: a create whose answer was lost,
    retried by the client, ran the whole file twice); KeyReused when it was another request, or its
    batch is gone (deleted past retention)."""
    request_hash = fingerprint(
        {
            "api_key": api_key,
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": metadata,
            "callback_url": callback_url,
            "allow_system_prompt": allow_system_prompt,
            "candidates": candidates,
            "output_expires_after": output_expires_after,
        }
    )
    keyed = (idempotency_key, request_hash) if idempotency_key is not None else None
    if keyed is not None:
        with session_scope() as session:
            made = stored_ids(
                session=session, tenant=tenant, kind=BATCH_KEY, key=keyed[0], request_hash=keyed[1]
            )
            if made:
                return _made_under_key(session, keyed[0], made), False
    if endpoint != ENDPOINT:
        raise BatchRefused(f"endpoint: {endpoint!r}; only {ENDPOINT} is supported")
    window_text = settings.batch_default_window if completion_window is None else completion_window
    window = parse_window(window_text)
    meta = check_metadata(metadata)
    callback = check_callback(callback_url, tenant)
    output_expiry = None
    if output_expires_after is not None:
        try:
            output_expiry = check_expiry(
                output_expires_after.get("anchor"),
                output_expires_after.get("seconds"),
                "output_expires_after",
            )
        except BadExpiry as exc:
            raise BatchRefused(str(exc)) from None
    found = find_file(input_file_id)
    if found is None or found.expired or not (admin or found.owned_by(api_key, tenant)):
        raise BatchRefused(f"input_file_id: no file {input_file_id!r}")
    character = (meta or {}).get("character")
    if character is not None:
        with session_scope() as session:
            if character not in all_character_slugs(session=session, tenant=tenant):
                raise BatchRefused(f"metadata.character: unknown character {character!r}")
    if found.info["purpose"] != "batch":
        raise BatchRefused(
            f"input_file_id: {input_file_id!r} has purpose {found.info['purpose']!r}, not 'batch'"
        )
    try:  # hashed now: a delete or the expiry sweep may remove the bytes from here on
        digest, lines = file_digest_and_lines(found.path)
    except FileNotFoundError:
        raise BatchRefused(f"input_file_id: the bytes of {input_file_id!r} are no longer stored") from None
    options = LineOptions(
        default_character=(meta or {}).get("character"),
        allow_system_prompt=allow_system_prompt,
        candidates=candidates,
        scenes=False,
    )
    run_id = uuid.uuid4()
    try:
        return _create_run(
            run_id,
            digest,
            options,
            meta,
            window_text,
            window,
            input_file_id,
            batch_reservation(int(found.info["bytes"]), lines),
            api_key,
            tenant,
            callback,
            output_expiry,
            keyed,
        )
    except DATABASE_OUTAGES:
        # The COMMIT may have gone through with its answer lost: the batch the client would create
        # again on the 503 is this one, submitted by housekeeping later (two batches, both answered).
        try:
            return get_batch(f"batch_{run_id.hex}", api_key=api_key, admin=admin, tenant=tenant), True
        except Exception:  # not stored, or the database still away: the outage it is
            pass
        raise


def _create_run(
    run_id: uuid.UUID,
    digest: str,
    options: LineOptions,
    meta: dict[str, str] | None,
    window_text: str,
    window: timedelta,
    input_file_id: str,
    reserve: int,
    api_key: str | None,
    tenant: str,
    callback: str | None,
    output_expiry: int | None,
    keyed: tuple[str, str] | None,
) -> tuple[dict[str, Any], bool]:
    with session_scope() as session:
        if keyed is not None:  # taken first: a retry racing this request waits for it, then finds its batch
            made = take_key(
                session=session, tenant=tenant, kind=BATCH_KEY, key=keyed[0], request_hash=keyed[1]
            )
            if made:
                return _made_under_key(session, keyed[0], made), False
        refused = batch_room_refusal(session, api_key, tenant, reserve)
        if refused is not None:
            raise refused
        if not hold_input_file(session=session, file_id=input_file_id):  # deleted or expired since read
            raise BatchRefused(f"input_file_id: no file {input_file_id!r}")
        run, _ = create_run(
            session=session,
            name=f"batch_{run_id.hex}",
            model=settings.model,
            file_hash=digest,
            total=0,
            fields={
                "id": run_id,
                "input_format": "openai",
                "options": options.stored(),
                "metadata_": meta,
                "completion_window": window_text,
                # Exact seconds: a timedelta of a day or more is bound as an interval of days, which
                # PostgreSQL adds as calendar days in the session's time zone, an hour off across a
                # DST change (review, stop 75).
                "expires_at": func.now() + func.make_interval(0, 0, 0, 0, 0, 0, window.total_seconds()),
                "input_file_id": input_file_id,
                "api_key": api_key,
                "tenant": tenant,
                "callback_url": callback,
                "output_expires_after_s": output_expiry,
                "reserved_bytes": reserve,
            },
        )
        session.flush()
        session.refresh(run)
        if keyed is not None:
            record_ids(session=session, tenant=tenant, kind=BATCH_KEY, key=keyed[0], ids=[run_id.int])
        return batch_object(session, run), True


BATCH_KEY = "batch"  # write_keys' kind of a batch's creation


def _made_under_key(session: Session, key: str, made: list[int]) -> dict[str, Any]:
    """The batch a create under `key` made; KeyReused once it is gone (the key outlived it)."""
    run = session.get(Run, uuid.UUID(int=made[0]))
    if run is None:
        raise KeyReused(f"idempotency key {key!r}: the batch it created was deleted since")
    return batch_object(session, run)


def submit_batch_by_name(name: str) -> None:
    """Validate, store and send a batch's file (resumable: a second call sends only what is left).
    A bad file fails the batch with each line's error (and calls back); a transient error keeps it
    validating for a retry after a backoff, until its tries run out. Nothing here raises."""
    try:
        _submit_batch(name)
    except Exception:  # the database is down: nothing can be read or recorded; the sweeper retries
        logger.exception("batch %s: submission could not start or record its outcome", name)


def _submit_batch(name: str) -> None:
    with session_scope() as session:
        row = session.execute(
            select(Run, func.extract("epoch", func.now() - Run.created_at)).where(Run.name == name)
        ).one_or_none()
        if row is None:
            return
        run, age = row
        if run.input_file_id is None:
            return
        run_id, file_id, callback = run.id, run.input_file_id, run.callback_url
    # Its age on the database's clock alone, read while the database answered (review: this host's
    # clock less the database's was minutes off on a skewed host; read again after a failed try,
    # an outage's, it was 0 and the back-off never grew).
    read_at, age_s = time.monotonic(), max(float(age or 0.0), 0.0)
    attempt: int | None = None  # unknown until counted: the database may be what broke
    counting = False  # the try's count was written (its commit's answer may still be lost)
    try:
        # A try counts only once its submitter holds the lock: one that finds another submitter
        # at work (a sweep racing the background submission) is no try at all.
        with submission_lock(name) as got:
            if not got:
                raise RunBusy(f"run {name!r} is being submitted by another process right now")
            with session_scope() as session:
                attempt = begin_submission_attempt(session=session, run_id=run_id)
                counting = True
            if attempt is None:
                return  # submitted, cancelled or failed meanwhile
            if attempt > settings.batch_submission_attempts:  # the last try died without a word
                _give_up(run_id, callback, f"submission failed {attempt - 1} times")
                return
            found = find_file(file_id)
            if found is None or not found.path.is_file():
                gone = f"input_file_id: the bytes of {file_id} are no longer stored"
                with session_scope() as session:
                    fail_submission(
                        session=session,
                        run_id=run_id,
                        error=gone,
                        error_code="invalid_request",
                        line_errors=[{"line": None, "message": gone}],
                        final=True,
                    )
                raise RunValidationError([])
            submit_run(found.path, name=name, retry_later=True, lock_held=True, file_is_ours=True)
    except RunValidationError:
        if callback:  # the batch ended here: failed
            send_callback(run_id)
    except RunBusy:
        pass  # another submitter is on it
    except (RunConflict, ValueError) as exc:  # the file (or its default character) is at fault
        code: Literal["empty_file", "invalid_request"] = (  # OpenAI's codes
            "empty_file" if isinstance(exc, EmptyFile) else "invalid_request"
        )
        with session_scope() as session:
            failed = fail_submission(
                session=session, run_id=run_id, error=one_line(exc), error_code=code, final=True
            )
        if failed and callback:
            send_callback(run_id)
    except Exception as exc:
        waited_s = age_s + time.monotonic() - read_at
        _retry_later(run_id, name, callback, attempt, exc, waited_s, counted=counting)


POSTPONE_WITHIN_S = 30.0  # how long a stopped try's postponement waits for the database
_BUILDERS = "the grammar builders"
_BUILDERS_WAIT_S = 3600.0


def _away(exc: BaseException) -> str | None:
    """Which service being away stopped a submission (the error, or what it wraps): "the broker",
    "the database" (its connection lost, not an error of the work), "another writer" (a transaction
    the server rolled back for a deadlock or a serialization failure: the same work goes through
    when run again), "the grammar builders" (none free in time for a line's schema: it may well be
    enforceable), or None: what stopped it was not the submission's own fault."""
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    from structured.spec import GrammarBusy

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (KombuError, RedisError)):
            return "the broker"
        if isinstance(seen, GrammarBusy):
            return _BUILDERS
        if connection_lost(seen):
            return "the database"
        if rolled_back_for_a_conflict(seen):
            return "another writer (a deadlock or a serialization failure)"
        seen = seen.__cause__
    return None


def _retry_later(
    run_id: uuid.UUID,
    name: str,
    callback: str | None,
    attempt: int | None,
    exc: Exception,
    waited_s: float,
    *,
    counted: bool = True,
) -> None:
    """A transient error: the batch stays validating and is due again after a doubling backoff, or
    fails as the server's fault once its tries are spent. The broker or the database being away
    (its connection lost) spends no try: the batch waits for it (looked at again less often the
    longer it has waited, every 10 minutes at most) until its completion window closes. The
    postponement waits up to POSTPONE_WITHIN_S for a database still away; past that nothing is
    recorded, and the sweeper finds the batch stalled and tries again. The error's own text stays
    in the log: the batch, which its tenant reads, names the service away or the error's class (a
    driver's message can name hosts, paths and columns). `counted`: this try's count was written; a
    stop before it (the lock or the count's own statement lost to the database) refunds none, or an
    earlier try, counted for its own error, would be given back."""
    reason = one_line(exc)
    cause: BaseException = exc
    while cause.__cause__ is not None:  # a submission's stop wraps what stopped it
        cause = cause.__cause__
    shown = f"an internal error, {type(cause).__name__}; the server's log has it"
    tries = attempt or 0
    away = _away(exc)
    if away == _BUILDERS and waited_s > _BUILDERS_WAIT_S:
        # Builds a file's own slow schemas keep busy can make it wait on itself: an hour after the
        # batch was created a stop for them spends a try again (whoever's schemas hold them), and
        # the batch fails as the server's fault once its tries are spent.
        away = None
    try:
        if tries >= settings.batch_submission_attempts and not away:
            # The batch names the error's class and says the log has it: this is that line.
            logger.error("batch %s: submission failed %d times; giving up", name, tries, exc_info=exc)
            _give_up(run_id, callback, f"submission failed {tries} times, last: {shown}")
            return
        if away:
            # Longer the longer it has waited (each try reads the whole file again): the backoff
            # at first, 3x it after ten minutes, at most ten minutes.
            delay = min(settings.batch_submission_backoff_s * (1 + max(waited_s, 0) / 300), 600.0)
        else:
            delay = min(settings.batch_submission_backoff_s * 2 ** max(tries - 1, 0), 3600.0)
        error = (
            f"submission waits for {away}; trying again in {delay:.0f} s"
            if away
            else f"submission try {tries} stopped ({shown}); trying again in {delay:.0f} s"
        )
        # The outage that stopped the try is often still on: recorded once the database is back
        # (within a bound), or the try a refund was owed stays counted and a flapping database
        # fails the batch as the server's fault.
        for recording in Retrying(
            retry=retry_if_exception_type(DATABASE_OUTAGES),
            stop=stop_after_delay(POSTPONE_WITHIN_S),
            wait=wait_exponential(multiplier=0.25, max=5.0),
            reraise=True,
        ):
            with recording, session_scope() as session:
                postpone_submission(
                    session=session,
                    run_id=run_id,
                    error=error,
                    delay_s=delay,
                    refund=away is not None and counted,
                )
        logger.warning(
            "batch %s: submission try %s stopped (%s); again in %.0f s",
            name,
            tries,
            reason,
            delay,
            exc_info=None if away else exc,  # an error of the work: where it came from
        )
    except Exception:
        logger.exception("batch %s: submission stopped (%s) and could not be rescheduled", name, reason)


def _give_up(run_id: uuid.UUID, callback: str | None, error: str) -> None:
    with session_scope() as session:
        failed = fail_submission(
            session=session, run_id=run_id, error=error, error_code="server_error", final=True
        )
    if failed and callback:
        send_callback(run_id)


# What one pass of housekeeping spends on batches to finalize and submissions to try again, together,
# before it leaves the rest to the next (review, stop 76: one tenant's many big batches, due at once
# after an API restart, held the sweeper's next pass, and another tenant's lost live turn with it);
# a batch started before it runs on (a large one's files take minutes), and each step starts one at
# least, so a backlog of the one never starves the other.
PASS_S = 30.0


def retry_batch_submissions(stalled_after_s: float = 60.0, deadline: float | None = None) -> list[str]:
    """Try again the batches whose submission is due a retry, or stalled (its submitter died), those
    that start before `deadline` (time.monotonic; None: PASS_S from now)."""
    with session_scope() as session:
        due = batch_submissions_due(session=session, stalled_after_s=stalled_after_s)
    tried: list[str] = []
    deadline = time.monotonic() + PASS_S if deadline is None else deadline
    for name in due:
        if tried and time.monotonic() > deadline:  # one at least; the rest are due still: the next pass
            break
        submit_batch_by_name(name)
        tried.append(name)
    return tried


# --- the batch as OpenAI's API shows it ------------------------------------------------------------

# OpenAI has no `queued`: a batch whose lines are all sent and none answered yet is in progress.
_STATUS = {RunStatus.QUEUED: "in_progress"}


def _shown_status(status: RunStatus, cancel_reason: str | None) -> str:
    """The status as OpenAI names it: a cancelled batch writing its files is still `cancelling` (a
    client that cancelled waits for cancelling → cancelled), and an expiring one, which nobody
    cancelled, is `finalizing` (not `cancelling`)."""
    if status == RunStatus.FINALIZING and cancel_reason == "cancelled":
        return RunStatus.CANCELLING.value
    if status == RunStatus.CANCELLING and cancel_reason == "expired":
        return RunStatus.FINALIZING.value
    return _STATUS.get(status, status.value)


def _ts(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_object(session: Session, run: Run, counts: RunCounts | None = None) -> dict[str, Any]:
    """The run as an OpenAI Batch object (plus `model`); `counts`: its turns', counted already."""
    counts = counts or run_counts(session=session, run_id=run.id, unsent=False)
    status = RunStatus(run.status)
    ended = {
        RunStatus.COMPLETED: "completed_at",
        RunStatus.FAILED: "failed_at",
        RunStatus.EXPIRED: "expired_at",
        RunStatus.CANCELLED: "cancelled_at",
    }
    stamps = dict.fromkeys(ended.values())
    if status in ended:
        stamps[ended[status]] = _ts(run.finished_at)
    if status == RunStatus.FAILED:
        errors = run.line_errors or [{"line": None, "message": run.error or "the batch failed"}]
        code = run.error_code or "invalid_request"
        error_list = {
            "object": "list",
            "data": [
                {"code": code, "line": e["line"], "message": e["message"], "param": param_of(e["message"])}
                for e in errors
            ],
        }
    else:
        error_list = None
    return {
        "id": run.name,
        "object": "batch",
        "endpoint": ENDPOINT,
        "model": run.model,
        "errors": error_list,
        "input_file_id": run.input_file_id,
        "completion_window": run.completion_window,
        "status": _shown_status(status, run.cancel_reason),
        "output_file_id": run.output_file_id,
        "error_file_id": run.error_file_id,
        "created_at": _ts(run.created_at),
        "in_progress_at": _ts(run.in_progress_at),
        "expires_at": _ts(run.expires_at),
        "finalizing_at": _ts(run.finalizing_at),
        "cancelling_at": None if run.cancel_reason == "expired" else _ts(run.cancelling_at),
        **stamps,
        "request_counts": {
            # An ended batch's files account for every request, those it never stored among them
            # (run.total); any other counts what it stored (or, before storing, what it validated).
            # While it is stored: what it validated (a part stored, or only its refusals recorded, was
            # once read as the whole batch: "3 of 3 failed" for a batch of 60 with 3 refused); and while
            # it is cancelled or expires on its way there (review: its total fell, then rose again).
            "total": counts.requests(run.total)
            if status in (RunStatus.CANCELLED, RunStatus.EXPIRED, RunStatus.VALIDATING)
            or run.cancel_reason is not None
            else (counts.total + counts.refused) or run.total,
            "completed": counts.completed,
            # Cancelled and expired requests are neither (as OpenAI counts); refused ones failed, and
            # so did a request cancelled alone in a batch that went on (its error file says so).
            "failed": counts.failed + counts.refused + (counts.cancelled if cancelled_alone(run) else 0),
        },
        "metadata": run.metadata_,
    }


def _visible_run(session: Session, batch_id: str, api_key: str | None, admin: bool, tenant: str) -> Run:
    """The batch when this key owns it: its name, in its tenant (a name passed to another tenant's
    key is another owner)."""
    run = session.scalars(
        select(Run).where(Run.name == batch_id, Run.input_file_id.is_not(None))
    ).one_or_none()
    if run is None or not (admin or (run.api_key == api_key and run.tenant == tenant)):
        raise BatchNotFound(f"no batch {batch_id!r}")
    return run


def get_batch(
    batch_id: str, *, api_key: str | None, admin: bool, tenant: str = DEFAULT_TENANT
) -> dict[str, Any]:
    with session_scope() as session:
        return batch_object(session, _visible_run(session, batch_id, api_key, admin, tenant))


def list_batches(
    *, api_key: str | None, admin: bool, after: str | None, limit: int, tenant: str = DEFAULT_TENANT
) -> dict[str, Any]:
    """Newest first, `limit` per page, after the batch id `after`."""
    with session_scope() as session:
        query = select(Run).where(Run.input_file_id.is_not(None))
        if not admin:
            query = query.where(Run.api_key == api_key, Run.tenant == tenant)
        if after is not None:
            cursor = _visible_run(session, after, api_key, admin, tenant)
            # A row comparison: the index (ix_runs_tenant_created_at) starts at the cursor.
            query = query.where(tuple_(Run.created_at, Run.id) < tuple_(cursor.created_at, cursor.id))
        rows = session.scalars(query.order_by(Run.created_at.desc(), Run.id.desc()).limit(limit + 1)).all()
        counts = runs_counts(session=session, run_ids=[run.id for run in rows[:limit]], unsent=False)
        shown = [batch_object(session, run, counts[run.id]) for run in rows[:limit]]
        return list_object(shown, len(rows) > limit)


def cancel_batch(
    batch_id: str,
    *,
    api_key: str | None,
    admin: bool,
    tenant: str = DEFAULT_TENANT,
    finalize: Callable[[uuid.UUID], Any] | None = None,
) -> dict[str, Any]:
    """Cancel the batch's unstarted requests; finished ones are kept and written to its output, at
    once when nothing of it runs (housekeeping otherwise, or on failure). `finalize`: what writes the
    files (an HTTP request's background task: a large batch's files take minutes); at once if None.
    A batch that ended completed, failed or expired, or that is writing its files with nothing left
    to stop, is BatchEnded (a cancelled one is answered as it is: cancelling twice is cancelling)."""
    with session_scope() as session:
        run = _visible_run(session, batch_id, api_key, admin, tenant)
        run_id = run.id
        try:
            outcome = cancel_run(session=session, run_id=run_id)
        except KeyError:  # cancel_run's "no run": deleted past retention since it was read (review: a 500)
            raise BatchNotFound(f"no batch {batch_id!r}") from None
        ended = (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.EXPIRED)
        # A batch writing its files because every request ended (or its window closed) has nothing
        # left to stop: a 200 there was a cancel accepted, then the batch `completed` (review).
        # its reason as it stands under the cancel's lock (review: read before, a concurrent cancel's
        # was missed and its retry told the batch could not be cancelled)
        reason = session.scalar(select(Run.cancel_reason).where(Run.id == run_id))
        writing = outcome.before == RunStatus.FINALIZING and reason != "cancelled"
        if (outcome.before in ended or writing) and not outcome.changed:
            shown = _shown_status(outcome.before, reason)
            raise BatchEnded(f"Cannot cancel a batch with status {shown!r}")
    (finalize or finalize_run)(run_id)
    return get_batch(batch_id, api_key=api_key, admin=admin, tenant=tenant)


# --- housekeeping: expiry, finalizing, callbacks ---------------------------------------------------


def expire_due_runs(models: Sequence[str] | None = None) -> list[str]:
    """Runs (of these models; None: all) whose completion window closed: their unstarted turns are
    cancelled, and the run ends `expired` once nothing of it runs (finished replies are kept)."""
    expired = []
    with session_scope() as session:
        due = due_to_expire(session=session, models=models)
    for run_id in due:
        with session_scope() as session:
            outcome = cancel_run(session=session, run_id=run_id, reason="expired")
            if outcome.changed:
                expired.append(str(run_id))
    return expired


def finalize_runs(
    limit: int = 10, models: Sequence[str] | None = None, deadline: float | None = None
) -> list[str]:
    """Write the output and error files of runs (of these models; None: all) in `finalizing`, one
    transaction each (the run's row stays locked meanwhile, so two finalizers never write the same
    run), those that start before `deadline` (time.monotonic; None: PASS_S from now); returns their
    names. A run whose files cannot be written goes to the back of the line."""
    done = []
    tried: set[uuid.UUID] = set()
    deadline = time.monotonic() + PASS_S if deadline is None else deadline
    for _ in range(limit):
        if tried and time.monotonic() > deadline:  # one at least; the sweep's next re-send waits on it
            break
        with session_scope() as session:
            ids = finalizing_runs(session=session, limit=1, models=models)
        if not ids or ids[0] in tried:  # one that failed came round again: the next pass tries it
            break
        tried.add(ids[0])
        name = finalize_run(ids[0])
        if name is not None:
            done.append(name)
    return done


def finalize_run(run_id: uuid.UUID) -> str | None:
    """Write one finalizing run's files and end it; its name, or None if another finalizer holds it,
    it is not finalizing, or writing failed (logged; the run is tried again later)."""
    written: list[Path] = []  # this try's files: gone again if their rows are not committed
    try:
        with session_scope() as session:
            if not begin_finalizing_try(session=session, run_id=run_id):
                return None
        with session_scope() as session:
            locked = session.scalar(
                select(Run.id)
                .where(Run.id == run_id, Run.status == RunStatus.FINALIZING)
                # FOR NO KEY UPDATE: a desk label (FOR KEY SHARE) never waits through the files' writing
                .with_for_update(key_share=True, skip_locked=True)
            )
            if locked is None:
                return None
            run = session.get_one(Run, run_id)
            name, callback = run.name, run.callback_url
            output_id, error_id, accounted = _write_files(session, run, written)
            finish_finalizing(
                session=session,
                run_id=run_id,
                output_file_id=output_id,
                error_file_id=error_id,
                total_at_least=accounted,
            )
    except Exception as exc:
        logger.exception("run %s: writing its output files failed; trying again later", run_id)
        remove_unlisted(written)
        try:
            with session_scope() as session:
                # The error's class only, as a submission's: the batch is its tenant's to read, and
                # a driver's or the OS's text names hosts and paths (review of error texts).
                failed = postpone_finalizing(
                    session=session,
                    run_id=run_id,
                    error=f"finalizing: an internal error, {_class_and_cause(exc)}; the server's log has it",
                    give_up_s=settings.finalize_give_up_hours * 3600,
                )
                callback = (
                    session.scalar(select(Run.callback_url).where(Run.id == run_id)) if failed else None
                )
        except Exception:  # the database is down too: the run stays finalizing, tried again as it is
            logger.warning("run %s: could not record the failed finalizing", run_id, exc_info=True)
            return None
        # review: a fault that never passes was tried at every pass for ever, its client told nothing
        if failed:
            logger.error(
                "run %s: its files failed for %s h; the batch failed", run_id, settings.finalize_give_up_hours
            )
            if callback:
                send_callback(run_id)
        return None
    if callback:
        send_callback(run_id)
    return name


def send_callback(run_id: uuid.UUID) -> bool:
    """Queue the run's completion callback; whether it went (if the broker is down, housekeeping
    queues it later)."""
    from tasks.callbacks import deliver_batch_callback

    try:
        deliver_batch_callback.delay(str(run_id))
        return True
    except Exception:
        logger.warning("run %s: could not queue its callback; housekeeping will", run_id, exc_info=True)
        return False


# One sweep's pages of callbacks to queue again, of each kind: pages until one is short, a publish
# fails (the broker away) or PASS_S is spent (review: one page a pass, a hundred retries a minute,
# left a long outage's backlog to be given up at the window's end, never tried again).
LOST_PAGE = 1000
RETRY_PAGE = 100


def _in_pages(
    claim: Callable[[], list[uuid.UUID]], send: Callable[[list[uuid.UUID]], list[uuid.UUID]], page: int
) -> list[str]:
    """Claim a page and send it, again while pages come full and every one of them was sent; the ids
    sent."""
    sent: list[str] = []
    deadline = time.monotonic() + PASS_S
    while True:
        claimed = claim()
        done = send(claimed)
        sent += [str(row_id) for row_id in done]
        if len(claimed) < page or len(done) < len(claimed) or time.monotonic() > deadline:
            return sent


def _lost(of: Any, older_than_s: float) -> list[uuid.UUID]:
    with session_scope() as session:
        return claim_lost_callbacks(
            session=session,
            older_than_s=older_than_s,
            of=of,
            limit=LOST_PAGE,
            within_s=settings.callback_retry_window_s,
        )


def redeliver_callbacks(older_than_s: float = 300.0) -> list[str]:
    """Queue the callbacks of finished runs that were never attempted (their message was lost)."""

    def send(due: list[uuid.UUID]) -> list[uuid.UUID]:
        unsent = [run_id for run_id in due if not send_callback(run_id)]
        _unclaim(Run, unsent)
        return [run_id for run_id in due if run_id not in unsent]

    return _in_pages(lambda: _lost(Run, older_than_s), send, LOST_PAGE)


def redeliver_turn_callbacks(older_than_s: float = 300.0) -> list[str]:
    """Queue the callbacks of finished turns that were never attempted (their message was lost, or
    the turn failed before a worker saw it)."""

    def send(due: list[uuid.UUID]) -> list[uuid.UUID]:
        unsent = send_turn_callbacks(due)
        _unclaim(Turn, unsent)
        kept_back = set(unsent)
        return [turn_id for turn_id in due if turn_id not in kept_back]

    return _in_pages(lambda: _lost(Turn, older_than_s), send, LOST_PAGE)


def _unclaim(of: Any, unsent: list[uuid.UUID]) -> None:
    """Give back the claims of lost callbacks whose message could not be queued (the broker still
    away): the next pass takes them again, rather than the retries in a quarter of an hour, which
    give up those past a short window never having sent them. The database away too: they wait for
    the retries."""
    if not unsent:
        return
    try:
        with session_scope() as session:
            release_lost_claims(session=session, of=of, row_ids=unsent)
    except Exception:
        logger.warning("could not give back the claims of %d lost callbacks", len(unsent), exc_info=True)


def retry_callbacks() -> list[str]:
    """Try once more each callback due again (a burst of tries did not deliver it, or its retry
    message was lost), as the last try of a burst: one that fails waits for its next due time
    instead of starting a burst of its own."""
    from tasks.callbacks import deliver_batch_callback, deliver_turn_callback

    window = settings.callback_retry_window_s
    sent: list[str] = []
    for task, of in ((deliver_batch_callback, Run), (deliver_turn_callback, Turn)):

        def claim(of: Any = of) -> list[uuid.UUID]:
            with session_scope() as session:
                return claim_retries(session=session, of=of, window_s=window, limit=RETRY_PAGE)

        def send(due: list[uuid.UUID], task: Any = task) -> list[uuid.UUID]:
            queued = []
            for row_id in due:
                try:
                    task.apply_async(args=[str(row_id)], retries=task.max_retries)
                except Exception:  # its due time moved on: the next look after that tries it
                    logger.warning("could not queue the callback of %s again", row_id, exc_info=True)
                    continue
                queued.append(row_id)
            return queued

        try:
            sent += _in_pages(claim, send, RETRY_PAGE)
        except DATABASE_OUTAGES:  # the next pass looks again
            logger.warning("could not read the callbacks due again", exc_info=True)
            break
    return sent


def _write_files(session: Session, run: Run, written: list[Path]) -> tuple[str | None, str | None, int]:
    """The run's output and error files and their rows, and the requests they account for (refused
    ones aside); each path is added to `written` before it is written, so the caller can remove them
    if the rows are not committed. A file with no line is not kept: its id is None, as OpenAI leaves
    `error_file_id` of a batch without errors (clients test it to learn whether any request failed)."""
    # Writing streams the turns and detaches the run: read what is needed of it first.
    name, api_key, tenant, expires_after_s = run.name, run.api_key, run.tenant, run.output_expires_after_s
    run_id, reason, input_file_id = run.id, run.cancel_reason, run.input_file_id
    settings.batch_files_dir.mkdir(parents=True, exist_ok=True)
    output_id, error_id = new_file_id(), new_file_id()
    output_path = settings.batch_files_dir / f"{output_id}.jsonl"
    error_path = settings.batch_files_dir / f"{error_id}.jsonl"
    written += [output_path, error_path]
    stored = sum(write_outputs(session, run, output_path, error_path, "openai"))
    stored -= len(run_refusals(session=session, run_id=run_id))
    never = 0
    found = find_file(input_file_id) if reason is not None and input_file_id else None
    if found is not None and found.path.is_file():  # expired or cancelled: requests never stored too
        never = write_never_stored(
            session, run_id, expired=reason == "expired", input_path=found.path, errors_path=error_path
        )
    kept: dict[str, str | None] = {}
    for file_id, path, purpose in (
        (output_id, output_path, "batch_output"),
        (error_id, error_path, "batch_output"),  # OpenAI's purpose for both result files
    ):
        if path.stat().st_size == 0:
            path.unlink()
            kept[file_id] = None
            continue
        kept[file_id] = file_id
        add_file(
            session=session,
            file_id=file_id,
            purpose=purpose,
            filename=f"{name}_{'error' if file_id == error_id else 'output'}.jsonl",
            size=path.stat().st_size,
            path=path.name,
            api_key=api_key,
            tenant=tenant,
            expires_after_s=expires_after_s,
        )
    return kept[output_id], kept[error_id], stored + never


def _class_and_cause(exc: BaseException) -> str:
    """The error's class, and an OS error's cause without its file name ("OSError (No space left on
    device)"): what a tenant may read, the operator's paths and hosts left to the log."""
    strerror = exc.strerror if isinstance(exc, OSError) else None
    return f"{type(exc).__name__} ({strerror})" if strerror else type(exc).__name__


def rewrite_output_file(session: Session, run_id: uuid.UUID, file_id: str) -> None:
    """Rewrite a finished batch's output file from the turns as they are now (after a writer's
    change), replacing it whole once the caller's transaction commits (a change rolled back leaves
    the file as it was); the caller holds the run's row lock, so rewrites never interleave, and a
    rewrite is put in place only while no later one has committed (`_publish`). A file already
    deleted or expired stays gone."""
    row = get_file(session=session, file_id=file_id)
    if row is None:
        return
    path = settings.batch_files_dir / row.path
    session.expunge_all()  # the turns are read afresh, not from objects loaded before the change
    run = session.get_one(Run, run_id)
    scratch = uuid.uuid4().hex
    output_tmp = path.with_name(f".{path.name}.{scratch}.tmp")
    error_tmp = path.with_name(f".{path.name}.{scratch}.errors.tmp")
    try:
        write_outputs(session, run, output_tmp, error_tmp, "openai")
    except BaseException:
        output_tmp.unlink(missing_ok=True)
        raise
    finally:
        error_tmp.unlink(missing_ok=True)
    rewrite = set_file_size(session=session, file_id=file_id, size=output_tmp.stat().st_size)

    def publish(*_: Any) -> None:
        if output_tmp.exists():  # not after a rollback that discarded it
            _publish(file_id, output_tmp, path, rewrite)

    committing: list[bool] = []

    def commit_begun(*_: Any) -> None:
        committing.append(True)

    def discard(*_: Any) -> None:
        # A COMMIT whose connection was lost may have committed all the same (its reply lost): the
        # scratch is left for the orphan sweep, which writes the file again from what the database
        # holds, changed or not (review of database errors: deleted here, a change whose commit
        # landed never reached the download). The rollback runs while its error is handled.
        error = sys.exc_info()[1]
        if not (committing and error is not None and connection_lost(error)):
            output_tmp.unlink(missing_ok=True)

    event.listen(session, "after_commit", publish, once=True)
    event.listen(session, "before_commit", commit_begun, once=True)
    event.listen(session, "after_soft_rollback", discard, once=True)


def _publish(file_id: str, scratch: Path, path: Path, rewrite: str | None) -> None:
    """Put a committed rewrite in place, unless a later one has committed since. The run's row lock
    orders the rewrites' transactions but not their renames, which come after the commits: a
    rewrite whose process stalled between its commit and its rename would put its older file over a
    later one's (a writer's change missing from the download for good). Each rename is made under
    the file's rewrite lock, by the rewrite the file's row names last."""
    if rewrite is None:  # the file's row was deleted meanwhile: it stays gone
        scratch.unlink(missing_ok=True)
        return
    try:
        # The lock pool's connection: this runs while the committing session still holds its own,
        # and ten such at once would hold the request pool and wait for an eleventh.
        with Session(get_lock_engine()) as session, session.begin():
            if latest_rewrite(session=session, file_id=file_id) == rewrite:
                scratch.replace(path)
    except SQLAlchemyError:  # the change is committed: its file goes in place unchecked (a race is rarer)
        logger.warning("batch file %s: its rewrite goes in place unchecked", file_id, exc_info=True)
        if scratch.exists():
            scratch.replace(path)
    finally:
        scratch.unlink(missing_ok=True)


def _sweep_orphan_files() -> list[str]:
    """delete_orphan_files; then each output file a rewrite's scratch was left beside is written again
    from its run's turns as they stand, and the scratch removed once that committed (kept for the
    next sweep if it failed). A process killed between a writer's change's commit and the file's
    rename left the download without the change for good, its row's size disagreeing (review of
    kills between commits); killed before the commit, the file is written again as it was."""
    rewrites: list[Path] = []
    names = delete_orphan_files(rewrites=rewrites)
    by_file: dict[str, list[Path]] = {}  # one rewrite a file, however many scratches it left (review)
    for scratch in rewrites:
        found = REWRITE_SCRATCH.fullmatch(scratch.name)
        assert found is not None  # delete_orphan_files' own test
        by_file.setdefault(found[1], []).append(scratch)
    for file_id, scratches in sorted(by_file.items()):
        try:
            with session_scope() as session:
                run_id = lock_run_of_output_file(session=session, file_id=file_id)
                if run_id is not None:
                    rewrite_output_file(session, run_id, file_id)
        except Exception:  # kept: the next sweep tries it again
            logger.warning(
                "batch file %s: its interrupted rewrite could not be done again", file_id, exc_info=True
            )
            continue
        for scratch in scratches:
            scratch.unlink(missing_ok=True)
            names.append(scratch.name)
    return names


# Looking for orphan bytes reads the whole files folder: once in this long, not every pass (orphans
# are deleted an hour old; a pass runs every MLCHAT_HOUSEKEEPING_INTERVAL_S). The time of the last
# look is a marker file's under MLCHAT_STATE_DIR, kept by the host's (the container's) processes one
# after another (review, stop 76: a process's own clock, and compose's sweeper is a new process each
# minute, so it looked every pass).
ORPHAN_SWEEP_EVERY_S = 600.0
ORPHAN_SCAN_MARKER = "orphan-scan"
_orphans_swept_at = [-ORPHAN_SWEEP_EVERY_S]  # this process's last look (monotonic), where no marker is


def _orphan_sweep_due() -> bool:
    """Whether the last look for orphan bytes by a process of this host was ORPHAN_SWEEP_EVERY_S ago;
    marks this one (two passes at once may both look: harmless). Where the marker cannot be written
    (a read-only state folder), the process's own last look decides, as before."""
    marker = settings.state_dir / ORPHAN_SCAN_MARKER
    now = time.monotonic()
    try:
        if 0 <= time.time() - marker.stat().st_mtime < ORPHAN_SWEEP_EVERY_S:  # (a clock set back: look)
            return False
    except OSError:  # none yet, or none to read
        pass
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)  # compose names a folder no one makes
        marker.touch()
    except OSError:
        if now - _orphans_swept_at[0] < ORPHAN_SWEEP_EVERY_S:
            return False
    _orphans_swept_at[0] = now
    return True


class HousekeepingIncomplete(RuntimeError):
    """Some housekeeping steps raised; `done` has what every step did (nothing for those)."""

    def __init__(self, message: str, done: dict[str, list[str]]) -> None:
        super().__init__(message)
        self.done = done


def housekeeping(models: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Expire what is due, finalize what is finished (runs of these models; None: all), queue lost
    callbacks, retry batch submissions and try again the callbacks that are due (the sweeper's, for
    all models), delete expired files; safe to run anywhere, any time, concurrently. Each step on its
    own: one that raises (a folder unreadable, a batch whose finalizing fails) leaves the others done,
    and HousekeepingIncomplete names it once all have run (the callback retries came last, and any
    step before them that raised kept them from ever running)."""
    everywhere = models is None
    # One budget for the pass's slow steps together: each starts no batch past it (one already
    # started runs on), so the sweep's next re-send of lost turns is not held by all of them.
    deadline = time.monotonic() + PASS_S
    steps: list[tuple[str, Callable[[], list[str]]]] = [
        ("expired", lambda: expire_due_runs(models)),
        ("finalized", lambda: finalize_runs(models=models, deadline=deadline)),
        ("callbacks", redeliver_callbacks if everywhere else list),
        ("turn_callbacks", redeliver_turn_callbacks if everywhere else list),
        ("submissions", (lambda: retry_batch_submissions(deadline=deadline)) if everywhere else list),
        ("files_deleted", delete_expired_files),
        ("orphan_files_deleted", lambda: _sweep_orphan_files() if _orphan_sweep_due() else []),
        ("callback_retries", retry_callbacks if everywhere else list),
    ]
    done: dict[str, list[str]] = {}
    failed: list[str] = []
    for name, step in steps:
        try:
            done[name] = step()
        except Exception as exc:
            logger.warning("housekeeping: %s failed", name, exc_info=True)
            done[name] = []
            failed.append(f"{name}: {one_line(exc)}")
    if failed:
        raise HousekeepingIncomplete("housekeeping incomplete: " + "; ".join(failed), done)
    return done
