"""The ingest's Prometheus metrics: for admin keys, or for anyone when MLCHAT_API_METRICS_PUBLIC is set
(a scraper on a private network). The series say which routes are used and how often, so an open
/metrics is an opt-in."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.deps import metrics_reader

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False, dependencies=[Depends(metrics_reader)])
def scrape() -> Response:
    """Prometheus text format; an admin key (`X-API-Key` or `Authorization: Bearer`) unless public."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
