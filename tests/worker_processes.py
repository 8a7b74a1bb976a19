"""Real `python -m worker` processes for the tests that need them: scale-out and fault injection.

They serve their own queue (gen.<QUEUE_MODEL>) so the session's in-process worker never takes
their turns, and load the same converted model from the shared cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import kombu.exceptions
import redis

from core.settings import Lane, queue_for_model, settings
from tasks.app import app
from worker.model_cache import resolve_model_path

QUEUE_MODEL = "smollm2-135m-proc"

# How long Redis waits before handing a dead worker's unacked messages to another (the restoring
# worker's setting): the SIGKILL case waits this out. Short, yet well above the slowest batch (a claim
# is held no longer than the visibility timeout), which takes ~11 s here.
VISIBILITY_S = "30"
# A claim whose worker died or could not hand it back is free this long after its last renewal.
LEASE_S = "15"
# Every worker process runs with both: each restores (puts back on their queues) the messages any
# worker has held unacked past its own visibility timeout, so one short timeout applies to them all.
SHORT_CLAIMS = {"MLCHAT_VISIBILITY_TIMEOUT": VISIBILITY_S, "MLCHAT_LEASE_SECONDS": LEASE_S}
# vLLM's own engine-core and executor processes, as a production worker runs them: for the cases where
# they matter (SIGTERM reaches them too; the engine-core process is the one that dies).
ENGINE_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
# The steady worker's engine has LoRA slots, so that the adapter case needs no engine of its own. It
# answers most of the fault cases' turns, so it is compiled (vLLM's default), unlike the short-lived
# workers: test_faults.py and test_lora.py took 461 s with it compiled and 517 s eager, one run each.
STEADY_ENV = SHORT_CLAIMS | {
    "MLCHAT_ENABLE_LORA": "true",
    "MLCHAT_MAX_LORA_RANK": "8",
    "MLCHAT_ENFORCE_EAGER": "false",
}


@dataclass
class Steady:
    """The session's steady worker (tests/conftest.py): its process and its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    def take_over(self, model: str) -> None:
        take_over("steady", model)


def start(name: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start a worker named `name@<host>` in its own process group (so its engine dies with it)."""
    full_env = os.environ | {
        "MLCHAT_MODEL": QUEUE_MODEL,
        # Its queues are its own (QUEUE_MODEL's, or solo_model's), the turns it answers the session's
        # model's: the same weights under another name.
        "MLCHAT_ANSWERS_FOR_MODELS": json.dumps([settings.model]),
        "MLCHAT_MODEL_PATH": resolve_model_path(settings),
        "MLCHAT_METRICS_PORT": "0",
        "MLCHAT_LOG_LEVEL": "INFO",
        # They test process boundaries, not decode speed: an eager engine loads in about 60% of the time.
        "MLCHAT_ENFORCE_EAGER": "true",
        # The engine in the worker's own process: torch and vLLM are loaded once, not in three
        # processes (a start took 18-23 s here instead of 43). ENGINE_PROCESSES for a case about them.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "worker", f"--hostname={node(name)}"],
        env=full_env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def node(name: str) -> str:
    return f"{name}@{socket.gethostname()}"


@contextmanager
def started(
    name: str, logs: dict[str, Path], *, proc: subprocess.Popen[bytes] | None = None, **env: str
) -> Iterator[subprocess.Popen[bytes]]:
    """A worker, started (or `proc`, started earlier with `start`) and answering pings; SIGTERMed (and
    reaped) on the way out, whatever happened."""
    proc = proc or start(name, logs[name], **env)
    try:
        wait_ready({name: proc}, logs)
        yield proc
    finally:
        kill(proc, signal.SIGTERM)


@contextmanager
def started_alone(
    name: str, log: Path, *, proc: subprocess.Popen[bytes] | None = None, **env: str
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A worker serving queues of its own (solo_model's): its process and that model; stopped as
    `started` stops it. `proc`: one `start_alone` started earlier."""
    model = solo_model(name)
    with started(name, {name: log}, proc=proc, MLCHAT_MODEL=model, **env) as proc:
        yield proc, model


def start_alone(name: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """`start`, for a worker serving queues of its own (for `started_alone`, later)."""
    return start(name, log, MLCHAT_MODEL=solo_model(name), **env)


def solo_model(name: str) -> str:
    """A model name of the worker `name`'s own, so its queues are its alone (its turns' rows name the
    session's model, which MLCHAT_ANSWERS_FOR_MODELS lets it answer, as for QUEUE_MODEL)."""
    return f"{QUEUE_MODEL}-{name}"


def take_over(name: str, model: str) -> None:
    """The running worker `name` consumes `model`'s queues from now on (Celery's `add_consumer`): the
    rescuer of a worker that served them alone."""
    for lane in ("live", "bulk"):
        queue = queue_for_model(model, lane)  # type: ignore[arg-type]
        replies = app.control.add_consumer(queue, destination=[node(name)], reply=True, timeout=10)
        assert replies, f"worker {name} did not start consuming {queue}"


def send_turns(n: int, message: str, *, lane: Lane, model: str = QUEUE_MODEL) -> list[uuid.UUID]:
    """n turns in fresh conversations, sent to the queue of the worker processes' `model`."""
    from services.producer import enqueue_turns
    from tasks.generate import dispatch
    from tests.conftest import new_conversation

    ids = enqueue_turns([new_conversation() | {"message": f"{message} {i}."} for i in range(n)], send=False)
    dispatch(ids, model=model, lane=lane)
    return ids


def wait_ready(
    procs: dict[str, subprocess.Popen[bytes]], logs: dict[str, Path], timeout: float = 600
) -> None:
    """Until every named worker answers a ping; fails early if one exits."""
    deadline = time.monotonic() + timeout
    ready: set[str] = set()
    wanted = {node(n) for n in procs}
    while ready != wanted:
        for name, proc in procs.items():
            assert proc.poll() is None, f"worker {name} exited:\n" + logs[name].read_text()[-3000:]
        assert time.monotonic() < deadline, "workers did not come up"
        try:
            replies = app.control.ping(destination=sorted(wanted), timeout=1.0)
        except (redis.ConnectionError, kombu.exceptions.OperationalError):
            continue  # a pooled connection from before a broker restart: the next try reconnects
        for reply in replies:
            ready |= set(reply)


def kill(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGKILL, timeout: float = 120) -> None:
    """Send `sig` to the worker's whole process group (worker and vLLM engine processes) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def batches(log: Path) -> list[dict]:
    """The JSON batch lines a worker logged."""
    return [
        json.loads(line[line.index("{") :])
        for line in log.read_text().splitlines()
        if '"event": "batch"' in line
    ]
