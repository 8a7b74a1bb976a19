"""Fleet simulator (a benchmark, never the product's code path): N Celery worker processes whose
vLLM engine and embedder are stand-ins, everything else the real code on the real PostgreSQL and Redis.

What is real: the producer API (single enqueues and a bulk run), Celery on Redis, celery-batches
flushes, the claim, retrieval, prompt building with the model's real tokenizer, judging, the store,
the sweeper-visible state. What is not: generation and embedding, the two stages a GPU does.

The stand-in engine. A worker's "GPU" processes `gpu_tokens_per_s` tokens a second (prompt and reply
together): the GPU's queue advances by (P + R) / gpu_tokens_per_s for a turn of P prompt tokens and R
reply tokens, and the turn finishes when the queue reaches it, or R x `tpot_ms` after it starts,
whichever is later. The throughput is the cited figure: the GPUStack performance lab's vLLM 0.10.2
run of gpt-oss-20b on one H100 (`vllm serve openai/gpt-oss-20b --async-scheduling`, ShareGPT set),
total throughput 19,129 tokens/s (https://docs.gpustack.ai/latest/performance-lab/gpt-oss-20b/h100),
a third-party run of vLLM, not vLLM's own figure. That run's mean time per output token, 86.8 ms,
is the time at that saturation (its ~1,600 sequences in flight), not a turn's floor: used as one, a
turn took 4 s however idle the GPU, and a worker holding 80 turns could never reach the throughput
(review). `tpot_ms` is the per-token time of a reply when the GPU has room, 10 ms by default: an
assumption (no published single-stream figure was found), not a measurement; under load the queue
sets the pace. Change the numbers for another GPU or model. The stand-in embedder returns a unit
vector per text at once (a GPU embeds a batch in a few ms).

What it shows: turns stored per second as workers are added, and how much CPU the one PostgreSQL
and the one Redis take to carry them, with the statements PostgreSQL was running most often when
sampled (the first to saturate). What it does not show: GPU behaviour (batching effects, prefix
caching, KV-cache pressure), network latency between hosts (everything is on loopback), or a
database on its own machine: here the simulated workers, the producer, PostgreSQL and Redis share
this machine's cores, so on a small machine the figures are CPU-bound, the knee comes early, and
the worker processes' own CPU is counted beside the database's.

`python -m scripts.fleet_simulator --workers 1 2 4 8` (or `make bench` / `--only fleet`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import heapq
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tenacity import retry, stop_after_delay, wait_fixed

from worker.cpu_affinity import ORIGINAL_CPUS, unpinned

logger = logging.getLogger(__name__)

BENCH_STATE_DIR = Path(__file__).resolve().parent.parent / ".mlchat" / "bench"
DRIVER_MARK = "MLCHAT_FLEET_DRIVER"  # set by the driver for the workers it starts on its own services

# GPUStack performance lab, gpt-oss-20b on one H100 with vLLM 0.10.2 (see the module docstring).
H100_GPT_OSS_20B_TOKENS_PER_S = 19_129.0
H100_GPT_OSS_20B_SATURATED_TPOT_MS = 86.8  # the same run's, at its saturation: reported, not used
LIGHT_LOAD_TPOT_MS = 10.0  # an assumption (module docstring)

REPLY_LINES = (
    "The road north is closed until the thaw, traveller.",
    "I have heard the bells at night, and I do not like them.",
    "Bring me three wolf pelts and we can talk about the price.",
    "The captain left before dawn; nobody saw which way.",
    "Sit, eat something. The soup is thin but it is warm.",
    "That map is older than the town itself, and half of it lies.",
)


# ---------------------------------------------------------------------------------------------------
# The stand-ins, installed in a simulated worker process only.


@dataclass
class StandInEngine:
    tokenizer: Any
    load_ms: float = 0.0


class StandInGpu:
    """Replies at a GPU-like pace (see the module docstring); one scheduler thread resolves futures."""

    def __init__(self, tokens_per_s: float, tpot_ms: float, reply_tokens: int) -> None:
        self.tokens_per_s, self.tpot_s, self.reply_tokens = tokens_per_s, tpot_ms / 1000, reply_tokens
        self.dead: BaseException | None = None
        self._free_at = time.monotonic()
        self._heap: list[tuple[float, int, Future[Any], Any]] = []
        self._seq = 0
        self._cv = threading.Condition()
        threading.Thread(target=self._run, name="stand-in-gpu", daemon=True).start()

    def submit(self, requests: Any, **_: Any) -> list[Future[Any]]:  # the loop's options mean nothing here
        from worker.engine_loop import Generation

        futures = []
        now = time.monotonic()
        with self._cv:
            for token_ids, request, _priority, _lora in requests:
                reply = min(self.reply_tokens, request.max_tokens)
                self._free_at = max(self._free_at, now) + (len(token_ids) + reply) / self.tokens_per_s
                done_at = max(self._free_at, now + reply * self.tpot_s)
                text = REPLY_LINES[(request.seed + len(token_ids)) % len(REPLY_LINES)]
                generation = Generation(text, len(token_ids), reply, "stop", done_at - now)
                future: Future[Any] = Future()
                self._seq += 1
                heapq.heappush(self._heap, (done_at, self._seq, future, generation))
                futures.append(future)
            self._cv.notify()
        return futures

    def wait(self, futures: Any, timeout: float | None = None) -> list[Future[Any]]:
        done, _ = concurrent.futures.wait(
            futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(done)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap:
                    self._cv.wait()
                due = self._heap[0][0] - time.monotonic()
                if due > 0:
                    self._cv.wait(timeout=due)
                    continue
                _, _, future, generation = heapq.heappop(self._heap)
            future.set_result(generation)


def stand_in_embed(texts: Any) -> np.ndarray:
    """A unit vector per text, the same for the same text (a GPU embedder's output, not its cost)."""
    from core.settings import settings

    out = np.empty((len(texts), settings.embedding_dim), dtype=np.float32)
    for i, text in enumerate(texts):
        rng = np.random.default_rng(zlib.crc32(text.encode()))
        vec = rng.standard_normal(settings.embedding_dim).astype(np.float32)
        out[i] = vec / np.linalg.norm(vec)
    return out


def install_stand_ins(tokens_per_s: float, tpot_ms: float, reply_tokens: int) -> None:
    """Replace generation and embedding in this process; everything else stays the real code."""
    from transformers import AutoTokenizer

    from core.settings import settings
    from worker import engine as engine_module
    from worker import judge, pipeline
    from worker.model_cache import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    gpu = StandInGpu(tokens_per_s, tpot_ms, reply_tokens)
    # Patched on the modules the pipeline reads them from, at call time.
    setattr(engine_module, "get_engine", functools.cache(lambda: StandInEngine(tokenizer)))  # noqa: B010
    setattr(engine_module, "get_loop", functools.cache(lambda: gpu))  # noqa: B010
    setattr(engine_module, "sampling_params", lambda request: request)  # noqa: B010
    setattr(pipeline, "embed", stand_in_embed)  # noqa: B010
    setattr(judge, "embed", stand_in_embed)  # noqa: B010


def run_worker(index: int, tokens_per_s: float, tpot_ms: float, reply_tokens: int) -> None:
    """A simulated worker: the real Celery worker of `python -m worker`, with the stand-ins."""
    from core.logging import configure_logging
    from core.settings import queue_for_model, settings

    configure_logging("WARNING")
    install_stand_ins(tokens_per_s, tpot_ms, reply_tokens)
    from tasks.app import PREFETCH_PER_THREAD, app

    app.worker_main(
        [
            "worker",
            "--pool=threads",
            f"--concurrency={settings.worker_threads}",
            f"--queues={settings.queue},{queue_for_model(settings.model, 'bulk')}",
            f"--prefetch-multiplier={PREFETCH_PER_THREAD}",
            f"--hostname=fleet-{index}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "--loglevel=WARNING",
        ]
    )


# ---------------------------------------------------------------------------------------------------
# The driver.


def _service_processes() -> dict[str, list[Any]]:
    """This benchmark's PostgreSQL (postmaster and backends) and Redis processes."""
    import psutil

    from core.services import broker_url
    from core.settings import settings

    out: dict[str, list[Any]] = {"postgres": [], "redis": []}
    pid_file = settings.state_dir / "pgdata" / "postmaster.pid"
    if pid_file.exists():
        master = psutil.Process(int(pid_file.read_text().split()[0]))
        out["postgres"] = [master, *master.children(recursive=True)]
    port = int(broker_url().rsplit(":", 1)[1].split("/")[0])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == "LISTEN" and conn.laddr and conn.laddr.port == port and conn.pid:
            out["redis"] = [psutil.Process(conn.pid)]
            break
    return out


def _cpu_seconds(processes: list[Any]) -> float:
    """CPU seconds of the processes so far, with their exited children's (PostgreSQL backends come
    and go; the postmaster's children_* times keep what the exited ones used)."""
    total = 0.0
    for i, proc in enumerate(processes):
        try:
            times = proc.cpu_times()
            total += times.user + times.system
            if i == 0:
                total += times.children_user + times.children_system
        except Exception:  # a backend that exited between listing and reading
            continue
    return total


def _done_count(since: Any) -> int:
    from sqlalchemy import func, select

    from db.models import Turn, TurnStatus
    from db.session import session_scope

    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).where(Turn.status == TurnStatus.DONE, Turn.finished_at >= since)
            )
            or 0
        )


