"""`make demo`: turns in, replies out, on the embedded services with a real batched worker.

Starts PostgreSQL and Redis, migrates, seeds the sample world, starts `python -m worker`,
enqueues data/sample_requests.jsonl (Korean turns for Luffy, English ones for Elara), prints each
turn's prompt, reply, usage and timings, then stops the worker and the services it started.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

from core import embedded
from core.logging import configure_logging
from core.settings import PROJECT_ROOT, settings

logger = logging.getLogger("mlchat.demo")

DEMO_CANDIDATES = 4  # best of n: each demo turn shows its kept reply and how many were tried


def _start_worker(log_path: os.PathLike[str]) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child for its whole life
    return subprocess.Popen(
        [sys.executable, "-m", "worker"], cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT
    )


def _wait_until_ready(proc: subprocess.Popen[bytes], log_path: os.PathLike[str]) -> float:
    """Block until the worker answers a Celery ping (it loads vLLM first); returns seconds waited."""
    from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

    from tasks.app import app

    def ping() -> list[dict[str, object]]:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited with {proc.returncode}; see {log_path}")
        return app.control.ping(timeout=1.0)

    started = time.monotonic()
    Retrying(
        stop=stop_after_delay(600), wait=wait_fixed(1), retry=retry_if_result(lambda replies: not replies)
    )(ping)
    return time.monotonic() - started


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # Celery's warm shutdown: finish the batch in hand
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    """Run the demo; exit status 0 only if every sample turn got a reply."""
    configure_logging("WARNING")
    from db.migrate import upgrade
    from scripts.render import render_turn
    from scripts.seed import seed_world
    from services.producer import enqueue_turns, wait_for_reply

    state = settings.state_dir
    was_running = {
        "postgres": embedded.postgres_status(state).running,
        "redis": embedded.redis_status(state).running,
    }
    print("· starting embedded PostgreSQL + pgvector and Redis (unless DATABASE_URL/REDIS_URL are set)")
    upgrade()
    print("· migrated;", seed_world())
    (state / "logs").mkdir(parents=True, exist_ok=True)
    worker_log = state / "logs" / "demo-worker.log"
    worker = _start_worker(worker_log)
    print(f"· worker started (pid {worker.pid}, log {worker_log}); loading vLLM takes a minute on a CPU")
    ok = True
    try:
        print(f"· worker ready after {_wait_until_ready(worker, worker_log):.0f} s")
        lines = (PROJECT_ROOT / "data" / "sample_requests.jsonl").read_text(encoding="utf-8").splitlines()
        requests = [json.loads(line) for line in lines if line.strip()]
        nonce = time.strftime("%Y%m%dT%H%M%S")
        turn_ids = enqueue_turns(
            [
                {k: v for k, v in r.items() if k != "custom_id"}
                | {"idempotency_key": f"demo:{nonce}:{r['custom_id']}"}
                | {"params": r.get("params", {}) | {"n": DEMO_CANDIDATES}}
                for r in requests
            ]
        )
        print(f"· enqueued {len(turn_ids)} turns to queue {settings.queue}\n")
        for request, turn_id in zip(requests, turn_ids, strict=True):
            view = wait_for_reply(turn_id, timeout=600)
            print(render_turn(view, f"{request['custom_id']} · conversation {request['conversation']}"))
            ok &= view.reply is not None
    finally:
        _stop_worker(worker)
        print("· worker stopped")
        try:
            if settings.redis_url is None and not was_running["redis"]:
                embedded.stop_redis(state)
        finally:  # a Redis that would not stop must not leave PostgreSQL running too
            if settings.database_url is None and not was_running["postgres"]:
                embedded.stop_postgres(state)
        print(
            "· services stopped"
            if not any(was_running.values())
            else "· left running what was running before"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
