"""Facts an NPC may know: written by the game or extracted from dialogue, scoped (who may know them),
superseded when contradicted (history kept), moved by gossip (recorded), and retrieved per turn by
relevance × recency × importance among the facts the turn's NPC may know."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import and_, case, delete, exists, func, literal, or_, select, text, true, update
from sqlalchemy.orm import Session

from db.models import Conversation, Fact, FactKind, FactMove, FactScope
from db.vector_space import SAME_SPACE_SQL
from db.vectors import VectorArray, send_vectors_binary


@dataclass(frozen=True)
class NewFact:
    """A fact to store; `embedding` is its text's unit vector."""

    tenant: str
    player_id: str
    kind: FactKind
    subject: str
    text: str
    source: str
    importance: float
    scope: FactScope
    scope_ref: str
    embedding: np.ndarray | None
    # Extracted: the conversation and the first and last line (seq) of the stretch it was read from.
    read_from: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class FactHit:
    """A fact retrieved for a turn, with the parts of its score."""

    id: int
    kind: str
    subject: str
    text: str
    source: str
    scope: str
    importance: float
    relevance: float
    recency: float
    # A game's fact written with no subject is stored under the player's id, which a prompt never
    # shows (`subject` is then ''): one about this conversation's player names them as it does, one
    # about another player (spread to the world, a story, or met) says it is someone else's.
    about_player: bool = False
    about_other_player: bool = False

    @property
    def score(self) -> float:
        return self.relevance * self.recency * self.importance


# The text a fact's vector embeds: "subject: text", or the text alone for a fact stored under the
# player's own id (a game's fact written with no subject: never the id). In SQL for a re-embed.
EMBEDDED_TEXT = case((Fact.subject == Fact.player_id, Fact.text), else_=Fact.subject + ": " + Fact.text)


def embedded_text(*, subject: str, text: str, player_id: str) -> str:
    """EMBEDDED_TEXT of a fact about to be stored (its subject and text as stored)."""
    return text if subject == player_id else f"{subject}: {text}"


def add_facts(*, session: Session, facts: Sequence[NewFact]) -> list[Fact]:
    """Insert the facts (flushed, so they have ids)."""
    rows = [
        Fact(
            tenant=f.tenant,
            player_id=f.player_id,
            kind=f.kind,
            subject=f.subject,
            text=f.text,
            source=f.source,
            importance=f.importance,
            scope=f.scope,
            scope_ref=f.scope_ref,
            embedding=None if f.embedding is None else np.asarray(f.embedding, dtype=np.float32),
            source_conversation_id=f.read_from[0] if f.read_from else None,
            source_first_seq=f.read_from[1] if f.read_from else None,
            source_last_seq=f.read_from[2] if f.read_from else None,
        )
        for f in facts
    ]
    session.add_all(rows)
    session.flush()
    return rows


def forget_read_facts(*, session: Session, conversation_id: int, seq: int) -> int | None:
    """A line's text changed: drop the facts read from the stretches of the conversation's lines
    that hold it or come after it (they told the old text, or were read after it), wherever gossip
    moved them; a fact one of them replaced stands again (superseded_by is set NULL by its foreign
    key). Returns the first line of those stretches, from which extraction must read again (None:
    no fact was read there). The caller takes the memory jobs back first (db/memory_jobs.py
    interrupt_jobs), so an extraction in flight stores nothing of the old text."""
    doomed = (  # locked in id order, as supersede and the re-embed lock facts: never a deadlock with them
        select(Fact.id)
        .where(Fact.source_conversation_id == conversation_id, Fact.source_last_seq >= seq)
        .order_by(Fact.id)
        .with_for_update()
    )
    firsts = session.scalars(
        delete(Fact).where(Fact.id.in_(doomed.scalar_subquery())).returning(Fact.source_first_seq)
    ).all()
    return min((first for first in firsts if first is not None), default=None)


