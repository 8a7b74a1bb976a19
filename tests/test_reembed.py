"""`mlchat reembed`: every vector embedded again with the configured embedder, resumable after an
interruption, and never a mix: until the swap, retrieval sees only the old vectors. One re-embed at
a time. `mlchat reembed --missing`: only the NULL vectors, with the stored vectors' own embedder."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.orm import Session

import memory.reembed as memory_reembed
from core.settings import DEFAULT_TENANT, settings
from db.facts import NewFact, add_facts
from db.history import append_lines
from db.models import FactKind, FactScope, Message, ReembedProgress, Role, VectorSpace
from db.reembed import _LOCK_NAMESPACE, SOURCES, fill_missing, reembed_lock
from db.retrieval import ContextQuery, fetch_batch_context
from db.session import session_scope
from db.vector_space import EmbedderMismatch, record_or_check, recorded_embedder
from db.world import find_characters, upsert_conversations, upsert_story_events
from memory.reembed import ReembedBusy, ReembedLockLost, reembed, reembed_missing
from scripts.cli import main as cli
from tests.test_vector_space import as_embedder
from worker.embedder import embed, fingerprint

# Each case re-embeds every vector the session stored: they run first (conftest.py).
pytestmark = [pytest.mark.usefixtures("world"), pytest.mark.whole_database]

LINES = ["The mill burned down.", "Who did it?", "Nobody saw.", "The miller's boy ran.", "Where to?"]


def _old_vectors(n: int) -> np.ndarray:
    """Unit vectors of 'another model' (random): nothing like what the embedder makes."""
    vectors = np.random.default_rng(1).normal(size=(n, 384)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _conversation_in(s: Session, lines: list[str], vectors: np.ndarray) -> int:
    external = f"reembed-{uuid.uuid4().hex[:8]}"
    char_id = find_characters(session=s, slugs=["elara"])["elara"]
    row = {"external_id": external, "player_id": "", "player_name": "Rowan", "character_id": char_id}
    conv = upsert_conversations(session=s, rows=[row])[external][0]
    append_lines(session=s, conversation_id=conv, lines=[(Role.USER, t) for t in lines], vectors=vectors)
    return conv


def _conversation() -> int:
    with session_scope() as s:
        return _conversation_in(s, LINES, _old_vectors(len(LINES)))


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


def test_a_run_resumed_with_other_weights_of_the_same_name_starts_over(other_weights, monkeypatch) -> None:
    from worker.embedder import fingerprint_of

    _conversation()
    chunk = _chunk()
    with session_scope() as s:
        last_message = s.scalar(select(func.max(Message.id)))
    firsts: list[int] = []

    def stop_after_first(table: str, last_id: int) -> None:
        firsts.append(last_id)
        raise Stop

    def stop_after_the_messages(table: str, last_id: int) -> None:
        if table != "messages" or last_id >= last_message:
            raise Stop  # before any swap: the next vectors are left to look at

    with pytest.raises(Stop):  # this process's weights wrote the first chunk's next vectors
        reembed(chunk=chunk, on_chunk=stop_after_first)
    # The re-embed's own embedder only: the session's worker threads go on with this process's.
    monkeypatch.setattr(memory_reembed, "fingerprint", lambda: fingerprint_of(other_weights))
    monkeypatch.setattr(
        memory_reembed,
        "embed",
        lambda texts, any_space=False: np.asarray(
            other_weights.encode(texts, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32
        ),
    )
    try:
        with pytest.raises(Stop):
            reembed(chunk=chunk, on_chunk=stop_after_the_messages)
        with session_scope() as s:
            first_chunk = s.execute(
                select(Message.content, Message.embedding_next)
                .where(Message.id <= firsts[0])
                .order_by(Message.id)
            ).all()
            progress = s.get(ReembedProgress, "messages")
            assert progress is not None and progress.last_id >= last_message
        texts = [t for t, _ in first_chunk]
        theirs = other_weights.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        # none of the first run's next vectors is left
        assert np.allclose(np.array([v for _, v in first_chunk]), theirs, atol=1e-4)
    finally:
        with session_scope() as s:  # leave no next vectors of other weights for the next test's run
            s.execute(delete(ReembedProgress))
            for model, _ in SOURCES.values():
                s.execute(
                    model.__table__.update()
                    .where(model.embedding_next.is_not(None))
                    .values(embedding_next=None)
                )


def _event(story: str, said: str) -> None:
    with session_scope() as s:
        upsert_story_events(
            session=s,
            events=[{"story": story, "ordinal": 1, "scene": "gate", "time": 1, "text": said}],
            embeddings=embed([said]),
        )


def _event_vector(story: str) -> tuple[int, np.ndarray]:
    from db.models import StoryEvent

    with session_scope() as s:
        row = s.execute(select(StoryEvent.id, StoryEvent.embedding).where(StoryEvent.story == story)).one()
    return int(row.id), np.asarray(row.embedding)


NEW_TEXT = "The gate was rebuilt in stone."


def test_a_story_event_updated_after_its_next_vector_was_written_is_swapped_in_with_its_new_text() -> None:
    story = f"edit-after-{uuid.uuid4().hex[:6]}"
    _event(story, "The gate fell.")
    event_id, _ = _event_vector(story)
    edited: list[int] = []

    def edit_once_passed(table: str, last_id: int) -> None:
        if table == "story_events" and last_id >= event_id and not edited:
            _event(story, NEW_TEXT)  # the game updates the event: its next vector is of the old text
            edited.append(last_id)

    reembed(chunk=_chunk(), on_chunk=edit_once_passed)
    assert edited
    assert np.allclose(_event_vector(story)[1], embed([NEW_TEXT])[0], atol=1e-4)


def test_a_story_event_updated_while_its_chunk_is_embedded_keeps_no_next_vector_of_the_old_text(
    monkeypatch,
) -> None:
    story = f"edit-during-{uuid.uuid4().hex[:6]}"
    old = f"The gate fell ({story})."
    _event(story, old)
    real_embed = memory_reembed.embed

    def embed_while_the_game_edits(texts: list[str], any_space: bool = False) -> np.ndarray:
        if old in texts:  # read by the chunk, then changed before its vectors are written
            _event(story, NEW_TEXT)
        return real_embed(texts, any_space=any_space)

    monkeypatch.setattr(memory_reembed, "embed", embed_while_the_game_edits)
    reembed(chunk=_chunk())
    assert np.allclose(_event_vector(story)[1], embed([NEW_TEXT])[0], atol=1e-4)


def test_a_story_event_upserted_with_the_same_text_keeps_its_next_vector() -> None:
    from sqlalchemy import update

    from db.models import StoryEvent

    story = f"same-text-{uuid.uuid4().hex[:6]}"
    _event(story, "The gate fell.")
    marked = np.ones(384, np.float32) / np.sqrt(384)
    with session_scope() as s:
        s.execute(update(StoryEvent).where(StoryEvent.story == story).values(embedding_next=marked))
    _event(story, "The gate fell.")  # the game sends its story again, unchanged

    def next_vector() -> Any:
        with session_scope() as s:
            return s.scalar(select(StoryEvent.embedding_next).where(StoryEvent.story == story))

    assert np.allclose(next_vector(), marked)
    _event(story, NEW_TEXT)
    assert next_vector() is None


# --- one re-embed at a time -----------------------------------------------------------------------


def _digests(column: str) -> dict[tuple[str, int], str]:
    """md5 of each stored vector's bytes in `column` (embedding or embedding_next), by table and id."""
    found = {}
    with session_scope() as s:
        for table, (model, _) in SOURCES.items():
            vector = getattr(model, column)
            rows = s.execute(select(model.id, func.md5(func.vector_send(vector))).where(vector.is_not(None)))
            found.update({(table, int(i)): str(d) for i, d in rows})
    return found


