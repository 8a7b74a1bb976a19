"""The stored vectors' embedder (db/vector_space.py): a process of another embedder stores no vector,
gets no similarity hit and no fact relevance, and a worker of another embedder does not start or
stops; `mlchat reembed`'s swap moves the database to its embedder. An embedder is its name and its
weights' fingerprint: one of the same name and other weights is refused the same way."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import numpy as np
import pytest
from sqlalchemy import create_engine, delete, event, select, text, update
from sqlalchemy.orm import Session

from core.services import database_url
from core.settings import DEFAULT_TENANT, settings
from db.facts import NewFact, add_facts, facts_for_turns
from db.history import append_lines
from db.models import FactKind, FactScope, Message, Role, VectorSpace
from db.reembed import lock_tables
from db.retrieval import ContextQuery, fetch_batch_context
from db.session import session_scope
from db.vector_space import (
    EmbedderMismatch,
    check,
    fill_or_check,
    move_to,
    record_or_check,
    recorded_embedder,
    same_weights,
)
from db.world import find_characters, upsert_conversations
from worker.embedder import embed, fingerprint

NOTHING_RECORDED_START = "no embedder is recorded for the stored vectors yet, so this process"
WEIGHTS_DIFFER = r"MLCHAT_EMBEDDER='[^']+' names the stored vectors' embedder but its weights differ"

pytestmark = [pytest.mark.usefixtures("world"), pytest.mark.before_session_worker]

LINES = ["The mill burned down.", "I saw a grey wolf by the river.", "Nobody saw.", "Bread?", "Aye."]


def _name(dbapi_connection, name: str, version: str) -> None:  # type: ignore[no-untyped-def]
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SELECT set_config('mlchat.embedder', %s, false)", (name,))
        cursor.execute("SELECT set_config('mlchat.space_version', %s, false)", (version,))
    dbapi_connection.commit()


@contextmanager
def as_embedder(name: str, version: str = "") -> Iterator[Session]:
    """A session on connections that name `name` as their embedder and `version` as the space
    version their weights were checked against (another process, in effect)."""
    engine = create_engine(database_url())
    event.listen(engine, "connect", lambda dbapi, _: _name(dbapi, name, version))
    try:
        with Session(engine) as session, session.begin():
            yield session
    finally:
        engine.dispose()


@pytest.fixture
def recorded() -> Iterator[str]:
    """The recorded embedder (this process's, with its fingerprint), put back after the test with
    its version, and the version this process names on its connections too (a test that deletes
    the record makes the next one a new version)."""
    from db import session as db_session

    mine, named = fingerprint(), db_session.adopted_space_version()
    with session_scope() as s:
        version = record_or_check(session=s, embedder=settings.embedder, fingerprint=mine)
    yield settings.embedder
    with session_scope() as s:
        move_to(session=s, embedder=settings.embedder, fingerprint=mine)
        s.execute(update(VectorSpace).values(version=version))
    db_session.adopt_space_version(named)


def _recorded_fingerprint() -> np.ndarray | None:
    with session_scope() as s:
        return s.scalar(select(VectorSpace.fingerprint))


def _conversation(session: Session, lines: list[str] = LINES) -> int:
    external = f"space-{uuid.uuid4().hex[:8]}"
    char_id = find_characters(session=session, slugs=["elara"])["elara"]
    row = {"external_id": external, "player_id": "p-space", "player_name": "Rowan", "character_id": char_id}
    conv = upsert_conversations(session=session, rows=[row])[external][0]
    if lines:
        append_lines(
            session=session,
            conversation_id=conv,
            lines=[(Role.USER, t) for t in lines],
            vectors=embed(lines),
        )
    return conv


def _embed_as(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """This process embeds as `name`: only the embedder module's settings change (the database
    session's connections are named by the shared ones); this file runs before the session's
    in-process worker starts, which embeds through this module too (tests/conftest.py)."""
    from worker import embedder

    monkeypatch.setattr(embedder, "_space_checked", False)
    monkeypatch.setattr(embedder, "settings", settings.model_copy(update={"embedder": name}))


def _conversation_of(session: Session, tenant: str) -> int:
    """An empty conversation of Elara's with Rowan in a tenant of its own (no other test's facts)."""
    external = f"{tenant}-{uuid.uuid4().hex[:8]}"
    elara = find_characters(session=session, slugs=["elara"])["elara"]
    row = {"external_id": external, "player_id": "p-space", "player_name": "Rowan", "character_id": elara}
    return upsert_conversations(session=session, rows=[row], tenant=tenant)[external][0]


def _fact(conv: int, said: str) -> NewFact:
    return NewFact(
        tenant=DEFAULT_TENANT,
        kind=FactKind.PLAYER,
        subject="Rowan",
        text=said,
        source="game",
        importance=0.5,
        scope=FactScope.CONVERSATION,
        scope_ref=str(conv),
        player_id="p-space",
        embedding=embed([f"Rowan: {said}"])[0],
    )


def _stored_vectors(conv: int) -> list[bool]:
    with session_scope() as s:
        rows = s.scalars(
            select(Message.embedding).where(Message.conversation_id == conv).order_by(Message.seq)
        )
        return [v is not None for v in rows]


def test_a_process_of_another_embedder_stores_its_lines_without_vectors(recorded: str) -> None:
    with as_embedder("another-model") as s:
        other = _conversation(s)
    with as_embedder(recorded) as s:
        same = _conversation(s)
    assert _stored_vectors(other) == [False] * len(LINES)  # the lines are kept, their vectors are not
    assert _stored_vectors(same) == [True] * len(LINES)


def _similar(session: Session, conv: int, question: str) -> tuple[list[str], list[str]]:
    context = fetch_batch_context(
        session=session,
        queries=[ContextQuery(conv, None, None, embed([question])[0])],
        recent_n=2,
        history_k=3,
        story_k=0,
    )[0]
    return [m.content for m in context.recent], [m.content for m in context.similar]


def test_retrieval_compares_no_vectors_of_another_embedder(recorded: str) -> None:
    with session_scope() as s:
        conv = _conversation(s)
    with as_embedder(recorded) as s:
        recent, similar = _similar(s, conv, "Did you see any wolves?")
    assert "I saw a grey wolf by the river." in similar
    with as_embedder("another-model") as s:
        recent_other, similar_other = _similar(s, conv, "Did you see any wolves?")
    assert similar_other == []  # nothing compared across models
    assert recent_other == recent  # the recent window is text: it stays


def test_retrieval_in_slices_compares_no_vectors_of_another_embedder(recorded: str) -> None:
    """Slices on connections of their own answer as the caller's connection: its embedder decides."""
    with session_scope() as s:
        conv = _conversation(s)
    queries = [ContextQuery(conv, None, None, v) for v in embed(["Did you see any wolves?"] * 3)]

    def fetch(name: str, version: str = "") -> tuple[list[list[str]], list[list[str]]]:
        with as_embedder(name, version) as s:
            contexts = fetch_batch_context(
                session=s, queries=queries, recent_n=2, history_k=3, story_k=0, connections=3
            )
        recent = [[m.content for m in c.recent] for c in contexts]
        return recent, [[m.content for m in c.similar] for c in contexts]

    recent, similar = fetch(recorded)
    assert all("I saw a grey wolf by the river." in lines for lines in similar)
    recent_other, similar_other = fetch("another-model")
    assert similar_other == [[], [], []]  # no slice compared across models
    assert recent_other == recent
    # a process whose weights the space has left (review: the slices named the embedder only)
    recent_left, similar_left = fetch(recorded, version="-1")
    assert similar_left == [[], [], []] and recent_left == recent


