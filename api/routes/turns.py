"""Turns: enqueue one or a batch, read, read the manifest, cancel."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, json_body, needs
from api.off_loop import documented, validated
from api.sse import shutting_down
from core.settings import settings
from services import producer
from services.producer import TurnView
from services.schemas import MAX_TURNS_PER_REQUEST, HeaderText, TurnRequest, check_idempotency_key
from services.turn_wait import await_finished
from structured.spec import build_budget

router = APIRouter(prefix="/v1/turns", tags=["turns"])


class TurnAccepted(BaseModel):
    id: uuid.UUID
    status: str  # the turn's real status: a replay of an answered turn says "done"
    created: bool  # False for a replay of an idempotency key


class BatchRequest(BaseModel):
    turns: list[TurnRequest] = Field(min_length=1, max_length=MAX_TURNS_PER_REQUEST)


class BatchAccepted(BaseModel):
    ids: list[uuid.UUID]
    turns: list[TurnAccepted]


class Cancelled(BaseModel):
    id: uuid.UUID
    cancelled: bool
    status: str


def _enqueue(requests: list[TurnRequest], who: Caller) -> list[TurnAccepted]:
    stored = producer.submit_turns(requests, api_key=who.key_id, tenant=who.tenant)
    return [TurnAccepted(id=t.id, status=t.status.value, created=t.created) for t in stored]


def visible_turn(turn_id: uuid.UUID, who: Caller) -> TurnView:
    """The turn as this caller may see it: every turn for admin, its tenant's turns (without the
    prompt and its manifest) for an ingest key, as idempotency keys are the tenant's; 404 for
    anything else, so ids reveal nothing."""
    view = producer.get_turn(turn_id, with_prompt=who.admin)
    if view is None or not (who.admin or view.tenant == who.tenant):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no turn {turn_id}")
    return view if who.admin else view.as_its_tenant_sees()


@router.post(
    "",
    status_code=202,
    response_model=TurnAccepted,
    dependencies=[Depends(json_body("ingest"))],
    openapi_extra=documented(TurnRequest),
)
def post_turn(
    body: Annotated[Any, Body()],
    response: Response,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> TurnAccepted:
    """Queue one turn (202); `Idempotency-Key` (header or body field) makes retries safe: a replay
    answers 200 with the turn as it stands."""
    turn = validated(TurnRequest, body)  # in this thread: a format's grammar may take seconds to build
    if idempotency_key and turn.idempotency_key and idempotency_key != turn.idempotency_key:
        # Two keys for one request: the retry that sends only one of them must not be a new turn.
        loc = ("header", "idempotency-key")
        msg = "differs from the body's idempotency_key; send one key, or the same in both"
        raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])
    if idempotency_key and not turn.idempotency_key:
        try:  # model_copy runs no validator: the header is checked as the body field is
            check_idempotency_key(idempotency_key)
        except ValueError as exc:
            loc = ("header", "idempotency-key")
            raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": str(exc)}]) from None
        turn = turn.model_copy(update={"idempotency_key": idempotency_key})
    (accepted,) = _enqueue([turn], who)
    if not accepted.created:
        response.status_code = status.HTTP_200_OK
    return accepted


@router.post(
    ":batch",
    status_code=202,
    response_model=BatchAccepted,
    dependencies=[Depends(json_body("ingest"))],
    openapi_extra=documented(BatchRequest),
)
def post_batch(
    body: Annotated[Any, Body()],
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> BatchAccepted:
    """Queue many turns at once, all or none; ids and statuses come back in request order. Every bad
    item is listed by its index. Each item takes its own `idempotency_key`: an `Idempotency-Key`
    header, which would key no item, is refused naming it (a retry would store every item again)."""
    if idempotency_key is not None:
        loc = ("header", "idempotency-key")
        msg = "a batch takes no key of its own; give each item its idempotency_key"
        raise RequestValidationError([{"type": "value_error", "loc": loc, "msg": msg}])
    # In this thread: a format's grammar may take seconds to build, and all of them together no longer
    # than three builds may (past that, a 503 to send it again: the grammars built are kept).
    with build_budget():
        batch = validated(BatchRequest, body)
    accepted = _enqueue(batch.turns, who)
    return BatchAccepted(ids=[t.id for t in accepted], turns=accepted)


@router.get("/{turn_id}", response_model=TurnView)
async def get_turn(
    turn_id: uuid.UUID,
    who: Annotated[Caller, Depends(needs("ingest"))],
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            le=settings.turn_wait_max_s,
            description="long poll: answer once the turn ends, or after S s",
        ),
    ] = None,
) -> Any:
    """Status, reply, usage, timings; the prompt and its manifest for admin keys only. With `wait=S`
    it answers as soon as the turn is finished, or after S seconds as the turn stands."""

    async def read() -> TurnView:
        return await run_in_threadpool(visible_turn, turn_id, who)

    # The wait ends at the server's shutdown with the turn as it stands (uvicorn waits for every open
    # request: a deploy under long polls waited out each one, or was killed; review).
    return await await_finished(read, wait or 0.0, stop=shutting_down)


@router.get("/{turn_id}/manifest")
def get_manifest(turn_id: uuid.UUID, who: Annotated[Caller, Depends(needs("admin"))]) -> Any:
    """What went into the turn's prompt, why, and the tokens of each section (they sum to the prompt)."""
    view = visible_turn(turn_id, who)
    if view.context is None:
        if settings.prompt_retention_days and view.status.value == "done":  # forgotten past its days
            raise HTTPException(
                status.HTTP_410_GONE,
                f"turn {turn_id}: its manifest was forgotten (MLCHAT_PROMPT_RETENTION_DAYS)",
            )
        if view.status.value in ("queued", "running"):
            raise HTTPException(
                status.HTTP_409_CONFLICT, f"turn {turn_id} is {view.status.value}: no prompt yet"
            )
        # A 409 "yet" invited a retry of a turn that will never have one (review of error texts).
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"turn {turn_id} is {view.status.value} and holds no prompt: it ended before one was built, "
            "or it was forgotten (MLCHAT_PROMPT_RETENTION_DAYS)",
        )
    return view.context


@router.delete("/{turn_id}", response_model=Cancelled)
def cancel_turn(turn_id: uuid.UUID, who: Annotated[Caller, Depends(needs("ingest"))]) -> Cancelled:
    """Cancel a turn that has not started, or one whose worker is gone (its lease lapsed); one being
    answered or finished is left as it is."""
    visible_turn(turn_id, who)
    cancelled = producer.cancel_turn(turn_id)
    view = visible_turn(turn_id, who)
    return Cancelled(id=turn_id, cancelled=cancelled, status=view.status.value)
