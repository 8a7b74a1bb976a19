"""Kill-and-resume check for scene runs: SIGKILL the submitter and the worker once each mid-run,
resume, and show every scene complete with every step stored once and in order.

    python -m scripts.check_scenes_resume [--scenes 500] [--exchanges 6] [--workers 1]

Writes a run file of two- and three-character scenes, submits it from a child process
(`mlchat run submit`) and SIGKILLs that process once some scenes are stored, then resubmits the same
file (the submission resumes). Worker processes (their own model name and queue,
gen.scenes-check) answer the steps; once a share of the steps is stored, one worker is SIGKILLed
and started again, and the sweeper re-sends what its lease held. Replies are four tokens long. It
prints the counts and exits 1 unless every scene ended with all its steps, each step is one turn,
done, and the scene's lines are stored in step order.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scripts.check_env import worker_env

MODEL = "scenes-check"
CAST = ("scenes-check-ada", "scenes-check-bo", "scenes-check-cy")
RUN_ENDED = ("completed", "failed", "cancelled", "expired")


def _env() -> dict[str, str]:
    return worker_env(
        MODEL,
        MLCHAT_LEASE_SECONDS="10",  # a killed worker's steps come back soon
        MLCHAT_RUN_CANDIDATES="1",
        MLCHAT_PIN_WORKER_CPUS="false",
        MLCHAT_CPU_KVCACHE_GIB=os.environ.get("MLCHAT_CPU_KVCACHE_GIB", "1"),
    )


def _prepare(work: Path, scenes: int, exchanges: int) -> Path:
    from db.migrate import upgrade
    from db.session import session_scope
    from db.world import upsert_character

    upgrade()
    with session_scope() as session:
        for slug in CAST:
            name = slug.rsplit("-", 1)[1].title()
            upsert_character(
                session=session, slug=slug, fields={"name": name, "system_prompt": "Answer briefly."}
            )
    path = work / "scenes.jsonl"
    lines = [
        {
            "custom_id": f"s{i:05d}",
            "scene": {
                "participants": list(CAST[: 2 + i % 2]),
                "premise": "A quiet evening at the inn.",
                "exchanges": exchanges,
                "strategy": "natural" if i % 3 == 0 else "fixed",
                "params": {"max_new_tokens": 4, "seed": i},
            },
        }
        for i in range(scenes)
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def _start_worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker", f"--hostname={name}@{os.uname().nodename}"],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _submit(path: Path, name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scripts.cli", "run", "submit", str(path), "--name", name],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _counts(name: str) -> dict[str, object]:
    from sqlalchemy import func, select

    from db.models import Run, Scene, Turn
    from db.session import session_scope

    with session_scope() as session:
        run_id = session.scalar(select(Run.id).where(Run.name == name))
        status = session.scalar(select(Run.status).where(Run.name == name))
        scenes = dict(
            session.execute(
                select(Scene.status, func.count()).where(Scene.run_id == run_id).group_by(Scene.status)
            ).all()
        )
        turns = dict(
            session.execute(
                select(Turn.status, func.count()).where(Turn.run_id == run_id).group_by(Turn.status)
            ).all()
        )
    return {
        "run": str(status.value) if status else None,
        "scenes": {str(k.value): v for k, v in scenes.items()},
        "steps": {str(k.value): v for k, v in turns.items()},
    }


def _verify(name: str, scenes: int, exchanges: int) -> dict[str, bool]:
    from sqlalchemy import func, select

    from db.models import Message, Run, Scene, SceneStatus, Turn, TurnStatus
    from db.session import session_scope

    with session_scope() as session:
        run_id = session.scalar(select(Run.id).where(Run.name == name))
        rows = session.execute(
            select(Scene.id, Scene.status, Scene.steps_done).where(Scene.run_id == run_id)
        ).all()
        per_step = session.execute(
            select(
                Turn.scene_id, Turn.scene_step, func.count(), func.bool_and(Turn.status == TurnStatus.DONE)
            )
            .where(Turn.run_id == run_id)
            .group_by(Turn.scene_id, Turn.scene_step)
        ).all()
        order = session.execute(
            select(Turn.scene_id, Turn.scene_step, Message.seq)
            .join(Message, Message.id == Turn.reply_message_id)
            .where(Turn.run_id == run_id)
            .order_by(Turn.scene_id, Turn.scene_step)
        ).all()
    steps: dict[int | None, list[int]] = {}
    for scene_id, step, _, _ in per_step:
        steps.setdefault(scene_id, []).append(step)
    seqs: dict[int | None, list[int]] = {}
    for scene_id, _, seq in order:
        seqs.setdefault(scene_id, []).append(seq)
    return {
        f"all {scenes} scenes stored": len(rows) == scenes,
        f"every scene ended with {exchanges} steps": all(
            s == SceneStatus.ENDED and n == exchanges for _, s, n in rows
        ),
        "every step one turn, done": all(n == 1 and done for _, _, n, done in per_step)
        and len(per_step) == scenes * exchanges,
        "steps 1..n with no gap": all(sorted(v) == list(range(1, exchanges + 1)) for v in steps.values()),
        "lines stored in step order": all(v == sorted(v) for v in seqs.values()),
    }


def main() -> int:
    """Run the check; 0 when every scene completed with each step once and in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--exchanges", type=int, default=6)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kill-worker-at", type=float, default=0.3, help="share of steps done")
    parser.add_argument("--timeout", type=float, default=3600.0)
    args = parser.parse_args()
    os.environ["MLCHAT_MODEL"] = MODEL
    os.environ["MLCHAT_SERVED_MODELS"] = json.dumps([MODEL])
    os.environ["MLCHAT_LEASE_SECONDS"] = "10"  # the sweeper here reads the workers' lease
    from core.logging import configure_logging

    configure_logging()
    from services.sweeper import resend_stranded

    work = Path(tempfile.mkdtemp(prefix="mlchat-scenes-check-"))
    env = _env()
    path = _prepare(work, args.scenes, args.exchanges)
    name = f"scenes-check-{work.name[-8:]}"
    total = args.scenes * args.exchanges
    workers = {
        f"scenes-w{i}": _start_worker(f"scenes-w{i}", env, work / f"scenes-w{i}.log")
        for i in range(args.workers)
    }
    events: list[str] = []
    submitter_killed = killed = False
    try:
        submitter = _submit(path, name, env, work / "submit.log")
        while submitter.poll() is None:  # SIGKILL it once some scenes are stored
            if _counts(name)["scenes"]:
                os.kill(submitter.pid, signal.SIGKILL)
                submitter.wait()
                events.append(f"submitter SIGKILLed with {_counts(name)}")
                submitter_killed = True
                break
            time.sleep(0.05)
        else:
            events.append("the submitter finished before it could be killed (try more --scenes)")
        print(events[-1], flush=True)
        resumed = _submit(path, name, env, work / "submit.log")
        if resumed.wait() != 0:
            print(f"the resubmission failed; see {work / 'submit.log'}", flush=True)
            return 1
        events.append(f"resubmitted: {_counts(name)}")
        print(events[-1], flush=True)
        killed, started = False, time.monotonic()
        while time.monotonic() - started < args.timeout:
            time.sleep(2)
            counts = _counts(name)
            done = counts["steps"].get("done", 0)  # type: ignore[attr-defined]
            ended = counts["run"] in RUN_ENDED
            if not killed and not ended and done >= args.kill_worker_at * total:  # mid-run, or not at all
                victim = next(iter(workers))
                os.killpg(workers[victim].pid, signal.SIGKILL)
                workers[victim].wait()
                events.append(f"worker {victim} SIGKILLed at {counts}")
                print(events[-1], flush=True)
                workers[victim] = _start_worker(victim, env, work / f"{victim}.log")
                killed = True
            if killed:
                resent = resend_stranded(models=[MODEL])  # the default timing, as `mlchat sweep`
                if resent is None:
                    print("another sweep was re-sending; this one left it to that", flush=True)
                elif any(resent.values()):
                    print(f"sweeper re-sent {resent}", flush=True)
            print(f"{time.monotonic() - started:.0f} s: {counts}", flush=True)
            if counts["run"] in RUN_ENDED:
                break
    finally:
        for proc in workers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    final = _counts(name)
    print(f"final counts: {json.dumps(final)}", flush=True)
    print(f"events: {json.dumps(events)}; logs in {work}", flush=True)
    checks = _verify(name, args.scenes, args.exchanges)
    # What the check is of: a run that finished before either kill showed no resume at all.
    checks["the submitter was SIGKILLed mid-submission"] = submitter_killed
    checks["a worker was SIGKILLed mid-run"] = killed
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}", flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
