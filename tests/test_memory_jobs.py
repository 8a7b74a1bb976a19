"""The memory jobs on the real engine: a rolling summary written once and shown in the next prompt;
facts extracted under the JSON schema (guided decoding), heard in the conversation's scope.
Loads the engine: run under the shared lock (flock /tmp/mlchat-engine.lock)."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from core.settings import settings
from db.memory_jobs import extracted_through
from db.models import Character, Fact, Message, Role, Summary
from db.retrieval import ContextQuery, fetch_batch_context
from db.session import session_scope
from db.world import find_characters, upsert_conversations
from memory.context import attach_memory
from memory.extract import run_extract_job
from memory.summarize import run_summary_job
from worker.embedder import embed
from worker.pipeline import get_prompt_builder
from worker.prompt import PromptInput

pytestmark = pytest.mark.usefixtures("engine")

STORY = [
    ("user", "My name is Rowan and my little sister Mira vanished near the old mill three days ago."),
    ("assistant", "Mira? The miller's boy said he saw a girl with a red scarf walking toward the river."),
    ("user", "That is her scarf. I promised our mother I would bring her home before the harvest feast."),
    ("assistant", "Then speak to Captain Hale at the river gate; he owes me a favour and knows the boatmen."),
]


def _conversation_with_lines(n: int) -> int:
    external = f"memjob-{uuid.uuid4().hex[:10]}"
    with session_scope() as s:
        char_id = find_characters(session=s, slugs=["elara"])["elara"]
        row = {
            "external_id": external,
            "player_id": external,
            "player_name": "Rowan",
            "character_id": char_id,
        }
        conv = upsert_conversations(session=s, rows=[row], tenant="")[external][0]
        for seq in range(1, n + 1):
            role, text = STORY[(seq - 1) % len(STORY)]
            s.add(Message(conversation_id=conv, seq=seq, role=Role(role), content=text))
    return conv


def test_a_summary_job_on_the_engine_stores_one_summary_that_the_next_prompt_shows(monkeypatch) -> None:
    monkeypatch.setattr(settings, "memory_summary_threshold_tokens", 200)
    conv = _conversation_with_lines(settings.recent_history + 16)
    assert run_summary_job(conv, max_steps=16) >= 1  # a worker runs one step per message
    assert run_summary_job(conv) == 0  # nothing due any more: the range is not summarised again
    with session_scope() as s:
        stored = s.execute(
            select(Summary.level, Summary.first_seq, Summary.last_seq, Summary.text).where(
                Summary.conversation_id == conv
            )
        ).all()
    assert stored and all(text.strip() for *_, text in stored)
    assert max(last for _, _, last, _ in stored) <= 16  # beyond the recent window only
    assert len({(lvl, a, b) for lvl, a, b, _ in stored}) == len(stored)

    vec = embed(["Have you heard anything about my sister?"])[0]
    with session_scope() as s:
        (ctx,) = fetch_batch_context(
            session=s, queries=[ContextQuery(conv, None, None, vec)], recent_n=12, history_k=2, story_k=0
        )
        attach_memory(session=s, conversation_ids=[conv], vectors=[vec], contexts=[ctx])
    assert ctx.summaries
    with session_scope() as s:
        card = s.scalars(select(Character).where(Character.slug == "elara")).one()
        built = get_prompt_builder().build(
            PromptInput(card, "Rowan", "Have you heard anything about my sister?", ctx, 24, memory_tokens=512)
        )
    assert built.manifest["summary"] and built.manifest["sections"]["summary"] > 0
    assert ctx.summaries[-1].text.splitlines()[0][:40] in built.text


def test_fact_extraction_on_the_engine_answers_in_the_schema_and_keeps_facts_in_the_conversation() -> None:
    from prometheus_client import REGISTRY

    def tokens(kind: str) -> float:
        labels = {"model": settings.model, "kind": kind}
        return REGISTRY.get_sample_value("mlchat_tokens_total", labels) or 0.0

    conv = _conversation_with_lines(8)
    before = tokens("prompt"), tokens("completion")
    counts = run_extract_job(conv)
    assert counts["lines"] == 8 and counts["malformed"] == 0  # guided decoding kept it in the schema
    # review: the engine's work for memory counted as a batch's is
    assert tokens("prompt") - before[0] > 100 and tokens("completion") - before[1] > 0
    with session_scope() as s:
        assert extracted_through(session=s, conversation_id=conv) == 8
        facts = s.scalars(select(Fact).where(Fact.scope_ref == str(conv))).all()
    assert len(facts) == counts["added"] + counts["superseded"]
    assert all(f.scope.value == "conversation" and f.source.startswith("lines:") for f in facts)
    assert run_extract_job(conv) == {}  # nothing new to read
