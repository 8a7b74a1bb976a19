"""Fault injection with real processes and services. Each case prints what it counted.

The 500-turn variants are marked slow (run them with `pytest -m slow`); CI runs the smaller case of
each kind.
"""

import signal
import time

import pytest
from sqlalchemy import func, select

from db.models import Message, Role, Turn, TurnStatus
from db.session import session_scope
from tests import worker_processes as wp

VISIBILITY_S = "45"  # how long Redis waits before handing a dead worker's unacked messages to another


def _counts(ids) -> dict[str, int]:
    with session_scope() as s:
        by_status = dict(
            s.execute(select(Turn.status, func.count()).where(Turn.id.in_(ids)).group_by(Turn.status))
            .tuples()
            .all()
        )
        per_turn = (
            select(Message.turn_id, func.count().label("n"))
            .where(Message.turn_id.in_(ids), Message.role == Role.ASSISTANT)
            .group_by(Message.turn_id)
            .subquery()
        )
        replies, duplicated = s.execute(
            select(func.coalesce(func.sum(per_turn.c.n), 0), func.count().filter(per_turn.c.n > 1))
        ).one()
        retried = s.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.attempts > 1))
    return {
        "total": len(ids),
        "done": by_status.get(TurnStatus.DONE, 0),
        "failed": by_status.get(TurnStatus.FAILED, 0),
        "running": by_status.get(TurnStatus.RUNNING, 0),
        "queued": by_status.get(TurnStatus.QUEUED, 0),
        "reply_rows": int(replies),
        "duplicates": int(duplicated),
        "attempted_twice": int(retried or 0),
    }


def _wait(ids, until, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = _counts(ids)
        if until(counts) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


@pytest.mark.parametrize(
    "turns", [pytest.param(96, id="96"), pytest.param(500, id="500", marks=pytest.mark.slow)]
)
def test_sigkill_mid_batch_then_a_new_worker_loses_nothing_and_answers_once(world, tmp_path, turns) -> None:
    env = {"MLCHAT_VISIBILITY_TIMEOUT": VISIBILITY_S}
    logs = {name: tmp_path / f"{name}.log" for name in ("victim", "rescuer")}
    with wp.started("victim", logs, **env) as victim:
        ids = wp.send_turns(turns, "Bulk line", lane="bulk")  # a run's messages: a batch of turn ids each
        # Mid-batch: some turns stored, a batch claimed and generating.
        at_kill = _wait(ids, lambda c: c["done"] >= 8 and c["running"] > 0, timeout=600)
        wp.kill(victim, signal.SIGKILL)
    assert at_kill["running"] > 0, at_kill
    with wp.started("rescuer", logs, **env):
        final = _wait(ids, lambda c: c["done"] + c["failed"] == turns, timeout=900)
    print(f"SIGKILL case: at kill {at_kill}; final {final}")
    assert final["done"] == turns and final["failed"] == 0  # zero lost
    assert final["reply_rows"] == turns and final["duplicates"] == 0  # zero answered twice
    assert final["attempted_twice"] >= at_kill["running"]  # the killed batch really ran again


def test_sigterm_mid_batch_finishes_the_batch_and_hands_back_the_rest(world, tmp_path) -> None:
    turns = 64
    logs = {name: tmp_path / f"{name}.log" for name in ("stopping", "next")}
    with wp.started("stopping", logs) as stopping:
        ids = wp.send_turns(
            turns, "Evening line", lane="live"
        )  # one per message: 8 prefetched, the rest queued
        at_term = _wait(ids, lambda c: c["running"] > 0, timeout=600)
        stopping.send_signal(signal.SIGTERM)  # the worker process only: Celery's warm shutdown
        stopping.wait(timeout=300)
    after_stop = _counts(ids)
    with wp.started("next", logs):
        final = _wait(ids, lambda c: c["done"] + c["failed"] == turns, timeout=900)
    print(f"SIGTERM case: at signal {at_term}; after the worker exited {after_stop}; final {final}")
    assert after_stop["running"] == 0, "the batch in hand finished or was handed back"
    assert after_stop["done"] >= at_term["running"]  # the batch in hand was finished, not dropped
    assert final["done"] == turns and final["failed"] == 0
    assert final["reply_rows"] == turns and final["duplicates"] == 0
    assert final["attempted_twice"] == 0  # nothing had to run again
