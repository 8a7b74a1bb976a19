"""The store writes message vectors in pgvector's binary format, and they read back exactly."""

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

    def statement(conn, cursor, sql, params, context, executemany) -> None:  # type: ignore[no-untyped-def]
        if sql.lstrip().startswith("INSERT INTO messages"):
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
