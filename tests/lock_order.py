"""Two transactions that take the same rows, one of them in a thread: a deadlock shows as an error."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from db.session import session_scope


def errors_beside(
    other: Callable[[], Any], *, first: Callable[[Session], Any], then: Callable[[Session], Any]
) -> list[BaseException]:
    """Run a transaction that does `first`, waits while `other()` (in a thread) takes its locks, then
    does `then`; the errors either raised (a deadlock's victim, or `other` still waiting after 30 s)."""
    errors: list[BaseException] = []
    started, finished = threading.Event(), threading.Event()

    def run_other() -> None:
        started.wait(10)
        try:
            other()
            finished.set()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    thread = threading.Thread(target=run_other)
    thread.start()
    try:
        with session_scope() as session:
            first(session)
            mine = session.scalar(text("SELECT pg_backend_pid()"))
            started.set()
            # The other transaction has taken its locks when it waits for one of `first`'s (or ended
            # needing none): a fixed pause let a slow start cross nothing, and the test pass unproven.
            deadline = time.monotonic() + 15
            while not (finished.is_set() or errors or waits_on(mine)) and time.monotonic() < deadline:
                time.sleep(0.05)
            then(session)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
    thread.join(30)
    if not finished.is_set() and not errors:
        errors.append(TimeoutError("the other transaction did not finish"))
    return errors


def waits_on(pid: int) -> bool:
    """Whether another backend waits for a lock that backend `pid` holds."""
    with session_scope() as look:
        return bool(
            look.scalar(
                text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                {"pid": pid},
            )
        )
