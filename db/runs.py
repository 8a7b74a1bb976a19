"""Every query on bulk runs: create (idempotent by name), counts, list, cancel, retry, export rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from db.models import Run, RunStatus, Turn, TurnStatus

FINISHED = (TurnStatus.DONE, TurnStatus.FAILED, TurnStatus.CANCELLED)


class RunConflict(ValueError):
    """A run name was reused for a different file."""


@dataclass(frozen=True)
class RunCounts:
    """request_counts of a run, from its turn rows."""

    total: int
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.cancelled


def create_run(*, session: Session, name: str, model: str, file_hash: str, total: int) -> tuple[Run, bool]:
    """Insert a run in `validating`, or return the existing one of that name (same file only)."""
    run_id = session.scalar(
        insert(Run)
        .values(
            id=uuid.uuid4(),
            name=name,
            model=model,
            file_hash=file_hash,
            total=total,
            status=RunStatus.VALIDATING,
        )
        .on_conflict_do_nothing(index_elements=[Run.name])
        .returning(Run.id)
    )
    run = session.scalars(select(Run).where(Run.name == name)).one()
    if run_id is None and run.file_hash != file_hash:
        raise RunConflict(f"run {name!r} already exists for a different file; pick another --name")
    return run, run_id is not None


def find_run(*, session: Session, ref: str) -> Run | None:
    """A run by id or by name."""
    try:
        return session.get(Run, uuid.UUID(ref))
    except ValueError:
        return session.scalars(select(Run).where(Run.name == ref)).one_or_none()


def run_counts(*, session: Session, run_id: uuid.UUID) -> RunCounts:
    """Count the run's turns by status in one query."""
    by_status = dict(
        session.execute(select(Turn.status, func.count()).where(Turn.run_id == run_id).group_by(Turn.status))
        .tuples()
        .all()
    )
    n = {status: int(by_status.get(status, 0)) for status in TurnStatus}
    return RunCounts(
        total=sum(n.values()),
        queued=n[TurnStatus.QUEUED],
        running=n[TurnStatus.RUNNING],
        completed=n[TurnStatus.DONE],
        failed=n[TurnStatus.FAILED],
        cancelled=n[TurnStatus.CANCELLED],
    )


def run_quality(*, session: Session, run_id: uuid.UUID) -> dict[str, Any]:
    """Reply-quality summary of a run's answered turns (roleplay/quality.py)."""
    q = Turn.quality
    row = session.execute(
        select(
            func.count(q),
            func.avg(q["persona"].as_float()),
            func.avg(q["repetition"].as_float()),
            func.avg(case((q["language_match"].as_boolean(), 1.0), else_=0.0)),
            func.count().filter(func.jsonb_array_length(q["below_bar"]) > 0),
            func.count().filter(q.has_key("regenerated")),
        ).where(Turn.run_id == run_id, q.is_not(None))
    ).one()
    scored, persona, repetition, language, below, regenerated = row
    if not scored:
        return {"scored": 0}
    return {
        "scored": scored,
        "persona_mean": round(float(persona), 4),
        "repetition_mean": round(float(repetition), 4),
        "language_match_rate": round(float(language), 4),
        "below_bar": below,
        "regenerated": regenerated,
    }


def refresh_status(*, session: Session, run: Run) -> RunCounts:
    """Advance the run's lifecycle from its counts (queued → in_progress → completed / cancelled)."""
    counts = run_counts(session=session, run_id=run.id)
    status = run.status
    if status in (RunStatus.QUEUED, RunStatus.IN_PROGRESS) and counts.finished:
        status = RunStatus.IN_PROGRESS
    if status == RunStatus.IN_PROGRESS and counts.finished == counts.total:
        status = RunStatus.COMPLETED
    if status == RunStatus.CANCELLING and counts.running == 0 and counts.queued == 0:
        status = RunStatus.CANCELLED
    if status != run.status:
        run.status = status
        if status in (RunStatus.COMPLETED, RunStatus.CANCELLED):
            run.finished_at = datetime.now(UTC)
    return counts


def list_runs(*, session: Session, limit: int = 50) -> Sequence[Run]:
    """Newest runs first."""
    return session.scalars(select(Run).order_by(Run.created_at.desc()).limit(limit)).all()


def cancel_run(*, session: Session, run: Run) -> int:
    """Cancel the run's queued turns (finished results stay); returns how many were cancelled."""
    run.status = RunStatus.CANCELLING
    result = session.execute(
        update(Turn)
        .where(Turn.run_id == run.id, Turn.status == TurnStatus.QUEUED)
        .values(status=TurnStatus.CANCELLED, finished_at=func.now())
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reset_failed(*, session: Session, run: Run) -> list[uuid.UUID]:
    """Put the run's failed turns back to queued with fresh attempts; returns their ids."""
    ids = list(
        session.scalars(
            update(Turn)
            .where(Turn.run_id == run.id, Turn.status == TurnStatus.FAILED)
            .values(status=TurnStatus.QUEUED, attempts=0, error=None, finished_at=None)
            .returning(Turn.id)
        ).all()
    )
    if ids:
        run.status = RunStatus.IN_PROGRESS
        run.finished_at = None
    return ids


def iter_run_turns(*, session: Session, run_id: uuid.UUID, chunk: int = 1000) -> Iterator[Turn]:
    """The run's turns in input order, streamed in chunks (bounded memory for large runs)."""
    last = -1
    while True:
        rows = session.scalars(
            select(Turn).where(Turn.run_id == run_id, Turn.number > last).order_by(Turn.number).limit(chunk)
        ).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].number
        session.expunge_all()