def test_facts_reach_a_process_of_another_embedder_without_relevance(recorded: str) -> None:
    with session_scope() as s:
        conv = _conversation(s)
        add_facts(session=s, facts=[_fact(conv, "Rowan fears wolves.")])
    question = embed(["What am I afraid of?"])[0]
    with as_embedder(recorded) as s:
        (mine,) = facts_for_turns(
            session=s, conversation_ids=[conv], vectors=[question], k=4, half_life_s=3600
        )
    with as_embedder("another-model") as s:
        (other,) = facts_for_turns(
            session=s, conversation_ids=[conv], vectors=[question], k=4, half_life_s=3600
        )
    # (other tests' world and met facts of the default tenant may be visible too)
    mine_fact = next(f for f in mine if f.text == "Rowan fears wolves.")
    other_fact = next(f for f in other if f.text == "Rowan fears wolves.")
    assert mine_fact.relevance > 0.2  # its cosine similarity to the question (0.28)
    assert other_fact.relevance == 0.5  # no similarity: the fact still reaches the prompt


def test_a_fact_without_a_vector_is_not_ranked_above_the_facts_that_answer(recorded: str) -> None:
    """Found in review: a fact stored without a vector (written while a reembed's swap moved the
    space) was given the relevance of "no similarity could be computed", 0.5, in a process that
    compares every other fact: it outranked the facts that answer the question."""
    from dataclasses import replace

    tenant = f"space-{uuid.uuid4().hex[:6]}"
    with session_scope() as s:
        conv = _conversation_of(s, tenant)
        answers = replace(_fact(conv, "Rowan fears wolves."), tenant=tenant)
        unembedded = replace(_fact(conv, "Rowan keeps a grey cat."), tenant=tenant, embedding=None)
        add_facts(session=s, facts=[answers, unembedded])
    question = embed(["What am I afraid of?"])[0]
    with as_embedder(recorded) as s:
        (hits,) = facts_for_turns(
            session=s, conversation_ids=[conv], vectors=[question], k=4, half_life_s=3600
        )
    assert [(f.text, f.relevance > 0.2) for f in hits] == [
        ("Rowan fears wolves.", True),
        ("Rowan keeps a grey cat.", False),
    ]
    assert hits[1].relevance == 0.0


def test_another_embedder_is_refused_naming_the_setting(recorded: str) -> None:
    with session_scope() as s, pytest.raises(EmbedderMismatch, match=r"MLCHAT_EMBEDDER='another-model' but"):
        record_or_check(session=s, embedder="another-model", fingerprint=fingerprint())
    with session_scope() as s:
        assert recorded_embedder(session=s) == recorded  # a refused check records nothing


