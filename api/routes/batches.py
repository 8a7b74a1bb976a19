"""Batches, as OpenAI's Batch API has them: create from an uploaded file, read, list, cancel.

The official `openai` client works against these routes (base URL `<mlchat>/v1`). Two extensions,
given in the create body (the client's `extra_body`): `callback_url`, POSTed the batch object when
it ends (signed, see services/callbacks.py), `allow_system_prompt`, and `candidates` (best of n).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Depends, Header, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field

from api.background import run_after_answer
from api.deps import Caller, json_body, needs
from services import batches
from services.batches import BatchNotFound, BatchRefused, KeyReused
from services.files import QuotaReached
from services.schemas import HeaderText, Text

router = APIRouter(prefix="/v1/batches", tags=["batches"])

# Batch ids are `batch_<hex>`; anything else (a NUL, a path, 10 kB) is a 422 before any query.
BatchId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: Text = Field(min_length=1, max_length=64)
    endpoint: Text = Field(max_length=64)
    completion_window: Text | None = Field(default=None, max_length=16)
    metadata: dict[Text, Any] | None = None
    # {"anchor": "created_at", "seconds": 3600..2592000}: the output and error files' lifetime.
    output_expires_after: dict[Text, Any] | None = None
    callback_url: Text | None = Field(default=None, max_length=2000)
    allow_system_prompt: bool = False
    candidates: int | None = Field(default=None, ge=1, le=8)  # best of n per request


@router.post("", dependencies=[Depends(json_body("ingest"))])
def create_batch(
    body: BatchCreate,
    background: BackgroundTasks,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> Any:
    """Create a batch from an uploaded file; it starts `validating` and its lines are checked, stored
    and sent right after this answers. `allow_system_prompt` (a line's system message replaces the
    character's persona) needs an admin key: 403 for an ingest key. `Idempotency-Key` makes a retry
    safe (a week): it answers with the batch the first request created (409 when the key was used
    for another request)."""
    if body.allow_system_prompt and not who.admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "allow_system_prompt: replacing the persona needs an admin key"
        )
    try:
        batch, created = batches.create_batch(
            input_file_id=body.input_file_id,
            endpoint=body.endpoint,
            completion_window=body.completion_window,
            metadata=body.metadata,
            api_key=who.key_id,
            tenant=who.tenant,
            admin=who.admin,
            callback_url=body.callback_url,
            allow_system_prompt=body.allow_system_prompt,
            candidates=body.candidates,
            output_expires_after=body.output_expires_after,
            idempotency_key=idempotency_key,
        )
    except KeyReused as exc:
        raise HTTPException(  # the openai client retries a 409 unless told not to
            status.HTTP_409_CONFLICT, f"Idempotency-Key (header): {exc}", {"x-should-retry": "false"}
        ) from None
    except BatchRefused as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except QuotaReached as exc:
        raise HTTPException(status.HTTP_403_FORBIDDEN, str(exc)) from None
    if created:  # a replay's batch is its first request's to submit (a try counted each time)
        run_after_answer(background, batches.submit_batch_by_name, batch["id"])
    return batch


@router.get("")
def list_batches(
    who: Annotated[Caller, Depends(needs("ingest"))],
    after: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Any:
    """The caller's batches, newest first."""
    try:
        return batches.list_batches(
            api_key=who.key_id, admin=who.admin, after=after, limit=limit, tenant=who.tenant
        )
    except BatchNotFound as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"after: {exc}") from None


@router.get("/{batch_id}")
def get_batch(batch_id: BatchId, who: Annotated[Caller, Depends(needs("ingest"))]) -> Any:
    try:
        return batches.get_batch(batch_id, api_key=who.key_id, admin=who.admin, tenant=who.tenant)
    except BatchNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None


@router.post("/{batch_id}/cancel")
def cancel_batch(
    batch_id: BatchId, who: Annotated[Caller, Depends(needs("ingest"))], background: BackgroundTasks
) -> Any:
    """Cancel the requests not started yet; finished ones are kept and written to the output file
    after the answer (a large batch's files take minutes: a client would time out and send again)."""
    try:
        return batches.cancel_batch(
            batch_id,
            api_key=who.key_id,
            admin=who.admin,
            tenant=who.tenant,
            finalize=lambda run_id: run_after_answer(background, batches.finalize_run, run_id),
        )
    except BatchNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except batches.BatchEnded as exc:  # the openai client retries a 409 unless told not to
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc), {"x-should-retry": "false"}) from None