def _reembed_state() -> tuple[Any, ...]:
    """Everything a re-embed writes: progress, next vectors, vectors, the recorded embedder."""
    with session_scope() as s:
        progress = sorted(
            s.execute(
                select(ReembedProgress.table_name, ReembedProgress.embedder, ReembedProgress.last_id)
            ).tuples()
        )
        space = s.execute(select(VectorSpace.embedder, VectorSpace.changed_at)).tuples().all()
    return progress, space, _digests("embedding_next"), _digests("embedding")


BUSY = "another mlchat reembed is running"


def test_a_second_reembed_is_refused_while_one_runs_and_changes_nothing(monkeypatch, capsys) -> None:
    conv = _conversation()
    chunk = _chunk()

    def stop(table: str, last_id: int) -> None:
        raise Stop

    with pytest.raises(Stop):  # a first run's progress and next vectors, as it leaves them mid-way
        reembed(chunk=chunk, on_chunk=stop)
    before = _reembed_state()
    assert before[0] and before[2]
    with reembed_lock() as held:  # the first run, running: it holds the lock through the same function
        assert held
        with monkeypatch.context() as m:  # a run of another embedder would discard the first's progress
            m.setattr(memory_reembed, "settings", settings.model_copy(update={"embedder": "another-model"}))
            with pytest.raises(ReembedBusy, match=f"^{BUSY}"):
                reembed(chunk=chunk, on_chunk=stop)
        with pytest.raises(ReembedBusy, match=f"^{BUSY}"):
            reembed_missing(chunk=chunk, on_chunk=stop)
        capsys.readouterr()
        # busy, not refused input (CLI review: a cron'd `--missing` retrying on 1 gave up on 2)
        assert cli(["reembed", "--chunk", str(chunk)]) == 1
        assert cli(["reembed", "--missing"]) == 1
        refused = capsys.readouterr()
        assert refused.out == ""
        lines = refused.err.splitlines()
        assert len(lines) == 2 and all(line.startswith(f"mlchat: {BUSY} ") for line in lines)
        now = _reembed_state()
        assert now[:3] == before[:3]  # no progress, next vector or recorded embedder changed
        assert {k: now[3][k] for k in before[3]} == before[3]  # nor a vector (new rows may come)
    reembed(chunk=chunk)  # released: the next run proceeds to the swap
    texts, after = _vectors(conv)
    assert np.allclose(after, embed(texts), atol=1e-4)


