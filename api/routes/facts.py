"""Facts about a player that NPCs may know: write, list (with history), gossip. Each key sees and
writes only its own tenant's facts."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Response, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, json_body, needs
from api.paging import Page, page
from core.paging import cut
from services import facts
from services.facts import MAX_ID, FactIn, FactMoveIn, FactNotFound, FactRefused, FactView, MoveView
from services.schemas import HeaderText, Text

router = APIRouter(prefix="/v1/players", tags=["facts"])

Player = Annotated[Text, Path(min_length=1, max_length=200)]
FactId = Annotated[int, Path(ge=1, le=MAX_ID)]


class FactsIn(BaseModel):
    facts: list[FactIn] = Field(min_length=1, max_length=100)


class FactsOut(BaseModel):
    facts: list[FactView]


class FactsPage(FactsOut):
    next_after: int = Field(description="the cursor past this page's last fact: `after` for the next page")
    more: bool = Field(description="whether facts are waiting past this page")


class Gossiped(BaseModel):
    fact: FactView
    moves: list[MoveView]
    replayed: bool = Field(False, description="an earlier request under the Idempotency-Key made this move")


def _refused(exc: FactRefused) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        [{"field": exc.field, "msg": exc.reason, "type": "value_error", "loc": ["body", exc.field]}],
    )


@router.post(
    "/{player:path}/facts",
    status_code=201,
    response_model=FactsOut,
    dependencies=[Depends(json_body("ingest"))],
)
async def post_facts(
    player: Player,
    body: FactsIn,
    response: Response,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> FactsOut:
    """Store facts about the player (all or none), embedded on write; 422 names the field at fault.
    `Idempotency-Key` makes a retry safe: it answers 200 with the facts the first request stored, as
    they stand now (409 when the key was used for other facts)."""
    try:
        stored, replayed = await run_in_threadpool(
            facts.write_facts_once, who.tenant, player, body.facts, idempotency_key
        )
    except FactRefused as exc:
        raise _refused(exc) from exc
    if replayed:
        response.status_code = status.HTTP_200_OK
    return FactsOut(facts=stored)


@router.get("/{player:path}/facts", response_model=FactsPage)
def get_facts(
    player: Player,
    who: Annotated[Caller, Depends(needs("ingest"))],
    wanted: Annotated[Page, Depends(page)],
    history: bool = False,
) -> FactsPage:
    """The player's current facts (with `history=true`, the superseded ones too), oldest first: those
    after fact id `after`, at most `limit`."""
    try:  # its checks are the path's and the key's: one drifting apart is a 422, not a 500
        found = facts.list_player_facts(
            who.tenant, player, history=history, after=wanted.after, limit=wanted.limit + 1
        )
    except FactRefused as exc:
        raise _refused(exc) from None
    shown = cut(found, after=wanted.after, limit=wanted.limit, cursor=lambda fact: fact.id)
    return FactsPage(facts=shown.items, next_after=shown.next_after, more=shown.more)


@router.post(
    "/{player:path}/facts/{fact_id}:move",
    response_model=Gossiped,
    dependencies=[Depends(json_body("ingest"))],
)
def move_fact(
    player: Player,
    fact_id: FactId,
    body: FactMoveIn,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> Gossiped:
    """Gossip: the fact reaches another scope's NPCs from now on; the move is recorded (a move to the
    scope it is in records nothing). `Idempotency-Key` makes a retry safe: it moves nothing again and
    answers with the fact as it stands, `replayed` (409 when the key was used for another move)."""
    try:
        fact, moves, replayed = facts.gossip(who.tenant, player, fact_id, body, idempotency_key)
    except FactNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except FactRefused as exc:
        raise _refused(exc) from exc
    return Gossiped(fact=fact, moves=moves, replayed=replayed)
