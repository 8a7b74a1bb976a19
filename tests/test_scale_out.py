"""Two worker processes on one queue: both take batches, and every turn is answered exactly once."""

import json
import os
import socket
import subprocess
import sys
import time

from sqlalchemy import func, select

from core.settings import settings
from db.models import Message, Role, Turn, TurnStatus
from db.session import session_scope
from tasks.app import app
from tasks.generate import dispatch
from tasks.producer import enqueue_turns
from tests.conftest import new_conversation
from worker.model_cache import resolve_model_path

QUEUE_MODEL = "smollm2-135m-scale"  # its own queue: the session's in-process worker does not consume it


def _batches(log: str) -> list[dict]:
    lines = []
    for line in log.splitlines():
        if '"event": "batch"' in line:
            lines.append(json.loads(line[line.index("{") :]))
    return lines


def test_two_worker_processes_share_a_queue_and_answer_each_turn_once(world, tmp_path) -> None:
    env = os.environ | {
        "MLCHAT_MODEL": QUEUE_MODEL,
        "MLCHAT_MODEL_PATH": resolve_model_path(settings),
        "MLCHAT_METRICS_PORT": "0",
        "MLCHAT_LOG_LEVEL": "INFO",
    }
    names = [f"scale{i}@{socket.gethostname()}" for i in (1, 2)]
    logs = [tmp_path / f"worker{i}.log" for i in (1, 2)]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "worker", f"--hostname={name}"],
            env=env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        for name, log in zip(names, logs, strict=True)
    ]
    try:
        deadline = time.monotonic() + 600
        ready: set[str] = set()
        while ready != set(names):
            assert time.monotonic() < deadline, "workers did not come up: " + logs[0].read_text()[-2000:]
            assert all(w.poll() is None for w in workers), (
                logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
            )
            for reply in app.control.ping(destination=names, timeout=1.0):
                ready |= set(reply)
        ids = enqueue_turns(
            [new_conversation() | {"message": f"Line {n}, innkeeper."} for n in range(48)], send=False
        )
        dispatch(ids, model=QUEUE_MODEL, lane="live")
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
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait(timeout=120)
    per_worker = [_batches(log.read_text()) for log in logs]
    answered = [[t for b in batches for t in b["done"]] for batches in per_worker]
    print(
        f"total={len(ids)} done={done} reply_rows={replies} "
        + " ".join(
            f"{n}: {len(b)} batches, {len(a)} turns"
            for n, b, a in zip(names, per_worker, answered, strict=True)
        )
    )
    assert done == len(ids) and replies == len(ids)  # none lost, none answered twice in the database
    assert all(batches for batches in per_worker), "each worker took at least one batch"
    assert not set(answered[0]) & set(answered[1]) and sorted(answered[0] + answered[1]) == sorted(
        map(str, ids)
    )
