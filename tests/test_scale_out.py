"""Two worker processes on one queue: both take batches, and every turn is answered exactly once."""

import signal
import time

from sqlalchemy import func, select

from db.models import Message, Role, Turn, TurnStatus
from db.session import session_scope
from services.producer import enqueue_turns
from tasks.generate import dispatch
from tests import worker_processes as wp
from tests.conftest import new_conversation


def test_two_worker_processes_share_a_queue_and_answer_each_turn_once(world, tmp_path) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("scale1", "scale2")}
    procs = {name: wp.start(name, log) for name, log in logs.items()}
    try:
        wp.wait_ready(procs, logs)
        ids = enqueue_turns(
            [new_conversation() | {"message": f"Line {n}, innkeeper."} for n in range(48)], send=False
        )
        dispatch(ids, model=wp.QUEUE_MODEL, lane="live")
        deadline = time.monotonic() + 600
        while True:
            with session_scope() as s:
                done = s.scalar(select(func.count()).where(Turn.id.in_(ids), Turn.status == TurnStatus.DONE))
            if done == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(1)
        with session_scope() as s:
            replies = s.scalar(
                select(func.count()).where(Message.turn_id.in_(ids), Message.role == Role.ASSISTANT)
            )
    finally:
        for proc in procs.values():
            wp.kill(proc, signal.SIGTERM)
    per_worker = {name: wp.batches(log) for name, log in logs.items()}
    answered = {name: [t for b in batches for t in b["done"]] for name, batches in per_worker.items()}
    print(
        f"total={len(ids)} done={done} reply_rows={replies} "
        + " ".join(f"{n}: {len(per_worker[n])} batches, {len(answered[n])} turns" for n in logs)
    )
    assert done == len(ids) and replies == len(ids)  # none lost, none answered twice in the database
    assert all(per_worker.values()), "each worker took at least one batch"
    first, second = answered.values()
    assert not set(first) & set(second) and sorted(first + second) == sorted(map(str, ids))
