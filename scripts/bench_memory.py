"""Benchmark: NPC memory (memory/), every figure measured in one run against today's retrieval alone.

1. Needle recall. Conversations of `turns` lines each (imported, as `mlchat history import` does)
   with 5 facts planted at random lines beyond the recent window; summaries and fact extraction then
   run for real on the engine at bulk priority. For each planted fact, a later question about it is
   packed into a prompt; the fact is recalled when its answer word is in the prompt (as a summary
   line, a fact row or a retrieved line). Measured with memory and without it (the recent window and
   similarity retrieval only), on the same questions. This measures the prompt, not the reply.
   Each planted fact has 6 distractors (the same kind of statement about someone else), more than
   similarity retrieval's k, so a similar line can be crowded out; filler lines make up the rest.
2. Prompt tokens at the last line with summaries and facts ÷ without, on the same budget; and that
   every prompt fits the budget.
3. Live latency while memory jobs run: the median of live engine requests sent while the summary and
   extraction jobs run ÷ the same requests sent alone.

The issue's figure is 100 conversations of 300 turns (500 facts); this machine (2 CPU cores, the
bundled 135M model) runs fewer by default (`conversations`, `turns`), and says so in the figures.
"""

from __future__ import annotations

import random
import re
import statistics
import threading
import time
import uuid
from typing import Any

import numpy as np
from sqlalchemy import select

from core.settings import settings
from db.history import append_lines
from db.models import Character, Role
from db.retrieval import ContextQuery, TurnContext, fetch_batch_context
from db.session import session_scope
from db.world import find_characters, upsert_conversations
from memory.context import attach_memory
from memory.extract import run_extract_job
from memory.summarize import run_summary_job
from worker.embedder import embed

# (planted line, later question, the answer word that must reach the prompt, a distractor: the same
# kind of statement about someone else); {v} is drawn per plant.
NEEDLES = [
    (
        "By the way, my sister's name is {v}.",
        "Do you remember my sister's name?",
        "My neighbour's sister is named {v}.",
    ),
    (
        "I was born in the village of {v}.",
        "Where was I born again?",
        "My cousin was born in the village of {v}.",
    ),
    ("My horse is called {v}, she is old.", "How is my horse doing?", "The miller's horse is called {v}."),
    ("I owe {v} forty silver coins.", "Who do I owe money to?", "The smith owes {v} ten silver coins."),
    (
        "My lucky charm is a {v} feather.",
        "What is my lucky charm?",
        "The bard's lucky charm is a {v} feather.",
    ),
    ("I used to work as a {v} in the capital.", "What was my old job?", "My uncle used to work as a {v}."),
    (
        "My father was killed by the bandit {v}.",
        "Who killed my father?",
        "The baker's father was killed by {v}.",
    ),
]
VALUES = [
    "Mira",
    "Lina",
    "Tove",
    "Asha",
    "Oakhollow",
    "Brindle",
    "Saltmere",
    "Fenwick",
    "Clover",
    "Ember",
    "Thistle",
    "Dusk",
    "Garrick",
    "Odalys",
    "Bertram",
    "Quill",
    "heron",
    "raven",
    "peacock",
    "falcon",
    "glassblower",
    "scribe",
    "tanner",
    "ferryman",
    "Vask",
    "Roderin",
    "Mal",
    "Sorrel",
    "Juniper",
    "Corwin",
    "Ysolde",
    "Harrow",
    "Petrel",
    "Kestrel",
    "Marlowe",
    "Wren",
    "Ashby",
    "Linden",
    "Tamsin",
    "Orrin",
]
DISTRACTORS = 6  # per planted fact: more than retrieval's k, so similarity alone can be crowded out
FILLER = [
    "The weather has been cold this week.",
    "Could I get another mug of cider?",
    "The road from the south was muddy.",
    "Have you heard any news from the market?",
    "The fire is warm tonight.",
    "I think it will rain again tomorrow.",
    "The stew smells good.",
    "Travellers have been fewer lately.",
    "The bard played the same song three times.",
    "My boots need mending.",
]
REPLIES = [
    "Aye, it has been a long season.",
    "Coming right up, traveller.",
    "The roads are never kind this time of year.",
    "Only rumours, and most of them false.",
    "Sit closer, then, and warm your hands.",
]


