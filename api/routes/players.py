"""A player's erasure: `POST /v1/players/{player}:erase` deletes what the key's tenant holds about
the player (the game's account deletion, a data-protection request)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Depends, HTTPException, Path, status
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, json_body, needs
from services import erasure
from services.erasure import MAX_CONVERSATIONS
from services.schemas import Text

router = APIRouter(prefix="/v1/players", tags=["players"])

Player = Annotated[Text, Path(min_length=1, max_length=200)]


class ErasureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    conversations: list[Annotated[Text, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list,
        max_length=MAX_CONVERSATIONS,
        description="the game's conversation ids of the player's that record no player id (a live "
        "group, a run's line, one started without `player_id`): erased with the rest",
    )


class ErasedOut(BaseModel):
    player: str
    conversations: int = Field(description="conversations deleted, with all below them")
    turns: int = Field(description="their turns (prompts, replies, reviews, usage)")
    messages: int = Field(description="their lines, with their vectors")
    summaries: int
    facts: int = Field(description="facts about the player, or read from those lines")


@router.post("/{player:path}:erase", response_model=ErasedOut, dependencies=[Depends(json_body("ingest"))])
async def erase_player(
    player: Player,
    who: Annotated[Caller, Depends(needs("ingest"))],
    body: Annotated[ErasureIn | None, Body()] = None,
) -> ErasedOut:
    """Delete, in one transaction, the conversations this key's tenant recorded with the player's
    id and those named in `conversations` (their turns, lines and vectors, summaries, memory jobs,
    scenes, reviews), and every fact about the player or read from those lines. A player the tenant
    holds nothing about answers zeros, so a retry is safe. 409, deleting nothing, while a turn of
    the player is queued or running (cancel it or wait), a scene of a run is still open, or other
    writers held its rows throughout; 422 naming `conversations[i]` for one recorded as another
    player's. Not reached: files already written (exports, batch output files, training sets),
    adapters trained on them, callbacks delivered, copies in other players' stored prompts of a
    fact spread beyond the player; a finished turn's Redis stream expires on its own."""
    named = body.conversations if body is not None else []
    try:
        erased = await run_in_threadpool(erasure.erase, who.tenant, player, named)
    except (erasure.PlayerBusy, erasure.ErasureContended) as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except erasure.ErasureRefused as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"field": exc.field, "msg": exc.reason, "type": "value_error", "loc": ["body", exc.field]}],
        ) from exc
    return ErasedOut(player=player, **vars(erased))
