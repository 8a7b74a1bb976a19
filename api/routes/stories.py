"""Stories: the game appends events, embedded on write. Admin keys only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path

from api.deps import json_body, needs
from services import characters
from services.schemas import StoryEventIn, Text

router = APIRouter(prefix="/v1/stories", tags=["stories"], dependencies=[Depends(needs("admin"))])


@router.post("/{story:path}/events", status_code=201, dependencies=[Depends(json_body)])
def add_story_event(story: Annotated[Text, Path(min_length=1, max_length=100)], body: StoryEventIn) -> Any:
    """Append an event to a story; it is embedded on write and retrieved by later turns."""
    return characters.add_story_event(story, body.text, scene=body.scene, time=body.time)