def _close_the_lock_connection() -> None:
    """What a restart, a timeout or a proxy does to the running re-embed's lock connection."""
    with session_scope() as s:
        ended = s.scalar(
            text(
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = CAST(:ns AS oid) AND objsubid = 2"
            ),
            {"ns": _LOCK_NAMESPACE},
        )
    assert ended  # the backend is gone (waited for, up to 10 s), and its session lock with it
    with reembed_lock() as free:
        assert free  # so another run could start now: this one must not go on


def test_a_run_whose_lock_connection_closes_stops_before_writing_more(capsys) -> None:
    _conversation()
    chunk = _chunk()
    chunks, at_loss = [], []

    def lose_the_lock(table: str, last_id: int) -> None:
        chunks.append(last_id)
        if len(chunks) == 1:
            _close_the_lock_connection()
            at_loss.append(_reembed_state())

    with pytest.raises(ReembedLockLost, match="lost its lock"):
        reembed(chunk=chunk, on_chunk=lose_the_lock)
    assert len(chunks) == 1  # nothing written after the lock was lost, and no swap
    assert _reembed_state() == at_loss[0]
    # carried since stop 68: the command said so with exit code 2, a refusal, for a database's failure
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_reembed, "lock_still_held", lambda **kw: False)
        assert cli(["reembed", "--chunk", str(chunk)]) == 1
    assert "lost its lock" in capsys.readouterr().err
    assert cli(["reembed", "--chunk", str(chunk)]) == 0  # run again: resumes and swaps
    assert "re-embedded with" in capsys.readouterr().out