class _StatementSampler(threading.Thread):
    """Tally what PostgreSQL's backends are running, every 50 ms (first words of each statement)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.tally: Counter[str] = Counter()
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        from sqlalchemy import text

        from db.session import get_engine

        with get_engine().connect() as conn:
            while not self.stop.wait(0.05):
                rows = conn.execute(
                    text(
                        "SELECT query FROM pg_stat_activity WHERE state = 'active'"
                        " AND datname = current_database() AND pid <> pg_backend_pid()"
                    )
                ).scalars()
                self.samples += 1
                for query in rows:
                    self.tally[" ".join(query.split())[:70]] += 1
                conn.rollback()


def _live_producer(stop: threading.Event, rate: float, conversations: int, sent: list[int]) -> None:
    """Live turns: single enqueues from many conversations, at `rate` a second."""
    from services.producer import enqueue_turn

    characters = ("elara", "luffy", "haneul")
    tag = uuid.uuid4().hex[:6]
    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        conv = i % conversations
        enqueue_turn(
            conversation=f"fleet-{tag}-{conv}",
            character=characters[conv % len(characters)],
            message=f"Any news from the road today? ({i})",
        )
        i += 1
        sent[0] = i
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.monotonic()))


def _bulk_file(lines: int) -> Path:
    path = Path(tempfile.mkdtemp()) / f"fleet-{uuid.uuid4().hex[:8]}.jsonl"
    with path.open("w", encoding="utf-8") as handle:
        for i in range(lines):
            line = {"custom_id": f"f{i}", "character": "elara", "message": f"Tell me about place {i}."}
            handle.write(json.dumps(line) + "\n")
    return path


@retry(stop=stop_after_delay(180), wait=wait_fixed(1), reraise=True)
def _wait_until_ready(app: Any, workers: int) -> None:
    """Until every simulated worker answers a ping (they import the code and load the tokenizer)."""
    answered = app.control.ping(timeout=1.0) or []
    if len([r for r in answered if any(name.startswith("fleet-") for name in r)]) < workers:
        raise TimeoutError(f"{len(answered)} of {workers} simulated workers ready")


def measure_point(
    workers: int,
    *,
    seconds: float,
    warmup: float,
    live_rate: float,
    bulk_lines: int,
    tokens_per_s: float,
    tpot_ms: float,
    reply_tokens: int,
) -> dict[str, Any]:
    """Run `workers` simulated workers under the mix; stored turns/s and the services' CPU share."""
    from datetime import UTC, datetime

    from core.services import broker_url, database_url
    from core.settings import queue_for_model, settings
    from services.runs import cancel, submit_run
    from tasks.app import app

    # The driver's own embedded services, named to its workers (the marker lets their guard take them).
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "REDIS_URL": broker_url(),
        DRIVER_MARK: str(os.getpid()),
    }
    command = [sys.executable, "-m", "scripts.fleet_simulator", "worker"]
    rates = ["--gpu-tokens-per-s", str(tokens_per_s), "--tpot-ms", str(tpot_ms)]
    procs = [
        spawn([*command, "--index", str(i), *rates, "--reply-tokens", str(reply_tokens)], env)
        for i in range(workers)
    ]
    run_name = f"fleet-{workers}-{uuid.uuid4().hex[:6]}"
    stop = threading.Event()
    sent = [0]
    live = threading.Thread(target=_live_producer, args=(stop, live_rate, 500, sent), daemon=True)
    try:
        _wait_until_ready(app, workers)
        if bulk_lines:  # --bulk-lines 0: live turns alone (a run of no lines is refused)
            path = _bulk_file(bulk_lines)
            submit_run(path, name=run_name)
            path.unlink()
        live.start()
        time.sleep(warmup)
        services = _service_processes()
        worker_ps = [__import__("psutil").Process(p.pid) for p in procs]
        sampler = _StatementSampler()
        sampler.start()
        since = datetime.now(UTC)
        cpu0 = {name: _cpu_seconds(ps) for name, ps in services.items()}
        cpu0["workers"] = _cpu_seconds(worker_ps)
        started, sent_before = time.monotonic(), sent[0]
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        live_achieved = (sent[0] - sent_before) / elapsed
        done = _done_count(since)
        services = {  # backends started during the window count too
            name: ps[:1] + [c for c in ps[0].children(recursive=True)] if name == "postgres" and ps else ps
            for name, ps in services.items()
        }
        cpu1 = {name: _cpu_seconds(ps) for name, ps in services.items()}
        cpu1["workers"] = _cpu_seconds(worker_ps)
        sampler.stop.set()
    finally:
        stop.set()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        try:
            cancel(run_name)
        except Exception:  # the run finished, or never started
            logger.debug("nothing to cancel for %s", run_name, exc_info=True)
        with app.connection_for_write() as conn:
            for lane in ("live", "bulk"):
                conn.default_channel.queue_purge(queue_for_model(settings.model, lane))
    cores = len(ORIGINAL_CPUS)
    top = [
        {"statement": q, "share_of_samples": round(n / max(1, sampler.samples), 2)}
        for q, n in sampler.tally.most_common(3)
    ]
    return {
        "workers": workers,
        "stored_turns_per_s": round(done / elapsed, 1),
        "live_turns_enqueued": sent[0],
        # The producer shares the machine's cores: a point whose live load fell short of the rate
        # asked (below 90%) did not measure the services under that load, and the knee skips it.
        "live_turns_per_s_achieved": round(live_achieved, 1),
        "offered_live_load_met": live_achieved >= OFFERED_LOAD_MET * live_rate,
        # CPU share: cores' worth used over the window, as a fraction of this machine's cores.
        "db_cpu_share": round((cpu1["postgres"] - cpu0["postgres"]) / elapsed / cores, 3),
        "redis_cpu_share": round((cpu1["redis"] - cpu0["redis"]) / elapsed / cores, 3),
        "workers_cpu_share": round((cpu1["workers"] - cpu0["workers"]) / elapsed / cores, 3),
        "busiest_statements": top,
    }


