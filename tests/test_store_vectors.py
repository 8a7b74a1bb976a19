"""The store writes message vectors in pgvector's binary format, and they read back exactly."""

import threading

import numpy as np
from sqlalchemy import Engine, event, select

from core.settings import settings
from db.models import Message
from db.session import session_scope
from db.turns import TurnOutcome, claim_turns, store_replies
from services.producer import enqueue_turns, get_turn
from tests.conftest import new_conversation


def test_reply_vectors_are_sent_binary_and_read_back_exactly(world) -> None:
    (turn_id,) = enqueue_turns([new_conversation() | {"message": "Binary, please."}], send=False)
    with session_scope() as session:
        claim = claim_turns(session=session, turn_ids=[turn_id], lease_s=60, max_attempts=3)
    view = get_turn(turn_id)
    assert view is not None
    rng = np.random.default_rng(5)
    user_vec, reply_vec = rng.standard_normal((2, settings.embedding_dim)).astype(np.float32)
    sent: list[object] = []

    mine = threading.get_ident()  # the session's worker stores replies too

    def statement(conn, cursor, sql, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if threading.get_ident() == mine and sql.lstrip().startswith("INSERT INTO messages"):
            rows = params if isinstance(params, list) else [params]
            sent.extend(v for row in rows for k, v in row.items() if k.startswith("embedding"))

    event.listen(Engine, "before_cursor_execute", statement)
    try:
        with session_scope() as session:
            stored = store_replies(
                session=session,
                token=claim.token,
                outcomes=[
                    TurnOutcome(
                        turn_id=turn_id,
                        conversation_id=view.conversation_id,
                        user_message=view.message,
                        user_embedding=user_vec,
                        reply="Done.",
                        reply_embedding=reply_vec,
                        prompt="p",
                        context={},
                        usage={},
                        timings={},
                        params=view.params,
                    )
                ],
            )
    finally:
        event.remove(Engine, "before_cursor_execute", statement)
    assert stored == [turn_id]
    assert len(sent) == 2 and all(isinstance(v, np.ndarray) for v in sent)  # not '[0.1,...]' text
    with session_scope() as session:
        back = session.execute(
            select(Message.content, Message.embedding).where(Message.turn_id == turn_id).order_by(Message.seq)
        ).all()
    assert [content for content, _ in back] == ["Binary, please.", "Done."]
    np.testing.assert_array_equal(np.asarray(back[0][1], dtype=np.float32), user_vec)
    np.testing.assert_array_equal(np.asarray(back[1][1], dtype=np.float32), reply_vec)


def test_retrieval_and_fact_ranking_send_their_query_vectors_as_one_binary_array(world, monkeypatch) -> None:
    import pgvector

    from db.facts import facts_for_turns
    from db.retrieval import ContextQuery, fetch_batch_context

    def no_text(self) -> str:  # type: ignore[no-untyped-def]
        raise AssertionError("a query vector was formatted as text")

    monkeypatch.setattr(pgvector.Vector, "to_text", no_text)
    vectors = np.random.default_rng(6).standard_normal((3, settings.embedding_dim)).astype(np.float32)
    with session_scope() as session:
        conv = session.scalar(select(Message.conversation_id).limit(1))
        contexts = fetch_batch_context(
            session=session,
            queries=[ContextQuery(conv, None, None, v) for v in vectors],
            recent_n=2,
            history_k=2,
            story_k=2,
        )
        facts_for_turns(
            session=session, conversation_ids=[conv] * 3, vectors=list(vectors), k=2, half_life_s=60
        )
    assert len(contexts) == 3 and all(c.recent for c in contexts)
