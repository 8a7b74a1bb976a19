"""What the game tells NPCs: facts about a player (or the world) written over HTTP or the CLI,
listed with their history, and moved by gossip. Every fact is its tenant's; text is stored as given
and cleaned on its way into a prompt like every other field (worker/prompt/sanitize.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from db.erasure import hold_player
from db.facts import (
    NewFact,
    add_facts,
    conversation_names,
    conversation_owner,
    embedded_text,
    fact_moves,
    get_fact,
    move_fact,
    player_facts,
    supersede,
)
from db.models import Fact, FactKind, FactScope
from db.session import again_on_conflict, session_scope
from db.vector_space import refuse_if_moved
from db.write_keys import fingerprint, record_ids, stored_ids, take_key
from services.schemas import FilledText, Text, owner_fault

logger = logging.getLogger(__name__)

MAX_ID = 2**63 - 1  # a bigint key


class FactRefused(ValueError):
    """A fact the service will not store; `field` names the input at fault."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


class FactNotFound(LookupError):
    """No such fact of this tenant and player."""


class Where(BaseModel):
    """A scope and what it names: a conversation (the game's id) or a story (a location, a faction)."""

    model_config = ConfigDict(extra="forbid")

    scope: FactScope = FactScope.MET
    conversation: Text | None = Field(default=None, max_length=200)
    story: FilledText | None = Field(default=None, max_length=100)


class FactIn(Where):
    text: FilledText = Field(min_length=1, max_length=1000)
    kind: FactKind = FactKind.PLAYER
    subject: FilledText | None = Field(default=None, min_length=1, max_length=200)  # default: the player
    importance: float = Field(default=0.5, ge=0, le=1)
    supersedes: int | None = Field(default=None, ge=1, le=MAX_ID)  # a current fact this one replaces


class FactMoveIn(Where):
    told_by: Text = Field(default="", max_length=64)  # who spread it (a character slug)


class FactView(BaseModel):
    id: int
    player: str
    kind: str
    subject: str
    text: str
    source: str
    importance: float
    scope: str
    scope_ref: str
    superseded_by: int | None
    created_at: datetime


class MoveView(BaseModel):
    fact_id: int
    from_scope: str
    from_ref: str
    to_scope: str
    to_ref: str
    told_by: str
    created_at: datetime


def _views(session: Session, facts: Sequence[Fact]) -> list[FactView]:
    shown = _shown_refs(session, [(f.scope, f.scope_ref) for f in facts])
    return [_view(fact, shown) for fact in facts]


def _view(fact: Fact, shown: Callable[[Any, str], str]) -> FactView:
    return FactView(
        id=fact.id,
        player=fact.player_id,
        kind=fact.kind.value,
        subject=fact.subject,
        text=fact.text,
        source=fact.source,
        importance=fact.importance,
        scope=fact.scope.value,
        scope_ref=shown(fact.scope, fact.scope_ref),
        superseded_by=fact.superseded_by,
        created_at=fact.created_at,
    )


def _shown_refs(session: Session, refs: Sequence[tuple[Any, str]]) -> Callable[[Any, str], str]:
    """How a scope's ref is shown: a conversation by the game's id, the name the tenant knows it by.
    Stored is the database's serial, one sequence for every tenant: two readings of it told a tenant
    how many conversations every tenant had started in between (review). "" once it is erased."""
    conversation = FactScope.CONVERSATION.value

    def is_conversation(scope: Any) -> bool:
        return getattr(scope, "value", scope) == conversation

    names = conversation_names(
        session=session, ids={int(ref) for scope, ref in refs if is_conversation(scope) and ref.isdigit()}
    )
    return lambda scope, ref: (
        (names.get(int(ref), "") if ref.isdigit() else "") if is_conversation(scope) else ref
    )