OFFERED_LOAD_MET = 0.9


def knee(points: list[dict[str, Any]], gain: float = 0.15) -> int | None:
    """The worker count after which one more step adds less than `gain` of stored turns/s, among the
    points that got the live load asked of them (a point short of it says nothing of the services)."""
    points = [p for p in points if p.get("offered_live_load_met", True)]
    for before, after in zip(points, points[1:], strict=False):
        if after["stored_turns_per_s"] < before["stored_turns_per_s"] * (1 + gain):
            return int(before["workers"])
    return None


def spawn(command: list[str], env: dict[str, str], stdout: Any = subprocess.DEVNULL) -> subprocess.Popen[Any]:
    """A simulated worker's process, on all the machine's cores: after `make bench`'s engine sections
    this process is pinned off the engine's core, and the workers inherited one core of two (review)."""
    return subprocess.Popen(
        command,
        env=env,
        stdout=stdout,
        stderr=subprocess.DEVNULL,
        preexec_fn=unpinned,  # noqa: PLW1509 (a single call, before exec)
    )


def configured_services() -> str:
    """The service settings pointing away from the embedded servers, named ('' when none does)."""
    from core.settings import settings

    named = [n for n, v in (("DATABASE_URL", settings.database_url), ("REDIS_URL", settings.redis_url)) if v]
    return " and ".join(named)


