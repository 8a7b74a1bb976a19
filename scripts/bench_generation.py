"""Benchmark: the pipeline's own figures, every one a ratio of two runs made here, in one process.

1. Where a turn's time goes: the stage breakdown of batches run through the pipeline, and the time
   per turn outside embedding and generation (claim, retrieve, prompt, quality, write).
2. Prefix caching on ÷ off for a same-character batch, for the pipeline and for the raw engine.
3. Memory of the worker and its engine processes.

The engine loop's figures (live latency under load, busy share, end to end ÷ raw, ready time,
dtype) are in scripts/bench_engine.py. The engine is loaded in this process once per
prefix-caching setting.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from core.settings import PROJECT_ROOT, settings
from db.models import TURN_FINISHED, Turn, TurnStatus
from db.session import session_scope

SAMPLE = PROJECT_ROOT / "data" / "sample_run_2000.jsonl"
STAGES = ("claim", "embed", "retrieve", "prompt", "generate", "embed_reply", "quality", "write")

# A character whose persona dominates its prompts, for the prefix-caching case.
SAGE = {
    "slug": "bench-sage",
    "name": "Orin",
    "language": "en",
    "system_prompt": "You are {{char}}, keeper of the Lantern Archive. Stay in character.",
    "description": (
        "Orin is the last archivist of the Lantern Archive, a library carved into the cliffs above the "
        "salt marshes of Vey. For forty years Orin has catalogued maps, ship logs, recipes, treaties, "
        "love letters and the confessions of smugglers, and can recite the shelf number of any of them. "
        "Orin lost an eye to a fire that burned the western wing and keeps a jar of its ashes on the desk. "
        "Orin trades knowledge for stories: a traveller who tells a true tale may ask one question. "
        "Orin distrusts the Tide Guild, which wants the archive's charts of the sunken roads, and "
        "protects a student named Pell who sleeps in the map room."
    ),
    "personality": (
        "Patient, precise, quietly funny, suspicious of flattery, generous with the curious, stern with "
        "the careless. Speaks of books as if they were old friends and of the Tide Guild as weather."
    ),
    "scenario": (
        "Night in the reading hall. Rain on the skylights. The player has climbed the cliff stairs with "
        "a question and a story to pay for it."
    ),
    "speech_style": "Unhurried, exact, with archival metaphors; never more than two sentences.",
    "example_dialogues": [
        {"user": "Do you have maps of the sunken roads?", "character": "Shelf nine, drawer four. Pay first."},
        {"user": "Why trust me?", "character": "I don't. I trust the story you are about to tell."},
        {"user": "What happened to your eye?", "character": "The western wing burned. I chose the ledgers."},
        {"user": "Who is Pell?", "character": "A student who reads faster than I can shelve."},
    ],
    "post_history_instructions": "Reply as Orin, in one short sentence.",
}
SAGE_MESSAGES = [
    "What is on shelf nine?",
    "Tell me about the Tide Guild.",
    "Is Pell awake?",
    "I have a story about a lighthouse.",
    "Where are the ship logs kept?",
    "Can I see the burned ledgers?",
    "Who built the archive?",
    "What do you trade for answers?",
]


def sample_requests(n: int, tag: str, max_new_tokens: Any, offset: int = 0) -> list[dict[str, Any]]:
    """n sample turns in fresh conversations; max_new_tokens is a number or a function of the index."""
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[offset : offset + n]
    out = []
    for i, raw in enumerate(lines):
        line = json.loads(raw)
        tokens = max_new_tokens(i) if callable(max_new_tokens) else max_new_tokens
        out.append(
            dict(
                conversation=f"bench-{tag}-{i}",
                character=line["character"],
                message=line["message"],
                player_name=line.get("player_name", ""),
                story=line.get("story"),
                story_time=line.get("story_time"),
                params={"seed": i, "max_new_tokens": tokens},
            )
        )
    return out


def _sage_requests(n: int, tag: str) -> list[dict[str, Any]]:
    """Requests to one character whose messages are each their own (review: the warm and the timed
    batch sent the same eight messages, so the prefix cache held whole prompts, not the persona
    alone, and the gain measured was of whole-prompt hits)."""
    return [
        dict(
            conversation=f"bench-{tag}-{i}",
            character=SAGE["slug"],
            message=f"{SAGE_MESSAGES[i % len(SAGE_MESSAGES)]} (Ask {tag}-{i}.)",
            player_name="Wren",
            params={"seed": i, "max_new_tokens": 16},
        )
        for i in range(n)
    ]


def _wait_finished(ids: Sequence[uuid.UUID], timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            rows = session.execute(select(Turn.status, Turn.finished_at).where(Turn.id.in_(ids))).all()
        if all(r.status in TURN_FINISHED for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _stored_prompts(ids: Sequence[uuid.UUID]) -> list[Any]:
    with session_scope() as session:
        return session.execute(
            select(Turn.id, Turn.prompt, Turn.params, Turn.usage, Turn.conversation_id)
            .where(Turn.id.in_(ids), Turn.status == TurnStatus.DONE)
            .order_by(Turn.number)
        ).all()


class RawEngine:
    """The loaded vLLM engine called directly, on prompts the pipeline stored."""

    def __init__(self, loaded: Any) -> None:
        from worker.prompt.formats import RENDERERS

        self.llm, self.tokenizer = loaded.llm, loaded.tokenizer
        probe = RENDERERS[settings.resolved_prompt_format](
            self.tokenizer, [{"role": "user", "content": "x"}], "C", "U"
        )
        self.add_special_tokens, self.format_stop = probe.add_special_tokens, probe.stop

    def inputs(self, rows: Sequence[Any]) -> tuple[list[Any], list[Any], int]:
        """Token ids and SamplingParams as the worker built them; counts prompts whose length differs."""
        from vllm import SamplingParams

        from services.schemas import SAMPLING_CONTROLS

        prompts, params, mismatches = [], [], 0
        for row in rows:
            ids = self.tokenizer(row.prompt, add_special_tokens=self.add_special_tokens)["input_ids"]
            mismatches += len(ids) != row.usage["prompt_tokens"]
            prompts.append({"prompt_token_ids": list(ids)})
            p = row.params
            params.append(
                SamplingParams(
                    temperature=p["temperature"],
                    top_p=p["top_p"],
                    max_tokens=p["max_new_tokens"],
                    seed=p["seed"],
                    stop=list(p.get("stop") or []) + list(self.format_stop) or None,
                    skip_special_tokens=True,
                    # The worker's sampling controls too (a penalty is decode work): same work both sides.
                    **{name: p[name] for name in SAMPLING_CONTROLS if name in p},
                )
            )
        return prompts, params, mismatches

    def run(self, prompts: list[Any], params: list[Any], batch: int) -> float:
        """Seconds to generate everything, `batch` prompts per call."""
        started = time.perf_counter()
        for i in range(0, len(prompts), batch):
            self.llm.generate(prompts[i : i + batch], params[i : i + batch], use_tqdm=False)
        return time.perf_counter() - started


def _pipeline(
    requests: list[dict[str, Any]], batch: int, llm: Any, lane: str = "live"
) -> tuple[float, float, list[Any], list]:
    """The worker's pipeline in-process over fresh turns, claimed on `lane`: (wall s, this process's
    CPU s, reports, ids)."""
    from services.producer import enqueue_turns
    from worker.pipeline import process_batch

    ids = enqueue_turns(requests, send=False)
    llm.reset_prefix_cache()
    wall, cpu = time.perf_counter(), time.process_time()
    reports = [process_batch(ids[i : i + batch], lane=lane) for i in range(0, len(ids), batch)]  # type: ignore[arg-type]
    return time.perf_counter() - wall, time.process_time() - cpu, reports, ids


def _stage_breakdown(reports: Sequence[Any]) -> dict[str, float]:
    turns = sum(len(r.done) for r in reports)
    return {
        stage: round(sum(r.timings.get(f"{stage}_ms", 0.0) for r in reports) / turns, 2) for stage in STAGES
    }


OUTSIDE = ("claim", "retrieve", "prompt", "quality", "write")


def _overhead_ms_per_turn(reports: Sequence[Any]) -> float:
    """Pipeline time per turn outside embedding and generation (claim, retrieve, prompt, quality, write)."""
    turns = sum(len(r.done) for r in reports)
    return round(sum(r.timings.get(f"{stage}_ms", 0.0) for r in reports for stage in OUTSIDE) / turns, 3)


def _stores_per_claim(reports: Sequence[Any]) -> float:
    """The transactions that stored the claims' replies, per claim (one a group of replies)."""
    return round(statistics.mean(r.stores for r in reports), 1)


