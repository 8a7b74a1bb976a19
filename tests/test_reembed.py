"""`mlchat reembed`: every vector embedded again with the configured embedder, resumable after an
interruption, and never a mix: until the swap, retrieval sees only the old vectors."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import func, select

from db.facts import NewFact, add_facts
from db.history import append_lines
from db.models import FactKind, FactScope, Message, ReembedProgress, Role
from db.session import session_scope
from db.world import find_characters, upsert_conversations
from memory.reembed import reembed
from scripts.cli import main as cli
from worker.embedder import embed

pytestmark = pytest.mark.usefixtures("world")

LINES = ["The mill burned down.", "Who did it?", "Nobody saw.", "The miller's boy ran.", "Where to?"]


def _old_vectors(n: int) -> np.ndarray:
    """Unit vectors of 'another model' (random): nothing like what the embedder makes."""
    vectors = np.random.default_rng(1).normal(size=(n, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _conversation() -> int:
    external = f"reembed-{uuid.uuid4().hex[:8]}"
    with session_scope() as s:
        char_id = find_characters(session=s, slugs=["elara"])["elara"]
        row = {"external_id": external, "player_id": "", "player_name": "Rowan", "character_id": char_id}
        conv = upsert_conversations(session=s, rows=[row])[external][0]
        append_lines(
            session=s,
            conversation_id=conv,
            lines=[(Role.USER, t) for t in LINES],
            vectors=_old_vectors(len(LINES)),
        )
    return conv


def _vectors(conv: int) -> tuple[list[str], np.ndarray]:
    with session_scope() as s:
        rows = s.execute(
            select(Message.content, Message.embedding)
            .where(Message.conversation_id == conv)
            .order_by(Message.seq)
        ).all()
    return [r[0] for r in rows], np.array([r[1] for r in rows])


class Stop(Exception):
    pass


def _chunk() -> int:
    """Rows per chunk: an eighth of the messages, so the first chunk is full (a pass started over would
    end it at the same id) without a transaction per two rows of every message the session wrote."""
    with session_scope() as s:
        return max(2, s.scalar(select(func.count()).select_from(Message)) // 8)


def test_an_interrupted_reembed_changes_nothing_and_resumes_to_a_full_swap(capsys) -> None:
    conv = _conversation()
    _, before = _vectors(conv)
    seen: list[tuple[str, int]] = []
    chunk = _chunk()

    def stop_after_first(table: str, last_id: int) -> None:
        seen.append((table, last_id))
        raise Stop

    with pytest.raises(Stop):
        reembed(chunk=chunk, on_chunk=stop_after_first)
    _, during = _vectors(conv)
    # Compared at the stored precision (float4): a pooled connection may read the column through
    # pgvector's text loader (shortest decimal) or its binary one (the exact float32), and the two
    # differ past the seventh digit for the same stored value.
    assert np.array_equal(during.astype(np.float32), before.astype(np.float32))  # old vectors only
    with session_scope() as s:
        recorded = s.get(ReembedProgress, "messages")
        assert recorded is not None and recorded.last_id == seen[0][1]
        # a line written while the re-embed is paused: caught up before the swap
        append_lines(
            session=s, conversation_id=conv, lines=[(Role.USER, "To the river.")], vectors=_old_vectors(1)
        )

    assert cli(["reembed", "--chunk", str(chunk)]) == 0
    out = capsys.readouterr()
    assert "re-embedded with" in out.out
    first = next(line for line in out.err.splitlines() if line.startswith("messages: through id "))
    assert int(first.rsplit(" ", 1)[1]) > seen[0][1]  # resumed after the recorded chunk, not from the start
    texts, after = _vectors(conv)
    assert np.allclose(after, embed(texts), atol=1e-4)  # every line, the late one too
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ReembedProgress)) == 0
        assert (
            s.scalar(select(func.count()).select_from(Message).where(Message.embedding_next.is_not(None)))
            == 0
        )


def test_a_row_written_into_a_table_already_passed_is_caught_up_before_the_swap() -> None:
    conv = _conversation()
    (fact_vec,) = embed(["the mill"])
    with session_scope() as s:  # a fact, so the pass reaches the facts table after the messages
        add_facts(
            session=s,
            facts=[
                NewFact(
                    "",
                    "",
                    FactKind.WORLD,
                    "mill",
                    "The mill burned.",
                    "game",
                    0.5,
                    FactScope.WORLD,
                    "",
                    fact_vec,
                )
            ],
        )
    written: list[str] = []

    def write_a_line_after_the_messages(table: str, last_id: int) -> None:
        if table != "messages" and not written:  # the messages were passed: only catch-up sees it
            with session_scope() as s:
                append_lines(
                    session=s,
                    conversation_id=conv,
                    lines=[(Role.USER, "To the river.")],
                    vectors=_old_vectors(1),
                )
            written.append(table)

    reembed(chunk=_chunk(), on_chunk=write_a_line_after_the_messages)
    assert written  # the line was written while a later table was passed
    texts, after = _vectors(conv)
    assert texts[-1] == "To the river."
    assert np.allclose(after, embed(texts), atol=1e-4)  # the late line too, with the new embedder
