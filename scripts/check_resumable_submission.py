"""End-to-end check of resumable submission: a 50,000-line run, its submitter SIGKILLed part-way,
resubmitted, and answered by a real worker; every line must be answered exactly once and the run's
request_counts must equal the database's own count.

    python -m scripts.check_resumable_submission [--lines 50000] [--kill-after 20000]

It uses the embedded services (or DATABASE_URL / REDIS_URL), a small character of its own and a
model name of its own (its queue is gen.resume-check), so it never touches other runs. Replies are
two tokens long: the check is about the run's bookkeeping, not the prose. It prints what it counted
at each step and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from scripts.check_env import worker_env

MODEL = "resume-check"
CHARACTER = "resume-check-npc"


def _env() -> dict[str, str]:
    return worker_env(MODEL)


def _prepare() -> None:
    from db.migrate import upgrade
    from db.session import session_scope
    from db.world import upsert_character

    upgrade()
    with session_scope() as session:
        upsert_character(
            session=session,
            slug=CHARACTER,
            fields={
                "name": "Tam",
                "description": "A ferryman.",
                "system_prompt": "You are Tam. Answer in a few words.",
            },
        )


def _write_file(path: Path, lines: int) -> None:
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            line = {
                "custom_id": f"line-{i:06d}",
                "character": CHARACTER,
                "message": f"Ferry {i}?",
                "params": {"max_new_tokens": 2, "seed": i},
            }
            out.write(json.dumps(line) + "\n")


def _state(name: str):  # type: ignore[no-untyped-def]
    from services.runs import run_state

    return run_state(name)


def _print(label: str, name: str) -> None:
    s = _state(name)
    c = s.counts
    print(
        f"{label}: status={s.status.value} interrupted={s.interrupted} total={c.total} queued={c.queued} "
        f"running={c.running} done={c.completed} failed={c.failed} cancelled={c.cancelled} unsent={c.unsent}",
        flush=True,
    )


def _submit(path: Path, name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "run", "submit", str(path), "--name", name],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    from tasks.app import app

    hostname = f"resume-check-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", f"--hostname={hostname}"],
        env=env | {"MLCHAT_BATCH_SIZE": "64"},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not app.control.ping(destination=[hostname], timeout=1.0):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not come up; see {log}")
    return proc


def _truth(run_id: uuid.UUID) -> dict[str, int]:
    """Counts straight from the tables, independent of the code under check."""
    from sqlalchemy import text

    from db.session import session_scope

    with session_scope() as session:
        row = session.execute(
            text(
                """
                SELECT count(*) AS turns,
                       count(DISTINCT t.custom_id) AS distinct_custom_ids,
                       count(*) FILTER (WHERE t.status = 'done') AS done,
                       count(*) FILTER (WHERE t.status = 'failed') AS failed,
                       count(*) FILTER (WHERE t.status IN ('queued', 'running')) AS unfinished,
                       (SELECT count(*) FROM messages m JOIN turns u ON u.id = m.turn_id
                        WHERE u.run_id = :run AND m.role = 'assistant') AS reply_rows,
                       (SELECT count(*) FROM (
                            SELECT m.turn_id FROM messages m JOIN turns u ON u.id = m.turn_id
                            WHERE u.run_id = :run AND m.role = 'assistant'
                            GROUP BY m.turn_id HAVING count(*) > 1
                        ) twice) AS answered_twice
                FROM turns t WHERE t.run_id = :run
                """
            ),
            {"run": run_id},
        ).one()
    return dict(row._mapping)


def main() -> int:
    """Run the check; 0 when every line was answered exactly once and the counts agree."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--kill-after", type=int, default=20_000, help="lines stored before the SIGKILL")
    args = parser.parse_args()
    os.environ["MLCHAT_MODEL"] = MODEL  # this process's settings too (read at first import below)
    os.environ["MLCHAT_SERVED_MODELS"] = json.dumps([MODEL])
    from core.logging import configure_logging

    configure_logging()
    _prepare()
    env = _env()
    work = Path(tempfile.mkdtemp(prefix="mlchat-resume-"))
    path = work / "run.jsonl"
    name = f"resume-check-{uuid.uuid4().hex[:8]}"
    _write_file(path, args.lines)
    print(f"run {name}: {args.lines} lines in {path}", flush=True)

    worker = _start_worker(env, work / "worker.log")
    started = time.monotonic()
    try:
        submitter = _submit(path, name, env, work / "submit.log")
        while True:  # until enough lines are stored (and some sent), then SIGKILL mid-submission
            time.sleep(0.05)
            if submitter.poll() is not None:
                raise SystemExit(f"the submission ended before it could be killed; see {work / 'submit.log'}")
            try:
                c = _state(name).counts
            except KeyError:
                continue
            if c.total >= args.kill_after and c.total - c.unsent > 0:
                break
        submitter.send_signal(signal.SIGKILL)
        submitter.wait()
        time.sleep(0.5)
        _print("after SIGKILL of the submitter", name)
        if not _state(name).interrupted:
            raise SystemExit("the run does not say its submission was interrupted")
        resubmit = _submit(path, name, env, work / "submit.log")
        if resubmit.wait() != 0:
            raise SystemExit("the resubmission failed")
        _print("after the resubmission", name)
        while not _state(name).finished:
            time.sleep(5)
            _print(f"answering ({time.monotonic() - started:.0f} s)", name)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=300)
    state = _state(name)
    truth = _truth(state.id)
    counts = state.counts
    print(f"final: {state.status.value}; request_counts {counts}; database {truth}", flush=True)
    checks = {
        "every line stored once": truth["turns"] == truth["distinct_custom_ids"] == args.lines,
        "every line answered": truth["done"] == args.lines and truth["unfinished"] == 0,
        "no reply stored twice": truth["reply_rows"] == args.lines and truth["answered_twice"] == 0,
        "request_counts equal the database": (counts.total, counts.completed, counts.failed)
        == (truth["turns"], truth["done"], truth["failed"]),
        "the run completed": state.status.value == "completed",
    }
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}")
    print(f"wall time {time.monotonic() - started:.0f} s")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
