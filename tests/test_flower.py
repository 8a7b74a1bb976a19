"""Flower on the real broker, next to a running worker: it lists the worker and sees every turn."""

import socket
import subprocess
import sys
import time
import uuid

import httpx

from services.producer import enqueue_turns, wait_for_reply
from tests.conftest import new_conversation

AUTH = ("admin", "flower-test")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _poll(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except httpx.HTTPError:
            result = None
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


def test_flower_lists_the_worker_and_each_turn_as_a_task(celery_worker, tmp_path) -> None:
    port = _free_port()
    log = (tmp_path / "flower.log").open("w")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--app=tasks.app", "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}", "--persistent=False"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        assert _poll(lambda: httpx.get(f"{base}/healthcheck").status_code == 200), "flower did not start"
        assert httpx.get(f"{base}/api/workers").status_code == 401  # basic auth is on
        workers = _poll(lambda: httpx.get(f"{base}/api/workers?refresh=1", auth=AUTH, timeout=20).json())
        assert celery_worker.hostname in workers, workers

        ids = [
            str(i) for i in enqueue_turns([new_conversation() | {"message": f"Hello {n}"} for n in range(3)])
        ]
        assert all(wait_for_reply(i, timeout=120).status == "done" for i in ids)

        def seen() -> dict | None:
            tasks = httpx.get(f"{base}/api/tasks?limit=1000", auth=AUTH, timeout=20).json()
            return tasks if all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids) else None

        tasks = _poll(seen, timeout=30)
        assert tasks, (tmp_path / "flower.log").read_text()[-2000:]
        assert {tasks[i]["name"] for i in ids} == {"mlchat.turn"}
        assert {tasks[i]["worker"] for i in ids} == {celery_worker.hostname}
        # observability review: every turn's runtime was sent as 0, which Flower leaves out
        assert all((tasks[i].get("runtime") or 0) > 0 for i in ids), [tasks[i].get("runtime") for i in ids]
        print(f"flower saw {len(tasks)} task(s); turns {ids} all SUCCESS on {celery_worker.hostname}")
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()


def test_turn_events_stop_for_the_flush_when_the_broker_drops_mid_way(services, monkeypatch) -> None:
    """Found in review: Celery's dispatcher buffered a failed publish instead of raising, so events
    were never turned off: with the broker gone, each later stage of the flush tried again, up to the
    connect timeout each time, before its batch could go on."""
    from tasks.events import TurnEvents

    with TurnEvents("events-check@host") as events:
        events.started([])  # the dispatcher, made on the live broker
        assert events.enabled

        def broker_gone(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise ConnectionError("broker gone")

        monkeypatch.setattr(events._dispatcher.producer, "publish", broker_gone)
        events.finished([uuid.uuid4()], {}, [])
        assert not events.enabled  # off for the rest of the flush


def test_a_chunk_reports_its_written_failures_as_failed_and_its_finished_turns_as_revoked() -> None:
    """Observability review: a chunk that raised reported the failures it had written (no attempts
    left, blocked) as retried, and the turns its claim found finished already (a cancelled run's)
    got no last event: Flower showed them STARTED for ever."""
    from db.models import TurnErrorCode
    from tasks.generate import ChunkRaised, FlushOutcome, _record
    from worker.pipeline import BatchReport, Failure

    class Seen:
        def __init__(self) -> None:
            self.calls: list[tuple] = []

        def finished(self, done, failed, again, ended=()) -> None:  # type: ignore[no-untyped-def]
            self.calls.append((list(done), dict(failed), list(again), list(ended)))

    done, failed, handed, cancelled = (uuid.uuid4() for _ in range(4))
    chunk = [(t, "live") for t in (done, failed, handed, cancelled)]

    def report() -> BatchReport:
        made = BatchReport()
        made.done, made.skipped = [done], [cancelled]
        made.failed = {failed: Failure("no attempts left", TurnErrorCode.ATTEMPTS_EXHAUSTED)}
        made.failed_written = {failed}
        return made

    seen = Seen()
    _record(chunk, ChunkRaised(RuntimeError("the database went away"), report()), seen, FlushOutcome())  # type: ignore[arg-type]
    assert seen.calls == [([done], {failed: "no attempts left"}, [handed], [cancelled])]
    # review: a failure only noted (its write never came; the hand-back could not reach it) is retried
    noted = report()
    noted.failed[handed] = Failure("the prompt cannot fit", TurnErrorCode.PROMPT_TOO_LONG)
    seen = Seen()
    _record(chunk, ChunkRaised(RuntimeError("the database went away"), noted), seen, FlushOutcome())  # type: ignore[arg-type]
    assert seen.calls == [([done], {failed: "no attempts left"}, [handed], [cancelled])]
    answered = report()
    answered.handed_back = [handed]
    seen = Seen()
    _record(chunk, answered, seen, FlushOutcome())  # type: ignore[arg-type]
    assert seen.calls == [([done], {failed: "no attempts left"}, [handed], [cancelled])]
