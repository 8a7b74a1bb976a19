"""Benchmark: the engine loop (worker/engine_loop.py), every figure a ratio of two runs made here.

1. Live latency under load: the same live turns sent alone, then while a bulk run is answered.
2. Engine busy share while a backlog is answered, with its idle gaps.
3. That backlog end to end (enqueued → stored, through the real Celery worker) ÷ the raw engine given
   all the same prompts in one `LLM.generate` call; reply lengths mixed from 8 to 96 tokens.
4. Worker ready time: `python -m worker` started twice, seconds until it answers a ping.
5. The raw engine in bfloat16 and in float32 on the same 16 prompts, each in a fresh process.

The engine is loaded in this process once; the Celery worker runs in threads of this process (as in
the tests) so it shares that engine and its loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select

from core.settings import PROJECT_ROOT, queue_for_model, settings
from db.models import Turn, TurnStatus
from db.session import session_scope
from scripts.bench_generation import RawEngine, _stored_prompts, _wait_finished, sample_requests
from worker.cpu_affinity import unpinned


def mixed_length(i: int) -> int:
    """Reply budgets spread evenly over 8..96 tokens."""
    return 8 + (i * 37) % 89


def _idle_engine(loop: Any, llm: Any) -> None:
    """Wait until nothing is inside the engine, then empty its prefix cache (each phase starts cold)."""
    while loop.inside():
        time.sleep(0.05)
    llm.reset_prefix_cache()


def _live_latency(request: dict[str, Any]) -> float:
    from services.producer import enqueue_turn, wait_for_reply

    started = time.perf_counter()
    turn = wait_for_reply(enqueue_turn(request), timeout=1800, poll=0.02)
    if turn.status != TurnStatus.DONE:
        raise RuntimeError(f"live probe {turn.id} ended {turn.status}: {turn.error}")
    return time.perf_counter() - started


def _unfinished(ids: list[uuid.UUID]) -> int:
    with session_scope() as session:
        return len(
            session.scalars(
                select(Turn.id).where(
                    Turn.id.in_(ids), Turn.status.not_in([TurnStatus.DONE, TurnStatus.FAILED])
                )
            ).all()
        )


def live_under_load(loop: Any, llm: Any, tag: str, probes: int, bulk_turns: int, max_new_tokens: int) -> dict:
    """Median latency of live turns sent during a bulk run ÷ the same turns sent alone."""
    from services.producer import enqueue_turns

    probe = sample_requests(probes, "", max_new_tokens, offset=1000)
    _idle_engine(loop, llm)
    alone = []
    for i, request in enumerate(probe):
        alone.append(_live_latency(request | {"conversation": f"bench-{tag}-alone-{i}"}))
    _idle_engine(loop, llm)
    bulk_ids = enqueue_turns(sample_requests(bulk_turns, tag + "-bulk", max_new_tokens), lane="bulk")
    time.sleep(5.0)  # the bulk run is inside the engine
    loaded = []
    for i, request in enumerate(probe):
        loaded.append(_live_latency(request | {"conversation": f"bench-{tag}-load-{i}"}))
        time.sleep(2.0)
    bulk_left = _unfinished(bulk_ids)
    bulk_started = time.perf_counter()
    _wait_finished(bulk_ids, timeout=3600)
    return {
        "probes": probes,
        "bulk_turns": bulk_turns,
        "max_new_tokens": max_new_tokens,
        "alone_s": [round(s, 2) for s in alone],
        "under_load_s": [round(s, 2) for s in loaded],
        "alone_median_s": round(statistics.median(alone), 2),
        "under_load_median_s": round(statistics.median(loaded), 2),
        "ratio": round(statistics.median(loaded) / statistics.median(alone), 2),
        "target": 2.0,
        "bulk_turns_unanswered_after_last_probe": bulk_left,
        "bulk_tail_s": round(time.perf_counter() - bulk_started, 1),
    }


def saturation(loop: Any, loaded: Any, tag: str, backlog: int) -> dict[str, Any]:
    """A bulk backlog answered through the worker: engine busy share and gaps, then ÷ the raw engine."""
    from services.producer import enqueue_turns

    _idle_engine(loop, loaded.llm)
    busy_before, _ = loop.busy.snapshot()
    t0_perf, t0_wall = time.perf_counter(), time.time()
    ids = enqueue_turns(sample_requests(backlog, tag + "-sat", mixed_length, offset=0), lane="bulk")
    rows = _wait_finished(ids, timeout=7200)
    done = [r.finished_at for r in rows if r.status == TurnStatus.DONE]
    if len(done) != backlog:
        raise RuntimeError(f"only {len(done)} of {backlog} backlog turns were answered")
    while loop.inside():
        time.sleep(0.05)
    end_perf = t0_perf + (max(done).timestamp() - t0_wall)
    busy_after, gaps = loop.busy.snapshot()
    wall = end_perf - t0_perf
    window = [(max(a, t0_perf), min(b, end_perf)) for a, b in gaps if b > t0_perf and a < end_perf]
    idle = sorted((round((b - a) * 1000, 1) for a, b in window), reverse=True)
    busy = min(busy_after - busy_before, wall)

    stored = _stored_prompts(ids)
    raw = RawEngine(loaded)
    prompts, params, mismatches = raw.inputs(stored)
    loaded.llm.reset_prefix_cache()
    started = time.perf_counter()
    loaded.llm.generate(prompts, params, use_tqdm=False)  # the engine's own continuous batching
    raw_s = time.perf_counter() - started
    usage = [r.usage for r in stored]
    scheduler = loaded.llm.llm_engine.vllm_config.scheduler_config
    return {
        "backlog": backlog,
        "reply_budget_tokens": "8..96",
        "mean_prompt_tokens": round(statistics.mean(u["prompt_tokens"] for u in usage), 1),
        "mean_completion_tokens": round(statistics.mean(u["completion_tokens"] for u in usage), 1),
        "max_num_seqs": scheduler.max_num_seqs,
        "max_inflight": loop.max_inflight,
        "busy_share": {
            "value": round(busy / wall, 4),
            "target": 0.98,
            "wall_s": round(wall, 1),
            "idle_gaps": len(idle),
            "idle_total_ms": round(sum(idle), 1),
            "largest_idle_gaps_ms": idle[:5],
            "first_admission_after_ms": round((window[0][1] - t0_perf) * 1000, 1) if window else 0.0,
        },
        "end_to_end_vs_raw": {
            "end_to_end_s": round(wall, 1),
            "raw_engine_one_call_s": round(raw_s, 1),
            "ratio": round(raw_s / wall, 3),
            "target": 0.95,
            "prompt_token_mismatches": mismatches,
        },
        "_prompts": [
            (p["prompt_token_ids"], u["prompt_tokens"]) for p, u in zip(prompts, usage, strict=True)
        ],
    }


def ready_times(starts: int = 2) -> list[float]:
    """Seconds from `python -m worker` to its first ping reply, for each of `starts` fresh processes."""
    from tasks.app import app
    from worker.model_cache import resolve_model_path

    model = "bench-ready"
    seconds = []
    for i in range(starts):
        node = f"bench-ready-{i}@{socket.gethostname()}"
        env = os.environ | {
            "MLCHAT_MODEL": model,
            "MLCHAT_MODEL_PATH": resolve_model_path(settings),
            "MLCHAT_METRICS_PORT": "0",
        }
        log = Path(tempfile.gettempdir()) / f"mlchat-bench-ready-{i}.log"
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", f"--hostname={node}"],
            env=env,
            cwd=PROJECT_ROOT,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=unpinned,  # noqa: PLW1509 (a single call, before exec)
        )
        try:
            while not app.control.ping(destination=[node], timeout=0.5):
                if proc.poll() is not None:
                    raise RuntimeError(f"the worker exited:\n{log.read_text()[-2000:]}")
                if time.perf_counter() - started > 900:
                    raise RuntimeError("the worker was not ready after 900 s")
            seconds.append(round(time.perf_counter() - started, 1))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return seconds


DTYPE_PROBE = """
import json, sys, time
from vllm import LLM, SamplingParams
prompts = json.load(open(sys.argv[2]))
llm = LLM(model=sys.argv[3], dtype=sys.argv[1], max_model_len=int(sys.argv[4]), enable_prefix_caching=False,
          enable_chunked_prefill=False, max_num_batched_tokens=max(4096, int(sys.argv[4])), seed=0)
