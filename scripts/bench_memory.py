"""Benchmark: NPC memory (memory/), every figure measured in one run against today's retrieval alone.

1. Needle recall. Conversations of `turns` lines each (imported, as `mlchat history import` does)
   with 5 facts planted at random lines beyond the recent window; summaries and fact extraction then
   run for real on the engine at bulk priority. For each planted fact, a later question about it is
   packed into a prompt; the fact is recalled when its answer word is in the prompt (as a summary
   line, a fact row, a retrieved line or a recent line: `recalled_via` counts each). Measured with
   memory and without it (the recent window and similarity retrieval only), on the same questions.
   This measures the prompt, not the reply. Players do not ask in the words they used 300 lines
   earlier: a fact is said in passing inside a chatty line, the question is worded unlike it (no
   content word in common with any plant or distractor of its kind), and each is one of three
   paraphrases drawn at random. Each planted fact has 6 distractors (the same kind of fact about
   someone else, as chatty), more than similarity retrieval's k; filler lines make up the rest.
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
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select

from core.settings import settings
from db.history import append_lines
from db.models import Character, Fact, FactScope, Role, Summary
from db.retrieval import ContextQuery, TurnContext, fetch_batch_context
from db.session import session_scope
from db.world import find_characters, upsert_conversations
from memory.context import attach_memory
from memory.extract import run_extract_job
from memory.summarize import run_summary_job
from worker.embedder import embed


# One kind of fact a player mentions in passing: paraphrases of the line that plants it (the fact inside
# a longer, chatty line), of the later question (worded unlike every plant and distractor: no content
# word in common, tests/test_bench_memory.py checks it), and of a distractor (the same kind of fact
# about someone else); `pool` names the values {v} is drawn from, so an answer is a word of its kind.
@dataclass(frozen=True)
class Needle:
    """A kind of planted fact: its paraphrases, questions, distractors and value pool."""

    plants: tuple[str, ...]
    questions: tuple[str, ...]
    distractors: tuple[str, ...]
    pool: str


NEEDLES = [
    Needle(
        (
            "Long walk today. My sister {v} sends her greetings, she always liked this inn. Anyway, "
            "what's on the stove?",
            "I stopped by the well on the way in; {v}, my sister, used to race me there when we were "
            "small. Is there any bread left?",
            "Had a letter this morning from {v} (my sister, she married a fisherman up the coast). "
            "Pour me something warm, would you?",
        ),
        (
            "What did I say my sibling was called?",
            "Who was it I was raised alongside, do you recall?",
            "That girl from my family I keep mentioning, what's her name again?",
        ),
        (
            "The weaver's sister {v} came by the market yesterday, loud as ever.",
            "Old Hal told me his sister {v} is moving to the city.",
            "Did you know the guard captain's sister is {v}? She sings at the temple.",
        ),
        "women",
    ),
    Needle(
        (
            "The rain reminds me of {v}, where I was born; it never stopped raining there. Any news today?",
            "Nobody's heard of {v}, but that's my home village, born and raised. Pass the salt?",
            "I came into this world in {v}, a muddy little place by the river. The stew smells good tonight.",
        ),
        (
            "Where do I come from originally?",
            "What was the name of the spot I grew up in, remember?",
            "Which corner of the realm am I from, did I tell you?",
        ),
        (
            "The miller was born in {v}, he says, though he never goes back.",
            "A pilgrim from {v} came through yesterday, swore it's the finest town there is.",
            "My cousin's birthplace is {v}; she hated every winter of it.",
        ),
        "places",
    ),
    Needle(
        (
            "My old mare {v} threw a shoe on the road, so I walked the last mile. Got anything hot?",
            "Left {v} in your stable, hope that's fine; she's getting slow in her age, like me.",
            "Rode in on {v} again, she's the only beast that tolerates me. Busy night?",
        ),
        (
            "What's the name of my steed, do you remember?",
            "Remind me what I call my mount?",
            "How's that nag of mine called again?",
        ),
        (
            "The miller's horse {v} got loose and ate half the turnips at the market.",
            "Saw the courier's gelding, {v}, tied up outside. Lovely animal.",
            "A farmer was selling a pony named {v} cheap at the fair.",
        ),
        "horses",
    ),
    Needle(
        (
            "Don't tell anyone, but I still owe {v} forty silver from the card game last spring. "
            "Another cider, please.",
            "{v} lent me coin for these boots and I haven't paid it back yet. Ah well, the fire is warm.",
            "If {v} comes asking, you haven't seen me; I'm still short on what I borrowed. What's the "
            "stew tonight?",
        ),
        (
            "Who am I in debt to, did I mention?",
            "Whose money was it that I never returned?",
            "Who's chasing me for payment again?",
        ),
        (
            "The smith borrowed from {v} and can't pay it back, everyone knows.",
            "I heard {v} lent the baker twenty silver last winter.",
            "The potter still owes {v} for a cartload of hides.",
        ),
        "people",
    ),
    Needle(
        (
            "I always carry this {v} feather for luck, it's got me through two winters. Cold out, isn't it?",
            "Touch wood, or touch feather: my {v} quill has kept me alive so far. Any rooms free?",
            "See this? A {v} feather my grandmother gave me; I never travel without it.",
        ),
        (
            "What's the trinket I keep to ward off bad fortune?",
            "What did I say protects me out there?",
            "Which token of mine brings good fortune, do you recall?",
        ),
        (
            "The bard wears a {v} feather in his cap, says it's lucky.",
            "A peddler tried to sell me a {v} feather charm today.",
            "The priest keeps a {v} feather on the altar for blessings.",
        ),
        "birds",
    ),
    Needle(
        (
            "Back when I was a {v} in the capital, nights like this were for work, not cider. "
            "Another, please.",
            "My hands still remember being a {v}; ten years in the capital, that was. Is the bard "
            "playing tonight?",
            "I gave up the {v}'s trade when I left the capital, and I don't miss it. Quiet evening?",
        ),
        (
            "What did I do for a living before?",
            "What was my craft, in the old days?",
            "How did I earn my keep, before all this?",
        ),
        (
            "My uncle was a {v} for thirty winters, hands like leather.",
            "The new fellow at the docks says he's a {v} by training.",
            "They're looking for a {v} in the capital, the crier said.",
        ),
        "jobs",
    ),
    Needle(
        (
            "I still dream of the night {v} and his bandits burned our farm and killed my father. "
            "Sorry, dark thoughts. More cider?",
            "My father died at the hands of {v}, the bandit; someday I'll find him. The stew is good "
            "tonight.",
            "Every time I see a bandit's mark I think of {v}, who murdered my father. Anyway.",
        ),
        (
            "Whose blade took my old man from me?",
            "Who was it that I swore revenge on?",
            "Who's the one I'm hunting for what happened to my family?",
        ),
        (
            "The baker's father was killed by {v} on the south road, years back.",
            "They say {v} the outlaw robbed the tax cart last month.",
            "A widow in the square cursed {v} for her husband's death.",
        ),
        "people",
    ),
]
# Each answer appears once in a conversation: values are drawn without replacement per pool, and no
# value is a word of any template or filler line.
POOLS = {
    "women": ["Mira", "Lina", "Tove", "Asha", "Odalys", "Ysolde", "Tamsin", "Elsbeth", "Juniper", "Wren"],
    "people": [
        "Garrick",
        "Bertram",
        "Vask",
        "Roderin",
        "Sorrel",
        "Corwin",
        "Orrin",
        "Marlowe",
        "Linden",
        "Harrow",
        "Ashby",
        "Petrel",
        "Doran",
        "Kestrel",
        "Aldric",
        "Fennick",
    ],
    "places": [
        "Oakhollow",
        "Saltmere",
        "Fenwick",
        "Brackenford",
        "Highmoor",
        "Dunmarrow",
        "Willowmere",
        "Stonebridge",
        "Ravensgate",
        "Coldharbour",
    ],
    "horses": [
        "Brindle",
        "Clover",
        "Ember",
        "Thistle",
        "Dusk",
        "Nutmeg",
        "Pepper",
        "Bramble",
        "Sable",
        "Maple",
    ],
    "birds": [
        "heron",
        "raven",
        "peacock",
        "falcon",
        "magpie",
        "owl",
        "swan",
        "kingfisher",
        "curlew",
        "osprey",
    ],
    "jobs": [
        "glassblower",
        "scribe",
        "tanner",
        "ferryman",
        "cooper",
        "chandler",
        "wheelwright",
        "locksmith",
        "farrier",
        "bookbinder",
    ],
}
PROBE_GAP_S = 5.0  # between live probes while the memory jobs run
PROBE_PLACES = ("north road", "mill", "harbour", "old quarry", "river crossing", "high pass")
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
    """A conversation's lines with 5 planted facts beyond the recent window; [(question, answer)].
    A plant, its distractors and its question are each a template drawn at random; a distractor
    is followed by a filler sentence, so it is as chatty as a plant."""
    lines: list[tuple[Role, str]] = []
    for i in range(turns):
        pool = FILLER if i % 2 == 0 else REPLIES
        lines.append((Role.USER if i % 2 == 0 else Role.ASSISTANT, rng.choice(pool)))
    chosen = rng.sample(NEEDLES, 5)
    user_spots = list(range(0, turns - recent - 2, 2))  # user lines only, before the recent window
    spots = rng.sample(user_spots, 5 * (1 + DISTRACTORS))
    left = {name: rng.sample(values, len(values)) for name, values in POOLS.items()}
    probes = []
    for n, needle in enumerate(chosen):
        value, *others = (left[needle.pool].pop() for _ in range(1 + DISTRACTORS))
        mine = spots[n * (1 + DISTRACTORS) : (n + 1) * (1 + DISTRACTORS)]
        lines[mine[0]] = (Role.USER, rng.choice(needle.plants).format(v=value))
        for spot, other in zip(mine[1:], others, strict=True):
            line = f"{rng.choice(needle.distractors).format(v=other)} {rng.choice(FILLER)}"
            lines[spot] = (Role.USER, line)
        probes.append((rng.choice(needle.questions), value))
    return lines, probes


def _found(answer: str, text: str) -> bool:
    return re.search(rf"\b{re.escape(answer)}\b", text, re.IGNORECASE) is not None


def recalled_via(answer: str, ctx: TurnContext, manifest: dict[str, Any]) -> set[str]:
    """The prompt parts that carried `answer`: of the items the packer kept (its manifest), each
    summary line, fact row, retrieved line and recent-window line that holds the word."""
    kept = {
        "summary": {s["id"] for s in manifest.get("summary", [])},
        "fact": {f["id"] for f in manifest.get("facts", [])},
        "retrieved": {m["id"] for m in manifest.get("memories", [])},
        "recent": {h["id"] for h in manifest.get("history", [])},
    }
    items: dict[str, list[tuple[int, str]]] = {
        "summary": [(s.id, s.text) for s in ctx.summaries],
        "fact": [(f.id, f"{f.subject}: {f.text}") for f in ctx.facts],
        "retrieved": [(m.id, m.content) for m in ctx.similar],
        "recent": [(h.id, h.content) for h in ctx.recent],
    }
    return {
        path
        for path, rows in items.items()
        if any(i in kept[path] and _found(answer, text) for i, text in rows)
    }


PATHS = ("summary", "fact", "retrieved", "recent")


def _recall(
    conv_ids: list[int], probes: list[list[tuple[str, str]]], card: Character, with_memory: bool
) -> tuple[int, int, list[int], int, dict[str, int]]:
    """(recalled, asked, prompt tokens of each conversation's first probe, the most tokens of summaries
    and facts one prompt showed (its manifest's count of what was rendered: the builder packs by an
    estimate, so this can pass MLCHAT_MEMORY_BUDGET_TOKENS), recalled probes per path that carried
    the answer (a probe counts under each path that did), and under `memory_only` those only a
    summary or a fact carried)."""
    from worker.pipeline import get_prompt_builder
    from worker.prompt import PromptInput

    builder = get_prompt_builder()
    recalled = asked = 0
    tokens: list[int] = []
    memory_most = 0
    via = dict.fromkeys((*PATHS, "memory_only"), 0)
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
            ctx = ctx if with_memory else TurnContext(ctx.recent, ctx.similar, ctx.events)
            built = builder.build(
                PromptInput(
                    card,
                    "Rowan",
                    question,
                    ctx,
                    settings.max_new_tokens,
                    memory_tokens=settings.memory_budget_tokens,
                )
            )
            asked += 1
            recalled += int(_found(answer, built.text))
            paths = recalled_via(answer, ctx, built.manifest)
            for path in paths:
                via[path] += 1
            via["memory_only"] += int(bool(paths) and paths <= {"summary", "fact"})
            shown = [*built.manifest.get("summary", []), *built.manifest.get("facts", [])]
            memory_most = max(memory_most, sum(part["tokens"] for part in shown))
            if i == 0:
                tokens.append(len(built.token_ids))
    return recalled, asked, tokens, memory_most, via


def _stored(conv_ids: list[int], probes: list[list[tuple[str, str]]]) -> dict[str, int]:
    """How many answers memory holds at all, whatever relevance and the budget then keep: in a
    summary the prompt would show, in any summary (merged ones too), in a current fact of the
    conversation."""
    from db.summaries import summaries_for

    held = {"summary_shown": 0, "summary_any": 0, "fact": 0}
    with session_scope() as session:
        shown = summaries_for(session=session, conversation_ids=conv_ids)
        for conv, asks in zip(conv_ids, probes, strict=True):
            every = session.scalars(select(Summary.text).where(Summary.conversation_id == conv)).all()
            facts = session.scalars(
                select(Fact).where(
                    Fact.scope == FactScope.CONVERSATION,
                    Fact.scope_ref == str(conv),
                    Fact.superseded_by.is_(None),
                )
            ).all()
            for _, answer in asks:
                held["summary_shown"] += any(_found(answer, s.text) for s in shown[conv])
                held["summary_any"] += any(_found(answer, text) for text in every)
                held["fact"] += any(_found(answer, f"{f.subject}: {f.text}") for f in facts)
    return held


def _live_probe_s(builder: Any, card: Character, n: int) -> float:
    """One live turn's time; `n` makes its message its own, so its prompt's end is never in the
    prefix cache (the same message each time timed a cached prefill: review)."""
    from worker import engine as engine_module
    from worker.engine import GenerationRequest
    from worker.prompt import PromptInput

    message = f"Any news tonight? I am traveller {n}, from the {PROBE_PLACES[n % len(PROBE_PLACES)]}."
    built = builder.build(PromptInput(card, "Rowan", message, TurnContext(), 16))
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

    base_recalled, asked, base_tokens, _, base_via = _recall(conv_ids, probes, card, with_memory=False)

    alone = [_live_probe_s(builder, card, n) for n in range(probes_live)]
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
    # Probes spread over the whole window, not only its start (24 back to back once covered 15 s of
    # 480: the first conversation's summary, never an extraction).
    during: list[float] = []
    while not done.is_set():
        during.append(_live_probe_s(builder, card, probes_live + len(during)))
        done.wait(PROBE_GAP_S)
    probes_span_s = time.perf_counter() - started
    worker.join()
    jobs_s = time.perf_counter() - started

    mem_recalled, _, mem_tokens, mem_most, mem_via = _recall(conv_ids, probes, card, with_memory=True)
    held = _stored(conv_ids, probes)
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
        # Recalled probes by the prompt part that carried the answer (a probe counts under each).
        "recalled_via_with_memory": mem_via,
        "recalled_via_retrieval_only": base_via,
        # Answers memory holds at all, before relevance and the budget pick what the prompt shows.
        "answers_stored_in_memory": held,
        "summaries_stored": summaries,
        "facts_extracted": extracted,
        "memory_jobs_s": round(jobs_s, 1),
        "prompt_tokens_with_memory": round(statistics.mean(mem_tokens), 1),
        "prompt_tokens_without_memory": round(statistics.mean(base_tokens), 1),
        "prompt_tokens_ratio": round(statistics.mean(mem_tokens) / statistics.mean(base_tokens), 3),
        # Review: "budget_held" compared each prompt with the context the builder never passes (it
        # raises instead): it could not be false. The memory budget is the one packing estimates.
        "memory_budget_tokens": settings.memory_budget_tokens,
        "memory_tokens_most_in_a_prompt": mem_most,
        "memory_within_budget": mem_most <= settings.memory_budget_tokens,
        "live_probe_alone_s": round(statistics.median(alone), 3),
        "live_probe_during_memory_jobs_s": round(statistics.median(during), 3) if during else None,
        "live_latency_ratio": round(statistics.median(during) / statistics.median(alone), 3)
        if during
        else None,
        "live_probes_during": len(during),
        "live_probes_span_s": round(probes_span_s, 1),
    }