def player_facts(
    *,
    session: Session,
    tenant: str,
    player_id: str,
    history: bool = False,
    after: int = 0,
    limit: int | None = None,
) -> list[Fact]:
    """A player's facts in this tenant, oldest first, from the one after id `after`, at most `limit`;
    superseded ones only with `history`."""
    query = select(Fact).where(Fact.tenant == tenant, Fact.player_id == player_id, Fact.id > after)
    if not history:
        query = query.where(Fact.superseded_by.is_(None))
    return list(session.scalars(query.order_by(Fact.id).limit(limit)))


def get_fact(*, session: Session, tenant: str, fact_id: int, lock: bool = False) -> Fact | None:
    """The fact if it belongs to this tenant (`lock`: its row locked until the transaction ends)."""
    # The tenant in the statement: a lock never waits on (or holds) another tenant's row.
    query = select(Fact).where(Fact.id == fact_id, Fact.tenant == tenant)
    if lock:
        query = query.with_for_update().execution_options(populate_existing=True)
    return session.scalars(query).one_or_none()


def supersede(
    *, session: Session, old_id: int, new_id: int, scope: FactScope | None = None, scope_ref: str = ""
) -> bool:
    """Mark a current fact as replaced by a newer one (kept as history); False if already replaced,
    or (with `scope`) moved out of that scope and ref since it was read: a fact of one conversation
    never replaces one gossip spread wider meanwhile."""
    where = [Fact.id == old_id, Fact.superseded_by.is_(None)]
    if scope is not None:
        where += [Fact.scope == scope, Fact.scope_ref == scope_ref]
    done = session.execute(update(Fact).where(*where).values(superseded_by=new_id))
    return bool(done.rowcount)  # type: ignore[attr-defined]


def move_fact(
    *, session: Session, fact: Fact, to_scope: FactScope, to_ref: str, told_by: str = ""
) -> FactMove | None:
    """Gossip: the fact now reaches a wider (or other) set of NPCs; the move is recorded. None (nothing
    changed) when the fact was superseded or moved since `fact` was read."""
    from_scope, from_ref = fact.scope, fact.scope_ref
    moved = session.execute(
        update(Fact)
        .where(
            Fact.id == fact.id,
            Fact.scope == from_scope,
            Fact.scope_ref == from_ref,
            Fact.superseded_by.is_(None),
        )
        .values(scope=to_scope, scope_ref=to_ref)
        .returning(Fact.id)
        .execution_options(synchronize_session=False)
    ).first()
    session.refresh(fact)
    if moved is None:
        return None
    move = FactMove(
        fact_id=fact.id,
        from_scope=from_scope.value,
        from_ref=from_ref,
        to_scope=to_scope.value,
        to_ref=to_ref,
        told_by=told_by,
    )
    session.add(move)
    session.flush()
    return move


def fact_moves(*, session: Session, fact_id: int) -> list[FactMove]:
    """How a fact travelled, oldest move first."""
    return list(session.scalars(select(FactMove).where(FactMove.fact_id == fact_id).order_by(FactMove.id)))


def conversation_owner(*, session: Session, tenant: str, external_id: str) -> Conversation | None:
    """The tenant's conversation by the game's id."""
    return session.scalar(
        select(Conversation).where(Conversation.tenant == tenant, Conversation.external_id == external_id)
    )


def conversation_names(*, session: Session, ids: Collection[int]) -> dict[int, str]:
    """The game's ids of these conversations (by the database's), for showing a conversation scope."""
    if not ids:
        return {}
    rows = session.execute(
        select(Conversation.id, Conversation.external_id).where(Conversation.id.in_(list(ids)))
    )
    return {int(conv_id): name for conv_id, name in rows.tuples()}


# A fact's relevance when no similarity could be computed (a process of another embedder): the same
# for every fact, so recency and importance rank them.
NO_SIMILARITY = 0.5