def refuse_configured_services() -> None:
    """Exit with one line unless both services are the embedded ones: the simulator's stand-in
    workers would answer real turns with canned lines, and its clean-up purges the model's queues."""
    named = configured_services()
    if named:
        raise SystemExit(
            f"fleet_simulator: {named} set; it runs only on its own embedded services "
            "(its stand-in workers take real turns and it purges the queues): unset them"
        )


def measure_fleet(
    workers: tuple[int, ...] = (1, 2, 4, 8),
    *,
    seconds: float = 30.0,
    warmup: float = 10.0,
    live_rate: float = 20.0,
    bulk_lines: int = 20_000,
    tokens_per_s: float = H100_GPT_OSS_20B_TOKENS_PER_S,
    tpot_ms: float = LIGHT_LOAD_TPOT_MS,
    reply_tokens: int = 48,
) -> dict[str, Any]:
    """Stored turns/s at each worker count, the services' CPU share, and the knee."""
    refuse_configured_services()
    points = [
        measure_point(
            n,
            seconds=seconds,
            warmup=warmup,
            live_rate=live_rate,
            bulk_lines=bulk_lines,
            tokens_per_s=tokens_per_s,
            tpot_ms=tpot_ms,
            reply_tokens=reply_tokens,
        )
        for n in workers
    ]
    return {
        "stand_in": {
            "gpu_tokens_per_s": tokens_per_s,
            "light_load_tpot_ms": tpot_ms,
            "light_load_tpot_is": "an assumption, not a measurement",
            "source_saturated_tpot_ms": H100_GPT_OSS_20B_SATURATED_TPOT_MS,
            "reply_tokens": reply_tokens,
            "source": "GPUStack performance lab, gpt-oss-20b on H100, vLLM 0.10.2, ShareGPT",
        },
        "mix": {"live_turns_per_s": live_rate, "bulk_lines_per_point": bulk_lines},
        "seconds_per_point": seconds,
        "cores": len(ORIGINAL_CPUS),
        "points": points,
        "knee_workers": knee(points),
        "cpu_bound_note": "workers, producer, PostgreSQL and Redis share this machine's cores",
    }


