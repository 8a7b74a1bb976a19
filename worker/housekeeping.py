"""A worker's housekeeping timer: expire its model's batches whose window closed, write the files of
finished ones, and stop the worker once a re-embed has moved the stored vectors to another
embedder. Every worker runs one; the work is claimed row by row (SKIP LOCKED), so several never
clash, and a failure is logged and tried again at the next tick. `mlchat sweep` does the same for
every model (a batch of a model with no worker still expires)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from core.settings import settings

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from sqlalchemy.orm import Session

logger = logging.getLogger(__name__)


def still_in_vector_space(
    scope: Callable[[], AbstractContextManager[Session]] | None = None,
    fingerprint: ArrayLike | None = None,
    embedder: str | None = None,
) -> bool:
    """False (and the worker told to stop) once the stored vectors come from another embedder than
    `embedder` (MLCHAT_EMBEDDER when not given), or from other weights than `fingerprint` (this
    worker's, when given). While they are still its weights', its connections name the space's
    version (a re-embed to the same weights changes it)."""
    from db.session import adopt_space_version, session_scope
    from db.vector_space import moved_away
    from worker.lifecycle import stop_for_moved_embedder

    try:
        with (scope or session_scope)() as session:
            moved, version = moved_away(
                session=session, embedder=embedder or settings.embedder, fingerprint=fingerprint
            )
    except Exception:
        logger.exception("could not read the stored vectors' embedder; trying again next tick")
        return True
    if moved is not None:
        stop_for_moved_embedder(moved)
    elif version is not None:
        adopt_space_version(version)
    return moved is None


class Housekeeper(threading.Thread):
    def __init__(self, interval_s: float | None = None, model: str | None = None) -> None:
        from worker.embedder import fingerprint

        super().__init__(name="mlchat-housekeeping", daemon=True)
        self.interval_s = interval_s or settings.housekeeping_interval_s
        self.models = [model or settings.model]
        self.stopped = threading.Event()
        # The embedder this worker loaded at its start, by name and weights: the setting is read
        # once, as the loaded embedder was (a later change of it in this process moves nothing).
        self.embedder = settings.embedder
        self.fingerprint = fingerprint()

    def in_vector_space(self, scope: Callable[[], AbstractContextManager[Session]] | None = None) -> bool:
        return still_in_vector_space(scope, fingerprint=self.fingerprint, embedder=self.embedder)

    def run(self) -> None:
        from services.batches import HousekeepingIncomplete, housekeeping

        while not self.stopped.wait(self.interval_s):
            if not self.in_vector_space():
                return
            try:
                done = housekeeping(self.models)
                if done["expired"] or done["finalized"]:
                    logger.info("housekeeping: %s", done)
            except HousekeepingIncomplete as exc:  # each failed step logged its traceback already
                logger.warning("%s; trying again in %.0f s (done: %s)", exc, self.interval_s, exc.done)
            except Exception:
                logger.exception("housekeeping failed; trying again in %.0f s", self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