def _scope_ref(session: Session, tenant: str, player: str, where: Where, prefix: str) -> str:
    """What the scope names, checked: a conversation must be this tenant's and this player's, and
    neither is named for a scope that does not read it (the fact would reach every NPC of the scope
    given, not the one named)."""
    for field, scope in (("conversation", FactScope.CONVERSATION), ("story", FactScope.STORY)):
        if getattr(where, field) and where.scope is not scope:
            raise FactRefused(
                f"{prefix}{field}", f"given, but scope is {where.scope.value!r} (set scope {scope.value!r})"
            )
    if where.scope is FactScope.CONVERSATION:
        if not where.conversation:
            raise FactRefused(f"{prefix}conversation", "required when scope is 'conversation'")
        found = conversation_owner(session=session, tenant=tenant, external_id=where.conversation)
        if found is None or found.player_id != player:
            raise FactRefused(
                f"{prefix}conversation", f"no conversation {where.conversation!r} of player {player!r}"
            )
        return str(found.id)
    if where.scope is FactScope.STORY:
        if not where.story:
            raise FactRefused(f"{prefix}story", "required when scope is 'story'")
        return where.story
    return ""


def _check_owner(tenant: str, player: str) -> None:
    """FactRefused naming the player or the tenant the API's path and keys would refuse: the CLI
    passes them as typed (before: an empty player stored, a long one refused by the database after
    the embedding, naming nothing)."""
    fault = owner_fault(tenant, player)
    if fault is not None:
        raise FactRefused(*fault)


def write_facts(tenant: str, player: str, facts: list[FactIn]) -> list[FactView]:
    """Store the facts (embedded), all or none; a fact naming `supersedes` replaces that one. A
    transaction PostgreSQL ends as a deadlock's victim is run again, at most CONFLICT_TRIES times in
    all (writes and fact extraction both supersede in id order; a deadlock with another statement
    stays possible)."""
    return write_facts_once(tenant, player, facts, None)[0]


def write_facts_once(
    tenant: str, player: str, facts: list[FactIn], idempotency_key: str | None
) -> tuple[list[FactView], bool]:
    """write_facts under an idempotency key: (the facts, whether they were stored by an earlier
    request under the key, and are returned as they stand now). KeyReused when that request was
    another."""
    from worker.embedder import embed

    _check_owner(tenant, player)
    digest = _request_hash(player, facts)
    if idempotency_key is not None:  # a retry needs no embedding
        with session_scope() as session:
            known = stored_ids(
                session=session, tenant=tenant, kind=FACTS_KEY, key=idempotency_key, request_hash=digest
            )
            if known is not None:
                return _facts_by_id(session, tenant, known), True
    vectors = embed(
        [embedded_text(subject=f.subject or player, text=f.text, player_id=player) for f in facts]
    )
    return again_on_conflict(
        lambda: _store_facts(tenant, player, facts, vectors, idempotency_key, digest),
        what=f"facts of player {player!r}",
    )


FACTS_KEY = "facts"


def _request_hash(player: str, facts: list[FactIn]) -> str:
    return fingerprint({"player": player, "facts": [f.model_dump(mode="json") for f in facts]})


def _facts_by_id(session: Session, tenant: str, ids: list[int]) -> list[FactView]:
    """The facts of these ids as they stand now, in that order."""
    found = [get_fact(session=session, tenant=tenant, fact_id=i) for i in ids]
    return _views(session, [f for f in found if f is not None])


def _store_facts(
    tenant: str, player: str, facts: list[FactIn], vectors: Any, key: str | None, digest: str
) -> tuple[list[FactView], bool]:
    with session_scope() as session:
        hold_player(session=session, tenant=tenant, player_id=player)  # an erasure of the player waits
        if key is not None:  # taken first: a second write under the key waits here for this one
            earlier = take_key(session=session, tenant=tenant, kind=FACTS_KEY, key=key, request_hash=digest)
            if earlier is not None:
                return _facts_by_id(session, tenant, earlier), True
        new = []
        for i, (fact, vector) in enumerate(zip(facts, vectors, strict=True)):
            prefix = f"facts[{i}]."
            ref = _scope_ref(session, tenant, player, fact, prefix)
            if fact.supersedes is not None:
                old = get_fact(session=session, tenant=tenant, fact_id=fact.supersedes)
                if old is None or old.player_id != player or old.superseded_by is not None:
                    raise FactRefused(
                        f"{prefix}supersedes", f"no current fact {fact.supersedes} of player {player!r}"
                    )
            new.append(
                NewFact(
                    tenant=tenant,
                    player_id=player,
                    kind=fact.kind,
                    subject=fact.subject or player,
                    text=fact.text,
                    source="game",
                    importance=fact.importance,
                    scope=fact.scope,
                    scope_ref=ref,
                    embedding=vector,
                )
            )
        rows = add_facts(session=session, facts=new)
        refuse_if_moved(session=session, what="the facts")
        # In the old facts' id order: two writes superseding the same facts in other orders would
        # each hold one and wait for the other (a deadlock, answered as a 500).
        replacing = sorted(
            (
                (fact.supersedes, i, row.id)
                for i, (fact, row) in enumerate(zip(facts, rows, strict=True))
                if fact.supersedes is not None
            )
        )
        for old_id, i, new_id in replacing:
            if not supersede(session=session, old_id=old_id, new_id=new_id):
                raise FactRefused(f"facts[{i}].supersedes", f"fact {old_id} was superseded meanwhile")
        session.flush()
        for row in rows:
            session.refresh(row)
        if key is not None:
            record_ids(session=session, tenant=tenant, kind=FACTS_KEY, key=key, ids=[r.id for r in rows])
        return _views(session, rows), False