def _rss_mb() -> dict[str, float]:
    import psutil

    children = psutil.Process().children(recursive=True)
    return {
        "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "engine_processes_rss_mb": round(sum(c.memory_info().rss for c in children) / 2**20, 1),
    }


def _load_engine(prefix_caching: bool) -> Any:
    from worker import engine as engine_module
    from worker import pipeline

    if engine_module.get_engine.cache_info().currsize:
        engine_module._shutdown(engine_module.get_engine().llm)
        engine_module.get_engine.cache_clear()
        engine_module.get_loop.cache_clear()
        pipeline.get_prompt_builder.cache_clear()
    settings.enable_prefix_caching = prefix_caching
    loaded = engine_module.get_engine()
    pipeline.get_prompt_builder()
    return loaded


def _prefix_case(loaded: Any, n: int, tag: str) -> dict[str, float]:
    """Seconds for a same-character batch once its persona is cached: pipeline, and raw engine on the
    identical prompts. A warm batch of the same character runs first in both."""
    from services.producer import enqueue_turns
    from worker.pipeline import process_batch

    raw = RawEngine(loaded)
    _, _, _, warm_ids = _pipeline(_sage_requests(n, tag + "w"), n, loaded.llm)
    timed_ids = enqueue_turns(_sage_requests(n, tag + "t"), send=False)
    started = time.perf_counter()
    report = process_batch(timed_ids)
    pipeline_s = time.perf_counter() - started

    warm_prompts, warm_params, _ = raw.inputs(_stored_prompts(warm_ids))
    prompts, params, _ = raw.inputs(_stored_prompts(timed_ids))
    loaded.llm.reset_prefix_cache()
    raw.run(warm_prompts, warm_params, n)
    raw_s = raw.run(prompts, params, n)
    with session_scope() as session:
        contexts = session.scalars(select(Turn.context).where(Turn.id.in_(timed_ids))).all()
    return {
        "pipeline_s": round(pipeline_s, 3),
        # the batch's generate stage: less its earlier groups' judging and writing (their own stages)
        "pipeline_generate_s": round(report.timings["generate_ms"] / 1000, 3),
        "raw_s": round(raw_s, 3),
        "persona_share": statistics.mean(c["persona_tokens"] / c["prompt_tokens"] for c in contexts),
        "prompt_tokens": statistics.mean(c["prompt_tokens"] for c in contexts),
    }