params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, ignore_eos=True, seed=i)
          for i in range(len(prompts))]
llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], params[:2], use_tqdm=False)  # warm-up
started = time.perf_counter()
llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
print("SECONDS", time.perf_counter() - started, flush=True)
"""


def dtype_comparison(prompts: list[list[int]]) -> dict[str, Any]:
    """The raw engine on the same prompts (32 tokens out each) in bfloat16 and float32, fresh processes."""
    from worker.model_cache import resolve_model_path

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    seconds: dict[str, float] = {}
    for dtype in ("bfloat16", "float32"):
        env = os.environ | {
            "VLLM_USE_AOT_COMPILE": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kvcache_gib),
        }
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                DTYPE_PROBE,
                dtype,
                f.name,
                resolve_model_path(settings),
                str(settings.max_model_len),
            ],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=1800,
            preexec_fn=unpinned,  # noqa: PLW1509 (a single call, before exec)
        )
        line = next((x for x in out.stdout.splitlines() if x.startswith("SECONDS")), None)
        if line is None:
            raise RuntimeError(f"the {dtype} probe failed:\n{out.stderr[-2000:]}")
        seconds[dtype] = round(float(line.split()[1]), 2)
    Path(f.name).unlink()
    return {
        "turns": len(prompts),
        "mean_prompt_tokens": round(statistics.mean(len(p) for p in prompts), 1),
        "completion_tokens": 32,
        "seconds": seconds,
        "float32_over_bfloat16_speed": round(seconds["bfloat16"] / seconds["float32"], 2),
    }


@contextmanager
def in_process_worker() -> Iterator[tuple[Any, Any]]:
    """The engine loaded in this process and a Celery worker in its threads on both lanes' queues;
    yields (the loaded engine, its loop)."""
    from celery.contrib.testing.worker import start_worker

    from tasks.app import app
    from worker import engine as engine_module
    from worker.startup import check_and_warm_up

    check_and_warm_up(load_engine=True)
    queues = [queue_for_model(settings.model, "live"), queue_for_model(settings.model, "bulk")]
    with start_worker(
        app,
        pool="threads",
        concurrency=settings.worker_threads,
        queues=queues,
        perform_ping_check=False,
        loglevel="WARNING",
        shutdown_timeout=120,
    ):
        yield engine_module.get_engine(), engine_module.get_loop()


def measure_engine(
    probes: int = 4,
    bulk_turns: int = 256,
    backlog: int = 512,
    max_new_tokens: int = 32,
    dtype_turns: int = 16,
) -> dict[str, Any]:
    """Run every engine-loop benchmark and return the figures."""
    tag = uuid.uuid4().hex[:6]
    ready = ready_times()
    with in_process_worker() as (loaded, loop):
        # Untimed: the first requests at new shapes pay one-time costs on CPU backends.
        live_under_load(loop, loaded.llm, tag + "w", probes=1, bulk_turns=16, max_new_tokens=max_new_tokens)
        live = live_under_load(loop, loaded.llm, tag, probes, bulk_turns, max_new_tokens)
        sat = saturation(loop, loaded, tag, backlog)
    prompts = sorted(sat.pop("_prompts"), key=lambda p: -p[1])[:dtype_turns]
    dtypes = dtype_comparison([ids for ids, _ in prompts])
    return {
        "model": settings.model,
        "dtype_loaded": loaded.llm.llm_engine.model_config.dtype.__repr__(),
        "worker_threads": settings.worker_threads,
        "batch_size": settings.batch_size,
        "live_latency": live,
        "saturation": sat,
        "ready_s": {"starts": ready, "after_first": ready[-1], "target": 60.0},
        "dtype": dtypes,
    }
