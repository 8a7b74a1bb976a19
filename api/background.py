"""Long jobs a request starts after its answer: a batch's submission, its output files.

Starlette runs a synchronous background task on the threads every synchronous route runs on (40 in
all): forty large batches submitted at once would hold them all for minutes, and every route would
wait. These jobs run on threads of their own instead, at most `MLCHAT_API_BACKGROUND_THREADS` at
once; the others wait for a thread without holding one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio.to_thread
from anyio import CapacityLimiter
from anyio.lowlevel import RunVar
from fastapi import BackgroundTasks

from api.sse import shutting_down
from core.settings import settings

logger = logging.getLogger(__name__)

# One limiter per event loop (as anyio keeps its own default one): a limiter belongs to its loop.
_LIMITER: RunVar[CapacityLimiter] = RunVar("mlchat_background_limiter")


def background_limiter() -> CapacityLimiter:
    """This event loop's limiter of background jobs."""
    try:
        return _LIMITER.get()
    except LookupError:
        limiter = CapacityLimiter(settings.api_background_threads)
        _LIMITER.set(limiter)
        return limiter


def run_after_answer(background: BackgroundTasks, job: Callable[..., object], *args: Any) -> None:
    """Run `job(*args)` once the answer is sent, on a background thread (see the module's note);
    not once the server is shutting down: uvicorn waits for every background task, so a job that
    waited for a thread and started after the SIGTERM held the restart for minutes until its
    supervisor killed it (review). Housekeeping takes a job left undone up: a batch left
    `validating` is submitted again once stalled, a finalizing one is finalized."""

    def unless_stopping() -> None:
        if shutting_down():
            logger.info(
                "the server is stopping: %s%s is left to housekeeping", getattr(job, "__name__", job), args
            )
            return
        job(*args)

    async def bounded() -> None:
        await anyio.to_thread.run_sync(unless_stopping, limiter=background_limiter())

    background.add_task(bounded)
