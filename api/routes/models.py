"""OpenAI's models routes: the characters a chat completion may name as its `model`, which clients
and tools built for OpenAI list before they talk (`client.models.list()`, a UI's model picker)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from api.deps import Caller, needs
from api.openai_errors import error_body
from services import characters
from services.characters import SLUG_PATTERN

router = APIRouter(prefix="/v1/models", tags=["models"])
Reader = Annotated[Caller, Depends(needs("ingest"))]


@router.get("")
async def list_models(who: Reader) -> dict[str, Any]:
    """Every character, as a model object."""
    return {"object": "list", "data": await run_in_threadpool(characters.as_models, None, who.tenant)}


@router.get("/{model}")
async def get_model(model: Annotated[str, Path(max_length=200)], who: Reader) -> Any:
    """One character as a model object; a 404 naming `model` when no character has that slug."""
    # A name no slug can be (a NUL, 200 characters) is no model: not looked up (the database refuses
    # a NUL in a string, a 500).
    named = re.fullmatch(SLUG_PATTERN, model)
    found = await run_in_threadpool(characters.as_models, model, who.tenant) if named else []
    if not found:  # as OpenAI answers it: its client raises NotFoundError
        message = f"model: the model {model!r} does not exist"
        body = error_body(status.HTTP_404_NOT_FOUND, message, code="model_not_found")
        return JSONResponse(body, status_code=status.HTTP_404_NOT_FOUND)
    return found[0]