def test_a_running_worker_stops_once_the_vectors_move_to_another_embedder(recorded: str, monkeypatch) -> None:
    from worker import lifecycle
    from worker.housekeeping import still_in_vector_space

    state = SimpleNamespace(should_stop=None)  # not Celery's own: this session's worker reads that one
    monkeypatch.setattr(lifecycle, "worker_state", state)
    assert still_in_vector_space() and state.should_stop is None
    # The move stays uncommitted: this session's worker (tests/conftest.py) checks the committed row.
    with session_scope() as s:
        move_to(session=s, embedder="another-model", fingerprint=fingerprint())
        assert not still_in_vector_space(lambda: nullcontext(s))
        s.rollback()
    assert state.should_stop == lifecycle.EXIT_EMBEDDER_MOVED


def test_a_worker_process_of_another_embedder_exits_2_with_one_line(recorded: str, tmp_path) -> None:
    import tests.worker_processes as workers

    log = tmp_path / "worker.log"
    proc = workers.start("space-check", log, MLCHAT_EMBEDDER="another-model")
    try:
        assert proc.wait(timeout=180) == 2
    finally:
        workers.kill(proc)
    lines = log.read_text().splitlines()
    critical = [line for line in lines if "MLCHAT_EMBEDDER='another-model'" in line]
    assert len(critical) == 1 and "CRITICAL" in critical[0]
    assert not any("Traceback" in line for line in lines)


def test_embedding_in_a_process_of_another_embedder_is_refused(recorded: str, monkeypatch) -> None:

    _embed_as(monkeypatch, "another-model")
    with pytest.raises(EmbedderMismatch, match="MLCHAT_EMBEDDER='another-model'"):
        embed(["a fact the API would store"])
    assert embed(["the re-embed's own"], any_space=True).shape == (1, 384)


def test_story_events_and_facts_of_another_embedder_are_stored_without_vectors(recorded: str) -> None:
    from db.world import upsert_story_events

    story = f"space-{uuid.uuid4().hex[:6]}"
    events = [{"story": story, "ordinal": 1, "scene": "gate", "time": 1, "text": "The gate fell."}]
    with as_embedder("another-model") as s:
        upsert_story_events(session=s, events=events, embeddings=embed(["The gate fell."]))
        (fact,) = add_facts(session=s, facts=[_fact(0, "The gate fell.")])
        fact_id = fact.id
    with session_scope() as s:
        stored = s.execute(text("SELECT embedding IS NULL FROM story_events WHERE story = :s"), {"s": story})
        assert stored.scalar_one() is True
        assert s.scalar(text("SELECT embedding IS NULL FROM facts WHERE id = :i"), {"i": fact_id}) is True


def test_a_fact_extraction_in_another_space_stores_nothing(recorded: str) -> None:
    from db.models import Conversation
    from memory.extract import ExtractedFact, store_extracted

    with session_scope() as s:
        conv = _conversation(s)
    found = ExtractedFact(kind="player", subject="Rowan", text="Rowan fears wolves.", importance=5)
    with as_embedder("another-model") as s:
        conversation = s.get(Conversation, conv)
        with pytest.raises(EmbedderMismatch):
            store_extracted(
                session=s, conversation=conversation, facts=[found], source="turn:x", lines=(1, 1)
            )
    with session_scope() as s:
        assert s.scalar(text("SELECT count(*) FROM facts WHERE scope_ref = :c"), {"c": str(conv)}) == 0


def test_a_fact_extraction_a_swap_commits_under_stores_nothing(recorded: str) -> None:
    """Found in review: the extraction checked the space before its reads, which a swap holding the
    tables lets through; its insert then waited for the swap, and the guard trigger stored the fact's
    vector NULL, the lines marked read (the fact never found by relevance, found again as new)."""
    from db.models import Conversation
    from memory.extract import ExtractedFact, store_extracted

    with session_scope() as s:
        conv = _conversation(s)
    found = ExtractedFact(kind="player", subject="Rowan", text="Rowan fears wolves.", importance=5)

    def extract() -> object:
        with session_scope() as s:
            conversation = s.get_one(Conversation, conv)
            return store_extracted(
                session=s, conversation=conversation, facts=[found], source="turn:x", lines=(1, 1)
            )

    (outcome,) = _during_a_swap(extract, "INSERT INTO facts%")
    assert type(outcome) is EmbedderMismatch, outcome  # sent again uncounted (tasks/memory.py)
    with session_scope() as s:
        assert s.scalar(text("SELECT count(*) FROM facts WHERE scope_ref = :c"), {"c": str(conv)}) == 0


def test_lines_copied_while_a_swap_commits_keep_their_vectors(recorded: str) -> None:
    """Found in review: the copy read the space's name, then waited at its insert for a swap holding
    the tables; the name it wrote as was the old space's, and every copied vector was stored NULL."""
    from db.history import copy_lines

    with session_scope() as s:
        source = _conversation(s)
        target = _conversation(s, [])

    def copy() -> object:
        with session_scope() as s:
            return copy_lines(session=s, source_id=source, target_id=target, count=len(LINES))

    assert _during_a_swap(copy, "%messages%") == [len(LINES)]
    assert _stored_vectors(target) == [True] * len(LINES)


