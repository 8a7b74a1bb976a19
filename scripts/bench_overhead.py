"""Harness (not the figure of record): the worker's time per turn outside embedding and generation,
with the engine and the embedder replaced by stand-ins, so it runs in seconds and can be repeated.

The figure of record is `generation.overhead.ms_per_turn_outside_embed_and_generate` of
`python -m scripts.bench --only generation` (scripts/bench_generation.py), which runs the real
vLLM engine. This harness drives the same function, `worker.pipeline.process_batch`, over the same
turns (`sample_requests`: 128 sample turns, 64 a claim, 32 new tokens) and sums the same stages the
same way (`_overhead_ms_per_turn`); everything but generation and embedding is the real code on the
real PostgreSQL: the claim, retrieval, prompt building with the model's own tokenizer, vLLM's
SamplingParams, judging, the store.

What differs from the bench. The stand-in engine answers each claim's turns in the group sizes the
real engine produced in the bench run of 2026-12-01 12:31 (the turns' `finished_at`: 16 and 21
groups for the two 64-turn claims, GROUP_PATTERNS below), 60 ms apart, so the store runs as many
transactions as it did there. The replies are fixed sample lines, not the model's. And nothing
competes for the CPU: in the bench the engine core keeps generating the rest of a claim while its
first groups are judged and stored, so on a 2-core machine the bench's figure is higher.

`python -m scripts.bench_overhead [--rounds 3] [--profile FILE]`: prints the per-stage ms per turn,
the statements and commits per claim, and with --profile writes a cProfile of the timed rounds.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# As scripts/bench.py: the benchmark's own embedded services, unless told otherwise.
os.environ.setdefault("MLCHAT_STATE_DIR", str(PROJECT_ROOT / ".mlchat" / "bench"))
os.environ.setdefault("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "1GB")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import cProfile  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

# The group sizes in which the real engine finished each 64-turn claim (bench run 2026-12-01 12:31).
GROUP_PATTERNS = (
    (27, 14, 7, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    (19, 10, 10, 6, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1),
)
GROUP_STEP_S = 0.06  # apart by more than the pipeline's GROUP_WINDOW_S, so each group stores alone
REPLIES = (
    "The road north is closed until the thaw, traveller, and the pass is full of wolves this year.",
    "I have heard the bells at night, and I do not like them; nobody here rings them any more.",
    "Bring me three wolf pelts and we can talk about the price of that old map of yours.",
    "The captain left before dawn and nobody saw which way she went, not even the harbour watch.",
    "Sit, eat something. The soup is thin but it is warm, and the fire will not go out tonight.",
)


class GroupedEngine:
    """Answers each submission's requests in GROUP_PATTERNS' group sizes, one pattern per claim."""

    def __init__(self) -> None:
        self.claims = 0

    def submit(self, requests: Any, **_: Any) -> list[Future[Any]]:  # the loop's options mean nothing here
        from worker.engine_loop import Generation

        jobs = list(requests)
        pattern = GROUP_PATTERNS[self.claims % len(GROUP_PATTERNS)]
        self.claims += 1
        groups = [g for g, size in enumerate(pattern) for _ in range(size)]
        groups += [len(pattern) - 1] * (len(jobs) - len(groups))
        # Spread each group over the claim (the engine does not finish them in submission order).
        order = sorted(range(len(jobs)), key=lambda i: (i * 37) % len(jobs))
        futures: list[Future[Any]] = [Future() for _ in jobs]
        for rank, i in enumerate(order):
            token_ids, params, _priority, _lora = jobs[i]
            text = REPLIES[(params.seed + len(token_ids)) % len(REPLIES)]
            after = (groups[rank] + 1) * GROUP_STEP_S
            generation = Generation(text, len(token_ids), params.max_tokens, "length", after)
            timer = threading.Timer(after, futures[i].set_result, (generation,))
            timer.daemon = True
            timer.start()
        return futures

    def wait(self, futures: Any, timeout: float | None = None) -> list[Future[Any]]:
        import concurrent.futures

        done, _ = concurrent.futures.wait(
            futures, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED
        )
        return list(done)


class StatementCounter:
    """Statements (executemany counted once, and its parameter sets apart), commits and pool
    checkouts, by the pipeline stage running when they were made."""

    def __init__(self) -> None:
        self.stage = "other"
        self.statements: Counter[str] = Counter()
        self.param_sets: Counter[str] = Counter()
        self.commits: Counter[str] = Counter()
        self.checkouts: Counter[str] = Counter()
        self.texts: Counter[tuple[str, str]] = Counter()  # parameter sets by statement
        self.ms: Counter[tuple[str, str]] = Counter()  # time in cursor.execute by statement

    def install(self, engine: Any) -> None:
        from sqlalchemy import event

        @event.listens_for(engine, "before_cursor_execute")
        def _statement(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            self.statements[self.stage] += 1
            self.param_sets[self.stage] += len(params) if many else 1  # insertmanyvalues: one
            self.texts[(self.stage, " ".join(statement.split())[:90])] += len(params) if many else 1
            context._harness_started = time.perf_counter()

        @event.listens_for(engine, "after_cursor_execute")
        def _executed(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            key = (self.stage, " ".join(statement.split())[:90])
            self.ms[key] += (time.perf_counter() - context._harness_started) * 1000

        @event.listens_for(engine, "commit")
        def _commit(conn: Any) -> None:
            self.commits[self.stage] += 1

        @event.listens_for(engine.pool, "checkout")
        def _checkout(*_: Any) -> None:
            self.checkouts[self.stage] += 1

    def reset(self) -> None:
        for counter in (self.statements, self.param_sets, self.commits, self.checkouts, self.texts, self.ms):
            counter.clear()


COUNTER = StatementCounter()


def _install_stand_ins() -> None:
    """Replace generation and embedding in this process; the tokenizer is the model's own."""
    from transformers import AutoTokenizer

    from core.settings import settings
    from scripts.fleet_simulator import StandInEngine, stand_in_embed
    from worker import engine as engine_module
    from worker import judge, pipeline
    from worker.model_cache import resolve_model_path
    from worker.stage_timer import StageTimer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    grouped = GroupedEngine()
    setattr(engine_module, "get_engine", functools.cache(lambda: StandInEngine(tokenizer)))  # noqa: B010
    setattr(engine_module, "get_loop", functools.cache(lambda: grouped))  # noqa: B010
    setattr(pipeline, "embed", stand_in_embed)  # noqa: B010
    setattr(judge, "embed", stand_in_embed)  # noqa: B010

    timed = StageTimer.__call__

    @contextmanager
    def _counted(self: StageTimer, stage: str) -> Iterator[None]:
        before, COUNTER.stage = COUNTER.stage, stage
        try:
            with timed(self, stage):
                yield
        finally:
            COUNTER.stage = before

    setattr(StageTimer, "__call__", _counted)  # noqa: B010


