"""Two transactions that take the same rows, one of them in a thread: a deadlock shows as an error."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

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
            started.set()
            time.sleep(1.5)  # the other transaction takes (or waits for) its locks
            then(session)
    except BaseException as exc:  # noqa: BLE001
        errors.append(exc)
    thread.join(30)
    if not finished.is_set() and not errors:
        errors.append(TimeoutError("the other transaction did not finish"))
    return errors
