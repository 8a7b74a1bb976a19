"""A batch's NPC memory, fetched with its other context: each turn's summaries and the facts its
NPC may know."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy.orm import Session

from core.settings import settings
from db.facts import facts_for_turns
from db.retrieval import TurnContext
from db.summaries import summaries_for


def attach_memory(
    *,
    session: Session,
    conversation_ids: Sequence[int],
    vectors: Sequence[np.ndarray],
    contexts: Sequence[TurnContext],
    in_run: Sequence[bool] | None = None,
) -> None:
    """Fill each context's summaries and facts (two statements for the whole batch). A line of a
    batch run (`in_run`) gets none: a fact written since must not change a reproducible run's prompt."""
    if in_run is not None:
        keep = [i for i, run in enumerate(in_run) if not run]
        conversation_ids = [conversation_ids[i] for i in keep]
        vectors = [vectors[i] for i in keep]
        contexts = [contexts[i] for i in keep]
    if not conversation_ids:
        return
    summaries = summaries_for(session=session, conversation_ids=conversation_ids)
    facts = facts_for_turns(
        session=session,
        conversation_ids=conversation_ids,
        vectors=vectors,
        k=settings.memory_facts_k,
        half_life_s=settings.memory_fact_half_life_s,
    )
    for ctx, conversation_id, hits in zip(contexts, conversation_ids, facts, strict=True):
        ctx.summaries = summaries[conversation_id]
        ctx.facts = hits