# Which facts an NPC may know in one conversation: its tenant's, not superseded, and in a scope that
# includes this conversation. Each arm of the OR is an index scan of migration 0021's partial indexes
# on current facts (a BitmapOr): a turn reads its own scopes' facts, not every fact of its tenant.
# The best `pool` by the whole score (relevance x recency x importance, as FactHit.score) are scored
# again in Python (with no relevance when this connection's embedder is not the stored vectors':
# db/vector_space.py). The pool was the `pool` closest by embedding (review): a fresh, important fact
# 65th by similarity never reached the scoring, behind 64 old lore lines of nearly its similarity.
_VISIBLE_FACTS_SQL = text(
    """
WITH q AS (
    SELECT idx, conversation_id, vec, SAME_SPACE AS same_space
    FROM unnest(CAST(:idx AS int[]), CAST(:conv AS bigint[]), CAST(:vec AS vector[]))
         AS t(idx, conversation_id, vec)
)
SELECT q.idx, f.id, f.kind, f.subject, f.text, f.source, f.scope, f.importance, f.age_s, f.distance,
       f.about_player, f.about_other_player, q.same_space
FROM q JOIN conversations c ON c.id = q.conversation_id
CROSS JOIN LATERAL (
    SELECT id, kind, text, source, scope, importance,
           CASE WHEN f.subject = f.player_id THEN '' ELSE f.subject END AS subject,
           (f.kind = 'player' AND f.subject = f.player_id AND f.player_id = c.player_id) AS about_player,
           (f.kind = 'player' AND f.subject = f.player_id AND f.player_id NOT IN ('', c.player_id))
               AS about_other_player,
           EXTRACT(EPOCH FROM (now() - created_at)) AS age_s,
           CASE WHEN q.same_space THEN embedding <=> q.vec END AS distance
    FROM facts f
    WHERE f.tenant = c.tenant AND f.superseded_by IS NULL AND (
        f.scope = 'world'
        OR (f.scope = 'conversation' AND f.scope_ref = CAST(c.id AS text))
        OR (f.scope = 'met' AND c.player_id <> '' AND f.player_id = c.player_id)
        OR (f.scope = 'story' AND f.scope_ref = c.story)
    )
    ORDER BY (CASE WHEN q.same_space THEN GREATEST(1 - (embedding <=> q.vec), 0) ELSE NO_SIMILARITY END)
             -- at most 1,000 half-lives: PostgreSQL's power() raises on an underflow, where Python's is 0
             * power(
                 0.5,
                 LEAST(GREATEST(CAST(EXTRACT(EPOCH FROM now() - created_at) AS float8), 0) / :half_life, 1000)
               )
             * importance DESC,
             id DESC
    LIMIT :pool
) f
""".replace("SAME_SPACE", SAME_SPACE_SQL).replace("NO_SIMILARITY", repr(NO_SIMILARITY))
)


def facts_for_turns(
    *,
    session: Session,
    conversation_ids: Sequence[int],
    vectors: Sequence[np.ndarray],
    k: int,
    half_life_s: float,
    pool: int = 64,
) -> list[list[FactHit]]:
    """Each turn's best `k` facts its NPC may know, best first, in one statement."""
    hits: list[list[FactHit]] = [[] for _ in conversation_ids]
    if not conversation_ids or k <= 0:
        return hits
    send_vectors_binary(session)
    rows = session.execute(
        _VISIBLE_FACTS_SQL,
        {
            "idx": list(range(len(conversation_ids))),
            "conv": list(conversation_ids),
            "vec": VectorArray(vectors),
            "pool": max(pool, k),
            "half_life": half_life_s,
        },
    )
    for idx, fid, kind, subject, body, source, scope, importance, age_s, distance, ours, others, same in rows:
        hits[idx].append(
            FactHit(
                id=fid,
                kind=kind,
                subject=subject,
                text=body,
                source=source,
                scope=scope,
                importance=float(importance),
                relevance=_relevance(distance, same_space=bool(same)),
                recency=math.pow(0.5, max(float(age_s), 0.0) / half_life_s),
                about_player=bool(ours),
                about_other_player=bool(others),
            )
        )
    # Ties (facts written together, the same importance) broken by id: a retry packs the same facts.
    return [sorted(h, key=lambda x: (-x.score, -x.id))[:k] for h in hits]


