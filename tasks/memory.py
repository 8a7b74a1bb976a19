"""Memory jobs on the bulk lane: a rolling summary or a fact extraction for one conversation. The
message carries the conversation id and the kind; the job claims its row (db/memory_jobs.py), so a
duplicate or re-delivered message does nothing twice."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from core.settings import queue_for_model, settings
from tasks.app import app

logger = logging.getLogger(__name__)

TASK_NAME = "mlchat.memory_job"


@app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
def memory_job(conversation_id: int, kind: str) -> None:
    """Run one memory job; a failure is logged (the next stored reply schedules it again)."""
    from db.memory_jobs import EXTRACT, SUMMARY
    from memory.extract import run_extract_job
    from memory.summarize import run_summary_job

    try:
        if kind == SUMMARY:
            logger.info(
                "summaries stored for conversation %s: %s", conversation_id, run_summary_job(conversation_id)
            )
        elif kind == EXTRACT:
            logger.info("facts from conversation %s: %s", conversation_id, run_extract_job(conversation_id))
        else:
            logger.warning("unknown memory job kind %r dropped", kind)
    except Exception:
        logger.exception("memory job %s of conversation %s failed", kind, conversation_id)


def send_memory_jobs(jobs: Sequence[tuple[int, str]]) -> None:
    """Queue memory jobs on this model's bulk lane."""
    queue = queue_for_model(settings.model, "bulk")
    for conversation_id, kind in jobs:
        memory_job.apply_async(kwargs={"conversation_id": conversation_id, "kind": kind}, queue=queue)
