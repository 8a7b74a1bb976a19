"""The sweep's deletions past MLCHAT_RUN_RETENTION_DAYS, MLCHAT_PROMPT_RETENTION_DAYS and
MLCHAT_REQUEST_COPY_RETENTION_DAYS (db/retention.py), a chunk per transaction, each kind within its
share of one pass's time."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.settings import settings
from db.retention import PHASES, delete_request_copies, delete_run_chunk, forget_prompts, runs_past
from db.session import session_scope

logger = logging.getLogger(__name__)

PASS_S = 30.0  # one sweep's time for all three, a third each: the rest waits for the next sweep
RUNS_A_PASS = 100


def prune() -> dict[str, int]:
    """Delete what the settings keep no longer: {"runs": ended runs deleted whole, "prompts": live
    turns' prompts forgotten, "request_copies": conversations made for one request deleted}. Each
    kind has a third of PASS_S, so a backlog of one (the first sweeps after retention is switched
    on) leaves the others their turn."""
    share = PASS_S / 3
    done = {"runs": 0, "prompts": 0, "request_copies": 0}
    # Retention switched off since: the runs whose deletion began are finished all the same (half
    # deleted, every writer refuses them).
    done["runs"] = _prune_runs(settings.run_retention_days or None, time.monotonic() + share)
    if settings.prompt_retention_days:
        days = settings.prompt_retention_days
        done["prompts"] = _chunks(lambda s: forget_prompts(session=s, days=days), time.monotonic() + share)
    if settings.request_copy_retention_days:
        days = settings.request_copy_retention_days
        done["request_copies"] = _chunks(
            lambda s: delete_request_copies(session=s, days=days), time.monotonic() + share
        )
    return done


def _chunks(chunk: Callable[[Session], int], deadline: float) -> int:
    """Run `chunk(session)` a transaction each until it does nothing or the deadline; how many rows."""
    total = 0
    while time.monotonic() < deadline:
        with session_scope() as session:
            n = chunk(session)
        total += n
        if not n:
            break
    return total


def _prune_runs(days: int | None, deadline: float) -> int:
    """Delete the runs past `days` whole, phase by phase, until the deadline; how many went. A run
    whose rows another transaction holds is left for the next sweep."""
    with session_scope() as session:
        due = runs_past(session=session, days=days, limit=RUNS_A_PASS)
    deleted = 0
    for run_id in due:
        if time.monotonic() >= deadline:
            break
        try:
            deleted += _prune_run(run_id, days, deadline)
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available: busy, next sweep
                raise
            logger.info("retention: run %s is busy; the next sweep deletes it", run_id)
    return deleted


def _prune_run(run_id: uuid.UUID, days: int | None, deadline: float) -> int:
    """1 once the run is deleted whole, else 0 (the deadline came, or it is no longer one to delete)."""
    for phase in PHASES:
        while time.monotonic() < deadline:
            with session_scope() as session:
                chunk = delete_run_chunk(session=session, run_id=run_id, days=days, phase=phase)
            if chunk is None:
                return 0
            if phase == "run":
                for path in chunk.files:  # after the commit: a rollback keeps them with their rows
                    (settings.batch_files_dir / path).unlink(missing_ok=True)
                return 1
            if not chunk.deleted:
                break
        else:
            return 0
    return 0
