"""Per-turn task events for Flower and other event consumers.

celery-batches runs one task call per flush and sends no task events of its own, so monitoring would
see nothing per turn. The generation task reports each turn as a task named `mlchat.turn` whose id
is the turn id: received when its flush starts, started with its batch, then succeeded, failed or
retried, or revoked when its claim found it finished already (cancelled, say). Events are buffered
and sent as one message per stage of a batch. They are best effort: a failure to send one is logged
and turns events off for the flush; it never touches the turns.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from typing import Any

from tasks.app import app

logger = logging.getLogger(__name__)

TURN_TASK = "mlchat.turn"


class TurnEvents:
    """Sends turn events as the worker `hostname`; does nothing when task events are off."""

    def __init__(self, hostname: str | None) -> None:
        self.hostname = hostname
        self.enabled = bool(app.conf.worker_send_task_events)
        self._conn: Any = None
        self._dispatcher: Any = None
        self._started: dict[str, float] = {}  # when each turn's batch started: its runtime's start

    def __enter__(self) -> TurnEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
            self._conn.close()

    def _emit(self, events: Iterable[tuple[str, dict[str, Any]]]) -> None:
        if not self.enabled:
            return
        try:
            if self._dispatcher is None:
                self._conn = app.connection_for_write()
                self._dispatcher = app.events.Dispatcher(
                    self._conn,
                    hostname=self.hostname,
                    buffer_group=["task"],
                    buffer_limit=100_000,
                    # A failed publish raises, so events stop for the flush; buffered instead, each
                    # later stage would try again, up to the broker's connect timeout every time.
                    buffer_while_offline=False,
                )
            for event, fields in events:
                self._dispatcher.send(event, **fields)
            self._dispatcher.flush()
        except Exception:
            logger.warning("could not send turn events; none more for this flush", exc_info=True)
            self.enabled = False

    def received(self, turns: Iterable[tuple[uuid.UUID, str]], model: str) -> None:
        self._emit(
            (
                "task-received",
                dict(
                    uuid=str(turn_id),
                    name=TURN_TASK,
                    args="()",
                    kwargs=repr({"turn_id": str(turn_id), "model": model, "lane": lane}),
                    retries=0,
                    eta=None,
                    root_id=str(turn_id),
                    parent_id=None,
                ),
            )
            for turn_id, lane in turns
        )

    def started(self, turn_ids: Iterable[uuid.UUID]) -> None:
        ids = [str(t) for t in turn_ids]
        now = time.monotonic()
        self._started.update((t, now) for t in ids)
        self._emit(("task-started", dict(uuid=t)) for t in ids)

    def finished(
        self,
        done: Iterable[uuid.UUID],
        failed: dict[uuid.UUID, str],
        again: Iterable[uuid.UUID],
        ended: Iterable[uuid.UUID] = (),
    ) -> None:
        """`ended`: turns the claim found finished already (a cancelled run's, a duplicate message's):
        revoked, which Flower never lets overwrite a success or a failure (observability review:
        they stayed STARTED for ever, and Flower's runtime of every turn was 0)."""
        now = time.monotonic()

        def runtime(turn_id: uuid.UUID) -> float:
            return round(now - self._started.pop(str(turn_id), now), 3)

        events: list[tuple[str, dict[str, Any]]] = []
        events += [("task-succeeded", dict(uuid=str(t), result="'done'", runtime=runtime(t))) for t in done]
        events += [
            ("task-failed", dict(uuid=str(t), exception=reason[:500], traceback=""))
            for t, reason in failed.items()
        ]
        events += [("task-retried", dict(uuid=str(t), exception="sent again", traceback="")) for t in again]
        events += [
            ("task-revoked", dict(uuid=str(t), terminated=False, signum=None, expired=False)) for t in ended
        ]
        self._emit(events)
