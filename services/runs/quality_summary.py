"""A live run's reply-quality summary as pages poll it: read at most once per LIVE_REFRESH_S per run in
a process. The summary reads every answered turn's quality (jsonb, no index); a desk page of live
runs re-polls each row every 2 s, and `mlchat run status --watch` polled every second, so a
million-line run's turns were read in full at each poll. A finished run's summary is read afresh:
its rows no longer poll, and a writer's pick at the desk may change it."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

from sqlalchemy.orm import Session

from db.runs import run_quality

LIVE_REFRESH_S = 15.0
_MAX_RUNS = 1024  # runs kept; the one read longest ago goes first

_read: dict[uuid.UUID, tuple[float, dict[str, Any]]] = {}  # run -> (read at, summary)
_lock = threading.Lock()


def quality_summary(*, session: Session, run_id: uuid.UUID, live: bool) -> dict[str, Any]:
    """The run's quality summary (db/runs.py run_quality); a live run's up to LIVE_REFRESH_S old."""
    now = time.monotonic()
    if live:
        with _lock:
            kept = _read.get(run_id)
        if kept is not None and now - kept[0] < LIVE_REFRESH_S:
            return kept[1]
    summary = run_quality(session=session, run_id=run_id)
    with _lock:
        _read.pop(run_id, None)
        if live:
            _read[run_id] = (now, summary)
            while len(_read) > _MAX_RUNS:
                del _read[next(iter(_read))]
    return summary
