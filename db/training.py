"""Read-only queries for fine-tuning: a character's answered exchanges, as the worker built them."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, literal, or_, select
from sqlalchemy.orm import Session, aliased

from db.models import Character, Conversation, Turn, TurnReview, TurnReviewChange, TurnStatus
from db.session import given_or_own


@dataclass(frozen=True)
class Exchange:
    turn_id: uuid.UUID
    run_id: uuid.UUID | None
    prompt: str  # the prompt exactly as the engine was given it (chat template applied)
    reply: str
    quality: dict[str, Any]
    message: str = ""  # the player's line it answers
    label: str | None = None  # a writer's verdict on the desk: approved, rejected
    edited: bool = False  # the reply is a writer's text (its quality scores are of the model's)


def character_exchanges(
    *,
    session: Session | None,
    slug: str,
    tenant: str,
    model: str,
    run_id: uuid.UUID | None = None,
    chunk: int = 1000,
) -> Iterator[Exchange]:
    """The character's answered free-text turns in the tenant's conversations (its own voice, not the
    narrator's, not a structured reply) that `model` answered, oldest first, streamed. One tenant's:
    a prompt holds its players' history, memories and names, which an adapter trained on it would
    speak to others. One model's: each model's prompts are laid out in its own format, and an
    adapter is trained on one model (review: another model's turns taught it a format it never
    gets, under the manifest's format of the host that exported them)."""
    columns = (
        Turn.id,
        Turn.run_id,
        Turn.prompt,
        Turn.reply,
        Turn.quality,
        Turn.message,
        TurnReview.label,
        TurnReview.edited,
    )
    query = _of_character(
        select(*columns, Turn.number).outerjoin(TurnReview, TurnReview.turn_id == Turn.id), slug, tenant
    ).order_by(Turn.number)
    query = query.where(Turn.model == model)
    if run_id is not None:
        query = query.where(Turn.run_id == run_id)
    last = -1
    while True:  # `session` None: each chunk in a transaction of its own (given_or_own)
        with given_or_own(session) as reading:
            rows = reading.execute(query.where(Turn.number > last).limit(chunk)).all()
        if not rows:
            return
        for turn_id, run, prompt, reply, quality, message, label, edited, _ in rows:
            yield Exchange(turn_id, run, prompt, reply, quality or {}, message or "", label, bool(edited))
        last = rows[-1].number


def exchange_digest(prompt: str, reply: str) -> str:
    """An exchange's identity in a training set (duplicates and refused twins are dropped by it)."""
    return hashlib.sha256(f"{prompt}\x00{reply}".encode()).hexdigest()


def _digest_sql(prompt: Any, reply: Any) -> Any:
    """exchange_digest computed by the server: a refused exchange's prompt is never sent over."""
    joined = (
        func.convert_to(prompt, "UTF8").op("||")(literal(b"\x00")).op("||")(func.convert_to(reply, "UTF8"))
    )
    return func.encode(func.sha256(joined), "hex")


@dataclass(frozen=True)
class Refused:
    """exchange_digest of every exchange of a character a writer refused in a tenant's runs."""

    rejected: set[str]  # a rejected line's, as kept and as the model first wrote it
    replaced: set[str]  # the model's reply a writer replaced (an edit, a pick), not rejected


def writers_refused(*, session: Session, slug: str, tenant: str) -> Refused:
    """The exchanges of the character writers refused, in any of the tenant's runs: a twin of one
    (the same file run twice with the same seeds) is no better."""
    query = _of_character(
        select(
            _digest_sql(Turn.prompt, Turn.reply),
            _digest_sql(Turn.prompt, TurnReview.original_reply),
            TurnReview.label,
        ).join(TurnReview, TurnReview.turn_id == Turn.id),
        slug,
        tenant,
    ).where(or_(TurnReview.label == "rejected", TurnReview.original_reply != Turn.reply))
    refused = Refused(set(), set())
    for kept, original, label in session.execute(query).tuples():
        if label == "rejected":
            refused.rejected.update((kept, original))
        else:
            refused.replaced.add(original)
    # A text rejected once stays refused after the line moved on (an edit or a pick clears the label,
    # and a reply picked, rejected and replaced by another pick was nowhere else): unless it is the
    # line's reply now, approved (a writer changed their mind on that very text).
    cleared = aliased(TurnReviewChange)
    ever_rejected = _of_character(
        select(_digest_sql(Turn.prompt, TurnReviewChange.before))
        .select_from(Turn)
        .join(TurnReviewChange, TurnReviewChange.turn_id == Turn.id)
        .join(TurnReview, TurnReview.turn_id == Turn.id),
        slug,
        tenant,
    ).where(
        TurnReviewChange.action == "reject",
        TurnReviewChange.before.is_not(None),
        # NULL-safe: a line picked or edited back to the rejected text has no label (NOT of NULL dropped it)
        ~and_(TurnReview.label.is_not_distinct_from("approved"), Turn.reply == TurnReviewChange.before),
        # a rejection a writer cleared later (Clear the verdict on that text) was given by mistake
        ~exists().where(
            cleared.turn_id == TurnReviewChange.turn_id,
            cleared.action == "clear",
            cleared.before == TurnReviewChange.before,
            cleared.id > TurnReviewChange.id,
        ),
    )
    refused.rejected.update(session.scalars(ever_rejected))
    return refused


def _of_character(query: Any, slug: str, tenant: str) -> Any:
    """The character's answered free-text turns in the tenant's conversations."""
    return (
        query.join(Conversation, Conversation.id == Turn.conversation_id)
        # A scene step's (or group turn's) line is the member's who answered, not the lead's.
        .join(Character, Character.id == func.coalesce(Turn.character_id, Conversation.character_id))
        .where(
            Character.slug == slug,
            Conversation.tenant == tenant,
            Turn.status == TurnStatus.DONE,
            Turn.speaker == "character",
            Turn.prompt.is_not(None),
            Turn.reply.is_not(None),
            # A structured turn's stored reply is its spoken line (or its JSON) against a prompt that
            # asks for JSON: no example of the character's free voice. A data format's reply may be
            # JSON null, stored as SQL NULL: its format says what it was.
            Turn.structured.is_(None),
            func.coalesce(Turn.params["response_format"]["type"].astext, "text").in_(["text", "npc"]),
        )
    )