def measure(
    rounds: int = 3, turns: int = 128, batch: int = 64, profile: str | None = None, lane: str = "live"
) -> dict[str, Any]:
    """Rounds of `turns` fresh sample turns through process_batch, claimed on `lane`; per-stage ms
    per turn for each."""
    from db.migrate import upgrade
    from db.session import get_engine
    from scripts.bench_generation import STAGES, _overhead_ms_per_turn, _stage_breakdown, sample_requests
    from scripts.seed import seed_world
    from services.producer import enqueue_turns
    from worker.pipeline import process_batch

    upgrade()
    seed_world()
    _install_stand_ins()
    COUNTER.install(get_engine())
    tag = uuid.uuid4().hex[:6]
    # Untimed, as in the bench: the first claim pays one-time costs (tokenizer, caches, connections).
    warm = enqueue_turns(sample_requests(batch, tag + "warm", 32), send=False)
    process_batch(warm, lane=lane)
    profiler = cProfile.Profile() if profile else None
    results: list[dict[str, Any]] = []
    all_reports: list[list[Any]] = []
    for r in range(rounds):
        ids = enqueue_turns(sample_requests(turns, f"{tag}r{r}", 32), send=False)
        COUNTER.reset()
        if profiler:
            profiler.enable()
        started = time.perf_counter()
        reports = [process_batch(ids[i : i + batch], lane=lane) for i in range(0, len(ids), batch)]
        wall = time.perf_counter() - started
        if profiler:
            profiler.disable()
        all_reports.append(reports)
        done = sum(len(rep.done) for rep in reports)
        claims = len(reports)
        results.append(
            {
                "done": done,
                "wall_s": round(wall, 2),
                "stage_ms_per_turn": {
                    k: v for k, v in _stage_breakdown(reports).items() if k in STAGES and k != "generate"
                },
                "ms_per_turn_outside_embed_and_generate": _overhead_ms_per_turn(reports),
                "per_claim": {
                    "statements": {k: v / claims for k, v in sorted(COUNTER.statements.items())},
                    "parameter_sets": {k: v / claims for k, v in sorted(COUNTER.param_sets.items())},
                    "commits": {k: v / claims for k, v in sorted(COUNTER.commits.items())},
                    "pool_checkouts": {k: v / claims for k, v in sorted(COUNTER.checkouts.items())},
                },
                "statement_texts": {
                    f"{stage}: {text}": [n, round(COUNTER.ms[(stage, text)] / done, 3)]
                    for (stage, text), n in COUNTER.texts.most_common(40)
                },
            }
        )
    if profiler and profile:
        profiler.dump_stats(profile)
    overheads = [_overhead_ms_per_turn(r) for r in all_reports]
    return {"rounds": results, "median_ms_per_turn_outside_embed_and_generate": statistics.median(overheads)}


def main(argv: list[str] | None = None) -> None:
    """Run the harness and print its figures as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", help="write a cProfile of the timed rounds here")
    parser.add_argument("--statements", action="store_true", help="also print the statements made")
    parser.add_argument("--lane", choices=["live", "bulk"], default="live", help="the claims' lane")
    args = parser.parse_args(argv)
    from core.logging import configure_logging

    configure_logging("WARNING")
    figures = measure(rounds=args.rounds, profile=args.profile, lane=args.lane)
    if not args.statements:
        for r in figures["rounds"]:
            r.pop("statement_texts")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
