"""A worker's housekeeping timer: expire its model's batches whose window closed, write the files of
finished ones. Every worker runs one; the work is claimed row by row (SKIP LOCKED), so several never
clash, and a failure is logged and tried again at the next tick. `mlchat sweep` does the same for
every model (a batch of a model with no worker still expires)."""

from __future__ import annotations

import logging
import threading

from core.settings import settings

logger = logging.getLogger(__name__)


class Housekeeper(threading.Thread):
    def __init__(self, interval_s: float | None = None, model: str | None = None) -> None:
        super().__init__(name="mlchat-housekeeping", daemon=True)
        self.interval_s = interval_s or settings.housekeeping_interval_s
        self.models = [model or settings.model]
        self.stopped = threading.Event()

    def run(self) -> None:
        from services.batches import housekeeping

        while not self.stopped.wait(self.interval_s):
            try:
                done = housekeeping(self.models)
                if done["expired"] or done["finalized"]:
                    logger.info("housekeeping: %s", done)
            except Exception:
                logger.exception("housekeeping failed; trying again in %.0f s", self.interval_s)

    def stop(self) -> None:
        self.stopped.set()