def _plant(
    rng: random.Random, turns: int, recent: int
) -> tuple[list[tuple[Role, str]], list[tuple[str, str]]]:
    """A conversation's lines with 5 planted facts beyond the recent window; [(question, answer)]."""
    lines: list[tuple[Role, str]] = []
    for i in range(turns):
        pool = FILLER if i % 2 == 0 else REPLIES
        lines.append((Role.USER if i % 2 == 0 else Role.ASSISTANT, rng.choice(pool)))
    chosen = rng.sample(NEEDLES, 5)
    user_spots = list(range(0, turns - recent - 2, 2))  # user lines only, before the recent window
    spots = rng.sample(user_spots, 5 * (1 + DISTRACTORS))
    values = rng.sample(VALUES, 5 * (1 + DISTRACTORS))  # all distinct: no answer word elsewhere
    probes = []
    for n, (plant, question, distractor) in enumerate(chosen):
        value, *others = values[n * (1 + DISTRACTORS) : (n + 1) * (1 + DISTRACTORS)]
        mine = spots[n * (1 + DISTRACTORS) : (n + 1) * (1 + DISTRACTORS)]
        lines[mine[0]] = (Role.USER, plant.format(v=value))
        for spot, other in zip(mine[1:], others, strict=True):
            lines[spot] = (Role.USER, distractor.format(v=other))
        probes.append((question, value))
    return lines, probes


def _recall(
    conv_ids: list[int], probes: list[list[tuple[str, str]]], card: Character, with_memory: bool
) -> tuple[int, int, list[int], bool]:
    """(recalled, asked, prompt tokens of each conversation's first probe, every prompt within budget)."""
    from worker.pipeline import get_prompt_builder
    from worker.prompt import PromptInput

    builder = get_prompt_builder()
    recalled = asked = 0
    tokens: list[int] = []
    within = True
    for conv, asks in zip(conv_ids, probes, strict=True):
        vectors = embed([q for q, _ in asks])
        with session_scope() as session:
            contexts = fetch_batch_context(
                session=session,
                queries=[ContextQuery(conv, None, None, v) for v in vectors],
                recent_n=settings.recent_history,
                history_k=settings.rag_history_k,
                story_k=0,
            )
            if with_memory:
                attach_memory(
                    session=session,
                    conversation_ids=[conv] * len(asks),
                    vectors=list(vectors),
                    contexts=contexts,
                )
        for i, ((question, answer), ctx) in enumerate(zip(asks, contexts, strict=True)):
            built = builder.build(
                PromptInput(
                    card,
                    "Rowan",
                    question,
                    ctx if with_memory else TurnContext(ctx.recent, ctx.similar, ctx.events),
                    settings.max_new_tokens,
                    memory_tokens=settings.memory_budget_tokens,
                )
            )
            asked += 1
            recalled += int(re.search(rf"\b{re.escape(answer)}\b", built.text, re.IGNORECASE) is not None)
            within = within and len(built.token_ids) <= settings.max_model_len - settings.max_new_tokens
            if i == 0:
                tokens.append(len(built.token_ids))
    return recalled, asked, tokens, within


def _live_probe_s(builder: Any, card: Character) -> float:
    from worker import engine as engine_module
    from worker.engine import GenerationRequest
    from worker.prompt import PromptInput

    built = builder.build(PromptInput(card, "Rowan", "Any news tonight?", TurnContext(), 16))
    request = GenerationRequest(
        token_ids=built.token_ids,
        temperature=0.0,
        top_p=1.0,
        max_tokens=16,
        seed=0,
        stop=built.stop,
        priority=engine_module.LIVE,
    )
    started = time.perf_counter()
    engine_module.generate([request])
    return time.perf_counter() - started