def main(argv: list[str] | None = None) -> None:
    """`worker`: one simulated worker (started by the driver); otherwise run the fleet benchmark."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("role", nargs="?", choices=("worker", "drive"), default="drive")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--live-rate", type=float, default=20.0)
    parser.add_argument("--bulk-lines", type=int, default=20_000)
    parser.add_argument("--gpu-tokens-per-s", type=float, default=H100_GPT_OSS_20B_TOKENS_PER_S)
    parser.add_argument("--tpot-ms", type=float, default=LIGHT_LOAD_TPOT_MS)
    parser.add_argument("--reply-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    # As scripts/bench.py: the benchmark's own embedded services, never the project's. Set before the
    # guard below reads the settings (which read the environment once): read first, the driver ran
    # on the project's own state while its workers, given this variable, ran on the bench's.
    state = os.environ.setdefault("MLCHAT_STATE_DIR", str(BENCH_STATE_DIR))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    started_by_driver = os.environ.get(DRIVER_MARK) == str(os.getppid())  # not a mark set by hand
    if args.role == "drive" or not started_by_driver:  # a worker started by hand is refused too
        refuse_configured_services()
    if Path(state).resolve() != BENCH_STATE_DIR.resolve():
        raise SystemExit(
            f"fleet_simulator: MLCHAT_STATE_DIR={state} is not the benchmark's own state "
            f"({BENCH_STATE_DIR}); its stand-in workers take real turns and it purges the queues: unset it"
        )
    if args.role == "worker":
        run_worker(args.index, args.gpu_tokens_per_s, args.tpot_ms, args.reply_tokens)
        return
    from core.logging import configure_logging
    from db.migrate import upgrade
    from scripts.seed import seed_world

    configure_logging("WARNING")
    upgrade()
    seed_world()
    result = measure_fleet(
        tuple(args.workers),
        seconds=args.seconds,
        live_rate=args.live_rate,
        bulk_lines=args.bulk_lines,
        tokens_per_s=args.gpu_tokens_per_s,
        tpot_ms=args.tpot_ms,
        reply_tokens=args.reply_tokens,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