def test_a_run_that_loses_its_lock_while_a_catch_up_chunk_is_embedded_writes_none_of_it() -> None:
    """Found in review: the catch-up checked its lock before it embedded a chunk, not before it wrote
    it: a run whose lock connection closed meanwhile (another run, of other weights, could start and
    pass those rows) wrote its vectors over theirs, and the swap mixed two models."""
    conv = _conversation()
    late: list[int] = []

    def write_a_line_after_the_messages(table: str, last_id: int) -> None:
        if table != "messages" and not late:  # the messages were passed: only the catch-up reads it
            with session_scope() as s:
                late.extend(
                    append_lines(
                        session=s,
                        conversation_id=conv,
                        lines=[(Role.USER, "Past the mill.")],
                        vectors=_old_vectors(1),
                    )
                )

    real_embed = memory_reembed.embed

    def losing_the_lock_while_the_late_line_is_embedded(texts, **kwargs):  # type: ignore[no-untyped-def]
        vectors = real_embed(texts, **kwargs)
        if "Past the mill." in texts:
            _close_the_lock_connection()
        return vectors

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory_reembed, "embed", losing_the_lock_while_the_late_line_is_embedded)
        with pytest.raises(ReembedLockLost, match="lost its lock"):
            reembed(chunk=_chunk(), on_chunk=write_a_line_after_the_messages)
    assert late, "the late line was written while a later table was passed"
    with session_scope() as s:
        kept = s.scalar(
            select(Message.embedding_next).where(Message.conversation_id == conv, Message.seq == late[0])
        )
    assert kept is None  # nothing written once the lock was lost
    reembed(chunk=_chunk())  # run again: resumes and swaps, the late line too
    texts, after = _vectors(conv)
    assert texts[-1] == "Past the mill." and np.allclose(after, embed(texts), atol=1e-4)


HOLD_THE_LOCK = """
import time
from db.reembed import reembed_lock
with reembed_lock() as got:
    print("held" if got else "busy", flush=True)
    time.sleep(300)
"""


def test_the_lock_of_a_reembed_that_was_killed_goes_with_its_process() -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(ReembedBusy):
            reembed_missing()
        holder.kill()  # SIGKILL: no unlock, no goodbye to the server
        holder.wait(timeout=30)
        deadline = time.monotonic() + 10  # the server ends the dead connection's backend at once
        while True:
            with reembed_lock() as free:
                if free or time.monotonic() > deadline:
                    break
            time.sleep(0.1)
        assert free
        assert set(reembed_missing()) == set(SOURCES)  # the next run goes ahead
    finally:
        holder.kill()
        holder.wait(timeout=30)


# --- only the missing vectors ---------------------------------------------------------------------

WOLF = "I saw a grey wolf by the river."
NULL_LINES = ["The mill burned down.", WOLF, "Nobody saw.", "Bread?", "Aye."]


@pytest.fixture
def recorded() -> Iterator[str]:
    """This process's embedder recorded as the stored vectors' (as a worker records it); put back."""
    with session_scope() as s:
        was = recorded_embedder(session=s)
        record_or_check(session=s, embedder=settings.embedder, fingerprint=fingerprint())
    yield settings.embedder
    with session_scope() as s:
        assert recorded_embedder(session=s) == settings.embedder
        if was is None:
            s.execute(delete(VectorSpace))


def _rows_of_another_embedder() -> tuple[int, str, int]:
    """A conversation's lines, a story event and a fact written by a connection of another
    embedder: stored, their vectors NULL (migration 0020's guard)."""
    story = f"missing-{uuid.uuid4().hex[:6]}"
    with as_embedder("another-model") as s:
        conv = _conversation_in(s, NULL_LINES, embed(NULL_LINES))
        upsert_story_events(
            session=s,
            events=[{"story": story, "ordinal": 1, "scene": "gate", "time": 1, "text": "The gate fell."}],
            embeddings=embed(["The gate fell."]),
        )
        (fact,) = add_facts(
            session=s,
            facts=[
                NewFact(
                    DEFAULT_TENANT,
                    "p-missing",
                    FactKind.PLAYER,
                    "Rowan",
                    "Rowan fears wolves.",
                    "game",
                    0.5,
                    FactScope.CONVERSATION,
                    str(conv),
                    embed(["Rowan: Rowan fears wolves."])[0],
                )
            ],
        )
        fact_id = fact.id
    return conv, story, fact_id