def measure_memory(
    conversations: int = 10, turns: int = 300, probes_live: int = 6, seed: int = 7
) -> dict[str, Any]:
    """The memory section's figures (see the module docstring)."""
    from worker.engine import get_engine
    from worker.pipeline import get_prompt_builder

    get_engine()
    builder = get_prompt_builder()
    rng = random.Random(seed)
    # Summaries start sooner than the default so short bench conversations get several levels.
    settings.memory_summary_threshold_tokens = 256
    settings.memory_summary_chunk_tokens = 384
    tenant = f"bench-memory-{uuid.uuid4().hex[:6]}"
    conv_ids: list[int] = []
    probes: list[list[tuple[str, str]]] = []
    with session_scope() as session:
        char_id = find_characters(session=session, slugs=["elara"])["elara"]
        card = session.scalars(select(Character).where(Character.id == char_id)).one()
        session.expunge(card)
    for n in range(conversations):
        lines, asks = _plant(rng, turns, settings.recent_history)
        vectors = np.concatenate(
            [embed([t for _, t in lines[i : i + 256]]) for i in range(0, len(lines), 256)]
        )
        with session_scope() as session:
            external = f"bench-mem-{n}"
            row = {
                "external_id": external,
                "player_id": f"p{n}",
                "player_name": "Rowan",
                "character_id": char_id,
            }
            conv, _ = upsert_conversations(session=session, rows=[row], tenant=tenant)[external]
            append_lines(session=session, conversation_id=conv, lines=lines, vectors=vectors)
        conv_ids.append(conv)
        probes.append(asks)

    base_recalled, asked, base_tokens, base_within = _recall(conv_ids, probes, card, with_memory=False)

    alone = [_live_probe_s(builder, card) for _ in range(probes_live)]
    summaries = extracted = 0
    done = threading.Event()

    def jobs() -> None:
        nonlocal summaries, extracted
        try:
            for conv in conv_ids:
                summaries += run_summary_job(conv, max_steps=64)
                while counts := run_extract_job(conv):
                    extracted += counts.get("added", 0) + counts.get("superseded", 0)
        finally:
            done.set()

    started = time.perf_counter()
    worker = threading.Thread(target=jobs)
    worker.start()
    during: list[float] = []
    while not done.is_set() and len(during) < probes_live * 4:
        during.append(_live_probe_s(builder, card))
    worker.join()
    jobs_s = time.perf_counter() - started

    mem_recalled, _, mem_tokens, mem_within = _recall(conv_ids, probes, card, with_memory=True)
    return {
        "scaled_down": {
            "conversations": conversations,
            "lines_per_conversation": turns,
            "facts_planted": asked,
            "issue_figure": "100 conversations x 300 turns, 500 facts",
            "summary_threshold_tokens": settings.memory_summary_threshold_tokens,
            "summary_chunk_tokens": settings.memory_summary_chunk_tokens,
            "model": settings.model,
        },
        "needle_recall_with_memory": round(mem_recalled / asked, 3),
        "needle_recall_retrieval_only": round(base_recalled / asked, 3),
        "summaries_stored": summaries,
        "facts_extracted": extracted,
        "memory_jobs_s": round(jobs_s, 1),
        "prompt_tokens_with_memory": round(statistics.mean(mem_tokens), 1),
        "prompt_tokens_without_memory": round(statistics.mean(base_tokens), 1),
        "prompt_tokens_ratio": round(statistics.mean(mem_tokens) / statistics.mean(base_tokens), 3),
        "budget_held": mem_within and base_within,
        "live_probe_alone_s": round(statistics.median(alone), 3),
        "live_probe_during_memory_jobs_s": round(statistics.median(during), 3) if during else None,
        "live_latency_ratio": round(statistics.median(during) / statistics.median(alone), 3)
        if during
        else None,
        "live_probes_during": len(during),
    }
