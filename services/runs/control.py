"""A run's status (read only), cancel, retry of failed turns, resume of a submission that died."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from db.models import RUN_FINISHED, Run, RunStatus
from db.runs import (
    CancelOutcome,
    RunCounts,
    cancel_run,
    find_run,
    later_scene_steps,
    refuse_deleting,
    reopen_failed,
    run_counts,
    submission_alive,
)
from db.session import session_scope
from db.turns import transaction_stamp
from services.runs.quality_summary import quality_summary
from services.runs.validate import SubmissionRefused

# A file name is at most 255 bytes on Linux and macOS; the longest suffix an export adds is 14
# (".results.jsonl"). A run name holds 200 characters, which in Korean is 600 bytes.
_NAME_BYTES = 255 - len(".results.jsonl")


def export_stem(name: str) -> str:
    """The run's name as its export files' stem: whole when it fits a file name, else cut at a
    character and told apart from other long names by a digest of the whole."""
    if len(name.encode()) <= _NAME_BYTES:
        return name
    tag = "-" + hashlib.sha256(name.encode()).hexdigest()[:12]
    cut = name.encode()[: _NAME_BYTES - len(tag)].decode("utf-8", errors="ignore")
    return cut + tag


class RunNotFound(KeyError):
    """No run of that id or name (of that tenant): the caller's input, refused (the CLI's exit 2)."""


def require_run(session: Session, ref: str) -> Run:
    """The run by id or name; RunNotFound if there is none."""
    run = find_run(session=session, ref=ref)
    if run is None:
        raise RunNotFound(f"no run {ref!r}")
    return run


def require_whole_run(session: Session, ref: str) -> Run:
    """require_run, and RunDeleting once its deletion past retention began: what is read of it then
    is no longer whole (an export of it, a training set)."""
    run = require_run(session, ref)
    refuse_deleting(session=session, run_id=run.id, name=run.name)
    return run


def still_whole(run: Run) -> None:
    """RunDeleting if the run's deletion began, or it went, while it was read a chunk at a time: the
    caller's files, written short, are not put in place (review: an export came out silently short)."""
    with session_scope() as session:
        refuse_deleting(session=session, run_id=run.id, name=run.name)


def interrupted_message(run: Run, counts: RunCounts, stored: int) -> str:
    """What a run whose submission died says, and how to go on; `stored`: its file's lines stored
    (stored_lines)."""
    sent = counts.total - counts.unsent
    return (
        f"submission interrupted: {stored} of {run.total} lines stored, {sent} of their {counts.total} turns "
        f"sent; resubmit the same file (or `mlchat run resume {run.name} FILE`) to store and send the rest"
    )


def stored_lines(session: Session, run_id: uuid.UUID, counts: RunCounts) -> int:
    """How many lines of its file the run stored: its turns, less its scenes' later steps."""
    return counts.total - later_scene_steps(session=session, run_id=run_id)


@dataclass(frozen=True)
class RunState:
    id: uuid.UUID
    name: str
    status: RunStatus
    counts: RunCounts
    error: str | None
    quality: dict[str, Any]
    # `validating` with nobody submitting: the submission died (resubmit the file, or `run resume`).
    interrupted: bool = False
    lines: int = 0  # the lines the run holds or will: its file's good lines, or its stored ones if more
    stored: int = 0  # its file's lines stored (a scene's later steps are turns, not lines)

    @property
    def never_stored(self) -> int:
        """Lines of its file the run never stored because its submission stopped (a cancel or a
        failure during it, or the submitter gone); none while a submission is still storing them."""
        if self.status == RunStatus.VALIDATING and not self.interrupted:
            return 0
        return max(self.lines - self.stored, 0)

    @property
    def turns(self) -> int:
        """The turns the run holds or will: those stored, and one a line for the lines not stored
        (a scene's later steps are turns of its line: review, a scene run showed "10/2"), and its
        requests refused by policy (never stored; answered failed, as the API counts a batch's)."""
        return self.counts.total + max(self.lines - self.stored, 0) + self.counts.refused

    @property
    def finished(self) -> bool:
        return self.status in RUN_FINISHED


def run_state(ref: str) -> RunState:
    """The run's stored status, request_counts from its turns, and its reply-quality summary.

    Read only: the status moves only in the transactions that change turns (db/runs.py).
    """
    with session_scope() as session:
        run = require_run(session, ref)
        counts = run_counts(session=session, run_id=run.id)
        quality = quality_summary(session=session, run_id=run.id, live=run.status not in RUN_FINISHED)
        # A batch's submission (an input file) waiting for its retry after a transient error is not
        # interrupted: the sweeper submits it again (db/runs.py abandoned_submissions reads it so).
        interrupted = (
            run.status == RunStatus.VALIDATING
            and run.input_file_id is None
            and not submission_alive(session=session, name=run.name)
        )
        stored = stored_lines(session, run.id, counts)
        error = interrupted_message(run, counts, stored) if interrupted and run.error is None else run.error
        # A file refused at validation was never to be stored (its `total` is the good lines found)
        # (review: one holding turns, resumed and then refused, still has lines never stored)
        refused = run.status == RunStatus.FAILED and run.error_code == "invalid_request" and not counts.total
        lines = stored if refused else max(run.total or 0, stored)
        return RunState(run.id, run.name, run.status, counts, error, quality, interrupted, lines, stored)


def cancel(ref: str) -> CancelOutcome:
    """Cancel a run's queued turns; finished results are kept. A finished run is left as it is."""
    with session_scope() as session:
        return cancel_run(session=session, run_id=require_run(session, ref).id)


def retry_failed(ref: str) -> int:
    """Send a run's failed turns again with fresh attempts; returns how many. With the broker down,
    the turns whose message did not go are failed again (broker unreachable) and EnqueueError says
    so: run it again once the broker is back."""
    from services.producer import send_new_turns

    with session_scope() as session:
        run = require_run(session, ref)
        ids, model = reopen_failed(session=session, run_id=run.id), run.model
        sent_at = transaction_stamp(session)
    send_new_turns({model: ids}, lane="bulk", sent_at=sent_at)
    return len(ids)


def resume(ref: str, path: Path) -> Any:
    """Resume a run's submission from its file (the same file: checked by its hash)."""
    from services.runs.submit import regular_file, submit_run
    from services.runs.validate import file_digest

    with session_scope() as session:
        run = require_run(session, ref)
        name, digest = run.name, run.file_hash
    regular_file(path)  # before its digest: /dev/zero's would never end
    if file_digest(path) != digest:
        raise SubmissionRefused(
            f"{path} is not the file run {name!r} was submitted from (its sha256 differs)"
        )
    return submit_run(path, name=name)