def _mine(conv: int, story: str, fact_id: int) -> dict[str, list[tuple[str, Any]]]:
    """(text, vector) of the test's rows, per table."""
    from db.models import Fact, StoryEvent

    with session_scope() as s:
        lines = (
            s.execute(
                select(Message.content, Message.embedding)
                .where(Message.conversation_id == conv)
                .order_by(Message.seq)
            )
            .tuples()
            .all()
        )
        events = (
            s.execute(select(StoryEvent.text, StoryEvent.embedding).where(StoryEvent.story == story))
            .tuples()
            .all()
        )
        facts = (
            s.execute(select(Fact.subject + ": " + Fact.text, Fact.embedding).where(Fact.id == fact_id))
            .tuples()
            .all()
        )
    return {"messages": list(lines), "story_events": list(events), "facts": list(facts)}


def _similar(conv: int, question: str) -> list[str]:
    with session_scope() as s:
        (context,) = fetch_batch_context(
            session=s,
            queries=[ContextQuery(conv, None, None, embed([question])[0])],
            recent_n=1,
            history_k=3,
            story_k=0,
        )
    return [m.content for m in context.similar]


def _null_ids() -> set[tuple[str, int]]:
    with session_scope() as s:
        return {
            (table, int(i))
            for table, (model, _) in SOURCES.items()
            for i in s.scalars(select(model.id).where(model.embedding.is_(None)))
        }


def test_a_missing_pass_fills_only_the_null_vectors_and_they_are_found_again(recorded: str) -> None:
    conv, story, fact_id = _rows_of_another_embedder()
    mine = _mine(conv, story, fact_id)
    assert all(v is None for rows in mine.values() for _, v in rows)
    assert WOLF not in _similar(conv, "Did you see any wolves?")  # a NULL vector is never found
    had_vectors = _digests("embedding")
    missing = _null_ids()

    def stop(table: str, last_id: int) -> None:
        raise Stop

    with pytest.raises(Stop):  # interrupted after one chunk: that chunk's rows are kept
        reembed_missing(chunk=2, on_chunk=stop)
    assert len(missing - _null_ids()) == 2
    filled = reembed_missing(chunk=2)  # resumes: the rows done are no longer NULL

    assert not missing & _null_ids()  # every NULL vector filled
    assert sum(filled.values()) >= len(missing) - 2
    now = _digests("embedding")
    assert {k: now[k] for k in had_vectors} == had_vectors  # the vectors already there: untouched
    for table, rows in _mine(conv, story, fact_id).items():
        texts = [t for t, _ in rows]
        assert np.allclose(np.array([v for _, v in rows]), embed(texts), atol=1e-4), table
    assert filled["story_events"] >= 1 and filled["facts"] >= 1
    assert WOLF in _similar(conv, "Did you see any wolves?")


def test_a_missing_pass_whose_lock_connection_closes_stops_before_writing_more(recorded: str) -> None:
    _rows_of_another_embedder()
    chunks, at_loss = [], []

    def lose_the_lock(table: str, last_id: int) -> None:
        chunks.append(last_id)
        if len(chunks) == 1:
            _close_the_lock_connection()
            at_loss.append(_null_ids())

    with pytest.raises(ReembedLockLost, match="lost its lock"):
        reembed_missing(chunk=2, on_chunk=lose_the_lock)
    assert len(chunks) == 1 and at_loss[0]  # NULL vectors were left to fill
    assert _null_ids() == at_loss[0]  # nothing filled after the lock was lost
    reembed_missing(chunk=2)  # run again: fills the rest
    assert not _null_ids() & at_loss[0]