def test_copied_lines_keep_their_vectors_whoever_copies_them(recorded: str) -> None:
    from db.history import copy_lines

    with session_scope() as s:
        source = _conversation(s)
        target = _conversation(s, [])
    with as_embedder("another-model") as s:
        copy_lines(session=s, source_id=source, target_id=target, count=len(LINES))
        assert s.scalar(text("SELECT current_setting('mlchat.embedder')")) == "another-model"
    assert _stored_vectors(target) == [True] * len(LINES)
    with session_scope() as s:
        again = _conversation(s, [])
    with as_embedder(recorded, version="-1") as s:  # weights the space has left (review)
        copy_lines(session=s, source_id=source, target_id=again, count=len(LINES))
        assert s.scalar(text("SELECT current_setting('mlchat.space_version')")) == "-1"
    assert _stored_vectors(again) == [True] * len(LINES)


def test_the_swap_moves_the_database_to_the_new_embedder_and_writes_as_it(recorded: str) -> None:
    from db.reembed import swap, write_next

    with session_scope() as s:
        conv = _conversation(s)
    with session_scope() as s:  # this process's connections name the old embedder; rolled back
        lines = s.execute(
            select(Message.id, Message.content).where(Message.conversation_id == conv).order_by(Message.seq)
        )
        write_next(session=s, table="messages", rows=lines.tuples().all(), vectors=embed(LINES), last_id=None)
        (next_weights,) = embed(["another model's probe vector"])
        swap(session=s, embedder="bundled-next", fingerprint=next_weights)
        assert recorded_embedder(session=s) == "bundled-next"
        recorded_weights = s.scalar(select(VectorSpace.fingerprint))
        assert np.allclose(recorded_weights, next_weights, atol=1e-6)  # the re-embedding process's
        stored = select(Message.embedding).where(Message.conversation_id == conv).order_by(Message.seq)
        assert all(v is not None for v in s.scalars(stored))  # not stored as NULL by the guard
        s.rollback()
    with session_scope() as s:
        assert recorded_embedder(session=s) == recorded


