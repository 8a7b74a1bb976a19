"""Stories: the game appends events, embedded on write. Admin keys only: a story is the deployment's,
read by every tenant's turns that name it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Response, status
from fastapi.exceptions import RequestValidationError

from api.deps import Caller, json_body, needs
from services import characters
from services.schemas import HeaderText, StoryEventIn, Text

router = APIRouter(prefix="/v1/stories", tags=["stories"], dependencies=[Depends(needs("admin"))])


@router.post("/{story:path}/events", status_code=201, dependencies=[Depends(json_body("admin"))])
def add_story_event(
    story: Annotated[Text, Path(min_length=1, max_length=100)],
    body: StoryEventIn,
    response: Response,
    who: Annotated[Caller, Depends(needs("admin"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> Any:
    """Append an event to a story; it is embedded on write and retrieved by later turns.
    `Idempotency-Key` makes a retry safe: it answers 200 with the event the first request appended
    (409 when the key was used for another event)."""
    try:
        event, replayed = characters.add_story_event(
            story,
            body.text,
            scene=body.scene,
            time=body.time,
            tenant=who.tenant,
            idempotency_key=idempotency_key,
        )
    except characters.ReservedStory as exc:
        error = {"type": "value_error", "loc": ("path", "story"), "msg": str(exc).removeprefix("story: ")}
        raise RequestValidationError([error]) from None
    if replayed:
        response.status_code = status.HTTP_200_OK
    return event