def test_a_missing_pass_counts_only_the_vectors_it_stored(recorded: str) -> None:
    from db.models import Fact, StoryEvent

    conv, story, fact_id = _rows_of_another_embedder()
    with session_scope() as s:  # only the lines are used here: leave no NULL vector to later tests
        s.execute(delete(StoryEvent).where(StoryEvent.story == story))
        s.execute(delete(Fact).where(Fact.id == fact_id))
    with session_scope() as s:  # one of the NULL lines gets its vector from another writer first
        line = s.scalars(select(Message.id).where(Message.conversation_id == conv).order_by(Message.seq))
        first, *rest = line.all()
        s.execute(
            text("UPDATE messages SET embedding = CAST(:v AS vector) WHERE id = :i"),
            {"v": str(embed([NULL_LINES[0]])[0].tolist()), "i": first},
        )
    with session_scope() as s:
        ids = [first, *rest]
        assert fill_missing(session=s, table="messages", ids=ids, vectors=embed(NULL_LINES)) == len(rest)
        assert fill_missing(session=s, table="messages", ids=ids, vectors=embed(NULL_LINES)) == 0


def test_a_missing_pass_of_another_embedder_is_refused_and_writes_nothing(
    recorded: str, monkeypatch, capsys
) -> None:
    from worker import embedder

    conv, story, fact_id = _rows_of_another_embedder()
    missing = _null_ids()
    other = settings.model_copy(update={"embedder": "another-model"})  # this process's only: see
    monkeypatch.setattr(embedder, "_space_checked", False)  # tests/test_vector_space.py _embed_as
    monkeypatch.setattr(embedder, "settings", other)
    monkeypatch.setattr(memory_reembed, "settings", other)
    capsys.readouterr()
    assert cli(["reembed", "--missing", "--chunk", "2"]) == 2
    refused = capsys.readouterr()
    assert refused.out == ""
    assert refused.err.splitlines() == [
        f"mlchat: MLCHAT_EMBEDDER='another-model' but the stored vectors come from {recorded!r}: set "
        f"MLCHAT_EMBEDDER={recorded!r}, or move the database to 'another-model' with `mlchat reembed` "
        "run with it"
    ]
    assert _null_ids() == missing  # nothing written
    assert all(v is None for rows in _mine(conv, story, fact_id).values() for _, v in rows)
    with pytest.raises(EmbedderMismatch):
        reembed_missing()


def test_a_missing_pass_with_no_embedder_recorded_is_refused_and_writes_nothing(capsys) -> None:
    conv = _conversation()
    with session_scope() as s:
        s.execute(text("UPDATE messages SET embedding = NULL WHERE conversation_id = :c"), {"c": conv})
        was = s.execute(select(VectorSpace.embedder, VectorSpace.fingerprint, VectorSpace.version)).first()
        s.execute(delete(VectorSpace))  # as after the upgrade, before any worker started
    try:
        missing = _null_ids()
        capsys.readouterr()
        assert cli(["reembed", "--missing"]) == 2
        refused = capsys.readouterr().err.splitlines()
        assert len(refused) == 1 and "no embedder is recorded for the stored vectors yet" in refused[0]
        assert _null_ids() == missing  # its own NULL lines kept their NULL: nothing written
    finally:
        if was is not None:
            with session_scope() as s:
                # as it was, its version too: this session's processes name it on their connections
                s.execute(
                    insert(VectorSpace).values(
                        embedder=was.embedder, fingerprint=was.fingerprint, version=was.version
                    )
                )


def test_a_reembed_into_vectors_the_columns_cannot_hold_is_refused_in_one_line_writing_nothing(
    monkeypatch, capsys
) -> None:
    wide = np.ones(512, dtype=np.float32) / np.sqrt(512)  # an embedder of 512-d vectors
    monkeypatch.setattr(memory_reembed, "fingerprint", lambda: wide)
    monkeypatch.setattr(memory_reembed, "embed", lambda t, any_space=False: np.tile(wide, (len(t), 1)))
    capsys.readouterr()
    assert cli(["reembed"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "makes 512-d vectors but the database stores vector(384)" in line
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ReembedProgress)) == 0
        next_vectors = select(func.count()).select_from(Message).where(Message.embedding_next.is_not(None))
        assert s.scalar(next_vectors) == 0


