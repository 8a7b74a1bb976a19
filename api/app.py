"""The HTTP ingest app: POST/GET/DELETE turns, batch submit, health; OpenAPI at /openapi.json.

Run with `uvicorn api.app:create_app --factory` (or `mlchat api`).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from prometheus_client import make_asgi_app
from pydantic import BaseModel, Field
from sqlalchemy import text

from api.auth import require_api_key
from api.body_limit import BodySizeLimit
from core import metrics
from core.settings import settings
from db.turns import IdempotencyConflict
from roleplay.cards import CardError
from services import characters, producer
from services.producer import EnqueueError, TurnView
from services.schemas import TurnRequest


class TurnAccepted(BaseModel):
    id: uuid.UUID
    status: str  # the turn's real status: a replay of an answered turn says "done"
    created: bool  # False for a replay of an idempotency key


class BatchRequest(BaseModel):
    turns: list[TurnRequest] = Field(min_length=1, max_length=1000)


class BatchAccepted(BaseModel):
    ids: list[uuid.UUID]
    turns: list[TurnAccepted]


class StoryEventIn(BaseModel):
    text: str = Field(min_length=1, max_length=4000)
    scene: str = Field(default="", max_length=200)
    time: int | None = None


class CharacterImported(BaseModel):
    slug: str
    id: int


class Cancelled(BaseModel):
    id: uuid.UUID
    cancelled: bool
    status: str


def _enqueue(requests: list[TurnRequest]) -> list[TurnAccepted]:
    try:
        stored = producer.submit_turns(requests)
    except IdempotencyConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except EnqueueError as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    except ValueError as exc:  # unknown character, conversation or model
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
    return [TurnAccepted(id=t.id, status=t.status.value, created=t.created) for t in stored]


def create_app() -> FastAPI:
    """Build the app; refuses to start with no API keys configured."""
    if not settings.api_keys:
        raise RuntimeError("set MLCHAT_API_KEYS (a JSON list of keys) before starting the HTTP ingest")
    app = FastAPI(title="mlchat", version="0.1.0", summary="In-character replies for game NPCs, in batches")
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    authed = [Depends(require_api_key)]

    @app.post("/v1/turns", status_code=202, dependencies=authed, response_model=TurnAccepted)
    async def post_turn(
        body: TurnRequest,
        response: Response,
        idempotency_key: str | None = Header(default=None, max_length=200),
    ) -> TurnAccepted:
        """Queue one turn (202); `Idempotency-Key` (header or body field) makes retries safe: a replay
        answers 200 with the turn as it stands."""
        if idempotency_key and not body.idempotency_key:
            body = body.model_copy(update={"idempotency_key": idempotency_key})
        (accepted,) = await run_in_threadpool(_enqueue, [body])
        if not accepted.created:
            response.status_code = status.HTTP_200_OK
        return accepted

    @app.post("/v1/turns:batch", status_code=202, dependencies=authed, response_model=BatchAccepted)
    async def post_batch(body: BatchRequest) -> BatchAccepted:
        """Queue many turns at once, all or none; ids and statuses come back in request order."""
        accepted = await run_in_threadpool(_enqueue, body.turns)
        return BatchAccepted(ids=[t.id for t in accepted], turns=accepted)

    @app.get("/v1/turns/{turn_id}", dependencies=authed, response_model=TurnView)
    async def get_turn(turn_id: uuid.UUID) -> Any:
        """Status, reply, usage, timings and the prompt's context manifest."""
        view = await run_in_threadpool(producer.get_turn, turn_id)
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no turn {turn_id}")
        return view

    @app.get("/v1/turns/{turn_id}/manifest", dependencies=authed)
    async def get_manifest(turn_id: uuid.UUID) -> Any:
        """What went into the turn's prompt, why, and the tokens of each section (they sum to the prompt)."""
        view = await run_in_threadpool(producer.get_turn, turn_id)
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no turn {turn_id}")
        if view.context is None:
            detail = f"turn {turn_id} is {view.status.value}: no prompt yet"
            raise HTTPException(status.HTTP_409_CONFLICT, detail)
        return view.context

    @app.post("/v1/characters:import", status_code=201, dependencies=authed, response_model=CharacterImported)
    async def import_character(request: Request, slug: str | None = None) -> CharacterImported:
        """Import a SillyTavern V2/V3 card: the JSON or PNG file as the request body."""
        try:
            found, char_id = await run_in_threadpool(characters.import_card, await request.body(), slug)
        except CardError as exc:
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_ENTITY, str(exc)) from exc
        return CharacterImported(slug=found, id=char_id)

    @app.get("/v1/characters/{slug}/card", dependencies=authed)
    async def export_character(slug: str, format: Literal["json", "png"] = "json") -> Response:
        """The character as a card (the imported card, unknown fields and extensions included)."""
        try:
            data = await run_in_threadpool(characters.export_card, slug, format)
        except LookupError as exc:
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        return Response(data, media_type="image/png" if format == "png" else "application/json")

    @app.post("/v1/stories/{story}/events", status_code=201, dependencies=authed)
    async def add_story_event(story: str, body: StoryEventIn) -> Any:
        """Append an event to a story; it is embedded on write and retrieved by later turns."""
        return await run_in_threadpool(
            characters.add_story_event, story, body.text, scene=body.scene, time=body.time
        )

    @app.delete("/v1/turns/{turn_id}", dependencies=authed, response_model=Cancelled)
    async def cancel_turn(turn_id: uuid.UUID) -> Cancelled:
        """Cancel a queued turn; a running or finished one is left as it is."""
        cancelled = await run_in_threadpool(producer.cancel_turn, turn_id)
        view = await run_in_threadpool(producer.get_turn, turn_id)
        if view is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no turn {turn_id}")
        return Cancelled(id=turn_id, cancelled=cancelled, status=view.status.value)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        route = request.scope.get("route")
        metrics.INGEST_REQUESTS.labels(
            request.method, getattr(route, "path", "unmatched"), str(response.status_code)
        ).inc()
        return response

    metrics.register_queue_depth()
    app.mount("/metrics", make_asgi_app())  # Prometheus text format; unauthenticated, like /healthz

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness and readiness: the database and the broker both answer."""
        return await run_in_threadpool(_health)

    return app


def _health() -> dict[str, str]:
    from db.session import get_engine
    from tasks.app import app as celery_app

    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"unhealthy: {exc}") from exc
    return {"status": "ok"}