def measure_generation(
    turns: int = 128, batch: int = 64, prefix_turns: int = 64, max_new_tokens: int = 32
) -> dict[str, Any]:
    """Run the pipeline benchmarks and return the figures."""
    from db.world import upsert_character
    from worker.startup import check_and_warm_up

    with session_scope() as session:
        upsert_character(session=session, slug=SAGE["slug"], fields=SAGE)
    tag = uuid.uuid4().hex[:6]
    check_and_warm_up(load_engine=False)
    loaded = _load_engine(prefix_caching=True)

    # Untimed: the first calls at a new batch shape pay one-time costs on CPU backends.
    _pipeline(sample_requests(batch, tag + "warm", max_new_tokens), batch, loaded.llm)
    batched_s, batched_cpu, batched_reports, ids = _pipeline(
        sample_requests(turns, tag + "b", max_new_tokens), batch, loaded.llm
    )
    rss = _rss_mb()
    usage = [r.usage for r in _stored_prompts(ids)]
    # The same turns claimed as a bulk run's are: stored in fewer, larger groups (store_window).
    bulk_s, _, bulk_reports, _ = _pipeline(
        sample_requests(turns, tag + "k", max_new_tokens), batch, loaded.llm, lane="bulk"
    )

    prefix_on = _prefix_case(loaded, prefix_turns, tag + "pon")
    loaded = _load_engine(prefix_caching=False)
    prefix_off = _prefix_case(loaded, prefix_turns, tag + "poff")
    _load_engine(prefix_caching=True)
    engine_gain = prefix_off["raw_s"] / prefix_on["raw_s"]
    pipeline_gain = prefix_off["pipeline_s"] / prefix_on["pipeline_s"]
    return {
        "model": settings.model,
        "batch_size": batch,
        "turns": turns,
        "max_new_tokens": max_new_tokens,
        "mean_prompt_tokens": round(statistics.mean(u["prompt_tokens"] for u in usage), 1),
        "mean_completion_tokens": round(statistics.mean(u["completion_tokens"] for u in usage), 1),
        "pipeline_turns_per_s": round(turns / batched_s, 2),
        "stage_ms_per_turn": _stage_breakdown(batched_reports),
        "prefix_caching": {
            "prompt_tokens": round(prefix_on["prompt_tokens"], 1),
            "persona_share": round(prefix_on["persona_share"], 3),
            "engine_gain": round(engine_gain, 2),
            "pipeline_gain": round(pipeline_gain, 2),
            "kept_share_of_engine_gain": round(pipeline_gain / engine_gain, 3),
            "target": 0.80,
            "seconds": {"on": prefix_on, "off": prefix_off},
        },
        "overhead": {
            "ms_per_turn_outside_embed_and_generate": _overhead_ms_per_turn(batched_reports),
            "target_ms": 2.0,
            "store_transactions_per_64_turn_claim": _stores_per_claim(batched_reports),
            "bulk_claims_ms_per_turn_outside_embed_and_generate": _overhead_ms_per_turn(bulk_reports),
            "bulk_claims_store_transactions_per_64_turn_claim": _stores_per_claim(bulk_reports),
            "bulk_store_window_s": settings.bulk_store_window_s,
            "bulk_claims_stage_ms_per_turn": _stage_breakdown(bulk_reports),
            "bulk_claims_turns_per_s": round(turns / bulk_s, 2),
            "worker_cpu_ms_per_turn_including_embedding": round(batched_cpu / turns * 1000, 2),
        },
        "memory": rss,
    }