def test_the_swaps_table_lock_lets_no_row_lock_in_to_deadlock_with_it() -> None:
    """Found in review: the swap locked the vector tables in SHARE ROW EXCLUSIVE mode, which lets a
    row lock in: gossip locks its fact (SELECT … FOR UPDATE), the swap's update of the facts then
    waited for that row while gossip's update of it waited for the table: a deadlock, and the
    re-embed failed at its last step. Now the swap waits for the row's holder to finish first."""
    from db.models import Fact
    from db.reembed import lock_tables
    from tests.lock_order import errors_beside

    debt = NewFact(
        "", "p-lock", FactKind.PLAYER, "p-lock", "Owes a debt.", "game", 0.5, FactScope.WORLD, "", None
    )
    with session_scope() as s:
        (fact,) = add_facts(session=s, facts=[debt])
        fact_id = fact.id
    row = {"id": fact_id}

    def the_swap() -> None:
        with session_scope() as s:
            lock_tables(session=s)
            s.execute(text("UPDATE facts SET importance = importance WHERE id = :id"), row)  # as swap's

    # Gossip: the fact locked, then moved.
    locked = errors_beside(
        the_swap,
        first=lambda s: s.execute(select(Fact.id).where(Fact.id == fact_id).with_for_update()),
        then=lambda s: s.execute(text("UPDATE facts SET scope_ref = scope_ref WHERE id = :id"), row),
    )
    assert locked == []
    with session_scope() as s:
        s.execute(delete(Fact).where(Fact.id == fact_id))


def test_writes_that_outpace_the_catch_up_stop_the_run_before_the_writers_lock(monkeypatch, capsys) -> None:
    """Found in review: the catch-up's passes had no end but their count: writes that kept pace with
    it fell through after 20 passes to the writers' lock with a backlog of any size, embedded on the
    CPU while every worker's store waited. It stops there instead, nothing swapped, and resumes."""
    _conversation()
    taken: list[str] = []
    monkeypatch.setattr(memory_reembed, "_catch_up", lambda session, table, chunk, holder: (chunk, chunk))
    monkeypatch.setattr(memory_reembed, "lock_tables", lambda *, session: taken.append("lock"))
    with pytest.raises(memory_reembed.ReembedOutpaced, match="faster than the re-embed catches up"):
        reembed(chunk=_chunk())
    assert taken == []
    assert cli(["reembed", "--chunk", str(_chunk())]) == 1  # one line, to be run again
    err = capsys.readouterr().err
    assert "run it again in a quieter hour" in err and "Traceback" not in err
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Message).where(Message.embedding_next.is_not(None)))
    monkeypatch.undo()  # a quiet hour: the run resumes and swaps
    assert reembed(chunk=_chunk())["messages"] >= 1


def test_a_backlog_of_many_chunks_with_no_writer_is_caught_up_not_taken_for_outpacing(monkeypatch) -> None:
    """Review of the fix above: it counted passes, and a pass embeds a chunk of each table, so a
    backlog over that many chunks (lines written while the long later tables were passed) stopped the
    run though nothing was being written. A backlog that shrinks is caught up to the end."""
    conv = _conversation()
    monkeypatch.setattr(memory_reembed, "CATCH_UP_PASSES", 1)
    chunk = _chunk()
    written: list[str] = []

    def many_lines_after_the_messages(table: str, last_id: int) -> None:
        if table != "messages" and not written:
            with session_scope() as s:
                lines = [(Role.USER, f"Late line {i}.") for i in range(2 * chunk + 1)]
                append_lines(session=s, conversation_id=conv, lines=lines, vectors=_old_vectors(len(lines)))
            written.append(table)

    swapped = reembed(chunk=chunk, on_chunk=many_lines_after_the_messages)
    assert written and swapped["messages"] >= 2 * chunk + 1
    texts, after = _vectors(conv)
    assert np.allclose(after, embed(texts), atol=1e-4)


