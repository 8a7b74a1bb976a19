"""The HTTP ingest app: routes per resource (api/routes/), the key dependency (api/deps.py), error
handlers (api/errors.py). OpenAPI at /openapi.json.

Run with `mlchat api` (or `uvicorn api.main:create_app --factory --http h11
--h11-max-incomplete-event-size 65536`: SERVER_OPTIONS below).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.body_limit import BodySizeLimit
from api.off_loop import publish_bodies
from api.private_responses import PrivateResponses
from api.request_count import RequestCount
from api.routes import (
    batches,
    callbacks,
    characters,
    chat_completions,
    desk,
    facts,
    files,
    health,
    models,
    players,
    scenes,
    stories,
    stream,
    turns,
)
from api.routes import metrics as metrics_routes
from core import metrics
from core.logging import configure_logging
from core.settings import settings
from services.files import check_files_dir
from streaming.events import redis_url
from streaming.hub import close_hub

logger = logging.getLogger(__name__)


@asynccontextmanager
async def _lifespan(_app: FastAPI) -> AsyncIterator[None]:
    # The broker's URL, resolved once per process, starts the embedded Redis when REDIS_URL is unset:
    # resolved here, off the event loop, the first stream reader does not start it on the loop.
    try:
        await asyncio.to_thread(redis_url)
    except Exception:
        logger.warning("no broker at startup; the requests that need one will say so", exc_info=True)
    yield
    await close_hub()  # the SSE readers' hub starts with the first reader and stops with the app
    metrics_routes.process_ended()


# How uvicorn serves the app (the CLI and the tests alike). h11, not httptools (installed beside
# uvicorn, and picked by default): httptools grows a request's URL and each header value without a
# bound, on the event loop, so one connection with no key could fill the memory and stall every
# tenant; h11 answers 400 and closes once a request's line and headers pass this size.
# A shutdown waits at most SHUTDOWN_GRACE_S for the requests still open (streams end within a second,
# waits at once; uvicorn's default waits for ever), then cancels them and runs the lifespan's cleanup,
# within the compose `api` service's stop_grace_period. A background job already on its thread goes
# on until it ends or the SIGKILL (a thread cannot be cancelled); housekeeping resumes what it left.
SHUTDOWN_GRACE_S = 20
SERVER_OPTIONS: dict[str, object] = {
    "http": "h11",
    "h11_max_incomplete_event_size": 64 * 1024,
    "timeout_graceful_shutdown": SHUTDOWN_GRACE_S,
}


def create_app() -> FastAPI:
    """Build the app; refuses to start with no API keys configured."""
    if not settings.api_keys:
        # One line, as `mlchat api` says it: under `uvicorn --factory` a RuntimeError was a traceback.
        raise SystemExit(
            "mlchat: bad setting: MLCHAT_API_KEYS: set it (a JSON list of keys) before starting the"
            " HTTP ingest"
        )
    from worker.embedder import device_refusal

    refusal = device_refusal(settings.embedder_device)
    if refusal is not None:
        raise SystemExit(f"mlchat: bad setting: {refusal}")
    configure_logging()  # each of `mlchat api --workers N`'s processes: spawned, they inherit none
    check_files_dir()  # batch files are uploaded here: an unusable folder is one line now, not a 500 later
    app = FastAPI(
        title="mlchat",
        version="0.1.0",
        summary="In-character replies for game NPCs, in batches",
        lifespan=_lifespan,
        # No /docs or /redoc: their pages load Swagger UI and ReDoc from a CDN (unpinned, no SRI) on
        # the desk's origin, where a writer's session cookie is sent (review of the web security).
        # The OpenAPI document stays at /openapi.json.
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.api_max_body_bytes,
        per_path={
            "/v1/characters:import": settings.card_max_bytes,
            "/v1/files": settings.batch_file_max_bytes + 65_536,  # the file and its multipart framing
        },
    )
    errors.install(app)
    for module in (
        turns,
        callbacks,
        stream,
        chat_completions,
        models,
        batches,
        files,
        characters,
        facts,
        players,
        stories,
        scenes,
        health,
        metrics_routes,
    ):
        app.include_router(module.router)
    desk.install(app)  # the writers' desk: pages under /desk, GET /v1/turns/{id}/review
    publish_bodies(app)  # the bodies validated off the event loop, in the OpenAPI document

    app.add_middleware(PrivateResponses)  # every /v1/ answer, refusals of the body limit too
    app.add_middleware(RequestCount)  # outside the body limit: its 413s are counted too

    metrics.register_queue_depth()  # served by api/routes/metrics.py, for admin keys unless public
    return app
