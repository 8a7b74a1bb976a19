"""Characters: import a SillyTavern card, export one. Admin keys only."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response, status
from pydantic import BaseModel

from api.deps import needs
from roleplay.cards import CardError
from services import characters
from services.characters import SLUG_PATTERN

router = APIRouter(prefix="/v1/characters", tags=["characters"], dependencies=[Depends(needs("admin"))])

Slug = Annotated[str, Path(pattern=SLUG_PATTERN, max_length=64)]


class CharacterImported(BaseModel):
    slug: str
    id: int
    created: bool


@router.post(":import", status_code=201, response_model=CharacterImported)
async def import_character(
    request: Request,
    response: Response,
    slug: Annotated[str | None, Query(pattern=SLUG_PATTERN, max_length=64)] = None,
) -> CharacterImported:
    """Import a V2/V3 card: the JSON or PNG file as the request body (201; 200 when it updates the
    character the slug names)."""
    from fastapi.concurrency import run_in_threadpool

    imported = await run_in_threadpool(characters.import_card, await request.body(), slug)
    if not imported.created:
        response.status_code = status.HTTP_200_OK
    return CharacterImported(slug=imported.slug, id=imported.id, created=imported.created)


@router.get("/{slug}/card")
def export_character(slug: Slug, format: Literal["json", "png"] = "json") -> Response:
    """The character as a card (the imported card, unknown fields and extensions included)."""
    try:
        data = characters.export_card(slug, format)
    except LookupError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
    except CardError as exc:  # a PNG that would not import back: the JSON export is the way
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from None
    return Response(data, media_type="image/png" if format == "png" else "application/json")