def test_rows_arriving_just_before_the_writers_lock_are_caught_up_without_it(monkeypatch) -> None:
    """Found in review: once the writers' lock was held the rest was embedded whatever its size, so a
    history import (up to 100,000 lines) committing between the last unlocked pass and the lock was
    embedded on the CPU while every worker's store waited. More than a chunk of a table found under
    the lock rolls the swap back, nothing embedded there, to catch up without it again."""
    from db.models import StoryEvent

    _conversation()
    chunk = _chunk()
    story = f"lore-{uuid.uuid4().hex[:6]}"
    texts = [f"The {i}th gate of the old city fell." for i in range(chunk + 1)]
    real_lock, real_embed = memory_reembed.lock_tables, memory_reembed.embed
    real_catch_up = memory_reembed._catch_up_unlocked
    per_lock: list[list[int]] = []  # texts embedded while each lock was held, lock by lock
    locked = [False]

    def lock(*, session: Session) -> None:
        if not per_lock:  # just before the first lock: a line, and a lore import of more than a chunk
            with session_scope() as s:
                _conversation_in(s, ["One more line."], _old_vectors(1))
                rows = [
                    {"story": story, "ordinal": i, "scene": "gate", "time": i, "text": said}
                    for i, said in enumerate(texts, start=1)
                ]
                upsert_story_events(session=s, events=rows, embeddings=_old_vectors(len(texts)))
        real_lock(session=session)
        locked[0] = True
        per_lock.append([])

    def embedding(batch: list[str], **kwargs: Any) -> np.ndarray:
        if locked[0]:
            per_lock[-1].append(len(batch))
        return real_embed(batch, **kwargs)

    def unlocked(chunk: int, holder: int) -> None:
        locked[0] = False
        real_catch_up(chunk, holder)

    monkeypatch.setattr(memory_reembed, "lock_tables", lock)
    monkeypatch.setattr(memory_reembed, "embed", embedding)
    monkeypatch.setattr(memory_reembed, "_catch_up_unlocked", unlocked)
    reembed(chunk=chunk)
    # The first lock embedded nothing (not even the messages' rest, read before the story events'
    # overflow was found: review) and let go; the second only a rest under a chunk.
    assert len(per_lock) == 2 and per_lock[0] == [], per_lock
    assert sum(per_lock[1]) < chunk, per_lock
    monkeypatch.undo()
    with session_scope() as s:
        stored = s.execute(
            select(StoryEvent.text, StoryEvent.embedding)
            .where(StoryEvent.story == story)
            .order_by(StoryEvent.ordinal)
        ).all()
    assert [t for t, _ in stored] == texts
    assert np.allclose(np.array([v for _, v in stored]), embed(texts), atol=1e-4)  # the new model's


def test_rows_that_keep_arriving_before_the_writers_lock_stop_the_run_unswapped(monkeypatch) -> None:
    """The bound of the fix above: rows arriving before every lock stop the run, nothing swapped."""
    _conversation()
    chunk = _chunk()
    real_lock = memory_reembed.lock_tables
    monkeypatch.setattr(memory_reembed, "CATCH_UP_PASSES", 2)

    def lock(*, session: Session) -> None:
        with session_scope() as s:
            _conversation_in(
                s, [f"Line {uuid.uuid4().hex}" for _ in range(chunk + 1)], _old_vectors(chunk + 1)
            )
        real_lock(session=session)

    monkeypatch.setattr(memory_reembed, "lock_tables", lock)
    with pytest.raises(memory_reembed.ReembedOutpaced, match="kept arriving"):
        reembed(chunk=chunk)
    with session_scope() as s:  # nothing swapped: the next vectors wait for the run to resume
        assert s.scalar(select(func.count()).select_from(Message).where(Message.embedding_next.is_not(None)))
    monkeypatch.undo()  # a quiet hour: the run resumes and swaps
    assert reembed(chunk=chunk)["messages"] >= 1
