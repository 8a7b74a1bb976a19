"""A player's erasure: `POST /v1/players/{player}:erase` deletes what the key's tenant holds about
the player (the game's account deletion, a data-protection request)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, needs
from services import erasure
from services.schemas import Text

router = APIRouter(prefix="/v1/players", tags=["players"])

Player = Annotated[Text, Path(min_length=1, max_length=200)]


class ErasedOut(BaseModel):
    player: str
    conversations: int = Field(description="the player's conversations deleted, with all below")
    turns: int = Field(description="their turns (prompts, replies, reviews, usage)")
    messages: int = Field(description="their lines, with their vectors")
    summaries: int
    facts: int = Field(description="facts about the player, or read from the player's lines")


@router.post("/{player:path}:erase", response_model=ErasedOut)
async def erase_player(player: Player, who: Annotated[Caller, Depends(needs("ingest"))]) -> ErasedOut:
    """Delete the player's conversations in this key's tenant (their turns, lines and vectors,
    summaries, memory jobs, scenes, reviews) and every fact about the player or read from those
    lines, in one transaction. A player the tenant holds nothing about answers zeros, so a retry is
    safe. 409, deleting nothing, while a turn of the player is queued or running (cancel it or wait)
    or a scene of a run is still open. Not reached: files already written (exports, batch output
    files, training sets), adapters trained on them, callbacks delivered; a finished turn's Redis
    stream expires on its own, at most 5 minutes after the turn's end."""
    try:
        erased = await run_in_threadpool(erasure.erase, who.tenant, player)
    except erasure.PlayerBusy as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    return ErasedOut(player=player, **vars(erased))