def test_the_api_answers_503_naming_the_setting_when_it_would_embed_in_another_space(
    recorded: str, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from tests.conftest import INGEST_KEY

    _embed_as(monkeypatch, "another-model")
    with TestClient(create_app()) as client:
        answer = client.post(
            "/v1/players/p-space-api/facts",
            headers={"X-API-Key": INGEST_KEY},
            json={"facts": [{"text": "Rowan fears wolves."}]},
        )
    assert answer.status_code == 503
    assert "MLCHAT_EMBEDDER='another-model'" in answer.json()["detail"]
    with session_scope() as s:  # nothing stored
        stored = text("SELECT count(*) FROM facts WHERE player_id = 'p-space-api'")
        assert s.scalar(stored) == 0


# --- the embedder's weights: its fingerprint ------------------------------------------------------


def test_a_worker_records_its_embedders_fingerprint_with_the_name_at_its_first_start(recorded: str) -> None:
    from worker.startup import check_and_warm_up

    with session_scope() as s:  # a database nothing has recorded yet
        s.execute(delete(VectorSpace))
    check_and_warm_up(load_engine=False)
    with session_scope() as s:
        row = s.execute(select(VectorSpace.embedder, VectorSpace.fingerprint)).one()
    assert row.embedder == recorded
    assert row.fingerprint is not None and np.allclose(row.fingerprint, fingerprint(), atol=1e-6)


def test_the_same_embedder_loaded_again_matches_also_within_float_noise(recorded: str) -> None:
    from sentence_transformers import SentenceTransformer

    from worker.embedder import _model_source, fingerprint_of

    again = fingerprint_of(SentenceTransformer(_model_source(settings), device="cpu"))
    noisy = fingerprint() + np.random.default_rng(7).normal(scale=1e-6, size=384).astype(np.float32)
    for mine in (again, noisy):
        with session_scope() as s:
            record_or_check(session=s, embedder=recorded, fingerprint=mine)  # no refusal
    assert same_weights(noisy, _recorded_fingerprint())  # type: ignore[arg-type]
    assert not same_weights(noisy[:383], noisy)  # another dimension is another model


def test_a_worker_of_the_same_name_and_other_weights_is_refused_at_start(
    recorded: str, other_weights, monkeypatch
) -> None:
    from worker import startup

    monkeypatch.setattr(startup, "get_embedder", lambda: other_weights)
    with pytest.raises(EmbedderMismatch, match=WEIGHTS_DIFFER) as refused:
        startup.check_and_warm_up(load_engine=False)
    assert "mlchat reembed" in str(refused.value)
    assert np.allclose(_recorded_fingerprint(), fingerprint(), atol=1e-6)  # nothing recorded


def _embed_with(monkeypatch: pytest.MonkeyPatch, model) -> None:  # type: ignore[no-untyped-def]
    """This process embeds with `model` under the same name (the embedder module only: this
    session's worker keeps the fingerprint it read at its start)."""
    from worker import embedder

    monkeypatch.setattr(embedder, "_space_checked", False)
    monkeypatch.setattr(embedder, "get_embedder", lambda: model)


def test_a_fresh_database_is_claimed_by_the_first_process_to_embed_and_holds_against_other_weights(
    scratch_db,
) -> None:
    from tests.test_migrations import _run

    _run(scratch_db, "upgrade", "head")
    mine, theirs = fingerprint(), embed(["another model's probe vector"])[0]
    with Session(bind=scratch_db) as s:  # the API embeds first: nothing stored, nothing recorded
        record_or_check(session=s, embedder=settings.embedder, fingerprint=mine, claim_stored=False)
        s.commit()
        assert np.allclose(s.scalar(select(VectorSpace.fingerprint)), mine, atol=1e-6)
    with Session(bind=scratch_db) as s, pytest.raises(EmbedderMismatch, match="weights differ"):
        record_or_check(session=s, embedder=settings.embedder, fingerprint=theirs)  # a worker starting later


def test_vectors_stored_before_any_record_are_claimed_by_a_worker_start_only(scratch_db) -> None:
    from tests.test_migrations import _run

    _run(scratch_db, "upgrade", "head")
    scratch_db.execute(
        text(
            "INSERT INTO story_events (story, ordinal, scene, time, text, embedding)"
            " VALUES ('old', 1, '', 0, 'The gate fell.', CAST(:v AS vector))"
        ),
        {"v": str(embed(["The gate fell."])[0].tolist())},
    )
    scratch_db.commit()
    mine = fingerprint()
    with Session(bind=scratch_db) as s, pytest.raises(EmbedderMismatch, match=NOTHING_RECORDED_START):
        record_or_check(session=s, embedder=settings.embedder, fingerprint=mine, claim_stored=False)
    assert scratch_db.execute(select(VectorSpace.embedder)).first() is None  # nothing recorded
    with Session(bind=scratch_db) as s:  # a worker's first start takes them as its own
        record_or_check(session=s, embedder=settings.embedder, fingerprint=mine, claim_stored=True)
        s.commit()
        assert s.scalar(select(VectorSpace.embedder)) == settings.embedder


def test_an_api_process_refuses_to_embed_beside_vectors_no_embedder_was_recorded_for(
    recorded: str, monkeypatch
) -> None:
    from worker import embedder

    with session_scope() as s:  # as after an upgrade from before 0020: vectors, and no record
        s.execute(delete(VectorSpace))
    monkeypatch.setattr(embedder, "_space_checked", False)
    with pytest.raises(EmbedderMismatch, match=NOTHING_RECORDED_START):
        embed(["a fact the API would store"])
    with session_scope() as s:
        assert recorded_embedder(session=s) is None  # claimed by nobody but a worker's start


def test_an_api_process_whose_embedder_does_not_fit_the_column_answers_503_in_one_line(
    recorded: str, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    import db.introspect
    from api.main import create_app
    from tests.conftest import INGEST_KEY
    from worker import embedder

    monkeypatch.setattr(embedder, "_space_checked", False)
    monkeypatch.setattr(db.introspect, "vector_column_dim", lambda **_: 768)  # a 768-d column
    with TestClient(create_app()) as client:
        answer = client.post(
            "/v1/players/p-dim-api/facts",
            headers={"X-API-Key": INGEST_KEY},
            json={"facts": [{"text": "Rowan fears wolves."}]},
        )
    assert answer.status_code == 503
    assert "makes 384-d vectors but the database stores vector(768)" in answer.json()["detail"]


def test_a_process_whose_first_check_meets_a_database_error_checks_again_at_its_next_embed(
    recorded: str, monkeypatch
) -> None:
    """And embeds nothing meanwhile (found in review: the first check's database error was logged
    and the embed went on unchecked, so a process of another model, one embed long, stored its
    vectors beside the recorded ones when the connection named no version)."""
    from sqlalchemy.exc import OperationalError

    import db.session
    from worker import embedder

    real = db.session.session_scope
    calls = []
    mine = threading.get_ident()  # the session's worker and housekeeper open sessions too

    def away_once():  # type: ignore[no-untyped-def]
        if threading.get_ident() == mine:
            calls.append(1)
            if len(calls) == 1:  # a restart, a statement timeout, a lock timeout
                raise OperationalError("SELECT embedder FROM vector_space", {}, Exception("server closed"))
        return real()

    monkeypatch.setattr(db.session, "session_scope", away_once)
    _embed_as(monkeypatch, "another-model")
    with pytest.raises(OperationalError):  # the check could not run: an outage, nothing embedded
        embed(["stored while the database was away"])
    assert embedder._space_checked is False
    with pytest.raises(EmbedderMismatch, match="MLCHAT_EMBEDDER='another-model' but"):
        embed(["the next embed"])


@pytest.mark.parametrize("shape", ["turn", "original"])
def test_a_serverless_event_in_another_space_is_refused_storing_nothing(
    recorded: str, monkeypatch, shape: str
) -> None:
    from tests.conftest import new_conversation
    from worker.serverless import handler

    conv = new_conversation()
    asked, said = f"Is the north road safe? {conv['conversation']}", f"Hello {conv['conversation']}"
    original = {
        "persona": {"name": f"Space {conv['conversation']}", "personality": "A ferryman."},
        "chat_history": [{"role": "user", "content": said}, {"role": "assistant", "content": "Aye."}],
        "message": asked,
    }
    _embed_as(monkeypatch, "another-model")
    answer = handler({"input": conv | {"message": asked} if shape == "turn" else original})
    assert set(answer) == {"error"} and "MLCHAT_EMBEDDER='another-model' but" in answer["error"]
    with session_scope() as s:  # nothing stored: no turn, and for the original shape no line or persona
        assert s.scalar(text("SELECT count(*) FROM turns WHERE message = :m"), {"m": asked}) == 0
        if shape == "turn":
            return
        assert s.scalar(text("SELECT count(*) FROM messages WHERE content = :m"), {"m": said}) == 0
        named = {"n": f"Space {conv['conversation']}"}
        assert s.scalar(text("SELECT count(*) FROM characters WHERE name = :n"), named) == 0


def test_the_api_and_the_cli_of_the_same_name_and_other_weights_refuse_storing_nothing(
    recorded: str, other_weights, monkeypatch, capsys
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from scripts.cli import main as cli
    from tests.conftest import INGEST_KEY

    _embed_with(monkeypatch, other_weights)
    with TestClient(create_app()) as client:
        answer = client.post(
            "/v1/players/p-weights-api/facts",
            headers={"X-API-Key": INGEST_KEY},
            json={"facts": [{"text": "Rowan fears wolves."}]},
        )
    assert answer.status_code == 503
    assert "weights differ" in answer.json()["detail"] and "mlchat reembed" in answer.json()["detail"]
    _embed_with(monkeypatch, other_weights)
    assert cli(["facts", "add", "p-weights-cli", "Rowan fears wolves."]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "weights differ" in line
    with session_scope() as s:  # nothing stored
        stored = text("SELECT count(*) FROM facts WHERE player_id IN ('p-weights-api', 'p-weights-cli')")
        assert s.scalar(stored) == 0


def test_a_running_worker_stops_once_the_vectors_move_to_other_weights_of_its_name(
    recorded: str, monkeypatch
) -> None:
    from worker import lifecycle
    from worker.housekeeping import still_in_vector_space

    state = SimpleNamespace(should_stop=None)
    monkeypatch.setattr(lifecycle, "worker_state", state)
    mine = fingerprint()
    assert still_in_vector_space(fingerprint=mine) and state.should_stop is None
    with session_scope() as s:  # uncommitted, as above: this session's worker checks the committed row
        (other,) = embed(["another model's probe vector"])
        move_to(session=s, embedder=recorded, fingerprint=other)
        assert not still_in_vector_space(lambda: nullcontext(s), fingerprint=mine)
        s.rollback()
    assert state.should_stop == lifecycle.EXIT_EMBEDDER_MOVED


def test_a_running_workers_check_compares_the_embedder_it_loaded_not_the_setting_read_again(
    recorded: str, monkeypatch
) -> None:
    """CI, stop 64: a test that set MLCHAT_EMBEDDER in this process for a moment stopped the session's
    worker, whose housekeeping read the setting again at its next tick and found the stored vectors
    "moved" away from a name it had never loaded."""
    from services import batches
    from worker import housekeeping, lifecycle
    from worker.housekeeping import Housekeeper

    state = SimpleNamespace(should_stop=None)
    monkeypatch.setattr(lifecycle, "worker_state", state)
    ticks: list[int] = []
    monkeypatch.setattr(
        batches, "housekeeping", lambda models: ticks.append(1) or {"expired": 0, "finalized": 0}
    )
    housekeeper = Housekeeper(interval_s=0.05)
    # The module's reference, not the shared settings: a connection opened meanwhile would keep
    # the name for the session (db/session.py names each at its connect).
    monkeypatch.setattr(
        housekeeping, "settings", settings.model_copy(update={"embedder": "/no/such/embedder"})
    )
    housekeeper.start()
    deadline = time.monotonic() + 10
    while len(ticks) < 3 and housekeeper.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    housekeeper.stop()
    housekeeper.join(timeout=10)
    assert len(ticks) >= 3 and state.should_stop is None  # it ticked on, its worker kept
    with session_scope() as s:  # uncommitted, as above: a move it loaded is still seen
        move_to(session=s, embedder="another-model", fingerprint=fingerprint())
        assert not housekeeper.in_vector_space(lambda: nullcontext(s))
        s.rollback()
    assert state.should_stop == lifecycle.EXIT_EMBEDDER_MOVED


def _waiting_for_a_lock(statement: str = "UPDATE vector_space%") -> bool:
    with session_scope() as s:
        waiting = text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :statement"
        )
        return bool(s.scalar(waiting, {"statement": statement}))


def _during_a_swap(write: Callable[[], object], statement: str) -> list[object]:
    """`write` run on another thread while a re-embed's swap holds the vector tables (to another
    embedder), waiting at `statement` until the swap commits; what it returned or raised."""
    outcome: list[object] = []

    def writing() -> None:
        try:
            outcome.append(write())
        except Exception as exc:  # noqa: BLE001 - the outcome is the assertion's
            outcome.append(exc)

    with session_scope() as swapping:
        lock_tables(session=swapping)
        move_to(session=swapping, embedder="another-model", fingerprint=embed(["another probe"])[0])
        other = threading.Thread(target=writing)
        other.start()
        deadline = time.monotonic() + 30
        while not _waiting_for_a_lock(statement) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcome == [], outcome  # it waits for the swap's lock
    other.join(timeout=30)
    return outcome


@pytest.mark.parametrize("second", ["same weights", "other weights"])
def test_a_fingerprint_missing_from_an_older_record_is_filled_once_by_racing_processes(
    recorded: str, second: str
) -> None:
    mine = fingerprint()
    rng = np.random.default_rng(3)
    theirs = (
        mine + rng.normal(scale=1e-4, size=mine.shape).astype(np.float32)  # another device's float noise
        if second == "same weights"
        else embed(["another model's probe vector"])[0]
    )
    with session_scope() as s:  # recorded before migration 0022: a name and no fingerprint
        s.execute(update(VectorSpace).values(fingerprint=None))
    outcome: list[object] = []

    def racing() -> None:
        try:
            with session_scope() as s:
                outcome.append(fill_or_check(session=s, embedder=recorded, fingerprint=theirs))
        except EmbedderMismatch as exc:
            outcome.append(exc)

    with session_scope() as first:
        assert fill_or_check(session=first, embedder=recorded, fingerprint=mine) is True
        other = threading.Thread(target=racing)
        other.start()
        deadline = time.monotonic() + 30
        while not _waiting_for_a_lock() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outcome == []  # the second waits for the first's row lock
    other.join(timeout=30)
    if second == "same weights":
        assert outcome == [False]  # it wrote nothing
    else:
        (refused,) = outcome
        assert isinstance(refused, EmbedderMismatch) and "weights differ" in str(refused)
    stored = _recorded_fingerprint()
    assert stored is not None and np.allclose(stored, mine, atol=1e-7)  # the first's, exactly


# --- the space's version: a process whose weights the space has left -----------------------------


def _lines_with_vectors(session: Session, conv: int) -> list[bool]:
    stored = select(Message.embedding).where(Message.conversation_id == conv).order_by(Message.seq)
    return [v is not None for v in session.scalars(stored)]


def test_a_process_whose_weights_a_reembed_left_stores_no_vector_from_the_swap_on(
    recorded: str, other_weights
) -> None:
    from worker.embedder import fingerprint_of

    with session_scope() as s:
        checked = check(session=s, embedder=recorded, fingerprint=fingerprint())
    assert checked is not None
    # A connection of a process that checked its weights against that version (db/session.py).
    with as_embedder(recorded) as s:
        s.execute(text("SELECT set_config('mlchat.space_version', :v, false)"), {"v": str(checked)})
        before = _conversation(s)
        move_to(session=s, embedder=recorded, fingerprint=fingerprint())  # the same weights again
        assert s.scalar(select(VectorSpace.version)) == checked
        move_to(session=s, embedder=recorded, fingerprint=fingerprint_of(other_weights))  # the swap
        assert s.scalar(select(VectorSpace.version)) not in (None, checked)
        s.execute(text("SELECT set_config('mlchat.embedder', :n, true)"), {"n": recorded})  # move_to's own
        after = _conversation(s)
        assert _lines_with_vectors(s, before) == [True] * len(LINES)
        assert _lines_with_vectors(s, after) == [False] * len(LINES)  # the name alone let them in
        s.rollback()


def test_a_process_names_the_version_it_checked_its_weights_against_on_its_connections(
    recorded: str, monkeypatch
) -> None:
    from db import session as db_session

    with session_scope() as s:
        version = check(session=s, embedder=recorded, fingerprint=fingerprint())
    monkeypatch.setattr(db_session, "_space_version", db_session._space_version)  # put back after
    engine = db_session._name_embedder(create_engine(database_url(), pool_size=1, max_overflow=0))
    named = text("SELECT coalesce(current_setting('mlchat.space_version', true), '')")
    try:
        db_session.adopt_space_version(None)
        with engine.connect() as conn:
            assert conn.scalar(named) == ""
        db_session.adopt_space_version(version)
        with engine.connect() as conn:  # the pooled connection, at its next checkout
            assert conn.scalar(named) == str(version)
            conn.rollback()
        with engine.connect() as conn:  # kept across a rollback: set for the session, committed
            assert conn.scalar(named) == str(version)
    finally:
        engine.dispose()


def test_a_worker_whose_weights_the_space_left_and_came_back_to_names_the_new_version(
    recorded: str, other_weights, monkeypatch
) -> None:
    from db import session as db_session
    from worker.embedder import fingerprint_of
    from worker.housekeeping import still_in_vector_space

    monkeypatch.setattr(db_session, "_space_version", db_session._space_version)  # put back after
    mine = fingerprint()
    with session_scope() as s:  # uncommitted: this session's worker checks the committed row
        was = check(session=s, embedder=recorded, fingerprint=mine)
        move_to(session=s, embedder=recorded, fingerprint=fingerprint_of(other_weights))
        move_to(session=s, embedder=recorded, fingerprint=mine)  # and back: a version of its own
        now = s.scalar(select(VectorSpace.version))
        assert now not in (None, was)
        assert still_in_vector_space(lambda: nullcontext(s), fingerprint=mine)
        assert db_session._space_version == now
        s.rollback()


def test_an_api_process_checks_its_weights_again_once_the_interval_has_passed(
    recorded: str, other_weights, monkeypatch
) -> None:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from db import session as db_session
    from tests.conftest import INGEST_KEY
    from worker import embedder

    monkeypatch.setattr(db_session, "_space_version", db_session._space_version)  # put back after
    # An API process that checked its weights a while ago; a re-embed to other weights of the same
    # name has run since (the record is at another version than the one this process checked its
    # weights against), and this process's weights are not the stored vectors' any more.
    with session_scope() as s:
        version = check(session=s, embedder=recorded, fingerprint=fingerprint())
    assert version is not None
    monkeypatch.setattr(embedder, "_space_checked", True)
    loads: list[int] = []
    monkeypatch.setattr(embedder, "get_embedder", lambda: loads.append(1) or other_weights)
    monkeypatch.setattr(embedder, "_check_again_at", time.monotonic() - 1)
    monkeypatch.setattr(db_session, "_space_version", version)
    embedder.check_space()  # the space it checked: one read, no probe of the weights
    assert loads == [] and embedder._check_again_at > time.monotonic()
    monkeypatch.setattr(embedder, "_check_again_at", time.monotonic() - 1)
    # The space moved since it checked (this process's connections keep naming their version).
    monkeypatch.setattr(db_session, "adopted_space_version", lambda: -version)
    with TestClient(create_app()) as client:
        late = client.post(
            "/v1/players/p-recheck/facts",
            headers={"X-API-Key": INGEST_KEY},
            json={"facts": [{"text": "Rowan fears wolves."}]},
        )
    assert late.status_code == 503
    assert "weights differ" in late.json()["detail"] and loads
    with session_scope() as s:
        stored = text("SELECT count(*) FROM facts WHERE player_id = 'p-recheck'")
        assert s.scalar(stored) == 0


def test_retrieval_of_a_process_whose_weights_a_reembed_left_compares_no_vectors(
    recorded: str, other_weights
) -> None:
    from worker.embedder import fingerprint_of

    with session_scope() as s:
        checked = check(session=s, embedder=recorded, fingerprint=fingerprint())
        conv = _conversation(s)
    assert checked is not None
    with as_embedder(recorded) as s:
        s.execute(text("SELECT set_config('mlchat.space_version', :v, false)"), {"v": str(checked)})
        before = _similar(s, conv, "Did anyone see a wolf?")
        move_to(session=s, embedder=recorded, fingerprint=fingerprint_of(other_weights))
        s.execute(text("SELECT set_config('mlchat.embedder', :n, true)"), {"n": recorded})  # move_to's own
        after = _similar(s, conv, "Did anyone see a wolf?")
        s.rollback()
    assert "I saw a grey wolf by the river." in before[1]
    assert after[1] == []  # nothing similar compared across the swap
    assert after[0] == before[0]  # the recent window stays


@pytest.mark.parametrize(
    ("embedder", "device"), [("/no/such/embedder", None), ("bundled", "cuda:99"), ("bundled", "gpu")]
)
def test_an_embedder_that_cannot_load_here_is_refused_in_one_line_naming_the_setting(
    monkeypatch, embedder: str, device: str | None
) -> None:
    # found in review: the loader's own error (torch's AssertionError for a device this build lacks)
    # reached the API as a 500 and the CLI as a traceback; refused as another embedder is, it is a
    # 503 and one line
    from worker.embedder import EmbedderUnavailable, load_embedder

    # Not this process's settings: the session's worker and pooled connections read those.
    cfg = settings.model_copy(update={"embedder": embedder, "embedder_device": device})
    with pytest.raises(EmbedderMismatch) as refused:
        load_embedder(cfg)
    assert isinstance(refused.value, EmbedderUnavailable)
    assert "MLCHAT_EMBEDDER" in str(refused.value) and "\n" not in str(refused.value)


def test_facts_tied_in_score_are_packed_newest_id_first_on_every_retry(recorded: str) -> None:
    """Found in review: facts written in one call share their time and often their importance; with
    no similarity to tell them apart (a process of another embedder) their order was the rows'
    physical order, which a rewrite of the table moves: a retry of a turn could pack other facts."""
    from dataclasses import replace

    tenant = f"ties-{uuid.uuid4().hex[:6]}"
    with session_scope() as s:
        conv = _conversation_of(s, tenant)
        said = [f"Rowan owns lantern number {i}." for i in range(6)]
        ids = [
            r.id for r in add_facts(session=s, facts=[replace(_fact(conv, t), tenant=tenant) for t in said])
        ]
    question = embed(["What do I own?"])[0]
    with as_embedder("another-model") as s:
        (hits,) = facts_for_turns(
            session=s, conversation_ids=[conv], vectors=[question], k=3, half_life_s=3600
        )
    assert [f.id for f in hits] == sorted(ids, reverse=True)[:3]
