"""Imported chat history: lines appended to a conversation after its last, in one transaction."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy import BigInteger, func, insert, literal, select, text
from sqlalchemy.orm import Session

from db.models import Conversation, Message, Role


def append_lines(
    *, session: Session, conversation_id: int, lines: Sequence[tuple[Role, str]], vectors: np.ndarray
) -> tuple[int, int]:
    """Append the lines (embedded) after the conversation's last; the (first, last) seq stored."""
    # The lock a reply's store takes too (db/turns.py store_replies): it serialises messages.seq.
    lock_conversation(session=session, conversation_id=conversation_id)
    last = session.scalar(
        select(func.coalesce(func.max(Message.seq), 0)).where(Message.conversation_id == conversation_id)
    )
    start = int(last or 0) + 1
    session.execute(
        insert(Message),
        [
            {
                "conversation_id": conversation_id,
                "seq": start + i,
                "role": role,
                "content": content,
                "embedding": np.asarray(vec, dtype=np.float32),
            }
            for i, ((role, content), vec) in enumerate(zip(lines, vectors, strict=True))
        ],
    )
    return start, start + len(lines) - 1


def copy_lines(*, session: Session, source_id: int, target_id: int, count: int) -> int:
    """Copy a conversation's first `count` lines, with their vectors, into an empty one; how many
    were copied."""
    lock_conversation(session=session, conversation_id=target_id)
    # The insert's lock first: a re-embed's swap holding the tables commits before the space's name
    # is read below, so that name is the vectors' the copy reads (read before, it named the old space,
    # and the guard trigger stored every copied vector NULL).
    session.execute(text("LOCK TABLE messages IN ROW EXCLUSIVE MODE"))
    # The copies' vectors are the stored space's already: written as it, whatever this process is
    # (its embedder's name, and the space version it checked its weights against).
    mine, my_version = session.execute(
        text("SELECT current_setting('mlchat.embedder', true), current_setting('mlchat.space_version', true)")
    ).one()
    session.execute(
        text(
            "SELECT set_config('mlchat.embedder', coalesce((SELECT embedder FROM vector_space), ''), true),"
            " set_config('mlchat.space_version', '', true)"
        )
    )
    copied = select(
        literal(target_id, BigInteger), Message.seq, Message.role, Message.content, Message.embedding
    ).where(Message.conversation_id == source_id, Message.seq <= count)
    copied_rows = len(
        session.execute(
            insert(Message)
            .from_select(["conversation_id", "seq", "role", "content", "embedding"], copied)
            .returning(Message.seq)
        ).all()
    )  # (its rowcount read -1)
    session.execute(
        text(
            "SELECT set_config('mlchat.embedder', :mine, true), set_config('mlchat.space_version', :v, true)"
        ),
        {"mine": mine or "", "v": my_version or ""},
    )
    return copied_rows


def conversation_lines(*, session: Session, conversation_id: int) -> list[tuple[Role, str]]:
    """The conversation's lines, (role, content) in order."""
    rows = session.execute(
        select(Message.role, Message.content)
        .where(Message.conversation_id == conversation_id)
        .order_by(Message.seq)
    )
    return [(Role(role), content) for role, content in rows.tuples()]


def lock_conversation(*, session: Session, conversation_id: int) -> None:
    """Hold the conversation's row for this transaction, so its lines cannot be appended meanwhile."""
    session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id).with_for_update(key_share=True)
    )


def line_texts(*, session: Session, ids: Sequence[int]) -> dict[int, str]:
    """{id: content} of these lines."""
    rows = session.execute(select(Message.id, Message.content).where(Message.id.in_(list(ids))))
    return dict(rows.tuples().all())


def reply_embedding(*, session: Session, turn_id: uuid.UUID) -> list[float] | None:
    """The stored vector of the turn's reply line, if it has one."""
    vec = session.scalar(
        select(Message.embedding).where(Message.turn_id == turn_id, Message.role != Role.USER)
    )
    return None if vec is None else [float(x) for x in vec]