def _relevance(distance: float | None, *, same_space: bool) -> float:
    """The cosine similarity to the player's message, below zero as zero. Not (1 + cos) / 2: an
    unrelated line is about 0 to 0.15 of cosine with a sentence embedder, which that mapping made
    0.5 to 0.57, so relevance moved a score less than 2x while importance moves it 10x, and six
    important facts on other matters pushed out the one that answered the question. A fact with no
    vector where the others are compared (stored while a reembed's swap moved the space, until
    `mlchat reembed --missing`) is as unrelated, not NO_SIMILARITY: that would outrank the answers."""
    if distance is None:
        return 0.0 if same_space else NO_SIMILARITY
    return max(1.0 - float(distance), 0.0)


def _folded(subject: Any) -> Any:
    """A subject in lower case, trimmed, its runs of whitespace as one space: folded by the database
    on both sides of a comparison (its lower() and Python's differ past ASCII)."""
    return func.lower(func.btrim(func.regexp_replace(subject, r"\s+", " ", "g")))


def _subject_in(subjects: Sequence[str]) -> Any:
    """A fact's subject is one of these, in any case and spacing."""
    return or_(*(_folded(Fact.subject) == _folded(literal(subject)) for subject in subjects))


def known_elsewhere(
    *,
    session: Session,
    tenant: str,
    player_id: str,
    story: str | None,
    subjects: Sequence[str],
    vector: np.ndarray,
    similarity: float,
) -> bool:
    """Whether a conversation of this player (and story) already sees a current fact of the subject
    (any of `subjects`, its names) at least this similar in another scope than its own (the player's
    every NPC, the story, the world): extraction adds no copy of it, which would take a second of the
    prompt's few fact slots."""
    send_vectors_binary(session)
    scopes = [Fact.scope == FactScope.WORLD]
    if player_id:
        scopes.append(and_(Fact.scope == FactScope.MET, Fact.player_id == player_id))
    if story:
        scopes.append(and_(Fact.scope == FactScope.STORY, Fact.scope_ref == story))
    distance = Fact.embedding.cosine_distance(np.asarray(vector, dtype=np.float32))
    return bool(
        session.scalar(
            select(
                exists().where(
                    Fact.tenant == tenant,
                    or_(*scopes),
                    _subject_in(subjects),
                    Fact.superseded_by.is_(None),
                    Fact.embedding.is_not(None),
                    text(SAME_SPACE_SQL),
                    distance <= 1.0 - similarity,
                )
            )
        )
    )


def closest_fact(
    *,
    session: Session,
    tenant: str,
    scope: FactScope,
    scope_ref: str,
    subjects: Sequence[str],
    vector: np.ndarray,
    besides: Collection[int] = (),
) -> tuple[Fact, float] | None:
    """The current fact of this scope, scope ref and subject (any of `subjects`, in any case and
    spacing) closest to `vector`, with its cosine similarity (facts of another scope reach other NPCs
    or players: never compared); none of the facts `besides`."""
    send_vectors_binary(session)
    distance = Fact.embedding.cosine_distance(np.asarray(vector, dtype=np.float32))
    row = session.execute(
        select(Fact, distance)
        .where(
            Fact.id.not_in(list(besides)) if besides else true(),
            Fact.tenant == tenant,
            Fact.scope == scope,
            Fact.scope_ref == scope_ref,
            # One subject in any case or spacing ("Rowan", "rowan ", "ROWAN"): a model names it
            # differently from one answer to the next.
            _subject_in(subjects),
            Fact.superseded_by.is_(None),
            Fact.embedding.is_not(None),
            text(SAME_SPACE_SQL),
        )
        .order_by(distance)
        .limit(1)
    ).first()
    return None if row is None else (row[0], 1.0 - float(row[1]))
