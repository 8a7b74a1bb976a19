"""Scenes: start a live group conversation, ask it to go on with no player line, read it."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, Response, status
from starlette.concurrency import run_in_threadpool

from api.deps import Caller, json_body, needs
from api.off_loop import documented, validated
from api.paging import Page, page
from scenes.spec import ContinueSpec, GroupSpec
from services import scenes
from services.schemas import HeaderText, Text

# A conversation's external id, checked like the body's (no NUL or control characters: PostgreSQL's
# text refuses a NUL, which was a 500).
ConversationId = Annotated[Text, Path(min_length=1, max_length=200)]

router = APIRouter(prefix="/v1/scenes", tags=["scenes"])


@router.post(
    "", status_code=201, dependencies=[Depends(json_body("ingest"))], openapi_extra=documented(GroupSpec)
)
async def post_scene(
    body: Annotated[Any, Body()],
    response: Response,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> dict[str, Any]:
    """Start a group conversation; with `exchanges` > 0 its members start talking at once (live lane).
    `Idempotency-Key` makes a retry safe: it answers 200 with the group the first request started, as
    it stands now, and sends again only its next line whose message never went (409 when the key was
    used for another group)."""

    def start() -> dict[str, Any]:  # validated here, in a thread: a format's grammar may take seconds
        return scenes.start_group(
            validated(GroupSpec, body), tenant=who.tenant, api_key=who.key_id, idempotency_key=idempotency_key
        )

    try:
        view = await run_in_threadpool(start)
    except scenes.SceneRefused as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from None
    except scenes.SceneNotFound as exc:  # stored, then erased before its view was read (review: a 500)
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    if view["replayed"]:
        response.status_code = status.HTTP_200_OK
    return view


@router.post("/{conversation:path}:continue", dependencies=[Depends(json_body("ingest"))])
async def continue_scene(
    conversation: ConversationId,
    body: ContinueSpec,
    who: Annotated[Caller, Depends(needs("ingest"))],
    idempotency_key: Annotated[HeaderText | None, Header(min_length=1, max_length=200)] = None,
) -> dict[str, Any]:
    """Ask the group to go on for `exchanges` lines with no player line (ambient chatter).
    `Idempotency-Key` makes a retry safe: it asks for nothing more, answers with the group as it
    stands (`replayed`), and sends again only a line whose message never went (409 when the key was
    used for another call)."""
    try:
        return await run_in_threadpool(
            lambda: scenes.continue_group(
                conversation,
                body.exchanges,
                tenant=who.tenant,
                api_key=who.key_id,
                idempotency_key=idempotency_key,
            )
        )
    except scenes.SceneNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except scenes.SceneClosed as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None


@router.post("/{conversation:path}:stop")
async def stop_scene(
    conversation: ConversationId, who: Annotated[Caller, Depends(needs("ingest"))]
) -> dict[str, Any]:
    """Stop the group's chatter (the player walked away): no line is owed past those stored; a line
    being written is kept and is the last, one still queued is cancelled. `:continue` goes on again
    later. Safe to send again. 409 for a run's group (cancel its run)."""
    try:
        return await run_in_threadpool(lambda: scenes.stop_group(conversation, tenant=who.tenant))
    except scenes.SceneNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
    except scenes.SceneClosed as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None


@router.get("/{conversation:path}")
async def get_scene(
    conversation: ConversationId,
    who: Annotated[Caller, Depends(needs("ingest"))],
    wanted: Annotated[Page, Depends(page)],
) -> dict[str, Any]:
    """The group's scene and a page of its transcript: the lines after line `after` (pass the last
    answer's `next_after` for the next page, or for lines written since), at most `limit`."""
    try:
        return await run_in_threadpool(
            scenes.scene_view, conversation, tenant=who.tenant, after=wanted.after, limit=wanted.limit
        )
    except scenes.SceneNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