def list_player_facts(
    tenant: str, player: str, *, history: bool = False, after: int = 0, limit: int | None = None
) -> list[FactView]:
    """The player's facts in this tenant (current ones, or all with `history`), oldest first, from the
    one after id `after`, at most `limit`. FactRefused for a player or tenant no key could name."""
    _check_owner(tenant, player)
    with session_scope() as session:
        found = player_facts(
            session=session, tenant=tenant, player_id=player, history=history, after=after, limit=limit
        )
        return _views(session, found)


MOVES_KEY = "fact_moves"


def gossip(
    tenant: str, player: str, fact_id: int, move: FactMoveIn, idempotency_key: str | None = None
) -> tuple[FactView, list[MoveView], bool]:
    """Move a fact to another scope (gossip), recorded; the fact, its moves so far, and whether an
    earlier request under `idempotency_key` made this move (nothing is moved again: a retry after
    another move must not take the fact back). A move to the scope the fact is in already moves and
    records nothing. KeyReused when the key was used for another move."""
    _check_owner(tenant, player)
    with session_scope() as session:
        earlier = None
        if idempotency_key is not None:  # taken first: a retry under the key waits for this one
            digest = fingerprint({"player": player, "fact_id": fact_id, "move": move.model_dump(mode="json")})
            earlier = take_key(
                session=session, tenant=tenant, kind=MOVES_KEY, key=idempotency_key, request_hash=digest
            )
        # Locked: a move to where the fact is already answers what it is, not what another move
        # committed meanwhile changed.
        fact = get_fact(session=session, tenant=tenant, fact_id=fact_id, lock=True)
        if fact is None or fact.player_id != player:
            raise FactNotFound(f"no fact {fact_id} of player {player!r}")
        if earlier is None:
            ref = _scope_ref(session, tenant, player, move, "")
            stale = FactRefused(
                "fact_id", f"fact {fact_id} is superseded (or moved meanwhile): move the current one"
            )
            if fact.superseded_by is not None:
                raise stale
            if (fact.scope, fact.scope_ref) != (move.scope, ref):  # there already: nothing to record
                told = move.told_by
                if (
                    move_fact(session=session, fact=fact, to_scope=move.scope, to_ref=ref, told_by=told)
                    is None
                ):
                    raise stale
            if idempotency_key is not None:
                record_ids(session=session, tenant=tenant, kind=MOVES_KEY, key=idempotency_key, ids=[fact_id])
        recorded = fact_moves(session=session, fact_id=fact_id)
        refs = [(m.from_scope, m.from_ref) for m in recorded] + [(m.to_scope, m.to_ref) for m in recorded]
        shown = _shown_refs(session, [*refs, (fact.scope, fact.scope_ref)])  # the fact's too: one query
        moves = [
            MoveView(
                fact_id=m.fact_id,
                from_scope=m.from_scope,
                from_ref=shown(m.from_scope, m.from_ref),
                to_scope=m.to_scope,
                to_ref=shown(m.to_scope, m.to_ref),
                told_by=m.told_by,
                created_at=m.created_at,
            )
            for m in recorded
        ]
        return _view(fact, shown), moves, earlier is not None
