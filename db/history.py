"""Imported chat history: lines appended to a conversation after its last, in one transaction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from db.models import Conversation, Message, Role


def append_lines(
    *, session: Session, conversation_id: int, lines: Sequence[tuple[Role, str]], vectors: np.ndarray
) -> tuple[int, int]:
    """Append the lines (embedded) after the conversation's last; the (first, last) seq stored."""
    # The lock a reply's store takes too (db/turns.py store_replies): it serialises messages.seq.
    session.execute(
        select(Conversation.id).where(Conversation.id == conversation_id).with_for_update(key_share=True)
    )
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
